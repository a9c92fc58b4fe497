"""Diff two demo `report.json` files, ignoring timings and compute counters.

A speed change to the run step must leave every result number as it was; what it may change is how
long things took and how many engine calls / passes they made. This prints every other difference
(path: old != new) and exits 1 when there is one.

    python benchmarks/compare_reports.py OLD/report.json NEW/report.json [--sections stage1 probe_baseline]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# keys whose values are times or engine-cost counters, at any depth (the "compute" section and the
# per-section meter counts; the run's own record holds the timings and the code fingerprint)
IGNORED = frozenset({"wall_s", "seconds", "timings", "timings_s", "engine_s", "encode_s", "rank_s", "sweep_s",
                     "total_s", "train_s", "train_seconds", "compute", "run"})


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Every leaf where `old` and `new` differ (NaN equals NaN), skipping `IGNORED` keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if k in IGNORED:
                continue
            if k not in old or k not in new:
                out.append(f"{path}/{k}: only in {'new' if k in new else 'old'}")
            else:
                out += differences(old[k], new[k], f"{path}/{k}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = [f"{path}: {len(old)} items != {len(new)}"] if len(old) != len(new) else []
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return []
    return [] if old == new else [f"{path}: {old!r} != {new!r}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--sections", nargs="*", help="compare only these top-level sections")
    args = ap.parse_args(argv)
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    if args.sections:
        old = {k: old.get(k) for k in args.sections}
        new = {k: new.get(k) for k in args.sections}
    diffs = differences(old, new)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
