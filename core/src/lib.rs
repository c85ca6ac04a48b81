//! seedsweep's pure logic: what a sweep is and how its results are read, with no I/O.
//!
//! - [`metric`] the metrics the statistics describe, known and custom;
//! - [`domain`] the types the coordinator's layers share (`SweepId`, `LeaseRef`, states, results);
//! - [`spec`] parses and validates sweep files ([`spec::finetune`]: the `finetune-head` task's part);
//! - [`design`] maps a sweep's runs to the seeds of each factor;
//! - [`policy`] the lease rules: what a seed becomes when an attempt ends, what is accepted;
//! - [`stats`] the statistics over seeds; [`report`] the figures and the report's files.
//!
//! Invariant: this crate knows nothing of the network, the database, the async runtime or
//! libtorch (no tonic, sqlx, tokio or tch in its dependency tree). The coordinator's store and
//! service call into it; it never calls out.

pub mod design;
pub mod domain;
pub mod metric;
pub mod policy;
#[cfg(feature = "report")]
pub mod report;
pub mod spec;
pub mod stats;
