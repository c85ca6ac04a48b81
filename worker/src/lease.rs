//! Holding a lease: the heartbeat that keeps it, the calls that may be retried while the
//! coordinator is away, and the guard that hands a seed back when the worker lets go of it
//! without saying what became of it (an error path, a prefetched lease never trained).

use seedsweep_core::policy::Charge;
use seedsweep_proto::client::Client;
use seedsweep_proto::v1 as pb;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::{Code, Status};

/// A lease this worker holds, heartbeated from the moment it was granted. Dropped before
/// [`Held::settle`], it hands its seed back uncounted (see [`HandBacks`]).
pub(crate) struct Held {
    pub lease: pb::Lease,
    pub lref: pb::LeaseRef,
    /// Set to stop training: by the heartbeat when the lease is lost, or on shutdown.
    pub stop: Arc<AtomicBool>,
    /// Set by the heartbeat when the coordinator refused it.
    pub lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// When the lease arrived, for the per-seed overhead (lease to first step).
    pub leased_at: Instant,
    /// Where the run's output goes (task command), named in the attempt's row.
    pub log: std::sync::OnceLock<String>,
    /// Set once the coordinator knows what became of the seed (or no longer counts this worker
    /// as its holder): dropping the lease then hands nothing back.
    settled: AtomicBool,
    handbacks: HandBacks,
}

/// Where a dropped, unsettled lease hands its seed back from: one task per seed, which
/// [`HandBacks::finish`] waits for before the worker exits.
#[derive(Clone)]
pub(crate) struct HandBacks {
    client: Client,
    worker_id: String,
    patience: Duration,
    /// Set on shutdown: hand-backs are then retried for [`STOPPING_PATIENCE`] at most.
    shutdown: Arc<AtomicBool>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

/// The cause recorded for a seed handed back by the guard.
pub(crate) const STOPPED: &str = "worker stopped before finishing this seed";

/// How long a stopping worker keeps trying to hand a seed back to a coordinator it cannot
/// reach: less than the 30 s that Kubernetes and Slurm give a process between SIGTERM and
/// SIGKILL by default, so that it exits on its own. The seed's lease then expires.
pub(crate) const STOPPING_PATIENCE: Duration = Duration::from_secs(20);

impl HandBacks {
    pub fn new(
        client: Client,
        worker_id: String,
        patience: Duration,
        shutdown: Arc<AtomicBool>,
    ) -> HandBacks {
        HandBacks {
            client,
            worker_id,
            patience,
            shutdown,
            tasks: Arc::default(),
        }
    }

    /// Starts heartbeating `lease` every `every` and holds it until shutdown or a refusal.
    pub fn hold(&self, lease: pb::Lease, every: Duration) -> Held {
        // The key goes with every write under the lease, the spooled result's included.
        let lref = pb::LeaseRef {
            sweep_id: lease.sweep_id.clone(),
            seed: lease.seed,
            fence: lease.fence,
            key: lease.key.clone(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            lref.clone(),
            self.worker_id.clone(),
            every,
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
            log: std::sync::OnceLock::new(),
            settled: AtomicBool::new(false),
            handbacks: self.clone(),
        }
    }

    /// Ends the lease without a result: [`Charge::Counted`] charges the seed an attempt (its
    /// training failed; `deterministic` when the run repeats bit for bit), else it is handed
    /// back as if never leased. Retried while the coordinator
    /// is unreachable, for up to the patience ([`STOPPING_PATIENCE`] once the worker is
    /// stopping); returns the seed's new state, or "lost" when the coordinator no longer counts
    /// this worker as its holder.
    pub async fn end(
        &self,
        lease: &pb::LeaseRef,
        cause: &str,
        charge: Charge,
        log: &str,
    ) -> Result<String, Status> {
        let req = pb::FailSeedRequest {
            lease: Some(lease.clone()),
            worker_id: self.worker_id.clone(),
            cause: cause.to_string(),
            counts_as_attempt: charge != Charge::Uncounted,
            log: log.to_string(),
            deterministic: charge
                == Charge::Counted {
                    deterministic: true,
                },
        };
        let patience = if self.shutdown.load(Ordering::Relaxed) {
            self.patience.min(STOPPING_PATIENCE)
        } else {
            self.patience
        };
        match with_retries(patience, || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.fail_seed(r).await }
        })
        .await
        {
            Ok(r) => Ok(r.into_inner().state),
            Err(s) if is_lost(&s) => Ok("lost".to_string()),
            Err(s) => Err(s),
        }
    }

    /// Waits for every hand-back started so far.
    pub async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.join_all().await;
    }
}

impl Held {
    /// The coordinator knows what became of this seed: dropping it hands nothing back.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::Relaxed);
    }

    /// Stops heartbeating (training is over; the report follows).
    pub fn stop_heartbeat(&self) {
        self.heartbeat.abort();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        let (handbacks, lref) = (self.handbacks.clone(), self.lref.clone());
        let log = self.log.get().cloned().unwrap_or_default();
        let task = async move {
            match handbacks.end(&lref, STOPPED, Charge::Uncounted, &log).await {
                Ok(state) => tracing::info!(seed = lref.seed, state, "handed the seed back"),
                Err(s) => tracing::warn!(
                    seed = lref.seed,
                    error = s.message(),
                    "could not hand the seed back; its lease will expire"
                ),
            }
        };
        self.handbacks
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(task);
    }
}

/// Statuses that mean this worker no longer holds the lease.
pub(crate) fn is_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition | Code::Aborted | Code::NotFound
    )
}

/// Errors that mean the coordinator (or its database) is unreachable for now.
pub(crate) fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Retries a call that is safe to repeat while the coordinator is unreachable, with exponential
/// backoff, for at most `patience` (past the lease's lifetime, retrying is pointless).
pub(crate) async fn with_retries<T, F, Fut>(patience: Duration, mut call: F) -> Result<T, Status>
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

async fn heartbeat_loop(
    mut client: Client,
    lease: pb::LeaseRef,
    worker_id: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
) {
    // The first beat one interval after the grant: the lease was granted for a full TTL, and a
    // seed shorter than the interval needs none.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = wait_for(&shutdown), if !stopping => {
                // Stop training, but keep the lease until the seed is handed back (or its result
                // spooled): a phase that takes a while to notice must not let it expire.
                stop.store(true, Ordering::Relaxed);
                stopping = true;
                continue;
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

/// Returns once `flag` is set (checked every 100 ms).
pub(crate) async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps for `d`, or until `flag` is set if that comes first (a stopping worker does not wait
/// out a backoff).
pub(crate) async fn sleep_unless(flag: &AtomicBool, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = wait_for(flag) => {}
    }
}
