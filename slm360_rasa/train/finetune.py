"""Supervised fine-tuning of SLM360 Nano for intents + entities, and the model it produces.

`IntentEntityModel` holds the encoder's float master weights, an intent head on the pooled
vector and a BILOU entity head on token states. `fit` fine-tunes them with AdamW on
length-bucketed, seeded batches (numpy reference forward/backward); prediction runs the
numba runtime (INT4 by default) and applies the heads in numpy. Nothing here imports Rasa:
the Rasa component (components/classifier.py) and plain scripts share this class.

After training, `fit` holds out a stratified sample of the examples (never trained on),
fits a softmax temperature on them (train/calibration.py) so confidences track accuracy,
and keeps what continual learning needs (train/continual.py): the held-out set, a replay
buffer and the Fisher diagonal.

Persisted as one safetensors file: the encoder's INT4 (or f32) tensors, the heads, the
Fisher codes, and JSON metadata (label maps, configs, temperature, held-out set, replay
buffer). No pickle.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..nano import model as M
from ..nano.checkpoint import load_checkpoint, save_checkpoint
from ..nano.config import NanoConfig
from ..nano.quant import float_params, quantize_params
from . import heads as Hd
from .calibration import (background_softmax, expected_calibration_error, fit_temperature,
                          fit_temperature_with_background, in_scope_probability, nll)
from .continual import (FISHER_FORMAT, FISHER_PREFIX, check_fisher, decode_fisher, empirical_fisher,
                        encode_fisher)
from .data import Examples, epoch_batches, holdout_split, pad, stratified_sample
from .optim import AdamW, OptimConfig

logger = logging.getLogger("slm360_rasa")

MODEL_KIND = "slm360-intent-entity"
MODEL_VERSION = 1
INTENT = "head.intent"
ENTITY = "head.entity"
# Fewer held-out examples than this leave T = 1: with a handful of examples one of them
# moves the NLL optimum a long way, and a wrong T is worse than none.
MIN_CALIBRATION_EXAMPLES = 20
# The out-of-scope logit is used only if it leaves the median held-out example at least
# this much in scope (sigmoid((E - b) / T)); see IntentEntityModel.calibrate.
MIN_IN_SCOPE = 0.95

# A penalty hook for `fit`: params -> (penalty value, gradients of the penalty).
Penalty = Callable[[Dict[str, np.ndarray]], Tuple[float, Dict[str, np.ndarray]]]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of fine-tuning (saved with the model)."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 3e-4  # encoder; heads use learning_rate * head_lr_multiplier
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    freeze_layers: int = 0  # lowest encoder blocks kept frozen
    train_embeddings: bool = False  # the 8,192 x 256 table stays pretrained unless True
    max_length: int = 128  # tokens per training example (prediction uses the encoder's max)
    random_seed: int = 42
    entity_loss_weight: float = 1.0
    label_smoothing: float = 0.0
    intent_classification: bool = True
    entity_recognition: bool = True
    holdout_fraction: float = 0.1  # share of the examples held out (stratified) to fit the temperature on
    holdout_max: int = 500  # cap: 500 measure a 90% accuracy to +-1.3 points (binomial s.e.)
    # "None of these" logit at this quantile of the held-out energies (train/calibration.py):
    # out-of-scope messages get low confidence; None = plain temperature scaling.
    oos_quantile: Optional[float] = 0.01
    replay_size: int = 1000  # training examples kept in the model and replayed by continual updates
    # Replayed examples per epoch of a continual update, as a share of its new training
    # examples (a fresh stratified sample of the buffer each epoch); None = the whole buffer
    # every epoch. Less replay lets an update learn more of what is new; EWC then keeps the old.
    replay_ratio: Optional[float] = None
    # EWC strength over the Fisher normalised to mean 1 (train/continual.py). 3e-4: the largest
    # value of benchmarks/continual.py's sweep that cost no learning beyond replay's own on
    # Banking77's skewed update; 1e-3 cost 2.7 points there and >= 0.01 froze the update.
    ewc_lambda: float = 3e-4
    max_forgetting: Optional[float] = 0.02  # guard: max drop of old held-out accuracy; None = guard off
    # Replay examples the Fisher diagonal averages over (a stratified subset): each is one
    # forward + backward of its own, ~90 ms for the shipped encoder on a 14-token Banking77
    # utterance (2 busy cores), so 256 add ~20 s to a training run.
    fisher_examples: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("learning_rate", "head_lr_multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if isinstance(self.freeze_layers, bool) or not isinstance(self.freeze_layers, int) or self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be an integer >= 0, got {self.freeze_layers!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.holdout_fraction, bool) or not 0 <= self.holdout_fraction <= 0.5:
            raise ValueError(f"holdout_fraction must be in [0, 0.5], got {self.holdout_fraction!r}")
        q = self.oos_quantile
        if q is not None and (isinstance(q, bool) or not 0 < q <= 0.5):
            raise ValueError(f"oos_quantile must be in (0, 0.5] or None (no out-of-scope logit), got {q!r}")
        if isinstance(self.fisher_examples, bool) or not isinstance(self.fisher_examples, int) \
                or self.fisher_examples < 1:
            raise ValueError(f"fisher_examples must be a positive integer, got {self.fisher_examples!r}")
        for name in ("holdout_max", "replay_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        rr = self.replay_ratio
        if rr is not None and (isinstance(rr, bool) or not (0 < rr < math.inf)):
            raise ValueError(f"replay_ratio must be a finite number > 0 (replayed per new example and epoch) "
                             f"or None to replay the whole buffer every epoch, got {rr!r}")
        if isinstance(self.ewc_lambda, bool) or not (0 <= self.ewc_lambda < math.inf):
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {self.ewc_lambda!r}")
        mf = self.max_forgetting
        if mf is not None and (isinstance(mf, bool) or not 0 <= mf <= 1):
            raise ValueError(f"max_forgetting must be in [0, 1] (a share of accuracy, 0.02 = 2 points) "
                             f"or None to turn the guard off, got {mf!r}")

    @classmethod
    def from_dict(cls, d: Dict) -> "FinetuneConfig":
        """Build from a dict, ignoring keys that are not fine-tuning settings."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Prediction:
    """What the model says about one text."""

    intent_probs: Optional[np.ndarray]  # (n_intents,); None when intents are off or the text is empty
    entities: List[dict]


class IntentEntityModel:
    """Encoder + intent head + BILOU entity head, with calibration and continual-learning state."""

    def __init__(self, nano: NanoConfig, params: Dict[str, np.ndarray], cfg: FinetuneConfig,
                 intents: Sequence[str] = (), entity_types: Sequence[str] = (), tokenizer=None,
                 head_params: Optional[Dict[str, np.ndarray]] = None, precision: str = "int4",
                 max_length: Optional[int] = None):
        """Prefer `from_pretrained` and `load`."""
        from ..nano.tokenizer import NanoTokenizer

        self.nano = nano
        self.params = params
        self.cfg = cfg
        self.intents = list(intents)
        self.entity_types = sorted(entity_types)
        self.tags = Hd.tag_names(self.entity_types)
        self.tokenizer = tokenizer or NanoTokenizer.load()
        self.heads: Dict[str, np.ndarray] = dict(head_params or {})
        self.precision = precision
        self.max_length = min(max_length or nano.max_seq_len, nano.max_seq_len)
        self.encoder = None
        self.history: List[dict] = []
        self.temperature = 1.0  # predict divides the intent logits by this (fitted on the held-out set)
        self.background_logit: Optional[float] = None  # "none of these" logit (calibration.py); None = off
        self.calibration: dict = {}  # how the temperature was fitted: held-out size, accuracy, ECE before/after
        self.holdout = Examples()  # never trained on: temperature fitting and the continual-learning guard
        self.replay = Examples()  # a stratified sample of the training examples, replayed by updates
        self.fisher_names: List[str] = []  # tensors that have a Fisher diagonal
        self.fisher_tensors: Dict[str, np.ndarray] = {}  # their codes (continual.encode_fisher)
        self.continual: List[dict] = []  # one LearnReport dict per continual update, accepted or not
        # Encoder tensors exactly as loaded (INT4 codes): saved again as they are while the
        # weights are untouched, because re-quantizing dequantized weights can move a code.
        self._stored: Optional[Dict[str, np.ndarray]] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, cfg: FinetuneConfig, checkpoint: Optional[str] = None, precision: str = "int4",
                        max_length: Optional[int] = None) -> "IntentEntityModel":
        """Start from a pretrained checkpoint's master weights (default: the shipped one)."""
        from ..nano.assets import pretrained_checkpoint_path
        from ..nano.tokenizer import NanoTokenizer

        tok = NanoTokenizer.load()
        path = Path(checkpoint) if checkpoint else pretrained_checkpoint_path()
        ckpt = load_checkpoint(path, expected_tokenizer_sha256=tok.sha256)
        params = float_params(ckpt.tensors, ckpt.config)
        return cls(ckpt.config, params, cfg, tokenizer=tok, precision=precision, max_length=max_length)

    def clone(self, cfg: Optional[FinetuneConfig] = None) -> "IntentEntityModel":
        """An independent copy (weights copied, tokenizer shared), optionally with another config."""
        m = IntentEntityModel(self.nano, {k: v.copy() for k, v in self.params.items()}, cfg or self.cfg,
                              self.intents, self.entity_types, tokenizer=self.tokenizer,
                              head_params={k: v.copy() for k, v in self.heads.items()}, precision=self.precision,
                              max_length=self.max_length)
        m.history = [dict(h) for h in self.history]
        m.temperature, m.calibration = self.temperature, dict(self.calibration)
        m.background_logit = self.background_logit
        m.holdout, m.replay = self.holdout.subset(range(len(self.holdout))), self.replay.subset(range(len(self.replay)))
        m.fisher_names, m.fisher_tensors = list(self.fisher_names), dict(self.fisher_tensors)
        m.continual = [dict(r) for r in self.continual]
        m._stored = self._stored
        return m

    # ------------------------------------------------------------------ training

    def _token_data(self, texts: Sequence[str], entities: Optional[Sequence[Sequence[dict]]], max_length: int):
        batch = self.tokenizer.encode_batch(list(texts), max_length=max_length)
        seqs = [batch.ids[i, : batch.lengths[i]].astype(np.int64) for i in range(len(texts))]
        tags = None
        if entities is not None and self.cfg.entity_recognition and len(self.tags) > 1:
            index = {t: i for i, t in enumerate(self.tags)}
            tags = [Hd.bilou_labels(batch.offsets[i], int(batch.lengths[i]), entities[i], index,
                                    int(batch.lengths[i])) for i in range(len(texts))]
        return batch, seqs, tags

    def _set_labels(self, intents: Optional[Sequence[str]], entities: Optional[Sequence[Sequence[dict]]]) -> None:
        """Label maps from the data, or, when the heads exist already (continued training),
        a check that the data uses no label the heads lack."""
        if intents is not None:
            if f"{INTENT}.weight" in self.heads:
                unknown = sorted(set(intents) - set(self.intents))
                if unknown:
                    raise ValueError(f"unknown intent(s) {unknown}: the trained intent head knows {self.intents}; "
                                     "train a new model to add intents")
            else:
                self.intents = sorted(set(intents))
        if entities is not None:
            types = sorted({e["entity"] for ents in entities for e in ents})
            if f"{ENTITY}.weight" in self.heads:
                unknown = sorted(set(types) - set(self.entity_types))
                if unknown:
                    raise ValueError(f"unknown entity type(s) {unknown}: the trained entity head knows "
                                     f"{self.entity_types}; train a new model to add entity types")
            else:
                self.entity_types = types
                self.tags = Hd.tag_names(self.entity_types)

    def _batch_grads(self, allp, seqs, y, tags, b, use_intents: bool, use_entities: bool, freeze: int):
        """Loss, gradients of the trainable tensors and counts for the examples `b`."""
        cfg = self.cfg
        ids, mask = pad([seqs[i] for i in b], self.nano.pad_id)
        h, pooled, cache = M.forward(allp, ids, mask, self.nano, n_frozen=freeze)
        loss, dpooled, dhidden = 0.0, None, None
        grads: Dict[str, np.ndarray] = {}
        stats = {"correct": 0, "e_ok": 0, "e_n": 0}
        if use_intents:
            logits = Hd.linear_head_forward(pooled, allp, INTENT)
            l1, probs, dl = Hd.softmax_xent(logits, y[b], cfg.label_smoothing)
            dpooled, g = Hd.linear_head_backward(pooled, dl, allp, INTENT)
            grads.update(g)
            loss += l1
            stats["correct"] = int((probs.argmax(1) == y[b]).sum())
        if use_entities:
            T = ids.shape[1]
            lab = np.full((len(b), T), Hd.IGNORE, np.int64)
            for r, i in enumerate(b):
                lab[r, : len(tags[i])] = tags[i]
            elog = Hd.linear_head_forward(h, allp, ENTITY)  # (B, T, K)
            l2, eprobs, dl2 = Hd.softmax_xent(elog.reshape(-1, len(self.tags)), lab.reshape(-1))
            dl2 *= cfg.entity_loss_weight
            dhidden, g = Hd.linear_head_backward(h, dl2.reshape(elog.shape), allp, ENTITY)
            grads.update(g)
            loss += cfg.entity_loss_weight * l2
            valid = lab.reshape(-1) != Hd.IGNORE
            stats["e_ok"] = int((eprobs.argmax(1)[valid] == lab.reshape(-1)[valid]).sum())
            stats["e_n"] = int(valid.sum())
        if dpooled is None and dhidden is None:
            raise ValueError("nothing to train: both intent_classification and entity_recognition "
                             "are off or the data has neither intents nor entities")
        grads.update(M.backward(cache, self.nano, dpooled=dpooled, dhidden=dhidden,
                                embedding_grad=cfg.train_embeddings))
        return loss, grads, stats

    def fit(self, texts: Sequence[str], intents: Optional[Sequence[str]] = None,
            entities: Optional[Sequence[Sequence[dict]]] = None, progress: bool = True,
            penalty: Optional[Penalty] = None, holdout: Optional[Examples] = None,
            replay: Optional[Examples] = None, replay_per_epoch: Optional[int] = None) -> List[dict]:
        """Fine-tune on examples; `entities[i]` are dicts with start, end, entity (char offsets).

        Unless `holdout` is given, a stratified `cfg.holdout_fraction` of the examples (at
        most `cfg.holdout_max`) is held out and not trained on; with `holdout`, every given
        example is trained on and `holdout` is the held-out set. `penalty(params)` returns
        (value, gradients) of an extra loss term added at every step (the EWC penalty of
        continual learning). `replay` (old examples of continual learning) is trained on
        beside the examples: all of it every epoch, or with `replay_per_epoch` a fresh seeded
        sample of that many (stratified by intent) each epoch. Afterwards the temperature is
        fitted on the held-out set and the replay buffer and Fisher diagonal are refreshed
        from everything trained on. Weights and labels of an existing model are continued
        from, not reset.
        """
        cfg = self.cfg
        n = len(texts)
        replay = replay if replay is not None else Examples()
        if n + len(replay) == 0:
            raise ValueError("no training examples: add NLU examples with intents (and entities)")
        use_intents = cfg.intent_classification and intents is not None
        use_entities = cfg.entity_recognition and entities is not None
        # Replayed examples are trained on too, so their labels must be known to the heads.
        self._set_labels(list(intents) + replay.intents if use_intents else None,
                         list(entities) + replay.entities if use_entities else None)
        use_entities = use_entities and len(self.tags) > 1
        C = self.nano.dim
        if use_intents and f"{INTENT}.weight" not in self.heads:
            self.heads.update(Hd.init_linear(len(self.intents), C, cfg.random_seed, INTENT))
        if use_entities and f"{ENTITY}.weight" not in self.heads:
            self.heads.update(Hd.init_linear(len(self.tags), C, cfg.random_seed, ENTITY))

        data = Examples.build(texts, intents if intents is not None else [""] * n, entities)
        if holdout is None and use_intents and cfg.holdout_fraction > 0:
            data, holdout = holdout_split(data, cfg.holdout_fraction, cfg.holdout_max, cfg.random_seed)
        n = len(data)
        r = replay_per_epoch
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0):
            raise ValueError(f"replay_per_epoch must be an integer >= 0 or None, got {r!r}")
        per_epoch = len(replay) if r is None else min(len(replay), int(r))
        data = data + replay  # positions n.. are the replayed examples
        _, seqs, tags = self._token_data(data.texts, data.entities if use_entities else None, cfg.max_length)
        y = np.array([self.intents.index(i) for i in data.intents], np.int64) if use_intents else None
        lengths = np.array([len(s) for s in seqs])
        steps_per_epoch = -(-(n + per_epoch) // cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        freeze = min(cfg.freeze_layers, self.nano.n_layers)
        trainable = [k for k in self.params if self._trainable(k, freeze)] + list(self.heads)
        allp = {**self.params, **self.heads}
        opt = AdamW(allp, OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      warmup_steps=int(cfg.warmup_ratio * total), total_steps=total,
                                      min_lr_ratio=0.0, grad_clip=1.0),
                    trainable=trainable, lr_mult={k: cfg.head_lr_multiplier for k in self.heads})
        self._stored = None  # the weights are about to change
        self.encoder = None
        bar = _tqdm(range(cfg.epochs), desc="Epochs", disable=not progress)
        t_start = time.time()
        for epoch in bar:
            tot_loss, tot_pen, correct, seen, e_ok, e_n = 0.0, 0.0, 0, 0, 0, 0
            if per_epoch == len(replay):
                pos = np.arange(len(data))
            else:  # a fresh replay sample each epoch: over the update, more of the buffer is seen
                pick = stratified_sample(replay.intents if use_intents else [""] * len(replay), per_epoch,
                                         [cfg.random_seed, 4, epoch])
                pos = np.concatenate([np.arange(n), n + pick])
            for b in epoch_batches(lengths[pos], cfg.batch_size, cfg.random_seed, epoch):
                b = pos[b]
                loss, grads, st = self._batch_grads(allp, seqs, y, tags, b, use_intents, use_entities, freeze)
                if penalty is not None:
                    pen, pgrads = penalty(allp)
                    for k, g in pgrads.items():
                        if k in grads:
                            grads[k] = grads[k] + g
                    tot_pen += pen * len(b)
                opt.step(allp, grads)
                tot_loss += loss * len(b)
                seen += len(b)
                correct += st["correct"]
                e_ok += st["e_ok"]
                e_n += st["e_n"]
            rec = {"epoch": epoch + 1, "t_loss": tot_loss / seen}
            if penalty is not None:
                rec["penalty"] = tot_pen / seen
            if use_intents:
                rec["i_acc"] = correct / seen
            if use_entities:
                rec["e_acc"] = e_ok / max(e_n, 1)
            self.history.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch"})
        logger.info("SLM360 fine-tuning: %d examples, %d epochs in %.1f s", n, cfg.epochs, time.time() - t_start)
        self._after_training(data, holdout if holdout is not None else Examples())
        return self.history

    def _trainable(self, name: str, freeze: int) -> bool:
        if name == "tok_embeddings":
            return self.cfg.train_embeddings and freeze == 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) >= freeze
        return True

    def _after_training(self, train: Examples, holdout: Examples) -> None:
        """Temperature on the held-out set; replay buffer and Fisher diagonal from the training set."""
        cfg = self.cfg
        self.holdout = holdout
        self.calibrate()
        has_intents = f"{INTENT}.weight" in self.heads
        # Stratify by intent so a replayed update still sees every intent; entity-only
        # models have no intent labels, and the sample is then a plain seeded draw.
        idx = stratified_sample(train.intents if has_intents else [""] * len(train), cfg.replay_size,
                                [cfg.random_seed, 2])
        self.replay = train.subset(idx)
        self.fisher_names, self.fisher_tensors = [], {}
        if cfg.ewc_lambda > 0 and len(self.replay):
            t0 = time.time()
            sub = self.replay.subset(stratified_sample(self.replay.intents, cfg.fisher_examples, [cfg.random_seed, 3]))
            fisher = empirical_fisher(self, sub)
            self.fisher_names = sorted(fisher)
            self.fisher_tensors = encode_fisher(fisher)
            logger.info("SLM360: Fisher diagonal over %d replay examples in %.1f s", len(sub), time.time() - t0)

    def example_gradients(self, examples: Examples) -> Iterator[Dict[str, np.ndarray]]:
        """Per-example gradients of the training loss at the current float weights, one dict
        (trainable tensor name -> gradient) per example, in order (used for the Fisher)."""
        use_intents = self.cfg.intent_classification and f"{INTENT}.weight" in self.heads
        use_entities = self.cfg.entity_recognition and f"{ENTITY}.weight" in self.heads and len(self.tags) > 1
        _, seqs, tags = self._token_data(examples.texts, examples.entities if use_entities else None,
                                         self.cfg.max_length)
        y = np.array([self.intents.index(i) for i in examples.intents], np.int64) if use_intents else None
        freeze = min(self.cfg.freeze_layers, self.nano.n_layers)
        allp = {**self.params, **self.heads}
        for i in range(len(examples)):
            _, grads, _ = self._batch_grads(allp, seqs, y, tags, np.array([i]), use_intents, use_entities, freeze)
            yield grads

    def _fisher_shapes(self) -> Dict[str, tuple]:
        return {k: (self.params[k] if k in self.params else self.heads[k]).shape for k in self.fisher_names}

    def fisher(self) -> Dict[str, np.ndarray]:
        """The stored Fisher diagonal, decoded to float32 arrays shaped like the weights ({} if none)."""
        return decode_fisher(self.fisher_tensors, self._fisher_shapes())

    # ------------------------------------------------------------------ calibration

    def calibrate(self) -> dict:
        """Fit the temperature on the held-out set's intent logits (the served weights) and
        record held-out accuracy, NLL and ECE before and after; T = 1 when there are fewer
        than MIN_CALIBRATION_EXAMPLES readable held-out examples or no intent head."""
        self.temperature, self.background_logit = 1.0, None
        info: dict = {"n_holdout": len(self.holdout), "temperature": 1.0, "fitted": False,
                      "oos_quantile": self.cfg.oos_quantile, "background_logit": None}
        if f"{INTENT}.weight" not in self.heads or not self.intents:
            info["reason"] = "no intent head"
            self.calibration = info
            return info
        known = [i for i, y in enumerate(self.holdout.intents) if y in self.intents]
        logits = self.intent_logits([self.holdout.texts[i] for i in known]) if known else np.zeros((0, 0))
        rows = [r for r in range(len(known)) if np.isfinite(logits[r]).all()]
        if rows:
            z = logits[rows].astype(np.float64)
            y = np.array([self.intents.index(self.holdout.intents[known[r]]) for r in rows])
            correct = z.argmax(1) == y
            info.update(accuracy=float(correct.mean()), nll_before=nll(z, y, 1.0),
                        ece_before=expected_calibration_error(Hd.softmax(z).max(1), correct))
        info["n_used"] = len(rows)
        if len(rows) < MIN_CALIBRATION_EXAMPLES:
            info["reason"] = f"fewer than {MIN_CALIBRATION_EXAMPLES} held-out examples; temperature left at 1"
            logger.info("SLM360: %d held-out examples (< %d), confidences are not calibrated (T = 1)",
                        len(rows), MIN_CALIBRATION_EXAMPLES)
        else:
            t = b = None
            if self.cfg.oos_quantile:
                t, b = fit_temperature_with_background(z, y, self.cfg.oos_quantile)
                # The "none of these" logit only helps where held-out energies are spread out,
                # i.e. the model knows its intents well: a typical held-out example must stay at
                # least MIN_IN_SCOPE in scope. A weak model (tiny bot, few epochs) has all its
                # energies close together, and the logit would take mass from every answer.
                typical = float(np.median(in_scope_probability(z, t, b)))
                info["typical_in_scope"] = typical
                if typical < MIN_IN_SCOPE:
                    t = b = None
                    info["background_off"] = (f"a typical held-out example would be only {typical:.2f} in scope "
                                              f"(< {MIN_IN_SCOPE}): plain temperature scaling")
            if t is None:
                t = fit_temperature(z, y)
            self.temperature, self.background_logit = t, b
            info.update(temperature=t, background_logit=b, fitted=True, nll_after=nll(z, y, t, b),
                        ece_after=expected_calibration_error(background_softmax(z, t, b).max(1), correct))
            logger.info("SLM360: temperature %.3f%s fitted on %d held-out examples (accuracy %.3f, ECE %.3f -> %.3f)",
                        t, "" if b is None else f" and out-of-scope logit {b:.2f}", len(rows), info["accuracy"],
                        info["ece_before"], info["ece_after"])
        self.calibration = info
        return info

    # ------------------------------------------------------------------ prediction

    def runtime(self):
        """The numba encoder for prediction (built on first use from the master weights)."""
        if self.encoder is None:
            from ..nano.runtime import Encoder

            self.encoder = Encoder.from_params(self.params, self.nano, precision=self.precision,
                                               tokenizer=self.tokenizer, max_length=self.max_length)
        return self.encoder

    def intent_logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw (uncalibrated) intent logits (N, n_intents) of the served model; NaN rows for
        texts with no readable token."""
        out = np.full((len(texts), len(self.intents)), np.nan, np.float32)
        if not texts:
            return out
        for i, s in enumerate(self.runtime().token_states(list(texts))):
            if len(s.ids) > 2:
                out[i] = Hd.linear_head_predict(s.states.mean(axis=0)[None], self.heads, INTENT)[0]
        return out

    def warm_up(self) -> float:
        """Run one short prediction so numba compiles (or loads from its cache) every kernel of
        the serving path now rather than on the first real message; returns the seconds taken."""
        t0 = time.perf_counter()
        self.predict(["warm up the encoder"])
        return time.perf_counter() - t0

    def predict(self, texts: Sequence[str]) -> List[Prediction]:
        """Intent probabilities (calibrated: softmax(logits / temperature), with the out-of-scope
        logit when fitted, so they may sum to less than 1) and entities for each text (one
        batched encoder call)."""
        if not texts:
            return []
        states = self.runtime().token_states(list(texts))
        out = []
        has_i = f"{INTENT}.weight" in self.heads
        has_e = f"{ENTITY}.weight" in self.heads and len(self.tags) > 1
        for text, s in zip(texts, states):
            probs = ents = None
            if len(s.ids) <= 2:  # only [CLS] [SEP]: the text has no readable token
                out.append(Prediction(intent_probs=None, entities=[]))
                continue
            if has_i:
                pooled = s.states.mean(axis=0)
                logits = Hd.linear_head_predict(pooled[None], self.heads, INTENT)
                probs = background_softmax(logits, self.temperature, self.background_logit)[0].astype(np.float32)
            if has_e:
                eprobs = Hd.softmax(Hd.linear_head_predict(s.states, self.heads, ENTITY))
                ents = Hd.decode_bilou(text, s.offsets, eprobs, self.tags)
            out.append(Prediction(intent_probs=probs, entities=ents or []))
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> Path:
        """Write encoder (INT4 codes or f32), heads, Fisher codes and metadata to one safetensors file."""
        if self._stored is not None:
            tensors = dict(self._stored)
        elif self.precision == "int4":
            tensors, _ = quantize_params(self.params)
        else:
            tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
        tensors.update({k: np.ascontiguousarray(v, np.float32) for k, v in self.heads.items()})
        tensors.update(self.fisher_tensors)
        extra = {"kind": MODEL_KIND, "version": MODEL_VERSION, "precision": self.precision,
                 "intents": self.intents, "entity_types": self.entity_types, "tags": self.tags,
                 "finetune": asdict(self.cfg), "max_length": self.max_length, "history": self.history,
                 "temperature": self.temperature, "background_logit": self.background_logit,
                 "calibration": self.calibration, "holdout": self.holdout.to_json(), "replay": self.replay.to_json(),
                 "fisher": {"format": FISHER_FORMAT, "names": self.fisher_names}, "continual": self.continual}
        return save_checkpoint(path, tensors, self.nano, self.tokenizer.sha256, extra=_json_safe(extra))

    @classmethod
    def load(cls, path: Path) -> "IntentEntityModel":
        """Load a model written by `save`; errors name the file and the problem."""
        from ..nano.tokenizer import NanoTokenizer

        tok = NanoTokenizer.load()
        ckpt = load_checkpoint(path, expected_tokenizer_sha256=tok.sha256)
        if ckpt.extra.get("kind") != MODEL_KIND:
            raise ValueError(f"{path}: not an SLM360 intent/entity model (kind={ckpt.extra.get('kind')!r})")
        if ckpt.extra.get("version") != MODEL_VERSION:
            raise ValueError(f"{path}: model version {ckpt.extra.get('version')!r}, this code reads {MODEL_VERSION}")
        params = float_params(ckpt.tensors, ckpt.config)
        head_params = {k: v for k, v in ckpt.tensors.items() if k.startswith("head.")}
        m = cls(ckpt.config, params, FinetuneConfig.from_dict(ckpt.extra["finetune"]), ckpt.extra["intents"],
                ckpt.extra["entity_types"], tokenizer=tok, head_params=head_params,
                precision=ckpt.extra["precision"], max_length=ckpt.extra.get("max_length"))
        m.history = list(ckpt.extra.get("history", []))
        # Files written before calibration and continual learning existed load with their defaults.
        m.temperature = float(ckpt.extra.get("temperature", 1.0))
        b = ckpt.extra.get("background_logit")
        if b is not None and not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)):
            raise ValueError(f"{path}: background_logit must be a finite number or null, got {b!r}")
        m.background_logit = None if b is None else float(b)
        m.calibration = dict(ckpt.extra.get("calibration", {}))
        m.continual = list(ckpt.extra.get("continual", []))
        try:
            if "holdout" in ckpt.extra:
                m.holdout = Examples.from_json(ckpt.extra["holdout"])
            if "replay" in ckpt.extra:
                m.replay = Examples.from_json(ckpt.extra["replay"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt held-out set or replay buffer in the metadata: {e}") from None
        fisher = ckpt.extra.get("fisher", {"format": FISHER_FORMAT, "names": []})
        if fisher.get("format") != FISHER_FORMAT:
            raise ValueError(f"{path}: Fisher format {fisher.get('format')!r}, this code reads {FISHER_FORMAT!r}")
        m.fisher_names = list(fisher["names"])
        m.fisher_tensors = {k: v for k, v in ckpt.tensors.items() if k.startswith(FISHER_PREFIX)}
        try:  # names, shapes and dtypes now rather than at the first update
            check_fisher(m.fisher_tensors, m._fisher_shapes())
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: invalid Fisher tensors: {e}") from None
        m._stored = {k: v for k, v in ckpt.tensors.items()
                     if not k.startswith("head.") and not k.startswith(FISHER_PREFIX)}
        if m.precision == "int4":
            from ..nano.runtime import Encoder

            # Serve the stored codes as they are: re-quantizing the dequantized weights
            # could move a code and make predictions differ from the saved model's.
            m.encoder = Encoder(ckpt.config, tokenizer=tok, precision="int4", q4_tensors=ckpt.tensors,
                                max_length=m.max_length)
        return m


def _json_safe(x):
    """NaN/inf (e.g. an ECE over no examples) become None: the metadata is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _tqdm(it, **kw):
    from tqdm import tqdm

    return tqdm(it, **kw)
