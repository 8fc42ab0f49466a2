//! Full-size voxel buffers. A 512x512x300 CT is 300 MB of f32; written for
//! the first time in 4 KiB pages that is ~77,000 page faults, which profiled
//! at a fifth of a case's CPU time (`perf record` of `med3d preprocess`, one
//! CT). Large buffers are therefore asked to be backed by transparent huge
//! pages (2 MiB: ~150 faults) where the kernel offers them on request
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise or always); the
//! values are the same either way.

/// Buffers at least this large are advised; smaller ones gain nothing.
const ADVISE_BYTES: usize = 8 << 20;

/// A zero-filled `Vec<f32>` of `n` values (calloc'd: pages are not touched
/// here, so the advice applies before the first write).
pub fn zeroed(n: usize) -> Vec<f32> {
    let v = vec![0f32; n];
    advise_huge(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(v: &[f32]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < ADVISE_BYTES {
        return;
    }
    // the whole 2 MiB-aligned stretch inside the buffer
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside `v`'s live allocation; MADV_HUGEPAGE
        // changes only how the range is backed, never its contents. Failure
        // (no THP in this kernel) leaves 4 KiB pages, which is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: &[f32]) {}

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_is_zero_at_any_size() {
        for n in [0, 1, 1000, (8 << 20) / 4 + 12345] {
            let v = super::zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }
}
