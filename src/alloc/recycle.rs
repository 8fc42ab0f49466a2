//! The binary's global allocator: the system allocator, except that a few
//! freed buffers of at least `MIN` bytes (volumes, their resampled and
//! transposed copies) are kept and handed to the next request of about
//! their size, instead of going back to the kernel.
//!
//! Why: each full-size buffer glibc gets from the kernel is fresh pages,
//! zeroed by the kernel on first touch; on the machines measured that
//! zeroing was 40-48% of a CT case's samples (`perf record`: clear_page
//! under the transpose, the NIfTI decode and resample). A recycled buffer
//! is already mapped; `alloc_zeroed` clears it with a memset, ~10x faster.
//! So a worker pays those faults on its first cases, not on every case.
//!
//! Bounds: at most `SLOTS` buffers and `MAX_BYTES` are kept; a request is
//! served only by a buffer at most 1/4 larger; a request that no kept
//! buffer serves first releases them all. So what is kept never adds to a
//! later peak: it is released before anything new of that size is taken
//! from the system. Off with MED3D_RECYCLE=0 (`set_enabled`).
//!
//! libtorch allocates through its own allocator and is not affected; tests
//! and the fuzz targets use the system allocator (this is set in main.rs).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Smallest buffer kept.
pub const MIN: usize = 32 << 20;
const SLOTS: usize = 8;
const MAX_BYTES: usize = 3 << 30;

#[derive(Clone, Copy)]
struct Kept {
    ptr: usize,
    size: usize,
    align: usize,
}

static KEPT: Mutex<[Option<Kept>; SLOTS]> = Mutex::new([None; SLOTS]);
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns recycling on or off (off: every buffer goes back at once, and
/// those kept are released).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    if !on {
        release_all();
    }
}

fn release_all() {
    let taken: [Option<Kept>; SLOTS] = match KEPT.lock() {
        Ok(mut k) => std::mem::replace(&mut *k, [None; SLOTS]),
        Err(_) => return,
    };
    for k in taken.into_iter().flatten() {
        // SAFETY: kept blocks came from System with this size and alignment
        // (or a smaller size: glibc's free ignores it).
        unsafe { System.dealloc(k.ptr as *mut u8, Layout::from_size_align_unchecked(k.size, k.align)) };
    }
}

/// A kept buffer for `layout`, or None (then every kept one is released).
fn take(layout: Layout) -> Option<*mut u8> {
    let n = layout.size();
    let mut kept = KEPT.lock().ok()?;
    let best = kept
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.map(|k| (i, k)))
        .filter(|(_, k)| k.size >= n && k.size - n <= n / 4 && k.align >= layout.align())
        .min_by_key(|(_, k)| k.size)
        .map(|(i, _)| i);
    match best {
        Some(i) => kept[i].take().map(|k| k.ptr as *mut u8),
        None => {
            drop(kept);
            release_all();
            None
        }
    }
}

/// Keeps a freed buffer when there is room; false: the caller frees it.
fn keep(ptr: *mut u8, layout: Layout) -> bool {
    let Ok(mut kept) = KEPT.lock() else { return false };
    let held: usize = kept.iter().flatten().map(|k| k.size).sum();
    if held + layout.size() > MAX_BYTES {
        return false;
    }
    match kept.iter_mut().find(|k| k.is_none()) {
        Some(slot) => {
            *slot = Some(Kept {
                ptr: ptr as usize,
                size: layout.size(),
                align: layout.align(),
            });
            true
        }
        None => false,
    }
}

pub struct Recycling;

// SAFETY: every block handed out is a live System block of at least the
// requested size and alignment, used by one owner at a time (a kept block
// is out of the list before it is handed out). Blocks are returned to
// System with the layout of their last request, which may be smaller than
// the block: on Linux, System frees with free(), which ignores the size.
unsafe impl GlobalAlloc for Recycling {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN && ENABLED.load(Ordering::Relaxed) {
            if let Some(p) = take(layout) {
                return p;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN && ENABLED.load(Ordering::Relaxed) {
            if let Some(p) = take(layout) {
                std::ptr::write_bytes(p, 0, layout.size());
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN && ENABLED.load(Ordering::Relaxed) && keep(ptr, layout) {
            return;
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        System.realloc(ptr, layout, new_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through the allocator's own entry points (the test binary itself runs
    /// on the system allocator): a freed large block serves the next request
    /// of about its size, zeroed when asked; a request it cannot serve
    /// releases it; small blocks are never kept.
    #[test]
    fn freed_large_blocks_serve_the_next_request_and_a_miss_releases_them() {
        let a = Recycling;
        let l40 = Layout::from_size_align(40 << 20, 16).unwrap();
        let l36 = Layout::from_size_align(36 << 20, 16).unwrap();
        let l20 = Layout::from_size_align(20 << 20, 16).unwrap();
        let l100 = Layout::from_size_align(100 << 20, 16).unwrap();
        unsafe {
            let p = a.alloc(l40);
            std::ptr::write_bytes(p, 7, l40.size());
            a.dealloc(p, l40);
            // 40 MiB serves 36 MiB (within a quarter), zeroed
            let q = a.alloc_zeroed(l36);
            assert_eq!(q, p, "the kept block was not reused");
            let s = std::slice::from_raw_parts(q, l36.size());
            assert!(s.iter().all(|&b| b == 0), "a reused block was not zeroed");
            a.dealloc(q, l36);
            // a request it cannot serve (more than 4/3 smaller is not served
            // either, and is below MIN anyway) releases every kept block
            let r = a.alloc(l100);
            assert!(
                KEPT.lock().unwrap().iter().all(|k| k.is_none()),
                "a miss kept its blocks"
            );
            a.dealloc(r, l100);
            let small = a.alloc(l20);
            a.dealloc(small, l20);
            let kept: Vec<usize> = KEPT.lock().unwrap().iter().flatten().map(|k| k.size).collect();
            assert_eq!(kept, vec![100 << 20], "only the large block is kept");
            set_enabled(false);
            assert!(KEPT.lock().unwrap().iter().all(|k| k.is_none()));
            set_enabled(true);
        }
    }
}
