"""Make the nnU-Net plans files the tests and the nnU-Net preset use.

nnU-Net's own planners write them (nothing here is hand-made except the
derived tiny plans, see below): the brain-tissue dataset (make brain-tissue:
9 training volumes, 99 x 117 x 95 at 2 mm, 4 classes) is laid out as an
nnU-Net raw dataset (Dataset990_BrainTissue: imagesTr/<case>_0000.nii.gz,
labelsTr/<case>.nii.gz, dataset.json), then

    nnUNetv2_extract_fingerprint -d 990
    nnUNetv2_plan_experiment -d 990                           -> nnUNetPlans.json (PlainConvUNet)
    nnUNetv2_plan_experiment -d 990 -pl nnUNetPlannerResEncM  -> nnUNetResEncUNetMPlans.json

run through nnunetv2's Python entry points with nnUNet_raw /
nnUNet_preprocessed in a temporary folder. The two plans files are copied
to OUT.

`tiny_ResEncUNetPlans.json` is derived from the ResEnc M plans, for
pretraining tests on a 2-core CPU: the same keys and classes, with 3
stages of 4 / 8 / 16 features, 1 / 2 / 2 residual blocks, and one
anisotropic stage (kernel [1, 3, 3], stride [1, 2, 2]) so that per-axis
strides and kernels are exercised; its 3d_fullres patch size is
[16, 32, 32]. Its plans_name is "tinyResEncUNetPlans".

`nnUNetResEncUNetMPlans_quarter.json` (for experiments/brain-tissue-resenc.yaml,
a CPU-sized experiment): the ResEnc M plans with every stage's features
divided by 4 ([8, 16, 32, 64, 80]; stages, blocks, kernels, strides as
planned), plans_name "nnUNetResEncUNetMPlans_quarter"; written to
PRESET_DIR when given.

usage: make_nnunet_plans.py BRAIN_TISSUE_DIR OUT_DIR [PRESET_DIR]
"""
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "dataset.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw" / "Dataset990_BrainTissue"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir(parents=True)
        for case in meta["train"]:
            shutil.copy(src / "images" / f"{case}.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copy(src / "labels" / f"{case}.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
        labels = {v: int(k) for k, v in meta["labels"].items()}
        (raw / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "T1"},
            "labels": labels,
            "numTraining": len(meta["train"]),
            "file_ending": ".nii.gz",
        }, indent=1))
        os.environ["nnUNet_raw"] = str(tmp / "raw")
        os.environ["nnUNet_preprocessed"] = str(tmp / "preprocessed")
        os.environ["nnUNet_results"] = str(tmp / "results")
        # nnunetv2 reads the folders at import time.
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints, plan_experiments)
        extract_fingerprints([990], num_processes=1, check_dataset_integrity=True)
        plan_experiments([990])
        plan_experiments([990], experiment_planner_class_name="nnUNetPlannerResEncM")
        pre = tmp / "preprocessed" / "Dataset990_BrainTissue"
        for name in ["nnUNetPlans.json", "nnUNetResEncUNetMPlans.json"]:
            shutil.copy(pre / name, out / name)

    plans = json.loads((out / "nnUNetResEncUNetMPlans.json").read_text())
    tiny = copy.deepcopy(plans)
    tiny["plans_name"] = "tinyResEncUNetPlans"
    c = tiny["configurations"]["3d_fullres"]
    k = c["architecture"]["arch_kwargs"]
    k["n_stages"] = 3
    k["features_per_stage"] = [4, 8, 16]
    k["kernel_sizes"] = [[3, 3, 3], [1, 3, 3], [3, 3, 3]]
    k["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    k["n_blocks_per_stage"] = [1, 2, 2]
    k["n_conv_per_stage_decoder"] = [1, 1]
    c["patch_size"] = [16, 32, 32]
    c["batch_size"] = 2
    # the other configurations inherit nothing the tests read
    tiny["configurations"] = {"3d_fullres": c}
    (out / "tiny_ResEncUNetPlans.json").write_text(json.dumps(tiny, indent=4))
    if len(sys.argv) > 3:
        preset = Path(sys.argv[3])
        preset.mkdir(parents=True, exist_ok=True)
        q = copy.deepcopy(plans)
        q["plans_name"] = "nnUNetResEncUNetMPlans_quarter"
        for c in q["configurations"].values():
            kw = c.get("architecture", {}).get("arch_kwargs")
            if kw:
                kw["features_per_stage"] = [f // 4 for f in kw["features_per_stage"]]
        (preset / "nnUNetResEncUNetMPlans_quarter.json").write_text(json.dumps(q, indent=4))
    for name in sorted(p.name for p in out.glob("*.json")):
        arch = json.loads((out / name).read_text())["configurations"]["3d_fullres"]["architecture"]
        kw = arch["arch_kwargs"]
        print(f"{name}: {arch['network_class_name'].rsplit('.', 1)[-1]}, "
              f"features {kw['features_per_stage']}, strides {kw['strides']}")


if __name__ == "__main__":
    main()
