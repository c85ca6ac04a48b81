//! The worker loop: lease a seed, train it while heartbeating, stream each epoch's metrics, report
//! the result, repeat. The worker never touches the database; it speaks only gRPC.

use crate::data::{self, DataError, Dataset};
use crate::train::{self, EpochMetrics, TrainConfig, TrainError};
use anyhow::{Context, bail};
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_client::CoordinatorClient;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub coordinator: String,
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
}

pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    }
}

pub struct Worker {
    settings: WorkerSettings,
    client: CoordinatorClient<Channel>,
    /// Datasets loaded so far, by name. Tensors are not Sync, so a dataset is moved into the
    /// training thread and back rather than shared.
    datasets: HashMap<String, Dataset>,
    /// Set by SIGINT/SIGTERM: stop training, hand the seed back, exit.
    shutdown: Arc<AtomicBool>,
}

/// How one lease ended, from the worker's side.
enum LeaseEnd {
    Finished,
    /// The coordinator no longer considers this worker the holder; drop the seed and move on.
    Lost,
    /// Shutdown was requested; the seed was handed back.
    ShutDown,
}

impl Worker {
    pub async fn connect(
        settings: WorkerSettings,
        shutdown: Arc<AtomicBool>,
    ) -> anyhow::Result<Worker> {
        let url = &settings.coordinator;
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| {
                format!("`{url}` is not a coordinator URL: write it as http://HOST:PORT")
            })?
            .connect_timeout(Duration::from_secs(5));
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
        tracing::info!(coordinator = %url, worker = %settings.worker_id, device = %device_label(settings.device), "worker connected");
        Ok(Worker {
            settings,
            client: CoordinatorClient::new(channel),
            datasets: HashMap::new(),
            shutdown,
        })
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut leases = 0u64;
        let mut delay = Duration::from_millis(500);
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.settings.max_seeds.is_some_and(|max| leases >= max) {
                tracing::info!(leases, "done the seeds asked for (--max-seeds); exiting");
                return Ok(());
            }
            let request = pb::LeaseSeedRequest {
                worker_id: self.settings.worker_id.clone(),
            };
            let reply = match self.client.lease_seed(request).await {
                Ok(r) => r.into_inner(),
                Err(s) if is_transient(&s) => {
                    // The coordinator is down or restarting: wait for it, as long as it takes.
                    tracing::warn!(error = s.message(), "coordinator unreachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    continue;
                }
                Err(s) => bail!("the coordinator refused a lease: {}", s.message()),
            };
            delay = Duration::from_millis(500);
            match reply.outcome {
                Some(pb::lease_seed_response::Outcome::Lease(lease)) => {
                    leases += 1;
                    match self.run_lease(lease).await? {
                        LeaseEnd::Finished | LeaseEnd::Lost => {}
                        LeaseEnd::ShutDown => return Ok(()),
                    }
                }
                Some(pb::lease_seed_response::Outcome::NoWork(w)) => {
                    if self.settings.exit_when_idle && w.outstanding == 0 {
                        tracing::info!("no seed left to lease; exiting (--exit-when-idle)");
                        return Ok(());
                    }
                    tracing::debug!(outstanding = w.outstanding, "nothing to lease yet");
                    tokio::time::sleep(self.settings.idle_poll).await;
                }
                None => bail!("the coordinator sent an empty lease reply"),
            }
        }
    }

    /// Takes dataset `name` out of the cache, loading (or, for cifar10, downloading) it if needed.
    async fn take_dataset(&mut self, name: &str) -> Result<Dataset, DataError> {
        if let Some(d) = self.datasets.remove(name) {
            return Ok(d);
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
        let d = loaded?;
        tracing::info!(dataset = name, train = d.train.len(), test = d.test.len(), fingerprint = %d.fingerprint, "dataset loaded");
        Ok(d)
    }

    async fn run_lease(&mut self, lease: pb::Lease) -> anyhow::Result<LeaseEnd> {
        let lref = pb::LeaseRef {
            sweep_id: lease.sweep_id.clone(),
            seed: lease.seed,
            fence: lease.fence,
        };
        tracing::info!(sweep = %lease.sweep_id, seed = lease.seed, fence = lease.fence, "leased");
        let Some(cfg) = lease.train.as_ref().map(train_config) else {
            self.fail(&lref, "the lease carried no train settings", true)
                .await?;
            return Ok(LeaseEnd::Finished);
        };
        if lease.task != "resnet9" {
            let cause = format!(
                "this worker cannot run task `{}` (it runs: resnet9)",
                lease.task
            );
            self.fail(&lref, &cause, false).await?;
            bail!("{cause}; upgrade the worker");
        }
        let data = match self.take_dataset(&lease.dataset).await {
            Ok(d) => d,
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

        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            lref.clone(),
            Duration::from_secs_f64((lease.lease_ttl_seconds as f64 / 3.0).max(1.0)),
            stop.clone(),
            lost.clone(),
            self.shutdown.clone(),
        ));
        let patience = Duration::from_secs(lease.lease_ttl_seconds.max(1) as u64);
        let (tx, rx) = mpsc::channel::<pb::EpochMetrics>(1024);
        let stream = tokio::spawn(ship_metrics(self.client.clone(), rx, patience));

        let started = Instant::now();
        let (device, seed) = (self.settings.device, lease.seed);
        let (stop_t, lref_t) = (stop.clone(), lref.clone());
        let (data, trained) = tokio::task::spawn_blocking(move || {
            let trained = train::train(&data, &cfg, seed, device, &stop_t, |m: &EpochMetrics| {
                if tx.blocking_send(epoch_pb(&lref_t, m)).is_err() {
                    // The coordinator closed the stream (a stale lease): stop training.
                    stop_t.store(true, Ordering::Relaxed);
                }
            });
            (data, trained)
        })
        .await
        .context("the training thread panicked")?;
        let fingerprint = data.fingerprint.clone();
        self.datasets.insert(lease.dataset.clone(), data);
        let seconds = started.elapsed().as_secs_f64();
        let streamed = stream.await.context("the metrics stream task panicked")?;
        heartbeat.abort();

        if let Err(status) = &streamed
            && is_lost(status)
        {
            tracing::warn!(
                seed,
                reason = status.message(),
                "lease lost while streaming metrics; dropping the seed"
            );
            return Ok(LeaseEnd::Lost);
        }
        match trained {
            Ok(history) => {
                streamed.map_err(|s| {
                    anyhow::anyhow!("streaming epoch metrics failed: {}", s.message())
                })?;
                let last = history.last().context("training ran no epoch")?;
                let req = pb::CompleteSeedRequest {
                    lease: Some(lref.clone()),
                    worker_id: self.settings.worker_id.clone(),
                    test_accuracy: last.test_accuracy,
                    test_loss: last.test_loss,
                    train_loss: last.train_loss,
                    train_accuracy: last.train_accuracy,
                    epochs: history.len() as u32,
                    seconds,
                    device: device_label(device),
                    data_fingerprint: fingerprint,
                };
                match with_retries(patience, || {
                    let mut c = self.client.clone();
                    let r = req.clone();
                    async move { c.complete_seed(r).await }
                })
                .await
                {
                    Ok(_) => {
                        tracing::info!(
                            seed,
                            test_accuracy = last.test_accuracy,
                            seconds,
                            "seed finished"
                        );
                        Ok(LeaseEnd::Finished)
                    }
                    Err(s) if is_lost(&s) => {
                        tracing::warn!(seed, reason = s.message(), "result refused: lease lost");
                        Ok(LeaseEnd::Lost)
                    }
                    Err(s) => bail!(
                        "failed to report the result of seed {seed}: {}",
                        s.message()
                    ),
                }
            }
            Err(TrainError::Cancelled) if lost.load(Ordering::Relaxed) => {
                tracing::warn!(seed, "lease lost during training; dropping the seed");
                Ok(LeaseEnd::Lost)
            }
            Err(TrainError::Cancelled) => {
                self.fail(&lref, "worker shut down", false).await?;
                tracing::info!(seed, "handed the seed back; shutting down");
                Ok(LeaseEnd::ShutDown)
            }
            Err(e) => {
                let state = self.fail(&lref, &e.to_string(), true).await?;
                tracing::warn!(seed, error = %e, state, "seed failed");
                Ok(LeaseEnd::Finished)
            }
        }
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
    mut client: CoordinatorClient<Channel>,
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
    client: CoordinatorClient<Channel>,
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
    mut client: CoordinatorClient<Channel>,
    lease: pb::LeaseRef,
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

fn train_config(t: &pb::TrainConfig) -> TrainConfig {
    TrainConfig {
        epochs: t.epochs,
        batch_size: t.batch_size,
        width: t.width,
        lr: t.lr,
        lr_peak_epoch: t.lr_peak_epoch,
        momentum: t.momentum,
        nesterov: t.nesterov,
        weight_decay: t.weight_decay,
        label_smoothing: t.label_smoothing,
        crop_padding: t.crop_padding,
        flip: t.flip,
    }
}

fn epoch_pb(lease: &pb::LeaseRef, m: &EpochMetrics) -> pb::EpochMetrics {
    pb::EpochMetrics {
        lease: Some(lease.clone()),
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        test_loss: m.test_loss,
        test_accuracy: m.test_accuracy,
        lr: m.lr,
        seconds: m.seconds,
    }
}
