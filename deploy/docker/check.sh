#!/usr/bin/env bash
# What can be checked of the Dockerfiles without a Docker engine: every file they COPY from the
# build context exists (and is not excluded by .dockerignore), every base image has a tag, the
# final stage runs as a non-root user, and the set-up they run is the README's (scripts/libtorch.sh
# and scripts/env.sh, which scripts/test.sh runs in CI); the worker binary built that way links
# libtorch_cuda (so the image's worker can see GPUs).
#
#   deploy/docker/check.sh        (after cargo build --release --workspace --bins)
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; exit 1; }
for f in deploy/docker/*.Dockerfile; do
  grep -E '^FROM ' "$f" | awk '{print $2}' | while read -r image; do
    [[ $image == *:* ]] || fail "$f: base image $image has no tag"
  done
  # COPY sources from the context (not --from=stage); "." is the whole context.
  grep -E '^COPY ' "$f" | grep -v -- '--from=' | while read -r _ rest; do
    read -ra parts <<<"$rest"
    for src in "${parts[@]:0:${#parts[@]}-1}"; do
      [ "$src" = . ] && continue
      [ -e "$src" ] || fail "$f copies $src, which is not in the repository"
      grep -qxF "$src" .dockerignore && fail "$f copies $src, which .dockerignore excludes"
    done
  done
  last_user=$(awk '/^FROM /{u=""} /^USER /{u=$2} END{print u}' "$f")
  [ -n "$last_user" ] && [ "${last_user%%:*}" != 0 ] && [ "${last_user%%:*}" != root ] \
    || fail "$f: the final stage must set a non-root USER"
  echo "ok: $f" >&2
done
grep -q 'scripts/libtorch.sh' deploy/docker/worker.Dockerfile && grep -q 'source scripts/env.sh' deploy/docker/worker.Dockerfile \
  || fail "the worker image must install libtorch with the README's scripts"
[ -x target/release/worker ] || fail "build first: cargo build --release --workspace --bins"
# Read whole before searching: `ldd | grep -q` under pipefail fails when grep stops reading first
# (ldd then dies of SIGPIPE), which a loaded machine makes likely.
links=$(ldd target/release/worker)
grep -q 'libtorch_cuda.so' <<<"$links" || fail "the worker does not link libtorch_cuda: it would never see a GPU"
echo "ok: the worker links libtorch_cuda" >&2
