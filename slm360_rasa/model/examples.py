"""`Examples`: labelled utterances a model file carries (held-out guard set, replay buffer).

Stored in the model's JSON metadata (`to_json`: entities as [start, end, type] triples);
`from_json` checks every field, so a tampered file fails with a message naming what is
wrong instead of a TypeError deep inside training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence


@dataclass
class Examples:
    """Labelled utterances kept inside a model (held-out guard set, replay buffer).

    `entities[i]` lists {"start", "end", "entity"} character spans of `texts[i]` (end
    exclusive); other keys of incoming entity dicts (value, role, extractor) are dropped,
    since the value is `text[start:end]` and the heads use nothing else.
    """

    texts: List[str] = field(default_factory=list)
    intents: List[str] = field(default_factory=list)
    entities: List[List[dict]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.intents) == len(self.entities)):
            raise ValueError(f"Examples: texts ({len(self.texts)}), intents ({len(self.intents)}) and "
                             f"entities ({len(self.entities)}) differ in length")
        self.entities = [[{"start": int(e["start"]), "end": int(e["end"]), "entity": str(e["entity"])}
                          for e in ents] for ents in self.entities]

    @classmethod
    def build(cls, texts: Sequence[str], intents: Sequence[str],
              entities: Optional[Sequence[Sequence[dict]]] = None) -> "Examples":
        """From parallel lists; `entities=None` means no entity annotations."""
        ents = [list(e) for e in entities] if entities is not None else [[] for _ in texts]
        return cls(list(texts), list(intents), ents)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Examples":
        """The examples at positions `idx`, in that order."""
        return Examples([self.texts[i] for i in idx], [self.intents[i] for i in idx],
                        [self.entities[i] for i in idx])

    def __add__(self, other: "Examples") -> "Examples":
        return Examples(self.texts + other.texts, self.intents + other.intents, self.entities + other.entities)

    def to_json(self) -> dict:
        """Compact JSON: entities as [start, end, type] triples."""
        return {"texts": list(self.texts), "intents": list(self.intents),
                "entities": [[[e["start"], e["end"], e["entity"]] for e in ents] for ents in self.entities]}

    @classmethod
    def from_json(cls, d: dict) -> "Examples":
        """Inverse of `to_json`; ValueError saying which field is malformed."""
        if not isinstance(d, dict) or sorted(d) != ["entities", "intents", "texts"]:
            raise ValueError(f"expected an object with keys entities, intents, texts, got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        for key in ("texts", "intents"):
            if not isinstance(d[key], list) or not all(isinstance(t, str) for t in d[key]):
                raise ValueError(f"{key!r} must be a list of strings")
        ents = d["entities"]
        if not isinstance(ents, list) or not all(
                isinstance(row, list) and all(_is_triple(e) for e in row) for row in ents):
            raise ValueError("'entities' must be a list (one per text) of [start, end, type] triples")
        return cls(list(d["texts"]), list(d["intents"]),
                   [[{"start": s, "end": e, "entity": t} for s, e, t in row] for row in ents])


def _is_triple(e) -> bool:
    return (isinstance(e, list) and len(e) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in e[:2])
            and isinstance(e[2], str))
