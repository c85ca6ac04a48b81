#!/usr/bin/env bash
# Dashboard benchmark on PostgreSQL: the page of a sweep of N finished seeds (results made in
# SQL as bench/stats.sh makes them: bitmaps of 10,000 examples, EPOCHS epochs each), timed two
# ways, each REPS times (medians): the HTML alone (curl: the server's work and the transfer),
# and the whole load in headless Chromium (navigation start to the load event, through
# chromedriver). The front page (the sweep list) the same way, for scale.
#
#   bench/dashboard.sh [SEEDS] [REPS] [EPOCHS]     (defaults: 100000, 5, 4)
#
# Needs PostgreSQL's server binaries, chromium and chromium-driver.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-100000}
reps=${2:-5}
epochs=${3:-4}
command -v chromedriver >/dev/null || { echo "error: install chromium and chromium-driver" >&2; exit 1; }
source bench/pg.sh
psql() { "$pgbin/psql" -qAt "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=127.0.0.1:$(free_port)
serve() { serve_at "$pg/$1" "$1" --http-listen "$http"; }
source bench/populate.sh

echo "populating ($seeds results, $epochs epochs each) ..." >&2
id=$(populate dash "$seeds" 0)
serve dash
for _ in $(seq 100); do curl -sf "http://$http/" >/dev/null && break; sleep 0.1; done

# chromedriver and one headless session.
dport=$(free_port)
chromedriver --port="$dport" >/dev/null 2>&1 &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$dport/status" >/dev/null && break; sleep 0.1; done
session=$(curl -sf -X POST "http://127.0.0.1:$dport/session" -H 'content-type: application/json' -d \
  '{"capabilities":{"alwaysMatch":{"browserName":"chrome","goog:chromeOptions":{"args":["--headless=new","--no-sandbox","--disable-dev-shm-usage"]}}}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["value"]["sessionId"])')
wd="http://127.0.0.1:$dport/session/$session"
browser_load() { # URL -> ms from navigation start to the load event
  curl -sf -X POST "$wd/url" -H 'content-type: application/json' -d "{\"url\":\"$1\"}" >/dev/null
  curl -sf -X POST "$wd/execute/sync" -H 'content-type: application/json' -d \
    '{"script":"const t=performance.getEntriesByType(\"navigation\")[0]; return Math.round(t.loadEventEnd - t.startTime);","args":[]}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])'
}

printf '%-34s %10s %10s %10s\n' "page (n=$seeds)" "html_ms" "browser_ms" "kib"
for page in "/sweeps/$id" "/"; do
  url="http://$http$page"
  hs=(); bs=()
  for _ in $(seq "$reps"); do
    hs+=("$(curl -sf -o "$work/page.html" -w '%{time_total}' "$url" | awk '{printf "%.0f", $1 * 1000}')")
    bs+=("$(browser_load "$url")")
  done
  printf '%-34s %10s %10s %10s\n' "$([ "$page" = / ] && echo "sweep list" || echo "sweep page")" \
    "$(printf '%s\n' "${hs[@]}" | median)" "$(printf '%s\n' "${bs[@]}" | median)" \
    "$(( $(stat -c %s "$work/page.html") / 1024 ))"
done
curl -sf -X DELETE "$wd" >/dev/null || true
