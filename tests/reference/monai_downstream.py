"""MONAI (and sklearn) reference values for tests/downstream_parity.rs.

    python monai_downstream.py metrics|auc|loss|sliding OUT_DIR

Each mode writes its inputs as OUT_DIR/<mode>.safetensors and the reference
results as OUT_DIR/<mode>.json; the Rust test recomputes them with med3d.
"""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def one_hot(lab, n):
    t = torch.as_tensor(lab.astype(np.int64))
    return torch.nn.functional.one_hot(t, n).permute(3, 0, 1, 2)[None].float()


def finite(v):
    v = float(v)
    return None if np.isnan(v) else ("inf" if np.isinf(v) else v)


def metrics(out):
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from scipy.ndimage import binary_erosion

    gt = np.asarray(nib.load(ROOT / "data/demo/mni152_tissue.nii.gz").dataobj).astype(np.uint8)[::2, ::2, ::2]
    gt = np.ascontiguousarray(gt)
    # a: shifted by 2 voxels along x, class 2 eroded twice.
    a = np.roll(gt, 2, axis=0)
    c2 = a == 2
    a[c2 & ~binary_erosion(c2, iterations=2)] = 0
    # b: class 1 dropped from the prediction (HD inf, Dice 0), class 3
    # predicted where the truth has none (Dice nan, HD inf), class 4 in
    # neither (Dice nan, HD nan).
    b = gt.copy()
    b[b == 1] = 0
    b[20:30, 30:40, 20:30] = 3
    n = 5
    spacing = [2.0, 1.5, 1.0]
    res = {"spacing": spacing, "num_classes": n}
    for name, pred in [("a", a), ("b", b)]:
        yp, y = one_hot(pred, n), one_hot(gt, n)
        dice = DiceMetric(include_background=False, reduction="none")(yp, y)[0]
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(yp, y, spacing=spacing)[0]
        res[name] = {"dice": [finite(v) for v in dice], "hd95": [finite(v) for v in hd]}
    save_file({"gt": torch.from_numpy(gt), "a": torch.from_numpy(a), "b": torch.from_numpy(b)}, out / "metrics.safetensors")
    (out / "metrics.json").write_text(json.dumps(res))


def auc(out):
    from monai.metrics import ROCAUCMetric
    from sklearn.metrics import roc_auc_score

    g = np.random.default_rng(7)
    res = {}
    tensors = {}
    for n_cls, n in [(2, 30), (3, 41)]:
        p = g.dirichlet(np.ones(n_cls), size=n)
        p = np.round(p, 1)  # ties
        y = g.integers(0, n_cls, size=n)
        m = ROCAUCMetric(average="macro")
        m(torch.as_tensor(p), torch.nn.functional.one_hot(torch.as_tensor(y), n_cls))
        per = [roc_auc_score(y == c, p[:, c]) for c in range(n_cls)]
        res[str(n_cls)] = {"monai": float(m.aggregate()), "sklearn_per_class": per}
        tensors[f"p{n_cls}"] = torch.as_tensor(p)
        tensors[f"y{n_cls}"] = torch.as_tensor(y)
    save_file(tensors, out / "auc.safetensors")
    (out / "auc.json").write_text(json.dumps(res))


def loss(out):
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 9, 7, 8, generator=g) * 3
    labels = torch.randint(0, 4, (2, 1, 9, 7, 8), generator=g)
    labels[1][labels[1] == 3] = 0  # a class absent from one item
    fn = DiceCELoss(to_onehot_y=True, softmax=True)
    value = fn(logits, labels)
    save_file({"logits": logits, "labels": labels}, out / "loss.safetensors")
    (out / "loss.json").write_text(json.dumps({"dice_ce": float(value), "dice": float(fn.dice(logits, labels)),
                                               "ce": float(fn.ce(logits, labels))}))


def window_fn(x):
    # Depends on where the window is, so the blending is exercised.
    return torch.cat([x.cumsum(2) / 10, x.flip(3) * x.mean(dim=(1, 2, 3, 4), keepdim=True) + 1], 1)


def sliding(out):
    from monai.inferers import sliding_window_inference

    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 45, 50, 20, generator=g)
    cases = [
        {"roi": [32, 24, 32], "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 3},
        {"roi": [32, 24, 16], "overlap": 0.25, "mode": "constant", "sw_batch_size": 1},
        {"roi": [16, 32, 16], "overlap": 0.6, "mode": "gaussian", "sw_batch_size": 2},
    ]
    tensors = {"x": x}
    for i, c in enumerate(cases):
        y = sliding_window_inference(x, c["roi"], c["sw_batch_size"], window_fn, overlap=c["overlap"], mode=c["mode"])
        tensors[f"y{i}"] = (y.as_tensor() if hasattr(y, "as_tensor") else y).contiguous()
    save_file(tensors, out / "sliding.safetensors")
    (out / "sliding.json").write_text(json.dumps(cases))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"metrics": metrics, "auc": auc, "loss": loss, "sliding": sliding}[mode](out)
