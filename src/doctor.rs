//! `med3d doctor`: what a bug report about running med3d needs, as text or
//! JSON (PyTorch users know it as `python -m torch.utils.collect_env`):
//! med3d's version and source, the libtorch this process loaded and what it
//! was built with, CUDA as compiled, loaded and usable, the driver and its
//! GPUs, the c10d bridge's backends, the gzip inflater, threads, and every
//! mismatch found.
use std::fmt;

use serde::Serialize;

use crate::runtime::torch::{self, Driver, Facts, EXPECTED_TORCH};

#[derive(Debug, Clone, Serialize)]
pub struct Med3d {
    pub version: &'static str,
    pub git_hash: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bridge {
    /// The c10d bridge is compiled in (multi-process training).
    pub c10d: bool,
    pub gloo: bool,
    pub nccl: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gzip {
    /// The inflater gzip'd volumes go through: "isa-l" or "zlib-rs".
    pub inflater: &'static str,
    /// Why ISA-L is not used, when it is not.
    pub isal_missing: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub med3d: Med3d,
    pub libtorch: Facts,
    /// None: no usable driver (`driver_error` says why).
    pub driver: Option<Driver>,
    pub driver_error: Option<String>,
    pub bridge: Bridge,
    pub gzip: Gzip,
    pub cpu_cores: usize,
    /// Problems that make a run fail or fall back to the CPU.
    pub mismatches: Vec<String>,
}

pub fn report() -> Report {
    let libtorch = Facts::read();
    let (driver, driver_error) = match torch::driver() {
        Ok(d) => (Some(d), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let (c10d, nccl) = crate::dist::capabilities();
    let mut mismatches = Vec::new();
    match libtorch.version.as_deref() {
        Some(v) if v.split('+').next() == Some(EXPECTED_TORCH) => {}
        Some(v) => mismatches.push(format!(
            "libtorch {v} is loaded, but med3d is built for {EXPECTED_TORCH} (tch 0.24): point LD_LIBRARY_PATH at a torch {EXPECTED_TORCH} lib folder"
        )),
        None => mismatches.push("libtorch's version cannot be read from its build settings".into()),
    }
    if libtorch.cuda_compiled && libtorch.cuda_library.is_none() {
        mismatches.push(
            "this libtorch has CUDA but libtorch_cuda.so is not loaded: the binary was linked without it, so no GPU can be used (rebuild with this version's build.rs)".into(),
        );
    }
    if let (Some(d), Some(rt)) = (&driver, &libtorch.cuda_runtime) {
        if !torch::version_at_least(&d.version, rt) {
            mismatches.push(format!(
                "the NVIDIA driver supports CUDA up to {}, but libtorch needs the CUDA {rt} runtime: update the driver (or use a torch built for CUDA {})",
                d.version, d.version
            ));
        }
        if !d.devices.is_empty() && libtorch.cuda_library.is_some() && !libtorch.cuda_available {
            mismatches.push(format!(
                "the driver lists {} GPU(s) but libtorch can use none (CUDA_VISIBLE_DEVICES, or the driver/runtime versions above)",
                d.devices.len()
            ));
        }
    }
    if libtorch.cuda_library.is_some() && c10d && !nccl {
        mismatches.push(
            "libtorch has CUDA but the c10d bridge was built without NCCL: multi-GPU pretraining will refuse to start (`make setup` installs the CUDA headers, then rebuild)".into(),
        );
    }
    Report {
        med3d: Med3d {
            version: env!("CARGO_PKG_VERSION"),
            git_hash: option_env!("MED3D_GIT_HASH").unwrap_or("unknown"),
        },
        libtorch,
        driver,
        driver_error,
        bridge: Bridge { c10d, gloo: c10d, nccl },
        gzip: Gzip {
            inflater: crate::volume::gzip::inflater().name(),
            isal_missing: crate::volume::gzip::isal_missing_reason(),
        },
        cpu_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        mismatches,
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.libtorch;
        writeln!(f, "med3d {} ({})", self.med3d.version, self.med3d.git_hash)?;
        writeln!(
            f,
            "libtorch {} from {}",
            opt(&t.version),
            opt(&t.lib_dir.as_ref().map(|p| p.display()))
        )?;
        writeln!(f, "  built against   {}", opt(&t.built_against))?;
        writeln!(
            f,
            "  CUDA            compiled {}, loaded {}, available {} ({} devices)",
            yes(t.cuda_compiled),
            t.cuda_library
                .as_ref()
                .map(|p| format!("yes ({})", p.display()))
                .unwrap_or_else(|| "no".into()),
            yes(t.cuda_available),
            t.cuda_device_count
        )?;
        writeln!(f, "  CUDA runtime    {}, cuDNN {}", opt(&t.cuda_runtime), opt(&t.cudnn))?;
        writeln!(
            f,
            "  NCCL            libtorch {}, library {}; Gloo {}",
            yes(t.libtorch_nccl),
            opt(&t.nccl_library),
            yes(t.libtorch_gloo)
        )?;
        writeln!(
            f,
            "  threads         {} intra-op, {} inter-op, {} cores",
            t.threads, t.interop_threads, self.cpu_cores
        )?;
        match (&self.driver, &self.driver_error) {
            (Some(d), _) => {
                writeln!(f, "driver          CUDA {} ({} GPUs)", d.version, d.devices.len())?;
                for g in &d.devices {
                    writeln!(
                        f,
                        "  gpu {}         {}, compute {}, {:.1} GiB, bf16 {}",
                        g.index,
                        g.name,
                        g.compute_capability,
                        g.memory_bytes as f64 / (1u64 << 30) as f64,
                        yes(g.bf16)
                    )?;
                }
            }
            (None, e) => writeln!(f, "driver          none: {}", opt(e))?,
        }
        writeln!(
            f,
            "c10d bridge     {} (Gloo {}, NCCL {})",
            yes(self.bridge.c10d),
            yes(self.bridge.gloo),
            yes(self.bridge.nccl)
        )?;
        match self.gzip.isal_missing {
            Some(why) => writeln!(f, "gzip            {} (ISA-L {why})", self.gzip.inflater)?,
            None => writeln!(f, "gzip            {}", self.gzip.inflater)?,
        }
        if self.mismatches.is_empty() {
            writeln!(f, "mismatches      none")
        } else {
            for m in &self.mismatches {
                writeln!(f, "MISMATCH        {m}")?;
            }
            Ok(())
        }
    }
}
