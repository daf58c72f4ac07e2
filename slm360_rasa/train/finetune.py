"""Supervised fine-tuning of SLM360 Nano for intents + entities, and the model it produces.

`IntentEntityModel` holds the encoder's float master weights, an intent head on the pooled
vector and a BILOU entity head on token states. `fit` fine-tunes them with AdamW on
length-bucketed, seeded batches (numpy reference forward/backward); prediction runs the
numba runtime (INT4 by default) and applies the heads in numpy. Nothing here imports Rasa:
the Rasa component (components/classifier.py) and plain scripts share this class.

Persisted as one safetensors file: the encoder's INT4 (or f32) tensors, the heads, and JSON
metadata (label maps, configs). No pickle.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..nano import model as M
from ..nano.checkpoint import load_checkpoint, save_checkpoint
from ..nano.config import NanoConfig
from ..nano.quant import float_params, quantize_params
from . import heads as Hd
from .data import epoch_batches, pad
from .optim import AdamW, OptimConfig

logger = logging.getLogger("slm360_rasa")

MODEL_KIND = "slm360-intent-entity"
MODEL_VERSION = 1
INTENT = "head.intent"
ENTITY = "head.entity"


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
    """Encoder + intent head + BILOU entity head."""

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

    def fit(self, texts: Sequence[str], intents: Optional[Sequence[str]] = None,
            entities: Optional[Sequence[Sequence[dict]]] = None, progress: bool = True) -> List[dict]:
        """Fine-tune on examples; `entities[i]` are dicts with start, end, entity (char offsets)."""
        cfg = self.cfg
        n = len(texts)
        if n == 0:
            raise ValueError("no training examples: add NLU examples with intents (and entities)")
        use_intents = cfg.intent_classification and intents is not None
        use_entities = cfg.entity_recognition and entities is not None
        if use_intents:
            self.intents = sorted(set(intents))
        if use_entities:
            self.entity_types = sorted({e["entity"] for ents in entities for e in ents})
            self.tags = Hd.tag_names(self.entity_types)
            use_entities = len(self.tags) > 1
        C = self.nano.dim
        if use_intents and f"{INTENT}.weight" not in self.heads:
            self.heads.update(Hd.init_linear(len(self.intents), C, cfg.random_seed, INTENT))
        if use_entities and f"{ENTITY}.weight" not in self.heads:
            self.heads.update(Hd.init_linear(len(self.tags), C, cfg.random_seed, ENTITY))
        _, seqs, tags = self._token_data(texts, entities if use_entities else None, cfg.max_length)
        y = np.array([self.intents.index(i) for i in intents], np.int64) if use_intents else None
        lengths = np.array([len(s) for s in seqs])
        steps_per_epoch = -(-n // cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        freeze = min(cfg.freeze_layers, self.nano.n_layers)
        trainable = [k for k in self.params if self._trainable(k, freeze)] + list(self.heads)
        allp = {**self.params, **self.heads}
        opt = AdamW(allp, OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      warmup_steps=int(cfg.warmup_ratio * total), total_steps=total,
                                      min_lr_ratio=0.0, grad_clip=1.0),
                    trainable=trainable, lr_mult={k: cfg.head_lr_multiplier for k in self.heads})
        bar = _tqdm(range(cfg.epochs), desc="Epochs", disable=not progress)
        t_start = time.time()
        for epoch in bar:
            tot_loss, correct, seen, e_ok, e_n = 0.0, 0, 0, 0, 0
            for b in epoch_batches(lengths, cfg.batch_size, cfg.random_seed, epoch):
                ids, mask = pad([seqs[i] for i in b], self.nano.pad_id)
                h, pooled, cache = M.forward(allp, ids, mask, self.nano, n_frozen=freeze)
                loss, dpooled, dhidden = 0.0, None, None
                grads: Dict[str, np.ndarray] = {}
                if use_intents:
                    logits = Hd.linear_head_forward(pooled, allp, INTENT)
                    l1, probs, dl = Hd.softmax_xent(logits, y[b], cfg.label_smoothing)
                    dpooled, g = Hd.linear_head_backward(pooled, dl, allp, INTENT)
                    grads.update(g)
                    loss += l1
                    correct += int((probs.argmax(1) == y[b]).sum())
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
                    e_ok += int((eprobs.argmax(1)[valid] == lab.reshape(-1)[valid]).sum())
                    e_n += int(valid.sum())
                if dpooled is None and dhidden is None:
                    raise ValueError("nothing to train: both intent_classification and entity_recognition "
                                     "are off or the data has neither intents nor entities")
                grads.update(M.backward(cache, self.nano, dpooled=dpooled, dhidden=dhidden,
                                        embedding_grad=cfg.train_embeddings))
                opt.step(allp, grads)
                tot_loss += loss * len(b)
                seen += len(b)
            rec = {"epoch": epoch + 1, "t_loss": tot_loss / seen}
            if use_intents:
                rec["i_acc"] = correct / seen
            if use_entities:
                rec["e_acc"] = e_ok / max(e_n, 1)
            self.history.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k != "epoch"})
        logger.info("SLM360 fine-tuning: %d examples, %d epochs in %.1f s", n, cfg.epochs, time.time() - t_start)
        self.encoder = None
        return self.history

    def _trainable(self, name: str, freeze: int) -> bool:
        if name == "tok_embeddings":
            return self.cfg.train_embeddings and freeze == 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) >= freeze
        return True

    # ------------------------------------------------------------------ prediction

    def runtime(self):
        """The numba encoder for prediction (built on first use from the master weights)."""
        if self.encoder is None:
            from ..nano.runtime import Encoder

            self.encoder = Encoder.from_params(self.params, self.nano, precision=self.precision,
                                               tokenizer=self.tokenizer, max_length=self.max_length)
        return self.encoder

    def predict(self, texts: Sequence[str]) -> List[Prediction]:
        """Intent probabilities and entities for each text (one batched encoder call)."""
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
                probs = Hd.softmax(Hd.linear_head_forward(pooled[None], self.heads, INTENT))[0]
            if has_e:
                eprobs = Hd.softmax(Hd.linear_head_forward(s.states, self.heads, ENTITY))
                ents = Hd.decode_bilou(text, s.offsets, eprobs, self.tags)
            out.append(Prediction(intent_probs=probs, entities=ents or []))
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> Path:
        """Write encoder (INT4 codes or f32), heads and metadata to one safetensors file."""
        if self.precision == "int4":
            tensors, _ = quantize_params(self.params)
        else:
            tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
        tensors.update({k: np.ascontiguousarray(v, np.float32) for k, v in self.heads.items()})
        extra = {"kind": MODEL_KIND, "version": MODEL_VERSION, "precision": self.precision,
                 "intents": self.intents, "entity_types": self.entity_types, "tags": self.tags,
                 "finetune": asdict(self.cfg), "max_length": self.max_length, "history": self.history}
        return save_checkpoint(path, tensors, self.nano, self.tokenizer.sha256, extra=extra)

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
        if m.precision == "int4":
            from ..nano.runtime import Encoder

            # Serve the stored codes as they are: re-quantizing the dequantized weights
            # could move a code and make predictions differ from the saved model's.
            m.encoder = Encoder(ckpt.config, tokenizer=tok, precision="int4", q4_tensors=ckpt.tensors,
                                max_length=m.max_length)
        return m


def _tqdm(it, **kw):
    from tqdm import tqdm

    return tqdm(it, **kw)
