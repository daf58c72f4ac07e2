"""How the benchmarks save a result: JSON that names no directory of this machine, written atomically.

A crash never leaves a half-written result that compare.py's --resume would trust, and a
committed result reads the same whichever checkout produced it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from slm360_rasa.fileio import atomic_write_text

from benchmarks import ROOT, SHARED


def portable(value):
    """The value with absolute paths inside the workspace (the repository, and the ../shared data
    beside it) rewritten relative to the repository root, so committed results name no
    directory of the machine that produced them. Only those two trees: a checkout in /tmp must
    not turn every other /tmp path relative. Resume matches on hashes, not paths."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
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


def write_json(path: Path, obj: dict) -> None:
    """Save `obj` as indented UTF-8 JSON at `path`, paths made `portable`, atomically."""
    atomic_write_text(path, json.dumps(portable(obj), indent=1, ensure_ascii=False) + "\n")
