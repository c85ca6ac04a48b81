//! Which programs the workers connected to this replica lately allow (their `--allow-command`,
//! sent with each lease request), so that `sweep submit` can warn when no worker would run a
//! command sweep's program. Advisory: other replicas' workers are not seen here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a worker counts as connected after its last lease request.
pub const RECENT: Duration = Duration::from_secs(600);
/// The most workers remembered; past it, those not seen lately are forgotten.
const MOST: usize = 100_000;

#[derive(Default)]
pub struct Allowed {
    seen: Mutex<HashMap<String, (Instant, Vec<String>)>>,
}

impl Allowed {
    /// `worker` asked for a lease allowing `programs` (names as given and resolved paths).
    pub fn saw(&self, worker: &str, programs: &[String]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if programs.is_empty() {
            seen.remove(worker);
            return;
        }
        if seen.len() >= MOST && !seen.contains_key(worker) {
            seen.retain(|_, (at, _)| at.elapsed() < RECENT);
            if seen.len() >= MOST {
                return;
            }
        }
        seen.insert(worker.to_string(), (Instant::now(), programs.to_vec()));
    }

    /// Whether a worker seen lately allows `program` (the same name or path, or the same file
    /// name: the coordinator cannot resolve paths on the workers' hosts).
    pub fn any_allows(&self, program: &str) -> bool {
        let name = Path::new(program).file_name();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.values().any(|(at, programs)| {
            at.elapsed() < RECENT
                && programs
                    .iter()
                    .any(|p| p == program || Path::new(p).file_name() == name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_name_or_path_and_forgets_workers_that_allow_nothing() {
        let a = Allowed::default();
        assert!(!a.any_allows("python3"));
        a.saw("w1", &["python3".into(), "/usr/bin/python3.11".into()]);
        assert!(a.any_allows("python3"));
        assert!(a.any_allows("/opt/conda/bin/python3.11"));
        assert!(!a.any_allows("bash"));
        a.saw("w1", &[]);
        assert!(!a.any_allows("python3"));
    }
}
