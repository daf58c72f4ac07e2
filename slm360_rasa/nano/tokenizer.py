"""The SLM360 Nano tokenizer: an 8,192-token lowercase WordPiece, trained with `tokenizers`.

Two halves:

- `train_tokenizer` builds `nano/assets/tokenizer.json` from a corpus with one utterance
  per line. Run it as ``python -m slm360_rasa.nano.tokenizer --corpus PATH --out PATH``.
  Training is reproducible: the same corpus and arguments give a byte-identical file.
- `NanoTokenizer` loads that file and turns a batch of texts into padded numpy arrays:
  ids, attention mask, character offsets into the original text, lengths and a truncation
  flag (`TokenBatch`).

Special tokens have fixed ids, which the model and the checkpoints rely on:

    [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4

Every encoded text is ``[CLS] tokens... [SEP]``; an empty or whitespace-only text is just
``[CLS] [SEP]``. Inputs longer than `max_length` (which counts [CLS] and [SEP]) keep their
first ``max_length - 2`` tokens, end with [SEP], and log a warning on the "slm360_rasa"
logger.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..checks import check_int
from ..fileio import atomic_write_bytes
from .assets import tokenizer_path

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Order matters: a token's position in this list is its id.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
CONTINUING_SUBWORD_PREFIX = "##"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MAX_LENGTH = 512  # NanoConfig.max_seq_len
CORPUS_ENV_VAR = "SLM360_CORPUS"
DEFAULT_CORPUS = Path("..") / "shared" / "corpus" / "utterances.txt"
ASSET_PATH = tokenizer_path()

_PREVIEW_CHARS = 40  # how much of a truncated text the warning quotes
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file or argument is unusable; the message names it and says what to do."""


# ---------------------------------------------------------------------------- training


def _build_untrained(vocab: Optional[Dict[str, int]] = None):
    """A WordPiece tokenizer (empty, or over `vocab`) with the Nano normalizer, pre-tokenizer, template, decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUING_SUBWORD_PREFIX)
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        # Pairs are not used by the encoder, but a complete template keeps the file usable
        # by other tools (e.g. `transformers`) that expect one.
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    tok.decoder = decoders.WordPiece(prefix=CONTINUING_SUBWORD_PREFIX)
    return tok


def _train(corpus: Path, vocab_size: int, min_frequency: int, seeds: Sequence[str]):
    """One run of tokenizers' WordPiece trainer; `seeds` get fixed ids right after the specials."""
    from tokenizers import trainers

    tok = _build_untrained()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS) + list(seeds),
        continuing_subword_prefix=CONTINUING_SUBWORD_PREFIX,
        show_progress=False,
    )
    tok.train([str(corpus)], trainer=trainer)
    return tok


def train_tokenizer(
    corpus_path: PathLike,
    out_path: PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
) -> Path:
    """Train the Nano WordPiece tokenizer on `corpus_path` and write it to `out_path`.

    The corpus is a UTF-8 text file with one utterance per line. The result has exactly
    `vocab_size` tokens with the special tokens at ids 0-4 (see the module docstring);
    a corpus too small to reach that size is an error rather than a silently smaller
    vocabulary, because the model's embedding table is sized by `NanoConfig.vocab_size`.
    The file is written atomically and is byte-identical across runs on the same input.
    Returns the output path.
    """
    corpus = Path(corpus_path)
    out = Path(out_path)
    # More tokens than the special ones, or there is nothing to learn.
    check_int("vocab_size", vocab_size, lo=len(SPECIAL_TOKENS) + 1, error=TokenizerError)
    check_int("min_frequency", min_frequency, lo=0, error=TokenizerError)
    if not corpus.is_file():
        raise FileNotFoundError(
            f"tokenizer corpus {corpus} does not exist (cwd: {Path.cwd()}); pass --corpus PATH "
            f"or set {CORPUS_ENV_VAR} to a text file with one utterance per line"
        )

    # tokenizers' trainer numbers the "##c" continuation characters in Rust HashMap order,
    # which is randomly seeded per process; merge ties are broken by those ids, so the
    # learned vocabulary itself (not just its ids) varies between runs. Registering the
    # continuation characters up front, sorted, fixes every initial id and makes training
    # reproducible. The first pass (no merges) asks the trainer itself which ones occur.
    continuation = sorted(
        t for t in _train(corpus, len(SPECIAL_TOKENS), min_frequency, ()).get_vocab()
        if t.startswith(CONTINUING_SUBWORD_PREFIX) and len(t) == len(CONTINUING_SUBWORD_PREFIX) + 1
    )
    trained = _train(corpus, vocab_size, min_frequency, continuation)

    # Rebuild from the learned vocabulary so that only the five real specials are
    # "added tokens" (the seeded continuation characters must stay ordinary vocabulary).
    vocab = trained.get_vocab(with_added_tokens=True)
    tok = _build_untrained(vocab)
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise TokenizerError(
            f"training on {corpus} produced {got} tokens, not the requested {vocab_size}; the corpus is "
            f"too small or too repetitive for this vocabulary, so lower --vocab-size or --min-frequency"
        )
    if got > vocab_size:
        raise TokenizerError(
            f"{corpus} has {got} distinct characters and continuation characters (plus specials), more "
            f"than vocab_size={vocab_size}; raise --vocab-size or clean the corpus"
        )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:  # guards against a change in tokenizers' trainer
            raise TokenizerError(f"{token} got id {tok.token_to_id(token)} instead of {expected_id} after training")

    data = (tok.to_str(pretty=True) + "\n").encode("utf-8")
    atomic_write_bytes(out, data)
    return out


# ---------------------------------------------------------------------------- encoding


@dataclass
class TokenBatch:
    """A padded batch of encoded texts; B = number of texts, T = longest row (incl. specials)."""

    ids: np.ndarray  # (B, T) int32 token ids, padded with pad_id
    mask: np.ndarray  # (B, T) int32, 1 for real tokens (incl. [CLS]/[SEP]), 0 for padding
    offsets: np.ndarray  # (B, T, 2) int32 [start, end) code-point offsets into the original text; (0, 0) for specials and padding
    lengths: np.ndarray  # (B,) int32 number of real tokens per row (= mask.sum(1))
    truncated: np.ndarray  # (B,) bool, True where the text was cut to max_length

    def __len__(self) -> int:
        """Number of texts in the batch."""
        return int(self.ids.shape[0])


class NanoTokenizer:
    """Loads a Nano `tokenizer.json` and encodes texts into `TokenBatch` arrays.

    Use `NanoTokenizer.load()` for the shipped tokenizer or `NanoTokenizer.load(path)` for
    another file. Encoding is deterministic and never raises on any Python `str`.
    """

    def __init__(self, tokenizer, path: Optional[Path], sha256: str) -> None:
        """Wrap a `tokenizers.Tokenizer`; prefer `NanoTokenizer.load`, which validates the file."""
        self._tok = tokenizer
        self._path = path
        self._sha256 = sha256
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Truncation is done here, not by tokenizers' enable_truncation: that setting is
        # mutable state on a shared object (racy across threads, and re-configuring it per
        # call would be needed for a per-call max_length), and it hides how many tokens
        # were dropped, which the warning reports.
        self._tok.no_truncation()
        self._tok.no_padding()
        # User text that happens to contain "[CLS]" or "[PAD]" is tokenized as text, so no
        # input can inject a control token into a row (or a [PAD] with mask 1).
        self._tok.encode_special_tokens = True

    # -- construction

    @classmethod
    def load(cls, path: Optional[PathLike] = None) -> "NanoTokenizer":
        """Load a tokenizer.json (default: the one shipped in `slm360_rasa/nano/assets/`).

        Raises FileNotFoundError if the file is missing and TokenizerError if it is not a
        Nano WordPiece tokenizer (wrong format or wrong special-token ids).
        """
        from tokenizers import Tokenizer

        p = ASSET_PATH if path is None else Path(path)
        if not p.is_file():
            hint = (
                "the package asset is missing; rebuild it with "
                "`python -m slm360_rasa.nano.tokenizer --corpus PATH`"
                if path is None
                else "pass the path of a tokenizer.json written by train_tokenizer"
            )
            raise FileNotFoundError(f"tokenizer file {p} does not exist; {hint}")
        data = p.read_bytes()
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(
                f"{p} is not a tokenizers tokenizer.json ({type(exc).__name__}: {exc}); "
                f"pass a file written by train_tokenizer"
            ) from exc
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            got = tok.token_to_id(token)
            if got != expected_id:
                raise TokenizerError(
                    f"{p} maps {token} to id {got}, but SLM360 Nano needs it at id {expected_id} "
                    f"({', '.join(f'{t}={i}' for i, t in enumerate(SPECIAL_TOKENS))}); "
                    f"retrain it with train_tokenizer"
                )
        return cls(tok, p, hashlib.sha256(data).hexdigest())

    # -- properties

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Id of [PAD] (always 0)."""
        return PAD_ID

    @property
    def sha256(self) -> str:
        """sha256 hex digest of the tokenizer.json bytes; checkpoints record it."""
        return self._sha256

    @property
    def path(self) -> Optional[Path]:
        """The file this tokenizer was loaded from."""
        return self._path

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of `token`, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """Surface string of `token_id` (continuation pieces keep their "##")."""
        return self._tok.id_to_token(int(token_id))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to normalised text (lowercase, no accents); specials and padding dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    # -- encoding

    def encode(self, text: str, max_length: int = DEFAULT_MAX_LENGTH) -> TokenBatch:
        """Encode one text; the result is a `TokenBatch` with B = 1."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for a list of texts")
        return self.encode_batch([text], max_length=max_length)

    def encode_batch(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> TokenBatch:
        """Encode a list of texts into one padded `TokenBatch` (T = longest row).

        `max_length` counts [CLS] and [SEP] and must be at least 2. Longer texts are
        truncated to their first ``max_length - 2`` tokens plus [SEP], flagged in
        `truncated`, and a warning is logged for each.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got a single str; wrap it in a list or use encode")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, not str; convert it to str first")
        max_length = check_int("max_length (it counts [CLS] and [SEP])", max_length, lo=2)

        n = len(texts)
        if n == 0:
            return TokenBatch(
                ids=np.zeros((0, 0), np.int32),
                mask=np.zeros((0, 0), np.int32),
                offsets=np.zeros((0, 0, 2), np.int32),
                lengths=np.zeros((0,), np.int32),
                truncated=np.zeros((0,), bool),
            )

        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        except TypeError:
            # Lone surrogates (e.g. from broken UTF-16 decoding) cannot cross into Rust.
            # Replacing each with U+FFFD keeps every code-point offset valid for the original.
            encodings = self._tok.encode_batch([_LONE_SURROGATE.sub("\ufffd", t) for t in texts])
        # Each attribute access on an Encoding builds a fresh Python list, so read once.
        rows = [e.ids for e in encodings]
        full = [len(r) for r in rows]
        T = min(max(full), max_length)

        ids = np.zeros((n, T), dtype=np.int32)  # PAD_ID == 0
        offsets = np.zeros((n, T, 2), dtype=np.int32)
        lengths = np.empty(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        for i, (row, enc) in enumerate(zip(rows, encodings)):
            L = full[i]
            if L <= max_length:
                ids[i, :L] = row
                offsets[i, :L] = enc.offsets  # the template gives [CLS]/[SEP] offsets (0, 0)
                lengths[i] = L
                continue
            # Same result as tokenizers' own truncation with this template: content cut to
            # max_length - 2 tokens, then [CLS] ... [SEP] around it.
            ids[i, : max_length - 1] = row[: max_length - 1]
            ids[i, max_length - 1] = SEP_ID
            offsets[i, : max_length - 1] = enc.offsets[: max_length - 1]
            lengths[i] = max_length
            truncated[i] = True
            logger.warning(
                "text %d truncated to max_length=%d tokens: %d token(s) dropped; text starts %r%s",
                i,
                max_length,
                L - max_length,
                texts[i][:_PREVIEW_CHARS],
                "..." if len(texts[i]) > _PREVIEW_CHARS else "",
            )
        mask = (np.arange(T, dtype=np.int32)[None, :] < lengths[:, None]).astype(np.int32)
        return TokenBatch(ids=ids, mask=mask, offsets=offsets, lengths=lengths, truncated=truncated)


# ---------------------------------------------------------------------------- CLI


def _default_corpus() -> Path:
    """Corpus path from $SLM360_CORPUS, else ../shared/corpus/utterances.txt from the cwd."""
    env = os.environ.get(CORPUS_ENV_VAR)
    return Path(env) if env else DEFAULT_CORPUS


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: train the tokenizer and print the output path, vocabulary size and sha256."""
    parser = argparse.ArgumentParser(
        prog="python -m slm360_rasa.nano.tokenizer",
        description="Train the SLM360 Nano WordPiece tokenizer (reproducible: same corpus -> same bytes).",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help=f"UTF-8 text file, one utterance per line (default: ${CORPUS_ENV_VAR}, else {DEFAULT_CORPUS})",
    )
    parser.add_argument(
        "--out", type=Path, default=ASSET_PATH, help="where to write tokenizer.json (default: the package asset)"
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary size incl. specials")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge")
    args = parser.parse_args(argv)

    corpus = args.corpus if args.corpus is not None else _default_corpus()
    try:
        out = train_tokenizer(corpus, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    except (FileNotFoundError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tok = NanoTokenizer.load(out)
    print(f"wrote {out}: vocab_size={tok.vocab_size} sha256={tok.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
