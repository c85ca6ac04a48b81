//! Whole sweeps through the real binaries: a coordinator, two CPU workers, a narrow ResNet-9 on a
//! small generated dataset; once on SQLite and once on PostgreSQL.

use seedsweep_tests::{
    CoordinatorProcess, PgServer, make_synthetic, sqlite_query, stderr, stdout, worker,
};
use std::path::Path;

const EPOCHS: i64 = 2;

fn sweep_file(dir: &Path, name: &str, seeds: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = {seeds}\n\
             [train]\nepochs = {EPOCHS}\nbatch_size = 50\nwidth = 0.125\nlr = 0.2\nlr_peak_epoch = 0.5\n"
        ),
    )
    .unwrap();
    path
}

/// Submits, runs two workers to completion, and checks what the admin commands say.
fn run_sweep(coordinator: &CoordinatorProcess, data: &Path, file: &Path, seeds: usize) -> String {
    let submitted = coordinator.sweep(&["submit", file.to_str().unwrap()]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let id = stdout(&submitted).trim().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "submit printed `{id}`, not a UUID alone"
    );

    coordinator.run_to_end((0..2).map(|_| worker(&coordinator.url, data)));

    let status = coordinator.sweep(&["status", &id, "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let s: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(s["done"], seeds);
    assert_eq!(s["counts"]["done"], seeds);
    assert_eq!(s["counts"]["failed"], 0);
    assert_eq!(s["test_accuracy"]["n"], seeds);
    let human = stdout(&coordinator.sweep(&["status", &id]));
    assert!(
        human.contains(&format!("{seeds}/{seeds} done")) && human.contains("mean"),
        "{human}"
    );
    let results = coordinator.sweep(&["results", &id, "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&results)).unwrap();
    assert_eq!(rows.len(), seeds);
    let listed = stdout(&coordinator.sweep(&["list"]));
    assert!(listed.contains(&id), "{listed}");
    id
}

/// Every seed has exactly one results row and EPOCHS epoch_metrics rows, and the README's queries
/// work, all through the database's own command-line client (`sql` runs one query, returns rows).
fn check_tables(sql: &dyn Fn(&str) -> String, id: &str, seeds: usize) {
    let rows = sql(&format!(
        "SELECT r.seed, (SELECT count(*) FROM results x WHERE x.sweep_id = r.sweep_id AND x.seed = r.seed),
                (SELECT count(*) FROM epoch_metrics e WHERE e.sweep_id = r.sweep_id AND e.seed = r.seed),
                r.test_accuracy >= 0 AND r.test_accuracy <= 1
         FROM results r WHERE r.sweep_id = '{id}' ORDER BY r.seed"
    ));
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), seeds, "{rows:?}");
    for row in &rows {
        let f: Vec<&str> = row.split('|').collect();
        assert_eq!(f[1], "1", "seed {} has {} results rows", f[0], f[1]);
        assert_eq!(
            f[2],
            EPOCHS.to_string(),
            "seed {} has {} epoch rows",
            f[0],
            f[2]
        );
        assert!(
            f[3] == "1" || f[3] == "t",
            "seed {}: accuracy out of [0, 1]",
            f[0]
        );
    }
    // Every result carries its per-example correctness, consistent with its accuracy.
    let bitmaps = sql(&format!(
        "SELECT count(*) FROM result_bitmaps WHERE sweep_id = '{id}' AND test_examples = 200
           AND length(test_correct) = 25"
    ));
    assert_eq!(bitmaps.trim(), seeds.to_string());
    // The results vary with the seed.
    let distinct = sql(&format!(
        "SELECT count(DISTINCT train_loss) FROM results WHERE sweep_id = '{id}'"
    ));
    assert_eq!(distinct.trim(), seeds.to_string());

    let queries = readme_queries();
    assert_eq!(queries.len(), 6, "the README shows six queries");
    let expected_rows = [
        1,
        EPOCHS as usize,
        1,
        EPOCHS as usize,
        EPOCHS as usize,
        seeds.min(10),
    ];
    for (q, n) in queries.iter().zip(expected_rows) {
        let out = sql(&q.replace("SWEEP_ID", id));
        assert_eq!(
            out.lines().count(),
            n,
            "README query\n{q}\nreturned:\n{out}"
        );
    }
}

/// The SQL blocks of the README's "Querying results with SQL" section.
fn readme_queries() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("## Querying results with SQL")
        .nth(1)
        .expect("README has the SQL section");
    let section = section.split("\n## ").next().unwrap();
    section
        .split("```sql")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().trim().to_string())
        .collect()
}

fn sqlite_cli(db: &Path) -> impl Fn(&str) -> String + '_ {
    move |q| sqlite_query(db, q)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_end_to_end_on_sqlite() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let db = format!("sqlite://{}", dir.path().join("seedsweep.db").display());
    let coordinator = CoordinatorProcess::start(&db, &[]).unwrap();
    let id = run_sweep(
        &coordinator,
        &data,
        &sweep_file(dir.path(), "e2e", "\"0..6\""),
        6,
    );
    let db_path = dir.path().join("seedsweep.db");
    check_tables(&sqlite_cli(&db_path), &id, 6);

    // The same seeds trained again in another sweep give bitwise-identical metrics.
    let again = run_sweep(
        &coordinator,
        &data,
        &sweep_file(dir.path(), "again", "[4, 1]"),
        2,
    );
    drop(coordinator);
    let q = "SELECT sweep_id, seed, epoch, train_loss, test_loss, test_accuracy FROM epoch_metrics
             WHERE seed IN (1, 4) ORDER BY seed, epoch, sweep_id = ?1";
    let text = sqlite_cli(&db_path)(&q.replace("?1", &format!("'{again}'")));
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 2 * 2 * EPOCHS as usize, "{text}");
    for pair in rows.chunks(2) {
        assert_eq!(pair[0][0], id);
        assert_eq!(pair[1][0], again);
        assert_eq!(
            pair[0][1..],
            pair[1][1..],
            "seed {} differs between sweeps",
            pair[0][1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_end_to_end_on_postgres() {
    let _heavy = crate::heavy();
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let coordinator = CoordinatorProcess::start(&url, &[]).unwrap();
    let id = run_sweep(
        &coordinator,
        &data,
        &sweep_file(dir.path(), "e2e-pg", "\"10..16\""),
        6,
    );
    check_tables(&|q: &str| pg.psql(&url, q), &id, 6);
}

/// A recipe whose learning rate blows training up: every seed diverges, and every one is a
/// finished seed recorded as diverged (the epoch it happened in, its finite epochs kept), not
/// a failure, never retried, and counted by `sweep stats` though no statistic of the score
/// exists. On PostgreSQL, the store whose completion path differs most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_that_blows_up_is_counted_diverged_not_retried() {
    let _heavy = crate::heavy();
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 300, 100);
    let coordinator = CoordinatorProcess::start(&url, &[]).unwrap();
    let file = dir.path().join("blowup.toml");
    std::fs::write(
        &file,
        "name = \"blowup\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = [0, 1, 2]\n\
         max_attempts = 3\n[train]\nepochs = 3\nbatch_size = 50\nwidth = 0.125\nlr = 1e12\n\
         lr_peak_epoch = 0.5\n",
    )
    .unwrap();
    let submitted = coordinator.sweep(&["submit", file.to_str().unwrap()]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let id = stdout(&submitted).trim().to_string();
    coordinator.run_to_end([worker(&coordinator.url, &data)]);

    let sql = |q: &str| pg.psql(&url, q).trim().to_string();
    assert_eq!(
        sql(&format!(
            "SELECT string_agg(state, ',' ORDER BY seed) FROM seeds WHERE sweep_id = '{id}'"
        )),
        "done,done,done"
    );
    // One attempt each, succeeded: a divergence is what the seed does, not a failure to retry.
    assert_eq!(
        sql(&format!(
            "SELECT count(*), count(*) FILTER (WHERE outcome = 'succeeded') FROM attempts WHERE sweep_id = '{id}'"
        )),
        "3|3"
    );
    assert_eq!(
        sql(&format!(
            "SELECT count(*) FROM results WHERE sweep_id = '{id}'"
        )),
        "0"
    );
    // Each diverged in an epoch after the finite ones it kept, every one of those recorded.
    let rows = sql(&format!(
        "SELECT d.seed, d.epoch, d.epochs, (SELECT count(*) FROM epoch_metrics e
           WHERE e.sweep_id = d.sweep_id AND e.seed = d.seed AND e.fence = d.fence)
         FROM divergences d WHERE d.sweep_id = '{id}' ORDER BY d.seed"
    ));
    let rows: Vec<Vec<i64>> = rows
        .lines()
        .map(|l| l.split('|').map(|c| c.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert!(
            (1..=3).contains(&r[1]) && r[2] == r[1] - 1 && r[3] == r[2],
            "{rows:?}"
        );
    }

    let stats = coordinator.sweep(&["stats", &id, "--json"]);
    assert!(stats.status.success(), "{}", stderr(&stats));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&stats)).unwrap();
    let o = &doc["outcomes"];
    assert_eq!(
        (
            &o["finished"],
            &o["converged"],
            &o["diverged"],
            &o["failed"]
        ),
        (&3.into(), &0.into(), &3.into(), &0.into()),
        "{doc}"
    );
    assert_eq!(o["divergence_rate"]["estimate"], 1.0);
    assert_eq!(o["divergence_rate"]["method"], "clopper-pearson");
    assert_eq!(doc["n"], 0, "no statistic of the score: {doc}");
    let text = stdout(&coordinator.sweep(&["stats", &id]));
    assert!(
        text.contains("3 finished: 0 converged, 3 diverged (100.0%"),
        "{text}"
    );
}
