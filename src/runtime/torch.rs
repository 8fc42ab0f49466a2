//! What this process's libtorch is and can reach: its version and build
//! settings (from libtorch itself), which of its libraries are loaded and
//! from where (from /proc/self/maps), the CUDA runtime and cuDNN it was
//! built with, and the NVIDIA driver and GPUs (from the driver API,
//! `libcuda.so.1`, opened at run time so a machine without a driver is an
//! answer, not a failure to start).
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;

/// The libtorch release `tch` 0.24 is built for.
pub const EXPECTED_TORCH: &str = "2.11.0";

#[cfg(med3d_torch_info)]
mod ffi {
    use std::ffi::{c_char, c_int};
    extern "C" {
        pub fn med3d_torch_free_str(s: *mut c_char);
        pub fn med3d_torch_show_config() -> *mut c_char;
        pub fn med3d_torch_cudart_version() -> i64;
        pub fn med3d_torch_cudnn_version() -> i64;
        pub fn med3d_torch_has_cuda_stats() -> c_int;
        pub fn med3d_torch_cuda_peak(device: c_int, allocated: *mut i64, reserved: *mut i64) -> c_int;
        pub fn med3d_torch_cuda_reset_peak(device: c_int) -> c_int;
    }
}

/// libtorch as this process has it.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    /// TORCH_VERSION from libtorch's build settings (None: not readable).
    pub version: Option<String>,
    /// The folder libtorch_cpu.so was loaded from.
    pub lib_dir: Option<PathBuf>,
    /// The folder build.rs linked against (the embedded run-path).
    pub built_against: Option<String>,
    /// USE_CUDA=ON in libtorch's build settings.
    pub cuda_compiled: bool,
    /// Where libtorch_cuda.so is mapped from; None: not loaded.
    pub cuda_library: Option<PathBuf>,
    /// CUDA runtime libtorch_cuda was built with ("13.0").
    pub cuda_runtime: Option<String>,
    /// cuDNN version ("9.19.0").
    pub cudnn: Option<String>,
    /// CUDA devices libtorch can use.
    pub cuda_device_count: i64,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    /// The caching allocator's peak statistics can be read.
    pub cuda_memory_stats: bool,
    pub threads: i32,
    pub interop_threads: i32,
    /// USE_NCCL / USE_GLOO of libtorch's own build.
    pub libtorch_nccl: bool,
    pub libtorch_gloo: bool,
    /// ncclGetVersion of the libnccl this process loaded ("2.28.9").
    pub nccl_library: Option<String>,
    /// at::show_config(), verbatim.
    #[serde(skip)]
    pub show_config: String,
}

fn show_config() -> String {
    #[cfg(med3d_torch_info)]
    {
        // SAFETY: returns a malloc'd NUL-terminated string or null.
        let p = unsafe { ffi::med3d_torch_show_config() };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: see above; freed once here.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        unsafe { ffi::med3d_torch_free_str(p) };
        s
    }
    #[cfg(not(med3d_torch_info))]
    String::new()
}

/// `KEY=value` from show_config's "Build settings" line.
fn build_setting(config: &str, key: &str) -> Option<String> {
    let line = config.lines().find(|l| l.contains("Build settings:"))?;
    let settings = &line[line.find("Build settings:")? + "Build settings:".len()..];
    settings.split(", ").find_map(|kv| {
        kv.trim()
            .strip_prefix(&format!("{key}="))
            .map(|v| v.trim_end_matches(',').trim().to_string())
    })
}

/// 13000 -> "13.0"; 91900 -> "9.19.0".
fn cuda_version(v: i64) -> Option<String> {
    (v > 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

fn cudnn_version(v: i64) -> Option<String> {
    // cuDNN 9: major*10000 + minor*100 + patch.
    (v > 0).then(|| format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
}

/// Paths of the mapped shared objects whose file name starts with `stem`.
fn mapped(stem: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(stem) && n.contains(".so"))
        })
}

impl Facts {
    pub fn read() -> Facts {
        let config = show_config();
        let setting = |k: &str| build_setting(&config, k);
        #[cfg(med3d_torch_info)]
        // SAFETY: plain queries that catch their own C++ exceptions.
        let (cudart, cudnn, stats) = unsafe {
            (
                ffi::med3d_torch_cudart_version(),
                ffi::med3d_torch_cudnn_version(),
                ffi::med3d_torch_has_cuda_stats() != 0,
            )
        };
        #[cfg(not(med3d_torch_info))]
        let (cudart, cudnn, stats) = (-1i64, -1i64, false);
        let cuda_library = mapped("libtorch_cuda.so");
        let lib_dir = mapped("libtorch_cpu.so").and_then(|p| p.parent().map(PathBuf::from));
        let device_count = tch::Cuda::device_count();
        Facts {
            version: setting("TORCH_VERSION"),
            lib_dir,
            built_against: option_env!("MED3D_TORCH_LIB").map(String::from),
            cuda_compiled: setting("USE_CUDA").is_some_and(|v| v == "ON" || v == "1"),
            cuda_runtime: cuda_version(cudart).or_else(|| setting("CUDA_VERSION").filter(|_| cuda_library.is_some())),
            cudnn: cudnn_version(cudnn),
            cuda_device_count: device_count,
            cuda_available: device_count > 0 && tch::Cuda::is_available(),
            cudnn_available: device_count > 0 && tch::Cuda::cudnn_is_available(),
            cuda_memory_stats: stats && cuda_library.is_some(),
            threads: tch::get_num_threads(),
            interop_threads: tch::get_num_interop_threads(),
            libtorch_nccl: setting("USE_NCCL").is_some_and(|v| v == "1" || v == "ON"),
            libtorch_gloo: setting("USE_GLOO").is_some_and(|v| v == "1" || v == "ON"),
            nccl_library: nccl_version(),
            cuda_library,
            show_config: config,
        }
    }
}

/// Peak CUDA memory (allocated, reserved bytes) since the last reset.
pub fn cuda_peak_memory(device: usize) -> Option<(i64, i64)> {
    #[cfg(med3d_torch_info)]
    {
        let (mut a, mut r) = (0i64, 0i64);
        // SAFETY: out-pointers to locals; exceptions caught in C++.
        let rc = unsafe { ffi::med3d_torch_cuda_peak(device as c_int, &mut a, &mut r) };
        (rc == 0).then_some((a, r))
    }
    #[cfg(not(med3d_torch_info))]
    {
        let _ = device;
        None
    }
}

pub fn cuda_reset_peak_memory(device: usize) {
    #[cfg(med3d_torch_info)]
    // SAFETY: exceptions caught in C++.
    unsafe {
        ffi::med3d_torch_cuda_reset_peak(device as c_int);
    }
    #[cfg(not(med3d_torch_info))]
    let _ = device;
}

/// A shared library opened with dlopen. Never closed: unloading the driver
/// or NCCL under a libtorch that may hold them is not worth the risk.
struct Lib(*mut c_void);

impl Lib {
    fn open(name: &str) -> Option<Lib> {
        let c = CString::new(name).ok()?;
        // SAFETY: dlopen with a valid C string.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            None
        } else {
            Some(Lib(h))
        }
    }

    /// # Safety
    /// `T` must be the symbol's true function-pointer type.
    unsafe fn sym<T: Copy>(&self, name: &str) -> Option<T> {
        let c = CString::new(name).ok()?;
        let p = libc::dlsym(self.0, c.as_ptr());
        (!p.is_null()).then(|| std::mem::transmute_copy::<*mut c_void, T>(&p))
    }
}

fn nccl_version() -> Option<String> {
    let path = mapped("libnccl.so")?;
    let lib = Lib::open(path.to_str()?)?;
    // SAFETY: ncclResult_t ncclGetVersion(int*).
    let f: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe { lib.sym("ncclGetVersion")? };
    let mut v: c_int = 0;
    // SAFETY: out-pointer to a local.
    if unsafe { f(&mut v) } != 0 || v <= 0 {
        return None;
    }
    // NCCL >= 2.9: major*10000 + minor*100 + patch.
    Some(format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
}

/// One GPU as the driver reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub compute_capability: String,
    pub memory_bytes: u64,
    /// Compute capability 8.0 (Ampere) or newer: bf16 tensor cores.
    pub bf16: bool,
}

/// The NVIDIA driver and its GPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Driver {
    /// "13.0": the newest CUDA runtime this driver supports.
    pub version: String,
    pub devices: Vec<Gpu>,
}

/// Asks the driver API (libcuda.so.1); an error says why there is none.
pub fn driver() -> Result<Driver> {
    type Init = unsafe extern "C" fn(u32) -> c_int;
    type GetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
    type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type Name = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type Mem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    type Attr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    let Some(lib) = Lib::open("libcuda.so.1") else {
        bail!("no NVIDIA driver here (libcuda.so.1 cannot be loaded)");
    };
    // SAFETY: the driver API's documented signatures.
    let (init, ver, count, get, name, mem, attr) = unsafe {
        let f = || anyhow::anyhow!("libcuda.so.1 lacks the driver API entry points");
        (
            lib.sym::<Init>("cuInit").ok_or_else(f)?,
            lib.sym::<GetInt>("cuDriverGetVersion").ok_or_else(f)?,
            lib.sym::<GetInt>("cuDeviceGetCount").ok_or_else(f)?,
            lib.sym::<DeviceGet>("cuDeviceGet").ok_or_else(f)?,
            lib.sym::<Name>("cuDeviceGetName").ok_or_else(f)?,
            lib.sym::<Mem>("cuDeviceTotalMem_v2").ok_or_else(f)?,
            lib.sym::<Attr>("cuDeviceGetAttribute").ok_or_else(f)?,
        )
    };
    let mut v: c_int = 0;
    // SAFETY: out-pointers to locals throughout.
    unsafe {
        let rc = init(0);
        if rc != 0 {
            bail!("the NVIDIA driver is there but cuInit failed (CUresult {rc}: no usable GPU, or a driver/kernel-module mismatch)");
        }
        ver(&mut v);
    }
    let mut n: c_int = 0;
    // SAFETY: as above.
    unsafe { count(&mut n) };
    let mut devices = Vec::new();
    for i in 0..n.max(0) {
        let mut dev: c_int = 0;
        let mut buf = [0 as c_char; 256];
        let mut bytes: usize = 0;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: as above; 75/76 are CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR.
        unsafe {
            if get(&mut dev, i) != 0 {
                continue;
            }
            name(buf.as_mut_ptr(), buf.len() as c_int, dev);
            mem(&mut bytes, dev);
            attr(&mut major, 75, dev);
            attr(&mut minor, 76, dev);
        }
        // SAFETY: the driver NUL-terminates within the buffer.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        devices.push(Gpu {
            index: i as usize,
            name,
            compute_capability: format!("{major}.{minor}"),
            memory_bytes: bytes as u64,
            bf16: major >= 8,
        });
    }
    Ok(Driver {
        version: cuda_version(v as i64).unwrap_or_else(|| v.to_string()),
        devices,
    })
}

/// "13.0" >= "12.8" as CUDA versions compare.
pub fn version_at_least(have: &str, need: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(have) >= parse(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_settings_are_read_by_key() {
        let c = "PyTorch built with:\n  - GCC 13.3\n  - Build settings: BLAS_INFO=mkl, CUDA_VERSION=13.0, TORCH_VERSION=2.11.0, USE_CUDA=ON, USE_NCCL=1, \n";
        assert_eq!(build_setting(c, "BLAS_INFO").as_deref(), Some("mkl"));
        assert_eq!(build_setting(c, "TORCH_VERSION").as_deref(), Some("2.11.0"));
        assert_eq!(build_setting(c, "USE_CUDA").as_deref(), Some("ON"));
        assert_eq!(build_setting(c, "USE_ROCM"), None);
    }

    #[test]
    fn versions_decode_as_nvidia_encodes_them() {
        assert_eq!(cuda_version(13000).as_deref(), Some("13.0"));
        assert_eq!(cuda_version(12080).as_deref(), Some("12.8"));
        assert_eq!(cudnn_version(91900).as_deref(), Some("9.19.0"));
        assert_eq!(cuda_version(-1), None);
        assert!(version_at_least("13.0", "12.8"));
        assert!(!version_at_least("12.4", "13.0"));
    }

    #[test]
    fn this_process_reports_the_libtorch_it_runs() {
        let f = Facts::read();
        assert_eq!(f.version.as_deref(), Some(EXPECTED_TORCH));
        let dir = f.lib_dir.expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").is_file());
        // Whenever the libtorch has a CUDA library, this process loaded it.
        assert_eq!(f.cuda_library.is_some(), dir.join("libtorch_cuda.so").is_file());
    }
}
