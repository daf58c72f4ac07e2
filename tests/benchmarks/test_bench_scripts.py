"""Smoke runs of the encoder benchmark and the frozen-embedding evaluation on tiny inputs."""
import importlib
import json


def _load(name):
    return importlib.import_module(f"benchmarks.{name}")


def test_bench_encoder_smoke(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"book a table for {i} people tonight" for i in range(40)), encoding="utf-8")
    out = tmp_path / "bench.json"
    bench = _load("bench_encoder")
    assert bench.main(["--corpus", str(corpus), "--checkpoint", "random", "--n-latency", "8", "--n-batch", "30",
                       "--warmup", "2", "--skip-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["systems"]) == {"numpy reference", "numba f32", "numba int4"}
    assert res["systems"]["numba int4"]["weight_bytes"] < res["systems"]["numba f32"]["weight_bytes"] / 6
    assert res["reference_vs_f32_max_abs"] < 1e-3
    assert 0 < res["int4_vs_f32_cosine"]["mean"] <= 1.0001


def test_eval_embeddings_smoke(tmp_path):
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer

    cfg = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    ckpt = save_checkpoint(tmp_path / "s.safetensors", init_params(cfg, seed=0), cfg, NanoTokenizer.load().sha256)
    ds = tmp_path / "data" / "toy"
    ds.mkdir(parents=True)
    rows = {"a": ["book a table", "reserve a table", "table for two", "a table please"],
            "b": ["play some jazz", "play music", "put on some rock", "play a song"]}
    for split in ("train", "test"):
        with open(ds / f"{split}.jsonl", "w") as f:
            for intent, texts in rows.items():
                for t in texts:
                    f.write(json.dumps({"text": t, "intent": intent, "entities": []}) + "\n")
    ev = _load("eval_embeddings")
    stem = tmp_path / "res" / "eval"
    assert ev.main(["--data-dir", str(tmp_path / "data"), "--datasets", "toy", "--checkpoint", str(ckpt),
                    "--no-teacher", "--out", str(stem)]) == 0
    res = json.loads(stem.with_suffix(".json").read_text())
    acc = res["datasets"]["toy"]["accuracy"]
    assert set(acc) == {"student f32", "student int4", "random student f32"}
    assert all(0 <= v <= 1 for v in acc.values())
    assert "| student int4 |" in stem.with_suffix(".md").read_text()
