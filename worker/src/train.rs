//! Trains one seed of ResNet-9. The seed fixes everything random, through generators derived from
//! it for each factor: the initial weights (`init`), the data order (`order`) and the augmentation
//! (`augment`). Nothing draws from an unseeded source, so on the CPU the same seed gives the same
//! numbers bit for bit.

use crate::data::{Dataset, Split};
use crate::model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// CIFAR-10 channel statistics (as in the reference recipes), applied to every dataset.
const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];
const EVAL_BATCH: i64 = 1000;

/// How to train; mirrors the sweep file's `[train]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: u32,
    pub batch_size: u32,
    pub width: f64,
    pub lr: f64,
    pub lr_peak_epoch: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub crop_padding: u32,
    pub flip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochMetrics {
    pub epoch: u32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// The learning rate at the epoch's last step.
    pub lr: f64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training diverged: the mean training loss of epoch {epoch} is {loss}")]
    NonFinite { epoch: u32, loss: f64 },
    #[error("training was stopped")]
    Cancelled,
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// A 64-bit seed for one source of randomness, derived from the run's seed. Changing how one factor
/// is drawn never perturbs the others.
pub fn factor_seed(seed: i64, factor: &str) -> u64 {
    let digest = Sha256::digest(format!("seedsweep/v1/{factor}/{seed}"));
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

/// libtorch initialises weights from its global generator; this lock keeps seeding it and
/// building a model one atomic step when several seeds train in one process. Anything else in the
/// process that builds a model (or otherwise draws from that generator) must hold it too.
pub(crate) static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The learning rate at fractional epoch `t`: linear from 0 to `lr` at `lr_peak_epoch`, then
/// linear down to 0 at the last epoch.
pub fn learning_rate(cfg: &TrainConfig, t: f64) -> f64 {
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

/// Trains `seed` and calls `on_epoch` as each epoch ends. Checks `stop` between steps.
pub fn train(
    data: &Dataset,
    cfg: &TrainConfig,
    seed: i64,
    device: Device,
    stop: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Vec<EpochMetrics>, TrainError> {
    let vs = nn::VarStore::new(device);
    let net = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(factor_seed(seed, "init") as i64);
        let root = vs.root();
        model::resnet9(&root, cfg.width, crate::data::CLASSES as i64)
    };
    let mut opt = nn::Sgd {
        momentum: cfg.momentum,
        dampening: 0.0,
        wd: cfg.weight_decay,
        nesterov: cfg.nesterov,
    }
    .build(&vs, 0.0)?;
    let mut order_rng = ChaCha8Rng::seed_from_u64(factor_seed(seed, "order"));
    let mut augment_rng = ChaCha8Rng::seed_from_u64(factor_seed(seed, "augment"));

    // The whole training set moves to the device once, as uint8.
    let train_images = data.train.images.to_device(device);
    let train_labels = data.train.labels.to_device(device);
    let mean = Tensor::from_slice(&MEAN)
        .view([1, 3, 1, 1])
        .to_device(device);
    let std = Tensor::from_slice(&STD)
        .view([1, 3, 1, 1])
        .to_device(device);
    let normalise = |x: &Tensor| (x.to_kind(Kind::Float) / 255.0 - &mean) / &std;

    let n = data.train.len();
    let batch = (cfg.batch_size as i64).min(n);
    let steps = (n + batch - 1) / batch;
    let mut history = Vec::with_capacity(cfg.epochs as usize);
    let mut order: Vec<i64> = (0..n).collect();
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        shuffle(&mut order, &mut order_rng);
        let index = Tensor::from_slice(&order).to_device(device);
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let mut lr = 0.0;
        for step in 0..steps {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let start = step * batch;
            let idx = index.narrow(0, start, batch.min(n - start));
            let x = augment(
                &normalise(&train_images.index_select(0, &idx)),
                cfg,
                &mut augment_rng,
            );
            let y = train_labels.index_select(0, &idx);
            lr = learning_rate(cfg, (epoch - 1) as f64 + (step + 1) as f64 / steps as f64);
            opt.set_lr(lr);
            let logits = net.forward_t(&x, true);
            let loss = logits.cross_entropy_loss::<Tensor>(
                &y,
                None,
                Reduction::Mean,
                -100,
                cfg.label_smoothing,
            );
            opt.backward_step(&loss);
            tch::no_grad(|| {
                loss_sum += loss.detach() * y.size()[0] as f64;
                correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
            });
        }
        let train_loss = loss_sum.double_value(&[]) / n as f64;
        if !train_loss.is_finite() {
            return Err(TrainError::NonFinite {
                epoch,
                loss: train_loss,
            });
        }
        let (test_loss, test_accuracy) = evaluate(&net, &data.test, device, &normalise);
        let m = EpochMetrics {
            epoch,
            train_loss,
            train_accuracy: correct.int64_value(&[]) as f64 / n as f64,
            test_loss,
            test_accuracy,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_epoch(&m);
        history.push(m);
    }
    Ok(history)
}

/// Fisher-Yates with the order generator (rand's own shuffle may change between versions).
fn shuffle(order: &mut [i64], rng: &mut ChaCha8Rng) {
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
}

/// Random crop with zero padding (zero is the mean after normalisation) and horizontal flip, drawn
/// per image from the augmentation generator.
fn augment(x: &Tensor, cfg: &TrainConfig, rng: &mut ChaCha8Rng) -> Tensor {
    let b = x.size()[0];
    let side = x.size()[3];
    let pad = cfg.crop_padding as i64;
    let mut x = x.shallow_clone();
    if pad > 0 {
        let padded = x.constant_pad_nd([pad, pad, pad, pad]);
        let crops: Vec<Tensor> = (0..b)
            .map(|i| {
                let (dy, dx) = (rng.random_range(0..=2 * pad), rng.random_range(0..=2 * pad));
                padded.get(i).narrow(1, dy, side).narrow(2, dx, side)
            })
            .collect();
        x = Tensor::stack(&crops, 0);
    }
    if cfg.flip {
        let flips: Vec<bool> = (0..b).map(|_| rng.random_bool(0.5)).collect();
        let mask = Tensor::from_slice(&flips)
            .to_device(x.device())
            .view([b, 1, 1, 1]);
        x = x.flip([3]).where_self(&mask, &x);
    }
    x
}

/// Mean cross-entropy (no label smoothing) and accuracy on a split.
fn evaluate(
    net: &impl ModuleT,
    split: &Split,
    device: Device,
    normalise: &dyn Fn(&Tensor) -> Tensor,
) -> (f64, f64) {
    tch::no_grad(|| {
        let n = split.len();
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let mut start = 0;
        while start < n {
            let len = EVAL_BATCH.min(n - start);
            let x = normalise(&split.images.narrow(0, start, len).to_device(device));
            let y = split.labels.narrow(0, start, len).to_device(device);
            let logits = net.forward_t(&x, false);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)
                .to_kind(Kind::Double);
            correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
            start += len;
        }
        (
            loss_sum.double_value(&[]) / n as f64,
            correct.int64_value(&[]) as f64 / n as f64,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data;

    fn tiny() -> (Dataset, TrainConfig) {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = data::synthetic_records(256, 128, 3);
        data::write_dataset(&dir.path().join("s"), &train, &test).unwrap();
        let d = data::load(dir.path(), "s").unwrap();
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 64,
            width: 0.125,
            lr: 0.2,
            lr_peak_epoch: 0.5,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            label_smoothing: 0.0,
            crop_padding: 4,
            flip: true,
        };
        (d, cfg)
    }

    #[test]
    fn same_seed_is_bitwise_identical_and_seeds_differ() {
        tch::set_num_threads(1);
        let (d, cfg) = tiny();
        let stop = AtomicBool::new(false);
        let run = |seed| train(&d, &cfg, seed, Device::Cpu, &stop, |_| {}).unwrap();
        let (a, b, c) = (run(7), run(7), run(8));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.train_loss.to_bits(), y.train_loss.to_bits());
            assert_eq!(x.test_loss.to_bits(), y.test_loss.to_bits());
            assert_eq!(x.test_accuracy.to_bits(), y.test_accuracy.to_bits());
        }
        assert_ne!(a[1].train_loss.to_bits(), c[1].train_loss.to_bits());
        // Learning happens: the loss falls.
        assert!(a[1].train_loss < a[0].train_loss, "{a:?}");
    }

    #[test]
    fn schedule_is_piecewise_linear() {
        let (_, mut cfg) = tiny();
        cfg.epochs = 10;
        cfg.lr_peak_epoch = 2.0;
        cfg.lr = 0.4;
        assert_eq!(learning_rate(&cfg, 0.0), 0.0);
        assert!((learning_rate(&cfg, 1.0) - 0.2).abs() < 1e-12);
        assert!((learning_rate(&cfg, 2.0) - 0.4).abs() < 1e-12);
        assert!((learning_rate(&cfg, 6.0) - 0.2).abs() < 1e-12);
        assert_eq!(learning_rate(&cfg, 10.0), 0.0);
    }

    #[test]
    fn factors_are_independent_streams() {
        assert_ne!(factor_seed(1, "init"), factor_seed(1, "order"));
        assert_ne!(factor_seed(1, "init"), factor_seed(2, "init"));
        assert_eq!(factor_seed(1, "init"), factor_seed(1, "init"));
    }
}
