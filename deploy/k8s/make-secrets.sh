#!/usr/bin/env bash
# Makes the files an overlay's Secret is generated from (overlays/OVERLAY/secrets/, ignored by
# git): random worker and admin tokens, and the database URL (for `small`, a random password for
# its own PostgreSQL). Existing files are kept, so running it again changes nothing.
#
#   deploy/k8s/make-secrets.sh small
#   deploy/k8s/make-secrets.sh external-db postgres://USER:PASSWORD@HOST:5432/DB
set -euo pipefail
cd "$(dirname "$0")"
overlay=${1:?usage: make-secrets.sh small|external-db [DATABASE_URL]}
[ -d "overlays/$overlay" ] || { echo "error: no overlay '$overlay' (have: $(ls overlays | tr '\n' ' '))" >&2; exit 1; }
dir=overlays/$overlay/secrets
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
keep_or() { # FILE VALUE
  if [ -s "$1" ]; then echo "kept $1" >&2; else printf '%s' "$2" >"$1"; echo "wrote $1" >&2; fi
}
keep_or "$dir/worker-token" "$(random)"
keep_or "$dir/admin-token" "$(random)"
case $overlay in
  small)
    keep_or "$dir/postgres-password" "$(random)"
    keep_or "$dir/database-url" "postgres://seedsweep:$(cat "$dir/postgres-password")@seedsweep-postgres:5432/seedsweep"
    ;;
  *)
    if [ ! -s "$dir/database-url" ]; then
      url=${2:?give the database URL: make-secrets.sh $overlay postgres://USER:PASSWORD@HOST:5432/DB}
      case $url in postgres://*|postgresql://*) ;; *) echo "error: '$url' is not a postgres:// URL" >&2; exit 1 ;; esac
      keep_or "$dir/database-url" "$url"
    else
      echo "kept $dir/database-url" >&2
    fi
    ;;
esac
