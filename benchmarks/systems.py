"""THE systems registry: every system the benchmarks train, its pipeline config and names.

compare.py trains and evaluates them, report.py and the plots lay out their columns, and
continual.py borrows the DIET pipeline; all of them read this one table. A system is a
pipeline file in benchmarks/configs/:

  diet             the `rasa init` default pipeline (../shared/baselines/diet_default.yml)
  diet_batch128    diet with DIETClassifier batch_size [64, 128] instead of [64, 256], only where
                   the default cannot train: on ATIS its CRF (317 BILOU tags) ran a 23.5 GiB
                   machine out of memory at batch 234
  diet_io          diet with DIETClassifier BILOU_flag false (IO entity tags: 80 CRF tags on ATIS
                   instead of 317), only where the default cannot train within a sitting: on ATIS
                   diet_batch128 takes about 7 h for 100 epochs on 2 cores
  slm360           WhitespaceTokenizer -> slm360_rasa.SLM360Classifier -> EntitySynonymMapper
                   -> FallbackClassifier(0.3, ambiguity 0.1)
  featurizer_diet  WhitespaceTokenizer -> slm360_rasa.SLM360Featurizer -> DIETClassifier
                   -> EntitySynonymMapper -> FallbackClassifier (optional)

It also builds a system's config with the user's overrides (`--slm360-set`, `--diet-set`,
`--featurizer-set`) applied and checked.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from benchmarks import BENCH_DIR, CompareError

CONFIG_DIR = BENCH_DIR / "configs"
CLASSIFIER = "slm360_rasa.SLM360Classifier"
FEATURIZER = "slm360_rasa.SLM360Featurizer"
DIET = "DIETClassifier"
DIET_DEFAULT_EPOCHS = 300  # DIETClassifier's own default, for a config that leaves `epochs` out
# --quick: two epochs run every step of training, in a time a test suite can afford.
QUICK_EPOCHS = {"diet_epochs": 2, "slm360_epochs": 2}


@dataclass(frozen=True)
class System:
    """One benchmarked system: its pipeline file and how results and the report name it."""

    config: str  # file name in benchmarks/configs/
    label: str  # long name, saved in every result as `system_label`
    short: str  # column and legend name in RESULTS.md and the plots
    trains_diet: bool  # its training is DIET's, which --diet-chunk-epochs may split into chunks
    # For a DIET variant: the one key it changes in the default pipeline (Markdown, for the
    # report), and why such a variant exists at all: the report compares SLM360 with it only
    # on a dataset where the default DIET has no finished result.
    diet_change: Optional[str] = None


# In report order: the columns of RESULTS.md and the bars of the plots follow it.
SYSTEMS: Dict[str, System] = {
    "diet": System("diet.yml", "DIET (rasa init default)", "DIET", trains_diet=True),
    "diet_batch128": System("diet_batch128.yml", "DIET (rasa init default, batch size 64-128)", "DIET batch<=128",
                            trains_diet=True,
                            diet_change="DIETClassifier `batch_size: [64, 128]` instead of `[64, 256]`"),
    "diet_io": System("diet_io.yml", "DIET (rasa init default, IO entity tags instead of BILOU)", "DIET IO tags",
                      trains_diet=True,
                      diet_change="DIETClassifier `BILOU_flag: false` (IO entity tags) instead of BILOU tags"),
    "slm360": System("slm360.yml", "SLM360Classifier", "SLM360", trains_diet=False),
    "featurizer_diet": System("featurizer_diet.yml", "SLM360Featurizer + DIET", "SLM360 feat. + DIET",
                              trains_diet=True),
}
# compare.py runs these unless told otherwise; the report always has a column for them.
DEFAULT_SYSTEMS = ("diet", "slm360")
LABELS = {name: s.short for name, s in SYSTEMS.items()}
CHUNKABLE = tuple(name for name, s in SYSTEMS.items() if s.trains_diet)
DIET_VARIANT_CHANGE = {name: s.diet_change for name, s in SYSTEMS.items() if s.diet_change}
# The DIET that SLM360 is compared with: the default pipeline; where it could not train (out of
# memory on ATIS, longer than a sitting on SNIPS), the first variant here with a result.
DIET_BASELINES = ("diet",) + tuple(DIET_VARIANT_CHANGE)


def config_path(system: str) -> Path:
    """The pipeline file of `system`."""
    return CONFIG_DIR / SYSTEMS[system].config


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


def classifier_keys() -> set:
    """SLM360Classifier's config keys, from their one declaration (slm360_rasa/config.py,
    which imports neither Rasa nor TensorFlow)."""
    from slm360_rasa.config import classifier_defaults

    return set(classifier_defaults())


def check_keys(sets: Dict[str, object], keys: Optional[set], class_name: str, flag: str,
               extra: Sequence[str] = ()) -> None:
    """Raise CompareError if `sets` names a key outside `keys` (the component `class_name`'s
    config keys; None: unknown, nothing checked) and `extra`. Checked here so that a
    misspelt key stops the run before hours of training, not after."""
    if keys is None:
        return
    keys = set(keys) | set(extra)
    bad = sorted(set(sets) - keys)
    if bad:
        raise CompareError(f"{flag}: unknown {class_name} key(s) {bad}; valid keys: {sorted(keys)}")


def resolve_checkpoint(sets: Dict[str, object], flag: str) -> None:
    """Make `sets["checkpoint"]`, if any, an absolute path to an existing file (CompareError if none)."""
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
    path = config_path(system)
    if not path.is_file():
        raise CompareError(f"pipeline config missing: {path}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    per_component = {
        CLASSIFIER: {**({"epochs": QUICK_EPOCHS["slm360_epochs"]} if quick else {}), **slm360_set},
        DIET: {**({"epochs": QUICK_EPOCHS["diet_epochs"]} if quick else {}), **diet_set},
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

