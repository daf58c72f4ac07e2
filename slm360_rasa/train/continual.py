"""Continual learning: Fisher diagonal, EWC penalty, replay buffer and the validation guard.

A trained `IntentEntityModel` carries what a later update needs (all saved in its
safetensors file, no pickle):

* a held-out set (examples never trained on; the guard set),
* a replay buffer (a stratified, seeded sample of its training examples),
* the diagonal of the empirical Fisher information at its final weights, over the replay
  buffer: F_i = mean over examples of (d loss_example / d theta_i)^2, for the trainable
  encoder tensors and the heads.

`ContinualLearner.learn(texts, intents, entities)` then trains a copy of the model on the
new examples plus the replay buffer, with the EWC penalty

    ewc_lambda / 2 * sum_i F_i * (theta_i - theta_old_i)^2

added to the loss, and keeps the result only if accuracy on the old held-out examples
fell by at most `max_forgetting` (the validation guard); otherwise the previous model
stays, unchanged. The Rasa component's `rasa train --finetune` runs this same class.

On the scale of ewc_lambda: updates use the Fisher normalised to mean 1 (`EWCPenalty`),
summed over every trainable value (4.3M for the shipped encoder), against a loss that is
a mean over the batch, so useful values are small. Measured on Banking77's skewed update
(benchmarks/continual.py --protocol skewed, 779 new examples, 5 epochs, replay 1,000):
lambda 1e-5..3e-4 learnt as much as replay alone on B held-out while forgetting 1.0 ->
0.2 points on A held-out; 1e-3 cost 2.7 points of learning in one of two runs; 0.1 and
above left the model where it was. The default, 3e-4, is the largest value that cost
nothing beyond replay.

`replay_ratio` replays a fresh sample of the buffer each epoch, that many per new example,
instead of the whole buffer. Same experiment: ratio 0.5 (390 of 1,000 per epoch) took 63-74 s
against 68-111 s for the whole buffer, with B held-out accuracy and A held-out forgetting
within two examples of it (334 and 500 examples); plain finetuning still learnt 2-3 points
more on B. So the default replays the whole buffer; the ratio is for updates whose time matters.

The Fisher diagonal is stored as 4-bit logarithmic codes (model/fisher.py documents the
format).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..config import FinetuneConfig
from ..model.examples import Examples
from ..model.fisher import encode_fisher
from ..model.intent_entity import IntentEntityModel
from .data import holdout_split, stratified_sample
from .trainer import Replay, Trainer

logger = logging.getLogger(__name__)

Arrays = Dict[str, np.ndarray]


# ------------------------------------------------------------------ Fisher


def empirical_fisher(trainer: Trainer, examples: Examples) -> Arrays:
    """Diagonal empirical Fisher of the training loss at `trainer`'s current float weights:
    mean over `examples` of the squared per-example gradient, for every tensor that
    fine-tuning updates (trainable encoder tensors and the heads). Summed in float32 in a
    fixed order (deterministic; the rounding, ~1e-4 relative over 1,000 terms, is far below
    the 4-bit storage's)."""
    if len(examples) == 0:
        raise ValueError("empirical_fisher needs at least one example")
    acc: Dict[str, np.ndarray] = {}
    for grads in trainer.example_gradients(examples):
        for k, g in grads.items():
            if k in acc:
                acc[k] += np.square(g, dtype=np.float32)
            else:
                acc[k] = np.square(g, dtype=np.float32)
    return {k: v / np.float32(len(examples)) for k, v in sorted(acc.items())}


def remember(trainer: Trainer) -> None:
    """After `trainer.fit`: keep what a later update needs in the model's training state, a
    replay buffer (a stratified, seeded sample of everything just trained on) and the Fisher
    diagonal over a subset of it (skipped when ewc_lambda is 0)."""
    cfg, model = trainer.cfg, trainer.model
    state, train = model.training, trainer.trained_on
    # Stratify by intent so a replayed update still sees every intent; entity-only
    # models have no intent labels, and the sample is then a plain seeded draw.
    has_intents = "head.intent.weight" in model.heads
    idx = stratified_sample(train.intents if has_intents else [""] * len(train), cfg.replay_size,
                            [cfg.random_seed, 2])
    state.replay = train.subset(idx)
    state.fisher_names, state.fisher_tensors = [], {}
    if cfg.ewc_lambda > 0 and len(state.replay):
        t0 = time.time()
        sub = state.replay.subset(stratified_sample(state.replay.intents, cfg.fisher_examples, [cfg.random_seed, 3]))
        fisher = empirical_fisher(trainer, sub)
        state.fisher_names = sorted(fisher)
        state.fisher_tensors = encode_fisher(fisher)
        logger.info("SLM360: Fisher diagonal over %d replay examples in %.1f s", len(sub), time.time() - t0)


# ------------------------------------------------------------------ EWC


class EWCPenalty:
    """ewc_lambda / 2 * sum F * (theta - theta_old)^2 over the tensors that have a Fisher.

    With `normalize` (the default, what continual updates use) F is divided by its mean over
    all values first, so F has mean 1. Why: the empirical Fisher's absolute scale says how
    well the model fits its training data, not how important a weight is: a model that fits
    its examples almost perfectly has per-example gradients near zero (Fisher ~1e-8 on a
    small bot), and a fixed lambda would then mean nothing. Normalised, lambda is the
    penalty's weight on an average weight, comparable across bots and datasets.

    Call it with the current parameters; it returns (penalty, gradients), the form
    `Trainer(penalty=...)` adds to its loss.
    """

    def __init__(self, fisher: Arrays, anchor: Arrays, ewc_lambda: float, normalize: bool = True):
        """`anchor`: the previous model's weights (copied); `fisher`: same names and shapes."""
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda!r}")
        missing = sorted(set(fisher) - set(anchor))
        if missing:
            raise ValueError(f"EWC anchor lacks tensors that have a Fisher: {missing}")
        for k in fisher:
            if fisher[k].shape != anchor[k].shape:
                raise ValueError(f"EWC: Fisher of {k!r} has shape {fisher[k].shape}, weights {anchor[k].shape}")
        self.fisher = dict(fisher)
        if normalize:
            total = sum(float(np.sum(f, dtype=np.float64)) for f in fisher.values())
            count = sum(f.size for f in fisher.values())
            mean = total / count if count else 0.0
            if mean > 0:
                self.fisher = {k: (f / np.float32(mean)).astype(np.float32) for k, f in fisher.items()}
        self.anchor = {k: np.array(anchor[k], copy=True) for k in fisher}
        self.ewc_lambda = float(ewc_lambda)

    def __call__(self, params: Arrays) -> Tuple[float, Arrays]:
        """(penalty value, d penalty / d params) for the tensors of `params` that have a Fisher."""
        loss = 0.0
        grads: Arrays = {}
        for k, f in self.fisher.items():
            if k not in params:
                continue
            d = params[k] - self.anchor[k]
            fd = f * d
            loss += 0.5 * self.ewc_lambda * float(np.dot(fd.ravel().astype(np.float64), d.ravel().astype(np.float64)))
            grads[k] = (self.ewc_lambda * fd).astype(params[k].dtype)
        return loss, grads


# ------------------------------------------------------------------ guard


def intent_accuracy(model: IntentEntityModel, examples: Examples) -> float:
    """Share of `examples` whose top predicted intent (the served, INT4 by default, model) is the
    labelled one; a text the model cannot read counts as wrong."""
    if len(examples) == 0:
        raise ValueError("no examples to measure accuracy on")
    preds = model.predict(examples.texts)
    ok = [p.intent_probs is not None and model.intents[int(np.argmax(p.intent_probs))] == y
          for p, y in zip(preds, examples.intents)]
    return float(np.mean(ok))


@dataclass
class LearnReport:
    """What one `ContinualLearner.learn` call did (stored in the model's metadata, less `seconds`)."""

    accepted: bool
    guard: str  # "holdout" (old held-out examples), "replay" (no held-out set: old training sample) or "none"
    n_guard: int
    accuracy_before: Optional[float]  # previous model on the guard set
    accuracy_after: Optional[float]  # updated model on the guard set
    drop: Optional[float]  # accuracy_before - accuracy_after
    max_forgetting: Optional[float]  # the threshold in force (None: guard off)
    n_new_train: int
    n_new_holdout: int
    n_replay: int  # the replay buffer's examples that took part (old examples sent again are not replayed)
    replay_per_epoch: int  # of those, replayed in each epoch (all of them unless replay_ratio is set)
    epochs: int
    seconds: float

    def summary(self) -> str:
        """One line for logs: the decision and the numbers behind it."""
        verdict = "accepted" if self.accepted else "REFUSED"
        if self.guard == "none":
            guard = "no old examples to check forgetting on"
        else:
            mf = "off" if self.max_forgetting is None else f"{100 * self.max_forgetting:.1f} points"
            guard = (f"accuracy on {self.n_guard} old {self.guard} examples {100 * self.accuracy_before:.1f}% -> "
                     f"{100 * self.accuracy_after:.1f}% (drop {100 * self.drop:.1f} points, max_forgetting {mf})")
        return (f"continual update {verdict}: {guard}; trained {self.epochs} epochs on {self.n_new_train} new + "
                f"{self.replay_per_epoch} replayed examples (of {self.n_replay}) per epoch in {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        """JSON-ready dict (all fields)."""
        return asdict(self)

    def to_metadata(self) -> dict:
        """What the model's metadata keeps: all but `seconds`, so that the same update of the
        same model gives a byte-identical file."""
        d = self.to_dict()
        d.pop("seconds")
        return d


class ContinualLearner:
    """Update a trained model with new examples without forgetting the old ones.

        learner = ContinualLearner.load("model.safetensors", epochs=3)
        report = learner.learn(texts, intents, entities)
        print(report.summary())
        learner.save("model.safetensors")   # the updated model, or the unchanged one if refused
    """

    def __init__(self, model: IntentEntityModel, cfg: Optional[FinetuneConfig] = None, **overrides):
        """`cfg` (default: the model's own) with `overrides` (FinetuneConfig fields, e.g.
        epochs=3, max_forgetting=None) sets how updates train and how strict the guard is."""
        self.model = model
        if model.training is None:
            raise ValueError("continual learning needs the model's training state: load it with "
                             "IntentEntityModel.load(path, training=True) or ContinualLearner.load(path)")
        cfg = cfg if cfg is not None else model.training.finetune
        self.cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def load(cls, path, **overrides) -> "ContinualLearner":
        """A learner for the model saved at `path` (see IntentEntityModel.save)."""
        return cls(IntentEntityModel.load(Path(path), training=True), **overrides)

    def save(self, path) -> Path:
        """Save the current model (updated, or the previous one after a refused update)."""
        return self.model.save(Path(path))

    def learn(self, texts: Sequence[str], intents: Sequence[str],
              entities: Optional[Sequence[Sequence[dict]]] = None, progress: bool = False) -> LearnReport:
        """Train on new examples (+ replay, + EWC) and keep the result only if the guard passes.

        Raises ValueError for an intent or entity type the model does not know (a head
        cannot grow an output; retrain from scratch to add labels).
        """
        t0 = time.time()
        prev, cfg = self.model, self.cfg
        old = prev.training
        new = self._validated(texts, intents, entities)
        round_ = len(old.continual)
        # Old held-out examples that come again (Rasa's --finetune passes the whole data set)
        # stay held out: training on them would blind the guard that measures on them.
        old_hold = set(zip(old.holdout.texts, old.holdout.intents))
        new = new.subset([i for i, k in enumerate(zip(new.texts, new.intents)) if k not in old_hold])
        new_train, new_hold = holdout_split(new, cfg.holdout_fraction, cfg.holdout_max, [cfg.random_seed, round_ + 1])
        # An old example that comes again (Rasa's --finetune passes the whole data set) is
        # trained on once, not twice.
        seen = set(zip(new_train.texts, new_train.intents))
        replay = old.replay.subset([i for i, k in enumerate(zip(old.replay.texts, old.replay.intents))
                                     if k not in seen])
        per_epoch = len(replay)  # with nothing new left to train on, the whole buffer is the update
        if cfg.replay_ratio is not None and len(new_train):
            per_epoch = min(len(replay), math.ceil(cfg.replay_ratio * len(new_train)))
        if len(old.holdout):
            guard_set, guard = old.holdout, "holdout"
        elif len(old.replay):
            guard_set, guard = old.replay, "replay"
        else:
            guard_set, guard = Examples(), "none"
        holdout = old.holdout + new_hold
        if len(holdout) > cfg.holdout_max:
            holdout = holdout.subset(stratified_sample(holdout.intents, cfg.holdout_max, [cfg.random_seed, round_ + 1]))

        penalty = None
        if cfg.ewc_lambda > 0 and old.fisher_names:
            fisher = prev.fisher()
            current = {**old.params, **prev.heads}
            penalty = EWCPenalty(fisher, {k: current[k] for k in fisher}, cfg.ewc_lambda)
        candidate = prev.copy()
        trainer = Trainer(candidate, cfg, penalty=penalty)
        trainer.fit(new_train.texts, new_train.intents, new_train.entities, progress=progress, holdout=holdout,
                    replay=Replay(replay, per_epoch))
        remember(trainer)

        before = after = drop = None
        accepted = True
        if guard != "none":
            before = intent_accuracy(prev, guard_set)
            after = intent_accuracy(candidate, guard_set)
            drop = before - after
            # The epsilon absorbs float error in before - after (e.g. 0.9 - 0.88 = 0.0200000000000000178).
            accepted = cfg.max_forgetting is None or drop <= cfg.max_forgetting + 1e-9
        report = LearnReport(accepted=accepted, guard=guard, n_guard=len(guard_set), accuracy_before=before,
                             accuracy_after=after, drop=drop, max_forgetting=cfg.max_forgetting,
                             n_new_train=len(new_train), n_new_holdout=len(new_hold), n_replay=len(replay),
                             replay_per_epoch=per_epoch,
                             epochs=cfg.epochs, seconds=round(time.time() - t0, 3))
        if accepted:
            candidate.training.continual = list(old.continual) + [report.to_metadata()]
            self.model = candidate
            logger.info("SLM360 %s", report.summary())
        else:
            old.continual.append(report.to_metadata())  # the weights stay exactly as they were
            logger.warning("SLM360 %s", report.summary())
        return report

    def _validated(self, texts, intents, entities) -> Examples:
        prev = self.model
        if len(texts) == 0:
            raise ValueError("no examples to learn from")
        if len(intents) != len(texts) or (entities is not None and len(entities) != len(texts)):
            raise ValueError(f"texts ({len(texts)}), intents ({len(intents)}) and entities "
                             f"({'-' if entities is None else len(entities)}) must have the same length")
        if not prev.intents:
            raise ValueError("the model has no intent head; continual learning needs a model trained with intents")
        unknown = sorted(set(intents) - set(prev.intents))
        if unknown:
            raise ValueError(f"unknown intent(s) {unknown}: the model knows {prev.intents}. Continual learning "
                             "cannot add intents; retrain from scratch to add them")
        types = {e["entity"] for ents in (entities or []) for e in ents}
        unknown_e = sorted(types - set(prev.entity_types))
        if unknown_e:
            raise ValueError(f"unknown entity type(s) {unknown_e}: the model knows {prev.entity_types}. "
                             "Continual learning cannot add entity types; retrain from scratch to add them")
        return Examples.build(texts, intents, entities)
