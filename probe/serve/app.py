"""The ASGI app of ``probe serve`` (FastAPI): predict, health, metadata, the OpenAPI schema and the web page.

    POST /predict   raw image body | multipart (one or more files) | JSON {"images": [base64, ...]}
                    --> decode (thread pool, pixel limit) --> dynamic batcher (one model thread) --> JSON
    GET  /health    liveness (no token needed)
    GET  /metadata  the model card: name, version, backbone, classes, metrics, lineage, serving statistics
    GET  /openapi.json, GET /  (the page: plain HTML + a little JS, no external URLs)

Bad input is the client's fault and gets a 4xx with ``{"detail": "..."}``: 413 (body over the limit), 415 (not
an image content type), 400 (malformed JSON / base64 / multipart, no image), 422 (not decodable, truncated, over
the pixel limit). 401 without the bearer token (when one is set), 504 when a request takes longer than
``timeout_s``. A failing batch fails only its own requests; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from ..errors import ImageDecodeError, ProbeError
from ..jsonable import json_default
from ..preprocess import decode_image
from .batcher import Batcher
from .predictor import FileSource, Predictor, RegistrySource

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 20 * 2**20  # bytes per request
DEFAULT_MAX_PIXELS = 40_000_000  # per decoded image; lower than extraction's: many requests decode at once
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_POLL_S = 1.0
MAX_IMAGES = 64  # per request
PUBLIC_PATHS = frozenset({"/", "/health"})  # the page holds no data: it fetches /metadata with the token

try:  # the optional [serve] extra
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ProbeError("probe serve needs the [serve] extra: pip install 'probe[serve]'") from e


class TopK(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most probable class")
    probability: float
    top_k: list[TopK]
    key: str = Field(description="cache key of the decoded image (sha256 of its pixels)")


class PredictResponse(BaseModel):
    model: str
    version: int | str | None
    predictions: list[Prediction]


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": IMAGE_BODY,
            "application/octet-stream": IMAGE_BODY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                           "description": "base64 images (a data: URL prefix is accepted)"}}}},
        },
    }
}


def model_source(model_ref, registry=None, *, trust: bool = False):
    """A FileSource for an existing file, else a RegistrySource for a registry reference."""
    from ..registry import is_model_ref

    if not isinstance(model_ref, (str, os.PathLike)):
        return model_ref  # already a source
    if Path(model_ref).is_file():
        return FileSource(model_ref, trust=trust)
    if isinstance(model_ref, Path) or not is_model_ref(str(model_ref)):
        raise ProbeError(f"{model_ref}: no such model file, and not a registry reference (NAME or NAME@REF)")
    return RegistrySource(str(model_ref), registry, trust=trust)


# -- raw ASGI layers: they act before FastAPI parses anything ------------------------------------------------


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Bearer-token check, then the request body read in full up to ``max_body`` bytes (413 beyond it) and
    replayed to the app, so no handler ever sees an over-limit body."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, credential = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), self.token.encode()):
                return await _send_json(send, 401, {"detail": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                                        [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return await _send_json(send, 413, {"detail": f"request body of {int(length)} bytes is over "
                                                                  f"the limit of {self.max_body} bytes"})
            except ValueError:
                return await _send_json(send, 400, {"detail": "malformed Content-Length header"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await _send_json(send, 413, {"detail": f"request body is over the limit of {self.max_body} bytes"})
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay_receive():
            nonlocal sent
            if not sent:
                sent = True
                return replay
            return await receive()

        return await self.app(scope, replay_receive, send)


# -- the app -------------------------------------------------------------------------------------------------


def create_app(model_ref, *, registry=None, cache=None, capture: bool = False, max_batch: int = 16,
               max_wait_ms: float = 5.0, token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = DEFAULT_TIMEOUT_S,
               poll_s: float = DEFAULT_POLL_S, decode_threads: int | None = None,
               trust: bool = False, extract_options: dict | None = None):
    """Build the app serving ``model_ref`` (a ``.probe`` path, a registry reference, or a model source).

    The model is loaded here (so a bad reference fails before a port is bound). ``cache``: feature cache read
    for known inputs and, with ``capture=True``, written with served inputs (plus the served-keys log).
    ``poll_s``: how often the source is checked for a new version (0 disables hot swap).
    """
    source = model_source(model_ref, registry, trust=trust)
    predictor = Predictor(source, cache=cache, capture=capture, max_pixels=max_pixels,
                          extract_options=extract_options)
    batcher = Batcher(predictor.run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms)
    decoders = ThreadPoolExecutor(decode_threads or min(8, (os.cpu_count() or 1) + 1),
                                  thread_name_prefix="probe-decode")
    loader = ThreadPoolExecutor(1, thread_name_prefix="probe-model-loader")
    counters = {"requests": 0, "inputs": 0, "rejected": 0, "timeouts": 0}

    async def watch():
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(poll_s)
            try:
                await loop.run_in_executor(loader, predictor.refresh)
            except Exception as e:  # noqa: BLE001 - e.g. the registry briefly unreadable: try again later
                log.warning("checking for a new model version failed: %s", e)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        watcher = asyncio.create_task(watch(), name="probe-model-watch") if poll_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await batcher.stop()
            loader.shutdown(wait=True)
            decoders.shutdown(wait=True)
            predictor.close()

    app = FastAPI(title="probe", summary="Predictions of a probe model (frozen backbone + fitted head).",
                  version=_probe_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.state.counters = counters

    async def decode(data: bytes, name: str):
        loop = asyncio.get_running_loop()
        if not data:
            raise HTTPException(400, f"{name}: empty image")
        try:
            return await loop.run_in_executor(decoders, decode_image, data, max_pixels)
        except ImageDecodeError as e:
            raise HTTPException(422, f"{name}: {str(e).split(': ', 1)[-1]}") from e
        except Exception as e:  # noqa: BLE001 - a decoder bug is still this input's problem, not a 500
            raise HTTPException(422, f"{name}: cannot decode ({type(e).__name__}: {e})") from e

    async def payloads(request: Request) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
            except Exception as e:  # noqa: BLE001 - malformed multipart
                raise HTTPException(400, f"malformed multipart body ({e})") from e
            files = [v for _, v in form.multi_items() if not isinstance(v, str)]
            if not files:
                raise HTTPException(400, "multipart body has no file part")
            out = []
            for i, f in enumerate(files):
                out.append((f"file {i} ({f.filename or 'unnamed'})", await f.read()))
            await form.close()
            return out
        body = await request.body()
        if ctype == "application/json":
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise HTTPException(400, f"malformed JSON ({e})") from e
            images = doc.get("images") if isinstance(doc, dict) else None
            if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
                raise HTTPException(400, 'JSON body must be {"images": [base64 string, ...]} with at least one image')
            out = []
            for i, s in enumerate(images):
                if s.startswith("data:"):
                    s = s.partition(",")[2]
                try:
                    out.append((f"image {i}", base64.b64decode(s, validate=True)))
                except (binascii.Error, ValueError) as e:
                    raise HTTPException(400, f"image {i}: not valid base64 ({e})") from e
            return out
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [("body", body)]
        raise HTTPException(415, f"content type {ctype or '(none)'!r} is not an image: send image/*, "
                                 "application/octet-stream, multipart/form-data or application/json")

    async def predict_request(request: Request, k: int) -> dict:
        with batcher.expecting():  # a batch forming now waits (up to max_wait) for this request's images
            items = await payloads(request)
            if len(items) > MAX_IMAGES:
                raise HTTPException(413, f"{len(items)} images in one request; the limit is {MAX_IMAGES}")
            images = await asyncio.gather(*(decode(data, name) for name, data in items))
        results = await batcher.submit(images)  # no await between the two lines: the collector sees one or the other
        counters["inputs"] += len(results)
        return {"model": results[0]["model"], "version": results[0]["version"],
                "predictions": [{"class": r["class"], "probability": r["probability"], "top_k": r["ranked"][:k],
                                 "key": r["key"]} for r in results]}

    @app.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY,
              responses={400: {}, 401: {}, 413: {}, 415: {}, 422: {}, 504: {}})
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)):
        """Predict one image (raw body), several (multipart files, or JSON base64): class, probability, top-k."""
        counters["requests"] += 1
        try:
            return await asyncio.wait_for(predict_request(request, top_k), timeout_s)
        except asyncio.TimeoutError:
            counters["timeouts"] += 1
            raise HTTPException(504, f"prediction took longer than {timeout_s:g} s") from None
        except HTTPException:
            counters["rejected"] += 1
            raise
        except ImageDecodeError as e:  # failed in the engine (e.g. an extreme aspect ratio)
            counters["rejected"] += 1
            raise HTTPException(422, str(e)) from e

    @app.get("/health")
    async def health():
        """Liveness: the server answers and a model is loaded."""
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        """The model card of the version now served, plus serving statistics."""
        return model_card(predictor, batcher, counters)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE_HTML)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug, not bad input
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.add_middleware(GuardMiddleware, token=token, max_body=max_body_bytes)
    return app


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0):
    """Run ``app`` under uvicorn on a thread (for notebooks, tests and benchmarks); yields the base URL.
    ``port=0`` takes a free port. The server stops (lifespan shutdown included) when the block ends."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="probe-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ProbeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def model_card(predictor: Predictor, batcher: Batcher, counters: dict) -> dict:
    served = predictor.current
    m = served.model
    meta = m.meta_ or {}
    bb = m.backbone_
    card = {
        "name": served.name,
        "version": served.version,
        "source": served.info,
        "backbone": {k: bb.get(k) for k in ("name", "dim", "layer", "pooling", "dtype", "weights_sha256",
                                            "space_digest", "preprocess")},
        "classes": [str(c) for c in m.classes_],
        "head": meta.get("head"),
        "metrics": meta.get("metrics"),
        "lineage": {"training": meta.get("training"), **({"registry": served.info["lineage"]}
                                                         if "lineage" in served.info else {})},
        "created": meta.get("created"),
        "versions": meta.get("versions"),
        "serving": {
            "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000, "capture": predictor.capture,
            "loaded_at": served.loaded_at, "swaps": predictor.swaps, "model_batches": predictor.model_batches,
            **counters, "batcher": batcher.stats.to_dict(),
        },
    }
    return json.loads(json.dumps(card, default=json_default))


def _probe_version() -> str:
    from .. import __version__

    return __version__


PAGE_HTML = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
