"""The PNG plots of RESULTS.md, drawn from compare.py's saved results (report.py calls `make_plots`).

Accuracy, parse latency, training time, memory and size, and calibration, per dataset and
system. A system gets a colour once it has a finished run; a missing or unfinished run of it
is labelled with its short status, never drawn as a number.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from benchmarks import metrics as M
from benchmarks.datasets import DEFAULT_DATASETS
from benchmarks.run_results import NOT_RUN, Results, is_ok, label, metric
from benchmarks.systems import DEFAULT_SYSTEMS, SYSTEMS


def make_plots(results: Results, plots_dir: Path) -> Dict[str, Path]:
    """Write the PNG plots; returns {title: path}. A system gets a colour once it has a finished
    run; a missing or unfinished run of it is labelled with its short status."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    plots_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(DEFAULT_DATASETS) + sorted({d for d, _ in results} - set(DEFAULT_DATASETS))
    systems = ([s for s in SYSTEMS if any(is_ok(r) for (_, rs), r in results.items() if rs == s)]
               or list(DEFAULT_SYSTEMS))
    out: Dict[str, Path] = {}

    def bars(ax, key, ylabel, log=False):
        x = np.arange(len(datasets))
        w = 0.8 / len(systems)
        for i, s in enumerate(systems):
            for j, d in enumerate(datasets):
                v = metric(results, d, s, key)
                pos = x[j] - 0.4 + w * (i + 0.5)
                if v is None:
                    ax.text(pos, 0.02, plot_status(results, d, s), rotation=90, ha="center", va="bottom", fontsize=7,
                            transform=ax.get_xaxis_transform(), color="grey")
                else:
                    ax.bar(pos, v, w, color=f"C{i}", label=label(s))
        ax.set_xticks(x)
        ax.set_xticklabels(datasets)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    fig, ax = plt.subplots(figsize=(8, 4))
    bars(ax, "accuracy", "intent accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Intent accuracy per dataset")
    out["Intent accuracy"] = _save(fig, plots_dir / "accuracy.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    data, pos, colors, ticks = [], [], [], []
    for j, d in enumerate(datasets):
        for i, s in enumerate(systems):
            r = results.get((d, s))
            lat = (r.get("per_message") or {}).get("latency_ms") if is_ok(r) else None
            p = j * (len(systems) + 1) + i
            if lat:
                data.append(lat)
                pos.append(p)
                colors.append(f"C{i}")
            else:
                ax.text(p, 0.02, plot_status(results, d, s), rotation=90, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform(), color="grey")
        ticks.append(j * (len(systems) + 1) + (len(systems) - 1) / 2)
    if data:
        bp = ax.boxplot(data, positions=pos, widths=0.7, whis=(1, 99), showfliers=False, patch_artist=True)
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
        ax.set_yscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(datasets)
    ax.set_xlim(-1, len(datasets) * (len(systems) + 1))
    ax.set_ylabel("parse latency (ms, log)")
    ax.set_title("Agent.parse_message latency (box: quartiles, whiskers: P1-P99)")
    for i, s in enumerate(systems):
        ax.plot([], [], color=f"C{i}", lw=8, label=label(s))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out["Parse latency"] = _save(fig, plots_dir / "latency.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    bars(ax, "train_wall_s", "train wall time (s, log)", log=True)
    ax.set_title("rasa train nlu wall time")
    out["Training time"] = _save(fig, plots_dir / "train_time.png")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("train_peak_rss_mb", "training peak RSS (MB)"),
                                       ("serve_peak_rss_mb", "serving peak RSS (MB)"),
                                       ("model_mb", "model archive (MB, log)")]):
        bars(ax, key, title, log=key == "model_mb")
        ax.set_title(title)
    out["Memory and size"] = _save(fig, plots_dir / "memory.png")

    measured = [d for d in datasets if any(is_ok(results.get((d, s))) for s in systems)]
    if measured:
        fig, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 4), squeeze=False)
        for ax, d in zip(axes[0], measured):
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            for i, s in enumerate(systems):
                r = results.get((d, s))
                if not is_ok(r):
                    continue
                pm = r["per_message"]
                bins = M.reliability_bins(pm["confidence"], M.str_to_bits(pm["correct"]))
                xs = [b["confidence"] for b in bins if b["n"]]
                ys = [b["accuracy"] for b in bins if b["n"]]
                ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{label(s)} (ECE {r['metrics']['ece']:.3f})")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(d)
            ax.legend(fontsize=7)
        out["Calibration (reliability)"] = _save(fig, plots_dir / "calibration.png")
    return out


def plot_status(results: Results, dataset: str, system: str) -> str:
    """Why a plot has no value for a run, in a word or two: the table cells say more."""
    r = results.get((dataset, system))
    if r is None:
        return NOT_RUN
    if r.get("status") == "train_incomplete":
        return "incomplete"
    return "out of memory" if r.get("oom_kill") else "failed"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps legends placed outside the axes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
