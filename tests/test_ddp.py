"""The data-parallel path on CPU: two gloo processes started the way torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment) give the single-process gradient and train the same SAE; an error on rank 0
stops every rank."""
import os
import socket
import subprocess
import sys
import textwrap

import torch

from ghosttrack.data.store import ActivationDataset, RandomTokens, extract_activations
from ghosttrack.core.config import SAEConfig, TrainConfig
from ghosttrack.core.io import load_tensors
from ghosttrack.data.models import layer_hookpoints, tiny_gpt2
from ghosttrack.dictionaries.sae import load_sae, make_sae, save_sae
from ghosttrack.dictionaries.trainer import PerfConfig, Trainer, train_sae

SCFG = SAEConfig(architecture="topk", expansion_factor=4, k=8)
TCFG = TrainConfig(batch_size=256, num_epochs=1, lr=3e-3, checkpoint_every=10, log_every=5, wandb_mode="disabled",
                   dead_window_tokens=2000)

WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from ghosttrack.data.store import ActivationDataset
    from ghosttrack.core.io import save_tensors
    from ghosttrack.dictionaries.sae import make_sae, save_sae
    from ghosttrack.dictionaries.trainer import PerfConfig, Trainer, init_distributed, train_sae
    import test_ddp as t
    store, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank, world = init_distributed()
    assert world == 2, world
    sae, train, val, batch = t.one_batch(store)
    tr = Trainer(sae, train, val, t.TCFG, out / "g", out / "gck", save_sae, progress=False, perf=PerfConfig(prefetch=0))
    tr.since_fired_F[: sae.cfg.d_sae // 4] = 10**9   # some dead latents, so AuxK is in the gradient too
    tr.backward(batch)
    if rank == 0: save_tensors({n: p.grad.contiguous() for n, p in sae.named_parameters()}, out / "grads.safetensors")
    train_sae(store, t.SCFG, t.TCFG, out / "sae", out / "ck", progress=False, perf=PerfConfig(prefetch=0, grad_accum=2))
    import dataclasses   # a finished SAE with other settings: rank 0 refuses, and rank 1 must stop too, not hang
    try: train_sae(store, dataclasses.replace(t.SCFG, k=4), t.TCFG, out / "sae", out / "ck", progress=False)
    except Exception as e: assert "--overwrite" in str(e), e
    else: raise SystemExit("a finished SAE with other settings was not refused")
    torch.distributed.barrier()   # both ranks done before teardown: gloo aborts a process torn down mid-exchange
    torch.distributed.destroy_process_group()
""")


def one_batch(store):
    train = ActivationDataset(store, TCFG.batch_size, "train", TCFG.val_fraction, TCFG.seed)
    val = ActivationDataset(store, 4096, "val", TCFG.val_fraction, verify=False)
    torch.manual_seed(0)
    sae = make_sae(SCFG.with_d_in(train.d_in))
    batch = next(iter(train.batches(0)))
    sae.init_b_dec_(batch)
    return sae, train, val, batch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    torch.set_num_threads(1)
    gpt = tiny_gpt2()
    hp = layer_hookpoints(gpt, [1])[0]
    store = extract_activations(gpt, RandomTokens(gpt.config.vocab_size, 32, 200), [hp], tmp_path / "acts",
                                num_tokens=4000, batch_size=16, shard_tokens=1024, progress=False)[hp]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(store), str(tmp_path / "ddp")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs

    # the gradient of one batch, single process
    sae, train, val, batch = one_batch(store)
    tr = Trainer(sae, train, val, TCFG, tmp_path / "g", tmp_path / "gck", save_sae, progress=False, perf=PerfConfig(prefetch=0))
    tr.since_fired_F[: sae.cfg.d_sae // 4] = 10**9
    r = tr.backward(batch)
    assert r["aux"] > 0
    ddp_grads = load_tensors(tmp_path / "ddp" / "grads.safetensors")
    for n, p in sae.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # a whole training: 2 ranks × 2 micro-batches each vs one process, one batch per step
    single = train_sae(store, SCFG, TCFG, tmp_path / "single", tmp_path / "single_ck", progress=False, perf=PerfConfig(prefetch=0))
    a, b = load_sae(tmp_path / "single").state_dict(), load_sae(tmp_path / "ddp" / "sae").state_dict()
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    ddp_summary = (tmp_path / "ddp" / "sae" / "summary.json").read_text()
    assert f'"steps": {single["steps"]}' in ddp_summary
