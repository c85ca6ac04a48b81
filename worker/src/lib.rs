//! seedsweep's worker: leases seeds from the coordinator and trains them with libtorch, or runs
//! the researcher's own training program. Built without the cargo feature `torch` (default on),
//! it links no libtorch and runs only task command.
//!
//! - [`run`]: what every task's run is and produces (device, seeds, metrics, errors);
//! - [`data`]: datasets in the CIFAR-10 binary layout, the synthetic generator, the CIFAR-10 download;
//! - [`imagefolder`]: ImageFolder datasets (JPEG, PNG), decoded on a thread pool;
//! - [`model`]: the ResNet-9s and airbench94's network; [`train`]: one run's training, every random
//!   draw derived from its seeds; [`airbench`]: airbench94's training;
//! - [`checkpoint`]: save and resume a run; [`shim`]: libtorch switches tch lacks (C++);
//! - [`finetune`]: task finetune-head, a new head on a frozen pretrained backbone;
//! - [`command`]: task command, the researcher's own training program;
//! - [`builtin`]: the built-in tasks as the runner sees them; [`runner`]: the lease / heartbeat /
//!   stream / report loop.

#[cfg(feature = "torch")]
pub mod airbench;
#[cfg(feature = "torch")]
pub mod builtin;
#[cfg(feature = "torch")]
pub mod checkpoint;
pub mod command;
#[cfg(feature = "torch")]
mod convert;
#[cfg(feature = "torch")]
pub mod data;
#[cfg(feature = "torch")]
pub mod digits;
#[cfg(feature = "torch")]
pub mod finetune;
#[cfg(feature = "torch")]
pub mod imagefolder;
mod lease;
pub mod metrics;
#[cfg(feature = "torch")]
pub mod model;
pub mod run;
pub mod runner;
#[cfg(feature = "torch")]
pub mod shim;
pub mod spool;
mod stream;
#[cfg(feature = "torch")]
pub mod train;

/// What the unit tests that train share.
#[cfg(all(test, feature = "torch"))]
pub(crate) mod testing {
    use std::sync::{Mutex, MutexGuard};

    static TRAINING: Mutex<()> = Mutex::new(());

    /// Trains alone in this test process, on one libtorch thread. libtorch's thread settings are
    /// global and its reductions sum in another order under another count, so a test that
    /// compares runs bit for bit must not overlap another test's training (one did, about one
    /// full run in three, with only the thread count fixed).
    pub fn alone() -> MutexGuard<'static, ()> {
        let guard = TRAINING.lock().unwrap_or_else(|p| p.into_inner());
        tch::set_num_threads(1);
        guard
    }
}
