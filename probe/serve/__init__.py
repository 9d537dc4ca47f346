"""``probe serve``: an HTTP prediction service (FastAPI + uvicorn, the optional ``[serve]`` extra).

    from probe.serve import create_app
    app = create_app("model.probe")          # or "NAME" / "NAME@champion" from the model registry

``app.py`` the ASGI app, ``batcher.py`` the dynamic batcher, ``predictor.py`` the served model and hot swap,
``page.html`` the web page. Importing this package does not import FastAPI; ``create_app`` does.
"""

from __future__ import annotations

import ipaddress

from ..errors import ProbeError


def create_app(model_ref, **options):
    """Build the ASGI app; see :func:`probe.serve.app.create_app` for the options."""
    from .app import create_app as _create_app

    return _create_app(model_ref, **options)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a bearer token."""
    if not is_loopback(host) and not token:
        raise ProbeError(f"refusing to bind {host} (not loopback) without a bearer token: "
                         "pass --token TOKEN or set PROBE_TOKEN")


__all__ = ["check_bind", "create_app", "is_loopback"]
