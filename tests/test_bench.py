"""`ghosttrack bench` end to end (smallest preset), once with both peers: it prints the side-by-side table, writes
bench.json, and drives each installed peer for real; a missing peer is reported as missing, never estimated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghosttrack.pipeline.bench import PEERS, peer_python, run_peer

PINS = dict(line.strip().split("==") for line in (Path(__file__).resolve().parents[1] / ".ci" / "peers.txt").read_text().splitlines() if line.strip())


def test_bench_drives_the_installed_peers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ghosttrack", "bench", "--smoke", "--out", str(tmp_path), "--peers", "saelens,sparsify"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out, res = r.stdout, json.loads((tmp_path / "bench.json").read_text())
    for key in ("machine", "config", "extraction", "stream_vs_disk", "scaling"): assert key in res
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["torch"]
    assert len(res["scaling"]) == 3 and all(p["peak_mb"] > 0 for p in res["scaling"])
    gt = res["train"]["ghosttrack"]
    assert gt["status"] == "ok" and gt["tokens_per_second"] > 0 and 0 < gt["fvu"] < 1
    assert res["stream_vs_disk"]["disk_mean_fvu"] == pytest.approx(res["stream_vs_disk"]["stream_mean_fvu"], abs=0.05)
    for peer in sorted(PEERS):
        py, why = peer_python(peer)
        p = res["train"][peer]
        if py is None:
            if os.environ.get("GHOSTTRACK_STRICT_SKIPS"): pytest.fail(f"{peer} is missing under the README's test command: {why}")
            assert p["status"] == "missing" and "tokens_per_second" not in p
            continue
        assert p["status"] == "ok", p
        assert p["tokens_per_second"] > 0 and 0 < p["fvu"] < 1.5 and p["version"] == why
        if os.environ.get("GHOSTTRACK_STRICT_SKIPS"): assert why == PINS[PEERS[peer][3]], (peer, why, PINS)
        assert p["ghosttrack_speed_ratio"] == pytest.approx(gt["tokens_per_second"] / p["tokens_per_second"])
        assert f"{peer:<28}{why}" in out


def test_a_missing_peer_is_reported_as_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTTRACK_SPARSIFY_PYTHON", str(tmp_path / "no-such-python"))
    res = run_peer("sparsify", tmp_path / "acts.safetensors", {})
    assert res["status"] == "missing" and "GHOSTTRACK_SPARSIFY_PYTHON" in res["why"]
