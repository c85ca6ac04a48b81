# Sourced by the other scripts: installs libtorch once (scripts/libtorch.sh) and exports what the
# build needs. Cargo's torch-sys reads LIBTORCH; the worker's build.rs adds the rpath.
LIBTORCH="$("$(dirname "${BASH_SOURCE[0]}")/libtorch.sh")" || return 1
export LIBTORCH
