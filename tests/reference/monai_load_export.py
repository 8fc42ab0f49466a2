"""Loads med3d exports into MONAI strictly, for tests/export_monai.rs.

Usage: python monai_load_export.py DIR
Reads DIR/job.json: {"exports": {NAME: FILE.safetensors, ...}, "input": FILE}.
For each export, reads its card (FILE with .safetensors replaced by
.card.json), builds the class the card names (monai.networks.nets.SwinUNETR
or monai.networks.nets.swin_unetr.SwinTransformer) from the card's kwargs
alone, loads the file with load_state_dict(strict=True) and runs it in eval
mode on the "input" tensor. Writes DIR/monai_outputs.safetensors with
"NAME.hidden.0".."NAME.hidden.4" (the encoder's hidden states, normalised as
the card's forward_kwargs / SwinUNETR's normalize say) and, for SwinUNETR,
"NAME.logits".
"""
import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

d = Path(sys.argv[1])
job = json.loads((d / "job.json").read_text())
x = load_file(job["input"])["input"]
out = {}
for name, file in job["exports"].items():
    card = json.loads(Path(file).with_suffix(".card.json").read_text())
    module, cls = card["monai"]["class"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), cls)(**card["monai"]["kwargs"]).eval()
    model.load_state_dict(load_file(file), strict=True)
    with torch.no_grad():
        if cls == "SwinUNETR":
            hidden = model.swinViT(x, model.normalize)
            out[f"{name}.logits"] = model(x).contiguous()
        else:
            hidden = model(x, **card["monai"]["forward_kwargs"])
    for i, h in enumerate(hidden):
        out[f"{name}.hidden.{i}"] = h.contiguous()
save_file(out, str(d / "monai_outputs.safetensors"))
