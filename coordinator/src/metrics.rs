//! The coordinator's Prometheus metrics. Two kinds:
//! - read from the database at each scrape, the same on every replica (aggregate with `max`):
//!   `seedsweep_seeds{sweep,name,state}`, `seedsweep_leases_expired`;
//! - counted by this replica (aggregate with `sum`): leases granted, claim latency, results
//!   recorded (results per second: `rate(seedsweep_results_total[1m])`), connected workers.

use crate::store::Store;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    seeds: Family<Labels, Gauge>,
    leases_expired: Gauge,
    leases_granted: Counter,
    claim_seconds: Histogram,
    results: Counter,
    workers_connected: Gauge,
    /// When each worker last called; a worker is connected while this is within `window`.
    seen: Mutex<Seen>,
    window: Duration,
}

/// The workers seen, pruned of those past the window whenever the map doubles, so that it stays
/// within twice the workers of one window (plus [`Seen::FLOOR`]) however many ids come and go
/// between scrapes, at an amortised constant cost per call.
#[derive(Default)]
struct Seen {
    at: HashMap<String, Instant>,
    prune_at: usize,
}

impl Seen {
    const FLOOR: usize = 1024;

    fn saw(&mut self, worker: &str, window: Duration) {
        match self.at.get_mut(worker) {
            Some(t) => *t = Instant::now(),
            None => {
                self.at.insert(worker.to_string(), Instant::now());
            }
        }
        if self.at.len() >= self.prune_at.max(Self::FLOOR) {
            self.prune(window);
            self.prune_at = 2 * self.at.len();
        }
    }

    /// Forgets the workers that have not called within `window`; returns how many remain.
    fn prune(&mut self, window: Duration) -> usize {
        self.at.retain(|_, t| t.elapsed() <= window);
        self.at.len()
    }
}

impl Metrics {
    /// `window`: how recently a worker must have called to count as connected (the lease TTL:
    /// a worker holding a lease heartbeats well within it).
    pub fn new(window: Duration) -> Metrics {
        let mut registry = Registry::with_prefix("seedsweep");
        let seeds = Family::<Labels, Gauge>::default();
        registry.register(
            "seeds",
            "Seeds per state of each sweep not cancelled (from the database)",
            seeds.clone(),
        );
        let leases_expired = Gauge::default();
        registry.register(
            "leases_expired",
            "Leases that ran out without a heartbeat, all sweeps, ever (from the database)",
            leases_expired.clone(),
        );
        let leases_granted = Counter::default();
        registry.register(
            "leases_granted",
            "Seeds leased by this replica",
            leases_granted.clone(),
        );
        let claim_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "claim_seconds",
            "Time to answer LeaseSeed on this replica, leased or not",
            claim_seconds.clone(),
        );
        let results = Counter::default();
        registry.register(
            "results",
            "Seed results recorded by this replica (first deliveries only)",
            results.clone(),
        );
        let workers_connected = Gauge::default();
        registry.register(
            "workers_connected",
            "Workers that called this replica within the lease TTL",
            workers_connected.clone(),
        );
        Metrics {
            registry,
            seeds,
            leases_expired,
            leases_granted,
            claim_seconds,
            results,
            workers_connected,
            seen: Mutex::default(),
            window,
        }
    }

    /// A LeaseSeed call took `elapsed`; `leased` whether it handed out a seed.
    pub fn claimed(&self, elapsed: Duration, leased: bool) {
        self.claim_seconds.observe(elapsed.as_secs_f64());
        if leased {
            self.leases_granted.inc();
        }
    }

    pub fn result_recorded(&self) {
        self.results.inc();
    }

    /// A worker called (lease, heartbeat, complete or fail).
    pub fn saw_worker(&self, worker: &str) {
        let mut seen = self.seen.lock().expect("metrics lock");
        seen.saw(worker, self.window);
    }

    /// The page for one scrape: database counts read now, this replica's counters as they are.
    pub async fn render(&self, store: &dyn Store) -> Result<String, String> {
        let fleet = store
            .fleet_counts()
            .await
            .map_err(|e| format!("database unavailable: {e}"))?;
        self.seeds.clear();
        for (id, name, state, n) in fleet.seeds {
            let labels = vec![
                ("sweep", id.to_string()),
                ("name", name),
                ("state", state.as_str().to_string()),
            ];
            self.seeds.get_or_create(&labels).set(n as i64);
        }
        self.leases_expired.set(fleet.expired_leases as i64);
        {
            let mut seen = self.seen.lock().expect("metrics lock");
            let connected = seen.prune(self.window);
            self.workers_connected.set(connected as i64);
        }
        Ok(seedsweep_ops::encode(&self.registry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids that come and go without a scrape leave a bounded map behind.
    #[test]
    fn workers_seen_stay_bounded_without_scrapes() {
        let mut seen = Seen::default();
        for i in 0..100_000 {
            seen.saw(&format!("worker-{i}"), Duration::ZERO);
            assert!(seen.at.len() <= 2 * Seen::FLOOR, "{} at {i}", seen.at.len());
        }
        let mut live = Seen::default();
        for i in 0..3_000 {
            live.saw(&format!("worker-{i}"), Duration::from_secs(3600));
        }
        assert_eq!(
            live.prune(Duration::from_secs(3600)),
            3_000,
            "live workers are kept"
        );
    }
}
