//! The worker loop: lease a seed, train it while heartbeating, stream each epoch's metrics, report
//! the result, repeat. The worker never touches the database; it speaks only gRPC.

use crate::checkpoint::CheckpointStore;
use crate::data::{self, DataError, Dataset};
use crate::finetune::{
    self, Backbone, BackboneConfig, BackboneError, FeatureCache, Features, FinetuneConfig, Source,
};
use crate::imagefolder::{self, OnBadImage};
use crate::metrics::WorkerMetrics;
use crate::model::{Arch, Init};
use crate::train::{
    self, AugmentPer, EpochMetrics, Padding, Precision, Run, Schedule, Seeds, TrainConfig,
    TrainError, Trained,
};
use anyhow::{Context, bail};
use seedsweep_proto::client::{Client, Connection};
use seedsweep_proto::v1 as pb;
use sha2::Digest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub coordinator: Connection,
    pub device: Device,
    pub data_dir: PathBuf,
    /// Where to download CIFAR-10 from when `cifar10` is missing.
    pub cifar10_url: String,
    pub worker_id: String,
    /// Exit once no seed is pending or leased anywhere, instead of waiting for new sweeps.
    pub exit_when_idle: bool,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_timeout: Duration,
    /// How long to wait before asking again when there is nothing to lease.
    pub idle_poll: Duration,
    /// Exit after this many leases (finished, failed or lost), if set.
    pub max_seeds: Option<u64>,
    /// How long to keep retrying a report while the coordinator is unreachable.
    pub lease_patience: Duration,
    /// Seeds trained at once on the device, each with its own lease.
    pub slots: usize,
    /// Where runs save checkpoints (sweeps with `checkpoint_every`), shared by the workers that
    /// should be able to resume each other's seeds.
    pub checkpoint_dir: Option<PathBuf>,
    /// Where backbones are (task finetune-head).
    pub model_dir: PathBuf,
    /// Where backbone features are cached (local disk).
    pub feature_cache: PathBuf,
    /// Threads decoding images.
    pub decode_threads: usize,
}

pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    }
}

pub struct Worker {
    settings: WorkerSettings,
    client: Client,
    /// Datasets loaded so far, by name, shared by the slots.
    datasets: tokio::sync::Mutex<HashMap<String, Arc<Dataset>>>,
    /// Set by SIGINT/SIGTERM: stop training, hand the seeds back, exit.
    shutdown: Arc<AtomicBool>,
    /// Leases taken so far (for `--max-seeds`).
    leases: AtomicU64,
    /// Backbone features computed or loaded so far, by cache key (task finetune-head).
    features: FeatureMemory,
    metrics: Arc<WorkerMetrics>,
}

type FeatureMemory = Arc<std::sync::Mutex<HashMap<String, Arc<Features>>>>;

/// What a finetune-head run needs to find or make its features.
struct FeatureSettings {
    model_dir: PathBuf,
    cache: FeatureCache,
    threads: usize,
    memory: FeatureMemory,
}

/// One lease's training, prepared.
enum Job {
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
    fn fingerprint(&self) -> String {
        match self {
            Job::Resnet9 { data, .. } => data.fingerprint.clone(),
            Job::Finetune { source, .. } => source.fingerprint().to_string(),
        }
    }

    /// How many metrics reports the run makes (epochs, or evaluations).
    fn epochs(&self) -> u32 {
        match self {
            Job::Resnet9 { cfg, .. } => cfg.epochs,
            Job::Finetune { cfg, .. } => finetune::evaluations(cfg),
        }
    }

    fn run(
        self,
        seeds: Seeds,
        device: Device,
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
                    || features_for(&cfg, &source, device, features),
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
                })
            }
        }
    }
}

/// Loads the sweep's backbone; a missing or mismatched file is this host's problem, not the
/// seed's.
fn load_backbone(
    model_dir: &std::path::Path,
    cfg: &FinetuneConfig,
    device: Device,
) -> Result<Backbone, TrainError> {
    Backbone::load(model_dir, &cfg.backbone, device).map_err(|e| match e {
        BackboneError::Missing { .. } | BackboneError::Checksum { .. } => {
            TrainError::Host(e.to_string())
        }
        other => TrainError::Device(other.to_string()),
    })
}

/// The backbone features for a run: from this process's memory, else the disk cache, else
/// computed (and cached). Holding the lock while computing keeps slots from computing twice.
fn features_for(
    cfg: &FinetuneConfig,
    source: &Source,
    device: Device,
    settings: &FeatureSettings,
) -> Result<Arc<Features>, TrainError> {
    let key = finetune::cache_key(&cfg.backbone, source);
    let mut memory = settings.memory.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = memory.get(&key) {
        return Ok(f.clone());
    }
    let feats = match settings.cache.load(&key) {
        Some(f) => {
            tracing::info!(key = %key, "backbone features from the cache");
            f
        }
        None => {
            tracing::info!(key = %key, "computing backbone features (once per backbone, dataset and preprocessing)");
            let backbone = load_backbone(&settings.model_dir, cfg, device)?;
            let f = finetune::compute_features(&backbone, cfg, source, settings.threads, device)?;
            if let Err(e) = settings.cache.store(&key, &f) {
                tracing::warn!(dir = %settings.cache.dir.display(), error = %e, "could not cache the features");
            }
            f
        }
    };
    let feats = Arc::new(feats);
    memory.insert(key, feats.clone());
    Ok(feats)
}

/// How one lease ended, from the worker's side.
#[derive(Debug, PartialEq)]
enum LeaseEnd {
    Finished,
    /// The coordinator no longer considers this worker the holder; drop the seed and move on.
    Lost,
    /// Shutdown was requested; the seed was handed back.
    ShutDown,
}

/// A lease this worker holds, heartbeated from the moment it was granted.
struct Held {
    lease: pb::Lease,
    lref: pb::LeaseRef,
    /// Set to stop training: by the heartbeat when the lease is lost, or on shutdown.
    stop: Arc<AtomicBool>,
    /// Set by the heartbeat when the coordinator refused it.
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// When the lease arrived, for the per-seed overhead (lease to first step).
    leased_at: Instant,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// What asking for a lease gave.
enum Asked {
    Lease(Box<Held>),
    NoWork {
        outstanding: u64,
    },
    /// `--max-seeds` leases were taken already.
    Enough,
}

impl Worker {
    pub async fn connect(
        settings: WorkerSettings,
        shutdown: Arc<AtomicBool>,
        metrics: Arc<WorkerMetrics>,
    ) -> anyhow::Result<Worker> {
        let url = &settings.coordinator.url;
        let endpoint = settings.coordinator.endpoint()?;
        let deadline = Instant::now() + settings.connect_timeout;
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "cannot reach the coordinator at {url} ({e}) after {:?}: is `coordinator serve` running there? (set --coordinator or SEEDSWEEP_COORDINATOR)",
                        settings.connect_timeout
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        tracing::info!(coordinator = %url, worker = %settings.worker_id, device = %device_label(settings.device), slots = settings.slots, "worker connected");
        Ok(Worker {
            client: settings.coordinator.client(channel)?,
            settings,
            metrics,
            datasets: tokio::sync::Mutex::new(HashMap::new()),
            shutdown,
            leases: AtomicU64::new(0),
            features: Arc::new(std::sync::Mutex::new(HashMap::new())),
        })
    }

    /// Runs `--slots` lease loops until there is no more work (with `--exit-when-idle`), the
    /// seeds asked for are done, or shutdown. A fatal error in one slot stops the others (their
    /// seeds are handed back) and is returned.
    pub async fn run(self) -> anyhow::Result<()> {
        let me = Arc::new(self);
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..me.settings.slots.max(1) {
            let w = me.clone();
            slots.spawn(async move { w.slot(slot).await });
        }
        let mut first_error = None;
        while let Some(done) = slots.join_next().await {
            let outcome = done.context("a slot panicked").and_then(|r| r);
            if let Err(e) = outcome
                && first_error.is_none()
            {
                me.shutdown.store(true, Ordering::Relaxed);
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One slot: lease, train, report, repeat; the next lease is fetched as the last epoch starts.
    async fn slot(self: Arc<Self>, slot: usize) -> anyhow::Result<()> {
        let mut next: Option<Held> = None;
        let mut delay = Duration::from_millis(500);
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                if let Some(held) = next.take() {
                    self.hand_back(held).await?;
                }
                return Ok(());
            }
            let held = match next.take() {
                Some(h) => h,
                None => match self.ask().await {
                    Ok(Asked::Lease(h)) => *h,
                    Ok(Asked::Enough) => {
                        tracing::info!(slot, "done the seeds asked for (--max-seeds)");
                        return Ok(());
                    }
                    Ok(Asked::NoWork { outstanding }) => {
                        if self.settings.exit_when_idle && outstanding == 0 {
                            tracing::info!(
                                slot,
                                "no seed left to lease; exiting (--exit-when-idle)"
                            );
                            return Ok(());
                        }
                        tracing::debug!(outstanding, "nothing to lease yet");
                        tokio::time::sleep(self.settings.idle_poll).await;
                        continue;
                    }
                    Err(s) if is_transient(&s) => {
                        // The coordinator is down or restarting: wait for it, as long as it takes.
                        tracing::warn!(error = s.message(), "coordinator unreachable; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                        continue;
                    }
                    Err(s) => bail!("the coordinator refused a lease: {}", s.message()),
                },
            };
            delay = Duration::from_millis(500);
            let (end, prefetched) = self.run_lease(held).await?;
            next = prefetched;
            if end == LeaseEnd::ShutDown {
                if let Some(held) = next.take() {
                    self.hand_back(held).await?;
                }
                return Ok(());
            }
        }
    }

    /// Asks the coordinator for a lease once; a granted lease is heartbeated from now on.
    async fn ask(&self) -> Result<Asked, Status> {
        if let Some(max) = self.settings.max_seeds
            && self.leases.fetch_add(1, Ordering::SeqCst) >= max
        {
            self.leases.fetch_sub(1, Ordering::SeqCst);
            return Ok(Asked::Enough);
        }
        let request = pb::LeaseSeedRequest {
            worker_id: self.settings.worker_id.clone(),
        };
        let reply = self.client.clone().lease_seed(request).await;
        let outcome = reply.map(|r| r.into_inner().outcome);
        let give_ticket_back = || {
            if self.settings.max_seeds.is_some() {
                self.leases.fetch_sub(1, Ordering::SeqCst);
            }
        };
        match outcome {
            Ok(Some(pb::lease_seed_response::Outcome::Lease(lease))) => {
                Ok(Asked::Lease(Box::new(self.hold(lease))))
            }
            Ok(Some(pb::lease_seed_response::Outcome::NoWork(w))) => {
                give_ticket_back();
                Ok(Asked::NoWork {
                    outstanding: w.outstanding,
                })
            }
            Ok(None) => {
                give_ticket_back();
                Err(Status::internal(
                    "the coordinator sent an empty lease reply",
                ))
            }
            Err(s) => {
                give_ticket_back();
                Err(s)
            }
        }
    }

    fn hold(&self, lease: pb::Lease) -> Held {
        let lref = pb::LeaseRef {
            sweep_id: lease.sweep_id.clone(),
            seed: lease.seed,
            fence: lease.fence,
        };
        tracing::info!(sweep = %lease.sweep_id, seed = lease.seed, fence = lease.fence, "leased");
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            lref.clone(),
            self.settings.worker_id.clone(),
            Duration::from_secs_f64((lease.lease_ttl_seconds as f64 / 3.0).max(1.0)),
            stop.clone(),
            lost.clone(),
            self.shutdown.clone(),
        ));
        Held {
            lease,
            lref,
            stop,
            lost,
            heartbeat,
            leased_at: Instant::now(),
        }
    }

    /// Hands an untrained lease back (shutdown): not counted as an attempt.
    async fn hand_back(&self, held: Held) -> anyhow::Result<()> {
        self.fail(&held.lref, "worker shut down", false).await?;
        tracing::info!(seed = held.lref.seed, "handed a prefetched seed back");
        Ok(())
    }

    /// Dataset `name`, loading (or, for cifar10, downloading) it if needed.
    async fn dataset(&self, name: &str) -> Result<Arc<Dataset>, DataError> {
        let mut cache = self.datasets.lock().await;
        if let Some(d) = cache.get(name) {
            return Ok(d.clone());
        }
        let dir = self.settings.data_dir.clone();
        let url = self.settings.cifar10_url.clone();
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
            path: self.settings.data_dir.clone(),
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
        let dir = self.settings.data_dir.join(name);
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

    /// Trains a held lease and reports how it ended; returns the next lease too if one was
    /// fetched while this one trained.
    async fn run_lease(self: &Arc<Self>, held: Held) -> anyhow::Result<(LeaseEnd, Option<Held>)> {
        let slot_free = Instant::now();
        let lref = held.lref.clone();
        let lease = &held.lease;
        let factors = lease.factors.unwrap_or(pb::FactorSeeds {
            init: lease.seed,
            order: lease.seed,
            augment: lease.seed,
            split: lease.seed,
        });
        let seeds = Seeds::derive(
            &lease.seed_namespace,
            factors.init,
            factors.order,
            factors.augment,
            factors.split,
        );
        // What to train, per task; settings this worker does not know stop it (it needs an
        // upgrade), a host problem (missing data) hands the seed back and stops it too.
        let prepared = match lease.task.as_str() {
            "resnet9" => match lease.train.as_ref().map(train_config) {
                Some(Ok(cfg)) => self
                    .dataset(&lease.dataset)
                    .await
                    .map_err(|e| e.to_string())
                    .map(|data| {
                        let checkpoints =
                            match (&self.settings.checkpoint_dir, cfg.checkpoint_every) {
                                (Some(dir), every) if every > 0 => {
                                    let key = format!("{cfg:?}|{seeds:?}|{}", data.fingerprint);
                                    let key = format!("{:x}", sha2::Sha256::digest(key));
                                    Some(CheckpointStore::new(
                                        dir,
                                        &lease.sweep_id,
                                        lease.seed,
                                        &key,
                                    ))
                                }
                                _ => None,
                            };
                        Job::Resnet9 {
                            cfg,
                            data,
                            checkpoints,
                        }
                    }),
                Some(Err(problem)) => {
                    let cause = format!("this worker cannot train these settings: {problem}");
                    self.fail(&lref, &cause, false).await?;
                    bail!("{cause}; upgrade the worker");
                }
                None => {
                    self.fail(&lref, "the lease carried no train settings", true)
                        .await?;
                    return Ok((LeaseEnd::Finished, None));
                }
            },
            "finetune-head" => match lease.finetune.as_ref().map(finetune_config) {
                Some(Ok(cfg)) => self
                    .finetune_source(&lease.dataset)
                    .await
                    .map(|source| Job::Finetune { cfg, source }),
                Some(Err(problem)) => {
                    let cause = format!("this worker cannot train these settings: {problem}");
                    self.fail(&lref, &cause, false).await?;
                    bail!("{cause}; upgrade the worker");
                }
                None => {
                    self.fail(&lref, "the lease carried no finetune settings", true)
                        .await?;
                    return Ok((LeaseEnd::Finished, None));
                }
            },
            other => {
                let cause = format!(
                    "this worker cannot run task `{other}` (it runs: resnet9, finetune-head)"
                );
                self.fail(&lref, &cause, false).await?;
                bail!("{cause}; upgrade the worker");
            }
        };
        let job = match prepared {
            Ok(job) => job,
            Err(e) => {
                // A problem of this host, not of the seed: hand it back without using an attempt,
                // then stop, so a misconfigured host does not burn through a sweep's retries.
                self.fail(
                    &lref,
                    &format!("worker {}: {e}", self.settings.worker_id),
                    false,
                )
                .await?;
                bail!("{e}");
            }
        };
        let fingerprint = job.fingerprint();
        let checkpoint_dir = match &job {
            Job::Resnet9 {
                checkpoints: Some(c),
                ..
            } => Some(c.dir().to_path_buf()),
            _ => None,
        };

        let patience = Duration::from_secs(lease.lease_ttl_seconds.max(1) as u64);
        let (tx, rx) = mpsc::channel::<pb::EpochMetrics>(1024);
        let stream = tokio::spawn(ship_metrics(self.client.clone(), rx, patience));
        // Fetch the next lease as the last epoch starts, so the slot never waits for one.
        let (prefetch_tx, prefetch_rx) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let prefetch = tokio::spawn(async move {
            if prefetch_rx.await.is_err() || me.shutdown.load(Ordering::Relaxed) {
                return None;
            }
            match me.ask().await {
                Ok(Asked::Lease(h)) => Some(*h),
                _ => None,
            }
        });

        let mut shown = Shown::new(&self.metrics, &lref);
        let images_per_epoch = match &job {
            Job::Resnet9 { data, .. } => Some(data.train.len().max(0) as u64),
            Job::Finetune { .. } => None,
        };
        let metrics_t = self.metrics.clone();
        let started = Instant::now();
        let device = self.settings.device;
        let (stop_t, lref_t) = (held.stop.clone(), lref.clone());
        let epochs = job.epochs();
        let features = FeatureSettings {
            model_dir: self.settings.model_dir.clone(),
            cache: FeatureCache {
                dir: self.settings.feature_cache.clone(),
            },
            threads: self.settings.decode_threads,
            memory: self.features.clone(),
        };
        let trained = tokio::task::spawn_blocking(move || {
            let mut prefetch_tx = Some(prefetch_tx);
            if epochs <= 1 {
                prefetch_tx.take().map(|t| t.send(()));
            }
            let on_epoch = |m: &EpochMetrics| {
                if let Some(images) = images_per_epoch {
                    metrics_t.epoch(&lref_t.sweep_id, lref_t.seed, images, m.seconds);
                }
                if tx.blocking_send(epoch_pb(&lref_t, m)).is_err() {
                    // The coordinator closed the stream (a stale lease): stop training.
                    stop_t.store(true, Ordering::Relaxed);
                }
                if m.epoch + 1 >= epochs {
                    prefetch_tx.take().map(|t| t.send(()));
                }
            };
            let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job.run(seeds, device, &stop_t, &features, on_epoch)
            }));
            // tch panics on libtorch errors in operations it does not let fail: the seed fails
            // with libtorch's message, and the worker goes on.
            trained.unwrap_or_else(|panic| Err(TrainError::Panicked(panic_message(&panic))))
        })
        .await
        .context("the training thread panicked")?;
        let seconds = started.elapsed().as_secs_f64();
        let streamed = stream.await.context("the metrics stream task panicked")?;
        let next = prefetch.await.context("the prefetch task panicked")?;
        held.heartbeat.abort();
        let seed = lref.seed;

        if let Err(status) = &streamed
            && is_lost(status)
        {
            tracing::warn!(
                seed,
                reason = status.message(),
                "lease lost while streaming metrics; dropping the seed"
            );
            return Ok((LeaseEnd::Lost, next));
        }
        let end = match trained {
            Ok(t) => {
                streamed.map_err(|s| {
                    anyhow::anyhow!("streaming epoch metrics failed: {}", s.message())
                })?;
                let last = t.history.last().context("training ran no epoch")?;
                let (Some(test_accuracy), Some(test_loss)) = (last.test_accuracy, last.test_loss)
                else {
                    bail!("the last epoch of seed {seed} was not evaluated");
                };
                let req = pb::CompleteSeedRequest {
                    lease: Some(lref.clone()),
                    worker_id: self.settings.worker_id.clone(),
                    test_accuracy,
                    test_loss,
                    train_loss: last.train_loss,
                    train_accuracy: last.train_accuracy,
                    epochs: t.history.len() as u32,
                    seconds,
                    device: device_label(device),
                    data_fingerprint: fingerprint.clone(),
                    test_top5: last.test_top5,
                    val_loss: last.val_loss,
                    val_accuracy: last.val_accuracy,
                    precision: t.precision.as_str().to_string(),
                    deterministic: t.deterministic,
                    test_examples: t.test_correct.as_ref().map_or(0, |c| c.examples),
                    test_correct: t
                        .test_correct
                        .as_ref()
                        .map(|c| c.bits.clone())
                        .unwrap_or_default(),
                };
                match with_retries(patience, || {
                    let mut c = self.client.clone();
                    let r = req.clone();
                    async move { c.complete_seed(r).await }
                })
                .await
                {
                    Ok(_) => {
                        shown.finished_in = Some(seconds);
                        // The per-seed overhead: what is not training. The lease may have been
                        // prefetched, so it counts from when training could start.
                        let ready = held.leased_at.max(slot_free);
                        let to_first_step = t
                            .timing
                            .first_step
                            .map(|s| (started.saturating_duration_since(ready)).as_secs_f64() + s);
                        let after_last_step =
                            t.timing.last_step.map(|at| at.elapsed().as_secs_f64());
                        tracing::info!(
                            seed,
                            test_accuracy,
                            seconds,
                            resumed_from = t.resumed_from,
                            lease_to_first_step_s = to_first_step,
                            last_step_to_result_s = after_last_step,
                            "seed finished"
                        );
                        if let Some(dir) = checkpoint_dir
                            && let Err(e) = std::fs::remove_dir_all(&dir)
                            && e.kind() != std::io::ErrorKind::NotFound
                        {
                            tracing::warn!(path = %dir.display(), error = %e, "could not remove a checkpoint");
                        }
                        LeaseEnd::Finished
                    }
                    Err(s) if is_lost(&s) => {
                        tracing::warn!(seed, reason = s.message(), "result refused: lease lost");
                        LeaseEnd::Lost
                    }
                    Err(s) => bail!(
                        "failed to report the result of seed {seed}: {}",
                        s.message()
                    ),
                }
            }
            Err(TrainError::Cancelled) if held.lost.load(Ordering::Relaxed) => {
                tracing::warn!(seed, "lease lost during training; dropping the seed");
                LeaseEnd::Lost
            }
            Err(TrainError::Host(problem)) => {
                self.fail(
                    &lref,
                    &format!("worker {}: {problem}", self.settings.worker_id),
                    false,
                )
                .await?;
                bail!("{problem}");
            }
            Err(TrainError::Cancelled) => {
                self.fail(&lref, "worker shut down", false).await?;
                tracing::info!(seed, "handed the seed back; shutting down");
                LeaseEnd::ShutDown
            }
            Err(e) => {
                let state = self.fail(&lref, &e.to_string(), true).await?;
                tracing::warn!(seed, error = %e, state, "seed failed");
                LeaseEnd::Finished
            }
        };
        Ok((end, next))
    }

    /// Reports a failed or abandoned attempt; returns the seed's new state.
    async fn fail(
        &self,
        lease: &pb::LeaseRef,
        cause: &str,
        counts_as_attempt: bool,
    ) -> anyhow::Result<String> {
        let req = pb::FailSeedRequest {
            lease: Some(lease.clone()),
            worker_id: self.settings.worker_id.clone(),
            cause: cause.to_string(),
            counts_as_attempt,
        };
        match with_retries(self.settings.lease_patience, || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.fail_seed(r).await }
        })
        .await
        {
            Ok(r) => Ok(r.into_inner().state),
            Err(s) if is_lost(&s) => Ok("lost".to_string()),
            Err(s) => bail!(
                "failed to report the failure of seed {}: {}",
                lease.seed,
                s.message()
            ),
        }
    }
}

/// A seed on the metrics page for as long as this lives (every way a lease ends drops it).
struct Shown<'a> {
    metrics: &'a WorkerMetrics,
    sweep: String,
    seed: i64,
    /// Set when the coordinator accepted the seed's result: its training time.
    finished_in: Option<f64>,
}

impl<'a> Shown<'a> {
    fn new(metrics: &'a WorkerMetrics, lease: &pb::LeaseRef) -> Self {
        metrics.started(&lease.sweep_id, lease.seed);
        Shown {
            metrics,
            sweep: lease.sweep_id.clone(),
            seed: lease.seed,
            finished_in: None,
        }
    }
}

impl Drop for Shown<'_> {
    fn drop(&mut self) {
        self.metrics.ended(&self.sweep, self.seed, self.finished_in);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    // libtorch appends a C++ stack trace to its messages; the first lines say what happened.
    text.lines().take(3).collect::<Vec<_>>().join(" ")
}

/// Statuses that mean this worker no longer holds the lease.
fn is_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition | Code::Aborted | Code::NotFound
    )
}

/// Errors that mean the coordinator (or its database) is unreachable for now.
fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Retries a call that is safe to repeat while the coordinator is unreachable, with exponential
/// backoff, for at most `patience` (past the lease's lifetime, retrying is pointless).
async fn with_retries<T, F, Fut>(patience: Duration, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        match call().await {
            Err(s) if is_transient(&s) && Instant::now() < deadline => {
                tracing::warn!(error = s.message(), "coordinator unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

type StreamCall =
    tokio::task::JoinHandle<Result<tonic::Response<pb::StreamEpochMetricsResponse>, Status>>;

/// Opens a metrics stream that first replays `sent` (re-recording an epoch is idempotent).
fn open_stream(
    mut client: Client,
    sent: &[pb::EpochMetrics],
) -> (mpsc::Sender<pb::EpochMetrics>, StreamCall) {
    let (tx, rx) = mpsc::channel(sent.len() + 64);
    for m in sent {
        // Capacity was reserved above, so this cannot fail.
        let _ = tx.try_send(m.clone());
    }
    let call =
        tokio::spawn(async move { client.stream_epoch_metrics(ReceiverStream::new(rx)).await });
    (tx, call)
}

/// Forwards each epoch's metrics from the training thread over a `StreamEpochMetrics` stream. When
/// the stream breaks (the coordinator is unreachable), the metrics are kept and replayed on a new
/// stream, so every epoch arrives once the coordinator is back, for up to `patience` after
/// training ends. Returns the stream's verdict: Ok, or the status that ended it.
async fn ship_metrics(
    client: Client,
    mut from_training: mpsc::Receiver<pb::EpochMetrics>,
    patience: Duration,
) -> Result<(), Status> {
    let mut sent: Vec<pb::EpochMetrics> = Vec::new();
    let mut stream: Option<(mpsc::Sender<pb::EpochMetrics>, StreamCall)> = None;
    while let Some(m) = from_training.recv().await {
        sent.push(m.clone());
        let delivered = match &stream {
            Some((tx, _)) => tx.send(m).await.is_ok(),
            None => false,
        };
        if !delivered {
            if let Some((_, call)) = stream.take()
                && let Ok(Err(s)) = call.await
            {
                if !is_transient(&s) {
                    return Err(s);
                }
                tracing::warn!(error = s.message(), "metrics stream broke; will replay it");
            }
            stream = Some(open_stream(client.clone(), &sent));
        }
    }
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        let (tx, call) = stream
            .take()
            .unwrap_or_else(|| open_stream(client.clone(), &sent));
        drop(tx);
        match call.await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) if is_transient(&s) && Instant::now() < deadline => {
                tracing::warn!(
                    error = s.message(),
                    "coordinator unreachable; will replay the metrics"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                stream = Some(open_stream(client.clone(), &sent));
            }
            Ok(Err(s)) => return Err(s),
            Err(e) => return Err(Status::internal(format!("metrics stream task failed: {e}"))),
        }
    }
}

async fn heartbeat_loop(
    mut client: Client,
    lease: pb::LeaseRef,
    worker_id: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wait_for(&shutdown) => {
                stop.store(true, Ordering::Relaxed);
                return;
            }
        }
        match client
            .heartbeat(pb::HeartbeatRequest {
                lease: Some(lease.clone()),
                worker_id: worker_id.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if is_lost(&s) => {
                tracing::warn!(
                    seed = lease.seed,
                    reason = s.message(),
                    "heartbeat refused: lease lost"
                );
                lost.store(true, Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
                return;
            }
            Err(s) => tracing::warn!(
                seed = lease.seed,
                error = s.message(),
                "heartbeat failed; will retry"
            ),
        }
    }
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unknown(setting: &str, name: &str, known: &str) -> String {
    format!("unknown {setting} `{name}` (this worker knows {known})")
}

/// The worker's training settings from a lease's; names this worker does not know are an error.
fn train_config(t: &pb::TrainConfig) -> Result<TrainConfig, String> {
    let arch = Arch::parse(&t.model)
        .ok_or_else(|| unknown("model", &t.model, "resnet9, resnet9-skinny, airbench94"))?;
    let schedule = match t.schedule.as_str() {
        "linear" => Schedule::Linear,
        "picard" => Schedule::Picard,
        "airbench" => Schedule::Airbench,
        other => return Err(unknown("schedule", other, "linear, picard, airbench")),
    };
    if (arch == Arch::Airbench94) != (schedule == Schedule::Airbench) {
        return Err("model airbench94 and schedule airbench go together".into());
    }
    // Absent (0): a coordinator older than airbench94, and the old behaviour.
    let or_one = |v: f64| if v == 0.0 { 1.0 } else { v };
    let precision = match t.precision.as_str() {
        "fp32" => Precision::Fp32,
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        other => return Err(unknown("precision", other, "fp32, fp16, bf16")),
    };
    // An empty name is a lease from a coordinator older than the setting: what workers did then.
    let init = match t.init.as_str() {
        "pytorch" => Init::Pytorch,
        "tch" | "" => Init::Tch,
        other => return Err(unknown("init", other, "pytorch, tch")),
    };
    let padding = match t.crop_padding_mode.as_str() {
        "reflect" => Padding::Reflect,
        "zeros-after-normalisation" | "" => Padding::ZerosAfterNormalisation,
        "zeros-before-normalisation" => Padding::ZerosBeforeNormalisation,
        other => {
            return Err(unknown(
                "crop_padding_mode",
                other,
                "reflect, zeros-after-normalisation, zeros-before-normalisation",
            ));
        }
    };
    let augment_per = match t.augment_per.as_str() {
        "image" | "" => AugmentPer::Image,
        "batch" => AugmentPer::Batch,
        other => return Err(unknown("augment_per", other, "image, batch")),
    };
    Ok(TrainConfig {
        arch,
        init,
        epochs: t.epochs,
        batch_size: t.batch_size,
        width: t.width,
        lr: t.lr,
        schedule,
        lr_peak_epoch: t.lr_peak_epoch,
        momentum: t.momentum,
        nesterov: t.nesterov,
        weight_decay: t.weight_decay,
        label_smoothing: t.label_smoothing,
        smoothed_loss_weight: t.smoothed_loss_weight,
        smoothed_loss_epsilon: t.smoothed_loss_epsilon,
        crop_padding: t.crop_padding,
        padding,
        flip: t.flip,
        cutout: t.cutout,
        cutout_at_borders: t.cutout_at_borders,
        augment_per,
        drop_last: t.drop_last,
        lr_in_momentum: t.lr_in_momentum,
        precision,
        channels_last: t.channels_last,
        deterministic: t.deterministic,
        eval_every: t.eval_every.max(1),
        checkpoint_every: t.checkpoint_every,
        holdout: t.holdout,
        final_epoch_fraction: or_one(t.final_epoch_fraction),
        bn_bias_lr_scale: or_one(t.bn_bias_lr_scale),
        whiten_bias_epochs: t.whiten_bias_epochs,
        lookahead: t.lookahead,
        tta_level: t.tta_level,
        alternating_flip: t.alternating_flip,
    })
}

/// The worker's finetune settings from a lease's; names this worker does not know are an error.
fn finetune_config(t: &pb::FinetuneConfig) -> Result<FinetuneConfig, String> {
    let b = t.backbone.as_ref().ok_or("the lease carried no backbone")?;
    let head = t.head.as_ref().ok_or("the lease carried no head phase")?;
    let phase = |p: &pb::Phase| finetune::Phase {
        steps: p.steps,
        batch_size: p.batch_size,
        lr: p.lr,
        lr_end: p.lr_end,
        weight_decay: p.weight_decay,
        momentum: p.momentum,
    };
    let three = |v: &[f64], what: &str| -> Result<[f64; 3], String> {
        v.try_into()
            .map_err(|_| format!("backbone {what} has {} values, not 3", v.len()))
    };
    Ok(FinetuneConfig {
        backbone: BackboneConfig {
            file: b.file.clone(),
            sha256: b.sha256.clone(),
            format: match b.format.as_str() {
                "torchscript" => finetune::Format::Torchscript,
                "safetensors" => finetune::Format::Safetensors,
                other => return Err(format!("unknown backbone format `{other}`")),
            },
            arch: b.arch.clone(),
            features: b.features as i64,
            input_size: b.input_size as i64,
            mean: three(&b.mean, "mean")?,
            std: three(&b.std, "std")?,
        },
        head_init: match t.head_init.as_str() {
            "normal" => finetune::HeadInit::Normal,
            "default" => finetune::HeadInit::Default,
            other => return Err(format!("unknown head_init `{other}`")),
        },
        head_init_std: t.head_init_std,
        label_smoothing: t.label_smoothing,
        optimizer: match t.optimizer.as_str() {
            "sgd" => finetune::Optimizer::Sgd,
            "adamw" => finetune::Optimizer::AdamW,
            other => return Err(format!("unknown optimizer `{other}`")),
        },
        eval_every_steps: t.eval_every_steps.max(1),
        bad_images: match t.bad_images.as_str() {
            "skip" => OnBadImage::Skip,
            "fail" => OnBadImage::Fail,
            other => return Err(format!("unknown bad_images `{other}`")),
        },
        augment: t.augment,
        head: phase(head),
        full: t.full.as_ref().map(phase),
    })
}

fn epoch_pb(lease: &pb::LeaseRef, m: &EpochMetrics) -> pb::EpochMetrics {
    pb::EpochMetrics {
        lease: Some(lease.clone()),
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        test_loss: m.test_loss,
        test_accuracy: m.test_accuracy,
        test_top5: m.test_top5,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        lr: m.lr,
        seconds: m.seconds,
    }
}
