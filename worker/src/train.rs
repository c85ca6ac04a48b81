//! Trains one seed of ResNet-9. Each source of randomness has its own generator, seeded from the
//! run's factor seeds ([`Seeds`]): the initial weights (`init`), the data order (`order`) and the
//! augmentation (`augment`). Nothing draws from an unseeded source, so on the CPU the same seeds
//! give the same numbers bit for bit, whatever else runs in the process.
//!
//! The pipeline stays on the training device: the training set is uploaded once as uint8, and each
//! epoch's random draws (the order, and per image or per chunk a crop offset, a flip and a cutout position) are
//! made on the host in one go and uploaded as one set of tensors. Each step then only launches
//! kernels: gather the batch, normalise, crop, flip, cut out, forward, backward, update.

use crate::checkpoint::{Checkpoint, CheckpointStore};

use crate::data::{Dataset, Split};
use crate::model::{self, Arch, Init};
use crate::shim;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

const EVAL_BATCH: i64 = 1000;

// The closed sets of a lease's settings, with their one table of names, are the sweep file's.
pub use seedsweep_core::spec::{AugmentPer, PaddingMode as Padding, Precision, Schedule};
// What a run is and produces, shared with the tasks that need no libtorch.
pub use crate::run::{
    Blame, Correct, EpochMetrics, Seeds, Timing, TrainError, Trained, factor_seed,
};

/// How to train; mirrors the sweep file's `[train]` table after its recipe is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub arch: Arch,
    pub init: Init,
    pub epochs: u32,
    pub batch_size: u32,
    pub width: f64,
    pub lr: f64,
    pub schedule: Schedule,
    pub lr_peak_epoch: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    /// The loss adds this many times a cross-entropy with `smoothed_loss_epsilon` label smoothing.
    pub smoothed_loss_weight: f64,
    pub smoothed_loss_epsilon: f64,
    pub crop_padding: u32,
    pub padding: Padding,
    pub flip: bool,
    /// Side of the square cut out of each training image (0: none).
    pub cutout: u32,
    /// Cutout centred anywhere in the image and clipped at its borders (Picard), rather than
    /// lying wholly inside it (Page).
    pub cutout_at_borders: bool,
    pub augment_per: AugmentPer,
    /// Skip each epoch's last, partial batch (both papers' data loaders).
    pub drop_last: bool,
    /// Page's SGD: the momentum buffer accumulates learning-rate-scaled steps
    /// (`v = m v - lr d; w += -lr d + m v`) rather than gradients (`torch.optim.SGD`). The two
    /// differ while the learning rate changes.
    pub lr_in_momentum: bool,
    /// Mixed precision on CUDA; the CPU always trains in fp32.
    pub precision: Precision,
    /// channels_last memory format on CUDA.
    pub channels_last: bool,
    /// Deterministic algorithms on CUDA (cuDNN deterministic, no autotuning).
    pub deterministic: bool,
    /// Evaluate on the test set every this many epochs (and always after the last).
    pub eval_every: u32,
    /// Save a checkpoint every this many epochs (0: never).
    pub checkpoint_every: u32,
    /// Training images held out as the run's validation set, chosen by the split generator.
    pub holdout: u32,
    /// The settings below are airbench94's ([`crate::airbench`]); other models leave them at
    /// 1.0, 1.0, 0, false, 0, false.
    /// The share of the last epoch's steps that train.
    pub final_epoch_fraction: f64,
    /// Learning-rate multiplier of the BatchNorm biases.
    pub bn_bias_lr_scale: f64,
    /// The whitening layer's bias trains in this many first epochs.
    pub whiten_bias_epochs: u32,
    /// Lookahead-style averaging of the weights every 5 steps.
    pub lookahead: bool,
    /// Test-time augmentation of the last evaluation (0 none, 1 mirror, 2 mirror and translate).
    pub tta_level: u32,
    /// Each image flipped at random once per run, then all of them every other epoch.
    pub alternating_flip: bool,
}

impl TrainConfig {
    /// The steps of each epoch, with `n` training images.
    pub fn steps_per_epoch(&self, n: i64) -> i64 {
        let batch = (self.batch_size as i64).min(n);
        if self.drop_last {
            n / batch
        } else {
            (n + batch - 1) / batch
        }
    }

    /// The steps epoch `epoch` (from 1) trains: all but in the last epoch, where
    /// `final_epoch_fraction` of them (airbench's ceil(steps x 9.9) in all, as it computes it).
    pub fn steps_in_epoch(&self, epoch: u32, steps: i64) -> i64 {
        if epoch < self.epochs {
            return steps;
        }
        let before = (self.epochs - 1) as f64;
        let total = (steps as f64 * (before + self.final_epoch_fraction)).ceil() as i64;
        (total - (self.epochs - 1) as i64 * steps).clamp(1, steps)
    }

    /// The steps of the whole run.
    pub fn total_steps(&self, steps: i64) -> i64 {
        (self.epochs - 1) as i64 * steps + self.steps_in_epoch(self.epochs, steps)
    }
}

/// Packs per-example hits (a bool or 0/1 tensor, any device) into a [`Correct`].
pub fn pack_correct(hits: &Tensor) -> Correct {
    let hits = Vec::<bool>::try_from(
        hits.to_device(Device::Cpu)
            .to_kind(Kind::Bool)
            .flatten(0, -1),
    )
    .expect("a flat bool tensor converts");
    let mut bits = vec![0u8; hits.len().div_ceil(8)];
    for (i, _) in hits.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 1 << (i % 8);
    }
    Correct {
        examples: hits.len() as u32,
        bits,
    }
}

/// 0..n in the order of a Fisher-Yates shuffle drawn from `rng` (written out rather than rand's
/// `shuffle`, whose draws may change between versions and would change every run's numbers).
pub(crate) fn permutation(n: i64, rng: &mut ChaCha8Rng) -> Vec<i64> {
    let mut order: Vec<i64> = (0..n).collect();
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// libtorch initialises weights from its global generator; this lock keeps seeding it and
/// building a model one atomic step when several seeds train in one process. Anything else in the
/// process that builds a model (or otherwise draws from that generator) must hold it too.
pub(crate) static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The learning rate during step `step` (from 0) of epoch `epoch` (from 1), whose epochs have
/// `steps` steps each.
pub fn learning_rate(cfg: &TrainConfig, epoch: u32, step: i64, steps: i64) -> f64 {
    match cfg.schedule {
        Schedule::Airbench => {
            let total = cfg.total_steps(steps) as f64;
            let s = ((epoch - 1) as i64 * steps + step) as f64;
            let warmup = (total * 0.23).floor();
            let factor = if s < warmup {
                let f = s / warmup;
                0.2 * (1.0 - f) + f
            } else {
                let f = (s - warmup) / (total - warmup);
                (1.0 - f) + 0.07 * f
            };
            cfg.lr * factor
        }
        Schedule::Linear => {
            let t = (epoch - 1) as f64 + (step + 1) as f64 / steps as f64;
            let (peak, end) = (cfg.lr_peak_epoch, cfg.epochs as f64);
            let factor = if t < peak {
                t / peak
            } else if end > peak {
                (end - t) / (end - peak)
            } else {
                1.0
            };
            cfg.lr * factor.clamp(0.0, 1.0)
        }
        Schedule::Picard => {
            let e = (epoch - 1) as f64;
            let m = if e < 4.0 {
                0.5 * e / 3.0 + 0.01
            } else if e < 22.0 {
                0.5 * (22.0 - e) / 19.0 + 0.01
            } else {
                0.01
            };
            cfg.lr * m
        }
    }
}

/// SGD with momentum, Nesterov and weight decay as `torch.optim.SGD(fused=True)` (dampening 0),
/// with its momentum buffers in the open so that checkpoints can save them. The buffers start at
/// zero, which makes the first step the same as PyTorch's (buffer = gradient).
struct Sgd {
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    lr_in_momentum: bool,
}

/// The variables of `vs` that `keep` selects, by name in name order: the optimisers' and
/// Lookahead's fixed order, the same in every run.
pub(crate) fn variables_by_name(
    vs: &nn::VarStore,
    keep: impl Fn(&Tensor) -> bool,
) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| keep(t))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Stops the run if asked to, and notes when its first step began.
pub(crate) fn step_begins(
    run: &Run<'_>,
    timing: &mut Timing,
    entered: Instant,
) -> Result<(), TrainError> {
    if run.stop.load(Ordering::Relaxed) {
        return Err(TrainError::Cancelled);
    }
    timing
        .first_step
        .get_or_insert_with(|| entered.elapsed().as_secs_f64());
    Ok(())
}

impl Sgd {
    fn new(vs: &nn::VarStore, cfg: &TrainConfig) -> Sgd {
        let params: Vec<Tensor> = variables_by_name(vs, Tensor::requires_grad)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let buffers = params.iter().map(Tensor::zeros_like).collect();
        Sgd {
            params,
            buffers,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
            lr_in_momentum: cfg.lr_in_momentum,
        }
    }

    fn zero_grad(&mut self) {
        shim::grads_to_none(&self.params);
    }

    /// One update with learning rate `lr`; skipped on the device where `found_inf` is non-zero.
    fn step(&mut self, lr: f64, found_inf: Option<&Tensor>) -> Result<(), TrainError> {
        let mut step = shim::SgdStep {
            lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
        };
        if self.lr_in_momentum {
            // Page's update is torch's with learning rate 1 on gradients and weight decay scaled
            // by lr: d = lr (g + wd w); b = m b + d; w -= d + m b (b is Page's -v).
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(lr)?;
                }
            }
            step.weight_decay *= lr;
            step.lr = 1.0;
        }
        shim::fused_sgd(&self.params, &self.buffers, step, found_inf).map_err(TrainError::Step)
    }
}

/// Dynamic loss scaling for float16 (as `torch.amp.GradScaler`): multiply the loss by the scale,
/// unscale the gradients, skip the step and halve the scale when any gradient is not finite,
/// double it after 2000 good steps. Runs on the device without synchronising.
struct LossScaler {
    scale: Tensor,
    growth_tracker: Tensor,
}

impl LossScaler {
    fn new(device: Device) -> LossScaler {
        LossScaler {
            scale: Tensor::full([1], 65536.0, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
        }
    }

    fn scaled(&self, loss: &Tensor) -> Tensor {
        loss * &self.scale
    }

    /// Unscales the gradients; returns `found_inf`, non-zero when a gradient overflowed.
    fn unscale(&mut self, sgd: &mut Sgd) -> Result<Tensor, TrainError> {
        let mut found_inf = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        let inv_scale = self.scale.reciprocal();
        for p in &mut sgd.params {
            let mut g = p.grad();
            if g.defined() {
                g.f_internal_amp_non_finite_check_and_unscale(&mut found_inf, &inv_scale)?;
            }
        }
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            &found_inf,
            2.0,
            0.5,
            2000,
        )?;
        Ok(found_inf)
    }
}

/// Per-image random draws for one epoch, uploaded once.
pub(crate) struct EpochDraws {
    order: Tensor,
    crop_y: Tensor,
    crop_x: Tensor,
    flip: Tensor,
    cut_y: Tensor,
    cut_x: Tensor,
}

impl EpochDraws {
    /// Draws the epoch's order (Fisher-Yates with the order generator) and, for each position of
    /// it, a crop offset, a flip and a cutout corner from the augmentation generator: one set per
    /// image, or per chunk of `batch` consecutive training images (`augment_per`), in the order
    /// of the images (or chunks), not of the epoch.
    ///
    /// With `alternating`, image i flips when `alternating.0[i]` differs from `alternating.1`
    /// (airbench: a random flip per image and run, and every other epoch all flipped), and no
    /// flip is drawn.
    pub(crate) fn draw(
        n: i64,
        batch: i64,
        cfg: &TrainConfig,
        order_rng: &mut ChaCha8Rng,
        augment_rng: &mut ChaCha8Rng,
        alternating: Option<(&[bool], bool)>,
        device: Device,
    ) -> EpochDraws {
        let order = permutation(n, order_rng);
        let side = crate::data::SIDE as i64;
        let pad = cfg.crop_padding as i64;
        let cut = (cfg.cutout as i64).min(side);
        let units = match cfg.augment_per {
            AugmentPer::Image => n,
            AugmentPer::Batch => (n + batch - 1) / batch,
        };
        let len = units as usize;
        let (mut crop_y, mut crop_x, mut flip, mut cut_y, mut cut_x) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        for _ in 0..units {
            crop_y.push(augment_rng.random_range(0..=2 * pad));
            crop_x.push(augment_rng.random_range(0..=2 * pad));
            flip.push(cfg.flip && alternating.is_none() && augment_rng.random_bool(0.5));
            if cut > 0 {
                // The square's top-left corner; at the borders, a centre anywhere in the image.
                let mut corner = || {
                    if cfg.cutout_at_borders {
                        augment_rng.random_range(0..side) - cut / 2
                    } else {
                        augment_rng.random_range(0..=side - cut)
                    }
                };
                cut_y.push(corner());
                cut_x.push(corner());
            }
        }
        if cfg.augment_per == AugmentPer::Batch {
            // Position p trains image order[p], whose chunk is order[p] / batch.
            let chunk = |p: usize| (order[p] / batch) as usize;
            let spread = |v: &[i64]| (0..n as usize).map(|p| v[chunk(p)]).collect::<Vec<_>>();
            (crop_y, crop_x) = (spread(&crop_y), spread(&crop_x));
            flip = (0..n as usize).map(|p| flip[chunk(p)]).collect();
            if cut > 0 {
                (cut_y, cut_x) = (spread(&cut_y), spread(&cut_x));
            }
        }
        if let Some((base, odd)) = alternating {
            flip = order.iter().map(|&i| base[i as usize] != odd).collect();
        }
        let up = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        EpochDraws {
            order: up(&order),
            crop_y: up(&crop_y),
            crop_x: up(&crop_x),
            flip: Tensor::from_slice(&flip).to_device(device),
            cut_y: up(&cut_y),
            cut_x: up(&cut_x),
        }
    }
}

/// The device-side pipeline: normalisation and the per-image augmentation of a batch.
pub(crate) struct Pipeline {
    mean: Tensor,
    std: Tensor,
    /// 0..side as `[1, 1, side, 1]` and `[1, 1, 1, side]`.
    rows: Tensor,
    cols: Tensor,
    pad: i64,
    padding: Padding,
    cut: i64,
    channels_last: bool,
}

impl Pipeline {
    pub(crate) fn new(cfg: &TrainConfig, device: Device) -> Pipeline {
        let side = crate::data::SIDE as i64;
        let range = Tensor::arange(side, (Kind::Int64, device));
        let (mean, std) = cfg.arch.normalisation();
        Pipeline {
            mean: Tensor::from_slice(&mean)
                .view([1, 3, 1, 1])
                .to_device(device),
            std: Tensor::from_slice(&std)
                .view([1, 3, 1, 1])
                .to_device(device),
            rows: range.view([1, 1, side, 1]),
            cols: range.view([1, 1, 1, side]),
            pad: cfg.crop_padding as i64,
            padding: cfg.padding,
            cut: (cfg.cutout as i64).min(side),
            channels_last: cfg.channels_last && device.is_cuda(),
        }
    }

    /// uint8 images to normalised floats, in the memory format training uses.
    fn normalise(&self, x: &Tensor) -> Tensor {
        self.layout(self.standardise(x))
    }

    pub(crate) fn standardise(&self, x: &Tensor) -> Tensor {
        (x.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std
    }

    fn layout(&self, x: Tensor) -> Tensor {
        if self.channels_last {
            shim::channels_last(&x)
        } else {
            x
        }
    }

    /// Images `[b, 3, s, s]` (uint8) normalised and padded by `pad` on every side.
    fn padded(&self, images: &Tensor) -> Tensor {
        let pad = [self.pad; 4];
        match self.padding {
            Padding::Reflect => self.standardise(images).reflection_pad2d(pad),
            Padding::ZerosAfterNormalisation => self.standardise(images).constant_pad_nd(pad),
            Padding::ZerosBeforeNormalisation => self.standardise(&images.constant_pad_nd(pad)),
        }
    }

    /// Normalises and augments images `[b, 3, s, s]` (uint8) with the draws at `at..at + b`:
    /// crop, then flip, then cutout, which fills with zero (the mean after normalisation).
    fn augment(&self, images: &Tensor, draws: &EpochDraws, at: i64) -> Tensor {
        let size = images.size();
        let (b, c, s) = (size[0], size[1], size[3]);
        let mut x;
        if self.pad > 0 {
            let padded = self.padded(images);
            let wide = s + 2 * self.pad;
            let dy = draws.crop_y.narrow(0, at, b).view([b, 1, 1, 1]);
            let dx = draws.crop_x.narrow(0, at, b).view([b, 1, 1, 1]);
            let rows = (&self.rows + dy).expand([b, c, s, wide], false);
            let cols = (&self.cols + dx).expand([b, c, s, s], false);
            x = padded.gather(2, &rows, false).gather(3, &cols, false);
        } else {
            x = self.standardise(images);
        }
        let flip = draws.flip.narrow(0, at, b).view([b, 1, 1, 1]);
        x = x.flip([3]).where_self(&flip, &x);
        if self.cut > 0 {
            let cy = draws.cut_y.narrow(0, at, b).view([b, 1, 1, 1]);
            let cx = draws.cut_x.narrow(0, at, b).view([b, 1, 1, 1]);
            let inside = |range: &Tensor, from: &Tensor| {
                range
                    .ge_tensor(from)
                    .logical_and(&range.lt_tensor(&(from + self.cut)))
            };
            let hole = inside(&self.rows, &cy).logical_and(&inside(&self.cols, &cx));
            x = x.masked_fill(&hole, 0.0);
        }
        self.layout(x)
    }
}

/// Backpropagates, turning a libtorch error (out of memory, an operation without a deterministic
/// kernel, ...) into a failed seed rather than a crash.
pub(crate) fn backward(loss: &Tensor) -> Result<(), TrainError> {
    Ok(loss.f_backward()?)
}

fn loss_of(cfg: &TrainConfig, logits: &Tensor, y: &Tensor) -> Tensor {
    let ce = |smoothing: f64| {
        logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            y,
            None,
            Reduction::Mean,
            -100,
            smoothing,
        )
    };
    let loss = ce(cfg.label_smoothing);
    if cfg.smoothed_loss_weight != 0.0 {
        loss + ce(cfg.smoothed_loss_epsilon) * cfg.smoothed_loss_weight
    } else {
        loss
    }
}

/// Where a run saves and finds its checkpoints, and what else it needs to know.
pub struct Run<'a> {
    pub seeds: Seeds,
    pub device: Device,
    pub stop: &'a AtomicBool,
    pub checkpoints: Option<CheckpointStore>,
}

/// Trains one run and calls `on_epoch` as each epoch ends (for a resumed run, first for each
/// epoch the checkpoint already holds). Checks `run.stop` between steps.
pub fn train(
    data: &Dataset,
    cfg: &TrainConfig,
    run: &Run<'_>,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Trained, TrainError> {
    if cfg.arch == Arch::Airbench94 {
        return crate::airbench::train(data, cfg, run, on_epoch);
    }
    let entered = Instant::now();
    let mut timing = Timing::default();
    let device = run.device;
    let precision = prepare_device(cfg, device)?;
    let (vs, net) = build_network(cfg, run.seeds, device);
    let mut sgd = Sgd::new(&vs, cfg);
    let mut scaler = (precision == Precision::Fp16).then(|| LossScaler::new(device));
    let mut order_rng = ChaCha8Rng::seed_from_u64(run.seeds.order);
    let mut augment_rng = ChaCha8Rng::seed_from_u64(run.seeds.augment);
    let mut history = Vec::with_capacity(cfg.epochs as usize);
    let mut test_correct = None;

    let mut resumed_from = 0;
    if let Some(store) = &run.checkpoints
        && let Some(ckpt) = store.load()
    {
        ckpt.restore(&vs, &mut sgd.buffers, &mut order_rng, &mut augment_rng)
            .map_err(|e| TrainError::Checkpoint(format!("{e:#}")))?;
        if let (Some(s), Some(saved)) = (&mut scaler, &ckpt.scaler) {
            s.scale.copy_(&saved.0);
            s.growth_tracker.copy_(&saved.1);
        }
        resumed_from = ckpt.epoch;
        tracing::info!(epoch = ckpt.epoch, "resuming from a checkpoint");
        for m in &ckpt.history {
            on_epoch(m);
        }
        history = ckpt.history;
    }

    let split = RunSplit::new(data, cfg, run.seeds, device)?;
    let pipeline = Pipeline::new(cfg, device);
    let n = split.n();
    let batch = (cfg.batch_size as i64).min(n);
    let steps = cfg.steps_per_epoch(n);
    for epoch in resumed_from + 1..=cfg.epochs {
        let started = Instant::now();
        let draws = EpochDraws::draw(
            n,
            batch,
            cfg,
            &mut order_rng,
            &mut augment_rng,
            None,
            device,
        );
        let mut tally = Tally::new(device);
        let mut lr = 0.0;
        for step in 0..cfg.steps_in_epoch(epoch, steps) {
            step_begins(run, &mut timing, entered)?;
            let (x, y) = split.batch(&pipeline, &draws, step * batch, batch);
            lr = learning_rate(cfg, epoch, step, steps);
            let (logits, loss) = shim::autocast(precision != Precision::Fp32, || {
                let logits = net.forward_t(&x, true);
                let loss = loss_of(cfg, &logits, &y);
                (logits, loss)
            });
            sgd.zero_grad();
            match &mut scaler {
                None => {
                    backward(&loss)?;
                    sgd.step(lr, None)?;
                }
                Some(s) => {
                    backward(&s.scaled(&loss))?;
                    let found_inf = s.unscale(&mut sgd)?;
                    sgd.step(lr, Some(&found_inf))?;
                }
            }
            tally.add(&logits, &loss, &y, y.size()[0] as f64);
        }
        timing.last_step = Some(Instant::now());
        let eval = Evaluation::of_epoch(&net, data, &split, cfg, &pipeline, precision, epoch, 0);
        history.push(tally.metrics(epoch, lr, eval, &mut test_correct, started)?);
        if let Some(store) = &run.checkpoints
            && cfg.checkpoint_every > 0
            && epoch % cfg.checkpoint_every == 0
            && epoch < cfg.epochs
        {
            let ckpt = Checkpoint {
                epoch,
                history: history.clone(),
                scaler: scaler
                    .as_ref()
                    .map(|s| (s.scale.shallow_clone(), s.growth_tracker.shallow_clone())),
            };
            if let Err(e) = store.save(&ckpt, &vs, &sgd.buffers, &order_rng, &augment_rng) {
                // A checkpoint is an optimisation: training goes on without it.
                tracing::warn!(epoch, error = %e, "could not save a checkpoint");
            }
        }
        on_epoch(&history[history.len() - 1]);
    }
    Ok(Trained {
        history,
        test_correct,
        precision,
        deterministic: !device.is_cuda() || cfg.deterministic,
        resumed_from,
        timing,
        custom: Default::default(),
        diverged: None,
    })
}

/// Sets up the calling thread's device for `cfg`; returns the precision it trains in.
pub(crate) fn prepare_device(cfg: &TrainConfig, device: Device) -> Result<Precision, TrainError> {
    let Device::Cuda(index) = device else {
        return Ok(Precision::Fp32);
    };
    // Seeds training at once (--slots) each get a stream, so that their kernels overlap.
    if let Err(e) = shim::use_own_stream(index) {
        tracing::debug!(problem = %e, "training on the default CUDA stream");
    }
    if cfg.deterministic {
        shim::set_deterministic(true).map_err(TrainError::Device)?;
    } else {
        shim::favour_speed().map_err(TrainError::Device)?;
    }
    shim::set_autocast_bfloat16(cfg.precision == Precision::Bf16).map_err(TrainError::Device)?;
    Ok(cfg.precision)
}

/// The run's network, its weights drawn from the init generator, in the memory format it
/// trains in.
pub(crate) fn build_network(
    cfg: &TrainConfig,
    seeds: Seeds,
    device: Device,
) -> (nn::VarStore, model::Network) {
    let vs = nn::VarStore::new(device);
    let net = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seeds.init as i64);
        let classes = crate::data::CLASSES as i64;
        model::build(&vs.root(), cfg.arch, cfg.init, cfg.width, classes)
    };
    if device.is_cuda() && cfg.channels_last {
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                if v.dim() == 4 {
                    v.set_data(&shim::channels_last(&v));
                }
            }
        });
    }
    (vs, net)
}

/// The images a run trains on (on its device, as uint8) and the ones it holds out.
pub(crate) struct RunSplit {
    pub images: Tensor,
    pub labels: Tensor,
    /// The `holdout` validation images (host side), if any.
    pub val: Option<Split>,
}

impl RunSplit {
    /// The split generator picks `holdout` training images as the validation set; the run trains
    /// on the rest. Without a holdout the dataset's device copy is shared by every run.
    pub fn new(
        data: &Dataset,
        cfg: &TrainConfig,
        seeds: Seeds,
        device: Device,
    ) -> Result<RunSplit, TrainError> {
        let all = data.train.len();
        let holdout = cfg.holdout as i64;
        if holdout >= all {
            return Err(TrainError::Config(format!(
                "`holdout` = {holdout} leaves no training image (the dataset has {all})"
            )));
        }
        if holdout == 0 {
            let (images, labels) = data.train_on(device);
            return Ok(RunSplit {
                images,
                labels,
                val: None,
            });
        }
        let perm = permutation(all, &mut ChaCha8Rng::seed_from_u64(seeds.split));
        let (val, train) = perm.split_at(holdout as usize);
        let (mut val, mut train) = (val.to_vec(), train.to_vec());
        val.sort_unstable();
        train.sort_unstable();
        let pick = |idx: &[i64]| {
            let idx = Tensor::from_slice(idx);
            Split {
                images: data.train.images.index_select(0, &idx),
                labels: data.train.labels.index_select(0, &idx),
            }
        };
        let train = pick(&train);
        Ok(RunSplit {
            images: train.images.to_device(device),
            labels: train.labels.to_device(device),
            val: Some(pick(&val)),
        })
    }

    pub fn n(&self) -> i64 {
        self.images.size()[0]
    }

    /// The augmented batch at positions `start..start + batch` of the epoch's order.
    pub fn batch(
        &self,
        pipeline: &Pipeline,
        draws: &EpochDraws,
        start: i64,
        batch: i64,
    ) -> (Tensor, Tensor) {
        let idx = draws.order.narrow(0, start, batch.min(self.n() - start));
        let x = pipeline.augment(&self.images.index_select(0, &idx), draws, start);
        (x, self.labels.index_select(0, &idx))
    }
}

/// An epoch's running training loss and accuracy, summed on the device.
pub(crate) struct Tally {
    loss_sum: Tensor,
    correct: Tensor,
    seen: i64,
}

impl Tally {
    pub fn new(device: Device) -> Tally {
        Tally {
            loss_sum: Tensor::zeros([], (Kind::Float, device)),
            correct: Tensor::zeros([], (Kind::Int64, device)),
            seen: 0,
        }
    }

    /// Adds a batch whose loss is `loss` per image times `per` (the batch size for a mean).
    pub fn add(&mut self, logits: &Tensor, loss: &Tensor, y: &Tensor, per: f64) {
        tch::no_grad(|| {
            self.loss_sum += loss.detach() * per;
            self.correct += logits.argmax(-1, false).eq_tensor(y).sum(Kind::Int64);
        });
        self.seen += y.size()[0];
    }

    /// The epoch's metrics; the last epoch's evaluation also sets `test_correct`.
    pub fn metrics(
        &self,
        epoch: u32,
        lr: f64,
        eval: Evaluation,
        test_correct: &mut Option<Correct>,
        started: Instant,
    ) -> Result<EpochMetrics, TrainError> {
        let train_loss = self.loss_sum.double_value(&[]) / self.seen as f64;
        if !train_loss.is_finite() {
            return Err(TrainError::NonFinite {
                epoch,
                loss: train_loss,
            });
        }
        if eval.correct.is_some() {
            *test_correct = eval.correct;
        }
        Ok(EpochMetrics {
            epoch,
            train_loss: Some(train_loss),
            train_accuracy: Some(self.correct.int64_value(&[]) as f64 / self.seen as f64),
            test_loss: eval.test.map(|t| t.0),
            test_accuracy: eval.test.map(|t| t.1),
            test_top5: None,
            val_loss: eval.val.map(|v| v.0),
            val_accuracy: eval.val.map(|v| v.1),
            lr: Some(lr),
            seconds: started.elapsed().as_secs_f64(),
            custom: Default::default(),
        })
    }
}

/// An epoch's evaluation: (loss, accuracy) on the test set and the validation images, when
/// `eval_every` asks for one (always after the last epoch, which also records which test
/// examples were right).
pub(crate) struct Evaluation {
    test: Option<(f64, f64)>,
    val: Option<(f64, f64)>,
    correct: Option<Correct>,
}

impl Evaluation {
    /// `tta` is the test-time augmentation of the last epoch's evaluation.
    #[allow(clippy::too_many_arguments)]
    pub fn of_epoch(
        net: &impl ModuleT,
        data: &Dataset,
        split: &RunSplit,
        cfg: &TrainConfig,
        pipeline: &Pipeline,
        precision: Precision,
        epoch: u32,
        tta: u32,
    ) -> Evaluation {
        let last = epoch == cfg.epochs;
        if !last && !epoch.is_multiple_of(cfg.eval_every.max(1)) {
            return Evaluation {
                test: None,
                val: None,
                correct: None,
            };
        }
        let tta = if last { tta } else { 0 };
        let on = |s: &Split| evaluate(net, s, pipeline, precision, tta);
        let (loss, accuracy, hits) = on(&data.test);
        Evaluation {
            test: Some((loss, accuracy)),
            val: split.val.as_ref().map(|v| {
                let (l, a, _) = on(v);
                (l, a)
            }),
            correct: last.then(|| pack_correct(&hits)),
        }
    }
}

/// The logits of normalised images `x` in evaluation mode, averaged over the views of test-time
/// augmentation level `tta`: 0 the image; 1 it and its mirror image, equally; 2 (airbench) half
/// that, and a quarter each the same for the image shifted one pixel up-left and down-right
/// (reflection at the borders).
fn eval_logits(net: &impl ModuleT, x: &Tensor, tta: u32) -> Tensor {
    let plain = |x: &Tensor| net.forward_t(x, false);
    let mirror = |x: &Tensor| (plain(x) + plain(&x.flip([3]))) * 0.5;
    match tta {
        0 => plain(x),
        1 => mirror(x),
        _ => {
            let side = x.size()[3];
            let padded = x.reflection_pad2d([1, 1, 1, 1]);
            let at = |o: i64| padded.narrow(2, o, side).narrow(3, o, side);
            mirror(x) * 0.5 + (mirror(&at(0)) + mirror(&at(2))) * 0.25
        }
    }
}

/// Mean cross-entropy (no label smoothing), accuracy, and which examples were right, on a split.
fn evaluate(
    net: &impl ModuleT,
    split: &Split,
    pipeline: &Pipeline,
    precision: Precision,
    tta: u32,
) -> (f64, f64, Tensor) {
    let device = pipeline.mean.device();
    tch::no_grad(|| {
        let n = split.len();
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let mut hits = Vec::new();
        let mut start = 0;
        while start < n {
            let len = EVAL_BATCH.min(n - start);
            let x = pipeline.normalise(&split.images.narrow(0, start, len).to_device(device));
            let y = split.labels.narrow(0, start, len).to_device(device);
            let logits = shim::autocast(precision != Precision::Fp32, || eval_logits(net, &x, tta))
                .to_kind(Kind::Float);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)
                .to_kind(Kind::Double);
            hits.push(logits.argmax(-1, false).eq_tensor(&y));
            start += len;
        }
        let hits = Tensor::cat(&hits, 0);
        (
            loss_sum.double_value(&[]) / n as f64,
            hits.sum(Kind::Int64).int64_value(&[]) as f64 / n as f64,
            hits,
        )
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{data, imagefolder};

    pub(crate) fn tiny() -> (Dataset, TrainConfig) {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = data::synthetic_records(256, 128, 3);
        data::write_dataset(&dir.path().join("s"), &train, &test).unwrap();
        let d = data::load(dir.path(), "s").unwrap();
        let cfg = TrainConfig {
            arch: Arch::Resnet9,
            init: Init::Pytorch,
            epochs: 2,
            batch_size: 64,
            width: 0.125,
            lr: 0.2,
            schedule: Schedule::Linear,
            lr_peak_epoch: 0.5,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            label_smoothing: 0.0,
            smoothed_loss_weight: 0.0,
            smoothed_loss_epsilon: 0.2,
            crop_padding: 4,
            padding: Padding::ZerosAfterNormalisation,
            flip: true,
            cutout: 8,
            cutout_at_borders: false,
            augment_per: AugmentPer::Image,
            drop_last: false,
            lr_in_momentum: false,
            precision: Precision::Fp16,
            channels_last: true,
            deterministic: false,
            eval_every: 1,
            checkpoint_every: 0,
            holdout: 0,
            final_epoch_fraction: 1.0,
            bn_bias_lr_scale: 1.0,
            whiten_bias_epochs: 0,
            lookahead: false,
            tta_level: 0,
            alternating_flip: false,
        };
        (d, cfg)
    }

    fn run_with(d: &Dataset, cfg: &TrainConfig, seeds: Seeds) -> Trained {
        let stop = AtomicBool::new(false);
        let run = Run {
            seeds,
            device: Device::Cpu,
            stop: &stop,
            checkpoints: None,
        };
        train(d, cfg, &run, |_| {}).unwrap()
    }

    fn bits(t: &Trained) -> Vec<(u64, u64, Option<u64>)> {
        t.history
            .iter()
            .map(|m| {
                (
                    m.train_loss.unwrap().to_bits(),
                    m.train_accuracy.unwrap().to_bits(),
                    m.test_loss.map(f64::to_bits),
                )
            })
            .collect()
    }

    #[test]
    fn correctness_bits_follow_the_examples() {
        let hits = Tensor::from_slice(&[true, false, true, true, false, false, false, false, true]);
        let c = pack_correct(&hits);
        assert_eq!(c.examples, 9);
        assert_eq!(c.bits, vec![0b0000_1101, 0b0000_0001]);
    }

    /// Only the host's own troubles hand a seed back uncounted; a stop is no failure at all.
    #[test]
    fn blame_decides_who_pays() {
        let folder = |e| TrainError::from(e).blame();
        let io = std::io::Error::other("disk gone");
        let cases = [
            (
                TrainError::NonFinite {
                    epoch: 2,
                    loss: f64::NAN,
                }
                .blame(),
                Some(Blame::Seed),
            ),
            (
                TrainError::Panicked("oom".into()).blame(),
                Some(Blame::Seed),
            ),
            (
                TrainError::Step("fused sgd".into()).blame(),
                Some(Blame::Seed),
            ),
            (
                TrainError::Config("holdout".into()).blame(),
                Some(Blame::Configuration),
            ),
            (
                TrainError::Device("no deterministic kernels".into()).blame(),
                Some(Blame::Host),
            ),
            (
                TrainError::Host("backbone missing".into()).blame(),
                Some(Blame::Host),
            ),
            (TrainError::Cancelled.blame(), None),
            (
                folder(imagefolder::FolderError::BadImage {
                    path: "a.png".into(),
                    problem: "truncated".into(),
                }),
                Some(Blame::Configuration),
            ),
            (
                folder(imagefolder::FolderError::Io {
                    path: "a.png".into(),
                    source: io,
                }),
                Some(Blame::Host),
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn same_seed_is_bitwise_identical_and_seeds_differ() {
        let _alone = crate::testing::alone();
        let (d, cfg) = tiny();
        let (a, b, c) = (
            run_with(&d, &cfg, Seeds::single(7)),
            run_with(&d, &cfg, Seeds::single(7)),
            run_with(&d, &cfg, Seeds::single(8)),
        );
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(a.history[1].train_loss, c.history[1].train_loss);
        // Learning happens: the loss falls.
        assert!(a.history[1].train_loss < a.history[0].train_loss, "{a:?}");
        // On the CPU: fp32, deterministic, whatever the settings asked for CUDA.
        assert_eq!((a.precision, a.deterministic), (Precision::Fp32, true));
        // The final evaluation's per-example results agree with its accuracy.
        let correct = a.test_correct.as_ref().unwrap();
        assert_eq!(correct.examples as i64, d.test.len());
        let right: u32 = correct.bits.iter().map(|b| b.count_ones()).sum();
        let acc = a.history.last().unwrap().test_accuracy.unwrap();
        assert_eq!(right as f64 / correct.examples as f64, acc);
        assert_eq!(a.test_correct, b.test_correct);
    }

    /// Each factor has its own generator: changing the order seed leaves the initial weights alone
    /// (the same first-step loss on the same first batch is not checkable, but the initial test
    /// loss of an untrained net is), and changing any factor changes the run.
    #[test]
    fn factors_are_independent() {
        let _alone = crate::testing::alone();
        let (d, mut cfg) = tiny();
        cfg.epochs = 1;
        let base = Seeds::derive("", 1, 1, 1, 1);
        let other_order = Seeds::derive("", 1, 2, 1, 1);
        let other_augment = Seeds::derive("", 1, 1, 2, 1);
        assert_eq!(base.init, other_order.init);
        assert_eq!(base.augment, other_order.augment);
        assert_ne!(base.order, other_order.order);
        let (a, b, c) = (
            run_with(&d, &cfg, base),
            run_with(&d, &cfg, other_order),
            run_with(&d, &cfg, other_augment),
        );
        assert_ne!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        // The split seed matters only with a holdout, and then changes the run.
        assert_eq!(
            bits(&a),
            bits(&run_with(&d, &cfg, Seeds::derive("", 1, 1, 1, 2)))
        );
        let mut held = cfg.clone();
        held.holdout = 56;
        let (h1, h2) = (
            run_with(&d, &held, base),
            run_with(&d, &held, Seeds::derive("", 1, 1, 1, 2)),
        );
        assert_ne!(bits(&h1), bits(&h2));
        assert!(h1.history[0].val_accuracy.is_some() && a.history[0].val_accuracy.is_none());
        assert_eq!(bits(&h1), bits(&run_with(&d, &held, base)));
        assert_ne!(
            Seeds::derive("other", 1, 1, 1, 1).init,
            base.init,
            "a namespace gives other streams"
        );
    }

    /// A run stopped after a checkpoint and resumed (by a new `train` call, as on another worker)
    /// ends with the same numbers as an uninterrupted run; a corrupt checkpoint is ignored.
    #[test]
    fn resuming_from_a_checkpoint_gives_the_same_numbers() {
        let _alone = crate::testing::alone();
        let (d, mut cfg) = tiny();
        cfg.epochs = 3;
        cfg.checkpoint_every = 1;
        let dir = tempfile::tempdir().unwrap();
        let store = || Some(CheckpointStore::new(dir.path(), "sweep", 5, "key"));
        let whole = run_with(&d, &cfg, Seeds::single(5));

        let stop = AtomicBool::new(false);
        let first = Run {
            seeds: Seeds::single(5),
            device: Device::Cpu,
            stop: &stop,
            checkpoints: store(),
        };
        let cut = train(&d, &cfg, &first, |m| {
            if m.epoch == 2 {
                stop.store(true, Ordering::Relaxed);
            }
        });
        assert!(matches!(cut, Err(TrainError::Cancelled)));

        let stop = AtomicBool::new(false);
        let second = Run {
            seeds: Seeds::single(5),
            device: Device::Cpu,
            stop: &stop,
            checkpoints: store(),
        };
        let mut replayed = Vec::new();
        let resumed = train(&d, &cfg, &second, |m| replayed.push(m.epoch)).unwrap();
        assert_eq!(resumed.resumed_from, 2);
        assert_eq!(replayed, vec![1, 2, 3], "every epoch is reported again");
        assert_eq!(bits(&resumed), bits(&whole));

        // Corrupt the checkpoint: it is ignored and the run starts over, with the same numbers.
        let file = dir.path().join("sweep/seed-5/checkpoint.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let third = Run {
            seeds: Seeds::single(5),
            device: Device::Cpu,
            stop: &stop,
            checkpoints: store(),
        };
        let fresh = train(&d, &cfg, &third, |_| {}).unwrap();
        assert_eq!(fresh.resumed_from, 0);
        assert_eq!(bits(&fresh), bits(&whole));
        // A checkpoint made for other settings is not used either.
        let other = Run {
            seeds: Seeds::single(5),
            device: Device::Cpu,
            stop: &stop,
            checkpoints: Some(CheckpointStore::new(dir.path(), "sweep", 5, "other key")),
        };
        assert_eq!(train(&d, &cfg, &other, |_| {}).unwrap().resumed_from, 0);
    }

    /// One step by hand: d = g + wd p; buf = m buf + d; update = d + m buf (Nesterov); p -= lr update.
    #[test]
    fn sgd_steps_like_torch_and_skips_on_overflow() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&[1.0f32, 2.0]));
        let (_, mut cfg) = tiny();
        cfg.momentum = 0.9;
        cfg.nesterov = true;
        cfg.weight_decay = 0.1;
        let mut sgd = Sgd::new(&vs, &cfg);
        let grad_of = |p: &Tensor| (p * Tensor::from_slice(&[0.5f32, -1.0])).sum(Kind::Float);
        grad_of(&p).backward();
        sgd.step(0.1, None).unwrap();
        let after: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        let want = [1.0 - 0.1 * 1.9 * 0.6, 2.0 - 0.1 * 1.9 * -0.8];
        for (a, w) in after.iter().zip(want) {
            assert!((*a as f64 - w).abs() < 1e-6, "{after:?} vs {want:?}");
        }
        // An overflowed step changes nothing, not even the momentum buffer.
        sgd.zero_grad();
        grad_of(&p).backward();
        let buffer: Vec<f32> = Vec::try_from(&sgd.buffers[0]).unwrap();
        sgd.step(0.1, Some(&Tensor::from_slice(&[1.0f32]))).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p.detach()).unwrap(), after);
        assert_eq!(Vec::<f32>::try_from(&sgd.buffers[0]).unwrap(), buffer);
    }

    #[test]
    fn eval_every_skips_evaluations_but_not_the_last() {
        let _alone = crate::testing::alone();
        let (d, mut cfg) = tiny();
        cfg.epochs = 3;
        cfg.eval_every = 2;
        let t = run_with(&d, &cfg, Seeds::single(1));
        let evaluated: Vec<bool> = t.history.iter().map(|m| m.test_loss.is_some()).collect();
        assert_eq!(evaluated, vec![false, true, true]);
    }

    #[test]
    fn schedules() {
        let (_, mut cfg) = tiny();
        cfg.epochs = 10;
        cfg.lr_peak_epoch = 2.0;
        cfg.lr = 0.4;
        // One step per epoch: the step ends at t = epoch.
        let lr = |cfg: &TrainConfig, e| learning_rate(cfg, e, 0, 1);
        assert!((lr(&cfg, 1) - 0.2).abs() < 1e-12);
        assert!((lr(&cfg, 2) - 0.4).abs() < 1e-12);
        assert!((lr(&cfg, 6) - 0.2).abs() < 1e-12);
        assert_eq!(lr(&cfg, 10), 0.0);
        cfg.schedule = Schedule::Picard;
        cfg.lr = 0.2;
        cfg.epochs = 45;
        let m = |e| lr(&cfg, e) / 0.2;
        assert!((m(1) - 0.01).abs() < 1e-12);
        assert!((m(4) - 0.51).abs() < 1e-12);
        assert!((m(5) - (0.5 * 18.0 / 19.0 + 0.01)).abs() < 1e-12);
        assert!((m(22) - (0.5 / 19.0 + 0.01)).abs() < 1e-12);
        assert!((m(23) - 0.01).abs() < 1e-12);
        assert!((m(45) - 0.01).abs() < 1e-12);
    }

    fn ramp_images(n: i64) -> Tensor {
        Tensor::arange(n * 3 * 32 * 32, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([n, 3, 32, 32])
    }

    /// Reflection repeats the image mirrored (no edge pixel twice); zeros before normalisation
    /// are black, after it the mean.
    #[test]
    fn padding_modes() {
        let (_, mut cfg) = tiny();
        let images = ramp_images(1);
        let mut padded = |mode| {
            cfg.padding = mode;
            Pipeline::new(&cfg, Device::Cpu).padded(&images)
        };
        let reflect = padded(Padding::Reflect);
        let after = padded(Padding::ZerosAfterNormalisation);
        let before = padded(Padding::ZerosBeforeNormalisation);
        assert_eq!(reflect.size(), vec![1, 3, 40, 40]);
        let p = Pipeline::new(&cfg, Device::Cpu);
        let norm = p.standardise(&images);
        // Padded row 3 is image row 1 (4 - 3); padded column 0 is image column 4.
        assert!(
            reflect
                .get(0)
                .get(0)
                .get(3)
                .narrow(0, 4, 32)
                .equal(&norm.get(0).get(0).get(1))
        );
        assert_eq!(
            reflect.double_value(&[0, 1, 10, 0]),
            norm.double_value(&[0, 1, 6, 4])
        );
        assert_eq!(after.double_value(&[0, 2, 0, 0]), 0.0);
        let (mean, std) = cfg.arch.normalisation();
        let black = (0.0 - mean[2] as f64) / std[2] as f64;
        assert!((before.double_value(&[0, 2, 0, 0]) - black).abs() < 1e-6);
        // Inside the border all three agree.
        let inner = |t: &Tensor| t.narrow(2, 4, 32).narrow(3, 4, 32);
        assert!(inner(&reflect).equal(&inner(&after)));
        assert!(inner(&before).allclose(&inner(&after), 1e-6, 1e-6, false));
    }

    /// Per batch: every image of a chunk of `batch` consecutive training images gets the chunk's
    /// draws, wherever the epoch's order puts it; at the borders, cutout corners may leave the
    /// image and the hole is clipped.
    #[test]
    fn draws_per_batch_and_cutout_at_the_borders() {
        let (_, mut cfg) = tiny();
        cfg.augment_per = AugmentPer::Batch;
        cfg.cutout_at_borders = true;
        let (n, batch) = (200, 64);
        let rng = |s| ChaCha8Rng::seed_from_u64(s);
        let d = EpochDraws::draw(n, batch, &cfg, &mut rng(1), &mut rng(2), None, Device::Cpu);
        let v = |t: &Tensor| Vec::<i64>::try_from(t).unwrap();
        let (order, cy, cx, crop) = (v(&d.order), v(&d.cut_y), v(&d.cut_x), v(&d.crop_y));
        let mut by_chunk = std::collections::HashMap::new();
        for p in 0..n as usize {
            let key = (cy[p], cx[p], crop[p]);
            assert_eq!(*by_chunk.entry(order[p] / batch).or_insert(key), key);
        }
        assert_eq!(by_chunk.len(), 4, "200 images in chunks of 64: 4 chunks");
        let corners = (0..2000).map(|s| {
            let d = EpochDraws::draw(8, 8, &cfg, &mut rng(s), &mut rng(s), None, Device::Cpu);
            v(&d.cut_y)[0]
        });
        let (lo, hi) = corners.fold((i64::MAX, i64::MIN), |(l, h), c| (l.min(c), h.max(c)));
        assert_eq!((lo, hi), (-4, 27), "centres 0..31, corner = centre - 4");
        // A hole whose corner is at (-4, 28) covers rows 0..4 and columns 28..32 only.
        cfg.flip = false;
        cfg.crop_padding = 0;
        let p = Pipeline::new(&cfg, Device::Cpu);
        let one = EpochDraws {
            order: Tensor::from_slice(&[0i64]),
            crop_y: Tensor::from_slice(&[0i64]),
            crop_x: Tensor::from_slice(&[0i64]),
            flip: Tensor::from_slice(&[false]),
            cut_y: Tensor::from_slice(&[-4i64]),
            cut_x: Tensor::from_slice(&[28i64]),
        };
        let x = p.augment(&ramp_images(1).fill_(255), &one, 0);
        let zero = x.eq(0.0).get(0).get(0);
        assert_eq!(zero.sum(Kind::Int64).int64_value(&[]), 16);
        assert!(zero.narrow(0, 0, 4).narrow(1, 28, 4).all().int64_value(&[]) == 1);
    }

    /// Page's update, by hand: dw = -lr (g + wd w); v = m v + dw; w += dw + m v, over two steps
    /// with different learning rates (where it departs from torch's SGD).
    #[test]
    fn lr_in_momentum_steps_like_page() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs
            .root()
            .var_copy("p", &Tensor::from_slice(&[1.0f64, -2.0]));
        let (_, mut cfg) = tiny();
        cfg.lr_in_momentum = true;
        cfg.weight_decay = 0.1;
        let mut sgd = Sgd::new(&vs, &cfg);
        let g = [0.5, -1.0];
        let (mut w, mut v) = ([1.0f64, -2.0], [0.0f64; 2]);
        for lr in [0.3, 0.1] {
            sgd.zero_grad();
            (&p * Tensor::from_slice(&g)).sum(Kind::Double).backward();
            sgd.step(lr, None).unwrap();
            for i in 0..2 {
                let dw = -lr * (g[i] + 0.1 * w[i]);
                v[i] = 0.9 * v[i] + dw;
                w[i] += dw + 0.9 * v[i];
            }
            let got = Vec::<f64>::try_from(&p.detach()).unwrap();
            for i in 0..2 {
                assert!((got[i] - w[i]).abs() < 1e-6, "lr {lr}: {got:?} vs {w:?}");
            }
        }
    }

    /// With drop_last an epoch trains only whole batches (256 images in batches of 96: 192),
    /// and its accuracy is over those.
    #[test]
    fn drop_last_trains_whole_batches_only() {
        let _alone = crate::testing::alone();
        let (d, mut cfg) = tiny();
        cfg.epochs = 1;
        cfg.batch_size = 96;
        let whole = run_with(&d, &cfg, Seeds::single(3));
        cfg.drop_last = true;
        let dropped = run_with(&d, &cfg, Seeds::single(3));
        let hits = dropped.history[0].train_accuracy.unwrap() * 192.0;
        assert!(
            (hits - hits.round()).abs() < 1e-9,
            "{hits}: hits among 192 images"
        );
        assert_ne!(bits(&whole), bits(&dropped));
    }

    /// The batched crop is the per-image crop of the padded image; cutout zeroes one square.
    #[test]
    fn augmentation_crops_flips_and_cuts_per_image() {
        let (_, mut cfg) = tiny();
        cfg.flip = false;
        let device = Device::Cpu;
        let p = Pipeline::new(&cfg, device);
        // Not from the global generator: a seed may be initialising in another test.
        let images = Tensor::arange(3 * 3 * 32 * 32, (Kind::Int64, device))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([3, 3, 32, 32]);
        let draws = EpochDraws {
            order: Tensor::from_slice(&[0i64, 1, 2]),
            crop_y: Tensor::from_slice(&[0i64, 4, 8]),
            crop_x: Tensor::from_slice(&[8i64, 4, 1]),
            flip: Tensor::from_slice(&[false, false, false]),
            cut_y: Tensor::from_slice(&[0i64, 10, 24]),
            cut_x: Tensor::from_slice(&[0i64, 3, 24]),
        };
        cfg.cutout = 0;
        let plain = Pipeline::new(&cfg, device).augment(&images, &draws, 0);
        let norm = p.normalise(&images).constant_pad_nd([4, 4, 4, 4]);
        for (i, (dy, dx)) in [(0, 8), (4, 4), (8, 1)].into_iter().enumerate() {
            let want = norm.get(i as i64).narrow(1, dy, 32).narrow(2, dx, 32);
            assert!(plain.get(i as i64).equal(&want), "image {i}");
        }
        let cut = p.augment(&images, &draws, 0);
        let zeroed = cut.eq(0.0).logical_and(&plain.ne(0.0)).sum(Kind::Int64);
        // 3 images x 3 channels x 8 x 8, less any pixel that was already exactly zero.
        assert!(zeroed.int64_value(&[]) <= 3 * 3 * 64);
        assert!(
            cut.get(1)
                .narrow(1, 10, 8)
                .narrow(2, 3, 8)
                .eq(0.0)
                .all()
                .int64_value(&[])
                == 1
        );
        assert!(
            cut.get(2)
                .narrow(1, 24, 8)
                .narrow(2, 24, 8)
                .eq(0.0)
                .all()
                .int64_value(&[])
                == 1
        );
        let mut flipped = draws;
        flipped.flip = Tensor::from_slice(&[true, false, false]);
        let f = Pipeline::new(&cfg, device).augment(&images, &flipped, 0);
        assert!(f.get(0).equal(&plain.get(0).flip([2])));
        assert!(f.get(1).equal(&plain.get(1)));
    }
}
