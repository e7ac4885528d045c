"""Cross-layer transcoders end to end: a SIGKILLed training resumes to the uninterrupted weights, the TSP policy
gets paired stores and a causal drift check, and the commands fail with messages that say what to do."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ghosttrack
from ghosttrack.data.store import ActivationStore, RandomTokens
from ghosttrack.dictionaries.clt import CLTConfig, PairedDataset, collect_pairs, load_clt, train_clt
from ghosttrack.cli.clt import add_clt_commands
from ghosttrack.dictionaries.clt_eval import clt_policy_drift, evaluate_clt, fit_linear_baseline
from ghosttrack.core.config import ConfigError, TrainConfig
from ghosttrack.core.io import load_json, read_jsonl
from ghosttrack.data.models import tiny_gpt2

TCFG = dict(batch_size=64, num_epochs=3, lr=3e-3, checkpoint_every=4, log_every=4, wandb_mode="disabled", dead_window_tokens=2000)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clt") / "acts"
    m = tiny_gpt2(n_layer=3, d_model=64).eval()
    collect_pairs(m, RandomTokens(m.config.vocab_size, 16, 200, seed=0), "0:2", root, num_tokens=3000,
                  batch_size=16, shard_tokens=1024, progress=False)
    return root


def test_resume_after_sigkill_gives_the_uninterrupted_weights(pairs_root, tmp_path):
    ccfg = CLTConfig(expansion_factor=4, k=8, normalize="unit_norm", skip=True)
    train_clt(pairs_root, "clt_L0_to_L2", ccfg, TrainConfig(**TCFG), tmp_path / "clean", tmp_path / "ck_clean", progress=False)
    out, ck = tmp_path / "killed", tmp_path / "ck_killed"
    script = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); import time, ghosttrack.dictionaries.trainer as T\n"
              f"from ghosttrack.dictionaries.clt import *; from ghosttrack.core.config import TrainConfig\n"
              f"orig = T.save_checkpoint\n"
              f"def slow(*a):\n    orig(*a); time.sleep(0.2)\n"   # time for the test to see the checkpoint and kill
              f"T.save_checkpoint = slow\n"
              f"train_clt({str(pairs_root)!r}, 'clt_L0_to_L2', CLTConfig(expansion_factor=4, k=8, normalize='unit_norm', skip=True), "
              f"TrainConfig(**{TCFG!r}), {str(out)!r}, {str(ck)!r}, progress=False)")
    root = str(Path(ghosttrack.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    state = ck / "latest" / "state.json"
    deadline = time.time() + 60
    try:
        while proc.poll() is None and time.time() < deadline:
            if state.exists() and load_json(state)["step"] >= 8: break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state.exists(), f"the training process wrote no checkpoint: {proc.stderr.read()[-2000:]}"
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = load_json(state)["step"]
    summary = train_clt(pairs_root, "clt_L0_to_L2", ccfg, TrainConfig(**TCFG), out, ck, progress=False)
    a, b = load_clt(tmp_path / "clean").state_dict(), load_clt(out).state_dict()
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    steps = [r["step"] for r in read_jsonl(out / "history.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"] and 0 < killed_at < summary["steps"]


def test_tsp_policy_pairs_and_causal_drift(tmp_path):
    from ghosttrack.tsp.policy import AttentionPolicy, TSPInstances, run_with_replacement
    torch.manual_seed(0)
    policy = AttentionPolicy(d_model=32, n_layers=2, n_heads=4, d_ff=64).eval()
    meta = collect_pairs(policy, TSPInstances(10, seed=0, num_instances=300), "0:1", tmp_path / "acts", num_tokens=3000,
                         batch_size=50, shard_tokens=1000, progress=False)
    p = meta["pairs"]["clt_L0_to_L1"]
    assert (p["source"]["hookpoint"], p["target"]["hookpoint"]) == ("encoder_layer_0", "encoder_layer_1")
    assert ActivationStore(tmp_path / "acts" / "encoder_layer_0").manifest["skip_first_positions"] == 0   # float inputs: every node is a row
    assert meta["rows"] == 3000                                                                         # 300 instances × 10 nodes
    train_clt(tmp_path / "acts", "clt_L0_to_L1", CLTConfig(expansion_factor=4, k=8, normalize="unit_norm", skip=True),
              TrainConfig(**{**TCFG, "batch_size": 128}), tmp_path / "clt", tmp_path / "ck", progress=False)
    clt = load_clt(tmp_path / "clt")
    m = evaluate_clt(clt, PairedDataset.for_pair(tmp_path / "acts", "clt_L0_to_L1", 512, "val", verify=False),
                     fit_linear_baseline(PairedDataset.for_pair(tmp_path / "acts", "clt_L0_to_L1", 512)))
    # an encoder layer of this policy is almost a linear map (least squares explains > 99.9%); the skip transcoder
    # must keep that and not lose it to its sparse features
    assert m["baseline_r2"] > 0.99 and m["r2"] > m["baseline_r2"] - 1e-4, m
    coords = TSPInstances(10, seed=7, num_instances=64).tensor()
    d = clt_policy_drift(policy, clt, coords)
    zero = run_with_replacement(policy, coords, "encoder_layer_1", torch.zeros_like)
    assert d["kl_mean"] < zero["kl_mean"], (d, zero)
    assert d["action_agreement"] > zero["action_agreement"]


def test_train_clt_command_errors_say_what_to_do(tmp_path):
    parser = argparse.ArgumentParser(prog="ghosttrack")
    add_clt_commands(parser.add_subparsers(dest="command", required=True))
    m = tmp_path / "tiny"
    tiny_gpt2(n_layer=2, d_model=64).save_pretrained(m)
    args = parser.parse_args(["train-clt", "--run-dir", str(tmp_path / "r"), "--model", str(m), "--layer-pairs", "0:5"])
    with pytest.raises(ValueError, match=r"has 2 layers"): args.func(args)
    args = parser.parse_args(["train-clt", "--run-dir", str(tmp_path / "r"), "--model", str(m), "--layer-pairs", "1:1"])
    with pytest.raises(ConfigError, match="both"): args.func(args)
    args = parser.parse_args(["inspect-pairs", "--run-dir", str(tmp_path / "nothing")])
    with pytest.raises(FileNotFoundError, match="collect them"): args.func(args)
