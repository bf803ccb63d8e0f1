"""Turn one run's numbers into ``RESULTS.md``, ``results.png`` and the docs page's tables."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["machine", "targets", "write"]

PACKAGES = [
    "asgi-armor",
    "msgspec",
    "anyio",
    "uvicorn",
    "uvloop",
    "httptools",
    "starlette",
    "redis",
    "hiredis",
    "limits",
    "slowapi",
    "pyrate-limiter",
    "throttled-py",
    "pybreaker",
    "purgatory",
    "aiobreaker",
    "pydantic",
    "pydantic-core",
    "email-validator",
]

DOCS_START = "<!-- bench:start -->"
DOCS_END = "<!-- bench:end -->"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = "-"
    if shutil.which("redis-server"):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v=(\S+)", out)
        redis_version = found.group(1) if found else out.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load": os.getloadavg(),
        "redis_server": redis_version,
        "versions": {package: _version(package) for package in PACKAGES},
    }


# --------------------------------------------------------------------------------------
# Derived numbers
# --------------------------------------------------------------------------------------


def _by_case(rows: list[dict[str, Any]], group: str) -> dict[str, dict[str, Any]]:
    return {row["case"]: row for row in rows if row["group"] == group}


def _fastest(rows: list[dict[str, Any]], group: str, impls: tuple[str, ...], word: str = "") -> Any:
    found = [
        row
        for row in rows
        if row["group"] == group and row["impl"] in impls and word in row["case"]
    ]
    return min(found, key=lambda row: row["ns"]) if found else None


def _overheads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Breaker overhead per successful call: the case minus its mode's bare call."""
    cases = _by_case(rows, "breaker")
    base = {
        "sync": cases["sync: bare call (baseline)"]["ns"],
        "async": cases["async: bare await (baseline)"]["ns"],
    }
    result = {}
    for name, row in cases.items():
        mode = name.split(":", 1)[0]
        if mode in base and "baseline" not in name:
            result[name] = row["ns"] - base[mode]
    return result


def _rounds(ratios: list[float]) -> str:
    """`` (rounds 47%, 53%, 59%)``: each round's ratio behind a median, or nothing."""
    if len(ratios) < 2:
        return ""
    return " (rounds " + ", ".join(f"{ratio:.0%}" for ratio in ratios) + ")"


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    micro = data.get("micro") or []
    if micro:
        rl = _by_case(micro, "ratelimit")
        core = rl["bucket.decide (pure core, sync)"]["ns"]
        fastest_limits = _fastest(micro, "ratelimit", ("limits",))
        ratio = fastest_limits["ns"] / core
        api = rl["RateLimiter(MemoryStore()).hit (async)"]["ns"]
        out.append(
            {
                "target": "`await RateLimiter(MemoryStore()).hit()` >= 4x faster than limits' "
                "fastest memory strategy (issue 16)",
                "measured": f"{fastest_limits['ns'] / api:.1f}x ({api:.0f} ns vs "
                f"{fastest_limits['case']} {fastest_limits['ns']:.0f} ns)",
                "met": fastest_limits["ns"] / api >= 4,
            }
        )
        out.append(
            {
                "target": "(also shown) the pure GCRA core vs limits' fastest memory strategy",
                "measured": f"{ratio:.1f}x ({core:.0f} ns vs {fastest_limits['ns']:.0f} ns)",
                "met": None,
            }
        )
        fastest_aio = _fastest(micro, "ratelimit", ("limits",), "aio")
        out.append(
            {
                "target": "(also shown) public async API vs limits' fastest aio strategy",
                "measured": f"{fastest_aio['ns'] / api:.1f}x ({api:.0f} ns vs "
                f"{fastest_aio['ns']:.0f} ns)",
                "met": None,
            }
        )
        over = _overheads(micro)
        for mode, ours in (("sync", "sync: @breaker"), ("async", "async: @breaker")):
            peers = {
                name: value
                for name, value in over.items()
                if name.startswith(mode + ":") and _impl(micro, name) != "asgi_armor"
            }
            best_name = min(peers, key=peers.__getitem__)
            ratio = peers[best_name] / over[ours]
            peer_label = best_name.split(": ", 1)[1]
            out.append(
                {
                    "target": f"breaker overhead ({mode}) >= 3x less than the fastest peer "
                    "(issue 16)",
                    "measured": f"{ratio:.1f}x ({over[ours]:.0f} ns vs {peer_label} "
                    f"{peers[best_name]:.0f} ns)",
                    "met": ratio >= 3,
                }
            )
        val = _by_case(micro, "validation")
        ours_ns = val["decode(body, CreateUserRequest)"]["ns"]
        for name, row in val.items():
            if row["impl"] == "pydantic":
                ratio = row["ns"] / ours_ns
                out.append(
                    {
                        "target": f"decode >= 3x faster than {name} (issue 16)",
                        "measured": f"{ratio:.1f}x ({ours_ns / 1000:.2f} us vs "
                        f"{row['ns'] / 1000:.2f} us)",
                        "met": ratio >= 3,
                    }
                )
    macro_rows = data.get("macro_rows") or []
    by_key = {row["key"]: row for row in macro_rows}
    for app, label in (("starlette", "Starlette"), ("asgi", "pure ASGI")):
        row = by_key.get(f"{app}-armor-memory")
        if row:
            targeted = app == "starlette"
            out.append(
                {
                    "target": (
                        "the seed's stack on memory >= 90% of bare Starlette requests/s (issue 16)"
                        if targeted
                        else f"(also shown) the seed's stack on memory vs bare ({label} app)"
                    ),
                    "measured": f"{row['vs_bare']:.0%}",
                    "met": row["vs_bare"] >= 0.9 if targeted else None,
                }
            )
    ietf = by_key.get("starlette-armor-ietf-memory")
    if ietf:
        out.append(
            {
                "target": "(also shown) the seed's stack sending only the IETF rate-limit "
                'fields (`rate_limit_headers = "ietf"`) vs bare Starlette',
                "measured": f"{ietf['vs_bare']:.0%}",
                "met": None,
            }
        )
    slow = by_key.get("starlette-slowapi-memory")
    if slow:
        out.append(
            {
                "target": "(reference) slowapi with the same rules on memory: about 40% of bare",
                "measured": f"{slow['vs_bare']:.0%}",
                "met": None,
            }
        )
    for app, label in (("starlette", "Starlette"), ("asgi", "pure ASGI")):
        row = by_key.get(f"{app}-armor-redis")
        if row and row.get("monitor"):
            client = row["monitor"].get("client", {})
            sent = sum(client.values())
            out.append(
                {
                    "target": f"Redis: exactly 1 command per request for all 4 rate-limit layers "
                    f"({label})",
                    "measured": f"{sent:.2f} sent per request ("
                    + ", ".join(f"{k} {v:.2f}" for k, v in client.items())
                    + ")",
                    "met": abs(sent - 1.0) < 1e-9,
                }
            )
    ours = by_key.get("starlette-armor-redis")
    if ours:
        out.append(
            {
                "target": "Redis: full stack on Redis >= 50% of bare requests/s (Starlette, "
                f"{(data.get('macro') or {}).get('connections', 32)} connections; issue 22)",
                "measured": f"{ours['vs_bare']:.0%}" + _rounds(ours.get("vs_bare_runs") or []),
                "met": ours["vs_bare"] >= 0.5,
            }
        )
        if ours.get("round_trips") is not None:
            out.append(
                {
                    "target": "Redis: round trips per request well under one under load "
                    "(Starlette, < 0.5; issue 22)",
                    "measured": f"{ours['round_trips']:.3f} per request",
                    "met": ours["round_trips"] < 0.5,
                }
            )
    theirs = by_key.get("starlette-slowapi-redis")
    if ours and theirs:
        ratio = ours["rps"] / theirs["rps"]
        out.append(
            {
                "target": "Redis: >= 2x the requests/s of slowapi+limits on the same Redis",
                "measured": f"{ratio:.2f}x ({ours['rps']:,.0f} vs {theirs['rps']:,.0f} req/s)",
                "met": ratio >= 2,
            }
        )
    return out


def _impl(rows: list[dict[str, Any]], case: str) -> str:
    for row in rows:
        if row["case"] == case:
            return str(row["impl"])
    return ""


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ns(value: float) -> str:
    return f"{value / 1000:.2f} us" if value >= 10_000 else f"{value:,.0f} ns"


def _met(value: bool | None) -> str:
    return "n/a" if value is None else ("**met**" if value else "**missed**")


def markdown(data: dict[str, Any]) -> str:
    """The whole RESULTS.md."""
    info = data["machine"]
    parts = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (`benchmarks/run.py`); do not edit by hand. Every ratio "
        "compares numbers taken in this same run, side by side (interleaved repeats for the "
        "micro benchmarks, alternating rounds for the served ones): the machine is shared, "
        "so absolute times move from run to run while the ratios hold.",
        "",
        f"- date: {info['date']}; run time {data.get('elapsed', 0):.0f} s",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['platform']}; load average "
        f"at the start {info['load'][0]:.2f} / {info['load'][1]:.2f} / {info['load'][2]:.2f}. "
        "**The 2 cores are shared with other jobs (test suites of other sessions) while this "
        "runs**, and the load generator shares them with the server.",
        f"- Python {info['python']}; redis-server {info['redis_server']}; load generator: "
        f"{(data.get('macro') or {}).get('load_generator', '-')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
        "## Targets (issues 16 and 22)",
        "",
        _table(
            ["target", "measured", "status"],
            [[t["target"], t["measured"], _met(t["met"])] for t in data["targets"]],
        ),
    ]
    micro = data.get("micro") or []
    if micro:
        parts += _micro_sections(micro)
    if data.get("macro_rows"):
        parts += _macro_sections(data)
    if data.get("scale"):
        parts += _scale_sections(data["scale"])
    parts += _notes(data)
    parts += ["", "![ratios](results.png)", ""]
    return "\n".join(parts)


def _us(rps: float) -> float:
    """Microseconds per request at ``rps`` requests/s."""
    return 1e6 / rps if rps else 0.0


def _notes(data: dict[str, Any]) -> list[str]:
    """What limits the targets this run missed, from this run's own numbers."""
    missed = [t for t in data.get("targets", []) if t["met"] is False]
    if not missed:
        return []
    out = ["", "## What limits the missed targets", ""]
    rows = {row["key"]: row for row in data.get("macro_rows") or []}
    micro = {row["case"]: row for row in data.get("micro") or [] if row["group"] == "layers"}
    bare, ours = rows.get("starlette-bare-memory"), rows.get("starlette-armor-memory")
    if any("seed's stack on memory" in t["target"] for t in missed) and bare and ours:
        cost = _us(ours["rps"]) - _us(bare["rps"])
        budget = _us(bare["rps"]) / 0.9 - _us(bare["rps"])
        text = (
            f"- **The seed's stack vs bare Starlette.** Served, bare Starlette answers in "
            f"{_us(bare['rps']):.0f} us of server time a request; 90% of its requests/s "
            f"leaves {budget:.1f} us for the whole stack, which costs {cost:.0f} us here."
        )
        asgi_bare, fields = rows.get("asgi-bare-memory"), rows.get("asgi-headers-memory")
        if asgi_bare and fields:
            text += (
                f" Writing the six response fields it adds (the request id and five "
                f"rate-limit fields) alone costs uvicorn "
                f"{_us(fields['rps']) - _us(asgi_bare['rps']):.1f} us a response (the pure "
                "ASGI app sending only those fields)."
            )
        pipeline = micro.get("layers: + timeout: the seed's stack (armor)")
        composed = micro.get("layers: the same classes composed by hand")
        base = micro.get("layers: bare app (baseline)")
        if pipeline and composed and base:
            text += (
                f" In process the pipeline costs {(pipeline['ns'] - base['ns']) / 1000:.1f} us "
                f"a request, against {(composed['ns'] - base['ns']) / 1000:.1f} us for the "
                "same classes composed by hand; served, the same Python runs with colder "
                "caches and costs two to three times more. The table of protections added one "
                "at a time shows no single step to remove: the request id and envelope, the "
                "input limits, four GCRA decisions with their keys and headers, the deadline."
            )
        text += (
            " An app that does real work per request (a query, a template) sees a much "
            "smaller share; slowapi with the same four limits keeps less (see the served "
            "table)."
        )
        out.append(text)
    if any("RateLimiter(MemoryStore()).hit()" in t["target"] for t in missed):
        out.append(
            "- **`await RateLimiter(...).hit()` vs limits.** The public call is a coroutine "
            "that returns a `Decision` (remaining, reset, retry-after, the policy); limits' "
            "fastest row is a synchronous call returning a bool. The GCRA core itself is "
            "several times faster than limits (the pure-core row); the rest is the await "
            "and the decision object."
        )
    if any("decode" in t["target"] for t in missed):
        out.append(
            "- **Decode vs the seed's pydantic validators.** The decoding engines differ by "
            "several times (msgspec vs pydantic-core, rows without normalising), but both rows "
            "spend most of their time in plain-Python normalisers, and asgi_armor's do more "
            "than the seed's (RFC 5321/5322 structure instead of one loose regex; bidi and "
            "zero-width characters and NFC for names). Against pydantic with `EmailStr`, the "
            "like-for-like check, the target is met by a wide margin."
        )
    redis = rows.get("starlette-armor-redis")
    if any("full stack on Redis" in t["target"] for t in missed) and bare and redis:
        out.append(
            f"- **The stack on Redis.** Each request waits for its store round trip; the "
            f"stack costs {_us(redis['rps']) - _us(bare['rps']):.0f} us of server time a "
            "request on Redis, against "
            f"{_us(ours['rps']) - _us(bare['rps']) if ours else 0:.0f} us on memory: the "
            "difference is the store call itself (the command, the batch's write and read, "
            "waking the request again: CPU of this process) and the wait while Redis runs "
            "the batch's scripts, when all the connections' requests may be waiting on it."
        )
    return out


def _micro_sections(micro: list[dict[str, Any]]) -> list[str]:
    rl = [row for row in micro if row["group"] == "ratelimit"]
    core = next(row for row in rl if row["case"].startswith("bucket.decide"))["ns"]
    api = next(row for row in rl if row["case"].startswith("RateLimiter("))["ns"]
    rows = [
        [
            row["case"],
            row["impl"],
            _ns(row["ns"]),
            f"±{row['spread'] / 2:.0%}",
            f"{row['ns'] / core:.1f}x",
            f"{row['ns'] / api:.2f}x",
        ]
        for row in rl
    ]
    out = [
        "",
        "## Rate limiting: one allowed hit (memory storage, 1000 keys in rotation)",
        "",
        "Median time per decision over the repeats; spread is half the range of the repeats "
        "relative to the median. The ratio columns divide each row by asgi_armor's pure core "
        "(`bucket.decide` with its state in a dict, clock read included) and by its public "
        "async API (`await RateLimiter(MemoryStore()).hit(key, rate)`): above 1 means "
        "asgi_armor is faster.",
        "",
        _table(
            ["implementation", "library", "time", "spread", "÷ core", "÷ RateLimiter.hit"], rows
        ),
    ]
    over = _overheads(micro)
    br = [row for row in micro if row["group"] == "breaker"]
    ref = {
        "sync": over["sync: @breaker"],
        "async": over["async: @breaker"],
    }
    rejects = {row["case"]: row["ns"] for row in br if " open:" in row["case"]}
    ref_reject = {
        "sync open": rejects.get("sync open: @breaker rejects", 0.0),
        "async open": rejects.get("async open: @breaker rejects", 0.0),
    }
    rows = []
    for row in br:
        name = row["case"]
        mode = name.split(":", 1)[0]
        if name in over:
            rows.append(
                [
                    name,
                    row["impl"],
                    _ns(row["ns"]),
                    _ns(over[name]),
                    f"±{row['spread'] / 2:.0%}",
                    f"{over[name] / ref[mode]:.1f}x",
                ]
            )
        elif mode in ref_reject:
            rows.append(
                [
                    name,
                    row["impl"],
                    _ns(row["ns"]),
                    "-",
                    f"±{row['spread'] / 2:.0%}",
                    f"{row['ns'] / ref_reject[mode]:.1f}x",
                ]
            )
        else:
            rows.append([name, row["impl"], _ns(row["ns"]), "-", f"±{row['spread'] / 2:.0%}", "-"])
    out += [
        "",
        "## Circuit breakers: a successful call, and a rejection by an open breaker",
        "",
        "Overhead is the time of the guarded call minus the bare call of the same mode. The "
        "ratio divides each overhead by asgi_armor's `@breaker` overhead of the same mode "
        "(for open-circuit rows: each rejection's full time by asgi_armor's), so above 1 "
        "means asgi_armor is cheaper. pybreaker has no asyncio support without tornado, so "
        "it appears in the sync rows only.",
        "",
        _table(["case", "library", "time", "overhead", "spread", "÷ asgi_armor"], rows),
    ]
    val = [row for row in micro if row["group"] == "validation"]
    ours = next(row for row in val if row["impl"] == "asgi_armor")["ns"]
    rows = [
        [
            row["case"],
            row["impl"],
            _ns(row["ns"]),
            f"±{row['spread'] / 2:.0%}",
            f"{row['ns'] / ours:.2f}x",
        ]
        for row in val
    ]
    engine = ""
    floor = next((row for row in val if row["case"].startswith("msgspec")), None)
    bare = next((row for row in val if row["case"].startswith("pydantic v2 alone")), None)
    if floor and bare:
        engine = (
            f" Without any normalising, the engines alone: msgspec {_ns(floor['ns'])} vs "
            f"pydantic {_ns(bare['ns'])} ({bare['ns'] / floor['ns']:.1f}x); the rest of "
            "each row is the email and name normalisers, plain Python in both libraries."
        )
    out += [
        "",
        "## Validation: the seed's `CreateUserRequest` on a valid body",
        "",
        "`decode(body, CreateUserRequest)` (email stripped, lower-cased and checked for RFC "
        "5321/5322 structure; name cleaned of controls, bidi and zero-width characters, "
        "whitespace collapsed, NFC; age 0..150) against pydantic v2 on the equivalent model, "
        "once with `EmailStr` (email-validator) and once with the seed article's "
        "`field_validator`s (a looser email regex, controls removed, whitespace collapsed). "
        "`msgspec` alone is shown for reference: it is the floor, decoding without any "
        "normalising." + engine,
        "",
        _table(["case", "library", "time", "spread", "÷ decode"], rows),
    ]
    mw = [row for row in micro if row["group"] == "middleware"]
    by = {row["case"]: row for row in mw}
    rows = []
    for row in mw:
        family = row["case"].split(":", 1)[0]
        base = next(r for r in mw if r["case"].startswith(family) and r["impl"] == "baseline")
        overhead = row["ns"] - base["ns"]
        rows.append(
            [
                row["case"],
                _ns(row["ns"]),
                "-" if row is base else _ns(overhead),
                f"±{row['spread'] / 2:.0%}",
            ]
        )
    del by
    out += [
        "",
        "## Idempotency and signing: cost per request (in-process ASGI calls, no server)",
        "",
        "The same tiny ASGI app called directly, bare and behind the middleware (memory "
        "store). Idempotency: a first request takes the lease, runs the app and stores the "
        "response; a replay answers from the store without running the app. Signing: a "
        "1 KiB webhook body, every body distinct (a repeat would be refused as a replay).",
        "",
        _table(["case", "time per request", "overhead", "spread"], rows),
    ]
    latency = [row for row in micro if row["group"] == "idempotency_redis"]
    if latency:
        out += [
            "",
            "On a private Redis over loopback, a first request's time to its last chunk (what "
            "the client waits for: the record is written before that chunk) and to the end "
            "of the call (median; spread is the 10th-90th percentile range):",
            "",
            _table(
                ["case", "time per request", "spread"],
                [[row["case"], _ns(row["ns"]), f"±{row['spread'] / 2:.0%}"] for row in latency],
            ),
        ]
    out += _redis_concurrency_section(micro)
    stack = [row for row in micro if row["group"] == "layers"]
    if stack:
        base = next(row for row in stack if row["impl"] == "baseline")
        rows = []
        previous = None
        for row in stack:
            composed = "by hand" in row["case"]
            rows.append(
                [
                    row["case"].removeprefix("layers: "),
                    _ns(row["ns"]),
                    "-" if row is base else _ns(row["ns"] - base["ns"]),
                    "-" if previous is None or composed else _ns(row["ns"] - previous["ns"]),
                    f"±{row['spread'] / 2:.0%}",
                ]
            )
            previous = row
        out += [
            "",
            "## The served stack, one protection at a time (in-process, no server)",
            "",
            "The pure ASGI app of the served benchmark called directly with the benchmarked "
            "request: bare, then behind `armor()` with one more protection of the seed's "
            "stack in each row, and last the same layers composed by hand from the public "
            "classes (the façades `armor()`'s pipeline replaces). Under uvicorn the same "
            "Python runs with colder caches between requests and costs more per request; "
            "the rate-limit headers also cost the server time to write (see the notes).",
            "",
            _table(["case", "time per request", "over the app", "this step", "spread"], rows),
        ]
        by_case = {row["case"]: row for row in stack}
        off, on = (
            by_case.get("layers: + timeout: the seed's stack (armor)"),
            by_case.get("layers: + Prometheus metrics"),
        )
        if off is not None and on is not None:
            out += [
                "",
                "### Metrics on vs off",
                "",
                "The seed's stack with a `PrometheusMetrics` sink (every rate-limit rule's "
                "decision counted, the request-duration histogram observed) against the same "
                "stack without metrics, whose layers make no metrics call at all.",
                "",
                _table(
                    ["metrics", "time per request", "cost of metrics"],
                    [
                        ["off", _ns(off["ns"]), "-"],
                        ["Prometheus", _ns(on["ns"]), _ns(on["ns"] - off["ns"])],
                    ],
                ),
            ]
    return out


def _redis_concurrency_section(micro: list[dict[str, Any]]) -> list[str]:
    rows = [row for row in micro if row["group"] == "redis_concurrency"]
    if not rows:
        return []
    callers = sorted({row["callers"] for row in rows})
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    cell = {(row["variant"], row["callers"]): row for row in rows}
    table = [
        [
            variant,
            *(
                f"{_ns(cell[variant, n]['ns'])} / {_ns(cell[variant, n]['cpu_ns'])}"
                if (variant, n) in cell
                else "-"
                for n in callers
            ),
        ]
        for variant in variants
    ]
    return [
        "",
        "## Redis: cost per decision by concurrent callers (in-process, private Redis)",
        "",
        "`hit_buckets` for the served request's four layers, one decision after another in "
        "each caller, 1000 clients in rotation. Each cell is wall time per decision (the "
        "inverse of the throughput) / this process's CPU time per decision (what a busy "
        "server pays); medians over alternating rounds. The batching store sends the calls "
        "issued while a batch is in flight together, as one pipeline; `max_batch=1` gives "
        "every call its own round trip, as the store did before batching; the bare redis-py "
        "row is one `EVALSHA` per call through redis-py's client, the transport the store "
        "used before batching. The pure-Python parser row is the batching store without "
        "hiredis (the `redis` extra installs it).",
        "",
        _table(["case", *(f"{n} concurrent" for n in callers)], table),
    ]


def _macro_sections(data: dict[str, Any]) -> list[str]:
    macro = data["macro"]
    rows = []
    for row in data["macro_rows"]:
        redis_cols = ["-", "-", "-"]
        if row.get("monitor") is not None and row["store"] == "redis":
            client = row["monitor"].get("client", {})
            redis_cols = [
                f"{sum(client.values()):.2f} ("
                + ", ".join(f"{k} {v:.2f}" for k, v in client.items())
                + ")",
                f"{row['redis_commands']:.2f}" if row.get("redis_commands") is not None else "-",
                f"{row['round_trips']:.3f}" if row.get("round_trips") is not None else "-",
            ]
        rows.append(
            [
                row["label"],
                f"{row['rps']:,.0f}",
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['vs_bare']:.0%}",
                *redis_cols,
            ]
        )
    errors = sum(row["non_2xx"] + row["socket_errors"] for row in data["macro_rows"])
    return [
        "",
        "## Served: a demo-like app under uvicorn, driven over loopback",
        "",
        f"uvicorn, 1 worker, uvloop + httptools, access log off; {macro['load_generator']} "
        f"with 1 thread and {macro['connections']} keep-alive connections for "
        f"{macro['duration']:.0f} s per run after a warm-up, {macro['rounds']} rounds in "
        "alternating order; the request is `POST /api/projects/p1/builds` with a small JSON "
        "body and a bearer token, which all four rate-limit rules match (per IP on `/api/*`, "
        "per IP on the route, per user, per `project_id`); the limits are far above what a "
        "run sends. The asgi_armor stack is the seed's, through `armor()`'s pipeline: the "
        "error envelope and request id, input limits, the four rate-limit rules and a 5 s "
        "timeout (with all five rate-limit fields unless the row says otherwise; the "
        "fields-only row is the bare app sending what the stack adds). slowapi gets the same "
        "four limits (a shared limit per IP for the `/api/*` rule plus three route limits, its "
        "pure-ASGI `SlowAPIASGIMiddleware`, headers off as by default, default fixed-window "
        "strategy); it runs on Starlette only. Medians over the rounds; `vs bare` is the "
        "median over rounds of requests/s divided by the bare app's requests/s of the same "
        "round. Redis runs use a private `redis-server` on a free port"
        + ("" if (macro.get("redis") or {}).get("private", True) else " (here: the shared one)")
        + f". Non-2xx responses and socket errors over all runs: {errors:.0f}.",
        "",
        "Redis columns: *sent* counts the commands the app sent per request (a `MONITOR` "
        f"pass of {200} sequential requests), *executed* counts every command "
        "Redis ran per request during the load run (`INFO commandstats`, including those a "
        "Lua script runs inside Redis), *round trips* the reads of client sockets Redis "
        "made per request during the load run (`INFO stats` `total_reads_processed`: "
        "concurrent decisions of one process share a pipeline, read at once).",
        "",
        _table(
            [
                "variant",
                "req/s",
                "p50 ms",
                "p99 ms",
                "vs bare",
                "Redis sent/request",
                "Redis executed/request",
                "Redis round trips/request",
            ],
            rows,
        ),
    ]


def _scale_sections(scale: dict[str, Any]) -> list[str]:
    out = []
    memory = scale.get("memory") or []
    if memory:
        peers = [k for k in memory[0] if k not in ("keys", "asgi_armor")]
        rows = []
        for row in memory:
            cells = [f"{row['keys']:,}", f"{row['asgi_armor']:.0f}"]
            for peer in peers:
                value = row.get(peer)
                cells.append(
                    "-" if value is None else f"{value:.0f} ({value / row['asgi_armor']:.1f}x)"
                )
            rows.append(cells)
        out += [
            "",
            "## Memory per rate-limit key",
            "",
            "Bytes held per distinct key after one hit each (tracemalloc; the key strings "
            "included), `MemoryStore(max_keys=n)` against limits' `MemoryStorage` (peers up "
            "to 100k keys only, to keep the run short).",
            "",
            _table(["keys", "asgi_armor B/key", *(f"{p} B/key" for p in peers)], rows),
        ]
    rules = scale.get("rules") or []
    if rules:
        has_redis = "redis_us" in rules[0]
        rows = []
        for row in rules:
            cells = [str(row["rules"]), f"{row['memory_us']:.1f}"]
            if has_redis:
                cells += [
                    f"{row['redis_us']:.1f}",
                    f"{row['redis_scripts_per_request']:.2f}"
                    if row.get("redis_scripts_per_request") is not None
                    else "-",
                ]
            rows.append(cells)
        header = ["matching rules", "memory: us added per request"]
        if has_redis:
            header += ["Redis: us added per request", "Redis EVALSHA per request"]
        out += [
            "",
            "## Cost per request by number of rules",
            "",
            "RateLimitMiddleware with n rules that all match the request, called in-process "
            "one request at a time (so the Redis column is mostly one loopback round trip); "
            "time added over the bare app.",
            "",
            _table(header, rows),
        ]
    return out


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> None:
    """A bar chart of the ratios: how many times cheaper (or faster) asgi_armor is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, float]], str]] = []
    micro = data.get("micro") or []
    if micro:
        rl = [row for row in micro if row["group"] == "ratelimit"]
        core = next(row for row in rl if row["case"].startswith("bucket.decide"))["ns"]
        bars = [
            (_short(row["case"]), row["ns"] / core) for row in rl if row["impl"] != "asgi_armor"
        ]
        panels.append(("Rate limiting: peer time ÷ asgi_armor core (bucket.decide)", bars, "x"))
        api = next(row for row in rl if row["case"].startswith("RateLimiter("))["ns"]
        bars = [(_short(row["case"]), row["ns"] / api) for row in rl if row["impl"] != "asgi_armor"]
        panels.append(
            ("Rate limiting: peer time ÷ asgi_armor public API (RateLimiter.hit)", bars, "x")
        )
        over = _overheads(micro)
        bars = []
        for name, value in over.items():
            mode = name.split(":", 1)[0]
            if _impl(micro, name) != "asgi_armor":
                bars.append((_short(name), value / over[f"{mode}: @breaker"]))
        panels.append(("Breaker overhead: peer ÷ asgi_armor @breaker", bars, "x"))
        val = [row for row in micro if row["group"] == "validation"]
        ours = next(row for row in val if row["impl"] == "asgi_armor")["ns"]
        bars = [(_short(row["case"]), row["ns"] / ours) for row in val if row["impl"] == "pydantic"]
        panels.append(("Validation: pydantic v2 ÷ asgi_armor decode", bars, "x"))
    if data.get("macro_rows"):
        bars = [
            (row["label"], row["vs_bare"] * 100)
            for row in data["macro_rows"]
            if row["variant"] != "bare"
        ]
        panels.append(("Served: % of the bare app's requests/s", bars, "%"))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 1.9 * len(panels)))
    if len(panels) == 1:
        axes = [axes]
    for ax, (title, bars, unit) in zip(axes, panels, strict=True):
        labels = [label for label, _ in bars]
        values = [value for _, value in bars]
        colors = [
            "#3f51b5" if ("asgi_armor" in label or unit == "x") else "#9e9e9e" for label in labels
        ]
        ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        if unit == "x":
            ax.axvline(1.0, color="black", linewidth=0.8)
            for y, value in enumerate(values):
                ax.text(value, y, f" {value:.1f}x", va="center", fontsize=8)
        else:
            ax.axvline(100, color="black", linewidth=0.8)
            ax.axvline(85, color="#c62828", linewidth=0.8, linestyle="--")
            for y, value in enumerate(values):
                ax.text(value, y, f" {value:.0f}%", va="center", fontsize=8)
            ax.set_xlim(0, 115)
    info = data["machine"]
    fig.suptitle(
        f"asgi_armor vs peers, one run, {info['date']} ({info['nproc']} shared CPUs)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(case: str) -> str:
    text = case.replace(" (sync)", "").replace(" (async)", " [async]")
    text = text.replace("+ MemoryStorage", "").replace("+ aio MemoryStorage", "aio")
    text = text.replace(" + MemoryStore", "")
    if text.startswith("async: "):
        return "[async] " + text.removeprefix("async: ")
    return text.removeprefix("sync: ")


def write(data: dict[str, Any], bench_dir: Path, docs_dir: Path | None) -> None:
    """RESULTS.md and results.png in ``bench_dir``; the docs page's tables and image copy."""
    data["targets"] = targets(data)
    text = markdown(data)
    (bench_dir / "RESULTS.md").write_text(text, encoding="utf-8")
    plot(data, bench_dir / "results.png")
    if docs_dir is None:
        return
    page = docs_dir / "benchmarks.md"
    if (bench_dir / "results.png").exists():
        shutil.copyfile(bench_dir / "results.png", docs_dir / "benchmarks-results.png")
    if page.exists():
        content = page.read_text(encoding="utf-8")
        if DOCS_START in content and DOCS_END in content:
            body = text.split("\n", 1)[1].replace("](results.png)", "](benchmarks-results.png)")
            body = body.replace("\n# ", "\n## ").replace("\n## ", "\n### ")
            head, rest = content.split(DOCS_START, 1)
            _, tail = rest.split(DOCS_END, 1)
            page.write_text(f"{head}{DOCS_START}\n{body}\n{DOCS_END}{tail}", encoding="utf-8")
