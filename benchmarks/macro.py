"""Macro benchmark: a demo-like app under uvicorn, driven over loopback, bare vs protected.

Each variant of ``apps.py`` is served by its own uvicorn process (1 worker, uvloop,
httptools, access log off) on a free loopback port, warmed up, then driven by ``wrk``
(or ``loadgen.py`` when wrk is missing) for a bounded time. The variants run in rounds,
in alternating order, so slow phases of a shared machine hit every variant alike; the
throughput ratio to the bare app of the same framework is taken within each round and the
median over the rounds is reported.

Redis runs use a private ``redis-server`` on a free port (started and stopped here): its
``INFO commandstats`` gives the commands executed per request, its ``INFO stats``
(``total_reads_processed``) the round trips per request under load, and a short second
pass under ``MONITOR`` separates the commands the app sent from the ones a Lua script ran
inside Redis.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VARIANTS", "Variant", "run_all"]

HERE = Path(__file__).resolve().parent
PATH = "/api/projects/p1/builds"
BODY = b'{"branch": "main"}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer alice-token"}
MONITOR_REQUESTS = 200


@dataclass
class Variant:
    """One served configuration."""

    label: str
    app: str  # asgi | starlette
    variant: str  # bare | armor | slowapi
    store: str  # memory | redis
    runs: list[dict[str, float]] = field(default_factory=list)
    redis: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.app}-{self.variant}-{self.store}"


VARIANTS = [
    ("pure ASGI, bare", "asgi", "bare", "memory"),
    ("pure ASGI + asgi_armor (memory)", "asgi", "armor", "memory"),
    ("pure ASGI + asgi_armor (Redis)", "asgi", "armor", "redis"),
    ("pure ASGI + asgi_armor + Prometheus metrics (memory)", "asgi", "metrics", "memory"),
    ("pure ASGI + only the response fields asgi_armor adds", "asgi", "headers", "memory"),
    ("Starlette, bare", "starlette", "bare", "memory"),
    ("Starlette + asgi_armor (memory)", "starlette", "armor", "memory"),
    (
        "Starlette + asgi_armor, IETF rate-limit fields only (memory)",
        "starlette",
        "armor-ietf",
        "memory",
    ),
    ("Starlette + asgi_armor (Redis)", "starlette", "armor", "redis"),
    ("Starlette + slowapi (memory)", "starlette", "slowapi", "memory"),
    ("Starlette + slowapi (Redis)", "starlette", "slowapi", "redis"),
]


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s")


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


@dataclass
class RedisInfo:
    """Where the Redis runs go, and whether its statistics are ours alone."""

    url: str
    host: str
    port: int
    private: bool


@contextlib.contextmanager
def redis_server() -> Iterator[RedisInfo | None]:
    """A private redis-server on a free port; else the shared one on 6379; else None."""
    binary = shutil.which("redis-server")
    if binary is not None:
        sock = _free_socket()
        port = sock.getsockname()[1]
        sock.close()
        workdir = tempfile.mkdtemp(prefix="armor-bench-redis-")
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(lambda: _redis(port).ping(), 10, "redis-server")
            yield RedisInfo(f"redis://127.0.0.1:{port}/0", "127.0.0.1", port, True)
        finally:
            _stop(process)
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        _redis(6379).ping()
    except Exception:
        yield None
        return
    yield RedisInfo("redis://127.0.0.1:6379/0", "127.0.0.1", 6379, False)


def _redis(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def _commandstats(port: int) -> dict[str, int]:
    stats = _redis(port).info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


def _reads(port: int) -> int:
    """Reads of client sockets by Redis so far: one per round trip (a pipeline is read
    at once), so this counts round trips under load, where MONITOR cannot tell them."""
    return int(_redis(port).info("stats")["total_reads_processed"])


def _cleanup(port: int, prefix: str) -> None:
    client = _redis(port)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


_MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')


def _monitor_pass(port: int, url: str) -> dict[str, dict[str, float]]:
    """Send MONITOR_REQUESTS requests one by one under MONITOR; commands per request by source."""
    binary = shutil.which("redis-cli")
    if binary is None:
        return {}
    # The child writes through its own open file (not a shared descriptor, whose offset
    # the reads here would move), and the log is read back by path.
    with tempfile.TemporaryDirectory(prefix="armor-bench-monitor-") as tmp:
        path = Path(tmp) / "monitor.log"
        with path.open("wb") as out:
            monitor = subprocess.Popen(
                [binary, "-p", str(port), "monitor"], stdout=out, stderr=subprocess.DEVNULL
            )
        try:
            _wait(lambda: path.read_bytes().startswith(b"OK"), 5, "redis MONITOR")
            _requests(url, MONITOR_REQUESTS)
            time.sleep(0.3)
        finally:
            _stop(monitor)
        lines = path.read_bytes().decode(errors="replace").splitlines()
    client: dict[str, float] = {}
    script: dict[str, float] = {}
    for line in lines:
        found = _MONITOR_LINE.match(line)
        if found is None:
            continue
        source, command = found.group(1), found.group(2).lower()
        if command in ("info", "config", "ping"):
            continue
        target = script if source == "lua" else client
        target[command] = target.get(command, 0) + 1
    return {
        "client": {k: v / MONITOR_REQUESTS for k, v in sorted(client.items())},
        "script": {k: v / MONITOR_REQUESTS for k, v in sorted(script.items())},
    }


# --------------------------------------------------------------------------------------
# Serving and loading
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(variant: Variant, store: str, prefix: str) -> Iterator[str]:
    """Run one variant under uvicorn on a free loopback port; yields its base URL."""
    # A port found free just now (uvicorn's --fd would treat the socket as a UNIX one and
    # leave TCP_NODELAY off, which costs 40 ms per response on loopback).
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(
        os.environ,
        BENCH_APP=variant.app,
        BENCH_VARIANT=variant.variant,
        BENCH_STORE=store,
        BENCH_PREFIX=prefix,
        PYTHONHASHSEED="0",
    )
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "apps:create",
        "--factory",
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "off",
        "--no-access-log",
        "--no-proxy-headers",
        "--log-level",
        "warning",
    ]
    # The server's console goes to a file: wrk closing its connections at the end of a run
    # makes frameworks log client disconnects, which would drown the progress lines.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in the finally below
        prefix="armor-bench-uvicorn-", suffix=".log", delete=False
    )
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait(lambda: _get_status(port, "/healthz") == 200, 30, f"uvicorn ({variant.label})")
            status = _post_status(port)
            if status != 202:
                raise RuntimeError(f"{variant.label}: the benchmarked request answered {status}")
        except Exception:
            _stop(process)
            sys.stderr.write(Path(log.name).read_text(errors="replace")[-4000:])
            raise
        yield url
    finally:
        _stop(process)
        log.close()
        os.unlink(log.name)


def _get_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _post_status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", PATH, body=BODY, headers=HEADERS)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _requests(url: str, count: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for _ in range(count):
            conn.request("POST", PATH, body=BODY, headers=HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status != 202:
                raise RuntimeError(f"monitor pass: status {response.status}")
    finally:
        conn.close()


_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
{headers}
"""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk(url: str, duration: float, connections: int) -> dict[str, float]:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.format(body=BODY.decode(), headers=headers))
    try:
        output = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--latency",
                "-s",
                script.name,
                url + PATH,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    result: dict[str, float] = {"non_2xx": 0.0}
    for line in output.splitlines():
        text = line.strip()
        if text.startswith("Requests/sec:"):
            result["rps"] = float(text.split()[1])
        elif text.startswith(("50%", "99%")):
            value = re.fullmatch(r"(\d+)%\s+([\d.]+)(us|ms|s)", text)
            if value is not None:
                key = "p50_ms" if value.group(1) == "50" else "p99_ms"
                result[key] = float(value.group(2)) * _UNITS[value.group(3)]
        elif "requests in" in text:
            result["requests"] = float(text.split()[0])
        elif text.startswith("Non-2xx or 3xx responses:"):
            result["non_2xx"] = float(text.split(":")[1])
        elif text.startswith("Socket errors:"):
            result["socket_errors"] = float(sum(int(n) for n in re.findall(r"\d+", text)))
    if "rps" not in result:
        raise RuntimeError("could not read wrk's output:\n" + output)
    return result


def _python_load(url: str, duration: float, connections: int) -> dict[str, float]:
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        url + PATH,
        "--duration",
        str(duration),
        "--connections",
        str(connections),
        "--method",
        "POST",
        "--body",
        BODY.decode(),
        *(arg for k, v in HEADERS.items() for arg in ("-H", f"{k}: {v}")),
    ]
    output = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=True
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def load(url: str, duration: float, connections: int) -> dict[str, float]:
    """Drive the benchmarked request with wrk, or the Python fallback."""
    if shutil.which("wrk") and os.environ.get("BENCH_LOADGEN") != "python":
        return _wrk(url, duration, connections)
    return _python_load(url, duration, connections)


def load_generator() -> str:
    """Which load generator ``load`` uses."""
    if shutil.which("wrk") and os.environ.get("BENCH_LOADGEN") != "python":
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        return (version.splitlines() or ["wrk"])[0].split(" [")[0]
    return "loadgen.py (Python fallback: wrk not installed)"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run_all(
    *,
    duration: float = 5.0,
    rounds: int = 5,
    connections: int = 32,
    warmup: float = 1.0,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Every variant (or those whose key is in ``only``), ``rounds`` times; returns the
    per-variant numbers and the setup."""
    variants = [Variant(*spec) for spec in VARIANTS]
    if only is not None:
        variants = [v for v in variants if v.key in only]
    prefix_base = f"armorbench{os.getpid()}:"
    with redis_server() as redis_info:
        active = [v for v in variants if v.store == "memory" or redis_info is not None]
        for round_index in range(rounds):
            order = active if round_index % 2 == 0 else list(reversed(active))
            for variant in order:
                prefix = f"{prefix_base}{variant.key}:"
                store = "memory"
                if variant.store == "redis":
                    assert redis_info is not None
                    store = redis_info.url
                print(
                    f"  macro round {round_index + 1}/{rounds}: {variant.label} ...",
                    flush=True,
                )
                with serve(variant, store, prefix) as url:
                    load(url, warmup, connections)
                    reads = 0
                    if variant.store == "redis":
                        assert redis_info is not None
                        _redis(redis_info.port).config_resetstat()
                        reads = _reads(redis_info.port)
                    result = load(url, duration, connections)
                    if variant.store == "redis":
                        assert redis_info is not None
                        # Less the INFO of _reads itself.
                        reads = _reads(redis_info.port) - reads - 1
                        stats = _commandstats(redis_info.port)
                        executed = sum(stats.values()) / max(result.get("requests", 1.0), 1.0)
                        result["redis_commands"] = executed
                        result["round_trips"] = reads / max(result.get("requests", 1.0), 1.0)
                        variant.redis.setdefault("commandstats", []).append(
                            {k: v / max(result.get("requests", 1.0), 1.0) for k, v in stats.items()}
                        )
                        if round_index == 0:
                            variant.redis["monitor"] = _monitor_pass(redis_info.port, url)
                variant.runs.append(result)
                if redis_info is not None and variant.store == "redis":
                    _cleanup(redis_info.port, prefix)
        return {
            "variants": variants,
            "redis": None
            if redis_info is None
            else {"url": redis_info.url, "private": redis_info.private},
            "load_generator": load_generator(),
            "duration": duration,
            "rounds": rounds,
            "connections": connections,
        }


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: median rps/p50/p99 over the rounds, ratio to the bare app."""
    variants: list[Variant] = result["variants"]
    bare = {v.app: v for v in variants if v.variant == "bare"}
    rows = []
    for variant in variants:
        if not variant.runs:
            continue
        base = bare[variant.app]
        ratios = [
            run["rps"] / base_run["rps"]
            for run, base_run in zip(variant.runs, base.runs, strict=False)
            if base_run["rps"]
        ]
        row: dict[str, Any] = {
            "label": variant.label,
            "key": variant.key,
            "app": variant.app,
            "variant": variant.variant,
            "store": variant.store,
            "rps": statistics.median(run["rps"] for run in variant.runs),
            "rps_runs": [run["rps"] for run in variant.runs],
            "p50_ms": statistics.median(run.get("p50_ms", 0.0) for run in variant.runs),
            "p99_ms": statistics.median(run.get("p99_ms", 0.0) for run in variant.runs),
            "non_2xx": sum(run.get("non_2xx", 0.0) for run in variant.runs),
            "socket_errors": sum(run.get("socket_errors", 0.0) for run in variant.runs),
            "vs_bare": statistics.median(ratios) if ratios else 0.0,
            "vs_bare_runs": ratios,
        }
        if variant.redis:
            executed = [run["redis_commands"] for run in variant.runs if "redis_commands" in run]
            row["redis_commands"] = statistics.median(executed) if executed else None
            trips = [run["round_trips"] for run in variant.runs if "round_trips" in run]
            row["round_trips"] = statistics.median(trips) if trips else None
            row["commandstats"] = variant.redis.get("commandstats", [{}])[0]
            row["monitor"] = variant.redis.get("monitor", {})
        rows.append(row)
    return rows


def _main() -> None:
    """``python benchmarks/macro.py [--only KEY,KEY] [--rounds N] [--duration S]``: some
    variants alone, ratios to their bare app printed (keys: ``starlette-armor-memory``...)."""
    import argparse

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--only", default="")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    only = {key.strip() for key in args.only.split(",") if key.strip()} or None
    result = run_all(duration=args.duration, rounds=args.rounds, only=only)
    for row in summarize(result):
        print(
            f"{row['label']:<40} {row['rps']:9.0f} req/s  x{row['vs_bare']:.2f} of bare  "
            f"runs {[round(r) for r in row['rps_runs']]}"
        )


if __name__ == "__main__":
    _main()
