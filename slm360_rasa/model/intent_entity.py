"""`IntentEntityModel`: the served SLM360Classifier model (encoder + intent head + BILOU entity head).

What `rasa run` holds in memory: the encoder's stored tensors (INT4 codes and scales, or
f32 weights) running on the numba runtime, the two heads, the label maps and the fitted
temperature / out-of-scope logit. `predict` turns texts into calibrated intent
probabilities and entity spans. Nothing here trains; train/trainer.py fills a model and
train/continual.py updates one.

`TrainingState` is what only training and `rasa train --finetune` read: the f32 master
weights, the held-out set, the replay buffer, the Fisher diagonal, the training config and
history. `load(path)` leaves it out (serving reads neither the Fisher tensors nor the
master weights); `load(path, training=True)` restores it.

Persisted as one safetensors file (nano/checkpoint.py) whose metadata follows
model/schema.py. No pickle.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..config import FinetuneConfig
from ..nano.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..nano.config import NanoConfig
from ..nano.quant import float_params, quantize_params
from . import heads as Hd
from .calibration import background_softmax
from .examples import Examples
from .fisher import FISHER_FORMAT, FISHER_PREFIX, check_fisher, decode_fisher
from .heads import ENTITY, INTENT
from .schema import MODEL_KIND, MODEL_VERSION, validate_metadata

Arrays = Dict[str, np.ndarray]


@dataclass
class Prediction:
    """What the model says about one text."""

    intent_probs: Optional[np.ndarray]  # (n_intents,); None when intents are off or the text is empty
    entities: List[dict]


@dataclass
class TrainingState:
    """What training and continual updates need beyond the served model (saved with it)."""

    finetune: FinetuneConfig  # how the model was (last) trained
    params: Arrays  # f32 master weights of the encoder; dequantized from the stored codes after a load
    history: List[dict] = field(default_factory=list)  # one record per epoch, across updates
    holdout: Examples = field(default_factory=Examples)  # never trained on: calibration and the guard
    replay: Examples = field(default_factory=Examples)  # a stratified sample of the training examples
    fisher_names: List[str] = field(default_factory=list)  # tensors that have a Fisher diagonal
    fisher_tensors: Arrays = field(default_factory=dict)  # their codes (model/fisher.py)
    continual: List[dict] = field(default_factory=list)  # one report per continual update, accepted or not

    def copy(self) -> "TrainingState":
        """An independent copy (arrays and examples copied)."""
        return TrainingState(finetune=self.finetune, params={k: v.copy() for k, v in self.params.items()},
                             history=[dict(h) for h in self.history],
                             holdout=self.holdout.subset(range(len(self.holdout))),
                             replay=self.replay.subset(range(len(self.replay))),
                             fisher_names=list(self.fisher_names), fisher_tensors=dict(self.fisher_tensors),
                             continual=[dict(r) for r in self.continual])


class IntentEntityModel:
    """Encoder + intent head + BILOU entity head, calibrated; optionally with its training state."""

    def __init__(self, nano: NanoConfig, encoder_tensors: Arrays, heads: Optional[Arrays] = None,
                 intents: Sequence[str] = (), entity_types: Sequence[str] = (), precision: str = "int4",
                 max_length: Optional[int] = None, tokenizer=None, temperature: float = 1.0,
                 background_logit: Optional[float] = None, calibration: Optional[dict] = None,
                 training: Optional[TrainingState] = None):
        """`encoder_tensors` are the encoder's stored form: INT4 codes + scales (nano/quant.py)
        for precision "int4", float32 weights for "f32". Prefer `load` and the trainer."""
        from ..nano.tokenizer import NanoTokenizer

        self.nano = nano
        self.encoder_tensors = encoder_tensors
        self.heads: Arrays = dict(heads or {})
        self.intents = list(intents)
        self.entity_types = sorted(entity_types)
        self.precision = precision
        self.max_length = min(max_length or nano.max_seq_len, nano.max_seq_len)
        self.tokenizer = tokenizer or NanoTokenizer.load()
        self.temperature = float(temperature)  # predict divides the intent logits by this
        self.background_logit = background_logit  # "none of these" logit (model/calibration.py); None = off
        self.calibration: dict = dict(calibration or {})  # how T and b were fitted, with held-out figures
        self.training = training
        self._encoder = None

    @property
    def tags(self) -> List[str]:
        """The entity head's outputs: "O" and B/I/L/U per entity type."""
        return Hd.tag_names(self.entity_types)

    def copy(self) -> "IntentEntityModel":
        """An independent copy (heads and training state copied; stored encoder tensors and
        tokenizer shared, since nothing modifies them in place)."""
        return IntentEntityModel(self.nano, self.encoder_tensors, {k: v.copy() for k, v in self.heads.items()},
                                 self.intents, self.entity_types, self.precision, self.max_length, self.tokenizer,
                                 self.temperature, self.background_logit, copy.deepcopy(self.calibration),
                                 self.training.copy() if self.training is not None else None)

    # ------------------------------------------------------------------ weights

    def set_encoder_weights(self, params: Arrays) -> None:
        """Store float encoder weights in this model's precision (INT4 codes: quantized here)
        and serve them from now on."""
        if self.precision == "int4":
            self.encoder_tensors, _ = quantize_params(params)
        else:
            self.encoder_tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
        self._encoder = None

    def float_params(self) -> Arrays:
        """Float32 encoder weights from the stored tensors (dequantized INT4, or a copy of f32)."""
        return float_params(self.encoder_tensors, self.nano)

    def runtime(self):
        """The numba encoder serving the stored tensors (built on first use)."""
        if self._encoder is None:
            from ..nano.runtime import Encoder

            if self.precision == "int4":
                # The stored codes run as they are: re-quantizing dequantized weights could
                # move a code and make predictions differ from the saved model's.
                self._encoder = Encoder(self.nano, tokenizer=self.tokenizer, precision="int4",
                                        q4_tensors=self.encoder_tensors, max_length=self.max_length)
            else:
                self._encoder = Encoder(self.nano, tokenizer=self.tokenizer, precision="f32",
                                        params=self.encoder_tensors, max_length=self.max_length)
        return self._encoder

    # ------------------------------------------------------------------ prediction

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
        tags = self.tags
        has_e = f"{ENTITY}.weight" in self.heads and len(tags) > 1
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
                ents = Hd.decode_bilou(text, s.offsets, eprobs, tags)
            out.append(Prediction(intent_probs=probs, entities=ents or []))
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> Path:
        """Write encoder tensors, heads, Fisher codes and metadata (model/schema.py) to one
        safetensors file; needs the training state (a model loaded for serving has none)."""
        st = self.training
        if st is None:
            raise ValueError("this model was loaded for serving, without its training state; "
                             "load it with IntentEntityModel.load(path, training=True) to save it")
        tensors = dict(self.encoder_tensors)
        tensors.update({k: np.ascontiguousarray(v, np.float32) for k, v in self.heads.items()})
        tensors.update(st.fisher_tensors)
        extra = {"kind": MODEL_KIND, "version": MODEL_VERSION, "precision": self.precision,
                 "intents": self.intents, "entity_types": self.entity_types, "tags": self.tags,
                 "finetune": asdict(st.finetune), "max_length": self.max_length, "history": st.history,
                 "temperature": self.temperature, "background_logit": self.background_logit,
                 "calibration": self.calibration, "holdout": st.holdout.to_json(), "replay": st.replay.to_json(),
                 "fisher": {"format": FISHER_FORMAT, "names": st.fisher_names}, "continual": st.continual}
        return save_checkpoint(path, tensors, self.nano, self.tokenizer.sha256, extra=_json_safe(extra))

    @classmethod
    def load(cls, path: Path, training: bool = False) -> "IntentEntityModel":
        """Load a model written by `save`. For serving (the default) only the encoder tensors
        and heads are read; `training=True` also restores the TrainingState (master weights
        dequantized, Fisher tensors checked). Errors (CheckpointError) name the file and the
        problem, including any missing, extra or wrong-typed metadata key."""
        from ..nano.tokenizer import NanoTokenizer

        tok = NanoTokenizer.load()
        ckpt = load_checkpoint(path, expected_tokenizer_sha256=tok.sha256,
                               select=None if training else (lambda name: not name.startswith(FISHER_PREFIX)))
        meta = ckpt.extra
        validate_metadata(meta, path)
        heads = {k: v for k, v in ckpt.tensors.items() if k.startswith("head.")}
        encoder = {k: v for k, v in ckpt.tensors.items() if not k.startswith(("head.", FISHER_PREFIX))}
        model = cls(ckpt.config, encoder, heads, meta["intents"], meta["entity_types"], meta["precision"],
                    meta["max_length"], tok, float(meta["temperature"]),
                    None if meta["background_logit"] is None else float(meta["background_logit"]),
                    meta["calibration"])
        if training:
            fisher = {k: v for k, v in ckpt.tensors.items() if k.startswith(FISHER_PREFIX)}
            params = model.float_params()
            names = list(meta["fisher"]["names"])
            shapes = _shapes(names, params, heads, path)
            try:  # names, shapes and dtypes now rather than at the first update
                check_fisher(fisher, shapes)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{path}: invalid Fisher tensors: {e}") from None
            model.training = TrainingState(
                finetune=FinetuneConfig.from_dict(meta["finetune"]), params=params, history=list(meta["history"]),
                holdout=Examples.from_json(meta["holdout"]), replay=Examples.from_json(meta["replay"]),
                fisher_names=names, fisher_tensors=fisher, continual=list(meta["continual"]))
        return model

    def fisher(self) -> Arrays:
        """The stored Fisher diagonal, decoded to float32 arrays shaped like the weights ({} if none)."""
        st = self.training
        if st is None:
            raise ValueError("this model was loaded for serving; load it with training=True to read its Fisher")
        return decode_fisher(st.fisher_tensors, _shapes(st.fisher_names, st.params, self.heads, "model"))


def _shapes(names: Sequence[str], params: Arrays, heads: Arrays, where) -> Dict[str, tuple]:
    """Shapes of the weights `names` (encoder or head tensors); CheckpointError for an unknown name."""
    out = {}
    for k in names:
        w = params.get(k, heads.get(k))
        if w is None:
            raise CheckpointError(f"{where}: the Fisher names tensor {k!r}, which the model does not have")
        out[k] = w.shape
    return out


def _json_safe(x):
    """NaN/inf (e.g. an ECE over no examples) become None: the metadata is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
