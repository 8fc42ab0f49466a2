"""Reference trajectories of torch.optim.AdamW and torch.optim.Adam (L2
weight decay) with torch.nn.utils.clip_grad_norm_, for tests/pretrain_optim.rs.

Usage: torch_adamw.py OUT_DIR
Writes OUT_DIR/adam.npz with the initial parameters, the gradient of every
step, the learning rates, and for each optimiser the global gradient norm
before clipping and the parameters after every step.
"""
import sys

import numpy as np
import torch

STEPS = 6
LRS = [0.05, 0.1, 0.1, 0.07, 0.03, 0.01]
MAX_NORM = 1.5
BETAS = (0.9, 0.95)
EPS = 1e-6
WD = 0.1


def main(out):
    g = torch.Generator().manual_seed(0)
    init = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    # large early gradients so clipping is active on some steps only
    grads = [
        {k: torch.randn(v.shape, generator=g) * (3.0 if s < 2 else 0.3) for k, v in init.items()}
        for s in range(STEPS)
    ]
    arrays = {f"init.{k}": v.numpy() for k, v in init.items()}
    for s, gs in enumerate(grads):
        for k, v in gs.items():
            arrays[f"grad.{s}.{k}"] = v.numpy()
    arrays["lr"] = np.array(LRS, dtype=np.float64)
    for name, cls in [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)]:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        opt = cls(params.values(), lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
        norms = []
        for s in range(STEPS):
            for k, p in params.items():
                p.grad = grads[s][k].clone()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params.values(), MAX_NORM, foreach=False)))
            for group in opt.param_groups:
                group["lr"] = LRS[s]
            opt.step()
            for k, p in params.items():
                arrays[f"{name}.{s}.{k}"] = p.detach().numpy().copy()
        arrays[f"{name}.norm"] = np.array(norms, dtype=np.float64)
    np.savez(f"{out}/adam.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
