#!/usr/bin/env bash
# Writes deploy/env/*.env (git-ignored): the variables of the committed
# *.env.example files with a fresh random value for every NATS password and the JWT
# secret, consistent across files (the password of user `gateway` in nats.env is the
# one in gateway.env, ...); and in deploy/nats/secrets/ (git-ignored, never in the
# image):
#   routes.conf     the NATS cluster's route credentials and its routes with them (0600)
#   ca.pem          a private CA made here (0644): what clients trust
#   server.pem      the NATS nodes' certificate, signed by that CA, for nats-1,
#                   nats-2, nats-3, localhost and 127.0.0.1, for clients and routes (0644)
#   server-key.pem  its private key (0600)
# The CA's own key is not kept: nothing can be signed by it afterwards.
# Writes all or nothing: when any of these files exists it stops (the passwords must
# agree across files, the certificates with their CA); delete them all to regenerate.
# Needs openssl (Debian: package openssl, which ca-certificates depends on).
#
#   ./deploy/init-env.sh
set -euo pipefail
deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_dir="$deploy_dir/env"
secrets_dir="$deploy_dir/nats/secrets"

shopt -s nullglob
existing=("$env_dir"/*.env "$secrets_dir"/*.conf "$secrets_dir"/*.pem)
if ((${#existing[@]} > 0)); then
  printf 'init-env: %s already exist; remove them all to regenerate\n' "${existing[*]}" >&2
  exit 1
fi
if ! command -v openssl >/dev/null; then
  echo 'init-env: openssl is needed to make the certificates (apt-get install openssl)' >&2
  exit 1
fi

# Everything is made in a scratch folder first and moved in place at the end, so a
# failure leaves nothing behind.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/env" "$stage/secrets"

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

declare -A pw
for user in admin gateway sequencer materializer compactor route; do
  pw[$user]="$(random)"
done
jwt="$(random)"

write() { # write NAME CONTENT
  (umask 077 && printf '%s\n' "$2" >"$stage/env/$1.env")
}

write nats "USYNC_ADMIN_PASSWORD=${pw[admin]}
USYNC_GATEWAY_PASSWORD=${pw[gateway]}
USYNC_SEQUENCER_PASSWORD=${pw[sequencer]}
USYNC_MATERIALIZER_PASSWORD=${pw[materializer]}
USYNC_COMPACTOR_PASSWORD=${pw[compactor]}"
write setup "ULTRASYNC_NATS_USER=admin
ULTRASYNC_NATS_PASSWORD=${pw[admin]}"
write gateway "ULTRASYNC_NATS_USER=gateway
ULTRASYNC_NATS_PASSWORD=${pw[gateway]}
ULTRASYNC_JWT_SECRET=$jwt"
for user in sequencer materializer compactor; do
  write "$user" "ULTRASYNC_NATS_USER=$user
ULTRASYNC_NATS_PASSWORD=${pw[$user]}"
done

(umask 077 && cat >"$stage/secrets/routes.conf" <<CONF
# Written by deploy/init-env.sh. Included in the cluster block of
# deploy/nats/cluster/nats-{1,2,3}.conf: routes authenticate with these credentials.
authorization { user: route, password: "${pw[route]}" }
routes: [
  nats-route://route:${pw[route]}@nats-1:6222
  nats-route://route:${pw[route]}@nats-2:6222
  nats-route://route:${pw[route]}@nats-3:6222
]
CONF
)

# The private CA and the nodes' certificate (ECDSA P-256, 10 years). One certificate
# for the three nodes: the client port and the route port present it, and a node
# verifies the node it routes to (and the one routing to it) against the CA, hence
# both serverAuth and clientAuth.
pki="$stage/pki"
mkdir -m 700 "$pki"
openssl_quiet() { # openssl ARGS...: its chatter only when it fails
  local out
  if ! out="$(openssl "$@" 2>&1)"; then
    printf 'init-env: openssl %s failed:\n%s\n' "$1" "$out" >&2
    exit 1
  fi
}
serial="$(random)"
openssl_quiet req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$pki/ca-key.pem" -out "$stage/secrets/ca.pem" -days 3650 \
  -subj "/O=ultrasync/CN=ultrasync compose CA ${serial:32:8}" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
(umask 077 && openssl_quiet req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$stage/secrets/server-key.pem" -out "$pki/server.csr" \
  -subj "/O=ultrasync/CN=nats")
cat >"$pki/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1
EXT
openssl_quiet x509 -req -in "$pki/server.csr" -CA "$stage/secrets/ca.pem" \
  -CAkey "$pki/ca-key.pem" -set_serial "0x${serial:0:32}" -days 3650 \
  -extfile "$pki/server.ext" -out "$stage/secrets/server.pem"
openssl_quiet verify -CAfile "$stage/secrets/ca.pem" -purpose sslserver "$stage/secrets/server.pem"
# Clients (the ultrasync containers run as uid 10001) read the CA and the certificate;
# only the NATS servers (root in the nats image) read the key and the route password.
chmod 0644 "$stage/secrets/ca.pem" "$stage/secrets/server.pem"
chmod 0600 "$stage/secrets/server-key.pem" "$stage/secrets/routes.conf"

mkdir -p "$env_dir" "$secrets_dir"
for f in "$stage"/env/*.env; do
  mv "$f" "$env_dir/"
  printf 'init-env: wrote %s\n' "$env_dir/${f##*/}" >&2
done
for f in routes.conf ca.pem server.pem server-key.pem; do
  mv "$stage/secrets/$f" "$secrets_dir/"
  printf 'init-env: wrote %s\n' "$secrets_dir/$f" >&2
done
