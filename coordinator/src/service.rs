//! The gRPC service: converts proto messages into domain types (rejecting malformed ones), calls
//! the store, and maps store errors to gRPC statuses in one place.

use crate::auth::caller_of;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, redact_url};
use seedsweep_core::domain::SweepState;
use seedsweep_core::domain::{
    Aggregate, ClaimOutcome, CompleteOutcome, Correctness, CustomMetrics, EpochRecord, LeaseRef,
    Metric, SeedCounts, SeedResult, SweepId, SweepSummary,
};
use seedsweep_core::metric::Direction;
use seedsweep_core::policy::{Charge, Reported, RunShape};
use seedsweep_core::spec::{Precision, SeedSet, SweepSpec, Task};
use seedsweep_core::stats;
use seedsweep_core::stats::document::{ComparisonDocument, StatsDocument};
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_server::Coordinator;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// What a sweep's report is drawn from: [`seedsweep_core::report::Input`], owned.
pub(crate) struct ReportData {
    pub name: String,
    pub stats: stats::SweepStats,
    pub runs: Vec<seedsweep_core::domain::Scored>,
    pub curves: Vec<(i64, u32, f64)>,
    pub outcomes: seedsweep_core::stats::outcomes::Outcomes,
}

impl ReportData {
    pub fn input<'a>(&'a self, sweep_id: &'a str) -> seedsweep_core::report::Input<'a> {
        seedsweep_core::report::Input {
            sweep_id,
            sweep_name: &self.name,
            stats: &self.stats,
            runs: &self.runs,
            curves: &self.curves,
            outcomes: &self.outcomes,
        }
    }
}

pub struct CoordinatorService {
    store: Arc<dyn Store>,
    lease_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Told the sweep of each result this process records, to wake its watchers.
    recorded: tokio::sync::broadcast::Sender<SweepId>,
    shapes: Shapes,
    epochs: EpochWriter,
    allowed: crate::fleet::Allowed,
    keys: crate::lease_keys::LeaseKeys,
}

impl CoordinatorService {
    pub fn new(store: Arc<dyn Store>, lease_ttl: Duration, metrics: Arc<Metrics>) -> Self {
        let (recorded, _) = tokio::sync::broadcast::channel(1024);
        CoordinatorService {
            shapes: Shapes::new(store.clone()),
            epochs: EpochWriter::start(store.clone()),
            allowed: Default::default(),
            keys: Default::default(),
            store,
            lease_ttl,
            metrics,
            recorded,
        }
    }

    /// The lease a write names, if the caller presents its key ([`crate::lease_keys`]).
    async fn held(&self, lease: Option<&pb::LeaseRef>) -> Result<LeaseRef, Status> {
        let named = lease_ref(lease)?;
        let key = lease.map_or(&[][..], |l| &l.key[..]);
        self.keys.check(self.store.as_ref(), named, key).await?;
        Ok(named)
    }

    /// A warning when no worker connected lately would run a command sweep: none allows its
    /// program, or none that does allows a guarded variable its `env` sets.
    fn unrunnable(&self, c: &seedsweep_core::spec::command::CommandSpec) -> Option<String> {
        let p = c.argv[0].as_str();
        let minutes = crate::fleet::RECENT.as_secs() / 60;
        if !self.allowed.any_allows(p) {
            return Some(format!(
                "no worker connected to this coordinator in the last {minutes} minutes allows `{p}`: \
                 workers run it only when started with --allow-command {p}, and hand its seeds back otherwise"
            ));
        }
        let guarded: Vec<&str> = (c.env.keys())
            .map(String::as_str)
            .filter(|k| seedsweep_core::spec::command::guarded_env(k))
            .collect();
        let v = self.allowed.env_refused(p, &guarded)?;
        Some(format!(
            "the sweep sets {v}, which changes what a program loads or runs first: no worker connected to this \
             coordinator in the last {minutes} minutes that allows `{p}` lets a sweep set it (--allow-env {v}); \
             workers hand its seeds back otherwise"
        ))
    }
}

/// A worker's list of what it allows (`field`): at most 64 `what`, each 1 to `longest`
/// printable characters.
fn check_names(field: &str, what: &str, names: &[String], longest: usize) -> Result<(), Status> {
    let bad = |n: &String| n.is_empty() || n.len() > longest || n.chars().any(char::is_control);
    if names.len() > 64 || names.iter().any(bad) {
        return Err(Status::invalid_argument(format!(
            "{field}: at most 64 {what}, each 1 to {longest} printable characters"
        )));
    }
    Ok(())
}

/// The epoch rows of every stream, written together ([`Store::record_epochs`]): a row waits
/// while the batch before it commits, then goes in with every row that arrived meanwhile, so a
/// fleet's thousands of rows a second cost a commit per batch, not per row.
struct EpochWriter {
    queue: tokio::sync::mpsc::Sender<PendingEpoch>,
}

struct PendingEpoch {
    lease: LeaseRef,
    record: EpochRecord,
    done: tokio::sync::oneshot::Sender<Result<(), Status>>,
}

impl EpochWriter {
    /// The most rows a batch holds.
    const BATCH: usize = 512;

    fn start(store: Arc<dyn Store>) -> EpochWriter {
        let (queue, mut pending) = tokio::sync::mpsc::channel::<PendingEpoch>(4 * Self::BATCH);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::BATCH);
            while pending.recv_many(&mut batch, Self::BATCH).await > 0 {
                let rows: Vec<_> = batch.iter().map(|p| (p.lease, p.record.clone())).collect();
                match store.record_epochs(&rows).await {
                    Ok(verdicts) => {
                        for (p, verdict) in batch.drain(..).zip(verdicts) {
                            let _ = p.done.send(verdict.map_err(status));
                        }
                    }
                    Err(e) => {
                        let failed = status(e);
                        for p in batch.drain(..) {
                            let _ = p.done.send(Err(failed.clone()));
                        }
                    }
                }
            }
        });
        EpochWriter { queue }
    }

    /// Queues one epoch row for the next batch; the verdict comes once the batch is written.
    async fn submit(&self, lease: LeaseRef, record: EpochRecord) -> Result<Verdict, Status> {
        let (done, verdict) = tokio::sync::oneshot::channel();
        let row = PendingEpoch {
            lease,
            record,
            done,
        };
        self.queue.send(row).await.map_err(|_| stopping())?;
        Ok(verdict)
    }
}

/// An epoch row's verdict, to come.
type Verdict = tokio::sync::oneshot::Receiver<Result<(), Status>>;

fn stopping() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

/// What each sweep's runs report ([`RunShape`]), read from the store once per sweep (a sweep's
/// settings never change) and kept for the sweeps seen lately: at most [`Shapes::KEEP`].
struct Shapes {
    store: Arc<dyn Store>,
    known: std::sync::Mutex<HashMap<SweepId, RunShape>>,
}

impl Shapes {
    const KEEP: usize = 4096;

    fn new(store: Arc<dyn Store>) -> Shapes {
        Shapes {
            store,
            known: Default::default(),
        }
    }

    async fn of(&self, id: SweepId) -> Result<RunShape, Status> {
        if let Some(shape) = self.lock().get(&id) {
            return Ok(*shape);
        }
        let shape = self.store.run_shape(id).await.map_err(status)?;
        let mut known = self.lock();
        if known.len() >= Self::KEEP {
            known.clear();
        }
        known.insert(id, shape);
        Ok(shape)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SweepId, RunShape>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The most results one `ListResults` reply carries (about 2 MB), and epoch rows one
/// `ListEpochMetrics` reply carries (about 3 MB): under tonic's 4 MiB default.
const MAX_RESULT_PAGE: u32 = 10_000;
const MAX_EPOCH_PAGE: u32 = 50_000;

/// One page of a listing: `size` rows asked for, at most `max`; 0 is a client from before
/// paging, which wants everything in one reply.
struct Page {
    size: u32,
    max: u32,
}

impl Page {
    fn new(size: u32, max: u32) -> Page {
        Page { size, max }
    }

    /// The rows to read: for an unpaged request one more than fits, to tell it cannot.
    fn limit(&self) -> u32 {
        match self.size {
            0 => self.max + 1,
            n => n.min(self.max),
        }
    }

    /// Refuses an unpaged request whose rows do not fit one reply.
    fn check<T>(&self, rows: Vec<T>, what: &str) -> Result<Vec<T>, Status> {
        if self.size == 0 && rows.len() > self.max as usize {
            return Err(Status::failed_precondition(format!(
                "the sweep has more than {} {what}, too many for one reply: ask for pages (page_size, and the last page's key to continue after)",
                self.max
            )));
        }
        Ok(rows)
    }

    /// Whether the page came back full, so that more may follow.
    fn full<T>(&self, rows: &[T]) -> bool {
        self.size != 0 && rows.len() == self.limit() as usize
    }
}

/// How many messages one `StreamEpochMetrics` call may carry for a run of `epochs` epochs: each
/// epoch twice (a replay), and some room.
fn stream_limit(epochs: u32) -> u64 {
    2 * u64::from(epochs) + 16
}

impl CoordinatorService {
    /// A sweep's statistics for `metric` (None before its first result), with the runs they
    /// came from.
    async fn analyse(
        &self,
        id: SweepId,
        metric: Metric,
        ci_width: Option<f64>,
        test_examples: Option<u64>,
    ) -> Result<
        (
            Option<stats::SweepStats>,
            Vec<seedsweep_core::domain::Scored>,
        ),
        Status,
    > {
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_secs_f64() * 1e3;
        // The three reads at once (each on its own connection): the slowest sets the time.
        let store = &self.store;
        let ((runs, scores_ms), (epochs, epochs_ms), (test_sets, test_sets_ms)) = tokio::join!(
            timed(store.all_scores(id, metric)),
            timed(async {
                if metric.per_epoch() {
                    store.epoch_spread(id, metric).await
                } else {
                    Ok(Vec::new())
                }
            }),
            timed(async {
                if metric == Metric::TestAccuracy {
                    store.test_sets(id).await
                } else {
                    Ok(Vec::new())
                }
            }),
        );
        let runs = runs.map_err(status)?;
        let (epochs, test_sets) = (epochs.map_err(status)?, test_sets.map_err(status)?);
        let direction = self.shapes.of(id).await?.direction_of(metric);
        // CPU work: off the async threads.
        let at = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            let s = stats::analyse(
                metric,
                direction,
                &runs,
                epochs,
                ci_width,
                test_examples,
                &test_sets,
            );
            (s, runs)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(sweep = %id, %metric, seeds = out.1.len(), scores_ms, epochs_ms, test_sets_ms,
            compute_ms = ms(at), total_ms = ms(started), "statistics computed");
        Ok(out)
    }
}

/// How often a watcher also looks for results another coordinator replica recorded.
const WATCH_POLL: Duration = Duration::from_secs(2);

impl CoordinatorService {
    /// Told the sweep of each result this process records from now on.
    pub(crate) fn recorded_results(&self) -> tokio::sync::broadcast::Receiver<SweepId> {
        self.recorded.subscribe()
    }

    /// What a report of the sweep's `metric` is drawn from (`GetSweepReport`, the dashboard);
    /// None before its first result.
    pub(crate) async fn report_data(
        &self,
        id: SweepId,
        metric: Metric,
    ) -> Result<Option<ReportData>, Status> {
        let name = self
            .store
            .sweep_progress(id)
            .await
            .map_err(status)?
            .summary
            .name;
        let (analysed, runs) = self.analyse(id, metric, None, None).await?;
        let Some(stats) = analysed else {
            return Ok(None);
        };
        let curves = if metric.per_epoch() {
            // Past a few hundred seeds, only the sample the report draws is read.
            let sample = seedsweep_core::report::curve_sample(&runs);
            let scores = self.store.epoch_scores(id, metric, sample.as_deref());
            scores.await.map_err(status)?
        } else {
            Vec::new()
        };
        let outcomes = self.store.outcomes(id, metric).await.map_err(status)?;
        Ok(Some(ReportData {
            name,
            stats,
            runs,
            curves,
            outcomes,
        }))
    }

    /// The live aggregate of a sweep's score (its default metric: [`Self::metric`]); None before
    /// its first result.
    pub(crate) async fn score_aggregate(
        &self,
        id: SweepId,
    ) -> Result<Option<seedsweep_core::domain::Aggregate>, Status> {
        let metric = self.metric(id, "").await?;
        let all = self.store.aggregates(id).await.map_err(status)?;
        Ok(all.into_iter().find(|a| a.metric == metric))
    }

    /// A seed's state and attempts (the dashboard's seed page).
    pub(crate) async fn seed_history(
        &self,
        id: SweepId,
        seed: i64,
    ) -> Result<seedsweep_core::domain::SeedHistory, Status> {
        self.store.seed_history(id, seed).await.map_err(status)
    }

    /// The metric a reader asked for; when none, the sweep's score (`command.score`, else
    /// test_accuracy). A custom metric only of a command sweep.
    pub(crate) async fn metric(&self, sweep: SweepId, asked: &str) -> Result<Metric, Status> {
        let shape = self.shapes.of(sweep).await?;
        if asked.is_empty() {
            return Ok(shape.score);
        }
        let metric: Metric = asked.parse().map_err(Status::invalid_argument)?;
        if metric.is_custom() && !shape.custom {
            return Err(Status::invalid_argument(format!(
                "sweep {sweep} has no metric `{asked}`: use one of {} (custom metrics come from task = \"command\" programs)",
                Metric::known_names()
            )));
        }
        Ok(metric)
    }
}

/// A statistics document as the proto carries it: its JSON text.
fn json_document(doc: &impl serde::Serialize) -> Result<Response<pb::StatsDocument>, Status> {
    let json = serde_json::to_string(doc).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::StatsDocument { json }))
}

/// What a watcher keeps between updates: the scores so far, sorted, for the median and the
/// MAD (the moments come from the store's live aggregate), and how far it has read.
#[derive(Default)]
struct Watched {
    sorted: Vec<f64>,
    after: i64,
}

/// One update for a watcher: progress, the live aggregate, and the new results' black swans.
async fn watch_update(
    store: &dyn Store,
    id: SweepId,
    (metric, direction): (Metric, Direction),
    w: &mut Watched,
) -> Result<pb::SweepUpdate, StoreError> {
    let (new, last) = store.scores(id, metric, w.after).await?;
    w.after = last;
    if new.len() > 64 {
        // A backlog (the first update of a large sweep): one sort, not n shifting inserts.
        w.sorted.extend(new.iter().map(|r| r.value));
        w.sorted.sort_unstable_by(f64::total_cmp);
    } else {
        for r in &new {
            let at = w.sorted.partition_point(|&x| x < r.value);
            w.sorted.insert(at, r.value);
        }
    }
    let progress = store.sweep_progress(id).await?;
    let aggregate = progress.aggregate(metric).cloned();
    let (median, mad) = stats::describe::median_mad(&w.sorted);
    let mut swans = Vec::new();
    if let Some(a) = &aggregate {
        let centre = stats::describe::Centre {
            mean: a.moments.mean,
            std: a.moments.std(),
            median,
            mad,
        };
        for r in &new {
            if let Some(b) = stats::describe::judge(r.seed, r.value, &centre, direction) {
                swans.push(pb::BlackSwan {
                    lucky: b.lucky,
                    seed: b.seed,
                    score: b.score,
                    z: b.z,
                    robust_z: b.robust_z,
                    side: b.side.as_str().into(),
                    flagged_by: b
                        .flagged_by
                        .iter()
                        .map(|f| f.as_str().to_string())
                        .collect(),
                });
            }
        }
    }
    let c = progress.counts;
    Ok(pb::SweepUpdate {
        sweep: Some(summary_pb(&progress.summary)),
        counts: Some(counts_pb(&c)),
        metric: metric.to_string(),
        summary: aggregate.map(|a| aggregate_pb(&a, direction)),
        new_black_swans: swans,
        median: if w.sorted.is_empty() { 0.0 } else { median },
        finished: c.pending == 0 && c.leased == 0,
        direction: direction.as_str().into(),
    })
}

/// A future's output with the milliseconds it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let at = std::time::Instant::now();
    let out = f.await;
    (out, at.elapsed().as_secs_f64() * 1e3)
}

/// The one place store errors become gRPC statuses.
pub(crate) fn status(e: StoreError) -> Status {
    match e {
        StoreError::SweepNotFound(_) | StoreError::SeedNotFound { .. } => {
            Status::not_found(e.to_string())
        }
        StoreError::StaleLease(_) | StoreError::Conflict(_) => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::UnsupportedUrl(u) => {
            Status::internal(format!("unsupported database URL {}", redact_url(&u)))
        }
        _ if e.is_transient() => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable(format!(
                "the coordinator's database is unavailable, retry later: {e}"
            ))
        }
        StoreError::Database(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "store error");
            Status::internal(e.to_string())
        }
    }
}

fn sweep_id(s: &str) -> Result<SweepId, Status> {
    s.parse().map_err(Status::invalid_argument)
}

fn worker_id(s: &str) -> Result<&str, Status> {
    if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "worker_id must be 1 to 256 printable characters",
        ));
    }
    Ok(s)
}

fn lease_ref(lease: Option<&pb::LeaseRef>) -> Result<LeaseRef, Status> {
    let l = lease.ok_or_else(|| {
        Status::invalid_argument("lease is missing: name the lease (sweep_id, seed, fence)")
    })?;
    if l.seed < 0 || l.fence < 1 {
        return Err(Status::invalid_argument(format!(
            "lease seed {} fence {}: seeds are >= 0 and fences >= 1",
            l.seed, l.fence
        )));
    }
    Ok(LeaseRef {
        sweep_id: sweep_id(&l.sweep_id)?,
        seed: l.seed,
        fence: l.fence,
    })
}

fn finite(name: &str, v: f64) -> Result<f64, Status> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Status::invalid_argument(format!(
            "{name} = {v} is not finite"
        )))
    }
}

fn fraction(name: &str, v: f64) -> Result<f64, Status> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(Status::invalid_argument(format!(
            "{name} = {v}: accuracies are fractions in [0, 1]"
        )))
    }
}

fn non_negative(name: &str, v: f64) -> Result<f64, Status> {
    if v >= 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(Status::invalid_argument(format!(
            "{name} = {v}: must be a finite number >= 0"
        )))
    }
}

/// Where a run's output is on its worker: empty (none), or up to 1024 printable characters.
fn log_path(s: &str) -> Result<Option<&str>, Status> {
    if s.len() > 1024 || s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "log must be at most 1024 printable characters (the run's log file on the worker)",
        ));
    }
    Ok((!s.is_empty()).then_some(s))
}

fn label(name: &str, s: &str) -> Result<String, Status> {
    if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{name} must be 1 to 256 printable characters"
        )));
    }
    Ok(s.to_string())
}

/// An epoch number or count as the databases store it (a 32-bit signed integer): from 1 to
/// 2^31 - 1. Past that a row would be stored that no reader could read back.
fn epoch_number(field: &str, n: u32) -> Result<(), Status> {
    if n == 0 || n > i32::MAX as u32 {
        return Err(Status::invalid_argument(format!(
            "{field} = {n} is out of range: epochs are numbered from 1 to {}",
            i32::MAX
        )));
    }
    Ok(())
}

/// An optional metric, checked by `check` when present.
fn checked(
    field: &str,
    value: Option<f64>,
    check: fn(&str, f64) -> Result<f64, Status>,
) -> Result<Option<f64>, Status> {
    value.map(|v| check(field, v)).transpose()
}

fn epoch_record(m: &pb::EpochMetrics) -> Result<EpochRecord, Status> {
    epoch_number("epoch", m.epoch)?;
    // Losses may legitimately be NaN only in a failed run, which is reported with FailSeed instead.
    Ok(EpochRecord {
        epoch: m.epoch,
        train_loss: checked("train_loss", m.train_loss, finite)?,
        train_accuracy: checked("train_accuracy", m.train_accuracy, fraction)?,
        test_loss: checked("test_loss", m.test_loss, finite)?,
        test_accuracy: checked("test_accuracy", m.test_accuracy, fraction)?,
        test_top5: checked("test_top5", m.test_top5, fraction)?,
        val_loss: checked("val_loss", m.val_loss, finite)?,
        val_accuracy: checked("val_accuracy", m.val_accuracy, fraction)?,
        lr: checked("lr", m.lr, non_negative)?,
        seconds: non_negative("seconds", m.seconds)?,
        custom: custom(&m.custom)?,
    })
}

/// A report's custom metrics, checked.
fn custom(m: &BTreeMap<String, f64>) -> Result<CustomMetrics, Status> {
    seedsweep_core::metric::check_custom(m).map_err(Status::invalid_argument)?;
    Ok(m.clone())
}

fn summary_pb(s: &SweepSummary) -> pb::SweepSummary {
    pb::SweepSummary {
        sweep_id: s.id.to_string(),
        name: s.name.clone(),
        task: s.task.as_str().to_string(),
        dataset: s.dataset.clone(),
        created_at: s.created_at.clone(),
        total: s.total,
        done: s.done,
        state: s.state.as_str().to_string(),
        priority: s.priority,
    }
}

fn train_pb(t: &seedsweep_core::spec::TrainSettings) -> pb::TrainConfig {
    pb::TrainConfig {
        epochs: t.epochs,
        batch_size: t.batch_size,
        width: t.width,
        lr: t.lr,
        lr_peak_epoch: t.peak_epoch(),
        momentum: t.momentum,
        nesterov: t.nesterov,
        weight_decay: t.weight_decay,
        label_smoothing: t.label_smoothing,
        crop_padding: t.crop_padding,
        flip: t.flip,
        model: t.model.as_str().to_string(),
        schedule: t.schedule.as_str().to_string(),
        smoothed_loss_weight: t.smoothed_loss_weight,
        smoothed_loss_epsilon: t.smoothed_loss_epsilon,
        cutout: t.cutout,
        precision: t.precision.as_str().to_string(),
        channels_last: t.channels_last,
        deterministic: t.deterministic,
        eval_every: t.eval_every,
        checkpoint_every: t.checkpoint_every,
        holdout: t.holdout,
        init: name(&t.init),
        crop_padding_mode: name(&t.crop_padding_mode),
        cutout_at_borders: t.cutout_at_borders,
        augment_per: name(&t.augment_per),
        drop_last: t.drop_last,
        lr_in_momentum: t.lr_in_momentum,
        final_epoch_fraction: t.final_epoch_fraction,
        bn_bias_lr_scale: t.bn_bias_lr_scale,
        whiten_bias_epochs: t.whiten_bias_epochs,
        lookahead: t.lookahead,
        tta_level: t.tta_level,
        alternating_flip: t.alternating_flip,
    }
}

/// The name a settings enum has in sweep files (its serde name).
fn name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn command_pb(c: seedsweep_core::spec::command::CommandSpec) -> pb::CommandConfig {
    pb::CommandConfig {
        argv: c.argv,
        workdir: c.workdir.unwrap_or_default(),
        env: c.env.into_iter().collect(),
        time_limit_seconds: c.time_limit_seconds,
        score: c.score,
        epochs: c.epochs.unwrap_or(0),
        memory_limit_mb: c.memory_limit_mb.unwrap_or(0),
        pids_limit: c.pids_limit.unwrap_or(0),
    }
}

fn finetune_pb(f: &seedsweep_core::spec::finetune::FinetuneSpec) -> pb::FinetuneConfig {
    let b = &f.backbone;
    let t = &f.finetune;
    pb::FinetuneConfig {
        backbone: Some(pb::Backbone {
            file: b.file.clone(),
            sha256: b.sha256.clone(),
            format: b.format.map(|f| name(&f)).unwrap_or_default(),
            arch: b.arch.clone().unwrap_or_default(),
            features: b.features,
            input_size: b.input_size,
            mean: b.mean.to_vec(),
            std: b.std.to_vec(),
        }),
        head_init: name(&t.head_init),
        head_init_std: t.head_init_std,
        label_smoothing: t.label_smoothing,
        optimizer: name(&t.optimizer),
        augment: t.augment,
        eval_every_steps: t.eval_every_steps,
        bad_images: name(&t.bad_images),
        head: Some(phase_pb(&t.head)),
        full: t.full.as_ref().map(phase_pb),
    }
}

fn phase_pb(p: &seedsweep_core::spec::finetune::Phase) -> pb::Phase {
    pb::Phase {
        steps: p.steps,
        batch_size: p.batch_size,
        lr: p.lr,
        lr_end: p.lr_end,
        weight_decay: p.weight_decay,
        momentum: p.momentum,
    }
}

fn counts_pb(c: &SeedCounts) -> pb::SeedCounts {
    pb::SeedCounts {
        pending: c.pending,
        leased: c.leased,
        done: c.done,
        failed: c.failed,
        cancelled: c.cancelled,
        diverged: c.diverged,
    }
}

/// A live aggregate of a metric that improves in `direction`, as the status messages carry it.
fn aggregate_pb(a: &Aggregate, direction: Direction) -> pb::AccuracyStats {
    let (best_seed, worst_seed) = direction.best_worst(a.min_seed, a.max_seed);
    pb::AccuracyStats {
        n: a.moments.n,
        mean: a.moments.mean,
        std: a.moments.std(),
        min: a.min,
        max: a.max,
        worst_seed,
        best_seed,
    }
}

fn factors_pb(f: &seedsweep_core::design::FactorSeeds) -> pb::FactorSeeds {
    pb::FactorSeeds {
        init: f.init,
        order: f.order,
        augment: f.augment,
        split: f.split,
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let spec = SweepSpec::parse(&req.get_ref().sweep_toml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = SweepId::new();
        self.store.create_sweep(id, &spec).await.map_err(status)?;
        tracing::info!(sweep = %id, name = %spec.name, seeds = spec.seeds.len(), "sweep created");
        let warnings = spec
            .command
            .as_ref()
            .and_then(|c| self.unrunnable(c))
            .into_iter()
            .collect();
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep_id: id.to_string(),
            seeds: spec.seeds.len() as u64,
            warnings,
        }))
    }

    async fn get_sweep_status(
        &self,
        req: Request<pb::GetSweepStatusRequest>,
    ) -> Result<Response<pb::SweepStatus>, Status> {
        let id = sweep_id(&req.get_ref().sweep_id)?;
        let p = self.store.sweep_progress(id).await.map_err(status)?;
        let shape = self.shapes.of(id).await?;
        let test_accuracy = p
            .aggregate(Metric::TestAccuracy)
            .map(|a| aggregate_pb(a, Direction::Max));
        Ok(Response::new(pb::SweepStatus {
            sweep: Some(summary_pb(&p.summary)),
            counts: Some(counts_pb(&p.counts)),
            test_accuracy,
            score: shape.score.to_string(),
            score_direction: shape.direction.as_str().into(),
            score_stats: p
                .aggregate(shape.score)
                .map(|a| aggregate_pb(a, shape.direction)),
            config: self.store.sweep_config(id).await.map_err(status)?,
        }))
    }

    async fn list_sweeps(
        &self,
        _req: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let sweeps = self.store.list_sweeps().await.map_err(status)?;
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: sweeps.iter().map(summary_pb).collect(),
        }))
    }

    async fn get_sweep_stats(
        &self,
        req: Request<pb::GetSweepStatsRequest>,
    ) -> Result<Response<pb::StatsDocument>, Status> {
        let r = req.get_ref();
        let id = sweep_id(&r.sweep_id)?;
        let metric = self.metric(id, &r.metric).await?;
        if !(r.ci_width.is_finite() && r.ci_width >= 0.0) {
            return Err(Status::invalid_argument("ci_width must be a number >= 0"));
        }
        let ci_width = (r.ci_width > 0.0).then_some(r.ci_width);
        let test_examples = (r.test_examples > 0).then_some(r.test_examples);
        let (analysed, _) = self.analyse(id, metric, ci_width, test_examples).await?;
        let outcomes = self.store.outcomes(id, metric).await.map_err(status)?;
        json_document(&StatsDocument::new(
            id.to_string(),
            metric,
            analysed,
            outcomes,
        ))
    }

    async fn get_sweep_report(
        &self,
        req: Request<pb::GetSweepReportRequest>,
    ) -> Result<Response<pb::SweepReport>, Status> {
        let id = sweep_id(&req.get_ref().sweep_id)?;
        let metric = self.metric(id, &req.get_ref().metric).await?;
        let Some(data) = self.report_data(id, metric).await? else {
            return Err(Status::failed_precondition(format!(
                "sweep {id} has no result with `{metric}` yet: nothing to report"
            )));
        };
        let files = tokio::task::spawn_blocking(move || {
            seedsweep_core::report::build(&data.input(&id.to_string()))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("cannot draw the report: {e:#}")))?;
        Ok(Response::new(pb::SweepReport {
            files: files
                .into_iter()
                .map(|f| pb::ReportFile {
                    name: f.name,
                    content: f.bytes,
                })
                .collect(),
        }))
    }

    async fn compare_sweeps(
        &self,
        req: Request<pb::CompareSweepsRequest>,
    ) -> Result<Response<pb::StatsDocument>, Status> {
        let r = req.get_ref();
        let (a, b) = (sweep_id(&r.sweep_a)?, sweep_id(&r.sweep_b)?);
        let metric = self.metric(a, &r.metric).await?;
        self.metric(b, metric.name()).await?;
        let direction = self.shapes.of(a).await?.direction_of(metric);
        let direction_b = self.shapes.of(b).await?.direction_of(metric);
        if direction != direction_b {
            return Err(Status::failed_precondition(format!(
                "`{metric}` improves towards its {} in {a} but its {} in {b} (`command.score_direction`): compare sweeps that agree on which way is better",
                direction.as_str(),
                direction_b.as_str()
            )));
        }
        let values = |runs: Vec<seedsweep_core::domain::Scored>| -> Vec<f64> {
            runs.into_iter().map(|s| s.value).collect()
        };
        let va = values(self.store.all_scores(a, metric).await.map_err(status)?);
        let vb = values(self.store.all_scores(b, metric).await.map_err(status)?);
        let Some(c) = stats::compare::compare(&va, &vb, direction) else {
            return Err(Status::failed_precondition(format!(
                "a comparison needs at least 2 results of `{metric}` in each sweep: {a} has {}, {b} has {}",
                va.len(),
                vb.len()
            )));
        };
        json_document(&ComparisonDocument {
            metric,
            sweep_a: a.to_string(),
            sweep_b: b.to_string(),
            comparison: c,
        })
    }

    async fn watch_sweep(
        &self,
        req: Request<pb::WatchSweepRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::SweepUpdate>>, Status> {
        let id = sweep_id(&req.get_ref().sweep_id)?;
        let metric = self.metric(id, &req.get_ref().metric).await?;
        let metric = (metric, self.shapes.of(id).await?.direction_of(metric));
        let store = self.store.clone();
        let mut woken = self.recorded.subscribe();
        let mut watched = Watched::default();
        // The first update here, so that a bad id is an error of the call itself.
        let first = watch_update(store.as_ref(), id, metric, &mut watched)
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut update = Ok(first);
            loop {
                let finished = matches!(&update, Ok(u) if u.finished) || update.is_err();
                if tx.send(update).await.is_err() || finished {
                    return;
                }
                loop {
                    tokio::select! {
                        got = woken.recv() => match got {
                            Ok(s) if s != id => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                            _ => {}
                        },
                        _ = tokio::time::sleep(WATCH_POLL) => {}
                        _ = tx.closed() => return,
                    }
                    break;
                }
                update = watch_update(store.as_ref(), id, metric, &mut watched)
                    .await
                    .map_err(status);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_epoch_metrics(
        &self,
        req: Request<pb::ListEpochMetricsRequest>,
    ) -> Result<Response<pb::ListEpochMetricsResponse>, Status> {
        let r = req.get_ref();
        let id = sweep_id(&r.sweep_id)?;
        let page = Page::new(r.page_size, MAX_EPOCH_PAGE);
        let after = r.after.map(|k| (k.seed, k.epoch));
        let rows = self.store.list_epochs(id, after, page.limit()).await;
        let rows = page.check(rows.map_err(status)?, "epoch rows")?;
        Ok(Response::new(pb::ListEpochMetricsResponse {
            next_after: page
                .full(&rows)
                .then(|| {
                    rows.last().map(|(seed, e)| pb::EpochKey {
                        seed: *seed,
                        epoch: e.epoch,
                    })
                })
                .flatten(),
            rows: rows
                .into_iter()
                .map(|(seed, e)| pb::EpochRow {
                    seed,
                    epoch: e.epoch,
                    train_loss: e.train_loss,
                    train_accuracy: e.train_accuracy,
                    test_loss: e.test_loss,
                    test_accuracy: e.test_accuracy,
                    test_top5: e.test_top5,
                    val_loss: e.val_loss,
                    val_accuracy: e.val_accuracy,
                    lr: e.lr,
                    seconds: e.seconds,
                    custom: e.custom,
                })
                .collect(),
        }))
    }

    async fn list_results(
        &self,
        req: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let r = req.get_ref();
        let id = sweep_id(&r.sweep_id)?;
        let page = Page::new(r.page_size, MAX_RESULT_PAGE);
        let results = self
            .store
            .list_results(id, r.after_seed, page.limit())
            .await;
        let results = page.check(results.map_err(status)?, "results")?;
        Ok(Response::new(pb::ListResultsResponse {
            next_after_seed: page
                .full(&results)
                .then(|| results.last().map(|r| r.seed))
                .flatten(),
            results: results
                .into_iter()
                .map(|r| pb::SeedResult {
                    seed: r.seed,
                    test_accuracy: r.test_accuracy,
                    test_loss: r.test_loss,
                    train_loss: r.train_loss,
                    train_accuracy: r.train_accuracy,
                    epochs: r.epochs,
                    seconds: r.seconds,
                    worker_id: r.worker_id,
                    device: r.device,
                    data_fingerprint: r.data_fingerprint,
                    finished_at: r.finished_at,
                    factors: r.factors.as_ref().map(factors_pb),
                    precision: r.precision.as_str().to_string(),
                    deterministic: r.deterministic,
                    test_top5: r.test_top5,
                    val_loss: r.val_loss,
                    val_accuracy: r.val_accuracy,
                    custom: r.custom,
                })
                .collect(),
        }))
    }

    async fn set_sweep_state(
        &self,
        req: Request<pb::SetSweepStateRequest>,
    ) -> Result<Response<pb::SetSweepStateResponse>, Status> {
        let r = req.get_ref();
        let id = sweep_id(&r.sweep_id)?;
        let state = SweepState::parse(&r.state).ok_or_else(|| {
            Status::invalid_argument(format!(
                "state `{}`: use \"active\", \"paused\" or \"cancelled\"",
                r.state
            ))
        })?;
        self.store
            .set_sweep_state(id, state)
            .await
            .map_err(status)?;
        tracing::info!(sweep = %id, state = state.as_str(), "sweep state changed");
        Ok(Response::new(pb::SetSweepStateResponse {}))
    }

    async fn extend_sweep(
        &self,
        req: Request<pb::ExtendSweepRequest>,
    ) -> Result<Response<pb::ExtendSweepResponse>, Status> {
        let r = req.get_ref();
        let id = sweep_id(&r.sweep_id)?;
        let seeds = match (r.range.is_empty(), r.list.is_empty()) {
            (false, true) => SeedSet::parse_range(&r.range),
            (true, false) => SeedSet::from_list(r.list.clone()),
            _ => {
                return Err(Status::invalid_argument(
                    "give either a seed range or a seed list",
                ));
            }
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let added = self.store.extend_sweep(id, &seeds).await.map_err(status)?;
        tracing::info!(sweep = %id, added, "sweep extended");
        Ok(Response::new(pb::ExtendSweepResponse { added }))
    }

    async fn lease_seed(
        &self,
        req: Request<pb::LeaseSeedRequest>,
    ) -> Result<Response<pb::LeaseSeedResponse>, Status> {
        let worker = worker_id(&req.get_ref().worker_id)?;
        let token = caller_of(&req);
        self.metrics.saw_worker(worker);
        let programs = &req.get_ref().allowed_commands;
        check_names("allowed_commands", "programs", programs, 4096)?;
        let env = &req.get_ref().allowed_env;
        check_names("allowed_env", "variable names", env, 128)?;
        for name in env {
            seedsweep_core::spec::command::check_env_name(name)
                .map_err(|e| Status::invalid_argument(format!("allowed_env: {e}")))?;
        }
        self.allowed.saw(worker, programs, env);
        let asked = &req.get_ref().tasks;
        check_names("tasks", "task names", asked, 64)?;
        // Names this coordinator does not know (a newer worker's) are skipped; a worker that
        // runs none of its tasks gets nothing to lease.
        let tasks: Vec<Task> = asked.iter().filter_map(|t| Task::parse(t)).collect();
        let started = std::time::Instant::now();
        let claimed = if !asked.is_empty() && tasks.is_empty() {
            Ok(ClaimOutcome::Empty { outstanding: 0 })
        } else {
            self.store.claim_for(worker, &tasks, self.lease_ttl).await
        };
        self.metrics.claimed(
            started.elapsed(),
            matches!(claimed, Ok(ClaimOutcome::Leased(_))),
        );
        let outcome = match claimed.map_err(status)? {
            ClaimOutcome::Leased(l) => {
                self.keys.granted(l.lease, &l.key);
                tracing::info!(sweep = %l.lease.sweep_id, seed = l.lease.seed, fence = l.lease.fence, worker, token, "seed leased");
                pb::lease_seed_response::Outcome::Lease(pb::Lease {
                    sweep_id: l.lease.sweep_id.to_string(),
                    seed: l.lease.seed,
                    fence: l.lease.fence,
                    task: l.task.as_str().to_string(),
                    dataset: l.dataset,
                    train: Some(train_pb(&l.train)),
                    lease_ttl_seconds: self.lease_ttl.as_secs().max(1) as u32,
                    factors: Some(factors_pb(&l.factors)),
                    seed_namespace: l.seed_namespace,
                    finetune: l.finetune.as_ref().map(finetune_pb),
                    command: l.command.map(command_pb),
                    key: l.key.0.to_vec(),
                })
            }
            ClaimOutcome::Empty { outstanding } => {
                pb::lease_seed_response::Outcome::NoWork(pb::NoWork { outstanding })
            }
        };
        Ok(Response::new(pb::LeaseSeedResponse {
            outcome: Some(outcome),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let lease = self.held(req.get_ref().lease.as_ref()).await?;
        let worker = &req.get_ref().worker_id;
        if !worker.is_empty() {
            self.metrics.saw_worker(worker_id(worker)?);
        }
        self.store
            .heartbeat(lease, self.lease_ttl)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn stream_epoch_metrics(
        &self,
        req: Request<Streaming<pb::EpochMetrics>>,
    ) -> Result<Response<pb::StreamEpochMetricsResponse>, Status> {
        let mut stream = req.into_inner();
        let mut received = 0u32;
        let mut verdicts = std::collections::VecDeque::new();
        while let Some(m) = stream.message().await? {
            let lease = self.held(m.lease.as_ref()).await?;
            let record = epoch_record(&m)?;
            let shape = self.shapes.of(lease.sweep_id).await?;
            if u64::from(received) >= stream_limit(shape.epochs) {
                return Err(Status::invalid_argument(format!(
                    "this stream sent more than {} messages, for runs of {} epochs: open a new stream to replay",
                    stream_limit(shape.epochs),
                    shape.epochs
                )));
            }
            shape
                .check_epoch(record.epoch, Reported::of_epoch(&record))
                .map_err(Status::invalid_argument)?;
            tracing::debug!(%lease, epoch = record.epoch, "epoch received");
            // The rows of a stream are written in order, without waiting for each one's batch
            // (a replay of many epochs takes one batch, not one each); a refusal already known
            // ends the stream at once.
            verdicts.push_back(self.epochs.submit(lease, record).await?);
            while let Some(Ok(verdict)) = verdicts.front_mut().map(|v| v.try_recv()) {
                verdicts.pop_front();
                verdict?;
            }
            received += 1;
        }
        for verdict in verdicts {
            verdict.await.map_err(|_| stopping())??;
        }
        Ok(Response::new(pb::StreamEpochMetricsResponse { received }))
    }

    async fn complete_seed(
        &self,
        req: Request<pb::CompleteSeedRequest>,
    ) -> Result<Response<pb::CompleteSeedResponse>, Status> {
        let r = req.get_ref();
        let lease = self.held(r.lease.as_ref()).await?;
        match r.diverged_epoch {
            // A run may diverge in its first epoch, with none finished.
            Some(at) => {
                epoch_number("diverged_epoch", at)?;
                epoch_number("epochs", r.epochs.max(1))?;
            }
            None => epoch_number("epochs", r.epochs)?,
        }
        let result = SeedResult {
            seed: lease.seed,
            test_accuracy: checked("test_accuracy", r.test_accuracy, fraction)?,
            test_loss: checked("test_loss", r.test_loss, finite)?,
            train_loss: checked("train_loss", r.train_loss, finite)?,
            train_accuracy: checked("train_accuracy", r.train_accuracy, fraction)?,
            epochs: r.epochs,
            diverged_epoch: r.diverged_epoch,
            seconds: non_negative("seconds", r.seconds)?,
            worker_id: worker_id(&r.worker_id)?.to_string(),
            device: label("device", &r.device)?,
            data_fingerprint: label("data_fingerprint", &r.data_fingerprint)?,
            precision: Precision::parse(&r.precision).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "precision = \"{}\": must be {}",
                    r.precision,
                    Precision::known()
                ))
            })?,
            deterministic: r.deterministic,
            test_top5: checked("test_top5", r.test_top5, fraction)?,
            val_loss: checked("val_loss", r.val_loss, finite)?,
            val_accuracy: checked("val_accuracy", r.val_accuracy, fraction)?,
            custom: custom(&r.custom)?,
            factors: None,
            finished_at: String::new(),
            test_correct: if r.test_correct.is_empty() && r.test_examples == 0 {
                None
            } else {
                let accuracy = r.test_accuracy.ok_or_else(|| {
                    Status::invalid_argument(
                        "test_correct was sent without test_accuracy, which its count of ones must agree with",
                    )
                })?;
                Some(
                    Correctness::new(r.test_examples, r.test_correct.clone(), accuracy)
                        .map_err(Status::invalid_argument)?,
                )
            },
        };
        let shape = self.shapes.of(lease.sweep_id).await?;
        shape
            .check_finished(&result)
            .map_err(Status::invalid_argument)?;
        self.metrics.saw_worker(&result.worker_id);
        let log = log_path(&r.log)?;
        let outcome = self.store.complete(lease, &result).await.map_err(status)?;
        if let Some(log) = log {
            self.store.note_log(lease, log).await.map_err(status)?;
        }
        let recorded = outcome == CompleteOutcome::Recorded;
        if recorded {
            self.metrics.result_recorded();
            // No watcher: nobody to wake.
            let _ = self.recorded.send(lease.sweep_id);
        }
        tracing::info!(sweep = %lease.sweep_id, seed = lease.seed, fence = lease.fence, worker = %result.worker_id, token = caller_of(&req), test_accuracy = result.test_accuracy, diverged_epoch = result.diverged_epoch, recorded, "seed finished");
        Ok(Response::new(pb::CompleteSeedResponse { recorded }))
    }

    async fn fail_seed(
        &self,
        req: Request<pb::FailSeedRequest>,
    ) -> Result<Response<pb::FailSeedResponse>, Status> {
        let r = req.get_ref();
        let lease = self.held(r.lease.as_ref()).await?;
        let worker = worker_id(&r.worker_id)?;
        self.metrics.saw_worker(worker);
        let cause: String = r.cause.chars().take(4096).collect();
        let log = log_path(&r.log)?;
        let state = self
            .store
            .fail(
                lease,
                &cause,
                Charge::from_report(r.counts_as_attempt, r.deterministic),
            )
            .await
            .map_err(status)?;
        if let Some(log) = log {
            self.store.note_log(lease, log).await.map_err(status)?;
        }
        tracing::warn!(sweep = %lease.sweep_id, seed = lease.seed, fence = lease.fence, worker, token = caller_of(&req), cause = %cause, counts_as_attempt = r.counts_as_attempt, state = state.as_str(), "seed attempt ended without a result");
        Ok(Response::new(pb::FailSeedResponse {
            state: state.as_str().to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpaged_listing_past_one_reply_is_refused_and_a_paged_one_goes_on() {
        let unpaged = Page::new(0, 3);
        assert_eq!(unpaged.limit(), 4);
        assert_eq!(unpaged.check(vec![1, 2, 3], "rows").unwrap().len(), 3);
        let e = unpaged.check(vec![1, 2, 3, 4], "rows").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("page_size"), "{}", e.message());
        assert!(!unpaged.full(&[1, 2, 3]));
        let paged = Page::new(10, 3);
        assert_eq!(paged.limit(), 3, "a page larger than the most is cut to it");
        assert!(paged.full(&[1, 2, 3]) && !paged.full(&[1, 2]));
    }
}
