"""`med3d finetune` writes weights MONAI loads as they are: a segmentation
run's model.safetensors into monai.networks.nets.SwinUNETR(out_channels =
num_classes) with strict=True, and an export saved by MONAI (its
state_dict in safetensors plus a model card) is accepted by --init."""
import json

import torch
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file, save_file

from conftest import DEMO, med3d


def test_monai_export_in_and_finetuned_weights_out(binary, tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "m.yaml").write_text(
        "name: t\nmodality: MR\ncases:\n"
        f"  - id: mni\n    image: {DEMO / 'mni152_t1.nii.gz'}\n    label: {DEMO / 'mni152_tissue.nii.gz'}\n"
    )
    (tmp_path / "e.yaml").write_text(
        f"name: t\nmanifest: m.yaml\nworkdir: {tmp_path / 'work'}\n"
        "preprocess: {spacing: [4.0, 4.0, 4.0], roi: [64, 48, 48], roi_mode: crop_pad, slices_per_plane: 1}\n"
        "downstream:\n  task: segmentation\n  num_classes: 3\n  backbone: {feature_size: 12}\n"
        "  patch_size: [64, 32, 32]\n  batch_size: 1\n  steps: 1\n  device: cpu\n  threads: 1\n"
    )
    torch.manual_seed(0)
    monai_net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    export = tmp_path / "monai.safetensors"
    save_file({k: v.contiguous() for k, v in monai_net.state_dict().items()}, export)
    (tmp_path / "monai.card.json").write_text(json.dumps(
        {"variant": "full", "backbone": {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24],
                                         "use_v2": False}}))
    run = tmp_path / "run"
    out = med3d("finetune", "--init", export, "--manifest", tmp_path / "m.yaml", "--cache", tmp_path / "cache",
                "--config", tmp_path / "e.yaml", "--out", run).stdout
    assert "not loaded" not in out, out  # same head size: everything loads

    tuned = load_file(run / "model.safetensors")
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    net.load_state_dict(tuned, strict=True)
    # One step moved the weights away from the export's, all of them named alike.
    before = monai_net.state_dict()
    moved = [k for k in tuned if tuned[k].dtype.is_floating_point and not torch.equal(tuned[k], before[k])]
    assert "out.conv.conv.weight" in moved and "swinViT.patch_embed.proj.weight" in moved
