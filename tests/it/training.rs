//! The training side through the real binaries: recipes, seed factors, checkpoints that let a
//! lost seed resume on another worker with the same numbers.

use seedsweep_tests::{
    CoordinatorProcess, make_digits, make_synthetic, signal, sqlite_query, stderr, wait_until,
    worker,
};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn run_workers(c: &CoordinatorProcess, data: &Path, n: usize, extra: &[&str]) -> Vec<String> {
    let workers: Vec<_> = (0..n)
        .map(|_| {
            worker(&c.url, data)
                .args(extra)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    workers
        .into_iter()
        .map(|w| {
            let out = w.wait_with_output().unwrap();
            assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
            stderr(&out)
        })
        .collect()
}

/// A sweep's epoch metrics as text, one line per (seed, epoch), without the timings.
fn metrics(db: &Path, sweep: &str) -> String {
    sqlite_query(
        db,
        &format!(
            "SELECT seed, epoch, train_loss, train_accuracy, test_loss, test_accuracy, lr
             FROM epoch_metrics WHERE sweep_id = '{sweep}' ORDER BY seed, epoch"
        ),
    )
}

/// The paper's recipe (overridden to a tiny size) in a crossed design of init x order seeds, with
/// 60 training images held out by the split factor: every combination runs, its factor seeds are
/// stored with its result, runs differ, and the design cannot be extended. One worker, which leases each next seed as the last epoch starts.
#[test]
fn a_crossed_design_on_the_paper_recipe() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 300, 100);
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let id = c.submit(dir.path(),
        "name = \"crossed\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nrecipe = \"paper-short\"\n\
         base_seed = 9\n[crossed]\ninit = [0, 1]\norder = [0, 1]\n\
         [train]\nepochs = 2\nbatch_size = 50\nwidth = 0.125\neval_every = 2\nholdout = 60\n",
    );
    let logs = run_workers(&c, &data, 1, &[]);
    // The next seed is leased while the current one trains its last epoch, not after.
    let lines: Vec<&str> = logs[0].lines().collect();
    let second_lease = lines.iter().filter(|l| l.contains(" leased ")).nth(1);
    let first_finish = lines.iter().position(|l| l.contains("seed finished"));
    let second_lease = second_lease.and_then(|l| lines.iter().position(|x| x == l));
    assert!(
        matches!((second_lease, first_finish), (Some(a), Some(b)) if a < b),
        "no lease ahead of the first result:\n{}",
        logs[0]
    );
    assert_eq!(
        sqlite_query(
            &db,
            "SELECT seed, init_seed, order_seed, augment_seed, split_seed, precision, deterministic,
                    val_accuracy BETWEEN 0 AND 1 FROM results ORDER BY seed"
        ),
        "0|0|0|9|9|fp32|1|1\n1|0|1|9|9|fp32|1|1\n2|1|0|9|9|fp32|1|1\n3|1|1|9|9|fp32|1|1\n"
    );
    assert_eq!(
        sqlite_query(&db, "SELECT count(DISTINCT train_loss) FROM results"),
        "4\n"
    );
    // eval_every = 2: epoch 1 has no test or validation metrics, epoch 2 (the last) has.
    assert_eq!(
        sqlite_query(
            &db,
            "SELECT epoch, count(test_loss), count(val_loss), count(*) FROM epoch_metrics GROUP BY epoch ORDER BY epoch"
        ),
        "1|0|0|4\n2|4|4|4\n"
    );
    let config: serde_json::Value =
        serde_json::from_str(&sqlite_query(&db, "SELECT config FROM sweeps")).unwrap();
    assert_eq!(config["recipe"], "paper-short");
    assert_eq!(config["train"]["model"], "resnet9-skinny");
    assert_eq!(config["train"]["schedule"], "picard");
    let out = c.sweep(&["extend", &id, "--seeds", "10..12"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("crossed design"), "{}", stderr(&out));
}

/// A worker killed mid-seed leaves a checkpoint; once its lease expires another worker resumes
/// the seed from it and ends with exactly the numbers of an undisturbed run. Also: one worker
/// with two slots gives the same numbers as one slot.
#[test]
fn a_lost_seed_resumes_from_its_checkpoint_with_the_same_numbers() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let db = dir.path().join("s.db");
    let checkpoints = dir.path().join("checkpoints");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &["--lease-ttl", "3"])
        .unwrap();
    let sweep = |name: &str, seeds: &str| {
        format!(
            "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = {seeds}\n\
             [train]\nepochs = 6\nbatch_size = 50\nwidth = 0.125\ncheckpoint_every = 1\n"
        )
    };
    // Undisturbed: seeds 0 and 1 on one worker with two slots, then seed 0 alone.
    let reference = c.submit(dir.path(), &sweep("reference", "[0, 1]"));
    let logs = run_workers(&c, &data, 1, &["--slots", "2"]);
    assert!(logs[0].contains("slots=2"), "{}", logs[0]);
    let single = c.submit(dir.path(), &sweep("single", "[0]"));
    run_workers(&c, &data, 1, &[]);
    let seed0 = |sweep: &str| {
        metrics(&db, sweep)
            .lines()
            .filter(|l| l.starts_with("0|"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        seed0(&reference),
        seed0(&single),
        "two slots changed the numbers"
    );

    // Interrupted: kill the worker after epoch 3, let the lease expire, resume elsewhere.
    let cut = c.submit(dir.path(), &sweep("cut", "[0]"));
    let mut a = worker(&c.url, &data)
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("3 epochs are recorded", Duration::from_secs(120), || {
        sqlite_query(
            &db,
            &format!("SELECT count(*) FROM epoch_metrics WHERE sweep_id = '{cut}'"),
        )
        .trim()
        .parse::<u32>()
        .unwrap()
            >= 3
    });
    signal(&a, "KILL");
    let _ = a.wait();
    let logs = run_workers(
        &c,
        &data,
        1,
        &["--checkpoint-dir", checkpoints.to_str().unwrap()],
    );
    assert!(
        logs[0].contains("resuming from a checkpoint"),
        "{}",
        logs[0]
    );
    assert_eq!(seed0(&cut), seed0(&reference));
    assert_eq!(
        sqlite_query(
            &db,
            &format!("SELECT outcome FROM attempts WHERE sweep_id = '{cut}' ORDER BY fence"),
        ),
        "expired\nsucceeded\n"
    );
    // The finished seed's checkpoint is gone.
    assert!(!checkpoints.join(&cut).join("seed-0").exists());
}

/// Real data nobody here generated: the three recipes on the UCI handwritten digits
/// (scikit-learn's copy, 1,437 training and 360 test images), narrow and short. Every seed
/// finishes and learns far beyond chance, the data's fingerprint is the same on every host, and a
/// seed trained again in another sweep gives the same numbers bit for bit.
#[test]
fn every_recipe_learns_the_real_digits() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_digits(&data);
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    // Picard's schedule warms up over 4 epochs: a larger base rate lets 6 epochs learn.
    let sweep = |recipe: &str, seeds: &str, train: &str| {
        c.submit(
            dir.path(),
            &format!(
                "name = \"digits-{recipe}\"\ntask = \"resnet9\"\ndataset = \"digits\"\n\
                 recipe = \"{recipe}\"\nseeds = {seeds}\n[train]\nbatch_size = 100\n\
                 width = 0.125\n{train}\n"
            ),
        )
    };
    let page = sweep("dawnbench", "\"0..2\"", "epochs = 4");
    let picard_train = "epochs = 6\nlr = 0.4";
    let picard = sweep("paper-short", "\"0..2\"", picard_train);
    let again = sweep("paper-short", "[1]", picard_train);
    // airbench94's whitening bias trains for 3 epochs: 4 epochs see it frozen too.
    let jordan = sweep("airbench94", "\"0..2\"", "epochs = 4");
    let jordan_again = sweep("airbench94", "[1]", "epochs = 4");
    run_workers(&c, &data, 2, &[]);
    for id in [&page, &picard, &jordan] {
        let summary = sqlite_query(
            &db,
            &format!(
                "SELECT count(*), min(test_accuracy) > 0.5, count(DISTINCT data_fingerprint),
                        group_concat(test_accuracy) FROM results WHERE sweep_id = '{id}'"
            ),
        );
        assert!(
            summary.starts_with("2|1|1|"),
            "sweep {id}: {summary}\n{}",
            metrics(&db, id)
        );
    }
    let fingerprint = sqlite_query(&db, "SELECT DISTINCT data_fingerprint FROM results");
    assert_eq!(fingerprint.lines().count(), 1, "{fingerprint}");
    let seed_one = |id: &str| {
        metrics(&db, id)
            .lines()
            .filter(|l| l.starts_with("1|"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(seed_one(&picard), seed_one(&again));
    assert!(!seed_one(&again).is_empty());
    assert_eq!(seed_one(&jordan), seed_one(&jordan_again));
    assert!(!seed_one(&jordan_again).is_empty());
}
