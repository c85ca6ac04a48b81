//! The generated gRPC code for `seedsweep.v1`. Proto types stay at the edges: the coordinator's
//! service layer and the worker's client convert them into domain types.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("seedsweep.v1");
}
