#!/usr/bin/env bash
# Installs libtorch 2.13.0 (PyPI's torch==2.13.0 wheel and its dependencies) into a per-user cache
# folder keyed by version, once; later calls only print the folder. Prints the torch/ folder that
# LIBTORCH must point at on stdout; progress goes to stderr.
#
#   SEEDSWEEP_CACHE          cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep)
#   SEEDSWEEP_PYTHON         python used to run pip (default: python3)
#   SEEDSWEEP_TORCH_VERSION  another torch version, to build a worker for a host that has it
#                            (default: 2.13.0, the version tch 0.26 is written for; see
#                            BENCHMARKS.md, "Training on a GPU")
set -euo pipefail

version=${SEEDSWEEP_TORCH_VERSION:-2.13.0}
cache=${SEEDSWEEP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep}
dest="$cache/libtorch-$version"
python=${SEEDSWEEP_PYTHON:-python3}

if [ -f "$dest/.complete" ] && [ -f "$dest/torch/lib/libtorch_cpu.so" ]; then
  echo "$dest/torch"
  exit 0
fi

command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3 with pip or set SEEDSWEEP_PYTHON" >&2; exit 1; }
mkdir -p "$cache"
# Install into a scratch folder and rename it into place, so an interrupted download never leaves a
# half-written cache that a later run would trust.
exec 9>"$cache/.libtorch-$version.lock"
flock 9
if [ -f "$dest/.complete" ]; then echo "$dest/torch"; exit 0; fi
tmp="$cache/.libtorch-$version.tmp.$$"
rm -rf "$tmp" "$dest"
echo "installing libtorch $version (torch==$version from PyPI, about 4.7 GB) into $dest ..." >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-input --no-compile \
  --target "$tmp" "torch==$version" >&2
[ -f "$tmp/torch/lib/libtorch_cpu.so" ] || { echo "error: torch wheel has no lib/libtorch_cpu.so" >&2; exit 1; }
touch "$tmp/.complete"
mv "$tmp" "$dest"
echo "$dest/torch"
