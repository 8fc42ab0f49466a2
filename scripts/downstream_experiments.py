#!/usr/bin/env python3
"""The two downstream experiments of docs/experiments.md, driven through the real
`med3d` binary (each step is an ordinary med3d command; nothing is done here
but writing derived configs, calling med3d and reading its JSON reports).

1. Pretrained vs from scratch: one pretraining run (the base config's
   partial OT), exported to MONAI SwinUNETR; then fine-tuning from that
   export and from random weights with the same budget, for each of the
   fine-tuning seeds; Dice and HD95 on the held-out test volumes.
2. Caption noise: pretraining with 0%, 20%, 40% of the slices given the
   caption embeddings of random other slices (`pretrain.target_noise`), with
   partial OT and with InfoNCE; each fine-tuned from its export (seed 0 ... ),
   same budget; Dice on the test volumes.

Writes <workdir>/experiments/results.json and results.md (the tables).
Usage: scripts/downstream_experiments.py [--config experiments/brain-tissue.yaml]
       [--seeds 0 1 2] [--noise 0 0.2 0.4] [--noise-seeds 0] [--only pvs|noise]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def med3d(*args):
    exe = os.environ.get("MED3D_BIN", str(ROOT / "target/release/med3d"))
    cmd = [exe, *map(str, args)]
    print("+ " + " ".join(cmd), flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"med3d {args[0]} failed (exit {r.returncode}): {' '.join(cmd)}")
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def write_config(cfg, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def evaluate(run, test_cache, config):
    out = run / "evaluate.json"
    if not out.is_file():
        med3d("evaluate", "--run", run, "--cache", test_cache, "--config", config, "--out", out)
    return json.loads(out.read_text())


def finetune(init, cache, config, out):
    if not (out / "finetune.json").is_file():
        med3d("finetune", "--init", init, "--cache", cache, "--config", config, "--out", out)


def pretrain_and_export(config, cache, run, nnunet=False):
    """Pretrains and exports the whole network in its backbone's format:
    MONAI SwinUNETR, or nnU-Net's checkpoint layout for an nnU-Net backbone."""
    fmt, name = ("nnunet", "nnunet_pretrained.pth") if nnunet else ("monai-swinunetr", "swinunetr.safetensors")
    out = run / "export" / name
    if not out.is_file():
        med3d("pretrain", "--cache", cache, "--config", config, "--out", run, "--resume")
        med3d("export", "--run", run, "--format", fmt, "--out", out)
    return out


def mean_std(v):
    v = [x for x in v if x is not None]
    if not v:
        return (float("nan"), float("nan"))
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(ms, digits=3):
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/brain-tissue.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    ap.add_argument("--noise-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", choices=["pvs", "noise"])
    a = ap.parse_args()

    base_path = ROOT / a.config
    base = yaml.safe_load(base_path.read_text())
    nnunet = "nnunet" in (base["pretrain"].get("backbone") or {})
    work = ROOT / base["workdir"]
    exp_dir = work / "experiments"
    cache, test_cache = work / "cache", work / "cache_test"
    t0 = time.time()

    # Data: the training volumes (slices, captions, embeddings), the test volumes.
    med3d("preprocess", "--config", base_path, "--out", cache)
    med3d("caption", "--config", base_path, "--cache", cache)
    med3d("embed", "--config", base_path, "--cache", cache)
    med3d("preprocess", "--config", base_path, "--manifest", base["downstream"]["test_manifest"], "--out", test_cache)
    classes = None
    results = {"config": a.config, "seeds": a.seeds}

    def ft_config(seed, pretrain=None):
        c = copy.deepcopy(base)
        c["downstream"]["seed"] = seed
        if pretrain:
            c["pretrain"].update(pretrain)
        tag = f"ft-s{seed}" + "".join(f"-{k}{v}" for k, v in sorted((pretrain or {}).items()))
        return write_config(c, exp_dir / "configs" / f"{tag}.yaml")

    def pt_config(overrides):
        c = copy.deepcopy(base)
        for k, v in overrides.items():
            if k == "loss":
                c["pretrain"]["align"]["loss"] = v
            else:
                c["pretrain"][k] = v
        tag = "pt" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        return write_config(c, exp_dir / "configs" / f"{tag}.yaml"), tag

    # 1. pretrained vs scratch
    if a.only in (None, "pvs"):
        cfg, tag = pt_config({"loss": "pot", "target_noise": 0.0})
        export = pretrain_and_export(cfg, cache, exp_dir / "runs" / tag, nnunet)
        rows = {"pretrained": [], "scratch": []}
        for seed in a.seeds:
            fc = ft_config(seed)
            for name, init in (("pretrained", export), ("scratch", "scratch")):
                run = exp_dir / "finetune" / f"{name}-s{seed}"
                finetune(init, cache, fc, run)
                ev = evaluate(run, test_cache, fc)
                classes = ev["classes"]
                rows[name].append(ev)
        results["pretrained_vs_scratch"] = {
            name: {
                "mean_dice": [ev["mean"]["dice"] for ev in evs],
                "mean_hd95": [ev["mean"]["hd95"] for ev in evs],
                "class_dice": [ev["per_class"]["dice_mean"] for ev in evs],
            }
            for name, evs in rows.items()
        }

    # 2. caption noise x alignment loss
    if a.only in (None, "noise"):
        noise = {}
        for loss in ("pot", "infonce"):
            for frac in a.noise:
                cfg, tag = pt_config({"loss": loss, "target_noise": frac})
                export = pretrain_and_export(cfg, cache, exp_dir / "runs" / tag, nnunet)
                evs = []
                for seed in a.noise_seeds:
                    fc = ft_config(seed)
                    run = exp_dir / "finetune" / f"{tag}-s{seed}"
                    finetune(export, cache, fc, run)
                    evs.append(evaluate(run, test_cache, fc))
                    classes = evs[-1]["classes"]
                final = json.loads((exp_dir / "runs" / tag / "summary.json").read_text())
                noise[f"{loss}/{frac}"] = {
                    "loss": loss,
                    "noise": frac,
                    "mean_dice": [ev["mean"]["dice"] for ev in evs],
                    "mean_hd95": [ev["mean"]["hd95"] for ev in evs],
                    "pretrain_last_loss": final.get("last_loss"),
                }
        results["noise"] = noise

    results["classes"] = classes
    results["seconds"] = time.time() - t0
    (exp_dir / "results.json").write_text(json.dumps(results, indent=2))

    lines = [f"Test Dice / HD95 on {a.config} (mean ± std over fine-tuning seeds {a.seeds}):", ""]
    if "pretrained_vs_scratch" in results:
        names = ", ".join(str(c) for c in (classes or []))
        lines += [f"| init | mean Dice | mean HD95 (mm) | Dice per class ({names}) |", "|---|---|---|---|"]
        for name, r in results["pretrained_vs_scratch"].items():
            per_class = list(zip(*r["class_dice"]))
            pc = ", ".join(fmt(mean_std(list(v))) for v in per_class)
            lines.append(f"| {name} | {fmt(mean_std(r['mean_dice']))} | {fmt(mean_std(r['mean_hd95']), 2)} | {pc} |")
        lines.append("")
    if "noise" in results:
        lines += [
            f"Caption noise (fine-tuning seeds {a.noise_seeds}): test mean Dice",
            "",
            "| alignment | " + " | ".join(f"{int(f * 100)}% noise" for f in a.noise) + " |",
            "|---|" + "---|" * len(a.noise),
        ]
        for loss in ("pot", "infonce"):
            vals = [results["noise"][f"{loss}/{f}"]["mean_dice"] for f in a.noise]
            cells = [f"{v[0]:.3f}" if len(v) == 1 else fmt(mean_std(v)) for v in vals]
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"({results['seconds'] / 60:.1f} min; rerun: scripts/downstream_experiments.py --config {a.config})")
    text = "\n".join(lines)
    (exp_dir / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
