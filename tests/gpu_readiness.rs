//! GPU readiness, shown on this CPU machine through the real binary: the
//! binary keeps libtorch_cuda NEEDED and loads it whenever its libtorch has
//! it; `med3d doctor --json` agrees with what PyTorch itself reports for
//! the same torch; the c10d bridge carries ProcessGroupNCCL; a launch that
//! asks for NCCL without a GPU is a named error; and a step libtorch cannot
//! allocate is a named out-of-memory error that keeps the checkpoint.
mod common;
mod pretrain_fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, python};
use pretrain_fixture::{experiment, Fixture, TINY};
use serde_json::Value;

fn doctor() -> Value {
    let out = Command::new(bin()).args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The torch/lib folder build.rs linked against (the binary's run-path).
fn torch_lib() -> PathBuf {
    let out = Command::new("readelf").args(["-d", bin()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .expect("the binary has a run-path");
    let inside = &line[line.find('[').unwrap() + 1..line.rfind(']').unwrap()];
    PathBuf::from(inside.split(':').next().unwrap())
}

fn needed() -> Vec<String> {
    let out = Command::new("readelf").args(["-d", bin()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l[l.find('[')? + 1..l.rfind(']')?].to_string()))
        .collect()
}

#[test]
fn libtorch_cuda_is_needed_and_loaded_when_the_libtorch_has_it() {
    let lib = torch_lib();
    assert!(lib.join("libtorch_cpu.so").is_file(), "{}", lib.display());
    let has_cuda = lib.join("libtorch_cuda.so").is_file();
    let needed = needed();
    assert_eq!(
        needed.iter().any(|n| n == "libtorch_cuda.so"),
        has_cuda,
        "NEEDED: {needed:?}"
    );
    let d = doctor();
    let loaded = d["libtorch"]["cuda_library"].as_str().map(PathBuf::from);
    if has_cuda {
        let loaded = loaded.expect("libtorch_cuda.so is mapped into the process");
        assert_eq!(
            loaded.canonicalize().unwrap(),
            lib.join("libtorch_cuda.so").canonicalize().unwrap()
        );
        assert_eq!(d["libtorch"]["cuda_compiled"], true);
    } else {
        assert!(loaded.is_none());
    }
    assert_eq!(
        Path::new(d["libtorch"]["lib_dir"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        lib.canonicalize().unwrap()
    );
}

#[test]
fn doctor_reports_what_pytorch_reports_for_the_same_torch() {
    let d = doctor();
    let py = Command::new(python())
        .args([
            "-c",
            "import json, torch; print(json.dumps({'version': torch.__version__.split('+')[0], 'cuda': torch.version.cuda, \
             'cudnn': torch.backends.cudnn.version(), 'available': torch.cuda.is_available(), 'count': torch.cuda.device_count(), \
             'nccl': torch.distributed.is_nccl_available(), 'gloo': torch.distributed.is_gloo_available(), \
             'nccl_version': '.'.join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None}))",
        ])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let r: Value = serde_json::from_slice(&py.stdout).unwrap();
    let t = &d["libtorch"];
    assert_eq!(t["version"], r["version"]);
    assert_eq!(t["cuda_runtime"], r["cuda"]);
    let cudnn = r["cudnn"]
        .as_i64()
        .map(|v| format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100));
    assert_eq!(t["cudnn"].as_str().map(String::from), cudnn);
    assert_eq!(t["cuda_available"], r["available"]);
    assert_eq!(t["cuda_device_count"], r["count"]);
    assert_eq!(t["libtorch_nccl"], r["nccl"]);
    assert_eq!(t["libtorch_gloo"], r["gloo"]);
    assert_eq!(t["nccl_library"], r["nccl_version"]);
    // Every field a bug report needs is there.
    for k in ["version", "git_hash"] {
        assert!(d["med3d"][k].is_string(), "med3d.{k}");
    }
    for k in ["threads", "interop_threads", "cuda_memory_stats", "built_against"] {
        assert!(!t[k].is_null(), "libtorch.{k}");
    }
    for k in ["c10d", "gloo", "nccl"] {
        assert!(d["bridge"][k].is_boolean(), "bridge.{k}");
    }
    assert!(d["mismatches"].is_array());
    // No GPU here: the driver section says why, and nothing is a mismatch.
    if r["count"] == 0 {
        assert!(d["driver"].is_null() || d["driver"]["devices"].as_array().unwrap().is_empty());
        assert_eq!(d["mismatches"].as_array().unwrap().len(), 0, "{}", d["mismatches"]);
    }
    let text = Command::new(bin()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("libtorch {}", r["version"].as_str().unwrap())),
        "{text}"
    );
}

#[test]
fn nccl_is_compiled_into_the_bridge() {
    if !torch_lib().join("libtorch_cuda.so").is_file() {
        return; // a CPU-only libtorch has no NCCL to compile
    }
    assert_eq!(
        doctor()["bridge"]["nccl"],
        true,
        "build.rs did not compile ProcessGroupNCCL"
    );
    let out = Command::new("nm")
        .args(["-D", "--undefined-only", "-C", bin()])
        .output()
        .unwrap();
    let syms = String::from_utf8_lossy(&out.stdout);
    assert!(
        syms.lines()
            .any(|l| l.contains("c10d::ProcessGroupNCCL::ProcessGroupNCCL(")),
        "ProcessGroupNCCL's constructor is not imported by the binary"
    );
}

#[test]
fn a_nccl_launch_without_a_gpu_is_a_named_error() {
    if doctor()["libtorch"]["cuda_available"] == true {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = experiment(d.path(), &format!("{TINY}  max_steps: 2\n"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin())
        .args(["pretrain", "--config"])
        .arg(&cfg)
        .arg("--cache")
        .arg(&cache)
        .arg("--out")
        .arg(d.path().join("run"))
        .env("WORLD_SIZE", "1")
        .env("RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("MED3D_DIST_BACKEND", "nccl")
        .env("MED3D_DIST_TIMEOUT_S", "20")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NCCL") && err.to_lowercase().contains("gpu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs `med3d pretrain` (optionally resumed, optionally under an
/// address-space limit in KiB), polling the child's VmPeak; returns the
/// output and the largest VmPeak seen (KiB). `stop_at`: send SIGTERM once
/// that checkpoint file exists.
fn pretrain(
    cfg: &Path,
    cache: &Path,
    out: &Path,
    resume: bool,
    limit_kb: Option<u64>,
    stop_at: Option<PathBuf>,
) -> (std::process::Output, u64) {
    let mut c = Command::new("bash");
    let lim = limit_kb.map(|kb| format!("ulimit -v {kb}; ")).unwrap_or_default();
    c.arg("-c")
        .arg(format!("{lim}exec \"$@\""))
        .arg("med3d")
        .arg(bin())
        .args(["pretrain", "--config"])
        .arg(cfg)
        .arg("--cache")
        .arg(cache)
        .arg("--out")
        .arg(out)
        // Fewer malloc arenas: virtual size then tracks what the run uses.
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    let child = c.spawn().unwrap();
    let pid = child.id();
    let watch = std::thread::spawn(move || {
        let mut termed = false;
        let mut peak = 0;
        while let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmPeak:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
            if s.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
                break;
            }
            if let Some(p) = &stop_at {
                if !termed && p.exists() {
                    termed = true;
                    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    (out, watch.join().unwrap())
}

#[test]
fn a_step_libtorch_cannot_allocate_is_a_named_error_and_the_checkpoint_stays() {
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    // What a run needs before its first step: the tiny model at the cached grid.
    let tiny = experiment(d.path(), &format!("{TINY}  max_steps: 1\n"));
    let (o, small) = pretrain(&tiny, &cache, &d.path().join("tiny"), false, None, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same model at 64^3: one checkpointed step, then SIGTERM (which
    // writes a second checkpoint and stops).
    let big = d.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let cfg = experiment(
        &big,
        &format!("{TINY}  max_steps: 6\n  checkpoint_every: 1\n  input_size: [64, 64, 64]\n"),
    );
    let out = d.path().join("run");
    let ckpt = out.join("checkpoints");
    let (o, large) = pretrain(&cfg, &cache, &out, false, None, Some(ckpt.join("step-00000001")));
    // 128 + SIGTERM when the signal stopped it, 0 when it finished first.
    assert!(
        matches!(o.status.code(), Some(0 | 143)),
        "{:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let before: Vec<_> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!before.is_empty() && before.len() < 6, "{before:?}");
    assert!(
        large > small + 300_000,
        "64^3 should need far more memory: {large} vs {small} KiB"
    );
    // Resumed with room to start but not for a 64^3 step: libtorch's
    // allocation is refused, the run stops with a named error.
    let limit = (small + large) / 2;
    let (o, _) = pretrain(&cfg, &cache, &out, true, Some(limit), None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "not a named error (limit {limit} KiB): {err}");
    assert!(err.contains("out of memory"), "{err}");
    assert!(
        err.contains("pretrain.batch_size 2") && err.contains("pretrain.input_size [64, 64, 64]"),
        "{err}"
    );
    assert!(err.contains("is kept (resume with --resume)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let after: Vec<_> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "the checkpoints changed");
    // A fresh run whose first step cannot fit says there is no checkpoint yet.
    let huge = experiment(&big, &format!("{TINY}  max_steps: 2\n  input_size: [256, 256, 256]\n"));
    let (o, _) = pretrain(&huge, &cache, &d.path().join("fresh"), false, Some(limit), None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("out of memory") && err.contains("no checkpoint had been written yet"),
        "{err}"
    );
}
