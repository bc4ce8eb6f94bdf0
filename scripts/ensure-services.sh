#!/usr/bin/env bash
# Make a Debian 12 machine ready to build and test volumed: the Debian
# packages it needs, a running PostgreSQL that trusts local TCP connections
# as `postgres`, and a running RabbitMQ with the guest user and every feature
# flag enabled (the quorum-queue arguments in queue-topology/ rely on them).
#
# Idempotent and quick when everything is already in place: no apt-get
# update, no restarts, only read-only checks. Prints one line per service.
set -euo pipefail

# The build needs a C compiler and linker (the TLS crate `ring` compiles C,
# and rustc links through `cc`) and pkg-config; tests/security.rs runs the
# `openssl` command line for its certificates and stand-in TLS server. The
# services, NBD servers and tools come after.
PACKAGES=(build-essential pkg-config openssl
          rabbitmq-server postgresql nbdkit nbd-server libnbd-bin qemu-utils fonts-dejavu-core)
# Everything is reached over loopback TCP, as the daemon and the tests do.
HOST=127.0.0.1
PG_PORT=5432
AMQP_PORT=5672

log() { printf '%s\n' "$*"; }
die() { printf 'ensure-services: error: %s\n' "$*" >&2; exit 1; }

# Privileged commands (apt-get, pg_ctlcluster, rabbitmqctl, which needs the
# Erlang cookie) go through $SUDO; the Postgres checks run as the caller.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed; run this script as root"
    # Without a terminal (CI) sudo must fail rather than wait for a password.
    if [ -t 0 ]; then SUDO=(sudo); else SUDO=(sudo -n); fi
fi

# True when something accepts TCP connections on host:port. Uses bash's
# /dev/tcp so it needs no netcat; the timeout covers filtered ports.
port_open() {
    timeout 2 bash -c ">/dev/tcp/$1/$2" 2>/dev/null
}

# --- toolchain --------------------------------------------------------------
# Rust cannot be installed from here (no toolchain downloads), so say how.
if ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found. Install Rust with rustup (https://rustup.rs), e.g.
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
then open a new shell (or 'source \$HOME/.cargo/env') and run this again."
fi

# --- Debian packages --------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query fails for a package it has never heard of; a removed package
    # reports "deinstall ok config-files". Only "install ok installed" counts.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done

pg_fresh=0
if [ "${#missing[@]}" -gt 0 ]; then
    log "packages: installing ${missing[*]}"
    # The package index is refreshed only when something is actually missing,
    # which keeps the common case fast and offline.
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    for pkg in "${missing[@]}"; do
        [ "$pkg" = postgresql ] && pg_fresh=1
    done
    log "packages: installed ${missing[*]}"
else
    log "packages: all present"
fi

# --- PostgreSQL -------------------------------------------------------------
pg_ready() { pg_isready -q -h "$HOST" -p "$PG_PORT" >/dev/null 2>&1; }
pg_login() { psql -h "$HOST" -p "$PG_PORT" -U postgres -w -qAt -c 'select 1' >/dev/null 2>&1; }

# Newest installed major version: the one a fresh install created.
pg_version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
    | sort -V | tail -n 1 || true)

if pg_ready; then
    pg_action="already running"
else
    [ -n "$pg_version" ] || die "no PostgreSQL cluster under /etc/postgresql; create one with: pg_createcluster 15 main"
    # --skip-systemctl-redirect: containers and CI machines often have no
    # systemd, and pg_ctlcluster would otherwise hand the start to systemctl.
    "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    for _ in $(seq 60); do
        pg_ready && break
        sleep 1
    done
    pg_ready || die "PostgreSQL $pg_version/main did not accept connections on $HOST:$PG_PORT within 60 s (see /var/log/postgresql/)"
    pg_action="started"
fi

if ! pg_login; then
    # pg_hba.conf is an operator's file: it is edited only on a cluster this
    # run has just installed, where the Debian default (scram for 127.0.0.1)
    # is known and nothing depends on it yet.
    hba="/etc/postgresql/$pg_version/main/pg_hba.conf"
    if [ "$pg_fresh" -eq 1 ] && [ -n "$pg_version" ] && "${SUDO[@]}" test -f "$hba"; then
        # pg_hba.conf is first-match, so the trust line must come before the
        # default scram line: prepend it.
        tmp=$(mktemp)
        { echo 'host all all 127.0.0.1/32 trust  # added by volumed scripts/ensure-services.sh'
          "${SUDO[@]}" cat "$hba"; } >"$tmp"
        "${SUDO[@]}" cp "$tmp" "$hba"
        rm -f "$tmp"
        "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
        sleep 1
        pg_action="$pg_action, trust auth for 127.0.0.1 added"
    fi
    pg_login || die "cannot connect as 'postgres' to $HOST:$PG_PORT without a password.
The tests and the demo need trust auth for local TCP. Add this line above the
other 'host' lines of $hba:
    host all all 127.0.0.1/32 trust
then reload: pg_ctlcluster $pg_version main reload"
fi
log "postgresql: $pg_action"

# --- RabbitMQ ---------------------------------------------------------------
# rabbitmqctl needs the Erlang cookie, hence root.
rmqctl() { "${SUDO[@]}" rabbitmqctl -q "$@"; }

# An open AMQP port means a broker is up; checking it first saves the
# second an Erlang CLI start costs.
if port_open "$HOST" "$AMQP_PORT"; then
    rmq_action="already running"
elif rmqctl status >/dev/null 2>&1; then
    # Node is up but the listener is not yet: it is still booting.
    timeout 120 "${SUDO[@]}" rabbitmqctl -q await_startup \
        || die "RabbitMQ node is running but did not finish booting within 120 s"
    rmq_action="already running (finished booting)"
else
    # The Debian wrapper drops to the rabbitmq user by itself.
    "${SUDO[@]}" rabbitmq-server -detached
    timeout 120 "${SUDO[@]}" rabbitmqctl -q await_startup \
        || die "RabbitMQ did not start within 120 s (see /var/log/rabbitmq/)"
    rmq_action="started"
fi
port_open "$HOST" "$AMQP_PORT" \
    || die "RabbitMQ runs but nothing listens on $HOST:$AMQP_PORT; check listeners.tcp in /etc/rabbitmq/rabbitmq.conf"

# guest/guest is what tests and the demo use. Debian's default config lets
# guest in from loopback only, which is all we need.
if ! rmqctl list_users 2>/dev/null | awk '{print $1}' | grep -qx guest; then
    # Recreated only when absent; an existing guest with another password is
    # someone's choice, reported below rather than overwritten.
    rmqctl add_user guest guest >/dev/null
    rmqctl set_user_tags guest administrator >/dev/null
    rmq_action="$rmq_action, user guest created"
fi
rmqctl authenticate_user guest guest >/dev/null 2>&1 \
    || die "RabbitMQ user 'guest' exists but its password is not 'guest'; reset it with: rabbitmqctl change_password guest guest"
if ! rmqctl list_user_permissions guest 2>/dev/null | awk -F'\t' '$1 == "/" {found=1} END {exit !found}'; then
    rmqctl set_permissions -p / guest '.*' '.*' '.*' >/dev/null
    rmq_action="$rmq_action, guest granted vhost /"
fi

# Quorum-queue dead-lettering (at-least-once) needs the newer feature flags;
# a broker upgraded in place keeps them off until asked. Older releases do
# not accept `all`; there the flags must be enabled one by one.
rmqctl enable_feature_flag all >/dev/null 2>&1 \
    || log "rabbitmq: warning: 'enable_feature_flag all' not supported; enable flags by hand (rabbitmqctl list_feature_flags)"
log "rabbitmq: $rmq_action"
