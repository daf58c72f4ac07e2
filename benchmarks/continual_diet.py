"""The DIET anchor of the continual learning experiment (continual.py --systems slm360,diet).

DIET's default pipeline under the same protocol as SLM360, through real Rasa: `rasa train nlu`
on half A less A held-out (the examples SLM360 trained on), then `rasa train nlu --finetune
<half-A model> --epoch-fraction F` on B's trained part; every model parsed in a fresh process
(benchmarks/_rasa_eval.py) on A held-out, B held-out and test. DIET has no replay or EWC: its
update is plain finetuning.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import yaml

from benchmarks import CompareError, _rasa_eval, monitor, say
from benchmarks.datasets import Example
from benchmarks.metrics import accuracy, top_intent
from benchmarks.rasa_data import write_nlu_yaml
from benchmarks.systems import DIET, build_config


def to_rows(ex) -> list:
    """slm360_rasa's `Examples` as the benchmark's `Example` rows (what the NLU YAML writer takes)."""
    return [Example(t, i, [(e["start"], e["end"], e["entity"]) for e in ents])
            for t, i, ents in zip(ex.texts, ex.intents, ex.entities)]


def _diet_accuracy(raw_path: Path, sets: Dict[str, object]) -> Dict[str, Optional[float]]:
    raw = json.loads(raw_path.read_text(encoding="utf-8"))["results"]
    out, pos = {}, 0
    for name, ex in sets.items():
        pred = [top_intent(r)[0] for r in raw[pos:pos + len(ex)]]
        pos += len(ex)
        out[name] = round(accuracy(list(ex.intents), pred), 6) if len(ex) else None
    return out


def run_diet(ds, args, work: Path, half_a, a_hold, b_train, sets) -> dict:
    """DIET (default pipeline) trained on half A less A held-out, then `--finetune` on B.

    Returns the record continual.py saves under "diet": epochs, training times and the
    accuracies on `sets` before and after the update; continual.py adds the forgetting."""
    wdir = work / "diet"
    wdir.mkdir(parents=True, exist_ok=True)
    env = monitor.child_env(wdir)
    cfg, _ = build_config("diet", bool(args.quick), {}, {"epochs": args.diet_epochs} if args.diet_epochs else {}, {})
    config = wdir / "config.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    held = set(zip(a_hold.texts, a_hold.intents))
    a_rows = [r for r in to_rows(half_a) if (r.text, r.intent) not in held]
    nlu_a = write_nlu_yaml(a_rows, wdir / "half_a.yml")
    nlu_b = write_nlu_yaml(to_rows(b_train), wdir / "b_train.yml")
    texts = [t for ex in sets.values() for t in ex.texts]
    texts_path = wdir / "eval_texts.json"
    texts_path.write_text(json.dumps({"texts": texts, "warmup": texts[:_rasa_eval.WARMUP_MESSAGES]}), encoding="utf-8")

    # Each finished training is recorded with a key of everything it used, so a rerun (another
    # sitting, or the other --protocol: same half A) skips it and only evaluates again where the
    # evaluation sets changed. DIET's half-A training alone takes over an hour on 2 cores.
    state_path = wdir / "steps.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}

    def train(name, nlu, extra, depends=""):
        archive = wdir / "models" / f"{name}.tar.gz"
        key = hashlib.sha256("\0".join([config.read_text(encoding="utf-8"), Path(nlu).read_text(encoding="utf-8"),
                                         json.dumps(extra), depends]).encode()).hexdigest()
        eval_key = hashlib.sha256((key + texts_path.read_text(encoding="utf-8")).encode()).hexdigest()
        done = state.get(name)
        if done and done.get("key") == key and archive.is_file():
            say("continual", f"DIET {name}: trained in an earlier run, reused ({archive})")
            wall = done["wall_s"]
            if done.get("eval_key") == eval_key:
                return archive, wall, done["accuracy"], key
        else:
            cmd = [sys.executable, "-m", "rasa", "train", "nlu", "--config", str(config), "--nlu", str(nlu),
                   "--out", str(archive.parent), "--fixed-model-name", archive.name] + extra
            say("continual", f"DIET {name}: rasa train nlu {' '.join(extra)} ...")
            r = monitor.run_monitored(cmd, wdir / f"{name}.train.log", env, wdir)
            if r["rc"] != 0 or not archive.is_file():
                raise CompareError(f"DIET {name}: rasa train nlu failed (rc={r['rc']}); "
                                   f"log: {wdir / (name + '.train.log')}")
            wall = r["wall_s"]
            state[name] = {"key": key, "wall_s": wall}
            state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")
        raw = wdir / f"{name}.eval.json"
        ev = monitor.run_monitored(_rasa_eval.command(archive, texts_path, raw), wdir / f"{name}.eval.log", env, wdir)
        if ev["rc"] != 0:
            raise CompareError(f"DIET {name}: evaluation failed; log: {wdir / (name + '.eval.log')}")
        accuracy = _diet_accuracy(raw, sets)
        state[name].update(eval_key=eval_key, accuracy=accuracy)
        state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")
        return archive, wall, accuracy, key

    archive_a, wall_a, before, key_a = train("half_a", nlu_a, [])
    _, wall_b, after, _ = train("finetune_b", nlu_b, ["--finetune", str(archive_a), "--epoch-fraction",
                                                      str(args.finetune_epoch_fraction)], depends=key_a)
    rec = {"epochs": cfg["pipeline"][[c["name"] for c in cfg["pipeline"]].index(DIET)]["epochs"],
           "epoch_fraction": args.finetune_epoch_fraction, "n_half_a_trained": len(a_rows), "train_s": wall_a,
           "finetune_s": wall_b, "before": before, "after": after}
    say("continual", f"DIET: before {before}, after finetune {after}")
    return rec

