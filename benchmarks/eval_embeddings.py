"""Frozen-encoder evaluation: logistic regression on sentence embeddings (docs/DESIGN.md, "Where the weights come from").

For each encoder (the teacher all-MiniLM-L6-v2, the pretrained student in f32 and INT4, and a
randomly initialised student), embed the train and test splits of Banking77 and CLINC150
(in-scope), L2-normalise, fit sklearn LogisticRegression(C=10) on train and score on test.
Also reports the mean cosine between the student's projected embedding and the teacher's on
the pretraining run's held-out corpus lines, when the run folder is given.

Writes benchmarks/results/eval_embeddings.json and eval_embeddings.md.

Run from the repository root: python -m benchmarks.eval_embeddings [--no-teacher] [--run-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import ROOT, CompareError
from benchmarks.datasets import DEFAULT_DATA_DIR, load_jsonl


def read_split(data_dir: Path, dataset: str, split: str):
    """(texts, intents) of a jsonl split (every line validated); a missing or bad file exits
    with a message naming it."""
    try:
        rows = load_jsonl(data_dir / dataset / f"{split}.jsonl")
    except CompareError as e:
        sys.exit(f"error: {e}; pass --data-dir")
    return [r.text for r in rows], [r.intent for r in rows]


def logreg_accuracy(train_x, train_y, test_x, test_y, C: float = 10.0) -> float:
    """Accuracy of L2-normalised embeddings + LogisticRegression(C)."""
    from sklearn.linear_model import LogisticRegression

    def norm(x):
        x = np.asarray(x, np.float64)
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

    clf = LogisticRegression(C=C, max_iter=3000)
    clf.fit(norm(train_x), train_y)
    return float(np.mean(clf.predict(norm(test_x)) == np.asarray(test_y)))


def encoders(checkpoint: str, with_teacher: bool):
    """name -> encode(texts) callables."""
    from slm360_rasa.nano import Encoder

    out = {}
    if with_teacher:
        from slm360_rasa.train.teacher import Teacher

        teacher = Teacher.load()
        out["teacher (all-MiniLM-L6-v2)"] = lambda texts: teacher.encode(texts, batch_size=128)
    for prec in ("f32", "int4"):
        enc = Encoder.pretrained(precision=prec) if checkpoint == "pretrained" else \
            Encoder.from_checkpoint(checkpoint, precision=prec)
        out[f"student {prec}"] = enc.encode
    rnd = Encoder.random(seed=0, precision="f32")
    out["random student f32"] = rnd.encode
    return out


def main(argv=None) -> int:
    """Entry point; see --help."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_embeddings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("SLM360_DATA", str(DEFAULT_DATA_DIR)),
                    help="folder with banking77/ and clinc150/ jsonl splits (default ../shared/datasets)")
    ap.add_argument("--checkpoint", default="pretrained", help="student checkpoint path or 'pretrained'")
    ap.add_argument("--datasets", default="banking77,clinc150")
    ap.add_argument("--no-teacher", action="store_true", help="skip the teacher (it is the slowest encoder)")
    ap.add_argument("--run-dir", help="pretraining run folder: adds held-out student-teacher cosine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_embeddings"), help="output path stem")
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir)
    res = {"datasets": {}, "C": 10.0}
    encs = encoders(args.checkpoint, not args.no_teacher)
    for ds in args.datasets.split(","):
        tr_x, tr_y = read_split(data_dir, ds, "train")
        te_x, te_y = read_split(data_dir, ds, "test")
        res["datasets"][ds] = {"n_train": len(tr_x), "n_test": len(te_x), "accuracy": {}, "embed_seconds": {}}
        for name, enc in encs.items():
            t0 = time.time()
            a, b = enc(tr_x), enc(te_x)
            res["datasets"][ds]["embed_seconds"][name] = round(time.time() - t0, 1)
            acc = logreg_accuracy(a, tr_y, b, te_y)
            res["datasets"][ds]["accuracy"][name] = acc
            print(f"{ds:<10} {name:<28} accuracy {acc:.4f}", flush=True)
    if args.run_dir:
        from slm360_rasa.train import distill as D

        ck = D.load_checkpoint(Path(args.run_dir) / D.STATE_FILE)
        cfg = D.DistillConfig(**ck.extra["distill"])
        lines = D.read_corpus(cfg.corpus, cfg.limit_lines)
        _, held = D.split_heldout(len(lines), cfg.n_heldout, cfg.seed)
        targets = D.teacher_embeddings(lines, cfg, progress=False)
        from slm360_rasa.nano.tokenizer import NanoTokenizer

        tok = NanoTokenizer.load()
        b = tok.encode_batch([lines[i] for i in held], max_length=cfg.max_length)
        seqs = [b.ids[i, : b.lengths[i]].astype(np.int64) for i in range(len(held))]
        params = {k: v.astype(np.float32) for k, v in ck.tensors.items() if not k.startswith("optim.")}
        res["heldout_cosine"] = D.heldout_cosine(params, seqs, np.asarray(targets[held]), cfg.nano)
        res["heldout_lines"] = len(held)
        print(f"held-out student-teacher cosine ({len(held)} lines): {res['heldout_cosine']:.4f}")

    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    names = list(encs)
    lines = ["| encoder (frozen) + logistic regression | " + " | ".join(res["datasets"]) + " |",
             "|---|" + "---:|" * len(res["datasets"])]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{res['datasets'][d]['accuracy'][n]:.4f}" for d in res["datasets"]) + " |")
    if "heldout_cosine" in res:
        lines.append(f"\nMean student-teacher cosine on {res['heldout_lines']} held-out corpus lines: "
                     f"{res['heldout_cosine']:.4f}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
