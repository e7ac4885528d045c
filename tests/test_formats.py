"""Dictionaries convert between the ghosttrack, SAELens, sparsify and circuit-tracer layouts, each checked by the peer's own
loader in the peer's own interpreter: what we write loads there and encodes/decodes as ours does, and what the peer
writes loads here and encodes/decodes as the peer does. Bad inputs to `ghosttrack convert` stop with one line and exit
code 2, writing nothing.

Each peer pins its own dependency tree, so each lives in a separate interpreter (pins in .ci/peers.txt):

    GHOSTTRACK_SPARSIFY_PYTHON=/tmp/sparsify/bin/python          # pip install eai-sparsify
    GHOSTTRACK_SAELENS_PYTHON=/tmp/saelens/bin/python            # pip install sae-lens
    GHOSTTRACK_CIRCUIT_TRACER_PYTHON=.circuit-tracer-venv/bin/python   # default; pip install circuit-tracer
    pytest tests/test_formats.py
"""
import contextlib
import io
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
from ghosttrack.core.io import load_tensors, save_json, save_tensors  # noqa: E402
from ghosttrack.dictionaries.clt import CLTConfig, make_clt, save_clt  # noqa: E402
from ghosttrack.dictionaries.clt_multi import MultiLayerCLT, MultiLayerCLTConfig, save_multilayer_clt  # noqa: E402
from ghosttrack.dictionaries.formats import convert, detect_layout, load_dictionaries, load_dictionary  # noqa: E402
from ghosttrack.dictionaries.sae import make_sae, save_sae  # noqa: E402

PINS = dict(l.strip().split("==") for l in (ROOT / ".ci" / "peers.txt").read_text().splitlines() if "==" in l)
SPARSIFY_PYTHON = os.environ.get("GHOSTTRACK_SPARSIFY_PYTHON")
SAELENS_PYTHON = os.environ.get("GHOSTTRACK_SAELENS_PYTHON")
CT_PYTHON = os.environ.get("GHOSTTRACK_CIRCUIT_TRACER_PYTHON") or str(ROOT / ".circuit-tracer-venv" / "bin" / "python")
needs_sparsify = pytest.mark.skipif(
    not SPARSIFY_PYTHON, reason="GHOSTTRACK_SPARSIFY_PYTHON is not set: point it at a python with eai-sparsify installed "
                                "(see this file's docstring; the README's test command prepares one)")
needs_saelens = pytest.mark.skipif(
    not SAELENS_PYTHON, reason="GHOSTTRACK_SAELENS_PYTHON is not set: point it at a python with sae-lens installed "
                               "(see this file's docstring; the README's test command prepares one)")
needs_ct = pytest.mark.skipif(
    not Path(CT_PYTHON).exists(), reason=f"no circuit-tracer interpreter at {CT_PYTHON}: create .circuit-tracer-venv "
                                         "or set GHOSTTRACK_CIRCUIT_TRACER_PYTHON (see this file's docstring)")


def in_peer(python: str, script: str, *args) -> dict:
    "Run `script` in a peer's interpreter; it prints one JSON line last (a peer may print notices before it)."
    r = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{python} failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


VERSION = "import importlib.metadata as m, json, sys; print(json.dumps(m.version(sys.argv[1])))"


@pytest.mark.parametrize("dist,python", [pytest.param("eai-sparsify", SPARSIFY_PYTHON, marks=needs_sparsify),
                                         pytest.param("sae-lens", SAELENS_PYTHON, marks=needs_saelens),
                                         pytest.param("circuit-tracer", CT_PYTHON, marks=needs_ct)])
def test_the_pinned_peers_are_the_ones_tested(dist, python):
    assert in_peer(python, VERSION, dist) == PINS[dist], f"{python} has another {dist} than the pin {PINS[dist]}"


def _randomised(d, seed=0, threshold=None):
    "`d` with every weight random (biases and normalisation too), so no conversion passes by zeros."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in d.named_buffers():
            if name.endswith("_mean"): b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("_scale"): b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
        if threshold is not None and hasattr(d, "threshold"): d.threshold.copy_(threshold(g, d.threshold.shape))
    return d.eval()


def _x(n=256, d=32, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def _close(ours, theirs, what):
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5 * max(1.0, theirs.abs().max().item()), f"{what}: max abs diff {diff:.3g}"
    return diff


# --- sparsify ---------------------------------------------------------------------------------------------------------

SPARSIFY_LOAD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder
x = load_file(sys.argv[1])["x"]
report = {}
for folder in sys.argv[2:]:
    sc = SparseCoder.load_from_disk(folder)
    with torch.no_grad():
        top_acts, top_idx, _ = sc.encode(x)
        acts = torch.zeros(len(x), sc.num_latents).scatter(-1, top_idx, top_acts)
        out = sc(x).sae_out
    save_file({"acts": acts, "out": out.contiguous()}, folder + "/sparsify_out.safetensors")
    report[folder] = dict(transcode=sc.cfg.transcode, k=sc.cfg.k, skip=sc.W_skip is not None)
parents = {str(Path(f).parent) for f in sys.argv[2:]}
report["load_many"] = {p: sorted(SparseCoder.load_many(p, local=True)) for p in parents}
print(json.dumps(report))
"""


def _topk_sae(hook, seed, **kw):
    return _randomised(make_sae(SAEConfig(architecture="topk", k=6, d_in=32, d_sae=128, hook_name=hook, model_name="gpt2@test", **kw)), seed)


def _topk_transcoder(seed):
    cfg = CLTConfig(architecture="topk", k=6, d_in=32, d_out=32, d_sae=128, skip=True, normalize="standardize", model_name="gpt2@test",
                    source="blocks.1.ln2.hook_normalized", target="blocks.1.hook_mlp_out")
    return _randomised(make_clt(cfg), seed)


@needs_sparsify
def test_ghosttrack_to_sparsify_loads_there_and_matches(tmp_path):
    ours = {"h.2": _topk_sae("blocks.2.hook_resid_post", 0), "h.2.attn": _topk_sae("blocks.2.hook_attn_out", 1, apply_b_dec_to_input=False),
            "h.1.mlp": _topk_transcoder(2)}
    x = _x()
    save_tensors({"x": x}, tmp_path / "x.safetensors")
    for name, d in ours.items():
        (save_clt if name == "h.1.mlp" else save_sae)(d, tmp_path / "ghosttrack" / name)
        convert(tmp_path / "ghosttrack" / name, tmp_path / "sparsify" / name, "sparsify")
        assert detect_layout(tmp_path / "sparsify" / name) == "sparsify"
    report = in_peer(SPARSIFY_PYTHON, SPARSIFY_LOAD, tmp_path / "x.safetensors", *(tmp_path / "sparsify" / n for n in ours))
    assert report["load_many"] == {str(tmp_path / "sparsify"): sorted(ours)}, "sparsify names the coders by another hookpoint"
    for name, d in ours.items():
        info, theirs = report[str(tmp_path / "sparsify" / name)], load_tensors(tmp_path / "sparsify" / name / "sparsify_out.safetensors")
        assert (info["transcode"], info["skip"], info["k"]) == (name == "h.1.mlp", name == "h.1.mlp", 6)
        with torch.no_grad():
            acts = d.encode(x)
            out = d.predict(x) if name == "h.1.mlp" else d.decode(acts)
        assert torch.equal(acts > 0, theirs["acts"] > 0), f"{name}: sparsify activates other features"
        _close(acts, theirs["acts"], f"{name} codes")
        _close(out, theirs["out"], f"{name} outputs")


SPARSIFY_SAVE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
x = load_file(sys.argv[1])["x"]
out = Path(sys.argv[2])
torch.manual_seed(0)
coders = {"layers.3": SparseCoder(32, SparseCoderConfig(k=5, num_latents=96)),
          "layers.3.mlp": SparseCoder(32, SparseCoderConfig(k=5, num_latents=96, transcode=True, skip_connection=True))}
for name, sc in coders.items():
    with torch.no_grad():
        for p in sc.parameters(): p.copy_(torch.randn_like(p) * 0.3)
        top_acts, top_idx, _ = sc.encode(x)
        acts = torch.zeros(len(x), sc.num_latents).scatter(-1, top_idx, top_acts)
        y = sc(x).sae_out
    sc.save_to_disk(out / name)
    save_file({"acts": acts, "out": y.contiguous()}, str(out / f"{name}.out.safetensors"))
print(json.dumps(sorted(coders)))
"""


@needs_sparsify
def test_sparsify_saved_coders_load_here_and_match(tmp_path):
    x = _x()
    save_tensors({"x": x}, tmp_path / "x.safetensors")
    names = in_peer(SPARSIFY_PYTHON, SPARSIFY_SAVE, tmp_path / "x.safetensors", tmp_path / "sparsify")
    kinds = {"layers.3": ("TopKSAE", "blocks.3.hook_resid_post", None),
             "layers.3.mlp": ("TopKCLT", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")}
    assert names == sorted(kinds)
    for name, (cls, hook, target) in kinds.items():
        theirs = load_tensors(tmp_path / "sparsify" / f"{name}.out.safetensors")
        convert(tmp_path / "sparsify" / name, tmp_path / "ghosttrack" / name, "ghosttrack")
        for d in (load_dictionary(tmp_path / "sparsify" / name), load_dictionary(tmp_path / "ghosttrack" / name)):
            assert type(d).__name__ == cls
            assert (d.cfg.hook_name, getattr(d.cfg, "target", None)) == (hook, target)
            with torch.no_grad():
                acts = d.encode(x)
                out = d.predict(x) if target else d.decode(acts)
            assert torch.equal(acts > 0, theirs["acts"] > 0), f"{name}: ghosttrack activates other features"
            _close(acts, theirs["acts"], f"{name} codes")
            _close(out, theirs["out"], f"{name} outputs")
    assert sorted(load_dictionaries(tmp_path / "sparsify")) == sorted(kinds), "a sparsify checkpoint folder reads as all its coders"


# --- circuit-tracer ---------------------------------------------------------------------------------------------------

CT_LOAD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.utils.caching import load_transcoders_from_cache
x = load_file(sys.argv[1])["x"]
folder = Path(sys.argv[2])
ts, config = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
out = {}
with torch.no_grad():
    for layer, tc in enumerate(ts):
        acts = tc.encode(x)
        out[f"acts_{layer}"], out[f"out_{layer}"] = acts, tc.decode(acts, x)
save_file(out, str(folder / "ct_out.safetensors"))
print(json.dumps(dict(type=type(ts).__name__, n_layers=ts.n_layers, skip=ts.skip_connection, input_hook=ts.feature_input_hook,
                      output_hook=ts.feature_output_hook, jumprelu=[isinstance(tc.activation_function, JumpReLU) for tc in ts])))
"""


def _transcoder(layer, arch, seed):
    cfg = CLTConfig(architecture=arch, k=6, d_in=32, d_out=32, d_sae=128, skip=True, normalize=["standardize", "unit_norm", "center"][layer],
                    source=f"blocks.{layer}.ln2.hook_normalized", target=f"blocks.{layer}.hook_mlp_out", model_name="gpt2@test")
    return _randomised(make_clt(cfg), seed, threshold=lambda g, shape: 0.3 * torch.rand(shape, generator=g))


@needs_ct
def test_ghosttrack_transcoders_to_circuit_tracer_and_back(tmp_path):
    ours = {f"clt_L{l}": _transcoder(l, arch, l) for l, arch in enumerate(["jumprelu", "batchtopk", "relu"])}
    for name, d in ours.items(): save_clt(d, tmp_path / "clts" / name)
    x = _x()
    save_tensors({"x": x}, tmp_path / "x.safetensors")
    convert(tmp_path / "clts", tmp_path / "ct" / "set", "circuit-tracer")
    report = in_peer(CT_PYTHON, CT_LOAD, tmp_path / "x.safetensors", tmp_path / "ct" / "set")
    assert report == dict(type="TranscoderSet", n_layers=3, skip=True, input_hook="mlp.hook_in", output_hook="mlp.hook_out",
                          jumprelu=[True, True, False])
    theirs = load_tensors(tmp_path / "ct" / "set" / "ct_out.safetensors")
    back = load_dictionaries(tmp_path / "ct" / "set")
    assert list(back) == list(ours), "the set reads back under the transcoders' own names"
    for layer, (name, d) in enumerate(ours.items()):
        with torch.no_grad(): acts, y = d.encode(x), d.predict(x)
        assert torch.equal(acts > 0, theirs[f"acts_{layer}"] > 0), f"{name}: circuit-tracer activates other features"
        _close(acts, theirs[f"acts_{layer}"], f"{name} codes")
        _close(y, theirs[f"out_{layer}"], f"{name} outputs")
        b = back[name]
        assert (b.cfg.source, b.cfg.target, b.cfg.skip) == (d.cfg.source, d.cfg.target, True)
        with torch.no_grad():
            _close(b.encode(x), acts, f"{name} read back: codes")
            _close(b.predict(x), y, f"{name} read back: outputs")


CT_SAVE = r"""
import json, sys, torch, yaml
import torch.nn.functional as F
from pathlib import Path
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU
x = load_file(sys.argv[1])["x"]
folder = Path(sys.argv[2])
torch.manual_seed(0)
tcs = {}
for layer in range(2):
    act = JumpReLU(torch.rand(96) * 0.3, 0.1) if layer == 0 else F.relu
    tc = SingleLayerTranscoder(32, 96, act, layer, skip_connection=True, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            if not name.startswith("activation_function"): p.copy_(torch.randn_like(p) * 0.3)
    tcs[layer] = tc
ts = TranscoderSet(tcs, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out", scan="test")
ts.to_safetensors(str(folder))
(folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
                                                     "feature_output_hook": "hook_mlp_out", "scan": "test"}))
out = {}
with torch.no_grad():
    for layer, tc in enumerate(ts):
        acts = tc.encode(x)
        out[f"acts_{layer}"], out[f"out_{layer}"] = acts, tc.decode(acts, x)
save_file(out, str(folder.parent / "ct_out.safetensors"))
print(json.dumps(sorted(p.name for p in folder.iterdir())))
"""


@needs_ct
def test_circuit_tracer_saved_set_loads_here_and_matches(tmp_path):
    x = _x()
    save_tensors({"x": x}, tmp_path / "x.safetensors")
    (tmp_path / "set").mkdir()
    files = in_peer(CT_PYTHON, CT_SAVE, tmp_path / "x.safetensors", tmp_path / "set")
    assert files == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    theirs = load_tensors(tmp_path / "ct_out.safetensors")
    convert(tmp_path / "set", tmp_path / "ghosttrack", "ghosttrack")
    for ds in (load_dictionaries(tmp_path / "set"), load_dictionaries(tmp_path / "ghosttrack")):
        assert [type(d).__name__ for d in ds.values()] == ["JumpReLUCLT", "ReLUCLT"]
        for layer, d in enumerate(ds.values()):
            assert (d.cfg.source, d.cfg.target) == (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out")
            with torch.no_grad(): acts, y = d.encode(x), d.predict(x)
            assert torch.equal(acts > 0, theirs[f"acts_{layer}"] > 0), f"layer {layer}: ghosttrack activates other features"
            _close(acts, theirs[f"acts_{layer}"], f"layer {layer} codes")
            _close(y, theirs[f"out_{layer}"], f"layer {layer} outputs")


CT_CLT_LOAD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.utils.caching import load_transcoders_from_cache
x = load_file(sys.argv[1])["x"]                      # [L, B, D]
folder = Path(sys.argv[2])
clt, config = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=torch.device("cpu"))
with torch.no_grad():
    acts = clt.encode(x)
    out = clt.decode(acts, x)
save_file({"acts": acts, "out": out.contiguous()}, str(folder.parent / "ct_out.safetensors"))
print(json.dumps(dict(type=type(clt).__name__, n_layers=clt.n_layers, skip=clt.W_skip is not None, input_hook=clt.feature_input_hook,
                      output_hook=clt.feature_output_hook, jumprelu=isinstance(clt.activation_function, JumpReLU))))
"""


def _multilayer_clt(arch="jumprelu", skip=False, seed=0, n_layers=3):
    cfg = MultiLayerCLTConfig(architecture=arch, k=6, skip=skip, normalize="standardize", n_layers=n_layers, d_in=32, d_out=32,
                              d_sae=n_layers * 64, sources=[f"blocks.{l}.hook_resid_mid" for l in range(n_layers)],
                              targets=[f"blocks.{l}.hook_mlp_out" for l in range(n_layers)], model_name="gpt2@test")
    return _randomised(MultiLayerCLT(cfg), seed, threshold=lambda g, shape: 0.4 * torch.rand(shape, generator=g) - 0.1)


@needs_ct
def test_ghosttrack_multilayer_clt_to_circuit_tracer_and_back(tmp_path):
    "A JumpReLU multi-layer CLT (standardised, thresholds partly negative) is circuit-tracer's cross_layer_transcoder, exactly."
    ours = _multilayer_clt()
    save_multilayer_clt(ours, tmp_path / "multi")
    x_BLD = _x(256, 3 * 32).view(256, 3, 32)
    save_tensors({"x": x_BLD.transpose(0, 1).contiguous()}, tmp_path / "x.safetensors")
    convert(tmp_path / "multi", tmp_path / "ct" / "clt", "circuit-tracer")
    assert detect_layout(tmp_path / "ct" / "clt") == "circuit-tracer"
    report = in_peer(CT_PYTHON, CT_CLT_LOAD, tmp_path / "x.safetensors", tmp_path / "ct" / "clt")
    assert report == dict(type="CrossLayerTranscoder", n_layers=3, skip=False, input_hook="hook_resid_mid", output_hook="mlp.hook_out",
                          jumprelu=True)
    theirs = load_tensors(tmp_path / "ct" / "ct_out.safetensors")
    with torch.no_grad():
        acts = ours.encode(x_BLD.flatten(1)).view(256, 3, -1).transpose(0, 1)
        y = ours.predict(x_BLD.flatten(1)).view(256, 3, -1).transpose(0, 1)
    assert torch.equal(acts > 0, theirs["acts"] > 0), "circuit-tracer activates other features"
    diffs = {"codes": _close(acts, theirs["acts"], "codes"), "outputs": _close(y, theirs["out"], "outputs")}
    back = load_dictionary(tmp_path / "ct" / "clt")
    assert isinstance(back, MultiLayerCLT) and (back.cfg.sources, back.cfg.targets) == (ours.cfg.sources, ours.cfg.targets)
    with torch.no_grad():
        diffs["read back: codes"] = _close(back.encode(x_BLD.flatten(1)), ours.encode(x_BLD.flatten(1)), "read back: codes")
        diffs["read back: outputs"] = _close(back.predict(x_BLD.flatten(1)), ours.predict(x_BLD.flatten(1)), "read back: outputs")
    print(f"multi-layer CLT vs circuit-tracer, max abs diff: {diffs}")


CT_CLT_SAVE = r"""
import json, sys, torch, yaml
from pathlib import Path
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
x = load_file(sys.argv[1])["x"]                      # [L, B, D]
folder = Path(sys.argv[2])
torch.manual_seed(0)
out = {}
for act in ("jump_relu", "relu"):
    clt = CrossLayerTranscoder(3, 48, 32, activation_function=act, lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for name, p in clt.named_parameters(): p.copy_(torch.rand_like(p) * 0.3 if "threshold" in name else torch.randn_like(p) * 0.3)
        acts = clt.encode(x)
        out[f"acts_{act}"], out[f"out_{act}"] = acts, clt.decode(acts)
    clt.to_safetensors(str(folder / act))
    (folder / act / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
                                                              "feature_output_hook": "hook_mlp_out"}))
save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "ct_out.safetensors"))
print(json.dumps(sorted(p.name for p in (folder / "relu").iterdir())))
"""


@needs_ct
def test_circuit_tracer_saved_clt_loads_here_and_matches(tmp_path):
    x_LBD = _x(3 * 256, 32).view(3, 256, 32)
    save_tensors({"x": x_LBD}, tmp_path / "x.safetensors")
    files = in_peer(CT_PYTHON, CT_CLT_SAVE, tmp_path / "x.safetensors", tmp_path)
    assert files == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors", "W_enc_1.safetensors",
                     "W_enc_2.safetensors", "config.yaml"]
    theirs = load_tensors(tmp_path / "ct_out.safetensors")
    for act in ("jump_relu", "relu"):
        convert(tmp_path / act, tmp_path / "ghosttrack" / act, "ghosttrack")
        for d in (load_dictionary(tmp_path / act), load_dictionary(tmp_path / "ghosttrack" / act)):
            assert isinstance(d, MultiLayerCLT) and d.cfg.targets == [f"blocks.{l}.hook_mlp_out" for l in range(3)]
            x = x_LBD.transpose(0, 1).flatten(1)
            with torch.no_grad():
                acts = d.encode(x).view(256, 3, -1).transpose(0, 1)
                y = d.predict(x).view(256, 3, -1).transpose(0, 1)
            assert torch.equal(acts > 0, theirs[f"acts_{act}"] > 0), f"{act}: ghosttrack activates other features"
            _close(acts, theirs[f"acts_{act}"], f"{act} codes")
            _close(y, theirs[f"out_{act}"], f"{act} outputs")


# --- SAELens ----------------------------------------------------------------------------------------------------------

SAELENS_LOAD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
report = {}
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        acts = sae.encode(x)
        save_file({"acts": acts, "out": sae.decode(acts)}, folder + "/saelens_out.safetensors")
    report[folder] = type(sae).__name__
print(json.dumps(report))
"""


@needs_saelens
@needs_sparsify
def test_saelens_round_trip_through_convert(tmp_path):
    "ghosttrack → SAELens (loaded by SAELens) → sparsify → ghosttrack: the same codes at every step."
    x = _x()
    save_tensors({"x": x}, tmp_path / "x.safetensors")
    jump = _randomised(make_sae(SAEConfig(architecture="jumprelu", d_in=32, d_sae=128, hook_name="blocks.1.hook_resid_post")), 3,
                       threshold=lambda g, shape: 0.3 * torch.rand(shape, generator=g))
    ours = {"topk": _topk_sae("blocks.2.hook_resid_post", 4), "jumprelu": jump}
    for name, d in ours.items():
        save_sae(d, tmp_path / "ghosttrack" / name)
        convert(tmp_path / "ghosttrack" / name, tmp_path / "saelens" / name, "saelens")
    report = in_peer(SAELENS_PYTHON, SAELENS_LOAD, tmp_path / "x.safetensors", *(tmp_path / "saelens" / n for n in ours))
    assert report == {str(tmp_path / "saelens" / "topk"): "TopKSAE", str(tmp_path / "saelens" / "jumprelu"): "JumpReLUSAE"}
    for name, d in ours.items():
        theirs = load_tensors(tmp_path / "saelens" / name / "saelens_out.safetensors")
        with torch.no_grad(): acts = d.encode(x)
        assert torch.equal(acts > 0, theirs["acts"] > 0)
        _close(acts, theirs["acts"], f"{name} codes in SAELens")
        with torch.no_grad(): _close(d.decode(acts), theirs["out"], f"{name} outputs in SAELens")
    convert(tmp_path / "saelens" / "topk", tmp_path / "sparsify" / "h.2", "sparsify")
    convert(tmp_path / "sparsify" / "h.2", tmp_path / "back", "ghosttrack")
    back = load_dictionary(tmp_path / "back")
    with torch.no_grad(): _close(back.decode(back.encode(x)), ours["topk"].decode(ours["topk"].encode(x)), "topk after SAELens and sparsify")
    assert back.cfg.hook_name == "blocks.2.hook_resid_post"


# --- bad inputs to `ghosttrack convert` --------------------------------------------------------------------------------

def convert_cli(*argv) -> tuple:
    "`(exit code, stderr)` of `ghosttrack convert *argv`, in this process."
    from ghosttrack.cli.main import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["convert", *map(str, argv)])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    "Folders to convert: a ReLU SAE, a TopK transcoder, a sparsify coder with a wrong shape, a damaged one, a non-dictionary."
    tmp = tmp_path_factory.mktemp("bad")
    save_sae(make_sae(SAEConfig(architecture="relu", d_in=16, d_sae=32)), tmp / "relu")
    save_clt(make_clt(CLTConfig(architecture="topk", k=4, d_in=16, d_out=16, d_sae=32, source="blocks.0.ln2.hook_normalized",
                                target="blocks.0.hook_mlp_out")), tmp / "topk_clt")
    save_sae(make_sae(SAEConfig(architecture="topk", k=4, d_in=16, d_sae=32, hook_name="blocks.0.hook_resid_post")), tmp / "topk_sae")
    convert(tmp / "topk_sae", tmp / "shape", "sparsify")
    t = load_tensors(tmp / "shape" / "sae.safetensors")
    save_tensors({**t, "W_dec": t["W_dec"][:, :8].contiguous()}, tmp / "shape" / "sae.safetensors")
    convert(tmp / "topk_sae", tmp / "damaged", "sparsify")
    (tmp / "damaged" / "sae.safetensors").write_bytes(b"not a safetensors file")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("no dictionary here")
    save_json({"hello": 1}, tmp / "odd" / "cfg.json")
    save_multilayer_clt(_multilayer_clt("topk"), tmp / "multi_topk")
    save_multilayer_clt(_multilayer_clt(skip=True), tmp / "multi_skip")
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("mine")
    return tmp


BAD = {  # case: (SRC, --to, fragments of the one error line)
    "missing source": ("nowhere", "sparsify", ["does not exist"]),
    "unknown layout": ("notes", "ghosttrack", ["no dictionary here"]),
    "unknown cfg.json": ("odd", "ghosttrack", ["neither a SAELens"]),
    "shape mismatch": ("shape", "ghosttrack", ["'W_dec'", "shape [32, 8]", "expected [32, 16]"]),
    "damaged weights": ("damaged", "ghosttrack", ["not a readable safetensors file"]),
    "relu SAE to sparsify": ("relu", "sparsify", ["relu SAE has no sparsify counterpart", "TopK only"]),
    "topk transcoder to circuit-tracer": ("topk_clt", "circuit-tracer", ["topk transcoder has no circuit-tracer counterpart"]),
    "transcoder to SAELens": ("topk_clt", "saelens", ["no SAELens layout"]),
    "SAE to circuit-tracer": ("topk_sae", "circuit-tracer", ["transcoder_set holds pairwise transcoders"]),
    "topk multi-layer CLT to circuit-tracer": ("multi_topk", "circuit-tracer", ["topk multi-layer CLT has no circuit-tracer counterpart"]),
    "multi-layer CLT with a skip to circuit-tracer": ("multi_skip", "circuit-tracer", ["files hold no W_skip"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_convert_refuses_bad_input_with_one_line(sources, case):
    src, to, fragments = BAD[case]
    dst = sources / "out" / case.replace(" ", "_")
    code, err = convert_cli(sources / src, dst, "--to", to)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ghosttrack convert: error: "), (code, err)
    for f in fragments: assert f in lines[0], (f, lines[0])
    assert not dst.exists(), f"{dst} was written"
    assert not list(sources.rglob(".*.tmp")), "a temporary folder was left behind"


def test_convert_refuses_an_existing_destination_and_replaces_it_with_overwrite(sources):
    code, err = convert_cli(sources / "topk_sae", sources / "exists", "--to", "sparsify")
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (sources / "exists").iterdir()) == ["keep.txt"], "a refused conversion changed DST"
    code, err = convert_cli(sources / "topk_sae", sources / "exists", "--to", "sparsify", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (sources / "exists").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert not list(sources.rglob(".*.tmp*")), "a temporary folder was left behind"


# --- bring your own dictionaries --------------------------------------------------------------------------------------

def test_attribute_reads_a_circuit_tracer_transcoder_set(tiny_model_dir, tmp_path):
    "A graph built from a circuit-tracer transcoder set is the graph of the same transcoders in ghosttrack's layout."
    from ghosttrack.core.config import ExtractConfig
    from ghosttrack.core.run_config import RunConfig
    from ghosttrack.core.runfolder import save_run_config
    from ghosttrack.cli.main import main
    run = tmp_path / "run"
    save_run_config(RunConfig(run_dir=str(run), extract=ExtractConfig(model=str(tiny_model_dir))))
    for layer in range(3):
        cfg = CLTConfig(architecture="jumprelu", d_in=128, d_out=128, d_sae=64, source=f"blocks.{layer}.ln2.hook_normalized",
                        target=f"blocks.{layer}.hook_mlp_out")
        save_clt(_randomised(make_clt(cfg), layer, threshold=lambda g, shape: 0.1 * torch.rand(shape, generator=g)), tmp_path / "ours" / f"L{layer}")
    convert(tmp_path / "ours", tmp_path / "ct", "circuit-tracer")
    assert detect_layout(tmp_path / "ct") == "circuit-tracer"
    graphs = {}
    for slug, folders in [("ours", [tmp_path / "ours" / f"L{i}" for i in range(3)]), ("theirs", [tmp_path / "ct"])]:
        assert main(["attribute", "--run-dir", str(run), "--prompt", "The tower is in the city of", "--slug", slug, "--quiet",
                     *[a for f in folders for a in ("--dictionary", str(f))]]) == 0
        graphs[slug] = json.loads((run / "graphs" / f"{slug}.json").read_text())
    ours, theirs = graphs["ours"], graphs["theirs"]
    assert len(ours["nodes"]) == len(theirs["nodes"]) > 10 and len(ours["links"]) == len(theirs["links"]) > 10
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    for a, b in zip(ours["links"], theirs["links"]):
        assert (a["source"], a["target"]) == (b["source"], b["target"]) and abs(a["weight"] - b["weight"]) <= 1e-4 * (1 + abs(a["weight"]))


def test_evaluate_measures_a_dictionary_from_elsewhere_as_the_runs_own(tiny_model_dir, tmp_path):
    "The run's SAE in sparsify's layout, given to `evaluate --dictionary`, scores what the run's own evaluation recorded."
    from conftest import one_clear_line, tiny_run
    from ghosttrack.cli.main import main
    run, hp = tiny_run(tiny_model_dir, tmp_path / "run", "0,1", 2000, 700), "blocks.1.hook_resid_post"
    assert main(["evaluate", "--run-dir", str(run), "--eval-rows", "8", "--quiet"]) == 0            # the run's own
    own, lm = (json.loads((run / "saes" / hp / f).read_text()) for f in ("summary.json", "lm_eval.json"))
    convert(run / "saes" / hp, tmp_path / "elsewhere" / "h.1", "sparsify")
    assert main(["evaluate", "--run-dir", str(run), "--eval-rows", "8", "--quiet", "--dictionary", str(tmp_path / "elsewhere" / "h.1")]) == 0
    out = run / "evaluate" / "external" / "h.1" / "eval.json"
    rec = json.loads(out.read_text())
    assert (rec["dictionary"], rec["layout"]) == (str((tmp_path / "elsewhere" / "h.1").resolve()), "sparsify")
    m = rec["results"]["h.1"]
    assert (m["hookpoint"], m["eval_rows"], lm["eval_rows"]) == (hp, 8, 8)
    refs = {"fvu": own["val_fvu"], "mse": own["val_mse"], "l0": own["val_l0"], "dead_fraction": own["val_dead_frac"],
            **{k: lm[k] for k in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_recovered", "kl_div", "kl_div_score")}}
    diffs = {k: abs(m[k] - ref) for k, ref in refs.items()}
    print(f"evaluate --dictionary (sparsify layout) vs the run's own evaluation, max abs diff: {diffs}")
    for k, ref in refs.items(): assert diffs[k] <= 1e-5 * max(1.0, abs(ref)), (k, m[k], ref)
    assert json.loads((run / "saes" / hp / "lm_eval.json").read_text()) == lm, "the run's own evaluation was rewritten"
    stamp = out.stat().st_mtime_ns
    one_clear_line("evaluate", "--run-dir", run, "--dictionary", tmp_path / "elsewhere" / "h.1", ("already finished", "--overwrite"))
    save_clt(make_clt(CLTConfig(architecture="topk", k=4, d_in=128, d_out=128, d_sae=64, source="blocks.0.ln2.hook_normalized",
                                target="blocks.0.hook_mlp_out")), tmp_path / "transcoder")
    save_sae(make_sae(SAEConfig(architecture="topk", k=4, d_in=128, d_sae=64, hook_name="blocks.2.hook_resid_post")), tmp_path / "layer2")
    (tmp_path / "notes").mkdir()
    for bad, fragment in [("nowhere", "does not exist"), ("notes", "no dictionary here"), ("transcoder", "is a transcoder"),
                          ("layer2", "no activation store")]:
        one_clear_line("evaluate", "--run-dir", run, "--overwrite", "--dictionary", tmp_path / "elsewhere" / "h.1",
                       "--dictionary", tmp_path / bad, (fragment,))
        assert sorted(p.name for p in (run / "evaluate" / "external").iterdir()) == ["h.1"] and out.stat().st_mtime_ns == stamp, \
            f"{bad}: a refused evaluation wrote something"
