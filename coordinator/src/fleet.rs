//! Which programs and guarded variables the workers connected to this replica lately allow
//! (their `--allow-command` and `--allow-env`, sent with each lease request), so that `sweep
//! submit` can warn when no worker would run a command sweep. Advisory: other replicas' workers
//! are not seen here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a worker counts as connected after its last lease request.
pub const RECENT: Duration = Duration::from_secs(600);
/// The most workers remembered; past it, those not seen lately are forgotten.
const MOST: usize = 100_000;

/// What one worker allows.
struct Leave {
    at: Instant,
    programs: Vec<String>,
    env: Vec<String>,
}

#[derive(Default)]
pub struct Allowed {
    seen: Mutex<HashMap<String, Leave>>,
}

impl Allowed {
    /// `worker` asked for a lease allowing `programs` (names as given and resolved paths) and
    /// the guarded variables `env`.
    pub fn saw(&self, worker: &str, programs: &[String], env: &[String]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if programs.is_empty() {
            seen.remove(worker);
            return;
        }
        if seen.len() >= MOST && !seen.contains_key(worker) {
            seen.retain(|_, leave| leave.at.elapsed() < RECENT);
            if seen.len() >= MOST {
                return;
            }
        }
        let leave = Leave {
            at: Instant::now(),
            programs: programs.to_vec(),
            env: env.to_vec(),
        };
        seen.insert(worker.to_string(), leave);
    }

    /// Whether a worker seen lately allows `program` (the same name or path, or the same file
    /// name: the coordinator cannot resolve paths on the workers' hosts).
    pub fn any_allows(&self, program: &str) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.values().any(|leave| leave.runs(program))
    }

    /// Whether a worker seen lately that allows `program` also allows a sweep to set each of
    /// `env` (guarded variables); the first that none allows.
    pub fn env_refused<'a>(&self, program: &str, env: &[&'a str]) -> Option<&'a str> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let allowers: Vec<&Leave> = seen.values().filter(|l| l.runs(program)).collect();
        env.iter()
            .find(|v| !allowers.iter().any(|l| l.env.iter().any(|e| e == *v)))
            .copied()
    }
}

impl Leave {
    /// Seen lately, and allowing `program` by name, path or file name.
    fn runs(&self, program: &str) -> bool {
        let name = Path::new(program).file_name();
        self.at.elapsed() < RECENT
            && (self.programs.iter()).any(|p| p == program || Path::new(p).file_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_name_or_path_and_forgets_workers_that_allow_nothing() {
        let a = Allowed::default();
        assert!(!a.any_allows("python3"));
        a.saw("w1", &["python3".into(), "/usr/bin/python3.11".into()], &[]);
        assert!(a.any_allows("python3"));
        assert!(a.any_allows("/opt/conda/bin/python3.11"));
        assert!(!a.any_allows("bash"));
        a.saw("w1", &[], &[]);
        assert!(!a.any_allows("python3"));
    }

    #[test]
    fn a_guarded_variable_is_allowed_only_by_a_worker_that_runs_the_program() {
        let a = Allowed::default();
        a.saw("w1", &["bash".into()], &["BASH_ENV".into()]);
        a.saw("w2", &["python3".into()], &[]);
        assert_eq!(a.env_refused("bash", &["BASH_ENV"]), None);
        assert_eq!(a.env_refused("python3", &["BASH_ENV"]), Some("BASH_ENV"));
        assert_eq!(
            a.env_refused("bash", &["BASH_ENV", "LD_PRELOAD"]),
            Some("LD_PRELOAD")
        );
    }
}
