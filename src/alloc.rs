//! The one place where a buffer sized from what a file *says* is allocated.
//!
//! A header is a few bytes anyone can write: Rows x Columns x frames, NIfTI
//! dims, NRRD sizes, a resampled grid from an affine, a table's shape. Each
//! of them can ask for terabytes. Every reader therefore sizes its
//! full-size buffers through [`zeroed`] (or [`capacity`]), which takes two
//! things:
//! - a [`Want`]: the file (or key) it is for, what the buffer holds, how
//!   many values, and how many bytes of input the header says those values
//!   come from (`declared`);
//! - a [`Supply`]: how many bytes the input can actually give: the file's
//!   length, the bytes of a DICOM PixelData element or of its fragments
//!   (times the most a codec can expand them), or, where the input is
//!   compressed and its size is only known once inflated, the cap
//!   `preprocess.max_decompressed_mib`.
//!
//! It refuses, with an error that names the file, the declared size and
//! the bytes present, before anything is allocated; then it allocates
//! fallibly (calloc, so untouched pages cost nothing), so that what the
//! machine (or `ulimit -v`) cannot give is an error too, never an abort. A
//! check that relied on a huge allocation failing would be only as strict as
//! the kernel's overcommit: with lazy allocation a 17 GB calloc succeeds on a
//! 24 GB machine, which is how this bound was once lost without a test
//! noticing.
//!
//! **A new reader** computes `declared` from its header with checked
//! arithmetic, picks the tightest `Supply` it knows (see its constructors),
//! and calls `zeroed`/`capacity` instead of `vec![0; n]`, `Vec::with_capacity`
//! or a `collect` of header-sized length. A test in this module fails when a
//! reader module allocates any other way without saying, in a `// bounded:`
//! comment on the line or the one above, why its size is not the header's.
use std::alloc::Layout;

/// What a buffer is for and how much input the header says it comes from.
#[derive(Debug, Clone)]
pub struct Want<'a> {
    /// The file (or cache key) whose header sized the buffer.
    pub label: &'a str,
    /// What the buffer holds, as the header declares it, e.g. "header dims
    /// [512, 512, 300] (int16)".
    pub what: &'a str,
    /// Values to allocate.
    pub n: usize,
    /// Bytes of input that the header says these values are read from.
    pub declared: u64,
}

/// How many bytes the input can give, and where that figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supply {
    /// Bytes that are there: a file's length, an element's value length, the
    /// sum of a pixel sequence's fragments (times its codec's most
    /// expansion). `of` names them for the error, with its verb: "the
    /// file holds", "the PixelData fragments decode to at most".
    Held { bytes: u64, of: &'static str },
    /// Compressed input whose inflated size is known only by inflating:
    /// the cap on decompressed data, in bytes.
    Cap { bytes: u64 },
    /// The same cap, for a buffer sized by geometry rather than by data (a
    /// resampled grid from a few bytes of affine): what one case may
    /// expand to.
    Expand { bytes: u64 },
    /// Sized from data already in memory (a copy, a transpose, a decoded
    /// table): the bound was checked when those data were read.
    InMemory { bytes: u64 },
}

impl Supply {
    pub fn held(bytes: u64, of: &'static str) -> Supply {
        Supply::Held { bytes, of }
    }

    pub fn cap(bytes: u64) -> Supply {
        Supply::Cap { bytes }
    }

    pub fn expansion(bytes: u64) -> Supply {
        Supply::Expand { bytes }
    }

    /// For a buffer of `n` values of `T` sized from values already held.
    pub fn in_memory<T>(n: usize) -> Supply {
        Supply::InMemory {
            bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
        }
    }

    pub fn bytes(&self) -> u64 {
        match *self {
            Supply::Held { bytes, .. }
            | Supply::Cap { bytes }
            | Supply::Expand { bytes }
            | Supply::InMemory { bytes } => bytes,
        }
    }

    /// The smaller of two supplies (the one that refuses first).
    pub fn tighter(self, other: Supply) -> Supply {
        if other.bytes() < self.bytes() {
            other
        } else {
            self
        }
    }

    /// Refuses `want` when its header declares more input than this supply.
    pub fn check(&self, want: &Want) -> Result<(), Refused> {
        if want.declared > self.bytes() {
            return Err(Refused::new(want, Why::Short(*self)));
        }
        Ok(())
    }
}

/// Why a buffer was not allocated.
#[derive(Debug, Clone, PartialEq)]
enum Why {
    Short(Supply),
    Overflow,
    OutOfMemory(u64),
}

/// A buffer refused before allocation, or one the machine could not give.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{label}: {}", self.detail())]
pub struct Refused {
    pub label: String,
    what: String,
    declared: u64,
    why: Why,
}

impl Refused {
    fn new(want: &Want, why: Why) -> Refused {
        Refused {
            label: want.label.to_string(),
            what: want.what.to_string(),
            declared: want.declared,
            why,
        }
    }

    /// The message without the file's name (for errors that put it first).
    pub fn detail(&self) -> String {
        let (what, declared) = (&self.what, self.declared);
        match &self.why {
            Why::Short(Supply::Held { bytes, of }) => {
                format!("{what} need {declared} bytes, but {of} {bytes}; the file is truncated or its header is wrong")
            }
            Why::Short(Supply::Cap { bytes }) => {
                format!("{what} need {declared} bytes; {}", cap_exceeded("that", *bytes))
            }
            Why::Short(Supply::Expand { bytes }) => format!(
                "{what} need {declared} bytes ({} MiB), more than the {} MiB one case may expand to; if the file \
                 is genuine, raise `preprocess.max_decompressed_mib`",
                declared >> 20,
                bytes >> 20
            ),
            Why::Short(Supply::InMemory { bytes }) => format!(
                "{what} need {declared} bytes, more than the {bytes} bytes read (a bug in med3d: please report it)"
            ),
            Why::Overflow => format!("{what} describe an impossibly large buffer"),
            Why::OutOfMemory(b) => format!(
                "cannot allocate {b} bytes for {what}: out of memory (the machine, or `ulimit -v`, allows less)"
            ),
        }
    }

    /// True when the input was refused for declaring more than it holds or
    /// than the cap (not when memory ran out).
    pub fn is_short(&self) -> bool {
        matches!(self.why, Why::Short(_))
    }
}

/// The text for `what` decompressing past the cap of `cap` bytes; the
/// wording users match on, also used by the volume readers' read options.
pub fn cap_exceeded(what: &str, cap: u64) -> String {
    format!(
        "{what} decompresses to more than {} MiB, the cap on decompressed data; if the file is genuine, \
         raise `preprocess.max_decompressed_mib` (or `--max-decompressed-mib` for `med3d info`/`convert`)",
        cap >> 20
    )
}

/// Types whose all-zero bit pattern is a valid value (what calloc gives).
///
/// # Safety
/// Implement only for types for which zeroed memory is a valid value.
pub unsafe trait Zero: Copy {}
// SAFETY: integers and IEEE floats are valid (as 0 / +0.0) when all bits are zero.
unsafe impl Zero for u8 {}
unsafe impl Zero for u16 {}
unsafe impl Zero for i16 {}
unsafe impl Zero for u32 {}
unsafe impl Zero for i32 {}
unsafe impl Zero for u64 {}
unsafe impl Zero for i64 {}
unsafe impl Zero for usize {}
unsafe impl Zero for f32 {}
unsafe impl Zero for f64 {}

/// Buffers at least this large are advised onto huge pages; smaller ones
/// gain nothing.
const ADVISE_BYTES: usize = 8 << 20;

/// `want.n` zeros of `T`, once `supply` covers what the header declared,
/// allocated fallibly. The pages are not touched here (calloc), so a large
/// buffer costs nothing until written, and it is advised onto transparent
/// huge pages first: a 512x512x300 CT is 300 MB of f32, ~77,000 page faults
/// in 4 KiB pages, which profiled at a fifth of a case's CPU time.
pub fn zeroed<T: Zero>(want: &Want, supply: &Supply) -> Result<Vec<T>, Refused> {
    supply.check(want)?;
    let layout = Layout::array::<T>(want.n).map_err(|_| Refused::new(want, Why::Overflow))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return Err(Refused::new(want, Why::OutOfMemory(layout.size() as u64)));
    }
    advise_huge(p as usize, layout.size());
    // SAFETY: `p` was allocated by the global allocator with the layout of
    // `n` values of `T`, which are initialised (all-zero is valid for `T: Zero`).
    Ok(unsafe { Vec::from_raw_parts(p, want.n, want.n) })
}

/// An empty `Vec` with room for `want.n` values, once `supply` covers what
/// the header declared, reserved fallibly (for buffers filled by reading or
/// extending, not by index).
pub fn capacity<T>(want: &Want, supply: &Supply) -> Result<Vec<T>, Refused> {
    supply.check(want)?;
    let mut v = Vec::new();
    v.try_reserve_exact(want.n).map_err(|_| {
        let bytes = (want.n as u64).saturating_mul(std::mem::size_of::<T>() as u64);
        Refused::new(want, Why::OutOfMemory(bytes))
    })?;
    Ok(v)
}

/// A zeroed `f32` buffer of `n` values sized from data already in memory
/// (a transpose or copy of a volume that was read through [`zeroed`]):
/// fallible and huge-page advised like any other. `label` names the file.
pub fn like_f32(label: &str, what: &str, n: usize) -> Result<Vec<f32>, Refused> {
    let want = Want {
        label,
        what,
        n,
        declared: (n as u64).saturating_mul(4),
    };
    zeroed(&want, &Supply::in_memory::<f32>(n))
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, bytes: usize) {
    const HUGE: usize = 2 << 20;
    if bytes < ADVISE_BYTES {
        return;
    }
    // the whole 2 MiB-aligned stretch inside the buffer
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside a live allocation; MADV_HUGEPAGE
        // changes only how the range is backed, never its contents. Failure
        // (no THP in this kernel) leaves 4 KiB pages, which is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: usize, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(n: usize, declared: u64) -> Want<'static> {
        Want {
            label: "x.nii",
            what: "header dims [n]",
            n,
            declared,
        }
    }

    #[test]
    fn zeroed_is_zero_at_any_size() {
        for n in [0, 1, 1000, (8 << 20) / 4 + 12345] {
            let v: Vec<f32> = zeroed(&want(n, 0), &Supply::held(0, "the file holds")).unwrap();
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn refuses_before_allocating_and_names_file_sizes_and_supply() {
        // 2^60 f32 would abort any allocator; the check comes first
        let e = zeroed::<f32>(&want(1 << 60, 1 << 62), &Supply::held(128, "the PixelData holds")).unwrap_err();
        let s = e.to_string();
        assert!(e.is_short());
        let want_text = format!(
            "x.nii: header dims [n] need {} bytes, but the PixelData holds 128;",
            1u64 << 62
        );
        assert!(s.starts_with(&want_text), "{s}");
        let e = capacity::<u8>(
            &want(10, 11),
            &Supply::cap(10 << 20).tighter(Supply::held(10, "the file holds")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("need 11 bytes, but the file holds 10"), "{e}");
        let e = zeroed::<u8>(&want(1, 5 << 20), &Supply::cap(4 << 20)).unwrap_err();
        assert!(
            e.to_string().contains("decompresses to more than 4 MiB")
                && e.to_string().contains("preprocess.max_decompressed_mib"),
            "{e}"
        );
    }

    #[test]
    fn what_the_machine_cannot_give_is_an_error_not_an_abort() {
        // within the supply, but far past any address space
        let n = usize::MAX / 16;
        let e = zeroed::<u8>(&want(n, 0), &Supply::in_memory::<u8>(n)).unwrap_err();
        assert!(!e.is_short() && e.to_string().contains("out of memory"), "{e}");
        let e = capacity::<u64>(&want(n, 0), &Supply::in_memory::<u8>(n)).unwrap_err();
        assert!(
            e.to_string().contains("cannot allocate") || e.to_string().contains("impossibly"),
            "{e}"
        );
        let e = zeroed::<u64>(&want(usize::MAX, 0), &Supply::in_memory::<u8>(1)).unwrap_err();
        assert!(e.to_string().contains("impossibly large"), "{e}");
    }

    /// The reader modules: everything that turns a file into values.
    const READERS: [&str; 4] = ["src/volume", "src/artifacts", "src/info.rs", "src/convert.rs"];

    /// Allocations that take a size: each must go through this module or
    /// say why its size is not a header's.
    const SIZED: [&str; 4] = ["vec![0", "Vec::with_capacity(", "zeroed(", ".resize("];

    fn rust_files(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                rust_files(&e.unwrap().path(), out);
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p.to_path_buf());
        }
    }

    /// Lines of `text` (before its tests) that allocate a size outside the
    /// chokepoint without a `// bounded:` reason on the line or the one above.
    fn unbounded(text: &str) -> Vec<(usize, String)> {
        let mut found = Vec::new();
        let mut prev = "";
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            let sized = SIZED.iter().any(|p| code.contains(p)) && !code.contains("alloc::zeroed(");
            if sized && !line.contains("// bounded:") && !prev.contains("// bounded:") {
                found.push((i + 1, line.trim().to_string()));
            }
            prev = line;
        }
        found
    }

    #[test]
    fn the_check_below_finds_what_it_must() {
        let text = "let a = vec![0f32; n];\n// bounded: eight corners\nlet b = Vec::with_capacity(8);\n\
                    let c = crate::alloc::zeroed::<f32>(&w, &s)?;\nlet d = voxbuf::zeroed(n);\n\
                    #[cfg(test)]\nlet e = vec![0u8; 9];\n";
        let lines: Vec<usize> = unbounded(text).into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, vec![1, 5]);
    }

    #[test]
    fn no_reader_allocates_a_header_sized_buffer_outside_the_chokepoint() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for r in READERS {
            rust_files(&root.join(r), &mut files);
        }
        assert!(files.len() > 20, "reader modules not found under {}", root.display());
        let mut bad = Vec::new();
        for f in files {
            for (line, text) in unbounded(&std::fs::read_to_string(&f).unwrap()) {
                bad.push(format!("{}:{line}: {text}", f.strip_prefix(root).unwrap().display()));
            }
        }
        assert!(
            bad.is_empty(),
            "allocate through crate::alloc (or say `// bounded: why` above the line):\n{}",
            bad.join("\n")
        );
    }
}
