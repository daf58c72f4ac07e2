"""benchmarks/serve_memory.py: texts, the table, and one real run of floor vs SLM360."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import CompareError, ROOT
from benchmarks import serve_memory as SM


def test_texts_come_from_jsonl_and_are_repeated_to_the_count(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert SM._texts(f, 5) == ["a", "b", "a", "b", "a"]
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(CompareError, match="no texts"):
        SM._texts(tmp_path / "e.jsonl", 3)


def test_table_shows_the_difference_to_the_floor_and_each_step():
    result = {"systems": {"floor": {"serve_peak_rss_mb": 500.0, "over_floor_mb": 0.0, "parse_p50_ms": 0.3},
                          "slm360": {"serve_peak_rss_mb": 620.5, "over_floor_mb": 120.5, "parse_p50_ms": 2.0}},
              "breakdown": {"slm360": [["python + numpy", 12.0], ["import numba", 70.0]]}}
    text = SM.table(result)
    assert "| slm360 | 620.5 MB | +120.5 MB | 2.00 ms |" in text
    assert "- import numba: 70.0 MB (+58.0)" in text


@pytest.mark.slow
def test_one_round_on_the_example_bot(tmp_path):
    pytest.importorskip("rasa")
    out = tmp_path / "serve_memory.json"
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.serve_memory", "--rounds", "1", "--work-dir",
                        str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    floor, slm = result["systems"]["floor"], result["systems"]["slm360"]
    assert floor["over_floor_mb"] == 0 and slm["over_floor_mb"] == pytest.approx(
        slm["serve_peak_rss_mb"] - floor["serve_peak_rss_mb"], abs=0.11)
    steps = [s for s, _ in result["breakdown"]["slm360"]]
    assert steps[0] == "python + numpy" and "load the model file" in steps and len(steps) == 7
    assert "| floor |" in r.stdout
