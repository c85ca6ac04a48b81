//! Bad input gets a clear error, a non-zero exit, and writes nothing.

use seedsweep_tests::{CoordinatorProcess, bin, run, stderr, stdout};
use std::process::Command;

const GOOD: &str = "name = \"ok\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"0..4\"\n[train]\nepochs = 1\n";

/// A coordinator on a fresh SQLite file, with the sweep `text` submitted.
fn submitted(text: &str) -> (tempfile::TempDir, CoordinatorProcess, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let coordinator = CoordinatorProcess::start(&db, &[]).unwrap();
    let file = dir.path().join("sweep.toml");
    std::fs::write(&file, text).unwrap();
    let out = coordinator.sweep(&["submit", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    (dir, coordinator, id)
}

#[test]
fn malformed_sweep_files_are_rejected_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let coordinator = CoordinatorProcess::start(&db, &[]).unwrap();
    let cases = [
        (GOOD.replace("0..4", "4..4"), "`seeds`"),
        (GOOD.replace("\"0..4\"", "[1, 2, 2]"), "twice"),
        (GOOD.replace("epochs = 1", "epochs = 0"), "`train.epochs`"),
        (
            GOOD.replace("epochs = 1", "epochs = 1\nepohcs = 2"),
            "epohcs",
        ),
        (
            GOOD.replace(
                "task = \"resnet9\"",
                "task = \"resnet9\"\nlearning_rate = 1",
            ),
            "learning_rate",
        ),
        ("name = [".to_string(), "invalid sweep file"),
    ];
    for (text, expect) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, &text).unwrap();
        let out = coordinator.sweep(&["submit", file.to_str().unwrap()]);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(
            stderr(&out).contains(expect),
            "for\n{text}\nexpected `{expect}` in: {}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), "", "printed an id for a rejected file");
    }
    let missing = coordinator.sweep(&["submit", dir.path().join("nope.toml").to_str().unwrap()]);
    assert!(
        !missing.status.success() && stderr(&missing).contains("failed to read"),
        "{}",
        stderr(&missing)
    );
    let listed = stdout(&coordinator.sweep(&["list", "--json"]));
    assert_eq!(
        listed.trim(),
        "[]",
        "a rejected sweep was created: {listed}"
    );
}

#[test]
fn unknown_and_malformed_sweep_ids_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let coordinator = CoordinatorProcess::start(&db, &[]).unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    for cmd in ["status", "results"] {
        let out = coordinator.sweep(&[cmd, &unknown]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(&format!("no sweep {unknown}")),
            "{}",
            stderr(&out)
        );
        let out = coordinator.sweep(&[cmd, "not-a-uuid"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("is not a sweep id"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn clients_report_a_coordinator_that_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let port = seedsweep_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let out = run(Command::new(bin("worker"))
        .args([
            "--cpu",
            "--exit-when-idle",
            "--connect-timeout",
            "1",
            "--coordinator",
            &url,
        ])
        .arg("--data-dir")
        .arg(&data));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the coordinator"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "the worker wrote to its data folder");

    let file = dir.path().join("ok.toml");
    std::fs::write(&file, GOOD).unwrap();
    let out = run(Command::new(bin("coordinator"))
        .args(["sweep", "submit", "--coordinator", &url])
        .arg(&file));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the coordinator"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "something was written"
    );
}

#[test]
fn bad_flags_and_database_urls_are_rejected() {
    let out = run(Command::new(bin("worker")).args(["--gpu", "0", "--cpu"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    let out = run(Command::new(bin("worker"))
        .arg("--coordinator")
        .arg("http://x"));
    assert!(
        !out.status.success() && stderr(&out).contains("--gpu"),
        "{}",
        stderr(&out)
    );
    let out = run(Command::new(bin("coordinator")).args([
        "migrate",
        "--database-url",
        "mysql://u:secret@h/db",
    ]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unsupported database URL") && !stderr(&out).contains("secret"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_worker_without_its_dataset_hands_the_seed_back_and_stops() {
    let (dir, coordinator, id) = submitted(GOOD);
    let out = run(&mut seedsweep_tests::worker(
        &coordinator.url,
        &dir.path().join("data"),
    ));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("make-dataset synthetic"),
        "{}",
        stderr(&out)
    );
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&coordinator.sweep(&["status", &id, "--json"]))).unwrap();
    // The seed is pending again and no attempt was used up.
    assert_eq!(status["counts"]["pending"], 4, "{status}");
    let failures = run(Command::new("sqlite3")
        .arg(dir.path().join("s.db"))
        .arg("SELECT sum(failures), (SELECT group_concat(outcome) FROM attempts) FROM seeds"));
    assert_eq!(stdout(&failures).trim(), "0|released");
}

#[test]
fn a_failed_cifar10_download_hands_the_seed_back_and_says_where_to_put_the_files() {
    let (dir, coordinator, id) = submitted(&GOOD.replace("synthetic", "cifar10"));
    // A port nobody listens on: the download fails at once, as it does without internet access.
    let mirror = format!(
        "http://127.0.0.1:{}/cifar-10-binary.tar.gz",
        seedsweep_tests::free_port()
    );
    let data = dir.path().join("data");
    let out =
        run(seedsweep_tests::worker(&coordinator.url, &data).args(["--cifar10-url", &mirror]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("could not be downloaded") && err.contains("cifar10/cifar-10-batches-bin"),
        "{err}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&coordinator.sweep(&["status", &id, "--json"]))).unwrap();
    assert_eq!(status["counts"]["pending"], 4, "{status}");
    assert!(
        !data.join("cifar10").exists(),
        "a failed download left files behind"
    );
}

#[test]
fn sweep_control_rejects_bad_ids_seeds_and_transitions() {
    let (_dir, coordinator, id) = submitted(GOOD);
    let unknown = uuid::Uuid::new_v4().to_string();
    for cmd in ["pause", "resume", "cancel"] {
        let out = coordinator.sweep(&[cmd, &unknown]);
        assert!(
            !out.status.success() && stderr(&out).contains("no sweep"),
            "{}",
            stderr(&out)
        );
    }
    for bad in ["5..5", "a,b", "1,1", "-3..2"] {
        let out = coordinator.sweep(&["extend", &id, &format!("--seeds={bad}")]);
        assert!(!out.status.success(), "accepted --seeds {bad}");
        assert!(stderr(&out).contains("seeds"), "{}", stderr(&out));
    }
    let out = coordinator.sweep(&["extend", &id, "--seeds", "2..6"]);
    assert!(stdout(&out).contains("added 2 seeds"), "{}", stderr(&out));
    assert!(coordinator.sweep(&["cancel", &id]).status.success());
    let out = coordinator.sweep(&["resume", &id]);
    assert!(
        !out.status.success() && stderr(&out).contains("final"),
        "{}",
        stderr(&out)
    );
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&coordinator.sweep(&["status", &id, "--json"]))).unwrap();
    assert_eq!(
        (
            status["total"].as_u64(),
            status["counts"]["cancelled"].as_u64()
        ),
        (Some(6), Some(6))
    );
}
