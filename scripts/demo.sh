#!/usr/bin/env bash
# The run command from the README: a walk through volumed on the local
# backend (volumes are files, "attached" devices are symlinks), with the real
# RabbitMQ and PostgreSQL. Three volumes are attached to the appliance,
# detached, one is failed over to another VM and back, and all are deleted,
# while a second process records every completion event.
#
#   scripts/demo.sh                               work dir /tmp/volumed-demo
#   VOLUMED_DEMO_DIR=/var/tmp/d scripts/demo.sh   somewhere else
set -euo pipefail

cd "$(dirname "$0")/.."

DIR=${VOLUMED_DEMO_DIR:-/tmp/volumed-demo}
BIN=$PWD/target/debug/volumed
FAILOVER_VM=00000000-0000-4000-8000-0000000000b2
VOLUME_COUNT=3
# Completion events the walk-through must produce: attach + detach for each
# volume, then one failover attach and its detach.
EXPECTED_EVENTS=$((VOLUME_COUNT * 2 + 2))

heading() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

# --- work directory -----------------------------------------------------------
# The directory is wiped, so refuse anything that does not look like ours:
# it must be absolute and either absent, empty, or marked by an earlier run.
case "$DIR" in
    /*) ;;
    *) die "VOLUMED_DEMO_DIR must be an absolute path, got '$DIR'" ;;
esac
[ "$DIR" != / ] || die "refusing to use / as the demo directory"
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -e "$DIR/.volumed-demo" ]; then
    die "$DIR exists, is not empty and was not made by this script; pick another VOLUMED_DEMO_DIR"
fi
rm -rf "$DIR"
mkdir -p "$DIR/data" "$DIR/by-id"
touch "$DIR/.volumed-demo"

export VOLUMED_HOST_ID=demo-1
export VOLUMED_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
export VOLUMED_DATABASE_URL=postgres://postgres@127.0.0.1:5432/volumed_demo
export VOLUMED_BACKEND=local
export VOLUMED_DATA_DIR=$DIR/data
export VOLUMED_DEVICE_DIR=$DIR/by-id
export VOLUMED_APPLIANCE_VM_ID=00000000-0000-4000-8000-0000000000a1
export VOLUMED_WORKERS=4
# Volumes are served by an nbdkit that volumed starts and supervises, on a
# port of its own so that a system nbd-server on 10809 is left alone.
export VOLUMED_NBD_ENGINE=nbdkit
export VOLUMED_NBD_PORT=${VOLUMED_DEMO_NBD_PORT:-10810}
# The readiness check below looks for an info-level line.
export RUST_LOG=${RUST_LOG:-info}

# --- processes we start, and how they are stopped -------------------------------
daemon_pid=
events_pid=

stop_events() {
    if [ -n "$events_pid" ]; then
        kill -TERM "$events_pid" 2>/dev/null || true
        wait "$events_pid" 2>/dev/null || true
        events_pid=
    fi
}

# SIGTERM is the daemon's graceful shutdown: it stops consuming, finishes the
# messages in hand and exits. Returns the daemon's exit status.
stop_daemon() {
    local pid=$daemon_pid status=0
    [ -n "$pid" ] || return 0
    daemon_pid=
    kill -TERM "$pid" 2>/dev/null || true
    # Bounded, so a daemon that hangs on shutdown fails the demo instead of
    # hanging it.
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: volumed did not stop within 30 s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" || status=$?
    return "$status"
}

cleanup() {
    local rc=$?
    stop_events
    stop_daemon || true
    if [ "$rc" -ne 0 ] && [ -f "$DIR/volumed.log" ]; then
        printf '\ndemo failed (status %s); last lines of %s:\n' "$rc" "$DIR/volumed.log" >&2
        tail -n 40 "$DIR/volumed.log" >&2
    fi
}
trap cleanup EXIT
# Turn Ctrl-C and kill into an ordinary exit so the EXIT trap stops everything.
trap 'exit 130' INT
trap 'exit 143' TERM

# --- set-up -------------------------------------------------------------------
heading "services"
scripts/ensure-services.sh

heading "build"
# A debug build: much quicker than --release, and speed is not the point here.
cargo build --bin volumed

heading "database"
# A fresh database every run: the work directory is new too, and records of
# an earlier run would name volumes and exports that no longer exist.
dropdb -h 127.0.0.1 -U postgres --if-exists --force volumed_demo
createdb -h 127.0.0.1 -U postgres volumed_demo
"$BIN" migrate
echo "volumed_demo created and migrated"

heading "start the daemon (log: $DIR/volumed.log)"
"$BIN" run >"$DIR/volumed.log" 2>&1 &
daemon_pid=$!
# Ready means its request consumer is registered; requests sent before that
# would still be queued, but the log line tells us start-up went through.
ready=0
for _ in $(seq 60); do
    if grep -q consuming "$DIR/volumed.log"; then ready=1; break; fi
    kill -0 "$daemon_pid" 2>/dev/null || die "volumed exited during start-up"
    sleep 0.5
done
[ "$ready" -eq 1 ] || die "volumed did not start consuming within 30 s"
echo "volumed is consuming (pid $daemon_pid)"

heading "record completion events (to $DIR/events.jsonl)"
"$BIN" events --json >"$DIR/events.jsonl" 2>"$DIR/events.log" &
events_pid=$!
# The subscriber's queue must be bound before the first event is published or
# that event passes it by: wait for it to say so.
for _ in $(seq 100); do
    grep -q subscribed "$DIR/events.log" 2>/dev/null && break
    kill -0 "$events_pid" 2>/dev/null || die "volumed events exited: $(cat "$DIR/events.log")"
    sleep 0.1
done
grep -q subscribed "$DIR/events.log" || die "volumed events did not subscribe within 10 s"

# --- the walk-through -----------------------------------------------------------
heading "create $VOLUME_COUNT volumes of 64 MiB"
volumes=()
for i in $(seq "$VOLUME_COUNT"); do
    id=$("$BIN" volume create --size 64MiB)
    [ -n "$id" ] || die "volume create printed no id"
    volumes+=("$id")
    echo "volume $i: $id"
done

heading "attach each volume to the appliance VM $VOLUMED_APPLIANCE_VM_ID"
for id in "${volumes[@]}"; do
    echo "-- attach $id"
    # --wait prints the completion event and fails the demo if the attach did.
    "$BIN" attach --volume "$id" --vm "$VOLUMED_APPLIANCE_VM_ID" --wait
done
echo "-- devices in $VOLUMED_DEVICE_DIR:"
ls -l "$VOLUMED_DEVICE_DIR"
echo "-- exports, as recorded and as the NBD server answers:"
"$BIN" exports

heading "write through NBD and read back"
# Each volume gets its own byte pattern, written over NBD with qemu-io, read
# back over NBD, and compared with the volume's file on disk.
n=0
for id in "${volumes[@]}"; do
    n=$((n + 1))
    byte=$(printf '0x%02x' $((0xa0 + n)))
    uri="nbd://127.0.0.1:$VOLUMED_NBD_PORT/vol-$id"
    qemu-io -f raw "$uri" -c "write -P $byte 0 1M" | tail -n 1
    qemu-io -f raw "$uri" -c "read -P $byte 0 1M" | tail -n 1
    expected=$(head -c 1048576 /dev/zero | tr '\0' "\\$(printf '%03o' "$byte")" | md5sum)
    actual=$(head -c 1048576 "$VOLUMED_DATA_DIR/volumes/$id.img" | md5sum)
    [ "$expected" = "$actual" ] || die "volume $id does not hold the pattern written through NBD"
    echo "vol-$id: pattern $byte written over NBD is on the volume"
done

heading "detach each volume"
for id in "${volumes[@]}"; do
    echo "-- detach $id"
    "$BIN" detach --volume "$id" --wait
    # The export was withdrawn before the detach: a new connection fails.
    if out=$(qemu-io -f raw "nbd://127.0.0.1:$VOLUMED_NBD_PORT/vol-$id" -c "read 0 512" 2>&1); then
        die "vol-$id still accepts connections after the detach"
    fi
    echo "new connection to vol-$id refused: $(printf '%s\n' "$out" | head -n 1)"
done
echo "-- devices in $VOLUMED_DEVICE_DIR:"
ls -l "$VOLUMED_DEVICE_DIR"
[ -z "$(ls -A "$VOLUMED_DEVICE_DIR")" ] || die "devices left behind after detaching everything"
echo "(empty, as it should be)"

heading "failover: attach ${volumes[0]} to VM $FAILOVER_VM, then detach it"
# Another VM's attach is a cloud operation only: no device appears here and
# nothing is exported.
"$BIN" attach --volume "${volumes[0]}" --vm "$FAILOVER_VM" --wait
[ -z "$(ls -A "$VOLUMED_DEVICE_DIR")" ] || die "a failover attach created a local device"
"$BIN" detach --volume "${volumes[0]}" --wait

heading "delete the volumes"
for id in "${volumes[@]}"; do
    "$BIN" volume delete "$id"
    echo "deleted $id"
done

# --- wrap-up --------------------------------------------------------------------
heading "events received"
# The relay publishes after commit, so the last event can trail the CLI's
# --wait by a moment: give the subscriber a short grace period.
for _ in $(seq 20); do
    [ "$(wc -l <"$DIR/events.jsonl")" -ge "$EXPECTED_EVENTS" ] && break
    sleep 0.25
done
stop_events
cat "$DIR/events.jsonl"

heading "stop the daemon"
status=0
stop_daemon || status=$?
[ "$status" -eq 0 ] || die "volumed exited with status $status after SIGTERM"
echo "volumed stopped cleanly"

received=$(wc -l <"$DIR/events.jsonl")
succeeded=$(grep -c '"type": *"volume\.[a-z]*\.succeeded"' "$DIR/events.jsonl" || true)
failed=$(grep -c '"type": *"volume\.[a-z]*\.failed"' "$DIR/events.jsonl" || true)
if [ "$received" -lt "$EXPECTED_EVENTS" ]; then
    echo "note: fewer events than expected; the subscriber may have bound its queue late" >&2
fi
echo
echo "summary: $VOLUME_COUNT volumes attached, detached and deleted, 1 failover;" \
    "$received/$EXPECTED_EVENTS events ($succeeded succeeded, $failed failed); files in $DIR"
