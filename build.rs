//! Finds libtorch the same way torch-sys does and embeds its lib folder as a
//! run-path, so `med3d` starts without LD_LIBRARY_PATH.
//!
//! Order: `LIBTORCH` (a libtorch or torch-package folder), else the torch
//! package of the project's `.venv`, else of the `python3` on PATH.
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
    match lib {
        Some(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            println!("cargo:rustc-env=MED3D_TORCH_LIB={}", lib.display());
        }
        None => println!(
            "cargo:warning=libtorch not found (set LIBTORCH or run `make setup`); \
             the binary will need LD_LIBRARY_PATH"
        ),
    }
}
