#!/usr/bin/env python3
"""Fetches real multi-subject scans that registry packages ship, checks each
archive's sha256, and lays out their image files under OUT (data/real/).

    python scripts/fetch_real_data.py data/real

Sources (each archive is pinned by sha256; nothing else is downloaded):
- pyradiomics 3.1.0 source archive (BSD-3-Clause): data/{brain1,brain2,
  breast1,lung1,lung2}_{image,label}.nrrd: 2 brain MR with a tumour mask,
  1 breast MR, 2 chest CT (HU) with lesion masks; 5 patients. The sdist's
  metadata says 3.0.1a1, so pip refuses it by name: it is fetched by its
  PyPI file URL.
- slicerio 1.4.0 wheel (MIT): slicerio/data/CTChest4.nrrd (a chest CT) with
  Segmentation.seg.nrrd (7 segments: ribs, three spine parts, both lungs,
  tissue) and SegmentationOverlapping.seg.nrrd (the same, in two layers).

Each file's own sha256 is written to OUT/SHA256SUMS; a rerun with every
file present and matching downloads nothing.
"""
import hashlib
import io
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

SOURCES = [
    {
        "name": "pyradiomics",
        "url": "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz",
        "sha256": "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
        "licence": "BSD-3-Clause",
        "members": [
            f"pyradiomics-3.1.0/data/{c}_{k}.nrrd"
            for c in ("brain1", "brain2", "breast1", "lung1", "lung2")
            for k in ("image", "label")
        ],
    },
    {
        "name": "slicerio",
        "url": "https://files.pythonhosted.org/packages/42/b9/d8c40fc175c5ce3deff9210e40053db181e9d262756cd829a357be4f9a4c/slicerio-1.4.0-py3-none-any.whl",
        "sha256": "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
        "licence": "MIT",
        "members": [
            "slicerio/data/CTChest4.nrrd",
            "slicerio/data/Segmentation.seg.nrrd",
            "slicerio/data/SegmentationOverlapping.seg.nrrd",
        ],
    },
]


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def fetch(url, want):
    with urllib.request.urlopen(url, timeout=300) as r:
        data = r.read()
    got = sha256(data)
    if got != want:
        sys.exit(f"{url}: sha256 {got}, expected {want}: refusing it")
    return data


def members(name, data, wanted):
    if name.endswith(".whl") or data[:2] == b"PK":
        z = zipfile.ZipFile(io.BytesIO(data))
        return {m: z.read(m) for m in wanted}
    t = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    return {m: t.extractfile(m).read() for m in wanted}


def main(out):
    out = Path(out)
    sums = {}
    for src in SOURCES:
        dest = out / src["name"]
        targets = {m: dest / Path(m).name for m in src["members"]}
        if all(p.exists() for p in targets.values()) and (dest / ".sha256").exists():
            print(f"{src['name']}: present")
        else:
            data = fetch(src["url"], src["sha256"])
            dest.mkdir(parents=True, exist_ok=True)
            for m, b in members(src["url"], data, src["members"]).items():
                tmp = targets[m].with_suffix(targets[m].suffix + ".tmp")
                tmp.write_bytes(b)
                tmp.replace(targets[m])
            (dest / ".sha256").write_text(src["sha256"] + "\n")
            print(f"{src['name']}: {len(targets)} files from {src['url'].rsplit('/', 1)[1]} ({src['licence']})")
        for p in targets.values():
            sums[p.relative_to(out).as_posix()] = sha256(p.read_bytes())
    (out / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))
    write_manifests(out)


# (case id, image, label, modality): every real volume, with its label where there is one
CASES = [
    ("brain1", "pyradiomics/brain1_image.nrrd", "pyradiomics/brain1_label.nrrd", "MR"),
    ("brain2", "pyradiomics/brain2_image.nrrd", "pyradiomics/brain2_label.nrrd", "MR"),
    ("breast1", "pyradiomics/breast1_image.nrrd", "pyradiomics/breast1_label.nrrd", "MR"),
    ("lung1", "pyradiomics/lung1_image.nrrd", "pyradiomics/lung1_label.nrrd", "CT"),
    ("lung2", "pyradiomics/lung2_image.nrrd", "pyradiomics/lung2_label.nrrd", "CT"),
    ("ctchest4", "slicerio/CTChest4.nrrd", "slicerio/Segmentation.seg.nrrd", "CT"),
]


def write_manifests(out):
    """pretrain.yaml: every volume, unlabelled; lesions.yaml: pyradiomics'
    five patients with their lesion masks (class 1 vs background);
    chest.yaml: slicerio's chest CT with its 7-segment label map."""
    def manifest(name, cases, labelled):
        lines = [f"name: {name}", "cases:"]
        for cid, img, lab, mod in cases:
            lines.append(f"  - id: {cid}")
            lines.append(f"    image: {(out / img).resolve()}")
            lines.append(f"    modality: {mod}")
            if labelled:
                lines.append(f"    label: {(out / lab).resolve()}")
        (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")

    manifest("pretrain", CASES, False)
    manifest("lesions", [c for c in CASES if c[1].startswith("pyradiomics/")], True)
    manifest("chest", [c for c in CASES if c[0] == "ctchest4"], True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/real")
