//! Real processes interrupted on purpose: a worker told to stop, a cancelled sweep, a coordinator
//! that crashes and comes back. Nothing is lost and nothing is counted twice.

use seedsweep_tests::{
    CoordinatorProcess, free_port, make_synthetic, signal, sqlite_query, stderr, stdout,
    wait_until, worker,
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
    // The hand-back cannot get through: the worker keeps trying (for up to a minute).
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
