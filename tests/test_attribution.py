"""Attribution graphs end to end: on a tiny GPT-2 with a trained multi-layer CLT the replacement reproduces the clean
logits, edges equal perturbation effects, ablations move the output the way the graph predicts, and
`ghosttrack attribute` writes JSON/CSV/PNG/HTML and the viewer's feature files (their numbers checked against the CLT's
own encoder on the store; refusing to overwrite), `ghosttrack serve-graphs` serves them over HTTP; the same exactness and the command on a
pipeline run of the built-in Llama (SmolLM2) with its pairwise transcoder; on a tiny TSP policy with a trained
transcoder — a `tsp-train` folder and a pipeline run folder (policy in `policy/`) — the command explains the policy's
chosen action."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import clt_run
from ghosttrack.attribution.replacement import ReplacementModel, compute_adjacency
from ghosttrack.attribution.export import load_graph_json, validate_graph_json
from ghosttrack.attribution.graph import ablation_agreement, graph_scores
from ghosttrack.dictionaries.clt_multi import load_multilayer_clt
from ghosttrack.core.config import TrainConfig
from ghosttrack.core.io import load_json, save_json
from ghosttrack.data.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TCFG = dict(batch_size=128, num_epochs=4, lr=4e-3, checkpoint_every=50, log_every=10, wandb_mode="disabled", dead_window_tokens=5000)


def attribute(*args, check=True):
    "`ghosttrack attribute …` in a subprocess, through the module's own entry point."
    r = subprocess.run([sys.executable, "-m", "ghosttrack", "attribute", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and r.returncode != 0: raise AssertionError(f"attribute {args} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def lm_run(tiny_model_dir, wikitext, tmp_path_factory):
    "A run folder: the tiny GPT-2 and a multi-layer CLT trained on 4k WikiText tokens."
    run = tmp_path_factory.mktemp("attr") / "lm"
    model, src = clt_run(tiny_model_dir, wikitext, run, 4000, TrainConfig(**TCFG))
    held_out = [r[:12] for _, r in zip(range(12), src.rows(skip_rows=400))]
    return run, model, load_multilayer_clt(run / "clts" / "clt_all").eval(), held_out


def frozen_targets(rm, zero=()):
    "Every target node's value (0 for non-targets) in the frozen replacement, with the nodes in `zero` set to 0."
    with torch.no_grad():
        vals = rm.output_values(rm.forward("frozen", leaves=rm.make_leaves(1, zero)))[0]
    return torch.tensor([float(vals[t - rm.output_start]) if nd.kind == "output" else float(rm.pres[nd.group][0, nd.pos, nd.index])
                         if nd.kind == "feature" else 0.0 for t, nd in enumerate(rm.nodes)])


def assert_exact(model, ids, dictionary, atol=1e-4):
    "The replacement reproduces the clean logits in both modes and each checked edge is the effect of zeroing its source."
    rm = ReplacementModel(model, ids, dictionary)
    with torch.no_grad():
        clean = model(ids).logits
        torch.testing.assert_close(rm.forward("frozen", all_positions=True).logits, clean, atol=atol, rtol=1e-4)
        torch.testing.assert_close(rm.forward("live", all_positions=True).logits, clean, atol=atol, rtol=1e-4)
    A = compute_adjacency(rm, batch_size=32)
    base = frozen_targets(rm)
    feats = [i for i, nd in enumerate(rm.nodes) if nd.kind == "feature"]
    for s in [feats[0], feats[len(feats) // 2], rm.error_start + 3, rm.embed_start + 1]:
        assert A[:, s].abs().max() > 0, rm.nodes[s]
        torch.testing.assert_close(frozen_targets(rm, [s]) - base, -A[:, s], atol=2e-4 * (1 + A[:, s].abs().max().item()), rtol=0)
    return rm, A


def test_replacement_is_exact_and_edges_are_perturbation_effects(lm_run):
    run, model, clt, rows = lm_run
    assert_exact(model, rows[0][None], clt)


def test_ablating_the_top_feature_moves_the_output_as_predicted(lm_run):
    run, model, clt, rows = lm_run
    res, scores = [], []
    for r in rows:
        rm = ReplacementModel(model, r[None], clt)
        A = compute_adjacency(rm)
        scores.append(graph_scores(A, rm.nodes)["replacement_score"])
        res.append(ablation_agreement(rm, A))
    rate = sum(x["agrees"] for x in res) / len(res)
    print(f"\nablation agreement {rate:.2f} on {len(res)} prompts; replacement score mean {sum(scores) / len(scores):.3f}")
    assert rate >= 0.75, res


@pytest.mark.long
def test_attribute_command_on_a_language_model_run(lm_run, capsys):
    run, *_ = lm_run
    # circuit-tracer's pruning ranks all nodes; on this tiny CLT the embeddings' direct paths carry ~90% of the influence,
    # so the features appear only with a loose node threshold
    r = attribute("--run-dir", run, "--prompt", "The tower is in the city of", "--static", "--node-threshold", "0.99")
    assert "replacement score" in r.stdout
    paths = {ext: run / "graphs" / f"the-tower-is-in-the-city-of.{ext}" for ext in ("json", "csv", "png", "html")}
    assert all(p.exists() for p in paths.values()), (r.stdout, list((run / "graphs").iterdir()))
    d = load_json(paths["json"])
    validate_graph_json(d)
    nodes, A = load_graph_json(paths["json"])
    assert len(nodes) == len(d["nodes"]) and int((A != 0).sum()) == len(d["links"]) > 0
    assert {n["feature_type"] for n in nodes} == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert sum(n["is_target_logit"] for n in nodes) == 1
    feats = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    # labels: the tokens a feature fires on most in the run's store, then the tokens its decoder promotes (logit lens)
    assert feats and all(" → '" in n["clerp"] or n["clerp"].startswith("→ '") for n in feats), [n["clerp"] for n in feats]
    assert any(n["clerp"].startswith("'") for n in feats)
    assert_feature_files(run, d, feats)
    assert f"{len({n['feature'] for n in feats})} feature files" in r.stdout
    info = d["metadata"]["info"]
    assert info["pruning"]["node_influence_kept"] >= 0.9 and info["pruning"]["edge_influence_kept"] >= 0.9, info["pruning"]
    assert 0 < info["scores"]["replacement_score"] <= 1 and info["top_paths"]
    assert len(list(csv.DictReader(open(paths["csv"])))) == len(d["links"])
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "<svg" in paths["html"].read_text()
    assert (run / "graphs" / "static_clt_all.json").exists()
    print("\n" + r.stdout)
    from ghosttrack.cli.main import main  # the same command in-process: faster than more subprocesses
    assert main(["attribute", "--run-dir", str(run), "--prompt", "The tower is in the city of"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["attribute", "--run-dir", str(run), "--prompt", "The tower is in the city of", "--overwrite", "--node-threshold", "0.5"]) == 0
    assert load_json(paths["json"])["metadata"]["node_threshold"] == 0.5


def assert_feature_files(run, d, feats, rows=20_000):
    """Every kept feature has its viewer file where the viewer looks, and its numbers are the CLT's own encoder on the
    run's activation store: the top example is the largest activation, the firing rate is the share of non-zero rows."""
    from ghosttrack.attribution.viewer import feature_path
    from ghosttrack.data.store import ActivationStore, hook_dirname
    clt = load_multilayer_clt(run / "clts" / "clt_all").eval()
    stores = [ActivationStore(run / "activations" / hook_dirname(hp), verify=False) for hp in clt.cfg.sources]
    x = torch.cat([torch.cat([s.shard(i) for i in range(len(s.shard_rows))])[:rows].float() for s in stores], 1)
    with torch.no_grad(): acts = clt.encode(x)
    for n in feats:
        f = load_json(feature_path(run / "graphs", d, n))
        layer, index = map(int, n["node_id"].split("_")[:2])
        a = acts.view(len(x), clt.cfg.n_layers, -1)[:, layer, index]
        top = f["examples_quantiles"][0]["examples"][0]
        assert abs(top["tokens_acts_list"][top["train_token_ind"]] - float(a.max())) < 1e-4 * (1 + float(a.max()))
        assert abs(f["act_max"] - float(a.max())) < 1e-4 * (1 + float(a.max()))
        assert abs(f["activation_frequency"] - float((a > 0).float().mean())) < 1e-6
        assert f["transcoder_id"] == "clt_all" and f["top_logits"] and len(f["quantile_values"]) == 100
        assert abs(sum(f["histogram"]) - int((a > 0).sum())) < 1e-6


def test_serve_graphs_serves_the_run_folder(lm_run):
    "`ghosttrack serve-graphs RUN --port 0` in a subprocess: the index, a graph and a feature file over HTTP, then Ctrl-C."
    import signal
    import threading
    import urllib.request
    from ghosttrack.attribution.viewer import feature_path
    from ghosttrack.attribution.run import attribute as attribute_run
    run, *_ = lm_run
    if not (run / "graphs" / "served.json").exists(): attribute_run(run, prompt="The city of", slug="served", node_threshold=0.99)
    # started as a script's background job would start it, with SIGINT ignored (inherited): Ctrl-C must still stop it
    p = subprocess.Popen([sys.executable, "-m", "ghosttrack", "serve-graphs", str(run), "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    watchdog = threading.Timer(120, p.kill)          # a server that never says it is up is killed, and the test fails
    watchdog.start()
    try:
        out = ""
        while "Ctrl-C" not in out and (line := p.stdout.readline()): out += line
        assert "Ctrl-C" in out, f"serve-graphs did not start:\n{out}{p.stderr.read()}"
        base = re.search(r"http://127\.0\.0\.1:\d+/", out)[0]
        def get(path): return json.loads(urllib.request.urlopen(base + path, timeout=30).read())
        index = get("data/graph-metadata.json")["graphs"]
        assert "served" in [g["slug"] for g in index]
        d = get("graph_data/served.json")
        assert d == load_json(run / "graphs" / "served.json")
        n = next(n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder")
        rel = feature_path(run / "graphs", d, n).relative_to(run / "graphs").as_posix()
        assert get(f"graph_data/{rel}") == load_json(run / "graphs" / rel)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        watchdog.cancel()
        if p.poll() is None: p.kill(); p.wait()
        p.stdout.close(); p.stderr.close()
    print("\n" + out)


def test_sae_features_take_their_files_and_labels_from_interpret(tiny_model_dir, tmp_path):
    """A run with SAEs on layers 0 and 1, `interpret` run for layer 1 only: layer 1's features get the interpretation's
    examples and label, layer 0's are computed from the store; both where the viewer looks."""
    from conftest import tiny_run
    from ghosttrack.attribution.viewer import feature_json_from_interpretation, feature_path
    from ghosttrack.attribution.run import attribute as attribute_run
    from ghosttrack.interpret.features import load_features
    from ghosttrack.interpret.run import interpret_run
    torch.set_num_threads(1)
    run = tiny_run(tiny_model_dir, tmp_path / "run", "0,1", 2000, 700)
    interpret_run(run, layers="1", k=5, progress=False)
    interp = load_features(run / "interpret" / "blocks.1.hook_resid_post" / "features.json")
    by_id = {r["feature_id"]: r for r in interp["features"]}
    r = attribute_run(run, prompt="def main(self):", node_threshold=1.0)
    d = load_json(r["paths"]["json"])
    feats = {L: [n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == L] for L in ("0", "1")}
    assert feats["0"] and feats["1"] and d["metadata"]["scan"].startswith("custom-")
    assert {n["dictionary"] for n in feats["1"]} == {d["metadata"]["transcoder_list"][1].rsplit("/", 1)[1]}
    for n in feats["1"]:
        rec = by_id[n["local_feature"]]
        f = load_json(feature_path(run / "graphs", d, n))
        assert f == json.loads(json.dumps(feature_json_from_interpretation(rec, interp["meta"], n["dictionary"], n["local_feature"])))
        assert [e["tokens"] for e in f["examples_quantiles"][0]["examples"]] == [e["tokens"] for e in rec["top_examples"]]
        assert n["clerp"] == " ".join(t for t, _ in rec["common_tokens"][:3])
    for n in feats["0"]:
        f = load_json(feature_path(run / "graphs", d, n))
        top = f["examples_quantiles"][0]["examples"][0]
        assert top["tokens_acts_list"][top["train_token_ind"]] == f["act_max"] > 0 and " → " in n["clerp"]
    assert len(r["features"]) == len({(n["layer"], n["feature"]) for L in feats for n in feats[L]})


def test_attribute_command_on_a_tsp_policy(tmp_path, capsys):
    from ghosttrack.dictionaries.clt import CLTConfig, collect_pairs, train_clt
    from ghosttrack.tsp.policy import AttentionPolicy, TSPInstances, save_policy
    torch.manual_seed(0)
    run = tmp_path / "tsp"
    policy = AttentionPolicy(d_model=32, n_layers=2, n_heads=4, d_ff=64).eval()
    save_policy(policy, run / "policy.safetensors")
    save_json({"n": 10}, run / "config.json")
    collect_pairs(policy, TSPInstances(10, seed=0, num_instances=300), "0:1", run / "activations", num_tokens=3000,
                  batch_size=50, shard_tokens=1000, progress=False)
    train_clt(run / "activations", "clt_L0_to_L1", CLTConfig(expansion_factor=4, k=8, normalize="unit_norm", skip=True),
              TrainConfig(**{**TCFG, "num_epochs": 2}), run / "clts" / "clt_L0_to_L1", run / "ck", progress=False)
    r = attribute("--run-dir", run, "--instance", 3, "--step", 2, "--node-threshold", "1.0", "--edge-threshold", "1.0")
    print("\n" + r.stdout)
    d = load_json(run / "graphs" / "instance-3-step-2.json")
    validate_graph_json(d)
    coords = TSPInstances(10, seed=1234, num_instances=4).tensor()[3:4]
    with torch.no_grad(): chosen = int(policy(coords).tours[0, 2])
    target = [n for n in d["nodes"] if n["is_target_logit"]]
    assert len(target) == 1 and target[0]["feature"] == chosen
    assert {n["feature_type"] for n in d["nodes"]} >= {"cross layer transcoder", "embedding", "logit"}
    assert all((run / "graphs" / f"instance-3-step-2.{e}").exists() for e in ("csv", "png", "html"))
    assert list((run / "graphs" / "features" / "clt_L0_to_L1").glob("*.json"))      # examples from the folder's activations
    from ghosttrack.cli.main import main
    assert main(["attribute", "--run-dir", str(run), "--prompt", "hello"]) == 2
    assert "--instance" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    "A pipeline run of the built-in SmolLM2 (a Llama; `tiny` preset: 2048 stdlib tokens, pairwise CLT blocks.1 → blocks.2)."
    from ghosttrack.data.models import ModelUnavailable
    from ghosttrack.pipeline.stages import stage_job
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("attr") / "smollm2"
    try: stage_job("tiny", run_dir=str(run), progress=False).run("clt")
    except ModelUnavailable as e: pytest.skip(f"the built-in smollm2-135m cannot be loaded here: {e}")
    return run


PROMPT = "Return the absolute value of a number."


def test_llama_replacement_is_exact_and_edges_are_perturbation_effects(smollm2_run):
    from ghosttrack.dictionaries.clt import load_clt
    model, tok = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.tensor([[tok.bos_token_id] + tok(PROMPT)["input_ids"]])
    rm, A = assert_exact(model, ids, load_clt(smollm2_run / "clts" / "clt_L1_to_L2").eval(), atol=2e-4)
    assert {nd.kind for nd in rm.nodes} == {"feature", "error", "embedding", "output"}


def test_attribute_command_on_a_llama_run(smollm2_run, capsys):
    from ghosttrack.cli.main import main
    assert main(["attribute", "--run-dir", str(smollm2_run), "--prompt", PROMPT, "--node-threshold", "0.99"]) == 0
    out = capsys.readouterr().out
    print("\n" + out)
    json_path = smollm2_run / "graphs" / "return-the-absolute-value-of-a-number.json"
    d = load_json(json_path)
    validate_graph_json(d)
    assert {n["feature_type"] for n in d["nodes"]} == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    model, tok = load_model("smollm2-135m")
    with torch.no_grad(): top = int(model(torch.tensor([[tok.bos_token_id] + tok(PROMPT)["input_ids"]])).logits[0, -1].argmax())
    target = [n for n in d["nodes"] if n["is_target_logit"]]
    assert len(target) == 1 and target[0]["feature"] == top
    info = d["metadata"]["info"]
    assert info["pruning"]["node_influence_kept"] >= 0.9 and info["pruning"]["edge_influence_kept"] >= 0.9, info["pruning"]
    assert 0 < info["scores"]["replacement_score"] <= 1 and len(d["links"]) > 0
    assert all(json_path.with_suffix(e).exists() for e in (".csv", ".png", ".html"))


def test_attribute_on_a_tsp_pipeline_run(tmp_path):
    from ghosttrack.attribution.replacement import ReplacementModel
    from ghosttrack.attribution.run import attribute as attribute_run
    from ghosttrack.dictionaries.clt import load_clt
    from ghosttrack.core.run_config import load_config
    from ghosttrack.tsp.train import tsp_instances
    from ghosttrack.pipeline.stages import stage_job
    from ghosttrack.tsp.policy import load_policy
    torch.set_num_threads(1)
    run = tmp_path / "tsp"
    stage_job("tsp-tiny", run_dir=str(run), progress=False).run("clt")
    assert (run / "policy" / "policy.safetensors").exists() and not (run / "policy.safetensors").exists()
    r = attribute_run(run, instance=0, step=1, node_threshold=1.0, edge_threshold=1.0)   # everything: this test is about the format
    print(f"\ntsp-tiny pipeline run: {r['nodes_before']} nodes / {r['edges_before']} edges → {r['nodes']} / {r['links']}, "
          f"replacement score {r['scores']['replacement_score']:.3f}, {r['seconds']:.1f}s")
    d = load_json(r["paths"]["json"])
    validate_graph_json(d)
    coords = tsp_instances(load_config(run / "config.json"), "test").tensor()[:1]     # the run's own test instances
    policy = load_policy(run / "policy")
    with torch.no_grad(): chosen = int(policy(coords).tours[0, 1])
    target = [n for n in d["nodes"] if n["is_target_logit"]]
    assert len(target) == 1 and target[0]["feature"] == chosen
    assert {n["feature_type"] for n in d["nodes"]} >= {"cross layer transcoder", "embedding", "logit"}
    assert all(r["paths"][e].exists() for e in ("csv", "png", "html"))
    f = load_json(r["features"][0])                 # a city has no token: examples name input positions
    assert f["examples_quantiles"][0]["examples"][0]["tokens"][0].startswith("#") and f["top_logits"] == []
    rm = ReplacementModel(policy, coords, load_clt(run / "clts" / "clt_L0_to_L1").eval(), step=1)
    with torch.no_grad():
        torch.testing.assert_close(rm.output_values(rm.forward("frozen")), rm.output_values(rm.forward("live")), atol=1e-4, rtol=1e-4)
        # the graph's outputs are the policy's own: its next-city distribution at that step, from its own forward pass
        own = policy(coords).step_log_probs[0, 1]
        out = rm.forward("frozen")                 # the node embeddings the decoder reads, through the replacement
        D = out.shape[-1]
        u = (out @ policy.decoder.project_node.weight[2 * D:].T) @ rm.glimpse[0] / D ** 0.5
        logp = (torch.tanh(u) * policy.decoder.clip).masked_fill(rm.visited, float("-inf")).log_softmax(-1)[0]
    finite = torch.isfinite(own)
    assert torch.equal(torch.isfinite(logp), finite)
    torch.testing.assert_close(logp[finite], own[finite], atol=1e-4, rtol=1e-4)
    ranked = own.argsort(descending=True).tolist()
    assert rm.outputs == ranked[:len(rm.outputs)] and own[rm.outputs].exp().sum() >= 0.95    # its most likely next cities


@pytest.mark.long
def test_mlp_transcoder_set_on_a_llama_is_exact(tmp_path):
    "`clt.pairs=mlpN` transcoders read each MLP's normalised input: the replacement with several of them is still exact."
    from ghosttrack.data.models import ModelUnavailable
    from ghosttrack.dictionaries.clt import load_clt
    from ghosttrack.pipeline.stages import stage_job
    torch.set_num_threads(1)
    try: stage_job("tiny", run_dir=str(tmp_path / "run"), overrides=["clt.pairs=mlp0,mlp1,mlp2", "clt.skip=true"], progress=False).run("clt")
    except ModelUnavailable as e: pytest.skip(f"the built-in smollm2-135m cannot be loaded here: {e}")
    clts = [load_clt(tmp_path / "run" / "clts" / f"clt_L{b}_mlp").eval() for b in range(3)]
    assert [(c.cfg.source, c.cfg.target, c.cfg.skip) for c in clts] == [(f"blocks.{b}.ln2.hook_normalized", f"blocks.{b}.hook_mlp_out", True) for b in range(3)]
    model, tok = load_model("smollm2-135m")
    ids = torch.tensor([[tok.bos_token_id] + tok(PROMPT)["input_ids"]])
    rm, A = assert_exact(model, ids, clts, atol=2e-4)
    assert not {f"blocks.{b}.hook_mlp_out" for b in range(3)} & set(rm.free_mlps) and len(rm.free_mlps) == model.config.num_hidden_layers - 3
