"""Reference outputs from MONAI's SwinUNETR for tests/swin_unetr_parity.rs.

Usage: python monai_swin_unetr.py DIR
Reads DIR/cases.json: [{"name", "seed", "input_shape", "kwargs", "float64",
"ours"}], where kwargs are SwinUNETR's constructor arguments. For each case:

- builds SwinUNETR(**kwargs) under torch.manual_seed(seed), then moves the
  LayerNorm affines off (1, 0) and draws the relative-position bias tables
  with std 1 (MONAI's init leaves both nearly inert, which would let a wrong
  norm or bias index go unnoticed);
- writes DIR/<name>.monai.safetensors (the state dict, buffers included) and
  DIR/<name>.ref.safetensors holding "input", "hidden.0".."hidden.4"
  (swinViT(x, normalize)), "decoder" (decoder1's output) and "logits", in
  float32, and with an "f64." prefix recomputed in float64 if "float64";
- loads DIR/<ours> (a state dict written by med3d) into a fresh
  SwinUNETR(**kwargs) with load_state_dict(strict=True), runs it on the
  "input" tensor of DIR/<name>.ours_input.safetensors and writes "logits",
  "decoder" and "hidden.*" to DIR/<name>.reverse.safetensors.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from monai.networks.nets import SwinUNETR

# Small tensors on a shared 2-core machine: one thread is fastest.
torch.set_num_threads(1)


def run(model, x):
    feats = {}
    hook = model.decoder1.register_forward_hook(lambda m, i, o: feats.__setitem__("decoder", o))
    with torch.no_grad():
        hidden = model.swinViT(x, model.normalize)
        logits = model(x)
    hook.remove()
    out = {f"hidden.{i}": h.contiguous() for i, h in enumerate(hidden)}
    out["decoder"] = feats["decoder"].contiguous()
    out["logits"] = logits.contiguous()
    return out


d = Path(sys.argv[1])
for case in json.loads((d / "cases.json").read_text()):
    name, kwargs = case["name"], case["kwargs"]
    torch.manual_seed(case["seed"])
    model = SwinUNETR(**kwargs).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "relative_position_bias_table" in key:
                p.copy_(torch.randn_like(p))
            elif "norm" in key and key.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "norm" in key and key.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / f"{name}.monai.safetensors"))
    x = torch.randn(case["input_shape"])
    ref = {"input": x, **run(model, x)}
    if case.get("float64"):
        ref.update({f"f64.{k}": v for k, v in run(model.double(), x.double()).items()})
    save_file(ref, str(d / f"{name}.ref.safetensors"))

    ours = SwinUNETR(**kwargs).eval()
    ours.load_state_dict(load_file(str(d / case["ours"])), strict=True)
    x_ours = load_file(str(d / f"{name}.ours_input.safetensors"))["input"]
    save_file(run(ours, x_ours), str(d / f"{name}.reverse.safetensors"))
