//! The one owner of gzip inflation for the readers (gzipped NIfTI and NRRD):
//! a streaming `Read` over a gzip stream of one or more members, checked
//! member by member (CRC32 and size), that writes into the caller's buffer
//! and holds only a fixed input buffer, so a reader's memory still grows
//! with what it asked for, under the same cap, never with the stream.
//!
//! Two inflaters stand behind it:
//! - ISA-L's igzip (Intel's): 0.31-0.33 s for a 512x512x300 CT where
//!   zlib-rs takes 0.40 s and C zlib 0.72 s (docs/benchmarks.md), when the
//!   build found its header (Debian's libisal-dev) and libisal.so.2 loads
//!   at run time; it is opened with dlopen, so a binary without it still
//!   starts and inflates with
//! - zlib-rs (through flate2), the fallback.
//!
//! `MED3D_INFLATE=zlib` (or `isal`) picks one for comparison; the default
//! is ISA-L wherever it is there. Both give the same bytes for every valid
//! stream and refuse the same damaged ones (tests/gzip_inflaters.rs, and the
//! `gzip_inflaters` fuzz target).
use std::io::{self, Read};
use std::sync::OnceLock;

#[cfg(med3d_isal)]
mod isal;

/// Which inflater a stream goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflater {
    Isal,
    Zlib,
}

impl Inflater {
    pub fn name(self) -> &'static str {
        match self {
            Inflater::Isal => "isa-l",
            Inflater::Zlib => "zlib-rs",
        }
    }
}

/// Whether ISA-L was built in and libisal.so.2 loaded (checked once).
pub fn isal_available() -> bool {
    #[cfg(med3d_isal)]
    {
        isal::available()
    }
    #[cfg(not(med3d_isal))]
    {
        false
    }
}

/// Why ISA-L is not used, or None when it is available.
pub fn isal_missing_reason() -> Option<&'static str> {
    if isal_available() {
        None
    } else if cfg!(med3d_isal) {
        Some("libisal.so.2 did not load (Debian/Ubuntu: apt-get install libisal2)")
    } else {
        Some("not built in (install libisal-dev and rebuild)")
    }
}

/// The inflater the readers use: `MED3D_INFLATE` when set to `isal` or
/// `zlib`, else ISA-L when available; chosen once per process.
pub fn inflater() -> Inflater {
    static CHOSEN: OnceLock<Inflater> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let asked = std::env::var("MED3D_INFLATE").unwrap_or_default().to_ascii_lowercase();
        match asked.as_str() {
            "zlib" | "zlib-rs" => Inflater::Zlib,
            "" | "auto" | "isal" | "isa-l" => {
                if isal_available() {
                    Inflater::Isal
                } else {
                    if asked.starts_with("isa") {
                        tracing::warn!(
                            "MED3D_INFLATE={asked}: ISA-L is {}; inflating with zlib-rs",
                            isal_missing_reason().unwrap_or_default()
                        );
                    }
                    Inflater::Zlib
                }
            }
            other => {
                tracing::warn!("MED3D_INFLATE={other} is not isal, zlib or auto; using the default");
                if isal_available() {
                    Inflater::Isal
                } else {
                    Inflater::Zlib
                }
            }
        }
    })
}

/// A gzip stream being inflated.
pub enum GzReader<R: Read> {
    #[cfg(med3d_isal)]
    Isal(isal::IsalReader<R>),
    Zlib(Box<flate2::read::MultiGzDecoder<R>>),
}

/// Inflates `inner` (a gzip stream of one or more members) with the
/// process's inflater.
pub fn decoder<R: Read>(inner: R) -> GzReader<R> {
    decoder_with(inner, inflater())
}

/// Inflates `inner` with `which` (zlib-rs when ISA-L is asked for but is
/// not available).
pub fn decoder_with<R: Read>(inner: R, which: Inflater) -> GzReader<R> {
    #[cfg(med3d_isal)]
    if which == Inflater::Isal && isal::available() {
        match isal::IsalReader::new(inner) {
            Ok(r) => return GzReader::Isal(r),
            Err(inner) => return GzReader::Zlib(Box::new(flate2::read::MultiGzDecoder::new(inner))),
        }
    }
    let _ = which;
    GzReader::Zlib(Box::new(flate2::read::MultiGzDecoder::new(inner)))
}

impl<R: Read> GzReader<R> {
    pub fn inflater(&self) -> Inflater {
        match self {
            #[cfg(med3d_isal)]
            GzReader::Isal(_) => Inflater::Isal,
            GzReader::Zlib(_) => Inflater::Zlib,
        }
    }
}

impl<R: Read> Read for GzReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            #[cfg(med3d_isal)]
            GzReader::Isal(r) => r.read(out),
            GzReader::Zlib(r) => r.read(out),
        }
    }
}
