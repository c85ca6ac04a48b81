//! Connections for the lease cycle's statements, kept between statements rather than taken
//! from sqlx's pool. The pool pings a connection as it hands it out and again as it takes it
//! back: three round trips for one statement, each waiting its turn for a CPU on a busy host
//! (without them, and with migration 0012, the 16-worker closed loop went from 0.40x to 0.51x
//! of bare SQL; BENCHMARKS.md, the twelfth run). Here a connection in use a moment ago is trusted as it is; one idle longer is
//! pinged first, as a pool would, so a connection the server or a firewall dropped while idle
//! is replaced rather than failing a statement. One cut within a second of its last use (the
//! server restarting under load) fails the statement it is lent for, which the caller sees as
//! the outage it is, and is closed.

use super::super::{Result, StoreError};
use super::ACQUIRE_TIMEOUT;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor};
use std::time::{Duration, Instant};

/// A set of at most `most` connections, opened as needed.
pub(super) struct Connections {
    options: PgConnectOptions,
    /// Run on each new connection.
    setup: Option<&'static str>,
    /// Idle connections and since when, the most recently used last.
    held: std::sync::Mutex<Vec<(PgConnection, Instant)>>,
    lent: tokio::sync::Semaphore,
}

/// A connection of [`Connections`], lent out. [`Lent::done`] gives it back for the next
/// statement; dropped without that (the statement failed, or was cancelled part way, which may
/// leave the connection mid-exchange), it is closed.
pub(super) struct Lent<'a> {
    conn: PgConnection,
    home: &'a Connections,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Connections {
    /// Idle for less than this, a connection is lent without a ping.
    const TRUSTED: Duration = Duration::from_secs(1);
    /// Idle for longer than this, a connection is closed.
    const IDLE: Duration = Duration::from_secs(600);

    /// `setup` runs on each new connection.
    pub(super) fn new(
        options: PgConnectOptions,
        most: usize,
        setup: Option<&'static str>,
    ) -> Connections {
        Connections {
            options,
            setup,
            held: Default::default(),
            lent: tokio::sync::Semaphore::new(most),
        }
    }

    /// A connection kept (pinged first if idle a while), or a new one; an outage
    /// (`PoolTimedOut`, as sqlx's pool says) if none is to be had within [`ACQUIRE_TIMEOUT`].
    pub(super) async fn take(&self) -> Result<Lent<'_>> {
        tokio::time::timeout(ACQUIRE_TIMEOUT, self.lend())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(StoreError::from)
    }

    async fn lend(&self) -> std::result::Result<Lent<'_>, sqlx::Error> {
        let permit = self
            .lent
            .acquire()
            .await
            .expect("the semaphore is never closed");
        while let Some((mut conn, since)) = self.kept() {
            if since.elapsed() < Self::TRUSTED || conn.ping().await.is_ok() {
                return Ok(self.lend_out(conn, permit));
            }
        }
        let mut conn = PgConnection::connect_with(&self.options).await?;
        if let Some(setup) = self.setup {
            conn.execute(setup).await?;
        }
        Ok(self.lend_out(conn, permit))
    }

    fn lend_out<'a>(
        &'a self,
        conn: PgConnection,
        permit: tokio::sync::SemaphorePermit<'a>,
    ) -> Lent<'a> {
        Lent {
            conn,
            home: self,
            _permit: permit,
        }
    }

    /// The most recently used idle connection; those idle past [`Self::IDLE`] are closed.
    fn kept(&self) -> Option<(PgConnection, Instant)> {
        let mut held = self.held();
        let stale = held
            .iter()
            .take_while(|(_, since)| since.elapsed() > Self::IDLE)
            .count();
        for (conn, _) in held.drain(..stale) {
            tokio::spawn(conn.close());
        }
        held.pop()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<(PgConnection, Instant)>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Lent<'_> {
    /// The statement ran: the connection is kept for the next.
    pub(super) fn done(self) {
        self.home.held().push((self.conn, Instant::now()));
    }
}

impl std::ops::Deref for Lent<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
