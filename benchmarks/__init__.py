"""Benchmarks of SLM360 against Rasa's DIET, run from the repository root as modules.

Scripts (each takes --help):

  python -m benchmarks.compare          DIET vs SLM360 through `rasa train nlu` + `Agent.parse_message`
  python -m benchmarks.report           RESULTS.md and plots from compare's saved JSON
  python -m benchmarks.continual        continual learning: plain finetuning vs EWC + replay (vs DIET)
  python -m benchmarks.bench_encoder    encoder latency / throughput / size
  python -m benchmarks.eval_embeddings  frozen encoders + logistic regression
  python -m benchmarks.fastpath_modes   SLM360Classifier's hybrid / semantic / pattern modes
  python -m benchmarks.serve_load       concurrent load on `rasa run`

Library modules: datasets (jsonl splits), rasa_data (Rasa NLU YAML), systems (the systems and
their pipeline configs), machine (the machine description), monitor (subprocesses, memory),
metrics, store (saving results), diet_chunks (DIET trained in chunks), run_results, plots,
continual_diet, _rasa_eval (the evaluation child process).

This module holds what every one of them shares: where the repository and the data are,
the error type for bad input, and the progress line printer.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SHARED = ROOT.parent / "shared"  # seeds, datasets and corpus, beside the repository


class CompareError(Exception):
    """Bad input or environment; the message names the input and the fix."""


def say(tool: str, msg: str) -> None:
    """One progress line on stderr, `[tool HH:MM:SS] msg`: stdout stays free for results."""
    print(f"[{tool} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
