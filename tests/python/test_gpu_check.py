"""The one-shot GPU check runs end to end with --cpu (every section, on the
CPU, shapes shrunk), so its first run on a GPU is not its first run; and
what it reports agrees with the references it runs beside med3d."""
import json
import math
import os
import subprocess
import sys

from conftest import BIN, ROOT


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path, binary):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--bin", str(BIN), "--out", str(out)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable},
    )
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    s = r["sections"]
    assert r["cpu"] is True
    assert set(s) == {"doctor", "pretrain", "precision", "eager", "ot", "embed", "nccl"}
    for name, sec in s.items():
        assert sec["ok"], (name, sec)
    assert s["doctor"]["libtorch"]["version"] == "2.11.0"
    pre = s["pretrain"]
    assert pre["steps"] == 3 and pre["device"] == "Cpu"
    assert math.isfinite(pre["first_loss"]) and math.isfinite(pre["last_loss"])
    assert pre["volumes_per_s_steady"] > 0 and 0 <= pre["loader_share"] < 1
    assert pre["peak_rss_bytes"] > 0 and pre["peak_cuda_allocated_bytes"] is None
    # float32 both ways on the CPU: the same losses
    assert s["precision"]["max_rel_diff"] == 0.0
    # PyTorch eager built the same model
    e = s["eager"]
    assert e["parameters"][0] == e["parameters"][1] and e["ratio_med3d_over_pytorch"] > 0
    # the autograd solver and the fused solver find the same plan and gradient
    for c in s["ot"]["cases"]:
        assert c["plan_max_abs_diff_over_max"] < 1e-5, c
        assert c["grad_max_abs_diff_over_max"] < 1e-4, c
    assert s["embed"]["max_abs_diff"] == 0.0
    # a one-rank group (Gloo here) trains exactly as a single process
    assert s["nccl"]["backend"] == "gloo" and s["nccl"]["max_abs_diff"] == 0.0
    assert all(a is not None for a in s["nccl"]["allreduce_s"])
