"""The GPU runbook (tools/gpu/run.sh, tools/gpu/headline.py) rehearsed on the CPU at toy sizes: the stages that a lent
GPU runs once, in minutes that cannot be had back, must not find a broken script there. `ghosttrack bench --gpu` is
sized for a GPU and refuses a machine without one in one line."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_the_runbook_rehearses_every_stage_but_the_bench(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_REHEARSAL": "1", "STAGES": "tests headline tsp", "OUT": str(out), "PYTHON": sys.executable,
           "TSP_RUN": str(tmp_path / "tsp"), "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1", "BUDGET": "400"}
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu" / "run.sh")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.txt").read_text()
    for stage in ("tests", "headline", "tsp"): assert f"{stage}: rc 0 " in summary, summary
    assert "torch " + torch.__version__ in summary and "of a 400s budget" in summary

    h = json.loads((out / "headline.json").read_text())
    ex = h["extraction"]
    assert ex["hookpoints"] == 2 and ex["bare_forward_tokens_per_second"] > 0 and ex["ratio"] > 0
    # the 10k-token probe ran first and its rate said the 30k tokens fit the budget, so they ran too
    assert h["probe"]["tokens"] == 10_000 and h["stream"]["tokens"] == 30_000 and "stream_skipped" not in h
    st = h["stream"]
    assert set(st["per_hookpoint"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert all(0 < v["val_fvu"] < 1 for v in st["per_hookpoint"].values())
    assert st["projected_seconds_for_target"] == pytest.approx(st["seconds"] * 10_000_000 / 30_000)
    assert "mfu" not in st and h["peak_tflops"] is None   # no peak is known for a CPU

    rows = list(csv.DictReader((out / "tsp_eval.csv").open()))
    assert len(rows) == 16 and {"policy_greedy", "exact"} <= set(rows[0])
    assert (tmp_path / "tsp" / "policy.safetensors").exists()


def test_the_headline_skips_what_does_not_fit_its_budget(tmp_path):
    out = tmp_path / "h.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu" / "headline.py"), "--out", str(out), "--device", "cpu", "--n-layer", "1",
                        "--d-model", "32", "--tokens", "10000000", "--probe-tokens", "8000", "--extract-tokens", "4000", "--expansion", "4",
                        "--k", "4", "--batch-size", "256", "--budget-seconds", "60"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    h = json.loads(out.read_text())
    assert h["probe"]["tokens"] == 8000 and "stream" not in h
    assert "10,000,000 tokens would take about" in h["stream_skipped"]


def test_bench_gpu_refuses_a_machine_without_one(tmp_path):
    # no GPU visible, also on a machine that has one
    r = subprocess.run([sys.executable, "-m", "ghosttrack", "bench", "--gpu", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "--gpu is sized for a CUDA GPU and none is visible here" in r.stderr
    assert not (tmp_path / "bench.json").exists()
