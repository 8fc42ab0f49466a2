"""`med3d caption` and `med3d inspect` through the real binary.

The openai backend runs against a fake OpenAI server on loopback
(fake_openai.py) that injects faults per slice; the descriptor backend is
checked against numpy on the cached volumes. The cache is made once by
`med3d preprocess` from real volumes (nibabel's anatomical MR, MNI152) and
a synthetic CT written here.
"""
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BIN, DEMO
from fake_openai import Fake

PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def shard_of(case_id, n):
    h = hashlib.sha256(case_id.encode()).hexdigest()
    return int(h[:15], 16) % n


def synthetic_ct(path):
    """A body in HU that narrows towards the top: fat rim, soft tissue, a bone
    disc and a lung-like pocket, every slice different from every other."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(24), indexing="ij")
    scale = 1.0 - 0.02 * z
    r = ((x - 20) / (17.0 * scale)) ** 2 + ((y - 18) / (14.0 * scale)) ** 2
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[r < 1.0] = -100.0
    hu[r < 0.7] = (40.0 + 2.0 * z + 1.5 * x)[r < 0.7]
    hu[((x - 20) ** 2 + (y - 24) ** 2) < 4 + z] = 700.0
    hu[((x - 12) ** 2 + (y - 14) ** 2) < 9] = -700.0
    hu[:, :, :3] = -1000.0
    nib.save(nib.Nifti1Image(hu, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption")
    ct = d / "ct.nii.gz"
    synthetic_ct(ct)
    # ids chosen so that --shard 1/2 and 2/2 both own a case
    ids = ["anat", "mni", "ct"]
    for cand in ["ct", "ct1", "ct2", "ct3", "ct4", "ct5"]:
        if len({shard_of(i, 2) for i in ids[:2] + [cand]}) == 2:
            ids[2] = cand
            break
    assert len({shard_of(i, 2) for i in ids}) == 2
    (d / "manifest.yaml").write_text(
        "name: t\ncases:\n"
        f"  - {{id: {ids[0]}, image: {DEMO / 'nibabel_anatomical.nii'}, modality: MR}}\n"
        f"  - {{id: {ids[1]}, image: {DEMO / 'mni152_t1.nii.gz'}, modality: MR}}\n"
        f"  - {{id: {ids[2]}, image: {ct}, modality: CT}}\n"
    )
    (d / "pre.yaml").write_text(
        f"name: t\nmanifest: {d / 'manifest.yaml'}\nworkdir: {d / 'w'}\n"
        "preprocess:\n  spacing: [3.0, 3.0, 3.0]\n  roi: [40, 40, 32]\n  slices_per_plane: 4\n"
    )
    p = subprocess.run([str(BIN), "preprocess", "--config", d / "pre.yaml"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    c = d / "w" / "cache"
    rows = [json.loads(l) for l in (c / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 36
    return c


def rows_of(cache):
    return [json.loads(l) for l in (cache / "index.jsonl").read_text().splitlines()]


def png_sha(cache, row):
    return hashlib.sha256((cache / row["png"]).read_bytes()).hexdigest()


def write_config(path, base_url, **openai):
    o = {
        "base_url": base_url,
        "model": "fake-vlm",
        "api_key_env": "MED3D_TEST_KEY",
        "max_in_flight": 4,
        "timeout_s": 1.0,
        "max_attempts": 3,
        "backoff_base_ms": 20,
        "backoff_max_ms": 200,
    }
    o.update(openai.pop("openai", {}))
    cap = {"openai": o, **openai}
    text = f"name: t\nmanifest: unused.yaml\nworkdir: unused\ncaption: {json.dumps(cap)}\n"
    path.write_text(text)
    return path


def caption(cache, config, out, key=None, shard=None, popen=False):
    # trace: the most the HTTP stack ever logs, to show the key is not in it
    env = dict(os.environ, MED3D_LOG="trace", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("MED3D_TEST_KEY", None)
    if key:
        env["MED3D_TEST_KEY"] = key
    args = [str(BIN), "caption", "--cache", str(cache), "--config", str(config), "--out", str(out)]
    if shard:
        args += ["--shard", shard]
    if popen:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def records(out):
    text = out.read_text()
    assert text == "" or text.endswith("\n"), "torn last line"
    return [json.loads(l) for l in text.splitlines()]


def one_per_slice(out, rows):
    recs = records(out)
    ids = [r["slice_id"] for r in recs]
    assert len(ids) == len(set(ids)), "a slice has more than one record"
    assert set(ids) == {r["slice_id"] for r in rows}
    return {r["slice_id"]: r for r in recs}


@pytest.fixture
def server():
    f = Fake()
    yield f
    f.close()


def test_faults_retries_and_rerun(cache, server, tmp_path):
    rows = rows_of(cache)
    sha = {r["slice_id"]: png_sha(cache, r) for r in rows}
    assert len(set(sha.values())) == len(rows), "slices need distinct images to be told apart"
    ids = [r["slice_id"] for r in rows]
    plans = {
        ids[0]: ["500", "ok"],
        ids[1]: ["429:1.5", "ok"],
        ids[2]: ["slow:2.5", "ok"],
        ids[3]: ["malformed", "ok"],
        ids[4]: ["empty"],
        ids[5]: ["refusal"],
        ids[6]: ["500"],
        ids[7]: ["length"],
        ids[8]: ["429date:3", "ok"],
    }
    server.plan = {sha[i]: p for i, p in plans.items()}
    key = "sk-test-" + secrets.token_hex(16)
    cfg = write_config(tmp_path / "c.yaml", server.base_url)
    out = tmp_path / "captions.jsonl"

    p = caption(cache, cfg, out, key=key)
    assert p.returncode == 2, p.stdout + p.stderr
    recs = one_per_slice(out, rows)
    for i in ids[:4] + [ids[8]]:
        assert (recs[i]["status"], recs[i]["attempts"]) == ("ok", 2), recs[i]
    for i, why in [(ids[4], "empty"), (ids[5], "refusal"), (ids[6], "HTTP 500")]:
        r = recs[i]
        assert (r["status"], r["attempts"]) == ("failed", 3), r
        assert why in r["error"], r
    assert recs[ids[7]]["status"] == "ok" and recs[ids[7]]["flags"] == ["truncated"]
    assert recs[ids[2]]["latency_ms"] < 1000
    for i in ids[9:]:
        r = recs[i]
        assert (r["status"], r["attempts"], r["flags"]) == ("ok", 1, []), r
        assert r["text"] == f"Slice {sha[i][:12]}: the image shows the brain parenchyma and ventricles."
        assert (r["backend"], r["model"], r["image_sha256"]) == ("openai", "fake-vlm", sha[i])
    # retried: the 5 that recovered and the 3 that used up their budget;
    # flagged counts the failed empty and refusal slices too
    assert "3 failed" in p.stdout and "8 retried" in p.stdout, p.stdout
    assert "3 flagged (empty 1, refusal 1, truncated 1)" in p.stdout, p.stdout
    # a quality retry asks differently (a deterministic server would answer
    # the same request the same way): raised temperature and a seed
    for i in ids[4:6]:
        qs = sorted((q for q in server.requests if q["sha"] == sha[i]), key=lambda q: q["attempt"])
        assert [q["body"]["temperature"] for q in qs] == [0.0, 0.7, 0.7], qs
        assert [q["body"].get("seed") for q in qs] == [None, 1, 2]
    # the plain retries (HTTP 500) ask the same
    assert all(q["body"]["temperature"] == 0.0 and "seed" not in q["body"] for q in server.requests if q["sha"] == sha[ids[6]])
    # usage: per record, and the run's totals
    report = json.loads((tmp_path / "caption-report.json").read_text())
    used = [r["usage"] for r in recs.values() if "usage" in r]
    assert len(used) >= 33
    assert report["prompt_tokens"] == sum(u["prompt_tokens"] for u in used) > 0
    assert report["completion_tokens"] == sum(u["completion_tokens"] for u in used) > 0
    assert f"{report['prompt_tokens']} prompt + {report['completion_tokens']} completion tokens" in p.stdout, p.stdout
    assert server.gets == 1, "one model-list request per run"

    # every request carried its slice's PNG (byte for byte) and that slice's prompt
    by_sha = {png_sha(cache, r): r for r in rows}
    for q in server.requests:
        row = by_sha[q["sha"]]
        assert q["image"] == (cache / row["png"]).read_bytes()
        pct = round(row["position"] * 100)
        assert f"{row['plane']} slice" in q["prompt"] and f"{pct}%" in q["prompt"], q["prompt"]
        assert q["path"] == "/v1/chat/completions"
        assert q["body"]["model"] == "fake-vlm"
        assert q["auth"] == f"Bearer {key}"
    # Retry-After honoured: gap between a slice's 429 and its next request
    for i, least in [(ids[1], 1.4), (ids[8], 1.0)]:
        t = [q["t"] for q in server.requests if q["sha"] == sha[i]]
        assert len(t) == 2 and t[1] - t[0] >= least, (i, t)

    # the key is in no artifact, log or output
    for f in cache.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert key not in p.stdout and key not in p.stderr

    # rerun: only the failed slices are asked again, and now succeed
    server.plan = {}
    server.reset_log()
    p = caption(cache, cfg, out, key=key)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(q["sha"] for q in server.requests) == sorted(sha[i] for i in ids[4:7])
    recs2 = one_per_slice(out, rows)
    assert all(r["status"] == "ok" for r in recs2.values())
    assert all(recs2[i] == recs[i] for i in ids if i not in ids[4:7])
    assert "33 skipped" in p.stdout, p.stdout

    # a changed prompt redoes every slice
    server.reset_log()
    write_config(cfg, server.base_url, prompt="Describe this {plane} {modality} slice in {max_words} words.")
    p = caption(cache, cfg, out, key=key)
    assert p.returncode == 0, p.stderr
    assert len(server.requests) == len(rows)
    recs3 = one_per_slice(out, rows)
    assert all(recs3[i]["prompt_hash"] != recs2[i]["prompt_hash"] for i in ids)
    report = json.loads((tmp_path / "caption-report.json").read_text())
    assert (report["captioned"], report["failed"], report["skipped"]) == (36, 0, 0)


def test_kill_9_mid_run_then_rerun(cache, tmp_path):
    rows = rows_of(cache)
    slow = Fake(delay=0.08)
    try:
        cfg = write_config(tmp_path / "c.yaml", slow.base_url, openai={"max_in_flight": 2})
        out = tmp_path / "captions.jsonl"
        proc = caption(cache, cfg, out, popen=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if out.exists() and out.read_text().count("\n") >= 4:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = records(out)
        assert 4 <= len(first) < len(rows)
        assert len({r["slice_id"] for r in first}) == len(first)
        # what a writer killed inside its write would leave
        with open(out, "ab") as f:
            f.write(b'{"slice_id": "anat/axial/3", "case": "an')
        slow.reset_log()
        p = caption(cache, cfg, out)
        assert p.returncode == 0, p.stdout + p.stderr
        recs = one_per_slice(out, rows)
        assert all(r["status"] == "ok" for r in recs.values())
        done_before = {r["slice_id"] for r in first if r["status"] == "ok"}
        asked = {q["sha"] for q in slow.requests}
        assert asked == {png_sha(cache, r) for r in rows if r["slice_id"] not in done_before}
    finally:
        slow.close()


def test_concurrent_shards_share_one_file(cache, tmp_path):
    rows = rows_of(cache)
    f = Fake(delay=0.02)
    try:
        cfg = write_config(tmp_path / "c.yaml", f.base_url, openai={"max_in_flight": 3})
        out = tmp_path / "captions.jsonl"
        procs = [caption(cache, cfg, out, shard=s, popen=True) for s in ("1/2", "2/2")]
        for p in procs:
            p.wait(timeout=120)
            assert p.returncode == 0, p.stderr.read()
        recs = one_per_slice(out, rows)
        assert all(r["status"] == "ok" for r in recs.values())
        assert len(f.requests) == len(rows)
        assert (tmp_path / "caption-report-shard-1-of-2.json").exists()
        assert (tmp_path / "caption-report-shard-2-of-2.json").exists()
    finally:
        f.close()


def test_unauthorised_stops_the_run(cache, server, tmp_path):
    server.default = ["401"]
    cfg = write_config(tmp_path / "c.yaml", server.base_url, openai={"max_in_flight": 2})
    out = tmp_path / "captions.jsonl"
    key = "sk-wrong-" + secrets.token_hex(8)
    p = caption(cache, cfg, out, key=key)
    assert p.returncode == 2
    assert "HTTP 401" in p.stderr and "MED3D_TEST_KEY" in p.stderr, p.stderr
    # the first slice is asked alone: one request, then nothing more
    assert len(server.requests) == 1
    recs = records(out)
    assert len(recs) == 1 and recs[0]["status"] == "failed" and recs[0]["attempts"] == 1
    assert "35 slices not attempted" in p.stderr, p.stderr
    assert key not in out.read_text() + p.stdout + p.stderr


def test_unreachable_server_stops_the_run(cache, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = write_config(
        tmp_path / "c.yaml",
        f"http://127.0.0.1:{port}/v1",
        openai={"max_in_flight": 2, "max_attempts": 50, "wait_for_server_s": 2},
    )
    out = tmp_path / "captions.jsonl"
    t0 = time.monotonic()
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert "no server answers at" in p.stderr and "waiting for the server" in p.stderr, p.stderr[-2000:]
    # the preflight waits 2 s, then the run stops before any slice
    assert time.monotonic() - t0 < 30
    assert not out.exists() or records(out) == []
    assert "36 slices not attempted" in p.stderr, p.stderr


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_starting_server_is_waited_for(cache, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", f"http://127.0.0.1:{port}/v1", openai={"wait_for_server_s": 60})
    out = tmp_path / "captions.jsonl"
    proc = caption(cache, cfg, out, popen=True)
    time.sleep(2.5)
    f = Fake(port=port)
    try:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stdout + stderr
        assert "waiting for the server" in stderr, stderr
        assert all(r["status"] == "ok" for r in one_per_slice(out, rows_of(cache)).values())
    finally:
        f.close()


def test_a_model_the_server_does_not_list_stops_before_any_slice(cache, server, tmp_path):
    server.models = ["qwen2.5-vl-7b", "llava"]
    cfg = write_config(tmp_path / "c.yaml", server.base_url)
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert 'does not serve caption.openai.model "fake-vlm"' in p.stderr, p.stderr
    assert "qwen2.5-vl-7b, llava" in p.stderr, p.stderr
    assert server.requests == []
    # a server without the endpoint is let be (said once), and the run goes on
    server.models = None
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("answered HTTP 404") == 1, p.stderr
    assert len(server.requests) == 36


def test_stop_means_stop(cache, server, tmp_path):
    """A run-stopping reply (404: wrong model or URL) to the first slice:
    nothing else is sent, even with 16 requests allowed in flight."""
    server.default = ["404"]
    cfg = write_config(tmp_path / "c.yaml", server.base_url, openai={"max_in_flight": 16})
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert "HTTP 404" in p.stderr and "/v1" in p.stderr, p.stderr
    assert len(server.requests) == 1
    report = json.loads((tmp_path / "caption-report.json").read_text())
    assert (report["failed"], report["not_attempted"], report["requests"]) == (1, 35, 1), report


def test_a_first_slice_failure_or_the_same_error_in_a_row_stops_the_run(cache, server, tmp_path):
    rows = rows_of(cache)
    # every slice: HTTP 400 (e.g. a pinned server asked for another model)
    server.default = ["400"]
    cfg = write_config(tmp_path / "c.yaml", server.base_url, openai={"max_in_flight": 8})
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 2
    assert "the first slice failed" in p.stderr and "HTTP 400" in p.stderr, p.stderr
    assert len(server.requests) == 1
    # the first slice answers, then every other one fails the same way
    server.reset_log()
    first = rows[0]
    server.plan = {png_sha(cache, first): ["ok"]}
    out2 = tmp_path / "captions2.jsonl"
    p = caption(cache, cfg, out2)
    assert p.returncode == 2
    assert "the same error on 5 slices in a row" in p.stderr, p.stderr
    # the first, 5 in a row, and at most the 8 slots already on the wire
    assert 6 <= len(server.requests) <= 6 + 8, len(server.requests)
    report = json.loads((tmp_path / "caption-report.json").read_text())
    assert report["not_attempted"] >= 36 - 14, report


def test_repeated_captions_are_flagged_then_dropped(cache, server, tmp_path):
    rows = rows_of(cache)
    # one generic sentence for every axial slice (12 of them)
    server.texts = {png_sha(cache, r): "An axial MRI slice of the head." for r in rows if r["plane"] == "axial"}
    cfg = write_config(tmp_path / "c.yaml", server.base_url, repeated_threshold=5)
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stderr
    recs = one_per_slice(out, rows)
    for r in rows:
        rec = recs[r["slice_id"]]
        want = ["repeated"] if r["plane"] == "axial" else []
        assert (rec["status"], rec["flags"]) == ("ok", want), rec
    assert "12 flagged" in p.stdout, p.stdout
    # policy drop: nothing is asked again (the records are done), and the
    # end-of-run judgement turns the repeated ones into dropped
    write_config(cfg, server.base_url, repeated_threshold=5, policy={"repeated": "drop"})
    server.reset_log()
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stderr
    assert server.requests == []
    recs = one_per_slice(out, rows)
    assert sum(r["status"] == "dropped" and r["flags"] == ["repeated"] for r in recs.values()) == 12
    # policy retry: the 12 are asked once more; the same answer again is kept, flagged
    write_config(cfg, server.base_url, repeated_threshold=5, policy={"repeated": "retry"})
    out2 = tmp_path / "captions2.jsonl"
    server.texts = {png_sha(cache, r): "An axial MRI slice of the head." for r in rows if r["plane"] == "axial"}
    p = caption(cache, cfg, out2)
    assert p.returncode == 0, p.stderr
    assert len(server.requests) == 36 + 12
    assert all(r["flags"] == ["repeated"] for r in records(out2) if r["plane"] == "axial")


def numbers(pattern, text):
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return [float(g) for g in m.groups()]


def test_descriptor_matches_numpy(cache, tmp_path):
    rows = rows_of(cache)
    cfg = tmp_path / "d.yaml"
    cfg.write_text("name: t\nmanifest: unused.yaml\nworkdir: unused\n")
    out = tmp_path / "captions.jsonl"
    p = caption(cache, cfg, out)
    assert p.returncode == 0, p.stderr
    assert "36 captioned" in p.stdout, p.stdout
    recs = one_per_slice(out, rows)
    vols, cases = {}, {}
    checked_ct = 0
    for row in rows:
        r = recs[row["slice_id"]]
        assert (r["status"], r["backend"], r["model"], r["attempts"]) == ("ok", "descriptor", "med3d-descriptor-v1", 1)
        c = row["case"]
        if c not in vols:
            vols[c] = np.load(cache / "cases" / c / "image.npy").astype(np.float32)
            cases[c] = json.loads((cache / "cases" / c / "case.json").read_text())
        vol, info = vols[c], cases[c]
        s = np.take(vol, row["index"], axis=PLANE_AXIS[row["plane"]])
        text = r["text"]
        assert text.startswith(f"{row['plane'].capitalize()} {info['modality']} slice {row['index'] + 1} of ")
        assert f"({round(row['position'] * 100)}%)" in text
        fg = s > 0.0
        if not fg.any():
            assert "no foreground" in text
            continue
        (share,) = numbers(r"Foreground covers (\d+)% of the slice", text)
        assert abs(share - 100 * fg.mean()) <= 0.51
        ii, jj = np.nonzero(fg)
        sp = info["geometry"]["spacing"]
        in_plane = [a for a in range(3) if a != PLANE_AXIS[row["plane"]]]
        e0, e1 = numbers(r"spanning (\d+) mm \S+ by (\d+) mm", text)
        assert abs(e0 - (ii.max() - ii.min() + 1) * sp[in_plane[0]]) <= 0.51
        assert abs(e1 - (jj.max() - jj.min() + 1) * sp[in_plane[1]]) <= 0.51
        if info["modality"] == "CT":
            lo, hi = info["intensity_window"]
            hu = lo + s[fg] * (hi - lo)
            want = [np.mean(hu < -400), np.mean((hu >= -400) & (hu < -30)), np.mean((hu >= -30) & (hu < 300)), np.mean(hu >= 300)]
            got = numbers(r"air/lung (\d+)%, fat (\d+)%, soft tissue (\d+)%, bone (\d+)%", text)
            assert np.allclose(got, 100 * np.array(want), atol=0.51), (got, want, text)
            checked_ct += 1
        else:
            got = numbers(r"p10 (\d+\.\d+), median (\d+\.\d+), p90 (\d+\.\d+)", text)
            want = np.percentile(s[fg], [10, 50, 90], method="nearest")
            assert np.allclose(got, want, atol=0.02), (got, want)
        if row["plane"] != "sagittal":
            x0, x1 = ii.min(), ii.max()
            a = np.where(fg, s, 0.0).astype(np.float64)
            diff = tot = 0.0
            for x in range(x0, x1 + 1):
                m = x0 + x1 - x
                if m <= x:
                    break
                diff += np.abs(a[x] - a[m]).sum()
                tot += (a[x] + a[m]).sum()
            (sym,) = numbers(r"symmetry (\d+\.\d+)", text)
            assert abs(sym - (1 - diff / tot)) <= 0.006, (sym, 1 - diff / tot)
        else:
            assert "symmetry" not in text
    assert checked_ct >= 6
    # rerun: everything is done
    p = caption(cache, cfg, out)
    assert p.returncode == 0 and "36 skipped" in p.stdout, p.stdout
    assert records(out) == list(recs.values()) or sorted(r["slice_id"] for r in records(out)) == sorted(recs)


def test_inspect_sheet_inlines_slices_and_marks_flags(cache, server, tmp_path):
    rows = rows_of(cache)
    sha = {r["slice_id"]: png_sha(cache, r) for r in rows}
    ids = [r["slice_id"] for r in rows]
    server.plan = {sha[ids[0]]: ["refusal"], sha[ids[1]]: ["length"]}
    cfg = write_config(tmp_path / "c.yaml", server.base_url, openai={"max_attempts": 1})
    out = tmp_path / "captions.jsonl"
    caption(cache, cfg, out)
    html_path = tmp_path / "sheet.html"
    p = subprocess.run(
        [str(BIN), "inspect", "--cache", cache, "--captions", out, "--out", html_path, "--limit", "8"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    html = html_path.read_text()
    cards = re.findall(r'<figure class="([^"]+)"><img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', html)
    # 2 needing a look + 8 sampled
    assert len(cards) == 10
    by_id = {r["slice_id"]: r for r in rows}
    import base64

    for cls, sid, b64 in cards:
        assert base64.b64decode(b64) == (cache / by_id[sid]["png"]).read_bytes()
    assert cards[0][:2] == ("card failed", ids[0])
    assert cards[1][:2] == ("card flagged", ids[1])
    assert '<span class="badge flag">truncated</span>' in html
    assert "I&#39;m sorry" in html
