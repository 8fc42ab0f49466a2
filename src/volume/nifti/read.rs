//! Getting a NIfTI image off disk: a single file or a .hdr/.img pair (given
//! by either name, each part plain or gzipped), read whole or, for a single
//! file in C order, streamed slab by slab so the decompressed file is never
//! held in memory.
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::data::{data_nbytes, decode_c_order_into, decode_into, decode_slab, DataType, SLAB};
use super::header::{parse_header, NiftiHeader};
use crate::alloc::{self, Supply, Want};
use crate::volume::{source, ReadOptions};

/// The most header bytes a NIfTI file has before its voxels or extensions
/// (NIfTI-2's 540; NIfTI-1's 348 plus its 4 extension flag bytes).
const HEADER_BYTES: u64 = 544;

/// How the voxels of a `NiftiImage` are laid out in `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As on disk: first axis fastest over every dimension (nibabel's
    /// F-ordered array).
    File,
    /// Each 3D volume (the first three axes) in C order, last axis fastest,
    /// volumes one after another: the layout `Volume` keeps.
    CPerVolume,
}

/// A decoded NIfTI image: header, shape and scaled voxels, in file order
/// (first axis fastest, as on disk and as nibabel's F-ordered arrays) unless
/// it was read with `read_as(.., Layout::CPerVolume)`.
#[derive(Debug, Clone)]
pub struct NiftiImage {
    pub path: PathBuf,
    pub header: NiftiHeader,
    pub shape: Vec<usize>,
    pub dtype: DataType,
    pub data: Vec<f32>,
    pub layout: Layout,
}

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Whether the file begins with gzip's magic bytes.
fn starts_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

/// The bytes of a file, inflated when it is gzipped: at most `first` of
/// them when given, and never more than the limits' cap on decompressed
/// data (memory grows with the bytes inflated, not with a declared size).
fn read_maybe_gz(path: &Path, first: Option<u64>, limits: &ReadOptions) -> Result<Vec<u8>> {
    let cannot_read = || format!("cannot read {}", path.display());
    let len = std::fs::metadata(path).with_context(cannot_read)?.len();
    let gz = is_gz(path) || starts_gzip(path);
    let file = source::HashedFile::open(path).with_context(cannot_read)?;
    let want = first.unwrap_or(u64::MAX);
    if gz {
        // Inflate straight from the file: the compressed bytes are never
        // held in memory as a whole.
        let cap = limits.max_decompressed_bytes;
        // bounded: the file's length (and the cap); grows with what inflates
        let mut out = Vec::with_capacity(len.saturating_mul(3).min(want).min(cap) as usize);
        crate::volume::gzip::decoder(file)
            .take(want.min(cap.saturating_add(1)))
            .read_to_end(&mut out)
            .with_context(|| format!("{}: gzip stream is corrupt or truncated", path.display()))?;
        if out.len() as u64 > cap {
            bail!(limits.exceeded(&path.display().to_string()));
        }
        Ok(out)
    } else {
        // bounded: the file's length
        let mut raw = Vec::with_capacity(len.min(want) as usize);
        file.take(want).read_to_end(&mut raw).with_context(cannot_read)?;
        Ok(raw)
    }
}

/// For a `.hdr`/`.img` pair given by either name, the (header, image) paths.
fn pair_paths(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = path.file_name()?.to_str()?.to_string();
    let lower = name.to_ascii_lowercase();
    for (h, i) in [(".hdr", ".img"), (".hdr.gz", ".img.gz")] {
        for (this, other, is_hdr) in [(h, i, true), (i, h, false)] {
            if lower.ends_with(this) {
                let stem = &name[..name.len() - this.len()];
                let other_path = path.with_file_name(format!("{stem}{other}"));
                let other_path = if other_path.exists() {
                    other_path
                } else {
                    // the partner may be plain where this one is gzipped, or the reverse
                    let alt = if other.ends_with(".gz") {
                        other.trim_end_matches(".gz").to_string()
                    } else {
                        format!("{other}.gz")
                    };
                    path.with_file_name(format!("{stem}{alt}"))
                };
                return Some(if is_hdr {
                    (path.to_path_buf(), other_path)
                } else {
                    (other_path, path.to_path_buf())
                });
            }
        }
    }
    None
}

/// Reads the header only: the first bytes of the file (inflated when
/// gzipped), never its voxels.
pub fn read_header(path: &Path) -> Result<NiftiHeader> {
    let hdr_path = pair_paths(path).map(|(h, _)| h).unwrap_or_else(|| path.to_path_buf());
    let bytes = read_maybe_gz(&hdr_path, Some(HEADER_BYTES), &ReadOptions::default())?;
    parse_header(&bytes).with_context(|| format!("{}: invalid NIfTI header", hdr_path.display()))
}

/// `read_as(.., Layout::CPerVolume)` for a single .nii or .nii.gz, without
/// holding the whole (decompressed) file: the header is parsed from the
/// first bytes, then the voxels are inflated and decoded `SLAB` k-planes at
/// a time straight into their C-order places. None for anything but a
/// well-formed single file (a pair, a short or corrupt file, ...): `read_as`
/// then goes the general way, which names the problem. An error only when
/// the header declares more voxel data than the file can supply: refused
/// before anything is allocated for them.
fn read_c_order_streamed(path: &Path, limits: &ReadOptions) -> Option<Result<NiftiImage>> {
    if pair_paths(path).is_some() {
        return None;
    }
    let gz = is_gz(path) || starts_gzip(path);
    // every byte of the file goes through once: hashed as it is read
    let file = source::HashedFile::open(path).ok()?;
    let mut stream: Box<dyn Read> = if gz {
        Box::new(crate::volume::gzip::decoder(file))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    // bounded: a NIfTI header's size
    let mut head = Vec::with_capacity(540);
    (&mut stream).take(540).read_to_end(&mut head).ok()?;
    let header = parse_header(&head).ok()?;
    if !header.single_file {
        return None;
    }
    let dtype = header.data_type().ok()?;
    let need = data_nbytes(&header, dtype).ok()?;
    let min = if header.version == 1 { 348 } else { 540 };
    let offset = (header.vox_offset as usize).max(min);
    let sh = header.shape();
    let shape = [sh[0], *sh.get(1).unwrap_or(&1), *sh.get(2).unwrap_or(&1)];
    let (size, plane, per) = (dtype.size(), shape[0] * shape[1], shape.iter().product::<usize>());
    if per == 0 {
        return None;
    }
    let supply = supply_of(path, gz, offset, need, limits)?;
    let label = path.display().to_string();
    let what = format!("header dims {:?} ({})", header.shape(), dtype.name());
    let want = Want {
        label: &label,
        what: &what,
        n: need / size,
        declared: need as u64,
    };
    let mut data = match alloc::zeroed(&want, &supply) {
        Ok(d) => d,
        Err(e) => return Some(Err(e.into())),
    };
    let skip = offset.saturating_sub(head.len()) as u64;
    if std::io::copy(&mut (&mut stream).take(skip), &mut std::io::sink()).ok()? != skip {
        return None;
    }
    // The voxels: those the header read took, then the rest of the stream.
    let mut voxels = head.get(offset..).unwrap_or(&[]).chain(stream);
    // bounded: SLAB planes of a volume whose whole size was refused or allowed above
    let mut slab = vec![0u8; SLAB.min(shape[2]) * plane * size];
    for volume in data.chunks_exact_mut(per) {
        for k0 in (0..shape[2]).step_by(SLAB) {
            let bytes = &mut slab[..(SLAB.min(shape[2] - k0)) * plane * size];
            source::time(if gz { "inflate" } else { "read" }, || voxels.read_exact(bytes)).ok()?;
            source::time("decode", || {
                decode_slab(bytes, dtype, header.big_endian, header.scaling(), shape, k0, volume)
            });
        }
    }
    // Read to the end as the general way does: for gzip, that checks the
    // CRC and size of every member (within the cap: trailing data that
    // inflate past it go the general way, which names the cap).
    let left = match gz {
        true => limits.max_decompressed_bytes.saturating_sub((offset + need) as u64),
        false => u64::MAX - 1,
    };
    let rest = source::time(if gz { "inflate" } else { "read" }, || {
        std::io::copy(&mut (&mut voxels).take(left.saturating_add(1)), &mut std::io::sink())
    });
    if rest.ok()? > left {
        return None;
    }
    Some(Ok(NiftiImage {
        path: path.to_path_buf(),
        shape: header.shape(),
        header,
        dtype,
        data,
        layout: Layout::CPerVolume,
    }))
}

/// What the voxel data of a single file at `offset` can supply: for a plain
/// file, its bytes after the offset; for gzip, whose inflated size is known
/// only by inflating, the cap, once the trailer's ISIZE (the inflated size
/// mod 2^32 of the last member, which anyone can write) agrees with the
/// header. None: the file cannot be read, or the trailer disagrees (a
/// multi-member or damaged stream, which the general way inflates, within
/// the cap, and names).
fn supply_of(path: &Path, gz: bool, offset: usize, need: usize, limits: &ReadOptions) -> Option<Supply> {
    let total = (offset as u64).checked_add(need as u64)?;
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if !gz {
        return Some(Supply::held(
            len.saturating_sub(offset as u64),
            "the file's voxel data holds",
        ));
    }
    if len < 18 {
        return None;
    }
    f.seek(std::io::SeekFrom::End(-4)).ok()?;
    let mut isize = [0u8; 4];
    f.read_exact(&mut isize).ok()?;
    if u32::from_le_bytes(isize) as u64 != total & 0xffff_ffff {
        return None;
    }
    // (the few header bytes before the voxels are left to the read's own
    // check against the cap, at the end of the stream)
    Some(limits.cap())
}

/// Reads and decodes a whole NIfTI image, voxels in file order.
pub fn read(path: &Path, limits: &ReadOptions) -> Result<NiftiImage> {
    read_as(path, Layout::File, limits)
}

/// Reads and decodes a whole NIfTI image, voxels in the given layout.
pub fn read_as(path: &Path, layout: Layout, limits: &ReadOptions) -> Result<NiftiImage> {
    if layout == Layout::CPerVolume {
        if let Some(img) = read_c_order_streamed(path, limits) {
            return img;
        }
    }
    read_whole(path, layout, limits)
}

/// `read_as` by way of the whole file's bytes in memory.
fn read_whole(path: &Path, layout: Layout, limits: &ReadOptions) -> Result<NiftiImage> {
    let ctx = || format!("{}", path.display());
    if !path.exists() {
        bail!("{}: file not found", path.display());
    }
    let (header, bytes, offset) = match pair_paths(path) {
        Some((hdr_path, img_path)) => {
            let hbytes = read_maybe_gz(&hdr_path, Some(HEADER_BYTES), limits)?;
            let header =
                parse_header(&hbytes).with_context(|| format!("{}: invalid NIfTI header", hdr_path.display()))?;
            if !img_path.exists() {
                bail!(
                    "{}: the image file {} of this header/image pair is missing",
                    path.display(),
                    img_path.display()
                );
            }
            let bytes = read_maybe_gz(&img_path, None, limits)?;
            let off = header.vox_offset as usize;
            (header, bytes, off)
        }
        None => {
            let bytes = read_maybe_gz(path, None, limits)?;
            let header = parse_header(&bytes).with_context(|| format!("{}: invalid NIfTI header", path.display()))?;
            if !header.single_file {
                bail!(
                    "{}: header says the data are in a separate .img file, but this is a single file",
                    path.display()
                );
            }
            let off = header.vox_offset as usize;
            let min = if header.version == 1 { 348 } else { 540 };
            (header, bytes, off.max(min))
        }
    };
    let dtype = header.data_type().with_context(ctx)?;
    let need = data_nbytes(&header, dtype).with_context(ctx)?;
    let have = bytes.len().saturating_sub(offset);
    let label = path.display().to_string();
    let what = format!("header dims {:?} ({})", header.shape(), dtype.name());
    let want = Want {
        label: &label,
        what: &what,
        n: need / dtype.size(),
        declared: need as u64,
    };
    let of = match is_gz(path) {
        true => "the inflated file's voxel data holds",
        false => "the file's voxel data holds",
    };
    let mut data = alloc::zeroed(&want, &Supply::held(have as u64, of))?;
    let raw = &bytes[offset..offset + need];
    match layout {
        Layout::File => decode_into(raw, dtype, header.big_endian, header.scaling(), &mut data),
        Layout::CPerVolume => {
            let sh = header.shape();
            let volume = [sh[0], *sh.get(1).unwrap_or(&1), *sh.get(2).unwrap_or(&1)];
            decode_c_order_into(raw, dtype, header.big_endian, header.scaling(), volume, &mut data)
        }
    }
    Ok(NiftiImage {
        path: path.to_path_buf(),
        shape: header.shape(),
        header,
        dtype,
        data,
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::affine::identity4;
    use crate::volume::nifti::write_nifti1;

    #[test]
    fn streamed_reading_matches_whole_file_reading() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        // i16 3D (more k-planes than one slab), f32 4D with scaling, u8 2D
        let i16s: Vec<u8> = (0..37 * 5 * 70)
            .flat_map(|v| ((v * 37 % 4001) as i16 - 2000).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = (0..9 * 4 * 3 * 2)
            .flat_map(|v| (v as f32 * 0.25 - 3.0).to_le_bytes())
            .collect();
        let mut scaled = write_nifti1(&[9, 4, 3, 2], [1.0; 3], &identity4(), 16, &f32s);
        scaled[112..116].copy_from_slice(&0.5f32.to_le_bytes());
        scaled[116..120].copy_from_slice(&10f32.to_le_bytes());
        let files = [
            ("a.nii", write_nifti1(&[37, 5, 70], [1.0; 3], &identity4(), 4, &i16s)),
            ("b.nii.gz", gz(&scaled)),
            (
                "c.nii.gz",
                gz(&write_nifti1(&[6, 7], [1.0; 3], &identity4(), 2, &[7u8; 42])),
            ),
        ];
        for (name, bytes) in files {
            let p = d.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let a = read_c_order_streamed(&p, &ReadOptions::default())
                .unwrap_or_else(|| panic!("{name}: not streamed"))
                .unwrap();
            let b = read_whole(&p, Layout::CPerVolume, &ReadOptions::default()).unwrap();
            assert_eq!(
                (&a.header, &a.shape, a.dtype, a.layout),
                (&b.header, &b.shape, b.dtype, b.layout),
                "{name}"
            );
            assert!(
                a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()) && a.data.len() == b.data.len()
            );
            // anything short or corrupt is left to the general way
            let cut = d.path().join(format!("cut_{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
            // anything short is refused or left to the general way, never decoded
            assert!(
                read_c_order_streamed(&cut, &ReadOptions::default()).is_none_or(|r| r.is_err()),
                "{name}"
            );
            assert!(
                read_whole(&cut, Layout::CPerVolume, &ReadOptions::default()).is_err(),
                "{name}"
            );
        }
    }
}
