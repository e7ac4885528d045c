"""The same pipeline on a GPU: extraction matches the CPU, training works on CUDA and saves CPU-loadable weights.
Skipped (with this reason) on machines without CUDA, such as CI."""
import pytest
import torch

from ghosttrack.data.store import RandomTokens, extract_activations, load_hidden_states
from ghosttrack.core.config import SAEConfig, TrainConfig
from ghosttrack.data.models import layer_hookpoints, tiny_gpt2
from ghosttrack.dictionaries.sae import load_sae
from ghosttrack.dictionaries.trainer import train_sae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_extraction_on_cuda_matches_cpu(tmp_path):
    src = RandomTokens(50257, context_len=32, num_rows=128)
    out = {}
    for dev in ("cpu", "cuda"):
        model = tiny_gpt2(n_layer=2, d_model=64).to(dev)
        hps = layer_hookpoints(model, "all")
        folders = extract_activations(model, src, hps, tmp_path / dev, num_tokens=3000, batch_size=16, shard_tokens=1024,
                                      device=dev, progress=False)
        out[dev] = [load_hidden_states(folders[h]) for h in hps]
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a.shape == b.shape == (3000, 64)
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_training_on_cuda(tmp_path):
    model = tiny_gpt2(n_layer=2, d_model=64).cuda()
    hp = "blocks.1.hook_resid_post"
    folders = extract_activations(model, RandomTokens(50257, 32, 400), [hp], tmp_path / "acts", num_tokens=12000,
                                  batch_size=32, shard_tokens=4096, device="cuda", progress=False)
    s = train_sae(folders[hp], SAEConfig(expansion_factor=4, k=8), TrainConfig(batch_size=256, num_epochs=3, lr=3e-3,
                  device="cuda", wandb_mode="disabled"), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    assert s["val_fvu"] < 0.6 and abs(s["val_l0"] - 8) < 1e-6
    sae = load_sae(tmp_path / "sae", device="cpu")
    x = load_hidden_states(folders[hp], max_rows=512)
    assert (sae.encode(x) > 0).sum(-1).float().mean().item() == pytest.approx(8)
