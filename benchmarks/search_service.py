"""The search service under load: 32 concurrent clients on loopback against ``cliplab serve`` for 60 s.

A small index (``--images`` random PNGs, the tiny model by default) is built in a temporary folder, then
``cliplab serve`` runs as its own process (a real uvicorn server). One client process runs ``--clients``
asyncio tasks on one httpx connection pool; each task cycles through a fixed mix (text search, text
search, image fetch by id, image search by upload) until the deadline or ``--max-requests`` in total (the
loop is bounded either way). Reported: requests/s, p50/p99/max latency overall and per request kind,
errors (non-200 answers and transport failures; target 0).

    python benchmarks/search_service.py [--seconds 60] [--clients 32] [--images 200] [--model tiny]

On a small machine the client and the server share the cores: the figures are for both together.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import header, load_average, log, md_table, write_results

NAME = "search_service"
KINDS = ("text", "text", "image_get", "image_search")
WORDS = ("red", "dog", "car", "a photo of", "tree", "beach", "city at night", "cat", "mountain", "bicycle", "food")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def build(root: Path, n_images: int, model: str) -> tuple[Path, float]:
    """An index over ``n_images`` random PNGs in ``root``; (index dir, build seconds)."""
    from cliplab.models import load_model
    from cliplab.search import build_index

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        (images / f"img{i:05d}.png").write_bytes(_png(rng, 64))
    start = time.perf_counter()
    build_index(load_model(model, device="cpu"), images, root / "index", cache_dir=root / "cache", progress=False,
                workers=0)
    return root / "index", time.perf_counter() - start


def start_server(index_dir: Path, model: str, port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "cliplab", "serve", "--index-dir", str(index_dir), "--model", model,
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    with log_path.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cliplab serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"cliplab serve did not answer within 120 s:\n{log_path.read_text()}")


async def load(base: str, clients: int, seconds: float, max_requests: int, ids: list[int], upload: bytes) -> dict:
    """Run the clients; per kind: latencies (s) of successes, error count, first error messages."""
    import httpx

    results = {kind: {"latencies": [], "errors": 0} for kind in set(KINDS)}
    messages: list[str] = []
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(number: int, session: httpx.AsyncClient) -> None:
        nonlocal issued
        rng = random.Random(number)
        step = number
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            kind = KINDS[step % len(KINDS)]
            step += 1
            start = time.perf_counter()
            try:
                if kind == "text":
                    query = " ".join(rng.sample(WORDS, 2))
                    response = await session.get(f"{base}/search", params={"q": query, "k": 10})
                elif kind == "image_get":
                    response = await session.get(f"{base}/images/{rng.choice(ids)}")
                else:
                    response = await session.post(f"{base}/search/image", params={"k": 10},
                                                  files={"image": ("q.png", upload, "image/png")})
                ok = response.status_code == 200
                if not ok and len(messages) < 10:
                    messages.append(f"{kind}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                if len(messages) < 10:
                    messages.append(f"{kind}: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - start
            if ok:
                results[kind]["latencies"].append(elapsed)
            else:
                results[kind]["errors"] += 1

    async with httpx.AsyncClient(limits=limits, timeout=30) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        wall = time.perf_counter() - started
    return {"results": results, "messages": messages, "wall_s": wall}


def summarise(latencies: list[float], errors: int, wall: float) -> dict:
    values = np.asarray(latencies) * 1000
    n = len(values)
    return {"requests": n + errors, "ok": n, "errors": errors, "requests_per_s": (n + errors) / wall,
            "p50_ms": float(np.percentile(values, 50)) if n else None,
            "p99_ms": float(np.percentile(values, 99)) if n else None,
            "max_ms": float(values.max()) if n else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=200, help="Images in the benchmark index.")
    parser.add_argument("--model", default="tiny", help="Model spec (index and server); tiny: random weights.")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="Bound on requests in total.")
    args = parser.parse_args()
    quick = args.seconds < 60
    record = header(NAME, "cliplab serve under concurrent clients on loopback (text search, image fetch, "
                          "image search by upload)", quick)
    record["config"] = vars(args) | {"mix": list(KINDS), "k": 10, "upload": "64x64 PNG"}
    with tempfile.TemporaryDirectory(prefix="cliplab-bench-service-") as tmp:
        root = Path(tmp)
        log(f"building an index of {args.images} images with {args.model}")
        index_dir, build_s = build(root, args.images, args.model)
        from cliplab.search import SearchIndex

        index = SearchIndex.open(index_dir)
        ids = [int(i) for i in index.ids()] if hasattr(index, "ids") else list(range(index.count))
        record["index"] = {"count": index.count, "dim": index.dim, "index_type": str(index.index_type),
                           "build_s": round(build_s, 2)}
        upload = _png(np.random.default_rng(1), 64)
        port = _free_port()
        log(f"starting cliplab serve on port {port}")
        server = start_server(index_dir, args.model, port, root / "server.log")
        try:
            log(f"{args.clients} clients for {args.seconds:g} s")
            before = load_average()
            run = asyncio.run(load(f"http://127.0.0.1:{port}", args.clients, args.seconds, args.max_requests,
                                   ids, upload))
            after = load_average()
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        server_log = (root / "server.log").read_text()[-2000:]
    wall = run["wall_s"]
    per_kind = {kind: summarise(r["latencies"], r["errors"], wall) for kind, r in run["results"].items()}
    everything = summarise([x for r in run["results"].values() for x in r["latencies"]],
                           sum(r["errors"] for r in run["results"].values()), wall)
    record.update(overall=everything, per_kind=per_kind, wall_s=round(wall, 2), error_messages=run["messages"],
                  server_alive_after=alive, load_average_before=before, load_average_after=after,
                  server_log_tail=server_log, cpu_affinity=len(os.sched_getaffinity(0)))
    rows = [["all", everything["requests"], everything["requests_per_s"], everything["p50_ms"],
             everything["p99_ms"], everything["max_ms"], everything["errors"]]]
    rows += [[kind, s["requests"], s["requests_per_s"], s["p50_ms"], s["p99_ms"], s["max_ms"], s["errors"]]
             for kind, s in sorted(per_kind.items())]
    body = "\n".join([
        f"# Search service under load ({args.clients} clients, {wall:.1f} s, loopback)", "",
        f"`cliplab serve` (uvicorn, one process) over a {index.count}-image {index.index_type} index built with "
        f"`{args.model}`; client and server on the same machine. Mix per client: {', '.join(KINDS)} "
        "(k=10; image search uploads a 64x64 PNG).", "",
        md_table(["requests", "count", "req/s", "p50 ms", "p99 ms", "max ms", "errors"], rows), "",
        f"Errors: {everything['errors']} (target 0); server still running after the run: {alive}.",
        *(f"- {m}" for m in run["messages"]), "",
    ])
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
