"""Regenerate benchmarks/results/RESULTS.md and its PNG plots from the saved compare.py JSON.

Reads every <dataset>__<system>.json of a results folder (default benchmarks/results/runs/)
and writes, with nothing but those files as input:

  * RESULTS.md: a plain statement of which targets are met or missed, then one table per
    metric family (quality: accuracy, macro F1, entity F1, OOS recall, ECE; training time;
    parse latency; memory and archive size) with SLM360/DIET ratios, the machine beside
    every table;
  * plots/accuracy.png, latency.png, train_time.png, memory.png, calibration.png (benchmarks/plots.py).

A dataset or system without a result file is shown as "not run", a failed run as "failed";
no number is ever filled in. Examples (from the repository root):

  python -m benchmarks.report                     # benchmarks/results/runs -> benchmarks/results/RESULTS.md
  python -m benchmarks.report --quick             # benchmarks/results/quick -> benchmarks/results/quick/RESULTS.md
  python -m benchmarks.report --results-dir DIR   # DIR -> DIR/RESULTS.md, DIR/plots/
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from slm360_rasa.fileio import atomic_write_text

from benchmarks import BENCH_DIR, ROOT
from benchmarks import metrics as M
from benchmarks.datasets import DEFAULT_DATASETS
from benchmarks.machine import describe
from benchmarks.plots import make_plots
from benchmarks.run_results import NOT_RUN, ReportError, Results, cell, is_ok, label, load_results, metric
from benchmarks.systems import DEFAULT_SYSTEMS, DIET_BASELINES, DIET_VARIANT_CHANGE, SYSTEMS

RESULTS_DIR = BENCH_DIR / "results" / "runs"
QUICK_RESULTS_DIR = BENCH_DIR / "results" / "quick"
DEFAULT_OUT = BENCH_DIR / "results" / "RESULTS.md"
ENTITY_DATASETS = ("snips", "atis")

# Targets of the project (the issues and docs/DESIGN.md), checked per dataset where both systems ran.
TARGETS = [
    ("accuracy", "SLM360 intent accuracy above DIET's"),
    ("train", "training at least 3x faster than DIET"),
    ("p50", "parse P50 no slower than DIET's"),
    ("rss", "serving RSS no larger than DIET's"),
    ("archive", "model archive at least 4x smaller than DIET's"),
]
TRAIN_SPEEDUP_TARGET = 3.0
ARCHIVE_SHRINK_TARGET = 4.0


def _ratio(a, b) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(v, fmt: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


# ---------------------------------------------------------------------------- machines


def machine_line(results: Results, datasets: Sequence[str], systems: Sequence[str]) -> str:
    """One line describing the machine(s) the given runs were measured on.

    With several machines it says which datasets ran on each, and warns about every dataset
    whose finished runs come from different machines: SLM360/DIET ratios are taken within a
    dataset, so they are sound as long as each dataset's pair shares one machine.
    """
    keyed = [(d, r) for (d, s), r in results.items() if d in datasets and s in systems and r.get("machine")]
    runs = [r for _, r in keyed]
    if not runs:
        return "_Machine: no runs._"
    seen: Dict[str, Dict[str, set]] = {}
    ok_machines: Dict[str, set] = {}  # dataset -> machines of its finished runs
    for d, r in keyed:
        m = r["machine"]
        desc = describe(m)
        entry = seen.setdefault(desc, {"dates": set(), "datasets": set()})
        entry["dates"].add(str(r.get("started") or m.get("date") or "")[:10])
        entry["datasets"].add(d)
        if is_ok(r):
            ok_machines.setdefault(d, set()).add(desc)
    if len(seen) == 1:
        ((desc, entry),) = seen.items()
        line = f"_Machine: {desc} (measured {', '.join(sorted(entry['dates']))})._"
    else:
        parts = [f"{', '.join(d for d in datasets if d in e['datasets'])} on {desc} (measured {', '.join(sorted(e['dates']))})"
                 for desc, e in seen.items()]
        line = "_Machines: " + "; ".join(parts) + "._"
        mixed = [d for d in datasets if len(ok_machines.get(d, ())) > 1]
        if mixed:
            line += (f" **{', '.join(mixed)}: the systems ran on different machines, so their ratios are not "
                     "meaningful.**")
        else:
            line += (" Each dataset's finished runs share one machine, so the ratios within a dataset hold; "
                     "absolute figures of different datasets come from different machines.")
    loads = [max(r["loadavg"]["start"][0], r["loadavg"]["end"][0]) for r in runs if r.get("loadavg")]
    cores = max((r["machine"].get("cores_logical") or 1) for r in runs)
    if loads and max(loads) > cores:
        line += (f" _Load average reached {max(loads):.1f} on {cores} cores during these runs: another job "
                 "shared the CPU, so absolute times are inflated._")
    return line


# ---------------------------------------------------------------------------- targets


def diet_baseline(results: Results, dataset: str) -> str:
    """The DIET system SLM360 is compared with on `dataset`: "diet" (the default pipeline)
    unless it has no ok result, else the first variant of DIET_BASELINES that has one."""
    for system in DIET_BASELINES:
        if is_ok(results.get((dataset, system))):
            return system
    return "diet"


def target_lines(results: Results, datasets: Sequence[str]) -> List[str]:
    """One plain-language line per target: met, MISSED (with the numbers) or not measured."""
    lines = []
    for key, text in TARGETS:
        met, missed, unmeasured = [], [], []
        for d in datasets:
            base = diet_baseline(results, d)
            diet, slm = results.get((d, base)), results.get((d, "slm360"))
            if not (is_ok(diet) and is_ok(slm)):
                # Every DIET that has a result file, so a capped run still training is named too.
                sides = [] if is_ok(diet) else [s for s in DIET_BASELINES if s == "diet" or (d, s) in results]
                sides += [] if is_ok(slm) else ["slm360"]
                why = [f"{label(s)} {cell(results, d, s, '', '')}" for s in sides]
                unmeasured.append(f"{d} ({', '.join(why)})")
                continue
            dm, sm = diet["metrics"], slm["metrics"]
            if key == "accuracy":
                ok = sm["accuracy"] > dm["accuracy"]
                detail = f"SLM360 {sm['accuracy']:.4f} vs DIET {dm['accuracy']:.4f}"
                pair = paired_accuracy(results, d, base=base)
                if isinstance(pair, dict):
                    detail += (f"; {_pts(pair['difference'])} pts, 95% CI {_pts(pair['ci95_low'])} to "
                               f"{_pts(pair['ci95_high'])}, McNemar p = {pair['mcnemar_p']:.2g}")
            elif key == "train":
                speed = _ratio(dm["train_wall_s"], sm["train_wall_s"])
                ok = speed is not None and speed >= TRAIN_SPEEDUP_TARGET
                detail = f"{_fmt(speed, '.2f')}x faster: SLM360 {sm['train_wall_s']:.1f} s vs DIET {dm['train_wall_s']:.1f} s"
            elif key == "p50":
                ok = sm["parse_p50_ms"] <= dm["parse_p50_ms"]
                detail = f"SLM360 {sm['parse_p50_ms']:.2f} ms vs DIET {dm['parse_p50_ms']:.2f} ms"
            elif key == "rss":
                ok = sm["serve_peak_rss_mb"] <= dm["serve_peak_rss_mb"]
                detail = f"SLM360 {sm['serve_peak_rss_mb']:.0f} MB vs DIET {dm['serve_peak_rss_mb']:.0f} MB"
            else:
                shrink = _ratio(dm["model_mb"], sm["model_mb"])
                ok = shrink is not None and shrink >= ARCHIVE_SHRINK_TARGET
                detail = f"{_fmt(shrink, '.1f')}x smaller: SLM360 {sm['model_mb']:.2f} MB vs DIET {dm['model_mb']:.2f} MB"
            if base != "diet":  # say which DIET, and why not the default
                detail = f"against {label(base)}, the default DIET {cell(results, d, 'diet', '', '')}: {detail}"
            (met if ok else missed).append(f"{d} ({detail})")
        if missed:
            status = "**MISSED** on " + "; ".join(missed)
            if met:
                status += ". Met on " + "; ".join(met)
        elif met:
            status = "met on " + "; ".join(met)
        else:
            status = "not measured"
        if unmeasured and (met or missed):
            status += f". Not measured on {'; '.join(unmeasured)}"
        elif unmeasured:
            status += f" (no dataset has both DIET and SLM360 results: {'; '.join(unmeasured)})"
        lines.append(f"- {text}: {status}.")
    return lines


# ---------------------------------------------------------------------------- tables


def _pts(x: float) -> str:
    return format(100 * x, "+.2f")


def paired_accuracy(results: Results, dataset: str, system: str = "slm360", base: str = "diet"):
    """`metrics.paired_accuracy_difference` of `system` over `base` on `dataset`'s test
    messages (a dict), or a short reason it cannot be computed (a str): a run missing, or
    the two runs' gold intents not being the same messages in the same order."""
    a, b = results.get((dataset, base)), results.get((dataset, system))
    if not (is_ok(a) and is_ok(b)):
        return NOT_RUN
    pa, pb = a.get("per_message") or {}, b.get("per_message") or {}
    if not (pa.get("correct") and pb.get("correct")):
        return "no per-message results"
    if pa.get("gold") != pb.get("gold"):
        return "different test messages"
    return M.paired_accuracy_difference(M.str_to_bits(pa["correct"]), M.str_to_bits(pb["correct"]))


def paired_accuracy_table(results: Results, datasets: Sequence[str]) -> List[str]:
    """Per dataset: SLM360 - DIET accuracy with its paired 95 % interval and McNemar p."""
    rows = []
    for d in datasets:
        pair = paired_accuracy(results, d, base=diet_baseline(results, d))
        if isinstance(pair, str):
            rows.append([d, pair, "-", "-", "-"])
            continue
        rows.append([d, _pts(pair["difference"]), f"{_pts(pair['ci95_low'])} to {_pts(pair['ci95_high'])}",
                     f"{pair['a_only']} / {pair['b_only']}", format(pair["mcnemar_p"], ".2g")])
    return _table(["dataset", "SLM360 - DIET (pts)", "95% CI (paired bootstrap)",
                   "right for DIET only / SLM360 only", "McNemar p"], rows)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def quality_table(results, datasets, systems, key, fmt, delta=True, applies=None) -> List[str]:
    """Rows = datasets, columns = systems (+ SLM360 - DIET) for one quality metric."""
    header = ["dataset"] + [label(s) for s in systems] + (["SLM360 - DIET"] if delta else [])
    rows = []
    for d in datasets:
        if applies is not None and not applies(d, results):
            rows.append([d] + ["n/a"] * (len(systems) + delta))
            continue
        row = [d] + [cell(results, d, s, key, fmt) for s in systems]
        if delta:
            a, b = metric(results, d, "slm360", key), metric(results, d, diet_baseline(results, d), key)
            row.append(_fmt(None if a is None or b is None else a - b, "+" + fmt))
        rows.append(row)
    return _table(header, rows)


def ratio_table(results, datasets, systems, specs) -> List[str]:
    """Per dataset: each (key, name, unit, fmt) per system, then SLM360/DIET for each key."""
    header = ["dataset"]
    for key, name, unit, fmt in specs:
        header += [f"{label(s)} {name} ({unit})" for s in systems] + [f"{name} SLM360/DIET"]
    rows = []
    for d in datasets:
        row = [d]
        for key, name, unit, fmt in specs:
            row += [cell(results, d, s, key, fmt) for s in systems]
            base = metric(results, d, diet_baseline(results, d), key)
            row.append(_fmt(_ratio(metric(results, d, "slm360", key), base), ".2f"))
        rows.append(row)
    return _table(header, rows)


SHARED_CPU_SHARE = 0.05  # other processes' CPU above this share of the machine: the wall time is inflated


def shared_machine_lines(results, datasets, systems) -> List[str]:
    """One line per training run that shared the machine (other processes used more than
    SHARED_CPU_SHARE of all cores meanwhile) or predates that measurement; [] if none."""
    lines = []
    for d in datasets:
        for s in systems:
            r = results.get((d, s))
            if not is_ok(r):
                continue
            other, wall = r["metrics"].get("train_other_cpu_s"), r["metrics"].get("train_wall_s")
            cores = (r.get("machine") or {}).get("cores_logical") or 1
            if other is None:
                lines.append(f"- {d} / {label(s)}: not recorded whether other processes shared the machine "
                             "during training (run predates that measurement).")
            elif wall and other / (wall * cores) > SHARED_CPU_SHARE:
                lines.append(f"- {d} / {label(s)}: other processes used {other:.0f} CPU-s during training "
                             f"({other / (wall * cores):.0%} of the machine): its wall time is inflated.")
    return (["Machine shared during training:", ""] + lines + [""]) if lines else []


def _has_entities(d: str, results: Results) -> bool:
    for s in SYSTEMS:
        r = results.get((d, s))
        if is_ok(r) and r["metrics"].get("entity_micro_f1") is not None:
            return True
    return d in ENTITY_DATASETS


def _has_oos(d: str, results: Results) -> bool:
    for s in SYSTEMS:
        r = results.get((d, s))
        if is_ok(r) and r["metrics"].get("oos_recall") is not None:
            return True
    return d == "clinc150"


OOS_MAX_ACCURACY_DROP = 0.01  # issue #6: in-scope accuracy at most 1 point below the no-fallback one


def oos_at_valid_threshold(r: dict, max_drop: float = OOS_MAX_ACCURACY_DROP) -> Optional[dict]:
    """FallbackClassifier threshold chosen on valid + oos_valid (highest out-of-scope recall
    within `max_drop` of the no-fallback accuracy), then applied to test + oos_test.
    None when the run recorded no validation or out-of-scope messages."""
    v, ov = r.get("valid_per_message"), r.get("oos_valid_per_message")
    pm, opm = r.get("per_message"), r.get("oos_per_message")
    if not (is_ok(r) and v and ov and pm and opm):
        return None
    chosen = M.choose_fallback_threshold(v["confidence"], [p == g for p, g in zip(v["pred"], v["gold"])],
                                         ov["confidence"], max_drop)
    test = M.fallback_outcome(pm["confidence"], M.str_to_bits(pm["correct"]), opm["confidence"], chosen["threshold"])
    return {"threshold": chosen["threshold"], "valid": chosen, "test": test,
            "test_accuracy_without_fallback": sum(M.str_to_bits(pm["correct"])) / len(pm["correct"])}


def oos_threshold_table(results: Results, datasets: List[str], systems: List[str]) -> List[str]:
    """One row per dataset x system with validation splits: the chosen threshold and its test outcome."""
    rows = []
    for d in datasets:
        for s in systems:
            r = results.get((d, s))
            o = oos_at_valid_threshold(r) if r else None
            if o is None:
                continue
            rows.append([d, label(s), f"{o['threshold']:.4f}", f"{o['test']['oos_recall']:.4f}",
                         f"{o['test']['accuracy']:.4f}", f"{o['test_accuracy_without_fallback']:.4f}",
                         f"{o['test']['fallback_rate_in_scope']:.4f}"])
    if not rows:
        return ["No run recorded validation and out-of-scope messages yet (compare.py records them for "
                "datasets with valid.jsonl and oos_valid.jsonl)."]
    return _table(["dataset", "system", "threshold (valid)", "OOS recall (test)", "in-scope acc. with fallback",
                   "in-scope acc. without", "in-scope fallback rate"], rows)


def render_markdown(results: Results, results_dir: Path, out: Path, plots: Dict[str, Path]) -> str:
    """The whole RESULTS.md text."""
    datasets = list(DEFAULT_DATASETS) + sorted({d for d, _ in results} - set(DEFAULT_DATASETS))
    systems = [s for s in SYSTEMS if s in DEFAULT_SYSTEMS or any(k[1] == s for k in results)]
    systems += sorted({s for _, s in results} - set(systems))
    mline = machine_line(results, datasets, systems)
    quick = any(r.get("quick") for r in results.values())
    try:
        src = results_dir.resolve().relative_to(ROOT)
    except ValueError:
        src = results_dir
    L = ["# DIET vs SLM360: benchmark results", "",
         f"Generated by `benchmarks/report.py` from {len(results)} result file(s) in `{src}` "
         f"on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Protocol: docs/DESIGN.md (Benchmark protocol); "
         "both systems trained with `rasa train nlu` and evaluated through `Agent.parse_message` in a fresh "
         "process (10 warm-up messages, then one timed call per test message). Pipelines: `benchmarks/configs/`.", ""]
    if quick:
        L += ["> **QUICK MODE results** (`compare.py --quick`): subsampled data and 2 epochs. They test the "
              "benchmark's plumbing and are **not** benchmark figures.", ""]
    subset = sorted(f"{r['dataset']} x {r['system']} ({r['data']['n_test']} test messages)" for r in results.values()
                    if not r.get("quick") and ((r.get("data") or {}).get("subsample") or {}).get("limit_test"))
    if subset:
        L += ["> **Measured on a subset of the test split** (`compare.py --limit-test`): " + "; ".join(subset)
              + ". Re-run them without --limit-test for benchmark figures.", ""]
    envs = sorted({f"{r['dataset']} x {r['system']}: " + ", ".join(f"{k}={v}" for k, v in r["config"]["env"].items())
                   for r in results.values() if ((r.get("config") or {}).get("env"))})
    if envs:
        L += ["> Runs with environment overrides (`compare.py --env`): " + "; ".join(envs) + ".", ""]
    for variant, change in DIET_VARIANT_CHANGE.items():
        substituted = [d for d in datasets if diet_baseline(results, d) == variant]
        if substituted:
            L += [f"> Where the default DIET could not train ({', '.join(substituted)}: see the targets and "
                  f"Failed runs), SLM360 is compared with **{label(variant)}**, the same pipeline with {change} "
                  f"(`benchmarks/configs/{variant}.yml`); the SLM360 - DIET and SLM360/DIET columns and the "
                  "targets use it there.", ""]
    L += ["## Targets", "", mline, ""] + target_lines(results, datasets) + [""]

    L += ["## Quality", "", mline, "",
          "### Intent accuracy", "",
          "Top non-fallback intent (when FallbackClassifier answers `nlu_fallback`, the next intent of the ranking).", ""]
    L += quality_table(results, datasets, systems, "accuracy", ".4f") + [""]
    L += ["Is the difference more than luck? Both systems parse the same test messages, so the comparison is "
          "paired: the interval resamples messages (10,000 seeded bootstrap draws), and McNemar's exact test "
          "asks how likely so uneven a split of the messages only one system gets right would be if the two "
          "were equally accurate. Both cover the sampling of test messages only: each system is one trained "
          "model (one seed), so run-to-run training variance is not in them.", ""]
    L += paired_accuracy_table(results, datasets) + [""]
    L += ["### Macro F1", "", "sklearn `f1_score(average='macro')` of the top non-fallback intent.", ""]
    L += quality_table(results, datasets, systems, "macro_f1", ".4f") + [""]
    L += ["### Entity micro F1", "", "Exact character span (start, end) and label; datasets without entities: n/a.", ""]
    L += quality_table(results, datasets, systems, "entity_micro_f1", ".4f", applies=_has_entities) + [""]
    L += ["### Out-of-scope recall", "",
          "Share of out-of-scope test messages (`oos_test.jsonl`) whose top intent is `nlu_fallback` at the "
          "pipeline's FallbackClassifier threshold (0.3); in-scope accuracy after fallback counts a fallback as wrong.", ""]
    L += quality_table(results, datasets, systems, "oos_recall", ".4f", applies=_has_oos) + [""]
    L += ["Out-of-scope recall at a threshold chosen on the validation splits (same procedure for every system): "
          "the FallbackClassifier threshold (rule `confidence < threshold -> nlu_fallback`, ambiguity check off) "
          "with the highest recall on `oos_valid.jsonl` whose accuracy on `valid.jsonl` (a fallback counts as "
          f"wrong) stays within {OOS_MAX_ACCURACY_DROP * 100:.0f} point of the accuracy without fallback; "
          "then applied to the test messages.", ""]
    L += oos_threshold_table(results, datasets, systems) + [""]
    L += ["In-scope accuracy after fallback:", ""]
    L += quality_table(results, datasets, systems, "accuracy_after_fallback", ".4f") + [""]
    L += ["Fallback rate on in-scope test messages:", ""]
    L += quality_table(results, datasets, systems, "fallback_rate_in_scope", ".4f") + [""]
    L += ["### Calibration", "",
          "Expected calibration error (lower is better), 15 equal-width bins of the top non-fallback intent's "
          "confidence against its correctness.", ""]
    L += quality_table(results, datasets, systems, "ece", ".4f") + [""]

    L += ["## Training time", "", mline, "",
          "Wall time of the whole `rasa train nlu` process (Python and TensorFlow start-up included, as a user "
          "sees it). SLM360/DIET below 1 means SLM360 is faster; the target is at most 1/3.", ""]
    L += ratio_table(results, datasets, systems, [("train_wall_s", "train wall", "s", ".1f"),
                                                  ("train_cpu_s", "train CPU", "s", ".1f")]) + [""]
    L += shared_machine_lines(results, datasets, systems)
    L += ["## Parse latency", "", mline, "",
          "One `await agent.parse_message(text)` per test message, after 10 warm-up messages.", ""]
    L += ratio_table(results, datasets, systems, [("parse_p50_ms", "P50", "ms", ".2f"),
                                                  ("parse_p99_ms", "P99", "ms", ".2f")]) + [""]
    L += ["## Memory and size", "", mline, "",
          "Training: peak RSS of the `rasa train nlu` process tree. Serving: peak RSS of the evaluation process "
          "after loading the model and parsing every message. Archive: the `.tar.gz` that `rasa train` writes.", ""]
    L += ratio_table(results, datasets, systems, [("train_peak_rss_mb", "train peak RSS", "MB", ".0f"),
                                                  ("serve_peak_rss_mb", "serving RSS", "MB", ".0f"),
                                                  ("model_mb", "archive", "MB", ".2f")]) + [""]
    L += ["Model load time (`Agent.load`, s):", ""]
    L += quality_table(results, datasets, systems, "load_s", ".2f", delta=False) + [""]

    failed = [r for r in results.values() if not is_ok(r)]
    if failed:
        L += ["## Failed runs", ""]
        for r in failed:
            L.append(f"- {r['dataset']} x {r['system']}: {r.get('status')}: {r.get('error', '')}")
        L.append("")
    if plots:
        L += ["## Plots", ""]
        for title, path in plots.items():
            L.append(f"![{title}]({Path(_rel(path, out.parent)).as_posix()})")
        L.append("")
    return "\n".join(L).rstrip("\n") + "\n"


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


# ---------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write RESULTS.md (and plots); 0 on success, 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", type=Path, default=None,
                    help=f"folder of <dataset>__<system>.json files (default: {RESULTS_DIR.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true",
                    help=f"report the --quick results ({QUICK_RESULTS_DIR.relative_to(ROOT)})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"Markdown file to write (default: {DEFAULT_OUT.relative_to(ROOT)} for the default "
                         "results folder, else RESULTS.md inside --results-dir)")
    ap.add_argument("--plots-dir", type=Path, default=None, help="where the PNGs go (default: plots/ beside --out)")
    ap.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = ap.parse_args(argv)
    if args.quick and args.results_dir is not None:
        ap.error("--quick and --results-dir are exclusive: --quick means --results-dir "
                 f"{QUICK_RESULTS_DIR.relative_to(ROOT)}")
    results_dir = args.results_dir or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    out = args.out or (DEFAULT_OUT if results_dir == RESULTS_DIR else results_dir / "RESULTS.md")
    try:
        results = load_results(results_dir)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    plots = {} if args.no_plots else make_plots(results, args.plots_dir or out.parent / "plots")
    text = render_markdown(results, results_dir, out, plots)
    atomic_write_text(out, text)
    print(f"wrote {out} ({len(results)} result file(s), {len(plots)} plot(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
