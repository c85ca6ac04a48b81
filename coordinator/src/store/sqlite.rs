//! The SQLite store: one file, one host. All access goes through a single connection, so every
//! transaction is serialised and no claim can race another. SQLite is embedded, so the database
//! clock is this host's: "now" is computed here and bound into each statement.

use super::{
    ABANDONED_LOAD, AGGREGATE_COLUMNS, Availability, Clock, Dialect, EPOCH_COLUMNS, EPOCH_UPSERT,
    FLEET_SEEDS, KeyHash, Result, Store, StoreError, TEST_SET_COLUMNS, Tallies, aggregate_from_row,
    aggregate_upsert, bind_test_set, bitmap_from_row, custom_to_db, design_from_config,
    diverged_sql, epoch_from_row, epoch_score_from_row, epoch_scores_sql, epoch_value_from_row,
    epoch_values_sql, epoch_values_upsert, factors_from_row, key_hash, lease_config, next_state,
    outcome_counts_sql, outcomes_from_rows, result_from_row, result_values, scored_from_row,
    scores_sql, seed_rows, state_from_db, sweep_state_from_db, task_from_db, test_set_from_row,
    test_set_upsert, u64_from_db,
};
use async_trait::async_trait;
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
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};
use tokio_stream::StreamExt;
use uuid::Uuid;

/// The completion's upserts in this dialect, built once.
static AGGREGATE_UPSERT: LazyLock<String> = LazyLock::new(|| aggregate_upsert(Dialect::Sqlite));
static EPOCH_VALUES_UPSERT: LazyLock<String> =
    LazyLock::new(|| epoch_values_upsert(Dialect::Sqlite));
static TEST_SET_UPSERT: LazyLock<String> = LazyLock::new(|| test_set_upsert(Dialect::Sqlite));

const SUMMARY: &str = "SELECT w.id, w.name, w.task, w.dataset, w.created_at, w.state, w.priority,
        w.total_seeds,
        (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
    FROM sweeps w WHERE w.loading_at IS NULL";

pub struct SqliteStore {
    pool: SqlitePool,
    clock: Clock,
    available: Availability,
}

impl SqliteStore {
    /// A converged run's rows: its result, its values added to the running aggregates, its
    /// correctness bitmap and its per-epoch values.
    async fn record_result(
        tx: &mut Transaction<'_, Sqlite>,
        sweep: &str,
        lease: LeaseRef,
        r: &SeedResult,
        now: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO results (sweep_id, seed, fence, test_accuracy, test_loss, train_loss, train_accuracy,
                                  epochs, seconds, worker_id, device, data_fingerprint, finished_at,
                                  precision, deterministic, test_top5, val_loss, val_accuracy,
                                  custom, init_seed, order_seed, augment_seed, split_seed)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18, ?19, init_seed, order_seed, augment_seed, split_seed
             FROM seeds WHERE sweep_id = ?1 AND seed = ?2",
        )
        .bind(sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.test_accuracy)
        .bind(r.test_loss)
        .bind(r.train_loss)
        .bind(r.train_accuracy)
        .bind(r.epochs as i64)
        .bind(r.seconds)
        .bind(&r.worker_id)
        .bind(&r.device)
        .bind(&r.data_fingerprint)
        .bind(now)
        .bind(r.precision.as_str())
        .bind(r.deterministic)
        .bind(r.test_top5)
        .bind(r.val_loss)
        .bind(r.val_accuracy)
        .bind(custom_to_db(&r.custom))
        .execute(&mut **tx)
        .await?;
        for (metric, value) in result_values(r) {
            sqlx::query(sqlx::AssertSqlSafe(AGGREGATE_UPSERT.as_str()))
                .bind(sweep)
                .bind(metric)
                .bind(value)
                .bind(lease.seed)
                .execute(&mut **tx)
                .await?;
        }
        if let Some(c) = &r.test_correct {
            Self::record_bitmap(tx, sweep, lease.seed, c).await?;
        }
        sqlx::query(sqlx::AssertSqlSafe(EPOCH_VALUES_UPSERT.as_str()))
            .bind(sweep)
            .bind(lease.seed)
            .bind(r.epochs as i32)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// A diverged run's row: counted among the sweep's outcomes, in no statistic of the score.
    async fn record_divergence(
        tx: &mut Transaction<'_, Sqlite>,
        sweep: &str,
        lease: LeaseRef,
        r: &SeedResult,
        at: u32,
        now: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO divergences (sweep_id, seed, fence, epoch, epochs, seconds, worker_id, device,
                                      deterministic, finished_at, init_seed, order_seed,
                                      augment_seed, split_seed)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, init_seed, order_seed, augment_seed,
                    split_seed
             FROM seeds WHERE sweep_id = ?1 AND seed = ?2",
        )
        .bind(sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(at as i64)
        .bind(r.epochs as i64)
        .bind(r.seconds)
        .bind(&r.worker_id)
        .bind(&r.device)
        .bind(r.deterministic)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn connect(url: &str, clock: Clock) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        super::migrations::migrator(super::migrations::SQLITE)
            .run(&pool)
            .await?;
        let store = SqliteStore {
            pool,
            available: Availability::new(clock.clone()),
            clock,
        };
        Ok(store)
    }

    /// Stores a recorded result's bitmap and queues it for the sweep's tally.
    async fn record_bitmap(
        tx: &mut Transaction<'_, Sqlite>,
        sweep: &str,
        seed: i64,
        c: &Correctness,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO result_bitmaps (sweep_id, seed, test_examples, test_correct)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(sweep)
        .bind(seed)
        .bind(i64::from(c.examples))
        .bind(&c.bits)
        .execute(&mut **tx)
        .await?;
        sqlx::query("INSERT INTO test_sets_unfolded (sweep_id, seed) VALUES (?1, ?2)")
            .bind(sweep)
            .bind(seed)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Writes one epoch row under `lease` (whose hold was checked).
    async fn insert_epoch(
        tx: &mut Transaction<'_, Sqlite>,
        lease: LeaseRef,
        e: &EpochRecord,
        now: &str,
    ) -> Result<()> {
        // Safe: constant text.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO epoch_metrics (sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss,
                                        test_accuracy, lr, seconds, recorded_at, test_top5, val_loss,
                                        val_accuracy, custom)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) {EPOCH_UPSERT}"
        )))
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(e.epoch as i64)
        .bind(lease.fence)
        .bind(e.train_loss)
        .bind(e.train_accuracy)
        .bind(e.test_loss)
        .bind(e.test_accuracy)
        .bind(e.lr)
        .bind(e.seconds)
        .bind(now)
        .bind(e.test_top5)
        .bind(e.val_loss)
        .bind(e.val_accuracy)
        .bind(custom_to_db(&e.custom))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The store's current time: this host's clock plus the clock offset.
    fn instant(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs_f64(self.clock.offset_seconds().max(0.0))
    }

    /// Now plus `later` seconds, as stored.
    fn at(&self, later: f64) -> String {
        stamp(self.instant(), later)
    }

    fn now(&self) -> String {
        self.at(0.0)
    }

    async fn summary(&self, id: SweepId) -> Result<SweepSummary> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{SUMMARY} AND w.id = ?1")))
            .bind(id.0.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::SweepNotFound(id))?;
        summary_from_row(&row)
    }

    /// Fetches the seed's state and fence, or says the sweep or seed does not exist.
    async fn seed_row(
        tx: &mut Transaction<'_, Sqlite>,
        lease: LeaseRef,
    ) -> Result<(SeedState, i64)> {
        let row = sqlx::query("SELECT state, fence FROM seeds WHERE sweep_id = ?1 AND seed = ?2")
            .bind(lease.sweep_id.0.to_string())
            .bind(lease.seed)
            .fetch_optional(&mut **tx)
            .await?;
        match row {
            Some(r) => Ok((state_from_db(r.try_get("state")?)?, r.try_get("fence")?)),
            None => Err(missing(tx, lease).await),
        }
    }

    /// Fails with StaleLease unless the seed is leased under exactly this fence.
    async fn check_held(tx: &mut Transaction<'_, Sqlite>, lease: LeaseRef) -> Result<()> {
        let (state, fence) = Self::seed_row(tx, lease).await?;
        Ok(policy::check_held(lease, state, fence)?)
    }

    /// Ends one lease without a result and moves the seed where the policy says.
    async fn end_attempt(
        tx: &mut Transaction<'_, Sqlite>,
        now: SystemTime,
        lease: LeaseRef,
        attempts: &Attempts,
        end: AttemptEnd,
        cause: &str,
    ) -> Result<SeedState> {
        let next = next_state(end, attempts);
        let sweep = lease.sweep_id.0.to_string();
        sqlx::query(
            "UPDATE seeds SET state = ?3, failures = ?4, not_before = ?5, worker_id = NULL,
                 lease_expires_at = NULL, updated_at = ?6
             WHERE sweep_id = ?1 AND seed = ?2",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(next.state.as_str())
        .bind(next.failures as i64)
        .bind(next.backoff_seconds.map(|b| stamp(now, b)))
        .bind(stamp(now, 0.0))
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE attempts SET outcome = ?4, ended_at = ?5, cause = ?6
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(end.outcome().as_str())
        .bind(stamp(now, 0.0))
        .bind(cause)
        .execute(&mut **tx)
        .await?;
        Ok(next.state)
    }

    /// [`Store::claim`], expiring overdue leases first when `expire`.
    async fn claim_one(
        &self,
        worker_id: &str,
        tasks: &[Task],
        ttl: Duration,
        expire: bool,
    ) -> Result<ClaimOutcome> {
        // The tasks as a JSON array (NULL: any), read with json_each.
        let tasks = super::task_names(tasks).map(|t| serde_json::json!(t).to_string());
        let mut tx = self.pool.begin().await?;
        // One instant for the whole claim, as PostgreSQL's now() is one per transaction: a seed
        // whose lease expires in this claim can be leased by it.
        let instant = self.instant();
        let now = stamp(instant, 0.0);
        if expire {
            Self::expire_overdue(&mut tx, instant, &now).await?;
        }
        // Active sweeps in service order, then the first one's lowest claimable seed: index
        // searches only. (Written as one statement with EXISTS, SQLite's planner scanned the
        // seeds table, ~30 ms per claim per 100,000 seeds.)
        let sweeps: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM sweeps WHERE state = 'active' AND loading_at IS NULL
               AND (?1 IS NULL OR task IN (SELECT value FROM json_each(?1)))
             ORDER BY priority DESC, seq",
        )
        .bind(&tasks)
        .fetch_all(&mut *tx)
        .await?;
        let mut claimed = None;
        for sweep in &sweeps {
            claimed = sqlx::query(
                "UPDATE seeds SET state = 'leased', fence = fence + 1, worker_id = ?1,
                     lease_expires_at = ?2, not_before = NULL, updated_at = ?3
                 WHERE rowid = (
                     SELECT rowid FROM seeds INDEXED BY seeds_pending
                     WHERE sweep_id = ?4 AND state = 'pending'
                       AND (not_before IS NULL OR not_before <= ?3)
                     ORDER BY seed LIMIT 1)
                 RETURNING sweep_id, seed, fence, init_seed, order_seed, augment_seed, split_seed",
            )
            .bind(worker_id)
            .bind(stamp(instant, ttl.as_secs_f64()))
            .bind(&now)
            .bind(sweep)
            .fetch_optional(&mut *tx)
            .await?;
            if claimed.is_some() {
                break;
            }
        }
        let Some(row) = claimed else {
            let outstanding: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
                 WHERE s.state IN ('pending', 'leased') AND w.state = 'active' AND w.loading_at IS NULL
                   AND (?1 IS NULL OR w.task IN (SELECT value FROM json_each(?1)))",
            )
            .bind(&tasks)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(ClaimOutcome::Empty {
                outstanding: u64_from_db(outstanding),
            });
        };
        let lease = LeaseRef {
            sweep_id: parse_id(row.try_get("sweep_id")?)?,
            seed: row.try_get("seed")?,
            fence: row.try_get("fence")?,
        };
        let key = LeaseKey::random();
        sqlx::query(
            "INSERT INTO attempts (sweep_id, seed, fence, worker_id, started_at, lease_key_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(worker_id)
        .bind(&now)
        .bind(key_hash(&key).to_vec())
        .execute(&mut *tx)
        .await?;
        // The new lease starts with no epoch rows: an earlier lease's partial curve never mixes
        // with this one's in what readers see.
        sqlx::query("DELETE FROM epoch_metrics WHERE sweep_id = ?1 AND seed = ?2 AND fence < ?3")
            .bind(lease.sweep_id.0.to_string())
            .bind(lease.seed)
            .bind(lease.fence)
            .execute(&mut *tx)
            .await?;
        let sweep = sqlx::query("SELECT task, dataset, config FROM sweeps WHERE id = ?1")
            .bind(lease.sweep_id.0.to_string())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let config = lease_config(&sweep.try_get::<String, _>("config")?)?;
        Ok(ClaimOutcome::Leased(Box::new(Lease {
            lease,
            key,
            task: task_from_db(sweep.try_get("task")?)?,
            dataset: sweep.try_get("dataset")?,
            train: config.train,
            factors: factors_from_row(&row)?,
            seed_namespace: config.seed_namespace,
            finetune: config.finetune,
            command: config.command,
        })))
    }

    /// Ends the leases whose deadline has passed by `now` as expired attempts.
    async fn expire_overdue(
        tx: &mut Transaction<'_, Sqlite>,
        instant: SystemTime,
        now: &str,
    ) -> Result<()> {
        let expired = sqlx::query(
            "SELECT s.sweep_id, s.seed, s.fence, s.failures, w.max_attempts,
                    w.retry_backoff_seconds, w.retry_backoff_max_seconds
             FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
             WHERE s.state = 'leased' AND s.lease_expires_at < ?1",
        )
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        for row in &expired {
            let lease = LeaseRef {
                sweep_id: parse_id(row.try_get("sweep_id")?)?,
                seed: row.try_get("seed")?,
                fence: row.try_get("fence")?,
            };
            let attempts = attempts_from_row(row)?;
            Self::end_attempt(
                tx,
                instant,
                lease,
                &attempts,
                AttemptEnd::Expired,
                EXPIRED_CAUSE,
            )
            .await?;
        }
        Ok(())
    }

    /// [`Store::heartbeat`].
    async fn extend(&self, lease: LeaseRef, ttl: Duration) -> Result<()> {
        let done = sqlx::query(
            "UPDATE seeds SET lease_expires_at = ?4, updated_at = ?5
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3 AND state = 'leased'",
        )
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(self.at(ttl.as_secs_f64()))
        .bind(self.now())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let e = Self::seed_row(&mut tx, lease)
            .await
            .err()
            .unwrap_or(StoreError::StaleLease(lease));
        abort(tx, e).await
    }
}

/// `t` plus `later` seconds as stored: UTC ISO 8601 with milliseconds, which sorts in time order.
fn stamp(t: SystemTime, later: f64) -> String {
    humantime::format_rfc3339_millis(t + Duration::from_secs_f64(later.max(0.0))).to_string()
}

async fn missing(tx: &mut Transaction<'_, Sqlite>, lease: LeaseRef) -> StoreError {
    let exists = sqlx::query("SELECT 1 FROM sweeps WHERE id = ?1")
        .bind(lease.sweep_id.0.to_string())
        .fetch_optional(&mut **tx)
        .await;
    match exists {
        Ok(Some(_)) => StoreError::SeedNotFound {
            sweep_id: lease.sweep_id,
            seed: lease.seed,
        },
        Ok(None) => StoreError::SweepNotFound(lease.sweep_id),
        Err(e) => e.into(),
    }
}

fn parse_id(id: &str) -> Result<SweepId> {
    Uuid::parse_str(id)
        .map(SweepId)
        .map_err(|e| StoreError::Corrupt(format!("sweep id `{id}`: {e}")))
}

fn summary_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<SweepSummary> {
    Ok(SweepSummary {
        id: parse_id(row.try_get("id")?)?,
        name: row.try_get("name")?,
        task: task_from_db(row.try_get("task")?)?,
        dataset: row.try_get("dataset")?,
        created_at: row.try_get("created_at")?,
        state: sweep_state_from_db(row.try_get("state")?)?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        total: u64_from_db(row.try_get("total_seeds")?),
        done: u64_from_db(row.try_get("done")?),
    })
}

fn attempts_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Attempts> {
    Ok(Attempts {
        failures: row.try_get::<i64, _>("failures")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        retry: RetrySettings {
            base_seconds: row.try_get("retry_backoff_seconds")?,
            max_seconds: row.try_get("retry_backoff_max_seconds")?,
        },
    })
}

/// The per-example correctness bitmaps of a sweep's results that have one, by seed.
async fn bitmaps<'e>(
    e: impl sqlx::SqliteExecutor<'e>,
    sweep: &str,
) -> Result<Vec<(i64, Correctness)>> {
    let rows = sqlx::query(
        "SELECT seed, test_examples, test_correct FROM result_bitmaps
         WHERE sweep_id = ?1 ORDER BY seed",
    )
    .bind(sweep)
    .fetch_all(e)
    .await?;
    rows.iter().map(bitmap_from_row).collect()
}

/// Inserts seeds that the sweep does not have yet, with their factor seeds under `design`;
/// returns how many were new.
async fn insert_seeds(
    tx: &mut Transaction<'_, Sqlite>,
    id: SweepId,
    seeds: &[i64],
    design: &Design,
) -> Result<u64> {
    let mut added = 0;
    // SQLite binds at most 32766 parameters per statement: insert in chunks.
    for chunk in seed_rows(seeds, design).chunks(5_000) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed) ",
        );
        q.push_values(chunk, |mut b, row| {
            b.push_bind(id.0.to_string());
            for v in row {
                b.push_bind(*v);
            }
        });
        q.push(" ON CONFLICT (sweep_id, seed) DO NOTHING");
        added += q.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(added)
}

#[async_trait]
impl Store for SqliteStore {
    async fn begin_sweep(&self, id: SweepId, spec: &SweepSpec, first: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM sweeps WHERE loading_at < ?1")
            .bind(stamp(self.instant() - ABANDONED_LOAD, 0.0))
            .execute(&self.pool)
            .await?;
        let (score, direction) = super::score_columns(spec);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sweeps (id, seq, name, task, dataset, config, max_attempts, total_seeds,
                                 retry_backoff_seconds, retry_backoff_max_seconds, priority,
                                 loading_at, score, score_direction)
             VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM sweeps), ?2, ?3, ?4, ?5, ?6, ?7,
                     ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .bind(id.0.to_string())
        .bind(&spec.name)
        .bind(spec.task.as_str())
        .bind(&spec.dataset)
        .bind(spec.config_json().to_string())
        .bind(spec.max_attempts as i64)
        .bind(spec.seeds.len() as i64)
        .bind(spec.retry.base_seconds)
        .bind(spec.retry.max_seconds)
        .bind(spec.priority as i64)
        .bind(self.now())
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
        let row = sqlx::query("SELECT state, total_seeds FROM sweeps WHERE id = ?1")
            .bind(id.0.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return abort(tx, StoreError::SweepNotFound(id)).await;
        };
        let total = u64_from_db(row.try_get("total_seeds")?);
        let more = if grow { seeds.len() as u64 } else { 0 };
        let checked = policy::check_open(id, sweep_state_from_db(row.try_get("state")?)?)
            .and_then(|()| policy::check_sweep_size(id, total, more));
        if let Err(refusal) = checked {
            return abort(tx, refusal.into()).await;
        }
        let added = insert_seeds(&mut tx, id, seeds, design).await?;
        sqlx::query(
            "UPDATE sweeps SET total_seeds = total_seeds + ?2,
                 loading_at = CASE WHEN loading_at IS NULL THEN NULL ELSE ?3 END
             WHERE id = ?1",
        )
        .bind(id.0.to_string())
        .bind(if grow { added as i64 } else { 0 })
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn end_loading(&self, id: SweepId) -> Result<()> {
        sqlx::query("UPDATE sweeps SET loading_at = NULL WHERE id = ?1")
            .bind(id.0.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn discard_load(&self, id: SweepId) -> Result<()> {
        sqlx::query("DELETE FROM sweeps WHERE id = ?1 AND loading_at IS NOT NULL")
            .bind(id.0.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn extendable(&self, id: SweepId) -> Result<(Design, u64)> {
        let row = sqlx::query(
            "SELECT state, config, total_seeds FROM sweeps WHERE id = ?1 AND loading_at IS NULL",
        )
        .bind(id.0.to_string())
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
        sqlx::query_scalar("SELECT config FROM sweeps WHERE id = ?1")
            .bind(id.0.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::SweepNotFound(id))
    }

    async fn sweep_progress(&self, id: SweepId) -> Result<SweepProgress> {
        let summary = self.summary(id).await?;
        let mut counts = SeedCounts::default();
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM seeds WHERE sweep_id = ?1 GROUP BY state
             UNION ALL SELECT 'diverged', count(*) FROM divergences WHERE sweep_id = ?1",
        )
        .bind(id.0.to_string())
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
        let rows = sqlx::query(
            "SELECT seed, test_accuracy, test_loss, train_loss, train_accuracy, epochs, seconds, worker_id,
                    device, data_fingerprint, finished_at, precision, deterministic, test_top5,
                    val_loss, val_accuracy, init_seed, order_seed, augment_seed, split_seed, custom
             FROM results WHERE sweep_id = ?1 AND (?2 IS NULL OR seed > ?2)
             ORDER BY seed LIMIT ?3",
        )
        .bind(id.0.to_string())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(result_from_row).collect()
    }

    async fn seed_history(&self, id: SweepId, seed: i64) -> Result<SeedHistory> {
        self.summary(id).await?;
        let state = sqlx::query_scalar("SELECT state FROM seeds WHERE sweep_id = ?1 AND seed = ?2")
            .bind(id.0.to_string())
            .bind(seed)
            .fetch_optional(&self.pool)
            .await?;
        let rows = sqlx::query_as(
            "SELECT fence, worker_id, started_at, ended_at, outcome, cause, log FROM attempts
             WHERE sweep_id = ?1 AND seed = ?2 ORDER BY fence DESC LIMIT ?3",
        )
        .bind(id.0.to_string())
        .bind(seed)
        .bind(super::HISTORY)
        .fetch_all(&self.pool)
        .await?;
        super::seed_history(id, seed, state, rows)
    }

    async fn aggregates(&self, id: SweepId) -> Result<Vec<Aggregate>> {
        // Safe: constant text.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {AGGREGATE_COLUMNS} FROM aggregates WHERE sweep_id = ?1 ORDER BY metric"
        )))
        .bind(id.0.to_string())
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(scores_sql(
            Dialect::Sqlite,
            metric,
            "rowid",
        )))
        .bind(id.0.to_string())
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let last = match rows.last() {
            Some(r) => r.try_get("seq")?,
            None => after,
        };
        let scored = rows.iter().map(scored_from_row).collect::<Result<_>>()?;
        Ok((scored, last))
    }

    async fn outcomes(&self, id: SweepId, metric: Metric) -> Result<Outcomes> {
        self.summary(id).await?;
        let diverged = sqlx::query(sqlx::AssertSqlSafe(diverged_sql(Dialect::Sqlite, metric)))
            .bind(id.0.to_string())
            .fetch_all(&self.pool)
            .await?;
        let counts = sqlx::query(sqlx::AssertSqlSafe(outcome_counts_sql(Dialect::Sqlite)))
            .bind(id.0.to_string())
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
            "SELECT {EPOCH_COLUMNS} FROM epoch_metrics WHERE sweep_id = ?1
               AND (?2 IS NULL OR (seed, epoch) > (?2, ?3))
             ORDER BY seed, epoch LIMIT ?4"
        )))
        .bind(id.0.to_string())
        .bind(after.map(|a| a.0))
        .bind(after.map_or(0, |a| i64::from(a.1)))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(epoch_from_row).collect()
    }

    async fn correctness(&self, id: SweepId) -> Result<Vec<(i64, Correctness)>> {
        bitmaps(&self.pool, &id.0.to_string()).await
    }

    async fn folded_test_sets(&self, id: SweepId) -> Result<Vec<TestSetTally>> {
        test_sets(&self.pool, &id.0.to_string()).await
    }

    async fn fold_tallies(&self, id: SweepId) -> Result<u64> {
        let sweep = id.0.to_string();
        let queued = "SELECT EXISTS (SELECT 1 FROM test_sets_unfolded WHERE sweep_id = ?1)";
        let queued: bool = sqlx::query_scalar(queued)
            .bind(&sweep)
            .fetch_one(&self.pool)
            .await?;
        if !queued {
            return Ok(0);
        }
        // One connection writes: the fold's read, addition and write-back are not interleaved.
        let mut tx = self.pool.begin().await?;
        let mut tallies = Tallies::from_stored(test_sets(&mut *tx, &sweep).await?);
        let mut folded = 0;
        let mut rows = sqlx::query(
            "SELECT b.seed, b.test_examples, b.test_correct
             FROM test_sets_unfolded q JOIN result_bitmaps b ON b.sweep_id = q.sweep_id AND b.seed = q.seed
             WHERE q.sweep_id = ?1",
        )
        .bind(&sweep)
        .fetch(&mut *tx);
        while let Some(row) = rows.next().await {
            tallies.add(&bitmap_from_row(&row?)?.1);
            folded += 1;
        }
        drop(rows);
        sqlx::query("DELETE FROM test_sets_unfolded WHERE sweep_id = ?1")
            .bind(&sweep)
            .execute(&mut *tx)
            .await?;
        for tally in tallies.into_vec() {
            let upsert = sqlx::query(sqlx::AssertSqlSafe(TEST_SET_UPSERT.as_str())).bind(&sweep);
            bind_test_set(upsert, &tally).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(folded)
    }

    async fn unfolded_sweeps(&self) -> Result<Vec<SweepId>> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT sweep_id FROM test_sets_unfolded")
                .fetch_all(&self.pool)
                .await?;
        ids.iter().map(|id| parse_id(id)).collect()
    }

    async fn epoch_values(&self, id: SweepId, metric: Metric) -> Result<Vec<(u32, f64, u64)>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(epoch_values_sql(Dialect::Sqlite)))
            .bind(id.0.to_string())
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
        let sql = epoch_scores_sql(Dialect::Sqlite, metric, seeds.is_some());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.0.to_string());
        if let Some(seeds) = seeds {
            query = query.bind(serde_json::to_string(seeds).unwrap_or_default());
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
                parse_id(row.try_get("sweep_id")?)?,
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
        let mut tx = self.pool.begin().await?;
        let mut verdicts = Vec::with_capacity(rows.len());
        let now = self.now();
        for (lease, e) in rows {
            verdicts.push(match Self::check_held(&mut tx, *lease).await {
                Ok(()) => {
                    Self::insert_epoch(&mut tx, *lease, e, &now).await?;
                    Ok(())
                }
                Err(refused) if refused.is_refusal() => Err(refused),
                Err(other) => return Err(other),
            });
        }
        tx.commit().await?;
        Ok(verdicts)
    }

    async fn complete(&self, lease: LeaseRef, r: &SeedResult) -> Result<CompleteOutcome> {
        let sweep = lease.sweep_id.0.to_string();
        let mut tx = self.pool.begin().await?;
        let verdict = Self::seed_row(&mut tx, lease)
            .await
            .and_then(|(state, fence)| Ok(policy::check_completion(lease, state, fence)?));
        match verdict {
            Ok(Completion::Record) => {}
            Ok(Completion::AlreadyRecorded) => {
                tx.rollback().await?;
                return Ok(CompleteOutcome::AlreadyRecorded);
            }
            Err(e) => return abort(tx, e).await,
        }
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM epoch_metrics WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3
               AND epoch BETWEEN 1 AND ?4",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i64)
        .fetch_one(&mut *tx)
        .await?;
        if let Err(refusal) = policy::check_epochs_recorded(lease, r.epochs, u64_from_db(recorded))
        {
            return abort(tx, refusal.into()).await;
        }
        // Safe: constant text.
        let last = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EPOCH_COLUMNS} FROM epoch_metrics
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3 AND epoch = ?4"
        )))
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i64)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| epoch_from_row(&row).map(|(_, e)| e))
        .transpose()?;
        if let Err(invalid) = policy::check_final_metrics(r, last.as_ref()) {
            return abort(tx, StoreError::Invalid(invalid)).await;
        }
        let now = self.now();
        match r.diverged_epoch {
            None => Self::record_result(&mut tx, &sweep, lease, r, &now).await?,
            Some(at) => Self::record_divergence(&mut tx, &sweep, lease, r, at, &now).await?,
        }
        sqlx::query(
            "UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = ?3
             WHERE sweep_id = ?1 AND seed = ?2",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE attempts SET outcome = 'succeeded', ended_at = ?4
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CompleteOutcome::Recorded)
    }

    async fn lease_key_hash(&self, lease: LeaseRef) -> Result<KeyHash> {
        let row: Option<Option<Vec<u8>>> = sqlx::query_scalar(
            "SELECT lease_key_hash FROM attempts WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3",
        )
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(lease.fence)
        .fetch_optional(&self.pool)
        .await?;
        KeyHash::from_db(row)
    }

    async fn note_log(&self, lease: LeaseRef, log: &str) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET log = ?4 WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3",
        )
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(log)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fail(&self, lease: LeaseRef, cause: &str, charge: Charge) -> Result<SeedState> {
        let sweep = lease.sweep_id.0.to_string();
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::check_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        let row = sqlx::query(
            "SELECT s.failures, w.max_attempts, w.retry_backoff_seconds, w.retry_backoff_max_seconds,
                    EXISTS (SELECT 1 FROM attempts a, attempts me
                            WHERE me.sweep_id = s.sweep_id AND me.seed = s.seed AND me.fence = s.fence
                              AND a.sweep_id = s.sweep_id AND a.seed = s.seed AND a.fence <> s.fence
                              AND a.outcome = 'failed' AND a.cause = ?3
                              AND a.worker_id <> me.worker_id) AS repeated
             FROM seeds s JOIN sweeps w ON w.id = s.sweep_id
             WHERE s.sweep_id = ?1 AND s.seed = ?2",
        )
        .bind(&sweep)
        .bind(lease.seed)
        .bind(cause)
        .fetch_one(&mut *tx)
        .await?;
        let end = charge.end(row.try_get("repeated")?);
        let attempts = attempts_from_row(&row)?;
        let state =
            Self::end_attempt(&mut tx, self.instant(), lease, &attempts, end, cause).await?;
        tx.commit().await?;
        Ok(state)
    }

    async fn set_sweep_state(&self, id: SweepId, state: SweepState) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current: Option<String> = sqlx::query_scalar("SELECT state FROM sweeps WHERE id = ?1")
            .bind(id.0.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = current else {
            return abort(tx, StoreError::SweepNotFound(id)).await;
        };
        if let Err(refusal) = policy::check_sweep_change(id, sweep_state_from_db(&current)?, state)
        {
            return abort(tx, refusal.into()).await;
        }
        let now = self.now();
        sqlx::query("UPDATE sweeps SET state = ?2 WHERE id = ?1")
            .bind(id.0.to_string())
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?;
        if state == SweepState::Cancelled {
            sqlx::query(
                "UPDATE attempts SET outcome = 'cancelled', ended_at = ?2, cause = 'sweep cancelled'
                 WHERE sweep_id = ?1 AND outcome = 'running'",
            )
            .bind(id.0.to_string())
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE seeds SET state = 'cancelled', worker_id = NULL, lease_expires_at = NULL,
                     not_before = NULL, updated_at = ?2
                 WHERE sweep_id = ?1 AND state IN ('pending', 'leased')",
            )
            .bind(id.0.to_string())
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Ends a transaction that must not commit and returns `e`. Rolling back explicitly releases its
/// locks now, not whenever the pool next hands out the connection.
async fn abort<T>(tx: Transaction<'_, Sqlite>, e: StoreError) -> Result<T> {
    tx.rollback().await?;
    Err(e)
}

/// The sweep's stored tallies, by test-set size.
async fn test_sets<'e>(
    db: impl sqlx::SqliteExecutor<'e>,
    sweep: &str,
) -> Result<Vec<TestSetTally>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TEST_SET_COLUMNS} FROM test_sets WHERE sweep_id = ?1 ORDER BY examples"
    )))
    .bind(sweep)
    .fetch_all(db)
    .await?;
    rows.iter().map(test_set_from_row).collect()
}
