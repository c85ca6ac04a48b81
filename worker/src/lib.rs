//! seedsweep's worker: leases seeds from the coordinator and trains them with libtorch.
//!
//! - [`data`]: datasets in the CIFAR-10 binary layout, the synthetic generator, the CIFAR-10 download;
//! - [`imagefolder`]: ImageFolder datasets (JPEG, PNG), decoded on a thread pool;
//! - [`model`]: the ResNet-9s and airbench94's network; [`train`]: one run's training, every random
//!   draw derived from its seeds; [`airbench`]: airbench94's training;
//! - [`checkpoint`]: save and resume a run; [`shim`]: libtorch switches tch lacks (C++);
//! - [`finetune`]: task finetune-head, a new head on a frozen pretrained backbone;
//! - [`runner`]: the lease / heartbeat / stream / report loop.

pub mod airbench;
pub mod checkpoint;
mod convert;
pub mod data;
pub mod digits;
pub mod finetune;
pub mod imagefolder;
mod lease;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod shim;
pub mod spool;
mod stream;
pub mod train;
