//! The environment a program starts with: built by the worker, never its own passed on whole,
//! so that no token, TLS key path or other secret of the worker's reaches a program (README,
//! "How a run is supervised"). In order, a later one replacing an earlier one of the same name:
//! the base ([`BASE`], [`BASE_PREFIXES`], from the worker's environment where set), what the
//! worker passes on by `--pass-env NAME`, the sweep's `env`, and the run's own variables.

use seedsweep_core::spec::command::{check_env_name, guarded_env};

/// The worker's variables every program gets, when set.
pub const BASE: [&str; 9] = [
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];
/// ... and those whose names start so: the locale, and what CUDA and the NVIDIA container
/// runtime read (the run's device itself is `CUDA_VISIBLE_DEVICES`, set per run).
pub const BASE_PREFIXES: [&str; 3] = ["LC_", "CUDA_", "NVIDIA_"];
/// `PATH` when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What a worker lets through to its programs: `--pass-env` and `--allow-env`.
#[derive(Debug, Clone, Default)]
pub struct EnvPolicy {
    /// Variables of the worker's own environment passed on as they are.
    pub pass: Vec<String>,
    /// Guarded names a sweep's `env` may set here.
    pub allow: Vec<String>,
}

impl EnvPolicy {
    /// Checks the worker's flags: names a variable may have, none the worker's own settings.
    pub fn new(pass: Vec<String>, allow: Vec<String>) -> Result<EnvPolicy, String> {
        for name in &pass {
            if name.starts_with("SEEDSWEEP_") {
                return Err(format!(
                    "--pass-env {name}: the worker's own SEEDSWEEP_* settings (tokens among them) never reach a program"
                ));
            }
            check_env_name(name).map_err(|e| format!("--pass-env: {e}"))?;
        }
        for name in &allow {
            check_env_name(name).map_err(|e| format!("--allow-env: {e}"))?;
            if !guarded_env(name) {
                return Err(format!(
                    "--allow-env {name}: a sweep may set {name} without it (--allow-env is for the variables README lists under \"How a run is supervised\")"
                ));
            }
        }
        Ok(EnvPolicy { pass, allow })
    }

    /// The program's environment: the base and passed variables from `worker` (the worker's
    /// environment), the sweep's `sweep` (checked again here: the lease is not trusted), and
    /// the run's `run`. A guarded name this worker does not allow is refused, saying which
    /// flag would allow it.
    pub fn build(
        &self,
        worker: impl IntoIterator<Item = (String, String)>,
        sweep: &[(String, String)],
        run: &[(String, String)],
    ) -> Result<Vec<(String, String)>, String> {
        let mut env: std::collections::BTreeMap<String, String> = worker
            .into_iter()
            .filter(|(k, _)| {
                BASE.contains(&k.as_str())
                    || BASE_PREFIXES.iter().any(|p| k.starts_with(p))
                    || self.pass.contains(k)
            })
            .filter(|(k, _)| !k.starts_with("SEEDSWEEP_"))
            .collect();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        for (name, value) in sweep {
            check_env_name(name)?;
            if guarded_env(name) && !self.allow.contains(name) {
                return Err(format!(
                    "the sweep sets {name}, which changes what a program loads or runs first; \
                     this worker lets a sweep set it only when started with --allow-env {name}"
                ));
            }
            env.insert(name.clone(), value.clone());
        }
        env.extend(run.iter().cloned());
        Ok(env.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_program_gets_the_base_what_is_passed_the_sweeps_and_the_runs_and_no_secret() {
        let worker = vars(&[
            ("PATH", "/bin"),
            ("HOME", "/home/w"),
            ("LC_ALL", "C"),
            ("CUDA_HOME", "/cuda"),
            ("SEEDSWEEP_WORKER_TOKEN", "secret"),
            ("SEEDSWEEP_TLS_CA", "/ca.pem"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("PYTHONPATH", "/lib/py"),
            ("HF_HOME", "/hf"),
        ]);
        let policy = EnvPolicy::new(vec!["PYTHONPATH".into()], vec![]).unwrap();
        let env = policy
            .build(
                worker,
                &vars(&[("DATA_DIR", "/data"), ("HF_HOME", "/sweep-hf")]),
                &vars(&[("SEEDSWEEP_SEED", "7")]),
            )
            .unwrap();
        assert_eq!(
            env,
            vars(&[
                ("CUDA_HOME", "/cuda"),
                ("DATA_DIR", "/data"),
                ("HF_HOME", "/sweep-hf"),
                ("HOME", "/home/w"),
                ("LC_ALL", "C"),
                ("PATH", "/bin"),
                ("PYTHONPATH", "/lib/py"),
                ("SEEDSWEEP_SEED", "7"),
            ])
        );
    }

    #[test]
    fn guarded_names_need_the_workers_leave() {
        let sweep = vars(&[("BASH_ENV", "/tmp/evil.sh")]);
        let refused = EnvPolicy::default().build(vec![], &sweep, &[]).unwrap_err();
        assert!(refused.contains("--allow-env BASH_ENV"), "{refused}");
        let allowed = EnvPolicy::new(vec![], vec!["BASH_ENV".into()]).unwrap();
        assert!(allowed.build(vec![], &sweep, &[]).is_ok());
        // A lease naming a variable no sweep file could is refused too.
        let odd = EnvPolicy::default().build(vec![], &vars(&[("A=B", "1")]), &[]);
        assert!(odd.unwrap_err().contains("a variable's name"));
        assert!(
            EnvPolicy::new(vec!["SEEDSWEEP_WORKER_TOKEN".into()], vec![])
                .unwrap_err()
                .contains("never reach a program")
        );
        assert!(EnvPolicy::new(vec![], vec!["DATA_DIR".into()]).is_err());
    }
}
