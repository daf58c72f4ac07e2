"""Pretraining SLM360 Nano by distillation from all-MiniLM-L6-v2 (docs/DESIGN.md, "Where the weights come from").

The student's mean-pooled embedding, projected 256 -> 384 by a linear map (trained with
it, dropped afterwards), is pulled towards the teacher's L2-normalised sentence embedding:

    loss = mean_b (1 - cos(s_b, t_b)) + mse_weight * mean_b ||s_b - t_b||^2

Teacher embeddings of the whole corpus are computed once and cached as float16 .npy
outside the repo (resumable, chunk by chunk). Training is seeded and resumable: the batch
order of an epoch is a pure function of (seed, epoch), so a run restarted from its last
checkpoint replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..nano import model as M
from ..nano.checkpoint import load_checkpoint, save_checkpoint
from ..nano.config import NanoConfig
from .data import epoch_batches, pad
from .optim import AdamW, OptimConfig

logger = logging.getLogger(__name__)

TEACHER_DIM = 384
STATE_FILE = "state.safetensors"
LOG_FILE = "pretrain.log"
PROJ_W = "distill.proj.weight"
PROJ_B = "distill.proj.bias"


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (saved in every checkpoint)."""

    corpus: str = "../shared/corpus/utterances.txt"  # one utterance per line
    out_dir: str = "runs/pretrain"  # checkpoints + log (outside the package)
    cache_dir: str = ""  # teacher + embedding cache; "" = $SLM360_CACHE or ~/.cache/slm360
    seed: int = 0
    n_heldout: int = 5000  # lines kept out of training for the cosine evaluation
    limit_lines: int = 0  # use only the first N lines of the corpus (0 = all); for smoke runs
    epochs: float = 2.0
    batch_size: int = 128
    max_length: int = 64  # student tokens per sentence during training
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mse_weight: float = 1.0
    checkpoint_every: int = 200  # steps
    eval_every: int = 1000  # steps; 0 = only at the end
    teacher_batch_size: int = 128
    init_from: str = ""  # start from this checkpoint's weights (a release or a run's state file)
    model: Dict = field(default_factory=lambda: NanoConfig().to_dict())

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.epochs > 0:
            raise ValueError(f"DistillConfig.epochs must be > 0, got {self.epochs!r}")
        if self.n_heldout < 0 or self.limit_lines < 0 or self.eval_every < 0:
            raise ValueError("DistillConfig.n_heldout, limit_lines and eval_every must be >= 0")
        NanoConfig.from_dict(self.model)  # validates the architecture

    @property
    def nano(self) -> NanoConfig:
        """The student architecture."""
        return NanoConfig.from_dict(self.model)

    def cache_path(self) -> Path:
        """Folder of the teacher files and the embedding cache."""
        base = self.cache_dir or os.environ.get("SLM360_CACHE") or str(Path.home() / ".cache" / "slm360")
        return Path(base).expanduser()


# ------------------------------------------------------------------------ data


def read_corpus(path: str, limit: int = 0) -> List[str]:
    """Non-empty lines of the corpus, in file order."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"corpus not found: {p.resolve()}. Pass --corpus PATH (one utterance per line), "
            "e.g. ../shared/corpus/utterances.txt from the repository root."
        )
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[:limit] if limit else lines


def split_heldout(n: int, n_heldout: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded random held-out set."""
    perm = np.random.default_rng([seed, 17]).permutation(n)
    k = min(n_heldout, n // 10 if n < 10 * n_heldout else n_heldout)
    return np.sort(perm[k:]), np.sort(perm[:k])


def teacher_embeddings(lines: List[str], cfg: DistillConfig, progress: bool = True, teacher=None) -> np.ndarray:
    """Teacher embeddings (n, 384) float16 of `lines`, cached by content hash; resumable.

    `teacher` is anything with `encode(texts, batch_size) -> (n, 384)` and a `name`
    (tests pass a cheap stand-in); by default all-MiniLM-L6-v2 from teacher.py.
    """
    h = hashlib.sha256(getattr(teacher, "name", "all-MiniLM-L6-v2").encode())
    for ln in lines:
        h.update(ln.encode("utf-8"))
        h.update(b"\n")
    key = h.hexdigest()[:16]
    folder = cfg.cache_path() / "distill"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"teacher_{key}_{len(lines)}.npy"
    done_path = path.with_suffix(".done.json")
    n = len(lines)
    if path.exists() and done_path.exists() and json.loads(done_path.read_text()).get("rows") == n:
        return np.load(path, mmap_mode="r")
    mode = "r+" if path.exists() and done_path.exists() else "w+"
    arr = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=(n, TEACHER_DIM))
    done = json.loads(done_path.read_text())["rows"] if mode == "r+" else 0
    if teacher is None:
        from .teacher import Teacher

        teacher = Teacher.load(cache_dir=cfg.cache_path())
    chunk = 4096
    bar = _progress(total=n, initial=done, desc="teacher embeddings", unit="sent", disable=not progress)
    for start in range(done, n, chunk):
        stop = min(n, start + chunk)
        arr[start:stop] = teacher.encode(lines[start:stop], batch_size=cfg.teacher_batch_size).astype(np.float16)
        arr.flush()
        done_path.write_text(json.dumps({"rows": stop}))
        bar.update(stop - start)
    bar.close()
    del arr
    return np.load(path, mmap_mode="r")


def _progress(**kw):
    from tqdm import tqdm

    return tqdm(mininterval=2.0, **kw)


# ------------------------------------------------------------------------ loss


def cosine_mse_loss(s: np.ndarray, t: np.ndarray, mse_weight: float):
    """loss, dloss/ds and mean cosine for student s (B, D) vs unit-norm teacher t (B, D)."""
    B = s.shape[0]
    norm = np.sqrt(np.sum(s * s, axis=1, keepdims=True)) + 1e-8  # (B, 1)
    sn = s / norm
    cos = np.sum(sn * t, axis=1, keepdims=True)  # (B, 1)
    diff = s - t
    loss = float(np.mean(1.0 - cos) + mse_weight * np.mean(np.sum(diff * diff, axis=1)))
    ds = -(t - cos * sn) / norm / B + mse_weight * 2.0 * diff / B
    return loss, ds.astype(s.dtype), float(np.mean(cos))


# ------------------------------------------------------------------------ state


@dataclass
class TrainState:
    """Student parameters + projection + optimizer, at a given step."""

    params: Dict[str, np.ndarray]
    opt: AdamW
    step: int = 0


def init_state(cfg: DistillConfig, total_steps: int) -> TrainState:
    """Seeded student and projection (or those of `cfg.init_from`); AdamW over both."""
    nano = cfg.nano
    params = M.init_params(nano, seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 99])
    # The student's pooled vector has RMS 1 per dimension (norm ~ sqrt(dim)); std 1/dim
    # starts the projection near unit norm, like the teacher's targets.
    params[PROJ_W] = (rng.standard_normal((TEACHER_DIM, nano.dim)) / nano.dim).astype(np.float32)
    params[PROJ_B] = np.zeros(TEACHER_DIM, np.float32)
    if cfg.init_from:
        # A warm start: a later run continues from earlier weights with a fresh schedule.
        src = load_checkpoint(cfg.init_from)
        if src.config != nano:
            raise ValueError(f"--init-from {cfg.init_from}: its architecture {src.config} differs from {nano}")
        for name in list(nano.param_shapes()) + [PROJ_W, PROJ_B]:
            if name in src.tensors:
                params[name] = np.ascontiguousarray(src.tensors[name], dtype=np.float32)
            elif name in nano.param_shapes():
                raise ValueError(f"--init-from {cfg.init_from}: float tensor {name!r} is missing")
    opt = AdamW(params, optim_config(cfg, total_steps))
    return TrainState(params=params, opt=opt)


def optim_config(cfg: DistillConfig, total_steps: int) -> OptimConfig:
    """The optimizer settings of a run."""
    return OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                       total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip)


def save_state(state: TrainState, cfg: DistillConfig, tokenizer_sha: str, history: List[dict]) -> Path:
    """Atomically write the training state to out_dir/state.safetensors."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(state.params)
    tensors.update({f"optim.{k}": v for k, v in state.opt.state_tensors().items()})
    extra = {"kind": "distill-state", "step": state.step, "distill": asdict(cfg), "history": history[-2000:]}
    return save_checkpoint(out / STATE_FILE, tensors, cfg.nano, tokenizer_sha, extra=extra)


def load_state(cfg: DistillConfig, total_steps: int, tokenizer_sha: str) -> Tuple[TrainState, List[dict]]:
    """Restore the state saved by `save_state` (same config required)."""
    ckpt = load_checkpoint(Path(cfg.out_dir) / STATE_FILE, expected_tokenizer_sha256=tokenizer_sha)
    saved = ckpt.extra.get("distill", {})
    mismatched = sorted(k for k, v in asdict(cfg).items() if k not in ("out_dir",) and saved.get(k) != v)
    if mismatched:
        raise ValueError(
            f"cannot resume from {ckpt.path}: these settings differ from the saved run: {mismatched}. "
            "Use the same settings, or a new --out directory."
        )
    params = {k: v.copy() for k, v in ckpt.tensors.items() if not k.startswith("optim.")}
    state = TrainState(params=params, opt=AdamW(params, optim_config(cfg, total_steps)), step=int(ckpt.extra["step"]))
    state.opt.load_state_tensors({k[len("optim."):]: v for k, v in ckpt.tensors.items() if k.startswith("optim.")},
                                 step_count=state.step)
    return state, list(ckpt.extra.get("history", []))


# ------------------------------------------------------------------------ training


def train_step(state: TrainState, ids: np.ndarray, mask: np.ndarray, target: np.ndarray,
               cfg: DistillConfig) -> Dict[str, float]:
    """One optimizer step on a batch; returns loss, cosine, lr and grad norm."""
    nano = cfg.nano
    p = state.params
    _, pooled, cache = M.forward(p, ids, mask, nano)
    s = pooled @ p[PROJ_W].T + p[PROJ_B]  # (B, 384)
    loss, ds, cos = cosine_mse_loss(s, target, cfg.mse_weight)
    grads = M.backward(cache, nano, dpooled=ds @ p[PROJ_W])
    grads[PROJ_W] = ds.T @ pooled
    grads[PROJ_B] = ds.sum(axis=0)
    info = state.opt.step(p, grads)
    state.step += 1
    return {"loss": loss, "cos": cos, **info}


def student_embeddings(params: Dict[str, np.ndarray], batch_ids: List[np.ndarray], nano: NanoConfig,
                       batch_size: int = 256) -> np.ndarray:
    """Projected student embeddings (n, 384) for lists of token ids (numpy reference)."""
    out = np.empty((len(batch_ids), TEACHER_DIM), np.float32)
    order = np.argsort([len(x) for x in batch_ids], kind="stable")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, mask = pad([batch_ids[j] for j in idx], nano.pad_id)
        _, pooled, _ = M.forward(params, ids, mask, nano)
        out[idx] = pooled @ params[PROJ_W].T + params[PROJ_B]
    return out


def heldout_cosine(params, ids: List[np.ndarray], targets: np.ndarray, nano: NanoConfig) -> float:
    """Mean cosine between projected student embeddings and the teacher's on held-out lines."""
    s = student_embeddings(params, ids, nano)
    s /= np.linalg.norm(s, axis=1, keepdims=True) + 1e-8
    t = targets.astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-8
    return float(np.mean(np.sum(s * t, axis=1)))


def run(cfg: DistillConfig, resume: bool = True, progress: bool = True, max_steps: Optional[int] = None,
        teacher=None) -> Dict:
    """Run (or resume) a distillation; returns a summary dict. `max_steps` stops early
    (the schedule is unchanged), which lets a long run proceed in several sittings."""
    from ..nano.tokenizer import NanoTokenizer

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = _file_logger(out / LOG_FILE)
    tok = NanoTokenizer.load()
    nano = cfg.nano
    if tok.vocab_size > nano.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the student's vocab_size is {nano.vocab_size}")

    lines = read_corpus(cfg.corpus, cfg.limit_lines)
    train_idx, held_idx = split_heldout(len(lines), cfg.n_heldout, cfg.seed)
    t0 = time.time()
    targets = teacher_embeddings(lines, cfg, progress=progress, teacher=teacher)
    log.info(json.dumps({"event": "teacher", "lines": len(lines), "seconds": round(time.time() - t0, 1)}))

    batch = tok.encode_batch(lines, max_length=cfg.max_length)
    seqs = [batch.ids[i, : batch.lengths[i]].astype(np.int64) for i in range(len(lines))]
    lengths = batch.lengths[train_idx]
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))

    history: List[dict] = []
    if resume and (out / STATE_FILE).exists():
        state, history = load_state(cfg, total_steps, tok.sha256)
        log.info(json.dumps({"event": "resume", "step": state.step}))
    else:
        state = init_state(cfg, total_steps)
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    held_seqs = [seqs[i] for i in held_idx]
    held_targets = np.asarray(targets[held_idx])

    bar = _progress(total=total_steps, initial=state.step, desc="distill", unit="step", disable=not progress)
    tokens, tick = 0, time.time()
    while state.step < stop_at:
        epoch, pos = divmod(state.step, steps_per_epoch)
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        for b in batches[pos:]:
            if state.step >= stop_at:
                break
            rows = train_idx[b]
            ids, mask = pad([seqs[i] for i in rows], nano.pad_id)
            info = train_step(state, ids, mask, np.asarray(targets[rows], dtype=np.float32), cfg)
            tokens += int(mask.sum())
            bar.update(1)
            if state.step % 20 == 0 or state.step == stop_at:
                elapsed = time.time() - tick
                rec = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3),
                       "loss": round(info["loss"], 5), "cos": round(info["cos"], 4),
                       "lr": info["lr"], "grad_norm": round(info["grad_norm"], 4),
                       "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
                bar.set_postfix(loss=f"{info['loss']:.4f}", cos=f"{info['cos']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                history.append(rec)
                log.info(json.dumps(rec))
                tokens, tick = 0, time.time()
            if cfg.eval_every and state.step % cfg.eval_every == 0 and held_seqs:
                hc = heldout_cosine(state.params, held_seqs, held_targets, nano)
                history.append({"step": state.step, "heldout_cos": round(hc, 4)})
                log.info(json.dumps({"step": state.step, "heldout_cos": hc}))
            if state.step % cfg.checkpoint_every == 0:
                save_state(state, cfg, tok.sha256, history)
    bar.close()
    save_state(state, cfg, tok.sha256, history)
    summary = {"step": state.step, "total_steps": total_steps, "finished": state.step >= total_steps}
    if held_seqs:
        summary["heldout_cos"] = heldout_cosine(state.params, held_seqs, held_targets, nano)
    log.info(json.dumps({"event": "summary", **summary}))
    return summary


def export_release(cfg: DistillConfig, dest: Path, dtype=np.float16) -> Path:
    """Write the student (without projection and optimizer) as a release checkpoint:
    master weights in `dtype` plus the INT4 tensors derived from them."""
    from ..nano.quant import quantize_params
    from ..nano.tokenizer import NanoTokenizer

    tok = NanoTokenizer.load()
    ckpt = load_checkpoint(Path(cfg.out_dir) / STATE_FILE, expected_tokenizer_sha256=tok.sha256)
    names = cfg.nano.param_shapes()
    master = {k: np.ascontiguousarray(ckpt.tensors[k], dtype=dtype) for k in names}
    q4, errors = quantize_params({k: ckpt.tensors[k].astype(np.float32) for k in names})
    tensors = dict(master)
    tensors.update({k: v for k, v in q4.items() if k.endswith((".q4", ".q4_scale"))})
    extra = {"kind": "release", "step": ckpt.extra.get("step"), "master_dtype": np.dtype(dtype).name,
             "quant_error": {k: e.to_dict() for k, e in errors.items()}}
    return save_checkpoint(dest, tensors, cfg.nano, tok.sha256, extra=extra)


def _file_logger(path: Path) -> logging.Logger:
    lg = logging.getLogger(f"{__name__}.run.{path}")  # one file handler per run log
    if not lg.handlers:
        h = logging.FileHandler(path, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg
