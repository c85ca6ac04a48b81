#!/usr/bin/env bash
# Installs torchvision (the release that matches the cached torch; with numpy and pillow, not
# torch) into the per-user cache beside libtorch, once, and prints the folder to add to
# PYTHONPATH. The tests use it to export real torchvision networks with
# scripts/export_backbone.py; users with their own Python environment do not need it.
#
#   SEEDSWEEP_TORCHVISION_VERSION   default 0.28.0 (the release for torch 2.13)
#   SEEDSWEEP_CACHE, SEEDSWEEP_PYTHON   as for scripts/libtorch.sh
set -euo pipefail

version=${SEEDSWEEP_TORCHVISION_VERSION:-0.28.0}
cache=${SEEDSWEEP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep}
dest="$cache/torchvision-$version"
python=${SEEDSWEEP_PYTHON:-python3}

if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.torchvision-$version.lock"
flock 9
if [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi
tmp="$cache/.torchvision-$version.tmp.$$"
rm -rf "$tmp" "$dest"
echo "installing torchvision $version into $dest ..." >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-input --no-compile --no-deps \
  --target "$tmp" "torchvision==$version" numpy pillow >&2
[ -d "$tmp/torchvision" ] || { echo "error: the torchvision wheel has no torchvision/ folder" >&2; exit 1; }
touch "$tmp/.complete"
mv "$tmp" "$dest"
echo "$dest"
