#!/usr/bin/env bash
# A/B of two coordinator builds on PostgreSQL: the one in OTHER_BIN_DIR (say, an earlier commit
# built with CARGO_TARGET_DIR=/somewhere/else) against this checkout's, alternating round by
# round, each on a fresh database, with the bare-SQL baseline (pgbench) in every round. On a
# shared machine only such side-by-side rounds tell a change's effect from the machine's mood.
#
#   bench/ab.sh OTHER_BIN_DIR [SECONDS] [ROUNDS] [WORKERS]    (defaults: 5, 5 and 16)
#
# Prints each round's closed-loop cycles/s (other, this, bare SQL) with its steal, then the
# medians and the ratios to bare SQL. Both builds are driven by this checkout's loadgen
# (`measure` in bench/pg.sh).
set -euo pipefail
other=${1:?usage: bench/ab.sh OTHER_BIN_DIR [SECONDS] [ROUNDS] [WORKERS]}
[ -x "$other/coordinator" ] || {
  echo "error: $other/coordinator: no coordinator binary there (build the other commit first)" >&2; exit 2; }
other=$(cd "$other" && pwd)
cd "$(dirname "$0")/.."
secs=${2:-5}; rounds=${3:-5}; workers=${4:-16}
source bench/pg.sh
bare_setup

printf '%8s %10s %10s %10s %8s\n' round other this bare steal_%
a=(); b=(); c=()
for r in $(seq "$rounds"); do
  at=$(cpu_times)
  a+=("$(coordinator_dir=$other measure postgres "$workers" | field cycles_per_second)")
  b+=("$(measure postgres "$workers" | field cycles_per_second)"); c+=("$(bare_tps "$workers" "$secs")")
  printf '%8s %10.0f %10.0f %10.0f %8s\n' "$r" "${a[-1]}" "${b[-1]}" "${c[-1]}" "$(steal_since "$at")"
done
ma=$(printf '%s\n' "${a[@]}" | median); mb=$(printf '%s\n' "${b[@]}" | median)
mc=$(printf '%s\n' "${c[@]}" | median)
printf '%8s %10.0f %10.0f %10.0f\n' median "$ma" "$mb" "$mc"
awk -v a="$ma" -v b="$mb" -v c="$mc" 'BEGIN {printf "ratio to bare SQL: other %.2fx, this %.2fx\n", a / c, b / c}'
