//! The command-line client: `sweep ...` and `make-tokens`' siblings that talk to a running
//! coordinator over gRPC. Part of the `coordinator` binary only, so the server library does not
//! link what only the client uses.

pub mod admin;
pub mod paper;
pub mod render;
