"""Why CPU training keeps the explicit window-attention path
(src/model/swin/transformer.rs): libtorch's scaled_dot_product_attention
against q k^T + bias + mask, softmax, @ v, on SwinUNETR's window batches
(demo model, 64^3 input, batch 4), with and without a gradient, one
thread, the same kernels med3d calls (med3d links this torch's libtorch).

    .venv/bin/python bench/attention_paths.py [--threads 1] [--reps 3]

Prints the best-of-reps milliseconds per case; the last line is the ratio
line (SDPA / explicit, per case). Nothing asserts on timings.
"""
import argparse
import time

import torch

# (windows x batch, heads, tokens per window, head dim, windows per volume):
# stage 1 to 3 of the demo SwinUNETR (feature_size 12) on 64^3 x 4
SHAPES = [(500, 3, 343, 4, 125), (32, 6, 343, 8, 8), (4, 12, 64, 16, 1)]


def run(bw, h, n, d, nw, grad, sdpa, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bw, h, n, d, generator=g, requires_grad=grad) for _ in range(3))
    bias = torch.randn(h, n, n, generator=g, requires_grad=grad)
    mask = torch.zeros(nw, n, n)
    mask[:, : n // 2, n // 2:] = -100.0
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            if sdpa:
                b = (bias.view(1, 1, h, n, n) + mask.reshape(1, nw, 1, n, n)).expand(bw // nw, nw, h, n, n)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=b.reshape(bw, h, n, n),
                                                                     scale=d ** -0.5)
            else:
                a = (q * d ** -0.5) @ k.transpose(-2, -1)
                bm = bias.unsqueeze(0) + mask.unsqueeze(1)
                a = (a.view(bw // nw, nw, h, n, n) + bm.unsqueeze(0)).view(-1, h, n, n)
                o = a.softmax(-1) @ v
            if grad:
                o.sum().backward()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ratios = []
    for shape in SHAPES:
        for grad in (False, True):
            s, e = run(*shape, grad, True, a.reps), run(*shape, grad, False, a.reps)
            label = f"{'x'.join(map(str, shape[:4]))} {'fwd+bwd' if grad else 'fwd, no grad'}"
            print(f"{label}: SDPA {s:.1f} ms, explicit {e:.1f} ms", flush=True)
            ratios.append(f"{label} {s / e:.2f}")
    print("ratio SDPA / explicit: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
