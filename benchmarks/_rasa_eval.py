"""Serve a trained Rasa NLU model in this (fresh) process and parse messages one by one.

Run by benchmarks/compare.py (and continual.py's DIET anchor) in a new subprocess per model,
as `python -m benchmarks._rasa_eval` (`command()` builds that line), so import, load and memory
figures are those of a process that serves only this model, as `rasa run` would:

  1. import Rasa, then `rasa.core.agent.Agent.load(model)` (timed: load_s);
  2. parse the warm-up texts (untimed; first calls compile, fill caches);
  3. `await agent.parse_message(text)` for every text, each call timed with perf_counter;
  4. process peak RSS after load + all parses (getrusage RUSAGE_SELF ru_maxrss).

Input (--texts): JSON {"texts": [str, ...], "warmup": [str, ...]}.
Output (--out): JSON with timings, memory and, per text, the top intent, the first ranking
entries, the entities as [start, end, label] and the latency in ms. No metrics are computed
here: compare.py does that, so this process holds nothing but the served model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# Entries of intent_ranking kept per message: the top non-fallback intent is at most one
# below nlu_fallback, the rest is context for error analysis.
RANKING_KEPT = 5
WARMUP_MESSAGES = 10  # untimed parses before the timed ones, in every evaluation


def command(model: Path, texts: Path, out: Path) -> list:
    """The command line that evaluates `model` on `texts` into `out` in a fresh process. It runs
    this module with `-m`, so the child's environment must put the repository on PYTHONPATH
    (`benchmarks.monitor.child_env` does) whatever its working directory."""
    return [sys.executable, "-m", "benchmarks._rasa_eval", "--model", str(model), "--texts", str(texts),
            "--out", str(out)]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB: the kernel's high-water mark of this process's RSS,
    # exact (no sampling), covering load and every parse so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compact(parse: dict, latency_ms: float) -> dict:
    intent = parse.get("intent") or {}
    ranking = [[r.get("name"), round(float(r.get("confidence") or 0.0), 6)]
               for r in (parse.get("intent_ranking") or [])[:RANKING_KEPT]]
    entities = [[int(e["start"]), int(e["end"]), str(e.get("entity"))]
                for e in (parse.get("entities") or []) if "start" in e and "end" in e]
    return {"intent": intent.get("name"), "confidence": round(float(intent.get("confidence") or 0.0), 6),
            "ranking": ranking, "entities": entities, "latency_ms": round(latency_ms, 4)}


def evaluate(model: Path, texts: list, warmup: list) -> dict:
    """Load `model`, parse `warmup` untimed, then every text timed; return the raw results."""
    import asyncio

    t0 = time.perf_counter()
    from rasa.core.agent import Agent
    from rasa.utils.common import configure_logging_and_warnings
    from rasa.utils.log_utils import configure_structlog

    import_s = time.perf_counter() - t0
    # Logging as the `rasa` CLI sets it up (level from LOG_LEVEL, default INFO). Unconfigured,
    # structlog prints a debug line per parse, and that I/O would be timed as parse latency.
    configure_logging_and_warnings()
    configure_structlog()

    t0 = time.perf_counter()
    agent = Agent.load(str(model))
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_mb()

    async def run() -> tuple:
        for text in warmup:
            await agent.parse_message(text)
        out = []
        for text in texts:
            start = time.perf_counter()
            parse = await agent.parse_message(text)
            out.append(_compact(parse, (time.perf_counter() - start) * 1000.0))
        return out

    # Rasa installs uvloop's event loop policy, under which there is no implicit loop:
    # create one explicitly and run the whole evaluation in it (one loop, not one per call,
    # so loop creation is not part of any message's latency).
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        t0 = time.perf_counter()
        results = loop.run_until_complete(run())
        parse_wall_s = time.perf_counter() - t0
    finally:
        loop.close()
    return {
        "model": str(model),
        "import_s": round(import_s, 3),
        "load_s": round(load_s, 3),
        "warmup_n": len(warmup),
        "parse_wall_s": round(parse_wall_s, 3),
        "rss_after_load_mb": round(rss_after_load, 1),
        "rss_after_parse_mb": round(_rss_mb(), 1),
        "serve_peak_rss_mb": round(_peak_rss_mb(), 1),
        "results": results,
    }


def main(argv=None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks._rasa_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="trained Rasa model archive (.tar.gz)")
    ap.add_argument("--texts", required=True, type=Path, help='JSON file {"texts": [...], "warmup": [...]}')
    ap.add_argument("--out", required=True, type=Path, help="where to write the raw results (JSON)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")
    if not args.model.is_file():
        ap.error(f"--model {args.model}: no such file; train the model first (python -m benchmarks.compare does)")
    try:
        spec = json.loads(args.texts.read_text(encoding="utf-8"))
        texts, warmup = list(spec["texts"]), list(spec.get("warmup", []))
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--texts {args.texts}: expected a JSON object with a 'texts' list ({e})")
    if not all(isinstance(t, str) for t in texts + warmup):
        ap.error(f"--texts {args.texts}: every text must be a string")
    raw = evaluate(args.model, texts, warmup)
    # Imported only now: the memory figures above are of a process holding Rasa and the model alone.
    from slm360_rasa.fileio import atomic_write_text

    atomic_write_text(args.out, json.dumps(raw))
    print(f"parsed {len(texts)} texts: load {raw['load_s']} s, peak RSS {raw['serve_peak_rss_mb']} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
