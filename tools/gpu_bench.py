"""GPU throughput at GPT-2 small shapes (random weights: no hub on the GPU machine).

Bare forward vs extraction of all 12 residual streams into the store (float16 shards), then TopK SAE training
(32x expansion, k=32) on one layer. Prints a table and writes bench JSON to the path given as argv[1].
Until `ghosttrack bench` exists (issue 10) this is how GPU numbers are measured.
"""
import json
import sys
import tempfile
import time

import torch

from ghosttrack.data.store import RandomTokens, extract_activations
from ghosttrack.core.config import SAEConfig, TrainConfig
from ghosttrack.data.models import layer_hookpoints, tiny_gpt2
from ghosttrack.dictionaries.trainer import train_sae

import os
dev, T, B = os.environ.get("BENCH_DEVICE", "cuda"), 128, 64
N = int(os.environ.get("BENCH_TOKENS", 262_144))
torch.backends.cuda.matmul.allow_tf32 = True
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
model = tiny_gpt2(n_layer=12, d_model=768, n_head=12, n_ctx=1024).to(dev)
src = RandomTokens(50257, context_len=T, num_rows=N // (T - 1) + B)
res = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__, "tokens": N}

with torch.no_grad():
    batches = [b.to(dev) for b in src.batches(B)]
    model(batches[0]); sync()
    t = time.time()
    for b in batches: model(b, use_cache=False)
    sync()
    res["bare_forward_tok_s"] = sum(b.numel() for b in batches) / (time.time() - t)

with tempfile.TemporaryDirectory() as d:
    hps = layer_hookpoints(model, "all")
    t = time.time()
    folders = extract_activations(model, src, hps, f"{d}/acts", N, B, shard_tokens=65_536, dtype="float16", device=dev, progress=False)
    res["extract_12_layers_tok_s"] = N / (time.time() - t)
    cfg = TrainConfig(batch_size=4096, num_epochs=2, lr=2e-4, device=dev, wandb_mode="disabled", checkpoint_every=1000)
    s = train_sae(folders["blocks.6.hook_resid_post"], SAEConfig(expansion_factor=32, k=32), cfg, f"{d}/sae", f"{d}/ck", progress=False)
    res["sae_train_tok_s"] = s["tokens_per_second"]
    res["sae_val_fvu"], res["sae_val_l0"] = s["val_fvu"], s["val_l0"]

for k, v in res.items(): print(f"{k:<26} {v:,.1f}" if isinstance(v, float) else f"{k:<26} {v}")
if len(sys.argv) > 1: json.dump(res, open(sys.argv[1], "w"), indent=2)
