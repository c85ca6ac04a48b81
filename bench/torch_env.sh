# Sourced by the benchmarks that run the worker beside bench/torch_reference.py (train_cpu.sh,
# fidelity.sh): builds the release binaries, puts the torch the worker links (the per-user
# libtorch cache) on PYTHONPATH, and makes a scratch folder that is removed, with any background
# jobs, on exit. Sets bin, python and work.
source scripts/env.sh
cargo build --release --bins -q
bin=target/release
python=${SEEDSWEEP_PYTHON:-python3}
export PYTHONPATH="$(dirname "$LIBTORCH")${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
