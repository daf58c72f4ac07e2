"""AdamW with decoupled weight decay, a warmup + cosine schedule and global-norm clipping.

State is plain float32 arrays keyed like the parameters, so it saves to safetensors next
to the weights and a resumed run continues bit-identically.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional

import numpy as np

Arrays = Dict[str, np.ndarray]


@dataclass(frozen=True)
class OptimConfig:
    """Hyperparameters of AdamW and its learning-rate schedule."""

    lr: float = 1e-3  # peak learning rate
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # decoupled; not applied to norms (see no_decay)
    warmup_steps: int = 100
    total_steps: int = 1000  # cosine reaches min_lr_ratio * lr here
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global L2 norm; 0 disables

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("OptimConfig.warmup_steps must be >= 0 and OptimConfig.total_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0, got {self.grad_clip!r}")

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def global_norm(grads: Arrays) -> float:
    """L2 norm over all gradient arrays (accumulated in float64 for stability)."""
    return math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values()))


def no_decay(name: str) -> bool:
    """Norm gains are not decayed: shrinking them towards 0 only fights the normalisation."""
    return name.endswith("norm") or name.endswith("bias")


class AdamW:
    """AdamW over a dict of float32 parameters, updated in place."""

    def __init__(self, params: Arrays, cfg: OptimConfig, trainable: Optional[Iterable[str]] = None,
                 lr_mult: Optional[Dict[str, float]] = None):
        """`trainable`: names to update (default all); `lr_mult`: per-name learning-rate factors."""
        self.cfg = cfg
        self.lr_mult = dict(lr_mult or {})
        self.names = sorted(trainable if trainable is not None else params)
        self.m = {n: np.zeros_like(params[n]) for n in self.names}
        self.v = {n: np.zeros_like(params[n]) for n in self.names}
        self.step_count = 0

    def step(self, params: Arrays, grads: Arrays) -> Dict[str, float]:
        """One update; returns {'lr', 'grad_norm'}. Missing grads (frozen tensors) are skipped."""
        cfg = self.cfg
        gn = global_norm({n: grads[n] for n in self.names if n in grads})
        scale = 1.0
        if cfg.grad_clip and gn > cfg.grad_clip:
            scale = cfg.grad_clip / (gn + 1e-12)
        lr = lr_at(self.step_count, cfg)
        self.step_count += 1
        b1, b2 = cfg.betas
        bc1 = 1 - b1 ** self.step_count
        bc2 = 1 - b2 ** self.step_count
        step_size = lr / bc1
        for n in self.names:
            g = grads.get(n)
            if g is None:
                continue
            if scale != 1.0:
                g = g * np.float32(scale)
            m, v, p = self.m[n], self.v[n], params[n]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            mult = self.lr_mult.get(n, 1.0)
            if cfg.weight_decay and not no_decay(n):
                p *= np.float32(1 - lr * mult * cfg.weight_decay)
            denom = np.sqrt(v / bc2)
            denom += cfg.eps
            p -= np.float32(step_size * mult) * (m / denom)
        return {"lr": lr, "grad_norm": gn}

    def state_tensors(self) -> Arrays:
        """Moments as a flat dict (for safetensors): 'm.<name>', 'v.<name>'."""
        out = {f"m.{n}": self.m[n] for n in self.names}
        out.update({f"v.{n}": self.v[n] for n in self.names})
        return out

    def load_state_tensors(self, tensors: Arrays, step_count: int) -> None:
        """Restore moments saved by `state_tensors` and the step counter."""
        for n in self.names:
            for key, store in ((f"m.{n}", self.m), (f"v.{n}", self.v)):
                if key not in tensors or tensors[key].shape != store[n].shape:
                    raise ValueError(f"optimizer state is missing or has the wrong shape for {key!r}")
                store[n][...] = tensors[key]
        self.step_count = int(step_count)
