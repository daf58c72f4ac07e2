"""The served model: heads, labels, calibration, `predict`, and the versioned model file.

Imports only `nano/` and the configuration (never `train/`, never Rasa), so `rasa run`
loads no training code. `IntentEntityModel` is the SLM360Classifier's model.
"""
from .intent_entity import IntentEntityModel, Prediction, TrainingState

__all__ = ["IntentEntityModel", "Prediction", "TrainingState"]
