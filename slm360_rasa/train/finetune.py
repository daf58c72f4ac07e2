"""`finetune`: train a new SLM360Classifier model from a pretrained encoder, in one call.

The recipe `rasa train` runs (components/classifier.py) and scripts share:

    model = finetune(texts, intents, entities, FinetuneConfig(epochs=10))
    model.save("model.safetensors")
    model.predict(["book a table for two"])

= `Trainer.fit` (train/trainer.py: fine-tuning, then temperature calibration on held-out
examples) followed by `continual.remember` (the replay buffer and Fisher diagonal that a
later `rasa train --finetune` needs).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..config import FinetuneConfig
from ..model.intent_entity import IntentEntityModel
from .continual import remember
from .trainer import Trainer, start_model


def finetune(texts: Sequence[str], intents: Optional[Sequence[str]], entities: Optional[Sequence[Sequence[dict]]],
             cfg: FinetuneConfig, checkpoint: Optional[str] = None, precision: str = "int4",
             progress: bool = True) -> IntentEntityModel:
    """A model fine-tuned on the examples from `checkpoint` (default: the shipped encoder),
    calibrated, with its continual-learning state; `entities[i]` are dicts with start, end,
    entity (char offsets of `texts[i]`)."""
    model, params = start_model(cfg, checkpoint=checkpoint, precision=precision, max_length=cfg.max_length)
    trainer = Trainer(model, cfg, params)
    trainer.fit(texts, intents, entities, progress=progress)
    remember(trainer)
    return model
