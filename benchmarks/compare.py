#!/usr/bin/env python
"""DIET vs SLM360 through real Rasa: `rasa train nlu` + `Agent.parse_message` (DESIGN.md section 6).

For each dataset x system, one pair at a time:

  1. write the train split as Rasa NLU YAML (entities annotated `[value](entity)` from the
     jsonl character offsets) and check that Rasa reads it back exactly;
  2. `python -m rasa train nlu --config ... --nlu ... --out ... --fixed-model-name ...` in a
     subprocess: wall time, CPU time and peak RSS of the training process tree;
  3. in a fresh subprocess (benchmarks/_rasa_eval.py): `Agent.load`, 10 warm-up parses, then
     one timed `await agent.parse_message(text)` per test text (then per out-of-scope test
     text, and per valid / oos_valid text where the dataset has them: thresholds such as the
     out-of-scope fallback's are chosen on those, never on test);
  4. metrics (benchmarks/_metrics.py) and one JSON per pair under
     benchmarks/results/runs/<dataset>__<system>.json, written as soon as the pair finishes.

DIET's 100 epochs can outlast a sitting on 2 cores (Banking77 or ATIS: hours). With
--diet-chunk-epochs N its training runs as consecutive `rasa train nlu` runs of N epochs, each
continuing the previous one through Rasa's own `--finetune` (weights and vocabularies carry
over; the optimizer's moment estimates restart once per chunk, and so does DIET's batch-size
ramp, which spans each run's own epochs: the default's 64 to 256 repeats within every chunk,
the same mean batch size as one 100-epoch run); progress is saved after each chunk, and a
pair interrupted mid-training resumes at its next chunk. Progress and chunk models live in the
work dir (runs/compare/, gitignored), so resuming needs the same checkout: a fresh one starts
the pair over. The result lists each chunk; its training time is the sum of the chunks'
(Rasa's start-up included in each).

Systems (pipelines in benchmarks/configs/):
  diet             the `rasa init` default pipeline (../shared/baselines/diet_default.yml)
  slm360           WhitespaceTokenizer -> slm360_rasa.SLM360Classifier -> EntitySynonymMapper
                   -> FallbackClassifier(0.3, ambiguity 0.1)
  featurizer_diet  WhitespaceTokenizer -> slm360_rasa.SLM360Featurizer -> DIETClassifier
                   -> EntitySynonymMapper -> FallbackClassifier (optional)
  diet_batch128    diet with DIETClassifier batch_size [64, 128] instead of [64, 256], only where
                   the default cannot train: on ATIS its CRF (317 BILOU tags) ran this 23.5 GiB
                   machine out of memory at batch 234; report.py compares against it only there
  diet_io          diet with DIETClassifier BILOU_flag false (IO entity tags: 80 CRF tags on ATIS
                   instead of 317), only where the default cannot train within a sitting: on ATIS
                   diet_batch128 takes about 7 h for 100 epochs on 2 cores

Datasets are folders of JSON Lines files (train.jsonl, test.jsonl, optionally oos_test.jsonl:
out-of-scope messages, evaluated for OOS recall; CLINC150 trains on in-scope data only).

Examples:
  benchmarks/compare.py --quick --datasets snips              # minutes: whole path, tiny data
  benchmarks/compare.py --datasets banking77 --systems diet,slm360
  benchmarks/compare.py --quick --slm360-set checkpoint=/tmp/small.safetensors
  benchmarks/compare.py --datasets snips --systems diet --diet-chunk-epochs 15 --max-chunks 1   # one sitting each
  benchmarks/report.py                                       # RESULTS.md + plots

Run on a quiet machine: timings are ratios measured in one run on one machine. Results of
--quick go to benchmarks/results/quick/ and are never mixed with the real ones.
"""
from __future__ import annotations

import argparse
import copy
import ast
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _metrics as M  # noqa: E402  (sibling module; benchmarks/ is not a package)

SCHEMA = "slm360-compare/1"
SHARED = ROOT.parent / "shared"  # seeds, datasets and corpus, beside the repository
DEFAULT_DATA_DIR = SHARED / "datasets"
DEFAULT_DATASETS = ("snips", "atis", "banking77", "clinc150")
CONFIG_DIR = HERE / "configs"
SYSTEMS = {
    "diet": {"config": "diet.yml", "label": "DIET (rasa init default)"},
    "slm360": {"config": "slm360.yml", "label": "SLM360Classifier"},
    "featurizer_diet": {"config": "featurizer_diet.yml", "label": "SLM360Featurizer + DIET"},
    "diet_batch128": {"config": "diet_batch128.yml", "label": "DIET (rasa init default, batch size 64-128)"},
    "diet_io": {"config": "diet_io.yml", "label": "DIET (rasa init default, IO entity tags instead of BILOU)"},
}
DEFAULT_SYSTEMS = ("diet", "slm360")
RESULTS_DIR = HERE / "results" / "runs"
QUICK_RESULTS_DIR = HERE / "results" / "quick"
WORK_DIR = ROOT / "runs" / "compare"
QUICK_WORK_DIR = ROOT / "runs" / "compare-quick"

CLASSIFIER = "slm360_rasa.SLM360Classifier"
FEATURIZER = "slm360_rasa.SLM360Featurizer"
DIET = "DIETClassifier"
DIET_DEFAULT_EPOCHS = 300  # DIETClassifier's own default, for a config that leaves `epochs` out
CHUNKABLE = ("diet", "featurizer_diet", "diet_batch128", "diet_io")  # systems whose training --diet-chunk-epochs may split
CHUNK_STATE = "chunks.json"  # in a pair's work dir: the finished chunks of a chunked training

WARMUP_MESSAGES = 10
SEED = 0
# --quick: enough to run every step of the real path, small enough for a test suite.
QUICK = {"n_intents": 8, "per_intent": 10, "n_test": 40, "n_oos": 20, "diet_epochs": 2, "slm360_epochs": 2}
LOG_TAIL_CHARS = 4000
POLL_S = 0.1  # RSS sampling interval of the training process tree

# Rasa strips these from both ends of every example (rasa_yaml.STRIP_SYMBOLS).
_RASA_STRIP = "\n\r "


class CompareError(Exception):
    """Bad input or environment; the message names the input and the fix."""


# ---------------------------------------------------------------------------- data


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
                   files={k: str(v) for k, v in files.items()}, sha256={k: _sha256(v) for k, v in files.items()},
                   valid=load_jsonl(files["valid"]) if "valid" in files else None,
                   oos_valid=load_jsonl(files["oos_valid"]) if "oos_valid" in files else None)


def quick_subsample(ds: Dataset, seed: int = SEED, n_intents: int = QUICK["n_intents"],
                    per_intent: int = QUICK["per_intent"], n_test: int = QUICK["n_test"],
                    n_oos: int = QUICK["n_oos"]) -> Dataset:
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


# ---------------------------------------------------------------------------- Rasa NLU YAML


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
        if ex.intent == M.FALLBACK_INTENT:
            raise CompareError(f"{source}: intent name {M.FALLBACK_INTENT!r} is reserved by FallbackClassifier")
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
                           f"missing {missing}, unexpected {extra}. This is a bug in compare.nlu_yaml.")
    return len(got)


# ---------------------------------------------------------------------------- configs


def parse_sets(items: Sequence[str], flag: str) -> Dict[str, object]:
    """`key=value` strings -> dict; values parsed as YAML scalars (2 -> int, true -> bool)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"{flag} {item!r}: expected key=value, e.g. {flag} epochs=5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise CompareError(f"{flag} {item!r}: the value is not a YAML scalar ({e})") from None
    return out


def component_keys(module_file: Path, class_name: str) -> Optional[set]:
    """String keys of the dict literal returned by `class_name.get_default_config` in a file.

    Read from the source instead of importing the component, which imports Rasa and
    TensorFlow (~20 s) in this orchestrating process; None if the source is not a literal.
    """
    try:
        tree = ast.parse(module_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "get_default_config":
                    for ret in ast.walk(fn):
                        if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Dict):
                            return {k.value for k in ret.value.keys
                                    if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return None


def _check_keys(sets: Dict[str, object], module: str, class_name: str, flag: str, extra: Sequence[str] = ()) -> None:
    keys = component_keys(ROOT / "slm360_rasa" / "components" / module, class_name)
    if keys is None:
        return
    keys |= set(extra)
    bad = sorted(set(sets) - keys)
    if bad:
        raise CompareError(f"{flag}: unknown {class_name} key(s) {bad}; valid keys: {sorted(keys)}")


def _resolve_checkpoint(sets: Dict[str, object], flag: str) -> None:
    ckpt = sets.get("checkpoint")
    if ckpt is None:
        return
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise CompareError(f"{flag} checkpoint={ckpt}: no such file; pass the path of an SLM360 Nano .safetensors checkpoint")
    # Absolute, because Rasa runs in the pair's work folder and SLM360Featurizer reads the
    # checkpoint again whenever the model is loaded.
    sets["checkpoint"] = str(path.resolve())


def build_config(system: str, quick: bool, slm360_set: Dict, diet_set: Dict, featurizer_set: Dict) -> Tuple[dict, dict]:
    """The pipeline config of `system` with quick-mode epochs and the user's overrides applied.

    Returns (config dict, overrides applied per component name).
    """
    path = CONFIG_DIR / SYSTEMS[system]["config"]
    if not path.is_file():
        raise CompareError(f"pipeline config missing: {path}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    per_component = {
        CLASSIFIER: {**({"epochs": QUICK["slm360_epochs"]} if quick else {}), **slm360_set},
        DIET: {**({"epochs": QUICK["diet_epochs"]} if quick else {}), **diet_set},
        FEATURIZER: dict(featurizer_set),
    }
    # Both SLM360 components read the same pretrained encoder: a checkpoint given for the
    # classifier is used by the featurizer too, unless --featurizer-set names another.
    if "checkpoint" in slm360_set and "checkpoint" not in featurizer_set:
        per_component[FEATURIZER]["checkpoint"] = slm360_set["checkpoint"]
    applied = {}
    for comp in cfg["pipeline"]:
        sets = per_component.get(comp["name"])
        if sets:
            comp.update(sets)
            applied[comp["name"]] = dict(sets)
    return cfg, applied


def needs_pretrained(cfg: dict) -> List[str]:
    """Names of SLM360 components in `cfg` that would load the shipped pretrained checkpoint."""
    return [c["name"] for c in cfg["pipeline"] if c["name"] in (CLASSIFIER, FEATURIZER) and not c.get("checkpoint")]


# ---------------------------------------------------------------------------- environment


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> dict:
    """CPU model (/proc/cpuinfo), cores, RAM, library versions, git commit and date (UTC)."""
    import psutil

    cpu, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "fma") if f in have]
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": affinity,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "rasa": _version("rasa"),
        "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "slm360_rasa": _version("slm360-rasa"),
        "git_commit": commit,
        "git_dirty": dirty,
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                                   "TF_NUM_INTEROP_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def child_env(work: Path, extra: Optional[Dict[str, str]] = None) -> dict:
    """Environment of the Rasa subprocesses (`extra`: the user's --env settings, applied last)."""
    env = dict(os.environ)
    env["RASA_TELEMETRY_ENABLED"] = "false"
    # Rasa's training cache would let a re-run reuse trained components and report a
    # fraction of the real training time: size 0 disables it (rasa.engine.caching).
    env["RASA_MAX_CACHE_SIZE"] = "0"
    env["RASA_CACHE_DIRECTORY"] = str(work / ".rasa-cache")
    env["PYTHONHASHSEED"] = "0"  # as the Makefile: the same hashing in every run
    # Benchmark the working tree's slm360_rasa even if another copy is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------- subprocesses


def _busy_cpu_s() -> float:
    """CPU seconds all cores of the machine have been busy since boot (not idle or iowait)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _self_cpu_s() -> float:
    """CPU seconds this process (the monitor) has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_monitored(cmd: Sequence[str], log_path: Path, env: dict, cwd: Path, timeout_s: Optional[float] = None,
                  poll_s: float = POLL_S) -> dict:
    """Run `cmd` (stdout+stderr to `log_path`); wall, CPU and peak RSS of its process tree.

    Peak RSS is measured two ways and the larger is reported:
    * `os.wait4` returns the child's own rusage: `ru_maxrss` is the kernel's exact
      high-water mark of the Rasa process (its TensorFlow/numba work runs in threads, which
      share that RSS). `resource.getrusage(RUSAGE_CHILDREN)` is not used because it is the
      maximum over *all* children this process ever waited for, so from the second pair
      on it would report an earlier, larger run;
    * psutil samples the summed RSS of the process and all its descendants every `poll_s`
      seconds, which covers any helper processes but can miss a peak shorter than `poll_s`.

    `other_cpu_s` is the CPU time the rest of the machine used meanwhile (all cores' busy
    time from /proc/stat, minus this tree's and this monitor's): about 0 on a quiet
    machine; anything else shared the cores and inflated `wall_s`.
    """
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    machine0, self0 = _busy_cpu_s(), _self_cpu_s()
    with log_path.open("wb") as log:
        t0 = time.perf_counter()
        # Own session, so a timeout can end the whole tree this call started (and nothing else).
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                                start_new_session=True)
        try:
            ps = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            ps = None
        polled, timed_out = 0, False
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if ps is not None:
                    total = 0
                    try:
                        procs = [ps] + ps.children(recursive=True)
                    except psutil.Error:
                        procs = []
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:  # exited (or zombie) between listing and reading
                            pass
                    polled = max(polled, total)
                if timeout_s and time.perf_counter() - t0 > timeout_s and not timed_out:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(poll_s)
        except BaseException:
            # Ctrl-C reaches only our process group, not the child's own session: end the
            # tree we started, so no orphaned training keeps the cores busy.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        # os.waitstatus_to_exitcode needs Python 3.9; Rasa 3.6 also runs on 3.8.
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        proc.returncode = rc  # reaped by wait4 above; tell Popen so it does not wait again
    ru_max_mb = ru.ru_maxrss / 1024  # KiB on Linux
    cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, _busy_cpu_s() - machine0 - cpu - (_self_cpu_s() - self0))
    return {"cmd": [str(c) for c in cmd], "pid": proc.pid, "rc": rc, "timed_out": timed_out, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "other_cpu_s": round(other, 1),
            "peak_rss_mb": round(max(ru_max_mb, polled / 2**20), 1),
            "ru_maxrss_mb": round(ru_max_mb, 1), "polled_tree_peak_rss_mb": round(polled / 2**20, 1),
            "log": str(log_path)}


def failure_reason(run: dict, oom_kill: Optional[str] = None) -> str:
    """Why a run_monitored training failed, in words a user can act on. A SIGKILL that we did
    not send (no timeout) is almost always the kernel's out-of-memory killer: the message
    gives the peak RSS against the machine's RAM, since Rasa's log ends mid-epoch without a
    word, and the kernel's own line (`oom_kill`, from `oom_kill_line`) where there is one."""
    import psutil

    rc = run["rc"]
    if rc == 0:
        return "rasa exited 0 but wrote no model archive"
    if run.get("timed_out"):
        return "timed out (--train-timeout)"
    if rc == -signal.SIGKILL:
        ram_mb = psutil.virtual_memory().total / 2**20
        head = f"killed by SIGKILL with a peak RSS of {run['peak_rss_mb']:.0f} MB of {ram_mb:.0f} MB RAM"
        if oom_kill:
            return f"{head}: out of memory, the kernel says: {oom_kill}"
        return f"{head}: most likely out of memory (the kernel's OOM killer; `dmesg` says so where readable)"
    return f"rc={rc}"


def oom_kill_line(run: dict) -> Optional[str]:
    """The kernel's out-of-memory line for a training that was SIGKILLed without a timeout, else None."""
    if run["rc"] != -signal.SIGKILL or run.get("timed_out"):
        return None
    return _oom_kill_line(run.get("pid"))


def _oom_kill_line(pid: Optional[int]) -> Optional[str]:
    """The kernel log's "Out of memory: Killed process <pid> ..." line, or None (no pid, no
    such line, or a log this user may not read)."""
    if not pid:
        return None
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    hits = [ln for ln in log.splitlines() if f"Killed process {pid} (" in ln]
    return hits[-1].split("] ", 1)[-1].strip() if hits else None


def log_tail(path: Path, n: int = LOG_TAIL_CHARS) -> str:
    """Last `n` characters of a log file ('' if unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- metrics


def eval_splits(ds: Dataset) -> List[List[Example]]:
    """The message lists parsed by the evaluation process, in order: test, oos_test, valid,
    oos_valid (an absent split is an empty list, so positions in the raw results are fixed)."""
    return [ds.test, ds.oos or [], ds.valid or [], ds.oos_valid or []]


def _split_results(ds: Dataset, raw: dict) -> List[list]:
    out, pos = [], 0
    for split in eval_splits(ds):
        out.append(raw["results"][pos:pos + len(split)])
        pos += len(split)
    return out


def top_intent(r: dict) -> Tuple[Optional[str], float]:
    """Top non-fallback intent and its confidence of one raw parse from _rasa_eval.py."""
    return M.top_non_fallback({"intent": {"name": r["intent"], "confidence": r["confidence"]},
                               "intent_ranking": [{"name": a, "confidence": b} for a, b in r["ranking"]]})


def summarize_valid(ds: Dataset, raw: dict) -> dict:
    """Per-message records of the validation splits: gold, top non-fallback intent and its
    confidence (in-scope `valid`), confidence (`oos_valid`). Empty dict when there are none."""
    _, _, valid_results, oos_valid_results = _split_results(ds, raw)
    out = {}
    if ds.valid:
        top = [top_intent(r) for r in valid_results]
        out["valid_per_message"] = {
            "n": len(top), "gold": [e.intent for e in ds.valid], "pred": [t[0] for t in top],
            "confidence": [round(t[1], 4) for t in top],
            "accuracy": M.finite_or_none(M.accuracy([e.intent for e in ds.valid], [t[0] for t in top]))}
    if ds.oos_valid:
        out["oos_valid_per_message"] = {"n": len(oos_valid_results),
                                        "confidence": [round(top_intent(r)[1], 4) for r in oos_valid_results]}
    return out


def summarize(ds: Dataset, raw: dict) -> Tuple[dict, dict, Optional[dict], list]:
    """Metrics, compact per-message records, OOS records and reliability bins from raw parses."""
    n = len(ds.test)
    results, oos_results, _, _ = _split_results(ds, raw)
    gold = [e.intent for e in ds.test]
    pred, conf = [], []
    for r in results:
        name, c = top_intent(r)
        pred.append(name)
        conf.append(c)
    # Rounded as stored in per_message, so ECE recomputed from the JSON is exactly this one.
    conf = [round(c, 4) for c in conf]
    correct = [p == g for p, g in zip(pred, gold)]
    fallback = [r["intent"] == M.FALLBACK_INTENT for r in results]
    lat = [round(r["latency_ms"], 3) for r in results]  # as stored: P50/P99 recompute exactly
    has_entities = any(e.entities for e in ds.train) or any(e.entities for e in ds.test)
    ent = M.entity_micro_f1([e.entities for e in ds.test], [[tuple(x) for x in r["entities"]] for r in results]) \
        if has_entities else None
    labels = sorted(set(gold) | {p for p in pred if p is not None})
    index = {name: i for i, name in enumerate(labels)}
    metrics = {
        "n_test": n,
        "accuracy": M.accuracy(gold, pred),
        "macro_f1": M.macro_f1(gold, pred),
        "entity_micro_f1": ent["f1"] if ent else None,
        "entity_precision": ent["precision"] if ent else None,
        "entity_recall": ent["recall"] if ent else None,
        "fallback_rate_in_scope": sum(fallback) / n if n else None,
        "accuracy_after_fallback": sum(c and not f for c, f in zip(correct, fallback)) / n if n else None,
        "ece": M.expected_calibration_error(conf, correct),
        "mean_confidence": sum(conf) / n if n else None,
        "parse_p50_ms": M.percentile(lat, 50),
        "parse_p99_ms": M.percentile(lat, 99),
        "parse_mean_ms": sum(lat) / n if n else None,
        "n_oos": None, "oos_recall": None,
    }
    metrics = {k: (M.finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    per_message = {
        "labels": labels,
        "gold": [index[g] for g in gold],
        "pred": [index[p] if p is not None else -1 for p in pred],
        "confidence": conf,
        "correct": M.bits_to_str(correct),
        "fallback": M.bits_to_str(fallback),
        "latency_ms": lat,
    }
    if ent:
        per_message["entity_counts"] = {k: ent[k] for k in ("tp", "n_gold", "n_pred")}
    oos = None
    if ds.oos is not None:
        top = [r["intent"] for r in oos_results]
        metrics["n_oos"] = len(top)
        metrics["oos_recall"] = M.finite_or_none(M.oos_recall(top))
        oos = {"fallback": M.bits_to_str(t == M.FALLBACK_INTENT for t in top),
               "confidence": [round(M.top_non_fallback({"intent_ranking": [{"name": a, "confidence": b}
                                                                            for a, b in r["ranking"]]})[1], 4)
                              for r in oos_results],
               "latency_ms": [round(r["latency_ms"], 3) for r in oos_results]}
    reliability = [{k: (M.finite_or_none(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
                   for b in M.reliability_bins(conf, correct)]
    return metrics, per_message, oos, reliability


# ---------------------------------------------------------------------------- one pair


def _portable(value):
    """The value with absolute paths inside the workspace (the repository, and the ../shared data
    beside it) rewritten relative to the repository root, so committed results name no
    directory of the machine that produced them. Only those two trees: a checkout in /tmp must
    not turn every other /tmp path relative. Resume matches on hashes, not paths."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if not isinstance(value, str):
        return value
    trees = ((str(ROOT), ""), (str(SHARED), os.path.join("..", SHARED.name)))
    if os.path.isabs(value):
        for tree, _ in trees:
            if value.startswith(tree + os.sep):
                return os.path.relpath(value, ROOT)
        return value
    for tree, rel in trees:  # paths inside free text (error messages, log tails), where a path starts
        value = re.sub(r"(?<![\w./-])" + re.escape(tree + os.sep), (rel + os.sep) if rel else "", value)
    return value


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_portable(obj), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves a half-written result that --resume trusts


def _chunk_plan(cfg: dict, system: str, chunk_epochs: Optional[int]) -> Optional[List[int]]:
    """Epochs of each `rasa train nlu` run when DIET trains in chunks, or None (one run)."""
    if not chunk_epochs or system not in CHUNKABLE:
        return None
    diet = [c for c in cfg["pipeline"] if c.get("name") == DIET]
    total = int(diet[0].get("epochs", DIET_DEFAULT_EPOCHS)) if diet else 0
    if total <= chunk_epochs:
        return None
    return [chunk_epochs] * (total // chunk_epochs) + ([total % chunk_epochs] if total % chunk_epochs else [])


def _train_in_chunks(plan: List[int], cfg: dict, nlu: Path, work: Path, env: dict, args, name: str,
                     archive: Path, state_key: dict) -> dict:
    """DIET's epochs as consecutive `rasa train nlu` runs, each after the first continuing the
    previous run's model with `--finetune PREV --epoch-fraction F` (Rasa's own finetuning:
    weights, vocabularies and label maps carry over; the optimizer's moments restart). Why:
    DIET's 100 epochs outlast one sitting on a 2-core machine, and a killed `rasa train`
    keeps nothing. Progress is saved after every chunk (chunks.json), so an interrupted
    pair resumes at its next chunk. Returns run_monitored's dict with summed wall and CPU
    time, the peak RSS over all chunks, and the per-chunk figures under "chunks"."""
    state_path = work / CHUNK_STATE
    state = _chunk_state(work, state_key, plan) or {"key": state_key, "plan": plan, "done": []}
    chunk_cfg = copy.deepcopy(cfg)
    for comp in chunk_cfg["pipeline"]:
        if comp.get("name") == DIET:
            comp["epochs"] = plan[0]  # finetuning ignores `epochs` when comparing configs
    config_path = work / "config_chunk.yml"
    config_path.write_text(yaml.safe_dump(chunk_cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    models = work / "models"
    first = len(state["done"])
    for i in range(first, len(plan)):
        if args.max_chunks is not None and i - first >= args.max_chunks:
            _say(f"{name}: stopping after {args.max_chunks} chunk(s) (--max-chunks); {i}/{len(plan)} done, "
                 "run the same command again to continue")
            return _chunks_total(state["done"], incomplete=True)
        out = models / f"chunk{i}.tar.gz"
        cmd = [sys.executable, "-m", "rasa", "train", "nlu", "--config", str(config_path), "--nlu", str(nlu),
               "--out", str(models), "--fixed-model-name", out.name]
        if i:
            cmd += ["--finetune", str(models / f"chunk{i - 1}.tar.gz"), "--epoch-fraction", repr(plan[i] / plan[0])]
        _say(f"{name}: training chunk {i + 1}/{len(plan)} ({plan[i]} epochs, "
             f"{sum(plan[:i])} done{' before this sitting' if i == first and i else ''}) ...")
        run = run_monitored(cmd, work / f"train_chunk{i}.log", env, work, timeout_s=args.train_timeout)
        if run["rc"] != 0 or not out.is_file():
            run["log_tail"] = log_tail(work / f"train_chunk{i}.log")
            run["rc"] = run["rc"] or 1
            return {**run, "chunks": state["done"] + [run]}
        state["done"].append({**run, "epochs": plan[i], "archive": str(out)})
        _write_json(state_path, state)
        _say(f"{name}: chunk {i + 1}/{len(plan)} trained in {run['wall_s']:.1f} s")
    shutil.copyfile(models / f"chunk{len(plan) - 1}.tar.gz", archive)
    return _chunks_total(state["done"])


def _chunk_state(work: Path, state_key: dict, plan: List[int]) -> Optional[dict]:
    """The saved chunk progress of `work` if it belongs to this data, config and plan, else None."""
    try:
        prev = json.loads((work / CHUNK_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return prev if prev.get("key") == state_key and prev.get("plan") == plan else None


def _chunks_total(done: List[dict], incomplete: bool = False) -> dict:
    """run_monitored's dict for the finished chunks together: summed wall and CPU time, the
    largest peak RSS, the first chunk's command and log, each chunk under "chunks"."""
    total = {"cmd": done[0]["cmd"], "rc": 0, "timed_out": False,
             "wall_s": round(sum(c["wall_s"] for c in done), 3), "cpu_s": round(sum(c["cpu_s"] for c in done), 3),
             "peak_rss_mb": max(c["peak_rss_mb"] for c in done), "log": done[0]["log"], "chunks": done}
    if all("other_cpu_s" in c for c in done):  # chunks run before this field existed lack it
        total["other_cpu_s"] = round(sum(c["other_cpu_s"] for c in done), 1)
    if incomplete:
        total["incomplete"] = True
    return total


def run_pair(ds: Dataset, system: str, cfg: dict, applied: dict, args, machine: dict, out_path: Path) -> dict:
    """Train, evaluate and save one dataset x system; returns the saved result."""
    name = f"{ds.name}__{system}"
    work = Path(args.work_dir) / name
    config_text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    plan = _chunk_plan(cfg, system, args.diet_chunk_epochs)
    state_key = {"sha256": ds.sha256, "subsample": ds.subsample, "config": config_text, "env": dict(args.env)}
    resuming = bool(plan) and bool((_chunk_state(work, state_key, plan) or {}).get("done"))
    if work.exists() and not resuming:
        shutil.rmtree(work)  # a previous model or log must never be mistaken for this run's
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.env)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()

    nlu = write_nlu_yaml(ds.train, work / "nlu.yml", source=ds.files["train"])
    n_unique = verify_round_trip(nlu, ds.train)
    config_path = work / "config.yml"
    config_path.write_text(config_text, encoding="utf-8")

    result = {
        "schema": SCHEMA, "dataset": ds.name, "system": system, "system_label": SYSTEMS[system]["label"],
        "quick": bool(args.quick), "status": "running", "started": started,
        "data": {"dir": str(ds.folder), "files": ds.files, "sha256": ds.sha256, "n_train": len(ds.train),
                 "n_train_distinct": n_unique,  # what Rasa trains on: it drops repeated examples
                 "n_test": len(ds.test), "n_oos": len(ds.oos) if ds.oos is not None else None,
                 "n_intents": len({e.intent for e in ds.train}),
                 "n_entity_types": len({lab for e in ds.train for _, _, lab in e.entities}),
                 "subsample": ds.subsample, "nlu_yaml": str(nlu)},
        "config": {"file": str((CONFIG_DIR / SYSTEMS[system]["config"]).relative_to(ROOT)), "overrides": applied,
                   "env": dict(args.env), "yaml": config_text},
        "machine": machine,
    }

    models = work / "models"
    archive = models / f"{name}.tar.gz"
    if plan:
        result["train_chunks"] = {"epochs": plan, "how": "rasa train nlu, then --finetune <previous chunk> "
                                                         "--epoch-fraction per further chunk"}
        try:
            train = _train_in_chunks(plan, cfg, nlu, work, env, args, name, archive, state_key)
        except (SystemExit, KeyboardInterrupt):
            # `kill` or Ctrl-C mid-chunk: the chunks already saved are progress a report should show.
            done = (_chunk_state(work, state_key, plan) or {}).get("done") or []
            if done:
                result["train"] = _chunks_total(done, incomplete=True)
                result.update(status="train_incomplete",
                              error=f"interrupted during chunk {len(done) + 1}/{len(plan)}; {len(done)} chunk(s) "
                                    "saved: run the same command again to continue")
                _finish(result, out_path, load_start)
            raise
    else:
        # A name ending in .tar.gz is used verbatim by rasa (model_training._determine_model_name);
        # without the suffix it would apply Path.with_suffix, which mangles names holding a dot.
        cmd = [sys.executable, "-m", "rasa", "train", "nlu", "--config", str(config_path), "--nlu", str(nlu),
               "--out", str(models), "--fixed-model-name", archive.name]
        _say(f"{name}: training ({len(ds.train)} examples) ...")
        train = run_monitored(cmd, work / "train.log", env, work, timeout_s=args.train_timeout)
    result["train"] = train
    if train.get("incomplete"):
        result.update(status="train_incomplete",
                      error=f"{len(train['chunks'])}/{len(plan)} training chunks done (--max-chunks); "
                            "run the same command again to continue")
        return _finish(result, out_path, load_start)
    if train["rc"] != 0 or not archive.is_file():
        oom = oom_kill_line(train)  # kept as a field: report.py says "out of memory" from it, not from prose
        result.update(status="train_failed", oom_kill=oom,
                      error=f"rasa train nlu failed ({failure_reason(train, oom)}); log: {train['log']}",
                      log_tail=log_tail(Path(train["log"])))
        return _finish(result, out_path, load_start)
    result["archive_bytes"] = archive.stat().st_size
    result["model_mb"] = round(archive.stat().st_size / 2**20, 3)  # MiB, like every RSS figure here
    result["archive"] = str(archive)
    _say(f"{name}: trained in {train['wall_s']:.1f} s, peak RSS {train['peak_rss_mb']:.0f} MB, "
         f"archive {result['model_mb']:.2f} MB; evaluating "
         f"{' + '.join(str(len(x)) for x in eval_splits(ds))} messages (test, oos_test, valid, oos_valid) ...")

    return evaluate_archive(ds, archive, work, env, args, result, train, out_path, load_start)


def evaluate_archive(ds: Dataset, archive: Path, work: Path, env: dict, args, result: dict, train: dict,
                     out_path: Path, load_start) -> dict:
    """Steps 3-4 of the protocol for a trained archive: parse in a fresh process, summarize,
    save `result` (which already holds the training figures `train`)."""
    # Warm-up texts come from the training data, so no test message is ever parsed twice.
    rng = random.Random(SEED + 2)
    warm = [ds.train[i].text for i in rng.sample(range(len(ds.train)), min(WARMUP_MESSAGES, len(ds.train)))]
    warm = (warm * WARMUP_MESSAGES)[:WARMUP_MESSAGES]
    texts = [e.text for split in eval_splits(ds) for e in split]
    texts_path = work / "eval_texts.json"
    texts_path.write_text(json.dumps({"texts": texts, "warmup": warm}, ensure_ascii=False), encoding="utf-8")
    raw_path = work / "eval_raw.json"
    cmd = [sys.executable, str(HERE / "_rasa_eval.py"), "--model", str(archive), "--texts", str(texts_path),
           "--out", str(raw_path)]
    ev = run_monitored(cmd, work / "eval.log", env, work, timeout_s=args.eval_timeout)
    if ev["rc"] != 0 or not raw_path.is_file():
        result.update(status="eval_failed", eval_process=ev,
                      error=f"evaluation failed ({'timed out' if ev['timed_out'] else 'rc=' + str(ev['rc'])}); log: {ev['log']}",
                      log_tail=log_tail(work / "eval.log"))
        return _finish(result, out_path, load_start)
    raw = json.loads(raw_path.read_text(encoding="utf-8"))
    if len(raw["results"]) != len(texts):
        raise CompareError(f"{raw_path}: {len(raw['results'])} results for {len(texts)} texts")
    metrics, per_message, oos, reliability = summarize(ds, raw)
    valid_records = summarize_valid(ds, raw)
    metrics.update({
        "train_wall_s": train["wall_s"], "train_cpu_s": train["cpu_s"], "train_peak_rss_mb": train["peak_rss_mb"],
        "train_other_cpu_s": train.get("other_cpu_s"),
        "model_mb": result["model_mb"], "load_s": raw["load_s"], "serve_peak_rss_mb": raw["serve_peak_rss_mb"],
    })
    result.update(status="ok", metrics=metrics,
                  eval={k: raw[k] for k in ("import_s", "load_s", "warmup_n", "parse_wall_s", "rss_after_load_mb",
                                            "rss_after_parse_mb", "serve_peak_rss_mb")},
                  eval_process={k: ev[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "rc")},
                  per_message=per_message, oos_per_message=oos, reliability=reliability, **valid_records)
    return _finish(result, out_path, load_start)


def reevaluate_pair(ds: Dataset, system: str, args, out_path: Path) -> dict:
    """Parse the test messages again with the archive an earlier run trained (same data), e.g.
    after a change to the serving code; training figures are kept and the result says so."""
    try:
        prev = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompareError(f"--reeval: no readable result {out_path} ({e}); run the pair first") from None
    name = f"{ds.name}__{system}"
    if prev.get("status") != "ok" or (prev.get("data") or {}).get("sha256") != ds.sha256 \
            or (prev.get("data") or {}).get("subsample") != ds.subsample:
        raise CompareError(f"--reeval: {out_path} is not an ok result on this data; run the pair first")
    archive = Path(prev["archive"])
    archive = archive if archive.is_absolute() else ROOT / archive
    if not archive.is_file():
        raise CompareError(f"--reeval: the trained model {archive} is gone; run the pair again (without --reeval)")
    work = Path(args.work_dir) / name
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.env)
    history = list(prev.get("reevaluations", [])) + [{
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "previous": {k: (prev.get("metrics") or {}).get(k) for k in
                     ("accuracy", "parse_p50_ms", "parse_p99_ms", "serve_peak_rss_mb", "load_s")},
        "previous_finished": prev.get("finished")}]
    result = {k: v for k, v in prev.items() if k not in ("metrics", "eval", "eval_process", "per_message",
                                                       "oos_per_message", "reliability", "valid_per_message",
                                                       "oos_valid_per_message", "finished", "loadavg")}
    result["reevaluations"] = history
    _say(f"{name}: re-evaluating the model trained {prev.get('started')} ({archive.name}) ...")
    return evaluate_archive(ds, archive, work, env, args, result, prev["train"], out_path, os.getloadavg())


def _finish(result: dict, out_path: Path, load_start) -> dict:
    result["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    # Load average before/after: a busy machine inflates times, and this says so.
    result["loadavg"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    _write_json(out_path, result)
    m = result.get("metrics") or {}
    if result["status"] == "ok":
        _say(f"{result['dataset']}__{result['system']}: accuracy {m['accuracy']}, P50 {m['parse_p50_ms']} ms, "
             f"serving RSS {m['serve_peak_rss_mb']} MB -> {out_path}")
    else:
        _say(f"{result['dataset']}__{result['system']}: {result['status']}: {result['error']}")
    return result


def _say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- CLI


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (see --help)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help=f"folder of dataset folders (default: {DEFAULT_DATA_DIR})")
    ap.add_argument("--datasets", type=_csv, default=list(DEFAULT_DATASETS),
                    help=f"comma-separated dataset folder names (default: {','.join(DEFAULT_DATASETS)})")
    ap.add_argument("--systems", type=_csv, default=list(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke mode: {QUICK['n_intents']} intents x {QUICK['per_intent']} train examples, "
                         f"{QUICK['n_test']} test ({QUICK['n_oos']} out-of-scope), seeded; DIET and SLM360 "
                         f"{QUICK['diet_epochs']} epochs; results in benchmarks/results/quick/")
    ap.add_argument("--limit-test", type=int, default=None, metavar="N",
                    help="evaluate a seeded random N test (and N out-of-scope) messages only")
    ap.add_argument("--slm360-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an SLM360Classifier key, e.g. epochs=5 or checkpoint=PATH (repeatable); "
                         "a checkpoint also applies to SLM360Featurizer")
    ap.add_argument("--featurizer-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an SLM360Featurizer key (featurizer_diet system; repeatable)")
    ap.add_argument("--diet-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DIETClassifier key in every pipeline that has DIET (repeatable; "
                         "passed to Rasa unchecked)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the training and serving subprocesses, e.g. "
                         "NUMBA_NUM_THREADS=1 (repeatable; recorded in the result)")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help=f"where the JSON results go (default: {RESULTS_DIR.relative_to(ROOT)}, "
                         f"or {QUICK_RESULTS_DIR.relative_to(ROOT)} with --quick)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help=f"models, generated YAML and logs, outside git (default: {WORK_DIR.relative_to(ROOT)}/, "
                         f"or {QUICK_WORK_DIR.relative_to(ROOT)}/ with --quick)")
    ap.add_argument("--resume", dest="resume", action="store_true", default=True,
                    help="skip pairs whose result JSON exists with status ok for the same data files and "
                         "subset (default); failed pairs are re-run")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="run every pair again")
    ap.add_argument("--force", action="store_true", help="re-run pairs even if their results exist (= --no-resume)")
    ap.add_argument("--reeval", action="store_true",
                    help="do not train: parse the test messages again with each pair's saved model (after a "
                         "change to the serving code); training figures are kept, the result lists the re-runs")
    ap.add_argument("--diet-chunk-epochs", type=int, default=None, metavar="N",
                    help="train DIET (diet, diet_batch128, diet_io, featurizer_diet) in runs of N epochs, each continuing "
                         "the last with rasa's --finetune; progress is kept after each run in the work dir, so a "
                         "pair that outlasts a sitting resumes at its next chunk as long as that dir survives "
                         "(runs/compare/ is gitignored: a fresh checkout starts over) (default: one run)")
    ap.add_argument("--max-chunks", type=int, default=None, metavar="K",
                    help="with --diet-chunk-epochs: train at most K chunks in this invocation, then stop (the "
                         "pair is saved as train_incomplete and resumes next time), e.g. to keep the machine "
                         "quiet for another measurement between chunks")
    ap.add_argument("--train-timeout", type=float, default=None, metavar="S", help="kill training after S seconds")
    ap.add_argument("--eval-timeout", type=float, default=None, metavar="S", help="kill evaluation after S seconds")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; 0 if every pair succeeded, 1 if one failed, 2 on bad input."""
    ap = build_parser()
    args = ap.parse_args(argv)
    os.environ["RASA_TELEMETRY_ENABLED"] = "false"
    # `kill` (SIGTERM) becomes SystemExit, so run_monitored ends the Rasa process tree it
    # started in its own session instead of leaving it training as an orphan.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run(args) -> int:
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        raise CompareError(f"--systems: unknown {bad or 'empty list'}; choose from {', '.join(SYSTEMS)}")
    if not args.datasets:
        raise CompareError("--datasets: empty list")
    if args.max_chunks is not None and (args.max_chunks < 1 or not args.diet_chunk_epochs):
        raise CompareError(f"--max-chunks {args.max_chunks}: needs --diet-chunk-epochs and a value >= 1")
    if args.diet_chunk_epochs is not None and args.diet_chunk_epochs < 1:
        raise CompareError(f"--diet-chunk-epochs {args.diet_chunk_epochs}: must be >= 1 (or leave it out)")
    if args.limit_test is not None and args.limit_test < 1:
        raise CompareError(f"--limit-test {args.limit_test}: must be >= 1")
    if not args.data_dir.is_dir():
        raise CompareError(f"--data-dir {args.data_dir}: not a folder; point it at the folder holding snips/, atis/, ...")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise CompareError(f"--env {item!r}: expected NAME=VALUE, e.g. --env NUMBA_NUM_THREADS=1")
        env[key] = value
    args.env = env
    slm360_set = parse_sets(args.slm360_set, "--slm360-set")
    featurizer_set = parse_sets(args.featurizer_set, "--featurizer-set")
    diet_set = parse_sets(args.diet_set, "--diet-set")
    _check_keys(slm360_set, "classifier.py", "SLM360Classifier", "--slm360-set")
    _check_keys(featurizer_set, "featurizer.py", "SLM360Featurizer", "--featurizer-set", extra=("alias",))
    _resolve_checkpoint(slm360_set, "--slm360-set")
    _resolve_checkpoint(featurizer_set, "--featurizer-set")
    results_dir = args.results_dir or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    args.work_dir = args.work_dir or (QUICK_WORK_DIR if args.quick else WORK_DIR)
    resume = args.resume and not args.force

    configs = {s: build_config(s, args.quick, slm360_set, diet_set, featurizer_set) for s in args.systems}
    for system, (cfg, _) in configs.items():
        if needs_pretrained(cfg):
            sys.path.insert(0, str(ROOT))
            from slm360_rasa.nano.assets import pretrained_checkpoint_path

            try:
                pretrained_checkpoint_path()
            except FileNotFoundError as e:
                raise CompareError(f"system '{system}' uses the shipped pretrained checkpoint: {e} "
                                   "Or pass --slm360-set checkpoint=PATH.") from None

    datasets = {name: load_dataset(args.data_dir, name) for name in args.datasets}  # fail early on bad data
    machine = machine_description()
    failed = 0
    total = len(datasets) * len(args.systems)
    done = 0
    for name, ds in datasets.items():
        if args.quick:
            ds = quick_subsample(ds)
        if args.limit_test:
            ds = limit_test(ds, args.limit_test)
        for system in args.systems:
            done += 1
            out_path = results_dir / f"{name}__{system}.json"
            if args.reeval:
                _say(f"[{done}/{total}] {name}__{system} (re-evaluation)")
                failed += reevaluate_pair(ds, system, args, out_path)["status"] != "ok"
                continue
            if resume and out_path.is_file():
                try:
                    prev = json.loads(out_path.read_text(encoding="utf-8"))
                except ValueError:
                    prev = {}
                same_data = (prev.get("data", {}).get("sha256") == ds.sha256
                             and prev.get("data", {}).get("subsample") == ds.subsample)
                if prev.get("status") == "ok" and same_data:
                    _say(f"[{done}/{total}] {name}__{system}: result exists, skipped (--force re-runs it)")
                    continue
                if prev.get("status") == "ok":
                    _say(f"{out_path} was measured on other data (files or --quick/--limit-test subset): re-running")
            _say(f"[{done}/{total}] {name}__{system}")
            cfg, applied = configs[system]
            result = run_pair(ds, system, cfg, applied, args, machine, out_path)
            failed += result["status"] != "ok"
    _say(f"done: {total - failed}/{total} pairs ok; results in {results_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
