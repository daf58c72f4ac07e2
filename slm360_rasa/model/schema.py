"""The metadata schema of a trained SLM360Classifier model file, version MODEL_VERSION.

A model is one SLM360 Nano checkpoint (nano/checkpoint.py: safetensors + JSON) whose
`extra` metadata object holds exactly these keys:

    kind              "slm360-intent-entity"                      (MODEL_KIND)
    version           1                                           (MODEL_VERSION)
    precision         "int4" | "f32": the stored encoder tensors
    max_length        int in [3, 512]: tokens per message
    intents           [str]: intent head outputs, in order (may be empty)
    entity_types      [str]: sorted entity types
    tags              [str]: "O" + B/I/L/U per type (model/heads.tag_names(entity_types))
    temperature       number > 0: intent logits are divided by it
    background_logit  number | null: the out-of-scope logit (model/calibration.py)
    calibration       object: how T and b were fitted (held-out size, accuracy, ECE)
    finetune          object: the FinetuneConfig the model was trained with (config.py)
    history           [object]: one record of numbers per training epoch
    holdout           Examples JSON: held-out examples (never trained on)
    replay            Examples JSON: the replay buffer of continual learning
    fisher            {"format": "log2-q4-g32", "names": [str]}: tensors with a stored
                      Fisher diagonal (model/fisher.py)
    continual         [object]: one report per `--finetune` update

Tensors: the encoder's (nano/quant.py INT4 codes + scales, or f32 masters), `head.*`
(model/heads.py) and `fisher.*` (model/fisher.py).

`validate_metadata` checks every key before anything is built from it: a missing, extra or
wrong-typed key raises `CheckpointError` naming the file and the key, so a hand-edited or
foreign file never surfaces as a TypeError from deep inside loading.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable, Dict, Mapping

from ..checks import is_int, is_number
from ..config import FinetuneConfig
from ..nano.checkpoint import CheckpointError
from ..nano.config import MAX_SEQ_LEN, MIN_SEQ_LEN, PRECISIONS
from .examples import Examples
from .fisher import FISHER_FORMAT
from .heads import tag_names

MODEL_KIND = "slm360-intent-entity"
MODEL_VERSION = 1


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _records(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def _builds(build: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A schema entry from a constructor that validates: "" when `build(v)` succeeds, else its error."""
    def check(v: Any) -> str:
        try:
            build(v)
        except (ValueError, TypeError) as e:
            return str(e)
        return ""
    return check


def _finetune(v: Any) -> Any:
    # Every field, not only the known ones: a file that lacks one was written by another
    # version, whose default may have differed from ours.
    missing = sorted({f.name for f in fields(FinetuneConfig)} - set(v)) if isinstance(v, dict) else []
    if missing:
        raise ValueError(f"missing setting(s) {missing}")
    return FinetuneConfig.from_dict(v)


def _fisher(v: Any) -> str:
    if not isinstance(v, dict) or sorted(v) != ["format", "names"]:
        return "expected an object with keys format, names"
    if v["format"] != FISHER_FORMAT:
        return f"format {v['format']!r}, this code reads {FISHER_FORMAT!r}"
    return "" if _str_list(v["names"]) else "'names' must be a list of strings"


def _check(ok: Callable[[Any], bool], expected: str) -> Callable[[Any], str]:
    """A schema entry from a predicate: "" when `ok(v)`, else what was expected."""
    return lambda v: "" if ok(v) else f"expected {expected}"


# key -> check(value) returning "" when valid, else what is wrong. Order = the table above.
SCHEMA: Dict[str, Callable[[Any], str]] = {
    "kind": lambda v: "" if v == MODEL_KIND else f"expected {MODEL_KIND!r} (not an SLM360 intent/entity model)",
    "version": lambda v: "" if is_int(v) and v == MODEL_VERSION else
    f"model version {v!r}, this code reads {MODEL_VERSION}" + (" (upgrade slm360-rasa)" if is_int(v) and v > MODEL_VERSION else ""),
    "precision": _check(lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
    "max_length": _check(lambda v: is_int(v) and MIN_SEQ_LEN <= v <= MAX_SEQ_LEN,
                         f"an integer in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN}]"),
    "intents": _check(_str_list, "a list of strings"),
    "entity_types": _check(lambda v: _str_list(v) and v == sorted(v), "a sorted list of strings"),
    "tags": _check(_str_list, "a list of strings"),
    "temperature": _check(lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "background_logit": _check(lambda v: v is None or _finite(v), "a finite number or null"),
    "calibration": _check(lambda v: isinstance(v, dict), "an object"),
    "finetune": _builds(_finetune),
    "history": _check(_records, "a list of objects"),
    "holdout": _builds(Examples.from_json),
    "replay": _builds(Examples.from_json),
    "fisher": _fisher,
    "continual": _check(_records, "a list of objects"),
}


def validate_metadata(extra: Mapping[str, Any], path: Any) -> None:
    """Raise CheckpointError naming `path` and the key unless `extra` matches SCHEMA exactly
    (no key missing, none extra, each of the right type) and `tags` follow `entity_types`."""
    if not isinstance(extra, Mapping) or extra.get("kind") != MODEL_KIND:
        kind = extra.get("kind") if isinstance(extra, Mapping) else None
        raise CheckpointError(f"{path}: not an SLM360 intent/entity model (kind={kind!r}); "
                              "it may be a pretrained encoder checkpoint or another file")
    missing = [k for k in SCHEMA if k not in extra]
    if missing:
        raise CheckpointError(f"{path}: model metadata is missing key(s) {missing} (a file from an older "
                              "slm360-rasa or an edited file); retrain the model with `rasa train`")
    unknown = sorted(set(extra) - set(SCHEMA))
    if unknown:
        raise CheckpointError(f"{path}: model metadata has unknown key(s) {unknown} (a file from a newer "
                              "slm360-rasa or an edited file)")
    for key, check in SCHEMA.items():
        problem = check(extra[key])
        if problem:
            raise CheckpointError(f"{path}: invalid model metadata key {key!r}: {problem}")
    if extra["tags"] != tag_names(extra["entity_types"]):
        raise CheckpointError(f"{path}: invalid model metadata key 'tags': they do not match entity_types "
                              f"{extra['entity_types']}")
