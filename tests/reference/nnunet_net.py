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
  python nnunet_net.py nnssl-check PLANS CONFIG EXPORT SPACING PATCH
      torch.load(EXPORT, weights_only=True) must be nnssl's checkpoint dict:
      "network_weights" and "nnssl_adaptation_plan" with every field nnssl
      writes and nnU-Net's pretrained fine-tuning reads, checked against
      the plans and against SPACING and PATCH (what pretraining used, in
      med3d's x,y,z order, comma-separated); the network nnunetv2 builds
      from the plan's own architecture_plans (by nnssl's short class name)
      takes the plan's encoder and stem prefixes strictly, as nnU-Net's
      pretrained trainer loads them, and load_pretrained_weights takes the
      whole file.
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
    elif mode == "nnssl-check":
        plans_path, config, export, spacing, patch = sys.argv[2:7]
        saved = torch.load(export, weights_only=True)
        assert set(saved) == {"network_weights", "nnssl_adaptation_plan"}, list(saved)
        weights, plan = saved["network_weights"], saved["nnssl_adaptation_plan"]
        json.dumps(plan)  # plain values only
        want_keys = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                     "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                     "key_to_lpe"}
        assert set(plan) == want_keys, sorted(plan)
        plans = json.loads(Path(plans_path).read_text())
        cm = PlansManager(plans_path).get_configuration(config)
        arch = cm.configuration["architecture"]
        ap = plan["architecture_plans"]
        assert set(ap) == {"arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import"}, sorted(ap)
        assert arch["network_class_name"].split(".")[-1] == ap["arch_class_name"] == "ResidualEncoderUNet"
        assert ap["arch_kwargs"] == arch["arch_kwargs"]
        assert ap["arch_kwargs_requiring_import"] == arch["_kw_requires_import"]
        pp = plan["pretrain_plan"]
        want_pp = {"dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
                   "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used"}
        assert set(pp) == want_pp, sorted(pp)
        assert (pp["dataset_name"], pp["plans_name"]) == (plans["dataset_name"], plans["plans_name"])
        tf = plans.get("transpose_forward", [0, 1, 2])
        assert pp["transpose_forward"] == tf
        assert [tf[i] for i in pp["transpose_backward"]] == [0, 1, 2]
        assert list(pp["configurations"]) == [config]
        c = pp["configurations"][config]
        assert c["spacing_style"] in ("onemmiso", "median", "noresample")
        # med3d's x, y, z -> nnU-Net's axes: network axis i is volume axis 2 - tf[i]
        sp = [float(v) for v in spacing.split(",")]
        pa = [int(v) for v in patch.split(",")]
        assert c["spacing"] == [sp[2 - t] for t in tf], (c["spacing"], sp, tf)
        assert c["patch_size"] == [pa[2 - t] for t in tf], (c["patch_size"], pa, tf)
        assert c["normalization_schemes"] == cm.normalization_schemes
        assert plan["recommended_downstream_patchsize"] == list(cm.patch_size)
        assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
        for k in plan["keys_to_in_proj"]:
            assert k + ".weight" in weights, k
        # as nnU-Net's pretrained trainer: the network from the plan's own
        # architecture, encoder stages and stem loaded strictly
        net = get_network_from_plans(ap["arch_class_name"], ap["arch_kwargs"], ap["arch_kwargs_requiring_import"],
                                     plan["pretrain_num_input_channels"], 3, allow_init=True,
                                     deep_supervision=False)
        for prefix, module in ((plan["key_to_encoder"], net.encoder.stages), (plan["key_to_stem"], net.encoder.stem)):
            part = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
            assert part, prefix
            module.load_state_dict(part, strict=True)
            for k, v in module.state_dict().items():
                assert torch.equal(v, part[k]), prefix + "." + k
        whole = build(plans_path, config, 3)
        load_pretrained_weights(whole, export, verbose=False)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
