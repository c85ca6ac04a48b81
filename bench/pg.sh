# Sourced by the benchmark scripts: builds the release binaries, starts a throwaway PostgreSQL
# cluster on a free port (as the postgres user when run as root) and stops and removes it, with
# any background jobs, on exit. Sets bin, pgbin, work, pg (the server's URL, no database) and
# as_pg, median, field, cpu_times, steal_since, bare_setup, bare_tps, settle, serve_at and
# measure.
#   PG_MAX_CONNECTIONS   default 400
#   PG_OPTIONS           further server options, e.g. for profiling:
#                        "-c shared_preload_libraries=pg_stat_statements
source scripts/env.sh
cargo build --release --bins -q
bin=target/release

pgbin=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
work=$(mktemp -d)
[ "$(id -u)" = 0 ] && chown postgres "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  as_pg "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
as_pg "$pgbin/initdb" -A trust -U postgres -D "$work/pg" >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=${PG_MAX_CONNECTIONS:-400} ${PG_OPTIONS:-}" \
  start >/dev/null
pg="postgres://postgres@127.0.0.1:$port"

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# The CPU time the hypervisor gave other guests ("steal"), in percent of this machine's CPU time
# since a reading of cpu_times: on a shared machine, a run that lost much of it is not comparable.
cpu_times() { awk '/^cpu / {t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9}' /proc/stat; }
steal_since() { # "$(cpu_times)" taken before
  local t0 s0 t1 s1; read -r t0 s0 <<<"$1"; read -r t1 s1 < <(cpu_times)
  awk -v t=$((t1 - t0)) -v s=$((s1 - s0)) 'BEGIN {printf "%.1f", t ? 100 * s / t : 0}'
}
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read())['$1'])"; }

# Before each measurement: the server writes out what earlier ones left dirty, so that no
# measurement pays for another's checkpoint. After each, its database is dropped (or vacuumed,
# for bare SQL's), so no autovacuum of an earlier one runs during a later one.
settle() { "$pgbin/psql" -q "$pg/postgres" -c CHECKPOINT; }

# The bare-SQL baseline: database "bare" with the coordinator's schema and one sweep of
# 3,000,000 pending seeds, for pgbench to run bench/claim.sql (the same claim and a fenced
# completion) against. bare_tps prints pgbench's transactions per second.
bare_setup() {
  "$pgbin/psql" -q "$pg/postgres" -c "CREATE DATABASE bare"
  "$bin/coordinator" migrate --database-url "$pg/bare" 2>/dev/null
  "$pgbin/psql" -q "$pg/bare" -c "INSERT INTO sweeps (id, name, task, dataset, config, max_attempts, total_seeds)
    VALUES (gen_random_uuid(), 'bare', 'resnet9', 'd', '{}', 3, 3000000);
    INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed)
      SELECT id, s, s, s, s, s FROM sweeps, generate_series(0, 2999999) AS s;"
  "$pgbin/psql" -q "$pg/bare" -c "VACUUM ANALYZE seeds"
}
bare_tps() { # CLIENTS SECONDS
  settle
  "$pgbin/pgbench" -n -f bench/claim.sql -c "$1" -j 2 -T "$2" "$pg/bare" 2>/dev/null |
    awk '/^tps/ {print $3; exit}'
  "$pgbin/psql" -q "$pg/bare" -c "VACUUM ANALYZE seeds"
}

# Starts a coordinator on database URL in the background (with `serve`'s further ARGS), its log
# appended to $work/coordinator.log; waits (up to 10 min: a first start may migrate and tally a
# big database) until it listens. Sets coord (its URL) and cpid.
serve_at() { # URL TAG [ARGS...]
  rm -f "$work/$2.addr"
  "${coordinator_dir:-$bin}/coordinator" serve --listen 127.0.0.1:0 --addr-file "$work/$2.addr" --database-url "$1" \
    "${@:3}" >/dev/null 2>>"$work/coordinator.log" &
  cpid=$!
  for _ in $(seq 6000); do [ -f "$work/$2.addr" ] && break; sleep 0.1; done
  coord="http://$(cat "$work/$2.addr")"
}

# One measurement: a coordinator (from $coordinator_dir when set, else $bin) on a fresh database,
# loadgen against it for SECONDS (default $secs). Prints loadgen's JSON.
measure() { # BACKEND WORKERS [THINK_MS [EPOCHS HEARTBEAT_MS [SECONDS]]]
  local tag=$1-$2-$RANDOM url
  if [ "$1" = sqlite ]; then url="sqlite://$work/$tag.db"; else
    "$pgbin/psql" -q "$pg/postgres" -c "CREATE DATABASE \"$tag\""; url="$pg/$tag"; fi
  settle
  serve_at "$url" "$tag"
  "$bin/loadgen" --coordinator "$coord" --workers "$2" \
    --seconds "${6:-$secs}" --think-ms "${3:-0}" --epochs "${4:-1}" --heartbeat-ms "${5:-0}" ||
    echo '{"cycles_per_second": 0, "epoch_rows_per_second": 0, "claim_p50_ms": "nan", "claim_p99_ms": "nan", "heartbeat_p99_ms": "nan"}'
  kill $cpid; wait $cpid 2>/dev/null || true
  if [ "$1" = sqlite ]; then rm -f "$work/$tag".db*; else
    "$pgbin/psql" -q "$pg/postgres" -c "DROP DATABASE \"$tag\" WITH (FORCE)"; fi
}
