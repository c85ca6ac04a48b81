//! The store: the only code that talks SQL. One trait, one implementation per database, each
//! owning its SQL and migrations; `tests/` runs one conformance suite against both.
//!
//! Lease protocol, the same in both implementations:
//! - `claim` first expires leases whose `lease_expires_at` has passed by the *database* clock
//!   (each counts as a failed attempt; not until the store has had its database without a break
//!   for one lease TTL, so that an outage costs no attempt: [`Availability`]), then leases the oldest sweep's lowest pending seed,
//!   incrementing its `fence`.
//! - Every later write names `(sweep_id, seed, fence)` and changes nothing unless the seed is still
//!   `leased` under that fence ([`StoreError::StaleLease`]).
//! - Time is the database's clock (SQLite is embedded, so its clock is this host's) plus the
//!   [`Clock`]'s offset, which is zero outside tests.

mod migrations;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use seedsweep_core::design::Design;
use seedsweep_core::domain::{
    Aggregate, Attempt, ClaimOutcome, CompleteOutcome, Correctness, CustomMetrics, EpochRecord,
    FleetCounts, LeaseRef, Metric, Scored, SeedHistory, SeedResult, SeedState, SweepId,
    SweepProgress, SweepState, SweepSummary,
};
use seedsweep_core::policy::{self, AttemptOutcome, Charge, Refusal};
use seedsweep_core::spec::{Precision, SeedSet, SweepSpec, Task};
use seedsweep_core::stats::describe::EpochSpread;
use seedsweep_core::stats::noise::{HitSums, TestSetTally};
use seedsweep_core::stats::outcomes::{DivergedSeed, FailureCause, Outcomes};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no sweep {0}")]
    SweepNotFound(SweepId),
    #[error("seed {seed} is not part of sweep {sweep_id}")]
    SeedNotFound { sweep_id: SweepId, seed: i64 },
    /// The lease named was superseded, released or finished: the caller no longer holds the seed.
    #[error("stale lease: {0} is no longer held (the seed was re-leased, released or finished)")]
    StaleLease(LeaseRef),
    /// The write is well-formed but contradicts what the store holds.
    #[error("{0}")]
    Conflict(String),
    /// The write contradicts itself as the store reads it (a result whose final metrics are not
    /// its last epoch's): the caller must change what it sends.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "unsupported database URL `{0}`: use sqlite://FILE (one host) or postgres://USER@HOST/DB (fleets)"
    )]
    UnsupportedUrl(String),
    #[error("failed to migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<Refusal> for StoreError {
    fn from(r: Refusal) -> StoreError {
        match r {
            Refusal::Stale(lease) => StoreError::StaleLease(lease),
            Refusal::Conflict(msg) => StoreError::Conflict(msg),
        }
    }
}

impl StoreError {
    /// Whether the store refused this one request (it names what is not there or not held),
    /// rather than failing.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::SweepNotFound(_)
                | StoreError::SeedNotFound { .. }
                | StoreError::StaleLease(_)
                | StoreError::Conflict(_)
                | StoreError::Invalid(_)
        )
    }

    /// Whether the database is unreachable or busy for now (restarting, failing over, out of
    /// connections, a serialisation conflict): the caller may retry the same request. The one place
    /// that reads database error codes.
    pub fn is_transient(&self) -> bool {
        self.is_unreachable()
            || self.code().is_some_and(|code| {
                // 53: insufficient resources; 40001 / 40P01: serialisation failure / deadlock.
                // SQLite: 5 / 6 (SQLITE_BUSY / SQLITE_LOCKED).
                code.starts_with("53")
                    || code == "40001"
                    || code == "40P01"
                    || code == "5"
                    || code == "6"
            })
    }

    /// Whether the database could not be reached at all (down, restarting, failing over, no
    /// connection to be had): what [`Availability`] counts as an outage.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_),
            ) => true,
            // 08: connection exception; 57P: operator intervention (shutdown, restart).
            _ => self
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        }
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.code(),
            _ => None,
        }
    }
}

/// Whether this coordinator may judge leases by their deadlines: only once it has had its
/// database without a break for one lease TTL. A worker cannot heartbeat while the coordinator
/// or its database is away, so a deadline that passed during an outage says nothing about the
/// worker; for one TTL after the coordinator starts, or after its database answers again, no
/// lease expires, and every worker still holding one has that long to heartbeat it. The rule
/// (README, "Outages") is per coordinator process: a replica that never lost the database
/// expires leases as usual, and one that did waits out its own grace.
#[derive(Debug)]
pub(crate) struct Availability {
    clock: Clock,
    /// Since when the database has answered (None while it does not).
    since: std::sync::Mutex<Option<ClockMark>>,
}

impl Availability {
    /// The database answered just now (the store connected).
    pub(crate) fn new(clock: Clock) -> Availability {
        let since = std::sync::Mutex::new(Some(clock.mark()));
        Availability { clock, since }
    }

    /// Notes what a call to the database found: an outage starts at an unreachable database and
    /// ends at the first answer after it.
    pub(crate) fn observe<T>(&self, result: Result<T>) -> Result<T> {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        let unreachable = result.as_ref().err().filter(|e| e.is_unreachable());
        match (unreachable, since.is_some()) {
            (Some(e), true) => {
                tracing::warn!(error = %e, "database unreachable: no lease expires until it has answered for one lease TTL");
                *since = None;
            }
            (None, false) => *since = Some(self.clock.mark()),
            _ => {}
        }
        result
    }

    /// Whether leases whose deadline has passed may expire now.
    pub(crate) fn may_expire(&self, ttl: Duration) -> bool {
        let since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        since.is_some_and(|mark| self.clock.since(mark) >= ttl)
    }
}

/// When the earliest lease deadline falls, as the last look for overdue leases read it, so that
/// a claim looks again only once one may be overdue. Read as "not before": a lease granted since has a later
/// deadline (now plus the TTL), and a lease finished or heartbeated since only moves the true
/// earliest later, so a check it prompts finds nothing. With no lease held, the earliest a new
/// one can fall due is one TTL on. (A replica configured with a shorter TTL than this one's has
/// its leases expired by its own claims.)
#[derive(Debug)]
pub(crate) struct NextDeadline {
    clock: Clock,
    /// When it was read, and how far ahead it was then; None until the first read.
    at: std::sync::Mutex<Option<(ClockMark, Duration)>>,
}

impl NextDeadline {
    pub(crate) fn new(clock: Clock) -> NextDeadline {
        NextDeadline {
            clock,
            at: std::sync::Mutex::new(None),
        }
    }

    /// Now, to pass to [`NextDeadline::read`] with what a statement begun after it read.
    pub(crate) fn mark(&self) -> ClockMark {
        self.clock.mark()
    }

    /// What a statement begun after `mark` read: the earliest deadline was `ahead` seconds on
    /// (negative: overdue; None: no lease held; then one `ttl` on).
    pub(crate) fn read(&self, mark: ClockMark, ahead: Option<f64>, ttl: Duration) {
        let ahead = ahead.map_or(ttl, |s| {
            Duration::from_secs_f64(s.clamp(0.0, ttl.as_secs_f64()))
        });
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Some((mark, ahead));
    }

    /// Whether a lease may be overdue now.
    pub(crate) fn due(&self) -> bool {
        let at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        at.is_none_or(|(mark, ahead)| self.clock.since(mark) >= ahead)
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates the sweep and its seeds (pending), [`LOAD_BATCH`] seeds a transaction so that a
    /// big submission never holds the database for long. The sweep is hidden from claims and
    /// listings until its last seed is in; a load that fails part-way is deleted.
    async fn create_sweep(&self, id: SweepId, spec: &SweepSpec) -> Result<()> {
        let seeds = spec.seeds.as_slice();
        let (first, rest) = seeds.split_at(seeds.len().min(LOAD_BATCH));
        self.begin_sweep(id, spec, first).await?;
        let loaded = async {
            for batch in rest.chunks(LOAD_BATCH) {
                self.load_seeds(id, &spec.design, batch, false).await?;
            }
            self.end_loading(id).await
        };
        if let Err(e) = loaded.await {
            if let Err(cleanup) = self.discard_load(id).await {
                tracing::warn!(sweep = %id, error = %cleanup, "could not delete a sweep whose seeds did not all load; the next submission deletes it");
            }
            return Err(e);
        }
        Ok(())
    }
    /// Inserts a sweep, hidden while loading, with the first batch of its seeds; first deletes
    /// loads abandoned [`ABANDONED_LOAD`] ago.
    async fn begin_sweep(&self, id: SweepId, spec: &SweepSpec, first: &[i64]) -> Result<()>;
    /// Inserts one batch of a sweep's seeds (those it does not have yet) in one transaction;
    /// `grow`: count them into `total_seeds` (an extension), refusing past [`MAX_SEEDS`] or
    /// when the sweep is cancelled. Returns how many were new.
    ///
    /// [`MAX_SEEDS`]: seedsweep_core::spec::MAX_SEEDS
    async fn load_seeds(
        &self,
        id: SweepId,
        design: &Design,
        seeds: &[i64],
        grow: bool,
    ) -> Result<u64>;
    /// Shows a loaded sweep to claims and listings.
    async fn end_loading(&self, id: SweepId) -> Result<()>;
    /// Deletes a sweep that is still loading.
    async fn discard_load(&self, id: SweepId) -> Result<()>;
    async fn list_sweeps(&self) -> Result<Vec<SweepSummary>>;
    /// The sweep's resolved settings as stored (`sweeps.config`, JSON).
    async fn sweep_config(&self, id: SweepId) -> Result<String>;
    /// What each run of the sweep reports (epochs, optional metrics), from its settings.
    async fn run_shape(&self, id: SweepId) -> Result<policy::RunShape> {
        let config = lease_config(&self.sweep_config(id).await?)?;
        Ok(policy::RunShape::of(
            &config.train,
            config.finetune.as_ref(),
            config.command.as_ref(),
        ))
    }
    async fn sweep_progress(&self, id: SweepId) -> Result<SweepProgress>;
    /// Up to `limit` results after seed `after` (from the first when None), in seed order.
    async fn list_results(
        &self,
        id: SweepId,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SeedResult>>;
    /// A seed's state and its newest [`HISTORY`] attempts, oldest first.
    async fn seed_history(&self, id: SweepId, seed: i64) -> Result<SeedHistory>;
    /// The live aggregate of each metric the sweep's results have (the `aggregates` table, with
    /// what is queued folded in first).
    async fn aggregates(&self, id: SweepId) -> Result<Vec<Aggregate>>;
    /// The finished seeds' values of `metric` (results without it left out), in the order they
    /// were recorded, only those recorded after position `after` (0: all); with the position
    /// of the last one (`after` when there are none).
    async fn scores(&self, id: SweepId, metric: Metric, after: i64) -> Result<(Vec<Scored>, i64)>;
    /// All of them, in any order (for readers that sort them anyway).
    async fn all_scores(&self, id: SweepId, metric: Metric) -> Result<Vec<Scored>> {
        Ok(self.scores(id, metric, 0).await?.0)
    }
    /// What became of the sweep's seeds: converged, diverged (each with `metric` at its last
    /// finite epoch), failed (by cause).
    async fn outcomes(&self, id: SweepId, metric: Metric) -> Result<Outcomes>;
    /// Every epoch row of the sweep, by seed and epoch.
    /// Up to `limit` epoch rows after `(seed, epoch)` `after` (from the first when None), in
    /// (seed, epoch) order.
    async fn list_epochs(
        &self,
        id: SweepId,
        after: Option<(i64, u32)>,
        limit: u32,
    ) -> Result<Vec<(i64, EpochRecord)>>;
    /// The per-example correctness bitmaps of the sweep's results that have one, by seed.
    async fn correctness(&self, id: SweepId) -> Result<Vec<(i64, Correctness)>>;
    /// The sweep's test-set tallies (what the test-set statistics read instead of every
    /// bitmap), one per test-set size its results' bitmaps cover, with every recorded bitmap
    /// folded in first ([`Store::fold_tallies`]).
    async fn test_sets(&self, id: SweepId) -> Result<Vec<TestSetTally>> {
        self.fold_tallies(id).await?;
        self.folded_test_sets(id).await
    }
    /// The tallies as they stand, without folding.
    async fn folded_test_sets(&self, id: SweepId) -> Result<Vec<TestSetTally>>;
    /// Adds what was recorded since the last fold to the sweep's tallies in one transaction,
    /// each result exactly once (folds of a sweep take turns, on every replica): the bitmaps
    /// queued in `test_sets_unfolded` to its test-set tallies and, on PostgreSQL, the results
    /// queued in `aggregates_unfolded` to its aggregates and epoch counts (SQLite updates those
    /// as it records each result); returns how many bitmaps.
    async fn fold_tallies(&self, id: SweepId) -> Result<u64>;
    /// The sweeps with bitmaps or results waiting to be folded.
    async fn unfolded_sweeps(&self) -> Result<Vec<SweepId>>;
    /// `(seed, epoch, value)` of `metric` for every epoch of every finished seed that has it,
    /// by seed and epoch (a seed that ran out of attempts keeps its partial curve in
    /// `epoch_metrics`, but is not a finished seed).
    /// Of these seeds only, when `seeds` names them.
    async fn epoch_scores(
        &self,
        id: SweepId,
        metric: Metric,
        seeds: Option<&[i64]>,
    ) -> Result<Vec<(i64, u32, f64)>>;
    /// `(epoch, value, count)` of a [`Metric::counted`] metric over the finished seeds, by epoch
    /// and value (the `epoch_values` table).
    async fn epoch_values(&self, id: SweepId, metric: Metric) -> Result<Vec<(u32, f64, u64)>>;
    /// The spread of `metric` across the finished seeds at each epoch: from the live counts for
    /// the accuracies, else from a scan ([`Store::epoch_spread_scan`]).
    async fn epoch_spread(&self, id: SweepId, metric: Metric) -> Result<Vec<EpochSpread>> {
        if metric.counted() {
            let rows = self.epoch_values(id, metric).await?;
            return Ok(seedsweep_core::stats::describe::epoch_spread_counted(&rows));
        }
        self.epoch_spread_scan(id, metric).await
    }
    /// The spread from every epoch row. By default from [`Store::epoch_scores`]; PostgreSQL
    /// computes it where the rows are.
    async fn epoch_spread_scan(&self, id: SweepId, metric: Metric) -> Result<Vec<EpochSpread>> {
        let points: Vec<(u32, f64)> = self
            .epoch_scores(id, metric, None)
            .await?
            .into_iter()
            .map(|(_, e, v)| (e, v))
            .collect();
        Ok(seedsweep_core::stats::describe::epoch_spread(&points))
    }

    /// Whether the database answers (a trivial query).
    async fn ping(&self) -> Result<()>;
    /// Seed counts per state of the sweeps not cancelled, and leases expired so far.
    async fn fleet_counts(&self) -> Result<FleetCounts>;

    /// Expires overdue leases (once the store has had its database for one `ttl`: see
    /// [`Availability`]), then leases one seed of a sweep whose task is among `tasks` (empty:
    /// any) to `worker_id` for `ttl`. `Empty`'s outstanding seeds count only such sweeps'.
    async fn claim_for(
        &self,
        worker_id: &str,
        tasks: &[Task],
        ttl: Duration,
    ) -> Result<ClaimOutcome>;
    /// [`Store::claim_for`] any task.
    async fn claim(&self, worker_id: &str, ttl: Duration) -> Result<ClaimOutcome> {
        self.claim_for(worker_id, &[], ttl).await
    }
    /// Extends a held lease to `ttl` from now.
    async fn heartbeat(&self, lease: LeaseRef, ttl: Duration) -> Result<()>;
    /// Records (or, re-sent by the same lease, replaces) one epoch's metrics. A claim deletes the
    /// rows of the seed's earlier leases, so readers never see two leases' epochs mixed.
    async fn record_epoch(&self, lease: LeaseRef, epoch: &EpochRecord) -> Result<()> {
        let rows = [(lease, epoch.clone())];
        self.record_epochs(&rows).await?.pop().unwrap_or(Ok(()))
    }
    /// Records many leases' epoch rows in one transaction (one commit for all: the epoch rows
    /// of a whole fleet arrive faster than one commit each allows), each under the rule of
    /// [`Store::record_epoch`]; returns each row's verdict, in order. An error of the database
    /// itself fails them all.
    async fn record_epochs(&self, rows: &[(LeaseRef, EpochRecord)]) -> Result<Vec<Result<()>>>;
    /// Records the seed's result, once. The seed's epoch metrics for epochs 1..=result.epochs must
    /// have been recorded under the same lease, and the result's final metrics must be the last
    /// epoch's ([`policy::check_final_metrics`]; [`StoreError::Invalid`] when not).
    async fn complete(&self, lease: LeaseRef, result: &SeedResult) -> Result<CompleteOutcome>;
    /// Ends a lease without a result, charged to the seed or not ([`Charge`]); the rules of
    /// [`policy::after_attempt`] decide the seed's new state (pending or failed), which is
    /// returned. A counted failure whose cause an earlier attempt on another worker also failed
    /// with ends the seed at once ([`policy::AttemptEnd::FailedAsBefore`]).
    async fn fail(&self, lease: LeaseRef, cause: &str, charge: Charge) -> Result<SeedState>;
    /// Names where the attempt's output is on its worker (`attempts.log`).
    async fn note_log(&self, lease: LeaseRef, log: &str) -> Result<()>;
    /// The SHA-256 of `lease`'s key, as its claim stored it in its attempt row.
    async fn lease_key_hash(&self, lease: LeaseRef) -> Result<KeyHash>;

    /// Pauses, resumes or cancels a sweep. Cancelling ends every unfinished seed (held leases are
    /// refused at their next write) and is final.
    async fn set_sweep_state(&self, id: SweepId, state: SweepState) -> Result<()>;
    /// Adds seeds to a sweep; seeds it already has are left as they are. Returns how many were
    /// added. [`LOAD_BATCH`] seeds a transaction, each counted into the sweep's total as it
    /// commits: an extension that fails part-way keeps the batches that went in, and repeating
    /// it adds the rest. Refused up front when the sweep's seeds and those named could exceed
    /// [`MAX_SEEDS`](seedsweep_core::spec::MAX_SEEDS).
    async fn extend_sweep(&self, id: SweepId, seeds: &SeedSet) -> Result<u64> {
        let (design, total) = self.extendable(id).await?;
        let named = seeds.as_slice();
        policy::check_sweep_size(id, total, named.len() as u64)?;
        let mut added = 0;
        for batch in named.chunks(LOAD_BATCH) {
            added += self.load_seeds(id, &design, batch, true).await?;
        }
        Ok(added)
    }
    /// The design and seed count of a sweep that may take more seeds
    /// ([`policy::check_extendable`]).
    async fn extendable(&self, id: SweepId) -> Result<(Design, u64)>;
}

/// Seeds inserted per transaction when a sweep is created or extended: a few tens of
/// milliseconds of the database at a time, so leases and heartbeats go on meanwhile.
pub const LOAD_BATCH: usize = 5_000;

/// A sweep still loading whose last batch is this old was abandoned (its coordinator died).
pub(crate) const ABANDONED_LOAD: Duration = Duration::from_secs(600);

/// The store's notion of "now": the database clock plus an offset that tests advance to make
/// leases expire and backoffs pass without sleeping. Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The database clock as it is.
    pub fn database() -> Clock {
        Clock::default()
    }

    /// Moves this clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    pub fn offset_seconds(&self) -> f64 {
        self.offset_ms.load(Ordering::SeqCst) as f64 / 1000.0
    }

    /// Now, to measure time from with [`Clock::since`].
    pub(crate) fn mark(&self) -> ClockMark {
        ClockMark {
            at: std::time::Instant::now(),
            offset_ms: self.offset_ms.load(Ordering::SeqCst),
        }
    }

    /// How long ago `mark` was on this clock (monotonic time plus what the offset moved).
    pub(crate) fn since(&self, mark: ClockMark) -> Duration {
        let moved = self.offset_ms.load(Ordering::SeqCst) - mark.offset_ms;
        mark.at.elapsed() + Duration::from_millis(moved.max(0) as u64)
    }
}

/// An instant on a [`Clock`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockMark {
    at: std::time::Instant,
    offset_ms: i64,
}

/// Where a seed goes when `end` ends an attempt: [`policy::after_attempt`] with a uniform draw
/// in [0, 1) for the backoff's jitter.
pub(crate) fn next_state(
    end: policy::AttemptEnd,
    attempts: &policy::Attempts,
) -> policy::NextState {
    policy::after_attempt(end, attempts, rand::random::<f64>())
}

/// Opens the database a URL names and brings its schema up to date.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    connect_with_clock(url, Clock::database()).await
}

/// [`connect`] with a clock the caller controls (tests).
pub async fn connect_with_clock(url: &str, clock: Clock) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, clock).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, clock).await?))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// A URL fit for logs and error messages: the password, if any, replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest
        .split_once('/')
        .map_or((rest, None), |(a, t)| (a, Some(t)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    match tail {
        Some(t) => format!("{scheme}://{authority}/{t}"),
        None => format!("{scheme}://{authority}"),
    }
}

/// [`Store::fleet_counts`]' seed counts, the same in both dialects.
pub(crate) const FLEET_SEEDS: &str = "SELECT w.id AS sweep_id, w.name, s.state, count(*) AS n
     FROM sweeps w JOIN seeds s ON s.sweep_id = w.id
     WHERE w.state <> 'cancelled' AND w.loading_at IS NULL
     GROUP BY w.id, w.name, s.state
     ORDER BY w.id, s.state";

/// The most attempts [`Store::seed_history`] reads: the newest (a seed handed back at every
/// preemption may have many).
pub const HISTORY: i64 = 100;

/// An `attempts` row as both dialects read it: fence, worker_id, started_at, ended_at (ISO
/// text), outcome, cause, log.
pub(crate) type AttemptRow = (
    i64,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
);

/// [`Store::seed_history`] from the seed's state (None: no such seed) and its attempts, newest
/// first as read.
pub(crate) fn seed_history(
    id: SweepId,
    seed: i64,
    state: Option<String>,
    mut rows: Vec<AttemptRow>,
) -> Result<SeedHistory> {
    let state = state.ok_or(StoreError::SeedNotFound { sweep_id: id, seed })?;
    rows.reverse();
    let attempts = rows
        .into_iter()
        .map(
            |(fence, worker_id, started_at, ended_at, outcome, cause, log)| {
                Ok(Attempt {
                    fence,
                    worker_id,
                    started_at,
                    ended_at,
                    outcome: name_from_db("attempt outcome", &outcome, AttemptOutcome::parse)?,
                    cause,
                    log,
                })
            },
        )
        .collect::<Result<_>>()?;
    Ok(SeedHistory {
        state: state_from_db(&state)?,
        attempts,
    })
}

/// A closed set's name read back from the database; one this build does not know means a
/// corrupt row (or a database written by a newer coordinator).
pub(crate) fn name_from_db<T>(what: &str, s: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown {what} `{s}`")))
}

pub(crate) fn sweep_state_from_db(s: &str) -> Result<SweepState> {
    name_from_db("sweep state", s, SweepState::parse)
}

pub(crate) fn state_from_db(s: &str) -> Result<SeedState> {
    name_from_db("seed state", s, SeedState::parse)
}

pub(crate) fn task_from_db(s: &str) -> Result<Task> {
    name_from_db("task", s, Task::parse)
}

/// What a lease needs from a stored `sweeps.config`.
pub(crate) struct LeaseConfig {
    pub train: seedsweep_core::spec::TrainSettings,
    pub seed_namespace: String,
    pub finetune: Option<seedsweep_core::spec::finetune::FinetuneSpec>,
    pub command: Option<seedsweep_core::spec::command::CommandSpec>,
}

fn config_value(config: &str) -> Result<serde_json::Value> {
    serde_json::from_str(config).map_err(|e| StoreError::Corrupt(format!("sweep config: {e}")))
}

fn config_field<T: serde::de::DeserializeOwned>(value: &serde_json::Value, key: &str) -> Result<T> {
    serde_json::from_value(value[key].clone())
        .map_err(|e| StoreError::Corrupt(format!("sweep config `{key}`: {e}")))
}

pub(crate) fn lease_config(config: &str) -> Result<LeaseConfig> {
    let value = config_value(config)?;
    Ok(LeaseConfig {
        train: config_field(&value, "train")?,
        seed_namespace: config_field::<Option<String>>(&value, "seed_namespace")?
            .unwrap_or_default(),
        finetune: config_field(&value, "finetune")?,
        command: config_field::<Option<_>>(&value, "command")?,
    })
}

/// The design inside a stored `sweeps.config`.
pub(crate) fn design_from_config(config: &str) -> Result<seedsweep_core::design::Design> {
    config_field(&config_value(config)?, "design")
}

/// Each seed with its factor seeds under `design`, as the insert statements take them.
pub(crate) fn seed_rows(seeds: &[i64], design: &seedsweep_core::design::Design) -> Vec<[i64; 5]> {
    seeds
        .iter()
        .map(|&s| {
            let f = design.factors(s);
            [s, f.init, f.order, f.augment, f.split]
        })
        .collect()
}

/// The factor seeds in a `seeds` or `results` row (columns init_seed ... split_seed).
pub(crate) fn factors_from_row<'r, R>(row: &'r R) -> Result<seedsweep_core::design::FactorSeeds>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(seedsweep_core::design::FactorSeeds {
        init: row.try_get("init_seed")?,
        order: row.try_get("order_seed")?,
        augment: row.try_get("augment_seed")?,
        split: row.try_get("split_seed")?,
    })
}

/// How a dialect writes the statement parameter numbered `n`: the SQL built here for both stores
/// is written with these, never rewritten afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// The placeholders `1..=N`: `$n` for PostgreSQL, `?n` for SQLite.
    pub(crate) fn params<const N: usize>(self) -> [String; N] {
        std::array::from_fn(|i| match self {
            Dialect::Postgres => format!("${}", i + 1),
            Dialect::Sqlite => format!("?{}", i + 1),
        })
    }

    /// `metric`'s value in a row of `results` or `epoch_metrics` (`table`: its alias, or "").
    /// Safe to splice into SQL: a known metric is a column from the Metric enum, a custom
    /// metric's name was checked to be lower-case letters, digits and `_` (metric::check_name).
    pub(crate) fn value(self, metric: Metric, table: &str) -> String {
        let dot = if table.is_empty() { "" } else { "." };
        match (metric.column(), self) {
            (Some(col), _) => format!("{table}{dot}{col}"),
            (None, Dialect::Postgres) => format!("({table}{dot}custom->>'{metric}')::float8"),
            (None, Dialect::Sqlite) => format!("json_extract({table}{dot}custom, '$.{metric}')"),
        }
    }
}

/// The tasks a claim may serve, as the stores bind them: NULL for any, else their names.
pub(crate) fn task_names(tasks: &[Task]) -> Option<Vec<&'static str>> {
    (!tasks.is_empty()).then(|| tasks.iter().map(|t| t.as_str()).collect())
}

/// A new sweep's `score` and `score_direction` columns, from its settings.
pub(crate) fn score_columns(spec: &seedsweep_core::spec::SweepSpec) -> (String, &'static str) {
    let shape = policy::RunShape::of(&spec.train, spec.finetune.as_ref(), spec.command.as_ref());
    (shape.score.to_string(), shape.direction.as_str())
}

/// Every metric a result has, by name: what its recording adds to the sweep's aggregates.
pub(crate) fn result_values(r: &SeedResult) -> Vec<(&str, f64)> {
    let known = Metric::ALL
        .iter()
        .filter_map(|m| Some((m.column()?, m.of(r)?)));
    known
        .chain(r.custom.iter().map(|(name, v)| (name.as_str(), *v)))
        .collect()
}

/// A row's custom metrics as the `custom` column stores them: a JSON object, NULL when none.
/// What the store holds of a lease's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHash {
    /// No lease of that fence was ever granted.
    NoLease,
    /// Granted before leases had keys (migration 0009 on SQLite, 0013 on PostgreSQL): its writes
    /// are checked by the fence alone.
    Unkeyed,
    Hash([u8; 32]),
}

impl KeyHash {
    pub(crate) fn from_db(row: Option<Option<Vec<u8>>>) -> Result<KeyHash> {
        match row {
            None => Ok(KeyHash::NoLease),
            Some(None) => Ok(KeyHash::Unkeyed),
            Some(Some(bytes)) => bytes.try_into().map(KeyHash::Hash).map_err(|b: Vec<u8>| {
                StoreError::Corrupt(format!(
                    "attempts.lease_key_hash holds {} bytes, not 32",
                    b.len()
                ))
            }),
        }
    }
}

/// The SHA-256 of a lease's key: what the store keeps of it.
pub fn key_hash(key: &seedsweep_core::domain::LeaseKey) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.0).into()
}

pub(crate) fn custom_to_db(custom: &CustomMetrics) -> Option<String> {
    // A map of names to finite numbers always serialises.
    (!custom.is_empty()).then(|| serde_json::to_string(custom).unwrap_or_default())
}

/// The `custom` column read back (selected as text).
pub(crate) fn custom_from_db(text: Option<String>) -> Result<CustomMetrics> {
    match text {
        None => Ok(CustomMetrics::new()),
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| StoreError::Corrupt(format!("custom metrics {t:?}: {e}"))),
    }
}

/// Adds one result's value to a metric's running aggregate (Welford's update in SQL, so that
/// concurrent recorders serialise on the row). Parameters: sweep, metric, value, seed.
pub(crate) fn aggregate_upsert(d: Dialect) -> String {
    let [sweep, metric, value, seed] = d.params();
    format!(
        "INSERT INTO aggregates (sweep_id, metric, n, mean, m2, min, min_seed, max, max_seed)
         VALUES ({sweep}, {metric}, 1, {value}, 0, {value}, {seed}, {value}, {seed}) {AGGREGATE_MERGE}"
    )
}

/// Adds the results of sweep `$1` whose seeds are in `$2` (`bigint[]`) to its aggregates, every
/// metric they have (custom ones too) in one statement (PostgreSQL; a fold of queued results).
pub(crate) fn aggregate_fold() -> String {
    let known: Vec<String> = Metric::ALL
        .iter()
        .filter_map(|m| m.column())
        .map(|c| format!("('{c}', r.{c})"))
        .collect();
    format!(
        "WITH v AS (
             SELECT r.seed, m.metric, m.value FROM results r
             CROSS JOIN LATERAL (VALUES {}) AS m (metric, value)
             WHERE r.sweep_id = $1 AND r.seed = ANY($2) AND m.value IS NOT NULL
             UNION ALL
             SELECT r.seed, c.key, c.value::float8 FROM results r
             CROSS JOIN LATERAL jsonb_each_text(r.custom) AS c
             WHERE r.sweep_id = $1 AND r.seed = ANY($2))
         INSERT INTO aggregates (sweep_id, metric, n, mean, m2, min, min_seed, max, max_seed)
         SELECT $1, metric, count(*), avg(value), coalesce(var_pop(value), 0) * count(*),
                min(value), (array_agg(seed ORDER BY value, seed))[1],
                max(value), (array_agg(seed ORDER BY value DESC, seed))[1]
         FROM v GROUP BY metric ORDER BY metric
         {AGGREGATE_MERGE}",
        known.join(", ")
    )
}

/// Merges the aggregate row `excluded` (one result, n = 1 and m2 = 0, or a batch) into the
/// stored one (Chan et al.'s pairwise update of the moments; the extremes with their seeds, the
/// smaller seed on ties).
const AGGREGATE_MERGE: &str = "
ON CONFLICT (sweep_id, metric) DO UPDATE SET
  n = aggregates.n + excluded.n,
  mean = aggregates.mean + (excluded.mean - aggregates.mean) * excluded.n / (aggregates.n + excluded.n),
  m2 = aggregates.m2 + excluded.m2 + (excluded.mean - aggregates.mean) * (excluded.mean - aggregates.mean)
       * aggregates.n * excluded.n / (aggregates.n + excluded.n),
  min_seed = CASE WHEN excluded.min < aggregates.min
                    OR (excluded.min = aggregates.min AND excluded.min_seed < aggregates.min_seed)
             THEN excluded.min_seed ELSE aggregates.min_seed END,
  min = CASE WHEN excluded.min < aggregates.min THEN excluded.min ELSE aggregates.min END,
  max_seed = CASE WHEN excluded.max > aggregates.max
                    OR (excluded.max = aggregates.max AND excluded.max_seed < aggregates.max_seed)
             THEN excluded.max_seed ELSE aggregates.max_seed END,
  max = CASE WHEN excluded.max > aggregates.max THEN excluded.max ELSE aggregates.max END";

pub(crate) const AGGREGATE_COLUMNS: &str = "metric, n, mean, m2, min, min_seed, max, max_seed";

pub(crate) fn aggregate_from_row<'r, R>(row: &'r R) -> Result<Option<Aggregate>>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let name: String = row.try_get("metric")?;
    // A metric this build does not know (written by a newer one) is left out.
    let Ok(metric) = name.parse::<Metric>() else {
        return Ok(None);
    };
    Ok(Some(Aggregate {
        metric,
        moments: seedsweep_core::stats::Moments {
            n: u64_from_db(row.try_get("n")?),
            mean: row.try_get("mean")?,
            m2: row.try_get("m2")?,
        },
        min: row.try_get("min")?,
        min_seed: row.try_get("min_seed")?,
        max: row.try_get("max")?,
        max_seed: row.try_get("max_seed")?,
    }))
}

/// The columns of a `test_sets` row, in [`test_set_upsert`]'s parameter order after the sweep.
pub(crate) const TEST_SET_COLUMNS: &str =
    "examples, runs, hits, hits_sq, even_hits, even_sq, odd_hits, odd_sq, even_odd, wrong";

/// Writes a sweep's tally for one test-set size, whole. Parameters: sweep, then
/// [`TEST_SET_COLUMNS`]; bound by [`bind_test_set`].
pub(crate) fn test_set_upsert(d: Dialect) -> String {
    let p: [String; 11] = d.params();
    let values = p.join(", ");
    format!(
        "INSERT INTO test_sets (sweep_id, {TEST_SET_COLUMNS}) VALUES ({values})
         ON CONFLICT (sweep_id, examples) DO UPDATE SET runs = excluded.runs, hits = excluded.hits,
           hits_sq = excluded.hits_sq, even_hits = excluded.even_hits, even_sq = excluded.even_sq,
           odd_hits = excluded.odd_hits, odd_sq = excluded.odd_sq, even_odd = excluded.even_odd,
           wrong = excluded.wrong"
    )
}

/// Binds [`test_set_upsert`]'s parameters after the sweep's.
pub(crate) fn bind_test_set<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    t: &TestSetTally,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let s = t.sums;
    q.bind(i64::from(t.examples))
        .bind(s.runs)
        .bind(s.right)
        .bind(s.right_sq)
        .bind(s.even)
        .bind(s.even_sq)
        .bind(s.odd)
        .bind(s.odd_sq)
        .bind(s.even_odd)
        .bind(t.wrong_bytes())
}

pub(crate) fn test_set_from_row<'r, R>(row: &'r R) -> Result<TestSetTally>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let examples = u32::try_from(row.try_get::<i64, _>("examples")?)
        .map_err(|_| StoreError::Corrupt("a test_sets row has a negative `examples`".into()))?;
    let sums = HitSums {
        runs: row.try_get("runs")?,
        right: row.try_get("hits")?,
        right_sq: row.try_get("hits_sq")?,
        even: row.try_get("even_hits")?,
        even_sq: row.try_get("even_sq")?,
        odd: row.try_get("odd_hits")?,
        odd_sq: row.try_get("odd_sq")?,
        even_odd: row.try_get("even_odd")?,
    };
    let wrong: Vec<u8> = row.try_get("wrong")?;
    TestSetTally::from_stored(examples, &wrong, sums).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "the test_sets row of {examples} examples holds {} bytes of error counts",
            wrong.len()
        ))
    })
}

/// `(seed, bitmap)` from a row of `seed, test_examples, test_correct`.
pub(crate) fn bitmap_from_row<'r, R>(row: &'r R) -> Result<(i64, Correctness)>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let examples = row.try_get::<i64, _>("test_examples")?;
    Ok((
        row.try_get("seed")?,
        Correctness {
            examples: u32::try_from(examples).map_err(|_| {
                StoreError::Corrupt(format!("a result has {examples} test examples"))
            })?,
            bits: row.try_get("test_correct")?,
        },
    ))
}

/// A sweep's test-set tallies with bitmaps added one at a time, one per test-set size (a fold:
/// memory bounded by the tallies, however many bitmaps stream past).
#[derive(Default)]
pub(crate) struct Tallies(std::collections::BTreeMap<u32, TestSetTally>);

impl Tallies {
    /// The tallies a fold starts from: those stored.
    pub(crate) fn from_stored(stored: Vec<TestSetTally>) -> Tallies {
        Tallies(stored.into_iter().map(|t| (t.examples, t)).collect())
    }

    pub(crate) fn add(&mut self, c: &Correctness) {
        self.0
            .entry(c.examples)
            .or_insert_with(|| TestSetTally::new(c.examples))
            .add(&c.bits);
    }

    pub(crate) fn into_vec(self) -> Vec<TestSetTally> {
        self.0.into_values().collect()
    }
}

/// The SELECT of [`Store::scores`] for `metric`, with `seq` the recording position's expression.
/// Parameters: sweep, the position after which to read.
pub(crate) fn scores_sql(d: Dialect, metric: Metric, seq: &str) -> String {
    let col = d.value(metric, "");
    let [sweep, after] = d.params();
    format!(
        "SELECT seed, init_seed, order_seed, augment_seed, split_seed, {col} AS value, {seq} AS seq
         FROM results WHERE sweep_id = {sweep} AND {seq} > {after} AND {col} IS NOT NULL ORDER BY {seq}"
    )
}

/// The sweep's diverged seeds, each with `metric` at its last finite epoch. Parameter: sweep.
pub(crate) fn diverged_sql(d: Dialect, metric: Metric) -> String {
    let col = d.value(metric, "e");
    let [sweep] = d.params();
    format!(
        "SELECT d.seed, d.epoch, d.epochs, {col} AS last_value FROM divergences d
         LEFT JOIN epoch_metrics e ON e.sweep_id = d.sweep_id AND e.seed = d.seed
                                  AND e.fence = d.fence AND e.epoch = d.epochs
         WHERE d.sweep_id = {sweep}"
    )
}

/// The sweep's failed seeds counted by their last attempt's cause, and its converged seeds
/// (the cause NULL). Parameter: sweep.
pub(crate) fn outcome_counts_sql(d: Dialect) -> String {
    let [sweep] = d.params();
    format!(
        "SELECT coalesce(a.cause, 'no cause recorded') AS cause, count(*) AS seeds FROM seeds s
         LEFT JOIN attempts a ON a.sweep_id = s.sweep_id AND a.seed = s.seed AND a.fence = s.fence
         WHERE s.sweep_id = {sweep} AND s.state = 'failed' GROUP BY 1
         UNION ALL
         SELECT NULL, count(*) FROM results WHERE sweep_id = {sweep}"
    )
}

/// The outcomes from the rows of [`diverged_sql`] and [`outcome_counts_sql`].
pub(crate) fn outcomes_from_rows<'r, R>(diverged: &'r [R], counts: &'r [R]) -> Result<Outcomes>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut seeds = Vec::with_capacity(diverged.len());
    for row in diverged {
        seeds.push(DivergedSeed {
            seed: row.try_get("seed")?,
            epoch: row.try_get::<i32, _>("epoch")?.max(0) as u32,
            epochs: row.try_get::<i32, _>("epochs")?.max(0) as u32,
            last_value: row.try_get("last_value")?,
        });
    }
    let (mut converged, mut causes) = (0, Vec::new());
    for row in counts {
        let n = u64_from_db(row.try_get("seeds")?);
        match row.try_get::<Option<String>, _>("cause")? {
            None => converged = n,
            Some(cause) => causes.push(FailureCause { cause, seeds: n }),
        }
    }
    Ok(Outcomes::new(converged, seeds, causes))
}

/// The join that keeps the epoch rows of finished seeds (`e`: epoch_metrics, `r`: results).
pub(crate) const FINISHED_EPOCHS: &str =
    "JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs";

/// Every finished seed's epoch values of `metric`. Parameter: sweep.
pub(crate) fn epoch_scores_sql(d: Dialect, metric: Metric, only_some: bool) -> String {
    let col = d.value(metric, "e");
    let [sweep, seeds] = d.params();
    // The second parameter: the seeds wanted, as a JSON array (SQLite) or a bigint[].
    let which = match (only_some, d) {
        (false, _) => String::new(),
        (true, Dialect::Sqlite) => format!("AND e.seed IN (SELECT value FROM json_each({seeds}))"),
        (true, Dialect::Postgres) => format!("AND e.seed = ANY({seeds})"),
    };
    format!(
        "SELECT e.seed, e.epoch, {col} AS value FROM epoch_metrics e {FINISHED_EPOCHS}
         WHERE e.sweep_id = {sweep} AND {col} IS NOT NULL {which} ORDER BY e.seed, e.epoch"
    )
}

/// One `epoch_scores_sql` row: (seed, epoch, value).
pub(crate) fn epoch_score_from_row<'r, R>(row: &'r R) -> Result<(i64, u32, f64)>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        row.try_get("seed")?,
        row.try_get::<i32, _>("epoch")?.max(0) as u32,
        row.try_get("value")?,
    ))
}

/// One `EPOCH_VALUES` row: (epoch, value, count).
pub(crate) fn epoch_value_from_row<'r, R>(row: &'r R) -> Result<(u32, f64, u64)>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        row.try_get::<i32, _>("epoch")?.max(0) as u32,
        row.try_get("value")?,
        u64_from_db(row.try_get("n")?),
    ))
}

/// Reads `epoch_values` for one sweep (`$1`) and metric (`$2`).
pub(crate) fn epoch_values_sql(d: Dialect) -> String {
    let [sweep, metric] = d.params();
    format!(
        "SELECT epoch, value, n FROM epoch_values
     WHERE sweep_id = {sweep} AND metric = {metric} ORDER BY epoch, value"
    )
}

/// Counts a finished seed's epoch values of the counted metrics into `epoch_values`, in the
/// result's transaction (SQLite). Parameters: sweep, seed, epochs. Rows are taken in key order so
/// that concurrent completions lock shared rows in the same order.
pub(crate) fn epoch_values_upsert(d: Dialect) -> String {
    let [sweep, seed, epochs] = d.params();
    epoch_values_add(&format!(
        "WHERE e.sweep_id = {sweep} AND e.seed = {seed} AND e.epoch <= {epochs}"
    ))
}

/// Counts the epoch values of sweep `$1`'s finished seeds in `$2` (`bigint[]`) into
/// `epoch_values` (PostgreSQL; a fold of queued results). The seeds are picked out by their
/// results, so a fold reads its batch's rows, however many results the sweep has.
pub(crate) fn epoch_values_fold() -> String {
    epoch_values_add(&format!(
        "{FINISHED_EPOCHS} WHERE r.sweep_id = $1 AND r.seed = ANY($2)"
    ))
}

/// Adds the counted metrics' values of the epoch rows `e` that `pick` picks (joins and a WHERE
/// clause after `FROM epoch_metrics e`) to `epoch_values`, reading each row once.
fn epoch_values_add(pick: &str) -> String {
    let counted: Vec<&str> = Metric::ALL
        .into_iter()
        .filter(|m| m.counted())
        .filter_map(|m| m.column())
        .collect();
    let names = counted
        .iter()
        .map(|c| format!("SELECT '{c}' AS metric"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let value = counted
        .iter()
        .map(|c| format!("WHEN '{c}' THEN e.{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let select = format!(
        "SELECT e.sweep_id, k.metric, e.epoch, CASE k.metric {value} END AS value
         FROM epoch_metrics e CROSS JOIN ({names}) k {pick}"
    );
    format!(
        "INSERT INTO epoch_values (sweep_id, metric, epoch, value, n)
         SELECT sweep_id, metric, epoch, value, count(*) FROM ({select}) m
         WHERE value IS NOT NULL GROUP BY sweep_id, metric, epoch, value ORDER BY metric, epoch, value
         ON CONFLICT (sweep_id, metric, epoch, value) DO UPDATE SET n = epoch_values.n + excluded.n"
    )
}

/// How a re-sent epoch row replaces the recorded one: only under the same or a newer lease.
pub(crate) const EPOCH_UPSERT: &str = "ON CONFLICT (sweep_id, seed, epoch) DO UPDATE SET
    fence = excluded.fence, train_loss = excluded.train_loss,
    train_accuracy = excluded.train_accuracy, test_loss = excluded.test_loss,
    test_accuracy = excluded.test_accuracy, lr = excluded.lr, seconds = excluded.seconds,
    recorded_at = excluded.recorded_at, test_top5 = excluded.test_top5,
    val_loss = excluded.val_loss, val_accuracy = excluded.val_accuracy, custom = excluded.custom
  WHERE epoch_metrics.fence <= excluded.fence";

pub(crate) const EPOCH_COLUMNS: &str = "seed, epoch, train_loss, train_accuracy, test_loss,
    test_accuracy, test_top5, val_loss, val_accuracy, lr, seconds, CAST(custom AS TEXT) AS custom";

pub(crate) fn epoch_from_row<'r, R>(row: &'r R) -> Result<(i64, EpochRecord)>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        row.try_get("seed")?,
        EpochRecord {
            epoch: row.try_get::<i32, _>("epoch")?.max(0) as u32,
            train_loss: row.try_get("train_loss")?,
            train_accuracy: row.try_get("train_accuracy")?,
            test_loss: row.try_get("test_loss")?,
            test_accuracy: row.try_get("test_accuracy")?,
            test_top5: row.try_get("test_top5")?,
            val_loss: row.try_get("val_loss")?,
            val_accuracy: row.try_get("val_accuracy")?,
            lr: row.try_get("lr")?,
            seconds: row.try_get("seconds")?,
            custom: custom_from_db(row.try_get("custom")?)?,
        },
    ))
}

/// A `results` row, as `list_results` selects it, without its correctness bitmap.
pub(crate) fn result_from_row<'r, R>(r: &'r R) -> Result<SeedResult>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(SeedResult {
        seed: r.try_get("seed")?,
        test_accuracy: r.try_get("test_accuracy")?,
        test_loss: r.try_get("test_loss")?,
        train_loss: r.try_get("train_loss")?,
        train_accuracy: r.try_get("train_accuracy")?,
        epochs: r.try_get::<i32, _>("epochs")?.max(0) as u32,
        diverged_epoch: None,
        seconds: r.try_get("seconds")?,
        worker_id: r.try_get("worker_id")?,
        device: r.try_get("device")?,
        data_fingerprint: r.try_get("data_fingerprint")?,
        finished_at: r.try_get("finished_at")?,
        precision: name_from_db(
            "precision",
            &r.try_get::<String, _>("precision")?,
            Precision::parse,
        )?,
        deterministic: r.try_get("deterministic")?,
        test_top5: r.try_get("test_top5")?,
        val_loss: r.try_get("val_loss")?,
        val_accuracy: r.try_get("val_accuracy")?,
        custom: custom_from_db(r.try_get("custom")?)?,
        factors: Some(factors_from_row(r)?),
        test_correct: None,
    })
}

pub(crate) fn scored_from_row<'r, R>(row: &'r R) -> Result<Scored>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Scored {
        seed: row.try_get("seed")?,
        factors: [
            row.try_get("init_seed")?,
            row.try_get("order_seed")?,
            row.try_get("augment_seed")?,
            row.try_get("split_seed")?,
        ],
        value: row.try_get("value")?,
    })
}

pub(crate) fn u64_from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn no_lease_expires_until_the_database_has_answered_for_one_ttl() {
        let clock = Clock::database();
        let available = Availability::new(clock.clone());
        assert!(!available.may_expire(TTL), "just connected");
        clock.advance(TTL);
        assert!(available.may_expire(TTL));
        // Busy is not away: a serialisation conflict does not start an outage.
        let busy: Result<()> = Err(StoreError::Conflict("busy".into()));
        assert!(available.observe(busy).is_err());
        assert!(available.may_expire(TTL));
        // Away for ten TTLs, then back: the grace counts from the first answer.
        let away: Result<()> = Err(StoreError::Database(sqlx::Error::PoolTimedOut));
        assert!(available.observe(away).is_err());
        clock.advance(TTL * 10);
        assert!(!available.may_expire(TTL), "the outage counted as service");
        available.observe(Ok(())).unwrap();
        clock.advance(TTL - Duration::from_secs(1));
        assert!(!available.may_expire(TTL), "inside the grace");
        clock.advance(Duration::from_secs(1));
        assert!(available.may_expire(TTL));
    }

    #[test]
    fn leases_are_looked_at_for_expiry_once_the_earliest_deadline_passes() {
        let clock = Clock::database();
        let next = NextDeadline::new(clock.clone());
        assert!(next.due(), "nothing read yet");
        next.read(next.mark(), Some(30.0), TTL);
        assert!(!next.due());
        clock.advance(Duration::from_secs(30));
        assert!(next.due());
        // No lease held: none can fall due within a TTL.
        next.read(next.mark(), None, TTL);
        clock.advance(TTL - Duration::from_secs(1));
        assert!(!next.due());
        clock.advance(Duration::from_secs(1));
        assert!(next.due());
        // Already overdue.
        next.read(next.mark(), Some(-5.0), TTL);
        assert!(next.due());
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://seedsweep.db"), "sqlite://seedsweep.db");
    }
}
