"""`ghosttrack bench` end to end (smallest preset), once with both peers: it prints the side-by-side table, writes
bench.json, and drives each installed peer for real; a missing peer is reported as missing, never estimated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghosttrack.pipeline import bench
from ghosttrack.pipeline.bench import PEERS, PRESETS, peer_python, run_bench, run_trainer

PINS = dict(line.strip().split("==") for line in (Path(__file__).resolve().parents[1] / ".ci" / "peers.txt").read_text().splitlines() if line.strip())


@pytest.mark.long
def test_bench_drives_the_installed_peers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ghosttrack", "bench", "--smoke", "--out", str(tmp_path), "--peers", "saelens,sparsify"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out, res = r.stdout, json.loads((tmp_path / "bench.json").read_text())
    for key in ("machine", "config", "extraction", "stream_vs_disk", "scaling"): assert key in res
    assert "unfinished" not in res
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["torch"]
    assert len(res["scaling"]) == 3 and all(p["peak_mb"] > 0 for p in res["scaling"])
    shape = res["train"][0]
    runs, gt = shape["runs"], shape["runs"]["ghosttrack"]
    assert gt["status"] == "ok" and gt["tokens_per_second"] > 0 and 0 < gt["fvu"] < 1
    assert res["stream_vs_disk"]["disk_mean_fvu"] == pytest.approx(res["stream_vs_disk"]["stream_mean_fvu"], abs=0.05)
    ran = []
    for peer in sorted(PEERS):
        py, why = peer_python(peer)
        if py is None:
            if os.environ.get("GHOSTTRACK_STRICT_SKIPS"): pytest.fail(f"{peer} is missing under the README's test command: {why}")
            for label in (peer, f"{peer} (own defaults)"): assert runs[label]["status"] == "missing" and "tokens_per_second" not in runs[label]
            continue
        if os.environ.get("GHOSTTRACK_STRICT_SKIPS"): assert why == PINS[PEERS[peer][3]], (peer, why, PINS)
        for label in (peer, f"{peer} (own defaults)"):
            p = runs[label]
            assert p["status"] == "ok", (label, p)
            assert p["tokens_per_second"] > 0 and 0 < p["fvu"] < 1.5 and p["version"] == why and p["peak_mb"] > 0
            assert p["ghosttrack_speed_ratio"] == pytest.approx(gt["tokens_per_second"] / p["tokens_per_second"])
            # the curve ends at the final FVU, measured by the peer's own forward on the held-out rows
            assert [t for _, t, _ in p["curve"]] == [0, 2048, 4096] and p["curve"][-1][2] == pytest.approx(p["fvu"])
            assert f"{label:<44}{why}" in out
            ran.append(p)
    if ran:   # the "any" target is the best peer's final FVU, and that peer reaches it by its last measurement
        best = shape["recipe_targets"]["any"]
        assert best["target_fvu"] == pytest.approx(min(p["fvu"] for p in ran))
        assert any(p["seconds_to_target"] is not None and p["seconds_to_target"] <= p["curve"][-1][0] + 1e-9 for p in ran)
        ours = [(r["seconds_to_target"], k) for k, r in runs.items() if r["trainer"] == "ghosttrack" and r.get("seconds_to_target") is not None]
        assert (best["ghosttrack_seconds"], best["ghosttrack_run"]) == min(ours, default=(None, None))   # ghosttrack's fastest run of all
        assert best["peer_seconds"] == min(p["seconds_to_target"] for p in ran if p["seconds_to_target"] is not None)
        assert ("best peer FVU of any run" in out
                and (not best["ratio"] or f"any run {max(best['ratio'], 1 / best['ratio']):.2f}× " in out))
        for recipe, t in shape["recipe_targets"].items():   # and per recipe, the best peer run of that recipe
            if recipe == "any": continue
            assert t["target_fvu"] == pytest.approx(min(p["fvu"] for p in ran if p["recipe"] == recipe))
            assert f"time to the {recipe} target" in out
    assert (Path(tmp_path) / "bench.png").stat().st_size > 10_000


def test_a_missing_peer_is_reported_as_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTTRACK_SPARSIFY_PYTHON", str(tmp_path / "no-such-python"))
    res = run_trainer("sparsify", tmp_path / "acts.safetensors", {})
    assert res["status"] == "missing" and "GHOSTTRACK_SPARSIFY_PYTHON" in res["why"]
    # an interpreter without the library (this one): missing too, and the reason names the package
    monkeypatch.setenv("GHOSTTRACK_SPARSIFY_PYTHON", sys.executable)
    res = run_trainer("sparsify", tmp_path / "acts.safetensors", {})
    assert res["status"] == "missing" and f"{sys.executable} has no eai-sparsify" in res["why"], res


def test_a_bench_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    # the training section stands in with one line; the streaming section then fails, as a time limit would cut it
    monkeypatch.setattr(bench, "shape_bench", lambda name, *a, **k: {"name": name, "runs": {}})
    def cut(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_stream_vs_disk", cut)
    with pytest.raises(KeyboardInterrupt): run_bench(PRESETS["smoke"], tmp_path, peers=())
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["unfinished"] is True and res["extraction"]["bare_forward_tokens_per_second"] > 0
    assert [t["name"] for t in res["train"]] == ["random tiny GPT-2, d_in 32, 4×"] and "stream_vs_disk" not in res
    assert not (tmp_path / "bench.png").exists()
