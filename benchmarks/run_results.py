"""compare.py's saved results read back: the (dataset, system) -> result table and its cells.

Shared by report.py (RESULTS.md) and plots.py, which must agree on what counts as a finished
run and how a missing, failed or unfinished one is named.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from benchmarks.systems import LABELS

NOT_RUN = "not run"

Results = Dict[Tuple[str, str], dict]


class ReportError(Exception):
    """Bad input; the message names it and the fix."""


def load_results(results_dir: Path) -> Results:
    """All result JSON files of `results_dir`, keyed by (dataset, system)."""
    if not results_dir.is_dir():
        raise ReportError(f"results folder not found: {results_dir}; run benchmarks/compare.py first "
                          "(python -m benchmarks.compare), or pass --results-dir / --quick")
    out: Results = {}
    for path in sorted(results_dir.glob("*__*.json")):
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"report.py: warning: skipping {path}: not readable JSON ({e})", file=sys.stderr)
            continue
        if not str(r.get("schema", "")).startswith("slm360-compare/") or "dataset" not in r or "system" not in r:
            print(f"report.py: warning: skipping {path}: not a compare.py result", file=sys.stderr)
            continue
        r["_file"] = str(path)
        out[(r["dataset"], r["system"])] = r
    return out


def is_ok(r: Optional[dict]) -> bool:
    """Whether `r` is a finished run (status ok)."""
    return bool(r) and r.get("status") == "ok"


def metric(results: Results, dataset: str, system: str, key: str):
    """A metric of an ok run; None if the run is missing, failed or lacks the metric."""
    r = results.get((dataset, system))
    return (r.get("metrics") or {}).get(key) if is_ok(r) else None


def cell(results: Results, dataset: str, system: str, key: str, fmt: str, na: str = "n/a") -> str:
    """Table cell: the formatted metric, 'not run', 'failed (...)' or `na` (not applicable)."""
    r = results.get((dataset, system))
    if r is None:
        return NOT_RUN
    if r.get("status") == "train_incomplete":
        # Chunk progress lives in the gitignored work dir, so a committed incomplete run is a
        # measurement of how far it got and how long that took, not a promise to finish.
        chunks = (r.get("train") or {}).get("chunks") or []
        total = len((r.get("train_chunks") or {}).get("epochs") or []) or "?"
        return f"incomplete ({len(chunks)}/{total} chunks, {sum(c.get('wall_s') or 0 for c in chunks):,.0f} s)"
    if not is_ok(r):
        return "failed (out of memory)" if r.get("oom_kill") else f"failed ({r.get('status')})"
    v = (r.get("metrics") or {}).get(key)
    return na if v is None else format(v, fmt)


def label(system: str) -> str:
    """The short name of `system` in tables and plots (a system outside the registry: its own name)."""
    return LABELS.get(system, system)
