"""Benchmark 9: serving with dynamic batching.

`probe serve` runs in a subprocess on a loopback port with a model (logistic-regression head) fitted on the main
backbone; 1, 8 and 32 concurrent clients (asyncio tasks sharing one httpx client) each send PNG files one request
at a time. Once with dynamic batching on (``--max-batch 16 --max-wait-ms 5``), once off (``--max-batch 1``),
side by side in one run (both servers up, the settings alternating, repeated ``reps`` times). Throughput (requests/s) and p50/p99 latency per setting, and the mean batch the server
formed. Bounded: at most N requests and T seconds per setting. Target: batching on / off >= 1.5x at 32 clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import harness as h
import workload as wl

NAME = "serve"
TITLE = "12. Serving: dynamic batching on vs off"
CLIENTS = (1, 8, 32)
SETTINGS = {"on": ("16", "5"), "off": ("1", "0")}  # --max-batch, --max-wait-ms
TARGET = 1.5  # throughput on / off at the most clients
SECONDS = {"tiny": 10.0, "quick": 30.0, "default": 60.0, "full": 120.0}  # per (setting, clients)


def _requests(cfg: h.Config) -> int:
    return max(32, cfg.sizes.handloop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``probe serve MODEL`` in a subprocess on a free loopback port."""

    def __init__(self, cfg: h.Config, model: Path, max_batch: str, max_wait_ms: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "probe.cli", "serve", str(model), "--port", str(self.port),
                "--max-batch", max_batch, "--max-wait-ms", max_wait_ms, "--cache", str(cfg.work / "serve" / "none")]
        if cfg.device:
            args += ["--device", cfg.device]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(h.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=h.REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"probe serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("probe serve did not start within 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _load(url: str, bodies: list[bytes], clients: int, total: int, seconds: float) -> dict:
    """``clients`` tasks send requests back to back until ``total`` were sent or ``seconds`` passed."""
    import httpx

    latencies: list[float] = []
    failed = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one_client():
            nonlocal sent, failed
            while sent < total and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/predict", content=body, headers={"content-type": "image/png"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "failed": failed, "seconds": wall,
            "rps": len(latencies) / wall if wall > 0 else float("nan"),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def _batcher(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/metadata", timeout=30).json()["serving"]["batcher"]


def fit_model(cfg: h.Config) -> Path:
    """A model on the main backbone, fitted on (at most) 200 images of the shared training subset."""
    import probe

    n = min(200, cfg.sizes.train)
    folder = wl.image_folder(cfg, "train", 0, n, "shared")  # same bytes as the shared subset: cached keys
    out = cfg.work / "serve" / "model.probe"
    probe.fit(folder, backbone=cfg.backbone.name, weights=cfg.backbone.weights, cache=str(wl.shared_cache(cfg)),
              output=out, device=cfg.device, progress=False)
    return out


def run(cfg: h.Config) -> None:
    work = cfg.work / "serve"
    work.mkdir(parents=True, exist_ok=True)
    model = fit_model(cfg)
    total = _requests(cfg)
    bodies = [Path(p).read_bytes() for p in wl.pool_files(cfg, min(64, cfg.sizes.pool))]
    rows = []
    with contextlib.ExitStack() as stack:
        # Both servers run at once and the settings alternate per client count, so a change in machine load
        # during the run hits both sides alike (an idle server only polls its model file once a second).
        servers = {setting: stack.enter_context(Server(cfg, model, max_batch, max_wait, work / f"server-{setting}.log"))
                   for setting, (max_batch, max_wait) in SETTINGS.items()}
        for server in servers.values():
            asyncio.run(_load(server.url, bodies, 16, 32, 60))  # warm-up: first batches, allocator, threads
        for rep in range(cfg.sizes.reps):
            for clients in CLIENTS:
                for setting, server in (servers.items() if rep % 2 == 0 else reversed(servers.items())):
                    max_batch, max_wait = SETTINGS[setting]
                    before = _batcher(server.url)
                    res = asyncio.run(_load(server.url, bodies, clients, total, SECONDS.get(cfg.scale, 60.0)))
                    after = _batcher(server.url)
                    batches = after["batches"] - before["batches"]
                    rows.append({"backbone": str(cfg.backbone), "batching": setting, "rep": rep,
                                 "max_batch": int(max_batch), "max_wait_ms": float(max_wait), "clients": clients,
                                 **res, "mean_batch": (after["items"] - before["items"]) / batches if batches
                                 else float("nan")})
                    h.log.info("serve %s, %d clients, rep %d: %.1f req/s, p50 %.1f ms, p99 %.1f ms", setting,
                               clients, rep, res["rps"], res["p50_ms"], res["p99_ms"])
    for clients in CLIENTS:
        med = {s: {k: h.median(r[k] for r in rows if r.get("batching") == s and r["clients"] == clients)
                   for k in ("rps", "p50_ms")} for s in SETTINGS}
        ratio = med["on"]["rps"] / med["off"]["rps"] if med["off"]["rps"] else float("nan")
        rows.append({"backbone": str(cfg.backbone), "batching": "ratio on / off", "clients": clients,
                     "ratio": ratio, "p50_ratio": med["on"]["p50_ms"] / med["off"]["p50_ms"],
                     "target": TARGET if clients == max(CLIENTS) else "",
                     "met": ratio >= TARGET if clients == max(CLIENTS) else ""})
    h.write_rows(cfg, NAME, rows)


def section(results: dict) -> tuple[str, list[dict]]:
    rows = results.get(NAME) or []
    runs = [r for r in rows if not r["batching"].startswith("ratio")]
    ratios = [r for r in rows if r["batching"].startswith("ratio")]
    table = [{"batching": r["batching"], "rep": r["rep"], "clients": r["clients"], "requests": r["requests"],
              "failed": r["failed"],
              "req/s": h.fmt(r["rps"]), "p50 ms": h.fmt(r["p50_ms"]), "p99 ms": h.fmt(r["p99_ms"]),
              "mean batch": h.fmt(r["mean_batch"])} for r in runs]
    text = [f"Backbone {rows[0]['backbone'] if rows else '?'}; `probe serve` in a subprocess on loopback, one PNG "
            "per request; batching on = `--max-batch 16 --max-wait-ms 5`, off = `--max-batch 1`.", "",
            h.md_table(table, list(table[0]) if table else [])]
    claims = []
    if ratios:
        text += ["", "Throughput on / off (medians over the repetitions): " + ", ".join(
            f"{r['clients']} clients **{h.fmt(r['ratio'])}x**" for r in ratios) + "."]
        last = max(ratios, key=lambda r: int(r["clients"]))
        claims.append(h.claim("12 serve", f"throughput with dynamic batching / without, {last['clients']} clients",
                              f"{h.fmt(last['ratio'])}x", f">= {TARGET}x", last["met"] == "yes"))
    return "\n".join(text), claims


def main(argv=None):
    run(h.parse_config(__doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
