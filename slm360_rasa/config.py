"""`SLM360Classifier` settings: the one declaration of every key, its default and its check.

Two frozen dataclasses, one per concern:

* `ServingConfig`: how a trained model answers (precision, ranking length, fast-path mode)
  and which pretrained checkpoint training starts from;
* `FinetuneConfig`: how it is trained (saved in the model file, and read again by
  `rasa train --finetune`).

The Rasa component's `get_default_config()` is the union of both (`classifier_defaults`),
so a key is declared, defaulted, commented and validated exactly once, here. The comment
over each field is the documentation a user sees when reading the defaults, as DIET has.

`from_component_config` turns a config.yml mapping into the two dataclasses: YAML hands over
strings for some numbers ("1e-3" without a dot) and Rasa keys the component does not own
(`name`, `finetuning_epoch_fraction`), so values are coerced by their declared type first,
then checked by `__post_init__`; an unknown key is an error (`checks.dataclass_from_dict`).

This module imports no training code: serving (`rasa run`) reads it too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from .checks import check_choice, check_int, check_number, dataclass_from_dict
from .nano.config import MAX_SEQ_LEN, MIN_SEQ_LEN, PRECISIONS

# Fast-path modes (slm360_rasa/model/fastpath.py explains each).
MODES = ("hybrid", "semantic", "pattern")


@dataclass(frozen=True)
class ServingConfig:
    """How the trained SLM360Classifier answers, and the checkpoint its training starts from."""

    # Inference weights: "int4" (4-bit, 3.6 MB, the fast default) or "f32".
    precision: str = "int4"
    # Intents listed in `intent_ranking`; 0 lists all of them.
    ranking_length: int = 10
    # "hybrid": training examples (up to case and punctuation) are answered from a table
    # without the encoder, intent-identifying regexes/lookup tables vote with the encoder;
    # "semantic": the encoder only; "pattern": patterns only (no intent when none matches).
    mode: str = "hybrid"
    # Pretrained encoder checkpoint to start from; null = the one shipped in the package.
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_int("ranking_length", self.ranking_length, lo=0)
        check_choice("mode", self.mode, MODES)
        if self.checkpoint is not None and not (isinstance(self.checkpoint, str) and self.checkpoint.strip()):
            raise ValueError(f"checkpoint must be the path of an SLM360 Nano .safetensors checkpoint or null, "
                             f"got {self.checkpoint!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """How SLM360Classifier fine-tunes the encoder and heads (saved with the model)."""

    # Passes over the training data. `rasa train --finetune --epoch-fraction` scales it.
    epochs: int = 10
    # Examples per optimisation step (batches are bucketed by length).
    batch_size: int = 32
    # AdamW peak learning rate of the encoder (warmup, then cosine decay to 0).
    learning_rate: float = 3e-4
    # The heads learn this many times faster than the pretrained encoder.
    head_lr_multiplier: float = 10.0
    # AdamW decoupled weight decay.
    weight_decay: float = 0.01
    # Fraction of the steps spent warming the learning rate up.
    warmup_ratio: float = 0.1
    # Number of lowest encoder blocks (of 6) kept frozen while fine-tuning.
    freeze_layers: int = 0
    # Train the 8,192 x 256 token embedding table too (it stays pretrained by default).
    train_embeddings: bool = False
    # Tokens per message, [CLS] and [SEP] included; longer messages are truncated with a
    # logged warning, in training and in prediction.
    max_length: int = 128
    # Seed of initialisation and shuffling: same data + seed = bit-identical weights.
    random_seed: int = 42
    # Weight of the entity loss relative to the intent loss.
    entity_loss_weight: float = 1.0
    # Label smoothing of the intent loss (0 = none).
    label_smoothing: float = 0.0
    # Learn and predict intents.
    intent_classification: bool = True
    # Learn and predict entities (BILOU tags over the encoder's tokens).
    entity_recognition: bool = True
    # Share of the examples held out (stratified; never an intent's last two) and not trained
    # on: the softmax temperature is fitted on them, so confidences track accuracy, and
    # `--finetune` checks on them that an update does not forget. 0 turns both off.
    holdout_fraction: float = 0.1
    # At most this many examples are held out (500 measure a 90% accuracy to +-1.3 points).
    holdout_max: int = 500
    # Out-of-scope handling: a "none of these" logit set at this quantile of the held-out
    # examples' logit energy, so messages unlike every intent get low confidence and
    # FallbackClassifier catches them (0.01: one held-out example in 100 would have its
    # confidence halved). null = plain temperature scaling, confidences sum to 1.
    oos_quantile: Optional[float] = 0.01
    # Training examples stored in the model and replayed by `rasa train --finetune`.
    replay_size: int = 1000
    # Replayed examples per epoch of `--finetune`, as a share of the new training
    # examples (a fresh sample of the buffer each epoch); null = the whole buffer
    # every epoch. Smaller values learn the new data more, with EWC keeping the old.
    replay_ratio: Optional[float] = None
    # EWC strength of `--finetune`: lambda/2 * sum F (w - w_old)^2 with F the Fisher
    # diagonal stored in the model, normalised to mean 1; 0 turns it off (and skips
    # computing F). 3e-4: the largest value of benchmarks/continual.py's sweep that cost no
    # learning beyond replay's own on Banking77's skewed update; >= 0.01 froze the update.
    ewc_lambda: float = 3e-4
    # `--finetune` keeps the previous model when accuracy on its held-out examples drops
    # by more than this (0.02 = 2 points); null turns the guard off. Rasa refuses a
    # finetune whose config differs in anything but epochs, so for one run override it
    # with the environment variable SLM360_MAX_FORGETTING=<number> or =off instead.
    max_forgetting: Optional[float] = 0.02
    # Replay examples the Fisher diagonal averages over (a stratified subset): each is one
    # forward + backward of its own, ~90 ms for the shipped encoder on a 14-token Banking77
    # utterance (2 busy cores), so 256 add ~20 s to a training run.
    fisher_examples: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "fisher_examples"):
            check_int(name, getattr(self, name), lo=1)
        check_int("max_length", self.max_length, lo=MIN_SEQ_LEN, hi=MAX_SEQ_LEN)
        for name in ("freeze_layers", "holdout_max", "replay_size"):
            check_int(name, getattr(self, name), lo=0)
        check_int("random_seed", self.random_seed)
        for name in ("learning_rate", "head_lr_multiplier"):
            check_number(name, getattr(self, name), 0, lo_open=True)
        for name in ("weight_decay", "entity_loss_weight", "ewc_lambda"):
            check_number(name, getattr(self, name), 0)
        check_number("warmup_ratio", self.warmup_ratio, 0, 1, hi_open=True)
        check_number("label_smoothing", self.label_smoothing, 0, 1, hi_open=True)
        check_number("holdout_fraction", self.holdout_fraction, 0, 0.5)
        check_number("oos_quantile", self.oos_quantile, 0, 0.5, lo_open=True, optional=True,
                     what="(null = no out-of-scope logit)")
        check_number("replay_ratio", self.replay_ratio, 0, lo_open=True, optional=True,
                     what="(replayed per new example and epoch; null = the whole buffer every epoch)")
        check_number("max_forgetting", self.max_forgetting, 0, 1, optional=True,
                     what="(a share of accuracy, 0.02 = 2 points; null = guard off)")
        for name in ("train_embeddings", "intent_classification", "entity_recognition"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        """From a dict of exactly these keys (a model file's `finetune` metadata); unknown keys are an error."""
        return dataclass_from_dict(cls, d, "FinetuneConfig")


# Keys that Rasa itself adds to a component's config; they are not ours to check.
RASA_KEYS = ("name", "finetuning_epoch_fraction")


def classifier_defaults() -> Dict[str, Any]:
    """SLM360Classifier's `get_default_config()`: every key of both dataclasses with its default."""
    return {**asdict(ServingConfig()), **asdict(FinetuneConfig())}


def _coerce(name: str, annotation: str, v: Any) -> Any:
    """A config.yml value in the field's declared type where the conversion is lossless
    (YAML reads 1e-3 as a string, 10.0 is an integer epoch count); anything else is passed
    through unchanged for `__post_init__` to reject with its own message."""
    if v is None or isinstance(v, bool):
        return v
    base = annotation.replace("Optional[", "").rstrip("]")
    try:
        if base == "float" and isinstance(v, (str, int, float)):
            return float(v)
        if base == "int":
            if isinstance(v, str):
                v = float(v)
            if isinstance(v, float) and v.is_integer():
                return int(v)
    except ValueError:
        pass
    return v


def from_component_config(config: Mapping[str, Any]) -> Tuple[ServingConfig, FinetuneConfig]:
    """The (serving, fine-tuning) settings of an SLM360Classifier config.yml entry (Rasa
    merges it over `classifier_defaults()`); ValueError "SLM360Classifier: invalid
    configuration: ..." naming the key otherwise."""
    user = {k: v for k, v in config.items() if k not in RASA_KEYS}
    out = []
    try:
        for cls in (ServingConfig, FinetuneConfig):
            own = {f.name: _coerce(f.name, str(f.type), user.pop(f.name)) for f in fields(cls) if f.name in user}
            out.append(cls(**own))
        if user:
            known = sorted(classifier_defaults())
            raise ValueError(f"unknown key(s) {sorted(user)}; known keys: {known}")
    except (TypeError, ValueError) as e:
        raise ValueError(f"SLM360Classifier: invalid configuration: {e}") from None
    return out[0], out[1]

