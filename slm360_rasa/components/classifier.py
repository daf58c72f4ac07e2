"""`SLM360Classifier`: intents + entities for Rasa 3.6 from a fine-tuned SLM360 Nano encoder.

    pipeline:
      - name: WhitespaceTokenizer
      - name: slm360_rasa.SLM360Classifier
        epochs: 10

Training fine-tunes the shipped pretrained encoder plus an intent head and a BILOU entity
head with our numpy code (no TensorFlow); prediction runs the numba INT4 runtime. The output
has exactly DIET's shapes (`intent`, `intent_ranking`, `entities` with `confidence_entity` and
`extractor`), so EntitySynonymMapper, FallbackClassifier, policies and `rasa test nlu`
consume it unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Text, Type

from rasa.engine.graph import ExecutionContext, GraphComponent
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.engine.storage.storage import ModelStorage
from rasa.nlu.classifiers.classifier import IntentClassifier
from rasa.nlu.extractors.extractor import EntityExtractorMixin
from rasa.shared.nlu.constants import ENTITIES, INTENT, INTENT_RANKING_KEY, PREDICTED_CONFIDENCE_KEY, TEXT
from rasa.shared.nlu.training_data.message import Message
from rasa.shared.nlu.training_data.training_data import TrainingData

logger = logging.getLogger(__name__)

MODEL_FILE = "slm360_classifier.safetensors"
# Overrides max_forgetting for one `rasa train --finetune` run (config changes block finetuning).
MAX_FORGETTING_ENV = "SLM360_MAX_FORGETTING"
FASTPATH_FILE = "fastpath.json"


@DefaultV1Recipe.register(
    [DefaultV1Recipe.ComponentType.INTENT_CLASSIFIER, DefaultV1Recipe.ComponentType.ENTITY_EXTRACTOR],
    is_trainable=True,
)
class SLM360Classifier(GraphComponent, IntentClassifier, EntityExtractorMixin):
    """Fine-tunes SLM360 Nano on the bot's NLU data; predicts intents and entities."""

    # Pattern fast path (slm360_rasa/model/fastpath.py), built in `train`, restored in `load`;
    # None (a model without one) means no patterns.
    _fastpath = None

    @staticmethod
    def get_default_config() -> Dict[Text, Any]:
        """Defaults; every key can be set in config.yml. Each key is declared once, with its
        default, its check and a comment saying what it does, in slm360_rasa/config.py
        (`ServingConfig` and `FinetuneConfig`)."""
        from ..config import classifier_defaults

        return classifier_defaults()

    def __init__(self, config: Dict[Text, Any], model_storage: ModelStorage, resource: Resource,
                 execution_context: ExecutionContext, model=None) -> None:
        """Use `create` or `load`; `model` is a trained `IntentEntityModel` or None."""
        from ..config import from_component_config

        self.component_config = config
        self._model_storage = model_storage
        self._resource = resource
        self._execution_context = execution_context
        self._model = model
        # Validated here, at graph construction, so a bad key fails before any training.
        self._serving, self._training = from_component_config(config)

    def _build_fastpath(self, training_data: TrainingData):
        """The pattern fast path of this training data: its intent examples (text, intent,
        entities), regex features and lookup tables."""
        from ..model.fastpath import FastPath, FastPathConfig

        examples = [m for m in training_data.intent_examples if m.get(TEXT) is not None]
        return FastPath.build([m.get(TEXT) for m in examples], [m.get(INTENT) for m in examples],
                              [m.get(ENTITIES) or [] for m in examples],
                              regexes=training_data.regex_features, lookups=training_data.lookup_tables,
                              config=FastPathConfig(mode=self._serving.mode))

    @classmethod
    def create(cls, config: Dict[Text, Any], model_storage: ModelStorage, resource: Resource,
               execution_context: ExecutionContext) -> "SLM360Classifier":
        """An untrained component."""
        return cls(config, model_storage, resource, execution_context)

    # ------------------------------------------------------------------ training

    def train(self, training_data: TrainingData) -> Resource:
        """Fine-tune on the intent examples (and their entities), then persist.

        Under `rasa train --finetune` the previous model is updated by
        `train.continual.ContinualLearner` (replay + EWC + validation guard); a refused
        update persists the previous weights unchanged and raises a warning.
        """
        examples = [m for m in training_data.intent_examples if m.get(TEXT) is not None]
        if not examples:
            logger.warning("SLM360Classifier: no intent examples in the training data; nothing to train.")
            return self._resource
        texts = [m.get(TEXT) for m in examples]
        intents = [m.get(INTENT) for m in examples]
        entities = [[e for e in (m.get(ENTITIES) or []) if "start" in e and "end" in e] for m in examples]
        cfg = self._training
        refused = False
        if self._execution_context.is_finetuning and self._model is not None:
            # `rasa train --finetune`: continue from the previous model (its INT4 weights,
            # dequantized, are the starting point) for the epochs Rasa scaled, with replay and
            # EWC, and keep the result only if the old held-out accuracy holds (train/continual.py).
            from dataclasses import replace

            from ..train.continual import ContinualLearner

            cfg = replace(cfg, max_forgetting=_max_forgetting_override(cfg.max_forgetting))
            logger.info("SLM360Classifier: fine-tuning the previous model for %d epochs", cfg.epochs)
            learner = ContinualLearner(self._model, cfg)
            report = learner.learn(texts, intents, entities, progress=True)
            self._model = learner.model
            refused = not report.accepted
            if refused:
                import rasa.shared.utils.io

                rasa.shared.utils.io.raise_warning(
                    f"SLM360Classifier: `--finetune` REFUSED the update and kept the previous model's weights: "
                    f"accuracy on {report.n_guard} {'held-out' if report.guard == 'holdout' else 'replayed'} "
                    f"examples of the previous training data dropped "
                    f"from {100 * report.accuracy_before:.1f}% to {100 * report.accuracy_after:.1f}% "
                    f"({100 * report.drop:.1f} points), more than max_forgetting = {report.max_forgetting} "
                    f"({100 * report.max_forgetting:.1f} points). Check the new data for examples that "
                    f"contradict the old labels. To accept the update anyway, run the finetune again with the "
                    f"environment variable {MAX_FORGETTING_ENV}=<a larger share, e.g. 0.1> or "
                    f"{MAX_FORGETTING_ENV}=off (changing max_forgetting in config.yml makes Rasa refuse to "
                    f"finetune), or retrain from scratch with `rasa train`.")
        else:
            from ..train.finetune import finetune

            self._model = finetune(texts, intents, entities, cfg, checkpoint=self._serving.checkpoint,
                                   precision=self._serving.precision)
        if not refused:  # a refused update keeps the previous fast path (restored by `load`) too
            self._fastpath = self._build_fastpath(training_data)
        self.persist()
        return self._resource

    def persist(self) -> None:
        """Write the model into this component's resource (safetensors + JSON)."""
        if self._model is None:
            return
        with self._model_storage.write_to(self._resource) as model_dir:
            self._model.save(model_dir / MODEL_FILE)
            if self._fastpath is not None:
                import json

                (model_dir / FASTPATH_FILE).write_text(json.dumps(self._fastpath.to_dict(), ensure_ascii=False),
                                                       encoding="utf-8")

    @classmethod
    def load(cls, config: Dict[Text, Any], model_storage: ModelStorage, resource: Resource,
             execution_context: ExecutionContext, **kwargs: Any) -> "SLM360Classifier":
        """Load the persisted model; a missing resource gives an untrained instance, like DIET.

        A resource that exists but holds a corrupt or foreign file raises an error naming it.
        """
        from ..model import IntentEntityModel

        try:
            reader = model_storage.read_from(resource)
            model_dir = reader.__enter__()
        except ValueError:
            logger.warning(f"SLM360Classifier: no trained model in resource '{resource.name}'; "
                           "using an untrained component (it predicts nothing). Train the model first.")
            return cls(config, model_storage, resource, execution_context)
        try:
            path = model_dir / MODEL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"SLM360Classifier: model file missing from the trained model: {path}. "
                                        "Retrain the model with `rasa train`.")
            # `rasa train --finetune` needs the training state (master weights, replay buffer,
            # Fisher); serving reads only the INT4 codes, heads and patterns.
            model = IntentEntityModel.load(path, training=execution_context.is_finetuning)
            fastpath = _load_fastpath(model_dir / FASTPATH_FILE)
        finally:
            reader.__exit__(None, None, None)
        # Compile (or load from numba's cache) the serving kernels here, at `rasa run` start-up:
        # otherwise the first user message pays for it (up to ~30 s on a fresh install).
        logger.debug("SLM360Classifier: encoder warmed up in %.2f s", model.warm_up())
        if fastpath is not None and model.intents:
            dropped = fastpath.restrict(model.intents)
            if dropped:
                logger.warning(f"SLM360Classifier: {dropped} fast-path pattern(s) in {FASTPATH_FILE} name intents "
                               "the model does not know; they are ignored. Retrain with `rasa train` to rebuild "
                               "the patterns from the training data.")
        component = cls(config, model_storage, resource, execution_context, model=model)
        component._fastpath = fastpath
        return component

    # ------------------------------------------------------------------ prediction

    def process(self, messages: List[Message]) -> List[Message]:
        """Set intent, intent_ranking and entities on each message.

        In hybrid and pattern mode the fast path looks first; messages it answers fully (exact
        training text, entities known) skip the encoder, the rest go through ONE batched
        encoder call (none in pattern mode). Arbitration: slm360_rasa/model/fastpath.py.
        """
        from ..model.fastpath import arbitrate, needs_encoder

        if self._model is None or not messages:
            return messages
        cfg = self._training
        mode = self._serving.mode
        texts = [_safe_text(m.get(TEXT)) for m in messages]
        use_patterns = mode != "semantic" and self._fastpath is not None
        hits = [self._fastpath.match(t) if use_patterns else None for t in texts]
        wants_entities = bool(cfg.entity_recognition and self._model.entity_types)
        todo = [i for i, h in enumerate(hits) if needs_encoder(h, mode, wants_entities)]
        preds = dict(zip(todo, self._model.predict([texts[i] for i in todo]))) if todo else {}
        for i, message in enumerate(messages):
            pred, hit = preds.get(i), hits[i]
            if cfg.intent_classification and self._model.intents:
                probs = arbitrate(hit, pred.intent_probs if pred is not None else None, self._model.intents, mode)
                if probs is None:
                    # Nothing to read (empty or all-control-character text) or, in pattern mode,
                    # no pattern: answer as DIET does on empty text, no intent at confidence 0,
                    # which FallbackClassifier turns into nlu_fallback.
                    message.set(INTENT, {"name": None, PREDICTED_CONFIDENCE_KEY: 0.0}, add_to_output=True)
                    message.set(INTENT_RANKING_KEY, [], add_to_output=True)
                else:
                    self._set_intent(message, probs)
            if hit is not None and hit.source == "exact" and hit.entities is not None:
                found = hit.entities
            else:
                found = pred.entities if pred is not None else []
            if wants_entities and found:
                entities = self.add_extractor_name([dict(e) for e in found])
                message.set(ENTITIES, message.get(ENTITIES, []) + entities, add_to_output=True)
        return messages

    def _set_intent(self, message: Message, probs) -> None:
        """`intent` and `intent_ranking` (DIET's shapes) from probabilities over the model's intents."""
        import numpy as np

        order = np.argsort(-probs, kind="stable")
        names = self._model.intents
        k = self._serving.ranking_length or len(order)
        ranking = [{"name": names[i], PREDICTED_CONFIDENCE_KEY: float(probs[i])} for i in order[:k]]
        message.set(INTENT, dict(ranking[0]), add_to_output=True)
        message.set(INTENT_RANKING_KEY, ranking, add_to_output=True)

    @classmethod
    def fingerprint_addon(cls, config: Dict[str, Any]) -> Optional[str]:
        """Tie Rasa's training cache to the starting checkpoint's bytes and our version, so a
        new checkpoint or package release retrains instead of reusing a cached model."""
        from .featurizer import SLM360Featurizer

        return SLM360Featurizer.fingerprint_addon(config)

    @classmethod
    def required_components(cls) -> List[Type]:
        """None: the encoder has its own tokenizer (a Rasa tokenizer may still precede it)."""
        return []


def _load_fastpath(path):
    """The fast path persisted at `path`; none (a warning) for models trained before it existed."""
    import json

    from ..model.fastpath import FastPath

    if not path.is_file():
        logger.warning(f"SLM360Classifier: no {FASTPATH_FILE} in the trained model (trained by an older "
                       "slm360-rasa); running without patterns. Retrain with `rasa train` to enable them.")
        return None
    try:
        return FastPath.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"SLM360Classifier: corrupt fast path file {path}: {e}. "
                         "Retrain the model with `rasa train`.") from None


def _max_forgetting_override(configured: Optional[float]) -> Optional[float]:
    """max_forgetting for this finetune: $SLM360_MAX_FORGETTING (a share in [0, 1], or
    off/none/null) when set, else the configured value."""
    import os

    raw = os.environ.get(MAX_FORGETTING_ENV)
    if raw is None or not raw.strip():
        return configured
    if raw.strip().lower() in ("off", "none", "null"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise ValueError(f"SLM360Classifier: {MAX_FORGETTING_ENV}={raw!r}: expected a share of accuracy in [0, 1] "
                         "(0.02 = 2 points) or 'off'")
    return value


def _safe_text(text: Optional[str]) -> str:
    # Rasa may hand over None for messages without text (e.g. a bare /intent payload).
    return text if isinstance(text, str) else ""


def _declare_trainable_entity_extractor() -> None:
    """Add SLM360Classifier to the list of trainable entity extractors in Rasa's recipe validator.

    Rasa 3.6 checks a pipeline against a fixed list (Mitie, CRF, DIET) and otherwise warns on
    every `rasa train` with entity examples that the configuration "does not include an entity
    extractor", which is false for this component and would send users to add DIET back.
    """
    try:
        from rasa.graph_components.validators import default_recipe_validator as validator
    except ImportError:  # a Rasa without this validator has nothing to tell
        return
    known = getattr(validator, "TRAINABLE_EXTRACTORS", None)
    if isinstance(known, list) and SLM360Classifier not in known:
        known.append(SLM360Classifier)


_declare_trainable_entity_extractor()
