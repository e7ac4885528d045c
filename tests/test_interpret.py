"""Feature interpretation end to end: `ghosttrack interpret` on a tiny run folder, and the dashboard in a real headless browser."""
import argparse
import html
import re
import shutil
import subprocess

import pytest
import torch

from ghosttrack.interpret.features import FeatureInterpreter, load_features
from ghosttrack.cli.analyses import add_interpret_commands

HP = "blocks.1.hook_resid_post"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _parser():
    ap = argparse.ArgumentParser(prog="ghosttrack")
    add_interpret_commands(ap.add_subparsers(dest="command", required=True))
    return ap


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    "A finished run: the 3-layer tiny GPT-2, stdlib text, SAEs on layers 0 and 1."
    from conftest import tiny_run
    return tiny_run(tiny_model_dir, tmp_path_factory.mktemp("interpret") / "run", "0,1", 2000, 700)


def test_interpret_command_writes_json_and_dashboard(run_dir, capsys):
    args = _parser().parse_args(["interpret", "--run-dir", str(run_dir), "--layers", "1", "--k", "7", "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"blocks\.1\.hook_resid_post: \d+/256 features alive", printed), printed
    out = run_dir / "interpret" / HP
    assert not (run_dir / "interpret" / "blocks.0.hook_resid_post").exists()      # --layers 1 only
    d = load_features(out / "features.json")
    assert d["meta"]["rows_seen"] == 2000 and len(d["features"]) == 256
    assert d["dead_features"] == [r["feature_id"] for r in d["features"] if not r["active"]]
    alive = [r for r in d["features"] if r["active"]]
    assert all(1 <= len(r["top_examples"]) <= 7 for r in alive)
    assert all(r["top_examples"][0]["activation"] == r["top_activation"] for r in alive)
    assert (out / "dashboard.html").stat().st_size > 0
    args = _parser().parse_args(["interpret", "--run-dir", str(run_dir), "--layers", "1", "--quiet"])
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        args.func(args)


def test_store_examples_match_brute_force(run_dir, tiny_model_dir):
    "The examples written from the store are the brute-force top activations of the SAE over every stored row."
    from ghosttrack.data.store import load_hidden_states
    from ghosttrack.dictionaries.sae import load_sae
    sae = load_sae(run_dir / "saes" / HP)
    with torch.no_grad():
        acts_RF = sae.encode(load_hidden_states(run_dir / "activations" / HP))
    fs = FeatureInterpreter(sae, chunk_rows=300, progress=False).scan(run_dir / "activations" / HP, k=5)
    best_FK = acts_RF.T.topk(5, dim=1).values
    pos = best_FK > 0
    assert torch.allclose(fs.t["vals_FK"][pos], best_FK[pos], atol=1e-5)
    assert torch.equal(fs.t["count_F"], (acts_RF > 0).sum(0))
    rows = fs.t["rows_FK"][pos]
    assert torch.allclose(acts_RF[rows, pos.nonzero()[:, 0]], best_FK[pos], atol=1e-5)


def _browser():
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium here (apt-get install -y chromium) — the dashboard is not opened in a browser")


def _dom(browser, page, fragment, tmp_path):
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                        "--dump-dom", f"{page.resolve().as_uri()}#{fragment}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _main(dom):
    "The shown panel (the templates of the other features follow `</main>`)."
    return dom[dom.index('<main id="main">'):dom.index("</main>")]


def test_dashboard_renders_and_searches_in_a_browser(run_dir, tmp_path):
    browser = _browser()
    out = run_dir / "interpret" / HP
    if not (out / "features.json").exists():
        args = _parser().parse_args(["interpret", "--run-dir", str(run_dir), "--layers", "1", "--quiet"])
        args.func(args)
    d = load_features(out / "features.json")
    page = out / "dashboard.html"

    dom = _dom(browser, page, "", tmp_path)
    listed = re.findall(r'<li data-feature="(\d+)"', dom)
    assert len(listed) == 256
    most = max(d["features"], key=lambda r: (r["frequency"], -r["feature_id"]))
    assert listed[0] == str(most["feature_id"])                       # most frequent first
    main = _main(dom)
    assert f"<h2>Feature {most['feature_id']}</h2>" in main           # its panel is shown
    assert main.count('class="gt-ex"') == len(most["top_examples"])
    assert "gt-tok gt-hit" in main and "<svg" in main

    rec = next(r for r in d["features"] if r["active"] and r["common_tokens"][0][0].strip().isalpha())
    query = rec["common_tokens"][0][0].strip().lower()
    want = {r["feature_id"] for r in d["features"]
            if query in " ".join([t for t, _ in r["common_tokens"]] + [e["tokens"][e["hit"]] for e in r["top_examples"]]).lower()}
    dom = _dom(browser, page, f"search={query}", tmp_path)
    got = {int(f) for f in re.findall(r'<li data-feature="(\d+)"', dom)}
    assert got == want and rec["feature_id"] in got and len(got) < 256
    assert f"{len(want)} of 256 features" in dom

    dom = _dom(browser, page, f"feature={rec['feature_id']}", tmp_path)
    main = _main(dom)
    assert f"<h2>Feature {rec['feature_id']}</h2>" in main
    assert html.escape(rec["top_examples"][0]["tokens"][rec["top_examples"][0]["hit"]].replace("\n", "⏎")) in main
