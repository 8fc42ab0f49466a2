//! The provenance hash that `med3d preprocess` records for a case's source,
//! now taken while the reader reads it (`volume::source`), equals the
//! separate pass it replaced (`volume::source_sha256`: the file's sha256, or
//! for a DICOM folder the hash over its files and series), for every
//! format: gzip'd and plain NIfTI, NRRD, DICOM series of three transfer
//! syntaxes.
use std::path::PathBuf;

use med3dinsight::fuzz::{self, Input};

#[test]
fn hashes_taken_while_reading_equal_a_separate_pass() {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/case_fuzz");
    let cases = [
        ("ramp_i16.nii.gz", Input::Nifti, "case.nii.gz"),
        ("crop_u8.nii", Input::Nifti, "case.nii"),
        ("ramp_f32_nifti2.nii", Input::Nifti, "case.nii"),
        ("ramp_f32_gz.nrrd", Input::Nrrd, "case.nrrd"),
        ("ramp_i16.nrrd", Input::Nrrd, "case.nrrd"),
        ("series_explicit.dcmseries", Input::DicomSeries, ""),
        ("series_implicit.dcmseries", Input::DicomSeries, ""),
        ("series_rle.dcmseries", Input::DicomSeries, ""),
    ];
    for (seed, input, name) in cases {
        let scratch = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(seeds.join(seed)).unwrap();
        let done = fuzz::whole_case(scratch.path(), input, &bytes).unwrap_or_else(|e| panic!("{seed}: {e:#}"));
        assert!(done, "{seed}: the case was not processed");
        let image = scratch.path().join("src").join(name);
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(scratch.path().join("cache/cases/fuzz/case.json")).unwrap()).unwrap();
        let separate = med3dinsight::volume::source_sha256(&image, None).unwrap();
        assert_eq!(rec["image"]["sha256"], separate.as_str(), "{seed}");
    }
}

/// The reader itself notes the hash of the source it read whole, so that
/// preprocess's fallback pass (`volume::source_sha256`) does not run: for
/// every format above, a detached NRRD header (`.nhdr`; its hash is the
/// header's, as before) and a NIfTI pair (`.hdr`/`.img`, named by either;
/// its hash is the named file's, as before).
#[test]
fn readers_note_the_hash_of_what_they_read() {
    use med3dinsight::volume::{self, source, ReadOptions};
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/case_fuzz");
    let scratch = tempfile::tempdir().unwrap();
    let mut sources: Vec<PathBuf> = Vec::new();
    for (i, (seed, input, name)) in [
        ("ramp_i16.nii.gz", Input::Nifti, "case.nii.gz"),
        ("crop_u8.nii", Input::Nifti, "case.nii"),
        ("ramp_f32_gz.nrrd", Input::Nrrd, "case.nrrd"),
        ("ramp_i16.nrrd", Input::Nrrd, "case.nrrd"),
        ("series_explicit.dcmseries", Input::DicomSeries, ""),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch.path().join(format!("c{i}"));
        let bytes = std::fs::read(seeds.join(seed)).unwrap();
        assert!(fuzz::whole_case(&dir, input, &bytes).unwrap(), "{seed}");
        sources.push(dir.join("src").join(name));
    }
    // a detached header and its raw data file
    let nhdr = scratch.path().join("ramp.nhdr");
    let raw: Vec<u8> = (0..4 * 5 * 6u16).flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(scratch.path().join("ramp.raw"), &raw).unwrap();
    std::fs::write(
        &nhdr,
        "NRRD0004\ntype: uint16\ndimension: 3\nsizes: 4 5 6\nspace: left-posterior-superior\n\
         space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\n\
         encoding: raw\ndata file: ramp.raw\n",
    )
    .unwrap();
    sources.push(nhdr);
    // a NIfTI-1 pair made from the single-file .nii above: its header with
    // the pair's magic and no offset, and its voxel data as the image;
    // named by the header and by the image
    let nii = std::fs::read(&sources[1]).unwrap();
    assert_eq!(&nii[344..348], b"n+1\0", "{}", sources[1].display());
    let offset = f32::from_le_bytes(nii[108..112].try_into().unwrap()) as usize;
    let mut hdr = nii[..348].to_vec();
    hdr[108..112].copy_from_slice(&0f32.to_le_bytes());
    hdr[344..348].copy_from_slice(b"ni1\0");
    for stem in ["by_hdr", "by_img"] {
        std::fs::write(scratch.path().join(format!("{stem}.hdr")), &hdr).unwrap();
        std::fs::write(scratch.path().join(format!("{stem}.img")), &nii[offset..]).unwrap();
    }
    sources.push(scratch.path().join("by_hdr.hdr"));
    sources.push(scratch.path().join("by_img.img"));

    for path in sources {
        let (loaded, rec) = source::record(|| volume::load_image(&path, None, None, &ReadOptions::default()));
        loaded.unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let separate = volume::source_sha256(&path, None).unwrap();
        assert_eq!(
            rec.sha256_of(&path),
            Some(separate.as_str()),
            "{}: the reader did not note the hash of the source it read",
            path.display()
        );
    }
}
