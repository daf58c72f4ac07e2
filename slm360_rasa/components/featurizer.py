"""`SLM360Featurizer`: SLM360 Nano dense features for a Rasa 3.6 NLU pipeline.

    pipeline:
      - name: WhitespaceTokenizer
      - name: slm360_rasa.SLM360Featurizer   # sequence (n_tokens, 256) + sentence (1, 256)
      - name: DIETClassifier

Like Rasa's LanguageModelFeaturizer, it runs a pretrained encoder over the text and maps
the encoder's WordPiece vectors back onto the tokens of the Rasa tokenizer earlier in the
pipeline, so every downstream component sees exactly one vector per Rasa token:

- sequence feature of a Rasa token = mean of the encoder token vectors whose character
  span overlaps the Rasa token's span ([CLS]/[SEP] excluded); a Rasa token that no encoder
  token overlaps (its text was cut by truncation, or it is zero-width) gets zeros;
- sentence feature = the encoder's mean-pooled vector, i.e. the mean over all encoder
  tokens of the text, the same vector as `Encoder.encode`.

The component is not trainable and persists nothing: the `checkpoint` it names has to be
readable wherever the trained Rasa model is loaded (relative paths resolve against the
working directory). The encoder itself is loaded once per component, on first use.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Text, Tuple, Type

import numpy as np

from rasa.engine.graph import ExecutionContext, GraphComponent
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.engine.storage.storage import ModelStorage
from rasa.nlu.constants import DENSE_FEATURIZABLE_ATTRIBUTES, TOKENS_NAMES
from rasa.nlu.featurizers.dense_featurizer.dense_featurizer import DenseFeaturizer
from rasa.nlu.tokenizers.tokenizer import Token, Tokenizer
from rasa.shared.exceptions import InvalidConfigException
from rasa.shared.nlu.constants import ACTION_TEXT, TEXT
from rasa.shared.nlu.training_data.message import Message
from rasa.shared.nlu.training_data.training_data import TrainingData

from ..fileio import file_sha256
from ..nano.config import MAX_SEQ_LEN, MIN_SEQ_LEN, PRECISIONS

logger = logging.getLogger(__name__)

POOLINGS = ("mean",)

# At inference only the user's text and an action's text are featurized: the other dense
# attributes (responses) are labels whose features the classifier stores at training time.
# LanguageModelFeaturizer makes the same choice.
INFERENCE_ATTRIBUTES = (TEXT, ACTION_TEXT)

# process_training_data encodes this many texts per Encoder call: large enough to batch
# well, small enough that the token states of a 100k-example data set never sit in memory
# all at once (each encoder token is a 1 KiB float32 vector).
TRAINING_TEXTS_PER_CALL = 1024


def align_to_tokens(states: np.ndarray, offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Mean of the encoder vectors overlapping each character span; zeros where none does.

    Args:
        states: (T, C) encoder token states of one text, [CLS] first and [SEP] last.
        offsets: (T, 2) [start, end) character offsets of those tokens into the text.
        spans: (n, 2) [start, end) character spans of the Rasa tokens.

    Returns:
        (n, C) float32: row i is the mean of the states whose span overlaps spans[i].
    """
    T = states.shape[0]
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    offsets = np.asarray(offsets, dtype=np.int64)
    # Specials are recognised by position, not by id: a user can type "[SEP]" as text,
    # and then those pieces are ordinary text tokens with real offsets.
    content = np.zeros(T, dtype=bool)
    content[1 : T - 1] = True
    starts, ends = offsets[:, 0], offsets[:, 1]
    content &= ends > starts  # a zero-width piece overlaps nothing
    overlap = (starts[None, :] < spans[:, 1:2]) & (ends[None, :] > spans[:, 0:1]) & content[None, :]  # (n, T)
    counts = overlap.sum(axis=1, keepdims=True)  # (n, 1)
    summed = overlap.astype(np.float32) @ states.astype(np.float32, copy=False)  # (n, C)
    return (summed / np.maximum(counts, 1)).astype(np.float32, copy=False)


@DefaultV1Recipe.register(DefaultV1Recipe.ComponentType.MESSAGE_FEATURIZER, is_trainable=False)
class SLM360Featurizer(DenseFeaturizer, GraphComponent):
    """Dense sequence and sentence features from the SLM360 Nano encoder, aligned to Rasa tokens."""

    @classmethod
    def required_components(cls) -> List[Type]:
        """Components that must come before this one: a Rasa tokenizer (for the token spans)."""
        return [Tokenizer]

    @staticmethod
    def get_default_config() -> Dict[Text, Any]:
        """The component's defaults; each key can be overridden in config.yml."""
        return {
            # Featurizer name used as the origin of the features; must be unique per
            # pipeline when several featurizers are combined (DenseFeaturizer's key).
            **DenseFeaturizer.get_default_config(),
            # Path of an SLM360 Nano checkpoint (.safetensors, written by
            # `slm360_rasa.nano.checkpoint.save_checkpoint`); null = the pretrained
            # checkpoint shipped in the package (`Encoder.pretrained`). It is read again
            # wherever the trained model is loaded, so keep it at the same path.
            "checkpoint": None,
            # Weights the encoder runs with: "int4" (4-bit, ~4 MB, fast) or "f32".
            "precision": "int4",
            # Encoder tokens per text, [CLS] and [SEP] included (3..512); longer texts
            # are truncated with a warning and their cut-off Rasa tokens get zero vectors.
            "max_length": 512,
            # How the sentence feature is pooled from the encoder tokens; only "mean"
            # (the encoder's own pooling) exists for now.
            "pooling": "mean",
        }

    def __init__(self, config: Dict[Text, Any], name: Text = "SLM360Featurizer") -> None:
        """Validate `config` (merged with the defaults) and locate the checkpoint; the encoder loads on first use."""
        config = {**self.get_default_config(), **config}
        super().__init__(name, config)
        self._checkpoint_path = self._resolve_checkpoint(config["checkpoint"])
        self._encoder = None
        self._encoder_lock = threading.Lock()

    @classmethod
    def create(
        cls,
        config: Dict[Text, Any],
        model_storage: ModelStorage,
        resource: Resource,
        execution_context: ExecutionContext,
    ) -> "SLM360Featurizer":
        """Create the component for training and (being untrained) also for inference."""
        return cls(config, execution_context.node_name)

    @classmethod
    def validate_config(cls, config: Dict[Text, Any]) -> None:
        """Raise InvalidConfigException naming the bad key, the value given and the values allowed."""
        where = "SLM360Featurizer config"
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and not (
            isinstance(checkpoint, (str, os.PathLike)) and str(checkpoint).strip()
        ):
            raise InvalidConfigException(
                f"{where}: 'checkpoint' must be the path of an SLM360 Nano .safetensors checkpoint, or null "
                f"for the pretrained one shipped with slm360-rasa; got {checkpoint!r}"
            )
        precision = config.get("precision")
        if precision not in PRECISIONS:
            raise InvalidConfigException(
                f"{where}: 'precision' must be one of {list(PRECISIONS)}; got {precision!r}"
            )
        max_length = config.get("max_length")
        if (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or not MIN_SEQ_LEN <= max_length <= MAX_SEQ_LEN
        ):
            raise InvalidConfigException(
                f"{where}: 'max_length' must be an integer from {MIN_SEQ_LEN} to {MAX_SEQ_LEN} "
                f"(encoder tokens per text, [CLS] and [SEP] included); got {max_length!r}"
            )
        pooling = config.get("pooling")
        if pooling not in POOLINGS:
            raise InvalidConfigException(
                f"{where}: 'pooling' must be one of {list(POOLINGS)} (the sentence feature is the "
                f"encoder's mean pool); got {pooling!r}"
            )

    @staticmethod
    def _resolve_checkpoint(checkpoint: Optional[Any]) -> Optional[Path]:
        """The configured checkpoint as an existing file, or None for the shipped one; fails early if missing."""
        if checkpoint is None:
            from slm360_rasa.nano.assets import pretrained_checkpoint_path

            return pretrained_checkpoint_path()  # raises FileNotFoundError saying how to get it
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InvalidConfigException(
                f"SLM360Featurizer config: 'checkpoint' is {str(checkpoint)!r}, but no file exists at "
                f"{path.resolve()}; give the path of an SLM360 Nano .safetensors checkpoint (relative paths "
                f"resolve against the working directory {os.getcwd()}), or null for the shipped pretrained one"
            )
        return path

    @classmethod
    def fingerprint_addon(cls, config: Dict[str, Any]) -> Optional[str]:
        """Tie Rasa's training cache to the checkpoint's bytes, not only to its path.

        Otherwise replacing a checkpoint file in place would let `rasa train` reuse
        features computed with the old weights.
        """
        import slm360_rasa

        checkpoint = config.get("checkpoint")
        try:
            if checkpoint is None:
                from slm360_rasa.nano.assets import pretrained_checkpoint_path

                path = pretrained_checkpoint_path()
            else:
                path = Path(checkpoint).expanduser()
            content = file_sha256(path)
        except OSError:
            content = "missing"  # __init__ reports the problem properly
        return f"slm360_rasa {slm360_rasa.__version__}; checkpoint sha256 {content}"

    @property
    def encoder(self):
        """The SLM360 Nano `Encoder`, loaded on first access (thread-safe, once per component)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = self._load_encoder()
        return self._encoder

    def _load_encoder(self):
        from slm360_rasa.nano import Encoder

        cfg = self._config
        encoder = Encoder.from_checkpoint(
            self._checkpoint_path, precision=cfg["precision"], max_length=cfg["max_length"]
        )
        logger.info(
            "SLM360Featurizer: loaded %s from %s (dim %d)", encoder, self._checkpoint_path, encoder.config.dim
        )
        return encoder

    # ------------------------------------------------------------------ processing

    def process(self, messages: List[Message]) -> List[Message]:
        """Add dense features for the text (and action text) of `messages`, in one encoder call."""
        self._featurize(messages, INFERENCE_ATTRIBUTES)
        return messages

    def process_training_data(self, training_data: TrainingData) -> TrainingData:
        """Add dense features for every tokenized text, response and action text of the training data."""
        jobs = self._collect(training_data.training_examples, DENSE_FEATURIZABLE_ATTRIBUTES)
        for begin in range(0, len(jobs), TRAINING_TEXTS_PER_CALL):
            self._run(jobs[begin : begin + TRAINING_TEXTS_PER_CALL])
        return training_data

    def _featurize(self, messages: Iterable[Message], attributes: Sequence[Text]) -> None:
        self._run(self._collect(messages, attributes))

    @staticmethod
    def _collect(
        messages: Iterable[Message], attributes: Sequence[Text]
    ) -> List[Tuple[Message, Text, Text, List[Token]]]:
        """(message, attribute, text, tokens) for every attribute with non-empty text and Rasa tokens."""
        jobs = []
        for message in messages:
            for attribute in attributes:
                text = message.get(attribute)
                if not isinstance(text, str) or not text:
                    continue
                tokens = message.get(TOKENS_NAMES[attribute]) or []
                if not tokens:
                    # Only reachable without a tokenizer run on this attribute; a sequence
                    # feature with zero rows would break the classifiers downstream.
                    logger.debug("SLM360Featurizer: %r has text but no tokens; not featurized", attribute)
                    continue
                jobs.append((message, attribute, text, tokens))
        return jobs

    def _run(self, jobs: List[Tuple[Message, Text, Text, List[Token]]]) -> None:
        """Encode all job texts in one batched call and attach aligned features to their messages."""
        if not jobs:
            return
        states = self.encoder.token_states([text for _, _, text, _ in jobs])
        for (message, attribute, _, tokens), ts in zip(jobs, states):
            sequence, sentence = self._features(ts, tokens)
            self.add_features_to_message(sequence, sentence, attribute, message)

    def _features(self, token_states, tokens: List[Token]) -> Tuple[np.ndarray, np.ndarray]:
        """Sequence (n_tokens, dim) and sentence (1, dim) features of one text."""
        spans = np.array([(t.start, t.end) for t in tokens], dtype=np.int64).reshape(-1, 2)
        sequence = align_to_tokens(token_states.states, token_states.offsets, spans)
        # "mean" is the only pooling validate_config lets through.
        sentence = token_states.states.mean(axis=0, keepdims=True, dtype=np.float32)
        return sequence, sentence
