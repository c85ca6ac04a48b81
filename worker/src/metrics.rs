//! The worker's Prometheus metrics (`--metrics-listen`): the seeds it is training (one series
//! per seed, removed when the seed ends), their training speed, and how long seeds take.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

pub struct WorkerMetrics {
    registry: Registry,
    current: Family<Labels, Gauge>,
    images_per_second: Family<Labels, Gauge<f64, AtomicU64>>,
    seed_seconds: Histogram,
    finished: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("seedsweep_worker");
        let current = Family::<Labels, Gauge>::default();
        registry.register(
            "current_seed",
            "1 for each seed this worker is training (labels: sweep, seed)",
            current.clone(),
        );
        let images_per_second = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "images_per_second",
            "Training images per second over the seed's last epoch, evaluation included (task resnet9)",
            images_per_second.clone(),
        );
        let seed_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "seed_seconds",
            "Wall time of each seed trained to a result",
            seed_seconds.clone(),
        );
        let finished = Counter::default();
        registry.register(
            "seeds_finished",
            "Seeds this worker trained to a result the coordinator accepted",
            finished.clone(),
        );
        WorkerMetrics {
            registry,
            current,
            images_per_second,
            seed_seconds,
            finished,
        }
    }
}

fn labels(sweep: &str, seed: i64) -> Labels {
    vec![("sweep", sweep.to_string()), ("seed", seed.to_string())]
}

impl WorkerMetrics {
    pub fn started(&self, sweep: &str, seed: i64) {
        self.current.get_or_create(&labels(sweep, seed)).set(1);
    }

    /// An epoch of `images` training images took `seconds`.
    pub fn epoch(&self, sweep: &str, seed: i64, images: u64, seconds: f64) {
        if seconds > 0.0 {
            self.images_per_second
                .get_or_create(&labels(sweep, seed))
                .set(images as f64 / seconds);
        }
    }

    /// The seed's lease ended; `finished_in`: its training time when it ended with a result.
    pub fn ended(&self, sweep: &str, seed: i64, finished_in: Option<f64>) {
        let l = labels(sweep, seed);
        self.current.remove(&l);
        self.images_per_second.remove(&l);
        if let Some(s) = finished_in {
            self.seed_seconds.observe(s);
            self.finished.inc();
        }
    }

    pub fn render(&self) -> String {
        seedsweep_ops::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_shown_while_it_trains_and_counted_when_it_finishes() {
        let m = WorkerMetrics::default();
        m.started("s1", 7);
        m.epoch("s1", 7, 5000, 2.0);
        let page = m.render();
        assert!(
            page.contains(r#"seedsweep_worker_current_seed{sweep="s1",seed="7"} 1"#),
            "{page}"
        );
        assert!(
            page.contains(r#"seedsweep_worker_images_per_second{sweep="s1",seed="7"} 2500.0"#),
            "{page}"
        );
        m.ended("s1", 7, Some(30.0));
        let page = m.render();
        assert!(!page.contains("seed=\"7\""), "{page}");
        assert!(
            page.contains("seedsweep_worker_seeds_finished_total 1"),
            "{page}"
        );
        assert!(
            page.contains("seedsweep_worker_seed_seconds_count 1"),
            "{page}"
        );
    }
}
