//! The built-in training tasks (feature `torch`): ResNet-9 and airbench94 (`resnet9`) and a new
//! head on a pretrained backbone (`finetune-head`), each prepared from its lease (settings
//! converted, data loaded or downloaded, backbone features found or computed) and run with
//! libtorch. The runner knows them only as a [`Job`].

use crate::checkpoint::CheckpointStore;
use crate::convert::{finetune_config, train_config};
use crate::data::{self, DataError, Dataset};
use crate::finetune::{
    self, Backbone, BackboneError, FeatureCache, Features, FinetuneConfig, Source,
};
use crate::imagefolder;
use crate::run::{Blame, Device, EpochMetrics, Precision, Seeds, TrainError, Trained};
use crate::runner::Unprepared;
use crate::train::{self, Run, TrainConfig};
use seedsweep_core::spec::Task;
use seedsweep_proto::v1 as pb;
use sha2::Digest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// One lease's built-in training, prepared.
pub(crate) enum Job {
    Resnet9 {
        cfg: TrainConfig,
        data: Arc<Dataset>,
        checkpoints: Option<CheckpointStore>,
    },
    Finetune {
        cfg: FinetuneConfig,
        source: Source,
    },
}

impl Job {
    pub(crate) fn fingerprint(&self) -> String {
        match self {
            Job::Resnet9 { data, .. } => data.fingerprint.clone(),
            Job::Finetune { source, .. } => source.fingerprint().to_string(),
        }
    }

    pub(crate) fn checkpoint_dir(&self) -> Option<PathBuf> {
        match self {
            Job::Resnet9 { checkpoints, .. } => checkpoints.as_ref().map(|c| c.dir().to_path_buf()),
            Job::Finetune { .. } => None,
        }
    }

    /// How many metrics reports the run makes (epochs, or evaluations).
    pub(crate) fn epochs(&self) -> u32 {
        match self {
            Job::Resnet9 { cfg, .. } => cfg.epochs,
            Job::Finetune { cfg, .. } => finetune::evaluations(cfg),
        }
    }

    /// The training images an epoch goes through, for the throughput metric.
    pub(crate) fn images_per_epoch(&self) -> Option<u64> {
        match self {
            Job::Resnet9 { data, .. } => Some(data.train.len() as u64),
            Job::Finetune { .. } => None,
        }
    }

    /// Trains the job; a run whose training loss stops being finite is a result, diverged in
    /// that epoch after the epochs it finished ([`Trained::diverged`]).
    pub(crate) fn run(
        self,
        seeds: Seeds,
        device: Device,
        stop: &AtomicBool,
        features: &FeatureSettings,
        mut on_epoch: impl FnMut(&EpochMetrics),
    ) -> Result<Trained, TrainError> {
        let device = tch::Device::from(device);
        let (precision, deterministic) = self.arithmetic(device);
        let mut finite = Vec::new();
        let sent = |m: &EpochMetrics| {
            finite.push(m.clone());
            on_epoch(m);
        };
        match self.train(seeds, device, stop, features, sent) {
            Err(TrainError::NonFinite { epoch, .. }) => {
                Ok(Trained::diverged(epoch, finite, precision, deterministic))
            }
            other => other,
        }
    }

    /// Whether the job's run repeats bit for bit on `device`.
    pub(crate) fn deterministic(&self, device: Device) -> bool {
        self.arithmetic(tch::Device::from(device)).1
    }

    /// The precision the job trains in and whether it repeats bit for bit, as its trainer
    /// reports them with a result.
    fn arithmetic(&self, device: tch::Device) -> (Precision, bool) {
        match self {
            Job::Resnet9 { cfg, .. } if device.is_cuda() => (cfg.precision, cfg.deterministic),
            Job::Resnet9 { .. } | Job::Finetune { .. } => (Precision::Fp32, !device.is_cuda()),
        }
    }

    fn train(
        self,
        seeds: Seeds,
        device: tch::Device,
        stop: &AtomicBool,
        features: &FeatureSettings,
        on_epoch: impl FnMut(&EpochMetrics),
    ) -> Result<Trained, TrainError> {
        match self {
            Job::Resnet9 {
                cfg,
                data,
                checkpoints,
            } => {
                let run = Run {
                    seeds,
                    device,
                    stop,
                    checkpoints,
                };
                train::train(&data, &cfg, &run, on_epoch)
            }
            Job::Finetune { cfg, source } => {
                let run = finetune::RunInputs {
                    source: &source,
                    seeds,
                    device,
                    stop,
                    threads: features.threads,
                };
                let (history, test_correct) = finetune::run(
                    &cfg,
                    &run,
                    || features_for(&cfg, &source, device, features, stop),
                    || load_backbone(&features.model_dir, &cfg, device),
                    on_epoch,
                )?;
                Ok(Trained {
                    history,
                    test_correct,
                    precision: Precision::Fp32,
                    deterministic: !device.is_cuda(),
                    resumed_from: 0,
                    timing: Default::default(),
                    custom: Default::default(),
                    diverged: None,
                })
            }
        }
    }
}

type FeatureMemory = Arc<std::sync::Mutex<HashMap<String, Arc<Features>>>>;

/// What a finetune-head run needs to find or make its features.
#[derive(Clone)]
pub(crate) struct FeatureSettings {
    model_dir: PathBuf,
    cache_dir: PathBuf,
    threads: usize,
    memory: FeatureMemory,
}

/// What the built-in tasks need of the worker's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Folder holding the datasets: DATA_DIR/NAME.
    pub data_dir: PathBuf,
    /// Where to download CIFAR-10 from when `cifar10` is missing.
    pub cifar10_url: String,
    /// Where backbones are (task finetune-head).
    pub model_dir: PathBuf,
    /// Where backbone features are cached (local disk).
    pub feature_cache: PathBuf,
    /// Threads decoding images.
    pub decode_threads: usize,
}

/// What the built-in tasks keep across leases: the datasets loaded so far and the backbone
/// features computed, shared by the slots.
pub(crate) struct Builtin {
    data_dir: PathBuf,
    /// Where to download CIFAR-10 from when `cifar10` is missing.
    cifar10_url: String,
    checkpoint_dir: Option<PathBuf>,
    datasets: tokio::sync::Mutex<HashMap<String, Arc<Dataset>>>,
    pub(crate) features: FeatureSettings,
    shutdown: Arc<AtomicBool>,
}

impl Builtin {
    pub(crate) fn new(
        settings: &Settings,
        checkpoint_dir: Option<PathBuf>,
        shutdown: Arc<AtomicBool>,
    ) -> Builtin {
        Builtin {
            data_dir: settings.data_dir.clone(),
            cifar10_url: settings.cifar10_url.clone(),
            checkpoint_dir,
            datasets: tokio::sync::Mutex::new(HashMap::new()),
            features: FeatureSettings {
                model_dir: settings.model_dir.clone(),
                cache_dir: settings.feature_cache.clone(),
                threads: settings.decode_threads,
                memory: Arc::new(std::sync::Mutex::new(HashMap::new())),
            },
            shutdown,
        }
    }

    /// What to train for a lease of a built-in `task`: its settings, converted, and the data
    /// they need.
    pub(crate) async fn prepare(
        &self,
        task: Task,
        lease: &pb::Lease,
        seeds: &Seeds,
    ) -> Result<Job, Unprepared> {
        let upgrade = |problem: String| {
            Unprepared::Upgrade(format!(
                "this worker cannot train these settings: {problem}"
            ))
        };
        let missing = |what: &str| {
            Unprepared::Blamed(
                Blame::Configuration,
                format!("the lease carried no {what} settings"),
            )
        };
        if task == Task::FinetuneHead {
            let cfg = lease.finetune.as_ref().ok_or_else(|| missing("finetune"))?;
            let cfg = finetune_config(cfg).map_err(upgrade)?;
            let source = self
                .unless_stopped(self.finetune_source(&lease.dataset))
                .await?
                .map_err(|e| Unprepared::Blamed(Blame::Host, e))?;
            return Ok(Job::Finetune { cfg, source });
        }
        let cfg = lease.train.as_ref().ok_or_else(|| missing("train"))?;
        let cfg = train_config(cfg).map_err(upgrade)?;
        let data = self
            .unless_stopped(self.dataset(&lease.dataset))
            .await?
            .map_err(|e| Unprepared::Blamed(Blame::Host, e.to_string()))?;
        let checkpoints = self.checkpoints(lease, &cfg, seeds, &data);
        Ok(Job::Resnet9 {
            cfg,
            data,
            checkpoints,
        })
    }

    /// `work`, unless shutdown is asked for first (a download or a slow disk must not keep the
    /// seed past the grace period: the thread doing the work is abandoned, and ends with the
    /// process).
    async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Result<T, Unprepared> {
        tokio::select! {
            done = work => Ok(done),
            () = crate::lease::wait_for(&self.shutdown) => Err(Unprepared::Stopped),
        }
    }

    /// Dataset `name`, loading (or, for cifar10, downloading) it if needed.
    async fn dataset(&self, name: &str) -> Result<Arc<Dataset>, DataError> {
        let mut cache = self.datasets.lock().await;
        if let Some(d) = cache.get(name) {
            return Ok(d.clone());
        }
        let dir = self.data_dir.clone();
        let url = self.cifar10_url.clone();
        let name_owned = name.to_string();
        let loaded = tokio::task::spawn_blocking(move || match data::load(&dir, &name_owned) {
            Err(DataError::Missing { .. }) if name_owned == "cifar10" => {
                tracing::info!(url = %url, "cifar10 is missing; downloading it");
                data::download_cifar10(&dir, &url)?;
                data::load(&dir, &name_owned)
            }
            other => other,
        })
        .await
        .map_err(|e| DataError::Io {
            path: self.data_dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let d = Arc::new(loaded?);
        tracing::info!(dataset = name, train = d.train.len(), test = d.test.len(), fingerprint = %d.fingerprint, "dataset loaded");
        cache.insert(name.to_string(), d.clone());
        Ok(d)
    }

    /// The images of a finetune-head dataset: an ImageFolder (`train/`, `val/`) or a
    /// CIFAR-layout dataset.
    async fn finetune_source(&self, name: &str) -> Result<Source, String> {
        let dir = self.data_dir.join(name);
        if imagefolder::is_image_folder(&dir) {
            let scanned = tokio::task::spawn_blocking(move || imagefolder::scan(&dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tracing::info!(
                dataset = name,
                classes = scanned.classes.len(),
                train = scanned.train.len(),
                val = scanned.val.len(),
                "image folder scanned"
            );
            return Ok(Source::Folder(Arc::new(scanned)));
        }
        self.dataset(name)
            .await
            .map(Source::Cifar)
            .map_err(|e| e.to_string())
    }

    /// Where a run of `cfg` keeps its checkpoints, when this worker has `--checkpoint-dir` and the
    /// sweep asks for them: keyed by everything that makes the run what it is.
    fn checkpoints(
        &self,
        lease: &pb::Lease,
        cfg: &TrainConfig,
        seeds: &Seeds,
        data: &Dataset,
    ) -> Option<CheckpointStore> {
        let dir = self.checkpoint_dir.as_ref();
        let dir = dir.filter(|_| cfg.checkpoint_every > 0)?;
        let key = format!("{cfg:?}|{seeds:?}|{}", data.fingerprint);
        let key = format!("{:x}", sha2::Sha256::digest(key));
        Some(CheckpointStore::new(dir, &lease.sweep_id, lease.seed, &key))
    }
}

/// Loads the sweep's backbone; a missing or mismatched file is this host's problem, not the
/// seed's.
fn load_backbone(
    model_dir: &std::path::Path,
    cfg: &FinetuneConfig,
    device: tch::Device,
) -> Result<Backbone, TrainError> {
    Backbone::load(model_dir, &cfg.backbone, device).map_err(|e| match e {
        BackboneError::Missing { .. } | BackboneError::Checksum { .. } => {
            TrainError::Host(e.to_string())
        }
        other => TrainError::Config(other.to_string()),
    })
}

/// The backbone features for a run: from this process's memory, else the disk cache, else
/// computed (and cached). Holding the lock while computing keeps slots from computing twice.
fn features_for(
    cfg: &FinetuneConfig,
    source: &Source,
    device: tch::Device,
    settings: &FeatureSettings,
    stop: &AtomicBool,
) -> Result<Arc<Features>, TrainError> {
    let key = finetune::cache_key(&cfg.backbone, source);
    let mut memory = settings.memory.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = memory.get(&key) {
        return Ok(f.clone());
    }
    let cache = FeatureCache {
        dir: settings.cache_dir.clone(),
    };
    let feats = match cache.load(&key) {
        Some(f) => {
            tracing::info!(key = %key, "backbone features from the cache");
            f
        }
        None => {
            tracing::info!(key = %key, "computing backbone features (once per backbone, dataset and preprocessing)");
            let backbone = load_backbone(&settings.model_dir, cfg, device)?;
            let f =
                finetune::compute_features(&backbone, cfg, source, settings.threads, device, stop)?;
            if let Err(e) = cache.store(&key, &f) {
                tracing::warn!(dir = %cache.dir.display(), error = %e, "could not cache the features");
            }
            f
        }
    };
    let feats = Arc::new(feats);
    memory.insert(key, feats.clone());
    Ok(feats)
}
