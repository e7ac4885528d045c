"""Graphs written by `ghosttrack attribute` open in circuit-tracer: the JSON validates against circuit-tracer's own
pydantic model (`circuit_tracer.frontend.graph_models.Model`), `graph-metadata.json` lists every graph of the folder
in the form circuit-tracer's `add_graph_metadata` reads and writes, every feature file validates against its feature
model (`circuit_tracer.frontend.feature_models.Model`), and the viewer's own JavaScript (`utilCg.formatData`, the label
update `hClerpUpdateFn`, `util.cantorUnpair`, and `loadFeature` fetching every feature of a graph from `serve_graphs`,
from the assets circuit-tracer ships) runs on the graphs under node.

circuit-tracer pins its own dependency tree (transformers<=4.57.3, transformer-lens, nnsight, ...), so it lives in a
separate interpreter: `.circuit-tracer-venv/` at the repository root, or set GHOSTTRACK_CIRCUIT_TRACER_PYTHON:

    python3.11 -m venv .circuit-tracer-venv
    .circuit-tracer-venv/bin/pip install -c .ci/constraints.txt torch==2.13.0 circuit-tracer
    pytest tests/test_circuit_tracer.py

(tested with circuit-tracer 0.5.0). The JavaScript test needs `node` on the PATH and is skipped, saying so, without it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ghosttrack.attribution.export import GRAPH_INDEX, cantor_pair, validate_graph_json  # noqa: E402
from ghosttrack.attribution.viewer import feature_path, viewer_assets  # noqa: E402
from ghosttrack.attribution.run import attribute  # noqa: E402
from ghosttrack.core.config import TrainConfig  # noqa: E402
from ghosttrack.core.io import load_json  # noqa: E402
from conftest import clt_run  # noqa: E402

CT_PYTHON = os.environ.get("GHOSTTRACK_CIRCUIT_TRACER_PYTHON") or str(ROOT / ".circuit-tracer-venv" / "bin" / "python")
pytestmark = pytest.mark.skipif(
    not Path(CT_PYTHON).exists(), reason=f"no circuit-tracer interpreter at {CT_PYTHON}: create .circuit-tracer-venv "
                                         "or set GHOSTTRACK_CIRCUIT_TRACER_PYTHON (see this file's docstring)")
PROMPTS = {"the-tower-is-in-the-city-of": "The tower is in the city of", "second": "She went to the market and bought"}
SCAN = "./graph_data/features/clt_all"   # the viewer fetches a feature's file from <scan>/<feature>.json, under the graph folder


@pytest.fixture(scope="module")
def graphs(tiny_model_dir, wikitext, tmp_path_factory):
    "A run folder (the tiny GPT-2, a multi-layer CLT trained on 2k WikiText tokens) and two graphs written by `attribute`."
    run = tmp_path_factory.mktemp("ct") / "lm"
    clt_run(tiny_model_dir, wikitext, run, 2000, TrainConfig(batch_size=128, num_epochs=2, lr=4e-3, checkpoint_every=50, log_every=10,
                                                             wandb_mode="disabled", dead_window_tokens=5000))
    for slug, prompt in PROMPTS.items():   # a loose node threshold: on a tiny CLT, features carry little of the influence
        attribute(run, prompt=prompt, slug=slug if slug == "second" else None, node_threshold=0.99)
    return run / "graphs"


def in_circuit_tracer(script: str, *args) -> dict:
    "Run `script` in circuit-tracer's interpreter; it prints one JSON line last."
    r = subprocess.run([CT_PYTHON, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{CT_PYTHON} failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# Runs inside circuit-tracer's interpreter: validate each graph with its pydantic model and the index with its
# Metadata model, then let its own add_graph_metadata merge one more record into a copy of the index.
VALIDATE = r"""
import importlib.metadata, json, shutil, sys, tempfile
from pathlib import Path
from pydantic import ValidationError
from circuit_tracer.frontend.graph_models import Metadata, Model
from circuit_tracer.frontend.utils import add_graph_metadata
folder = Path(sys.argv[1])
report = {"version": importlib.metadata.version("circuit-tracer"), "graphs": {}}
for p in sorted(folder.glob("*.json")):
    if p.name == "graph-metadata.json" or p.name.startswith("static_"): continue
    try:
        m = Model.model_validate(json.loads(p.read_text()))
        report["graphs"][p.stem] = {"errors": 0, "nodes": len(m.nodes), "links": len(m.links), "scan": m.metadata.scan,
                                    "transcoder_list": m.metadata.transcoder_list, "sg_pos": m.qParams.sg_pos}
    except ValidationError as e:
        report["graphs"][p.stem] = {"errors": e.error_count(), "first": str(e)[:2000]}
index = json.loads((folder / "graph-metadata.json").read_text())
report["index"] = [Metadata.model_validate(g).slug for g in index["graphs"]]
tmp = Path(tempfile.mkdtemp()) / "graphs"
shutil.copytree(folder, tmp)
add_graph_metadata({"slug": "theirs", "scan": "x", "transcoder_list": [], "prompt_tokens": ["a"], "prompt": "a"}, str(tmp))
report["merged"] = [g["slug"] for g in json.loads((tmp / "graph-metadata.json").read_text())["graphs"]]
print(json.dumps(report))
"""


def test_graphs_validate_in_circuit_tracer(graphs):
    report = in_circuit_tracer(VALIDATE, graphs)
    print(f"\ncircuit-tracer {report['version']}: " + ", ".join(f"{s}: {r['errors']} errors" for s, r in report["graphs"].items()))
    assert set(report["graphs"]) == set(PROMPTS)
    for slug, r in report["graphs"].items():
        assert r["errors"] == 0, f"{slug}: circuit-tracer's Model rejects the graph:\n{r['first']}"
        d = load_json(graphs / f"{slug}.json")
        validate_graph_json(d)
        assert (r["nodes"], r["links"]) == (len(d["nodes"]), len(d["links"])) and r["links"] > 0
        assert (r["scan"], r["transcoder_list"], r["sg_pos"]) == (SCAN, [SCAN] * 3, "")
    assert sorted(report["index"]) == sorted(PROMPTS)
    assert report["merged"][-1] == "theirs" and sorted(report["merged"][:-1]) == sorted(PROMPTS)


def test_graph_follows_circuit_tracer_conventions(graphs):
    d = load_json(graphs / "the-tower-is-in-the-city-of.json")
    m, nodes = d["metadata"], d["nodes"]
    assert m["schema_version"] == 1 and m["scan"] == SCAN and m["prompt"] == PROMPTS["the-tower-is-in-the-city-of"]
    assert "tiny" in m["info"]["model"]                                 # the model is in info, the dictionary set is the scan
    by = {t: [n for n in nodes if n["feature_type"] == t] for t in ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")}
    assert all(by.values()), {t: len(v) for t, v in by.items()}
    for n in by["cross layer transcoder"]:
        layer, index, pos = map(int, n["node_id"].split("_"))
        assert (n["feature"], n["layer"], n["ctx_idx"]) == (cantor_pair(layer, index), str(layer), pos)
    assert all(isinstance(n["feature"], int) and n["feature"] < 0 for n in by["mlp reconstruction error"])
    assert [n["feature"] for n in by["embedding"]] == [n["ctx_idx"] for n in by["embedding"]]
    assert all(n["node_id"].startswith("E_") for n in by["embedding"]) and len(by["embedding"]) == len(m["prompt_tokens"])
    assert sum(n["is_target_logit"] for n in nodes) == 1 and [n for n in nodes if n["is_target_logit"]][0] in by["logit"]
    assert all("(p=" in n["clerp"] for n in by["logit"])                 # the viewer reads the probability from the label
    assert all(0 < n["influence"] <= 1 for n in nodes)
    shares = sorted(n["influence"] for n in by["cross layer transcoder"])   # kept features: all under the threshold but the last
    assert shares[-2] <= m["node_threshold"] if len(shares) > 1 else True
    index = load_json(graphs / GRAPH_INDEX)["graphs"]
    assert {g["slug"] for g in index} == set(PROMPTS) and all("info" not in g for g in index)
    own = [n["own_influence"] for n in by["cross layer transcoder"]]
    assert max(own) > 0 and "own_influence" in (graphs / "the-tower-is-in-the-city-of.html").read_text()


# The few d3 functions the viewer's data path uses (d3 itself comes from the web in the viewer's page).
D3 = r"""
const nan = v => v === undefined || v === null || Number.isNaN(v)
const d3 = {
  max: (a, f = d => d) => a.reduce((m, d, i) => { const v = f(d, i); return nan(v) || (m !== undefined && m >= v) ? m : v }, undefined),
  sum: (a, f = d => d) => a.reduce((s, d, i) => { const v = +f(d, i); return Number.isNaN(v) ? s : s + v }, 0),
  sort: (a, f) => Array.from(a).sort((x, y) => { const u = f(x), v = f(y); return nan(u) - nan(v) || (nan(u) ? 0 : u < v ? -1 : u > v ? 1 : 0) }),
  nestBy: (a, f) => { const m = new Map(); for (const d of a) { const k = f(d); if (!m.has(k)) m.set(k, Object.assign([], {key: k})); m.get(k).push(d) }
                       return [...m.values()] },
  scaleSequential: () => ({domain() { return this }, clamp() { return this }}), interpolateOranges: null,
}
"""


# Runs under node: the viewer's util.js and util-cg.js (as shipped in circuit-tracer's assets) in a context with the
# few browser globals and d3 functions that their data path uses; prints one JSON line.
VIEWER = D3 + r"""
const vm = require('vm'), fs = require('fs'), path = require('path')
const [assets, graphPath] = process.argv.slice(2)
const store = {}
const ctx = {d3, URL, URLSearchParams, console: {log() {}, error: console.error},
             location: 'http://localhost/index.html',
             history: {replaceState(_, __, url) { ctx.location = String(url) }},
             localStorage: {getItem: k => k in store ? store[k] : null, setItem: (k, v) => { store[k] = String(v) }}}
ctx.window = ctx
vm.createContext(ctx)
for (const f of ['util.js', 'attribution_graph/util-cg.js']) vm.runInContext(fs.readFileSync(path.join(assets, f), 'utf8'), ctx, {filename: f})
const {util, utilCg} = ctx
;(async () => {
  const raw = JSON.parse(fs.readFileSync(graphPath, 'utf8'))
  const all = await utilCg.formatData(structuredClone(raw), {pinnedIds: []})
  utilCg.hClerpUpdateFn(null, all)                         // feature.toString() on every node
  const f = all.nodes.find(n => n.feature_type == 'cross layer transcoder')
  utilCg.hClerpUpdateFn([f, 'a label by hand'], all)       // stored under the scan (or transcoder_list[layer])
  const slider = await utilCg.formatData(structuredClone(raw), {pinnedIds: [], pruningThreshold: String(raw.metadata.node_threshold)})
  const feats = g => g.nodes.filter(n => n.feature_type == 'cross layer transcoder')
  console.error = () => {}
  process.stdout.write(JSON.stringify({
    nodes: all.nodes.length, links: all.links.length, features: all.features.length,
    unpaired: feats(all).map(n => [n.node_id, util.cantorUnpair(n.featureIndex)]),
    slider_features: feats(slider).length, all_features: feats(all).length,
    label: all.nodes.find(n => n.nodeId == f.nodeId).ppClerp, storage: Object.keys(store),
    target: all.nodes.filter(n => n.is_target_logit).map(n => n.logitPct),
  }) + '\n')
})().catch(e => { process.stderr.write(String(e && e.stack || e)); process.exit(1) })
"""


def test_viewer_javascript_reads_the_graph(graphs, tmp_path):
    node = shutil.which("node")
    if node is None: pytest.skip("node is not on the PATH: the viewer's JavaScript (util-cg.js formatData) was not run")
    assets = Path(in_circuit_tracer("import circuit_tracer, json, os; print(json.dumps({'a': os.path.join("
                                    "os.path.dirname(circuit_tracer.__file__), 'frontend', 'assets')}))")["a"])
    if not (assets / "attribution_graph" / "util-cg.js").exists(): pytest.skip(f"this circuit-tracer ships no viewer assets at {assets}")
    (tmp_path / "viewer.js").write_text(VIEWER)
    json_path = graphs / "the-tower-is-in-the-city-of.json"
    r = subprocess.run([node, str(tmp_path / "viewer.js"), str(assets), str(json_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the viewer's formatData fails on the graph:\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    d = load_json(json_path)
    print(f"\nviewer: {out['nodes']} nodes, {out['links']} links, {out['slider_features']}/{out['all_features']} features "
          f"at the slider's node_threshold {d['metadata']['node_threshold']}")
    assert (out["nodes"], out["links"]) == (len(d["nodes"]), len(d["links"])), "the viewer dropped nodes or links"
    for node_id, (layer, index) in out["unpaired"]:
        assert node_id.split("_")[:2] == [str(layer), str(index)], (node_id, layer, index)   # the viewer's L/feature label
    assert out["all_features"] - 1 <= out["slider_features"] <= out["all_features"] and out["slider_features"] > 0
    assert out["label"] == "a label by hand" and f"local-clerp-{SCAN}" in out["storage"]
    target = [n for n in d["nodes"] if n["is_target_logit"]][0]
    assert out["target"] == [round(target["token_prob"], 3)]        # the probability the viewer reads from the label


def test_the_pinned_circuit_tracer_is_the_one_tested():
    pin = next(l.strip() for l in (ROOT / ".ci" / "peers.txt").read_text().splitlines() if l.startswith("circuit-tracer=="))
    r = subprocess.run([CT_PYTHON, "-c", "import importlib.metadata as m; print(m.version('circuit-tracer'))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == pin.split("==")[1], (r.stdout, r.stderr[-500:], pin)


# Runs inside circuit-tracer's interpreter: its own prune_graph and compute_graph_scores on our adjacency matrix.
SCORES = r"""
import json, sys, types, torch
from safetensors.torch import load_file, save_file
from circuit_tracer.graph import compute_graph_scores, prune_graph
t, c = load_file(sys.argv[1]), json.loads(sys.argv[2])
graph = types.SimpleNamespace(adjacency_matrix=t["A"], logit_probabilities=t["p"], input_tokens=torch.zeros(c["n_tokens"], dtype=torch.long),
                              logit_targets=[None] * c["n_logits"], selected_features=torch.zeros(c["n_features"], dtype=torch.long),
                              cfg=types.SimpleNamespace(n_layers=c["n_layers"]))
r = prune_graph(graph, c["node_threshold"], c["edge_threshold"])
replacement, completeness = compute_graph_scores(graph)
save_file({"node_mask": r.node_mask, "edge_mask": r.edge_mask, "cumulative": r.cumulative_scores}, sys.argv[3])
print(json.dumps({"replacement_score": replacement, "completeness_score": completeness}))
"""


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9)])
def test_pruning_and_scores_are_circuit_tracers(graphs, tiny_model_dir, tmp_path, thresholds):
    "prune_graph and graph_scores give what circuit-tracer's own prune_graph and compute_graph_scores give on the same matrix."
    import torch
    from ghosttrack.attribution.graph import compute_adjacency, graph_scores, output_weights, prune_graph
    from ghosttrack.attribution.replacement import ReplacementModel
    from ghosttrack.core.io import load_tensors, save_tensors
    from ghosttrack.data.models import load_model
    from ghosttrack.dictionaries.clt_multi import load_multilayer_clt
    model, tok = load_model(tiny_model_dir)
    clt = load_multilayer_clt(graphs.parent / "clts" / "clt_all").eval()
    rm = ReplacementModel(model, tok("The tower is in the city of", return_tensors="pt").input_ids, clt)
    A = compute_adjacency(rm).float()
    kinds = [nd.kind for nd in rm.nodes]
    count = {k: kinds.count(k) for k in ("feature", "error", "embedding", "output")}
    assert kinds == sum(([k] * n for k, n in count.items()), []), "circuit-tracer's node order: features, errors, tokens, logits"
    assert count["error"] % count["embedding"] == 0 and count["feature"] > 20
    node_t, edge_t = thresholds
    save_tensors({"A": A, "p": output_weights(rm.nodes)[-count["output"]:].float()}, tmp_path / "graph.safetensors")
    theirs = in_circuit_tracer(SCORES, tmp_path / "graph.safetensors",
                               json.dumps(dict(n_tokens=count["embedding"], n_logits=count["output"], n_features=count["feature"],
                                               n_layers=count["error"] // count["embedding"], node_threshold=node_t, edge_threshold=edge_t)),
                               tmp_path / "pruned.safetensors")
    masks = load_tensors(tmp_path / "pruned.safetensors")
    ours, scores = prune_graph(A, rm.nodes, node_t, edge_t), graph_scores(A, rm.nodes)
    for k in ("replacement_score", "completeness_score"):
        assert abs(scores[k] - theirs[k]) < 1e-5, (k, scores[k], theirs[k])
    assert torch.equal(ours.node_mask, masks["node_mask"])
    assert torch.equal(ours.edge_mask, masks["edge_mask"] & (A != 0))
    torch.testing.assert_close(ours.cumulative, masks["cumulative"], atol=1e-5, rtol=0)
    assert 0 < ours.stats["nodes"] < len(kinds) and 0 < ours.stats["edges"] < int((A != 0).sum())


# Runs inside circuit-tracer's interpreter: every feature file under the graph folder against its pydantic feature
# model, and a copy of one with a field removed, which the model must reject (the check can fail).
FEATURES = r"""
import json, sys
from pathlib import Path
from pydantic import ValidationError
from circuit_tracer.frontend.feature_models import Model
folder = Path(sys.argv[1])
report = {"files": [], "errors": {}, "examples": 0}
for p in sorted(folder.glob("features/*/*.json")):
    report["files"].append(str(p.relative_to(folder)))
    try: report["examples"] += sum(len(q.examples) for q in Model.model_validate(json.loads(p.read_text())).examples_quantiles)
    except ValidationError as e: report["errors"][report["files"][-1]] = str(e)[:2000]
broken = {k: v for k, v in json.loads((folder / report["files"][0]).read_text()).items() if k != "histogram"}
try: Model.model_validate(broken); report["broken_rejected"] = False
except ValidationError: report["broken_rejected"] = True
print(json.dumps(report))
"""


def test_feature_files_validate_in_circuit_tracer(graphs):
    report = in_circuit_tracer(FEATURES, graphs)
    assert not report["errors"], report["errors"]
    assert report["broken_rejected"]
    wanted = {feature_path(graphs, d, n).relative_to(graphs).as_posix() for d in [load_json(graphs / f"{s}.json") for s in PROMPTS]
              for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"}
    print(f"\n{len(report['files'])} feature files, {report['examples']} examples: valid circuit-tracer feature models")
    assert sorted(wanted) == report["files"] and report["examples"] >= len(wanted)


# Runs under node: the viewer's util.js, util-cg.js and init-feature-examples.js in a context whose fetch goes to
# `ghosttrack serve-graphs`' server; the graph picker's index, a graph, and every feature through the viewer's own
# loadFeature with the scan the feature panel (init-cg-feature-detail.js) passes it. Prints one JSON line.
FEATURE_VIEWER = D3 + r"""
const vm = require('vm'), fs = require('fs'), path = require('path')
const [assets, base, slug] = process.argv.slice(2)
const chain = new Proxy(function () {}, {get: (t, k) => k === 'node' ? () => null : chain, apply: () => chain})   // a d3 selection that ignores everything
const store = {}
const ctx = {d3, URL, URLSearchParams, console: {log() {}, error: console.error}, location: base + 'index.html', isLocalServing: true,
             fetch: (p, o) => fetch(new URL(p, base), o), history: {replaceState() {}},
             localStorage: {getItem: k => k in store ? store[k] : null, setItem: (k, v) => { store[k] = String(v) }},
             initFeatureExamplesLogits() {}, initFeatureExamplesList() {}}
ctx.window = ctx
vm.createContext(ctx)
for (const f of ['util.js', 'attribution_graph/util-cg.js', 'feature_examples/init-feature-examples.js'])
  vm.runInContext(fs.readFileSync(path.join(assets, f), 'utf8'), ctx, {filename: f})
const {util, utilCg} = ctx
;(async () => {
  const {graphs} = await util.getFile('./data/graph-metadata.json', false)
  const raw = await util.getFile(`./graph_data/${slug}.json`)
  const data = await utilCg.formatData(structuredClone(raw), {pinnedIds: []})
  const examples = ctx.initFeatureExamples({containerSel: chain})
  const features = []
  for (const d of data.nodes.filter(n => n.feature_type == 'cross layer transcoder')) {
    const scan = data.metadata.scan?.startsWith('custom-') ? data.metadata.transcoder_list[d.layer] : data.metadata.scan
    const f = await examples.loadFeature(scan, d.featureIndex)
    features.push({node_id: d.node_id, featureIndex: f.featureIndex, index: f.index, examples: f.examples_quantiles[0].examples.length,
                   act_max: f.act_max})
  }
  process.stdout.write(JSON.stringify({graphs: graphs.map(g => g.slug), nodes: raw.nodes.length, features}) + '\n')
})().catch(e => { process.stderr.write(String(e && e.stack || e)); process.exit(1) })
"""


def test_viewer_loads_features_from_serve_graphs(graphs, tmp_path):
    import threading
    import urllib.request
    from ghosttrack.attribution.viewer import serve_graphs
    node = shutil.which("node")
    if node is None: pytest.skip("node is not on the PATH: the viewer's JavaScript (loadFeature) was not run")
    assets = viewer_assets(CT_PYTHON)
    if assets is None: pytest.skip(f"the circuit-tracer of {CT_PYTHON} ships no viewer assets")
    server = serve_graphs(graphs, port=0, assets="auto", python=CT_PYTHON)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.assets == assets
        base = server.url.split("index.html")[0]
        assert "isLocalServing = true" in urllib.request.urlopen(server.url, timeout=30).read().decode()   # circuit-tracer's page
        (tmp_path / "features.js").write_text(FEATURE_VIEWER)
        slug = "the-tower-is-in-the-city-of"
        r = subprocess.run([node, str(tmp_path / "features.js"), str(assets), base, slug], capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown(); server.server_close()
    assert r.returncode == 0, f"the viewer cannot load the graph's features from serve-graphs:\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    d = load_json(graphs / f"{slug}.json")
    feats = [n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert sorted(out["graphs"]) == sorted(PROMPTS) and out["nodes"] == len(d["nodes"])
    assert [f["node_id"] for f in out["features"]] == [n["node_id"] for n in feats] and feats
    for f, n in zip(out["features"], feats):
        assert f["featureIndex"] == n["feature"] and f["index"] == int(n["node_id"].split("_")[1]) and f["examples"] > 0
        assert f["act_max"] == load_json(feature_path(graphs, d, n))["act_max"] > 0
    print(f"\nthe viewer loaded {len(feats)} features of {slug} from serve-graphs")
