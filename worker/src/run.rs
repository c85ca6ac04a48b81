//! What every task's run is and produces, with libtorch or without: the device it runs on, its
//! seeds, each epoch's metrics, its result, and who a failure is charged to. The built-in
//! training tasks (feature `torch`) and the researcher's own program (task command) share it.

use seedsweep_core::metric::CustomMetrics;
pub use seedsweep_core::spec::Precision;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Instant;

/// Where a run computes: the CPU or one CUDA device, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// How results name it: `cpu`, `cuda:N`.
    pub fn label(self) -> String {
        match self {
            Device::Cuda(n) => format!("cuda:{n}"),
            Device::Cpu => "cpu".to_string(),
        }
    }
}

#[cfg(feature = "torch")]
impl From<Device> for tch::Device {
    fn from(d: Device) -> tch::Device {
        match d {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(n) => tch::Device::Cuda(n),
        }
    }
}

/// The 64-bit generator seed of each source of randomness for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seeds {
    pub init: u64,
    pub order: u64,
    pub augment: u64,
    /// Which training images are held out (`holdout`).
    pub split: u64,
}

impl Seeds {
    /// Generator seeds from factor seeds: each factor's generator is derived from (namespace,
    /// factor, that factor's seed), so changing one factor never perturbs the others.
    pub fn derive(namespace: &str, init: i64, order: i64, augment: i64, split: i64) -> Seeds {
        Seeds {
            init: factor_seed(namespace, "init", init),
            order: factor_seed(namespace, "order", order),
            augment: factor_seed(namespace, "augment", augment),
            split: factor_seed(namespace, "split", split),
        }
    }

    /// All factors from one seed, in the default namespace.
    pub fn single(seed: i64) -> Seeds {
        Seeds::derive("", seed, seed, seed, seed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u32,
    /// Absent only from a program of the researcher's own that does not report them.
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    /// Absent for epochs without an evaluation (see `eval_every`).
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// Top-5 accuracy (task finetune-head, more than five classes).
    #[serde(default)]
    pub test_top5: Option<f64>,
    /// On the run's held-out validation images (`holdout`), when evaluated.
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub val_accuracy: Option<f64>,
    /// The learning rate at the epoch's last step.
    pub lr: Option<f64>,
    pub seconds: f64,
    /// Task command: the program's metrics that are not known ones.
    #[serde(default, skip_serializing_if = "CustomMetrics::is_empty")]
    pub custom: CustomMetrics,
}

/// What the training produced, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    pub history: Vec<EpochMetrics>,
    /// Which test examples the final evaluation got right.
    pub test_correct: Option<Correct>,
    /// The precision actually used (fp32 on the CPU whatever was asked).
    pub precision: Precision,
    /// Whether the numbers are reproducible bit for bit: always on the CPU; on CUDA when
    /// `deterministic` was set.
    pub deterministic: bool,
    /// The epoch a checkpoint resumed from (0: trained from scratch).
    pub resumed_from: u32,
    pub timing: Timing,
    /// Task command: custom metrics of the final result that the last epoch did not report.
    pub custom: CustomMetrics,
    /// Set when the run diverged: the epoch whose metrics were not finite. `history` then holds
    /// the finite epochs before it, and there is no final evaluation.
    pub diverged: Option<u32>,
}

impl Trained {
    /// A run that diverged in `epoch`, after the finite epochs of `history`: a result, not a
    /// failure (diverging is what this seed does, and a retry would hide it).
    pub fn diverged(
        epoch: u32,
        history: Vec<EpochMetrics>,
        precision: Precision,
        deterministic: bool,
    ) -> Trained {
        Trained {
            history,
            test_correct: None,
            precision,
            deterministic,
            resumed_from: 0,
            timing: Timing::default(),
            custom: CustomMetrics::new(),
            diverged: Some(epoch),
        }
    }
}

/// When a run's steps began and ended, for the worker's per-seed overhead.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Seconds from the call of [`train`] to its first step.
    pub first_step: Option<f64>,
    /// When the last step ended (before the last evaluation).
    pub last_step: Option<Instant>,
}

/// Which examples an evaluation got right: bit i of `bits` (least significant first within each
/// byte) for example i.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correct {
    pub examples: u32,
    pub bits: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The mean training loss of an epoch was not finite: the run diverged (the runner records
    /// it as the seed's result through [`Trained::diverged`], not as a failure).
    #[error("training diverged: the mean training loss of epoch {epoch} is {loss}")]
    NonFinite { epoch: u32, loss: f64 },
    #[error("training was stopped")]
    Cancelled,
    #[cfg(feature = "torch")]
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    /// A step's kernel call through the shim failed (the fused SGD update).
    #[error("{0}")]
    Step(String),
    /// The device could not be set up for the run (deterministic algorithms, autocast).
    #[error("{0}")]
    Device(String),
    /// The sweep's settings cannot train, here or anywhere (a holdout as large as the dataset,
    /// checkpoints of airbench94, a backbone whose features have another shape).
    #[error("{0}")]
    Config(String),
    /// The dataset's contents cannot be trained on (an image that does not decode under
    /// `bad_images = "fail"`, a split with no image).
    #[error("{0}")]
    Data(String),
    #[error("cannot resume from the checkpoint: {0}")]
    Checkpoint(String),
    /// libtorch raised an error inside an operation tch does not let fail (CUDA out of memory in
    /// a forward pass, say).
    #[error("training failed: {0}")]
    Panicked(String),
    /// A problem of this host (a missing or wrong backbone file), not of the seed.
    #[error("{0}")]
    Host(String),
    /// The run's own program (task command) failed or reported what cannot be recorded.
    #[error("{0}")]
    Program(String),
}

/// Who a failed run is charged to: this alone decides whether its attempt counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The run itself (it diverged, libtorch failed inside it): the attempt counts.
    Seed,
    /// The sweep's settings or its data, the same on every host: the attempt counts, and the
    /// same cause on another worker ends the seed at once.
    Configuration,
    /// This host (its device, its copy of the data, a backbone file): the seed is handed back
    /// uncounted and the worker stops, so a broken host does not burn through a sweep's retries.
    Host,
}

impl TrainError {
    /// Who the failure is charged to; `None` for a run that was stopped, not failed.
    pub fn blame(&self) -> Option<Blame> {
        Some(match self {
            TrainError::Cancelled => return None,
            #[cfg(feature = "torch")]
            TrainError::Torch(_) => Blame::Seed,
            TrainError::NonFinite { .. }
            | TrainError::Step(_)
            | TrainError::Checkpoint(_)
            | TrainError::Panicked(_)
            | TrainError::Program(_) => Blame::Seed,
            TrainError::Config(_) | TrainError::Data(_) => Blame::Configuration,
            TrainError::Device(_) | TrainError::Host(_) => Blame::Host,
        })
    }
}

/// A 64-bit seed for one source of randomness. The default namespace keeps the derivation of
/// earlier versions, so a seed's numbers do not change.
pub fn factor_seed(namespace: &str, factor: &str, seed: i64) -> u64 {
    let text = if namespace.is_empty() {
        format!("seedsweep/v1/{factor}/{seed}")
    } else {
        format!("seedsweep/v1/{namespace}/{factor}/{seed}")
    };
    let digest = Sha256::digest(text);
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}
