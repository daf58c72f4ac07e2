"""The trained model through Rasa's own command line: `rasa run --enable-api` and `rasa test nlu`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("rasa")
pytestmark = pytest.mark.slow

RASA = [sys.executable, "-m", "rasa"]
ENV = dict(os.environ, RASA_TELEMETRY_ENABLED="false")
BAD = ["", "x" * 10_000, "🙂🚀🎉", "ctrl\x01\x1b[31m", "你好，我想订一张桌子", "مرحبا"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, text):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/model/parse", data=json.dumps({"text": text}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_rasa_run_serves_model_parse(trained, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(RASA + ["run", "--enable-api", "-m", trained, "-p", str(port), "-i", "127.0.0.1"],
                            cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "server did not come up in 180 s"
            time.sleep(1)
        status, out = _post(port, "book a table for 4 people")
        assert status == 200 and out["intent"]["name"] == "book_table"
        assert any(e["entity"] == "people" for e in out["entities"])
        for text in BAD:
            status, out = _post(port, text)
            assert status == 200 and "intent" in out and isinstance(out["entities"], list)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_rasa_test_nlu_writes_its_report(trained, tiny_nlu, tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(RASA + ["test", "nlu", "-m", trained, "--nlu", str(tiny_nlu), "--out", str(out)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "intent_report.json").read_text())
    assert report["accuracy"] >= 0.8
    assert (out / "DIETClassifier_report.json").exists() is False  # no DIET anywhere
    assert any(p.name.endswith("_report.json") and "SLM360" in p.name for p in out.iterdir())
