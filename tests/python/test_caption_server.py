"""`med3d caption` against a real OpenAI-compatible server: `transformers
serve` (transformers[serving], from the venv) serving a tiny random-weight
Qwen2.5-VL that `make setup` builds offline (scripts/tiny_vlm.py), on CPU.

A small recording proxy sits between med3d and the server where a test
needs to count requests or see the images they carried; the server behind
it is the real one. The cache is test_caption.py's.
"""
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import BIN

from test_caption import cache, caption, free_port, one_per_slice, png_sha, records, rows_of, write_config  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "data/models/tiny-vlm"
SERVE = ROOT / ".venv/bin/transformers"

pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").exists() or not SERVE.exists(),
    reason="the tiny VLM or transformers serve is missing (run `make setup`)",
)


class Serve:
    """`transformers serve MODEL` pinned to the tiny model, on `port`."""

    def __init__(self, port, hub_cache):
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(hub_cache),
            HF_HUB_DISABLE_TELEMETRY="1",
            TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        )
        self.port = port
        self.proc = subprocess.Popen(
            [str(SERVE), "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "transformers serve exited"
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("transformers serve did not start")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Proxy:
    """Forwards to 127.0.0.1:`upstream` and logs every request: method, path,
    the sha256 of the PNG a chat request carried, its body, the status."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.log = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                proxy.forward(self, b"")

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                proxy.forward(self, self.rfile.read(n))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self):
        return self.server.server_address[1]

    def posts(self):
        with self.lock:
            return [e for e in self.log if e["method"] == "POST"]

    def forward(self, h, body):
        entry = {"method": h.command, "path": h.path, "t": time.monotonic()}
        if body:
            b = json.loads(body)
            entry["body"] = {k: v for k, v in b.items() if k != "messages"}
            for part in b["messages"][0]["content"]:
                if part["type"] == "image_url":
                    import base64

                    png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    entry["sha"] = hashlib.sha256(png).hexdigest()
        with self.lock:
            self.log.append(entry)
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=120)
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length")}
            c.request(h.command, h.path, body=body or None, headers=headers)
            r = c.getresponse()
            payload = r.read()
            entry["status"] = r.status
            h.send_response(r.status)
            h.send_header("Content-Type", r.getheader("Content-Type", "application/json"))
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        except OSError:
            # upstream down: drop the connection, as a dead server would
            entry["status"] = None
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def served(hub_cache):
    s = Serve(free_port(), hub_cache).wait_ready()
    p = Proxy(s.port)
    yield s, p
    p.close()
    s.kill()


def config(tmp_path, base_url, **openai):
    o = {"model": str(MODEL), "max_tokens": 8, "timeout_s": 60.0, "max_in_flight": 4}
    o.update(openai)
    return write_config(tmp_path / "c.yaml", base_url, openai=o)


def test_every_slice_through_a_real_server(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    rows = rows_of(cache)
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}/v1")
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    recs = one_per_slice(out, rows)
    sha = {r["slice_id"]: png_sha(cache, r) for r in rows}
    for sid, r in recs.items():
        # the tiny model always runs to max_tokens: `truncated`, kept
        assert r["status"] == "ok" and r["text"], r
        assert "truncated" in r["flags"], r
        assert r["image_sha256"] == sha[sid]
        assert r["usage"]["completion_tokens"] == 8 and r["usage"]["prompt_tokens"] > 8, r
    # every request carried a slice's PNG, each slice's exactly once
    posts = proxy.posts()
    assert sorted(q["sha"] for q in posts) == sorted(sha.values())
    assert all(q["path"] == "/v1/chat/completions" and q["status"] == 200 for q in posts)
    assert all(q["body"]["model"] == str(MODEL) and q["body"]["max_tokens"] == 8 for q in posts)
    report = json.loads((tmp_path / "caption-report.json").read_text())
    assert report["completion_tokens"] == 8 * len(rows)
    assert report["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in recs.values())
    # the preflight asked for the model list (this server lists none: let be)
    assert [e["path"] for e in proxy.log if e["method"] == "GET"] == ["/v1/models"]
    # a rerun sends nothing
    n = len(proxy.log)
    p = caption(cache, cfg, out)
    assert p.returncode == 0 and "36 skipped" in p.stdout, p.stdout
    assert [e["method"] for e in proxy.log[n:]] == ["GET"]


def test_a_wrong_model_name_stops_within_one_request(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}/v1", model="Qwen/Qwen2.5-VL-7B-Instruct", max_in_flight=8)
    out = tmp_path / "captions.jsonl"
    n = len(proxy.posts())
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert "HTTP 400" in p.stderr and "pinned" in p.stderr and "the first slice failed" in p.stderr, p.stderr[-3000:]
    assert len(proxy.posts()) - n == 1
    assert "35 slices not attempted" in p.stderr


def test_a_base_url_without_v1_stops_within_one_request(cache, served, tmp_path):  # noqa: F811
    serve, proxy = served
    cfg = config(tmp_path, f"http://127.0.0.1:{proxy.port}", max_in_flight=8)
    out = tmp_path / "captions.jsonl"
    n = len(proxy.posts())
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert "answered HTTP 404" in p.stderr, p.stderr[-3000:]
    assert "HTTP 404" in p.stderr and "should end in the API version such as /v1" in p.stderr
    assert len(proxy.posts()) - n == 1


def test_a_starting_server_is_waited_for(cache, hub_cache, tmp_path):  # noqa: F811
    port = free_port()
    cfg = config(tmp_path, f"http://127.0.0.1:{port}/v1", wait_for_server_s=180)
    out = tmp_path / "captions.jsonl"
    proc = caption(cache, cfg, out, popen=True)
    time.sleep(1.0)
    s = Serve(port, hub_cache)
    try:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr[-3000:]
        assert "waiting for the server" in stderr, stderr[-3000:]
        assert all(r["status"] == "ok" for r in one_per_slice(out, rows_of(cache)).values())
    finally:
        s.kill()


def test_a_server_killed_mid_run_then_restarted_loses_nothing(cache, hub_cache, tmp_path):  # noqa: F811
    rows = rows_of(cache)
    port = free_port()
    s = Serve(port, hub_cache).wait_ready()
    proxy = Proxy(port)
    try:
        cfg = config(
            tmp_path,
            f"http://127.0.0.1:{proxy.port}/v1",
            max_in_flight=2,
            max_attempts=3,
            backoff_base_ms=20,
            backoff_max_ms=100,
        )
        out = tmp_path / "captions.jsonl"
        proc = caption(cache, cfg, out, popen=True)
        deadline = time.time() + 120
        while time.time() < deadline and sum(1 for q in proxy.posts() if q.get("status") == 200) < 6:
            time.sleep(0.05)
        s.kill()
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stdout + stderr[-3000:]
        first = records(out)
        ok_before = {r["slice_id"] for r in first if r["status"] == "ok"}
        assert 6 <= len(ok_before) < len(rows)
        # restarted: the rerun asks only for what is not done, and completes
        s = Serve(port, hub_cache).wait_ready()
        n = len(proxy.posts())
        p = caption(cache, cfg, out)
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        recs = one_per_slice(out, rows)
        assert all(r["status"] == "ok" for r in recs.values())
        asked = sorted(q["sha"] for q in proxy.posts()[n:])
        assert asked == sorted(png_sha(cache, r) for r in rows if r["slice_id"] not in ok_before)
        # what was done before the kill is kept as it was (the end-of-run
        # `repeated` judgement may add or clear that one flag)
        keys = ("status", "text", "prompt_hash", "image_sha256", "attempts", "usage")
        for r in first:
            if r["status"] == "ok":
                assert {k: recs[r["slice_id"]].get(k) for k in keys} == {k: r.get(k) for k in keys}
    finally:
        proxy.close()
        s.kill()


def test_two_servers_share_the_slices_and_one_dying_loses_none(cache, hub_cache, tmp_path):  # noqa: F811
    """Two `transformers serve` processes behind recording proxies, in
    `base_urls`; the first is killed once it has answered 3 requests. Every
    slice ends ok, every request either proxy saw is an attempt a record
    counts (no slice asked beyond its counted retries), the report's
    per-server counts are the proxies', and a rerun asks nothing."""
    a = Serve(free_port(), hub_cache)
    b = Serve(free_port(), hub_cache)
    pa = pb = None
    try:
        a.wait_ready()
        b.wait_ready()
        pa, pb = Proxy(a.port), Proxy(b.port)
        rows = rows_of(cache)
        urls = [f"http://127.0.0.1:{pa.port}/v1", {"url": f"http://127.0.0.1:{pb.port}/v1", "max_in_flight": 2}]
        cfg = config(tmp_path, urls[0], base_urls=urls, max_in_flight=2, max_attempts=6,
                     backoff_base_ms=50, backoff_max_ms=400)
        out = tmp_path / "captions.jsonl"
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        args = [str(BIN), "caption", "--cache", str(cache), "--config", str(cfg), "--out", str(out)]
        with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
            proc = subprocess.Popen(args, env=env, stdout=so, stderr=se)
            deadline = time.time() + 300
            while sum(1 for q in pa.posts() if q.get("status") == 200) < 3:
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.time() < deadline, "server A never answered 3 requests"
                time.sleep(0.02)
            a.kill()
            proc.wait(timeout=600)
        err = (tmp_path / "stderr").read_text()
        assert proc.returncode == 0, err[-3000:]
        recs = one_per_slice(out, rows)
        assert all(r["status"] == "ok" and r["text"] for r in recs.values()), err[-3000:]
        posts_a, posts_b = pa.posts(), pb.posts()
        failed_a = [q for q in posts_a if q.get("status") != 200]
        assert failed_a, "no request met the dead server"
        assert all(q.get("status") == 200 for q in posts_b)
        # every request is a counted attempt, and each slice's PNG was
        # answered exactly once
        assert sum(r["attempts"] for r in recs.values()) == len(posts_a) + len(posts_b)
        sha = sorted(png_sha(cache, r) for r in rows)
        assert sorted(q["sha"] for q in posts_a + posts_b if q.get("status") == 200) == sha
        assert len(posts_b) > len(posts_a) - len(failed_a), "the slices did not move to the live server"
        report = json.loads((tmp_path / "caption-report.json").read_text())
        print(f"A: {len(posts_a)} requests ({len(failed_a)} failed), B: {len(posts_b)}; attempts "
              f"{sum(r['attempts'] for r in recs.values())} for {len(rows)} slices")
        by_url = {s["base_url"]: s for s in report["servers"]}
        sa, sb = by_url[urls[0]], by_url[urls[1]["url"]]
        assert (sa["requests"], sa["failed_requests"]) == (len(posts_a), len(failed_a)), sa
        assert (sb["requests"], sb["failed_requests"]) == (len(posts_b), 0), sb
        assert sa["completion_tokens"] + sb["completion_tokens"] == 8 * len(rows)
        assert sb["completion_tokens_per_s"] > 0
        # a rerun asks nothing (A is still down: left out or set aside)
        na, nb = len(pa.log), len(pb.log)
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and f"{len(rows)} skipped" in p.stdout, p.stdout + p.stderr[-2000:]
        assert all(e["method"] == "GET" for e in pa.log[na:] + pb.log[nb:])
    finally:
        for p in (pa, pb):
            if p:
                p.close()
        a.kill()
        b.kill()
