//! Task `finetune-head`: a new classifier head on a frozen pretrained backbone, as in the
//! paper's ImageNet experiments (phase 1: the head alone).
//!
//! The backbone is a file under `--model-dir`, checked against the SHA-256 the sweep names: a
//! TorchScript module returning features, or safetensors weights for a ResNet the worker builds
//! (torchvision's names). With the backbone frozen and no augmentation, its features of the whole
//! dataset are computed once per (backbone, dataset, preprocessing) and cached on local disk;
//! every seed then trains only the head on them. The seed's factors fix the head's initial
//! weights (`init`) and the order of the training features (`order`).

use crate::checkpoint::{read_checked, write_checked};
use crate::data::Dataset;
use crate::imagefolder::{self, ImageFolder, OnBadImage, Transform};
use crate::train::{EpochMetrics, INIT_LOCK, Seeds, TrainError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Torchscript,
    Safetensors,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackboneConfig {
    pub file: String,
    pub sha256: String,
    pub format: Format,
    /// For safetensors: resnet18, resnet34 or resnet50.
    pub arch: String,
    pub features: i64,
    pub input_size: i64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInit {
    Normal,
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    Sgd,
    AdamW,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub steps: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub lr_end: f64,
    pub weight_decay: f64,
    pub momentum: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneConfig {
    pub backbone: BackboneConfig,
    pub head_init: HeadInit,
    pub head_init_std: f64,
    pub label_smoothing: f64,
    pub optimizer: Optimizer,
    pub eval_every_steps: u32,
    pub bad_images: OnBadImage,
    pub head: Phase,
}

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error(
        "backbone {path} is missing: put the file there (the sweep names it relative to --model-dir)"
    )]
    Missing { path: PathBuf },
    #[error(
        "backbone {path} has SHA-256 {found}, but the sweep expects {expected}: copy the right file, or fix `backbone.sha256`"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot load backbone {path}: {problem}")]
    Load { path: PathBuf, problem: String },
    #[error(
        "backbone {path} returned features of shape {shape:?}, not [batch, {features}] as the sweep says"
    )]
    Shape {
        path: PathBuf,
        shape: Vec<i64>,
        features: i64,
    },
    #[error("{0}")]
    Data(String),
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A loaded, frozen backbone.
pub enum Backbone {
    Script(tch::CModule),
    Resnet {
        _vs: nn::VarStore,
        net: Box<dyn ModuleT>,
    },
}

impl Backbone {
    /// Loads the backbone after checking its SHA-256.
    pub fn load(
        model_dir: &Path,
        cfg: &BackboneConfig,
        device: Device,
    ) -> Result<Backbone, BackboneError> {
        let path = model_dir.join(&cfg.file);
        if !path.is_file() {
            return Err(BackboneError::Missing { path });
        }
        let load = |problem: String| BackboneError::Load {
            path: path.clone(),
            problem,
        };
        let found = file_sha256(&path).map_err(|e| load(e.to_string()))?;
        if found != cfg.sha256 {
            return Err(BackboneError::Checksum {
                path,
                found,
                expected: cfg.sha256.clone(),
            });
        }
        match cfg.format {
            Format::Torchscript => {
                let mut m =
                    tch::CModule::load_on_device(&path, device).map_err(|e| load(e.to_string()))?;
                m.set_eval();
                Ok(Backbone::Script(m))
            }
            Format::Safetensors => {
                let mut vs = nn::VarStore::new(device);
                let root = vs.root();
                let net: Box<dyn ModuleT> = match cfg.arch.as_str() {
                    "resnet18" => Box::new(tch::vision::resnet::resnet18_no_final_layer(&root)),
                    "resnet34" => Box::new(tch::vision::resnet::resnet34_no_final_layer(&root)),
                    "resnet50" => Box::new(tch::vision::resnet::resnet50_no_final_layer(&root)),
                    other => return Err(load(format!("unknown architecture `{other}`"))),
                };
                vs.load(&path).map_err(|e| load(e.to_string()))?;
                vs.freeze();
                Ok(Backbone::Resnet { _vs: vs, net })
            }
        }
    }

    /// Features of normalised images `[n, 3, s, s]`, in eval mode, without gradients.
    fn features(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        tch::no_grad(|| match self {
            Backbone::Script(m) => Ok(m.forward_ts(&[x])?),
            Backbone::Resnet { net, .. } => Ok(net.forward_t(x, false)),
        })
    }
}

/// Where images for features come from.
pub enum Source {
    Folder(Arc<ImageFolder>),
    /// A CIFAR-layout dataset, its 32x32 images upscaled to the backbone's input size.
    Cifar(Arc<Dataset>),
}

impl Source {
    pub fn fingerprint(&self) -> &str {
        match self {
            Source::Folder(f) => &f.fingerprint,
            Source::Cifar(d) => &d.fingerprint,
        }
    }

    pub fn classes(&self) -> i64 {
        match self {
            Source::Folder(f) => f.classes.len() as i64,
            Source::Cifar(_) => crate::data::CLASSES as i64,
        }
    }
}

/// The backbone's features of a dataset: float `[n, features]` and labels `[n]`, on the CPU.
pub struct Features {
    pub train: Tensor,
    pub train_labels: Tensor,
    pub val: Tensor,
    pub val_labels: Tensor,
    pub classes: i64,
}

// SAFETY: written once when computed or loaded, only read afterwards (as Dataset).
unsafe impl Sync for Features {}

/// The key of a feature cache entry: everything that determines the features.
pub fn cache_key(cfg: &BackboneConfig, source: &Source) -> String {
    let text = format!(
        "seedsweep-features/v1|{}|{}|{}|{:?}|{:?}|resize-centre-crop",
        cfg.sha256,
        source.fingerprint(),
        cfg.input_size,
        cfg.mean,
        cfg.std
    );
    format!("{:x}", Sha256::digest(text))
}

/// Feature files on local disk: `DIR/KEY.safetensors` with `DIR/KEY.sha256` beside it, in the
/// checkpoints' checked format ([`write_checked`]); a file whose checksum does not match is
/// rebuilt.
pub struct FeatureCache {
    pub dir: PathBuf,
}

impl FeatureCache {
    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.safetensors")),
            self.dir.join(format!("{key}.sha256")),
        )
    }

    pub fn load(&self, key: &str) -> Option<Features> {
        let (data, sum) = self.paths(key);
        if !data.exists() {
            return None;
        }
        let attempt = || -> anyhow::Result<Features> {
            let mut t = read_checked(&data, &sum)?;
            let mut take = |name: &str| {
                t.remove(name)
                    .ok_or_else(|| anyhow::anyhow!("it lacks `{name}`"))
            };
            let classes = take("classes")?.int64_value(&[0]);
            Ok(Features {
                train: take("train")?,
                train_labels: take("train_labels")?,
                val: take("val")?,
                val_labels: take("val_labels")?,
                classes,
            })
        };
        match attempt() {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %data.display(), problem = %e, "feature cache unusable; rebuilding it");
                None
            }
        }
    }

    pub fn store(&self, key: &str, f: &Features) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (data, sum) = self.paths(key);
        let named = [
            ("train".to_string(), f.train.shallow_clone()),
            ("train_labels".to_string(), f.train_labels.shallow_clone()),
            ("val".to_string(), f.val.shallow_clone()),
            ("val_labels".to_string(), f.val_labels.shallow_clone()),
            ("classes".to_string(), Tensor::from_slice(&[f.classes])),
        ];
        write_checked(&data, &sum, &named)
    }
}

const FEATURE_BATCH: i64 = 64;

fn normalise(images: &Tensor, cfg: &BackboneConfig, device: Device) -> Tensor {
    let mean = Tensor::from_slice(&cfg.mean.map(|v| v as f32))
        .view([1, 3, 1, 1])
        .to_device(device);
    let std = Tensor::from_slice(&cfg.std.map(|v| v as f32))
        .view([1, 3, 1, 1])
        .to_device(device);
    (images.to_device(device).to_kind(Kind::Float) / 255.0 - mean) / std
}

/// Runs the backbone over uint8 images `[n, 3, s, s]` in batches; returns float features on the
/// CPU.
fn run_backbone(
    backbone: &Backbone,
    cfg: &BackboneConfig,
    images: &Tensor,
    device: Device,
) -> Result<Tensor, TrainError> {
    let n = images.size()[0];
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = FEATURE_BATCH.min(n - start);
        let mut x = normalise(&images.narrow(0, start, len), cfg, device);
        let side = cfg.input_size;
        if x.size()[2] != side || x.size()[3] != side {
            x = x.upsample_bilinear2d([side, side], false, None, None);
        }
        let f = backbone.features(&x)?;
        if f.size() != [len, cfg.features] {
            return Err(TrainError::Device(
                BackboneError::Shape {
                    path: PathBuf::from(&cfg.file),
                    shape: f.size(),
                    features: cfg.features,
                }
                .to_string(),
            ));
        }
        out.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
        start += len;
    }
    Ok(Tensor::cat(&out, 0))
}

/// The features of an ImageFolder split, decoding on `threads` threads.
fn folder_features(
    backbone: &Backbone,
    cfg: &BackboneConfig,
    items: &[imagefolder::Item],
    threads: usize,
    on_bad: OnBadImage,
    device: Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let side = cfg.input_size;
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let mut failure = None;
    let how = imagefolder::Decoding {
        size: side as u32,
        transform: Transform::ResizeCentreCrop,
        threads,
        chunk: 256,
        on_bad,
    };
    let decoded = imagefolder::decode_chunks(items, how, &|_| 0, |chunk| {
        if chunk.labels.is_empty() {
            return Ok(());
        }
        let n = chunk.labels.len() as i64;
        let images = Tensor::from_slice(&chunk.images).view([n, 3, side, side]);
        match run_backbone(backbone, cfg, &images, device) {
            Ok(f) => feats.push(f),
            Err(e) => failure = Some(e),
        }
        labels.extend(chunk.labels);
        Ok(())
    });
    decoded.map_err(|e| TrainError::Device(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if feats.is_empty() {
        return Err(TrainError::Device(
            "no image of the split could be decoded".into(),
        ));
    }
    Ok((Tensor::cat(&feats, 0), Tensor::from_slice(&labels)))
}

/// Computes the features of `source` with `backbone`.
pub fn compute_features(
    backbone: &Backbone,
    cfg: &BackboneConfig,
    source: &Source,
    threads: usize,
    on_bad: OnBadImage,
    device: Device,
) -> Result<Features, TrainError> {
    let started = Instant::now();
    let (train, train_labels, val, val_labels) = match source {
        Source::Folder(f) => {
            let (t, tl) = folder_features(backbone, cfg, &f.train, threads, on_bad, device)?;
            let (v, vl) = folder_features(backbone, cfg, &f.val, threads, on_bad, device)?;
            (t, tl, v, vl)
        }
        Source::Cifar(d) => (
            run_backbone(backbone, cfg, &d.train.images, device)?,
            d.train.labels.shallow_clone(),
            run_backbone(backbone, cfg, &d.test.images, device)?,
            d.test.labels.shallow_clone(),
        ),
    };
    tracing::info!(
        train = train.size()[0],
        val = val.size()[0],
        seconds = started.elapsed().as_secs_f64(),
        "backbone features computed"
    );
    Ok(Features {
        train,
        train_labels,
        val,
        val_labels,
        classes: source.classes(),
    })
}

/// The learning rate at step `step` (from 0) of `steps`: a cosine from `lr` to `lr_end`.
pub fn cosine_lr(phase: &Phase, step: u32) -> f64 {
    let t = step as f64 / phase.steps.max(1) as f64;
    phase.lr_end + 0.5 * (phase.lr - phase.lr_end) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Top-1 and top-5 hits (or top-k with fewer classes) of `logits` against `labels`, as scalar
/// tensors on their device.
fn hits(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let labels = labels.view([-1, 1]);
    let top1 = top.narrow(1, 0, 1).eq_tensor(&labels).sum(Kind::Int64);
    let top5 = top.eq_tensor(&labels).sum(Kind::Int64);
    (top1, top5)
}

/// Trains a new head on cached features. Calls `on_eval` after every evaluation, numbered from 1
/// as epochs are.
pub fn train_head(
    features: &Features,
    cfg: &FinetuneConfig,
    seeds: Seeds,
    device: Device,
    stop: &AtomicBool,
    mut on_eval: impl FnMut(&EpochMetrics),
) -> Result<Vec<EpochMetrics>, TrainError> {
    let f = cfg.backbone.features;
    let classes = features.classes;
    let vs = nn::VarStore::new(device);
    let head = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seeds.init as i64);
        match cfg.head_init {
            HeadInit::Default => nn::linear(vs.root() / "head", f, classes, Default::default()),
            HeadInit::Normal => nn::linear(
                vs.root() / "head",
                f,
                classes,
                nn::LinearConfig {
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: cfg.head_init_std,
                    },
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            ),
        }
    };
    let phase = &cfg.head;
    let mut opt = match cfg.optimizer {
        Optimizer::Sgd => nn::Sgd {
            momentum: phase.momentum,
            dampening: 0.0,
            wd: phase.weight_decay,
            nesterov: false,
        }
        .build(&vs, phase.lr)?,
        Optimizer::AdamW => nn::AdamW {
            wd: phase.weight_decay,
            ..Default::default()
        }
        .build(&vs, phase.lr)?,
    };
    let train = features.train.to_device(device);
    let train_labels = features.train_labels.to_device(device);
    let val = features.val.to_device(device);
    let val_labels = features.val_labels.to_device(device);
    let n = train.size()[0];
    let batch = (phase.batch_size as i64).min(n);
    let mut order_rng = ChaCha8Rng::seed_from_u64(seeds.order);
    let mut order: Vec<i64> = Vec::new();
    let mut at = 0usize;
    let mut history = Vec::new();
    // Sums kept on the device and read at each evaluation: no synchronisation per step.
    let zero = |kind| Tensor::zeros([], (kind, device));
    let (mut loss_sum, mut correct, mut seen) = (zero(Kind::Double), zero(Kind::Int64), 0i64);
    let mut started = Instant::now();
    for step in 0..phase.steps {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        // Passes over the training features, each in a fresh order from the order generator.
        let mut idx = Vec::with_capacity(batch as usize);
        while idx.len() < batch as usize {
            if at == order.len() {
                order = crate::train::permutation(n, &mut order_rng);
                at = 0;
            }
            idx.push(order[at]);
            at += 1;
        }
        let idx = Tensor::from_slice(&idx).to_device(device);
        let x = train.index_select(0, &idx);
        let y = train_labels.index_select(0, &idx);
        let lr = cosine_lr(phase, step);
        opt.set_lr(lr);
        let logits = x.apply(&head);
        let loss = logits.cross_entropy_loss::<Tensor>(
            &y,
            None,
            Reduction::Mean,
            -100,
            cfg.label_smoothing,
        );
        opt.zero_grad();
        loss.f_backward()?;
        opt.step();
        tch::no_grad(|| {
            loss_sum += loss.to_kind(Kind::Double) * batch as f64;
            correct += hits(&logits, &y).0;
        });
        seen += batch;
        let done = step + 1;
        if done % cfg.eval_every_steps == 0 || done == phase.steps {
            let train_loss = loss_sum.double_value(&[]) / seen as f64;
            if !train_loss.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch: history.len() as u32 + 1,
                    loss: train_loss,
                });
            }
            let (test_loss, top1, top5) = tch::no_grad(|| {
                let logits = val.apply(&head);
                let loss = logits
                    .cross_entropy_loss::<Tensor>(&val_labels, None, Reduction::Mean, -100, 0.0)
                    .double_value(&[]);
                let (t1, t5) = hits(&logits, &val_labels);
                (loss, t1.int64_value(&[]), t5.int64_value(&[]))
            });
            let nv = val.size()[0] as f64;
            let m = EpochMetrics {
                epoch: history.len() as u32 + 1,
                train_loss,
                train_accuracy: correct.int64_value(&[]) as f64 / seen as f64,
                test_loss: Some(test_loss),
                test_accuracy: Some(top1 as f64 / nv),
                test_top5: (classes > 5).then(|| top5 as f64 / nv),
                val_loss: None,
                val_accuracy: None,
                lr,
                seconds: started.elapsed().as_secs_f64(),
            };
            on_eval(&m);
            history.push(m);
            (loss_sum, correct, seen) = (zero(Kind::Double), zero(Kind::Int64), 0);
            started = Instant::now();
        }
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy_features(n: i64, f: i64, classes: i64) -> Features {
        // Linearly separable: class c has a bump in feature c.
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        let x = labels.one_hot(f).to_kind(Kind::Float) * 3.0
            + Tensor::arange(n * f, (Kind::Float, Device::Cpu))
                .view([n, f])
                .sin()
                * 0.5;
        Features {
            train: x.shallow_clone(),
            train_labels: labels.shallow_clone(),
            val: x,
            val_labels: labels,
            classes,
        }
    }

    fn cfg() -> FinetuneConfig {
        FinetuneConfig {
            backbone: BackboneConfig {
                file: "x.pt".into(),
                sha256: "0".repeat(64),
                format: Format::Torchscript,
                arch: String::new(),
                features: 8,
                input_size: 32,
                mean: [0.5; 3],
                std: [0.25; 3],
            },
            head_init: HeadInit::Normal,
            head_init_std: 0.01,
            label_smoothing: 0.1,
            optimizer: Optimizer::Sgd,
            eval_every_steps: 10,
            bad_images: OnBadImage::Skip,
            head: Phase {
                steps: 30,
                batch_size: 16,
                lr: 0.5,
                lr_end: 0.0,
                weight_decay: 0.0,
                momentum: 0.9,
            },
        }
    }

    #[test]
    fn a_head_learns_reproducibly_and_seeds_differ() {
        let feats = toy_features(120, 8, 6);
        let stop = AtomicBool::new(false);
        let run = |seed| {
            train_head(
                &feats,
                &cfg(),
                Seeds::single(seed),
                Device::Cpu,
                &stop,
                |_| {},
            )
            .unwrap()
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a.len(), 3, "an evaluation every 10 of 30 steps");
        let bits =
            |h: &[EpochMetrics]| -> Vec<u64> { h.iter().map(|m| m.train_loss.to_bits()).collect() };
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        let last = a.last().unwrap();
        assert!(last.test_accuracy.unwrap() > 0.9, "{last:?}");
        assert!(last.test_top5.unwrap() >= last.test_accuracy.unwrap());
        let mut adamw = cfg();
        adamw.optimizer = Optimizer::AdamW;
        adamw.head.lr = 0.05;
        let h = train_head(&feats, &adamw, Seeds::single(1), Device::Cpu, &stop, |_| {}).unwrap();
        assert!(h.last().unwrap().test_accuracy.unwrap() > 0.9);
    }

    #[test]
    fn cosine_runs_from_lr_to_lr_end() {
        let p = cfg().head;
        assert_eq!(cosine_lr(&p, 0), 0.5);
        assert!((cosine_lr(&p, 15) - 0.25).abs() < 1e-12);
        assert!(cosine_lr(&p, 30).abs() < 1e-12);
    }

    #[test]
    fn the_feature_cache_round_trips_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FeatureCache {
            dir: dir.path().to_path_buf(),
        };
        let f = toy_features(10, 4, 3);
        assert!(cache.load("k").is_none());
        cache.store("k", &f).unwrap();
        let back = cache.load("k").unwrap();
        assert!(back.train.equal(&f.train) && back.val_labels.equal(&f.val_labels));
        assert_eq!(back.classes, 3);
        let path = dir.path().join("k.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(cache.load("k").is_none());
    }
}
