//! The boundary that turns a libtorch exception into an error. tch's
//! infallible ops (`a.matmul(&b)`) panic when libtorch throws, e.g. on a
//! CUDA or CPU out-of-memory; a stage runs each step inside `boundary`, so
//! such a panic becomes an ordinary error for that step (the run keeps its
//! last checkpoint and exits non-zero) instead of exit code 101. Panics
//! caught here are not printed by the default hook: the stage reports them.
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use anyhow::Result;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// A panic caught at a boundary, with libtorch's message when it was one.
#[derive(Debug)]
pub struct Caught {
    pub message: String,
}

impl std::fmt::Display for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Caught {}

fn quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if DEPTH.with(|d| d.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// libtorch's own text out of tch's panic payload
/// (`called Result::unwrap() on an Err value: Torch("...")`), first
/// paragraph only (the C++ backtrace that follows helps nobody here).
fn message(payload: &(dyn std::any::Any + Send)) -> String {
    let raw = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string());
    let inner = match (raw.find("Torch(\""), raw.rfind("\")")) {
        (Some(a), Some(b)) if b > a + 7 => raw[a + 7..b]
            .replace("\\n", "\n")
            .replace("\\\"", "\"")
            .replace("\\'", "'"),
        _ => raw,
    };
    without_backtrace(&inner)
}

/// libtorch's message without the C++ backtrace it appends ("Exception
/// raised from ...", "frame #0: ...").
pub fn without_backtrace(text: &str) -> String {
    let cut = ["\nException raised from", "\nframe #"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    text[..cut].trim().to_string()
}

/// Runs `f`; a panic inside it (a libtorch exception surfacing through one
/// of tch's infallible ops, or a bug meeting a damaged input) comes back
/// as an error.
pub fn boundary<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    match r {
        Ok(r) => r,
        Err(payload) => Err(Caught {
            message: message(payload.as_ref()),
        }
        .into()),
    }
}

/// Whether an error (from a boundary or a fallible op) is libtorch failing
/// to allocate: CUDA's caching allocator or the CPU allocator.
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_ascii_lowercase();
    // oneDNN reports a scratchpad or workspace it could not allocate as a
    // primitive it could not create, or (when the allocation fails as the
    // primitive runs) could not execute: under memory pressure that is the
    // same failure (seen under an address-space limit in
    // tests/gpu_readiness.rs).
    [
        "out of memory",
        "can't allocate memory",
        "not enough memory",
        "cannot allocate memory",
        "could not create a primitive",
        "could not execute a primitive",
    ]
    .iter()
    .any(|p| text.contains(p))
}

/// A failed step as the user should read it: `at` names the stage and step;
/// for an out-of-memory, `sizing` names the settings that size the step and
/// `advice` which to change.
pub fn explain(e: anyhow::Error, at: &str, device: tch::Device, sizing: &str, advice: &str) -> anyhow::Error {
    if is_out_of_memory(&e) {
        anyhow::anyhow!(
            "{at}: out of memory on {device:?} ({}). {sizing}. {advice}",
            without_backtrace(&format!("{e:#}"))
        )
    } else {
        e.context(format!("{at} on {device:?} failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_libtorch_exception_is_an_error_with_its_message() {
        let e = boundary(|| {
            let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
            let b = Tensor::zeros([4, 5], (Kind::Float, tch::Device::Cpu));
            Ok(a.matmul(&b))
        })
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("cannot be multiplied"), "{m}");
        assert!(!m.contains("Exception raised from"), "{m}");
        assert_eq!(without_backtrace("a\nb\nframe #0: x\nframe #1: y"), "a\nb");
        assert!(!is_out_of_memory(&e));
    }

    #[test]
    fn a_refused_allocation_is_out_of_memory() {
        // 2^62 bytes: more than any machine's address space.
        let e = boundary(|| Ok(Tensor::empty([1i64 << 60], (Kind::Float, tch::Device::Cpu)))).unwrap_err();
        assert!(is_out_of_memory(&e), "{e:#}");
        assert_eq!(boundary(|| Ok(3)).unwrap(), 3);
        // oneDNN's words for a scratchpad it could not allocate
        for m in ["could not create a primitive", "could not execute a primitive"] {
            assert!(is_out_of_memory(&anyhow::anyhow!("{m}")), "{m}");
        }
    }
}
