#!/usr/bin/env bash
# Builds the Dockerfile with a real container engine (podman) on a machine
# that reaches no container registry, and runs the image as a batch job
# would (`make docker-check`, run by .ci/run). Steps:
#   1. installs podman, runc and debootstrap when missing (Debian);
#   2. makes the base image localhost/debian:bookworm with debootstrap;
#   3. builds the image offline: that base, the host's Rust toolchain and
#      (where the network intercepts TLS) the host's CA bundle handed to
#      the build as build-time volumes;
#   4. runs `med3d doctor --json` in it;
#   5. runs `med3d run` on the demo in it, the repository mounted read-only
#      and a work folder mounted writable, as the invoking user, and the
#      same config with the host build; the pretraining losses must agree;
#   6. checks who owns what the container wrote;
#   7. stops the container (SIGTERM, `podman stop`) during pretraining and
#      checks that --resume continues from its checkpoint to the losses of
#      the uninterrupted run.
# Prints one line per check and a closing 'N passed, N failed' line; exits
# non-zero when any check failed. Needs root (podman as root) and the host
# build (`make build`). DOCKER_CHECK_STEPS (default 12) sets the demo's
# pretraining steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/work/docker
IMAGE=localhost/med3d:check
BASE=localhost/debian:bookworm
STEPS=${DOCKER_CHECK_STEPS:-12}
BIN=${MED3D_BIN:-$ROOT/target/release/med3d}
PY=${PY:-$ROOT/.venv/bin/python}
passed=0
failed=0
ok() { echo "docker-check: ok   $*"; passed=$((passed + 1)); }
bad() { echo "docker-check: FAIL $*"; failed=$((failed + 1)); }
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0))s"; }

mkdir -p "$W"
# 1. The engine. podman as root needs two settings here: no default
# ulimits (runc: "error setting rlimit type 7") and runc (crun refuses a
# hybrid cgroup hierarchy). Our own containers.conf, not the system's.
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || need+=(runc)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
cat > "$W/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$W/containers.conf

# 2. The base image, from Debian's packages (no registry).
if ! podman image exists "$BASE"; then
  rm -rf "$W/rootfs"
  debootstrap --variant=minbase bookworm "$W/rootfs" http://deb.debian.org/debian >"$W/debootstrap.log" 2>&1
  tar -C "$W/rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$W/rootfs"
fi
ok "base image $BASE ($(elapsed))"

# 3. The image. The CA bundle only where the host trusts a private CA.
build=(podman build --format docker --network host --build-arg BASE="$BASE" --build-arg GIT_HASH="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  --build-arg RUST_HOME=/opt/rust -v "$(rustc --print sysroot)":/opt/rust:ro -t "$IMAGE")
for ca in /etc/ssl/certs/ca-certificates.crt; do
  [ -f "$ca" ] && build+=(-v "$ca":/run/host-ca.crt:ro --build-arg CA_BUNDLE=/run/host-ca.crt)
done
tb=$(date +%s)
if "${build[@]}" . >"$W/build.log" 2>&1; then
  size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
  ok "image built in $(($(date +%s) - tb))s, $((size / 1000000)) MB"
else
  tail -30 "$W/build.log"
  bad "image build (log: $W/build.log)"
  echo "$passed passed, $failed failed"
  exit 1
fi

run=(podman run --rm --network host --ipc host --user "$(id -u):$(id -g)")

# 4. doctor
if "${run[@]}" "$IMAGE" doctor --json >"$W/doctor.json" 2>"$W/doctor.err" \
  && "$PY" - "$W/doctor.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
flat = json.dumps(d)
assert "2.11.0" in flat, "libtorch 2.11.0 not reported"
assert d["gzip"]["inflater"] == "isa-l", f"gzip inflater in the image: {d['gzip']}"
PY
then ok "med3d doctor --json in the image"; else cat "$W/doctor.err"; bad "med3d doctor --json"; fi

# 5. The demo in the image and on the host, same config.
rm -rf "$W/run" "$W/host"
mkdir -p "$W/run" "$W/host"
for side in run host; do
  cat > "$W/$side/demo.yaml" <<EOF
extends: $( [ $side = run ] && echo /repo || echo "$ROOT" )/experiments/demo.yaml
workdir: $( [ $side = run ] && echo /out || echo "$W/host" )/demo
pretrain:
  max_steps: $STEPS
  run: {checkpoint_every: 2}
EOF
done
td=$(date +%s)
if "${run[@]}" -v "$ROOT":/repo:ro -v "$W/run":/out -w /repo "$IMAGE" run --config /out/demo.yaml >"$W/run.log" 2>&1; then
  ok "med3d run on the demo in the image ($(($(date +%s) - td))s)"
else
  tail -20 "$W/run.log"; bad "med3d run on the demo in the image (log: $W/run.log)"
fi
"$BIN" run --config "$W/host/demo.yaml" >"$W/host.log" 2>&1 || { tail -20 "$W/host.log"; bad "host demo run"; }
losses() {
  "$PY" - "$1" "$2" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) and a, (len(a), len(b))
worst = 0.0
for x, y in zip(a, b):
    assert x["step"] == y["step"]
    for k in x:
        if k.startswith("loss") and isinstance(x[k], float):
            worst = max(worst, abs(x[k] - y[k]) / (1e-12 + abs(y[k])))
print(f"{len(a)} steps, last loss {a[-1]['loss']:.6f} vs {b[-1]['loss']:.6f}, worst relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
PY
}
if msg=$(losses "$W/run/demo/runs/demo/metrics.jsonl" "$W/host/demo/runs/demo/metrics.jsonl"); then
  ok "image and host pretraining losses agree: $msg"
else
  bad "image and host pretraining losses: $msg"
fi

# 6. Ownership of what the container wrote.
want="$(id -u):$(id -g)"
owners=$(find "$W/run/demo" -printf '%U:%G\n' | sort -u | tr '\n' ' ')
if [ "$owners" = "$want " ]; then
  ok "files written to the mounted work folder belong to the invoking user ($want)"
else
  bad "files written to the mounted work folder belong to $owners, not $want"
fi

# Without --user the image runs as its own non-root user.
if [ "$("${run[@]:0:3}" --entrypoint id "$IMAGE" -u)" = 1000 ]; then
  ok "without --user the image runs as uid 1000 (med3d), not root"
else
  bad "the image's default user is not uid 1000"
fi

# 7. SIGTERM during pretraining, then --resume.
cache=/out/demo/cache
term=(pretrain --config /out/demo.yaml --cache "$cache" --out /out/term)
rm -rf "$W/run/term"
podman rm -f m3d-term >/dev/null 2>&1 || true
podman run -d --name m3d-term --network host --ipc host --user "$(id -u):$(id -g)" \
  -v "$ROOT":/repo:ro -v "$W/run":/out -w /repo "$IMAGE" "${term[@]}" >/dev/null
for _ in $(seq 1 600); do
  n=$( (wc -l <"$W/run/term/metrics.jsonl") 2>/dev/null || echo 0)
  [ "$n" -ge 3 ] && break
  sleep 1
done
podman stop -t 300 m3d-term >/dev/null
code=$(podman inspect m3d-term --format '{{.State.ExitCode}}')
podman logs m3d-term >"$W/term.log" 2>&1 || true
podman rm m3d-term >/dev/null
stopped=$(cat "$W/run/term/checkpoints/latest" 2>/dev/null || echo none)
if [ "$stopped" != none ] && [ "$stopped" != "$(printf 'step-%08d' "$STEPS")" ]; then
  ok "podman stop (SIGTERM) mid-run: exit $code, checkpoint $stopped"
else
  bad "podman stop (SIGTERM) mid-run left checkpoint $stopped (exit $code; log $W/term.log)"
fi
if "${run[@]}" -v "$ROOT":/repo:ro -v "$W/run":/out -w /repo "$IMAGE" "${term[@]}" --resume >"$W/resume.log" 2>&1 \
  && msg=$(losses "$W/run/term/metrics.jsonl" "$W/run/demo/runs/demo/metrics.jsonl"); then
  ok "--resume after SIGTERM reaches the uninterrupted run's losses: $msg"
else
  tail -20 "$W/resume.log"; bad "--resume after SIGTERM: ${msg:-see $W/resume.log}"
fi
echo "docker-check: $(elapsed) in all"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
