"""The floor: what a no-op gRPC call costs on this machine (grpc.aio, Python, loopback).

A tiny echo server (``python bench/baseline.py serve --port P``; uvloop, like azolla-server) runs
in its own process; the client (default asyncio loop, like the benchmark producers) measures:

* ``unary_seq``: sequential no-op unary calls on one channel: round-trip p50/p95/p99, calls/s;
* ``unary_conc``: the same calls from many coroutines at once: calls/s (one client process);
* ``stream_pingpong``: one bidirectional stream, one message pair at a time: p50/p95/p99, pairs/s;
* ``stream_pipelined``: one bidirectional stream, the client writes as fast as it can while it
  reads the echoes: message pairs/s.

With a database (``run.py`` passes its private cluster's; ``--dsn`` here), also:

* ``commit_seq``: sequential one-row ``INSERT`` statements, each its own durable transaction
  (asyncpg, prepared, ``fsync`` and ``synchronous_commit`` on): p50/p95/p99, commits/s. An
  acknowledged submit needs one gRPC round trip and one durable commit, so ``unary_seq`` +
  ``commit_seq`` is the floor under Azolla's submit latency.

Messages are 16 bytes, no protobuf (generic handlers on raw bytes), so the figures are the cost
of gRPC and the event loops alone. Usage::

    .venv/bin/python bench/baseline.py            # start a server, measure, stop it
    .venv/bin/python bench/baseline.py --seconds 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

SERVICE = "bench.Echo"
PAYLOAD = b"0123456789abcdef"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def _lat(values_ms: list[float]) -> dict[str, float | None]:
    return {"p50": _pct(values_ms, 50), "p95": _pct(values_ms, 95), "p99": _pct(values_ms, 99)}


# -- server ------------------------------------------------------------------------------------

async def _serve(port: int) -> None:
    import grpc
    import grpc.aio

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0.5)


def serve(port: int) -> None:
    """Run the echo server until SIGTERM (uvloop when available)."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        runner.run(_serve(port))


# -- client ------------------------------------------------------------------------------------

def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid``; 0.0 when unknown."""
    import os

    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def measure(target: str, seconds: float = 3.0, concurrency: int = 64,
                  server_pid: int | None = None) -> dict[str, Any]:
    """Measure the four figures against an echo server at ``target`` (host:port).

    With ``server_pid``, also the server's CPU per sequential unary call.
    """
    import grpc.aio

    out: dict[str, Any] = {"seconds_per_figure": seconds, "concurrency": concurrency,
                           "payload_bytes": len(PAYLOAD)}
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        for _ in range(200):  # warm-up
            await unary(PAYLOAD, timeout=10)

        lat: list[float] = []
        cpu0 = _cpu_s(server_pid)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            await unary(PAYLOAD, timeout=10)
            lat.append((time.perf_counter() - t) * 1000)
        dt = time.perf_counter() - t0
        out["unary_seq"] = {"calls": len(lat), "per_s": len(lat) / dt, "lat_ms": _lat(lat)}
        if server_pid is not None and lat:
            out["unary_seq"]["server_cpu_ms_per_call"] = (
                (_cpu_s(server_pid) - cpu0) * 1000 / len(lat))

        count = 0
        end = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await unary(PAYLOAD, timeout=10)
                count += 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(concurrency))),
                               seconds + 30)
        out["unary_conc"] = {"calls": count, "per_s": count / (time.perf_counter() - t0)}

        stream = channel.stream_stream(f"/{SERVICE}/Stream")
        call = stream()
        for _ in range(200):
            await call.write(PAYLOAD)
            await call.read()
        lat = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            await call.write(PAYLOAD)
            await call.read()
            lat.append((time.perf_counter() - t) * 1000)
        dt = time.perf_counter() - t0
        await call.done_writing()
        out["stream_pingpong"] = {"pairs": len(lat), "per_s": len(lat) / dt, "lat_ms": _lat(lat)}
        call.cancel()

        call = stream()
        sent = received = 0
        stop_at = time.perf_counter() + seconds

        async def writer() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                await call.write(PAYLOAD)
                sent += 1
            await call.done_writing()

        async def reader() -> None:
            nonlocal received
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                received += 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(writer(), reader()), seconds + 30)
        dt = time.perf_counter() - t0
        out["stream_pipelined"] = {"pairs": received, "per_s": received / dt}
    return out


async def commit_floor(dsn: str, seconds: float = 3.0) -> dict[str, Any]:
    """Sequential one-row durable commits on ``dsn`` (a table made and dropped here)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    table = f"bench_commit_floor_{int(time.time() * 1000)}"
    try:
        await conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, payload text)")
        insert = await conn.prepare(f"INSERT INTO {table} (payload) VALUES ($1)")
        for _ in range(50):  # warm: plan cached, table pages in memory
            await insert.fetch("warm-up")
        lat: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds and len(lat) < 1_000_000:
            t = time.perf_counter()
            await insert.fetch('{"name": "noop"}')
            lat.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - t0
        settings = {name: await conn.fetchval(f"SHOW {name}")
                    for name in ("fsync", "synchronous_commit")}
        return {"commits": len(lat), "per_s": len(lat) / elapsed, "lat_ms": _lat(lat),
                "settings": settings}
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def run_baseline(python: str, seconds: float, concurrency: int = 64,
                 port: int | None = None) -> dict[str, Any]:
    """Start the echo server in a subprocess, measure from this process, stop the server."""
    import socket

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    server = subprocess.Popen([python, str(Path(__file__).resolve()), "serve", "--port",
                               str(port)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "ready" (or EOF if it died)
        if b"ready" not in line:
            raise RuntimeError("the echo server did not start")
        return asyncio.run(measure(f"127.0.0.1:{port}", seconds, concurrency, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        if server.stdout is not None:
            server.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="measure", choices=("measure", "serve"))
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=3.0, help="per figure")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--dsn", default=None,
                    help="also measure sequential durable commits on this database")
    a = ap.parse_args()
    if a.mode == "serve":
        if a.port is None:
            ap.error("serve needs --port")
        serve(a.port)
        return
    result = run_baseline(sys.executable, a.seconds, a.concurrency, a.port)
    if a.dsn:
        result["commit_seq"] = asyncio.run(commit_floor(a.dsn, a.seconds))
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with contextlib.suppress(OSError):
            Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
