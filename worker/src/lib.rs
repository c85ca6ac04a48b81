//! seedsweep's worker: leases seeds from the coordinator and trains them with libtorch.
//!
//! - [`data`]: datasets in the CIFAR-10 binary layout, the synthetic generator, the CIFAR-10 download;
//! - [`model`]: ResNet-9; [`train`]: one seed's training, every random draw derived from the seed;
//! - [`runner`]: the lease / heartbeat / stream / report loop.

pub mod data;
pub mod model;
pub mod runner;
pub mod train;
