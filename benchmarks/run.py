"""``make bench``: asgi_armor against the libraries users pick today, in one run.

Run with any Python >= 3.11 (``make bench`` uses the project's ``.venv``). The peers are
never installed into the project's environment: this script makes ``benchmarks/.venv``
(git-ignored), installs ``benchmarks/requirements.txt`` and the project
(``-e .[cli,redis,starlette]``) into it when they changed, and re-runs itself there.

It writes ``benchmarks/RESULTS.md``, ``benchmarks/results.png`` (and ``results.json``), and
refreshes the tables and the image of ``docs/benchmarks.md``. Everything runs on this
machine over loopback; every load run is bounded in time. About 6-8 minutes in all.

Options: ``--quick`` (a smoke test of a minute or two; results are not written unless
``--write``), ``--skip micro,macro,scale``, ``--duration`` and ``--rounds`` for the served
runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
STAMP = VENV / ".installed"
# The project's extras the benchmarks import (prometheus: the layers group's metrics case).
EXTRAS = "cli,redis,starlette,prometheus"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _wanted() -> str:
    digest = hashlib.sha256(EXTRAS.encode())
    for path in (BENCH / "requirements.txt", ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def bootstrap() -> None:
    """Make benchmarks/.venv when needed and re-run this script inside it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = _venv_python()
    if not python.exists():
        print(f"bench: creating {VENV.relative_to(ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wanted = _wanted()
    if not STAMP.exists() or STAMP.read_text().strip() != wanted:
        print("bench: installing the peers and the project into benchmarks/.venv", flush=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run(
            [
                *pip,
                "-r",
                str(BENCH / "requirements.txt"),
                "-e",
                f"{ROOT}[{EXTRAS}]",
            ],
            check=True,
        )
        STAMP.write_text(wanted)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description="asgi_armor benchmarks against its peers")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--write", action="store_true", help="write results after --quick too")
    parser.add_argument("--skip", default="", help="comma list of: micro, macro, scale")
    parser.add_argument("--duration", type=float, default=None, help="seconds per served run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of served runs")
    args = parser.parse_args()
    bootstrap()

    sys.path.insert(0, str(BENCH))
    import logging

    import macro
    import micro
    import report
    import scale

    # Breakers opened on purpose and store failures would otherwise log on every run.
    logging.getLogger("asgi_armor").setLevel(logging.CRITICAL)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    quick = args.quick
    started = time.monotonic()
    data: dict[str, Any] = {"machine": report.machine()}
    print(
        f"bench: {data['machine']['nproc']} CPUs, load {data['machine']['load'][0]:.2f}",
        flush=True,
    )
    if "micro" not in skip:
        data["micro"] = micro.run_all(quick=quick)
    if "macro" not in skip:
        result = macro.run_all(
            duration=args.duration or (2.0 if quick else 5.0),
            # Five: the median of three moved by up to 10 points between runs here.
            rounds=args.rounds or (1 if quick else 5),
            warmup=0.5 if quick else 1.0,
        )
        data["macro_rows"] = macro.summarize(result)
        result.pop("variants")
        data["macro"] = result
    if "scale" not in skip:
        counts = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
        memory = scale.memory_per_key(counts, peer_max=100_000)
        with macro.redis_server() as redis_info:
            rules = scale.rules_scaling(
                (1, 4, 16),
                None if redis_info is None else redis_info.url,
                requests=1000 if quick else 5000,
                repeats=3 if quick else 5,
            )
        data["scale"] = {"memory": memory, "rules": rules}
    data["elapsed"] = time.monotonic() - started

    if quick and not args.write:
        data["targets"] = report.targets(data)
        for target in data["targets"]:
            print(f"  {target['target']}: {target['measured']} [{target['met']}]")
        print(f"bench: quick run done in {data['elapsed']:.0f} s (results not written)")
        return
    report.write(data, BENCH, ROOT / "docs")
    (BENCH / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    for target in data["targets"]:
        print(f"  {target['target']}: {target['measured']} [{report._met(target['met'])}]")
    print(f"bench: wrote benchmarks/RESULTS.md and results.png in {data['elapsed']:.0f} s")


if __name__ == "__main__":
    main()
