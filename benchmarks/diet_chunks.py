"""DIET trained in chunks: its epochs as consecutive `rasa train nlu` runs, resumable between sittings.

DIET's 100 epochs can outlast a sitting on 2 cores (Banking77 or ATIS: hours), and a killed
`rasa train` keeps nothing. With compare.py's --diet-chunk-epochs N its training runs as
consecutive runs of N epochs, each continuing the previous one through Rasa's own
`--finetune` (weights and vocabularies carry over; the optimizer's moment estimates restart
once per chunk, and so does DIET's batch-size ramp, which spans each run's own epochs: the
default's 64 to 256 repeats within every chunk, the same mean batch size as one 100-epoch
run). Progress is saved after each chunk in the pair's work dir (CHUNK_STATE), so a pair
interrupted mid-training resumes at its next chunk.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import yaml

from benchmarks import monitor, say
from benchmarks.store import write_json
from benchmarks.systems import CHUNKABLE, DIET, DIET_DEFAULT_EPOCHS

CHUNK_STATE = "chunks.json"  # in a pair's work dir: the finished chunks of a chunked training


def chunk_plan(cfg: dict, system: str, chunk_epochs: Optional[int]) -> Optional[List[int]]:
    """Epochs of each `rasa train nlu` run when DIET trains in chunks, or None (one run)."""
    if not chunk_epochs or system not in CHUNKABLE:
        return None
    diet = [c for c in cfg["pipeline"] if c.get("name") == DIET]
    total = int(diet[0].get("epochs", DIET_DEFAULT_EPOCHS)) if diet else 0
    if total <= chunk_epochs:
        return None
    return [chunk_epochs] * (total // chunk_epochs) + ([total % chunk_epochs] if total % chunk_epochs else [])


def train_in_chunks(plan: List[int], cfg: dict, nlu: Path, work: Path, env: dict, args, name: str,
                    archive: Path, state_key: dict) -> dict:
    """DIET's epochs as consecutive `rasa train nlu` runs, each after the first continuing the
    previous run's model with `--finetune PREV --epoch-fraction F` (Rasa's own finetuning:
    weights, vocabularies and label maps carry over; the optimizer's moments restart). Why:
    DIET's 100 epochs outlast one sitting on a 2-core machine, and a killed `rasa train`
    keeps nothing. Progress is saved after every chunk (chunks.json), so an interrupted
    pair resumes at its next chunk. Returns run_monitored's dict with summed wall and CPU
    time, the peak RSS over all chunks, and the per-chunk figures under "chunks"."""
    state_path = work / CHUNK_STATE
    state = chunk_state(work, state_key, plan) or {"key": state_key, "plan": plan, "done": []}
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
            say("compare", f"{name}: stopping after {args.max_chunks} chunk(s) (--max-chunks); "
                           f"{i}/{len(plan)} done, run the same command again to continue")
            return chunks_total(state["done"], incomplete=True)
        out = models / f"chunk{i}.tar.gz"
        cmd = [sys.executable, "-m", "rasa", "train", "nlu", "--config", str(config_path), "--nlu", str(nlu),
               "--out", str(models), "--fixed-model-name", out.name]
        if i:
            cmd += ["--finetune", str(models / f"chunk{i - 1}.tar.gz"), "--epoch-fraction", repr(plan[i] / plan[0])]
        say("compare", f"{name}: training chunk {i + 1}/{len(plan)} ({plan[i]} epochs, "
                       f"{sum(plan[:i])} done{' before this sitting' if i == first and i else ''}) ...")
        run = monitor.run_monitored(cmd, work / f"train_chunk{i}.log", env, work, timeout_s=args.train_timeout)
        if run["rc"] != 0 or not out.is_file():
            run["log_tail"] = monitor.log_tail(work / f"train_chunk{i}.log")
            run["rc"] = run["rc"] or 1
            return {**run, "chunks": state["done"] + [run]}
        state["done"].append({**run, "epochs": plan[i], "archive": str(out)})
        write_json(state_path, state)
        say("compare", f"{name}: chunk {i + 1}/{len(plan)} trained in {run['wall_s']:.1f} s")
    shutil.copyfile(models / f"chunk{len(plan) - 1}.tar.gz", archive)
    return chunks_total(state["done"])


def chunk_state(work: Path, state_key: dict, plan: List[int]) -> Optional[dict]:
    """The saved chunk progress of `work` if it belongs to this data, config and plan, else None."""
    try:
        prev = json.loads((work / CHUNK_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return prev if prev.get("key") == state_key and prev.get("plan") == plan else None


def chunks_total(done: List[dict], incomplete: bool = False) -> dict:
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
