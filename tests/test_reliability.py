"""Nothing a user types loses data, leaks into a page, or gives a wrong answer quietly.

Every kind of bad input of issue 20, driven through the command line on one tiny finished run: each ends with
exit code 2 and one line that names the problem, and every finished artifact of the run keeps its sha256.
(A read-only run folder is made with chmod, or, for root, whom no permission stops, with a read-only bind mount.)"""
import hashlib
import json
import os
import resource
import subprocess
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CLI, ghosttrack, one_clear_line
from ghosttrack.core.io import load_json, save_tensors
from ghosttrack.core.runfolder import run_lock

HP = "blocks.0.hook_resid_post"
TRAIN = ["--expansion-factor", "2", "--k", "4", "--batch-size", "128", "--epochs", "1", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, wikitext, tmp_path_factory):
    "A finished run: layers 0 and 1 of the tiny GPT-2, stores, SAEs and their spliced-LM loss."
    run = tmp_path_factory.mktemp("reliability") / "run"
    ghosttrack("extract-and-train", "--model", tiny_model_dir, "--corpus", f"text:{wikitext}", "--layers", "0,1",
               "--num-tokens", 4000, "--context-len", 32, "--run-dir", run, "--eval-rows", 4, "--quiet", *TRAIN)
    return run


def digests(run) -> dict:
    "sha256 of every finished artifact and of config.json (not the records of what ran last, nor the lock)."
    return {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in (".safetensors", ".json") and p.parent.name != "stages" and p.name != "run.json"}


def test_bad_values_and_files_get_one_line_and_change_nothing(finished, wikitext, tmp_path):
    before = digests(finished)
    cfg = load_json(finished / "config.json")
    model = cfg["extract"]["model"]
    extract = ["extract", "--run-dir", finished, "--quiet"]
    one_clear_line(*extract, "--set", "train.lr=abc", ("train.lr='abc'", "a number"))
    one_clear_line("train", "--run-dir", finished, "--set", "train.num_epochs=1.5", "--quiet", ("num_epochs=1.5", "an integer"))
    (tmp_path / "bad.yaml").write_text("extract: [unclosed\n")
    one_clear_line(*extract, "--config", tmp_path / "bad.yaml", ("bad.yaml", "not valid YAML"))
    (tmp_path / "types.json").write_text(json.dumps({"extract": {"num_tokens": "many"}}))
    one_clear_line(*extract, "--config", tmp_path / "types.json", ("extract.num_tokens='many'",))
    (tmp_path / "empty-model").mkdir(); (tmp_path / "empty-model" / "config.json").write_text("{}")
    one_clear_line(*extract, "--model", tmp_path / "empty-model", ("empty-model",))
    one_clear_line(*extract, "--model", tmp_path / "types.json", ("is a file",))
    (tmp_path / "empty.txt").write_text("")
    one_clear_line(*extract, "--corpus", f"text:{tmp_path / 'empty.txt'}", "--overwrite", ("yields no rows", "empty.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    one_clear_line(*extract, "--corpus", f"text:{tmp_path / 'latin.txt'}", "--overwrite", ("latin.txt", "not UTF-8", "encoding_errors=replace"))
    one_clear_line(*extract, "--context-len", 4096, "--overwrite", ("context_len=4096", "at most 128 positions"))
    (tmp_path / "corpus").mkdir()                  # a bad byte in a later file: --overwrite fails part-way through extraction
    (tmp_path / "corpus" / "a.txt").write_text(Path(wikitext).read_text()[:20_000])
    (tmp_path / "corpus" / "b.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    one_clear_line(*extract, "--corpus", f"text:{tmp_path / 'corpus'}", "--overwrite", ("b.txt", "not UTF-8"))
    if not torch.cuda.is_available():
        one_clear_line(*extract, "--device", "cuda", ("'cuda'", "--device cpu"))
    one_clear_line("train", "--run-dir", finished, "--batch-size", 10**6, "--overwrite", "--quiet", ("is kept",))
    one_clear_line("interpret", "--run-dir", finished, "--device", "gpu", ("'gpu'",))
    assert digests(finished) == before
    assert load_json(finished / "config.json") == cfg and model == cfg["extract"]["model"]


def test_damaged_artifacts_are_named(finished, tmp_path):
    "A copy is damaged each time; the original stays as it was."
    before = digests(finished)
    def damaged(name, damage):
        run = tmp_path / name
        shutil.copytree(finished, run)
        damage(run)
        return run
    run = damaged("manifest", lambda r: (r / "activations" / HP / "manifest.json").write_text("[1, 2]"))
    one_clear_line("train", "--run-dir", run, "--overwrite", "--quiet", ("manifest.json", "not an activation-store manifest"))
    run = damaged("shard", lambda r: (r / "activations" / HP / "shard-00000.safetensors").write_bytes(b"\0" * 64))
    one_clear_line("extract", "--run-dir", run, "--quiet", ("shard-00000.safetensors", "does not match the manifest", "--overwrite"))
    weights = lambda r: r / "saes" / HP / "sae_weights.safetensors"
    run = damaged("truncated", lambda r: weights(r).write_bytes(weights(r).read_bytes()[:200]))
    one_clear_line("interpret", "--run-dir", run, "--layers", "0", "--quiet", ("sae_weights.safetensors", "not a readable safetensors"))
    def nan(r):
        from ghosttrack.core.io import load_tensors
        t = load_tensors(weights(r))
        t["W_dec"][0, 0] = float("nan")
        save_tensors(t, weights(r))
    run = damaged("nan", nan)
    for cmd in (["interpret", "--layers", "0"], ["track", "--prompt", "Q: Where is Paris?\nA:"], ["attribute", "--prompt", "Paris is"]):
        one_clear_line(cmd[0], "--run-dir", run, *cmd[1:], "--quiet", ("W_dec", "NaN"))
    assert digests(finished) == before


def test_paths_stay_inside_and_other_folders_are_never_deleted(finished, tmp_path):
    before = digests(finished)
    one_clear_line("attribute", "--run-dir", finished, "--prompt", "Paris is", "--slug", "../../escaped", "--overwrite", "--quiet", ("--slug",))
    assert not list(finished.parent.parent.glob("escaped*")) and not (finished / "graphs").exists()
    one_clear_line("run", "--name", "../..", "--stages", "extract", "--quiet", ("name='../..'",))
    thesis = tmp_path / "thesis"
    thesis.mkdir(); (thesis / "thesis.txt").write_text("four years")
    one_clear_line("tsp-train", "--run-dir", thesis, "--preset", "tiny", "--overwrite", "--quiet", ("not a tsp-train run folder",))
    assert (thesis / "thesis.txt").read_text() == "four years"
    assert digests(finished) == before


def test_a_copied_run_never_touches_the_original(finished, tmp_path):
    before = digests(finished)
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    ghosttrack("extract", "--config", copy / "config.json", "--run-dir", copy, "--num-tokens", 3000, "--overwrite", "--quiet")
    assert load_json(copy / "activations" / HP / "manifest.json")["num_tokens"] == 3000
    assert digests(finished) == before


def test_one_writer_at_a_time(finished):
    before = digests(finished)
    with run_lock(finished, "ghosttrack train (another terminal)"):
        one_clear_line("train", "--run-dir", finished, "--quiet", ("is in use by", "another terminal"))
    assert digests(finished) == before


@pytest.mark.long
def test_user_text_stays_text_in_every_page(finished, tmp_path):
    hostile = "<img src=x onerror=alert(1)></script><script>alert(2)</script> __DATA__"
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ghosttrack("attribute", "--run-dir", run, "--prompt", f"Paris is {hostile}", "--slug", "hostile", "--quiet")
    page = (run / "graphs" / "hostile.html").read_text()
    assert "<img src=x" not in page and "<script>alert(2)" not in page and "&lt;img src=x" in page   # shown, as text
    (tmp_path / "hostile.txt").write_text((f"{hostile} some words around it. " * 40 + "\n\n") * 20)
    ghosttrack("interpret", "--run-dir", run, "--layers", "0", "--texts", f"text:{tmp_path / 'hostile.txt'}", "--max-tokens", 2000,
               "--overwrite", "--quiet")
    page = (run / "interpret" / HP / "dashboard.html").read_text()
    assert "<img src=x" not in page and "<script>alert(2)" not in page and "alert" in page and "&lt;" in page   # shown, as text
    records = load_json(run / "run.json")
    records["clt"] = {"status": "failed", "error": hostile, "seconds": 1.0}
    (run / "run.json").write_text(json.dumps(records))
    from ghosttrack.pipeline.report import write_report
    page = open(write_report(run)["html"]).read()
    assert "<img src=x" not in page and "<script>alert(2)" not in page and "&lt;img src=x" in page


def test_a_full_disk_fails_in_one_line_and_keeps_the_finished_store(finished):
    """Files past 200 kB cannot be written (RLIMIT_FSIZE: the write fails as on a full disk): --overwrite rebuilds stores and
    retrains SAEs beside the finished ones, so nothing is lost."""
    before = digests(finished)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        one_clear_line("extract", "--run-dir", finished, "--overwrite", "--quiet", ("disk is full",))
        one_clear_line("train", "--run-dir", finished, "--overwrite", "--quiet", ("disk is full",))   # fails at its first checkpoint
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert digests(finished) == before


def test_a_read_only_run_folder_gets_one_line(finished, tmp_path):
    "Even a command that would only reuse what is there needs to write (its lock, its records): it says so in one line."
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digests(run)
    argv = [*CLI, "extract", "--run-dir", str(run), "--quiet"]
    if os.geteuid() != 0:
        for p in [run, *run.rglob("*")]: p.chmod(p.stat().st_mode & ~0o222)
    else:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("no way to make a folder read-only for root here (no unshare -m)")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"', str(run), *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("ghosttrack")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(run) in lines[0] and "cannot write" in lines[0], lines[0]
    if os.geteuid() != 0:
        for p in [run, *run.rglob("*")]: p.chmod(p.stat().st_mode | 0o200)
    assert digests(run) == before
