//! Real processes interrupted on purpose: a worker told to stop, a cancelled sweep, a coordinator
//! that crashes and comes back. Nothing is lost and nothing is counted twice.

use seedsweep_tests::{
    CoordinatorProcess, PgServer, free_port, make_synthetic, signal, spool_dir, sqlite_query,
    stderr, stdout, wait_until, worker,
};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn submit(c: &CoordinatorProcess, dir: &Path, seeds: &str, epochs: u32) -> String {
    let file = dir.join(format!("sweep-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &file,
        format!(
            "name = \"resilience\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = {seeds}\n\
             [train]\nepochs = {epochs}\nbatch_size = 50\nwidth = 0.125\nlr = 0.2\n"
        ),
    )
    .unwrap();
    let out = c.sweep(&["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn status(c: &CoordinatorProcess, id: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(&c.sweep(&["status", id, "--json"]))).unwrap()
}

/// Waits until at least `n` epochs of metrics are recorded in `db`.
fn wait_for_epochs(db: &Path, n: u32) {
    wait_until(
        &format!("{n} epochs are recorded"),
        Duration::from_secs(120),
        || {
            let recorded = sqlite_query(db, "SELECT count(*) FROM epoch_metrics");
            recorded.trim().parse::<u32>().unwrap() >= n
        },
    );
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let db = dir.path().join("s.db");
    (dir, data, db)
}

/// SIGTERM during training: the worker hands its seed back at once (no attempt used) and exits 0;
/// the seed is leased again straight away and finishes elsewhere. Also `--max-seeds`.
#[test]
fn a_stopped_worker_hands_its_seed_back_at_once() {
    let _heavy = crate::heavy();
    let (dir, data, db) = setup();
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let id = submit(&c, dir.path(), "[0, 1]", 30);
    let a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 1);
    signal(&a, "TERM");
    let out = a.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "worker exited with {}: {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(
        sqlite_query(&db, "SELECT seed, state, failures FROM seeds ORDER BY seed"),
        "0|pending|0\n1|pending|0\n"
    );
    assert_eq!(
        sqlite_query(&db, "SELECT outcome FROM attempts"),
        "released\n"
    );

    // Re-leased at once (the lease TTL is 60 s), and --max-seeds stops after one.
    let b = worker(&c.url, &data)
        .args(["--max-seeds", "1"])
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(
        sqlite_query(&db, "SELECT seed, fence, state FROM seeds ORDER BY seed"),
        "0|2|done\n1|0|pending\n"
    );
    let s = status(&c, &id);
    assert_eq!(
        (
            s["counts"]["done"].as_u64(),
            s["counts"]["pending"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

/// A second SIGTERM exits at once (status 130), even while the worker is still trying to hand
/// its seed back to a coordinator that does not answer (here: stopped with SIGSTOP).
#[test]
fn a_second_signal_exits_at_once() {
    let _heavy = crate::heavy();
    let (dir, data, db) = setup();
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    submit(&c, dir.path(), "[0]", 30);
    let mut a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 1);
    c.signal("STOP");
    signal(&a, "TERM");
    // The hand-back cannot get through: the worker keeps trying (for up to 20 s).
    std::thread::sleep(Duration::from_secs(2));
    let still_running = a.try_wait().unwrap().is_none();
    signal(&a, "TERM");
    let started = std::time::Instant::now();
    let out = a.wait_with_output().unwrap();
    c.signal("CONT");
    assert!(still_running, "the worker exited before the second signal");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(stderr(&out).contains("second signal"), "{}", stderr(&out));
}

/// Cancelling a sweep stops the worker holding its seed at its next heartbeat.
#[test]
fn cancelling_a_sweep_stops_its_workers() {
    let _heavy = crate::heavy();
    let (dir, data, db) = setup();
    // A 3 s lease TTL: heartbeats every second.
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &["--lease-ttl", "3"])
        .unwrap();
    let id = submit(&c, dir.path(), "\"0..3\"", 200);
    let a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 1);
    let out = c.sweep(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    // 200 epochs would take minutes; the worker must drop the seed and (idle) exit long before.
    let started = std::time::Instant::now();
    let out = a.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the worker kept training after cancel"
    );
    assert!(stderr(&out).contains("lease lost"), "{}", stderr(&out));
    let s = status(&c, &id);
    assert_eq!(s["state"], "cancelled");
    assert_eq!(s["counts"]["cancelled"], 3);
    assert_eq!(sqlite_query(&db, "SELECT count(*) FROM results"), "0\n");
    assert_eq!(
        sqlite_query(&db, "SELECT outcome FROM attempts"),
        "cancelled\n"
    );
}

/// The coordinator crashes mid-sweep and comes back on the same address and database: the worker
/// keeps training, replays the metrics the coordinator missed, and every seed ends with exactly
/// one result and all its epochs.
#[test]
fn a_coordinator_crash_loses_nothing() {
    let _heavy = crate::heavy();
    let (dir, data, db) = setup();
    let url = format!("sqlite://{}", db.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let c = CoordinatorProcess::start_on(&url, &listen, &[]).unwrap();
    let id = submit(&c, dir.path(), "\"0..3\"", 8);
    let a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 2);
    c.kill();
    std::thread::sleep(Duration::from_secs(3));
    let c = CoordinatorProcess::start_on(&url, &listen, &[]).unwrap();
    let out = a.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\ncoordinator:\n{}",
        stderr(&out),
        c.log()
    );
    // It did lose the coordinator for a while, and made up for it.
    assert!(stderr(&out).contains("replay"), "{}", stderr(&out));
    assert_eq!(
        sqlite_query(
            &db,
            "SELECT s.seed, s.state, (SELECT count(*) FROM results r WHERE r.sweep_id = s.sweep_id AND r.seed = s.seed),
                    (SELECT count(*) FROM epoch_metrics e WHERE e.sweep_id = s.sweep_id AND e.seed = s.seed)
             FROM seeds s ORDER BY s.seed"
        ),
        "0|done|1|8\n1|done|1|8\n2|done|1|8\n"
    );
    assert_eq!(status(&c, &id)["counts"]["done"], 3);
    assert_eq!(
        sqlite_query(&db, "SELECT DISTINCT outcome FROM attempts"),
        "succeeded\n"
    );
}

/// SIGTERM while the coordinator is gone: a worker waiting out a backoff exits at once, and one
/// training a seed stops and tries to hand it back for a bounded time, then exits by itself
/// (status 0, the seed left to expire) inside the 30 s Kubernetes and Slurm give by default.
#[test]
fn stopped_workers_exit_by_themselves_when_the_coordinator_is_gone() {
    let _heavy = crate::heavy();
    let (dir, data, db) = setup();
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    submit(&c, dir.path(), "[0]", 30);
    let training = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 1);
    // Nothing to lease but a seed outstanding: this one polls, once connected.
    let idle_log = dir.path().join("idle.log");
    let idle = worker(&c.url, &data)
        .stderr(std::fs::File::create(&idle_log).unwrap())
        .spawn()
        .unwrap();
    let idle_said = || std::fs::read_to_string(&idle_log).unwrap();
    wait_until("the idle worker connects", Duration::from_secs(60), || {
        idle_said().contains("worker connected")
    });
    c.kill();
    // Long enough for the idle worker's backoff to reach 8 s.
    std::thread::sleep(Duration::from_secs(8));
    signal(&idle, "TERM");
    signal(&training, "TERM");
    let asked = std::time::Instant::now();
    let idle = idle.wait_with_output().unwrap();
    let idle_took = asked.elapsed();
    assert!(idle_said().contains("retrying"), "{}", idle_said());
    let training = training.wait_with_output().unwrap();
    let training_took = asked.elapsed();
    assert!(idle.status.success(), "{}", idle_said());
    assert!(
        idle_took < Duration::from_secs(3),
        "the idle worker took {idle_took:?}: {}",
        idle_said()
    );
    assert!(training.status.success(), "{}", stderr(&training));
    assert!(
        training_took < Duration::from_secs(28),
        "the training worker took {training_took:?}: {}",
        stderr(&training)
    );
    assert!(
        stderr(&training).contains("could not hand the seed back"),
        "{}",
        stderr(&training)
    );
}

/// A short lease TTL, and an outage of four of them past the end of training.
const TTL: &[&str] = &["--lease-ttl", "2"];
const OUTAGE: Duration = Duration::from_secs(8);

/// Data large enough that an epoch takes a few seconds: the outage starts before the last one
/// ends.
fn slow_setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 2000, 200);
    let db = dir.path().join("s.db");
    (dir, data, db)
}

/// How many results wait in the spool of the workers started on `data`.
fn spooled(data: &Path) -> usize {
    std::fs::read_dir(spool_dir(data))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "result"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until training has ended while the coordinator (or its database) is away: the result
/// is in the spool, undelivered.
fn wait_until_spooled(data: &Path) {
    wait_until("the result is spooled", Duration::from_secs(120), || {
        spooled(data) == 1
    });
}

/// One seed, its result and its three epochs recorded once, in one attempt that succeeded.
const ONE_CLEAN_RESULT: &str = "0|done|1|3|1|succeeded\n";
const ONE_CLEAN_RESULT_SQL: &str = "SELECT s.seed, s.state,
        (SELECT count(*) FROM results r WHERE r.sweep_id = s.sweep_id AND r.seed = s.seed),
        (SELECT count(*) FROM epoch_metrics e WHERE e.sweep_id = s.sweep_id AND e.seed = s.seed),
        (SELECT count(*) FROM attempts a WHERE a.sweep_id = s.sweep_id AND a.seed = s.seed),
        (SELECT min(outcome) FROM attempts a WHERE a.sweep_id = s.sweep_id AND a.seed = s.seed)
     FROM seeds s ORDER BY s.seed";

/// The coordinator goes away for four lease TTLs as a seed's last epoch trains, and comes back
/// on the same address and database: the worker keeps the result in its spool and delivers it,
/// the lease does not expire (the grace after a restart), and the seed ends with one result,
/// all its epochs and one attempt: nothing counted, nothing trained twice.
#[test]
fn a_long_coordinator_outage_as_training_ends_costs_nothing() {
    let _heavy = crate::heavy();
    let (dir, data, db) = slow_setup();
    let url = format!("sqlite://{}", db.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let c = CoordinatorProcess::start_on(&url, &listen, TTL).unwrap();
    submit(&c, dir.path(), "[0]", 3);
    let a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_epochs(&db, 2);
    c.kill();
    wait_until_spooled(&data);
    std::thread::sleep(OUTAGE);
    let c = CoordinatorProcess::start_on(&url, &listen, TTL).unwrap();
    let out = a.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}\ncoordinator:\n{}", c.log());
    assert!(
        log.contains("will deliver the result when it is back"),
        "the outage did not cover the end of training:\n{log}"
    );
    assert_eq!(
        sqlite_query(&db, ONE_CLEAN_RESULT_SQL),
        ONE_CLEAN_RESULT,
        "{log}"
    );
}

/// The same with PostgreSQL stopped for four TTLs instead (the coordinator stays up, answers
/// UNAVAILABLE meanwhile, and gives its leases the grace once the database answers again).
#[test]
fn a_long_database_outage_as_training_ends_costs_nothing() {
    let _heavy = crate::heavy();
    let pg = PgServer::start().unwrap();
    let db_url = pg.fresh_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 2000, 200);
    let c = CoordinatorProcess::start(&db_url, TTL).unwrap();
    submit(&c, dir.path(), "[0]", 3);
    let mut a = worker(&c.url, &data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("2 epochs are recorded", Duration::from_secs(120), || {
        pg.psql(&db_url, "SELECT count(*) FROM epoch_metrics")
            .trim()
            == "2"
    });
    if !pg.halt().unwrap() {
        eprintln!("DATABASE_URL is not ours to stop: skipping the outage");
        let _ = a.kill();
        let _ = a.wait();
        return;
    }
    wait_until_spooled(&data);
    std::thread::sleep(OUTAGE);
    pg.resume().unwrap();
    let out = a.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}\ncoordinator:\n{}", c.log());
    assert_eq!(
        pg.psql(&db_url, ONE_CLEAN_RESULT_SQL),
        ONE_CLEAN_RESULT,
        "{log}"
    );
}

/// A worker killed (SIGKILL) after training and before its result reached the coordinator: the
/// next worker started on the same spool delivers it before leasing anything.
#[test]
fn a_killed_workers_spooled_result_lands_when_it_restarts() {
    let _heavy = crate::heavy();
    let (dir, data, db) = slow_setup();
    let url = format!("sqlite://{}", db.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let c = CoordinatorProcess::start_on(&url, &listen, TTL).unwrap();
    submit(&c, dir.path(), "[0]", 3);
    let mut a = worker(&c.url, &data).stderr(Stdio::null()).spawn().unwrap();
    wait_for_epochs(&db, 2);
    // Away, so the result cannot be delivered and waits in the spool.
    c.kill();
    wait_until_spooled(&data);
    a.kill().unwrap();
    a.wait().unwrap();
    let c = CoordinatorProcess::start_on(&url, &listen, TTL).unwrap();
    let out = worker(&c.url, &data).output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}\ncoordinator:\n{}", c.log());
    assert!(log.contains("delivered a result from the spool"), "{log}");
    assert_eq!(
        sqlite_query(&db, ONE_CLEAN_RESULT_SQL),
        ONE_CLEAN_RESULT,
        "{log}"
    );
    assert_eq!(spooled(&data), 0, "the delivered result is still spooled");
}

/// SIGTERM while the worker downloads CIFAR-10 from a mirror that accepted the connection and
/// then went silent: the worker exits within seconds and its seed is pending again, uncounted.
#[test]
fn a_stop_during_a_stalled_download_hands_the_seed_back() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let file = dir.path().join("cifar.toml");
    std::fs::write(
        &file,
        "name = \"stalled\"\ntask = \"resnet9\"\ndataset = \"cifar10\"\nseeds = [0]\n",
    )
    .unwrap();
    let out = c.sweep(&["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A mirror that takes the connection and never answers.
    let mirror = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/cifar-10-binary.tar.gz",
        mirror.local_addr().unwrap()
    );
    let a = worker(&c.url, &dir.path().join("data"))
        .args(["--cifar10-url", &url])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_stalled, _) = mirror.accept().unwrap();
    let asked = std::time::Instant::now();
    signal(&a, "TERM");
    let out = a.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert_handed_back(&db, asked, &log);
}

/// SIGTERM during the fine-tune task's feature pass (a ResNet-18 at 224 x 224 over 900 images,
/// tens of seconds on CPU): the worker exits within seconds and its seed is pending again,
/// uncounted.
#[test]
fn a_stop_during_the_feature_pass_hands_the_seed_back() {
    use std::io::BufRead;
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = (dir.path().join("data"), dir.path().join("models"));
    for (split, n) in [("train", 120u32), ("val", 30)] {
        for c in 0..6u32 {
            let class = data.join("folder").join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&class).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(64, 64, |x, y| {
                    image::Rgb([(x * c) as u8, (y * i) as u8, ((x + y + i) * 3) as u8])
                });
                img.save(class.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let made = seedsweep_tests::run(
        std::process::Command::new(seedsweep_tests::bin("worker"))
            .args(["make-backbone", "resnet18", "--input-size", "224", "--out"])
            .arg(models.join("r18.safetensors")),
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let file = dir.path().join("ft.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"feature pass\"\ntask = \"finetune-head\"\ndataset = \"folder\"\nseeds = [0]\n{}\n\
             [finetune.head]\nsteps = 20\nbatch_size = 8\nlr = 0.05\n",
            stdout(&made)
        ),
    )
    .unwrap();
    let out = c.sweep(&["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut a = worker(&c.url, &data)
        .arg("--model-dir")
        .arg(&models)
        .arg("--feature-cache")
        .arg(dir.path().join("cache"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = std::io::BufReader::new(a.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log += &line;
        log.push('\n');
        if line.contains("computing backbone features") {
            break;
        }
    }
    assert!(log.contains("computing backbone features"), "{log}");
    let asked = std::time::Instant::now();
    signal(&a, "TERM");
    log.extend(lines.map(|l| l.unwrap() + "\n"));
    let status = a.wait().unwrap();
    assert!(status.success(), "{log}");
    assert!(!log.contains("backbone features computed"), "{log}");
    assert_handed_back(&db, asked, &log);
}

/// The worker asked to stop at `asked` stopped within seconds, its seed pending again and its
/// attempt released, uncounted.
fn assert_handed_back(db: &Path, asked: std::time::Instant, log: &str) {
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the worker took {:?} to stop:\n{log}",
        asked.elapsed()
    );
    assert_eq!(
        sqlite_query(
            db,
            "SELECT s.state, s.failures, a.outcome FROM seeds s JOIN attempts a USING (sweep_id, seed)"
        ),
        "pending|0|released\n",
        "{log}"
    );
}
