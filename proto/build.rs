//! Compiles the protos with protox (pure Rust), so building needs no `protoc`. The descriptor set
//! is also written out for gRPC server reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "seedsweep/v1/seedsweep.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("seedsweep_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Default stubs (UNIMPLEMENTED) let a test double implement only the calls it plays.
    // A malformed message is the sender's fault: INVALID_ARGUMENT (crate::codec), not INTERNAL.
    // Maps as BTreeMaps: in name order wherever they are written out.
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .btree_map(".")
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
