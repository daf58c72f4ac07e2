"""`Trainer`: supervised fine-tuning of an `IntentEntityModel` (encoder + intent + BILOU entity heads).

    model, params = start_model(cfg)                 # pretrained encoder, no heads yet
    trainer = Trainer(model, cfg, params)
    trainer.fit(texts, intents, entities)            # trains, then calibrates on held-out data
    continual.remember(trainer)                      # replay buffer + Fisher for --finetune
    model.save("model.safetensors")

`fit` fine-tunes the f32 master weights and the heads with AdamW on length-bucketed, seeded
batches (numpy reference forward/backward of nano/model.py), then stores the weights in the
model's precision (INT4 by default), serves them, and fits the softmax temperature on a
stratified held-out sample it never trained on (train/calibration.py), so confidences track
accuracy. Continual learning (train/continual.py) drives the same class with a penalty
(EWC) and replayed old examples. Nothing here imports Rasa.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..checks import check_int
from ..config import FinetuneConfig
from ..model.examples import Examples
from ..model.heads import ENTITY, INTENT
from ..model.intent_entity import IntentEntityModel, TrainingState
from ..nano import model as M
from ..nano.checkpoint import load_checkpoint
from ..nano.quant import float_params
from . import heads as TH
from .calibration import calibrate
from .data import epoch_batches, holdout_split, pad, stratified_sample
from .optim import AdamW, OptimConfig

logger = logging.getLogger(__name__)

Arrays = Dict[str, np.ndarray]
# A penalty added to the loss at every step: params -> (value, gradients of the value).
Penalty = Callable[[Arrays], Tuple[float, Arrays]]


@dataclass
class Replay:
    """Old examples trained on beside the new ones (continual learning): all of them every
    epoch, or with `per_epoch` a fresh seeded sample of that many (stratified by intent)."""

    examples: Examples
    per_epoch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.per_epoch is not None:
            check_int("replay_per_epoch", self.per_epoch, lo=0)


def start_model(cfg: FinetuneConfig, checkpoint: Optional[str] = None, precision: str = "int4",
                max_length: Optional[int] = None) -> Tuple[IntentEntityModel, Arrays]:
    """A model with no heads yet on a pretrained checkpoint (default: the shipped one), and
    that checkpoint's float master weights to train."""
    from ..nano.assets import pretrained_checkpoint_path
    from ..nano.tokenizer import NanoTokenizer

    tok = NanoTokenizer.load()
    path = Path(checkpoint) if checkpoint else pretrained_checkpoint_path()
    ckpt = load_checkpoint(path, expected_tokenizer_sha256=tok.sha256)
    params = float_params(ckpt.tensors, ckpt.config)
    model = IntentEntityModel(ckpt.config, {}, precision=precision, max_length=max_length, tokenizer=tok,
                              training=TrainingState(finetune=cfg, params=params))
    return model, params


class Trainer:
    """Fine-tunes `model`'s master weights and heads with `cfg`; the model is updated in place."""

    def __init__(self, model: IntentEntityModel, cfg: FinetuneConfig, params: Optional[Arrays] = None,
                 penalty: Optional[Penalty] = None):
        """`params`: the f32 master weights to start from (default: the model's training state's,
        or its stored weights dequantized). `penalty(params)` returns (value, gradients) of an
        extra loss term added at every step (the EWC penalty of continual learning)."""
        self.model = model
        self.cfg = cfg
        if params is None:
            params = model.training.params if model.training is not None else model.float_params()
        self.params = params
        self.penalty = penalty
        self.trained_on = Examples()  # everything the last `fit` trained on (new + replayed)

    # ------------------------------------------------------------------ data

    def _token_data(self, texts: Sequence[str], entities: Optional[Sequence[Sequence[dict]]], max_length: int):
        m = self.model
        batch = m.tokenizer.encode_batch(list(texts), max_length=max_length)
        seqs = [batch.ids[i, : batch.lengths[i]].astype(np.int64) for i in range(len(texts))]
        tags = None
        if entities is not None and self.cfg.entity_recognition and len(m.tags) > 1:
            index = {t: i for i, t in enumerate(m.tags)}
            tags = [TH.bilou_labels(batch.offsets[i], int(batch.lengths[i]), entities[i], index,
                                    int(batch.lengths[i])) for i in range(len(texts))]
        return batch, seqs, tags

    def _set_labels(self, intents: Optional[Sequence[str]], entities: Optional[Sequence[Sequence[dict]]]) -> None:
        """Label maps from the data, or, when the heads exist already (continued training),
        a check that the data uses no label the heads lack."""
        m = self.model
        if intents is not None:
            if f"{INTENT}.weight" in m.heads:
                unknown = sorted(set(intents) - set(m.intents))
                if unknown:
                    raise ValueError(f"unknown intent(s) {unknown}: the trained intent head knows {m.intents}; "
                                     "train a new model to add intents")
            else:
                m.intents = sorted(set(intents))
        if entities is not None:
            types = sorted({e["entity"] for ents in entities for e in ents})
            if f"{ENTITY}.weight" in m.heads:
                unknown = sorted(set(types) - set(m.entity_types))
                if unknown:
                    raise ValueError(f"unknown entity type(s) {unknown}: the trained entity head knows "
                                     f"{m.entity_types}; train a new model to add entity types")
            else:
                m.entity_types = types

    # ------------------------------------------------------------------ gradients

    def _batch_grads(self, allp, seqs, y, tags, b, use_intents: bool, use_entities: bool, freeze: int):
        """Loss, gradients of the trainable tensors and counts for the examples `b`."""
        cfg, nano = self.cfg, self.model.nano
        ids, mask = pad([seqs[i] for i in b], nano.pad_id)
        h, pooled, cache = M.forward(allp, ids, mask, nano, n_frozen=freeze)
        loss, dpooled, dhidden = 0.0, None, None
        grads: Arrays = {}
        stats = {"correct": 0, "e_ok": 0, "e_n": 0}
        if use_intents:
            logits = TH.linear_head_forward(pooled, allp, INTENT)
            l1, probs, dl = TH.softmax_xent(logits, y[b], cfg.label_smoothing)
            dpooled, g = TH.linear_head_backward(pooled, dl, allp, INTENT)
            grads.update(g)
            loss += l1
            stats["correct"] = int((probs.argmax(1) == y[b]).sum())
        if use_entities:
            n_tags = len(self.model.tags)
            T = ids.shape[1]
            lab = np.full((len(b), T), TH.IGNORE, np.int64)
            for r, i in enumerate(b):
                lab[r, : len(tags[i])] = tags[i]
            elog = TH.linear_head_forward(h, allp, ENTITY)  # (B, T, K)
            l2, eprobs, dl2 = TH.softmax_xent(elog.reshape(-1, n_tags), lab.reshape(-1))
            dl2 *= cfg.entity_loss_weight
            dhidden, g = TH.linear_head_backward(h, dl2.reshape(elog.shape), allp, ENTITY)
            grads.update(g)
            loss += cfg.entity_loss_weight * l2
            valid = lab.reshape(-1) != TH.IGNORE
            stats["e_ok"] = int((eprobs.argmax(1)[valid] == lab.reshape(-1)[valid]).sum())
            stats["e_n"] = int(valid.sum())
        if dpooled is None and dhidden is None:
            raise ValueError("nothing to train: both intent_classification and entity_recognition "
                             "are off or the data has neither intents nor entities")
        grads.update(M.backward(cache, nano, dpooled=dpooled, dhidden=dhidden,
                                embedding_grad=cfg.train_embeddings))
        return loss, grads, stats

    def _trainable(self, name: str, freeze: int) -> bool:
        if name == "tok_embeddings":
            return self.cfg.train_embeddings and freeze == 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) >= freeze
        return True

    def example_gradients(self, examples: Examples) -> Iterator[Arrays]:
        """Per-example gradients of the training loss at the current float weights, one dict
        (trainable tensor name -> gradient) per example, in order (used for the Fisher)."""
        m = self.model
        use_intents = self.cfg.intent_classification and f"{INTENT}.weight" in m.heads
        use_entities = self.cfg.entity_recognition and f"{ENTITY}.weight" in m.heads and len(m.tags) > 1
        _, seqs, tags = self._token_data(examples.texts, examples.entities if use_entities else None,
                                         self.cfg.max_length)
        y = np.array([m.intents.index(i) for i in examples.intents], np.int64) if use_intents else None
        freeze = min(self.cfg.freeze_layers, m.nano.n_layers)
        allp = {**self.params, **m.heads}
        for i in range(len(examples)):
            _, grads, _ = self._batch_grads(allp, seqs, y, tags, np.array([i]), use_intents, use_entities, freeze)
            yield grads

    # ------------------------------------------------------------------ training

    def fit(self, texts: Sequence[str], intents: Optional[Sequence[str]] = None,
            entities: Optional[Sequence[Sequence[dict]]] = None, progress: bool = True,
            holdout: Optional[Examples] = None, replay: Optional[Replay] = None) -> List[dict]:
        """Fine-tune on examples; `entities[i]` are dicts with start, end, entity (char offsets).

        Unless `holdout` is given, a stratified `cfg.holdout_fraction` of the examples (at
        most `cfg.holdout_max`) is held out and not trained on; with `holdout`, every given
        example is trained on and `holdout` is the held-out set. `replay` examples are
        trained on beside them (see `Replay`). Afterwards the weights are stored in the
        model's precision and served, and the temperature is fitted on the held-out set.
        Weights and labels of an existing model are continued from, not reset. Returns the
        model's training history (one record per epoch, across updates).
        """
        cfg, m = self.cfg, self.model
        n = len(texts)
        old = replay.examples if replay is not None else Examples()
        if n + len(old) == 0:
            raise ValueError("no training examples: add NLU examples with intents (and entities)")
        use_intents = cfg.intent_classification and intents is not None
        use_entities = cfg.entity_recognition and entities is not None
        # Replayed examples are trained on too, so their labels must be known to the heads.
        self._set_labels(list(intents) + old.intents if use_intents else None,
                         list(entities) + old.entities if use_entities else None)
        use_entities = use_entities and len(m.tags) > 1
        C = m.nano.dim
        if use_intents and f"{INTENT}.weight" not in m.heads:
            m.heads.update(TH.init_linear(len(m.intents), C, cfg.random_seed, INTENT))
        if use_entities and f"{ENTITY}.weight" not in m.heads:
            m.heads.update(TH.init_linear(len(m.tags), C, cfg.random_seed, ENTITY))

        data = Examples.build(texts, intents if intents is not None else [""] * n, entities)
        if holdout is None and use_intents and cfg.holdout_fraction > 0:
            data, holdout = holdout_split(data, cfg.holdout_fraction, cfg.holdout_max, cfg.random_seed)
        n = len(data)
        per_epoch = len(old) if replay is None or replay.per_epoch is None else min(len(old), int(replay.per_epoch))
        data = data + old  # positions n.. are the replayed examples
        _, seqs, tags = self._token_data(data.texts, data.entities if use_entities else None, cfg.max_length)
        y = np.array([m.intents.index(i) for i in data.intents], np.int64) if use_intents else None
        lengths = np.array([len(s) for s in seqs])
        steps_per_epoch = -(-(n + per_epoch) // cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        freeze = min(cfg.freeze_layers, m.nano.n_layers)
        trainable = [k for k in self.params if self._trainable(k, freeze)] + list(m.heads)
        allp = {**self.params, **m.heads}
        opt = AdamW(allp, OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      warmup_steps=int(cfg.warmup_ratio * total), total_steps=total,
                                      min_lr_ratio=0.0, grad_clip=1.0),
                    trainable=trainable, lr_mult={k: cfg.head_lr_multiplier for k in m.heads})
        history = list(m.training.history) if m.training is not None else []
        bar = _tqdm(range(cfg.epochs), desc="Epochs", disable=not progress)
        t_start = time.time()
        for epoch in bar:
            tot_loss, tot_pen, correct, seen, e_ok, e_n = 0.0, 0.0, 0, 0, 0, 0
            if per_epoch == len(old):
                pos = np.arange(len(data))
            else:  # a fresh replay sample each epoch: over the update, more of the buffer is seen
                pick = stratified_sample(old.intents if use_intents else [""] * len(old), per_epoch,
                                         [cfg.random_seed, 4, epoch])
                pos = np.concatenate([np.arange(n), n + pick])
            for b in epoch_batches(lengths[pos], cfg.batch_size, cfg.random_seed, epoch):
                b = pos[b]
                loss, grads, st = self._batch_grads(allp, seqs, y, tags, b, use_intents, use_entities, freeze)
                if self.penalty is not None:
                    pen, pgrads = self.penalty(allp)
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
            if self.penalty is not None:
                rec["penalty"] = tot_pen / seen
            if use_intents:
                rec["i_acc"] = correct / seen
            if use_entities:
                rec["e_acc"] = e_ok / max(e_n, 1)
            history.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch"})
        logger.info("SLM360 fine-tuning: %d examples, %d epochs in %.1f s", n, cfg.epochs, time.time() - t_start)
        # The optimizer updated allp's arrays in place; the head dict keeps its own references.
        m.heads = {k: allp[k] for k in m.heads}
        m.set_encoder_weights(self.params)
        prev = m.training
        m.training = TrainingState(finetune=cfg, params=self.params, history=history,
                                   holdout=holdout if holdout is not None else Examples(),
                                   continual=list(prev.continual) if prev is not None else [])
        self.trained_on = data
        calibrate(m, cfg.oos_quantile)
        return history


def _tqdm(it, **kw):
    from tqdm import tqdm

    return tqdm(it, **kw)

