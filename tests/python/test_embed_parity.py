"""The embed stage's encoders against their Python references, through the
real binary (`med3d encode`, hidden, and `med3d embed`):

- all-MiniLM-L6-v2 vs sentence-transformers on 58 sentences (radiology and
  not, non-ASCII, empty, past the 256-token context and BERT's 512
  positions): cosine >= 0.9999 each, and max |diff| <= 1e-5;
- BiomedCLIP's towers rebuilt by open_clip with random weights (and random
  norms and biases): PubMedBERT text tower (from a PyTorch .bin in a hub
  cache layout, and with the vocab.txt tokenizer) and ViT-B/16 image tower
  (from safetensors) vs open_clip's encode_text / encode_image: max |diff|
  <= 1e-4;
- the image preprocessing vs open_clip's eval transform (Pillow bicubic
  resize, centre crop, normalise) on upscaled, downscaled, non-square and
  RGB images: max |diff| <= 1e-6 (the same 8-bit pixels);
- `med3d embed` on a small cache: the table read with safetensors' own
  reader equals sentence-transformers row by row, invalid rows zero.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import med3d
from embed_refs import (
    BIOMEDCLIP_ID,
    CLIP_MEAN,
    CLIP_STD,
    SENTENCES,
    grey_pngs,
    hub_snapshot,
    minilm_dir,
    random_biomedclip,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def encode(tmp, kind, items, *args):
    inp = tmp / f"{kind}-in.json"
    out = tmp / f"{kind}-out.npy"
    inp.write_text(json.dumps([str(i) for i in items]))
    r = med3d("encode", "--kind", kind, "--input", inp, "--out", out, "--device", "cpu", *args)
    report = json.loads(r.stdout)
    assert report["count"] == len(items)
    return np.load(out)


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def test_minilm_matches_sentence_transformers(binary, tmp_path, st_model):
    assert len(SENTENCES) >= 50
    tok = st_model.tokenizer
    n_tokens = [len(tok(s, add_special_tokens=True)["input_ids"]) for s in SENTENCES]
    assert st_model.max_seq_length == 256
    assert sum(n > 256 for n in n_tokens) >= 3 and max(n_tokens) > 512, n_tokens

    ref = st_model.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    ours = encode(tmp_path, "text", SENTENCES, "--weights", minilm_dir(), "--batch-size", "16")
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    cos = cosines(ours, ref)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.9999, (cos.min(), SENTENCES[worst][:80])
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory):
    """Random BiomedCLIP: the full state dict as open_clip_pytorch_model.bin
    in a hub cache, and the image tower alone as safetensors in a folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("biomedclip")
    model, tokenizer, preprocess, bert_dir = random_biomedclip(root)
    sd = model.state_dict()
    assert any(k.startswith("text.transformer.encoder.layer.11.") for k in sd)
    assert "visual.head.proj.weight" in sd and "text.proj.2.weight" in sd
    cache = root / "hub"
    snap = hub_snapshot(cache, BIOMEDCLIP_ID)
    torch.save(sd, snap / "open_clip_pytorch_model.bin")
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        (snap / f).write_bytes((bert_dir / f).read_bytes())
    vis = root / "visual-only"
    vis.mkdir()
    save_file(
        {k: v.contiguous() for k, v in sd.items() if k.startswith("visual.")},
        str(vis / "open_clip_model.safetensors"),
    )
    return dict(model=model, tokenizer=tokenizer, preprocess=preprocess, cache=cache, snap=snap, visual=vis)


TOWER_TEXTS = [
    "Axial CT of the abdomen: liver, spleen and both kidneys.",
    "A coronal T2-weighted MRI slice of the brain.",
    "Bilateral   pleural\teffusions\n with atelectasis.",
    "Die Leber ist unauffällig.",
    "",
    ("Findings: no focal hepatic lesion; normal pancreas and spleen. " * 40),
]


def test_biomedclip_text_tower_matches_open_clip(binary, tmp_path, biomedclip):
    model, tokenizer = biomedclip["model"], biomedclip["tokenizer"]
    tokens = tokenizer(TOWER_TEXTS)
    assert tokens.shape == (len(TOWER_TEXTS), 256) and (tokens[-1] != 0).all()  # the long one fills the context
    with torch.no_grad():
        ref = model.encode_text(tokens).numpy()
    assert np.abs(ref).mean() > 0.05  # not a degenerate all-zero tower
    # Default hub id, resolved in the hub cache; weights from a PyTorch .bin.
    ours = encode(tmp_path, "text", TOWER_TEXTS, "--model", "biomedclip", "--hf-cache", biomedclip["cache"])
    assert ours.shape == (len(TOWER_TEXTS), 512)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, err
    # The same from vocab.txt (BERT WordPiece built in Rust).
    vocab = encode(
        tmp_path,
        "text",
        TOWER_TEXTS,
        "--model",
        "biomedclip",
        "--weights",
        biomedclip["snap"] / "open_clip_pytorch_model.bin",
        "--tokenizer",
        biomedclip["snap"] / "vocab.txt",
    )
    assert np.abs(vocab - ref).max() <= 1e-4, np.abs(vocab - ref).max()


PNG_SIZES = [(96, 96), (128, 128), (512, 512), (300, 200), (200, 301), (37, 50), (224, 224), (225, 227)]


def test_pixels_match_open_clip_preprocess(binary, tmp_path, biomedclip):
    paths = grey_pngs(tmp_path / "png", PNG_SIZES)
    rgb = tmp_path / "png" / "rgb.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), mode="RGB").save(rgb)
    paths.append(rgb)
    ref = np.stack([biomedclip["preprocess"](Image.open(p)).numpy() for p in paths])
    ours = encode(tmp_path, "pixels", paths)
    assert ours.shape == ref.shape == (len(paths), 3, 224, 224)
    err = np.abs(ours - ref).max()
    # One 8-bit step after normalisation is ~0.015: this is pixel-exact.
    assert err <= 1e-6, (err, [float(np.abs(o - r).max()) for o, r in zip(ours, ref)])


def test_biomedclip_image_tower_matches_open_clip(binary, tmp_path, biomedclip):
    paths = grey_pngs(tmp_path / "png", [(96, 96), (300, 200), (512, 512)], seed=1)
    model, preprocess = biomedclip["model"], biomedclip["preprocess"]
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths])).numpy()
    assert np.abs(ref).mean() > 0.05
    ours = encode(tmp_path, "image", paths, "--model", "biomedclip", "--weights", biomedclip["visual"])
    assert ours.shape == (len(paths), 512)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, err


def test_embed_stage_table_matches_sentence_transformers(binary, tmp_path, st_model):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    cache = tmp_path / "cache"
    cache.mkdir()
    ids = [f"c{k}/axial/{i}" for k in range(2) for i in range(5)]
    with open(cache / "index.jsonl", "w") as f:
        for k, sid in enumerate(ids):
            case, plane, idx = sid.split("/")
            row = dict(slice_id=sid, case=case, plane=plane, index=int(idx), position=k / 9, png=f"cases/{case}/slices/x.png")
            f.write(json.dumps(row) + "\n")
    texts = {sid: SENTENCES[k] for k, sid in enumerate(ids) if k % 3 != 1}
    with open(cache / "captions.jsonl", "w") as f:
        for k, sid in enumerate(ids):
            status = "ok" if sid in texts else ("dropped" if k % 2 else "failed")
            f.write(json.dumps(dict(slice_id=sid, status=status, text=texts.get(sid, "x"),
                                    prompt_hash="p", image_sha256="i")) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nmanifest: m.yaml\nworkdir: {tmp_path}\n"
        f"embed:\n  text:\n    model: minilm\n    weights: {minilm_dir()}\n  device: cpu\n  chunk_rows: 4\n  batch_size: 3\n"
    )
    r = med3d("embed", "--cache", cache, "--config", cfg)
    assert "text term alone" in r.stdout, r.stdout
    path = cache / "embeddings" / "text.safetensors"
    t = load_file(str(path))
    valid = np.array([sid in texts for sid in ids], dtype=np.uint8)
    np.testing.assert_array_equal(t["valid"], valid)
    ref = st_model.encode([texts[s] for s in ids if s in texts], convert_to_numpy=True)
    assert np.abs(t["embeddings"][valid == 1] - ref).max() <= 1e-5
    assert not t["embeddings"][valid == 0].any()
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    import hashlib

    sha = hashlib.sha256((minilm_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert meta["encoder"] == "minilm" and meta["weights_sha256"] == sha
    assert meta["rows"] == str(len(ids)) and meta["dim"] == "384" and meta["valid_rows"] == str(valid.sum())
    assert len(meta["captions_sha256"]) == 64 and meta["l2_normalized"] == "true"
