//! Chaos with real processes on PostgreSQL: three workers training a small ResNet-9 with tch, two
//! coordinator replicas over one database; workers are SIGKILLed and SIGSTOPped (waking with a
//! stale lease), a coordinator is SIGKILLed and restarted, PostgreSQL is restarted. At the end every
//! seed has exactly one result, no lease is held, every lease has its attempt row, and each seed's
//! numbers equal those of an undisturbed run, bit for bit.

use seedsweep_tests::{
    CoordinatorProcess, PgServer, free_port, make_synthetic, signal, stderr, stdout, wait_until,
    worker,
};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

// Enough seeds that the sweep outlasts the disturbances below on a fast machine (with 6, a CI run
// finished the sweep before the coordinator restart and then waited for training that never came).
const SEEDS: usize = 12;
const EPOCHS: usize = 3;

fn submit(c: &CoordinatorProcess, dir: &Path, name: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"0..{SEEDS}\"\n\
             max_attempts = 20\nretry_backoff_seconds = 0.2\nretry_backoff_max_seconds = 1\n\
             [train]\nepochs = {EPOCHS}\nbatch_size = 50\nwidth = 0.125\nlr = 0.2\n"
        ),
    )
    .unwrap();
    let out = c.sweep(&["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn spawn_worker(url: &str, data: &Path) -> Child {
    worker(url, data)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

/// Per-seed epoch metrics of a sweep, as text rows, for bitwise comparison.
fn metrics(pg: &PgServer, db: &str, id: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT seed, epoch, train_loss, train_accuracy, test_loss, test_accuracy, lr
             FROM epoch_metrics WHERE sweep_id = '{id}' ORDER BY seed, epoch"
        ),
    )
}

#[test]
fn chaos_on_postgres_loses_nothing_and_counts_nothing_twice() {
    let _heavy = crate::heavy();
    let pg = PgServer::start().unwrap();
    let db = pg.fresh_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let ttl = ["--lease-ttl", "3"];
    let listen_a = format!("127.0.0.1:{}", free_port());
    let a = CoordinatorProcess::start_on(&db, &listen_a, &ttl).unwrap();
    let b = CoordinatorProcess::start(&db, &ttl).unwrap();
    let id = submit(&a, dir.path(), "chaos");
    let count = |q: &str| -> u64 { pg.psql(&db, q).trim().parse().unwrap() };
    let epochs_done = || {
        count(&format!(
            "SELECT count(*) FROM epoch_metrics WHERE sweep_id = '{id}'"
        ))
    };

    let mut workers = vec![
        spawn_worker(&a.url, &data),
        spawn_worker(&a.url, &data),
        spawn_worker(&b.url, &data),
    ];
    wait_until("training is under way", Duration::from_secs(120), || {
        epochs_done() >= 2
    });
    // A worker dies mid-seed; a replacement joins.
    signal(&workers[0], "KILL");
    let _ = workers[0].wait();
    workers[0] = spawn_worker(&b.url, &data);
    // A worker freezes past its lease's TTL, then wakes up holding a stale lease.
    signal(&workers[1], "STOP");
    std::thread::sleep(Duration::from_secs(5));
    signal(&workers[1], "CONT");
    // A coordinator crashes and comes back; its workers wait for it.
    a.kill();
    std::thread::sleep(Duration::from_secs(1));
    let a = CoordinatorProcess::start_on(&db, &listen_a, &ttl).unwrap();
    // PostgreSQL restarts under both coordinators.
    let before = epochs_done();
    let all = (SEEDS * EPOCHS) as u64;
    wait_until("more training", Duration::from_secs(120), || {
        let done = epochs_done();
        done > before || done == all
    });
    pg.restart().unwrap();

    let deadline = Instant::now() + Duration::from_secs(300);
    for mut w in workers {
        loop {
            if let Some(status) = w.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "a worker failed: {status}\ncoordinator a:\n{}\ncoordinator b:\n{}",
                    a.log(),
                    b.log()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "workers did not finish the sweep"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Exactly one result per seed, nothing held, every lease accounted for.
    let q = |sql: &str| count(&sql.replace("SWEEP", &id));
    assert_eq!(
        q("SELECT count(*) FROM results WHERE sweep_id = 'SWEEP'"),
        SEEDS as u64
    );
    assert_eq!(
        q("SELECT count(DISTINCT seed) FROM results WHERE sweep_id = 'SWEEP'"),
        SEEDS as u64
    );
    assert_eq!(
        q("SELECT count(*) FROM seeds WHERE sweep_id = 'SWEEP' AND state <> 'done'"),
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM attempts WHERE sweep_id = 'SWEEP' AND outcome = 'running'"),
        0
    );
    assert_eq!(
        q("SELECT sum(fence) FROM seeds WHERE sweep_id = 'SWEEP'"),
        q("SELECT count(*) FROM attempts WHERE sweep_id = 'SWEEP'"),
        "a lease without its attempt row"
    );
    assert!(
        q("SELECT count(*) FROM attempts WHERE sweep_id = 'SWEEP' AND outcome <> 'succeeded'") >= 1,
        "the chaos disturbed no lease"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM epoch_metrics e JOIN results r USING (sweep_id, seed)
           WHERE e.sweep_id = 'SWEEP' AND e.fence <> r.fence"
        ),
        0,
        "epoch metrics from a lease other than the one that finished"
    );

    // The same seeds, undisturbed, give the same numbers bit for bit.
    let reference = submit(&a, dir.path(), "reference");
    let out = worker(&b.url, &data).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (chaos, calm) = (metrics(&pg, &db, &id), metrics(&pg, &db, &reference));
    assert_eq!(chaos.lines().count(), SEEDS * EPOCHS);
    assert_eq!(
        chaos, calm,
        "results under chaos differ from an undisturbed run"
    );
}
