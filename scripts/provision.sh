#!/usr/bin/env bash
# Provision a Debian 12 machine (as root) for swarm: system packages, the Docker engine, the
# offline base and sandbox images, the project's virtualenv. Idempotent: each step checks
# first and does nothing when its work is already done, so a second run takes seconds.
#
#   SWARM_PROVISION_DIR   state: dockerd log, build logs, scratch root fs (/var/lib/swarm)
#   SWARM_DOCKER_WAIT_S   how long to wait for a started dockerd to answer (60)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${SWARM_PROVISION_DIR:-/var/lib/swarm}
DOCKER_WAIT_S=${SWARM_DOCKER_WAIT_S:-60}
BASE_IMAGE=swarm-base:bookworm-2
# Bump BASE_IMAGE's tag when this list changes, so provisioning builds the new base.
BASE_PACKAGES=python3,python3-pytest,git,procps,diffutils,patch,ca-certificates
SANDBOX_DIR="$ROOT/sandboxes/default"
SANDBOX_IMAGE=swarm-sandbox:latest
APP_IMAGE=swarm:latest  # swarm itself, for docker-compose.yml's services
WHEELS="$ROOT/build/wheels"
WHEELS_STAMP="$WHEELS/.swarm-pyproject.sha256"
HASH_LABEL=swarm.content-hash
VENV="$ROOT/.venv"
VENV_STAMP="$VENV/.swarm-pyproject.sha256"

step() { printf '%-40s %s\n' "$1" "$2"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }
tail_log() { printf -- '--- last lines of %s ---\n' "$1" >&2; tail -n 25 "$1" >&2 || true; }
have() { command -v "$1" >/dev/null 2>&1; }
docker_up() { timeout 15 docker info >/dev/null 2>&1; }

if ! mkdir -p "$STATE_DIR" 2>/dev/null; then
    STATE_DIR="${TMPDIR:-/tmp}/swarm-provision-$(id -u)"  # not root: logs go here instead
    mkdir -p "$STATE_DIR"
fi

# ---- 1. system packages ------------------------------------------------------------------
# binary:package pairs; a package is installed only when its binary is missing.
ensure_packages() {
    local missing=() pair
    for pair in redis-server:redis-server dockerd:docker.io debootstrap:debootstrap tmux:tmux \
                docker-compose:docker-compose; do
        have "${pair%%:*}" || missing+=("${pair#*:}")
    done
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ ${#missing[@]} -eq 0 ]; then
        step "apt packages" ok
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}): run this script as root"
    local log="$STATE_DIR/apt.log"
    # The packages try to start system services; with no init system that is refused, harmlessly.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >"$log" 2>&1; then
        tail_log "$log"
        die "apt-get install ${missing[*]} failed (full log: $log)"
    fi
    step "apt packages (${missing[*]})" installed
}

# ---- 2. the Docker engine ----------------------------------------------------------------
ensure_dockerd() {
    if docker_up; then
        step "docker engine" ok
        return
    fi
    if [ -n "${DOCKER_HOST:-}" ] && [ "$DOCKER_HOST" != "unix:///var/run/docker.sock" ]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer 'docker info'; start that engine or unset DOCKER_HOST"
    fi
    local log="$STATE_DIR/dockerd.log" pid
    # An engine that is starting but not answering yet is waited for, not started twice.
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        [ "$(id -u)" -eq 0 ] || die "no Docker engine answers; start dockerd as root (or run this script as root)"
        setsid nohup dockerd >>"$log" 2>&1 </dev/null &
    fi
    local waited=0
    until docker_up; do
        if [ "$waited" -ge "$DOCKER_WAIT_S" ]; then
            tail_log "$log"
            die "dockerd did not answer 'docker info' within ${DOCKER_WAIT_S}s (log: $log)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    step "docker engine (dockerd, log $log)" started
}

# ---- 3. the offline base image -----------------------------------------------------------
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        step "image $BASE_IMAGE" ok
        return
    fi
    local rootfs="$STATE_DIR/rootfs" log="$STATE_DIR/debootstrap.log"
    rm -rf "$rootfs"  # a half-made root fs from an interrupted run is not reusable
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" >"$log" 2>&1; then
        tail_log "$log"
        die "debootstrap failed (log: $log)"
    fi
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null ||
        die "docker import of $rootfs as $BASE_IMAGE failed"
    rm -rf "$rootfs"
    step "image $BASE_IMAGE" built
}

# ---- 4. the sandbox image, rebuilt only when its folder (or the base) changed -------------
# The hash of what an image is built from: the base image and the files under DIR that the
# given paths name (caches excluded). inputs_hash DIR PATH...
inputs_hash() {
    local dir=$1
    shift
    {
        echo "base $(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")"
        (cd "$dir" && find "$@" -type f -not -path '*/__pycache__/*' -print0 |
            LC_ALL=C sort -z | xargs -0 -r sha256sum)
    } | sha256sum | cut -d' ' -f1
}

# A locally built image, rebuilt only when the hash of its inputs changed (kept in a label).
# ensure_image NAME HASH CONTEXT LOG [docker build args...]
ensure_image() {
    local name=$1 want=$2 context=$3 log=$4 have_hash
    shift 4
    have_hash=$(docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" \
        "$name" 2>/dev/null || true)
    if [ "$have_hash" = "$want" ]; then
        step "image $name" ok
        return
    fi
    # The classic builder works offline with a local base (it prints a deprecation notice).
    if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE=$BASE_IMAGE" "$@" \
            --label "$HASH_LABEL=$want" -t "$name" "$context" >"$log" 2>&1; then
        tail_log "$log"
        die "docker build of $name from $context failed (log: $log)"
    fi
    # The image this one replaced is now untagged; only ours carry the label.
    docker image prune -f --filter "label=$HASH_LABEL" >/dev/null 2>&1 || true
    step "image $name" built
}

ensure_sandbox_image() {
    [ -f "$SANDBOX_DIR/Dockerfile" ] || die "$SANDBOX_DIR/Dockerfile is missing"
    ensure_image "$SANDBOX_IMAGE" "$(inputs_hash "$SANDBOX_DIR" .)" "$SANDBOX_DIR" \
        "$STATE_DIR/build-sandbox.log"
}

# ---- 5. the project's virtualenv ---------------------------------------------------------
ensure_venv() {
    local state=ok want
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "swarm needs Python >= 3.11; python3 is $(python3 -V 2>&1)"
        python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
        state=installed
    fi
    want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ ! -x "$VENV/bin/swarm" ] || [ "$(cat "$VENV_STAMP" 2>/dev/null)" != "$want" ]; then
        local log="$STATE_DIR/pip.log"
        if ! (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]') >"$log" 2>&1; then
            tail_log "$log"
            die "pip install -e '.[dev]' failed (log: $log)"
        fi
        echo "$want" >"$VENV_STAMP"
        state=installed
    fi
    step "python venv .venv" "$state"
}

# ---- 6. swarm's own image, for docker-compose.yml -----------------------------------------
# Containers here reach no package index (TLS is intercepted), so the dependencies' wheels are
# made on the host, for the base image's Python 3.11 (hence async-timeout, which redis-py
# needs below 3.11.3), and the build installs from them alone.
ensure_wheels() {
    local want
    want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    [ "$(cat "$WHEELS_STAMP" 2>/dev/null)" = "$want" ] && return 0
    local log="$STATE_DIR/wheels.log"
    rm -rf "$WHEELS"
    if ! "$VENV/bin/python" -m pip wheel -q -w "$WHEELS" "$ROOT" 'setuptools>=68' \
            'async-timeout>=4.0.3' >"$log" 2>&1; then
        tail_log "$log"
        die "pip wheel of swarm's dependencies failed (log: $log)"
    fi
    rm -f "$WHEELS"/swarm-*.whl  # the image installs swarm from its source
    echo "$want" >"$WHEELS_STAMP"
}

ensure_app_image() {
    ensure_wheels
    local want
    want=$(inputs_hash "$ROOT" Dockerfile .dockerignore pyproject.toml README.md swarm build/wheels)
    ensure_image "$APP_IMAGE" "$want" "$ROOT" "$STATE_DIR/build-app.log" \
        --build-arg PIP_NO_INDEX=1
}

ensure_packages
ensure_dockerd
ensure_base_image
ensure_sandbox_image
ensure_venv
ensure_app_image
