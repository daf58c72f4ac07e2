"""The benchmark's datasets: folders of JSON Lines splits, read and validated, and their subsets.

A dataset folder holds train.jsonl and test.jsonl, and optionally oos_test.jsonl (out-of-scope
messages, evaluated for OOS recall), valid.jsonl and oos_valid.jsonl (thresholds are chosen on
those, never on test). Format: ../shared/datasets/README.md; one JSON object per line with
`text`, `intent` and `entities` ({start, end, entity[, value]}, character offsets, end exclusive).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from slm360_rasa.fileio import file_sha256

from benchmarks import SHARED, CompareError

DEFAULT_DATA_DIR = SHARED / "datasets"
DEFAULT_DATASETS = ("snips", "atis", "banking77", "clinc150")
SEED = 0
# --quick: enough to run every step of the real path, small enough for a test suite.
QUICK_SAMPLE = {"n_intents": 8, "per_intent": 10, "n_test": 40, "n_oos": 20}


@dataclass
class Example:
    """One labelled utterance: text, intent and entity spans (start, end, label), end exclusive."""

    text: str
    intent: str
    entities: List[Tuple[int, int, str]] = field(default_factory=list)


def load_jsonl(path: Path) -> List[Example]:
    """Read a dataset file (../shared/datasets/README.md format), validating every line."""
    if not path.is_file():
        raise CompareError(f"dataset file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompareError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
            text, intent = row.get("text"), row.get("intent")
            if not isinstance(text, str) or not isinstance(intent, str) or not intent:
                raise CompareError(f"{where}: needs a string 'text' and a non-empty string 'intent'")
            ents = []
            for e in row.get("entities") or []:
                try:
                    s, t, lab = int(e["start"]), int(e["end"]), str(e["entity"])
                except (KeyError, TypeError, ValueError):
                    raise CompareError(f"{where}: entity {e!r} needs integer 'start', 'end' and a string 'entity'") from None
                if not 0 <= s < t <= len(text):
                    raise CompareError(f"{where}: entity span [{s}, {t}) is empty or outside the text (length {len(text)})")
                if "value" in e and text[s:t] != e["value"]:
                    raise CompareError(f"{where}: entity value {e['value']!r} != text[{s}:{t}] = {text[s:t]!r}")
                ents.append((s, t, lab))
            examples.append(Example(text, intent, sorted(ents)))
    if not examples:
        raise CompareError(f"dataset file is empty: {path}")
    return examples


@dataclass
class Dataset:
    """The splits of one dataset folder as used by the benchmark."""

    name: str
    folder: Path
    train: List[Example]
    test: List[Example]
    oos: Optional[List[Example]]  # out-of-scope test messages (oos_test.jsonl), if any
    files: Dict[str, str]  # split -> file path
    sha256: Dict[str, str]  # split -> sha256 of the file
    subsample: Optional[dict] = None
    # Validation splits (valid.jsonl, oos_valid.jsonl), parsed by the same served model so
    # that thresholds (out-of-scope fallback) are chosen on them, never on the test split.
    valid: Optional[List[Example]] = None
    oos_valid: Optional[List[Example]] = None


def load_dataset(data_dir: Path, name: str) -> Dataset:
    """Load train.jsonl, test.jsonl and, if present, oos_test.jsonl, valid.jsonl and
    oos_valid.jsonl of `data_dir/name`."""
    folder = data_dir / name
    if not folder.is_dir():
        have = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise CompareError(f"dataset '{name}' not found: no folder {folder} (folders there: {have or 'none'}); "
                           "pass --data-dir or --datasets")
    files = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
    for split in ("oos_test", "valid", "oos_valid"):
        if (folder / f"{split}.jsonl").is_file():
            files[split] = folder / f"{split}.jsonl"
    for split, p in files.items():
        if not p.is_file():
            raise CompareError(f"dataset '{name}': {p.name} missing in {folder}; every dataset needs train.jsonl and test.jsonl")
    # Only in-scope training data: oos_train.jsonl is never read (CLINC150 protocol; the
    # out-of-scope class is left to FallbackClassifier, as in the DIET baseline).
    return Dataset(name=name, folder=folder, train=load_jsonl(files["train"]), test=load_jsonl(files["test"]),
                   oos=load_jsonl(files["oos_test"]) if "oos_test" in files else None,
                   files={k: str(v) for k, v in files.items()}, sha256={k: file_sha256(v) for k, v in files.items()},
                   valid=load_jsonl(files["valid"]) if "valid" in files else None,
                   oos_valid=load_jsonl(files["oos_valid"]) if "oos_valid" in files else None)


def quick_subsample(ds: Dataset, seed: int = SEED, n_intents: int = QUICK_SAMPLE["n_intents"],
                    per_intent: int = QUICK_SAMPLE["per_intent"], n_test: int = QUICK_SAMPLE["n_test"],
                    n_oos: int = QUICK_SAMPLE["n_oos"]) -> Dataset:
    """Seeded subsample: `n_intents` intents x `per_intent` train examples, `n_test` test examples."""
    rng = random.Random(seed)
    test_intents = {e.intent for e in ds.test}
    candidates = sorted({e.intent for e in ds.train} & test_intents) or sorted({e.intent for e in ds.train})
    chosen = set(rng.sample(candidates, min(n_intents, len(candidates))))
    train = []
    for intent in sorted(chosen):
        idx = [i for i, e in enumerate(ds.train) if e.intent == intent]
        train += sorted(rng.sample(idx, min(per_intent, len(idx))))
    test_idx = [i for i, e in enumerate(ds.test) if e.intent in chosen]
    test_idx = sorted(rng.sample(test_idx, min(n_test, len(test_idx))))

    def sample(xs, n, in_scope):
        if xs is None:
            return None
        idx = [i for i, e in enumerate(xs) if not in_scope or e.intent in chosen]
        return [xs[i] for i in sorted(rng.sample(idx, min(n, len(idx))))]

    oos = sample(ds.oos, n_oos, False)
    valid, oos_valid = sample(ds.valid, n_test, True), sample(ds.oos_valid, n_oos, False)
    return Dataset(ds.name, ds.folder, [ds.train[i] for i in sorted(train)], [ds.test[i] for i in test_idx], oos,
                   ds.files, ds.sha256,
                   subsample={"seed": seed, "n_intents": n_intents, "per_intent": per_intent, "n_test": n_test,
                              "n_oos": n_oos, "intents": sorted(chosen)},
                   valid=valid, oos_valid=oos_valid)


def limit_test(ds: Dataset, n: int, seed: int = SEED) -> Dataset:
    """Keep a seeded random `n` of the test, validation and out-of-scope messages, in file order."""
    rng = random.Random(seed + 1)

    def pick(xs):
        if xs is None:
            return None
        return [xs[i] for i in sorted(rng.sample(range(len(xs)), min(n, len(xs))))]

    sub = dict(ds.subsample or {}, limit_test=n)
    return Dataset(ds.name, ds.folder, ds.train, pick(ds.test), pick(ds.oos), ds.files, ds.sha256, subsample=sub,
                   valid=pick(ds.valid), oos_valid=pick(ds.oos_valid))


def eval_splits(ds: Dataset) -> List[List[Example]]:
    """The message lists parsed by the evaluation process, in order: test, oos_test, valid,
    oos_valid (an absent split is an empty list, so positions in the raw results are fixed)."""
    return [ds.test, ds.oos or [], ds.valid or [], ds.oos_valid or []]
