//! Hostile programs: each case a real program, run by a real worker through a real coordinator
//! with worker and admin tokens, doing what a stranger's program may do. None of it may leak a
//! secret, get past `--allow-command`, stop or wedge the worker, or flood its memory or disk.

use seedsweep_tests::{CoordinatorProcess, bin, sqlite_query, stderr, stdout, worker};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WORKER_TOKEN: &str = "hostile-worker-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "hostile-admin-token-0123456789abcdef";

/// A coordinator on SQLite with worker and admin tokens, and what its workers need.
struct Fleet {
    dir: tempfile::TempDir,
    db: PathBuf,
    data: PathBuf,
    coordinator: CoordinatorProcess,
}

impl Fleet {
    fn start() -> Fleet {
        Fleet::start_with(&[])
    }

    /// A fleet whose coordinator also takes `extra` flags.
    fn start_with(extra: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let (w, a) = (
            dir.path().join("worker.token"),
            dir.path().join("admin.token"),
        );
        std::fs::write(&w, WORKER_TOKEN).unwrap();
        std::fs::write(&a, ADMIN_TOKEN).unwrap();
        let db = dir.path().join("c.db");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let coordinator = CoordinatorProcess::start(
            &format!("sqlite://{}", db.display()),
            &[
                &[
                    "--worker-token-file",
                    w.to_str().unwrap(),
                    "--admin-token-file",
                    a.to_str().unwrap(),
                ],
                extra,
            ]
            .concat(),
        )
        .unwrap();
        Fleet {
            dir,
            db,
            data,
            coordinator,
        }
    }

    /// Writes an executable script named `name`; its path.
    fn program(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// `coordinator sweep ARGS` with the admin token from the environment.
    fn sweep(&self, args: &[&str]) -> Output {
        Command::new(bin("coordinator"))
            .arg("sweep")
            .args(args)
            .args(["--coordinator", &self.coordinator.url])
            .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    }

    /// `coordinator sweep ARGS` that must succeed: its stdout.
    fn sweep_ok(&self, args: &[&str]) -> String {
        let out = self.sweep(args);
        assert!(out.status.success(), "sweep {args:?}: {}", stderr(&out));
        stdout(&out)
    }

    /// Submits a command sweep of `program` over `seeds` with `extra` lines in [command]; the
    /// sweep id and what `submit` said on stderr.
    fn submit(&self, program: &Path, seeds: &str, attempts: u32, extra: &str) -> (String, String) {
        let text = format!(
            "name = \"hostile\"\ntask = \"command\"\nseeds = {seeds}\nmax_attempts = {attempts}\n\
             retry_backoff_seconds = 0\n[command]\nargv = [{:?}]\n{extra}\n",
            program.to_str().unwrap()
        );
        let file = self
            .dir
            .path()
            .join(format!("{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, text).unwrap();
        let out = self.sweep(&["submit", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        (stdout(&out).trim().to_string(), stderr(&out))
    }

    /// A CPU worker that may run `program`, with its token given as the README allows (the
    /// variable SEEDSWEEP_WORKER_TOKEN), exiting once idle.
    fn worker(&self, program: &Path, extra: &[&str]) -> Command {
        let mut w = worker(&self.coordinator.url, &self.data);
        w.arg("--allow-command")
            .arg(program)
            .arg("--log-dir")
            .arg(self.logs())
            .args(extra)
            .env("SEEDSWEEP_WORKER_TOKEN", WORKER_TOKEN);
        w
    }

    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    fn sql(&self, q: &str) -> String {
        sqlite_query(&self.db, q).trim().to_string()
    }

    /// Each seed's state, in order, comma-separated.
    fn states(&self, id: &str) -> String {
        self.sql(&format!(
            "SELECT group_concat(state) FROM (SELECT state FROM seeds WHERE sweep_id = '{id}' ORDER BY seed)"
        ))
    }

    /// Runs a worker to its end within `limit`; its output. A worker still running then is
    /// killed and the test fails: it was wedged.
    fn run_worker(&self, mut w: Command, limit: Duration) -> Output {
        let child = w
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = Instant::now();
        let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
        while !waiter.is_finished() {
            if started.elapsed() > limit {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                let out = waiter.join().unwrap();
                panic!(
                    "the worker was still running after {limit:?}: wedged\n{}\ncoordinator:\n{}",
                    stderr(&out),
                    self.coordinator.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        waiter.join().unwrap()
    }
}

/// Whether a process whose command line matches `pattern` is running.
fn alive(pattern: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap()
        .status
        .success()
}

/// Bash that reports epoch 1 and its result, as the protocol asks.
const REPORT: &str = r#"printf '{"epoch": 1, "train_loss": 1, "train_accuracy": 0.5, "lr": 0.1, "test_loss": 1, "test_accuracy": 0.5}\n' >> "$SEEDSWEEP_METRICS_FILE""#;

/// A program that prints its environment's secrets and fails: neither the failure's recorded
/// cause nor its log holds the worker's token, or any other of the worker's own settings.
#[test]
fn a_program_that_prints_its_environment_learns_no_secret() {
    let fleet = Fleet::start();
    let program = fleet.program(
        "leak.sh",
        "#!/bin/bash\nenv | grep -e SEEDSWEEP -e SECRET >&2\nexit 1\n",
    );
    let (id, _) = fleet.submit(&program, "[0]", 1, "");
    let spool = fleet.dir.path().join("spool-secret");
    let mut w = fleet.worker(&program, &[]);
    w.env("SEEDSWEEP_SPOOL_DIR", &spool)
        .env("AWS_SECRET_ACCESS_KEY", "not-for-programs");
    let out = fleet.run_worker(w, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let cause = fleet.sql(&format!(
        "SELECT cause FROM attempts WHERE sweep_id = '{id}' AND outcome = 'failed'"
    ));
    // The environment was printed: the run's own variables are in the cause...
    assert!(cause.contains("SEEDSWEEP_SEED=0"), "{cause}");
    // ...and nothing of the worker's.
    for secret in [
        WORKER_TOKEN,
        "SEEDSWEEP_WORKER_TOKEN",
        "not-for-programs",
        "SEEDSWEEP_SPOOL_DIR",
    ] {
        assert!(
            !cause.contains(secret),
            "{secret} leaked into the cause:\n{cause}"
        );
    }
    let log = fleet.sql(&format!("SELECT log FROM attempts WHERE sweep_id = '{id}'"));
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("SEEDSWEEP_SEED=0") && !log.contains(WORKER_TOKEN),
        "{log}"
    );
}

/// `--allow-command` allows a bash script; a sweep setting BASH_ENV to another file would make
/// bash run that file first. Refused: the seed goes back uncounted and the worker stops saying
/// which flag allows it, the file never runs, and `submit` warned. A worker that allows the
/// variable runs it.
#[test]
fn a_sweeps_env_cannot_get_past_allow_command() {
    let fleet = Fleet::start();
    let marker = fleet.dir.path().join("evil-ran");
    let evil = fleet.program("evil.sh", &format!("touch {}\n", marker.display()));
    let train = fleet.program("train.sh", &format!("#!/bin/bash\n{REPORT}\n"));
    let (id, warned) = fleet.submit(
        &train,
        "[0]",
        2,
        &format!("env = {{ BASH_ENV = {:?} }}", evil.to_str().unwrap()),
    );
    let refused = fleet.run_worker(fleet.worker(&train, &[]), Duration::from_secs(60));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--allow-env BASH_ENV"),
        "{}",
        stderr(&refused)
    );
    assert!(!marker.exists(), "BASH_ENV's file ran");
    assert_eq!(
        fleet.sql(&format!(
            "SELECT state, failures FROM seeds WHERE sweep_id = '{id}'"
        )),
        "pending|0"
    );
    // The warning at submission: no worker had connected yet. Now one that runs train.sh has,
    // without --allow-env: the warning names the variable.
    assert!(warned.contains("allows"), "{warned}");
    let (_, again) = fleet.submit(
        &train,
        "[0]",
        2,
        &format!("env = {{ BASH_ENV = {:?} }}", evil.to_str().unwrap()),
    );
    assert!(again.contains("--allow-env BASH_ENV"), "{again}");
    let allowed = fleet.run_worker(
        fleet.worker(&train, &["--allow-env", "BASH_ENV"]),
        Duration::from_secs(60),
    );
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    assert!(
        marker.exists(),
        "a worker that allows BASH_ENV passes it on"
    );
}

/// One invalid UTF-8 byte in the reports, and a report line past 1 MiB: each a counted failure
/// of the program, its first bytes quoted; the worker goes on and ends each seed `failed`
/// rather than exiting and handing the seed to the next worker.
#[test]
fn bad_report_bytes_fail_the_seed_not_the_worker() {
    let fleet = Fleet::start();
    let program = fleet.program(
        "bytes.sh",
        "#!/bin/bash\n\
         if [ \"$SEEDSWEEP_SEED\" = 0 ]; then printf '{\"epoch\": 1, \"note\\xff\": 1}\\n' >> \"$SEEDSWEEP_METRICS_FILE\"\n\
         else head -c 2000000 /dev/zero | tr '\\0' 'x' >> \"$SEEDSWEEP_METRICS_FILE\"; echo >> \"$SEEDSWEEP_METRICS_FILE\"; fi\n",
    );
    let (id, _) = fleet.submit(&program, "[0, 1]", 2, "");
    let out = fleet.run_worker(fleet.worker(&program, &[]), Duration::from_secs(120));
    assert!(out.status.success(), "the worker stopped: {}", stderr(&out));
    assert_eq!(
        fleet.sql(&format!(
            "SELECT seed, state, failures FROM seeds WHERE sweep_id = '{id}' ORDER BY seed"
        )),
        "0|failed|2\n1|failed|2"
    );
    let cause = |seed: i64| {
        fleet.sql(&format!(
            "SELECT cause FROM attempts WHERE sweep_id = '{id}' AND seed = {seed} LIMIT 1"
        ))
    };
    let utf8 = cause(0);
    assert!(
        utf8.contains("not UTF-8") && utf8.contains(r#"{"epoch": 1, "note\xff"#),
        "{utf8}"
    );
    let long = cause(1);
    assert!(
        long.contains("longer than 1048576 bytes") && long.contains("xxxx"),
        "{long}"
    );
    assert!(
        long.len() < 2000,
        "the cause quotes the line's start, not the line"
    );
}

/// A program whose child starts a new session and keeps stdout open (as tools that start
/// daemons do), and one that double-forks out of its process group: each run ends when its
/// program exits, its result is recorded, the worker takes the next seed, and nothing the
/// programs started outlives them. Under `containment` (none: the worker's default); the
/// worker's log.
fn daemons_end_with_their_run(containment: Option<&str>) -> Result<String, String> {
    let fleet = Fleet::start();
    let tag = match containment {
        Some("cgroup") => 1,
        Some(_) => 2,
        None => 3,
    };
    let program = fleet.program(
        "daemon.sh",
        &format!(
            "#!/bin/bash\n\
             if [ \"$SEEDSWEEP_SEED\" = 0 ]; then setsid sleep 40{tag}1 & else ( setsid sleep 40{tag}2 >/dev/null 2>&1 < /dev/null & ) ; fi\n\
             {REPORT}\nexit 0\n"
        ),
    );
    let (id, _) = fleet.submit(&program, "[0, 1]", 1, "");
    let flags = containment.map(|c| ["--containment", c]);
    let out = fleet.run_worker(
        fleet.worker(&program, flags.as_ref().map_or(&[][..], |f| &f[..])),
        Duration::from_secs(60),
    );
    if !out.status.success() {
        return Err(stderr(&out));
    }
    assert_eq!(fleet.states(&id), "done,done");
    assert!(
        !alive(&format!("^sleep 40{tag}1$")),
        "the session leader's daemon outlived its run"
    );
    assert!(
        !alive(&format!("^sleep 40{tag}2$")),
        "the double-forked daemon outlived its run"
    );
    Ok(stderr(&out))
}

#[test]
fn a_program_that_leaves_a_daemon_does_not_wedge_its_worker() {
    let log = daemons_end_with_their_run(None).unwrap();
    assert!(log.contains("programs run contained"), "{log}");
}

#[test]
fn a_program_that_leaves_a_daemon_does_not_wedge_its_worker_under_the_subreaper() {
    let log = daemons_end_with_their_run(Some("subreaper")).unwrap();
    assert!(log.contains("containment=subreaper"), "{log}");
}

/// The same in a cgroup v2 group per run, where the host lets the worker make one (root, or a
/// delegated subtree, and Linux 5.14); elsewhere the worker refuses `--containment cgroup` at
/// start, saying why, and this test says it was skipped.
#[test]
fn a_program_that_leaves_a_daemon_does_not_wedge_its_worker_in_a_cgroup() {
    match daemons_end_with_their_run(Some("cgroup")) {
        Ok(log) => assert!(log.contains("containment=cgroup v2"), "{log}"),
        Err(log) if log.contains("--containment cgroup: ") => {
            eprintln!("skipped: this host gives the worker no cgroup v2 group: {log}")
        }
        Err(log) => panic!("{log}"),
    }
}

/// 300 MiB of progress bars (`\r`, no newline), and 300 MiB on one endless line: the worker's
/// memory stays bounded, and the run's log within its 32 MiB on disk.
#[test]
fn a_flood_of_output_is_bounded_in_memory_and_on_disk() {
    let _heavy = crate::heavy();
    let fleet = Fleet::start();
    let program = fleet.program(
        "flood.sh",
        &format!(
            "#!/bin/bash\n\
             if [ \"$SEEDSWEEP_SEED\" = 0 ]; then yes \"$(printf 'step %.0s' {{1..9}})$(printf '\\r')\" | head -c 314572800\n\
             else head -c 314572800 /dev/zero | tr '\\0' 'x'; fi\n\
             {REPORT}\n"
        ),
    );
    let (id, _) = fleet.submit(&program, "[0, 1]", 1, "");
    let child = fleet
        .worker(&program, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let started = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() && started.elapsed() < Duration::from_secs(240) {
        // Anonymous memory: what the worker allocates (its mapped libraries, libtorch's
        // 300 MiB among them, come and go with the page cache).
        if let Some(anon) = std::fs::read_to_string(&status).ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("RssAnon:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        }) {
            peak_kib = peak_kib.max(anon);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.states(&id), "done,done");
    // A CPU worker with libtorch loaded holds about 190 MiB of anonymous memory, flood or
    // none; the floods, were they kept, would add 300 MiB or more.
    assert!(
        peak_kib < 256 << 10,
        "the worker's anonymous memory peaked at {} MiB",
        peak_kib >> 10
    );
    for seed in [0, 1] {
        let log = PathBuf::from(fleet.sql(&format!(
            "SELECT log FROM attempts WHERE sweep_id = '{id}' AND seed = {seed}"
        )));
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut older = log.clone().into_os_string();
        older.push(".1");
        let total = size(&log) + size(Path::new(&older));
        assert!(total <= 32 << 20, "seed {seed}'s log takes {total} bytes");
        assert!(total > 0);
    }
}

/// A holder of the worker token forges the result of a seed another worker is training: the
/// lease named with its fence guessed (1), a better score under worker id "forger". Refused
/// for want of the lease's key; the honest worker's result is the seed's.
#[test]
fn a_forged_result_under_another_workers_lease_is_refused() {
    use seedsweep_proto::v1 as pb;
    let fleet = Fleet::start();
    let program = fleet.program("slow.sh", &format!("#!/bin/bash\nsleep 3\n{REPORT}\n"));
    let (id, _) = fleet.submit(&program, "[0]", 1, "");
    let mut honest = fleet.worker(&program, &[]);
    let honest = honest.spawn().unwrap();
    seedsweep_tests::wait_until("the seed is leased", Duration::from_secs(30), || {
        fleet.states(&id) == "leased"
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refusals = runtime.block_on(async {
        let connection = seedsweep_proto::client::Connection {
            url: fleet.coordinator.url.clone(),
            token: Some(WORKER_TOKEN.into()),
            ..Default::default()
        };
        let mut c = connection.connect().await.unwrap();
        let lease = Some(pb::LeaseRef {
            sweep_id: id.clone(),
            seed: 0,
            fence: 1,
            key: vec![0; 16],
        });
        let epoch = pb::EpochMetrics {
            lease: lease.clone(),
            epoch: 1,
            train_loss: Some(0.01),
            train_accuracy: Some(0.999),
            test_loss: Some(0.01),
            test_accuracy: Some(0.999),
            lr: Some(0.1),
            seconds: 1.0,
            ..Default::default()
        };
        let streamed = c.stream_epoch_metrics(tokio_stream::iter([epoch])).await;
        let completed = c
            .complete_seed(pb::CompleteSeedRequest {
                lease,
                worker_id: "forger".into(),
                test_accuracy: Some(0.999),
                test_loss: Some(0.01),
                train_loss: Some(0.01),
                train_accuracy: Some(0.999),
                epochs: 1,
                seconds: 1.0,
                device: "cpu".into(),
                data_fingerprint: "none".into(),
                precision: "fp32".into(),
                ..Default::default()
            })
            .await;
        [streamed.unwrap_err(), completed.unwrap_err()]
    });
    for e in refusals {
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("lease key does not match"), "{e:?}");
    }
    let out = honest.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let result = fleet.sql(&format!(
        "SELECT worker_id <> 'forger', test_accuracy FROM results WHERE sweep_id = '{id}'"
    ));
    assert_eq!(result, "1|0.5");
}

/// A page of the dashboard at `base`, signed in with the admin token.
fn dashboard_page(base: &str, path: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let signed_in = agent
        .post(&format!("{base}/login"))
        .send_form([("token", ADMIN_TOKEN)])
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let mut page = agent
        .get(&format!("{base}{path}"))
        .header("cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(page.status().as_u16(), 200, "{path}");
    page.body_mut().read_to_string().unwrap()
}

/// A program that reports only a loss, its score (lower is better), and nothing else: every
/// seed counts, nothing stands in for the metrics it lacks, and the best seed is the lowest, in
/// `sweep stats`, `sweep report`, SQL and the dashboard.
#[test]
fn a_program_that_reports_only_a_loss_is_scored_lower_is_better() {
    let port = seedsweep_tests::free_port();
    let fleet = Fleet::start_with(&["--http-listen", &format!("127.0.0.1:{port}")]);
    // Seed 7 is far better (lower) than the rest: a lucky black swan.
    let program = fleet.program(
        "loss.sh",
        "#!/bin/bash\nif [ \"$SEEDSWEEP_SEED\" = 7 ]; then loss=0.05; else loss=1.0$((SEEDSWEEP_SEED % 5)); fi\n\
         printf '{\"epoch\": 1}\\n{\"epoch\": 2, \"test_loss\": %s}\\n' \"$loss\" >> \"$SEEDSWEEP_METRICS_FILE\"\n",
    );
    let (id, _) = fleet.submit(
        &program,
        "\"0..12\"",
        1,
        "score = \"test_loss\"\nscore_direction = \"min\"\nepochs = 2",
    );
    let out = fleet.run_worker(fleet.worker(&program, &[]), Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.states(&id), ["done"; 12].join(","));

    // What was not reported is NULL, in results and epochs alike.
    assert_eq!(
        fleet.sql(&format!(
            "SELECT count(*), count(test_accuracy), count(train_loss), count(train_accuracy) FROM results WHERE sweep_id = '{id}'"
        )),
        "12|0|0|0"
    );
    assert_eq!(
        fleet.sql(&format!(
            "SELECT count(*), count(lr), count(train_loss), count(test_loss) FROM epoch_metrics WHERE sweep_id = '{id}'"
        )),
        "24|0|0|12"
    );
    assert_eq!(
        fleet.sql(&format!(
            "SELECT best_seed, worst_seed, score, score_direction FROM sweep_summary WHERE sweep_id = '{id}'"
        )),
        "7|4|test_loss|min"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&fleet.sweep_ok(&["stats", &id, "--json"])).unwrap();
    assert_eq!(
        (&stats["metric"], &stats["direction"], &stats["best_seed"]),
        (&"test_loss".into(), &"min".into(), &7.into()),
        "{stats}"
    );
    let swan = &stats["black_swans"][0];
    assert_eq!(
        (&swan["seed"], &swan["side"], &swan["lucky"]),
        (&7.into(), &"low".into(), &true.into())
    );
    let mean = stats["mean"].as_f64().unwrap();
    let best_of_5 = stats["best_of_k"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["k"] == 5)
        .unwrap();
    assert!(best_of_5["expected_min"].as_f64().unwrap() < mean);
    assert!(best_of_5["inflation"].as_f64().unwrap() > 0.0);
    assert!(
        fleet
            .sweep_ok(&["stats", &id])
            .contains("test_loss (lower is better)")
    );
    assert!(
        fleet
            .sweep_ok(&["status", &id])
            .contains("best 0.0500 (seed 7)")
    );
    let results = fleet.sweep_ok(&["results", &id]);
    assert!(!results.contains("0.0000"), "no stand-in zeros:\n{results}");

    let report = fleet.dir.path().join("report");
    fleet.sweep_ok(&["report", &id, "--out", report.to_str().unwrap()]);
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(
        md.contains("test_loss (lower is better)") && md.contains("| 0.0500 (7) |"),
        "{md}"
    );

    let base = format!("http://127.0.0.1:{port}");
    let page = dashboard_page(&base, &format!("/sweeps/{id}"));
    assert!(
        page.contains("(lower is better)") && page.contains("lucky"),
        "{page}"
    );
    let seed = dashboard_page(&base, &format!("/sweeps/{id}/seeds/7"));
    assert!(
        seed.contains("<th>test loss</th>") && !seed.contains("test accuracy"),
        "{seed}"
    );
}

/// A program with only metrics of its own, one of them its score: statistics, watch and export
/// read them, and the known metrics it never reported are absent, not zero.
#[test]
fn a_program_with_only_custom_metrics_is_scored_by_its_own() {
    let fleet = Fleet::start();
    let program = fleet.program(
        "agent.sh",
        "#!/bin/bash\nfor e in 1 2 3; do\n  printf '{\"epoch\": %d, \"reward\": %d.5, \"episode_len\": %d}\\n' \
         $e $((SEEDSWEEP_SEED + e)) $((100 - SEEDSWEEP_SEED)) >> \"$SEEDSWEEP_METRICS_FILE\"\ndone\n",
    );
    let (id, _) = fleet.submit(&program, "\"0..6\"", 1, "score = \"reward\"");
    let out = fleet.run_worker(fleet.worker(&program, &[]), Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.states(&id), ["done"; 6].join(","));

    let stats: serde_json::Value =
        serde_json::from_str(&fleet.sweep_ok(&["stats", &id, "--json"])).unwrap();
    assert_eq!(
        (
            &stats["metric"],
            &stats["direction"],
            &stats["n"],
            &stats["best_seed"]
        ),
        (&"reward".into(), &"max".into(), &6.into(), &5.into()),
        "{stats}"
    );
    // Reward per epoch: epoch 3's is seed + 3.5, its mean 6.
    let last = stats["epochs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((&last["epoch"], &last["mean"]), (&3.into(), &6.0.into()));
    let other: serde_json::Value =
        serde_json::from_str(&fleet.sweep_ok(&["stats", &id, "--metric", "episode_len", "--json"]))
            .unwrap();
    assert_eq!(
        (&other["min"], &other["max"]),
        (&95.0.into(), &100.0.into())
    );
    // A known metric that no seed reported has no statistics: nothing stands in for it.
    let none: serde_json::Value = serde_json::from_str(&fleet.sweep_ok(&[
        "stats",
        &id,
        "--metric",
        "test_accuracy",
        "--json",
    ]))
    .unwrap();
    assert_eq!(none["n"], 0, "{none}");

    let watched = fleet.sweep_ok(&["watch", &id]);
    assert!(watched.contains("best 8.5000 (seed 5)"), "{watched}");

    let csv = fleet.dir.path().join("results.csv");
    fleet.sweep_ok(&[
        "export",
        &id,
        "--format",
        "csv",
        "--out",
        csv.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let first = lines.next().unwrap();
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let cells: Vec<&str> = first.splitn(header.len(), ',').collect();
    assert_eq!(cells[at("test_accuracy")], "", "{text}");
    assert_eq!(cells[at("train_loss")], "", "{text}");
    assert!(first.contains("reward"), "{text}");
}

/// Whether this process's cgroup v2 group delegates `controller` to groups below it (the
/// worker's run groups sit below the group the worker starts in, which is this test's).
fn delegates(controller: &str) -> bool {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next() == Some("cgroup2")).then(|| left.split(' ').nth(4))?
    });
    mount.is_some_and(|m| {
        let dir = Path::new(m).join(path.trim_start_matches('/'));
        std::fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
    })
}

/// A program that wants 200 MiB under `memory_limit_mb = 64`: where the host delegates the
/// memory controller, the kernel kills it and the cause says it met its limit (a counted
/// failure); where not, the worker cannot enforce the limit, so it hands the seed back
/// uncounted and stops, saying why. Under the subreaper a limit is never enforceable.
#[test]
fn a_memory_limit_is_enforced_or_the_seed_handed_back() {
    let fleet = Fleet::start();
    // `tail` keeps the one endless line it reads in memory.
    let program = fleet.program(
        "hungry.sh",
        &format!("#!/bin/bash\nhead -c 200M /dev/zero | tail -c 1 >/dev/null\n{REPORT}\n"),
    );
    let (id, _) = fleet.submit(&program, "[0]", 1, "memory_limit_mb = 64");
    let under = |containment: &str| {
        let w = fleet.worker(&program, &["--containment", containment]);
        fleet.run_worker(w, Duration::from_secs(60))
    };

    let subreaper = under("subreaper");
    assert!(!subreaper.status.success());
    assert!(
        stderr(&subreaper).contains("`command.memory_limit_mb` needs cgroup containment"),
        "{}",
        stderr(&subreaper)
    );
    let attempts = |outcome: &str| {
        fleet.sql(&format!(
            "SELECT count(*) FROM attempts WHERE sweep_id = '{id}' AND outcome = '{outcome}'"
        ))
    };
    assert_eq!(attempts("released"), "1");

    let cgroup = under("cgroup");
    let log = stderr(&cgroup);
    if log.contains("--containment cgroup: ") {
        eprintln!("skipped the cgroup half: this host gives the worker no cgroup v2 group: {log}");
        return;
    }
    if delegates("memory") {
        assert!(cgroup.status.success(), "{log}");
        let cause = fleet.sql(&format!(
            "SELECT cause FROM attempts WHERE sweep_id = '{id}' AND outcome = 'failed'"
        ));
        assert!(cause.contains("memory limit"), "{cause}");
        assert_eq!(fleet.states(&id), "failed");
    } else {
        assert!(!cgroup.status.success());
        assert!(
            log.contains("`command.memory_limit_mb`: cannot write") && log.contains("memory.max"),
            "{log}"
        );
        assert_eq!(attempts("released"), "2");
        assert_eq!(fleet.states(&id), "pending");
    }
}

/// A program whose score is not finite for some seeds (written as Python's json writes NaN),
/// or that says it diverged, and one that fails: the diverged seeds are finished and counted,
/// not retried; the failed one is counted with its cause; the score's statistics describe the
/// converged seeds and say so, in `sweep stats`, its JSON, the report and the dashboard.
#[test]
fn diverged_seeds_are_counted_and_failed_ones_named() {
    let port = seedsweep_tests::free_port();
    let fleet = Fleet::start_with(&["--http-listen", &format!("127.0.0.1:{port}")]);
    let program = fleet.program(
        "nan.sh",
        "#!/bin/bash\nout=\"$SEEDSWEEP_METRICS_FILE\"\ncase \"$SEEDSWEEP_SEED\" in\n\
         2|5) printf '{\"epoch\": 1, \"bleu\": 0.3}\\n{\"epoch\": 2, \"bleu\": NaN}\\n' >> \"$out\"; sleep 30 ;;\n\
         8) printf '{\"epoch\": 1, \"bleu\": 0.2}\\n{\"final\": true, \"diverged\": true}\\n' >> \"$out\" ;;\n\
         9) echo 'out of luck' >&2; exit 3 ;;\n\
         *) printf '{\"epoch\": 1, \"bleu\": 0.1}\\n{\"epoch\": 2, \"bleu\": 0.%d}\\n' \"$SEEDSWEEP_SEED\" >> \"$out\" ;;\n\
         esac\n",
    );
    let (id, _) = fleet.submit(&program, "\"0..10\"", 2, "score = \"bleu\"\nepochs = 2");
    let out = fleet.run_worker(fleet.worker(&program, &[]), Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fleet.states(&id),
        "done,done,done,done,done,done,done,done,done,failed"
    );
    // Diverged: recorded once, one attempt each (seed 9 failed twice: it was retried).
    assert_eq!(
        fleet.sql(&format!(
            "SELECT group_concat(seed || ':' || epoch || ':' || epochs) FROM (SELECT * FROM divergences WHERE sweep_id = '{id}' ORDER BY seed)"
        )),
        "2:2:1,5:2:1,8:1:1"
    );
    assert_eq!(
        fleet.sql(&format!(
            "SELECT seed, count(*) FROM attempts WHERE sweep_id = '{id}' AND seed IN (2, 5, 8, 9) GROUP BY seed ORDER BY seed"
        )),
        "2|1\n5|1\n8|1\n9|2"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&fleet.sweep_ok(&["stats", &id, "--json"])).unwrap();
    let o = &stats["outcomes"];
    assert_eq!(
        (
            &o["finished"],
            &o["converged"],
            &o["diverged"],
            &o["failed"]
        ),
        (&9.into(), &6.into(), &3.into(), &1.into()),
        "{stats}"
    );
    assert_eq!(
        stats["n"], 6,
        "the score's statistics are the converged seeds'"
    );
    let rate = &o["divergence_rate"];
    assert!(
        rate["low"].as_f64().unwrap() < 1.0 / 3.0 && 1.0 / 3.0 < rate["high"].as_f64().unwrap(),
        "{rate}"
    );
    // Earliest divergence first: seed 8 in its first epoch's final evaluation.
    assert_eq!(o["diverged_seeds"][0]["seed"], 8);
    assert_eq!(o["diverged_seeds"][1]["last_value"], 0.3);
    let cause = o["failure_causes"][0]["cause"].as_str().unwrap();
    assert!(cause.contains("exited with status 3"), "{cause}");

    let text = fleet.sweep_ok(&["stats", &id]);
    assert!(
        text.contains("9 finished: 6 converged, 3 diverged (33.3%")
            && text.contains("1 failed")
            && text.contains("over the converged seeds")
            && text.contains("diverged seeds"),
        "{text}"
    );
    let report = fleet.dir.path().join("report");
    fleet.sweep_ok(&["report", &id, "--out", report.to_str().unwrap()]);
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(
        md.contains("9 finished: 6 converged, 3 diverged") && md.contains("| 2 | 2 |"),
        "{md}"
    );
    let page = dashboard_page(
        &format!("http://127.0.0.1:{port}"),
        &format!("/sweeps/{id}"),
    );
    assert!(
        page.contains("9 finished: 6 converged, 3 diverged"),
        "{page}"
    );

    // The paper's table beside a second sweep whose seeds all converge, and its evidence.
    let (other, _) = fleet.submit(&program, "\"10..14\"", 2, "score = \"bleu\"\nepochs = 2");
    let out = fleet.run_worker(fleet.worker(&program, &[]), Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = fleet.dir.path().join("paper");
    fleet.sweep_ok(&["paper", &id, &other, "--out", dir.to_str().unwrap()]);
    let md = std::fs::read_to_string(dir.join("table.md")).unwrap();
    assert!(
        md.contains("| hostile | 6 | ")
            && md.contains("| 6 / 3 / 1 |")
            && md.contains("| 4 / 0 / 0 |"),
        "{md}"
    );
    assert!(md.contains("| hostile | hostile | "), "a pair row: {md}");
    assert!(md.contains("diverged seed"), "{md}");
    let tex = std::fs::read_to_string(dir.join("table.tex")).unwrap();
    assert!(
        tex.contains("\\toprule") && tex.contains("6/3/1 \\\\"),
        "{tex}"
    );
    for file in [
        "sweep.json",
        "results.csv",
        "results.parquet",
        "epochs.csv",
        "epochs.parquet",
    ] {
        assert!(
            dir.join("evidence").join(&id).join(file).is_file(),
            "{file}"
        );
    }
    // The manifest checks with the system's own tool.
    let check = Command::new("sha256sum")
        .args(["-c", "MANIFEST.sha256"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stdout(&check));
    assert_eq!(
        stdout(&check).lines().count(),
        2 + 2 * 5,
        "{}",
        stdout(&check)
    );
    // An existing folder is not overwritten.
    let again = fleet.sweep(&["paper", &id, "--out", dir.to_str().unwrap()]);
    assert!(!again.status.success() && stderr(&again).contains("not an empty folder"));
}
