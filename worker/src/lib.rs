//! seedsweep's worker: leases seeds from the coordinator and trains them with libtorch.
//!
//! - [`data`]: datasets in the CIFAR-10 binary layout, the synthetic generator, the CIFAR-10 download;
//! - [`imagefolder`]: ImageFolder datasets (JPEG, PNG), decoded on a thread pool;
//! - [`model`]: the ResNet-9s and airbench94's network; [`train`]: one run's training, every random
//!   draw derived from its seeds; [`airbench`]: airbench94's training;
//! - [`checkpoint`]: save and resume a run; [`shim`]: libtorch switches tch lacks (C++);
//! - [`finetune`]: task finetune-head, a new head on a frozen pretrained backbone;
//! - [`command`]: task command, the researcher's own training program;
//! - [`runner`]: the lease / heartbeat / stream / report loop.

pub mod airbench;
pub mod checkpoint;
pub mod command;
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

/// What the unit tests that train share.
#[cfg(test)]
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
