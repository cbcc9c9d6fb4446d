"""Per-module tally of a ``make mutation`` run (issue #16): killed / total and the share, from ``mutants/``.

mutmut's own ``export-cicd-stats`` gives the totals only; this reads the same per-file result files
(``mutants/<path>.meta``) and classifies each mutant with mutmut's own exit-code table, so the totals
agree with mutmut's. The share counts every mutant of a module: survivors, mutants no test reaches
("no tests") and unchecked ones all count as not killed; timeouts count as killed (mutmut's rule: the
mutant made a test hang).

Usage: ``python benchmarks/mutation_report.py [--json out.json] [--survivors]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = ("killed", "timeout", "caught by type check", "segfault")


def tally(root: Path) -> dict[str, Counter[str]]:
    """Status counts per source file under ``root/mutants`` (mutmut's status names)."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, Counter[str]] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts: Counter[str] = Counter(status_by_exit_code[code] for code in codes.values())
        out[meta.relative_to(root / "mutants").as_posix().removesuffix(".meta")] = counts
    return out


def survivors(root: Path) -> list[str]:
    """Names of the mutants that survived or that no test reached."""
    from mutmut.stats import status_by_exit_code

    names = []
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if status_by_exit_code[code] in ("survived", "no tests"):
                names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout that holds mutants/")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--survivors", action="store_true", help="print the surviving and untested mutants' names")
    args = parser.parse_args(argv)
    if args.survivors:
        print("\n".join(survivors(args.root)))
        return 0
    table = tally(args.root)
    if not table:
        print("no mutmut results under mutants/: run make mutation first", file=sys.stderr)
        return 1
    rows = {}
    total: Counter[str] = Counter()
    for path, counts in table.items():
        total.update(counts)
        rows[path] = counts
    rows["total"] = total
    report = {}
    print(f"{'module':44s} {'killed':>6s} {'total':>6s} {'share':>6s}  survived  no tests  not checked")
    for path, counts in rows.items():
        n = sum(counts.values())
        killed = sum(counts[s] for s in KILLED)
        share = 100.0 * killed / n
        report[path] = {"killed": killed, "total": n, "share": round(share, 1), "statuses": dict(counts)}
        print(
            f"{path:44s} {killed:6d} {n:6d} {share:5.1f}%  {counts['survived']:8d}  {counts['no tests']:8d}  "
            f"{counts['not checked']:11d}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
