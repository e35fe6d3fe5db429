#!/usr/bin/env bash
# Writes deploy/env/*.env (git-ignored): the variables of the committed
# *.env.example files with a fresh random value for every NATS password and the JWT
# secret, consistent across files (the password of user `gateway` in nats.env is the
# one in gateway.env, ...); and deploy/nats/secrets/routes.conf (git-ignored): the
# NATS cluster's route credentials and its routes with them.
# Writes all or nothing: when any *.env exists it stops (the passwords must agree
# across files); delete them all to regenerate.
#
#   ./deploy/init-env.sh
set -euo pipefail
deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_dir="$deploy_dir/env"
secrets_dir="$deploy_dir/nats/secrets"

shopt -s nullglob
existing=("$env_dir"/*.env "$secrets_dir"/*.conf)
if ((${#existing[@]} > 0)); then
  printf 'init-env: %s already exist; remove them all to regenerate\n' "${existing[*]}" >&2
  exit 1
fi

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

declare -A pw
for user in admin gateway sequencer materializer compactor route; do
  pw[$user]="$(random)"
done
jwt="$(random)"

write() { # write NAME CONTENT
  local file="$env_dir/$1.env"
  (umask 077 && printf '%s\n' "$2" >"$file")
  printf 'init-env: wrote %s\n' "$file" >&2
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

mkdir -p "$secrets_dir"
routes="$secrets_dir/routes.conf"
(umask 077 && cat >"$routes" <<EOF
# Written by deploy/init-env.sh. Included in the cluster block of
# deploy/nats/cluster/nats-{1,2,3}.conf: routes authenticate with these credentials.
authorization { user: route, password: "${pw[route]}" }
routes: [
  nats-route://route:${pw[route]}@nats-1:6222
  nats-route://route:${pw[route]}@nats-2:6222
  nats-route://route:${pw[route]}@nats-3:6222
]
EOF
)
printf 'init-env: wrote %s\n' "$routes" >&2
