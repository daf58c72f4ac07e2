"""Encoder benchmark: latency, throughput, compile time and weight size of SLM360 Nano.

Compares, in one run on one machine, the numpy reference (nano/model.py), the numba f32
runtime and the numba INT4 runtime on real utterances from the corpus:

  * single-utterance latency P50 / P99 (tokenize + encode, one text per call);
  * batched throughput (utterances per second, `Encoder.encode` on a list);
  * first-call time in a fresh process with an empty numba cache and with a warm one;
  * weight bytes (f32 vs INT4) and INT4-vs-f32 agreement (cosine of pooled embeddings).

Prints a table and writes JSON to benchmarks/results/bench_encoder.json.
Speed figures are ratios measured in one run: absolute numbers vary with the machine's load.

Run from the repository root: python -m benchmarks.bench_encoder (or `make bench`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import ROOT, SHARED
from benchmarks.machine import compact
from benchmarks.monitor import repo_env


def load_utterances(path: Path, n: int, seed: int) -> list:
    """n seeded random non-empty lines of the corpus."""
    if not path.is_file():
        sys.exit(f"error: corpus not found at {path}; pass --corpus PATH")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    idx = np.random.default_rng(seed).choice(len(lines), size=min(n, len(lines)), replace=False)
    return [lines[i] for i in idx]


def build(precision: str, checkpoint: str, **kw):
    """An Encoder for `precision` from the checkpoint, or seeded random weights."""
    from slm360_rasa.nano import Encoder

    if checkpoint == "random":
        return Encoder.random(seed=0, precision=precision, **kw)
    if checkpoint == "pretrained":
        return Encoder.pretrained(precision=precision, **kw)
    return Encoder.from_checkpoint(checkpoint, precision=precision, **kw)


def percentiles(ts) -> dict:
    """P50 / P99 / mean in milliseconds."""
    a = np.asarray(ts) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def bench_numba(precision: str, checkpoint: str, texts: list, batch_texts: list, warmup: int,
                parallel_min_tokens: int = 64) -> dict:
    """Latency and throughput of one numba precision."""
    enc = build(precision, checkpoint, parallel_min_tokens=parallel_min_tokens)
    for t in texts[:warmup]:
        enc.encode([t])
    ts = []
    for t in texts:
        t0 = time.perf_counter()
        enc.encode([t])
        ts.append(time.perf_counter() - t0)
    enc.encode(batch_texts[:64])
    t0 = time.perf_counter()
    emb = enc.encode(batch_texts)
    dt = time.perf_counter() - t0
    n_tokens = int(enc.tokenizer.encode_batch(batch_texts, max_length=enc.max_length).lengths.sum())
    return {"latency": percentiles(ts), "throughput_utt_s": len(batch_texts) / dt,
            "throughput_tokens_s": n_tokens / dt, "weight_bytes": enc.weight_bytes, "_emb": emb, "_enc": enc}


def bench_reference(enc, checkpoint: str, texts: list, batch_texts: list, warmup: int) -> dict:
    """Latency and throughput of the numpy reference model on the weights the f32 `enc` runs."""
    from slm360_rasa.nano import model as M

    cfg = enc.config
    params = reference_params(checkpoint, cfg)
    tok = enc.tokenizer

    def run(batch):
        b = tok.encode_batch(batch, max_length=enc.max_length)
        return M.encode(params, b.ids.astype(np.int64), b.mask, cfg)[1]

    for t in texts[:warmup]:
        run([t])
    ts = []
    for t in texts:
        t0 = time.perf_counter()
        run([t])
        ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    emb = np.concatenate([run(batch_texts[i:i + 64]) for i in range(0, len(batch_texts), 64)])
    dt = time.perf_counter() - t0
    return {"latency": percentiles(ts), "throughput_utt_s": len(batch_texts) / dt, "_emb": emb}


def reference_params(checkpoint: str, cfg) -> dict:
    """The float weights `build(..., "f32")` serves: seeded init for 'random', else the checkpoint's."""
    from slm360_rasa.nano.checkpoint import load_checkpoint
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.quant import float_params

    if checkpoint == "random":
        return init_params(cfg, seed=0)
    if checkpoint == "pretrained":
        from slm360_rasa.nano.assets import pretrained_checkpoint_path

        checkpoint = str(pretrained_checkpoint_path())
    return float_params(load_checkpoint(checkpoint).tensors, cfg)


# Run with the repository on PYTHONPATH (`repo_env`): the working tree's encoder is timed.
CHILD = r"""
import time, json
t0 = time.perf_counter()
from slm360_rasa.nano import Encoder
import_s = time.perf_counter() - t0
enc = {ctor}
t1 = time.perf_counter()
enc.encode(["book a table for two tonight"])
first_s = time.perf_counter() - t1
print(json.dumps({{"import_s": import_s, "first_call_s": first_s}}))
"""


def compile_times(precision: str, checkpoint: str) -> dict:
    """First-call time in fresh processes: empty numba cache, then the cache it left."""
    ctor = {"random": f"Encoder.random(seed=0, precision={precision!r})",
            "pretrained": f"Encoder.pretrained(precision={precision!r})"}.get(
        checkpoint, f"Encoder.from_checkpoint({checkpoint!r}, precision={precision!r})")
    code = CHILD.format(ctor=ctor)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = repo_env(dict(os.environ, NUMBA_CACHE_DIR=cache))
        for label in ("cold_cache", "warm_cache"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compile-time child failed:\n{r.stderr[-2000:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    """Entry point; see --help."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_encoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.environ.get("SLM360_CORPUS", str(SHARED / "corpus" / "utterances.txt")),
                    help="utterances, one per line (default: ../shared/corpus/utterances.txt)")
    ap.add_argument("--checkpoint", default="auto",
                    help="'pretrained', 'random', a checkpoint path, or 'auto' (pretrained if shipped, else random)")
    ap.add_argument("--n-latency", type=int, default=500, help="utterances timed one by one (default 500)")
    ap.add_argument("--n-batch", type=int, default=2000, help="utterances in the throughput batch (default 2000)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed warm-up calls (default 20)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the numpy reference")
    ap.add_argument("--skip-compile", action="store_true", help="do not measure first-call compile time")
    ap.add_argument("--also-parallel", action="store_true",
                    help="also time single utterances with both threads (parallel_min_tokens=0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_encoder.json"), help="JSON output path")
    args = ap.parse_args(argv)

    checkpoint = args.checkpoint
    if checkpoint == "auto":
        from slm360_rasa.nano.assets import ASSETS_DIR, PRETRAINED_FILE

        checkpoint = "pretrained" if (ASSETS_DIR / PRETRAINED_FILE).is_file() else "random"
    texts = load_utterances(Path(args.corpus), args.n_latency, args.seed)
    batch_texts = load_utterances(Path(args.corpus), args.n_batch, args.seed + 1)

    res = {"machine": compact(), "checkpoint": checkpoint, "n_latency": len(texts), "n_batch": len(batch_texts)}
    f32 = bench_numba("f32", checkpoint, texts, batch_texts, args.warmup)
    q4 = bench_numba("int4", checkpoint, texts, batch_texts, args.warmup)
    systems = {"numba f32": f32, "numba int4": q4}
    if args.also_parallel:
        for prec in ("f32", "int4"):
            r = bench_numba(prec, checkpoint, texts, batch_texts[:64], args.warmup, parallel_min_tokens=0)
            systems[f"numba {prec} 2-thread"] = {"latency": r["latency"], "throughput_utt_s": float("nan"),
                                                 "weight_bytes": r["weight_bytes"]}
    if not args.skip_reference:
        systems = {"numpy reference": bench_reference(f32["_enc"], checkpoint, texts[:200], batch_texts[:512], 5), **systems}
    cos = np.sum(f32["_emb"] * q4["_emb"], 1) / (
        np.linalg.norm(f32["_emb"], axis=1) * np.linalg.norm(q4["_emb"], axis=1))
    res["int4_vs_f32_cosine"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    if "numpy reference" in systems:
        ref_n = len(systems["numpy reference"]["_emb"])
        res["reference_vs_f32_max_abs"] = float(np.abs(systems["numpy reference"]["_emb"] - f32["_emb"][:ref_n]).max())
    res["systems"] = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in systems.items()}
    res["note"] = ("single-utterance rows use one thread (inputs under parallel_min_tokens=64 tokens); "
                   "'2-thread' rows force both threads; throughput batches use both threads")
    res["ratios"] = {
        "int4_vs_f32_p50_speedup": f32["latency"]["p50_ms"] / q4["latency"]["p50_ms"],
        "int4_vs_f32_throughput": q4["throughput_utt_s"] / f32["throughput_utt_s"],
        "f32_vs_int4_weight_bytes": f32["weight_bytes"] / q4["weight_bytes"],
    }
    if "numpy reference" in systems:
        ref = systems["numpy reference"]
        res["ratios"]["int4_vs_reference_p50_speedup"] = ref["latency"]["p50_ms"] / q4["latency"]["p50_ms"]
        res["ratios"]["f32_vs_reference_p50_speedup"] = ref["latency"]["p50_ms"] / f32["latency"]["p50_ms"]
    if not args.skip_compile:
        res["first_call"] = {p: compile_times(p, checkpoint) for p in ("f32", "int4")}

    m = res["machine"]
    print(f"\nSLM360 Nano encoder benchmark - {m['cpu']}, {m['cores']} cores, numba {m['numba']} "
          f"({m['numba_threads']} threads), checkpoint: {checkpoint}")
    print(f"{'system':<18}{'P50 ms':>9}{'P99 ms':>9}{'utt/s':>10}{'weights MB':>12}")
    for name, r in res["systems"].items():
        wb = r.get("weight_bytes")
        print(f"{name:<18}{r['latency']['p50_ms']:>9.3f}{r['latency']['p99_ms']:>9.3f}{r['throughput_utt_s']:>10.1f}"
              f"{(wb / 1e6 if wb else float('nan')):>12.2f}")
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.2f}")
    print(f"  int4 vs f32 pooled cosine: mean {res['int4_vs_f32_cosine']['mean']:.4f}, "
          f"min {res['int4_vs_f32_cosine']['min']:.4f}")
    if "first_call" in res:
        for p, r in res["first_call"].items():
            print(f"  first call ({p}): cold cache {r['cold_cache']['first_call_s']:.2f} s, "
                  f"warm cache {r['warm_cache']['first_call_s']:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
