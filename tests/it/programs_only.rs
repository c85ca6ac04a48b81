//! The worker built without libtorch (cargo feature `torch` off), as a CPU host of a mixed fleet
//! runs it: `scripts/test-programs-only.sh` builds it and runs this (and the command and hostile
//! tests) with it, through `SEEDSWEEP_TEST_WORKER`.

use seedsweep_tests::{CoordinatorProcess, sqlite_query, stderr, worker};
use std::process::Command;

/// It runs a program's seeds and never takes a recipe's, though the recipe's sweep comes first;
/// it says what it is when started without a program to run.
#[test]
#[ignore = "needs the worker built without libtorch: scripts/test-programs-only.sh runs it"]
fn a_program_only_worker_runs_programs_and_leaves_recipes_alone() {
    assert!(
        std::env::var_os("SEEDSWEEP_TEST_WORKER").is_some(),
        "set SEEDSWEEP_TEST_WORKER to the worker built with --no-default-features"
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let data = dir.path().join("data");
    let coordinator =
        CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let recipe = coordinator.submit(
        dir.path(),
        "name = \"recipe\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"0..2\"\npriority = 5\n[train]\nepochs = 1\n",
    );
    let program = dir.path().join("train.sh");
    std::fs::write(
        &program,
        "#!/bin/bash\nprintf '{\"epoch\": 1, \"test_accuracy\": 0.5}\\n' >> \"$SEEDSWEEP_METRICS_FILE\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let own = coordinator.submit(
        dir.path(),
        &format!(
            "name = \"own\"\ntask = \"command\"\nseeds = \"0..3\"\n[command]\nargv = [{:?}]\n",
            program.to_str().unwrap()
        ),
    );

    let without = worker(&coordinator.url, &data).output().unwrap();
    assert!(!without.status.success());
    assert!(
        stderr(&without).contains("built without the built-in training tasks")
            && stderr(&without).contains("--allow-command"),
        "{}",
        stderr(&without)
    );

    let out = worker(&coordinator.url, &data)
        .arg("--allow-command")
        .arg(&program)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let count = |id: &str, q: &str| {
        sqlite_query(
            &db,
            &format!("SELECT count(*) FROM {q} WHERE sweep_id = '{id}'"),
        )
        .trim()
        .to_string()
    };
    assert_eq!(count(&own, "results"), "3");
    assert_eq!(
        count(&recipe, "attempts"),
        "0",
        "a recipe's seed was leased"
    );

    let help = Command::new(seedsweep_tests::bin("worker"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    assert!(
        !help.contains("make-dataset") && !help.contains("--data-dir"),
        "{help}"
    );
}
