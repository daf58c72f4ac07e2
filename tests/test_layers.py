"""The layer rules of docs/DESIGN.md, checked on the source: no import cycle, imports point down.

    components/  ->  train/  ->  model/  ->  nano/        (config, checks, fileio: shared)

Every `import` statement counts, at module level or inside a function: a lazy import is still
a dependency. A subprocess then checks the serving path at run time: loading and running a
trained model leaves training code and the optimizer unimported.
"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slm360_rasa

PKG = Path(slm360_rasa.__file__).parent
TRAINING = ("slm360_rasa.train",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path, modules: set) -> set:
    """Absolute names of what `path` imports (submodules resolved when they are modules)."""
    name = _module_name(path)
    base = name if _is_package(path) else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out.update(subs if subs and len(subs) == len(node.names) else [target] + subs)
    return out


@pytest.fixture(scope="module")
def graph():
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def _ours(graph, m):
    return sorted(i for i in graph[m] if i.startswith("slm360_rasa"))


def test_there_is_no_import_cycle(graph):
    edges = {m: [i for i in _ours(graph, m) if i in graph] for m in graph}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer,forbidden", [
    ("slm360_rasa.nano", ("slm360_rasa.train", "slm360_rasa.model", "slm360_rasa.components", "slm360_rasa.config",
                          "rasa")),
    ("slm360_rasa.model", ("slm360_rasa.train", "slm360_rasa.components", "rasa")),
    ("slm360_rasa.train", ("slm360_rasa.components", "rasa")),
    ("slm360_rasa.config", TRAINING + ("slm360_rasa.model", "slm360_rasa.components", "rasa")),
    ("slm360_rasa.checks", ("slm360_rasa.",)),
    ("slm360_rasa.fileio", ("slm360_rasa.",)),
])
def test_imports_point_down(graph, layer, forbidden):
    bad = []
    for m, imports in graph.items():
        if m == layer or m.startswith(layer + "."):
            bad += [f"{m} imports {i}" for i in imports
                    if any(i == f.rstrip(".") or i.startswith(f if f.endswith(".") else f + ".") for f in forbidden)]
    assert not bad, bad


def test_the_component_modules_import_training_code_only_inside_functions():
    for path in (PKG / "components").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for n in top:
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            assert not any("train" in x.split(".") for x in names), f"{path.name}: top-level import of {names}"


_SERVE = """
import json, sys
from slm360_rasa.model import IntentEntityModel
from slm360_rasa.components.classifier import SLM360Classifier  # noqa: F401 (what `rasa run` imports)
m = IntentEntityModel.load(sys.argv[1])
m.warm_up()
m.predict(["book a table for 2", ""])
print(json.dumps(sorted(k for k in sys.modules if k.startswith("slm360_rasa"))))
"""


@pytest.mark.rasa
def test_serving_loads_no_training_code(trained_model_file):
    r = subprocess.run([sys.executable, "-c", _SERVE, str(trained_model_file)], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "RASA_TELEMETRY_ENABLED": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "slm360_rasa.model.intent_entity" in loaded
    assert not [m for m in loaded if m.startswith(TRAINING)], loaded


@pytest.fixture(scope="module")
def trained_model_file(tmp_path_factory):
    from slm360_rasa.config import FinetuneConfig
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer
    from slm360_rasa.train.finetune import finetune

    small = NanoConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32)
    d = tmp_path_factory.mktemp("serve")
    ckpt = save_checkpoint(d / "c.safetensors", init_params(small, seed=0), small, NanoTokenizer.load().sha256)
    model = finetune(["book a table", "table for two", "hello", "hi there"], ["book", "book", "greet", "greet"],
                     [[], [], [], []], FinetuneConfig(epochs=1, holdout_fraction=0.0), checkpoint=str(ckpt),
                     progress=False)
    return model.save(d / "m.safetensors")


def test_no_module_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*=")
    roots = [PKG, PKG.parent / "benchmarks", PKG.parent / "scripts", PKG.parent / "tests"]
    bad = [str(p) for root in roots if root.is_dir() for p in root.rglob("*.py")
           if edit.search(p.read_text(encoding="utf-8")) and p != Path(__file__)]
    assert not bad, bad


# A module longer than this must say why in its first lines (docs/DESIGN.md, "Modules").
MAX_MODULE_LINES = 500


def test_modules_stay_small_or_say_why():
    long = [f"{p.relative_to(PKG.parent)}: {n} lines" for p in PKG.rglob("*.py")
            for n in [len(p.read_text(encoding="utf-8").splitlines())]
            if n > MAX_MODULE_LINES and "lines" not in "\n".join(p.read_text(encoding="utf-8").splitlines()[:5])]
    assert not long, long
