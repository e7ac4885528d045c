"""Exact resume at every step: a training stopped dead after any step, then rerun, ends with the same weights, bit
for bit, and the same history as one that never stopped.

The stop is in-process (an exception no code of the trainer catches, raised right after a step), so it can be tried
at every step in seconds; tests/test_pipeline.py kills a real process with SIGKILL. The store is cut into many small
shards so that the shard groups the data order walks through end in the middle of a batch, where resume once
yielded an empty batch."""
import json

import pytest
import torch

from ghosttrack.core.config import SAEConfig, TrainConfig
from ghosttrack.data.models import tiny_gpt2
from ghosttrack.data.store import ActivationDataset, RandomTokens, extract_activations
from ghosttrack.dictionaries import trainer as trainer_mod
from ghosttrack.dictionaries.sae import load_sae
from ghosttrack.dictionaries.trainer import train_sae

HP = "blocks.0.hook_resid_post"


class Stopped(BaseException):
    "Stands for kill -9: nothing in the trainer catches it, so no cleanup runs."


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    gpt = tiny_gpt2(n_layer=1, d_model=16, n_head=2).eval()
    # 900 rows in shards of 100: groups of 4 shards hold 380 training rows, not a multiple of the batch of 48, and a
    # last, short group 95; 17 steps an epoch (every step is stopped at, so the test's time grows with their square)
    return extract_activations(gpt, RandomTokens(gpt.config.vocab_size, 16, 200), [HP], tmp / "acts", num_tokens=900,
                               shard_tokens=100, progress=False)[HP]


def train(store, run, stop_after=None, arch="topk", optimizer="adamw"):
    "Train; with `stop_after`, stop dead right after that step (the checkpoint of a step is written within it)."
    step = trainer_mod.Trainer.train_step
    def stopping(self, batch):
        step(self, batch)
        if stop_after is not None and self.step == stop_after: raise Stopped
    trainer_mod.Trainer.train_step = stopping
    try:
        return train_sae(store, SAEConfig(expansion_factor=2, k=4, architecture=arch),
                         TrainConfig(batch_size=48, num_epochs=2, lr=3e-3, checkpoint_every=3, log_every=1, wandb_mode="disabled",
                                     optimizer=optimizer),
                         run / "sae", run / "ckpt", progress=False)
    finally:
        trainer_mod.Trainer.train_step = step


def history(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "sae" / "history.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("arch,optimizer", [("topk", "adamw"), ("jumprelu", "adamw"), ("topk", "adamw-schedulefree")])
@pytest.mark.long
def test_stopped_after_any_step_resumes_to_the_same_weights(store, tmp_path, arch, optimizer):
    data = ActivationDataset(store, 48)
    groups = [sum(data.ranges[i][1] - data.ranges[i][0] for i in range(g, min(g + 4, len(data.ranges)))) for g in range(0, len(data.ranges), 4)]
    assert any(n % 48 for n in groups), "the shard groups must end mid-batch for this test to cover that case"
    ref = train(store, tmp_path / "ref", arch=arch, optimizer=optimizer)
    total = ref["steps"]
    assert total == 2 * len(data) >= 30
    want = load_sae(tmp_path / "ref" / "sae").state_dict()
    for s in range(1, total):
        run = tmp_path / f"stop{s}"
        with pytest.raises(Stopped):
            train(store, run, stop_after=s, arch=arch, optimizer=optimizer)
        assert not (run / "sae" / "summary.json").exists()
        got = train(store, run, arch=arch, optimizer=optimizer)
        assert got["steps"] == total
        sae = load_sae(run / "sae").state_dict()
        for k, v in want.items():
            assert torch.equal(v, sae[k]), f"stopped after step {s} of {total}: {k} differs after resume"
        assert history(run) == history(tmp_path / "ref"), f"stopped after step {s}: the history differs"
