#!/usr/bin/env bash
# Health check of an ultrasync container, without curl (bash's /dev/tcp only).
#
#   ultrasync-healthcheck [gateway|compactor|nats]
#
# Without an argument the check follows the subcommand of PID 1 (the container's
# `ultrasync <subcommand>`):
#   gateway       GET /healthz on ULTRASYNC_LISTEN (port 8080 by default). With TLS
#                 (ULTRASYNC_TLS_CERT set) only a TCP connect, as bash speaks no TLS.
#   compactor     GET /healthz on ULTRASYNC_COMPACTOR_METRICS_LISTEN when set, else
#                 as `nats`.
#   nats          (sequencer, materializer, anything else) this container holds an
#                 established TCP connection to a port of ULTRASYNC_NATS_URL (4222
#                 by default), read from /proc/net/tcp{,6}. These services serve no
#                 HTTP, and a service that lost NATS is not doing its job.
# Exit 0 healthy, 1 not.
set -uo pipefail

role="${1:-}"
if [[ -z "$role" ]]; then
  role=nats
  if [[ -r /proc/1/cmdline ]]; then
    mapfile -d '' args < /proc/1/cmdline
    for a in "${args[@]:1}"; do
      case "$a" in
        gateway | compactor) role="$a"; break ;;
        sequencer | materializer) role=nats; break ;;
      esac
    done
  fi
fi

# http_ok HOST PORT PATH: a GET answered with 200.
http_ok() {
  local host="$1" port="$2" path="$3" status
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
  IFS= read -r -t 5 status <&3 || return 1
  exec 3<&-
  [[ "$status" =~ ^HTTP/1\.[01]\ 200 ]]
}

# host_port ADDR DEFAULT_PORT: "0.0.0.0:8080" -> "127.0.0.1 8080"; "[::]:8080" -> "::1 8080".
host_port() {
  local addr="$1" host port
  port="${addr##*:}"
  host="${addr%:*}"
  host="${host#[}"
  host="${host%]}"
  case "$host" in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    "::") host=::1 ;;
  esac
  [[ "$port" =~ ^[0-9]+$ ]] || port="$2"
  printf '%s %s' "$host" "$port"
}

# nats_connected: an ESTABLISHED (state 01) socket whose remote port is a NATS port.
nats_connected() {
  local urls="${ULTRASYNC_NATS_URL:-nats://127.0.0.1:4222}" url hostport p ports=()
  IFS=',' read -r -a list <<<"$urls"
  for url in "${list[@]}"; do
    url="${url#*://}"
    url="${url##*@}"
    hostport="${url%%/*}"
    p=4222
    [[ "$hostport" =~ :([0-9]+)$ ]] && p="${BASH_REMATCH[1]}"
    ports+=("$(printf '%04X' "$p")")
  done
  local f sl local_addr remote state rest
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r "$f" ]] || continue
    while read -r sl local_addr remote state rest; do
      [[ "$state" == 01 ]] || continue
      for p in "${ports[@]}"; do
        [[ "${remote##*:}" == "$p" ]] && return 0
      done
    done <"$f"
  done
  return 1
}

case "$role" in
  gateway)
    read -r host port <<<"$(host_port "${ULTRASYNC_LISTEN:-127.0.0.1:8080}" 8080)"
    if [[ -n "${ULTRASYNC_TLS_CERT:-}" ]]; then
      exec 3<>"/dev/tcp/$host/$port"
    else
      http_ok "$host" "$port" /healthz
    fi
    ;;
  compactor)
    if [[ -n "${ULTRASYNC_COMPACTOR_METRICS_LISTEN:-}" ]]; then
      read -r host port <<<"$(host_port "$ULTRASYNC_COMPACTOR_METRICS_LISTEN" 9464)"
      http_ok "$host" "$port" /healthz
    else
      nats_connected
    fi
    ;;
  nats) nats_connected ;;
  *)
    echo "ultrasync-healthcheck: unknown check $role (gateway, compactor, nats)" >&2
    exit 2
    ;;
esac
