"""The headline GPU job of the dictionary engine: GPT-2 small's shapes with random weights (no weights can reach the GPU
machine), one forward of the model feeding one TopK SAE per residual stream (12 of 24,576 latents at k=32) over
10M tokens; the extraction into float16 stores against the bare forward of the same batches; model FLOPs utilisation.

    python tools/gpu/headline.py --out headline.json              # on a CUDA GPU, the full size
    python tools/gpu/headline.py --out h.json --device cpu --n-layer 2 --d-model 64 --tokens 40000 --extract-tokens 8000

The JSON is rewritten after every step, so a run cut off by its time limit still returns what it measured. Where the
streamed tokens are fewer than `--target-tokens`, the time for the target is projected from the measured rate.
tests/test_gpu_tools.py runs it at a small size on the CPU, so it cannot go stale while no GPU is lent."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from ghosttrack import __version__
from ghosttrack.core.config import PerfConfig, SAEConfig, TrainConfig
from ghosttrack.core.io import save_json
from ghosttrack.data.models import check_device, layer_hookpoints, tiny_gpt2
from ghosttrack.data.store import RandomTokens
from ghosttrack.dictionaries.stream import stream_train_saes
from ghosttrack.pipeline.bench import bench_extraction

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
"dense bf16 tensor-core peaks from the makers' data sheets (TFLOP/s), by a substring of the device's name"

def forward_flops_per_token(n_params_body: int, n_layer: int, context_len: int, d_model: int) -> float:
    "Forward FLOPs per token of the transformer body: 2 per weight, plus attention's scores and mixing (2·L·T·d)."
    return 2 * n_params_body + 2 * n_layer * context_len * d_model

def sae_train_flops_per_token(d_in: int, d_sae: int, k: int) -> float:
    """Training FLOPs per token of one TopK SAE with a sparse decoder: the dense encoder forward and its weight gradient
    (2·d·L each; the input needs no gradient), the k-sparse decoder forward and its two gradients (2·k·d each)."""
    return 4 * d_in * d_sae + 6 * k * d_in

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON written after every step")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-head", type=int, default=0, help="default d_model / 64")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--model-batch", type=int, default=64, help="rows of --context-len tokens per forward")
    p.add_argument("--model-dtype", default="auto", help="float32, bfloat16 or auto (bfloat16 on CUDA)")
    p.add_argument("--tokens", type=int, default=10_000_000, help="tokens streamed into the SAEs")
    p.add_argument("--target-tokens", type=int, default=10_000_000)
    p.add_argument("--target-seconds", type=float, default=900.0)
    p.add_argument("--budget-seconds", type=float, default=0.0,
                   help="stream --probe-tokens first, and --tokens only if the probe's rate says they end within this budget")
    p.add_argument("--probe-tokens", type=int, default=1_048_576)
    p.add_argument("--extract-tokens", type=int, default=1_048_576, help="tokens for extraction vs the bare forward")
    p.add_argument("--expansion", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--encoder-dtype", default="auto")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU; default from the device's name (none on a CPU)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    try: check_device(a.device)
    except ValueError as e: p.error(str(e))
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda: torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = a.peak_tflops or next((v for key, v in PEAK_TFLOPS.items() if key in name), 0.0)
    model_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[a.model_dtype]
    res = {"device": name, "torch": torch.__version__, "ghosttrack": __version__, "args": vars(a), "peak_tflops": peak or None}
    def write(): save_json(res, a.out)
    def say(msg): print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    model = tiny_gpt2(n_layer=a.n_layer, d_model=a.d_model, n_head=a.n_head or max(1, a.d_model // 64), n_ctx=1024)
    model = model.to(device=a.device, dtype=model_dtype).eval()
    body = sum(p.numel() for n, p in model.transformer.named_parameters() if not n.startswith(("wte", "wpe")))
    hps = layer_hookpoints(model, "all")
    source = RandomTokens(model.config.vocab_size, a.context_len, 10**9)
    fwd = forward_flops_per_token(body, a.n_layer, a.context_len, a.d_model)
    res["model"] = {"n_layer": a.n_layer, "d_model": a.d_model, "body_params": body, "dtype": str(model_dtype).split(".")[-1],
                    "forward_flops_per_token": fwd, "hookpoints": hps}
    write()

    with tempfile.TemporaryDirectory() as tmp:
        say(f"extraction vs bare forward: {a.extract_tokens:,} tokens, {len(hps)} hookpoints, float16 stores")
        ex = bench_extraction(model, source, hps, a.extract_tokens, Path(tmp) / "acts", a.model_batch, a.device, dtype="float16")
        ex["ratio"] = ex["extract_tokens_per_second"] / ex["bare_forward_tokens_per_second"]
        ex["meets_90_percent"] = ex["ratio"] >= 0.9
        if peak: ex["forward_mfu"] = fwd * ex["bare_forward_tokens_per_second"] / (peak * 1e12)
        res["extraction"] = ex; write()
        say(f"  bare {ex['bare_forward_tokens_per_second']:,.0f} tok/s, extraction {ex['extract_tokens_per_second']:,.0f} tok/s "
            f"({ex['ratio']:.0%})")
        if cuda: torch.cuda.empty_cache()

        scfg = SAEConfig(architecture="topk", k=a.k, expansion_factor=a.expansion)
        perf = PerfConfig(sparse_decoder=True, encoder_dtype=a.encoder_dtype)
        sae = sae_train_flops_per_token(a.d_model, a.expansion * a.d_model, a.k)
        def stream(tokens: int, key: str) -> dict:
            say(f"{key}: {tokens:,} tokens into {len(hps)} TopK SAEs of {a.expansion * a.d_model:,} latents, k={a.k}")
            tcfg = TrainConfig(lr=a.lr, batch_size=a.batch_size, num_epochs=1, optimizer="adamw", auxk_coefficient=1 / 32,
                               dead_window_tokens=min(tokens // 2, 10_000_000), checkpoint_every=10**9, log_every=10**9,
                               wandb_mode="disabled", device=a.device)
            if cuda: torch.cuda.reset_peak_memory_stats()
            sync(); t0 = time.perf_counter()
            s = stream_train_saes(model, source, hps, tokens, scfg, tcfg, Path(tmp) / key, Path(tmp) / f"{key}_ck", a.model_batch,
                                  max(65_536, 2 * a.batch_size), progress=False, perf=perf)
            sync(); secs = time.perf_counter() - t0
            st = {"tokens": tokens, "seconds": secs, "tokens_per_second": tokens / secs,
                  "projected_seconds_for_target": secs * a.target_tokens / tokens,
                  "sae_train_flops_per_token": sae, "tflops": (fwd + len(hps) * sae) * tokens / secs / 1e12,
                  "per_hookpoint": {h: {"val_fvu": v["val_fvu"], "val_l0": v.get("val_l0"), "dead_frac": v.get("dead_frac")}
                                    for h, v in s.items()}}
            st["meets_target"] = st["projected_seconds_for_target"] < a.target_seconds
            if peak: st["mfu"] = st["tflops"] / peak
            if cuda: st["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res[key] = st; write()
            say(f"  {secs:.1f} s, {st['tokens_per_second']:,.0f} tok/s, {st['tflops']:.1f} TFLOP/s"
                + (f", MFU {st['mfu']:.1%}" if peak else "") + f"; {a.target_tokens:,} tokens: {st['projected_seconds_for_target']:.0f} s "
                f"(target < {a.target_seconds:.0f} s: {'met' if st['meets_target'] else 'NOT met'})")
            for h, v in st["per_hookpoint"].items(): say(f"  {h}: FVU {v['val_fvu']:.4f}, dead {v['dead_frac'] or 0:.2%}")
            return st
        if a.budget_seconds and a.tokens > a.probe_tokens:
            probe = stream(a.probe_tokens, "probe")
            need = probe["seconds"] * a.tokens / a.probe_tokens
            left = a.budget_seconds - (time.perf_counter() - t_start)
            if need > left:
                res["stream_skipped"] = f"{a.tokens:,} tokens would take about {need:.0f} s and {left:.0f} s of the budget are left"
                write(); say(res["stream_skipped"]); return 0
        stream(a.tokens, "stream")
    return 0

if __name__ == "__main__":
    sys.exit(main())
