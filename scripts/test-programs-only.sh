#!/usr/bin/env bash
# The worker built without libtorch (cargo feature `torch` off): builds it in a target folder of
# its own, checks that it links no libtorch, runs its unit tests, and runs the integration tests
# of task command (the researcher's own programs, hostile ones included) through it.
# scripts/test.sh runs this after the main suite; it needs that suite's build (the coordinator and
# the test binary).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
target=target/programs-only
cargo build --release -p seedsweep-worker --no-default-features --target-dir "$target"
worker="$PWD/$target/release/worker"
# Read whole before searching (a pipe into grep -q can kill ldd with SIGPIPE under pipefail).
links=$(ldd "$worker")
if grep -q torch <<<"$links"; then
  echo "error: the worker built without feature torch links libtorch:" >&2
  grep torch <<<"$links" >&2
  exit 1
fi
cargo test --release -p seedsweep-worker --no-default-features --target-dir "$target" --lib
SEEDSWEEP_TEST_WORKER="$worker" cargo test --release -p seedsweep-tests --test it -- --include-ignored \
  hostile:: command:: programs_only::
