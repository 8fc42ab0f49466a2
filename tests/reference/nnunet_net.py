"""Reference side of tests/nnunet_parity.rs and tests/pretrain_nnunet.rs:
nnU-Net v2's networks, built by nnunetv2 itself from a plans file.

Usage:
  python nnunet_net.py build PLANS CONFIG CLASSES SEED SHAPE DIR
      nnunetv2.utilities.get_network_from_plans(...) from the plans'
      architecture (1 input channel, CLASSES outputs, deep supervision off,
      nnU-Net's own initialisation) under torch.manual_seed(SEED); then every
      parameter is moved off its init by a seeded perturbation (nnU-Net
      zeroes each residual block's last norm, which would leave conv1/conv2
      of every block untested). Writes DIR/ref.state.safetensors (the whole
      state dict, every key PyTorch lists, tensors copied so shared names
      are saved apart), DIR/ref.keys.json (the keys in order),
      DIR/ref.io.safetensors ("input", float32 of SHAPE like 1x1x32x32x32,
      and "logits").
  python nnunet_net.py check PLANS CONFIG CLASSES STATE INPUT OUT
      loads STATE (a state dict written by med3d, safetensors) into the
      network nnunetv2 builds with load_state_dict(strict=True), runs it
      on INPUT's "input" and writes "logits" to OUT.
  python nnunet_net.py nnunet-load PLANS CONFIG EXPORT INPUT OUT
      torch.load(EXPORT, weights_only=True) must be a dict whose
      "network_weights" is a state dict; nnU-Net's own
      load_pretrained_weights loads EXPORT into the network built for 3
      classes (seg_layers are skipped) and into one built for 1 class,
      whose seg_layers are then copied from the file; the latter's logits
      on INPUT's "input" go to OUT (with "bottleneck": the last encoder
      stage's output).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

torch.set_num_threads(1)


def build(plans, config, classes):
    cm = PlansManager(plans).get_configuration(config)
    return get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import, 1, classes,
        allow_init=True, deep_supervision=False).eval()


def main():
    mode = sys.argv[1]
    if mode == "build":
        plans, config, classes, seed, shape, out = sys.argv[2:8]
        torch.manual_seed(int(seed))
        net = build(plans, config, int(classes))
        g = torch.Generator().manual_seed(int(seed) + 1)
        with torch.no_grad():
            for name, p in net.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * noise)
                elif name.endswith("bias"):
                    p.copy_(0.1 * noise)
                else:
                    p.add_(0.2 * p.std().clamp_min(1e-3) * noise)
        out = Path(out)
        state = net.state_dict()
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, out / "ref.state.safetensors")
        (out / "ref.keys.json").write_text(json.dumps(list(state.keys())))
        x = torch.randn([int(s) for s in shape.split("x")], generator=g)
        with torch.no_grad():
            y = net(x)
        save_file({"input": x, "logits": y.contiguous()}, out / "ref.io.safetensors")
    elif mode == "check":
        plans, config, classes, state, inp, out = sys.argv[2:8]
        net = build(plans, config, int(classes))
        net.load_state_dict(load_file(state), strict=True)
        with torch.no_grad():
            y = net(load_file(inp)["input"])
        save_file({"logits": y.contiguous()}, out)
    elif mode == "nnunet-load":
        plans, config, export, inp, out = sys.argv[2:7]
        saved = torch.load(export, weights_only=True)
        assert isinstance(saved, dict) and "network_weights" in saved, type(saved)
        for k, v in saved["network_weights"].items():
            assert isinstance(v, torch.Tensor) and not v.requires_grad, k
        other = build(plans, config, 3)
        load_pretrained_weights(other, export, verbose=False)
        net = build(plans, config, 1)
        load_pretrained_weights(net, export, verbose=False)
        own = net.state_dict()
        for k, v in saved["network_weights"].items():
            if ".seg_layers." in k:
                own[k].copy_(v)
            else:
                assert torch.equal(own[k], v), k
        for k, v in other.state_dict().items():
            if ".seg_layers." not in k:
                assert torch.equal(v, saved["network_weights"][k]), k
        x = load_file(inp)["input"]
        with torch.no_grad():
            skips = net.encoder(x)
            y = net.decoder(skips)
        save_file({"logits": y.contiguous(), "bottleneck": skips[-1].contiguous()}, out)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
