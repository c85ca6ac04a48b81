//! The generated gRPC code for `seedsweep.v1`, and [`client`]: how workers and the admin commands
//! connect (URL, TLS, bearer token). Proto types stay at the edges: the coordinator's service
//! layer and the worker's client convert them into domain types.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("seedsweep.v1");

    /// The encoded descriptors of `seedsweep.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/seedsweep_descriptor.bin"));
}

pub mod client;
pub mod codec;
