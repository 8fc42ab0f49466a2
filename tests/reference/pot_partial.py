"""Reference plans and gradients from the POT library for tests/ot_parity.rs.

Usage: python pot_partial.py DIR
Reads DIR/cases.json: [{"name", "cost": "<file.npy>", "reg", "mass"}]; for
each case writes DIR/<name>.plan.npy (ot.partial.entropic_partial_wasserstein,
numpy backend, float64, default 1000 iterations) and DIR/<name>.grad.npy
(d/dC of L = -sum_i log(pi_ii) / B through POT's torch backend under
autograd), plus DIR/<name>.plan32.npy (the numpy solver in float32, for the
underflow comparison).
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import ot
import torch

# Small matrices: one thread is fastest, and many threads on a loaded
# 2-core machine are 25x slower.
torch.set_num_threads(1)

d = Path(sys.argv[1])
cases = json.loads((d / "cases.json").read_text())
for c in cases:
    C = np.load(d / c["cost"]).astype(np.float64)
    B = C.shape[0]
    a = np.full(B, 1.0 / B)
    plan = ot.partial.entropic_partial_wasserstein(a, a, C, reg=c["reg"], m=c["mass"])
    np.save(d / f"{c['name']}.plan.npy", plan)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        a32 = a.astype(np.float32)
        plan32 = ot.partial.entropic_partial_wasserstein(a32, a32, C.astype(np.float32), reg=c["reg"], m=c["mass"])
    np.save(d / f"{c['name']}.plan32.npy", np.asarray(plan32, dtype=np.float64))
    Ct = torch.tensor(C, requires_grad=True)
    at = torch.full((B,), 1.0 / B, dtype=torch.float64)
    pt = ot.partial.entropic_partial_wasserstein(at, at, Ct, reg=c["reg"], m=c["mass"])
    loss = -torch.log(torch.diagonal(pt)).sum() / B
    loss.backward()
    np.save(d / f"{c['name']}.grad.npy", Ct.grad.numpy())
