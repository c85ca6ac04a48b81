//! Trains one seed of airbench94 (K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU",
//! arXiv 2404.00498; KellerJordan/cifar10-airbench, legacy/airbench94.py). What differs from
//! the ResNet-9 recipes ([`crate::train`]), all from that code:
//!
//! - The first layer's filters are the data's 2x2 patch-whitening transform (two filters, w and
//!   -w, per eigenvector of the patches' second moment, scaled by 1/sqrt(eigenvalue + 5e-4)),
//!   computed from the first 5,000 training images before the first step and never trained; its
//!   bias trains for the first `whiten_bias_epochs`. Without a holdout the filters depend on the
//!   dataset alone, so a warm worker computes them once per dataset and device.
//! - SGD with Nesterov momentum on the loss summed over the batch, with `lr` and `weight_decay`
//!   in airbench's units: per 1,024 examples, divided by 1 + 1/(1 - momentum) so that the step
//!   does not grow with the momentum, and the decay decoupled from the learning rate. BatchNorm
//!   biases train at `bn_bias_lr_scale` times the learning rate, with the same decay.
//! - Lookahead: every 5 steps the weights and BatchNorm statistics move to their exponential
//!   moving average (decay 0.95^5 (step/steps)^3) and the run ends on the average.
//! - Each image is flipped at random once per run and all of them every other epoch
//!   (`alternating_flip`); the crop's translation is drawn per image and epoch.
//! - The last evaluation averages six views per image (`tta_level` 2).
//!
//! Every draw comes from the run's generators as in [`crate::train`]: the weights from the init
//! seed, the order from the order seed, flips and translations from the augment seed.

use crate::data::Dataset;
use crate::model::{WHITEN_BIAS, WHITEN_KERNEL, WHITEN_WEIGHT};
use crate::shim;
use crate::train::{
    self, EpochDraws, Pipeline, Precision, Run, RunSplit, Tally, TrainConfig, TrainError, Trained,
    backward, learning_rate,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

/// The training images the whitening transform is computed from (airbench: the first 5,000).
const WHITENING_IMAGES: i64 = 5000;
const WHITENING_EPS: f64 = 5e-4;
/// Lookahead averages every this many steps.
const LOOKAHEAD_EVERY: i64 = 5;

/// Trains one run of airbench94 and calls `on_epoch` as each epoch ends. It keeps no
/// checkpoints (a seed takes seconds on a GPU).
pub fn train(
    data: &Dataset,
    cfg: &TrainConfig,
    run: &Run<'_>,
    mut on_epoch: impl FnMut(&train::EpochMetrics),
) -> Result<Trained, TrainError> {
    if cfg.checkpoint_every > 0 {
        return Err(TrainError::Config(
            "model airbench94 keeps no checkpoints: set `train.checkpoint_every` = 0".into(),
        ));
    }
    let entered = Instant::now();
    let device = run.device;
    let precision = train::prepare_device(cfg, device)?;
    let (vs, net) = train::build_network(cfg, run.seeds, device);
    let split = RunSplit::new(data, cfg, run.seeds, device)?;
    let pipeline = Pipeline::new(cfg, device);
    set_whitening(&vs, data, cfg, &split, &pipeline);
    let mut sgd = Optimiser::new(&vs, cfg);
    let mut lookahead = cfg.lookahead.then(|| Lookahead::new(&vs));
    let mut order_rng = ChaCha8Rng::seed_from_u64(run.seeds.order);
    let mut augment_rng = ChaCha8Rng::seed_from_u64(run.seeds.augment);

    let n = split.n();
    let batch = (cfg.batch_size as i64).min(n);
    let steps = cfg.steps_per_epoch(n);
    let total = cfg.total_steps(steps);
    let first_flips: Option<Vec<bool>> = cfg
        .alternating_flip
        .then(|| (0..n).map(|_| augment_rng.random_bool(0.5)).collect());
    let mut history = Vec::with_capacity(cfg.epochs as usize);
    let mut test_correct = None;
    let mut timing = train::Timing::default();
    let mut done = 0;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        // airbench's epochs count from 0 and flip all images in the odd ones.
        let alternating = first_flips.as_deref().map(|f| (f, epoch % 2 == 0));
        let draws = EpochDraws::draw(
            n,
            batch,
            cfg,
            &mut order_rng,
            &mut augment_rng,
            alternating,
            device,
        );
        sgd.train_whitening_bias(epoch <= cfg.whiten_bias_epochs);
        let mut tally = Tally::new(device);
        let mut lr = 0.0;
        for step in 0..cfg.steps_in_epoch(epoch, steps) {
            train::step_begins(run, &mut timing, entered)?;
            let (x, y) = split.batch(&pipeline, &draws, step * batch, batch);
            lr = learning_rate(cfg, epoch, step, steps);
            let (logits, loss) = shim::autocast(precision != Precision::Fp32, || {
                let logits = net.forward_t(&x, true);
                let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                    &y,
                    None,
                    Reduction::Sum,
                    -100,
                    cfg.label_smoothing,
                );
                (logits, loss)
            });
            sgd.zero_grad();
            backward(&loss)?;
            sgd.step(lr)?;
            tally.add(&logits, &loss, &y, 1.0);
            done += 1;
            if let Some(la) = &mut lookahead {
                if done % LOOKAHEAD_EVERY == 0 {
                    la.update(0.95f64.powi(5) * (done as f64 / total as f64).powi(3));
                }
                if done == total {
                    la.update(1.0);
                }
            }
        }
        timing.last_step = Some(Instant::now());
        let tta = cfg.tta_level;
        let eval =
            train::Evaluation::of_epoch(&net, data, &split, cfg, &pipeline, precision, epoch, tta);
        let m = tally.metrics(epoch, lr, eval, &mut test_correct, started)?;
        on_epoch(&m);
        history.push(m);
    }
    Ok(Trained {
        history,
        test_correct,
        precision,
        deterministic: !device.is_cuda() || cfg.deterministic,
        resumed_from: 0,
        timing,
        custom: Default::default(),
        diverged: None,
    })
}

/// Sets the whitening layer's filters from the run's training images; without a holdout they
/// depend on the dataset alone and are computed once per device.
fn set_whitening(
    vs: &nn::VarStore,
    data: &Dataset,
    cfg: &TrainConfig,
    split: &RunSplit,
    pipeline: &Pipeline,
) {
    let compute = || vec![whitening_filters(&split.images, pipeline)];
    let filters = if cfg.holdout == 0 {
        let key = format!("airbench/whitening/{:?}", split.images.device());
        data.cached(&key, compute).remove(0)
    } else {
        compute().remove(0)
    };
    let mut weight = vs.variables()[WHITEN_WEIGHT].shallow_clone();
    tch::no_grad(|| weight.copy_(&filters));
}

/// The whitening filters `[24, 3, 2, 2]` of the first [`WHITENING_IMAGES`] of `images`
/// (uint8), normalised as training normalises them: for each eigenvector v of the patches'
/// second moment, with eigenvalue l, in decreasing order of l, the filter v / sqrt(l + 5e-4);
/// then the same negated. The second moment is summed on the device in float32 (as airbench);
/// the 12x12 eigendecomposition runs on the CPU in float64 (airbench: float32 on the GPU).
pub(crate) fn whitening_filters(images: &Tensor, pipeline: &Pipeline) -> Tensor {
    let k = WHITEN_KERNEL;
    let m = images.size()[0].min(WHITENING_IMAGES);
    tch::no_grad(|| {
        let x = pipeline.standardise(&images.narrow(0, 0, m));
        // [m, 3, 31, 31, k, k] -> one row of 3 k k values per patch.
        let patches = x
            .unfold(2, k, 1)
            .unfold(3, k, 1)
            .permute([0, 2, 3, 1, 4, 5])
            .reshape([-1, 3 * k * k]);
        let moment = patches.tr().matmul(&patches) / patches.size()[0] as f64;
        let (values, vectors) = moment
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .linalg_eigh("U");
        // Columns of `vectors` in increasing order of eigenvalue: rows, decreasing.
        let rows = vectors.tr().flip([0]);
        let scale = (values.flip([0]) + WHITENING_EPS).sqrt().reciprocal();
        let filters = (rows * scale.unsqueeze(1)).reshape([3 * k * k, 3, k, k]);
        Tensor::cat(&[&filters, &filters.neg()], 0)
            .to_kind(Kind::Float)
            .to_device(images.device())
    })
}

/// SGD with Nesterov momentum in three groups: the BatchNorm biases (at `bn_bias_lr_scale`
/// times the rate), the whitening bias (while it trains), and the other weights. Each step is
/// `torch.optim.SGD`'s on the summed loss with airbench's translation of its units.
struct Optimiser {
    groups: [Group; 3],
    momentum: f64,
    nesterov: bool,
    /// airbench's units to torch's: 1,024 (1 + 1/(1 - momentum)).
    kilostep: f64,
    whiten_bias: Tensor,
}

struct Group {
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    lr_scale: f64,
    /// torch's weight decay of the group: the decay per step over its learning rate.
    weight_decay: f64,
    active: bool,
}

const NORM_BIASES: usize = 0;
const WHITENING_BIAS: usize = 1;
const OTHERS: usize = 2;

impl Optimiser {
    fn new(vs: &nn::VarStore, cfg: &TrainConfig) -> Optimiser {
        let named = train::variables_by_name(vs, Tensor::requires_grad);
        let kilostep = 1024.0 * (1.0 + 1.0 / (1.0 - cfg.momentum));
        let decay = cfg.weight_decay * cfg.batch_size as f64 / kilostep;
        let group = |lr_scale: f64| {
            // Decay per step = lr x weight_decay, so weight_decay = decay / lr (none at lr 0).
            let lr = cfg.lr / kilostep * lr_scale;
            Group {
                params: Vec::new(),
                buffers: Vec::new(),
                lr_scale,
                weight_decay: if lr > 0.0 { decay / lr } else { 0.0 },
                active: true,
            }
        };
        let mut groups = [group(cfg.bn_bias_lr_scale), group(1.0), group(1.0)];
        let mut whiten_bias = None;
        for (name, t) in named {
            let g = if name == WHITEN_BIAS {
                whiten_bias = Some(t.shallow_clone());
                WHITENING_BIAS
            } else if name.contains(".norm") && name.ends_with(".bias") {
                NORM_BIASES
            } else {
                OTHERS
            };
            groups[g].buffers.push(t.zeros_like());
            groups[g].params.push(t);
        }
        Optimiser {
            groups,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            kilostep,
            whiten_bias: whiten_bias.expect("airbench94 has a whitening bias"),
        }
    }

    /// Whether the whitening bias trains from now on; a frozen bias gets no gradient, no decay
    /// and no momentum (as a parameter without `requires_grad` in torch's SGD).
    fn train_whitening_bias(&mut self, on: bool) {
        self.groups[WHITENING_BIAS].active = on;
        let _ = self.whiten_bias.set_requires_grad(on);
    }

    fn zero_grad(&mut self) {
        for g in &self.groups {
            shim::grads_to_none(&g.params);
        }
    }

    /// One step at learning rate `lr`, in airbench's units.
    fn step(&mut self, lr: f64) -> Result<(), TrainError> {
        for g in self
            .groups
            .iter()
            .filter(|g| g.active && !g.params.is_empty())
        {
            let step = shim::SgdStep {
                lr: lr / self.kilostep * g.lr_scale,
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: g.weight_decay,
            };
            shim::fused_sgd(&g.params, &g.buffers, step, None).map_err(TrainError::Step)?;
        }
        Ok(())
    }
}

/// Every float variable (weights, biases, BatchNorm statistics) with its moving average.
struct Lookahead {
    pairs: Vec<(Tensor, Tensor)>,
}

impl Lookahead {
    fn new(vs: &nn::VarStore) -> Lookahead {
        let pairs = train::variables_by_name(vs, Tensor::is_floating_point)
            .into_iter()
            .map(|(_, v)| {
                let average = tch::no_grad(|| v.detach().copy());
                (v, average)
            })
            .collect();
        Lookahead { pairs }
    }

    /// average += (1 - decay) (variable - average); then the variable takes the average.
    fn update(&mut self, decay: f64) {
        tch::no_grad(|| {
            for (v, average) in &mut self.pairs {
                let _ = average.lerp_(v, 1.0 - decay);
                v.copy_(average);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Init};
    use crate::train::tests::tiny;
    use crate::train::{Seeds, TrainConfig};
    use std::sync::atomic::AtomicBool;

    /// The recipe's settings on the tiny synthetic set, at a small width.
    pub(crate) fn airbench_tiny() -> (Dataset, TrainConfig) {
        let (d, base) = tiny();
        let cfg = TrainConfig {
            arch: Arch::Airbench94,
            init: Init::Pytorch,
            epochs: 3,
            batch_size: 64,
            width: 0.25,
            lr: 11.5,
            schedule: train::Schedule::Airbench,
            momentum: 0.85,
            nesterov: true,
            weight_decay: 0.0153,
            label_smoothing: 0.2,
            crop_padding: 2,
            padding: train::Padding::Reflect,
            cutout: 0,
            drop_last: true,
            final_epoch_fraction: 0.9,
            bn_bias_lr_scale: 64.0,
            whiten_bias_epochs: 1,
            lookahead: true,
            tta_level: 2,
            alternating_flip: true,
            ..base
        };
        (d, cfg)
    }

    fn run(d: &Dataset, cfg: &TrainConfig, seed: i64) -> Trained {
        let _alone = crate::testing::alone();
        let stop = AtomicBool::new(false);
        let run = Run {
            seeds: Seeds::single(seed),
            device: Device::Cpu,
            stop: &stop,
            checkpoints: None,
        };
        train::train(d, cfg, &run, |_| {}).unwrap()
    }

    fn numbers(t: &Trained) -> Vec<u64> {
        t.history
            .iter()
            .flat_map(|m| [m.train_loss, m.train_accuracy, m.test_loss, m.lr])
            .map(|v| v.unwrap().to_bits())
            .collect()
    }

    /// Same seed, same numbers bit for bit on the CPU (metrics and which test images were
    /// right); another seed, other numbers. The last epoch trains 90% of its steps.
    #[test]
    fn same_seed_is_bitwise_identical_and_seeds_differ() {
        let (d, cfg) = airbench_tiny();
        let (a, b, c) = (run(&d, &cfg, 4), run(&d, &cfg, 4), run(&d, &cfg, 5));
        assert_eq!(numbers(&a), numbers(&b));
        assert_eq!(a.test_correct, b.test_correct);
        assert_ne!(numbers(&a), numbers(&c));
        assert_eq!(a.history.len(), 3);
        // 256 images in batches of 64: 4 steps an epoch, ceil(4 x 2.9) = 12 in all.
        assert_eq!((cfg.steps_per_epoch(256), cfg.total_steps(4)), (4, 12));
        assert!(a.history.iter().all(|m| m.train_loss.unwrap().is_finite()));
    }

    /// The schedule of airbench's `get_lr` over its 476 steps (48 a CIFAR-10 epoch, 9.9 epochs).
    #[test]
    fn schedule_is_airbenchs() {
        let (_, mut cfg) = airbench_tiny();
        cfg.epochs = 10;
        let steps = 48;
        assert_eq!(cfg.total_steps(steps), 476);
        assert_eq!(cfg.steps_in_epoch(10, steps), 44);
        let at = |s: i64| learning_rate(&cfg, (s / steps) as u32 + 1, s % steps, steps) / cfg.lr;
        // warmup: int(476 x 0.23) = 109 steps from 0.2 to 1.
        assert!((at(0) - 0.2).abs() < 1e-12);
        assert!((at(109) - 1.0).abs() < 1e-12);
        assert!((at(108) - (0.2 * (1.0 / 109.0) + 108.0 / 109.0)).abs() < 1e-12);
        assert!((at(475) - (1.0 - 366.0 / 367.0 + 0.07 * 366.0 / 367.0)).abs() < 1e-12);
    }

    /// The filters whiten: the patches' second moment through them is the identity, up to the
    /// epsilon, in the directions the data spans.
    #[test]
    fn whitening_filters_whiten_the_patches() {
        let (d, cfg) = airbench_tiny();
        let pipeline = Pipeline::new(&cfg, Device::Cpu);
        let f = whitening_filters(&d.train.images, &pipeline);
        assert_eq!(f.size(), vec![24, 3, 2, 2]);
        let x = pipeline.standardise(&d.train.images);
        let out = x.conv2d(&f, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        // The first 12 filters: second moment diag l / (l + eps), nearly 1 for large l.
        let flat = out.narrow(1, 0, 12).permute([0, 2, 3, 1]).reshape([-1, 12]);
        let moment = flat.tr().matmul(&flat) / flat.size()[0] as f64;
        let top = moment.double_value(&[0, 0]);
        assert!((top - 1.0).abs() < 1e-3, "{top}");
        let off = moment.double_value(&[0, 1]);
        assert!(off.abs() < 1e-3, "{off}");
        // The negated half.
        let neg = (f.narrow(0, 12, 12) + f.narrow(0, 0, 12))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(neg, 0.0);
    }

    /// The filters never train; the whitening bias only while switched on; the BatchNorm biases
    /// are a group of their own.
    #[test]
    fn whitening_is_frozen_and_its_bias_trains_first() {
        let (d, cfg) = airbench_tiny();
        let seeds = Seeds::single(1);
        let (vs, _net) = train::build_network(&cfg, seeds, Device::Cpu);
        let split = RunSplit::new(&d, &cfg, seeds, Device::Cpu).unwrap();
        let pipeline = Pipeline::new(&cfg, Device::Cpu);
        set_whitening(&vs, &d, &cfg, &split, &pipeline);
        assert!(!vs.variables()[WHITEN_WEIGHT].requires_grad());
        let mut sgd = Optimiser::new(&vs, &cfg);
        assert_eq!(sgd.groups[WHITENING_BIAS].params.len(), 1);
        // 3 groups x 2 BatchNorms: 6 norm biases, all with `.norm` in their names.
        assert_eq!(sgd.groups[NORM_BIASES].params.len(), 6);
        sgd.train_whitening_bias(false);
        assert!(!vs.variables()[WHITEN_BIAS].requires_grad());
        assert!(!sgd.groups[WHITENING_BIAS].active);
    }

    /// Lookahead with decay 1 leaves the weights; with decay 0 they stay where they are too;
    /// in between, they move to the average.
    #[test]
    fn lookahead_averages() {
        let (_, cfg) = airbench_tiny();
        let (vs, _net) = train::build_network(&cfg, Seeds::single(2), Device::Cpu);
        let mut la = Lookahead::new(&vs);
        let mut w = vs.variables()["classifier.weight"].shallow_clone();
        let before = w.copy();
        tch::no_grad(|| {
            let _ = w.g_add_scalar_(1.0);
        });
        la.update(0.75);
        let moved = (&w - &before).mean(Kind::Double).double_value(&[]);
        assert!((moved - 0.25).abs() < 1e-6, "{moved}");
        la.update(1.0);
        let still = (&w - &before).mean(Kind::Double).double_value(&[]);
        assert!((still - 0.25).abs() < 1e-6, "{still}");
    }
}
