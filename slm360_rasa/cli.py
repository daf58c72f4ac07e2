"""`slm360` command line: tokenizer, pretrain, export, quantize, info. Each has --help."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_tokenizer(args: argparse.Namespace, rest: List[str]) -> int:
    from .nano.tokenizer import main as tok_main

    return tok_main(rest)


def _distill_config(args: argparse.Namespace):
    from .train.distill import DistillConfig

    kw = {k: getattr(args, k) for k in ("corpus", "out_dir", "cache_dir", "seed", "epochs", "batch_size", "lr",
                                         "max_length", "warmup_steps", "n_heldout", "limit_lines", "eval_every",
                                         "checkpoint_every", "mse_weight", "init_from") if getattr(args, k, None) is not None}
    return DistillConfig(**kw)


def _cmd_pretrain(args: argparse.Namespace, rest: List[str]) -> int:
    from .train.distill import export_release, run

    cfg = _distill_config(args)
    summary = run(cfg, resume=not args.no_resume, progress=True, max_steps=args.max_steps)
    print(json.dumps(summary, indent=1))
    if args.export and summary.get("finished"):
        path = export_release(cfg, Path(args.export))
        print(f"release checkpoint written to {path}")
    return 0


def _cmd_export(args: argparse.Namespace, rest: List[str]) -> int:
    import numpy as np

    from .train.distill import export_release

    cfg = _distill_config(args)
    path = export_release(cfg, Path(args.dest), dtype=np.float16 if args.dtype == "f16" else np.float32)
    print(f"release checkpoint written to {path}")
    return 0


def _cmd_quantize(args: argparse.Namespace, rest: List[str]) -> int:
    import numpy as np

    from .nano.checkpoint import load_checkpoint, save_checkpoint
    from .nano.quant import quantize_params

    ckpt = load_checkpoint(args.src)
    names = ckpt.config.param_shapes()
    missing = [n for n in names if n not in ckpt.tensors]
    if missing:
        print(f"error: {args.src} holds no float master weights for {missing[:3]}...; nothing to quantize",
              file=sys.stderr)
        return 2
    q4, errors = quantize_params({n: ckpt.tensors[n].astype(np.float32) for n in names})
    extra = dict(ckpt.extra, kind="int4", quant_error={k: e.to_dict() for k, e in errors.items()})
    save_checkpoint(args.dest, q4, ckpt.config, ckpt.tokenizer_sha256, extra=extra)
    print(f"{'tensor':<28}{'rel_rmse':>10}{'max_abs':>10}{'cosine':>10}")
    for k, e in errors.items():
        print(f"{k:<28}{e.rel_rmse:>10.4f}{e.max_abs:>10.4f}{e.cosine:>10.5f}")
    print(f"wrote {args.dest} ({Path(args.dest).stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_info(args: argparse.Namespace, rest: List[str]) -> int:
    from .nano.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.path)
    n_bytes = sum(int(t.nbytes) for t in ckpt.tensors.values())
    info = {"path": str(ckpt.path), "config": ckpt.config.to_dict(), "n_params": ckpt.config.n_params,
            "tokenizer_sha256": ckpt.tokenizer_sha256, "tensors": len(ckpt.tensors), "tensor_bytes": n_bytes,
            "extra": {k: v for k, v in ckpt.extra.items() if k not in ("history", "quant_error")}}
    print(json.dumps(info, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `slm360`."""
    ap = argparse.ArgumentParser(prog="slm360", description="SLM360 Nano tools (no Rasa needed).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tokenizer", help="train the 8,192 WordPiece tokenizer (see `slm360 tokenizer -- --help`)",
                       add_help=False)
    t.set_defaults(func=_cmd_tokenizer)

    def distill_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--corpus", help="utterances, one per line (default ../shared/corpus/utterances.txt)")
        p.add_argument("--out", dest="out_dir", help="run folder for checkpoints and log (default runs/pretrain)")
        p.add_argument("--cache-dir", help="teacher + embedding cache (default $SLM360_CACHE or ~/.cache/slm360)")
        p.add_argument("--seed", type=int)
        p.add_argument("--epochs", type=float)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--max-length", type=int, help="student tokens per sentence")
        p.add_argument("--warmup-steps", type=int)
        p.add_argument("--n-heldout", type=int, help="held-out lines for the cosine evaluation (default 5000)")
        p.add_argument("--limit-lines", type=int, help="use only the first N corpus lines (smoke runs)")
        p.add_argument("--eval-every", type=int)
        p.add_argument("--checkpoint-every", type=int)
        p.add_argument("--mse-weight", type=float)
        p.add_argument("--init-from", help="warm start from this checkpoint (release or state file)")

    p = sub.add_parser("pretrain", help="distil all-MiniLM-L6-v2 into SLM360 Nano (resumable)")
    distill_args(p)
    p.add_argument("--max-steps", type=int, help="stop after this global step (resume later)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--export", help="when finished, write the release checkpoint here")
    p.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("export", help="write a release checkpoint (master weights + INT4) from a pretrain run")
    distill_args(e)
    e.add_argument("dest", help="output .safetensors path")
    e.add_argument("--dtype", choices=["f16", "f32"], default="f16", help="master weight dtype (default f16)")
    e.set_defaults(func=_cmd_export)

    q = sub.add_parser("quantize", help="convert a float checkpoint to INT4 and print the error per tensor")
    q.add_argument("src")
    q.add_argument("dest")
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("info", help="print a checkpoint's metadata")
    i.add_argument("path")
    i.set_defaults(func=_cmd_info)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `slm360` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tokenizer":
        rest = argv[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return _cmd_tokenizer(argparse.Namespace(), rest)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, [])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
