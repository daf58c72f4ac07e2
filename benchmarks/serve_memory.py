"""Serving memory of SLM360 against Rasa's own floor, side by side in one run.

    python -m benchmarks.serve_memory [--compare-checkout DIR] [--rounds 2]

Trains, with `rasa train nlu` on the same NLU data (default: the example bot's):

  floor   WhitespaceTokenizer only: what any Rasa NLU server costs before a classifier;
  slm360  the SLM360 pipeline (default: example_bot/config.yml);
  before  (with --compare-checkout DIR) the same SLM360 pipeline trained and served by another
          checkout of this repository, e.g. a git worktree of an earlier commit;

then serves each model in a fresh process exactly as compare.py does (benchmarks/_rasa_eval.py:
`Agent.load`, warm-up, one parse per text; peak RSS = the kernel's ru_maxrss), alternating the
models for `--rounds` rounds so that drift in the machine hits all of them alike. A last fresh
process per SLM360 model says where its memory goes: RSS after importing Rasa's Agent, numba,
our modules, after loading the model and after the warm-up.

Prints a table and writes benchmarks/results/serve_memory.json. RSS counts shared file-backed
pages (the mapped part of libllvmlite.so, for one), so it depends on the machine and its page
cache; the difference to the floor, measured in the same run, is the figure to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import BENCH_DIR, ROOT, SHARED, CompareError, _rasa_eval, say
from benchmarks.machine import machine_description
from benchmarks.monitor import child_env, run_monitored
from benchmarks.store import write_json

FLOOR_CONFIG = """recipe: default.v1
assistant_id: serve_memory_floor
language: en
pipeline:
  - name: WhitespaceTokenizer
policies: []
"""
N_TEXTS = 200  # parses per serving process: enough for the steady state, a few seconds each

# Run in a fresh process per model: RSS (MB, psutil) after each step of what `rasa run` does.
_BREAKDOWN = r"""
import json, os, sys, tarfile, tempfile
import psutil
def rss():
    return round(psutil.Process().memory_info().rss / 2**20, 1)
steps = [("python + numpy", rss())]
from rasa.core.agent import Agent  # noqa: F401
steps.append(("import rasa.core.agent", rss()))
import numba  # noqa: F401
steps.append(("import numba", rss()))
try:
    from slm360_rasa.model import IntentEntityModel
except ImportError:  # a checkout from before the served-model layer
    from slm360_rasa.train.finetune import IntentEntityModel
from slm360_rasa.components.classifier import SLM360Classifier  # noqa: F401
import slm360_rasa.nano.runtime  # noqa: F401
steps.append(("import slm360_rasa (component, model, runtime)", rss()))
d = tempfile.mkdtemp()
with tarfile.open(sys.argv[1]) as tar:
    tar.extractall(d)
path = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f == "slm360_classifier.safetensors"][0]
model = IntentEntityModel.load(path)
steps.append(("load the model file", rss()))
model.warm_up()
steps.append(("warm-up (numba loads the cached kernels)", rss()))
model.predict(json.loads(sys.argv[2]))
steps.append(("predict the texts", rss()))
print(json.dumps(steps))
"""


def _texts(source: Path, n: int) -> List[str]:
    """Up to `n` texts to parse: the "text" of each line of a jsonl file, or (a .yml file) the
    example texts of Rasa NLU data, entity markup removed."""
    if source.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from rasa.shared.nlu.training_data.loading import load_data

        texts = [m.get("text") for m in load_data(str(source)).intent_examples if m.get("text")]
    if not texts:
        raise CompareError(f"--texts {source}: no texts in it")
    return (texts * (n // len(texts) + 1))[:n]


def _train(name: str, config: Path, nlu: Path, work: Path, pythonpath: Optional[str]) -> Path:
    """`rasa train nlu` of `config` on `nlu` into work/<name>.tar.gz (reused when it exists)."""
    model = work / f"{name}.tar.gz"
    if model.is_file():
        say("serve_memory", f"{name}: model exists, reused: {model}")
        return model
    env = child_env(work)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "rasa", "train", "nlu", "-c", str(config), "--nlu", str(nlu), "--out", str(work),
           "--fixed-model-name", name]
    say("serve_memory", f"{name}: rasa train nlu ...")
    run = run_monitored(cmd, work / f"{name}.train.log", env, cwd=work)
    if run["rc"] != 0 or not model.is_file():
        raise CompareError(f"{name}: rasa train nlu failed (rc {run['rc']}); see {work / (name + '.train.log')}")
    return model


def _serve(name: str, model: Path, texts: Path, work: Path, pythonpath: Optional[str], round_: int) -> dict:
    """One fresh serving process of `model`: compare.py's figures (peak RSS, load time, P50)."""
    out = work / f"{name}.serve{round_}.json"
    env = child_env(work)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    run = run_monitored(_rasa_eval.command(model, texts, out), work / f"{name}.serve.log", env, cwd=work)
    if run["rc"] != 0:
        raise CompareError(f"{name}: serving failed (rc {run['rc']}); see {work / (name + '.serve.log')}")
    raw = json.loads(out.read_text(encoding="utf-8"))
    lat = sorted(r["latency_ms"] for r in raw["results"])
    return {"serve_peak_rss_mb": raw["serve_peak_rss_mb"], "rss_after_load_mb": raw["rss_after_load_mb"],
            "load_s": raw["load_s"], "parse_p50_ms": lat[len(lat) // 2], "other_cpu_s": run.get("other_cpu_s")}


def _breakdown(model: Path, texts: List[str], work: Path, pythonpath: Optional[str]) -> List[list]:
    env = child_env(work)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, "-c", _BREAKDOWN, str(model), json.dumps(texts[:20])], env=env,
                       capture_output=True, text=True, timeout=900, cwd=work)
    if r.returncode != 0:
        raise CompareError(f"memory breakdown of {model} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    """Train, serve alternately, break down; returns the result dict (also written to --out)."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    floor_cfg = work / "floor.yml"
    floor_cfg.write_text(FLOOR_CONFIG, encoding="utf-8")
    systems: Dict[str, tuple] = {"floor": (floor_cfg, None), "slm360": (Path(args.config).resolve(), None)}
    if args.compare_checkout:
        # The other checkout's slm360_rasa first; this repository's `benchmarks` package still
        # wins over a checkout whose benchmarks/ is no package (regular packages take precedence).
        systems["before"] = (Path(args.config).resolve(),
                             os.pathsep.join([str(Path(args.compare_checkout).resolve()), str(ROOT)]))
    nlu = Path(args.nlu).resolve()
    models = {name: _train(name, cfg, nlu, work, pp) for name, (cfg, pp) in systems.items()}
    texts = _texts(Path(args.texts).resolve() if args.texts else nlu, N_TEXTS)
    spec = work / "texts.json"
    spec.write_text(json.dumps({"texts": texts, "warmup": texts[:_rasa_eval.WARMUP_MESSAGES]}), encoding="utf-8")
    rounds: Dict[str, List[dict]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (_, pp) in systems.items():
            rounds[name].append(_serve(name, models[name], spec, work, pp, r))
            say("serve_memory", f"round {r + 1}: {name} peak RSS {rounds[name][-1]['serve_peak_rss_mb']} MB")
    summary = {name: {"serve_peak_rss_mb": statistics.median(x["serve_peak_rss_mb"] for x in runs),
                      "parse_p50_ms": statistics.median(x["parse_p50_ms"] for x in runs), "runs": runs}
               for name, runs in rounds.items()}
    floor = summary["floor"]["serve_peak_rss_mb"]
    for name in systems:
        summary[name]["over_floor_mb"] = round(summary[name]["serve_peak_rss_mb"] - floor, 1)
    breakdown = {name: _breakdown(models[name], texts, work, systems[name][1]) for name in systems if name != "floor"}
    return {"schema": "slm360-serve-memory/1", "nlu": str(nlu), "texts": args.texts, "config": str(Path(args.config).resolve()),
            "compare_checkout": args.compare_checkout, "rounds": args.rounds, "machine": machine_description(),
            "systems": summary, "breakdown": breakdown}


def table(result: dict) -> str:
    """The result as Markdown: one row per system, then the breakdown of each SLM360 model."""
    lines = ["| system | serving peak RSS (median) | over the floor | parse P50 |", "|---|---|---|---|"]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | {s['serve_peak_rss_mb']:.1f} MB | {s['over_floor_mb']:+.1f} MB | "
                     f"{s['parse_p50_ms']:.2f} ms |")
    for name, steps in result["breakdown"].items():
        lines += ["", f"{name}, RSS after each step (one fresh process):", ""]
        prev = None
        for step, mb in steps:
            lines.append(f"- {step}: {mb:.1f} MB" + ("" if prev is None else f" ({mb - prev:+.1f})"))
            prev = mb
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nlu", default=str(ROOT / "example_bot" / "data" / "nlu.yml"), help="Rasa NLU YAML to train on")
    ap.add_argument("--config", default=str(ROOT / "example_bot" / "config.yml"), help="the SLM360 pipeline")
    default_texts = SHARED / "datasets" / "snips" / "test.jsonl"
    ap.add_argument("--texts", default=str(default_texts) if default_texts.is_file() else None,
                    help="jsonl with a 'text' per line to parse (default: SNIPS test when present, else the NLU "
                         "examples, which the fast path answers without the encoder)")
    ap.add_argument("--compare-checkout", default=None,
                    help="another checkout of this repository (e.g. `git worktree add /tmp/before <rev>`) whose "
                         "code trains and serves a third model, 'before'")
    ap.add_argument("--rounds", type=int, default=2, help="serving processes per model, alternating (default 2)")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "serve_memory"), help="models and logs (gitignored)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "serve_memory.json"), help="result JSON")
    return ap


def main(argv=None) -> int:
    """Command line entry point."""
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        build_parser().error("--rounds must be at least 1")
    try:
        result = run(args)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_json(Path(args.out), result)
    print(table(result))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
