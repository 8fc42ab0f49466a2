//! Data-parallel training over libtorch's own c10d (the engine behind
//! PyTorch DDP), through the small C++ bridge in `bridge.cpp` that build.rs
//! compiles against the venv's libtorch: a TCPStore rendezvous and one
//! process group, Gloo for CPU tensors and NCCL for CUDA tensors. c10d's
//! exceptions come back as errors carrying its message.
//!
//! `launch` reads the launcher's environment (torchrun, Slurm); `grads`
//! holds what the trainer does with a group (broadcast the parameters,
//! all-reduce the gradients in buckets).
// A build without gloo's headers keeps the API and only bails.
#![cfg_attr(not(med3d_c10d), allow(unused_imports, dead_code))]
pub mod grads;
pub mod launch;

use std::os::raw::{c_char, c_int, c_void};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

pub use launch::Launch;

/// Seconds a collective or the rendezvous may wait for the other ranks.
pub const DEFAULT_TIMEOUT_S: f64 = 1800.0;
/// Overrides `pretrain.run.dist_timeout_s`.
pub const TIMEOUT_ENV: &str = "MED3D_DIST_TIMEOUT_S";

#[cfg(med3d_c10d)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn med3d_c10d_free_str(s: *mut c_char);
        pub fn med3d_c10d_has_nccl() -> c_int;
        pub fn med3d_c10d_new(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world_size: c_int,
            timeout_ms: i64,
            agent_store: c_int,
            prefix: *const c_char,
            nccl: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn med3d_c10d_free(g: *mut c_void);
        pub fn med3d_c10d_allreduce_sum(g: *mut c_void, t: *const c_void, err: *mut *mut c_char) -> c_int;
        pub fn med3d_c10d_broadcast(g: *mut c_void, t: *const c_void, root: c_int, err: *mut *mut c_char) -> c_int;
        pub fn med3d_c10d_allgather(g: *mut c_void, t: *const c_void, err: *mut *mut c_char) -> *mut c_void;
        pub fn med3d_c10d_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn med3d_c10d_set_grad(p: *const c_void, g: *const c_void, err: *mut *mut c_char) -> c_int;
    }
}

/// Whether this build carries the c10d bridge, and with NCCL.
pub fn capabilities() -> (bool, bool) {
    #[cfg(med3d_c10d)]
    {
        // SAFETY: returns a compile-time constant.
        (true, unsafe { ffi::med3d_c10d_has_nccl() } != 0)
    }
    #[cfg(not(med3d_c10d))]
    {
        (false, false)
    }
}

/// Takes the bridge's error message (if any) and frees it.
#[cfg(med3d_c10d)]
fn take_err(err: *mut c_char) -> String {
    if err.is_null() {
        return "c10d failed without a message".to_string();
    }
    // SAFETY: the bridge hands out NUL-terminated malloc'd strings.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: allocated by the bridge, freed once here.
    unsafe { ffi::med3d_c10d_free_str(err) };
    s
}

/// Names the process group's backend (`gloo` or `nccl`) instead of taking
/// it from the device (NCCL for CUDA tensors, Gloo for CPU ones); when set,
/// a world of one rank still forms a group, so a single GPU runs the real
/// collectives (the GPU check's world-size-1 NCCL run).
pub const BACKEND_ENV: &str = "MED3D_DIST_BACKEND";

/// `MED3D_DIST_BACKEND` as "use NCCL" (true) or "use Gloo" (false); None when unset.
pub fn backend_override() -> Result<Option<bool>> {
    match std::env::var(BACKEND_ENV) {
        Ok(v) if v.trim().eq_ignore_ascii_case("nccl") => Ok(Some(true)),
        Ok(v) if v.trim().eq_ignore_ascii_case("gloo") => Ok(Some(false)),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => bail!("{BACKEND_ENV}={v:?}: expected gloo or nccl"),
        Err(_) => Ok(None),
    }
}

/// The collective timeout: `MED3D_DIST_TIMEOUT_S` when set, else the config's.
pub fn timeout_from(config_s: f64) -> Result<Duration> {
    let s = match std::env::var(TIMEOUT_ENV) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<f64>()
            .map_err(|_| anyhow::anyhow!("{TIMEOUT_ENV}={v:?} is not a number of seconds"))?,
        _ => config_s,
    };
    if !(s.is_finite() && s > 0.0) {
        bail!("the distributed timeout must be a positive number of seconds, got {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

/// One process's membership of a data-parallel group.
pub struct Dist {
    #[cfg_attr(not(med3d_c10d), allow(dead_code))]
    group: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub timeout: Duration,
    /// Where this group's tensors must live: the CPU (Gloo) or this rank's
    /// CUDA device (NCCL).
    pub device: Device,
    /// After a failed collective the group's state is unknown (a peer may
    /// be gone): it is leaked rather than torn down, so no destructor
    /// waits on a dead peer.
    failed: std::cell::Cell<bool>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist(rank {}/{})", self.rank, self.world_size)
    }
}

impl Dist {
    /// Rendezvous at the launch's store and builds the process group for
    /// tensors on `device` (Gloo on the CPU, NCCL on CUDA).
    #[cfg(med3d_c10d)]
    pub fn connect(l: &Launch, timeout: Duration, device: Device) -> Result<Dist> {
        use std::ffi::CString;
        let host = CString::new(l.master_addr.clone()).context("MASTER_ADDR holds a NUL byte")?;
        // torchrun's agent store holds its workers' keys under this prefix.
        let prefix = if l.agent_store {
            format!("/worker/attempt_{}/med3d", l.restart_count)
        } else {
            "med3d".to_string()
        };
        let prefix = CString::new(prefix).context("bad store prefix")?;
        let nccl = backend_override()?.unwrap_or(device.is_cuda());
        if nccl && !capabilities().1 {
            bail!("CUDA training across processes needs ProcessGroupNCCL, but this med3d was built without it (see build.rs: CUDA_HOME)");
        }
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid C strings; the bridge catches every C++ exception.
        let group = unsafe {
            ffi::med3d_c10d_new(
                host.as_ptr(),
                l.master_port as c_int,
                l.rank as c_int,
                l.world_size as c_int,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                l.agent_store as c_int,
                prefix.as_ptr(),
                nccl as c_int,
                &mut err,
            )
        };
        if group.is_null() {
            bail!(
                "rank {}/{}: cannot join the process group at {}:{} ({}, timeout {:.0} s): {}",
                l.rank,
                l.world_size,
                l.master_addr,
                l.master_port,
                if nccl { "NCCL" } else { "Gloo" },
                timeout.as_secs_f64(),
                take_err(err)
            );
        }
        Ok(Dist {
            group,
            rank: l.rank,
            world_size: l.world_size,
            local_rank: l.local_rank,
            timeout,
            device,
            failed: std::cell::Cell::new(false),
        })
    }

    #[cfg(not(med3d_c10d))]
    pub fn connect(l: &Launch, _timeout: Duration, _device: Device) -> Result<Dist> {
        bail!(
            "launched as rank {} of {} ({}), but this med3d was built without the c10d bridge: install libgloo-dev (`make setup`) and rebuild",
            l.rank,
            l.world_size,
            l.source
        )
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    #[cfg(med3d_c10d)]
    fn check(&self, what: &str, rc: c_int, err: *mut c_char) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        self.failed.set(true);
        bail!(
            "rank {}/{}: {what} failed ({} exited, or did not answer within {:.0} s): {}",
            self.rank,
            self.world_size,
            peers(self.rank, self.world_size),
            self.timeout.as_secs_f64(),
            take_err(err)
        )
    }

    fn contiguous(t: &Tensor, what: &str) -> Result<()> {
        if !t.is_contiguous() {
            bail!("{what}: the tensor must be contiguous");
        }
        Ok(())
    }

    /// Sums `t` over all ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        Dist::contiguous(t, "all_reduce")?;
        #[cfg(med3d_c10d)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: `t` is a live tensor; the group outlives the call.
            let rc = unsafe { ffi::med3d_c10d_allreduce_sum(self.group, t.as_ptr() as *const c_void, &mut err) };
            self.check("all_reduce", rc, err)
        }
        #[cfg(not(med3d_c10d))]
        bail!("built without the c10d bridge")
    }

    /// Replaces `t` with rank `root`'s values, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        Dist::contiguous(t, "broadcast")?;
        #[cfg(med3d_c10d)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: as in all_reduce_sum.
            let rc =
                unsafe { ffi::med3d_c10d_broadcast(self.group, t.as_ptr() as *const c_void, root as c_int, &mut err) };
            self.check("broadcast", rc, err)
        }
        #[cfg(not(med3d_c10d))]
        bail!("built without the c10d bridge (root {root})")
    }

    /// Every rank's `t` (same shape on all), stacked in rank order:
    /// [world_size, ...t's shape]. Not differentiable.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        #[cfg(med3d_c10d)]
        {
            let t = t.detach().contiguous();
            let mut err = std::ptr::null_mut();
            // SAFETY: as in all_reduce_sum; a non-null result is a new
            // at::Tensor owned by the returned Tensor.
            let out = unsafe { ffi::med3d_c10d_allgather(self.group, t.as_ptr() as *const c_void, &mut err) };
            if out.is_null() {
                self.check("all_gather", 1, err)?;
            }
            // SAFETY: see above.
            Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
        }
        #[cfg(not(med3d_c10d))]
        bail!("built without the c10d bridge ({:?})", t.size())
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(med3d_c10d)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the group outlives the call.
            let rc = unsafe { ffi::med3d_c10d_barrier(self.group, &mut err) };
            self.check("barrier", rc, err)
        }
        #[cfg(not(med3d_c10d))]
        bail!("built without the c10d bridge")
    }
}

/// Sets `param.grad` (also when it was undefined, which tch cannot do).
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    #[cfg(med3d_c10d)]
    {
        let mut err = std::ptr::null_mut();
        // SAFETY: both are live tensors.
        let rc = unsafe {
            ffi::med3d_c10d_set_grad(
                param.as_ptr() as *const c_void,
                grad.as_ptr() as *const c_void,
                &mut err,
            )
        };
        if rc != 0 {
            bail!("cannot set a gradient: {}", take_err(err));
        }
        Ok(())
    }
    #[cfg(not(med3d_c10d))]
    bail!("built without the c10d bridge ({:?} {:?})", param.size(), grad.size())
}

impl Drop for Dist {
    fn drop(&mut self) {
        #[cfg(med3d_c10d)]
        if !self.failed.get() && !self.group.is_null() {
            // SAFETY: created by med3d_c10d_new, freed once.
            unsafe { ffi::med3d_c10d_free(self.group) };
        }
    }
}
/// Which ranks a failed collective waited on, for its error: the one
/// other rank of a pair, else the others (c10d's reason says which peer's
/// socket failed, by address).
#[cfg_attr(not(med3d_c10d), allow(dead_code))]
fn peers(rank: usize, world_size: usize) -> String {
    let others: Vec<String> = (0..world_size).filter(|&r| r != rank).map(|r| r.to_string()).collect();
    match others.len() {
        0 => "no peer".into(),
        1 => format!("rank {}", others[0]),
        n if n <= 8 => format!("one of ranks {}", others.join(", ")),
        n => format!("one of the other {n} ranks"),
    }
}

#[cfg(test)]
mod tests {
    use super::peers;

    #[test]
    fn a_failed_collective_names_the_ranks_it_waited_on() {
        assert_eq!(peers(0, 2), "rank 1");
        assert_eq!(peers(1, 2), "rank 0");
        assert_eq!(peers(2, 4), "one of ranks 0, 1, 3");
        assert_eq!(peers(0, 64), "one of the other 63 ranks");
    }
}
