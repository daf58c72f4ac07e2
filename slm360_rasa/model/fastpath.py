"""Pattern fast path and confidence arbitration for `SLM360Classifier` (`mode: hybrid | semantic | pattern`).

Many bot messages are exact copies of training examples ("hi", "thanks", "show me the menu").
The fast path answers those from a lookup table without running the encoder, and lets the
bot's own regexes and lookup tables vote on an intent where the training data shows that
they identify one. No Rasa import: plain Python + numpy, usable from scripts.

Normalisation: model/normalize.py (case, punctuation and Unicode folded, offsets kept).

Patterns (`FastPath.build`):
  * exact: the normalised text of a training example. A normalised text seen under two or
    more intents is ambiguous and is no pattern. Its entities are kept (in normalised
    coordinates) only when every example with that text carries the same annotation;
    otherwise the pattern still answers the intent but says nothing about entities
    (`FastPathHit.entities is None`), and the caller asks the encoder for them.
  * regex (Rasa `regex_features`, Python `re.search` in the original text, case-sensitive like
    Rasa's RegexFeaturizer default; a pattern prone to catastrophic backtracking is the bot
    author's to fix, as it would be for RegexFeaturizer) and lookup (Rasa
    `lookup_tables`, whole-token match of any normalised element in the normalised text):
    a pattern only where it identifies an intent. Among the training examples it matches,
    at least `min_support` (default 2: one example is an anecdote, not evidence) must match
    and the share carrying the majority intent (its training precision) must be at least
    `min_precision` (default 1.0: all of them). Others are rejected and counted in `stats`.
    A regex/lookup hit's confidence is its reliability, the Laplace (rule of succession)
    estimate of its precision on a new message, (correct + 1) / (support + 2), times
    `pattern_weight`: a pattern seen 2 times scores 0.75, one seen 50 times 0.98.
  * precedence in `match`: exact first; then regex/lookup patterns. When matching regex/lookup
    patterns name different intents the fast path abstains; otherwise the most reliable wins.

Arbitration (`arbitrate(hit, semantic_probs, intents, mode)`), the probabilities reported:
  * semantic: the encoder's probabilities; patterns are never consulted.
  * pattern: patterns only. No hit -> None (no intent, like DIET on empty text). A hit puts
    its confidence c on its intent and shares 1 - c evenly among the others (exact: c = 1).
  * hybrid:
      - no hit -> the encoder's probabilities;
      - exact hit -> one-hot on its intent, confidence 1.0; the encoder is not run;
      - regex/lookup hit on intent k with confidence w (the encoder does run):
          if the encoder's top intent j != k and p[j] >= w: the encoder's probabilities,
             unchanged (a semantic answer more confident than the pattern is reliable is
             never overruled);
          otherwise (1 - w) * p + w * onehot(k): when the encoder already agreed (j == k),
             k's confidence only rises; when it disagreed with p[j] < w, k ends on top
             because its mixed probability is at least w > p[j] >= (1 - w) * p[j].
        So an exact hit is never weakened, a confident semantic answer is never changed, and
        a pattern decides only where it is more reliable than the encoder is confident.
        Without encoder probabilities (unreadable text) a regex/lookup hit answers as in
        pattern mode.

Persistence: `to_dict` / `from_dict`, JSON with a format name and version; no pickle.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..checks import check_choice, check_int, check_number, dataclass_from_dict, is_int
from ..config import MODES
from .normalize import SEP, normalize, normalize_ascii, normalize_spans

logger = logging.getLogger(__name__)

FORMAT_NAME = "slm360-fastpath"
FORMAT_VERSION = 1
SOURCES = ("exact", "regex", "lookup")
EXACT_CONFIDENCE = 1.0
ENTITY_EXTRA_KEYS = ("role", "group")  # Rasa entity fields kept beside entity/start/end

@dataclass(frozen=True)
class FastPathConfig:
    """How patterns are learned and weighed (saved with the fast path)."""

    mode: str = "hybrid"  # "hybrid" | "semantic" | "pattern"; see the module docstring
    min_support: int = 2  # training examples a regex/lookup must match to count as evidence
    min_precision: float = 1.0  # share of those examples that must carry its intent
    pattern_weight: float = 1.0  # scales a regex/lookup hit's reliability (0 < w <= 1)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_int("min_support", self.min_support, lo=1)
        # <= 0.5 would let a pattern "identify" an intent it is wrong about half the time.
        check_number("min_precision", self.min_precision, 0.5, 1.0, lo_open=True)
        check_number("pattern_weight", self.pattern_weight, 0.0, 1.0, lo_open=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FastPathConfig":
        """Build from a dict; unknown keys are an error naming them."""
        return dataclass_from_dict(cls, d, "fast path config")


@dataclass
class FastPathHit:
    """What the fast path says about one text."""

    intent: str
    source: str  # "exact" | "regex" | "lookup"
    confidence: float  # exact: 1.0; regex/lookup: reliability x pattern_weight
    # Entities in the caller's text (start, end, value, entity, confidence_entity[, role, group]);
    # None when the pattern knows nothing about them (regex/lookup, or disagreeing annotations).
    entities: Optional[List[dict]] = None
    pattern: str = ""  # the normalised text, or the regex / lookup table name


@dataclass
class _ExactPattern:
    intent: str
    support: int
    entities: Optional[List[list]]  # [[start, end, entity, extras-dict], ...] in normalised coordinates


@dataclass
class _RulePattern:
    source: str  # "regex" | "lookup"
    name: str
    intent: str
    support: int
    correct: int
    expression: str  # regex source: the user's pattern, or the compiled lookup alternation
    elements: List[str] = field(default_factory=list)  # lookup: normalised elements
    compiled: Optional["re.Pattern"] = None

    @property
    def precision(self) -> float:
        """Share of matched training examples carrying `intent`."""
        return self.correct / self.support

    @property
    def reliability(self) -> float:
        """Rule-of-succession estimate of the precision on a new message."""
        return (self.correct + 1) / (self.support + 2)

    def hits(self, text: str, norm: str) -> bool:
        """Whether the pattern fires on `text` (regex) / its normalisation (lookup)."""
        return bool(self.compiled.search(text if self.source == "regex" else norm))


class FastPath:
    """Exact-match index of training texts plus intent-identifying regexes and lookup tables."""

    def __init__(self, config: Optional[FastPathConfig] = None) -> None:
        """An empty fast path (matches nothing); use `build` or `from_dict`."""
        self.config = config or FastPathConfig()
        self.exact: Dict[str, _ExactPattern] = {}
        self.rules: List[_RulePattern] = []
        self.stats: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.exact) + len(self.rules)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, texts: Sequence[str], intents: Sequence[str],
              entities: Optional[Sequence[Optional[Sequence[Mapping]]]] = None,
              regexes: Iterable[Mapping] = (), lookups: Iterable[Mapping] = (),
              config: Optional[FastPathConfig] = None) -> "FastPath":
        """Learn the patterns from training examples.

        `texts[i]` has intent `intents[i]` and entities `entities[i]` (dicts with start, end,
        entity; role/group kept). `regexes` are Rasa regex features ({"name", "pattern"}),
        `lookups` Rasa lookup tables ({"name", "elements": [...] or newline-separated str}).
        Examples without text or intent are skipped; invalid regexes are skipped with a warning.
        """
        if len(texts) != len(intents):
            raise ValueError(f"texts and intents differ in length: {len(texts)} vs {len(intents)}")
        if entities is not None and len(entities) != len(texts):
            raise ValueError(f"entities has {len(entities)} rows for {len(texts)} texts")
        fp = cls(config)
        examples: List[Tuple[str, str, str]] = []  # (text, norm, intent)
        by_norm: Dict[str, List[Tuple[str, Optional[tuple]]]] = {}
        for i, (text, intent) in enumerate(zip(texts, intents)):
            if not isinstance(text, str) or not isinstance(intent, str) or not intent:
                continue
            norm, starts, ends = normalize_spans(text)
            examples.append((text, norm, intent))
            if not norm:
                continue  # nothing readable: matching it would catch every empty message
            ents = _to_norm_entities(entities[i] if entities is not None else None, norm, starts, ends)
            by_norm.setdefault(norm, []).append((intent, ents))

        ambiguous = 0
        for norm, rows in by_norm.items():
            labels = {intent for intent, _ in rows}
            if len(labels) > 1:
                ambiguous += 1
                continue
            annotations = {ents for _, ents in rows}
            agreed = next(iter(annotations)) if len(annotations) == 1 else None
            fp.exact[norm] = _ExactPattern(
                intent=rows[0][0], support=len(rows),
                entities=None if agreed is None else [[s, e, ent, dict(extra)] for s, e, ent, extra in agreed])
        disagreeing = sum(1 for p in fp.exact.values() if p.entities is None)

        rejected = {"regex_invalid": 0, "regex_impure": 0, "lookup_empty": 0, "lookup_impure": 0}
        # (entries, how to read one, counter when unreadable, counter when it names no intent)
        for entries, read, unusable, impure in ((regexes, _regex_rule, "regex_invalid", "regex_impure"),
                                                 (lookups, _lookup_rule, "lookup_empty", "lookup_impure")):
            for entry in entries or ():
                rule = read(entry)
                if rule is None:
                    rejected[unusable] += 1
                elif fp._learn(rule, examples):
                    fp.rules.append(rule)
                else:
                    rejected[impure] += 1

        fp.stats = {"examples": len(examples), "exact": len(fp.exact), "exact_ambiguous": ambiguous,
                    "exact_entities_disagree": disagreeing,
                    "regex": sum(r.source == "regex" for r in fp.rules),
                    "lookup": sum(r.source == "lookup" for r in fp.rules), **rejected}
        logger.info("SLM360 fast path: %s", fp.stats)
        return fp

    def _learn(self, rule: _RulePattern, examples: Sequence[Tuple[str, str, str]]) -> bool:
        counts: Dict[str, int] = {}
        for text, norm, intent in examples:
            if rule.hits(text, norm):
                counts[intent] = counts.get(intent, 0) + 1
        support = sum(counts.values())
        if support < self.config.min_support:
            return False
        # Ties break by name so the same data always gives the same pattern.
        intent, correct = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if correct / support < self.config.min_precision:
            return False
        rule.intent, rule.support, rule.correct = intent, support, correct
        return True

    # ------------------------------------------------------------------ matching

    def match(self, text: str) -> Optional[FastPathHit]:
        """The pattern answer for `text`, or None. Never raises on odd input."""
        if not isinstance(text, str) or not (self.exact or self.rules):
            return None
        starts = ends = None
        if text.isascii():
            norm = normalize_ascii(text)
        else:
            norm, starts, ends = normalize_spans(text)
        if not norm:
            return None
        exact = self.exact.get(norm)
        if exact is not None:
            ents = None
            if exact.entities is not None:
                if starts is None and exact.entities:
                    _, starts, ends = normalize_spans(text)
                ents = []
                for s, e, entity, extra in exact.entities:
                    a, b = starts[s], ends[e - 1]
                    ents.append({"start": a, "end": b, "value": text[a:b], "entity": entity,
                                 "confidence_entity": EXACT_CONFIDENCE, **extra})
            return FastPathHit(exact.intent, "exact", EXACT_CONFIDENCE, ents, norm)
        fired = [r for r in self.rules if r.hits(text, norm)]
        if not fired or len({r.intent for r in fired}) > 1:
            return None  # nothing fired, or the patterns disagree: no rule answer
        best = max(fired, key=lambda r: r.reliability)
        return FastPathHit(best.intent, best.source, best.reliability * self.config.pattern_weight, None, best.name)

    def restrict(self, intents: Sequence[str]) -> int:
        """Drop every pattern whose intent is not in `intents` (say, a hand-edited fastpath.json
        naming an intent the model lacks: its hit must not answer instead of the encoder).
        Returns how many were dropped."""
        keep = set(intents)
        before = len(self)
        self.exact = {norm: p for norm, p in self.exact.items() if p.intent in keep}
        self.rules = [r for r in self.rules if r.intent in keep]
        return before - len(self)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        """JSON-serialisable form (format name + version); see `from_dict`."""
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": asdict(self.config),
            "exact": {norm: {"intent": p.intent, "support": p.support, "entities": p.entities}
                      for norm, p in sorted(self.exact.items())},
            "rules": [{"source": r.source, "name": r.name, "intent": r.intent, "support": r.support,
                       "correct": r.correct, "precision": r.precision, "reliability": r.reliability,
                       "expression": r.expression, "elements": r.elements} for r in self.rules],
            "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, d) -> "FastPath":
        """Rebuild from `to_dict` output; a foreign or corrupt dict raises ValueError naming the problem."""
        if not isinstance(d, Mapping):
            raise ValueError(f"fast path data must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not an SLM360 fast path: format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"fast path format version {d.get('version')!r}; this code reads {FORMAT_VERSION}")
        try:
            fp = cls(FastPathConfig.from_dict(d.get("config", {})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"fast path config: {e}") from None
        exact = d.get("exact")
        if not isinstance(exact, Mapping):
            raise ValueError("fast path field 'exact' must be an object of normalised text -> pattern")
        for norm, p in exact.items():
            fp.exact[norm] = _exact_from_dict(norm, p)
        rules = d.get("rules")
        if not isinstance(rules, list):
            raise ValueError("fast path field 'rules' must be a list")
        for k, r in enumerate(rules):
            fp.rules.append(_rule_from_dict(k, r))
        stats = d.get("stats", {})
        fp.stats = dict(stats) if isinstance(stats, Mapping) else {}
        return fp


# ---------------------------------------------------------------------- arbitration

def arbitrate(hit: Optional[FastPathHit], semantic_probs: Optional[np.ndarray], intents: Sequence[str],
              mode: str) -> Optional[np.ndarray]:
    """Intent probabilities over `intents` from a fast-path hit and the encoder's probabilities.

    The rule per mode is in the module docstring. Returns None for "no intent" (pattern mode
    without a hit; no hit and no encoder answer). `semantic_probs` may be None when the
    encoder was not run or could not read the text.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sem = None if semantic_probs is None else np.asarray(semantic_probs, dtype=np.float64)
    if sem is not None and sem.shape != (len(intents),):
        raise ValueError(f"semantic_probs has shape {sem.shape}, expected ({len(intents)},) for the intents")
    usable = hit is not None and hit.intent in intents
    if mode == "semantic":
        return sem
    if mode == "pattern":
        return _pattern_probs(hit, intents) if usable else None
    if not usable:
        return sem
    if hit.source == "exact" or sem is None:
        return _pattern_probs(hit, intents)
    k = list(intents).index(hit.intent)
    w = float(hit.confidence)
    j = int(np.argmax(sem))
    if j != k and sem[j] >= w:
        return sem
    out = (1.0 - w) * sem
    out[k] += w
    return out


def needs_encoder(hit: Optional[FastPathHit], mode: str, want_entities: bool) -> bool:
    """Whether the encoder must run for a message with this fast-path result.

    semantic: always. pattern: never. hybrid: unless the hit is exact and, when entities are
    wanted, knows them (an exact hit with disagreeing annotations still needs the encoder's).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "pattern":
        return False
    if mode == "semantic" or hit is None or hit.source != "exact":
        return True
    return bool(want_entities and hit.entities is None)


def _pattern_probs(hit: FastPathHit, intents: Sequence[str]) -> np.ndarray:
    n = len(intents)
    k = list(intents).index(hit.intent)
    c = 1.0 if n == 1 else float(hit.confidence)
    out = np.full(n, (1.0 - c) / max(n - 1, 1), dtype=np.float64)
    out[k] = c
    return out


# ---------------------------------------------------------------------- helpers

def _to_norm_entities(ents: Optional[Sequence[Mapping]], norm: str, starts: List[int],
                      ends: List[int]) -> Optional[tuple]:
    """Entities of one example in normalised coordinates, as a hashable tuple; None if one
    cannot be represented (its span holds no normalised character, or it is malformed)."""
    out = []
    for e in ents or ():
        try:
            s, t, label = int(e["start"]), int(e["end"]), e["entity"]
        except (KeyError, TypeError, ValueError):
            return None
        # Punctuation at the span's edges folded to a space: it is not part of the value.
        inside = [i for i in range(len(starts)) if starts[i] >= s and ends[i] <= t and norm[i] != SEP]
        if not isinstance(label, str) or not inside:
            return None
        ns, ne = inside[0], inside[-1] + 1
        extra = tuple(sorted((k, e[k]) for k in ENTITY_EXTRA_KEYS
                             if isinstance(e.get(k), (str, int)) and not isinstance(e.get(k), bool)))
        out.append((ns, ne, label, extra))
    return tuple(sorted(out))


def _regex_rule(rx: Mapping) -> Optional[_RulePattern]:
    name = str(rx.get("name", "")) if isinstance(rx, Mapping) else ""
    pattern = rx.get("pattern") if isinstance(rx, Mapping) else None
    try:
        if not isinstance(pattern, str) or not pattern:
            raise re.error("empty or not a string")
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        logger.warning("SLM360 fast path: skipping regex %r (%r): invalid pattern: %s. Fix it in the NLU data.",
                       name, pattern, e)
        return None
    return _RulePattern("regex", name, "", 0, 0, pattern, compiled=compiled)


def _lookup_rule(table: Mapping) -> Optional[_RulePattern]:
    name = str(table.get("name", "")) if isinstance(table, Mapping) else ""
    raw = table.get("elements") if isinstance(table, Mapping) else None
    if isinstance(raw, str):
        raw = raw.splitlines()
    elements = sorted({normalize(x)[0] for x in (raw or ()) if isinstance(x, str)} - {""}, key=lambda s: (-len(s), s))
    if not elements:
        logger.warning("SLM360 fast path: lookup table %r has no usable elements; skipped.", name)
        return None
    expression = _lookup_expression(elements)
    return _RulePattern("lookup", name, "", 0, 0, expression, elements=elements, compiled=re.compile(expression))


def _lookup_expression(elements: Sequence[str]) -> str:
    # Whole tokens of the normalised text (space-separated): "art" must not fire inside "start".
    # Longest first so an element that prefixes another never shadows it.
    return "(?<![^ ])(?:" + "|".join(re.escape(x) for x in elements) + ")(?![^ ])"


def _exact_from_dict(norm, p) -> _ExactPattern:
    where = f"fast path exact pattern {norm!r}"
    if not isinstance(norm, str) or not norm or not isinstance(p, Mapping):
        raise ValueError(f"{where}: expected a non-empty text mapped to an object")
    intent, support, ents = p.get("intent"), p.get("support"), p.get("entities")
    if not isinstance(intent, str) or not intent:
        raise ValueError(f"{where}: 'intent' must be a non-empty string, got {intent!r}")
    if not is_int(support) or support < 1:
        raise ValueError(f"{where}: 'support' must be a positive integer, got {support!r}")
    if ents is not None:
        if not isinstance(ents, list):
            raise ValueError(f"{where}: 'entities' must be a list or null")
        for e in ents:
            ok = (isinstance(e, list) and len(e) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in e[:2])
                  and 0 <= e[0] < e[1] <= len(norm) and isinstance(e[2], str) and isinstance(e[3], Mapping))
            if not ok:
                raise ValueError(f"{where}: bad entity {e!r}; expected [start, end, entity, extras] inside the text")
    return _ExactPattern(intent, support, ents)


def _rule_from_dict(k: int, r) -> _RulePattern:
    where = f"fast path rule #{k}"
    if not isinstance(r, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(r).__name__}")
    source, name, intent = r.get("source"), r.get("name"), r.get("intent")
    support, correct, expression = r.get("support"), r.get("correct"), r.get("expression")
    if source not in ("regex", "lookup"):
        raise ValueError(f"{where}: 'source' must be 'regex' or 'lookup', got {source!r}")
    if not isinstance(name, str) or not isinstance(intent, str) or not intent:
        raise ValueError(f"{where}: 'name' and 'intent' must be strings (intent non-empty)")
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (support, correct))
    if not integers or not 0 < correct <= support:
        raise ValueError(f"{where} ({name!r}): need integers 0 < correct <= support, got {correct!r}, {support!r}")
    elements = r.get("elements", [])
    if not isinstance(elements, list) or not all(isinstance(x, str) for x in elements):
        raise ValueError(f"{where} ({name!r}): 'elements' must be a list of strings")
    if source == "lookup":
        if not elements:
            raise ValueError(f"{where} ({name!r}): a lookup rule needs elements")
        expression = _lookup_expression(elements)
    if not isinstance(expression, str) or not expression:
        raise ValueError(f"{where} ({name!r}): 'expression' must be a non-empty string")
    try:
        compiled = re.compile(expression)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where} ({name!r}): invalid regular expression {expression!r}: {e}") from None
    return _RulePattern(source, name, intent, support, correct, expression, elements, compiled)
