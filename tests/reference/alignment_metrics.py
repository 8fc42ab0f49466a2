"""Recomputes `med3d evaluate-alignment`'s numbers from its --dump with
scikit-learn and numpy, and prints them as JSON.

    python alignment_metrics.py DUMP TARGET

- retrieval over all slices: sklearn.metrics.top_k_accuracy_score on the
  cosine similarities (the label of row i is i), and the median rank;
- retrieval within each (plane, bin) among other cases' slices: the same
  ranks on the candidate columns only;
- plane accuracy: NearestCentroid under LeaveOneGroupOut(cases);
- position error: KNeighborsRegressor(5) under LeaveOneGroupOut, per plane;
- modality gap: the distance between the two sets' centroids.
"""
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import top_k_accuracy_score
from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
from sklearn.neighbors import KNeighborsRegressor, NearestCentroid


def ranks(sim, cols):
    """1-based rank of the own column among `cols[i]` (ties count against)."""
    out, sizes = [], []
    for i, c in enumerate(cols):
        if len(c) < 2:
            continue
        # the own column is in c and counts itself once: 1 + the others >= it
        out.append(int(np.sum(sim[i, c] >= sim[i, i])))
        sizes.append(len(c))
    return np.asarray(out, float), np.asarray(sizes, float)


def summary(r, sizes):
    return {
        "queries": len(r),
        "r_at_1": float(np.mean(r <= 1)),
        "r_at_5": float(np.mean(r <= 5)),
        "median_rank": float(np.median(r)),
        "chance_r_at_1": float(np.mean(1 / sizes)),
        "chance_r_at_5": float(np.mean(np.minimum(5, sizes) / sizes)),
        "chance_median_rank": float(np.median((sizes + 1) / 2)),
    }


def readout(x, rows):
    case = np.array([r["case"] for r in rows])
    plane = np.array([r["plane"] for r in rows])
    pos = np.array([r["position"] for r in rows], float)
    logo = LeaveOneGroupOut()
    pred = cross_val_predict(NearestCentroid(), x.astype(np.float64), plane, groups=case, cv=logo)
    err = np.zeros(len(rows))
    base = np.zeros(len(rows))
    for p in np.unique(plane):
        m = plane == p
        xp, yp, gp = x[m].astype(np.float64), pos[m], case[m]
        err[m] = np.abs(cross_val_predict(KNeighborsRegressor(5), xp, yp, groups=gp, cv=logo) - yp)
        for g in np.unique(gp):
            k = gp == g
            base[np.flatnonzero(m)[k]] = np.abs(yp[~k].mean() - yp[k])
    counts = np.unique(plane, return_counts=True)[1]
    return {
        "plane_accuracy": float(np.mean(pred == plane)),
        "plane_majority": float(counts.max() / counts.sum()),
        "position_mae": float(err.mean()),
        "position_baseline_mae": float(base.mean()),
    }


def main(dump, target):
    dump = Path(dump)
    rows = json.loads((dump / "rows.json").read_text())
    x = np.load(dump / f"x_{target}.npy").astype(np.float64)
    y = np.load(dump / f"y_{target}.npy").astype(np.float64)
    n = len(rows)
    sim = x @ y.T
    labels = np.arange(n)
    top = {k: float(top_k_accuracy_score(labels, sim, k=k, labels=labels)) for k in (1, 5)}
    r_all, s_all = ranks(sim, [np.arange(n)] * n)
    key = [(r["plane"], r["bin"]) for r in rows]
    case = [r["case"] for r in rows]
    cols = [np.array([j for j in range(n) if j == i or (key[j] == key[i] and case[j] != case[i])]) for i in range(n)]
    r_grp, s_grp = ranks(sim, cols)
    on = float(np.mean(np.diag(sim)))
    off = float((sim.sum() - np.trace(sim)) / (n * (n - 1)))
    print(json.dumps({
        "top_k_accuracy": top,
        "retrieval_all": summary(r_all, s_all),
        "retrieval_same_plane_bin": summary(r_grp, s_grp),
        "modality_gap": float(np.linalg.norm(x.mean(0) - y.mean(0))),
        "matched_cosine": on,
        "unmatched_cosine": off,
        "readout_3d": readout(x, rows),
        "readout_targets": readout(y, rows),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
