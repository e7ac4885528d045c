"""Detectors tried on the model's own TruthfulQA answers beyond `DETECTORS`, scored against the hand labels.

Reads a run folder that `ghosttrack run --preset truthfulqa` (or `ghosttrack track --truthfulqa --own-answers`) finished,
scores its saved generations again (`score_items`, about ten minutes on two CPU cores) and prints test AUROC against the
automatic and the hand labels for: the `DETECTORS` as the run fits them; agreement between a question's answers
(SelfCheckGPT's idea) on SAE latents, residual streams and sentence embeddings; the tracker's statistics with those
agreements; and detectors trained on the hand-labelled validation answers instead of the automatic training labels.

    python tools/own_answers_experiments.py runs/truthfulqa
"""
import argparse
import collections
import csv
from pathlib import Path

import numpy as np
import torch

from ghosttrack.tracking.answers import _hand_rows, _key, against_hand_labels, answer_prompt, embed, load_hand_labels
from ghosttrack.tracking.hallucination import (DETECTORS, Logistic, _choose, _split_rows, auroc, compare_detectors, fit_detectors,
                                               score_items, univariate_auroc)
from ghosttrack.tracking.run import load_run, run_tracker


def agreement_with_others(rows, M):
    "Mean cosine of each row of `M` with the other answers to the same question."
    M, out, by_q = torch.nn.functional.normalize(torch.as_tensor(M, dtype=torch.float32), dim=1), np.zeros(len(rows)), collections.defaultdict(list)
    for i, r in enumerate(rows): by_q[r["question"]].append(i)
    for ii in by_q.values():
        S = M[ii] @ M[ii].T
        for a, i in enumerate(ii): out[i] = float((S[a].sum() - S[a, a]) / max(1, len(ii) - 1))
    return out


def main(run):
    model, tok, saes = load_run(run)
    tracker, _ = run_tracker(run, 0.5, "hungarian", "cpu")
    with open(Path(run) / "tracking" / "generations.csv", encoding="utf-8") as f: gens = list(csv.DictReader(f))
    items = [{"split": g["split"], "question": g["question"], "answer": g["answer"], "label": int(g["label"]), "kind": g["kind"],
              "sample": int(g["sample"]), "prompt": answer_prompt(g["question"])} for g in gens]
    rows, A = score_items(model, tok, saes, items, tracker, 16)
    fits = fit_detectors(rows, A)
    rep, hand = compare_detectors(rows, A, 200, 0, fits), load_hand_labels()
    h = against_hand_labels(rows, hand, 200, 0)
    print(f"{h['answers']} hand-labelled test answers; the automatic label agrees on {h['automatic_agreement']:.1%}")
    for n in DETECTORS: print(f"{n:28s} automatic {rep[n]['test_auroc']:.3f}  hand {h[n]['auroc']:.3f}")
    idx, y = _split_rows(rows)
    labels = {_key(r["question"], r["answer"]): not r["true"] for r in hand}
    (hi, hy), (vi, vy) = _hand_rows(rows, labels, "test"), _hand_rows(rows, labels, "val")
    sae = np.asarray(A["sae_NF"], dtype=np.float64)
    stats = A["stats_NGS"][:, A["thresholds"].index(A["threshold"])]
    agree = {"SAE latents": agreement_with_others(rows, sae), "sentence embeddings": agreement_with_others(rows, embed([r["answer"] for r in rows]))}
    agree |= {f"residual L{l}": agreement_with_others(rows, A["resid_NLD"][:, l]) for l in range(0, A["resid_NLD"].shape[1], 4)}
    for name, a in agree.items():   # low agreement should mean false
        print(f"agreement, {name:16s} automatic {auroc(-a[idx['test']], y[idx['test']]):.3f}  hand {auroc(-a[hi], hy):.3f}")
    for name, X in (("tracker + SAE agreement", np.c_[stats, agree["SAE latents"]]),
                    ("tracker + both agreements", np.c_[stats, agree["SAE latents"], agree["sentence embeddings"]])):
        m = _choose([({}, X)], y, idx)[0]
        p = m.predict_proba(X)
        print(f"{name:28s} automatic {auroc(p[idx['test']], y[idx['test']]):.3f}  hand {auroc(p[hi], hy):.3f}")
    order = np.argsort(-np.abs(univariate_auroc(sae[vi], vy) - 0.5), kind="stable")
    fold_of = {q: n % 5 for n, q in enumerate(dict.fromkeys(rows[i]["question"] for i in vi))}     # folds of questions
    folds = np.array([fold_of[rows[i]["question"]] for i in vi])
    for name, X in (("tracker statistics", stats), ("residual L17", A["resid_NLD"][:, 17].numpy()), ("residual L9", A["resid_NLD"][:, 9].numpy()),
                    ("sparse, 64 latents", sae[:, order[:64]]), ("sparse, 512 latents", sae[:, order[:512]])):
        cv = lambda l2: np.mean([auroc(Logistic(l2).fit(X[vi][folds != f], vy[folds != f]).predict_proba(X[vi][folds == f]), vy[folds == f])
                                 for f in range(5)])
        l2 = max((1e-2, 1e-1, 1.0, 10.0), key=cv)
        print(f"trained on hand-labelled val, {name:20s} l2 {l2:<5g} hand {auroc(Logistic(l2).fit(X[vi], vy).predict_proba(X[hi]), hy):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run folder with tracking/generations.csv")
    main(p.parse_args().run_dir)
