//! Makes the `worker` binary find libtorch at run time and see GPUs.
//!
//! - An rpath to the libtorch the build used, so the binary runs without LD_LIBRARY_PATH.
//! - tch links with `--as-needed`; since no Rust code references a symbol of libtorch_cuda, the
//!   linker would drop it and the binary would never see a GPU. When the libtorch lib folder has
//!   libtorch_cuda, force it in with `--no-as-needed`. torch-sys reports that folder as
//!   DEP_TCH_LIBTORCH_LIB to crates that depend on it directly, which is why this crate does.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!(
            "cargo:warning=torch-sys did not report its libtorch lib folder; set LIBTORCH (see scripts/env.sh)"
        );
        return;
    };
    if cfg!(target_os = "linux") || cfg!(target_os = "macos") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    for cuda in ["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp"] {
        if lib.join(format!("lib{cuda}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l{cuda},--as-needed");
        }
    }
}
