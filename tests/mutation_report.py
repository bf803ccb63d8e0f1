"""``make mutate``'s summary: mutmut's verdicts per module, as the table in docs/mutation.md.

Reads ``mutmut results --all true`` on stdin (run from the repository root after
``mutmut run``); prints one Markdown row per module and then every surviving mutant.
A mutant no test reaches ("no tests") counts as a survivor; a timeout counts as killed.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

_LINE = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+?)\s*$")
# asgi_armor.breaker.xǁCircuitBreakerǁallow__mutmut_3 -> asgi_armor.breaker
_MODULE = re.compile(r"^(?P<module>.+?)\.x[_ǁ]")
_KILLED = {"killed", "timeout", "caught by type check"}
_SURVIVED = {"survived", "no tests", "suspicious"}


def main() -> int:
    """Print the table; exit 1 when some mutants were not checked yet."""
    verdicts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[tuple[str, str]] = []
    for line in sys.stdin:
        found = _LINE.match(line)
        if found is None:
            continue
        name, status = found["name"], found["status"]
        module = _MODULE.match(name)
        if module is None:
            continue
        verdicts[module["module"]][status] += 1
        if status in _SURVIVED:
            survivors.append((name, status))
    print("| module | mutants | killed | survived | kill rate | not checked |")
    print("|---|---:|---:|---:|---:|---:|")
    unchecked = 0
    for module in sorted(verdicts):
        counts = verdicts[module]
        killed = sum(counts[s] for s in _KILLED)
        survived = sum(counts[s] for s in _SURVIVED)
        pending = sum(counts.values()) - killed - survived
        unchecked += pending
        rate = f"{100 * killed / (killed + survived):.1f}%" if killed + survived else "-"
        print(f"| {module} | {sum(counts.values())} | {killed} | {survived} | {rate} | {pending} |")
    print()
    for name, status in survivors:
        print(f"- {name}: {status}")
    return 1 if unchecked else 0


if __name__ == "__main__":
    sys.exit(main())
