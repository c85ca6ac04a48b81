//! Task `command`: the researcher's own training program under seedsweep's leases, through the
//! real binaries. The example (examples/command/train.py, PyTorch) on the real digits, and small
//! test-double programs for the failures.

use seedsweep_tests::{
    CoordinatorProcess, make_digits, repo_root, signal, sqlite_query, stderr, stdout, torch_python,
    wait_until, worker,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The PYTHONPATH that imports the cached torch and the repository's `seedsweep` helper (passed
/// on to the programs by `--pass-env PYTHONPATH`).
fn python_path() -> String {
    let torch = torch_python();
    let torch = torch
        .get_envs()
        .find(|(k, _)| *k == "PYTHONPATH")
        .and_then(|(_, v)| v)
        .expect("torch_python sets PYTHONPATH")
        .to_owned();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&torch).collect();
    paths.push(repo_root().join("python"));
    std::env::join_paths(paths).unwrap().into_string().unwrap()
}

/// A CPU worker that may run python3, with the helper and torch importable.
fn command_worker(url: &str, data: &Path) -> Command {
    let mut w = worker(url, data);
    w.args([
        "--allow-command",
        "python3",
        "--pass-env",
        "PYTHONPATH",
        "--log-dir",
    ])
    .arg(data.with_file_name("logs"))
    .env("PYTHONPATH", python_path());
    w
}

/// A coordinator on SQLite in `dir`, and the workers' data folder: (data, database, coordinator).
fn on_sqlite(dir: &Path) -> (PathBuf, PathBuf, CoordinatorProcess) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = dir.join("c.db");
    let coordinator =
        CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    (data, db, coordinator)
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The example trains a real PyTorch network on the real digits for each seed, through two
/// workers: every seed's epochs and result land in SQL, its custom metric (`test_ece`) too; stats
/// and report read them, the second sweep with the custom metric as its score; and the same seeds
/// again give the same numbers (CPU, one thread: bit for bit).
#[test]
fn a_pytorch_program_sweeps_through_two_workers_and_repeats_itself() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let (data, db, coordinator) = on_sqlite(dir.path());
    make_digits(&data);
    let script = repo_root().join("examples/command/train.py");
    let digits = data.join("digits");
    let argv = toml_list(&[
        "python3",
        script.to_str().unwrap(),
        "--data",
        digits.to_str().unwrap(),
        "--epochs",
        "2",
        "--width",
        "8",
    ]);
    let sweep = |name: &str, score: &str| {
        format!(
            "name = \"{name}\"\ntask = \"command\"\nseeds = \"0..3\"\n[command]\nargv = {argv}\nepochs = 2\nscore = \"{score}\"\n"
        )
    };
    let first = coordinator.submit(dir.path(), &sweep("own-a", "test_accuracy"));
    let again = coordinator.submit(dir.path(), &sweep("own-b", "test_ece"));
    coordinator.run_to_end((0..2).map(|_| command_worker(&coordinator.url, &data)));

    let sql = |q: &str| sqlite_query(&db, q);
    let stats = |args: &[&str]| -> serde_json::Value {
        let out = coordinator.sweep(&[&["stats"], args, &["--json"]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    for id in [&first, &again] {
        assert_eq!(
            sql(&format!(
                "SELECT count(*), min(epochs), max(epochs) FROM results WHERE sweep_id = '{id}'"
            ))
            .trim(),
            "3|2|2"
        );
        assert_eq!(
            sql(&format!("SELECT count(*) FROM epoch_metrics WHERE sweep_id = '{id}' AND test_accuracy IS NOT NULL")).trim(),
            "6"
        );
        // The custom metric, on every epoch row and result, queryable in SQL.
        assert_eq!(
            sql(&format!("SELECT count(*) FROM epoch_metrics WHERE sweep_id = '{id}' AND json_extract(custom, '$.test_ece') BETWEEN 0 AND 1")).trim(),
            "6"
        );
        // The final evaluation's per-example correctness came through the helper.
        assert_eq!(
            sql(&format!(
                "SELECT count(*), min(test_examples) FROM result_bitmaps WHERE sweep_id = '{id}'"
            ))
            .trim(),
            "3|360"
        );
        let report =
            coordinator.sweep(&["report", id, "--out", dir.path().join(id).to_str().unwrap()]);
        assert!(report.status.success(), "{}", stderr(&report));
    }
    let accuracy = stats(&[&first]);
    assert_eq!(
        (accuracy["metric"].as_str(), accuracy["n"].as_u64()),
        (Some("test_accuracy"), Some(3))
    );
    assert!(
        accuracy["mean"].as_f64().unwrap() > 0.3,
        "the example learns the digits: {accuracy}"
    );
    // The sweep whose score is the custom metric: its statistics are of it by default, and agree
    // with SQL's; the other sweep's are of it when asked.
    let ece = stats(&[&again]);
    assert_eq!(
        (ece["metric"].as_str(), ece["n"].as_u64()),
        (Some("test_ece"), Some(3)),
        "{ece}"
    );
    let in_sql: f64 = sql(&format!(
        "SELECT avg(json_extract(custom, '$.test_ece')) FROM results WHERE sweep_id = '{again}'"
    ))
    .trim()
    .parse()
    .unwrap();
    assert!(
        (ece["mean"].as_f64().unwrap() - in_sql).abs() < 1e-12,
        "{ece} against {in_sql}"
    );
    let asked = stats(&[&first, "--metric", "test_ece"]);
    assert!(
        (asked["mean"].as_f64().unwrap() - in_sql).abs() < 1e-12,
        "{asked}"
    );
    let compared =
        coordinator.sweep(&["compare", &first, &again, "--metric", "test_ece", "--json"]);
    assert!(compared.status.success(), "{}", stderr(&compared));
    let csv = dir.path().join("own.csv");
    let out = coordinator.sweep(&[
        "export",
        &again,
        "--format",
        "csv",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",custom"), "{csv}");
    assert_eq!(csv.matches("test_ece").count(), 3, "{csv}");
    let same = sql(&format!(
        "SELECT a.seed, a.test_accuracy = b.test_accuracy AND a.test_loss = b.test_loss
                AND a.train_loss = b.train_loss AND a.custom = b.custom
         FROM results a JOIN results b ON a.seed = b.seed
         WHERE a.sweep_id = '{first}' AND b.sweep_id = '{again}' ORDER BY a.seed"
    ));
    assert_eq!(
        same.trim(),
        "0|1\n1|1\n2|1",
        "the same seeds gave other numbers"
    );
    // Each run's output went to its log under --log-dir.
    let logs = data.with_file_name("logs").join(&first);
    assert!(logs.join("0-1.log").exists() && logs.join("0-1.metrics.jsonl").exists());
}

/// Whether a process whose command line matches `pattern` is running.
fn alive(pattern: &str) -> bool {
    let found = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    found.status.success()
}

/// A small test-double program: reports as the helper does, and misbehaves as `seed` asks.
const DOUBLE: &str = r#"
import os, sys, time, subprocess
import seedsweep
s = seedsweep.seeds()
fence = int(os.environ["SEEDSWEEP_FENCE"])
if s.seed == 1 and fence == 1:
    print("boom: out of luck on the first try", file=sys.stderr)
    sys.exit(3)
if s.seed == 2:
    with open(os.environ["SEEDSWEEP_METRICS_FILE"], "a") as f:
        f.write("loss=0.5\n")
    sys.exit(0)
if s.seed == 0:
    # Left running in the background, holding the program's stdout.
    subprocess.Popen(["sleep", "3001"])
if s.seed in (3, 4):
    # Stays running, with a child of its own, until stopped.
    subprocess.Popen(["sleep", str(297 + s.seed)])
    seedsweep.log_epoch(1, train_loss=1.0, train_accuracy=0.5, lr=0.1, test_loss=1.0, test_accuracy=0.5)
    time.sleep(300)
for e in (1, 2):
    seedsweep.log_epoch(e, train_loss=1.0 / e, train_accuracy=0.5, lr=0.1, test_loss=0.5, test_accuracy=0.25 * e)
seedsweep.finish(test_accuracy=0.5, correct=[True, False, True, False])
"#;

fn double_sweep(dir: &Path, seeds: &str) -> String {
    let program = dir.join("double.py");
    std::fs::write(&program, DOUBLE).unwrap();
    let argv = toml_list(&["python3", program.to_str().unwrap()]);
    format!(
        "name = \"faults\"\ntask = \"command\"\nseeds = {seeds}\nmax_attempts = 2\nretry_backoff_seconds = 0\n\
         [command]\nargv = {argv}\nepochs = 2\n"
    )
}

/// A failing run is retried and its cause (exit status and stderr) recorded; a malformed report
/// fails its attempts with the line quoted; a worker that does not allow the program hands the
/// seed back uncounted.
#[test]
fn failures_are_retried_with_their_cause_and_unallowed_programs_handed_back() {
    let dir = tempfile::tempdir().unwrap();
    let (data, db, coordinator) = on_sqlite(dir.path());
    let sql = |q: &str| sqlite_query(&db, q);

    let file = dir.path().join("faults.toml");
    std::fs::write(&file, double_sweep(dir.path(), "[0, 1, 2]")).unwrap();
    let submitted = coordinator.sweep(&["submit", file.to_str().unwrap()]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    assert!(
        stderr(&submitted).contains("warning: no worker connected to this coordinator in the last 10 minutes allows `python3`"),
        "{}",
        stderr(&submitted)
    );
    let id = stdout(&submitted).trim().to_string();
    // A worker that runs no program does not lease the sweep's seeds at all: it tells the
    // coordinator the tasks it runs, and finds nothing to do. (The worker without libtorch
    // does not start without a program: tests/it/programs_only.rs.)
    if std::env::var_os("SEEDSWEEP_TEST_WORKER").is_none() {
        let idle = worker(&coordinator.url, &data).output().unwrap();
        assert!(idle.status.success(), "{}", stderr(&idle));
        assert_eq!(
            sql(&format!(
                "SELECT count(*) FROM attempts WHERE sweep_id = '{id}'"
            ))
            .trim(),
            "0"
        );
    }
    // One that runs another program: the seed goes back uncounted, and the worker stops saying
    // why.
    let refused = worker(&coordinator.url, &data)
        .args(["--allow-command", "true"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--allow-command"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        sql(&format!(
            "SELECT outcome, count(*) FROM attempts WHERE sweep_id = '{id}' GROUP BY outcome"
        ))
        .trim(),
        "released|1"
    );
    assert_eq!(
        sql(&format!("SELECT count(*) FROM seeds WHERE sweep_id = '{id}' AND state = 'pending' AND failures = 0")).trim(),
        "3"
    );

    coordinator.run_to_end([command_worker(&coordinator.url, &data)]);
    // What a program leaves running in its group is stopped when it exits.
    assert!(
        !alive("^sleep 3001$"),
        "a program's leftover child outlived it"
    );
    // A worker that allows python3 has connected since: no warning now.
    let again = coordinator.sweep(&["submit", file.to_str().unwrap()]);
    assert!(
        again.status.success() && !stderr(&again).contains("warning"),
        "{}",
        stderr(&again)
    );
    let states = sql(&format!(
        "SELECT seed, state, failures FROM seeds WHERE sweep_id = '{id}' ORDER BY seed"
    ));
    assert_eq!(
        states.trim(),
        "0|done|0\n1|done|1\n2|failed|2",
        "{}",
        coordinator.log()
    );
    let cause = |seed: i64| {
        sql(&format!(
            "SELECT cause FROM attempts WHERE sweep_id = '{id}' AND seed = {seed} AND outcome = 'failed' ORDER BY fence LIMIT 1"
        ))
    };
    let first = cause(1);
    assert!(
        first.contains("exited with status 3") && first.contains("boom: out of luck"),
        "{first}"
    );
    let malformed = cause(2);
    assert!(malformed.contains("loss=0.5"), "{malformed}");
    // Each attempt that ran names its log file, which holds the program's output.
    let logs = sql(&format!(
        "SELECT seed, fence, log FROM attempts WHERE sweep_id = '{id}' AND outcome <> 'released' ORDER BY seed, fence"
    ));
    assert_eq!(logs.lines().count(), 5, "{logs}");
    for row in logs.lines() {
        let f: Vec<&str> = row.split('|').collect();
        assert!(
            f[2].ends_with(&format!("/{id}/{}-{}.log", f[0], f[1])),
            "{row}"
        );
        assert!(Path::new(f[2]).exists(), "{row}");
    }
    let failed_log =
        std::fs::read_to_string(logs.lines().nth(1).unwrap().split('|').nth(2).unwrap()).unwrap();
    assert!(failed_log.contains("boom: out of luck"), "{failed_log}");
    // The bitmap of 4 examples came through the helper.
    assert_eq!(
        sql(&format!(
            "SELECT test_examples FROM result_bitmaps WHERE sweep_id = '{id}' AND seed = 0"
        ))
        .trim(),
        "4"
    );
}

/// A coordinator on SQLite in `dir` and one worker running the test-double program for `seed`
/// (one that stays running), once the program has reported its first epoch: (database,
/// coordinator, sweep id, worker).
fn running_double(
    dir: &Path,
    seed: i64,
) -> (PathBuf, CoordinatorProcess, String, std::process::Child) {
    let (data, db, coordinator) = on_sqlite(dir);
    let id = coordinator.submit(dir, &double_sweep(dir, &format!("[{seed}]")));
    let w = command_worker(&coordinator.url, &data).spawn().unwrap();
    wait_until(
        "the program reported its first epoch",
        Duration::from_secs(60),
        || {
            sqlite_query(
                &db,
                &format!("SELECT count(*) FROM epoch_metrics WHERE sweep_id = '{id}'"),
            )
            .trim()
                == "1"
        },
    );
    (db, coordinator, id, w)
}

/// SIGTERM to the worker while the program runs: the program's whole group is stopped, the
/// worker exits within seconds and the seed is pending again, its attempt not counted.
#[test]
fn sigterm_stops_the_program_and_its_children_and_hands_the_seed_back() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _coordinator, id, mut w) = running_double(dir.path(), 3);
    let sql = |q: &str| sqlite_query(&db, q);
    let program = dir.path().join("double.py");
    assert!(alive(program.to_str().unwrap()));
    signal(&w, "TERM");
    let stopped = Instant::now();
    let status = w.wait().unwrap();
    assert!(
        status.success(),
        "the worker exits cleanly after handing the seed back"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped.elapsed()
    );
    assert!(
        !alive(program.to_str().unwrap()),
        "the program outlived the worker"
    );
    assert!(
        !alive("^sleep 300$"),
        "the program's child outlived the worker"
    );
    assert_eq!(
        sql(&format!(
            "SELECT state, failures FROM seeds WHERE sweep_id = '{id}'"
        ))
        .trim(),
        "pending|0"
    );
    assert_eq!(
        sql(&format!(
            "SELECT outcome FROM attempts WHERE sweep_id = '{id}'"
        ))
        .trim(),
        "released"
    );
}

/// A lost lease (here: the sweep cancelled while the program runs) stops the program's group;
/// the worker goes on (and, with nothing left to lease, exits).
#[test]
fn a_lost_lease_stops_the_program_and_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let (db, coordinator, id, mut w) = running_double(dir.path(), 4);
    let sql = |q: &str| sqlite_query(&db, q);
    assert!(alive("^sleep 301$"));
    let cancelled = coordinator.sweep(&["cancel", &id]);
    assert!(cancelled.status.success(), "{}", stderr(&cancelled));
    let status = w.wait().unwrap();
    assert!(status.success(), "the worker goes on after a lost lease");
    let program = dir.path().join("double.py");
    assert!(
        !alive(program.to_str().unwrap()),
        "the program outlived its lease"
    );
    assert!(
        !alive("^sleep 301$"),
        "the program's child outlived its lease"
    );
    assert_eq!(
        sql(&format!("SELECT state FROM seeds WHERE sweep_id = '{id}'")).trim(),
        "cancelled"
    );
}
