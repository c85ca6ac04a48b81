//! The `command` task's part of a sweep file: `[command]`, a training program of the researcher's
//! own that each worker runs once per seed (README, "Your own training program"). Validated here,
//! once; the worker expands the placeholders with [`expand`].

use crate::metric::Direction;
use crate::spec::{SpecError, invalid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The placeholders of `argv` and `env` values, each the run's seed of that name.
pub const PLACEHOLDERS: [&str; 5] = [
    "seed",
    "init_seed",
    "order_seed",
    "augment_seed",
    "split_seed",
];

/// Environment variables the worker sets itself; a sweep may not set them.
const RESERVED_ENV: [&str; 2] = ["SEEDSWEEP_", "CUDA_VISIBLE_DEVICES"];

/// Variables that change what a program loads or runs before its own code, or which program
/// a name finds: a sweep's `env` may set one only on workers that allow it (`--allow-env NAME`),
/// else `--allow-command` could be bypassed (README, "How a run is supervised"). Names ending
/// in `*` are prefixes.
pub const GUARDED_ENV: [&str; 50] = [
    // The dynamic loader and libc.
    "LD_*",
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    // Which program a name finds, and where per-user start-up files are read from.
    "PATH",
    "HOME",
    "XDG_CONFIG_HOME",
    // Shells.
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_*",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    "CDPATH",
    // Python (not PYTHONHASHSEED, PYTHONUNBUFFERED and their kind, which load nothing).
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONUSERBASE",
    "PYTHONPLATLIBDIR",
    "PYTHONWARNINGS",
    "PYTHONBREAKPOINT",
    "PYTHONEXECUTABLE",
    "PYTHONPYCACHEPREFIX",
    // Node.js.
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_REPL_EXTERNAL_MODULE",
    // Perl.
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PERL5DB",
    "PERL_MB_OPT",
    // Ruby.
    "RUBYOPT",
    "RUBYLIB",
    // The JVM.
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    // Lua, R, Julia.
    "LUA_INIT*",
    "LUA_PATH*",
    "R_PROFILE*",
    "R_ENVIRON*",
    "JULIA_LOAD_PATH",
    "JULIA_DEPOT_PATH",
    "JULIA_PROJECT",
];

/// Whether a sweep's `env` may set `name` only where a worker allows it (`GUARDED_ENV`).
pub fn guarded_env(name: &str) -> bool {
    GUARDED_ENV.iter().any(|g| match g.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *g,
    })
}

/// Whether `name` is a variable a sweep's `env` may name at all: letters, digits and '_', not
/// starting with a digit, at most 128 bytes, and none the worker sets itself. Checked at
/// submission and again by the worker (the lease's fields are no more trusted than a file's).
pub fn check_env_name(name: &str) -> Result<(), String> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || name.len() > 128 {
        return Err(format!(
            "`command.env.{name}`: a variable's name is letters, digits and '_', not starting with a digit, at most 128 bytes"
        ));
    }
    if RESERVED_ENV.iter().any(|r| name.starts_with(r)) {
        return Err(format!(
            "`command.env.{name}`: the worker sets SEEDSWEEP_* and CUDA_VISIBLE_DEVICES itself"
        ));
    }
    Ok(())
}

/// The most epochs a run may report.
pub const MAX_EPOCHS: u32 = 100_000;

/// The longest run a sweep may allow: 30 days.
const MAX_TIME_LIMIT: u64 = 30 * 86_400;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The program and its arguments, never a shell string; placeholders such as `{seed}` are
    /// replaced with the run's seeds (`{{` and `}}` stand for braces).
    pub argv: Vec<String>,
    /// The program's working directory on the worker (default: the worker's own).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Extra environment variables (values may hold placeholders).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A run still going after this many seconds is killed and fails (0: no limit).
    #[serde(default)]
    pub time_limit_seconds: u64,
    /// The metric the sweep's statistics, report, comparison and watch use by default: one of
    /// the results' columns, or a custom metric the program reports (every result must have it).
    #[serde(default = "default_score")]
    pub score: String,
    /// Which way the score improves: "max" (an accuracy, a reward) or "min" (a loss,
    /// perplexity, an error rate). Best and worst seeds, black swans' luck, best-of-k and
    /// comparisons follow it. Absent: the score's natural direction ([`CommandSpec::direction`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_direction: Option<Direction>,
    /// When set, a run must report exactly this many epochs.
    #[serde(default)]
    pub epochs: Option<u32>,
    /// The most memory (MiB) a run's processes may use together; past it the kernel kills the
    /// run, a counted failure. Enforced by the run's cgroup v2 group: a worker that cannot hands
    /// the seed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mb: Option<u64>,
    /// The most processes and threads a run may have at once (a fork bomb stops there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u32>,
}

/// The bounds of `command.memory_limit_mb` (16 MiB to 16 TiB) and `command.pids_limit`.
const MEMORY_LIMIT_MB: std::ops::RangeInclusive<u64> = 16..=16 << 20;
const PIDS_LIMIT: std::ops::RangeInclusive<u32> = 4..=4_194_304;

fn default_score() -> String {
    "test_accuracy".into()
}

impl CommandSpec {
    /// Which way the score improves: `score_direction`, else down for a known loss or seconds
    /// and up for anything else.
    pub fn direction(&self) -> Direction {
        let natural = self.score.parse().map(Direction::natural);
        self.score_direction.unwrap_or(natural.unwrap_or_default())
    }

    pub fn parse(table: Option<toml::Value>) -> Result<CommandSpec, SpecError> {
        let Some(table) = table else {
            return invalid(
                "task \"command\" needs a [command] table with `argv`, the program and its arguments; see README, \"Your own training program\"",
            );
        };
        let spec: CommandSpec = table.try_into().map_err(|e: toml::de::Error| {
            SpecError::new(format!("in [command]: {}", e.message().trim_end()))
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        match self.argv.first() {
            None => {
                return invalid(
                    "`command.argv` is empty: give the program and its arguments, e.g. [\"python3\", \"train.py\", \"--seed\", \"{seed}\"]",
                );
            }
            Some(p) if p.trim().is_empty() => {
                return invalid("`command.argv[0]` is empty: name the program to run");
            }
            _ => {}
        }
        if self.argv.len() > 1_000 {
            return invalid("`command.argv` has more than 1000 arguments");
        }
        for (i, arg) in self.argv.iter().enumerate() {
            check_text(&format!("command.argv[{i}]"), arg)?;
        }
        if let Some(dir) = &self.workdir {
            if dir.is_empty() {
                return invalid(
                    "`command.workdir` is empty: leave it out to run in the worker's own directory",
                );
            }
            check_text("command.workdir", dir)?;
        }
        if self.env.len() > 200 {
            return invalid("`command.env` has more than 200 variables");
        }
        for (key, value) in &self.env {
            check_env_name(key).map_err(SpecError::new)?;
            check_text(&format!("command.env.{key}"), value)?;
        }
        if self.time_limit_seconds > MAX_TIME_LIMIT {
            return invalid(format!(
                "`command.time_limit_seconds` = {}: give at most {MAX_TIME_LIMIT} (30 days), or 0 for no limit",
                self.time_limit_seconds
            ));
        }
        if let Err(e) = self.score.parse::<crate::domain::Metric>() {
            return invalid(format!("`command.score`: {e}"));
        }
        if let Some(mb) = self.memory_limit_mb
            && !MEMORY_LIMIT_MB.contains(&mb)
        {
            return invalid(format!(
                "`command.memory_limit_mb` = {mb}: give between {} and {} (MiB), or leave it out",
                MEMORY_LIMIT_MB.start(),
                MEMORY_LIMIT_MB.end()
            ));
        }
        if let Some(n) = self.pids_limit
            && !PIDS_LIMIT.contains(&n)
        {
            return invalid(format!(
                "`command.pids_limit` = {n}: give between {} and {}, or leave it out",
                PIDS_LIMIT.start(),
                PIDS_LIMIT.end()
            ));
        }
        if let Some(n) = self.epochs
            && !(1..=MAX_EPOCHS).contains(&n)
        {
            return invalid(format!(
                "`command.epochs` = {n}: give between 1 and {MAX_EPOCHS}, or leave it out"
            ));
        }
        Ok(())
    }
}

/// A value of the program's settings: printable, not too long, its placeholders known.
fn check_text(key: &str, text: &str) -> Result<(), SpecError> {
    if text.len() > 4_096 || text.contains('\0') {
        return invalid(format!(
            "`{key}` must be at most 4096 bytes with no NUL character"
        ));
    }
    expand(text, &placeholder(0, [0; 4])).map_err(|e| SpecError::new(format!("`{key}`: {e}")))?;
    Ok(())
}

/// `text` with each `{name}` replaced by `value(name)`, and `{{`, `}}` by braces. An unknown
/// name, or a brace that opens or closes nothing, is an error that says so.
pub fn expand(text: &str, value: &dyn Fn(&str) -> Option<i64>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{").or_else(|| tail.strip_prefix("}}")) {
            out.push_str(&tail[..1]);
            rest = after;
            continue;
        }
        let close = tail
            .find('}')
            .filter(|_| tail.starts_with('{'))
            .ok_or_else(|| "a lone '}': write `}}` for a brace".to_string())?;
        let name = &tail[1..close];
        let v = value(name).ok_or_else(|| {
            format!(
                "unknown placeholder `{{{name}}}`: use {} (or `{{{{` for a brace)",
                PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
            )
        })?;
        out.push_str(&v.to_string());
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of each placeholder for a run's seed and factor seeds.
pub fn placeholder(seed: i64, factors: [i64; 4]) -> impl Fn(&str) -> Option<i64> {
    move |name| {
        let at = PLACEHOLDERS.iter().position(|p| *p == name)?;
        Some(if at == 0 { seed } else { factors[at - 1] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CommandSpec, String> {
        CommandSpec::parse(Some(toml::from_str(text).unwrap())).map_err(|e| e.to_string())
    }

    #[test]
    fn expands_placeholders_and_escapes() {
        let v = placeholder(7, [1, 2, 3, 4]);
        assert_eq!(
            expand(
                "--seed={seed} {init_seed}/{order_seed}/{augment_seed}/{split_seed}",
                &v
            )
            .unwrap(),
            "--seed=7 1/2/3/4"
        );
        assert_eq!(expand("{{json}} {{{seed}}}", &v).unwrap(), "{json} {7}");
        assert!(
            expand("{sed}", &v)
                .unwrap_err()
                .contains("unknown placeholder `{sed}`")
        );
        assert!(expand("a}b", &v).unwrap_err().contains("lone '}'"));
        assert!(expand("{seed", &v).is_err());
    }

    #[test]
    fn guards_the_variables_that_change_what_runs_first() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "ENV",
            "PYTHONSTARTUP",
            "PYTHONPATH",
            "NODE_OPTIONS",
            "PERL5OPT",
            "RUBYOPT",
            "PATH",
            "JAVA_TOOL_OPTIONS",
        ] {
            assert!(guarded_env(name), "{name}");
        }
        for name in [
            "DATA_DIR",
            "OMP_NUM_THREADS",
            "ENVIRONMENT",
            "LANG",
            "XLD_PRELOAD",
        ] {
            assert!(!guarded_env(name), "{name}");
        }
    }

    #[test]
    fn parses_and_checks_each_key() {
        let ok = parse("argv = [\"python3\", \"train.py\", \"--seed\", \"{seed}\"]").unwrap();
        assert_eq!(ok.score, "test_accuracy");
        assert_eq!(ok.time_limit_seconds, 0);
        assert!(
            parse("argv = []")
                .unwrap_err()
                .contains("`command.argv` is empty")
        );
        assert!(
            parse("argv = [\"x\", \"{sed}\"]")
                .unwrap_err()
                .contains("command.argv[1]")
        );
        assert!(
            parse("argv = [\"x\"]\nenv = { SEEDSWEEP_SEED = \"1\" }")
                .unwrap_err()
                .contains("sets SEEDSWEEP_")
        );
        assert!(
            parse("argv = [\"x\"]\nenv = { \"1A\" = \"1\" }")
                .unwrap_err()
                .contains("a variable's name")
        );
        assert!(
            parse("argv = [\"x\"]\nscore = \"Test Accuracy\"")
                .unwrap_err()
                .contains("unknown metric `Test Accuracy`")
        );
        assert_eq!(
            parse("argv = [\"x\"]\nscore = \"bleu\"").unwrap().score,
            "bleu"
        );
        let loss = parse("argv = [\"x\"]\nscore = \"test_loss\"").unwrap();
        assert_eq!(
            (loss.score.as_str(), loss.direction()),
            ("test_loss", Direction::Min)
        );
        let perplexity = parse("argv = [\"x\"]\nscore = \"ppl\"\nscore_direction = \"min\"");
        assert_eq!(perplexity.unwrap().direction(), Direction::Min);
        assert_eq!(
            parse("argv = [\"x\"]\nscore = \"bleu\"")
                .unwrap()
                .direction(),
            Direction::Max
        );
        assert!(
            parse("argv = [\"x\"]\nscore_direction = \"lower\"")
                .unwrap_err()
                .contains("use max or min")
        );
        assert!(
            parse("argv = [\"x\"]\ntime_limit_seconds = 99999999")
                .unwrap_err()
                .contains("30 days")
        );
        let limited = parse("argv = [\"x\"]\nmemory_limit_mb = 2048\npids_limit = 512").unwrap();
        assert_eq!(
            (limited.memory_limit_mb, limited.pids_limit),
            (Some(2048), Some(512))
        );
        assert!(
            parse("argv = [\"x\"]\nmemory_limit_mb = 1")
                .unwrap_err()
                .contains("`command.memory_limit_mb` = 1")
        );
        assert!(
            parse("argv = [\"x\"]\npids_limit = 0")
                .unwrap_err()
                .contains("`command.pids_limit` = 0")
        );
        assert!(
            parse("argv = [\"x\"]\nepochs = 0")
                .unwrap_err()
                .contains("command.epochs")
        );
        assert!(
            parse("argv = [\"x\"]\nshell = true")
                .unwrap_err()
                .contains("shell")
        );
    }
}
