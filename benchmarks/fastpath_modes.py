"""SLM360Classifier's three modes (hybrid, semantic, pattern) on one dataset's test split.

Loads the classifier's persisted files from a trained Rasa model archive (or a bare
slm360_classifier.safetensors), then answers every test message one at a time in each mode
exactly as `SLM360Classifier.process` does (fast-path match, `needs_encoder`, encoder + heads,
`arbitrate`) and reports:

  * intent accuracy and macro F1 (a message without an intent counts as wrong);
  * fast-path hit rate (any pattern fired) and encoder-skip rate (exact hits in hybrid mode);
  * per-message latency P50 / P99 of the SLM360 part only (match + encoder + heads, no Rasa
    graph), after a warm-up, and P50 of the messages the fast path hit.

If the archive predates fastpath.json, the fast path is rebuilt from the dataset's
train.jsonl (the data such a model was trained on) and the output says so.

Prints a Markdown table; writes benchmarks/results/fastpath_modes_<dataset>.{json,md}.

Examples (from the repository root):
  python -m benchmarks.fastpath_modes \\
      --model runs/compare/banking77__slm360/models/banking77__slm360.tar.gz --dataset banking77
  python -m benchmarks.fastpath_modes --model model.tar.gz --dataset snips --limit 100   # smoke run

Timings are ratios measured in one run on one machine (written beside the table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from benchmarks import BENCH_DIR, ROOT, CompareError
from benchmarks.datasets import DEFAULT_DATA_DIR, load_jsonl
from benchmarks.machine import compact
from benchmarks.metrics import accuracy, macro_f1

MODEL_FILE = "slm360_classifier.safetensors"  # = components.classifier.MODEL_FILE (no Rasa import here)
FASTPATH_FILE = "fastpath.json"
MODES = ("hybrid", "semantic", "pattern")


def read_jsonl(path: Path):
    """The examples of a JSON Lines split (benchmarks.datasets.load_jsonl: every line validated);
    a missing or bad file exits with a message naming it and the fix."""
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass --dataset NAME with --data-dir DIR, or --dataset FOLDER "
                 "holding train.jsonl and test.jsonl")
    try:
        return load_jsonl(path)
    except CompareError as e:
        sys.exit(f"error: {e}")


def dataset_dir(dataset: str, data_dir: str) -> Path:
    """`dataset` as a folder if it is one, else `data_dir/dataset`."""
    p = Path(dataset)
    return p if p.is_dir() else Path(data_dir) / dataset


def find_model_files(model: Path, workdir: Path) -> Tuple[Path, Optional[Path]]:
    """(safetensors path, fastpath.json path or None) of the SLM360Classifier in `model`.

    `model` is a Rasa archive (.tar.gz, extracted into `workdir`) or a bare safetensors file
    (its fastpath.json, if any, lies beside it).
    """
    if not model.exists():
        sys.exit(f"error: model not found at {model}; pass --model PATH to a Rasa model archive (.tar.gz) "
                 f"or to a {MODEL_FILE}")
    if model.suffix == ".safetensors":
        fp = model.parent / FASTPATH_FILE
        return model, fp if fp.is_file() else None
    try:
        with tarfile.open(model) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).name in (MODEL_FILE, FASTPATH_FILE)
                       and not Path(m.name).is_absolute() and ".." not in Path(m.name).parts]
            tar.extractall(workdir, members=members)
    except (tarfile.TarError, OSError) as e:
        sys.exit(f"error: cannot read the model archive {model}: {e}; pass a .tar.gz written by `rasa train`")
    found = sorted(workdir.rglob(MODEL_FILE))
    if not found:
        sys.exit(f"error: {model} holds no {MODEL_FILE}: it was not trained with slm360_rasa.SLM360Classifier")
    if len(found) > 1:
        print(f"note: {len(found)} SLM360Classifier models in the archive; using {found[0].parent.name}")
    fp = found[0].parent / FASTPATH_FILE
    return found[0], fp if fp.is_file() else None


def load_fastpath(path: Optional[Path], train_rows: Sequence):
    """(FastPath, how it was obtained): the persisted one, or rebuilt from train.jsonl."""
    from slm360_rasa.model.fastpath import FastPath

    if path is not None:
        try:
            return FastPath.from_dict(json.loads(path.read_text(encoding="utf-8"))), "archive"
        except ValueError as e:
            sys.exit(f"error: corrupt {path.name} in the model: {e}; retrain the model with `rasa train`")
    fp = FastPath.build([r.text for r in train_rows], [r.intent for r in train_rows],
                        [[{"start": s, "end": e, "entity": lab} for s, e, lab in r.entities] for r in train_rows])
    return fp, "rebuilt from train.jsonl (the model predates fastpath.json)"


def answer(model, fastpath, text: str, mode: str, want_entities: bool):
    """(intent or None, fast-path hit or None, encoder ran?) for one message, as `process` does."""
    from slm360_rasa.model.fastpath import arbitrate, needs_encoder

    hit = fastpath.match(text) if mode != "semantic" else None
    ran = needs_encoder(hit, mode, want_entities)
    probs = model.predict([text])[0].intent_probs if ran else None
    probs = arbitrate(hit, probs, model.intents, mode)
    return (None if probs is None else model.intents[int(np.argmax(probs))]), hit, ran


def percentile_ms(ns: Sequence[int], q: float) -> Optional[float]:
    """The q-th percentile of nanosecond timings in milliseconds (None when empty)."""
    return round(float(np.percentile(np.asarray(ns, dtype=np.float64), q)) / 1e6, 4) if len(ns) else None


def evaluate(model, fastpath, rows: Sequence, mode: str, warmup: int, progress: bool = True) -> dict:
    """Metrics and latencies of one mode over `rows`, one message at a time."""
    from tqdm import tqdm

    # What the component checks (`entity_recognition` and a trained entity head); the model
    # file keeps its training config only for `--finetune`, so the head stands in for it.
    want_entities = bool("head.entity.weight" in model.heads and model.entity_types)
    texts = [r.text for r in rows]
    for t in texts[:warmup]:  # numba compilation / caches, branch predictors: not measured
        answer(model, fastpath, t, mode, want_entities)
    preds, ns, hit_ns = [], [], []
    hits = skipped = 0
    for text in tqdm(texts, desc=f"{mode:<8}", unit="msg", disable=not progress, mininterval=1.0):
        t0 = time.perf_counter_ns()
        intent, hit, ran = answer(model, fastpath, text, mode, want_entities)
        dt = time.perf_counter_ns() - t0
        preds.append(intent)
        ns.append(dt)
        if hit is not None:
            hits += 1
            hit_ns.append(dt)
        skipped += not ran
    gold = [r.intent for r in rows]
    n = len(rows)
    return {"accuracy": accuracy(gold, preds), "macro_f1": macro_f1(gold, preds),
            "hit_rate": hits / n, "encoder_skip_rate": skipped / n,
            "no_intent_rate": sum(p is None for p in preds) / n,
            "p50_ms": percentile_ms(ns, 50), "p99_ms": percentile_ms(ns, 99),
            "hit_p50_ms": percentile_ms(hit_ns, 50), "n": n}


def markdown(res: dict) -> str:
    """The results table with its context lines."""
    fmt = lambda v, p: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"## Fast path modes: {res['dataset']} ({res['n_test']} test messages)", "",
             f"Model `{res['model']}`; fast path: {res['fastpath_source']} "
             f"({res['fastpath_patterns']['exact']} exact patterns, {res['fastpath_patterns']['rules']} rules).", "",
             "| mode | accuracy | macro F1 | hit rate | encoder skipped | P50 ms | P99 ms | hit P50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, m in res["modes"].items():
        lines.append(f"| {mode} | {fmt(m['accuracy'], 4)} | {fmt(m['macro_f1'], 4)} | {fmt(m['hit_rate'], 4)} | "
                     f"{fmt(m['encoder_skip_rate'], 4)} | {fmt(m['p50_ms'], 3)} | {fmt(m['p99_ms'], 3)} | "
                     f"{fmt(m['hit_p50_ms'], 3)} |")
    mc = res["machine"]
    lines += ["", f"Machine: {mc['cpu']}, {mc['cores']} cores. Latency: SLM360 part only (fast-path match + "
              f"encoder + heads), one message at a time after {res['warmup']} warm-up messages."]
    return "\n".join(lines) + "\n"


def _display_path(p: Path) -> str:
    # Results name no machine paths: relative to the repo root where possible.
    p = p.resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name


def main(argv=None) -> int:
    """Entry point; see --help."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fastpath_modes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help=f"trained Rasa model archive (.tar.gz) with an SLM360Classifier, or a bare {MODEL_FILE}")
    ap.add_argument("--dataset", required=True, help="dataset name under --data-dir, or a folder with test.jsonl "
                                                     "(and train.jsonl, used when the model has no fastpath.json)")
    ap.add_argument("--data-dir", default=os.environ.get("SLM360_DATA", str(DEFAULT_DATA_DIR)),
                    help="folder of datasets (default ../shared/datasets relative to the repo root)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of hybrid,semantic,pattern")
    ap.add_argument("--limit", type=int, default=0, help="evaluate N seeded random test messages (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --limit's sample")
    ap.add_argument("--warmup", type=int, default=20, help="untimed messages per mode before timing (default 20)")
    ap.add_argument("--out-dir", default=str(BENCH_DIR / "results"), help="where fastpath_modes_<dataset>.{json,md} go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    if args.limit < 0 or args.warmup < 0:
        ap.error("--limit and --warmup must be >= 0")

    from slm360_rasa.model import IntentEntityModel

    ds = dataset_dir(args.dataset, args.data_dir)
    test = read_jsonl(ds / "test.jsonl")  # an empty file is refused by the reader
    if args.limit and args.limit < len(test):
        idx = np.sort(np.random.default_rng(args.seed).choice(len(test), size=args.limit, replace=False))
        test = [test[i] for i in idx]
    with tempfile.TemporaryDirectory(prefix="slm360-fastpath-") as tmp:
        model_path, fp_path = find_model_files(Path(args.model), Path(tmp))
        try:
            model = IntentEntityModel.load(model_path)
        except (ValueError, OSError) as e:
            sys.exit(f"error: cannot load {model_path.name} from {args.model}: {e}")
        fastpath, source = load_fastpath(fp_path, read_jsonl(ds / "train.jsonl") if fp_path is None else [])
    print(f"fast path: {source}; {len(fastpath.exact)} exact patterns, {len(fastpath.rules)} rules")
    if not model.intents:
        sys.exit(f"error: the model in {args.model} has no intent head; train it with intent_classification on")

    name = ds.name
    res = {"dataset": name, "model": _display_path(Path(args.model)), "n_test": len(test),
           "fastpath_source": source, "fastpath_patterns": {"exact": len(fastpath.exact), "rules": len(fastpath.rules)},
           "warmup": args.warmup, "precision": model.precision, "machine": compact(), "modes": {}}
    for mode in modes:
        res["modes"][mode] = evaluate(model, fastpath, test, mode, args.warmup, progress=not args.no_progress)
    md = markdown(res)
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fastpath_modes_{name}.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / f"fastpath_modes_{name}.md").write_text(md, encoding="utf-8")
    print(f"wrote {out / f'fastpath_modes_{name}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
