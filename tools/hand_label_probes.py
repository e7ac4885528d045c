"""Where in the residual stream SmolLM2-135M's own TruthfulQA answers show whether they are false, by the hand labels.

Feeds each hand-labelled answer (`truthfulqa/hand_labels.csv`, 830 answers of the model itself) after the prompt it
was generated from, reads the residual after every block averaged over the answer (as `score_answer`'s `resid_LD`)
and at the answer's last token (`resid_last_LD`), and prints, per block and pooling, the AUROC of a logistic probe's
out-of-fold scores (`cv_auroc`: folds of whole questions, several shuffles) against the hand labels. Then, as the
preset splits the questions (`load_truthfulqa(seed=0)`), probes fitted on the train and validation answers (as
`train_on_hand` fits `probe_hand`), once with their automatic BLEU labels and once with their hand labels, scored
against the hand labels of the test answers. No run folder is needed; about ten minutes on two CPU cores.

    python tools/hand_label_probes.py [--l2 0.1] [--folds 5] [--shuffles 3]
"""
import argparse

import numpy as np
import torch

from ghosttrack.data.models import hooked, layer_hookpoints, load_model
from ghosttrack.data.corpus import load_truthfulqa
from ghosttrack.tracking.answers import _fold_of, answer_prompt, cv_auroc, label_answer, load_hand_labels
from ghosttrack.tracking.hallucination import Logistic, auroc, resid_pools
from ghosttrack.tracking.tracker import answer_positions


@torch.no_grad()
def residuals(model, tok, rows) -> dict:
    "`{'mean': [N, L, D], 'last': [N, L, D]}`: each answer's residual after every block, pooled as the detectors pool it."
    hps, out = layer_hookpoints(model), {"mean": [], "last": []}
    for r in rows:
        ids_1T, pos = answer_positions(tok, answer_prompt(r["question"]), " " + r["answer"].strip())
        res = {}
        with hooked(model, hps, read=lambda name, act: res.__setitem__(name, act.detach())): model(ids_1T)
        for k, R_LD in zip(out, resid_pools(res, hps, pos)): out[k].append(R_LD)
    return {k: torch.stack(v).double().numpy() for k, v in out.items()}


def main(l2: float, folds: int, shuffles: int):
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    rows = load_hand_labels()
    y_N, groups = np.array([int(not r["true"]) for r in rows]), [r["question"] for r in rows]
    R = residuals(model, tok, rows)
    print(f"{len(rows)} hand-labelled answers of {len(set(groups))} questions, {y_N.sum()} false; logistic probe, l2 {l2}, "
          f"{folds}-fold cross-validation over questions, mean of {shuffles} shuffles")
    print("block  " + "  ".join(f"{p:>6}" for p in R))
    best = {}
    for layer in range(R["mean"].shape[1]):
        a = {p: np.mean([cv_auroc(X[:, layer], y_N, _fold_of(groups, folds, s), l2) for s in range(shuffles)]) for p, X in R.items()}
        for p, v in a.items(): best[p] = max(best.get(p, (0, 0)), (v, layer))
        print(f"{layer:5d}  " + "  ".join(f"{v:6.3f}" for v in a.values()))
    for p, (v, layer) in best.items(): print(f"best {p}: {v:.3f} at block {layer} (chosen on these same folds: optimistic)")
    ex = {e.question: (s, e) for s, es in load_truthfulqa(seed=0).items() for e in es}
    split = np.array([ex[r["question"]][0] for r in rows])
    auto_N = np.array([int(not label_answer(r["answer"], ex[r["question"]][1].correct_answers, ex[r["question"]][1].incorrect_answers)["true"])
                       for r in rows])
    va, te = split != "test", split == "test"
    print(f"\nfitted on the {va.sum()} train and validation answers, scored against the hand labels of the {te.sum()} test answers "
          f"(the automatic label agrees with the hand label on {np.mean(auto_N == y_N):.1%} of all)")
    print("block  " + "  ".join(f"{p + ', ' + lab:>13}" for p in R for lab in ("automatic", "hand")))
    for layer in range(R["mean"].shape[1]):
        cells = [auroc(Logistic(l2).fit(X[va, layer], lab[va]).predict_proba(X[te, layer]), y_N[te]) for X in R.values() for lab in (auto_N, y_N)]
        print(f"{layer:5d}  " + "  ".join(f"{v:13.3f}" for v in cells))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--l2", type=float, default=0.1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--shuffles", type=int, default=3)
    main(**vars(ap.parse_args()))
