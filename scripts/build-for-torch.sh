#!/usr/bin/env bash
# Builds the worker against another libtorch version, for a GPU host whose PyTorch is not the
# 2.13.0 that tch 0.26 is written for (the host may have no Rust toolchain: build here, copy the
# binary there). tch releases track libtorch releases, so this swaps in the matching tch in a
# scratch copy of the workspace; the checkout is not touched.
#
#   scripts/build-for-torch.sh TORCH_VERSION TCH_VERSION      e.g. 2.11.0 0.24.0
#
# Prints the built worker's path. Run it on the host with LD_LIBRARY_PATH set to the host's
# torch/lib folder (bench/gpu.sh does that).
set -euo pipefail
cd "$(dirname "$0")/.."
torch=${1:?usage: scripts/build-for-torch.sh TORCH_VERSION TCH_VERSION}
tch=${2:?usage: scripts/build-for-torch.sh TORCH_VERSION TCH_VERSION}
export LIBTORCH="$(SEEDSWEEP_TORCH_VERSION=$torch scripts/libtorch.sh)"
out="$PWD/target/torch-$torch"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$scratch"
sed -i -e "s/^tch = .*/tch = \"=$tch\"/" -e "s/^torch-sys = .*/torch-sys = \"=$tch\"/" "$scratch/Cargo.toml"
rm -f "$scratch/Cargo.lock"
(cd "$scratch" && CARGO_TARGET_DIR="$out" cargo build --release -p seedsweep-worker --bin worker >&2)
echo "$out/release/worker"
