//! The sweep file: parsed and validated once, at the edge, into a [`SweepSpec`] the rest of the
//! coordinator trusts. Every rejection names the key to change.

pub mod command;
pub mod finetune;

use crate::design::{Design, Factor};
use crate::domain::names;
use crate::policy::RetrySettings;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// The most seeds one sweep may hold; larger studies are several sweeps.
pub const MAX_SEEDS: u64 = 10_000_000;
/// The default number of attempts a seed gets before it ends `failed`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid sweep file: {0}")]
pub struct SpecError(String);

impl SpecError {
    pub(crate) fn new(msg: impl Into<String>) -> SpecError {
        SpecError(msg.into())
    }
}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// Whether `name` may name a dataset: 1 to 64 letters, digits, '-' or '_', not starting with
/// '-' (a folder under the workers' `--data-dir`, so never a path). The worker checks a lease's
/// name again before it becomes a path.
pub fn check_dataset_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if !valid {
        return Err(format!(
            "`dataset` = \"{name}\": a dataset name is 1 to 64 letters, digits, '-' or '_' (e.g. \"cifar10\" or \"synthetic\")"
        ));
    }
    Ok(())
}

/// What a worker trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A ResNet-9 from scratch on a CIFAR-layout dataset, under `recipe` and `[train]`.
    Resnet9,
    /// A new classifier head on a pretrained backbone, under `[backbone]` and `[finetune]`.
    FinetuneHead,
    /// The researcher's own training program, under `[command]`.
    Command,
}

names!(Task as "task" {
    Resnet9 => "resnet9",
    FinetuneHead => "finetune-head",
    Command => "command",
});

/// The seeds of a sweep: a half-open range `start..end` or an explicit list, in submission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSet(Vec<i64>);

impl SeedSet {
    /// Parses `"A..B"` (end exclusive).
    pub fn parse_range(text: &str) -> Result<SeedSet, SpecError> {
        let Some((a, b)) = text.split_once("..") else {
            return invalid(format!(
                "`seeds` = \"{text}\" is not a range: write \"START..END\" (end exclusive), e.g. \"0..100\", or a list of integers"
            ));
        };
        let parse = |s: &str, which: &str| -> Result<i64, SpecError> {
            s.trim().parse::<i64>().map_err(|_| {
                SpecError(format!(
                    "`seeds` = \"{text}\": the {which} `{}` is not a non-negative integer",
                    s.trim()
                ))
            })
        };
        let (start, end) = (parse(a, "start")?, parse(b, "end")?);
        if start < 0 {
            return invalid(format!("`seeds` = \"{text}\": seeds must be non-negative"));
        }
        if end <= start {
            return invalid(format!(
                "`seeds` = \"{text}\" is empty or inverted: the end is exclusive and must exceed the start"
            ));
        }
        if (end - start) as u64 > MAX_SEEDS {
            return invalid(format!(
                "`seeds` = \"{text}\" holds {} seeds; one sweep holds at most {MAX_SEEDS}",
                end - start
            ));
        }
        Ok(SeedSet((start..end).collect()))
    }

    pub fn from_list(seeds: Vec<i64>) -> Result<SeedSet, SpecError> {
        if seeds.is_empty() {
            return invalid("`seeds` is an empty list: give at least one seed");
        }
        if seeds.len() as u64 > MAX_SEEDS {
            return invalid(format!(
                "`seeds` lists {} seeds; one sweep holds at most {MAX_SEEDS}",
                seeds.len()
            ));
        }
        let mut seen = HashSet::with_capacity(seeds.len());
        for &s in &seeds {
            if s < 0 {
                return invalid(format!("`seeds` contains {s}: seeds must be non-negative"));
            }
            if !seen.insert(s) {
                return invalid(format!(
                    "`seeds` lists seed {s} twice: each seed may appear once"
                ));
            }
        }
        Ok(SeedSet(seeds))
    }

    pub fn as_slice(&self) -> &[i64] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The network a run trains (see the worker's `model` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Page's DAWNBench ResNet-9, 6,573,120 parameters.
    Resnet9,
    /// The skinnier ResNet-9 with CELU of Picard's seed study, 2,440,256 parameters.
    Resnet9Skinny,
    /// K. Jordan's airbench94 network: a frozen 2x2 patch-whitening conv, three conv groups with
    /// GELU and BatchNorm without affine weight; 1,972,792 parameters, of which 1,971,352 train (not
    /// the whitening filters or the BatchNorm weights). With it
    /// `lr` and `weight_decay` are airbench's, per 1,024 examples and decoupled from momentum
    /// and from each other (the loss is summed over the batch), and `schedule` is "airbench".
    Airbench94,
}

names!(Model as "model" {
    Resnet9 => "resnet9",
    Resnet9Skinny => "resnet9-skinny",
    Airbench94 => "airbench94",
});

/// The learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Per step, linear from 0 to `lr` at `lr_peak_epoch`, then linear to 0 at the last epoch.
    Linear,
    /// Picard's per-epoch multiplier of `lr`: 0.5 e/3 + 0.01 for epoch e < 4 (from 0), then
    /// 0.5 (22 - e)/19 + 0.01, held at 0.01 from epoch 22 on.
    Picard,
    /// Jordan's airbench94, per step over the run's steps: linear from 0.2 to 1 times `lr` over
    /// the first 23%, then linear to 0.07 times `lr` at the last step.
    Airbench,
}

names!(Schedule as "schedule" {
    Linear => "linear",
    Picard => "picard",
    Airbench => "airbench",
});

/// How the weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// PyTorch's defaults, as both papers' code: convolutions and the linear layer uniform in
    /// +-1/sqrt(fan_in), BatchNorm weight 1 and bias 0.
    Pytorch,
    /// tch's defaults: Kaiming uniform with the ReLU gain (2.45x wider) and BatchNorm weights
    /// uniform in [0, 1]. What sweeps submitted before this setting trained with.
    Tch,
}

names!(Init as "init" {
    Pytorch => "pytorch",
    Tch => "tch",
});

/// What the random crop's padding holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingMode {
    /// The image mirrored at its edges (Page).
    Reflect,
    /// Zero after normalisation: the dataset's mean colour (Picard).
    ZerosAfterNormalisation,
    /// Black, as torchvision's `RandomCrop(32, padding=4)` before `Normalize`.
    ZerosBeforeNormalisation,
}

names!(PaddingMode as "padding" {
    Reflect => "reflect",
    ZerosAfterNormalisation => "zeros-after-normalisation",
    ZerosBeforeNormalisation => "zeros-before-normalisation",
});

/// How many images share one set of augmentation draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugmentPer {
    /// Each image its own crop, flip and cutout (Page).
    Image,
    /// One crop, flip and cutout per chunk of `batch_size` consecutive training images (Picard:
    /// torchvision's transforms applied to batch tensors).
    Batch,
}

names!(AugmentPer as "augment_per" {
    Image => "image",
    Batch => "batch",
});

/// Arithmetic on CUDA devices; a CPU always trains in fp32 (results record what was used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

names!(Precision as "precision" {
    Fp32 => "fp32",
    Fp16 => "fp16",
    Bf16 => "bf16",
});

/// The named recipes a sweep file selects with `recipe = "..."`; its `[train]` table overrides
/// any of their settings. Settings a recipe does not name take the defaults of
/// [`TrainSettings`].
pub const RECIPES: [&str; 4] = ["dawnbench", "paper-short", "paper-long", "airbench94"];

/// Page's DAWNBench ResNet-9: 94% on CIFAR-10 in 24 epochs (lr peaks at 5/24 of the epochs), as
/// davidcpage/cifar10-fast's dawn.py trains it (README, "Recipes", lists each setting's source).
const DAWNBENCH: &str = r#"
model = "resnet9"
init = "pytorch"
epochs = 24
batch_size = 512
lr = 0.4
schedule = "linear"
momentum = 0.9
nesterov = true
weight_decay = 5e-4
label_smoothing = 0.0
crop_padding = 4
crop_padding_mode = "reflect"
flip = true
cutout = 8
cutout_at_borders = false
augment_per = "image"
drop_last = true
lr_in_momentum = true
precision = "fp16"
channels_last = true
"#;

/// Picard's short run (davidpicard/deepseed's cifar_seed.py), used for the 10^4-seed scan.
const PAPER_SHORT: &str = r#"
model = "resnet9-skinny"
init = "pytorch"
epochs = 22
batch_size = 500
lr = 0.2
schedule = "picard"
momentum = 0.9
nesterov = true
weight_decay = 1e-3
label_smoothing = 0.0
smoothed_loss_weight = 2.0
smoothed_loss_epsilon = 0.2
crop_padding = 4
crop_padding_mode = "zeros-after-normalisation"
flip = true
cutout = 8
cutout_at_borders = true
augment_per = "batch"
drop_last = true
lr_in_momentum = false
precision = "fp16"
channels_last = true
"#;

/// K. Jordan's airbench94 (KellerJordan/cifar10-airbench, legacy/airbench94.py: 94% on CIFAR-10
/// in 3.83 s on an A100 without compilation): 9.9 epochs, i.e. ten epochs of which the last
/// trains 90% of its steps.
const AIRBENCH94: &str = r#"
model = "airbench94"
init = "pytorch"
epochs = 10
final_epoch_fraction = 0.9
batch_size = 1024
lr = 11.5
schedule = "airbench"
momentum = 0.85
nesterov = true
weight_decay = 0.0153
label_smoothing = 0.2
crop_padding = 2
crop_padding_mode = "reflect"
flip = true
alternating_flip = true
cutout = 0
augment_per = "image"
drop_last = true
lr_in_momentum = false
bn_bias_lr_scale = 64.0
whiten_bias_epochs = 3
lookahead = true
tta_level = 2
precision = "fp16"
channels_last = true
"#;

fn recipe(name: &str) -> Option<toml::Table> {
    let (text, epochs) = match name {
        "dawnbench" => (DAWNBENCH, None),
        "paper-short" => (PAPER_SHORT, None),
        // The same at 45 epochs; the Picard schedule holds its multiplier at 0.01 after epoch 22.
        "paper-long" => (PAPER_SHORT, Some(45)),
        "airbench94" => (AIRBENCH94, None),
        _ => return None,
    };
    let mut table: toml::Table = toml::from_str(text).expect("the recipes are valid TOML");
    if let Some(e) = epochs {
        table.insert("epochs".into(), toml::Value::Integer(e));
    }
    Some(table)
}

/// How each seed is trained: a recipe's settings with the sweep file's `[train]` over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    #[serde(default = "defaults::model")]
    pub model: Model,
    #[serde(default = "defaults::epochs")]
    pub epochs: u32,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// How the weights start; absent (a sweep stored before the setting): "tch".
    #[serde(default = "defaults::init")]
    pub init: Init,
    /// Channel multiplier: 1.0 is the full 6,573,120-parameter network.
    #[serde(default = "defaults::width")]
    pub width: f64,
    /// Peak learning rate (the `linear` schedule) or base learning rate (`picard`).
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    #[serde(default = "defaults::schedule")]
    pub schedule: Schedule,
    /// Where the schedule peaks; when absent, 5/24 of `epochs` (Page's 5 of 24). Always set after
    /// [`SweepSpec::parse`].
    #[serde(default)]
    pub lr_peak_epoch: Option<f64>,
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
    #[serde(default = "defaults::nesterov")]
    pub nesterov: bool,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    /// Label smoothing of the cross-entropy loss.
    #[serde(default)]
    pub label_smoothing: f64,
    /// The loss adds this many times a second cross-entropy, with `smoothed_loss_epsilon` label
    /// smoothing (Picard: CE + 2 x CE with smoothing 0.2).
    #[serde(default)]
    pub smoothed_loss_weight: f64,
    #[serde(default = "defaults::smoothed_loss_epsilon")]
    pub smoothed_loss_epsilon: f64,
    /// Random-crop padding in pixels (0 turns cropping off).
    #[serde(default = "defaults::crop_padding")]
    pub crop_padding: u32,
    /// What the crop's padding holds; absent: "zeros-after-normalisation".
    #[serde(default = "defaults::crop_padding_mode")]
    pub crop_padding_mode: PaddingMode,
    /// Random horizontal flip.
    #[serde(default = "defaults::flip")]
    pub flip: bool,
    /// Side in pixels of the square cut out of each training image at a random place (0: off).
    #[serde(default)]
    pub cutout: u32,
    /// The cutout square's centre anywhere in the image, the square clipped at its borders
    /// (Picard), rather than the square wholly inside the image (Page).
    #[serde(default)]
    pub cutout_at_borders: bool,
    /// One set of crop, flip and cutout draws per image or per chunk of `batch_size`
    /// consecutive training images; absent: "image".
    #[serde(default = "defaults::augment_per")]
    pub augment_per: AugmentPer,
    /// Skip each epoch's last, partial batch (as both papers' data loaders do).
    #[serde(default)]
    pub drop_last: bool,
    /// Page's SGD: the momentum buffer accumulates learning-rate-scaled steps instead of
    /// gradients (`torch.optim.SGD`); the two differ while the learning rate changes.
    #[serde(default)]
    pub lr_in_momentum: bool,
    /// Mixed precision on CUDA: "fp32", "fp16" (autocast with loss scaling; BatchNorm stays
    /// fp32) or "bf16".
    #[serde(default = "defaults::precision")]
    pub precision: Precision,
    /// The channels_last memory format on CUDA.
    #[serde(default)]
    pub channels_last: bool,
    /// Deterministic algorithms on CUDA (cuDNN deterministic, no autotuning): exact repeats at
    /// some cost in speed. CPU training is always deterministic.
    #[serde(default)]
    pub deterministic: bool,
    /// Evaluate on the test set every this many epochs; the last epoch is always evaluated.
    #[serde(default = "defaults::eval_every")]
    pub eval_every: u32,
    /// Save a checkpoint every this many epochs to the worker's `--checkpoint-dir` (0: never);
    /// a seed whose lease is lost resumes from it on any worker with the same folder.
    #[serde(default)]
    pub checkpoint_every: u32,
    /// Hold out this many training images as the run's validation set, chosen by its `split`
    /// factor; the run trains on the rest and is evaluated on both (0: no split).
    #[serde(default)]
    pub holdout: u32,
    // The settings below apply to model "airbench94" only; another model refuses them.
    /// The share of the last epoch's steps that are trained (airbench94's 9.9 epochs: 10 and 0.9).
    #[serde(default = "defaults::one")]
    pub final_epoch_fraction: f64,
    /// Learning-rate multiplier of the BatchNorm biases (not of their weight decay).
    #[serde(default = "defaults::one")]
    pub bn_bias_lr_scale: f64,
    /// The whitening layer's bias trains for this many first epochs, then stays frozen.
    #[serde(default)]
    pub whiten_bias_epochs: u32,
    /// Every 5 steps, the weights and BatchNorm statistics become an exponential moving average
    /// of themselves (decay 0.95^5 (step/steps)^3), and the run ends on the average.
    #[serde(default)]
    pub lookahead: bool,
    /// Test-time augmentation of the last evaluation: 0 none, 1 mirror, 2 mirror and one-pixel
    /// translations (six views, weighted as airbench does).
    #[serde(default)]
    pub tta_level: u32,
    /// Flip each image at random once (per run), then every other epoch flip all of them, in
    /// place of an independent flip per image and epoch (`flip` must be true).
    #[serde(default)]
    pub alternating_flip: bool,
}

mod defaults {
    use super::{AugmentPer, Init, Model, PaddingMode, Precision, Schedule};
    pub fn init() -> Init {
        Init::Tch
    }
    pub fn crop_padding_mode() -> PaddingMode {
        PaddingMode::ZerosAfterNormalisation
    }
    pub fn augment_per() -> AugmentPer {
        AugmentPer::Image
    }
    pub fn model() -> Model {
        Model::Resnet9
    }
    pub fn schedule() -> Schedule {
        Schedule::Linear
    }
    pub fn precision() -> Precision {
        Precision::Fp32
    }
    pub fn smoothed_loss_epsilon() -> f64 {
        0.2
    }
    pub fn eval_every() -> u32 {
        1
    }
    pub fn epochs() -> u32 {
        24
    }
    pub fn batch_size() -> u32 {
        512
    }
    pub fn width() -> f64 {
        1.0
    }
    pub fn lr() -> f64 {
        0.4
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn nesterov() -> bool {
        true
    }
    pub fn weight_decay() -> f64 {
        5e-4
    }
    pub fn crop_padding() -> u32 {
        4
    }
    pub fn flip() -> bool {
        true
    }
    pub fn one() -> f64 {
        1.0
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        toml::from_str("").expect("every train setting has a default")
    }
}

impl TrainSettings {
    pub fn peak_epoch(&self) -> f64 {
        self.lr_peak_epoch
            .unwrap_or(self.epochs as f64 * 5.0 / 24.0)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let finite = |key: &str, v: f64| -> Result<(), SpecError> {
            if v.is_finite() {
                Ok(())
            } else {
                invalid(format!("`train.{key}` = {v} is not a finite number"))
            }
        };
        let below_one = |key: &str, v: f64| -> Result<(), SpecError> {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                invalid(format!("`train.{key}` = {v}: must be in [0, 1)"))
            }
        };
        if self.epochs == 0 || self.epochs > 10_000 {
            return invalid(format!(
                "`train.epochs` = {}: give between 1 and 10000 epochs",
                self.epochs
            ));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return invalid(format!(
                "`train.batch_size` = {}: give between 1 and 65536",
                self.batch_size
            ));
        }
        finite("width", self.width)?;
        if !(self.width > 0.0 && self.width <= 8.0) || (64.0 * self.width).round() < 1.0 {
            return invalid(format!(
                "`train.width` = {}: the channel multiplier must be in (0, 8] and leave at least one channel (width >= 1/64)",
                self.width
            ));
        }
        finite("lr", self.lr)?;
        if self.lr < 0.0 {
            return invalid(format!(
                "`train.lr` = {}: the learning rate must be >= 0",
                self.lr
            ));
        }
        let peak = self.peak_epoch();
        finite("lr_peak_epoch", peak)?;
        if peak < 0.0 || peak > self.epochs as f64 {
            return invalid(format!(
                "`train.lr_peak_epoch` = {peak}: must lie between 0 and `train.epochs` ({})",
                self.epochs
            ));
        }
        finite("momentum", self.momentum)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(format!(
                "`train.momentum` = {}: must be in [0, 1)",
                self.momentum
            ));
        }
        if self.nesterov && self.momentum == 0.0 {
            return invalid("`train.nesterov` = true needs `train.momentum` > 0");
        }
        finite("weight_decay", self.weight_decay)?;
        if self.weight_decay < 0.0 {
            return invalid(format!(
                "`train.weight_decay` = {}: must be >= 0",
                self.weight_decay
            ));
        }
        below_one("label_smoothing", self.label_smoothing)?;
        let at_most = |key: &str, v: u32, max: u32, unit: &str| -> Result<(), SpecError> {
            if v <= max {
                Ok(())
            } else {
                invalid(format!("`train.{key}` = {v}: at most {max} {unit}"))
            }
        };
        at_most("crop_padding", self.crop_padding, 16, "pixels")?;
        finite("smoothed_loss_weight", self.smoothed_loss_weight)?;
        if !(0.0..=100.0).contains(&self.smoothed_loss_weight) {
            return invalid(format!(
                "`train.smoothed_loss_weight` = {}: must be in [0, 100]",
                self.smoothed_loss_weight
            ));
        }
        below_one("smoothed_loss_epsilon", self.smoothed_loss_epsilon)?;
        at_most("cutout", self.cutout, 32, "pixels (the image side)")?;
        at_most("holdout", self.holdout, 10_000_000, "images")?;
        if self.eval_every == 0 {
            return invalid("`train.eval_every` = 0: give 1 to evaluate after every epoch");
        }
        self.validate_airbench()
    }

    /// The airbench94 settings, and what that model's training does not do.
    fn validate_airbench(&self) -> Result<(), SpecError> {
        let airbench = self.model == Model::Airbench94;
        if airbench != (self.schedule == Schedule::Airbench) {
            return invalid(
                "`train.model` = \"airbench94\" and `train.schedule` = \"airbench\" go together: set both or neither",
            );
        }
        if !(self.final_epoch_fraction > 0.0 && self.final_epoch_fraction <= 1.0) {
            return invalid(format!(
                "`train.final_epoch_fraction` = {}: must be in (0, 1]",
                self.final_epoch_fraction
            ));
        }
        if !(self.bn_bias_lr_scale > 0.0 && self.bn_bias_lr_scale <= 10_000.0) {
            return invalid(format!(
                "`train.bn_bias_lr_scale` = {}: must be in (0, 10000]",
                self.bn_bias_lr_scale
            ));
        }
        if self.tta_level > 2 {
            return invalid(format!(
                "`train.tta_level` = {}: 0 (none), 1 (mirror) or 2 (mirror and translations)",
                self.tta_level
            ));
        }
        if self.alternating_flip && !self.flip {
            return invalid("`train.alternating_flip` = true needs `train.flip` = true");
        }
        let only_airbench = [
            ("final_epoch_fraction", self.final_epoch_fraction != 1.0),
            ("bn_bias_lr_scale", self.bn_bias_lr_scale != 1.0),
            ("whiten_bias_epochs", self.whiten_bias_epochs != 0),
            ("lookahead", self.lookahead),
            ("tta_level", self.tta_level != 0),
            ("alternating_flip", self.alternating_flip),
        ];
        let not_airbench = [
            ("cutout", "0", self.cutout != 0),
            (
                "smoothed_loss_weight",
                "0",
                self.smoothed_loss_weight != 0.0,
            ),
            (
                "augment_per",
                "\"image\"",
                self.augment_per != AugmentPer::Image,
            ),
            ("lr_in_momentum", "false", self.lr_in_momentum),
            ("init", "\"pytorch\"", self.init != Init::Pytorch),
            (
                "checkpoint_every",
                "0 (a seed trains in seconds)",
                self.checkpoint_every != 0,
            ),
        ];
        if !airbench {
            if let Some((key, _)) = only_airbench.iter().find(|(_, set)| *set) {
                return invalid(format!(
                    "`train.{key}` applies to `train.model` = \"airbench94\" only: remove it"
                ));
            }
        } else if let Some((key, value, _)) = not_airbench.iter().find(|(_, _, set)| *set) {
            return invalid(format!(
                "`train.model` = \"airbench94\" needs `train.{key}` = {value}"
            ));
        }
        Ok(())
    }
}

/// A validated sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub name: String,
    pub task: Task,
    pub dataset: String,
    pub seeds: SeedSet,
    pub max_attempts: u32,
    /// Retry backoff: see [`RetrySettings`].
    pub retry: RetrySettings,
    /// Higher-priority sweeps are served first; within a priority, older sweeps first.
    pub priority: i32,
    /// The recipe `train` started from.
    pub recipe: String,
    pub train: TrainSettings,
    pub design: Design,
    /// Part of every generator's derivation: runs of sweeps with the same namespace and factor
    /// seeds draw the same random numbers (pairing a baseline with a variant); another namespace
    /// gives independent draws. Empty by default.
    pub seed_namespace: String,
    /// The `finetune-head` settings (that task only).
    pub finetune: Option<finetune::FinetuneSpec>,
    /// The `command` settings (that task only).
    pub command: Option<command::CommandSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: String,
    task: String,
    dataset: Option<String>,
    seeds: Option<RawSeeds>,
    recipe: Option<String>,
    vary: Option<Vec<String>>,
    base_seed: Option<i64>,
    crossed: Option<toml::Table>,
    #[serde(default)]
    seed_namespace: String,
    max_attempts: Option<u32>,
    #[serde(default)]
    priority: i32,
    retry_backoff_seconds: Option<f64>,
    retry_backoff_max_seconds: Option<f64>,
    #[serde(default)]
    train: toml::Table,
    backbone: Option<toml::Value>,
    finetune: Option<toml::Value>,
    command: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSeeds {
    Range(String),
    List(Vec<i64>),
}

impl SweepSpec {
    /// Parses and validates a sweep file's TOML text.
    pub fn parse(text: &str) -> Result<SweepSpec, SpecError> {
        let raw: RawSweep = toml::from_str(text).map_err(|e| SpecError(toml_message(text, &e)))?;
        let name = raw.name.trim().to_string();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return invalid("`name` must be 1 to 200 printable characters");
        }
        let (task, finetune, command) = task(&raw)?;
        let dataset = match (&raw.dataset, task) {
            (Some(d), _) => d.clone(),
            // The program brings its own data.
            (None, Task::Command) => String::new(),
            (None, _) => {
                return invalid("`dataset` is missing: name the dataset (e.g. \"cifar10\")");
            }
        };
        if raw.dataset.is_some() || task != Task::Command {
            check_dataset_name(&dataset).map_err(SpecError::new)?;
        }
        let (seeds, design) = design(&raw)?;
        if raw.seed_namespace.len() > 200 || raw.seed_namespace.chars().any(char::is_control) {
            return invalid("`seed_namespace` must be at most 200 printable characters");
        }
        let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > 100 {
            return invalid(format!(
                "`max_attempts` = {max_attempts}: give between 1 and 100"
            ));
        }
        let retry = retry(&raw)?;
        if !(-1000..=1000).contains(&raw.priority) {
            return invalid(format!(
                "`priority` = {}: give between -1000 and 1000",
                raw.priority
            ));
        }
        let (recipe_name, train) = train(&raw)?;
        Ok(SweepSpec {
            name,
            task,
            dataset,
            seeds,
            max_attempts,
            retry,
            priority: raw.priority,
            recipe: recipe_name,
            train,
            design,
            seed_namespace: raw.seed_namespace,
            finetune,
            command,
        })
    }

    /// The resolved configuration as stored in `sweeps.config`.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "task": self.task.as_str(),
            "dataset": self.dataset,
            "seeds": self.seeds_description(),
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "recipe": self.recipe,
            "design": self.design,
            "seed_namespace": self.seed_namespace,
            "finetune": self.finetune,
            "command": self.command,
            "retry_backoff_seconds": self.retry.base_seconds,
            "retry_backoff_max_seconds": self.retry.max_seconds,
            "train": self.train,
        })
    }

    fn seeds_description(&self) -> serde_json::Value {
        let s = self.seeds.as_slice();
        let contiguous = s.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous && s.len() > 1 {
            serde_json::Value::String(format!("{}..{}", s[0], s[s.len() - 1] + 1))
        } else {
            serde_json::json!(s)
        }
    }
}

/// The sweep's task's own settings (and only its own: another task's tables are refused).
type TaskSettings = (
    Task,
    Option<finetune::FinetuneSpec>,
    Option<command::CommandSpec>,
);

/// The sweep's task and the tables that belong to it (and only to it).
fn task(raw: &RawSweep) -> Result<TaskSettings, SpecError> {
    let task = Task::parse(&raw.task).ok_or_else(|| {
        SpecError(format!(
            "`task` = \"{}\" is not a known task: use {}",
            raw.task,
            Task::known()
        ))
    })?;
    let tables = [
        (
            Task::Resnet9,
            "`recipe` and [train]",
            !raw.train.is_empty() || raw.recipe.is_some(),
        ),
        (
            Task::FinetuneHead,
            "[backbone] and [finetune]",
            raw.backbone.is_some() || raw.finetune.is_some(),
        ),
        (Task::Command, "[command]", raw.command.is_some()),
    ];
    let own = tables.iter().find(|t| t.0 == task).map_or("", |t| t.1);
    if let Some((other, what, _)) = tables.iter().find(|t| t.0 != task && t.2) {
        return invalid(format!(
            "{what} belong to task \"{}\"; task \"{}\" takes {own}",
            other.as_str(),
            task.as_str()
        ));
    }
    Ok(match task {
        Task::Resnet9 => (task, None, None),
        Task::FinetuneHead => (
            task,
            Some(finetune::FinetuneSpec::parse(
                raw.backbone.clone(),
                raw.finetune.clone(),
            )?),
            None,
        ),
        Task::Command => (
            task,
            None,
            Some(command::CommandSpec::parse(raw.command.clone())?),
        ),
    })
}

/// The retry backoff of failed seeds.
fn retry(raw: &RawSweep) -> Result<RetrySettings, SpecError> {
    let retry = RetrySettings {
        base_seconds: raw
            .retry_backoff_seconds
            .unwrap_or(RetrySettings::DEFAULT.base_seconds),
        max_seconds: raw
            .retry_backoff_max_seconds
            .unwrap_or(RetrySettings::DEFAULT.max_seconds),
    };
    for (key, v) in [
        ("retry_backoff_seconds", retry.base_seconds),
        ("retry_backoff_max_seconds", retry.max_seconds),
    ] {
        if !(0.0..=86_400.0).contains(&v) {
            return invalid(format!("`{key}` = {v}: give seconds between 0 and 86400"));
        }
    }
    if retry.max_seconds < retry.base_seconds {
        return invalid(format!(
            "`retry_backoff_max_seconds` = {} is below `retry_backoff_seconds` = {}",
            retry.max_seconds, retry.base_seconds
        ));
    }
    Ok(retry)
}

/// The recipe's name and its settings with the file's `[train]` over them, validated.
fn train(raw: &RawSweep) -> Result<(String, TrainSettings), SpecError> {
    let recipe_name = raw.recipe.clone().unwrap_or_else(|| "dawnbench".into());
    let Some(mut table) = recipe(&recipe_name) else {
        return invalid(format!(
            "`recipe` = \"{recipe_name}\" is not a known recipe: use one of {}",
            RECIPES.map(|r| format!("\"{r}\"")).join(", ")
        ));
    };
    let preset = table.clone();
    table.extend(raw.train.clone());
    let mut train: TrainSettings = table.try_into().map_err(|e: toml::de::Error| {
        // Name the key: the recipe's own settings are valid, so try the file's one at a time.
        let culprit = raw.train.iter().find(|(k, v)| {
            let mut one = preset.clone();
            one.insert((*k).clone(), (*v).clone());
            one.try_into::<TrainSettings>().is_err()
        });
        match culprit {
            Some((key, _)) => SpecError(format!("`train.{key}`: {}", e.message().trim_end())),
            None => SpecError(format!("in [train]: {}", e.message().trim_end())),
        }
    })?;
    train.validate()?;
    train.lr_peak_epoch = Some(train.peak_epoch());
    Ok((recipe_name, train))
}

/// The runs and their design: `seeds` with `vary` (default: every factor), or `[crossed]`.
fn design(raw: &RawSweep) -> Result<(SeedSet, Design), SpecError> {
    let base_seed = raw.base_seed.unwrap_or(0);
    if base_seed < 0 {
        return invalid(format!(
            "`base_seed` = {base_seed}: seeds must be non-negative"
        ));
    }
    match (&raw.seeds, &raw.crossed) {
        (Some(_), Some(_)) => invalid(
            "give either `seeds` (one run per seed) or a `[crossed]` table (every combination of factor seeds), not both",
        ),
        (None, None) => invalid(
            "missing `seeds`: give a range such as \"0..100\", a list of integers, or a `[crossed]` table",
        ),
        (Some(seeds), None) => {
            let seeds = match seeds {
                RawSeeds::Range(r) => SeedSet::parse_range(r)?,
                RawSeeds::List(l) => SeedSet::from_list(l.clone())?,
            };
            let mut vary = match &raw.vary {
                None => Factor::ALL.to_vec(),
                Some(names) => names
                    .iter()
                    .map(|n| factor("vary", n))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            vary.sort();
            vary.dedup();
            if vary.is_empty() {
                return invalid(
                    "`vary` is empty: every run would be the same; name at least one factor",
                );
            }
            Ok((seeds, Design::Vary { vary, base_seed }))
        }
        (None, Some(table)) => {
            if raw.vary.is_some() {
                return invalid(
                    "`vary` does not apply to a `[crossed]` design: the factors it lists vary",
                );
            }
            let mut levels = Vec::new();
            for (key, value) in table {
                let factor = factor(&format!("crossed.{key}"), key)?;
                let values = match value.clone().try_into::<RawSeeds>() {
                    Ok(RawSeeds::Range(r)) => SeedSet::parse_range(&r),
                    Ok(RawSeeds::List(l)) => SeedSet::from_list(l),
                    Err(_) => invalid("not a range or a list"),
                }
                .map_err(|e| {
                    SpecError(format!(
                        "`crossed.{key}`: {}",
                        e.0.replace("`seeds`", "the seeds")
                    ))
                })?;
                levels.push((factor, values.0));
            }
            levels.sort_by_key(|(f, _)| *f);
            if levels.len() < 2 {
                return invalid(
                    "`[crossed]` needs at least two factors (for one, use `seeds` with `vary`)",
                );
            }
            let runs = levels
                .iter()
                .try_fold(1u64, |acc, (_, v)| acc.checked_mul(v.len() as u64))
                .filter(|n| *n <= MAX_SEEDS)
                .ok_or_else(|| {
                    SpecError(format!(
                        "`[crossed]` makes more than {MAX_SEEDS} runs; one sweep holds at most that"
                    ))
                })?;
            Ok((
                SeedSet((0..runs as i64).collect()),
                Design::Crossed { levels, base_seed },
            ))
        }
    }
}

/// toml's message, with the line it points at and the text there, and where the keys are documented.
/// The factor `text` names, as the value of `key`.
fn factor(key: &str, text: &str) -> Result<Factor, SpecError> {
    Factor::ALL
        .into_iter()
        .find(|f| f.as_str() == text)
        .ok_or_else(|| {
            SpecError(format!(
                "`{key}` names `{text}`, not a seed factor: use \"init\", \"order\", \"augment\" or \"split\""
            ))
        })
}

fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet = text.get(span.clone()).unwrap_or("").trim();
            if snippet.is_empty() || snippet.len() > 60 {
                format!(" (line {line})")
            } else {
                format!(" (line {line}: `{snippet}`)")
            }
        })
        .unwrap_or_default();
    format!(
        "{}{at}; see README, \"Sweep files\", for the keys",
        e.message().trim_end()
    )
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::design::FactorSeeds;

    const OK: &str = r#"
name = "t"
task = "resnet9"
dataset = "synthetic"
seeds = "0..6"
[train]
epochs = 2
batch_size = 64
width = 0.25
"#;

    fn err(text: &str) -> String {
        SweepSpec::parse(text).unwrap_err().to_string()
    }

    /// `train` as a sweep stored before `keys` existed holds it: without them.
    fn stored_without(train: &TrainSettings, keys: &[&str]) -> TrainSettings {
        let mut stored = serde_json::to_value(train).unwrap();
        for key in keys {
            stored.as_object_mut().unwrap().remove(*key);
        }
        serde_json::from_value(stored).unwrap()
    }

    #[test]
    fn parses_a_range_and_fills_defaults() {
        let s = SweepSpec::parse(OK).unwrap();
        assert_eq!(s.seeds.as_slice(), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(s.train.epochs, 2);
        assert_eq!(s.train.momentum, 0.9);
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.train.lr_peak_epoch, Some(2.0 * 5.0 / 24.0));
        assert_eq!(s.config_json()["seeds"], "0..6");
    }

    #[test]
    fn parses_a_list() {
        let s = SweepSpec::parse(&OK.replace("\"0..6\"", "[7, 3, 11]")).unwrap();
        assert_eq!(s.seeds.as_slice(), &[7, 3, 11]);
    }

    #[test]
    fn rejects_bad_files_naming_the_key() {
        assert!(err(&OK.replace("0..6", "6..6")).contains("`seeds`"));
        assert!(err(&OK.replace("0..6", "9..3")).contains("inverted"));
        assert!(err(&OK.replace("0..6", "a..3")).contains("`seeds`"));
        assert!(err(&OK.replace("\"0..6\"", "[1, 2, 1]")).contains("twice"));
        assert!(err(&OK.replace("\"0..6\"", "[]")).contains("empty"));
        assert!(err(&OK.replace("epochs = 2", "epochs = 0")).contains("`train.epochs`"));
        assert!(err(&OK.replace("width = 0.25", "width = -1.0")).contains("`train.width`"));
        assert!(err(&OK.replace("epochs = 2", "epochs = 2\nepoch = 3")).contains("epoch"));
        assert!(err(&OK.replace("name = \"t\"", "name = \"t\"\ncolour = 1")).contains("colour"));
        assert!(err(&OK.replace("resnet9", "resnet18")).contains("`task`"));
        assert!(err(&OK.replace("resnet9", "finetune-head")).contains("[train] belong"));
        assert!(err(&format!("{OK}[finetune]\n")).contains("[finetune] belong"));
        let dup = err(&OK.replace("epochs = 2", "epochs = 2\nepochs = 3"));
        assert!(
            dup.contains("duplicate") && dup.contains("line 8") && dup.contains("epochs"),
            "{dup}"
        );
        assert!(err(&OK.replace("\"synthetic\"", "\"../etc\"")).contains("`dataset`"));
        assert!(err("name = ").contains("invalid sweep file"));
        assert!(err(&OK.replace("name = \"t\"\n", "")).contains("name"));
    }

    #[test]
    fn retry_and_priority_are_checked() {
        assert!(
            err(&OK.replace("name = \"t\"", "name = \"t\"\nretry_backoff_seconds = -1"))
                .contains("retry_backoff_seconds")
        );
        assert!(
            err(&OK.replace("name = \"t\"", "name = \"t\"\npriority = 5000"))
                .contains("`priority`")
        );
    }

    #[test]
    fn recipes_fill_settings_and_train_overrides_them() {
        let s = SweepSpec::parse(OK).unwrap();
        assert_eq!(s.recipe, "dawnbench");
        assert_eq!((s.train.model, s.train.cutout), (Model::Resnet9, 8));
        let short =
            SweepSpec::parse(&OK.replace("[train]", "recipe = \"paper-short\"\n[train]")).unwrap();
        assert_eq!(short.train.model, Model::Resnet9Skinny);
        assert_eq!(short.train.schedule, Schedule::Picard);
        assert_eq!(short.train.batch_size, 64, "[train] overrides the recipe");
        assert_eq!(short.train.epochs, 2);
        assert_eq!(
            (
                short.train.lr,
                short.train.weight_decay,
                short.train.smoothed_loss_weight
            ),
            (0.2, 1e-3, 2.0)
        );
        let long = SweepSpec::parse(
            "name = \"l\"\ntask = \"resnet9\"\ndataset = \"d\"\nseeds = \"0..2\"\nrecipe = \"paper-long\"\n",
        )
        .unwrap();
        assert_eq!((long.train.epochs, long.train.batch_size), (45, 500));
        assert_eq!(long.train.precision, Precision::Fp16);
        assert!(err(&OK.replace("[train]", "recipe = \"fast\"\n[train]")).contains("`recipe`"));
        assert!(err(&OK.replace("epochs = 2", "epochs = 2\nmodel = \"vgg\"")).contains("vgg"));
        assert!(
            err(&OK.replace("epochs = 2", "epochs = 2\ncutout = 40")).contains("`train.cutout`")
        );
        assert!(
            err(&OK.replace("epochs = 2", "epochs = 2\neval_every = 0")).contains("eval_every")
        );
    }

    /// Each recipe carries its paper's fidelity settings; a sweep stored before they existed
    /// (its resolved `train` without them) keeps training as it did then.
    #[test]
    fn recipes_carry_their_papers_settings_and_old_sweeps_keep_theirs() {
        let page = SweepSpec::parse(OK).unwrap().train;
        assert_eq!(
            (page.init, page.crop_padding_mode, page.augment_per),
            (Init::Pytorch, PaddingMode::Reflect, AugmentPer::Image)
        );
        assert!(page.drop_last && page.lr_in_momentum && !page.cutout_at_borders);
        let picard = SweepSpec::parse(&OK.replace("[train]", "recipe = \"paper-short\"\n[train]"))
            .unwrap()
            .train;
        assert_eq!(
            (picard.init, picard.crop_padding_mode, picard.augment_per),
            (
                Init::Pytorch,
                PaddingMode::ZerosAfterNormalisation,
                AugmentPer::Batch
            )
        );
        assert!(picard.drop_last && !picard.lr_in_momentum && picard.cutout_at_borders);
        let black = SweepSpec::parse(&OK.replace(
            "epochs = 2",
            "epochs = 2\ncrop_padding_mode = \"zeros-before-normalisation\"",
        ))
        .unwrap();
        assert_eq!(
            black.train.crop_padding_mode,
            PaddingMode::ZerosBeforeNormalisation
        );
        let bad = err(&OK.replace("epochs = 2", "epochs = 2\ncrop_padding_mode = \"edge\""));
        assert!(
            bad.contains("crop_padding_mode") && bad.contains("reflect"),
            "{bad}"
        );

        let old = stored_without(
            &page,
            &[
                "init",
                "crop_padding_mode",
                "cutout_at_borders",
                "augment_per",
                "drop_last",
                "lr_in_momentum",
            ],
        );
        assert_eq!(
            (old.init, old.crop_padding_mode, old.augment_per),
            (
                Init::Tch,
                PaddingMode::ZerosAfterNormalisation,
                AugmentPer::Image
            )
        );
        assert!(!old.drop_last && !old.lr_in_momentum && !old.cutout_at_borders);
    }

    /// airbench94 carries Jordan's settings; its own settings are refused on other models, and
    /// the settings its training does not have are refused on it, each naming the key.
    #[test]
    fn airbench94_carries_its_settings_and_refuses_what_it_does_not_do() {
        let air = |extra: &str| {
            OK.replace(
                "[train]",
                &format!("recipe = \"airbench94\"\n[train]\n{extra}"),
            )
        };
        let t = SweepSpec::parse(&air("")).unwrap().train;
        assert_eq!(
            (t.model, t.schedule),
            (Model::Airbench94, Schedule::Airbench)
        );
        assert_eq!((t.lr, t.weight_decay, t.momentum), (11.5, 0.0153, 0.85));
        assert_eq!((t.final_epoch_fraction, t.bn_bias_lr_scale), (0.9, 64.0));
        assert_eq!(
            (t.whiten_bias_epochs, t.tta_level, t.crop_padding),
            (3, 2, 2)
        );
        assert!(t.lookahead && t.alternating_flip && t.drop_last);
        assert_eq!((t.label_smoothing, t.cutout), (0.2, 0));
        let long = SweepSpec::parse(&air("").replace("epochs = 2\nbatch_size = 64\n", "")).unwrap();
        assert_eq!((long.train.epochs, long.train.batch_size), (10, 1024));
        let example = SweepSpec::parse(include_str!("../../../examples/airbench94-cifar10.toml"));
        let example = example.unwrap().train;
        assert_eq!(
            (example.model, example.epochs, example.width),
            (Model::Airbench94, 10, 1.0)
        );
        assert!(err(&air("cutout = 8")).contains("`train.cutout` = 0"));
        assert!(err(&air("checkpoint_every = 1")).contains("`train.checkpoint_every`"));
        assert!(err(&air("schedule = \"linear\"")).contains("go together"));
        assert!(err(&air("tta_level = 3")).contains("`train.tta_level`"));
        assert!(err(&air("final_epoch_fraction = 0")).contains("final_epoch_fraction"));
        assert!(err(&air("flip = false")).contains("alternating_flip"));
        for key in [
            "lookahead = true",
            "tta_level = 1",
            "whiten_bias_epochs = 2",
        ] {
            let e = err(&OK.replace("epochs = 2", &format!("epochs = 2\n{key}")));
            assert!(e.contains("airbench94\" only"), "{key}: {e}");
        }
        assert!(
            err(&OK.replace("epochs = 2", "epochs = 2\nmodel = \"airbench94\""))
                .contains("go together")
        );
        // A sweep stored before these settings reads as without them.
        let old = stored_without(
            &SweepSpec::parse(OK).unwrap().train,
            &[
                "final_epoch_fraction",
                "bn_bias_lr_scale",
                "whiten_bias_epochs",
                "lookahead",
                "tta_level",
                "alternating_flip",
            ],
        );
        assert_eq!(
            (
                old.final_epoch_fraction,
                old.bn_bias_lr_scale,
                old.tta_level
            ),
            (1.0, 1.0, 0)
        );
        assert!(old.validate().is_ok());
    }

    #[test]
    fn vary_pins_the_other_factors() {
        let s =
            SweepSpec::parse(&OK.replace("[train]", "vary = [\"init\"]\nbase_seed = 7\n[train]"))
                .unwrap();
        assert_eq!(
            s.design.factors(3),
            FactorSeeds {
                init: 3,
                order: 7,
                augment: 7,
                split: 7
            }
        );
        let all = SweepSpec::parse(OK).unwrap();
        assert_eq!(
            all.design.factors(3),
            FactorSeeds {
                init: 3,
                order: 3,
                augment: 3,
                split: 3
            }
        );
        assert!(err(&OK.replace("[train]", "vary = [\"dropout\"]\n[train]")).contains("dropout"));
        assert!(err(&OK.replace("[train]", "vary = []\n[train]")).contains("`vary`"));
    }

    #[test]
    fn crossed_designs_enumerate_every_combination() {
        let text = "name = \"x\"\ntask = \"resnet9\"\ndataset = \"d\"\nbase_seed = 9\n\
                    [crossed]\norder = [5, 6, 7]\ninit = \"0..2\"\n";
        let s = SweepSpec::parse(text).unwrap();
        assert_eq!(s.seeds.as_slice(), &[0, 1, 2, 3, 4, 5]);
        let runs: Vec<(i64, i64, i64)> = (0..6)
            .map(|i| {
                let f = s.design.factors(i);
                (f.init, f.order, f.augment)
            })
            .collect();
        assert_eq!(
            runs,
            vec![
                (0, 5, 9),
                (0, 6, 9),
                (0, 7, 9),
                (1, 5, 9),
                (1, 6, 9),
                (1, 7, 9)
            ]
        );
        assert!(s.design.is_crossed());
        assert!(
            err(&text.replace("[crossed]", "seeds = \"0..3\"\n[crossed]")).contains("not both")
        );
        assert!(err(&text.replace("init = \"0..2\"\n", "")).contains("at least two"));
        assert!(err(&text.replace("init =", "dropout =")).contains("dropout"));
        let split = SweepSpec::parse(&text.replace("init =", "split =")).unwrap();
        assert_eq!(split.design.factors(5).split, 1);
        assert!(err(&text.replace("[5, 6, 7]", "[5, 5]")).contains("`crossed.order`"));
        assert!(err(&text.replace("[crossed]", "vary = [\"init\"]\n[crossed]")).contains("`vary`"));
    }

    #[test]
    fn rejects_huge_ranges() {
        assert!(err(&OK.replace("0..6", "0..20000000")).contains("at most"));
    }
}
