//! Task `finetune-head`: a new classifier head on a pretrained backbone, as in the paper's
//! ImageNet experiments. Phase 1 trains the head alone on the frozen backbone; phase 2
//! (`[finetune.full]`, optional) trains the whole network, each with its own steps, batch size
//! and cosine schedule.
//!
//! The backbone is a file under `--model-dir`, checked against the SHA-256 the sweep names: a
//! TorchScript module returning features, or safetensors weights for a ResNet the worker builds
//! (torchvision's names). With the backbone frozen and no augmentation, its features of the whole
//! dataset are computed once per (backbone, dataset, preprocessing) and cached on local disk;
//! phase 1 then trains only the head on them. Otherwise images are decoded for every step. The
//! seed's factors fix the head's initial weights (`init`), the order of the training data
//! (`order`) and the random-resized crops and flips (`augment`).

use crate::checkpoint::{read_checked, write_checked};
use crate::data::Dataset;
use crate::imagefolder::{self, ImageFolder, OnBadImage, Transform};
use crate::train::{Correct, EpochMetrics, INIT_LOCK, Seeds, TrainError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
pub use seedsweep_core::spec::finetune::{BackboneFormat, HeadInit, Optimizer};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct BackboneConfig {
    pub file: String,
    pub sha256: String,
    pub format: BackboneFormat,
    /// For safetensors: resnet18, resnet34 or resnet50.
    pub arch: String,
    pub features: i64,
    pub input_size: i64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
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
    /// Random-resized-crop and flip on training images (no feature cache then).
    pub augment: bool,
    /// Phase 1: the head alone.
    pub head: Phase,
    /// Phase 2, when set: the whole network.
    pub full: Option<Phase>,
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

/// A loaded backbone. Its parameters live in its own var store, frozen (and the network in
/// evaluation mode) until [`Backbone::train_whole`] is called for the full fine-tuning phase.
pub struct Backbone {
    vs: nn::VarStore,
    net: Net,
    train: bool,
}

enum Net {
    Script(tch::CModule),
    Resnet(Box<dyn ModuleT>),
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
        let mut vs = nn::VarStore::new(device);
        let net = match cfg.format {
            BackboneFormat::Torchscript => {
                let mut m =
                    tch::CModule::load_on_device(&path, device).map_err(|e| load(e.to_string()))?;
                m.set_eval();
                // The module's parameters, registered so that phase 2 can train them.
                let params = m.named_parameters().map_err(|e| load(e.to_string()))?;
                for (name, t) in params {
                    let _ = vs.root().add(&name.replace('.', "_"), t, true);
                }
                Net::Script(m)
            }
            BackboneFormat::Safetensors => {
                let root = vs.root();
                let net: Box<dyn ModuleT> = match cfg.arch.as_str() {
                    "resnet18" => Box::new(tch::vision::resnet::resnet18_no_final_layer(&root)),
                    "resnet34" => Box::new(tch::vision::resnet::resnet34_no_final_layer(&root)),
                    "resnet50" => Box::new(tch::vision::resnet::resnet50_no_final_layer(&root)),
                    other => return Err(load(format!("unknown architecture `{other}`"))),
                };
                vs.load(&path).map_err(|e| load(e.to_string()))?;
                Net::Resnet(net)
            }
        };
        vs.freeze();
        Ok(Backbone {
            vs,
            net,
            train: false,
        })
    }

    /// From now on the backbone's parameters take gradients (phase 2).
    fn train_whole(&mut self) {
        self.vs.unfreeze();
    }

    /// Training mode (batch statistics) or evaluation mode. A TorchScript module made with
    /// `torch.jit.trace` keeps the mode it was traced in.
    fn set_train(&mut self, train: bool) {
        self.train = train;
        if let Net::Script(m) = &mut self.net {
            if train { m.set_train() } else { m.set_eval() }
        }
    }

    /// Features of normalised images `[n, 3, s, s]`, with gradients when the backbone is
    /// trained.
    fn forward(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        match &self.net {
            Net::Script(m) => Ok(m.forward_ts(&[x])?),
            Net::Resnet(net) => Ok(net.forward_t(x, self.train)),
        }
    }

    /// Features without gradients.
    fn features(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        tch::no_grad(|| self.forward(x))
    }
}

/// Where images for features come from.
pub enum Source {
    Folder(Arc<ImageFolder>),
    /// A CIFAR-layout dataset, its 32x32 images upscaled to the backbone's input size.
    Cifar(Arc<Dataset>),
}

/// The images of one split, as [`Source::batches`] hands them over: uint8 `[n, 3, h, w]` and
/// labels `[n]` (n = 0 when every image of a chunk was unreadable and skipped).
type Batch = (Tensor, Tensor);

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

    fn len(&self, val: bool) -> usize {
        match (self, val) {
            (Source::Folder(f), false) => f.train.len(),
            (Source::Folder(f), true) => f.val.len(),
            (Source::Cifar(d), false) => d.train.len() as usize,
            (Source::Cifar(d), true) => d.test.len() as usize,
        }
    }

    /// Hands `use_batch` the images at positions `order` of the training (or validation)
    /// split, `how.chunk` at a time. ImageFolder images are decoded on `how.threads` threads
    /// with `how.transform`; CIFAR images stay 32x32 (upscaled by [`inputs`]) unless
    /// augmented, when they go through the same random-resized-crop and flip as files.
    fn batches(
        &self,
        val: bool,
        order: &[usize],
        how: imagefolder::Decoding,
        seed_of: &(dyn Fn(usize) -> u64 + Sync),
        mut use_batch: impl FnMut(Batch) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let mut decoded = |chunk: imagefolder::Chunk| {
            let n = chunk.labels.len() as i64;
            let side = how.size as i64;
            use_batch((
                Tensor::from_slice(&chunk.images).view([n, 3, side, side]),
                Tensor::from_slice(&chunk.labels),
            ))
        };
        match self {
            Source::Folder(f) => {
                let items = if val { &f.val } else { &f.train };
                let pictures: Vec<&imagefolder::Item> = order.iter().map(|&i| &items[i]).collect();
                imagefolder::decode_chunks(&pictures, how, seed_of, decoded)
            }
            Source::Cifar(d) => {
                let split = if val { &d.test } else { &d.train };
                if how.transform == Transform::RandomResizedCropFlip {
                    let bytes = Vec::<u8>::try_from(split.images.flatten(0, -1))?;
                    let labels = Vec::<i64>::try_from(&split.labels)?;
                    let side = split.images.size()[2] as u32;
                    let per = 3 * (side * side) as usize;
                    let pictures: Vec<imagefolder::Pixels> = order
                        .iter()
                        .map(|&i| imagefolder::Pixels {
                            chw: &bytes[i * per..(i + 1) * per],
                            side,
                            label: labels[i],
                            index: i,
                        })
                        .collect();
                    imagefolder::decode_chunks(&pictures, how, seed_of, &mut decoded)
                } else {
                    for part in order.chunks(how.chunk.max(1)) {
                        let idx: Vec<i64> = part.iter().map(|&i| i as i64).collect();
                        let idx = Tensor::from_slice(&idx);
                        use_batch((
                            split.images.index_select(0, &idx),
                            split.labels.index_select(0, &idx),
                        ))?;
                    }
                    Ok(())
                }
            }
        }
    }
}

impl From<imagefolder::FolderError> for TrainError {
    fn from(e: imagefolder::FolderError) -> TrainError {
        match e {
            // An image that does not decode is the dataset's, the same on every host.
            imagefolder::FolderError::BadImage { .. } => TrainError::Data(e.to_string()),
            // The folder as this host has it: its layout, its reads.
            imagefolder::FolderError::Layout { .. } | imagefolder::FolderError::Io { .. } => {
                TrainError::Host(e.to_string())
            }
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

/// Images per backbone call when computing features or evaluating.
const FEATURE_BATCH: i64 = 64;
/// Images decoded per chunk when computing features or evaluating.
const DECODE_CHUNK: usize = 256;

/// Normalised float inputs at the backbone's input size, from uint8 images `[n, 3, h, w]`
/// (upscaled bilinearly when smaller, as CIFAR images are).
fn inputs(images: &Tensor, cfg: &BackboneConfig, device: Device) -> Tensor {
    let per_channel = |v: [f64; 3]| {
        Tensor::from_slice(&v.map(|v| v as f32))
            .view([1, 3, 1, 1])
            .to_device(device)
    };
    let x = (images.to_device(device).to_kind(Kind::Float) / 255.0 - per_channel(cfg.mean))
        / per_channel(cfg.std);
    let side = cfg.input_size;
    if x.size()[2] != side || x.size()[3] != side {
        x.upsample_bilinear2d([side, side], false, None, None)
    } else {
        x
    }
}

/// Calls `f` with each slice of at most [`FEATURE_BATCH`] rows of `x` and `y`.
fn in_batches(
    x: &Tensor,
    y: &Tensor,
    mut f: impl FnMut(&Tensor, &Tensor) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let n = x.size()[0];
    let mut start = 0;
    while start < n {
        let len = FEATURE_BATCH.min(n - start);
        f(&x.narrow(0, start, len), &y.narrow(0, start, len))?;
        start += len;
    }
    Ok(())
}

/// Runs the frozen backbone over uint8 images; returns float features on the CPU.
fn run_backbone(
    backbone: &Backbone,
    cfg: &BackboneConfig,
    images: &Tensor,
    device: Device,
) -> Result<Tensor, TrainError> {
    let mut out = Vec::new();
    in_batches(images, images, |x, _| {
        let f = backbone.features(&inputs(x, cfg, device))?;
        if f.size() != [x.size()[0], cfg.features] {
            return Err(TrainError::Config(
                BackboneError::Shape {
                    path: PathBuf::from(&cfg.file),
                    shape: f.size(),
                    features: cfg.features,
                }
                .to_string(),
            ));
        }
        out.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
        Ok(())
    })?;
    Ok(Tensor::cat(&out, 0))
}

/// How images are decoded for features and evaluation: resize and centre crop, no randomness.
fn eval_decoding(cfg: &FinetuneConfig, threads: usize) -> imagefolder::Decoding {
    imagefolder::Decoding {
        size: cfg.backbone.input_size as u32,
        transform: Transform::ResizeCentreCrop,
        threads,
        chunk: DECODE_CHUNK,
        on_bad: cfg.bad_images,
    }
}

fn split_name(val: bool) -> &'static str {
    if val { "validation" } else { "training" }
}

/// The features and labels of one split, in file order.
fn split_features(
    backbone: &Backbone,
    cfg: &FinetuneConfig,
    source: &Source,
    val: bool,
    threads: usize,
    device: Device,
    stop: &AtomicBool,
) -> Result<(Tensor, Tensor), TrainError> {
    let order: Vec<usize> = (0..source.len(val)).collect();
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    let how = eval_decoding(cfg, threads);
    source.batches(val, &order, how, &|_| 0, |(images, y)| {
        // A feature pass can take hours: it stops at the next batch when asked to.
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        if y.size()[0] > 0 {
            feats.push(run_backbone(backbone, &cfg.backbone, &images, device)?);
            labels.push(y);
        }
        Ok(())
    })?;
    if feats.is_empty() {
        return Err(TrainError::Data(format!(
            "no image of the {} split could be decoded",
            split_name(val)
        )));
    }
    Ok((Tensor::cat(&feats, 0), Tensor::cat(&labels, 0)))
}

/// Computes the features of `source` with `backbone`, decoding on `threads` threads; stops
/// with [`TrainError::Cancelled`] once `stop` is set.
pub fn compute_features(
    backbone: &Backbone,
    cfg: &FinetuneConfig,
    source: &Source,
    threads: usize,
    device: Device,
    stop: &AtomicBool,
) -> Result<Features, TrainError> {
    let started = Instant::now();
    let split = |val| split_features(backbone, cfg, source, val, threads, device, stop);
    let (train, train_labels) = split(false)?;
    let (val, val_labels) = split(true)?;
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
    let (top1, top5) = example_hits(logits, labels);
    (top1.sum(Kind::Int64), top5.sum(Kind::Int64))
}

/// Per example: whether the top-1 (and whether one of the top 5) predictions is right.
fn example_hits(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let labels = labels.view([-1, 1]);
    let top1 = top.narrow(1, 0, 1).eq_tensor(&labels).flatten(0, -1);
    let top5 = top.eq_tensor(&labels).any_dim(1, false);
    (top1, top5)
}

/// Evaluation sums over the batches of a validation split, and which examples were right.
#[derive(Debug, Default)]
struct Tally {
    loss: f64,
    top1: i64,
    top5: i64,
    n: i64,
    right: Vec<Tensor>,
}

/// Mean validation loss, top-1 and (with more than five classes) top-5 accuracy.
struct Scores {
    loss: f64,
    top1: f64,
    top5: Option<f64>,
    /// Per validation example: whether the top-1 prediction was right.
    right: Tensor,
}

impl Tally {
    fn add(&mut self, logits: &Tensor, labels: &Tensor) {
        let loss = logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, -100, 0.0);
        let (top1, top5) = example_hits(logits, labels);
        self.loss += loss.double_value(&[]);
        self.top1 += top1.sum(Kind::Int64).int64_value(&[]);
        self.top5 += top5.sum(Kind::Int64).int64_value(&[]);
        self.n += labels.size()[0];
        self.right.push(top1);
    }

    fn scores(&self, classes: i64) -> Scores {
        let n = self.n.max(1) as f64;
        Scores {
            loss: self.loss / n,
            top1: self.top1 as f64 / n,
            top5: (classes > 5).then(|| self.top5 as f64 / n),
            right: Tensor::cat(&self.right, 0),
        }
    }
}

/// The new classifier in its own var store, initialised from the seed's `init` generator.
pub struct Head {
    vs: nn::VarStore,
    linear: nn::Linear,
    classes: i64,
}

impl Head {
    pub fn new(cfg: &FinetuneConfig, seeds: Seeds, classes: i64, device: Device) -> Head {
        let vs = nn::VarStore::new(device);
        let f = cfg.backbone.features;
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seeds.init as i64);
        let linear = match cfg.head_init {
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
        };
        Head {
            vs,
            linear,
            classes,
        }
    }

    fn forward(&self, features: &Tensor) -> Tensor {
        features.apply(&self.linear)
    }
}

fn optimizer(
    cfg: &FinetuneConfig,
    phase: &Phase,
    vs: &nn::VarStore,
) -> Result<nn::Optimizer, TrainError> {
    Ok(match cfg.optimizer {
        Optimizer::Sgd => nn::Sgd {
            momentum: phase.momentum,
            dampening: 0.0,
            wd: phase.weight_decay,
            nesterov: false,
        }
        .build(vs, phase.lr)?,
        Optimizer::Adamw => nn::AdamW {
            wd: phase.weight_decay,
            ..Default::default()
        }
        .build(vs, phase.lr)?,
    })
}

/// One phase's steps: the learning rate of each, running sums kept on the device (read only
/// at an evaluation, so no synchronisation per step), and the evaluations, numbered from 1 over
/// the whole run as epochs are.
pub struct Progress<'a> {
    phase: &'a Phase,
    eval_every: u32,
    step: u32,
    lr: f64,
    loss_sum: Option<Tensor>,
    correct: Option<Tensor>,
    seen: i64,
    started: Instant,
    history: &'a mut Vec<EpochMetrics>,
    on_eval: &'a mut dyn FnMut(&EpochMetrics),
    /// Which validation examples the latest evaluation got right.
    last_right: Option<Tensor>,
}

impl<'a> Progress<'a> {
    pub fn new(
        phase: &'a Phase,
        eval_every: u32,
        history: &'a mut Vec<EpochMetrics>,
        on_eval: &'a mut dyn FnMut(&EpochMetrics),
    ) -> Progress<'a> {
        Progress {
            phase,
            eval_every: eval_every.max(1),
            step: 0,
            lr: phase.lr,
            loss_sum: None,
            correct: None,
            seen: 0,
            started: Instant::now(),
            history,
            on_eval,
            last_right: None,
        }
    }

    fn finished(&self) -> bool {
        self.step >= self.phase.steps
    }

    /// Sets this step's learning rate on `opts`.
    fn begin(&mut self, opts: &mut [nn::Optimizer]) {
        self.lr = cosine_lr(self.phase, self.step);
        for o in opts {
            o.set_lr(self.lr);
        }
    }

    /// Counts a step and adds its loss and hits (none when every image of its batch was
    /// unreadable); says whether an evaluation is due.
    fn end(&mut self, outcome: Option<(&Tensor, &Tensor, &Tensor)>) -> bool {
        if let Some((loss, logits, y)) = outcome {
            let n = y.size()[0];
            tch::no_grad(|| {
                let l = loss.to_kind(Kind::Double) * n as f64;
                let c = hits(logits, y).0;
                self.loss_sum = Some(self.loss_sum.take().map_or(l.shallow_clone(), |s| s + &l));
                self.correct = Some(self.correct.take().map_or(c.shallow_clone(), |s| s + &c));
            });
            self.seen += n;
        }
        self.step += 1;
        self.step.is_multiple_of(self.eval_every) || self.step == self.phase.steps
    }

    fn evaluate(&mut self, s: Scores) -> Result<(), TrainError> {
        let epoch = self.history.len() as u32 + 1;
        let (Some(loss_sum), Some(correct)) = (self.loss_sum.take(), self.correct.take()) else {
            return Err(TrainError::Data(format!(
                "no training image could be decoded for evaluation {epoch}'s steps"
            )));
        };
        let seen = self.seen as f64;
        let train_loss = loss_sum.double_value(&[]) / seen;
        if !train_loss.is_finite() {
            return Err(TrainError::NonFinite {
                epoch,
                loss: train_loss,
            });
        }
        let m = EpochMetrics {
            epoch,
            train_loss: Some(train_loss),
            train_accuracy: Some(correct.int64_value(&[]) as f64 / seen),
            test_loss: Some(s.loss),
            test_accuracy: Some(s.top1),
            test_top5: s.top5,
            val_loss: None,
            val_accuracy: None,
            lr: Some(self.lr),
            seconds: self.started.elapsed().as_secs_f64(),
            custom: Default::default(),
        };
        (self.on_eval)(&m);
        self.history.push(m);
        self.last_right = Some(s.right);
        self.seen = 0;
        self.started = Instant::now();
        Ok(())
    }
}

/// Phase 1 from cached features: the head alone, on the training features in passes of a
/// fresh order each, evaluated on the validation features.
pub fn head_on_features(
    features: &Features,
    cfg: &FinetuneConfig,
    head: &Head,
    order_rng: &mut ChaCha8Rng,
    device: Device,
    stop: &AtomicBool,
    progress: &mut Progress,
) -> Result<(), TrainError> {
    let mut opt = optimizer(cfg, &cfg.head, &head.vs)?;
    let train = features.train.to_device(device);
    let train_labels = features.train_labels.to_device(device);
    let val = features.val.to_device(device);
    let val_labels = features.val_labels.to_device(device);
    let n = train.size()[0];
    let batch = (cfg.head.batch_size as i64).min(n) as usize;
    let mut order: Vec<i64> = Vec::new();
    let mut at = 0usize;
    while !progress.finished() {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        let mut idx = Vec::with_capacity(batch);
        while idx.len() < batch {
            if at == order.len() {
                order = crate::train::permutation(n, order_rng);
                at = 0;
            }
            idx.push(order[at]);
            at += 1;
        }
        let idx = Tensor::from_slice(&idx).to_device(device);
        let x = train.index_select(0, &idx);
        let y = train_labels.index_select(0, &idx);
        progress.begin(std::slice::from_mut(&mut opt));
        let logits = head.forward(&x);
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
        if progress.end(Some((&loss, &logits, &y))) {
            let mut tally = Tally::default();
            tch::no_grad(|| tally.add(&head.forward(&val), &val_labels));
            progress.evaluate(tally.scores(head.classes))?;
        }
    }
    Ok(())
}

/// What a run reads besides its configuration.
pub struct RunInputs<'a> {
    pub source: &'a Source,
    pub seeds: Seeds,
    pub device: Device,
    pub stop: &'a AtomicBool,
    /// Threads that decode images.
    pub threads: usize,
}

/// The validation scores of backbone and head on decoded images.
fn eval_images(
    backbone: &mut Backbone,
    head: &Head,
    cfg: &FinetuneConfig,
    run: &RunInputs,
) -> Result<Scores, TrainError> {
    backbone.set_train(false);
    let order: Vec<usize> = (0..run.source.len(true)).collect();
    let mut tally = Tally::default();
    let how = eval_decoding(cfg, run.threads);
    run.source
        .batches(true, &order, how, &|_| 0, |(images, y)| {
            let y = y.to_device(run.device);
            in_batches(&images, &y, |x, y| {
                let x = inputs(x, &cfg.backbone, run.device);
                let logits = tch::no_grad(|| backbone.forward(&x).map(|f| head.forward(&f)))?;
                tally.add(&logits, y);
                Ok(())
            })
        })?;
    if tally.n == 0 {
        return Err(TrainError::Data(
            "no image of the validation split could be decoded".into(),
        ));
    }
    Ok(tally.scores(head.classes))
}

/// The generator seed of the image at `position` of phase `phase`'s training stream.
fn draw_seed(augment: u64, phase: u64, position: usize) -> u64 {
    let splitmix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    splitmix(augment ^ splitmix((phase << 48) ^ position as u64))
}

/// A phase on decoded images: the head alone over the frozen backbone (`whole` false, when
/// augmenting), or the whole network (phase 2). Images come in passes of a fresh order each;
/// with `augment`, each gets a random-resized crop and flip drawn from the seed's `augment`
/// generator and its position in the stream.
#[allow(clippy::too_many_arguments)]
fn on_images(
    cfg: &FinetuneConfig,
    run: &RunInputs,
    phase_no: u64,
    backbone: &mut Backbone,
    head: &Head,
    whole: bool,
    order_rng: &mut ChaCha8Rng,
    progress: &mut Progress,
) -> Result<(), TrainError> {
    let phase = progress.phase;
    let n = run.source.len(false);
    if n == 0 {
        return Err(TrainError::Data("the training split has no images".into()));
    }
    let batch = (phase.batch_size as usize).min(n);
    let total = phase.steps as usize * batch;
    let mut order = Vec::with_capacity(total);
    while order.len() < total {
        let pass = crate::train::permutation(n as i64, order_rng);
        order.extend(pass.into_iter().map(|i| i as usize));
    }
    order.truncate(total);
    let augment = run.seeds.augment;
    let how = imagefolder::Decoding {
        transform: if cfg.augment {
            Transform::RandomResizedCropFlip
        } else {
            Transform::ResizeCentreCrop
        },
        chunk: batch,
        ..eval_decoding(cfg, run.threads)
    };
    let mut opts = vec![optimizer(cfg, phase, &head.vs)?];
    if whole {
        opts.push(optimizer(cfg, phase, &backbone.vs)?);
    }
    let seed_of = move |position| draw_seed(augment, phase_no, position);
    run.source
        .batches(false, &order, how, &seed_of, |(images, y)| {
            if run.stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            progress.begin(&mut opts);
            let mut outcome = None;
            if y.size()[0] > 0 {
                let x = inputs(&images, &cfg.backbone, run.device);
                let y = y.to_device(run.device);
                backbone.set_train(whole);
                let features = if whole {
                    backbone.forward(&x)?
                } else {
                    backbone.features(&x)?
                };
                let logits = head.forward(&features);
                let loss = logits.cross_entropy_loss::<Tensor>(
                    &y,
                    None,
                    Reduction::Mean,
                    -100,
                    cfg.label_smoothing,
                );
                opts.iter_mut().for_each(nn::Optimizer::zero_grad);
                loss.f_backward()?;
                opts.iter_mut().for_each(nn::Optimizer::step);
                outcome = Some((loss, logits, y));
            }
            if progress.end(outcome.as_ref().map(|(l, g, y)| (l, g, y))) {
                let scores = eval_images(backbone, head, cfg, run)?;
                progress.evaluate(scores)?;
            }
            Ok(())
        })
}

/// The run of one seed: phase 1 (the head alone; from cached features, or on augmented images
/// through the frozen backbone), then phase 2 (the whole network) when configured. `features`
/// and `load_backbone` are called only when needed, so a head-only run from the cache never
/// loads the backbone.
pub fn run(
    cfg: &FinetuneConfig,
    run: &RunInputs,
    features: impl FnOnce() -> Result<Arc<Features>, TrainError>,
    load_backbone: impl Fn() -> Result<Backbone, TrainError>,
    mut on_eval: impl FnMut(&EpochMetrics),
) -> Result<(Vec<EpochMetrics>, Option<Correct>), TrainError> {
    let head = Head::new(cfg, run.seeds, run.source.classes(), run.device);
    let mut last_right;
    let mut order_rng = ChaCha8Rng::seed_from_u64(run.seeds.order);
    let mut history = Vec::new();
    let mut backbone = None;
    {
        let mut progress =
            Progress::new(&cfg.head, cfg.eval_every_steps, &mut history, &mut on_eval);
        if cfg.augment {
            let b = backbone.insert(load_backbone()?);
            on_images(cfg, run, 1, b, &head, false, &mut order_rng, &mut progress)?;
        } else {
            let feats = features()?;
            head_on_features(
                &feats,
                cfg,
                &head,
                &mut order_rng,
                run.device,
                run.stop,
                &mut progress,
            )?;
        }
        last_right = progress.last_right.take();
    }
    if let Some(full) = &cfg.full {
        let b = match backbone {
            Some(ref mut b) => b,
            None => backbone.insert(load_backbone()?),
        };
        b.train_whole();
        let mut progress = Progress::new(full, cfg.eval_every_steps, &mut history, &mut on_eval);
        on_images(cfg, run, 2, b, &head, true, &mut order_rng, &mut progress)?;
        last_right = progress.last_right.take();
    }
    // Packed once, from the run's final evaluation.
    let correct = last_right.as_ref().map(crate::train::pack_correct);
    Ok((history, correct))
}

/// How many evaluations a run reports.
pub fn evaluations(cfg: &FinetuneConfig) -> u32 {
    seedsweep_core::spec::finetune::evaluations(
        cfg.head.steps,
        cfg.full.as_ref().map(|p| p.steps),
        cfg.eval_every_steps,
    )
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
                format: BackboneFormat::Torchscript,
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
            augment: false,
            head: Phase {
                steps: 30,
                batch_size: 16,
                lr: 0.5,
                lr_end: 0.0,
                weight_decay: 0.0,
                momentum: 0.9,
            },
            full: None,
        }
    }

    /// Phase 1 on features, as `run` does it without a cache.
    fn train_head(features: &Features, cfg: &FinetuneConfig, seed: i64) -> Vec<EpochMetrics> {
        let seeds = Seeds::single(seed);
        let head = Head::new(cfg, seeds, features.classes, Device::Cpu);
        let mut rng = ChaCha8Rng::seed_from_u64(seeds.order);
        let (mut history, mut on_eval) = (Vec::new(), |_: &EpochMetrics| {});
        let mut progress =
            Progress::new(&cfg.head, cfg.eval_every_steps, &mut history, &mut on_eval);
        let stop = AtomicBool::new(false);
        head_on_features(
            features,
            cfg,
            &head,
            &mut rng,
            Device::Cpu,
            &stop,
            &mut progress,
        )
        .unwrap();
        history
    }

    #[test]
    fn a_head_learns_reproducibly_and_seeds_differ() {
        let _alone = crate::testing::alone();
        let feats = toy_features(120, 8, 6);
        let run = |seed| train_head(&feats, &cfg(), seed);
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a.len(), 3, "an evaluation every 10 of 30 steps");
        let bits = |h: &[EpochMetrics]| -> Vec<u64> {
            h.iter().map(|m| m.train_loss.unwrap().to_bits()).collect()
        };
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&c));
        let last = a.last().unwrap();
        assert!(last.test_accuracy.unwrap() > 0.9, "{last:?}");
        assert!(last.test_top5.unwrap() >= last.test_accuracy.unwrap());
        let mut adamw = cfg();
        adamw.optimizer = Optimizer::Adamw;
        adamw.head.lr = 0.05;
        let h = train_head(&feats, &adamw, 1);
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

    /// A random ResNet-18 in safetensors and a tiny ImageFolder, with a config that augments
    /// and fine-tunes the whole network in phase 2.
    fn two_phase_setup(dir: &Path) -> (FinetuneConfig, Source) {
        let vs = nn::VarStore::new(Device::Cpu);
        {
            // The global generator is shared with other tests' initialisations.
            let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            tch::manual_seed(7);
            let _ = tch::vision::resnet::resnet18_no_final_layer(&vs.root());
        }
        vs.save(dir.join("r18.safetensors")).unwrap();
        let mut cfg = cfg();
        cfg.backbone = BackboneConfig {
            file: "r18.safetensors".into(),
            sha256: file_sha256(&dir.join("r18.safetensors")).unwrap(),
            format: BackboneFormat::Safetensors,
            arch: "resnet18".into(),
            features: 512,
            input_size: 32,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        cfg.augment = true;
        cfg.eval_every_steps = 2;
        cfg.head = Phase {
            steps: 3,
            batch_size: 4,
            lr: 0.05,
            ..cfg.head
        };
        cfg.full = Some(Phase {
            steps: 2,
            lr: 0.01,
            ..cfg.head.clone()
        });
        imagefolder::tests::tiny_folder(&dir.join("folder"));
        let folder = imagefolder::scan(&dir.join("folder")).unwrap();
        (cfg, Source::Folder(Arc::new(folder)))
    }

    #[test]
    fn augmented_two_phase_runs_repeat_bit_for_bit_and_follow_each_seed() {
        let _alone = crate::testing::alone();
        let dir = tempfile::tempdir().unwrap();
        let (cfg, source) = two_phase_setup(dir.path());
        let stop = AtomicBool::new(false);
        let run_with = |seeds: Seeds| {
            let inputs = RunInputs {
                source: &source,
                seeds,
                device: Device::Cpu,
                stop: &stop,
                threads: 2,
            };
            let no_cache = || -> Result<Arc<Features>, TrainError> {
                panic!("an augmented run must not read cached features")
            };
            let load = || {
                Backbone::load(dir.path(), &cfg.backbone, Device::Cpu)
                    .map_err(|e| TrainError::Host(e.to_string()))
            };
            run(&cfg, &inputs, no_cache, load, |_| {}).unwrap().0
        };
        let bits = |h: &[EpochMetrics]| -> Vec<(u32, u64, u64)> {
            h.iter()
                .map(|m| {
                    (
                        m.epoch,
                        m.train_loss.unwrap().to_bits(),
                        m.test_loss.unwrap().to_bits(),
                    )
                })
                .collect()
        };
        let a = run_with(Seeds::single(1));
        // Phase 1: evaluations after steps 2 and 3; phase 2: after its step 2.
        assert_eq!(a.len() as u32, evaluations(&cfg));
        assert_eq!(a.len(), 3);
        assert_eq!(bits(&a), bits(&run_with(Seeds::single(1))));
        // Another augmentation seed alone changes the numbers.
        let other_augment = Seeds {
            augment: 99,
            ..Seeds::single(1)
        };
        assert_ne!(bits(&a), bits(&run_with(other_augment)));
    }

    #[test]
    fn phase_two_trains_the_backbone_and_phase_one_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, source) = two_phase_setup(dir.path());
        let stop = AtomicBool::new(false);
        let inputs = RunInputs {
            source: &source,
            seeds: Seeds::single(3),
            device: Device::Cpu,
            stop: &stop,
            threads: 1,
        };
        let mut backbone = Backbone::load(dir.path(), &cfg.backbone, Device::Cpu).unwrap();
        let snapshot = |b: &Backbone| -> Vec<Tensor> {
            let mut v: Vec<_> = b.vs.variables().into_iter().collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v.into_iter().map(|(_, t)| t.copy()).collect()
        };
        let head = Head::new(&cfg, inputs.seeds, 2, Device::Cpu);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut history, mut on_eval) = (Vec::new(), |_: &EpochMetrics| {});
        let before = snapshot(&backbone);
        let mut p = Progress::new(&cfg.head, 2, &mut history, &mut on_eval);
        on_images(
            &cfg,
            &inputs,
            1,
            &mut backbone,
            &head,
            false,
            &mut rng,
            &mut p,
        )
        .unwrap();
        let after_head = snapshot(&backbone);
        assert!(before.iter().zip(&after_head).all(|(x, y)| x.equal(y)));
        backbone.train_whole();
        let full = cfg.full.clone().unwrap();
        let mut p = Progress::new(&full, 2, &mut history, &mut on_eval);
        on_images(
            &cfg,
            &inputs,
            2,
            &mut backbone,
            &head,
            true,
            &mut rng,
            &mut p,
        )
        .unwrap();
        let after_full = snapshot(&backbone);
        assert!(after_head.iter().zip(&after_full).any(|(x, y)| !x.equal(y)));
    }
}
