//! The PostgreSQL store: many workers, any number of coordinators over one database. Claims use
//! `FOR UPDATE SKIP LOCKED`, so concurrent coordinators never lease one seed twice; every fenced
//! write locks the seed's row first, so it cannot interleave with a re-lease. Time is the
//! database's `now()` plus the clock's offset (bound as `$n` seconds in each statement).

mod connections;

use super::{
    ABANDONED_LOAD, AGGREGATE_COLUMNS, Availability, Clock, Dialect, EPOCH_COLUMNS, EPOCH_UPSERT,
    FINISHED_EPOCHS, FLEET_SEEDS, KeyHash, NextDeadline, Result, Store, StoreError,
    TEST_SET_COLUMNS, Tallies, aggregate_fold, aggregate_from_row, bind_test_set, bitmap_from_row,
    custom_to_db, design_from_config, diverged_sql, epoch_from_row, epoch_score_from_row,
    epoch_scores_sql, epoch_value_from_row, epoch_values_fold, epoch_values_sql, factors_from_row,
    key_hash, lease_config, next_state, outcome_counts_sql, outcomes_from_rows, result_from_row,
    scores_sql, seed_rows, state_from_db, sweep_state_from_db, task_from_db, test_set_from_row,
    test_set_upsert, u64_from_db,
};
use async_trait::async_trait;
use connections::Connections;
use seedsweep_core::design::Design;
use seedsweep_core::domain::{
    Aggregate, ClaimOutcome, CompleteOutcome, Correctness, EpochRecord, FleetCounts, Lease,
    LeaseKey, LeaseRef, Metric, Scored, SeedCounts, SeedHistory, SeedResult, SeedState, SweepId,
    SweepProgress, SweepState, SweepSummary,
};
use seedsweep_core::policy::{
    self, AttemptEnd, Attempts, Charge, Completion, EXPIRED_CAUSE, RetrySettings,
};
use seedsweep_core::spec::{SweepSpec, Task};
use seedsweep_core::stats::noise::TestSetTally;
use seedsweep_core::stats::outcomes::Outcomes;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;
use tokio_stream::StreamExt;

/// The completion's upserts in this dialect, built once.
/// A completion's updates of the rows every recorder of the sweep shares: each metric's
/// aggregate and the counts of each epoch's accuracies. Parameters: sweep, seed, epochs, the
/// metrics' names and their values.
static AGGREGATE_FOLD: LazyLock<String> = LazyLock::new(aggregate_fold);
static EPOCH_VALUES_FOLD: LazyLock<String> = LazyLock::new(epoch_values_fold);
static TEST_SET_UPSERT: LazyLock<String> = LazyLock::new(|| test_set_upsert(Dialect::Postgres));

/// Renders a timestamptz column as UTC ISO 8601, the format both stores report.
macro_rules! iso {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

const SUMMARY: &str = concat!(
    "SELECT w.id, w.name, w.task, w.dataset, ",
    iso!("w.created_at"),
    " AS created_at, w.state, w.priority, w.total_seeds,
        (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
     FROM sweeps w WHERE w.loading_at IS NULL"
);

/// How long a statement waits for a connection (the pool's, or one of [`Connections`]) before it
/// is an outage.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PgStore {
    pool: PgPool,
    /// The lease cycle's statements: claim, heartbeat, completion.
    cycle: Connections,
    /// Where [`Store::record_epochs`] writes (the service's one epoch writer), planning its
    /// statement once, generically: left to choose, PostgreSQL plans a batch of a few rows afresh
    /// each time (about 0.4 ms, more than the batch takes to run).
    epochs: Connections,
    clock: Clock,
    available: Availability,
    next_deadline: NextDeadline,
    last_epochs: LastEpochs,
}

/// The last epoch row this replica wrote under each lease lately, with the row version it got:
/// a completion whose last epoch is here is judged by the policy without reading the row back,
/// and its write goes ahead only while the database still holds that version
/// ([`PgStore::record_result`]). Anything else (a miss, a refusal, a write that did not happen)
/// is judged from the database as before. At most [`LastEpochs::KEEP`] leases: when full it
/// starts over.
#[derive(Default)]
struct LastEpochs {
    rows: std::sync::Mutex<Kept>,
}

/// Per lease (sweep, seed, fence): the last epoch row's version and the row.
type Kept = HashMap<(uuid::Uuid, i64, i64), (String, EpochRecord)>;

impl LastEpochs {
    const KEEP: usize = 16_384;

    fn key(lease: LeaseRef) -> (uuid::Uuid, i64, i64) {
        (lease.sweep_id.0, lease.seed, lease.fence)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `record`, written under `lease` as row `version`, unless a later epoch is kept (a
    /// replayed earlier epoch leaves the last one's row as it was).
    fn wrote(&self, lease: LeaseRef, version: String, record: &EpochRecord) {
        let mut rows = self.lock();
        if rows.len() >= Self::KEEP {
            rows.clear();
        }
        let key = Self::key(lease);
        if rows
            .get(&key)
            .is_none_or(|(_, kept)| kept.epoch <= record.epoch)
        {
            rows.insert(key, (version, record.clone()));
        }
    }

    /// The version of the last epoch's row of `r` if this replica wrote it and the policy
    /// accepts `r`'s final metrics as that row's; taken out of the cache.
    fn judged(&self, lease: LeaseRef, r: &SeedResult) -> Option<String> {
        let (version, last) = self.lock().remove(&Self::key(lease))?;
        let accepted =
            last.epoch == r.epochs && policy::check_final_metrics(r, Some(&last)).is_ok();
        accepted.then_some(version)
    }
}

impl PgStore {
    pub async fn connect(url: &str, clock: Clock) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name("seedsweep-coordinator");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let cycle = Connections::new(options.clone(), 16, None);
        let epochs = Connections::new(options, 1, Some("SET plan_cache_mode = force_generic_plan"));
        super::migrations::migrator(super::migrations::POSTGRES)
            .run(&pool)
            .await?;
        let store = PgStore {
            pool,
            cycle,
            epochs,
            available: Availability::new(clock.clone()),
            next_deadline: NextDeadline::new(clock.clone()),
            clock,
            last_epochs: LastEpochs::default(),
        };
        Ok(store)
    }

    /// The clock offset in seconds, bound wherever a statement says `now() + make_interval(...)`.
    fn skew(&self) -> f64 {
        self.clock.offset_seconds()
    }

    async fn summary(&self, id: SweepId) -> Result<SweepSummary> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SUMMARY} AND w.id = $1")))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::SweepNotFound(id))?;
        summary_from_row(&row)
    }

    /// Locks the seed's row and returns its state and fence.
    async fn lock_seed(
        tx: &mut Transaction<'_, Postgres>,
        lease: LeaseRef,
    ) -> Result<(SeedState, i64)> {
        let row = sqlx::query(
            "SELECT state, fence FROM seeds WHERE sweep_id = $1 AND seed = $2 FOR UPDATE",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(r) = row {
            return Ok((state_from_db(r.try_get("state")?)?, r.try_get("fence")?));
        }
        let sweep_exists = sqlx::query("SELECT 1 FROM sweeps WHERE id = $1")
            .bind(lease.sweep_id.0)
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
        Err(if sweep_exists {
            StoreError::SeedNotFound {
                sweep_id: lease.sweep_id,
                seed: lease.seed,
            }
        } else {
            StoreError::SweepNotFound(lease.sweep_id)
        })
    }

    /// Adds the results queued since the last fold to the sweep's aggregates and epoch counts.
    async fn fold_aggregates(tx: &mut Transaction<'_, Postgres>, id: SweepId) -> Result<()> {
        let seeds: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM aggregates_unfolded WHERE sweep_id = $1 RETURNING seed",
        )
        .bind(id.0)
        .fetch_all(&mut **tx)
        .await?;
        if seeds.is_empty() {
            return Ok(());
        }
        for sql in [&AGGREGATE_FOLD, &EPOCH_VALUES_FOLD] {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(id.0)
                .bind(&seeds)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Adds the bitmaps queued since the last fold to the sweep's test-set tallies; how many.
    async fn fold_test_sets(tx: &mut Transaction<'_, Postgres>, id: SweepId) -> Result<u64> {
        let mut tallies = Tallies::from_stored(test_sets(&mut **tx, id).await?);
        let mut folded = 0;
        let mut rows = sqlx::query(
            "WITH q AS (DELETE FROM test_sets_unfolded WHERE sweep_id = $1 RETURNING seed)
             SELECT b.seed, b.test_examples, b.test_correct
             FROM result_bitmaps b JOIN q ON b.sweep_id = $1 AND b.seed = q.seed",
        )
        .bind(id.0)
        .fetch(&mut **tx);
        while let Some(row) = rows.next().await {
            tallies.add(&bitmap_from_row(&row?)?.1);
            folded += 1;
        }
        drop(rows);
        for tally in tallies.into_vec() {
            let upsert = sqlx::query(sqlx::AssertSqlSafe(TEST_SET_UPSERT.as_str())).bind(id.0);
            bind_test_set(upsert, &tally).execute(&mut **tx).await?;
        }
        Ok(folded)
    }

    async fn lock_held(tx: &mut Transaction<'_, Postgres>, lease: LeaseRef) -> Result<()> {
        let (state, fence) = Self::lock_seed(tx, lease).await?;
        Ok(policy::check_held(lease, state, fence)?)
    }

    /// Ends one lease without a result and moves the seed where the policy says. The seed's row
    /// must be locked by `tx`.
    async fn end_attempt(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        lease: LeaseRef,
        attempts: &Attempts,
        end: AttemptEnd,
        cause: &str,
    ) -> Result<SeedState> {
        let next = next_state(end, attempts);
        sqlx::query(
            "UPDATE seeds SET state = $3, failures = $4, worker_id = NULL, lease_expires_at = NULL,
                 not_before = now() + make_interval(secs => $5), updated_at = now()
             WHERE sweep_id = $1 AND seed = $2",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(next.state.as_str())
        .bind(next.failures as i32)
        .bind(next.backoff_seconds.map(|b| self.skew() + b))
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE attempts SET outcome = $4, ended_at = now() + make_interval(secs => $5), cause = $6
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(end.outcome().as_str())
        .bind(self.skew())
        .bind(cause)
        .execute(&mut **tx)
        .await?;
        Ok(next.state)
    }

    /// [`Store::claim`], ending overdue leases first when `expire` and one may be: a claim
    /// costs one statement.
    async fn claim_one(
        &self,
        worker_id: &str,
        tasks: &[Task],
        ttl: Duration,
        expire: bool,
    ) -> Result<ClaimOutcome> {
        let tasks = super::task_names(tasks);
        if expire && self.next_deadline.due() {
            let mark = self.next_deadline.mark();
            let mut tx = self.pool.begin().await?;
            let ahead = self.expire_overdue(&mut tx).await?;
            tx.commit().await?;
            self.next_deadline.read(mark, ahead, ttl);
        }
        let key = LeaseKey::random();
        let row = self.claim_statement(worker_id, &tasks, ttl, &key).await?;
        let Some(sweep_id) = row.try_get::<Option<uuid::Uuid>, _>("sweep_id")? else {
            let outstanding: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
                 WHERE s.state IN ('pending', 'leased') AND w.state = 'active' AND w.loading_at IS NULL
                   AND ($1::text[] IS NULL OR w.task = ANY($1))",
            )
            .bind(&tasks)
            .fetch_one(&self.pool)
            .await?;
            return Ok(ClaimOutcome::Empty {
                outstanding: u64_from_db(outstanding),
            });
        };
        let lease = LeaseRef {
            sweep_id: SweepId(sweep_id),
            seed: row.try_get("seed")?,
            fence: row.try_get("fence")?,
        };
        let config = lease_config(&row.try_get::<String, _>("config")?)?;
        Ok(ClaimOutcome::Leased(Box::new(Lease {
            lease,
            key,
            task: task_from_db(row.try_get("task")?)?,
            dataset: row.try_get("dataset")?,
            train: config.train,
            factors: factors_from_row(&row)?,
            seed_namespace: config.seed_namespace,
            finetune: config.finetune,
            command: config.command,
        })))
    }

    /// One statement: the lease (NULLs when no seed is pending), its attempt row, the deletion of
    /// earlier leases' epoch rows (a new lease starts with none, so an earlier partial curve
    /// never mixes with this one's in what readers see) and the sweep's settings.
    async fn claim_statement(
        &self,
        worker_id: &str,
        tasks: &Option<Vec<&'static str>>,
        ttl: Duration,
        key: &LeaseKey,
    ) -> Result<PgRow> {
        let mut conn = self.cycle.take().await?;
        let row = sqlx::query(
            "WITH next AS (
                 SELECT c.sweep_id, c.seed
                 FROM (SELECT id FROM sweeps WHERE state = 'active' AND loading_at IS NULL
                         AND ($5::text[] IS NULL OR task = ANY($5))
                       ORDER BY priority DESC, seq) w
                 CROSS JOIN LATERAL (
                     SELECT sweep_id, seed FROM seeds
                     WHERE sweep_id = w.id AND state = 'pending'
                       AND (not_before IS NULL OR not_before <= now() + make_interval(secs => $3))
                     ORDER BY seed LIMIT 1 FOR UPDATE SKIP LOCKED) c
                 LIMIT 1),
             claimed AS (
                 UPDATE seeds s SET state = 'leased', fence = s.fence + 1, worker_id = $1,
                     lease_expires_at = now() + make_interval(secs => $2 + $3), not_before = NULL,
                     updated_at = now()
                 FROM next
                 WHERE s.sweep_id = next.sweep_id AND s.seed = next.seed
                 RETURNING s.sweep_id, s.seed, s.fence, s.init_seed, s.order_seed, s.augment_seed,
                           s.split_seed),
             attempt AS (
                 INSERT INTO attempts (sweep_id, seed, fence, worker_id, started_at, lease_key_hash)
                 SELECT sweep_id, seed, fence, $1, now() + make_interval(secs => $3), $4
                 FROM claimed),
             stale AS (
                 DELETE FROM epoch_metrics e USING claimed c
                 WHERE e.sweep_id = c.sweep_id AND e.seed = c.seed AND e.fence < c.fence)
             SELECT c.*, w.task, w.dataset, w.config::text AS config
             FROM (SELECT 1) one
             LEFT JOIN (claimed c JOIN sweeps w ON w.id = c.sweep_id) ON true",
        )
        .bind(worker_id)
        .bind(ttl.as_secs_f64())
        .bind(self.skew())
        .bind(key_hash(key).to_vec())
        .bind(tasks)
        .fetch_one(&mut *conn)
        .await?;
        conn.done();
        Ok(row)
    }

    /// Why the seed of `lease` was not found: the refusal naming what is missing, the sweep or
    /// the seed (a seed added since it was looked for is pending, not held: a stale lease).
    async fn missing(&self, lease: LeaseRef) -> Result<StoreError> {
        let mut tx = self.pool.begin().await?;
        let found = Self::lock_seed(&mut tx, lease).await;
        tx.rollback().await?;
        match found {
            Err(e) if e.is_refusal() => Ok(e),
            Err(e) => Err(e),
            Ok(_) => Ok(StoreError::StaleLease(lease)),
        }
    }

    /// Judges a result under `lease` by the policy (the fence, the epochs recorded, the last
    /// epoch's metrics), reading without locks. `None`: already recorded under this lease. Else
    /// the version (`xmin`) of the last epoch's row judged, which the write checks.
    async fn judge_completion(&self, lease: LeaseRef, r: &SeedResult) -> Result<Option<String>> {
        let mut conn = self.cycle.take().await?;
        // Safe: constant text.
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT s.state, s.fence,
                    (SELECT count(*) FROM epoch_metrics
                     WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch BETWEEN 1 AND $4)
                      AS recorded,
                    l.*
             FROM seeds s LEFT JOIN LATERAL (
                 SELECT xmin::text AS version, {EPOCH_COLUMNS} FROM epoch_metrics
                 WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch = $4) l ON true
             WHERE s.sweep_id = $1 AND s.seed = $2"
        )))
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i32)
        .fetch_optional(&mut *conn)
        .await?;
        conn.done();
        let Some(row) = row else {
            return Err(self.missing(lease).await?);
        };
        let state = state_from_db(row.try_get("state")?)?;
        match policy::check_completion(lease, state, row.try_get("fence")?)? {
            Completion::AlreadyRecorded => return Ok(None),
            Completion::Record => {}
        }
        let recorded = u64_from_db(row.try_get("recorded")?);
        policy::check_epochs_recorded(lease, r.epochs, recorded)?;
        let version: Option<String> = row.try_get("version")?;
        let last = match &version {
            Some(_) => Some(epoch_from_row(&row)?.1),
            None => None,
        };
        policy::check_final_metrics(r, last.as_ref()).map_err(StoreError::Invalid)?;
        // The epochs recorded include the last one: it has a row.
        version
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt(format!("{lease}: no row for its last epoch")))
    }

    /// Writes a judged result: the result, its bitmap (queued for the tally), the seed and the
    /// attempt, in one statement, only while what the judgement rests on still holds: the seed
    /// leased under the fence, epochs `1..=epochs` recorded under it, the last one's row still
    /// `last_version`. Whether it wrote. The rows every recorder of the sweep shares (its
    /// aggregates and epoch counts) are left to the fold: the result is queued for them.
    async fn record_result(
        &self,
        lease: LeaseRef,
        r: &SeedResult,
        last_version: &str,
    ) -> Result<bool> {
        let mut conn = self.cycle.take().await?;
        let written: i64 = sqlx::query_scalar(
            "WITH d AS (
                 UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = now()
                 WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND state = 'leased'
                   AND EXISTS (SELECT 1 FROM epoch_metrics
                               WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch = $8
                                 AND xmin::text = $22)
                   AND (SELECT count(*) FROM epoch_metrics
                        WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch BETWEEN 1 AND $8)
                       = $8
                 RETURNING sweep_id, seed, init_seed, order_seed, augment_seed, split_seed),
             r AS (
                 INSERT INTO results (sweep_id, seed, fence, test_accuracy, test_loss, train_loss,
                                      train_accuracy, epochs, seconds, worker_id, device,
                                      data_fingerprint, finished_at, precision, deterministic,
                                      test_top5, val_loss, val_accuracy, custom,
                                      init_seed, order_seed, augment_seed, split_seed)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                        now() + make_interval(secs => $13), $14, $15, $16, $17, $18, $21::jsonb,
                        init_seed, order_seed, augment_seed, split_seed
                 FROM d
                 RETURNING sweep_id, seed),
             b AS (
                 INSERT INTO result_bitmaps (sweep_id, seed, test_examples, test_correct)
                 SELECT sweep_id, seed, $19, $20 FROM r WHERE $20::bytea IS NOT NULL
                 RETURNING sweep_id, seed),
             q AS (INSERT INTO test_sets_unfolded (sweep_id, seed) SELECT sweep_id, seed FROM b),
             a AS (INSERT INTO aggregates_unfolded (sweep_id, seed) SELECT sweep_id, seed FROM r),
             t AS (
                 UPDATE attempts SET outcome = 'succeeded',
                     ended_at = now() + make_interval(secs => $13)
                 FROM d WHERE attempts.sweep_id = d.sweep_id AND attempts.seed = d.seed
                   AND attempts.fence = $3)
             SELECT count(*) FROM d",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.test_accuracy)
        .bind(r.test_loss)
        .bind(r.train_loss)
        .bind(r.train_accuracy)
        .bind(r.epochs as i32)
        .bind(r.seconds)
        .bind(&r.worker_id)
        .bind(&r.device)
        .bind(&r.data_fingerprint)
        .bind(self.skew())
        .bind(r.precision.as_str())
        .bind(r.deterministic)
        .bind(r.test_top5)
        .bind(r.val_loss)
        .bind(r.val_accuracy)
        .bind(r.test_correct.as_ref().map(|c| i64::from(c.examples)))
        .bind(r.test_correct.as_ref().map(|c| c.bits.as_slice()))
        .bind(custom_to_db(&r.custom))
        .bind(last_version)
        .fetch_one(&mut *conn)
        .await?;
        conn.done();
        Ok(written > 0)
    }

    /// Records a diverged run under its seed's lock, judged as a result is: its row in
    /// `divergences`, the seed done, the attempt succeeded; no aggregate, bitmap or tally.
    async fn record_divergence(&self, lease: LeaseRef, r: &SeedResult) -> Result<CompleteOutcome> {
        let mut tx = self.pool.begin().await?;
        let (state, fence) = Self::lock_seed(&mut tx, lease).await?;
        if policy::check_completion(lease, state, fence)? == Completion::AlreadyRecorded {
            tx.rollback().await?;
            return Ok(CompleteOutcome::AlreadyRecorded);
        }
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM epoch_metrics
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch BETWEEN 1 AND $4",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i32)
        .fetch_one(&mut *tx)
        .await?;
        policy::check_epochs_recorded(lease, r.epochs, u64_from_db(recorded))?;
        // Safe: constant text.
        let last = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EPOCH_COLUMNS} FROM epoch_metrics
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND epoch = $4"
        )))
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i32)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| epoch_from_row(&row).map(|(_, e)| e))
        .transpose()?;
        policy::check_final_metrics(r, last.as_ref()).map_err(StoreError::Invalid)?;
        sqlx::query(
            "WITH d AS (
                 UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = now()
                 WHERE sweep_id = $1 AND seed = $2
                 RETURNING sweep_id, seed, init_seed, order_seed, augment_seed, split_seed),
             v AS (
                 INSERT INTO divergences (sweep_id, seed, fence, epoch, epochs, seconds, worker_id,
                                          device, deterministic, finished_at, init_seed,
                                          order_seed, augment_seed, split_seed)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10),
                        init_seed, order_seed, augment_seed, split_seed
                 FROM d)
             UPDATE attempts SET outcome = 'succeeded', ended_at = now() + make_interval(secs => $10)
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.diverged_epoch.map(|e| e as i32))
        .bind(r.epochs as i32)
        .bind(r.seconds)
        .bind(&r.worker_id)
        .bind(&r.device)
        .bind(r.deterministic)
        .bind(self.skew())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CompleteOutcome::Recorded)
    }

    /// Ends the leases whose deadline has passed as expired attempts; in how many seconds the
    /// earliest of the rest falls due (None: no lease is held).
    async fn expire_overdue(&self, tx: &mut Transaction<'_, Postgres>) -> Result<Option<f64>> {
        let expired = sqlx::query(
            "SELECT s.sweep_id, s.seed, s.fence, s.failures, w.max_attempts,
                    w.retry_backoff_seconds, w.retry_backoff_max_seconds
             FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
             WHERE s.state = 'leased' AND s.lease_expires_at < now() + make_interval(secs => $1)
             FOR UPDATE OF s SKIP LOCKED",
        )
        .bind(self.skew())
        .fetch_all(&mut **tx)
        .await?;
        for row in &expired {
            let lease = LeaseRef {
                sweep_id: SweepId(row.try_get("sweep_id")?),
                seed: row.try_get("seed")?,
                fence: row.try_get("fence")?,
            };
            let attempts = attempts_from_row(row)?;
            self.end_attempt(tx, lease, &attempts, AttemptEnd::Expired, EXPIRED_CAUSE)
                .await?;
        }
        let ahead = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM min(lease_expires_at) - (now() + make_interval(secs => $1)))::float8
             FROM seeds WHERE state = 'leased'",
        )
        .bind(self.skew())
        .fetch_one(&mut **tx)
        .await?;
        Ok(ahead)
    }

    /// [`Store::heartbeat`].
    async fn extend(&self, lease: LeaseRef, ttl: Duration) -> Result<()> {
        let mut conn = self.cycle.take().await?;
        let done = sqlx::query(
            "UPDATE seeds SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND state = 'leased'",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(self.skew() + ttl.as_secs_f64())
        .execute(&mut *conn)
        .await?;
        conn.done();
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let e = Self::lock_seed(&mut tx, lease)
            .await
            .err()
            .unwrap_or(StoreError::StaleLease(lease));
        abort(tx, e).await
    }
}

fn summary_from_row(row: &PgRow) -> Result<SweepSummary> {
    Ok(SweepSummary {
        id: SweepId(row.try_get("id")?),
        name: row.try_get("name")?,
        task: task_from_db(row.try_get("task")?)?,
        dataset: row.try_get("dataset")?,
        created_at: row.try_get("created_at")?,
        state: sweep_state_from_db(row.try_get("state")?)?,
        priority: row.try_get("priority")?,
        total: u64_from_db(row.try_get("total_seeds")?),
        done: u64_from_db(row.try_get("done")?),
    })
}

fn attempts_from_row(row: &PgRow) -> Result<Attempts> {
    Ok(Attempts {
        failures: row.try_get::<i32, _>("failures")? as u32,
        max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
        retry: RetrySettings {
            base_seconds: row.try_get("retry_backoff_seconds")?,
            max_seconds: row.try_get("retry_backoff_max_seconds")?,
        },
    })
}

/// The per-example correctness bitmaps of a sweep's results that have one, by seed.
async fn bitmaps<'e>(e: impl sqlx::PgExecutor<'e>, id: SweepId) -> Result<Vec<(i64, Correctness)>> {
    let rows = sqlx::query(
        "SELECT seed, test_examples, test_correct FROM result_bitmaps
         WHERE sweep_id = $1 ORDER BY seed",
    )
    .bind(id.0)
    .fetch_all(e)
    .await?;
    rows.iter().map(bitmap_from_row).collect()
}

/// Inserts seeds that the sweep does not have yet, with their factor seeds under `design`;
/// returns how many were new.
async fn insert_seeds(
    tx: &mut Transaction<'_, Postgres>,
    id: SweepId,
    seeds: &[i64],
    design: &Design,
) -> Result<u64> {
    let mut added = 0;
    for chunk in seed_rows(seeds, design).chunks(50_000) {
        let column = |i: usize| chunk.iter().map(|r| r[i]).collect::<Vec<i64>>();
        added += sqlx::query(
            "INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed)
             SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                                      $6::bigint[])
             ON CONFLICT (sweep_id, seed) DO NOTHING",
        )
        .bind(id.0)
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .bind(column(4))
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(added)
}

/// Locks the sweep's row and returns its state.
async fn lock_sweep(tx: &mut Transaction<'_, Postgres>, id: SweepId) -> Result<Option<SweepState>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut **tx)
            .await?;
    state.as_deref().map(sweep_state_from_db).transpose()
}

#[async_trait]
impl Store for PgStore {
    async fn begin_sweep(&self, id: SweepId, spec: &SweepSpec, first: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM sweeps WHERE loading_at < now() + make_interval(secs => $1)")
            .bind(self.skew() - ABANDONED_LOAD.as_secs_f64())
            .execute(&self.pool)
            .await?;
        let (score, direction) = super::score_columns(spec);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sweeps (id, name, task, dataset, config, max_attempts, total_seeds,
                                 retry_backoff_seconds, retry_backoff_max_seconds, priority,
                                 loading_at, score, score_direction)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10,
                     now() + make_interval(secs => $11), $12, $13)",
        )
        .bind(id.0)
        .bind(&spec.name)
        .bind(spec.task.as_str())
        .bind(&spec.dataset)
        .bind(spec.config_json().to_string())
        .bind(spec.max_attempts as i32)
        .bind(spec.seeds.len() as i64)
        .bind(spec.retry.base_seconds)
        .bind(spec.retry.max_seconds)
        .bind(spec.priority)
        .bind(self.skew())
        .bind(&score)
        .bind(direction)
        .execute(&mut *tx)
        .await?;
        insert_seeds(&mut tx, id, first, &spec.design).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load_seeds(
        &self,
        id: SweepId,
        design: &Design,
        seeds: &[i64],
        grow: bool,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT state, total_seeds FROM sweeps WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return abort(tx, StoreError::SweepNotFound(id)).await;
        };
        let total = u64_from_db(row.try_get("total_seeds")?);
        let checked =
            policy::check_open(id, sweep_state_from_db(row.try_get("state")?)?).and_then(|()| {
                policy::check_sweep_size(id, total, if grow { seeds.len() as u64 } else { 0 })
            });
        if let Err(refusal) = checked {
            return abort(tx, refusal.into()).await;
        }
        let added = insert_seeds(&mut tx, id, seeds, design).await?;
        sqlx::query(
            "UPDATE sweeps SET total_seeds = total_seeds + $2,
                 loading_at = CASE WHEN loading_at IS NULL THEN NULL
                                   ELSE now() + make_interval(secs => $3) END
             WHERE id = $1",
        )
        .bind(id.0)
        .bind(if grow { added as i64 } else { 0 })
        .bind(self.skew())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn end_loading(&self, id: SweepId) -> Result<()> {
        sqlx::query("UPDATE sweeps SET loading_at = NULL WHERE id = $1")
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        // Fresh statistics, so the claim's plan does not wait for autovacuum to notice a big sweep.
        sqlx::query("ANALYZE seeds").execute(&self.pool).await?;
        Ok(())
    }

    async fn discard_load(&self, id: SweepId) -> Result<()> {
        sqlx::query("DELETE FROM sweeps WHERE id = $1 AND loading_at IS NOT NULL")
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn extendable(&self, id: SweepId) -> Result<(Design, u64)> {
        let row = sqlx::query(
            "SELECT state, config::text AS config, total_seeds FROM sweeps
             WHERE id = $1 AND loading_at IS NULL",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::SweepNotFound(id))?;
        let design = design_from_config(row.try_get("config")?)?;
        policy::check_extendable(id, sweep_state_from_db(row.try_get("state")?)?, &design)?;
        Ok((design, u64_from_db(row.try_get("total_seeds")?)))
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepSummary>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SUMMARY} ORDER BY w.seq")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn sweep_config(&self, id: SweepId) -> Result<String> {
        sqlx::query_scalar("SELECT config::text FROM sweeps WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::SweepNotFound(id))
    }

    async fn sweep_progress(&self, id: SweepId) -> Result<SweepProgress> {
        let summary = self.summary(id).await?;
        let mut counts = SeedCounts::default();
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM seeds WHERE sweep_id = $1 GROUP BY state
             UNION ALL SELECT 'diverged', count(*) FROM divergences WHERE sweep_id = $1",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let (state, n): (String, i64) = (row.try_get("state")?, row.try_get("n")?);
            match state.as_str() {
                "diverged" => counts.diverged = u64_from_db(n),
                _ => counts.set(state_from_db(&state)?, u64_from_db(n)),
            }
        }
        Ok(SweepProgress {
            summary,
            counts,
            aggregates: self.aggregates(id).await?,
        })
    }

    async fn list_results(
        &self,
        id: SweepId,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SeedResult>> {
        self.summary(id).await?;
        let rows = sqlx::query(concat!(
            "SELECT seed, test_accuracy, test_loss, train_loss, train_accuracy, epochs, seconds, worker_id,
                    device, data_fingerprint, precision, deterministic, test_top5, val_loss,
                    val_accuracy, init_seed, order_seed, augment_seed, split_seed,
                    custom::text AS custom, ",
            iso!("finished_at"),
            " AS finished_at FROM results WHERE sweep_id = $1 AND ($2::bigint IS NULL OR seed > $2)
             ORDER BY seed LIMIT $3"
        ))
        .bind(id.0)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(result_from_row).collect()
    }

    async fn seed_history(&self, id: SweepId, seed: i64) -> Result<SeedHistory> {
        self.summary(id).await?;
        let state = sqlx::query_scalar("SELECT state FROM seeds WHERE sweep_id = $1 AND seed = $2")
            .bind(id.0)
            .bind(seed)
            .fetch_optional(&self.pool)
            .await?;
        let rows = sqlx::query_as(concat!(
            "SELECT fence, worker_id, ",
            iso!("started_at"),
            ", ",
            iso!("ended_at"),
            ", outcome, cause, log FROM attempts
             WHERE sweep_id = $1 AND seed = $2 ORDER BY fence DESC LIMIT $3"
        ))
        .bind(id.0)
        .bind(seed)
        .bind(super::HISTORY)
        .fetch_all(&self.pool)
        .await?;
        super::seed_history(id, seed, state, rows)
    }

    async fn aggregates(&self, id: SweepId) -> Result<Vec<Aggregate>> {
        self.fold_tallies(id).await?;
        // Safe: constant text.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {AGGREGATE_COLUMNS} FROM aggregates WHERE sweep_id = $1 ORDER BY metric"
        )))
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(aggregate_from_row)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    async fn scores(&self, id: SweepId, metric: Metric, after: i64) -> Result<(Vec<Scored>, i64)> {
        self.summary(id).await?;
        // One row of arrays rather than a row per result: a million results decode in a
        // fraction of the time. The subquery's order carries into array_agg.
        let sql = format!(
            "SELECT array_agg(seed) AS seeds, array_agg(init_seed) AS init,
                    array_agg(order_seed) AS ord, array_agg(augment_seed) AS augment,
                    array_agg(split_seed) AS split, array_agg(value) AS vals, max(seq) AS last
             FROM ({} ) r",
            scores_sql(Dialect::Postgres, metric, "seq")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(after)
            .fetch_one(&self.pool)
            .await?;
        let Some(last) = row.try_get::<Option<i64>, _>("last")? else {
            return Ok((Vec::new(), after));
        };
        let column = |name: &str| -> Result<Vec<i64>> { Ok(row.try_get(name)?) };
        let (seeds, init, ord, augment, split) = (
            column("seeds")?,
            column("init")?,
            column("ord")?,
            column("augment")?,
            column("split")?,
        );
        let values: Vec<f64> = row.try_get("vals")?;
        let scored = (0..seeds.len())
            .map(|i| Scored {
                seed: seeds[i],
                factors: [init[i], ord[i], augment[i], split[i]],
                value: values[i],
            })
            .collect();
        Ok((scored, last))
    }

    /// Reads only the seed and value columns, unordered: a run's factor seeds are a function
    /// of its seed under the sweep's design (how they were made at submission), so they are
    /// rebuilt here rather than read, and nothing past the value column of each row is decoded.
    async fn all_scores(&self, id: SweepId, metric: Metric) -> Result<Vec<Scored>> {
        let design = design_from_config(&self.sweep_config(id).await?)?;
        let col = Dialect::Postgres.value(metric, "");
        let sql = format!(
            "SELECT array_agg(seed) AS seeds, array_agg({col}) AS vals FROM results
             WHERE sweep_id = $1 AND {col} IS NOT NULL"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_one(&self.pool)
            .await?;
        let seeds: Vec<i64> = row
            .try_get::<Option<Vec<i64>>, _>("seeds")?
            .unwrap_or_default();
        let values: Vec<f64> = row
            .try_get::<Option<Vec<f64>>, _>("vals")?
            .unwrap_or_default();
        Ok(seeds
            .into_iter()
            .zip(values)
            .map(|(seed, value)| {
                let f = design.factors(seed);
                Scored {
                    seed,
                    factors: [f.init, f.order, f.augment, f.split],
                    value,
                }
            })
            .collect())
    }

    async fn outcomes(&self, id: SweepId, metric: Metric) -> Result<Outcomes> {
        self.summary(id).await?;
        let diverged = sqlx::query(sqlx::AssertSqlSafe(diverged_sql(Dialect::Postgres, metric)))
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?;
        let counts = sqlx::query(sqlx::AssertSqlSafe(outcome_counts_sql(Dialect::Postgres)))
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?;
        outcomes_from_rows(&diverged, &counts)
    }

    async fn list_epochs(
        &self,
        id: SweepId,
        after: Option<(i64, u32)>,
        limit: u32,
    ) -> Result<Vec<(i64, EpochRecord)>> {
        self.summary(id).await?;
        // Safe: constant text.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EPOCH_COLUMNS} FROM epoch_metrics WHERE sweep_id = $1
               AND ($2::bigint IS NULL OR (seed, epoch) > ($2, $3))
             ORDER BY seed, epoch LIMIT $4"
        )))
        .bind(id.0)
        .bind(after.map(|a| a.0))
        .bind(after.map_or(0, |a| a.1 as i32))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(epoch_from_row).collect()
    }

    async fn correctness(&self, id: SweepId) -> Result<Vec<(i64, Correctness)>> {
        bitmaps(&self.pool, id).await
    }

    async fn folded_test_sets(&self, id: SweepId) -> Result<Vec<TestSetTally>> {
        test_sets(&self.pool, id).await
    }

    async fn fold_tallies(&self, id: SweepId) -> Result<u64> {
        let queued: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM test_sets_unfolded WHERE sweep_id = $1)
                 OR EXISTS (SELECT 1 FROM aggregates_unfolded WHERE sweep_id = $1)",
        )
        .bind(id.0)
        .fetch_one(&self.pool)
        .await?;
        if !queued {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        // Folds of one sweep take turns (the tally is read, added to and written back).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        Self::fold_aggregates(&mut tx, id).await?;
        let folded = Self::fold_test_sets(&mut tx, id).await?;
        tx.commit().await?;
        Ok(folded)
    }

    async fn unfolded_sweeps(&self) -> Result<Vec<SweepId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT sweep_id FROM test_sets_unfolded UNION SELECT sweep_id FROM aggregates_unfolded",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(SweepId).collect())
    }

    async fn epoch_spread_scan(
        &self,
        id: SweepId,
        metric: Metric,
    ) -> Result<Vec<seedsweep_core::stats::describe::EpochSpread>> {
        let col = Dialect::Postgres.value(metric, "e");
        // percentile_cont interpolates linearly
        // between order statistics, as stats::quantile does; the three quartiles share a sort.
        let sql = format!(
            "SELECT epoch, count(*) AS n, avg(v) AS mean, coalesce(stddev_samp(v), 0) AS std,
                    min(v) AS min, max(v) AS max,
                    percentile_cont(ARRAY[0.25, 0.5, 0.75]) WITHIN GROUP (ORDER BY v) AS q
             FROM (SELECT e.epoch, {col} AS v FROM epoch_metrics e {FINISHED_EPOCHS}
                   WHERE e.sweep_id = $1 AND {col} IS NOT NULL) e
             GROUP BY epoch ORDER BY epoch"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let q: Vec<f64> = r.try_get("q")?;
                if q.len() != 3 {
                    return Err(StoreError::Corrupt(format!("{} quartiles, not 3", q.len())));
                }
                Ok(seedsweep_core::stats::describe::EpochSpread {
                    epoch: r.try_get::<i32, _>("epoch")?.max(0) as u32,
                    n: u64_from_db(r.try_get("n")?),
                    mean: r.try_get("mean")?,
                    std: r.try_get("std")?,
                    min: r.try_get("min")?,
                    max: r.try_get("max")?,
                    q1: q[0],
                    median: q[1],
                    q3: q[2],
                })
            })
            .collect()
    }

    async fn epoch_values(&self, id: SweepId, metric: Metric) -> Result<Vec<(u32, f64, u64)>> {
        self.fold_tallies(id).await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(epoch_values_sql(Dialect::Postgres)))
            .bind(id.0)
            .bind(metric.name())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(epoch_value_from_row).collect()
    }

    async fn epoch_scores(
        &self,
        id: SweepId,
        metric: Metric,
        seeds: Option<&[i64]>,
    ) -> Result<Vec<(i64, u32, f64)>> {
        let sql = epoch_scores_sql(Dialect::Postgres, metric, seeds.is_some());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0);
        if let Some(seeds) = seeds {
            query = query.bind(seeds);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(epoch_score_from_row).collect()
    }

    async fn ping(&self) -> Result<()> {
        let answered = sqlx::query("SELECT 1").execute(&self.pool).await;
        self.available
            .observe(answered.map(drop).map_err(StoreError::from))
    }

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        let rows = sqlx::query(FLEET_SEEDS).fetch_all(&self.pool).await?;
        let mut seeds = Vec::with_capacity(rows.len());
        for row in &rows {
            seeds.push((
                SweepId(row.try_get("sweep_id")?),
                row.try_get("name")?,
                state_from_db(row.try_get("state")?)?,
                u64_from_db(row.try_get("n")?),
            ));
        }
        let expired: i64 =
            sqlx::query_scalar("SELECT count(*) FROM attempts WHERE outcome = 'expired'")
                .fetch_one(&self.pool)
                .await?;
        Ok(FleetCounts {
            seeds,
            expired_leases: u64_from_db(expired),
        })
    }

    async fn claim_for(
        &self,
        worker_id: &str,
        tasks: &[Task],
        ttl: Duration,
    ) -> Result<ClaimOutcome> {
        let expire = self.available.may_expire(ttl);
        self.available
            .observe(self.claim_one(worker_id, tasks, ttl, expire).await)
    }

    async fn heartbeat(&self, lease: LeaseRef, ttl: Duration) -> Result<()> {
        // Holders' heartbeats are the calls that notice an outage first.
        self.available.observe(self.extend(lease, ttl).await)
    }

    async fn record_epochs(&self, rows: &[(LeaseRef, EpochRecord)]) -> Result<Vec<Result<()>>> {
        // One statement: the seeds' rows are locked in key order (no deadlock with another
        // replica's batch), the rows sent under the fence each seed is leased under go in (the
        // fence checked again where it is written), and the seeds' states come back for the
        // policy's verdict on each row. The last of a row sent twice in the batch wins, as it
        // would one statement at a time.
        let mut last_of: HashMap<(uuid::Uuid, i64, u32, i64), usize> = HashMap::new();
        for (i, (lease, e)) in rows.iter().enumerate() {
            last_of.insert((lease.sweep_id.0, lease.seed, e.epoch, lease.fence), i);
        }
        let mut sent: Vec<usize> = last_of.values().copied().collect();
        sent.sort_unstable();
        let sent: Vec<&(LeaseRef, EpochRecord)> = sent.iter().map(|&i| &rows[i]).collect();
        // Safe: constant text.
        let sql = format!(
            "WITH held AS (
                 SELECT s.sweep_id, s.seed, s.state, s.fence FROM seeds s
                 WHERE (s.sweep_id, s.seed) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[]))
                 ORDER BY s.sweep_id, s.seed FOR UPDATE),
             written AS (
                 INSERT INTO epoch_metrics (sweep_id, seed, epoch, fence, train_loss, train_accuracy,
                                            test_loss, test_accuracy, lr, seconds, test_top5,
                                            val_loss, val_accuracy, custom)
                 SELECT r.* FROM unnest($1::uuid[], $2::bigint[], $3::int[], $4::bigint[],
                                        $5::float8[], $6::float8[], $7::float8[], $8::float8[],
                                        $9::float8[], $10::float8[], $11::float8[], $12::float8[],
                                        $13::float8[], $14::jsonb[])
                   AS r (sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss,
                         test_accuracy, lr, seconds, test_top5, val_loss, val_accuracy, custom)
                 JOIN held h ON h.sweep_id = r.sweep_id AND h.seed = r.seed
                   AND h.state = 'leased' AND h.fence = r.fence
                 {EPOCH_UPSERT}
                 RETURNING sweep_id, seed, epoch, xmin::text AS version)
             SELECT h.sweep_id, h.seed, h.state, h.fence, w.epoch, w.version
             FROM held h LEFT JOIN written w ON w.sweep_id = h.sweep_id AND w.seed = h.seed"
        );
        let column = |f: fn(&EpochRecord) -> Option<f64>| -> Vec<Option<f64>> {
            sent.iter().map(|(_, e)| f(e)).collect()
        };
        let mut conn = self.epochs.take().await?;
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(sent.iter().map(|(l, _)| l.sweep_id.0).collect::<Vec<_>>())
            .bind(sent.iter().map(|(l, _)| l.seed).collect::<Vec<_>>())
            .bind(sent.iter().map(|(_, e)| e.epoch as i32).collect::<Vec<_>>())
            .bind(sent.iter().map(|(l, _)| l.fence).collect::<Vec<_>>())
            .bind(column(|e| e.train_loss))
            .bind(column(|e| e.train_accuracy))
            .bind(column(|e| e.test_loss))
            .bind(column(|e| e.test_accuracy))
            .bind(column(|e| e.lr))
            .bind(column(|e| Some(e.seconds)))
            .bind(column(|e| e.test_top5))
            .bind(column(|e| e.val_loss))
            .bind(column(|e| e.val_accuracy))
            .bind(
                sent.iter()
                    .map(|(_, e)| custom_to_db(&e.custom))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *conn)
            .await?;
        conn.done();
        let mut held: HashMap<(uuid::Uuid, i64), (SeedState, i64)> = HashMap::new();
        for r in &found {
            let (sweep_id, seed, fence) = (
                r.try_get("sweep_id")?,
                r.try_get("seed")?,
                r.try_get("fence")?,
            );
            held.insert(
                (sweep_id, seed),
                (state_from_db(r.try_get("state")?)?, fence),
            );
            // A row written comes back with its version: the row sent under the seed's fence.
            if let (Some(epoch), Some(version)) =
                (r.try_get::<Option<i32>, _>("epoch")?, r.try_get("version")?)
                && let Some(&i) = last_of.get(&(sweep_id, seed, epoch as u32, fence))
            {
                self.last_epochs.wrote(rows[i].0, version, &rows[i].1);
            }
        }
        let mut verdicts = Vec::with_capacity(rows.len());
        for (lease, _) in rows {
            verdicts.push(match held.get(&(lease.sweep_id.0, lease.seed)) {
                Some(&(state, fence)) => {
                    policy::check_held(*lease, state, fence).map_err(StoreError::from)
                }
                // Which is missing, the sweep or the seed.
                None => Err(self.missing(*lease).await?),
            });
        }
        Ok(verdicts)
    }

    async fn complete(&self, lease: LeaseRef, r: &SeedResult) -> Result<CompleteOutcome> {
        // Two statements and no transaction held between them: the policy judges what the first
        // reads, and the second writes only while that still holds (the seed leased under the
        // fence, the last epoch's row the version judged), else the result is judged again. When
        // this replica wrote the last epoch's row, the policy judges that row as written and
        // the first statement is left out. A divergence (rare) takes a plain transaction.
        if r.diverged_epoch.is_some() {
            return self.record_divergence(lease, r).await;
        }
        if let Some(version) = self.last_epochs.judged(lease, r)
            && self.record_result(lease, r, &version).await?
        {
            return Ok(CompleteOutcome::Recorded);
        }
        for _ in 0..3 {
            let Some(last_version) = self.judge_completion(lease, r).await? else {
                return Ok(CompleteOutcome::AlreadyRecorded);
            };
            if self.record_result(lease, r, &last_version).await? {
                return Ok(CompleteOutcome::Recorded);
            }
        }
        Err(StoreError::Conflict(format!(
            "{lease}: the seed's epoch rows kept changing while its result was recorded; send the result again"
        )))
    }

    async fn lease_key_hash(&self, lease: LeaseRef) -> Result<KeyHash> {
        let row: Option<Option<Vec<u8>>> = sqlx::query_scalar(
            "SELECT lease_key_hash FROM attempts WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .fetch_optional(&self.pool)
        .await?;
        KeyHash::from_db(row)
    }

    async fn note_log(&self, lease: LeaseRef, log: &str) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET log = $4 WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(log)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fail(&self, lease: LeaseRef, cause: &str, charge: Charge) -> Result<SeedState> {
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::lock_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        let row = sqlx::query(
            "SELECT s.failures, w.max_attempts, w.retry_backoff_seconds, w.retry_backoff_max_seconds,
                    EXISTS (SELECT 1 FROM attempts a, attempts me
                            WHERE me.sweep_id = s.sweep_id AND me.seed = s.seed AND me.fence = s.fence
                              AND a.sweep_id = s.sweep_id AND a.seed = s.seed AND a.fence <> s.fence
                              AND a.outcome = 'failed' AND a.cause = $3
                              AND a.worker_id <> me.worker_id) AS repeated
             FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
             WHERE s.sweep_id = $1 AND s.seed = $2",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(cause)
        .fetch_one(&mut *tx)
        .await?;
        let end = charge.end(row.try_get("repeated")?);
        let attempts = attempts_from_row(&row)?;
        let state = self
            .end_attempt(&mut tx, lease, &attempts, end, cause)
            .await?;
        tx.commit().await?;
        Ok(state)
    }

    async fn set_sweep_state(&self, id: SweepId, state: SweepState) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let Some(current) = lock_sweep(&mut tx, id).await? else {
            return abort(tx, StoreError::SweepNotFound(id)).await;
        };
        if let Err(refusal) = policy::check_sweep_change(id, current, state) {
            return abort(tx, refusal.into()).await;
        }
        sqlx::query("UPDATE sweeps SET state = $2 WHERE id = $1")
            .bind(id.0)
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?;
        if state == SweepState::Cancelled {
            sqlx::query(
                "UPDATE attempts SET outcome = 'cancelled', ended_at = now() + make_interval(secs => $2),
                     cause = 'sweep cancelled'
                 WHERE sweep_id = $1 AND outcome = 'running'",
            )
            .bind(id.0)
            .bind(self.skew())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE seeds SET state = 'cancelled', worker_id = NULL, lease_expires_at = NULL,
                     not_before = NULL, updated_at = now()
                 WHERE sweep_id = $1 AND state IN ('pending', 'leased')",
            )
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Ends a transaction that must not commit and returns `e`. Rolling back explicitly releases its
/// row locks now, not whenever the pool next hands out the connection.
async fn abort<T>(tx: Transaction<'_, Postgres>, e: StoreError) -> Result<T> {
    tx.rollback().await?;
    Err(e)
}

/// The sweep's stored tallies, by test-set size.
async fn test_sets<'e>(db: impl sqlx::PgExecutor<'e>, id: SweepId) -> Result<Vec<TestSetTally>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TEST_SET_COLUMNS} FROM test_sets WHERE sweep_id = $1 ORDER BY examples"
    )))
    .bind(id.0)
    .fetch_all(db)
    .await?;
    rows.iter().map(test_set_from_row).collect()
}
