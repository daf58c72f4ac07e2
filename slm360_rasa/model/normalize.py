"""Text normalisation with offsets back to the original text (the fast path's matching key).

Normalisation (`normalize`): per character cluster (a starter plus its combining marks):
NFKC, casefold; punctuation (Unicode category P*), control and format characters (Cc, Cf)
and whitespace become one space; runs of spaces collapse; the ends are stripped.
"Book a table, please!" and "book a table please" normalise to the same string. Every
normalised character remembers the span of the original cluster it came from (casefold may
turn one character into two: 'ß' -> 'ss'), so entity offsets map back to the caller's text.
"""
from __future__ import annotations

import re
import unicodedata
from typing import List, Tuple

# ASCII needs no NFKC or casefold work; precomputing its fold keeps the common case cheap
# (the fast path must cost microseconds next to the encoder's milliseconds).
# What every separator folds to.
SEP = " "
_ASCII_FOLD = []
for _i in range(128):
    _c = chr(_i)
    _cat = unicodedata.category(_c)
    _ASCII_FOLD.append(SEP if (_c.isspace() or _cat[0] == "P" or _cat in ("Cc", "Cf")) else _c.lower())
del _i, _c, _cat
# The same fold as a str.translate table: for pure-ASCII text (most bot traffic) `match`
# normalises at C speed and builds the per-character spans only when a hit needs them.
_ASCII_TABLE = {i: f for i, f in enumerate(_ASCII_FOLD)}


_WORD = re.compile("[^ ]+")


def normalize_ascii(text: str) -> str:
    """`normalize_spans(text)[0]` for an ASCII `text`, without the spans."""
    return SEP.join(text.translate(_ASCII_TABLE).split())


def _normalize_ascii_spans(text: str) -> Tuple[str, List[int], List[int]]:
    """`_normalize_spans_general(text)` for an ASCII `text`: every character is its own
    cluster and folds to one character, so the spans follow from the runs of non-separators
    (a run's separator maps to the first separator character after the previous run)."""
    starts: List[int] = []
    words: List[str] = []
    prev_end = -1
    for m in _WORD.finditer(text.translate(_ASCII_TABLE)):
        if words:
            starts.append(prev_end)
        words.append(m.group())
        starts.extend(range(m.start(), m.end()))
        prev_end = m.end()
    return SEP.join(words), starts, [s + 1 for s in starts]


def _is_separator(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return ch.isspace() or cat[0] == "P" or cat in ("Cc", "Cf")


def normalize_spans(text: str) -> Tuple[str, List[int], List[int]]:
    """`normalize` plus the end (exclusive) in the original text of each normalised char's cluster."""
    # Most bot traffic and training data is ASCII: C-speed translate + regex instead of a
    # Python loop per character.
    return _normalize_ascii_spans(text) if text.isascii() else _normalize_spans_general(text)


def _normalize_spans_general(text: str) -> Tuple[str, List[int], List[int]]:
    """`_normalize_spans` for any text: one character cluster at a time."""
    out: List[str] = []
    starts: List[int] = []
    ends: List[int] = []
    n = len(text)
    i = 0

    def emit(chars: str, a: int, b: int) -> None:
        for ch in chars:
            o = ord(ch)
            if (_ASCII_FOLD[o] == SEP) if o < 128 else _is_separator(ch):
                # Collapse separator runs; never lead with one (stripping).
                if out and out[-1] != SEP:
                    out.append(SEP)
                    starts.append(a)
                    ends.append(b)
            else:
                out.append(ch)
                starts.append(a)
                ends.append(b)

    while i < n:
        ch = text[i]
        o = ord(ch)
        if o < 128 and (i + 1 == n or ord(text[i + 1]) < 128):
            emit(_ASCII_FOLD[o], i, i + 1)
            i += 1
            continue
        # A cluster = a starter and the combining marks after it, normalised together so
        # 'e' + U+0301 becomes 'é' exactly as the precomposed character does.
        j = i + 1
        while j < n and unicodedata.combining(text[j]):
            j += 1
        cluster = unicodedata.normalize("NFKC", text[i:j]).casefold()
        emit(unicodedata.normalize("NFKC", cluster), i, j)
        i = j
    if out and out[-1] == SEP:
        out.pop()
        starts.pop()
        ends.pop()
    return "".join(out), starts, ends


def normalize(text: str) -> Tuple[str, List[int]]:
    """Normalised text and, for each of its characters, its position in `text`.

    NFKC + casefold per character cluster; punctuation, control/format characters and
    whitespace fold to single spaces; stripped. `index[i]` is where normalised character i
    starts in `text` (several normalised characters may share one: 'ß' -> 'ss').
    Non-string input normalises to ("", []).
    """
    if not isinstance(text, str):
        return "", []
    norm, starts, _ = normalize_spans(text)
    return norm, starts
