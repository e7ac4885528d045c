"""Shared fixtures: a tiny GPT-2 saved with the real GPT-2 tokenizer, and WikiText-2 text; both from the data that
ships with ghosttrack (`ghosttrack/data/assets/`), so no test depends on anything outside the repository."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from ghosttrack.data.corpus import asset, gpt2_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def wikitext():
    return asset("wikitext-2", "wiki.test.raw")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    "A 3-layer GPT-2 (d_model 128) with the real GPT-2 tokenizer, saved like a downloaded model."
    from ghosttrack.data.models import tiny_gpt2
    d = tmp_path_factory.mktemp("tiny-gpt2")
    tok = gpt2_tokenizer()
    tiny_gpt2(n_layer=3, d_model=128, n_head=4).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_run(model_dir, run, layers, num_tokens, shard_tokens):
    "A finished run folder: the tiny GPT-2, stdlib text (32-token rows), one small TopK SAE per layer, no LM eval."
    from ghosttrack.core.config import CorpusConfig, ExtractConfig, SAEConfig, TrainConfig
    from ghosttrack.core.run_config import RunConfig
    from ghosttrack.pipeline.runner import run_stages
    cfg = RunConfig(name="t", run_dir=str(run), eval_rows=0, corpus=CorpusConfig(source="stdlib", context_len=32),
                    extract=ExtractConfig(model=str(model_dir), layers=layers, num_tokens=num_tokens, shard_tokens=shard_tokens),
                    sae=SAEConfig(expansion_factor=2, k=8), train=TrainConfig(batch_size=128, num_epochs=1, wandb_mode="disabled"))
    run_stages(cfg, ["extract", "train"], notebooks=False, progress=False)
    return run



def clt_run(model_dir, text, run, num_tokens, train_cfg):
    "A run folder: the tiny GPT-2's activations on `text` and a multi-layer CLT (`clts/clt_all`); returns `(model, token source)`."
    import torch
    from ghosttrack.core.config import ExtractConfig, save_config
    from ghosttrack.core.run_config import RunConfig
    from ghosttrack.data.corpus import TextCorpus, TokenSource
    from ghosttrack.data.models import load_model
    from ghosttrack.data.store import extract_activations
    from ghosttrack.dictionaries.clt_multi import MultiLayerCLTConfig, multilayer_hookpoints, train_multilayer_clt
    torch.set_num_threads(1)
    model, tok = load_model(str(model_dir))
    srcs, tgts = multilayer_hookpoints(model)
    src = TokenSource(TextCorpus(text), tok, 32)
    extract_activations(model, src, srcs + tgts, run / "activations", num_tokens, batch_size=16, shard_tokens=2048, progress=False)
    train_multilayer_clt(run / "activations", srcs, tgts, MultiLayerCLTConfig(expansion_factor=2, k=8, normalize="unit_norm", skip=True),
                         train_cfg, run / "clts" / "clt_all", run / "checkpoints" / "clt_all", progress=False)
    save_config(RunConfig(name="lm", run_dir=str(run), extract=ExtractConfig(model=str(model_dir))), run / "config.json")
    return model, src

CLI = [sys.executable, "-c", "import sys; from ghosttrack.cli.main import main; sys.exit(main())"]


def ghosttrack(*args, check=True, timeout=600, env=None):
    "Run the ghosttrack command in a subprocess, as a user would."
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"ghosttrack {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r



def one_clear_line(*args):
    "Run `ghosttrack *args` in this process (no interpreter start per case) and check for exit 2 with one error line."
    *argv, fragments = args
    import contextlib, io
    from ghosttrack.cli.main import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(list(map(str, argv)))
    assert code == 2, (code, err.getvalue())
    lines = [l for l in err.getvalue().strip().splitlines() if l.startswith("ghosttrack")]
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]

def kill_when(args, ready, timeout=300, poll=0.02):
    "Start `ghosttrack *args`, SIGKILL it as soon as `ready()` is true; returns True if it was killed mid-way."
    p = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if ready():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(poll)
    if p.poll() is None:
        p.kill()
    err = p.stderr.read()
    assert p.returncode == 0, err[-3000:]
    return False


# Under the README's test command (GHOSTTRACK_STRICT_SKIPS=1) a test may skip only for what the machine lacks (a GPU,
# a browser, a JavaScript runtime);
# any other skip (missing test data, a peer that failed to install) fails the run and says which.
ALLOWED_SKIPS = ("needs a CUDA GPU", "no headless Chromium", "node is not on the PATH", "no way to make a folder read-only")
_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.append((report.nodeid, report.longrepr[2]))


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("GHOSTTRACK_STRICT_SKIPS"):
        return
    bad = [(n, why) for n, why in _skips if not any(a in why for a in ALLOWED_SKIPS)]
    if bad:
        print("\nskips that are not allowed under the README's test command (only CUDA and a browser may be missing):")
        for n, why in bad:
            print(f"  {n}: {why}")
        session.exitstatus = 1


# Tests marked `long` (each takes 20 s or more: whole pipelines, kill-and-resume, the peers' bench) run first, so that
# no long test starts last while the other worker idles. The test command hands out one test at a time
# (`--maxschedchunk 1`), in this order. Their modules move to the front whole, long tests first within each, so that a
# worker never comes back to a module it has left and each module's fixtures are made at most once per worker.
def pytest_configure(config):
    config.addinivalue_line("markers", "long: takes 20 s or more; run first so that the workers finish together")


def pytest_collection_modifyitems(config, items):
    def short(item): return item.get_closest_marker("long") is None
    with_long = {item.module.__name__ for item in items if not short(item)}
    first = {}
    for i, item in enumerate(items): first.setdefault(item.module.__name__, i)
    items.sort(key=lambda item: (item.module.__name__ not in with_long, first[item.module.__name__], short(item)))
