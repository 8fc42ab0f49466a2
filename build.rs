//! Finds libtorch the same way torch-sys does and embeds its lib folder as a
//! run-path, so `med3d` starts without LD_LIBRARY_PATH; keeps libtorch_cuda
//! NEEDED whenever that libtorch has it (rustc links with --as-needed, and
//! no symbol of ours names it, so it would be dropped and CUDA would be
//! unavailable on a GPU: tch-rs issue #980); compiles src/runtime/
//! torch_info.cpp (what `med3d doctor` asks libtorch) and the c10d bridge
//! (src/dist/bridge.cpp) against that libtorch's headers.
//!
//! Order: `LIBTORCH` (a libtorch or torch-package folder), else the torch
//! package of the project's `.venv`, else of the `python3` on PATH.
//!
//! The bridge needs gloo's headers (Debian's libgloo-dev, `make setup`
//! installs it; `GLOO_INCLUDE` names another folder). Without them med3d
//! still builds, single-process only, and says so when launched by
//! torchrun or srun. The NCCL path is compiled when this libtorch has
//! libtorch_cuda, nccl.h is found (the nvidia NCCL wheel torch pulls in)
//! and complete CUDA headers are: CUDA_HOME, /usr/local/cuda, or the venv's
//! nvidia wheels (nvidia-cuda-runtime plus nvidia-cuda-crt and
//! nvidia-cuda-cccl for crt/ and nv/target, pinned in requirements.txt);
//! `MED3D_NO_NCCL=1` leaves it out.
use std::path::{Path, PathBuf};
use std::process::Command;

fn torch_lib_from_python(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(line.trim());
    p.is_dir().then_some(p)
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let lib = match std::env::var("LIBTORCH") {
        Ok(root) if !root.is_empty() => Some(PathBuf::from(root).join("lib")),
        _ => {
            let venv_python = manifest_dir.join(".venv/bin/python");
            torch_lib_from_python(&venv_python).or_else(|| torch_lib_from_python(Path::new("python3")))
        }
    };
    println!("cargo::rustc-check-cfg=cfg(med3d_c10d)");
    println!("cargo::rustc-check-cfg=cfg(med3d_nccl)");
    println!("cargo::rustc-check-cfg=cfg(med3d_torch_info)");
    println!("cargo::rustc-check-cfg=cfg(med3d_isal)");
    build_isal_shim();
    println!("cargo:rustc-env=MED3D_GIT_HASH={}", git_hash(&manifest_dir));
    match lib {
        Some(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            println!("cargo:rustc-env=MED3D_TORCH_LIB={}", lib.display());
            let cuda = link_cuda(&lib);
            build_torch_info(&lib, &manifest_dir, cuda);
            build_bridge(&lib, &manifest_dir, cuda);
        }
        None => println!(
            "cargo:warning=libtorch not found (set LIBTORCH or run `make setup`); \
             the binary will need LD_LIBRARY_PATH"
        ),
    }
}

/// `torch._C._GLIBCXX_USE_CXX11_ABI` of the venv's torch; libtorch
/// downloads (LIBTORCH) are built with the new ABI unless
/// LIBTORCH_CXX11_ABI=0, as torch-sys assumes.
fn cxx11_abi(manifest_dir: &Path) -> &'static str {
    if std::env::var("LIBTORCH").is_ok_and(|v| !v.is_empty()) {
        return if std::env::var("LIBTORCH_CXX11_ABI").as_deref() == Ok("0") {
            "0"
        } else {
            "1"
        };
    }
    for py in [manifest_dir.join(".venv/bin/python"), PathBuf::from("python3")] {
        if let Ok(out) = Command::new(&py)
            .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output()
        {
            if out.status.success() {
                return if String::from_utf8_lossy(&out.stdout).trim() == "0" {
                    "0"
                } else {
                    "1"
                };
            }
        }
    }
    "1"
}

/// The first folder under `root` (searched two levels down, the layout of
/// the nvidia wheels) holding `include/<header>` and every `also` beside it.
fn find_include(root: &Path, header: &str, also: &[&str]) -> Option<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for d in &dirs {
            let inc = d.join("include");
            if inc.join(header).is_file() && also.iter().all(|a| inc.join(a).exists()) {
                return Some(inc);
            }
            if let Ok(rd) = std::fs::read_dir(d) {
                next.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        dirs = next;
    }
    None
}

/// CUDA headers complete enough for ATen's CUDA headers (the runtime
/// wheel alone lacks crt/ and nv/target): CUDA_HOME, CUDA_PATH,
/// /usr/local/cuda, then the nvidia wheels in site-packages (CUDA 13's
/// nvidia/cu13, CUDA 12's nvidia/cuda_runtime).
fn cuda_include(site: &Path) -> Option<PathBuf> {
    let need = ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"];
    let roots = [
        std::env::var("CUDA_HOME").ok(),
        std::env::var("CUDA_PATH").ok(),
        Some("/usr/local/cuda".to_string()),
    ];
    roots
        .into_iter()
        .flatten()
        .filter(|r| !r.is_empty())
        .map(|r| PathBuf::from(r).join("include"))
        .chain(["nvidia/cu13/include", "nvidia/cuda_runtime/include"].map(|d| site.join(d)))
        .find(|inc| need.iter().all(|n| inc.join(n).exists()))
}

/// site-packages of a torch package's lib folder (`.../torch/lib`): the
/// nvidia wheels sit beside torch.
fn site_packages(lib: &Path) -> PathBuf {
    lib.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Keeps libtorch_cuda (and c10_cuda) NEEDED when `lib` has them.
fn link_cuda(lib: &Path) -> bool {
    if !lib.join("libtorch_cuda.so").is_file() {
        return false;
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    if lib.join("libc10_cuda.so").is_file() {
        println!("cargo:rustc-link-arg=-lc10_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    true
}

/// Compiles src/runtime/torch_info.cpp (with the CUDA allocator's
/// statistics when CUDA headers are there) and sets `cfg(med3d_torch_info)`.
fn build_torch_info(lib: &Path, manifest_dir: &Path, cuda: bool) {
    println!("cargo:rerun-if-changed=src/runtime/torch_info.cpp");
    let Some(torch_root) = lib.parent() else { return };
    let include = torch_root.join("include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("src/runtime/torch_info.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(manifest_dir))
        .warnings(false);
    if cuda {
        if let Some(inc) = cuda_include(&site_packages(lib)) {
            b.include(inc)
                .define("MED3D_CUDA_HEADERS", None)
                .define("USE_CUDA", None);
        }
    }
    b.compile("med3d_torch_info");
    println!("cargo:rustc-cfg=med3d_torch_info");
}

/// Compiles src/volume/gzip/isal_shim.c when ISA-L's igzip header is there
/// (Debian's libisal-dev, `make setup`; ISAL_INCLUDE may name another
/// folder) and sets `cfg(med3d_isal)`. The shim dlopens libisal.so.2 at run
/// time, so nothing is linked: without the header, or without the library
/// where the binary runs, gzip goes through zlib-rs.
fn build_isal_shim() {
    println!("cargo:rerun-if-env-changed=ISAL_INCLUDE");
    println!("cargo:rerun-if-changed=src/volume/gzip/isal_shim.c");
    let include = std::env::var("ISAL_INCLUDE")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    let header = include.join("isa-l/igzip_lib.h");
    println!("cargo:rerun-if-changed={}", header.display());
    if !header.is_file() {
        println!(
            "cargo:warning=ISA-L's header not found in {} (install libisal-dev: `make setup`, or set ISAL_INCLUDE): \
             gzip'd volumes inflate with zlib-rs, about 1.25x slower",
            include.display()
        );
        return;
    }
    cc::Build::new()
        .file("src/volume/gzip/isal_shim.c")
        .include(&include)
        .opt_level(2)
        .compile("med3d_isal_shim");
    println!("cargo:rustc-link-lib=dl");
    println!("cargo:rustc-cfg=med3d_isal");
}

/// `git describe`-like identity of the source: short hash, "-dirty" when
/// the work tree differs; MED3D_GIT_HASH when set; else "unknown".
fn git_hash(manifest_dir: &Path) -> String {
    println!("cargo:rerun-if-env-changed=MED3D_GIT_HASH");
    // A build without .git (the Docker builder) is told its hash.
    if let Ok(h) = std::env::var("MED3D_GIT_HASH") {
        if !h.is_empty() {
            return h;
        }
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest_dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(hash) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = manifest_dir.join(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(r).display());
        }
    }
    if dirty {
        format!("{hash}-dirty")
    } else {
        hash
    }
}

/// Compiles src/dist/bridge.cpp into a static library linked into the
/// crate, and sets `cfg(med3d_c10d)` (and `cfg(med3d_nccl)`).
fn build_bridge(lib: &Path, manifest_dir: &Path, cuda: bool) {
    println!("cargo:rerun-if-changed=src/dist/bridge.cpp");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=MED3D_NO_NCCL");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(torch_root) = lib.parent() else { return };
    let include = torch_root.join("include");
    let gloo = std::env::var("GLOO_INCLUDE")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !gloo.join("gloo/algorithm.h").is_file() {
        println!(
            "cargo:warning=gloo headers not found in {} (install libgloo-dev: `make setup`, or set GLOO_INCLUDE): \
             med3d is built without the c10d bridge, single-process only",
            gloo.display()
        );
        return;
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("src/dist/bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(manifest_dir))
        .define("USE_C10D_GLOO", None)
        .warnings(false);
    let site = site_packages(lib);
    let nccl = (std::env::var("MED3D_NO_NCCL").as_deref() != Ok("1") && cuda)
        .then(|| {
            let nccl = find_include(&site.join("nvidia"), "nccl.h", &[]);
            let cuda = cuda_include(&site);
            if nccl.is_none() || cuda.is_none() {
                println!(
                    "cargo:warning=libtorch has CUDA but {} not found: the c10d bridge is built with Gloo only \
                     (`make setup` installs the CUDA headers into the venv; or set CUDA_HOME to a CUDA toolkit)",
                    if nccl.is_none() {
                        "nccl.h"
                    } else {
                        "the CUDA toolkit headers (crt/host_config.h, nv/target)"
                    }
                );
            }
            Some((nccl?, cuda?))
        })
        .flatten();
    if let Some((nccl_inc, cuda_inc)) = &nccl {
        b.include(nccl_inc)
            .include(cuda_inc)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
    }
    b.compile("med3d_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl.is_some() {
        // ProcessGroupNCCL's symbols live in libtorch_cuda, which link_cuda keeps.
        println!("cargo:rustc-cfg=med3d_nccl");
    }
    println!("cargo:rustc-cfg=med3d_c10d");
}
