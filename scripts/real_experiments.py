#!/usr/bin/env python3
"""The experiment on real scans (`make experiment-real`), every step an
ordinary med3d command; this script only writes derived manifests and
configs, calls med3d and reads its JSON reports.

1. Pretraining corpus: every volume of data/real/pretrain.yaml except the
   subjects of the labelled sets (--sets), so that no test subject is seen
   unlabelled either. Descriptor captions, MiniLM embeddings.
2. Pretraining runs, same budget and seed: reconstruction only (the
   visual-only SSL baseline: weights.text 0), partial OT, InfoNCE, partial
   OT without PSAT (pooled head), and partial OT / InfoNCE with 20% and 40%
   of the slices given another slice's caption (`target_noise`).
3. Alignment metrics of every run (`med3d evaluate-alignment`) on the
   held-out subjects' volumes, against their descriptor captions and
   against the same captions with the plane and position words left out
   (`caption.descriptor.plane_and_position: false`, `embed --out`).
4. Fine-tuning on each labelled set with leave-one-subject-out folds: from
   scratch and from the reconstruction-only, partial-OT and InfoNCE exports,
   the same budget, for each fine-tuning seed; Dice on the held-out subject.

Writes <workdir>/experiments/results.json and results.md.
Usage: scripts/real_experiments.py [--config experiments/real.yaml]
       [--sets brainmask lesions] [--seeds 0 1 2]
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from downstream_experiments import ROOT, med3d, write_config

REAL = ROOT / "data" / "real"


def manifest(name, cases, path, labelled=True):
    lines = [f"name: {name}", "cases:"]
    for c in cases:
        lines += [f"  - id: {c['id']}", f"    image: {c['image']}", f"    modality: {c['modality']}"]
        if labelled and c.get("label"):
            lines.append(f"    label: {c['label']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def json_of(path):
    return json.loads(Path(path).read_text())


def mean_std(v):
    v = [x for x in v if x is not None]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(v, digits=3):
    m, s = mean_std(v)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


RUNS = {
    # tag: (pretrain overrides)
    "recon": {"weights": {"text": 0.0, "image": 0.0, "recon": 1.0}},
    "pot": {"align": {"loss": "pot"}},
    "infonce": {"align": {"loss": "infonce"}},
    "pot-nopsat": {"align": {"loss": "pot"}, "head": "pool"},
    "pot-noise0.2": {"align": {"loss": "pot"}, "target_noise": 0.2},
    "pot-noise0.4": {"align": {"loss": "pot"}, "target_noise": 0.4},
    "infonce-noise0.2": {"align": {"loss": "infonce"}, "target_noise": 0.2},
    "infonce-noise0.4": {"align": {"loss": "infonce"}, "target_noise": 0.4},
}
FINETUNED = ["recon", "pot", "infonce"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/real.yaml")
    ap.add_argument("--sets", nargs="+", default=["brainmask", "lesions"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    a = ap.parse_args()
    t0 = time.time()
    base_path = ROOT / a.config
    base = yaml.safe_load(base_path.read_text())
    work = ROOT / base["workdir"]
    exp = work / "experiments"
    cfgs = exp / "configs"

    sets = {s: yaml.safe_load((REAL / f"{s}.yaml").read_text())["cases"] for s in a.sets}
    held = {c["id"] for cs in sets.values() for c in cs}
    corpus = [c for c in yaml.safe_load((REAL / "pretrain.yaml").read_text())["cases"] if c["id"] not in held]
    manifest("pretrain-heldout", corpus, ROOT / base["manifest"], labelled=False)
    # the held-out subjects' volumes, unlabelled, for the alignment metrics
    eval_cases = [c for cs in sets.values() for c in cs]
    eval_manifest = manifest("alignment-eval", eval_cases, work / "alignment-eval.yaml", labelled=False)

    content = copy.deepcopy(base)
    content.setdefault("caption", {})["descriptor"] = {"plane_and_position": False}
    content_cfg = write_config(content, cfgs / "captions-content.yaml")

    def captioned(cache, man):
        med3d("preprocess", "--config", base_path, "--manifest", man, "--out", cache)
        med3d("caption", "--config", base_path, "--cache", cache)
        med3d("embed", "--config", base_path, "--cache", cache)
        out = cache / "captions-content.jsonl"
        med3d("caption", "--config", content_cfg, "--cache", cache, "--out", out)
        med3d("embed", "--config", base_path, "--cache", cache, "--captions", out, "--out", cache / "embeddings-content")

    cache, eval_cache = work / "cache", work / "cache_eval"
    captioned(cache, ROOT / base["manifest"])
    captioned(eval_cache, eval_manifest)

    # 2-3. pretraining runs and their alignment metrics
    alignment = {}
    exports = {}
    for tag in a.runs:
        c = copy.deepcopy(base)
        for k, v in RUNS[tag].items():
            if isinstance(v, dict):
                c["pretrain"].setdefault(k, {}).update(v)
            else:
                c["pretrain"][k] = v
        cfg = write_config(c, cfgs / f"pt-{tag}.yaml")
        run = exp / "runs" / tag
        med3d("pretrain", "--cache", cache, "--config", cfg, "--out", run, "--resume")
        rep = {}
        for kind, tables in (("captions", eval_cache / "embeddings"), ("content", eval_cache / "embeddings-content")):
            out = run / f"alignment-{kind}.json"
            if not out.is_file():
                med3d("evaluate-alignment", "--run", run, "--cache", eval_cache, "--embeddings", tables, "--out", out)
            rep[kind] = json_of(out)["targets"][0]
        alignment[tag] = rep
        if tag in FINETUNED:
            e = run / "export" / "swinunetr.safetensors"
            if not e.is_file():
                med3d("export", "--run", run, "--format", "monai-swinunetr", "--out", e)
            exports[tag] = e

    # 4. leave-one-subject-out fine-tuning
    finetune = {}
    for s, cases in sets.items():
        rows = {name: [] for name in ["scratch", *[t for t in FINETUNED if t in exports]]}
        for test in cases:
            fold = exp / "folds" / s / test["id"]
            train_m = manifest(f"{s}-train", [c for c in cases if c["id"] != test["id"]], fold / "train.yaml")
            test_m = manifest(f"{s}-test", [test], fold / "test.yaml")
            tc, ec = fold / "cache", fold / "cache_test"
            med3d("preprocess", "--config", base_path, "--manifest", train_m, "--out", tc)
            med3d("preprocess", "--config", base_path, "--manifest", test_m, "--out", ec)
            for seed in a.seeds:
                c = copy.deepcopy(base)
                c["downstream"]["seed"] = seed
                fc = write_config(c, cfgs / f"ft-s{seed}.yaml")
                for name in rows:
                    init = "scratch" if name == "scratch" else exports[name]
                    out = fold / f"{name}-s{seed}"
                    if not (out / "finetune.json").is_file():
                        med3d("finetune", "--init", init, "--cache", tc, "--config", fc, "--out", out)
                    ev_path = out / "evaluate.json"
                    if not ev_path.is_file():
                        med3d("evaluate", "--run", out, "--cache", ec, "--config", fc, "--out", ev_path)
                    ev = json_of(ev_path)
                    rows[name].append({"subject": test["id"], "seed": seed, "dice": ev["mean"]["dice"]})
        finetune[s] = rows

    results = {"config": a.config, "seeds": a.seeds, "sets": a.sets, "corpus": [c["id"] for c in corpus],
               "alignment": alignment, "finetune": finetune, "seconds": time.time() - t0}
    (exp / "results.json").write_text(json.dumps(results, indent=2))
    (exp / "results.md").write_text(table(results) + "\n")
    print(table(results))


def table(r):
    lines = [f"Pretraining corpus ({len(r['corpus'])} volumes): {', '.join(r['corpus'])}", ""]
    lines += [
        "Alignment on the held-out subjects' volumes (text target; chance in brackets; content = captions with the "
        "plane and position words left out):",
        "",
        "| run | R@1 all | median rank all | R@1 same plane+bin | R@1 same plane+bin, content | median rank all, content "
        "| modality gap | plane acc. (3D) | position MAE (3D; baseline) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, rep in r["alignment"].items():
        c, k = rep["captions"], rep["content"]
        ra, rg, ka, kg = (c["retrieval_all"], c["retrieval_same_plane_bin"], k["retrieval_all"], k["retrieval_same_plane_bin"])
        ro = c["readout_3d"]
        lines.append(
            f"| {tag} | {ra['r_at_1']:.3f} ({ra['chance_r_at_1']:.3f}) | {ra['median_rank']:.1f} ({ra['chance_median_rank']:.1f}) "
            f"| {rg['r_at_1']:.3f} ({rg['chance_r_at_1']:.3f}) | {kg['r_at_1']:.3f} ({kg['chance_r_at_1']:.3f}) "
            f"| {ka['median_rank']:.1f} ({ka['chance_median_rank']:.1f}) | {c['modality_gap']:.3f} | {ro['plane_accuracy']:.3f} "
            f"| {ro['position_mae']:.3f} ({ro['position_baseline_mae']:.3f}) |"
        )
    lines.append("")
    for s, rows in r["finetune"].items():
        n = len(rows["scratch"])
        lines += [
            f"Fine-tuning on `{s}` (leave one subject out; mean Dice of the held-out subject, mean ± std over "
            f"{n} fold x seed runs; paired = same fold and seed minus scratch):",
            "",
            "| init | mean Dice | paired difference vs scratch | per subject (mean over seeds) |",
            "|---|---|---|---|",
        ]
        subjects = list(dict.fromkeys(x["subject"] for x in rows["scratch"]))
        for name, v in rows.items():
            d = [x["dice"] for x in v]
            diff = [x["dice"] - y["dice"] for x, y in zip(v, rows["scratch"])] if name != "scratch" else None
            per = ", ".join(f"{sub} {statistics.fmean([x['dice'] for x in v if x['subject'] == sub]):.3f}" for sub in subjects)
            lines.append(f"| {name} | {fmt(d)} | {fmt(diff) if diff else '-'} | {per} |")
        lines.append("")
    lines.append(f"({r['seconds'] / 60:.1f} min; rerun: make experiment-real)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # the tables again from a results.json
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
