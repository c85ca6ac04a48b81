//! Makes the `worker` binary find libtorch at run time and see GPUs (feature `torch` only).
//!
//! - An rpath to the libtorch the build used, so the binary runs without LD_LIBRARY_PATH.
//! - tch links with `--as-needed`; since no Rust code references a symbol of libtorch_cuda, the
//!   linker would drop it and the binary would never see a GPU. When the libtorch lib folder has
//!   libtorch_cuda, force it in with `--no-as-needed`. torch-sys reports that folder as
//!   DEP_TCH_LIBTORCH_LIB to crates that depend on it directly, which is why this crate does.
//! - `csrc/shim.cpp`, compiled against the same libtorch: the switches tch does not expose.
use std::path::{Path, PathBuf};

fn compile_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib.parent().expect("the libtorch lib folder has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("csrc/shim.cpp")
        .compile("seedsweep_shim");
}

fn main() {
    // Without the built-in training tasks there is no libtorch to find or link.
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
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
    compile_shim(&lib);
    for cuda in ["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp"] {
        if lib.join(format!("lib{cuda}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l{cuda},--as-needed");
        }
    }
}
