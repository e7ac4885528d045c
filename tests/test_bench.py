"""`ghosttrack bench` end to end (smallest preset): it runs as a module, prints the side-by-side table, writes
bench.json, reports a missing peer as missing, and drives an installed peer for real."""
import json
import os
import subprocess
import sys

import pytest

from ghosttrack.bench import PEERS, peer_python


def run_bench(tmp_path, *args, env=None):
    r = subprocess.run([sys.executable, "-m", "ghosttrack", "bench", "--smoke", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, json.loads((tmp_path / "bench.json").read_text())


def test_bench_reports_a_missing_peer_as_missing(tmp_path):
    out, res = run_bench(tmp_path, "--peers", "sparsify", env={"GHOSTTRACK_SPARSIFY_PYTHON": str(tmp_path / "no-such-python")})
    sp = res["train"]["sparsify"]
    assert sp["status"] == "missing" and "GHOSTTRACK_SPARSIFY_PYTHON" in sp["why"]
    assert "tokens_per_second" not in sp
    assert res["train"]["saelens"]["status"] == "skipped"
    assert "sparsify" in out and "missing" in out
    for key in ("machine", "config", "extraction", "stream_vs_disk", "scaling"): assert key in res
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["torch"]
    assert len(res["scaling"]) == 3 and all(p["peak_mb"] > 0 for p in res["scaling"])
    gt = res["train"]["ghosttrack"]
    assert gt["status"] == "ok" and gt["ghosttrack_speed_ratio"] == 1.0 and 0 < gt["fvu"] < 1
    assert res["stream_vs_disk"]["disk_mean_fvu"] == pytest.approx(res["stream_vs_disk"]["stream_mean_fvu"], abs=0.05)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_bench_drives_an_installed_peer(tmp_path, peer):
    py, why = peer_python(peer)
    if py is None: pytest.skip(f"{peer}: {why}")
    out, res = run_bench(tmp_path, "--peers", peer)
    r = res["train"][peer]
    assert r["status"] == "ok", r
    assert r["tokens_per_second"] > 0 and 0 < r["fvu"] < 1.5 and r["version"] == why
    assert r["ghosttrack_speed_ratio"] == pytest.approx(res["train"]["ghosttrack"]["tokens_per_second"] / r["tokens_per_second"])
    assert f"{peer:<28}{why}" in out
