"""TSP policy: tours are permutations, the exact solver is exact, training learns and resumes after a kill,
hooks see what a direct forward computes, and the tsp-train / tsp-eval commands work end to end."""
import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ghosttrack
from ghosttrack.core.io import load_json, load_tensors, read_jsonl
from ghosttrack.data.models import capture_activations, layer_hookpoints, patch_hookpoint
from ghosttrack.tsp.policy import AttentionPolicy, TSPInstances, is_permutation, load_policy, policy_lengths, random_tours, run_with_replacement, tour_length
from ghosttrack.tsp.solvers import brute_force, solve_exact, tour_len
from ghosttrack.tsp.train import TSP_PRESETS, train_tsp
from ghosttrack.core.run_config import TSPTrainConfig
from ghosttrack.cli.tsp import add_tsp_commands

TINY = TSPTrainConfig(**TSP_PRESETS["tiny"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "A tiny policy trained once for the module (TSP-10, a few seconds)."
    run = tmp_path_factory.mktemp("tsp") / "tiny"
    train_tsp(TINY, run, progress=False)
    return run


def _policy(seed=0, **kw):
    torch.manual_seed(seed)
    return AttentionPolicy(**{**dict(d_model=16, n_layers=2, n_heads=4, d_ff=32), **kw}).eval()


@pytest.mark.parametrize("n", [3, 7, 20])
@pytest.mark.parametrize("decode", ["greedy", "sample"])
def test_tours_are_permutations(n, decode):
    policy = _policy()
    x = TSPInstances(n, seed=n, num_instances=256).tensor()
    with torch.no_grad():
        out = policy(x, decode=decode, generator=torch.Generator().manual_seed(0))
        # activations blown up so the logits saturate: the mask alone must still prevent revisits
        with patch_hookpoint(policy, "encoder_layer_1", lambda a: a * 1e4):
            wild = policy(x, decode=decode, generator=torch.Generator().manual_seed(0))
    for o in (out, wild):
        assert is_permutation(o.tours, n).all()
        chosen = o.step_log_probs.gather(2, o.tours[..., None]).squeeze(-1)
        assert torch.isfinite(chosen).all()  # no step ever chose a masked (visited) node
        torch.testing.assert_close(o.length, tour_length(x, o.tours))


def test_visited_nodes_get_zero_probability():
    policy = _policy()
    x = TSPInstances(8, seed=1, num_instances=32).tensor()
    with torch.no_grad(): out = policy(x, decode="sample", generator=torch.Generator().manual_seed(1))
    probs = out.step_log_probs.exp()
    for t in range(1, 8):
        visited = out.tours[:, :t]
        assert (probs[:, t].gather(1, visited) == 0).all()
        torch.testing.assert_close(probs[:, t].sum(-1), torch.ones(32))


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8])
def test_exact_solver_matches_brute_force(n):
    rng = np.random.default_rng(100 + n)
    for xy in [rng.random((n, 2)) for _ in range(4)] + [np.r_[rng.random((n // 2, 2)) * 0.05, rng.random((n - n // 2, 2)) * 0.05 + 0.95]]:
        tour = solve_exact(xy)
        assert sorted(tour) == list(range(n))
        assert tour_len(xy, tour) == pytest.approx(tour_len(xy, brute_force(xy)), abs=1e-9)


def test_training_improves_on_the_same_policy_untrained(tiny_run):
    "An untrained attention policy already beats random tours, so training must beat the untrained policy itself."
    policy = load_policy(tiny_run)
    x = TSPInstances(10, seed=4321, num_instances=500).tensor()
    greedy = policy_lengths(policy, x).mean().item()
    torch.manual_seed(0)
    untrained = policy_lengths(AttentionPolicy(**policy.config).eval(), x).mean().item()
    rand = tour_length(x, random_tours(500, 10, torch.Generator().manual_seed(0))).mean().item()
    assert greedy < 0.85 * untrained < 0.85 * rand, (greedy, untrained, rand)   # measured: 3.09 vs 4.18 vs ~5.2
    history = read_jsonl(tiny_run / "history.jsonl")
    assert any(r.get("baseline_replaced") for r in history), "the rollout baseline was never replaced"


def _direct(policy, x):
    with torch.no_grad():
        e = policy.embed(x)
        h0 = policy.encoder.layers[0](e)
        h1 = policy.encoder.layers[1](h0)
    return {"embed": e, "encoder_layer_0": h0, "encoder_layer_1": h1, "encoder_layer_1:input": h0,
            "decoder_input": h1, "graph_embedding": h1.mean(1)}


def test_hook_module_paths_capture_the_direct_forward(tiny_run):
    "The alias table points at modules whose plain torch hooks see the direct forward's tensors."
    policy = load_policy(tiny_run)
    x = TSPInstances(10, seed=7, num_instances=16).tensor()
    expected, aliases = _direct(policy, x), policy.hookpoint_aliases()
    captured, handles = {}, []
    for name in expected:
        path, _, kind = aliases[name].partition(":")
        m = policy.get_submodule(path)
        if kind == "input": handles.append(m.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0])))
        else: handles.append(m.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, o)))
    try:
        with torch.no_grad(): policy(x)
    finally:
        for h in handles: h.remove()
    for name, t in expected.items(): torch.testing.assert_close(captured[name], t, rtol=0, atol=0, msg=name)


def test_hooks_through_ghosttrack_models(tiny_run):
    policy = load_policy(tiny_run)
    x = TSPInstances(10, seed=7, num_instances=16).tensor()
    expected = _direct(policy, x)
    assert layer_hookpoints(policy, "all") == policy.residual_hookpoints() == ["encoder_layer_0", "encoder_layer_1"]
    acts = capture_activations(policy, x, list(expected))
    for name, t in expected.items(): torch.testing.assert_close(acts[name], t, rtol=0, atol=0, msg=name)
    assert acts["encoder_layer_0"].shape == (16, 10, TINY.d_model)
    with patch_hookpoint(policy, "encoder_layer_0", lambda a: a + 1.0), torch.no_grad():
        patched = capture_activations(policy, x, ["encoder_layer_1:input", "encoder_layer_1"])
        torch.testing.assert_close(patched["encoder_layer_1:input"], expected["encoder_layer_0"] + 1.0)
        torch.testing.assert_close(patched["encoder_layer_1"], policy.encoder.layers[1](expected["encoder_layer_0"] + 1.0))


def test_replacing_a_layer_changes_the_policy(tiny_run):
    policy = load_policy(tiny_run)
    x = TSPInstances(10, seed=9, num_instances=200).tensor()
    same = run_with_replacement(policy, x, "encoder_layer_0", lambda a: a.clone())
    assert same["delta_length"] == 0 and same["kl_mean"] == 0 and same["action_agreement"] == 1
    zeroed = run_with_replacement(policy, x, "encoder_layer_0", torch.zeros_like)
    assert zeroed["delta_length"] > 0.05 * zeroed["length_clean"] and zeroed["kl_mean"] > 0.01
    assert not policy.training


def test_resume_after_kill_gives_the_uninterrupted_result(tiny_run, tmp_path):
    run = tmp_path / "killed"
    script = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); from ghosttrack.tsp.train import *; from ghosttrack.core.run_config import TSPTrainConfig; "
              f"train_tsp(TSPTrainConfig(**TSP_PRESETS['tiny']), {str(run)!r}, progress=False)")
    root = str(Path(ghosttrack.__file__).resolve().parents[1])  # importable even when ghosttrack is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)  # same thread count as here: bitwise-equal results
    ckpt = run / "checkpoints" / "tsp" / "latest.safetensors"
    deadline = time.time() + 120
    try:
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.02)
        time.sleep(0.3)  # into the next epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.exists(), "the training process wrote no checkpoint"
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = max(r["epoch"] for r in read_jsonl(run / "history.jsonl"))
    summary = train_tsp(TINY, run, progress=False)
    a, b = load_tensors(tiny_run / "policy.safetensors"), load_tensors(run / "policy.safetensors")
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert summary["val_length"] == load_json(tiny_run / "summary.json")["val_length"]
    epochs = [r["epoch"] for r in read_jsonl(run / "history.jsonl") if r.get("kind") == "epoch"]
    assert epochs == list(range(TINY.epochs)), (epochs, killed_at)


def _parser():
    parser = argparse.ArgumentParser(prog="ghosttrack")
    add_tsp_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_and_eval(tiny_run, tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["tsp-train", "--n", "8", "--run-dir", str(tmp_path / "r"), "--preset", "tiny",
                              "--epochs", "1", "--epoch-size", "128", "--val-size", "8", "--quiet"])
    assert args.func(args) == 0
    assert load_json(tmp_path / "r" / "config.json")["n"] == 8
    assert "TSP-8" in capsys.readouterr().out
    assert args.func(args) == 0                              # the same command again reuses the finished policy
    other = parser.parse_args(["tsp-train", "--n", "8", "--run-dir", str(tmp_path / "r"), "--preset", "tiny", "--epochs", "1",
                               "--epoch-size", "128", "--val-size", "8", "--baseline", "pomo", "--quiet"])
    with pytest.raises(ValueError, match="baseline: 'rollout' there, 'pomo' now.*--overwrite"): other.func(other)
    longer = parser.parse_args(["tsp-train", "--n", "8", "--run-dir", str(tmp_path / "r"), "--preset", "tiny", "--epochs", "2",
                                "--epoch-size", "128", "--val-size", "8", "--quiet"])
    assert longer.func(longer) == 0                          # more epochs continue the finished run
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "history.jsonl") if r.get("kind") == "epoch"] == [0, 1]
    assert "TSP-8" in capsys.readouterr().out

    xy = np.random.default_rng(0).random((12, 10, 2))
    np.save(tmp_path / "inst.npy", xy)
    out = tmp_path / "lengths.csv"
    args = parser.parse_args(["tsp-eval", "--run-dir", str(tiny_run), "--instances", str(tmp_path / "inst.npy"),
                              "--out", str(out), "--samples", "4", "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "12 instances of TSP-10" in printed and "farthest_insertion" in printed and "gap vs exact" in printed
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12
    assert list(rows[0]) == ["instance", "policy_greedy", "policy_best_of_4", "random", "nearest_neighbour",
                             "farthest_insertion", "two_opt", "exact"]
    for r, p in zip(rows, xy):
        opt = float(r["exact"])
        assert opt == pytest.approx(tour_len(p, solve_exact(p)), abs=1e-5)
        assert all(float(r[k]) >= opt - 1e-5 for k in r if k != "instance")

    args = parser.parse_args(["tsp-eval", "--run-dir", str(tiny_run), "--num-instances", "5", "--n", "12", "--exact", "no", "--quiet"])
    assert args.func(args) == 0
    assert "5 instances of TSP-12" in capsys.readouterr().out

    np.save(tmp_path / "bad.npy", xy[..., :1])
    args = parser.parse_args(["tsp-eval", "--run-dir", str(tiny_run), "--instances", str(tmp_path / "bad.npy")])
    with pytest.raises(ValueError, match=r"expected \[N, n, 2\]"): args.func(args)
