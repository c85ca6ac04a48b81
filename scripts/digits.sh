#!/usr/bin/env bash
# Fetches the real dataset that the fidelity benchmark and one end-to-end test train on: the UCI
# handwritten digits as scikit-learn ships them (sklearn/datasets/data/digits.csv.gz; CC BY 4.0,
# scikit-learn BSD-3-Clause). Downloads one scikit-learn wheel from PyPI (about 13 MB, no
# dependencies installed) into the per-user cache once, takes that one file out of it, and
# prints its path. `worker make-dataset digits --source FILE` checks its SHA-256.
#
#   SEEDSWEEP_CACHE    cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep)
#   SEEDSWEEP_PYTHON   python used to run pip (default: python3)
set -euo pipefail

cache=${SEEDSWEEP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep}
python=${SEEDSWEEP_PYTHON:-python3}
version=1.5.2
dest="$cache/digits/digits.csv.gz"
if [ -f "$dest" ]; then echo "$dest"; exit 0; fi

command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3 with pip or set SEEDSWEEP_PYTHON" >&2; exit 1; }
mkdir -p "$cache/digits"
tmp=$(mktemp -d "$cache/digits/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching scikit-learn $version's digits.csv.gz from PyPI into $cache/digits ..." >&2
# Any platform's wheel holds the same file: ask for one fixed wheel, whatever this host is.
"$python" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
  --only-binary=:all: --python-version 3.11 --platform manylinux_2_17_x86_64 \
  -d "$tmp" "scikit-learn==$version" >&2
"$python" - "$tmp"/scikit_learn-*.whl "$tmp/digits.csv.gz" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("sklearn/datasets/data/digits.csv.gz"))
PY
mv "$tmp/digits.csv.gz" "$dest"
echo "$dest"
