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

Fisher storage ("log2-q4-g32"), in the manner of nano/quant.py's block_q4
------------------------------------------------------------------------
A Fisher value is a non-negative importance that spans many orders of magnitude and is
itself a noisy estimate, so it is stored as a 4-bit *logarithmic* code relative to the
largest value of its group. A tensor is flattened (row-major) and cut into groups of
FISHER_GROUP = 32 consecutive values (the last group may be shorter):

    fisher.<name>.top    float16 (ceil(n / 32),)  log2 of the group's largest value
                                                   (0.0 for a group of zeros)
    fisher.<name>.codes  uint8   (ceil(n / 2),)    4-bit codes, element 2j in the low
                                                   nibble of byte j, element 2j+1 in the high
                                                   nibble (an odd tail is padded with ZERO)

    value = 2 ** (top - code)   for code in 0..14   (code = round(top - log2 value))
    value = 0                   for code 15 (FISHER_ZERO_CODE): the value is below
                                2 ** (top - 14.5), i.e. < 1/23,000 of the group's largest

So a stored value is within a factor 2 ** 0.5 (plus f16 rounding of `top`, < 2 ** 0.03)
of the estimate; 4.5 bits per value, the bit budget of the INT4 weights. For the shipped
6.4M-parameter encoder with the embedding frozen (the default) the Fisher covers 4,325,632
encoder values, 2,433,168 bytes (`fisher_bytes`), plus 0.56 bytes per head value (11 KB
for a 77-intent head): the saved model grows by about 2.4 MB.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np

from .data import Examples, holdout_split, stratified_sample

if TYPE_CHECKING:  # finetune imports this module; the runtime import happens inside the functions
    from .finetune import FinetuneConfig, IntentEntityModel

logger = logging.getLogger("slm360_rasa")

FISHER_FORMAT = "log2-q4-g32"
FISHER_PREFIX = "fisher."
FISHER_GROUP = 32  # values per group sharing one f16 `top`
FISHER_ZERO_CODE = 15  # the 4-bit code that means "zero"
FISHER_OCTAVES = FISHER_ZERO_CODE  # codes 0..14: 0 to 14 octaves below the group's top

Arrays = Dict[str, np.ndarray]


# ------------------------------------------------------------------ Fisher storage


def encode_fisher(fisher: Arrays) -> Arrays:
    """Tensors `fisher.<name>.top` / `fisher.<name>.codes` for each non-negative array (layout above)."""
    out: Arrays = {}
    for name, f in fisher.items():
        v = np.asarray(f, np.float64).ravel()
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"Fisher values of {name!r} must be finite and >= 0")
        n = v.size
        n_groups = -(-n // FISHER_GROUP)
        padded = np.zeros(n_groups * FISHER_GROUP)
        padded[:n] = v
        groups = padded.reshape(n_groups, FISHER_GROUP)
        gmax = groups.max(axis=1)
        with np.errstate(divide="ignore"):
            top = np.where(gmax > 0, np.log2(np.where(gmax > 0, gmax, 1.0)), 0.0).astype(np.float16)
            logv = np.log2(np.where(groups > 0, groups, 1.0))
        # Codes are relative to the *stored* (f16-rounded) top, so decoding sees the same reference.
        rel = top.astype(np.float64)[:, None] - logv
        codes = np.clip(np.rint(rel), 0, FISHER_OCTAVES - 1).astype(np.uint8)
        codes[(groups <= 0) | (rel > FISHER_OCTAVES - 0.5)] = FISHER_ZERO_CODE
        flat = codes.ravel()[:n]
        if n % 2:
            flat = np.concatenate([flat, np.array([FISHER_ZERO_CODE], np.uint8)])
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        out[f"{FISHER_PREFIX}{name}.top"] = top
        out[f"{FISHER_PREFIX}{name}.codes"] = packed
    return out


def _fisher_pair(tensors: Arrays, name: str, shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """The (top, codes) tensors of `name`, checked against `shape`; errors name the tensor."""
    try:
        top, packed = tensors[f"{FISHER_PREFIX}{name}.top"], tensors[f"{FISHER_PREFIX}{name}.codes"]
    except KeyError as e:
        raise ValueError(f"Fisher tensor of {name!r} is missing {e.args[0]!r}") from None
    n = int(np.prod(shape))
    n_groups = -(-n // FISHER_GROUP)
    if top.dtype != np.float16 or packed.dtype != np.uint8 or top.shape != (n_groups,) \
            or packed.shape != (-(-n // 2),):
        raise ValueError(f"Fisher tensors of {name!r} have {top.dtype}{top.shape} / {packed.dtype}{packed.shape}; "
                         f"for shape {tuple(shape)} expected float16({n_groups},) / uint8({-(-n // 2)},)")
    return top, packed


def check_fisher(tensors: Arrays, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Raise ValueError, naming the tensor, unless `tensors` hold a valid Fisher for `shapes`
    (what `decode_fisher` checks, without decoding: loading a model for serving never needs
    the values)."""
    for name, shape in shapes.items():
        _fisher_pair(tensors, name, shape)


def decode_fisher(tensors: Arrays, shapes: Dict[str, Tuple[int, ...]]) -> Arrays:
    """Float32 Fisher arrays of the given shapes from `encode_fisher`'s tensors; errors name the tensor."""
    out: Arrays = {}
    for name, shape in shapes.items():
        top, packed = _fisher_pair(tensors, name, shape)
        n = int(np.prod(shape))
        codes = np.empty(packed.size * 2, np.uint8)
        codes[0::2] = packed & 0x0F
        codes[1::2] = packed >> 4
        codes = codes[:n]
        gtop = np.repeat(top.astype(np.float64), FISHER_GROUP)[:n]
        vals = np.where(codes == FISHER_ZERO_CODE, 0.0, np.exp2(gtop - codes))
        out[name] = vals.reshape(shape).astype(np.float32)
    return out


def fisher_bytes(n_values: int) -> int:
    """Bytes `encode_fisher` stores for one tensor of `n_values` values."""
    return 2 * -(-n_values // FISHER_GROUP) + -(-n_values // 2)


def empirical_fisher(model: "IntentEntityModel", examples: Examples) -> Arrays:
    """Diagonal empirical Fisher of `model`'s training loss at its current float weights:
    mean over `examples` of the squared per-example gradient, for every tensor that
    fine-tuning updates (trainable encoder tensors and the heads). Summed in float32 in a
    fixed order (deterministic; the rounding, ~1e-4 relative over 1,000 terms, is far below
    the 4-bit storage's)."""
    if len(examples) == 0:
        raise ValueError("empirical_fisher needs at least one example")
    acc: Dict[str, np.ndarray] = {}
    for grads in model.example_gradients(examples):
        for k, g in grads.items():
            if k in acc:
                acc[k] += np.square(g, dtype=np.float32)
            else:
                acc[k] = np.square(g, dtype=np.float32)
    return {k: v / np.float32(len(examples)) for k, v in sorted(acc.items())}


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
    `IntentEntityModel.fit(penalty=...)` adds to its loss.
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


def intent_accuracy(model: "IntentEntityModel", examples: Examples) -> float:
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

    def __init__(self, model: "IntentEntityModel", cfg: Optional["FinetuneConfig"] = None, **overrides):
        """`cfg` (default: the model's own) with `overrides` (FinetuneConfig fields, e.g.
        epochs=3, max_forgetting=None) sets how updates train and how strict the guard is."""
        self.model = model
        cfg = cfg if cfg is not None else model.cfg
        self.cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def load(cls, path, **overrides) -> "ContinualLearner":
        """A learner for the model saved at `path` (see IntentEntityModel.save)."""
        from .finetune import IntentEntityModel

        return cls(IntentEntityModel.load(Path(path)), **overrides)

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
        new = self._validated(texts, intents, entities)
        round_ = len(prev.continual)
        # Old held-out examples that come again (Rasa's --finetune passes the whole data set)
        # stay held out: training on them would blind the guard that measures on them.
        old_hold = set(zip(prev.holdout.texts, prev.holdout.intents))
        new = new.subset([i for i, k in enumerate(zip(new.texts, new.intents)) if k not in old_hold])
        new_train, new_hold = holdout_split(new, cfg.holdout_fraction, cfg.holdout_max, [cfg.random_seed, round_ + 1])
        # An old example that comes again (Rasa's --finetune passes the whole data set) is
        # trained on once, not twice.
        seen = set(zip(new_train.texts, new_train.intents))
        replay = prev.replay.subset([i for i, k in enumerate(zip(prev.replay.texts, prev.replay.intents))
                                     if k not in seen])
        per_epoch = len(replay)  # with nothing new left to train on, the whole buffer is the update
        if cfg.replay_ratio is not None and len(new_train):
            per_epoch = min(len(replay), math.ceil(cfg.replay_ratio * len(new_train)))
        if len(prev.holdout):
            guard_set, guard = prev.holdout, "holdout"
        elif len(prev.replay):
            guard_set, guard = prev.replay, "replay"
        else:
            guard_set, guard = Examples(), "none"
        holdout = prev.holdout + new_hold
        if len(holdout) > cfg.holdout_max:
            holdout = holdout.subset(stratified_sample(holdout.intents, cfg.holdout_max, [cfg.random_seed, round_ + 1]))

        penalty = None
        if cfg.ewc_lambda > 0 and prev.fisher_names:
            fisher = prev.fisher()
            current = {**prev.params, **prev.heads}
            penalty = EWCPenalty(fisher, {k: current[k] for k in fisher}, cfg.ewc_lambda)
        candidate = prev.clone(cfg)
        candidate.fit(new_train.texts, new_train.intents, new_train.entities, progress=progress, penalty=penalty,
                      holdout=holdout, replay=replay, replay_per_epoch=per_epoch)

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
            candidate.continual = list(prev.continual) + [report.to_metadata()]
            self.model = candidate
            logger.info("SLM360 %s", report.summary())
        else:
            prev.continual.append(report.to_metadata())  # the weights stay exactly as they were
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
