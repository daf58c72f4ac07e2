"""THE machine description of every benchmark: what the figures were measured on.

Timings are only comparable on one machine, so every result records it: compare.py and
continual.py the full `machine_description()`, the encoder benchmarks (bench_encoder.py,
fastpath_modes.py) its `compact()` view, and report.py reads it back with `describe()`.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

from benchmarks import ROOT


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


def compact(description: Optional[dict] = None) -> dict:
    """The few fields the encoder benchmarks record (CPU, cores, Python / numpy / numba versions
    and numba's thread count), taken from `description` (default: this machine's)."""
    import numba

    m = description or machine_description()
    return {"cpu": m["cpu"], "cores": m["cores_logical"], "python": m["python"], "numpy": m["numpy"],
            "numba": m["numba"], "numba_threads": numba.config.NUMBA_NUM_THREADS}


def describe(m: dict) -> str:
    """A saved `machine_description()` in one line: CPU, cores, RAM and the library versions."""
    return (f"{m.get('cpu')}, {m.get('cores_logical')} cores ({m.get('cores_usable')} usable), "
            f"{m.get('ram_gb')} GiB RAM; Python {m.get('python')}, rasa {m.get('rasa')}, "
            f"tensorflow {m.get('tensorflow')}, numba {m.get('numba')}")
