"""Rasa 3.x NLU training data written from the benchmark's examples, and checked by reading it back.

Entities go into Rasa's markdown annotation (`[value](entity)`), with every character Rasa's
format gives meaning to quoted so the text comes back exactly; `verify_round_trip` proves it
with Rasa's own loader before a model is trained on the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from benchmarks import CompareError
from benchmarks.datasets import Example
from benchmarks.metrics import FALLBACK_INTENT

# Rasa strips these from both ends of every example (rasa_yaml.STRIP_SYMBOLS).
_RASA_STRIP = "\n\r "


def _yaml_quoted(s: str) -> str:
    """A YAML double-quoted scalar for any string: backslash, quote and non-printables escaped."""
    out = ['"']
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def _literal(s: str) -> str:
    # Rasa's entity regex (rasa.shared.nlu.training_data.entities_parser.ENTITY_REGEX)
    # starts every match at "[", and it has no escape character. Its third form,
    # `[text][dict, ...]`, with an empty list yields `text` and no entity, so `[[][]` is a
    # literal "[" and no "[" of the user's text can start an annotation. ")", "(", "{", "}"
    # and "]" only matter right after a bracketed text, i.e. never once every "[" is quoted.
    return s.replace("[", "[[][]")


def annotate(ex: Example, where: str = "") -> str:
    """The text in Rasa's markdown annotation: `[value](entity)` per entity, literals quoted.

    Raises CompareError for what the format cannot express (overlapping entities, a "]"
    inside an entity value, an empty text, an entity label with both ":"/")" and "}").
    """
    text = ex.text
    if not text:
        raise CompareError(f"{where}: empty text; Rasa cannot hold an empty training example")
    parts, pos = [], 0
    for s, e, label in sorted(ex.entities):
        if s < pos:
            raise CompareError(f"{where}: overlapping entities at [{s}, {e}); Rasa's format has one entity per span")
        value = text[s:e]
        if "]" in value:
            raise CompareError(f"{where}: entity value {value!r} contains ']', which Rasa's annotation format cannot express")
        parts.append(_literal(text[pos:s]))
        if not any(c in label for c in ":)"):
            parts.append(f"[{value}]({label})")
        elif "}" not in label:
            parts.append(f"[{value}]" + json.dumps({"entity": label}, ensure_ascii=False))
        else:
            raise CompareError(f"{where}: entity label {label!r} cannot be written in Rasa's annotation format")
        pos = e
    parts.append(_literal(text[pos:]))
    out = "".join(parts)
    # Rasa strips spaces and line breaks from both ends of an example; quote them the same
    # way as "[" so the text comes back exactly (Banking77 has such texts).
    lead = len(out) - len(out.lstrip(_RASA_STRIP))
    if lead:
        out = f"[{out[:lead]}][]" + out[lead:]
    trail = len(out) - len(out.rstrip(_RASA_STRIP))
    if trail:
        out = out[: len(out) - trail] + f"[{out[len(out) - trail:]}][]"
    return out


def _fits_block_line(s: str) -> bool:
    # A line of a YAML literal block must be printable and hold no line break; Rasa also
    # splits the block with str.splitlines(), which breaks at \v, \f, \x1c.. and \u2028 too.
    return all(c.isprintable() or c == "\t" for c in s)


def nlu_yaml(examples: Sequence[Example], source: str = "") -> str:
    """Rasa 3.x NLU YAML for `examples`, grouped by intent in order of first appearance.

    Each intent uses the usual `examples: |` block unless one of its texts holds characters
    a block line cannot (line breaks, control characters): then its examples are written
    as `- text: "..."` objects with YAML escapes, which Rasa reads the same way.
    """
    groups: Dict[str, List[Tuple[int, Example]]] = {}
    for i, ex in enumerate(examples):
        if "/" in ex.intent:
            raise CompareError(f"{source}: intent {ex.intent!r} contains '/', which Rasa reads as a retrieval intent; rename it")
        if ex.intent != ex.intent.strip():
            raise CompareError(f"{source}: intent {ex.intent!r} has leading/trailing whitespace, which Rasa strips")
        if ex.intent == FALLBACK_INTENT:
            raise CompareError(f"{source}: intent name {FALLBACK_INTENT!r} is reserved by FallbackClassifier")
        groups.setdefault(ex.intent, []).append((i, ex))
    lines = ['version: "3.1"', "nlu:"]
    for intent, items in groups.items():
        annotated = [annotate(ex, f"{source} example {i + 1}") for i, ex in items]
        lines.append(f"- intent: {_yaml_quoted(intent)}")
        if all(_fits_block_line(a) for a in annotated):
            lines.append("  examples: |")
            lines += [f"    - {a}" for a in annotated]
        else:
            lines.append("  examples:")
            lines += [f"  - text: {_yaml_quoted(a)}" for a in annotated]
    return "\n".join(lines) + "\n"


def write_nlu_yaml(examples: Sequence[Example], path: Path, source: str = "") -> Path:
    """Write `nlu_yaml(examples)` to `path` (UTF-8) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nlu_yaml(examples, source or str(path)), encoding="utf-8")
    return path


def read_back(path: Path) -> List[Example]:
    """Load an NLU file with Rasa's own loader; examples as (text, intent, entity spans)."""
    os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")
    from rasa.shared.nlu.training_data.loading import load_data

    td = load_data(str(path))
    return [Example(m.get("text"), m.get("intent"),
                    sorted((int(e["start"]), int(e["end"]), str(e["entity"])) for e in (m.get("entities") or [])))
            for m in td.intent_examples]


def verify_round_trip(path: Path, examples: Sequence[Example]) -> int:
    """Raise CompareError unless Rasa reads back exactly `examples` from `path`.

    Rasa drops repeated examples (same text, intent and entities:
    `TrainingData.sanitize_examples`), so the comparison is between sets, and the number
    of distinct examples Rasa trains on is returned.
    """

    def key(e):
        return e.text, e.intent, tuple(e.entities)

    want, got = set(map(key, examples)), list(map(key, read_back(path)))
    if want != set(got) or len(got) != len(want):
        missing = sorted(want - set(got))[:3]
        extra = sorted(set(got) - want)[:3]
        raise CompareError(f"{path}: Rasa reads the generated NLU data back differently; "
                           f"missing {missing}, unexpected {extra}. This is a bug in benchmarks.rasa_data.nlu_yaml.")
    return len(got)
