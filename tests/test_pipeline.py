"""The command line end to end on a tiny GPT-2 and real text: run folder, exact resume after kill -9, and clear
errors that leave finished artifacts intact."""
import json
from pathlib import Path

import pytest
import torch

from conftest import one_clear_line, ghosttrack, kill_when
from ghosttrack.data.store import load_hidden_states
from ghosttrack.core.io import load_json
from ghosttrack.dictionaries.sae import load_sae

LAYERS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
TRAIN = ["--expansion-factor", "4", "--k", "8", "--batch-size", "128", "--lr", "2e-3", "--wandb-mode", "disabled"]


def extract_args(model, text, run, n=20000, shard=2048):
    return ["extract", "--model", model, "--corpus", f"text:{text}", "--layers", "all", "--num-tokens", n,
            "--context-len", "64", "--batch-size-extract", "8", "--set", f"extract.shard_tokens={shard}",
            "--run-dir", run, "--quiet"]


def shards(run, hp):
    return [(s["file"], s["rows"], s["sha256"]) for s in load_json(Path(run) / "activations" / hp / "manifest.json")["shards"]]


@pytest.mark.long
def test_extract_and_train_run_folder(tiny_model_dir, wikitext, tmp_path):
    "The issue's 'done means' command: the run folder of DESIGN.md, stores equal to a direct forward."
    run = tmp_path / "run"
    r = ghosttrack("extract-and-train", "--model", tiny_model_dir, "--corpus", f"text:{wikitext}", "--layers", "all",
                   "--num-tokens", 20000, "--context-len", 64, "--epochs", 2, "--run-dir", run, "--quiet", *TRAIN)
    assert "FVU" in r.stdout and "blocks.2.hook_resid_post" in r.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["extract"]["layers"] == "all" and cfg["cache_dir"] == cfg["run_dir"] == ""   # relocatable: the run's own folders implicit
    for hp in LAYERS:
        m = load_json(run / "activations" / hp / "manifest.json")
        assert m["complete"] and m["num_tokens"] == 20000 and m["d_model"] == 128
        assert {"cfg.json", "sae_weights.safetensors", "history.jsonl", "summary.json", "lm_eval.json"} <= {p.name for p in (run / "saes" / hp).iterdir()}
        assert (run / "checkpoints" / hp / "latest" / "state.json").exists()
        s = load_json(run / "saes" / hp / "summary.json")
        assert s["val_fvu"] < 0.6 and abs(s["val_l0"] - 8) < 1e-6
    # the stored rows are the model's residual stream, token for token
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from ghosttrack.data.store import ActivationStore
    # rows are the 63 positions after the BOS of each 64-token sequence
    ids = ActivationStore(run / "activations" / LAYERS[0]).token_ids()[:63 * 8].long().reshape(8, 63)
    ids = torch.cat([torch.full((8, 1), 50256), ids], 1)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i, hp in enumerate(LAYERS):
        x = load_hidden_states(run / "activations" / hp, max_rows=63 * 8)
        ref = hs[i + 1] if i < 2 else None
        if ref is None:  # Hugging Face applies the final norm to its last hidden state
            x = model.transformer.ln_f(x)
            ref = hs[3]
        torch.testing.assert_close(x, ref[:, 1:].reshape(-1, 128), atol=1e-5, rtol=1e-5)


@pytest.mark.long
def test_extraction_kill9_resume_is_identical(tiny_model_dir, wikitext, tmp_path):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    n = 120_000
    ghosttrack(*extract_args(tiny_model_dir, wikitext, ref, n))
    mf = crash / "activations" / LAYERS[2] / "manifest.json"
    killed = kill_when(extract_args(tiny_model_dir, wikitext, crash, n),
                       lambda: mf.exists() and len(json.loads(mf.read_text())["shards"]) >= 3)
    assert killed, "the extraction finished before it could be killed; raise num_tokens"
    assert not load_json(mf)["complete"]
    ghosttrack(*extract_args(tiny_model_dir, wikitext, crash, n))
    for hp in LAYERS:
        assert shards(crash, hp) == shards(ref, hp)
        assert load_json(crash / "activations" / hp / "manifest.json")["num_tokens"] == n
    assert not list((crash / "activations").rglob("*.tmp"))


@pytest.mark.long
def test_training_kill9_resume_is_identical(tiny_model_dir, wikitext, tmp_path):
    store_run = tmp_path / "store"
    ghosttrack(*extract_args(tiny_model_dir, wikitext, store_run, 24000))
    train = ["train", "--layers", "1", "--epochs", "3", "--set", "train.checkpoint_every=20", "--quiet", *TRAIN]
    ghosttrack(*train, "--run-dir", tmp_path / "a", "--cache-dir", store_run / "activations")
    state = tmp_path / "b" / "checkpoints" / LAYERS[1] / "latest" / "state.json"
    killed = kill_when([*train, "--run-dir", tmp_path / "b", "--cache-dir", store_run / "activations"],
                       lambda: state.exists() and json.loads(state.read_text())["step"] >= 100)
    assert killed, "training finished before it could be killed"
    assert not (tmp_path / "b" / "saes" / LAYERS[1] / "summary.json").exists()
    ghosttrack(*train, "--run-dir", tmp_path / "b", "--cache-dir", store_run / "activations")
    a, b = load_sae(tmp_path / "a" / "saes" / LAYERS[1]), load_sae(tmp_path / "b" / "saes" / LAYERS[1])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    steps = lambda run: [r["step"] for r in map(json.loads, (run / "saes" / LAYERS[1] / "history.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps(tmp_path / "a") == steps(tmp_path / "b")


@pytest.mark.long
def test_bad_inputs_get_clear_errors_and_keep_artifacts(tiny_model_dir, wikitext, tmp_path):
    run = tmp_path / "run"
    ghosttrack("extract-and-train", "--model", tiny_model_dir, "--corpus", f"text:{wikitext}", "--layers", "0",
               "--num-tokens", 6000, "--context-len", 64, "--epochs", 1, "--run-dir", run, "--quiet", *TRAIN)
    # every artifact and the run's config.json; stages/*.json and run.json record what ran last, and a rerun that
    # reused the store before failing records that run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
              and p.parent.name != "stages" and p.name != "run.json"}
    base = ["extract-and-train", "--model", tiny_model_dir, "--corpus", f"text:{wikitext}", "--run-dir", run, "--quiet"]
    one_clear_line(*base, "--layers", "7", ("layers=[7]", "has 3 layers (0–2)",))
    one_clear_line(*base, "--layers", "x", ("comma-separated",))
    one_clear_line(*base[:4], "text:/no/such/file.txt", "--run-dir", run, "--layers", "0", ("/no/such/file.txt",))
    one_clear_line(*base, "--model", "./missing-model", "--layers", "0", ("does not exist",))
    one_clear_line(*base, "--layers", "0", "--num-tokens", 6000, "--context-len", 64, "--arch", "topk", "--k", "500",
                              "--expansion-factor", "1", ("k=500",))
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"sae": {"expansion_facter": 4}}))
    one_clear_line(*base, "--config", bad_cfg, ("expansion_facter",))
    # a finished store / SAE made with other settings is refused, not overwritten
    one_clear_line(*base, "--layers", "0", "--num-tokens", 7000, "--context-len", 64, ("--overwrite",))
    one_clear_line("train", "--run-dir", run, "--layers", "0", "--k", "4", "--quiet", ("--overwrite",))
    after = {p: p.read_bytes() for p in before}
    assert after == before
    # a corrupt shard is named
    shard = run / "activations" / LAYERS[0] / "shard-00000.safetensors"
    shard.write_bytes(b"\0" * 100)
    one_clear_line("train", "--run-dir", tmp_path / "other", "--cache-dir", run / "activations", "--layers", "0", ("shard-00000.safetensors", "sha256",))
    # --overwrite really rebuilds
    ghosttrack(*base, "--layers", "0", "--num-tokens", 7000, "--context-len", 64, "--epochs", 1, "--overwrite", *TRAIN)
    assert load_json(run / "activations" / LAYERS[0] / "manifest.json")["num_tokens"] == 7000
