"""A small HTTP/1.1 keep-alive load generator: the fallback when ``wrk`` is not installed.

``python loadgen.py URL --duration 5 --connections 32 --body '{"a": 1}' -H 'Name: value'``
prints one JSON line: requests, seconds, requests/s, p50/p99 latency (ms) and the count of
responses outside 2xx. It opens ``--connections`` keep-alive connections to a loopback
address and sends one request at a time on each for ``--duration`` seconds (bounded), the
way wrk does. It is slower than wrk, so runs made with it compare with each other only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit

__all__ = ["run"]


async def _worker(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], bad: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 300:
                bad.append(status)
    finally:
        writer.close()


async def _main(
    url: str, duration: float, connections: int, method: str, body: bytes, headers: list[str]
) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen only targets loopback addresses")
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"Host: {host}:{port}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    latencies: list[float] = []
    bad: list[int] = []
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(
        *(_worker(host, port, request, deadline, latencies, bad) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "seconds": elapsed,
        "rps": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if count else 0.0,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1000 if count else 0.0,
        "non_2xx": len(bad),
    }


def run(
    url: str,
    *,
    duration: float,
    connections: int,
    method: str = "GET",
    body: bytes = b"",
    headers: list[str] | None = None,
) -> dict[str, float]:
    """Drive ``url`` for ``duration`` seconds; returns the numbers printed by the CLI."""
    try:
        import uvloop

        return uvloop.run(_main(url, duration, connections, method, body, headers or []))
    except ImportError:
        return asyncio.run(_main(url, duration, connections, method, body, headers or []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="")
    parser.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args()
    if not 0 < args.duration <= 60:
        raise SystemExit("--duration must be in (0, 60] seconds")
    result = run(
        args.url,
        duration=args.duration,
        connections=args.connections,
        method=args.method,
        body=args.body.encode(),
        headers=args.header,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
