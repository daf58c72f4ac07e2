"""Fingerprints of trained models, to show that a refactor left behaviour bit-identical.

    python -m benchmarks.parity [--out DIR]
    PYTHONPATH=/tmp/before python -m benchmarks.parity --out DIR   # another checkout's slm360_rasa

Trains, with fixed seeds and no Rasa, three models on subsets of the full standard splits and
prints the sha256 of what matters:

  b77            Banking77, its first 12 intents (all their training examples), 2 epochs, seed 7:
                 the saved model file, and the calibrated probabilities on the full test set
                 (3,080 texts) right after training and after a reload;
  b77_continual  that model updated by a continual-learning round (1 epoch, 150 test-split
                 examples of the same intents as new data): the report and the saved file;
  snips          SNIPS, first 600 training examples (intents and entities), 2 epochs, seed 3: the
                 saved file and every prediction (probabilities and entity spans) on its test set.

Equal fingerprints before and after a change mean the same bytes on disk and the same answers.
It runs the current API or, for a checkout from before the served-model layer (#18), the old
one, so two checkouts are compared with this one script (the second command above; this
repository's `benchmarks` package still wins over the other checkout's folder). About 3
minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks import SHARED
from slm360_rasa.fileio import file_sha256


def _api():
    """(train(cfg, texts, intents, entities) -> model, load(path, training) -> model, learner(model))."""
    try:
        from slm360_rasa.config import FinetuneConfig
        from slm360_rasa.model import IntentEntityModel
        from slm360_rasa.train.continual import ContinualLearner, remember
        from slm360_rasa.train.trainer import Trainer, start_model

        def train(kw, texts, intents, entities):
            cfg = FinetuneConfig(**kw)
            model, params = start_model(cfg)  # serving max length = the encoder's, as before #18
            trainer = Trainer(model, cfg, params)
            trainer.fit(texts, intents, entities, progress=False)
            remember(trainer)
            return model

        return train, lambda p, training: IntentEntityModel.load(p, training=training), ContinualLearner
    except ImportError:  # a checkout from before the served-model layer
        from slm360_rasa.train.continual import ContinualLearner
        from slm360_rasa.train.finetune import FinetuneConfig, IntentEntityModel

        def train(kw, texts, intents, entities):
            model = IntentEntityModel.from_pretrained(FinetuneConfig(**kw))
            model.fit(texts, intents, entities, progress=False)
            return model

        return train, lambda p, training: IntentEntityModel.load(p), ContinualLearner


def _rows(data_dir: Path, name: str, split: str) -> list:
    path = data_dir / name / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _columns(rows):
    return [r["text"] for r in rows], [r["intent"] for r in rows], [r["entities"] for r in rows]


def _digest(x) -> str:
    return hashlib.sha256(x.tobytes() if isinstance(x, np.ndarray) else json.dumps(x).encode()).hexdigest()


def run(data_dir: Path, out: Path) -> dict:
    """Train, save and fingerprint the three models into `out`; returns the fingerprints."""
    train, load, learner_cls = _api()
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    tr, te = _rows(data_dir, "banking77", "train"), _rows(data_dir, "banking77", "test")
    intents = sorted({r["intent"] for r in tr})[:12]
    model = train(dict(epochs=2, random_seed=7), *_columns([r for r in tr if r["intent"] in intents]))
    res["b77"] = file_sha256(model.save(out / "b77.safetensors"))
    texts = [r["text"] for r in te]
    res["b77_probs_fit"] = _digest(np.stack([p.intent_probs for p in model.predict(texts)]))
    again = load(out / "b77.safetensors", True)
    res["b77_probs_load"] = _digest(np.stack([p.intent_probs for p in again.predict(texts)]))
    learner = learner_cls(again, epochs=1)
    report = learner.learn(*_columns([r for r in te if r["intent"] in intents][:150]))
    res["b77_continual_report"] = {k: v for k, v in report.to_dict().items() if k != "seconds"}
    res["b77_continual"] = file_sha256(learner.save(out / "b77_continual.safetensors"))
    model = train(dict(epochs=2, random_seed=3), *_columns(_rows(data_dir, "snips", "train")[:600]))
    res["snips"] = file_sha256(model.save(out / "snips.safetensors"))
    preds = load(out / "snips.safetensors", False).predict([r["text"] for r in _rows(data_dir, "snips", "test")])
    res["snips_preds"] = _digest([[None if p.intent_probs is None else p.intent_probs.tolist(), p.entities]
                                  for p in preds])
    return res


def main(argv=None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(SHARED / "datasets"), help="folder with banking77/ and snips/ jsonl")
    ap.add_argument("--out", default="runs/parity", help="where the model files go (gitignored runs/)")
    args = ap.parse_args(argv)
    if not (Path(args.data_dir) / "banking77" / "train.jsonl").is_file():
        ap.error(f"--data-dir {args.data_dir}: no banking77/train.jsonl there")
    print(json.dumps(run(Path(args.data_dir), Path(args.out)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
