#!/usr/bin/env bash
# Runs every test: unit tests, the store conformance suite on SQLite and PostgreSQL, and the
# end-to-end sweeps through the real binaries. Sets up what it needs first (libtorch into the
# per-user cache; PostgreSQL's server binaries via apt-get when missing and we are root), so it
# works from a fresh clone and is quick the second time.
#
#   DATABASE_URL   use this PostgreSQL server instead of a throwaway cluster per test
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

have_postgres() {
  command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if [ -z "${DATABASE_URL:-}" ] && ! have_postgres; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing PostgreSQL (server binaries for the tests' throwaway clusters) ..." >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    echo "error: the tests need PostgreSQL's server binaries (initdb, pg_ctl): install PostgreSQL, or set DATABASE_URL to a server where the tests may create databases" >&2
    exit 1
  fi
fi
command -v sqlite3 >/dev/null || {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >&2
  else
    echo "error: the tests query results with the sqlite3 command-line client: install sqlite3" >&2; exit 1
  fi
}

command -v chromedriver >/dev/null || {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Chromium and chromedriver (the dashboard's browser test) ..." >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
  else
    echo "error: the dashboard's browser test drives Chromium: install chromium and chromium-driver (Debian's packages)" >&2; exit 1
  fi
}

cargo build --release --workspace --bins
cargo test --release --workspace "$@"
scripts/test-programs-only.sh
