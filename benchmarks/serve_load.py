"""Bounded concurrent load on `rasa run --enable-api`: N clients x M requests to /model/parse.

Starts the server on 127.0.0.1 (or uses --url), sends a warm-up, then every client thread
posts its requests one after another (texts from a dataset's test split, mixed with bad
input: empty, 10,000 characters, emoji, control characters, other scripts). Reports latency
P50/P99, throughput, HTTP errors and invalid parses; writes JSON to benchmarks/results/.
Traffic goes to this machine only, and the loop is bounded in count and time.

Run from the repository root: python -m benchmarks.serve_load --model MODEL.tar.gz
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks import ROOT
from benchmarks.datasets import DEFAULT_DATA_DIR

BAD = ["", " ", "x" * 10_000, "🙂🚀🎉", "ctrl\x00\x01\x1b[31m", "你好，我想订一张桌子", "مرحبا كيف حالك", "Привет"]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, text: str, timeout: float) -> dict:
    """POST /model/parse and return the JSON body (raises on HTTP or network errors)."""
    req = urllib.request.Request(url + "/model/parse", data=json.dumps({"text": text}).encode("utf-8"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(model: str, port: int, log_path: Path, env: dict) -> subprocess.Popen:
    """`rasa run --enable-api` for `model` on 127.0.0.1:port, ready when /status answers."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "rasa", "run", "--enable-api", "-m", model, "-p", str(port),
                             "-i", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: rasa run exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    sys.exit(f"error: rasa run did not answer /status within 300 s; see {log_path}")


def main(argv=None) -> int:
    """Entry point; see --help."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Rasa model archive (.tar.gz) to serve")
    src.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:5005")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    ap.add_argument("--requests", type=int, default=200, help="requests per client (default 200)")
    ap.add_argument("--texts", default=str(DEFAULT_DATA_DIR / "banking77" / "test.jsonl"),
                    help="jsonl with a 'text' field (default: Banking77 test)")
    ap.add_argument("--bad-every", type=int, default=10, help="every k-th request is a bad input (0 = none)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    ap.add_argument("--label", default="", help="name stored with the results (e.g. slm360, diet)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load.json"))
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        sys.exit("error: --clients and --requests must be >= 1")

    path = Path(args.texts)
    if not path.is_file():
        sys.exit(f"error: texts file not found: {path}; pass --texts")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    env = dict(os.environ, RASA_TELEMETRY_ENABLED="false")
    proc = None
    url = args.url
    if args.model:
        port = free_port()
        log_path = Path(args.out).with_suffix(".server.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = start_server(args.model, port, log_path, env)
        url = f"http://127.0.0.1:{port}"
    try:
        for t in texts[:10]:
            post(url, t, args.timeout)
        lat = [[] for _ in range(args.clients)]
        errors = [0] * args.clients
        invalid = [0] * args.clients
        stop_at = time.time() + args.max_seconds

        def client(c: int) -> None:
            rng = np.random.default_rng(c)
            for i in range(args.requests):
                if time.time() > stop_at:
                    return
                bad = args.bad_every and i % args.bad_every == args.bad_every - 1
                text = BAD[i % len(BAD)] if bad else texts[int(rng.integers(len(texts)))]
                t0 = time.perf_counter()
                try:
                    out = post(url, text, args.timeout)
                    lat[c].append(time.perf_counter() - t0)
                    if "intent" not in out or not isinstance(out.get("entities"), list):
                        invalid[c] += 1
                except Exception:  # any failure is counted, never hidden
                    errors[c] += 1

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.time() - t0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    all_ms = np.concatenate([np.asarray(x) for x in lat if x]) * 1e3 if any(lat) else np.zeros(0)
    res = {"label": args.label, "clients": args.clients, "requests_per_client": args.requests,
           "sent": int(len(all_ms) + sum(errors)), "ok": int(len(all_ms)), "errors": int(sum(errors)),
           "invalid_parses": int(sum(invalid)), "wall_s": wall,
           "throughput_rps": float(len(all_ms) / wall) if wall else 0.0,
           "p50_ms": float(np.percentile(all_ms, 50)) if len(all_ms) else None,
           "p99_ms": float(np.percentile(all_ms, 99)) if len(all_ms) else None,
           "cores": os.cpu_count(),
           "model": os.path.relpath(args.model, ROOT) if args.model else args.url}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"{res['ok']} ok, {res['errors']} errors, {res['invalid_parses']} invalid parses in {wall:.1f} s "
          f"({res['throughput_rps']:.1f} req/s); P50 {res['p50_ms']} ms, P99 {res['p99_ms']} ms -> {out}")
    return 0 if res["errors"] == 0 and res["invalid_parses"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
