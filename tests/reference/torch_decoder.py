"""Reference for tests/psat_parity.rs: torch.nn.TransformerDecoder (post-norm,
batch_first, relu, final LayerNorm) with seeded random weights, in eval mode.

Usage: python torch_decoder.py DIR DIM HEADS FFN LAYERS
Writes DIR/decoder.safetensors (keys prefixed "decoder."), DIR/queries.npy,
DIR/memory.npy, DIR/out.npy.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
d = Path(sys.argv[1])
dim, heads, ffn, layers = map(int, sys.argv[2:6])
torch.manual_seed(0)
layer = torch.nn.TransformerDecoderLayer(dim, heads, ffn, dropout=0.1, batch_first=True)
dec = torch.nn.TransformerDecoder(layer, layers, norm=torch.nn.LayerNorm(dim)).eval()
with torch.no_grad():
    for p in dec.parameters():  # non-trivial norms and biases too
        p.add_(torch.randn_like(p) * 0.05)
q = torch.randn(3, 7, dim)
m = torch.randn(3, 11, dim)
with torch.no_grad():
    out = dec(q, m)
save_file({f"decoder.{k}": v.contiguous() for k, v in dec.state_dict().items()}, str(d / "decoder.safetensors"))
np.save(d / "queries.npy", q.numpy())
np.save(d / "memory.npy", m.numpy())
np.save(d / "out.npy", out.numpy())
