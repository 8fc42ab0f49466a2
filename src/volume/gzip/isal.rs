//! ISA-L's igzip behind `Read`, through the C shim `isal_shim.c` (dlopen of
//! libisal.so.2; the inflate state lives on the C side).
use std::ffi::c_void;
use std::io::{self, Read};
use std::ptr::NonNull;
use std::sync::OnceLock;

extern "C" {
    fn med3d_isal_load() -> i32;
    fn med3d_isal_new() -> *mut c_void;
    fn med3d_isal_next_member(state: *mut c_void);
    fn med3d_isal_free(state: *mut c_void);
    fn med3d_isal_inflate(
        state: *mut c_void,
        input: *const u8,
        in_len: u32,
        out: *mut u8,
        out_len: u32,
        used: *mut u32,
        made: *mut u32,
        finished: *mut i32,
    ) -> i32;
}

/// Compressed bytes read from the inner reader at a time.
const IN_BUF: usize = 256 << 10;
/// The most output one call is asked for (ISA-L counts in u32).
const OUT_MAX: usize = 1 << 30;

pub fn available() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    // SAFETY: called once, before any other shim function.
    *LOADED.get_or_init(|| unsafe { med3d_isal_load() } == 1)
}

pub struct IsalReader<R> {
    inner: R,
    state: NonNull<c_void>,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    eof: bool,
    member_done: bool,
    /// The next bytes are a member's header, not yet checked here.
    member_start: bool,
}

// SAFETY: the state is owned by this reader alone and ISA-L keeps no
// thread-local or global state for it.
unsafe impl<R: Send> Send for IsalReader<R> {}

impl<R: Read> IsalReader<R> {
    /// A reader over `inner`, or `inner` back when the state could not be
    /// allocated. Call only after `available()` said yes.
    pub fn new(inner: R) -> Result<Self, R> {
        // SAFETY: the library is loaded (the caller checked `available`).
        let Some(state) = NonNull::new(unsafe { med3d_isal_new() }) else {
            return Err(inner);
        };
        Ok(IsalReader {
            inner,
            state,
            // bounded: a fixed input buffer
            buf: vec![0u8; IN_BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            eof: false,
            member_done: false,
            member_start: true,
        })
    }

    /// At least `n` unread bytes in the buffer, unless the input ends first.
    fn ensure(&mut self, n: usize) -> io::Result<()> {
        while self.len - self.pos < n && !self.eof {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
            match self.inner.read(&mut self.buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(k) => self.len += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// What ISA-L lets through and RFC 1952 (and zlib) do not: reserved
    /// flag bits set in a member's header.
    fn check_header(&mut self) -> io::Result<()> {
        self.ensure(4)?;
        if let Some(&flags) = self.buf[self.pos..self.len].get(3) {
            if flags & 0xE0 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "invalid gzip header: reserved flag bits are set",
                ));
            }
        }
        self.member_start = false;
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        loop {
            match self.inner.read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    self.pos = 0;
                    self.len = 0;
                    return Ok(());
                }
                Ok(n) => {
                    self.pos = 0;
                    self.len = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn error_text(code: i32) -> String {
    match code {
        -1 => "invalid deflate block".into(),
        -2 => "invalid deflate symbol".into(),
        -3 => "invalid deflate lookback distance".into(),
        -4 => "invalid gzip header".into(),
        -5 => "gzip header names a compression method other than deflate".into(),
        -6 => "gzip checksum or size does not match the inflated data".into(),
        c => format!("ISA-L inflate error {c}"),
    }
}

impl<R: Read> Read for IsalReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let out_len = out.len().min(OUT_MAX);
        loop {
            if self.pos == self.len && !self.eof {
                self.fill()?;
            }
            if self.member_done {
                if self.pos == self.len {
                    // every member ended with its trailer, and so did the input
                    return Ok(0);
                }
                // SAFETY: the state is live and owned here.
                unsafe { med3d_isal_next_member(self.state.as_ptr()) };
                self.member_done = false;
                self.member_start = true;
            }
            if self.member_start {
                self.check_header()?;
            }
            let input = &self.buf[self.pos..self.len];
            let (mut used, mut made, mut fin) = (0u32, 0u32, 0i32);
            // SAFETY: `input` and `out[..out_len]` are valid for the lengths
            // given, the state is live; ISA-L writes only within them.
            let code = unsafe {
                med3d_isal_inflate(
                    self.state.as_ptr(),
                    input.as_ptr(),
                    input.len() as u32,
                    out.as_mut_ptr(),
                    out_len as u32,
                    &mut used,
                    &mut made,
                    &mut fin,
                )
            };
            self.pos += (used as usize).min(input.len());
            if code < 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, error_text(code)));
            }
            if fin != 0 {
                self.member_done = true;
            }
            if made > 0 {
                return Ok(made as usize);
            }
            if fin != 0 {
                continue;
            }
            if used == 0 {
                if self.eof && self.pos == self.len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the gzip stream ends before its member does: the file is truncated",
                    ));
                }
                if self.pos < self.len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the gzip stream cannot be inflated further (ISA-L made no progress)",
                    ));
                }
            }
        }
    }
}

impl<R> Drop for IsalReader<R> {
    fn drop(&mut self) {
        // SAFETY: allocated by med3d_isal_new, freed once.
        unsafe { med3d_isal_free(self.state.as_ptr()) }
    }
}
