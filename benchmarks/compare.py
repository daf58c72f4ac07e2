"""DIET vs SLM360 through real Rasa: `rasa train nlu` + `Agent.parse_message` (docs/DESIGN.md, "Benchmark protocol").

For each dataset x system, one pair at a time:

  1. write the train split as Rasa NLU YAML (entities annotated `[value](entity)` from the
     jsonl character offsets) and check that Rasa reads it back exactly (benchmarks/rasa_data.py);
  2. `python -m rasa train nlu --config ... --nlu ... --out ... --fixed-model-name ...` in a
     subprocess: wall time, CPU time and peak RSS of the training process tree (benchmarks/monitor.py);
  3. in a fresh subprocess (benchmarks/_rasa_eval.py): `Agent.load`, 10 warm-up parses, then
     one timed `await agent.parse_message(text)` per test text (then per out-of-scope test
     text, and per valid / oos_valid text where the dataset has them: thresholds such as the
     out-of-scope fallback's are chosen on those, never on test);
  4. metrics (benchmarks/metrics.py) and one JSON per pair under
     benchmarks/results/runs/<dataset>__<system>.json, written as soon as the pair finishes.

DIET's 100 epochs can outlast a sitting on 2 cores (Banking77 or ATIS: hours). With
--diet-chunk-epochs N its training runs as consecutive `rasa train nlu` runs of N epochs, each
continuing the previous one through Rasa's own `--finetune` (benchmarks/diet_chunks.py);
progress is saved after each chunk, and a pair interrupted mid-training resumes at its next
chunk. Progress and chunk models live in the work dir (runs/compare/, gitignored), so resuming
needs the same checkout: a fresh one starts the pair over. The result lists each chunk; its
training time is the sum of the chunks' (Rasa's start-up included in each).

Systems (pipelines in benchmarks/configs/; the registry is benchmarks/systems.py):
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

Examples (from the repository root):
  python -m benchmarks.compare --quick --datasets snips              # minutes: whole path, tiny data
  python -m benchmarks.compare --datasets banking77 --systems diet,slm360
  python -m benchmarks.compare --quick --slm360-set checkpoint=/tmp/small.safetensors
  python -m benchmarks.compare --datasets snips --systems diet --diet-chunk-epochs 15 --max-chunks 1
                                                                     # one sitting each
  python -m benchmarks.report                                        # RESULTS.md + plots

Run on a quiet machine: timings are ratios measured in one run on one machine. Results of
--quick go to benchmarks/results/quick/ and are never mixed with the real ones.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from benchmarks import BENCH_DIR, ROOT, CompareError, _rasa_eval, monitor, say
from benchmarks.datasets import (DEFAULT_DATA_DIR, DEFAULT_DATASETS, QUICK_SAMPLE, SEED, Dataset, eval_splits,
                                 limit_test, load_dataset, quick_subsample)
from benchmarks.diet_chunks import chunk_plan, chunk_state, chunks_total, train_in_chunks
from benchmarks.machine import machine_description
from benchmarks.metrics import summarize, summarize_valid
from benchmarks.rasa_data import verify_round_trip, write_nlu_yaml
from benchmarks.store import write_json
from benchmarks.systems import (CHUNKABLE, DEFAULT_SYSTEMS, QUICK_EPOCHS, SYSTEMS, build_config, check_keys,
                                classifier_keys, component_keys, config_path, needs_pretrained, parse_sets,
                                resolve_checkpoint)

SCHEMA = "slm360-compare/1"
RESULTS_DIR = BENCH_DIR / "results" / "runs"
QUICK_RESULTS_DIR = BENCH_DIR / "results" / "quick"
WORK_DIR = ROOT / "runs" / "compare"
QUICK_WORK_DIR = ROOT / "runs" / "compare-quick"


# ---------------------------------------------------------------------------- one pair


def run_pair(ds: Dataset, system: str, cfg: dict, applied: dict, args, machine: dict, out_path: Path) -> dict:
    """Train, evaluate and save one dataset x system; returns the saved result."""
    name = f"{ds.name}__{system}"
    work = Path(args.work_dir) / name
    config_text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    plan = chunk_plan(cfg, system, args.diet_chunk_epochs)
    state_key = {"sha256": ds.sha256, "subsample": ds.subsample, "config": config_text, "env": dict(args.env)}
    resuming = bool(plan) and bool((chunk_state(work, state_key, plan) or {}).get("done"))
    if work.exists() and not resuming:
        shutil.rmtree(work)  # a previous model or log must never be mistaken for this run's
    work.mkdir(parents=True, exist_ok=True)
    env = monitor.child_env(work, args.env)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()

    nlu = write_nlu_yaml(ds.train, work / "nlu.yml", source=ds.files["train"])
    n_unique = verify_round_trip(nlu, ds.train)
    config_file = work / "config.yml"
    config_file.write_text(config_text, encoding="utf-8")

    result = {
        "schema": SCHEMA, "dataset": ds.name, "system": system, "system_label": SYSTEMS[system].label,
        "quick": bool(args.quick), "status": "running", "started": started,
        "data": {"dir": str(ds.folder), "files": ds.files, "sha256": ds.sha256, "n_train": len(ds.train),
                 "n_train_distinct": n_unique,  # what Rasa trains on: it drops repeated examples
                 "n_test": len(ds.test), "n_oos": len(ds.oos) if ds.oos is not None else None,
                 "n_intents": len({e.intent for e in ds.train}),
                 "n_entity_types": len({lab for e in ds.train for _, _, lab in e.entities}),
                 "subsample": ds.subsample, "nlu_yaml": str(nlu)},
        "config": {"file": str(config_path(system).relative_to(ROOT)), "overrides": applied,
                   "env": dict(args.env), "yaml": config_text},
        "machine": machine,
    }

    models = work / "models"
    archive = models / f"{name}.tar.gz"
    if plan:
        result["train_chunks"] = {"epochs": plan, "how": "rasa train nlu, then --finetune <previous chunk> "
                                                         "--epoch-fraction per further chunk"}
        try:
            train = train_in_chunks(plan, cfg, nlu, work, env, args, name, archive, state_key)
        except (SystemExit, KeyboardInterrupt):
            # `kill` or Ctrl-C mid-chunk: the chunks already saved are progress a report should show.
            done = (chunk_state(work, state_key, plan) or {}).get("done") or []
            if done:
                result["train"] = chunks_total(done, incomplete=True)
                result.update(status="train_incomplete",
                              error=f"interrupted during chunk {len(done) + 1}/{len(plan)}; {len(done)} chunk(s) "
                                    "saved: run the same command again to continue")
                _finish(result, out_path, load_start)
            raise
    else:
        # A name ending in .tar.gz is used verbatim by rasa (model_training._determine_model_name);
        # without the suffix it would apply Path.with_suffix, which mangles names holding a dot.
        cmd = [sys.executable, "-m", "rasa", "train", "nlu", "--config", str(config_file), "--nlu", str(nlu),
               "--out", str(models), "--fixed-model-name", archive.name]
        _say(f"{name}: training ({len(ds.train)} examples) ...")
        train = monitor.run_monitored(cmd, work / "train.log", env, work, timeout_s=args.train_timeout)
    result["train"] = train
    if train.get("incomplete"):
        result.update(status="train_incomplete",
                      error=f"{len(train['chunks'])}/{len(plan)} training chunks done (--max-chunks); "
                            "run the same command again to continue")
        return _finish(result, out_path, load_start)
    if train["rc"] != 0 or not archive.is_file():
        oom = monitor.oom_kill_line(train)  # kept as a field: report.py says "out of memory" from it, not from prose
        result.update(status="train_failed", oom_kill=oom,
                      error=f"rasa train nlu failed ({monitor.failure_reason(train, oom)}); log: {train['log']}",
                      log_tail=monitor.log_tail(Path(train["log"])))
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
    rng, n_warm = random.Random(SEED + 2), _rasa_eval.WARMUP_MESSAGES
    warm = [ds.train[i].text for i in rng.sample(range(len(ds.train)), min(n_warm, len(ds.train)))]
    warm = (warm * n_warm)[:n_warm]
    texts = [e.text for split in eval_splits(ds) for e in split]
    texts_path = work / "eval_texts.json"
    texts_path.write_text(json.dumps({"texts": texts, "warmup": warm}, ensure_ascii=False), encoding="utf-8")
    raw_path = work / "eval_raw.json"
    cmd = _rasa_eval.command(archive, texts_path, raw_path)
    ev = monitor.run_monitored(cmd, work / "eval.log", env, work, timeout_s=args.eval_timeout)
    if ev["rc"] != 0 or not raw_path.is_file():
        result.update(status="eval_failed", eval_process=ev,
                      error=f"evaluation failed ({'timed out' if ev['timed_out'] else 'rc=' + str(ev['rc'])}); log: {ev['log']}",
                      log_tail=monitor.log_tail(work / "eval.log"))
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
    env = monitor.child_env(work, args.env)
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
    write_json(out_path, result)
    m = result.get("metrics") or {}
    if result["status"] == "ok":
        _say(f"{result['dataset']}__{result['system']}: accuracy {m['accuracy']}, P50 {m['parse_p50_ms']} ms, "
             f"serving RSS {m['serve_peak_rss_mb']} MB -> {out_path}")
    else:
        _say(f"{result['dataset']}__{result['system']}: {result['status']}: {result['error']}")
    return result


def _say(msg: str) -> None:
    say("compare", msg)


# ---------------------------------------------------------------------------- CLI


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (see --help)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help=f"folder of dataset folders (default: {DEFAULT_DATA_DIR})")
    ap.add_argument("--datasets", type=_csv, default=list(DEFAULT_DATASETS),
                    help=f"comma-separated dataset folder names (default: {','.join(DEFAULT_DATASETS)})")
    ap.add_argument("--systems", type=_csv, default=list(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke mode: {QUICK_SAMPLE['n_intents']} intents x {QUICK_SAMPLE['per_intent']} train "
                         f"examples, {QUICK_SAMPLE['n_test']} test ({QUICK_SAMPLE['n_oos']} out-of-scope), seeded; DIET and "
                         f"SLM360 {QUICK_EPOCHS['diet_epochs']} epochs; results in benchmarks/results/quick/")
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
                    help=f"train DIET ({', '.join(CHUNKABLE)}) in runs of N epochs, each continuing "
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
    previous = signal.signal(signal.SIGTERM, monitor.exit_on_sigterm)
    try:
        return _run(args)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    check_keys(slm360_set, classifier_keys(), "SLM360Classifier", "--slm360-set")
    check_keys(featurizer_set, component_keys(ROOT / "slm360_rasa" / "components" / "featurizer.py",
                                              "SLM360Featurizer"), "SLM360Featurizer", "--featurizer-set",
               extra=("alias",))
    resolve_checkpoint(slm360_set, "--slm360-set")
    resolve_checkpoint(featurizer_set, "--featurizer-set")
    results_dir = args.results_dir or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    args.work_dir = args.work_dir or (QUICK_WORK_DIR if args.quick else WORK_DIR)
    resume = args.resume and not args.force

    configs = {s: build_config(s, args.quick, slm360_set, diet_set, featurizer_set) for s in args.systems}
    for system, (cfg, _) in configs.items():
        if needs_pretrained(cfg):
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
