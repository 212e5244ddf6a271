#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the test bed, builds the module, starts SeaweedFS,
# runs unit and integration tests (Valkey 9.1; the compatibility subset on Valkey 8.0 and Redis 7.0),
# and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
started_s3=0
if ! bash scripts/s3.sh status >/dev/null 2>&1; then
  bash scripts/s3.sh start
  started_s3=1
fi
cleanup() { [ "$started_s3" = 1 ] && bash scripts/s3.sh stop || true; }
trap cleanup EXIT
cargo build --locked
cargo test --locked -- --test-threads="${FLOWARCHIVE_TEST_THREADS:-4}" "$@"
# The unit tests that talk to the test bed's SeaweedFS (`cargo test --lib` alone needs no server).
cargo test --locked --lib -- --ignored
