"""The benchmarks' subprocesses: their environment, and their wall time, CPU time and peak memory.

Rasa trains and serves in child processes, each in its own session so that a timeout, a
Ctrl-C or a `kill` of the benchmark ends the whole tree it started and nothing else.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from benchmarks import ROOT

LOG_TAIL_CHARS = 4000
POLL_S = 0.1  # RSS sampling interval of the training process tree


def repo_env(env: Optional[dict] = None) -> dict:
    """`env` (default: this process's environment) with the repository root first on PYTHONPATH,
    so a child runs this working tree's `slm360_rasa` and `benchmarks` even if another copy is
    installed, and whatever its working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def child_env(work: Path, extra: Optional[Dict[str, str]] = None) -> dict:
    """Environment of the Rasa subprocesses (`extra`: the user's --env settings, applied last)."""
    env = repo_env()
    env["RASA_TELEMETRY_ENABLED"] = "false"
    # Rasa's training cache would let a re-run reuse trained components and report a
    # fraction of the real training time: size 0 disables it (rasa.engine.caching).
    env["RASA_MAX_CACHE_SIZE"] = "0"
    env["RASA_CACHE_DIRECTORY"] = str(work / ".rasa-cache")
    env["PYTHONHASHSEED"] = "0"  # as the Makefile: the same hashing in every run
    env.update(extra or {})
    return env


def exit_on_sigterm(signum, frame):
    """SIGTERM handler: `kill` becomes SystemExit, so `run_monitored` ends the process tree it
    started in its own session instead of leaving it training as an orphan."""
    raise SystemExit(128 + signum)


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
    return kernel_oom_line(run.get("pid"))


def kernel_oom_line(pid: Optional[int]) -> Optional[str]:
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

