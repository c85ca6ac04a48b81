//! The PostgreSQL store: many workers, any number of coordinators over one database. Claims use
//! `FOR UPDATE SKIP LOCKED`, so concurrent coordinators never lease one seed twice; every fenced
//! write locks the seed's row first, so it cannot interleave with a re-lease.

use super::{Result, Store, StoreError, state_from_db, train_from_config, u64_from_db};
use crate::domain::{
    ClaimOutcome, CompleteOutcome, EpochRecord, Lease, LeaseRef, SeedCounts, SeedResult, SeedState,
    SweepId, SweepProgress, SweepSummary,
};
use crate::spec::SweepSpec;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

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

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name("seedsweep-coordinator");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore { pool })
    }

    async fn summary(&self, id: SweepId) -> Result<SweepSummary> {
        let row = sqlx::query(concat!(
            "SELECT w.id, w.name, w.task, w.dataset, ",
            iso!("w.created_at"),
            " AS created_at, w.total_seeds,
                (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
             FROM sweeps w WHERE w.id = $1"
        ))
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

    async fn lock_held(tx: &mut Transaction<'_, Postgres>, lease: LeaseRef) -> Result<()> {
        match Self::lock_seed(tx, lease).await? {
            (SeedState::Leased, fence) if fence == lease.fence => Ok(()),
            _ => Err(StoreError::StaleLease(lease)),
        }
    }
}

fn summary_from_row(row: &PgRow) -> Result<SweepSummary> {
    Ok(SweepSummary {
        id: SweepId(row.try_get("id")?),
        name: row.try_get("name")?,
        task: row.try_get("task")?,
        dataset: row.try_get("dataset")?,
        created_at: row.try_get("created_at")?,
        total: u64_from_db(row.try_get("total_seeds")?),
        done: u64_from_db(row.try_get("done")?),
    })
}

#[async_trait]
impl Store for PgStore {
    async fn create_sweep(&self, id: SweepId, spec: &SweepSpec) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sweeps (id, name, task, dataset, config, max_attempts, total_seeds)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)",
        )
        .bind(id.0)
        .bind(&spec.name)
        .bind(spec.task.as_str())
        .bind(&spec.dataset)
        .bind(spec.config_json().to_string())
        .bind(spec.max_attempts as i32)
        .bind(spec.seeds.len() as i64)
        .execute(&mut *tx)
        .await?;
        for chunk in spec.seeds.as_slice().chunks(50_000) {
            sqlx::query("INSERT INTO seeds (sweep_id, seed) SELECT $1, unnest($2::bigint[])")
                .bind(id.0)
                .bind(chunk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_sweeps(&self) -> Result<Vec<SweepSummary>> {
        let rows = sqlx::query(concat!(
            "SELECT w.id, w.name, w.task, w.dataset, ",
            iso!("w.created_at"),
            " AS created_at, w.total_seeds,
                (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done
             FROM sweeps w ORDER BY w.seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn sweep_progress(&self, id: SweepId) -> Result<SweepProgress> {
        let summary = self.summary(id).await?;
        let mut counts = SeedCounts::default();
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM seeds WHERE sweep_id = $1 GROUP BY state",
        )
        .bind(id.0)
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
            "SELECT seed, test_accuracy FROM results WHERE sweep_id = $1 ORDER BY seed",
        )
        .bind(id.0)
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
        let rows = sqlx::query(concat!(
            "SELECT seed, test_accuracy, test_loss, train_loss, train_accuracy, epochs, seconds, worker_id,
                    device, data_fingerprint, ",
            iso!("finished_at"),
            " AS finished_at FROM results WHERE sweep_id = $1 ORDER BY seed"
        ))
        .bind(id.0)
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
                    epochs: r.try_get::<i32, _>("epochs")? as u32,
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
        // Concurrent claims may both find the same overdue lease; the row lock serialises them and
        // the second re-checks `state = 'leased'` and skips it, so each expiry counts once.
        sqlx::query(
            "WITH expired AS (
                 UPDATE seeds s SET
                     state = CASE WHEN s.failures + 1 >= w.max_attempts THEN 'failed' ELSE 'pending' END,
                     failures = s.failures + 1, worker_id = NULL, lease_expires_at = NULL, updated_at = now()
                 FROM sweeps w
                 WHERE w.id = s.sweep_id AND s.state = 'leased' AND s.lease_expires_at < now()
                 RETURNING s.sweep_id, s.seed, s.fence)
             UPDATE attempts a SET outcome = 'expired', ended_at = now(),
                 cause = 'lease expired: no heartbeat before its deadline'
             FROM expired e
             WHERE a.sweep_id = e.sweep_id AND a.seed = e.seed AND a.fence = e.fence AND a.outcome = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(
            "WITH next AS (
                 SELECT c.sweep_id, c.seed
                 FROM (SELECT id FROM sweeps ORDER BY seq) w
                 CROSS JOIN LATERAL (
                     SELECT sweep_id, seed FROM seeds
                     WHERE sweep_id = w.id AND state = 'pending'
                     ORDER BY seed LIMIT 1 FOR UPDATE SKIP LOCKED) c
                 LIMIT 1)
             UPDATE seeds s SET state = 'leased', fence = s.fence + 1, worker_id = $1,
                 lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
             FROM next
             WHERE s.sweep_id = next.sweep_id AND s.seed = next.seed
             RETURNING s.sweep_id, s.seed, s.fence",
        )
        .bind(worker_id)
        .bind(ttl.as_secs_f64())
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
        let lease = LeaseRef {
            sweep_id: SweepId(row.try_get("sweep_id")?),
            seed: row.try_get("seed")?,
            fence: row.try_get("fence")?,
        };
        sqlx::query(
            "INSERT INTO attempts (sweep_id, seed, fence, worker_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(worker_id)
        .execute(&mut *tx)
        .await?;
        let sweep =
            sqlx::query("SELECT task, dataset, config::text AS config FROM sweeps WHERE id = $1")
                .bind(lease.sweep_id.0)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        let config: String = sweep.try_get("config")?;
        Ok(ClaimOutcome::Leased(Box::new(Lease {
            lease,
            task: sweep.try_get("task")?,
            dataset: sweep.try_get("dataset")?,
            train: train_from_config(&config)?,
        })))
    }

    async fn heartbeat(&self, lease: LeaseRef, ttl: Duration) -> Result<()> {
        let done = sqlx::query(
            "UPDATE seeds SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3 AND state = 'leased'",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
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

    async fn record_epoch(&self, lease: LeaseRef, e: &EpochRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::lock_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        sqlx::query(
            "INSERT INTO epoch_metrics (sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss,
                                        test_accuracy, lr, seconds)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (sweep_id, seed, epoch) DO UPDATE SET
                 fence = excluded.fence, train_loss = excluded.train_loss,
                 train_accuracy = excluded.train_accuracy, test_loss = excluded.test_loss,
                 test_accuracy = excluded.test_accuracy, lr = excluded.lr, seconds = excluded.seconds,
                 recorded_at = excluded.recorded_at
             WHERE epoch_metrics.fence <= excluded.fence",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(e.epoch as i32)
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
        let mut tx = self.pool.begin().await?;
        match Self::lock_seed(&mut tx, lease).await {
            Ok((SeedState::Leased, fence)) if fence == lease.fence => {}
            Ok((SeedState::Done, fence)) if fence == lease.fence => {
                tx.rollback().await?;
                return Ok(CompleteOutcome::AlreadyRecorded);
            }
            Ok(_) => return abort(tx, StoreError::StaleLease(lease)).await,
            Err(e) => return abort(tx, e).await,
        }
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM epoch_metrics WHERE sweep_id = $1 AND seed = $2 AND fence = $3
               AND epoch BETWEEN 1 AND $4",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(lease.fence)
        .bind(r.epochs as i32)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = now()
             WHERE sweep_id = $1 AND seed = $2",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE attempts SET outcome = 'succeeded', ended_at = now()
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
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
        let mut tx = self.pool.begin().await?;
        if let Err(e) = Self::lock_held(&mut tx, lease).await {
            return abort(tx, e).await;
        }
        let state: String = sqlx::query_scalar(
            "UPDATE seeds s SET
                 state = CASE WHEN $3 AND s.failures + 1 >= w.max_attempts THEN 'failed' ELSE 'pending' END,
                 failures = s.failures + CASE WHEN $3 THEN 1 ELSE 0 END,
                 worker_id = NULL, lease_expires_at = NULL, updated_at = now()
             FROM sweeps w
             WHERE w.id = s.sweep_id AND s.sweep_id = $1 AND s.seed = $2
             RETURNING s.state",
        )
        .bind(lease.sweep_id.0)
        .bind(lease.seed)
        .bind(counts_as_attempt)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE attempts SET outcome = $4, ended_at = now(), cause = $5
             WHERE sweep_id = $1 AND seed = $2 AND fence = $3",
        )
        .bind(lease.sweep_id.0)
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
async fn abort<T>(tx: Transaction<'_, Postgres>, e: StoreError) -> Result<T> {
    tx.rollback().await?;
    Err(e)
}
