"""SAEs saved by ghosttrack open in SAELens (`sae_lens.SAE.load_from_disk`) and encode/decode the same, and SAEs
saved by SAELens open with `ghosttrack.dictionaries.sae.load_sae` and encode/decode the same.

SAELens pins its own dependency tree (transformer-lens, datasets, ...), so it lives in a separate interpreter:
set GHOSTTRACK_SAELENS_PYTHON to its python, e.g.

    python3 -m venv /tmp/saelens
    /tmp/saelens/bin/pip install -c .ci/constraints.txt torch==2.13.0 sae-lens
    GHOSTTRACK_SAELENS_PYTHON=/tmp/saelens/bin/python pytest tests/test_sae_saelens.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ghosttrack.core.config import SAEConfig  # noqa: E402
from ghosttrack.core.io import load_tensors, save_tensors  # noqa: E402
from ghosttrack.dictionaries.sae import load_sae, make_sae, save_sae, synthetic_sparse_data  # noqa: E402

SAELENS_PYTHON = os.environ.get("GHOSTTRACK_SAELENS_PYTHON")
PIN = next(l.strip() for l in (ROOT / ".ci" / "peers.txt").read_text().splitlines() if l.startswith("sae-lens=="))
pytestmark = pytest.mark.skipif(
    not SAELENS_PYTHON, reason="GHOSTTRACK_SAELENS_PYTHON is not set: point it at a python with sae-lens installed "
                               "(see this file's docstring; the README's test command prepares one)")


def test_the_pinned_saelens_is_the_one_tested():
    r = subprocess.run([SAELENS_PYTHON, "-c", "import importlib.metadata as m; print(m.version('sae-lens'))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{SAELENS_PYTHON} has no sae-lens: {r.stderr[-500:]}"
    assert r.stdout.strip() == PIN.split("==")[1], f"{SAELENS_PYTHON} has sae-lens {r.stdout.strip()}, the tests pin {PIN}"

# Runs inside the SAELens interpreter: load every folder, encode/decode x, save the results, describe each SAE.
SAELENS_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
report = {}
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
    save_file({"acts": acts.contiguous(), "x_hat": x_hat.contiguous()}, folder + "/saelens_out.safetensors")
    report[folder] = dict(cls=type(sae).__name__, architecture=sae.cfg.architecture(),
                          apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
                          hook_name=sae.cfg.metadata.hook_name, model_name=sae.cfg.metadata.model_name)
import sae_lens
print(json.dumps(dict(version=sae_lens.__version__, saes=report)))
"""

CASES = {  # folder name: (architecture, SAELens class it must load as, extra SAEConfig fields)
    "relu": ("relu", "StandardSAE", {}),
    "topk": ("topk", "TopKSAE", {}),
    "batchtopk": ("batchtopk", "JumpReLUSAE", {}),
    "jumprelu": ("jumprelu", "JumpReLUSAE", {}),
    "topk_no_bdec": ("topk", "TopKSAE", {"apply_b_dec_to_input": False}),
}


def _trained(arch, steps=30, **kw):
    "A briefly trained SAE, so thresholds and biases are not at their initial values."
    torch.manual_seed(0)
    x_ND, _ = synthetic_sparse_data(4096, d_in=32, n_features=128, k=4)
    sae = make_sae(SAEConfig(architecture=arch, k=4, expansion_factor=4, hook_name="blocks.1.hook_resid_post",
                             model_name="tiny-gpt2", jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1,
                             l1_coefficient=1.0, **kw).with_d_in(32))
    sae.init_b_dec_(x_ND)
    opt = torch.optim.AdamW(sae.parameters(), lr=3e-3)
    for step in range(steps):
        out = sae(x_ND[step * 128:(step + 1) * 128])
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()
    return sae.eval(), x_ND[-512:]


@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saelens")
    ours = {}
    for name, (arch, _, kw) in CASES.items():
        sae, x_BD = _trained(arch, **kw)
        save_sae(sae, tmp / name)
        ours[name] = sae
    save_tensors({"x": x_BD}, tmp / "x.safetensors")
    r = subprocess.run([SAELENS_PYTHON, "-c", SAELENS_SCRIPT, str(tmp / "x.safetensors"),
                        *(str(tmp / n) for n in CASES)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, ours, x_BD, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_saelens_loads_and_matches(saelens_run, name):
    tmp, ours, x_BD, report = saelens_run
    arch, cls, kw = CASES[name]
    info = report["saes"][str(tmp / name)]
    assert info["cls"] == cls
    assert info["apply_b_dec_to_input"] == kw.get("apply_b_dec_to_input", True)
    assert (info["hook_name"], info["model_name"]) == ("blocks.1.hook_resid_post", "tiny-gpt2")
    theirs = load_tensors(tmp / name / "saelens_out.safetensors")
    sae = ours[name]
    with torch.no_grad():
        acts_BF = sae.encode(x_BD)
        x_hat_BD = sae.decode(acts_BF)
    assert acts_BF.gt(0).float().mean() > 0.01, "the test needs some active features to mean anything"
    assert torch.equal(theirs["acts"] > 0, acts_BF > 0), "SAELens and ghosttrack activate different features"
    torch.testing.assert_close(theirs["acts"], acts_BF, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs["x_hat"], x_hat_BD, rtol=1e-5, atol=1e-6)
    assert type(load_sae(tmp / name)) is type(sae)


# Runs inside the SAELens interpreter: save SAELens SAEs with random weights, and their encode/decode of x.
SAELENS_SAVE_SCRIPT = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sae_lens import (StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                      BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAE)
x = load_file(sys.argv[1])["x"]
out = Path(sys.argv[2])
torch.manual_seed(0)
saes = {"standard": StandardSAE(StandardSAEConfig(d_in=32, d_sae=128)),
        "topk": TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=4)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=128))}
batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=32, d_sae=128, k=4))
for sae in [*saes.values(), batchtopk]:
    with torch.no_grad():
        for p in sae.parameters(): p.copy_(torch.randn_like(p) * 0.3)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
with torch.no_grad():
    saes["jumprelu"].threshold.copy_(torch.rand(128) * 0.5)
    batchtopk.topk_threshold.fill_(0.4)
for name, sae in saes.items(): sae.save_model(out / name)
batchtopk.save_model(out / "batchtopk_training")          # architecture batchtopk, topk_threshold, decoder-norm rescaling
batchtopk.save_inference_model(out / "batchtopk_inference")  # SAELens's own export: jumprelu with the threshold folded
for name in [*saes, "batchtopk_inference"]:
    sae = SAE.load_from_disk(out / name)
    with torch.no_grad():
        acts = sae.encode(x)
        save_file({"acts": acts, "x_hat": sae.decode(acts)}, str(out / name / "saelens_out.safetensors"))
"""

SAELENS_SAVED = {  # folder written by SAELens: (ghosttrack class, folder whose SAELens encode/decode it must match)
    "standard": ("ReLUSAE", "standard"),
    "topk": ("TopKSAE", "topk"),
    "jumprelu": ("JumpReLUSAE", "jumprelu"),
    "batchtopk_inference": ("JumpReLUSAE", "batchtopk_inference"),
    "batchtopk_training": ("BatchTopKSAE", "batchtopk_inference"),
}


@pytest.fixture(scope="module")
def saelens_saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saelens_saved")
    x_BD = torch.randn(256, 32)
    save_tensors({"x": x_BD}, tmp / "x.safetensors")
    r = subprocess.run([SAELENS_PYTHON, "-c", SAELENS_SAVE_SCRIPT, str(tmp / "x.safetensors"), str(tmp)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, x_BD


@pytest.mark.parametrize("name", list(SAELENS_SAVED))
def test_load_sae_reads_saelens_folders(saelens_saved, name):
    tmp, x_BD = saelens_saved
    cls, reference = SAELENS_SAVED[name]
    sae = load_sae(tmp / name).eval()
    assert type(sae).__name__ == cls
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    theirs = load_tensors(tmp / reference / "saelens_out.safetensors")
    with torch.no_grad():
        acts_BF = sae.encode(x_BD)
        x_hat_BD = sae.decode(acts_BF)
    assert acts_BF.gt(0).float().mean() > 0.01, "the test needs some active features to mean anything"
    assert torch.equal(theirs["acts"] > 0, acts_BF > 0), "SAELens and ghosttrack activate different features"
    torch.testing.assert_close(acts_BF, theirs["acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_BD, theirs["x_hat"], rtol=1e-5, atol=1e-5)
