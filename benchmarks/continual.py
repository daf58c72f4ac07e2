"""Continual learning experiment (issue #7): does EWC + replay forget less than plain finetuning?

Protocol, on one dataset (default Banking77), seeded:

  1. Split the train split in two halves by example, stratified by intent (same label set in
     both, as Rasa's finetune validator requires). From half B, hold out a stratified 10%
     (30% in the skewed protocol; at most 500; --b-heldout-share) that no model trains on: "B held-out".
  2. Train SLM360 on half A (`Trainer.fit`; it holds out its own stratified
     examples of A, never trained on: "A held-out", the guard set).
  3. Update the half-A model on the rest of half B, for `--finetune-epoch-fraction` of the
     epochs (like `rasa train --finetune --epoch-fraction`), in two ways:
       plain        continue training on B only: no replay, no EWC, no guard;
       ewc_replay   `ContinualLearner.learn` with the model's replay buffer, the EWC
                    penalty (`--ewc-lambda`, several values allowed) and the guard; with
                    `--replay-ratio` (several allowed) each epoch replays a fresh sample of
                    the buffer of that many examples per new one instead of all of it.
  4. Report, before and after each update: accuracy on A held-out (what is forgotten), on B
     held-out (what is learnt) and on the full test split, plus wall time.
  5. The anchor (`--systems diet`): DIET's default pipeline (benchmarks/configs/diet.yml)
     under the same protocol through real Rasa: `rasa train nlu` on half A less A held-out
     (the examples SLM360 trained on), then `rasa train nlu --finetune <half-A model>
     --epoch-fraction F` on B's trained part; every model parsed in a fresh process
     (benchmarks/_rasa_eval.py) on A held-out, B held-out and test. DIET has no replay or
     EWC: its update is plain finetuning.

Forgetting = accuracy on A held-out before the update minus after. Hyperparameters (lambda,
replay ratio) are chosen on the held-out sets, never on test.

`--protocol skewed` changes one thing: the update data. Two halves drawn alike teach the
model nothing that contradicts half A, and a fine-tuned pretrained encoder then does not
forget (measured: plain finetuning *gains* on A held-out). Real updates are lopsided: a bot
gets new examples for a few intents. Skewed keeps every half-B example of a seeded
`--focus-share` of the intents and only `--skew-rest` examples of each other intent (the
label set stays whole, as Rasa's finetune validator requires), so plain finetuning shifts
the model towards the focus intents: the setting where forgetting shows and where EWC and
replay have something to prevent. B held-out is drawn from this skewed B.

Writes benchmarks/results/continual_<dataset>.json and .md. Resumable: the half-A model is
saved under --work-dir and reused when its recipe (data hash, seed, epochs) matches.

One seed moves the held-out accuracies by single examples, as large as the effects measured.
Runs with other --seed values are kept beside the default one (continual_<dataset>_seed<N>),
and from two seeds on, continual_<dataset>_across_seeds.md pools them: per-seed figures, means,
and the target checked on the means.

Examples (from the repository root):
  python -m benchmarks.continual --systems slm360,diet     # plain vs EWC + replay vs DIET
  python -m benchmarks.continual --protocol skewed         # the same with an update focused on a few intents
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import BENCH_DIR, ROOT, CompareError, monitor, say
from benchmarks.continual_diet import run_diet
from benchmarks.continual_report import (DEFAULT_LAMBDAS, DEFAULT_SEED, markdown, ratio_text, result_stem,
                                         seed_summary, select_lambda)
from benchmarks.datasets import DEFAULT_DATA_DIR, load_dataset, quick_subsample
from benchmarks.machine import machine_description

DEFAULT_WORK = ROOT / "runs" / "continual"
RESULTS = BENCH_DIR / "results"


def _examples(rows):
    from slm360_rasa.model.examples import Examples

    return Examples.build([r.text for r in rows], [r.intent for r in rows],
                          [[{"start": s, "end": e, "entity": lab} for s, e, lab in r.entities] for r in rows])


def split_halves(train, seed: int):
    """(half A, half B) of `train` (a list of benchmarks.datasets.Example), stratified by intent."""
    from slm360_rasa.train.data import stratified_sample

    a = set(stratified_sample([r.intent for r in train], len(train) // 2, [seed, 7]).tolist())
    half_a = [r for i, r in enumerate(train) if i in a]
    half_b = [r for i, r in enumerate(train) if i not in a]
    labels = {r.intent for r in train}
    missing = sorted((labels - {r.intent for r in half_a}) | (labels - {r.intent for r in half_b}))
    if missing:
        raise CompareError(f"intents {missing[:5]} have too few examples to appear in both halves")
    return half_a, half_b


def skew_update(half_b, seed: int, focus_share: float, rest: int):
    """(skewed half B, focus intents): every example of a seeded `focus_share` of the intents,
    the first `rest` examples (in file order) of each other intent."""
    import numpy as np

    intents = sorted({r.intent for r in half_b})
    n_focus = max(1, round(focus_share * len(intents)))
    rng = np.random.default_rng([seed, 13])
    focus = sorted(rng.choice(intents, size=n_focus, replace=False).tolist())
    focus_set, kept, out = set(focus), {}, []
    for r in half_b:
        if r.intent in focus_set or kept.get(r.intent, 0) < rest:
            out.append(r)
            kept[r.intent] = kept.get(r.intent, 0) + 1
    return out, focus


def evaluate(model, sets: Dict[str, object]) -> Dict[str, Optional[float]]:
    """Top-1 intent accuracy of `model` (served weights) on each named example set (None for an empty set)."""
    from slm360_rasa.train.continual import intent_accuracy

    return {name: round(intent_accuracy(model, ex), 6) if len(ex) else None for name, ex in sets.items()}


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(a - b, 6)


def _recipe_hash(ds, args) -> str:
    h = hashlib.sha256(json.dumps({"data": ds.sha256, "seed": args.seed, "epochs": args.epochs,
                                   "checkpoint": args.checkpoint}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def run(args) -> dict:
    """The whole experiment; returns the result dict (also written to disk)."""
    from slm360_rasa.config import FinetuneConfig
    from slm360_rasa.model import IntentEntityModel
    from slm360_rasa.model.examples import Examples
    from slm360_rasa.train.continual import ContinualLearner, remember
    from slm360_rasa.train.data import holdout_split
    from slm360_rasa.train.trainer import Trainer, start_model

    ds = load_dataset(args.data_dir, args.dataset)
    if args.quick:
        ds = quick_subsample(ds, n_intents=4, per_intent=24, n_test=24)
    half_a, half_b = split_halves(ds.train, args.seed)
    focus = None
    if args.protocol == "skewed":
        half_b, focus = skew_update(half_b, args.seed, args.focus_share, args.skew_rest)
        _say(f"skewed update: {len(half_b)} half-B examples, all of {len(focus)} focus intents, "
             f"at most {args.skew_rest} of each other intent")
    b_all = _examples(half_b)
    b_train, b_hold = holdout_split(b_all, args.b_heldout_share, 500, [args.seed, 11])
    test = _examples(ds.test)
    work = Path(args.work_dir) / f"{ds.name}{'-quick' if args.quick else ''}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = FinetuneConfig(epochs=args.epochs, random_seed=args.seed)
    path_a = work / f"half_a_{_recipe_hash(ds, args)}.safetensors"
    t0 = time.time()
    if path_a.is_file():
        _say(f"half-A model exists, reused: {path_a}")
        model_a = IntentEntityModel.load(path_a, training=True)
        time_a = json.loads(path_a.with_suffix(".json").read_text())["train_s"]
    else:
        _say(f"training on half A ({len(half_a)} examples, {args.epochs} epochs) ...")
        a = _examples(half_a)
        model_a, params = start_model(cfg, checkpoint=args.checkpoint)
        trainer = Trainer(model_a, cfg, params)
        trainer.fit(a.texts, a.intents, a.entities, progress=not args.no_progress)
        remember(trainer)
        time_a = round(time.time() - t0, 1)
        model_a.save(path_a)
        path_a.with_suffix(".json").write_text(json.dumps({"train_s": time_a}))
    a_hold = model_a.training.holdout
    sets = {"a_heldout": a_hold, "b_heldout": b_hold, "test": test}
    before = evaluate(model_a, sets)
    _say(f"half-A model: {before}")
    # The anchor first: its two `rasa train nlu` runs take hours and are saved as they finish,
    # while the SLM360 updates below take minutes and are recomputed bit-identically on a rerun.
    diet = run_diet(ds, args, work, _examples(half_a), a_hold, b_train, sets) if "diet" in args.systems else None
    if diet is not None:
        diet.update(forgetting_a=_diff(diet["before"]["a_heldout"], diet["after"]["a_heldout"]),
                    gain_b=_diff(diet["after"]["b_heldout"], diet["before"]["b_heldout"]))
    epochs_b = max(1, round(args.epochs * args.finetune_epoch_fraction))
    variants: List[dict] = []
    plans = [("plain", None, None)] + [("ewc_replay", lam, ratio) for ratio in args.replay_ratio
                                        for lam in args.ewc_lambda]
    for name, lam, ratio in plans:
        t1 = time.time()
        if name == "plain":
            prev = model_a.copy()
            prev.training.replay = Examples()  # nothing replayed
            learner = ContinualLearner(prev, epochs=epochs_b, ewc_lambda=0.0, max_forgetting=None,
                                       holdout_fraction=0.0)
        else:
            learner = ContinualLearner(model_a.copy(), epochs=epochs_b, ewc_lambda=float(lam),
                                       replay_ratio=ratio, holdout_fraction=0.0)
        tag = "" if lam is None else f" (lambda {lam:g}, replay ratio {ratio_text(ratio)})"
        _say(f"{name}{tag}: updating on {len(b_train)} examples of half B "
             f"for {epochs_b} epochs ...")
        report = learner.learn(b_train.texts, b_train.intents, b_train.entities, progress=not args.no_progress)
        seconds = round(time.time() - t1, 1)
        # A refused update keeps the half-A weights; measure what the update would have given too.
        after = evaluate(learner.model, sets)
        rec = {"variant": name, "ewc_lambda": lam, "replay_ratio": ratio, "epochs": epochs_b, "seconds": seconds,
               "n_replay": report.n_replay, "replay_per_epoch": report.replay_per_epoch,
               "accepted": report.accepted, "guard": report.to_dict(),
               "after": after,
               "forgetting_a": _diff(before["a_heldout"], after["a_heldout"]),
               "gain_b": _diff(after["b_heldout"], before["b_heldout"])}
        variants.append(rec)
        _say(f"{name}: {after}, forgetting on A {rec['forgetting_a']}, accepted={report.accepted}")
    result = {
        "schema": "slm360-continual/1", "dataset": ds.name, "quick": bool(args.quick), "seed": args.seed,
        "protocol": args.protocol, "b_heldout_share": args.b_heldout_share,
        "skew": None if focus is None else {"focus_share": args.focus_share, "rest": args.skew_rest,
                                            "focus_intents": focus},
        "machine": machine_description(),
        "split": {"half_a": len(half_a), "half_b": len(half_b), "b_train": len(b_train), "b_heldout": len(b_hold),
                  "a_heldout": len(a_hold), "test": len(test)},
        "half_a_model": {"epochs": args.epochs, "train_s": time_a, "accuracy": before},
        "variants": variants,
        "selection": select_lambda(variants),
        "diet": diet,
    }
    out = Path(args.out_dir) / result_stem(ds.name, args.protocol, args.seed, bool(args.quick))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    _say(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    summary = seed_summary(Path(args.out_dir), ds.name, args.protocol, bool(args.quick))
    if summary is not None:
        _say(f"across {len(summary['seeds'])} seeds: {summary['files']['md']}")
    return result


def _say(msg: str) -> None:
    say("continual", msg)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (see --help)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of dataset folders")
    ap.add_argument("--dataset", default="banking77", help="dataset folder name (default banking77)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the half-A model (default 10)")
    ap.add_argument("--finetune-epoch-fraction", type=float, default=0.5,
                    help="update epochs = round(epochs x this), like rasa's --epoch-fraction (default 0.5)")
    ap.add_argument("--ewc-lambda", type=float, action="append", default=None,
                    help="EWC strength of the ewc_replay update (repeatable: one update per value; default "
                         f"the sweep {' '.join(format(x, 'g') for x in DEFAULT_LAMBDAS)}, where 0 is replay alone: "
                         "with the Fisher normalised to mean 1 over 4.3M weights, lambda >= 0.01 froze the "
                         "update entirely on Banking77 and 0.001 already held back most of it)")
    ap.add_argument("--replay-ratio", action="append", default=None,
                    help="replayed examples per new example and epoch of the ewc_replay update, a fresh "
                         "sample of the buffer each epoch, or 'all' for the whole buffer every epoch "
                         "(repeatable: every lambda runs with every ratio; default all)")
    ap.add_argument("--b-heldout-share", type=float, default=None,
                    help="share of half B held out to measure what the update teaches (at most 500 examples; "
                         "default 0.1, or 0.3 with --protocol skewed, whose half B is small)")
    ap.add_argument("--protocol", choices=("iid", "skewed"), default="iid",
                    help="iid: half B drawn like half A (the issue's protocol, default); skewed: half B "
                         "concentrated on a few intents (see above)")
    ap.add_argument("--focus-share", type=float, default=0.2,
                    help="skewed: share of the intents whose half-B examples are all kept (default 0.2)")
    ap.add_argument("--skew-rest", type=int, default=2,
                    help="skewed: examples kept of every other intent (default 2; >= 1 keeps the label set)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"split and training seed (default {DEFAULT_SEED}); results of another seed go to "
                         "continual_<dataset>[_skewed]_seed<N>.json, and once two or more seeds are there a "
                         "pooled report, continual_<dataset>[_skewed]_across_seeds.md, is written too")
    ap.add_argument("--checkpoint", default=None, help="pretrained encoder (default: the shipped one)")
    ap.add_argument("--quick", action="store_true", help="tiny subsample, for the test suite")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="where the half-A model is kept")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--systems", default="slm360",
                    help="slm360 (always run: it defines the held-out sets) and optionally diet, the anchor: "
                         "--systems slm360,diet (DIET trains for an hour or more on 2 cores)")
    ap.add_argument("--diet-epochs", type=int, default=None,
                    help="override DIETClassifier epochs (smoke tests only; the protocol uses the default 100)")
    return ap


def main(argv=None) -> int:
    """Command line entry point."""
    args = build_parser().parse_args(argv)
    args.ewc_lambda = args.ewc_lambda or list(DEFAULT_LAMBDAS)
    try:
        args.replay_ratio = [None if str(x).lower() == "all" else float(x) for x in (args.replay_ratio or ["all"])]
    except ValueError:
        raise SystemExit(f"error: --replay-ratio takes a number > 0 or 'all', got {args.replay_ratio}") from None
    if any(x is not None and not 0 < x < float("inf") for x in args.replay_ratio):
        raise SystemExit(f"error: --replay-ratio must be > 0 and finite, got {args.replay_ratio}")
    if args.b_heldout_share is None:
        args.b_heldout_share = 0.3 if args.protocol == "skewed" else 0.1
    if not 0 < args.b_heldout_share < 1:
        raise SystemExit("error: --b-heldout-share must be in (0, 1)")
    if not 0 < args.focus_share < 1 or args.skew_rest < 1:
        raise SystemExit("error: --focus-share must be in (0, 1) and --skew-rest >= 1 (every intent keeps an example)")
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if set(args.systems) - {"slm360", "diet"}:
        raise SystemExit(f"error: --systems: unknown {sorted(set(args.systems) - {'slm360', 'diet'})}; "
                         "choose from slm360, diet")
    if args.epochs < 1 or not 0 < args.finetune_epoch_fraction <= 10:
        raise SystemExit("error: --epochs must be >= 1 and --finetune-epoch-fraction in (0, 10]")
    if any(lam < 0 for lam in args.ewc_lambda):
        raise SystemExit("error: --ewc-lambda must be >= 0")
    os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")
    # As compare.py: `kill` ends the DIET training this started (in its own session) too.
    previous = signal.signal(signal.SIGTERM, monitor.exit_on_sigterm)
    try:
        run(args)
    except CompareError as e:
        raise SystemExit(f"error: {e}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
