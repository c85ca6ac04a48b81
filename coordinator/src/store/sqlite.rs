//! The SQLite store: one file, one host. All access goes through a single connection, so every
//! transaction is serialised and no claim can race another.

use super::{Result, Store, StoreError, state_from_db, train_from_config, u64_from_db};
use crate::domain::{
    ClaimOutcome, CompleteOutcome, EpochRecord, Lease, LeaseRef, SeedCounts, SeedResult, SeedState,
    SweepId, SweepProgress, SweepSummary,
};
use crate::spec::SweepSpec;
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The current time as stored: UTC ISO 8601 with milliseconds, which sorts in time order.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self> {
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
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    async fn summary(&self, id: SweepId) -> Result<SweepSummary> {
        let row = sqlx::query(
            "SELECT w.id, w.name, w.task, w.dataset, w.created_at, w.total_seeds,
                    (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
             FROM sweeps w WHERE w.id = ?1",
        )
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
        match Self::seed_row(tx, lease).await? {
            (SeedState::Leased, fence) if fence == lease.fence => Ok(()),
            _ => Err(StoreError::StaleLease(lease)),
        }
    }
}

async fn missing(conn: &mut sqlx::SqliteConnection, lease: LeaseRef) -> StoreError {
    let exists = sqlx::query("SELECT 1 FROM sweeps WHERE id = ?1")
        .bind(lease.sweep_id.0.to_string())
        .fetch_optional(conn)
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

fn summary_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<SweepSummary> {
    let id: String = row.try_get("id")?;
    Ok(SweepSummary {
        id: SweepId(
            Uuid::parse_str(&id)
                .map_err(|e| StoreError::Corrupt(format!("sweep id `{id}`: {e}")))?,
        ),
        name: row.try_get("name")?,
        task: row.try_get("task")?,
        dataset: row.try_get("dataset")?,
        created_at: row.try_get("created_at")?,
        total: u64_from_db(row.try_get("total_seeds")?),
        done: u64_from_db(row.try_get("done")?),
    })
}

fn ttl_modifier(ttl: Duration) -> String {
    format!("+{:.3} seconds", ttl.as_secs_f64())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_sweep(&self, id: SweepId, spec: &SweepSpec) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sweeps (id, seq, name, task, dataset, config, max_attempts, total_seeds)
             VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM sweeps), ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(id.0.to_string())
        .bind(&spec.name)
        .bind(spec.task.as_str())
        .bind(&spec.dataset)
        .bind(spec.config_json().to_string())
        .bind(spec.max_attempts as i64)
        .bind(spec.seeds.len() as i64)
        .execute(&mut *tx)
        .await?;
        // SQLite binds at most 32766 parameters per statement: insert in chunks.
        for chunk in spec.seeds.as_slice().chunks(10_000) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new("INSERT INTO seeds (sweep_id, seed) ");
            q.push_values(chunk, |mut b, seed| {
                b.push_bind(id.0.to_string()).push_bind(*seed);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepSummary>> {
        let rows = sqlx::query(
            "SELECT w.id, w.name, w.task, w.dataset, w.created_at, w.total_seeds,
                    (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
             FROM sweeps w ORDER BY w.seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn sweep_progress(&self, id: SweepId) -> Result<SweepProgress> {
        let summary = self.summary(id).await?;
        let mut counts = SeedCounts::default();
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM seeds WHERE sweep_id = ?1 GROUP BY state",
        )
        .bind(id.0.to_string())
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let n = u64_from_db(row.try_get("n")?);
            match state_from_db(row.try_get("state")?)? {
                SeedState::Pending => counts.pending = n,
                SeedState::Leased => counts.leased = n,
                SeedState::Done => counts.done = n,
                SeedState::Failed => counts.failed = n,
            }
        }
        let accuracies = sqlx::query(
            "SELECT seed, test_accuracy FROM results WHERE sweep_id = ?1 ORDER BY seed",
        )
        .bind(id.0.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("seed")?, r.try_get("test_accuracy")?)))
        .collect::<Result<_>>()?;
        Ok(SweepProgress {
            summary,
            counts,
            accuracies,
        })
    }

    async fn list_results(&self, id: SweepId) -> Result<Vec<SeedResult>> {
        self.summary(id).await?;
        let rows = sqlx::query(
            "SELECT seed, test_accuracy, test_loss, train_loss, train_accuracy, epochs, seconds, worker_id,
                    device, data_fingerprint, finished_at
             FROM results WHERE sweep_id = ?1 ORDER BY seed",
        )
        .bind(id.0.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SeedResult {
                    seed: r.try_get("seed")?,
                    test_accuracy: r.try_get("test_accuracy")?,
                    test_loss: r.try_get("test_loss")?,
                    train_loss: r.try_get("train_loss")?,
                    train_accuracy: r.try_get("train_accuracy")?,
                    epochs: r.try_get::<i64, _>("epochs")? as u32,
                    seconds: r.try_get("seconds")?,
                    worker_id: r.try_get("worker_id")?,
                    device: r.try_get("device")?,
                    data_fingerprint: r.try_get("data_fingerprint")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect()
    }

    async fn claim(&self, worker_id: &str, ttl: Duration) -> Result<ClaimOutcome> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(concat!(
            "UPDATE attempts SET outcome = 'expired', ended_at = ", now!(), ", cause = 'lease expired: no heartbeat before its deadline'
             WHERE outcome = 'running' AND EXISTS (
                 SELECT 1 FROM seeds s WHERE s.sweep_id = attempts.sweep_id AND s.seed = attempts.seed
                   AND s.fence = attempts.fence AND s.state = 'leased' AND s.lease_expires_at < ", now!(), ")"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE seeds SET
                 state = CASE WHEN failures + 1 >= (SELECT max_attempts FROM sweeps WHERE id = seeds.sweep_id)
                              THEN 'failed' ELSE 'pending' END,
                 failures = failures + 1, worker_id = NULL, lease_expires_at = NULL, updated_at = ", now!(), "
             WHERE state = 'leased' AND lease_expires_at < ", now!(), ""
        ))
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(concat!(
            "UPDATE seeds SET state = 'leased', fence = fence + 1, worker_id = ?1,
                 lease_expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2), updated_at = ", now!(), "
             WHERE rowid = (
                 SELECT s.rowid FROM seeds s
                 WHERE s.state = 'pending' AND s.sweep_id = (
                     SELECT w.id FROM sweeps w
                     WHERE EXISTS (SELECT 1 FROM seeds p WHERE p.sweep_id = w.id AND p.state = 'pending')
                     ORDER BY w.seq LIMIT 1)
                 ORDER BY s.seed LIMIT 1)
             RETURNING sweep_id, seed, fence"
        ))
        .bind(worker_id)
        .bind(ttl_modifier(ttl))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = claimed else {
            let outstanding: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM seeds WHERE state IN ('pending', 'leased')",
            )
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(ClaimOutcome::Empty {
                outstanding: u64_from_db(outstanding),
            });
        };
        let sweep_id: String = row.try_get("sweep_id")?;
        let (seed, fence): (i64, i64) = (row.try_get("seed")?, row.try_get("fence")?);
        sqlx::query(
            "INSERT INTO attempts (sweep_id, seed, fence, worker_id) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&sweep_id)
        .bind(seed)
        .bind(fence)
        .bind(worker_id)
        .execute(&mut *tx)
        .await?;
        let sweep = sqlx::query("SELECT task, dataset, config FROM sweeps WHERE id = ?1")
            .bind(&sweep_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let config: String = sweep.try_get("config")?;
        let lease = Lease {
            lease: LeaseRef {
                sweep_id: SweepId(
                    Uuid::parse_str(&sweep_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ),
                seed,
                fence,
            },
            task: sweep.try_get("task")?,
            dataset: sweep.try_get("dataset")?,
            train: train_from_config(&config)?,
        };
        Ok(ClaimOutcome::Leased(Box::new(lease)))
    }

    async fn heartbeat(&self, lease: LeaseRef, ttl: Duration) -> Result<()> {
        let done = sqlx::query(concat!(
            "UPDATE seeds SET lease_expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?4), updated_at = ", now!(), "
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3 AND state = 'leased'"
        ))
        .bind(lease.sweep_id.0.to_string())
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(ttl_modifier(ttl))
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

    async fn record_epoch(&self, lease: LeaseRef, e: &EpochRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::check_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        sqlx::query(
            "INSERT INTO epoch_metrics (sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss,
                                        test_accuracy, lr, seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (sweep_id, seed, epoch) DO UPDATE SET
                 fence = excluded.fence, train_loss = excluded.train_loss,
                 train_accuracy = excluded.train_accuracy, test_loss = excluded.test_loss,
                 test_accuracy = excluded.test_accuracy, lr = excluded.lr, seconds = excluded.seconds,
                 recorded_at = excluded.recorded_at
             WHERE epoch_metrics.fence <= excluded.fence",
        )
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
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn complete(&self, lease: LeaseRef, r: &SeedResult) -> Result<CompleteOutcome> {
        let sweep = lease.sweep_id.0.to_string();
        let mut tx = self.pool.begin().await?;
        match Self::seed_row(&mut tx, lease).await {
            Ok((SeedState::Leased, fence)) if fence == lease.fence => {}
            Ok((SeedState::Done, fence)) if fence == lease.fence => {
                tx.rollback().await?;
                return Ok(CompleteOutcome::AlreadyRecorded);
            }
            Ok(_) => return abort(tx, StoreError::StaleLease(lease)).await,
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
        if recorded != r.epochs as i64 {
            return abort(tx, StoreError::Conflict(format!(
                "{lease}: the result claims {} epochs but {recorded} epochs of metrics were recorded under this lease",
                r.epochs
            ))).await;
        }
        sqlx::query(
            "INSERT INTO results (sweep_id, seed, fence, test_accuracy, test_loss, train_loss, train_accuracy,
                                  epochs, seconds, worker_id, device, data_fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .bind(&sweep)
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
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = ",
            now!(),
            "
             WHERE sweep_id = ?1 AND seed = ?2"
        ))
        .bind(&sweep)
        .bind(lease.seed)
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE attempts SET outcome = 'succeeded', ended_at = ",
            now!(),
            "
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3"
        ))
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CompleteOutcome::Recorded)
    }

    async fn fail(
        &self,
        lease: LeaseRef,
        cause: &str,
        counts_as_attempt: bool,
    ) -> Result<SeedState> {
        let sweep = lease.sweep_id.0.to_string();
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::check_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        let state: String = sqlx::query_scalar(concat!(
            "UPDATE seeds SET
                 state = CASE WHEN ?3 AND failures + 1 >= (SELECT max_attempts FROM sweeps WHERE id = seeds.sweep_id)
                              THEN 'failed' ELSE 'pending' END,
                 failures = failures + ?3, worker_id = NULL, lease_expires_at = NULL, updated_at = ", now!(), "
             WHERE sweep_id = ?1 AND seed = ?2
             RETURNING state"
        ))
        .bind(&sweep)
        .bind(lease.seed)
        .bind(counts_as_attempt)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE attempts SET outcome = ?4, ended_at = ",
            now!(),
            ", cause = ?5
             WHERE sweep_id = ?1 AND seed = ?2 AND fence = ?3"
        ))
        .bind(&sweep)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(if counts_as_attempt {
            "failed"
        } else {
            "released"
        })
        .bind(cause)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        state_from_db(&state)
    }
}

/// Ends a transaction that must not commit and returns `e`. Rolling back explicitly releases its
/// row locks now, not whenever the pool next hands out the connection.
async fn abort<T>(tx: Transaction<'_, Sqlite>, e: StoreError) -> Result<T> {
    tx.rollback().await?;
    Err(e)
}
