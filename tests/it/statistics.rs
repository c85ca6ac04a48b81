//! `coordinator sweep stats`, `compare` and `watch` through a real coordinator, with results
//! delivered by a scripted worker (a test double speaking the worker's gRPC protocol) so that
//! the scores, and the black swan among them, are known in advance.

use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_client::CoordinatorClient;
use seedsweep_tests::{CoordinatorProcess, sqlite_query, stderr, stdout};
use std::io::BufRead;
use std::process::Stdio;

fn sweep(name: &str, seeds: &str) -> String {
    format!(
        "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"{seeds}\"\n[train]\nepochs = 2\n"
    )
}

/// Test double: leases seeds and reports two epochs and a result for each, with the final
/// test accuracy `score(seed)`, until there is no work.
async fn scripted_worker(url: &str, score: impl Fn(&str, i64) -> f64) {
    let mut c = CoordinatorClient::connect(url.to_string()).await.unwrap();
    loop {
        let reply = c
            .lease_seed(pb::LeaseSeedRequest {
                worker_id: "scripted".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let Some(pb::lease_seed_response::Outcome::Lease(l)) = reply.outcome else {
            return;
        };
        let lease = pb::LeaseRef {
            sweep_id: l.sweep_id.clone(),
            seed: l.seed,
            fence: l.fence,
            key: l.key.clone(),
        };
        let acc = score(&l.sweep_id, l.seed);
        let epochs: Vec<pb::EpochMetrics> = (1..=2)
            .map(|e| pb::EpochMetrics {
                lease: Some(lease.clone()),
                epoch: e,
                train_loss: Some(1.0 / e as f64),
                train_accuracy: Some(0.5),
                test_loss: Some(1.0 - acc),
                test_accuracy: Some(if e == 2 { acc } else { acc - 0.1 }),
                lr: Some(0.1),
                seconds: 1.0,
                ..Default::default()
            })
            .collect();
        c.stream_epoch_metrics(tokio_stream::iter(epochs))
            .await
            .unwrap();
        let done = c
            .complete_seed(pb::CompleteSeedRequest {
                lease: Some(lease),
                worker_id: "scripted".into(),
                test_accuracy: Some(acc),
                test_loss: Some(1.0 - acc),
                // The last epoch's, as a real worker reports them.
                train_loss: Some(0.5),
                train_accuracy: Some(0.5),
                epochs: 2,
                seconds: 1.0,
                device: "cpu".into(),
                data_fingerprint: "sha256:00".into(),
                precision: "fp32".into(),
                deterministic: true,
                test_examples: TEST_EXAMPLES,
                test_correct: bitmap(l.seed, (acc * TEST_EXAMPLES as f64).round() as u32),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(done.recorded);
    }
}

const TEST_EXAMPLES: u32 = 1000;

/// `right` of the test examples marked right, which ones depending on the seed.
fn bitmap(seed: i64, right: u32) -> Vec<u8> {
    let mut bits = vec![0u8; (TEST_EXAMPLES as usize).div_ceil(8)];
    for i in 0..TEST_EXAMPLES as i64 {
        // i -> (7919 i + 104729 seed) mod 1000 is a bijection: exactly `right` examples.
        if (i * 7919 + seed * 104_729).rem_euclid(TEST_EXAMPLES as i64) < right as i64 {
            bits[i as usize / 8] |= 1 << (i % 8);
        }
    }
    bits
}

/// Sweep A's scores: 0.92 +- a little, and seed 7 a black swan far below.
fn score_a(seed: i64) -> f64 {
    if seed == 7 {
        0.80
    } else {
        0.92 + 0.001 * ((seed * 37) % 11) as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_compare_and_watch_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let a = c.submit(dir.path(), &sweep("a", "0..12"));

    // `sweep watch` follows A from before its first result until it ends.
    let mut watch = std::process::Command::new(seedsweep_tests::bin("coordinator"))
        .args(["sweep", "--coordinator", &c.url, "watch", &a])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("0/12 done"), "{first}");

    let a_id = a.clone();
    scripted_worker(&c.url, move |s, seed| {
        assert_eq!(s, a_id);
        score_a(seed)
    })
    .await;
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(watch.wait().unwrap().success());
    let text = rest.join("\n").trim_end().to_string();
    assert!(
        text.contains("black swan: seed 7 low (unlucky) 0.8000"),
        "{text}"
    );
    assert!(text.ends_with("has no seed left to run"), "{text}");
    assert!(text.contains("12/12 done"), "{text}");

    // stats --json: the documented keys, and the numbers.
    let out = c.sweep(&["stats", &a, "--json", "--ci-width", "0.002"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let scores: Vec<f64> = (0..12).map(score_a).collect();
    let mean = scores.iter().sum::<f64>() / 12.0;
    assert_eq!(v["n"], 12);
    assert!((v["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    for key in [
        "std",
        "min",
        "max",
        "median",
        "best_seed",
        "worst_seed",
        "q1",
        "q3",
        "gap",
    ] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }
    assert_eq!(v["worst_seed"], 7);
    assert_eq!(v["black_swans"][0]["seed"], 7);
    assert_eq!(v["epochs"].as_array().unwrap().len(), 2);
    assert_eq!(v["best_of_k"].as_array().unwrap().last().unwrap()["k"], 12);
    assert!(
        v["seeds_for_ci_width"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["ci_width"] == 0.002)
    );
    // Test-set noise from the bitmaps the worker sent.
    assert_eq!(v["test_set"]["test_examples"], 1000);
    assert_eq!(v["test_set"]["runs"], 12);
    let binomial = (mean * (1.0 - mean) / 1000.0).sqrt();
    assert!((v["binomial_std"].as_f64().unwrap() - binomial).abs() < 1e-12);
    // One seed sets every factor here: one source carries all the variance.
    assert_eq!(
        v["variance_components"]["components"][0]["source"],
        "init+order+augment+split"
    );
    let table = c.sweep(&["stats", &a]);
    let table = stdout(&table);
    assert!(
        table.contains("black swans") && table.contains("best of k"),
        "{table}"
    );

    // report: every figure as SVG and PNG, the page and the Markdown table.
    let out_dir = dir.path().join("report");
    let out = c.sweep(&["report", &a, "--out", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for name in ["histogram", "curves", "best_of_k"] {
        let svg = std::fs::read_to_string(out_dir.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("test_accuracy"),
            "{name}"
        );
        let png = std::fs::read(out_dir.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("<h1>a</h1>") && html.matches("<svg").count() >= 3);
    let md = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(md.contains("| a | test_accuracy | 12 |"), "{md}");
    let not_a_folder = dir.path().join("s.db");
    let out = c.sweep(&["report", &a, "--out", not_a_folder.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("not a folder"));

    // export: the results and the epochs, as CSV and Parquet.
    let csv_path = dir.path().join("a.csv");
    let out = c.sweep(&[
        "export",
        &a,
        "--format",
        "csv",
        "--out",
        csv_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    assert!(csv.starts_with("sweep_id,seed,init_seed,"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 12);
    assert!(csv.contains(&format!("{a},7,7,7,7,7,0.8,")), "{csv}");
    let epochs_path = dir.path().join("a-epochs.parquet");
    let out = c.sweep(&[
        "export",
        &a,
        "--format",
        "parquet",
        "--table",
        "epochs",
        "--out",
        epochs_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("24 rows of epoch_metrics"),
        "{}",
        stdout(&out)
    );
    assert_eq!(&std::fs::read(&epochs_path).unwrap()[..4], b"PAR1");
    let out = c.sweep(&["export", &a, "--format", "xlsx", "--out", "x"]);
    assert!(!out.status.success());

    // compare: B is A shifted up by 0.01 without the black swan.
    let b = c.submit(dir.path(), &sweep("b", "0..10"));
    let b_id = b.clone();
    scripted_worker(&c.url, move |s, seed| {
        assert_eq!(s, b_id);
        0.93 + 0.001 * ((seed * 37) % 11) as f64
    })
    .await;
    let out = c.sweep(&["compare", &b, &a, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["difference"].as_f64().unwrap() > 0.0);
    assert!(v["prob_a_beats_b"].as_f64().unwrap() > 0.5);
    assert!(c.sweep(&["compare", &b, &a]).status.success());

    // Bad input: a clear message and a non-zero exit.
    let out = c.sweep(&["stats", &a, "--metric", "accuracy"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no metric `accuracy`: use one of test_accuracy"),
        "{}",
        stderr(&out)
    );
    let out = c.sweep(&["stats", &a, "--ci-width", "-1"]);
    assert!(!out.status.success());

    // A correctness bitmap that disagrees with the accuracy is refused, naming the field.
    let cs = c.submit(dir.path(), &sweep("c", "0..1"));
    let mut client = CoordinatorClient::connect(c.url.clone()).await.unwrap();
    let Some(pb::lease_seed_response::Outcome::Lease(l)) = client
        .lease_seed(pb::LeaseSeedRequest {
            worker_id: "bad".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
    else {
        panic!("no lease for sweep {cs}")
    };
    let refused = client
        .complete_seed(pb::CompleteSeedRequest {
            lease: Some(pb::LeaseRef {
                sweep_id: l.sweep_id,
                seed: l.seed,
                fence: l.fence,
                key: l.key,
            }),
            worker_id: "bad".into(),
            test_accuracy: Some(0.9),
            epochs: 2,
            device: "cpu".into(),
            data_fingerprint: "sha256:00".into(),
            precision: "fp32".into(),
            test_examples: TEST_EXAMPLES,
            test_correct: bitmap(0, 500),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("test_correct marks 500"),
        "{refused:?}"
    );

    // The views, through the sqlite3 shell.
    let row = sqlite_query(
        &db,
        &format!("SELECT n, done, best_seed, worst_seed FROM sweep_summary WHERE sweep_id = '{a}'"),
    );
    assert_eq!(row.trim(), format!("12|12|{}|7", best_seed_a()));
    let epochs = sqlite_query(
        &db,
        &format!("SELECT epoch, n FROM epoch_summary WHERE sweep_id = '{a}' ORDER BY epoch"),
    );
    assert_eq!(epochs, "1|12\n2|12\n");
}

/// The best seed of sweep A (the smallest seed with the highest score).
fn best_seed_a() -> i64 {
    let mut best = (0, f64::MIN);
    for s in 0..12 {
        if score_a(s) > best.1 {
            best = (s, score_a(s));
        }
    }
    best.0
}
