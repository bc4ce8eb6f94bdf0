#!/usr/bin/env bash
# The test command from the README: make sure PostgreSQL and RabbitMQ are up
# (the integration tests run against the real ones), lint, build, test.
#
#   scripts/test.sh                 everything
#   scripts/test.sh --test attach   extra arguments go to `cargo test`, before
#                                   its `--` (a test-name filter works too)
#   VOLUMED_LINT=0 scripts/test.sh  skip rustfmt and clippy
set -euo pipefail

# Run from the repository root whatever the caller's directory.
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "services"
scripts/ensure-services.sh

# Lints come first: they are cheaper than the tests and CI fails on them anyway.
if [ "${VOLUMED_LINT:-1}" != 0 ]; then
    step "cargo fmt --check"
    cargo fmt --check
    step "cargo clippy"
    cargo clippy --all-targets -- -D warnings
fi

step "cargo build"
cargo build --all-targets

# Each integration test owns its database, queues and NBD port, so tests can
# run side by side; two at a time keeps the number of live databases, broker
# connections and NBD servers bounded on 2-core machines. With four, the
# nbd-server tests (a reload under a connected client, two daemons on one
# server) were starved often enough to miss their deadlines.
step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets "$@" -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run: cargo prints a result line per test
# binary, the last of which (doc tests) says "0 passed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
