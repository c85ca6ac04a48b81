//! Task finetune-head end to end, on CPU: a tiny ImageFolder of generated PNG and JPEG files,
//! backbones in both formats (safetensors weights from `worker make-backbone`, a TorchScript
//! module from scripts/export_backbone.py), a coordinator and real workers.

use seedsweep_tests::{
    CoordinatorProcess, make_synthetic, repo_root, run, sqlite_query, stderr, stdout, torch_python,
    torchvision_python, worker,
};
use std::path::Path;
use std::process::Command;

/// Six classes of coloured, striped images; every third file a JPEG, one unreadable file.
fn image_folder(root: &Path) {
    for (split, n) in [("train", 4u32), ("val", 2)] {
        for c in 0..6u32 {
            let dir = root.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(24 + i, 20 + 2 * i, |x, y| {
                    let stripe = ((x + y * c) / (c + 2)) % 2 == 0;
                    let base = [(c * 40) as u8, (255 - c * 40) as u8, ((c * 97) % 255) as u8];
                    let v = |b: u8| if stripe { b } else { b / 3 + (i * 7) as u8 };
                    image::Rgb([v(base[0]), v(base[1]), v(base[2])])
                });
                let ext = if i % 3 == 2 { "jpg" } else { "png" };
                img.save(dir.join(format!("{i}.{ext}"))).unwrap();
            }
        }
    }
    std::fs::write(root.join("train/class0/broken.png"), b"not a png").unwrap();
}

fn sweep(name: &str, dataset: &str, seeds: &str, backbone: &str) -> String {
    format!(
        "name = \"{name}\"\ntask = \"finetune-head\"\ndataset = \"{dataset}\"\nseeds = {seeds}\n\
         {backbone}\n[finetune]\nlabel_smoothing = 0.1\neval_every_steps = 10\n\
         [finetune.head]\nsteps = 20\nbatch_size = 8\nlr = 0.05\n"
    )
}

/// Runs one worker to idle with the model and cache folders; returns its log.
fn run_worker(c: &CoordinatorProcess, data: &Path, models: &Path, cache: &Path) -> String {
    let out = run(worker(&c.url, data)
        .arg("--model-dir")
        .arg(models)
        .arg("--feature-cache")
        .arg(cache));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    stderr(&out)
}

fn metrics(db: &Path, sweep: &str) -> Vec<String> {
    sqlite_query(
        db,
        &format!(
            "SELECT seed, epoch, train_loss, test_loss, test_accuracy, test_top5 FROM epoch_metrics
             WHERE sweep_id = '{sweep}' ORDER BY seed, epoch"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

#[test]
fn finetune_head_end_to_end() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    let cache = dir.path().join("cache");
    image_folder(&data.join("folder"));
    make_synthetic(&data, 120, 60);
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();

    // Safetensors: a random ResNet-18 with torchvision's names; the command prints the table.
    let made = run(Command::new(seedsweep_tests::bin("worker"))
        .args(["make-backbone", "resnet18", "--input-size", "32", "--out"])
        .arg(models.join("r18.safetensors")));
    assert!(made.status.success(), "{}", stderr(&made));
    let r18 = stdout(&made);
    assert!(
        r18.contains("arch = \"resnet18\"") && r18.contains("features = 512"),
        "{r18}"
    );

    // Three seeds: the backbone runs once, every later seed trains on cached features.
    let a = c.submit(dir.path(), &sweep("a", "folder", "[0, 1, 2]", &r18));
    let log = run_worker(&c, &data, &models, &cache);
    assert_eq!(
        log.matches("computing backbone features").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("skipping an unreadable image") && log.contains("broken.png"),
        "{log}"
    );
    assert_eq!(
        sqlite_query(
            &db,
            &format!(
                "SELECT count(*), count(test_top5), min(test_top5 >= test_accuracy) FROM results WHERE sweep_id = '{a}'"
            )
        ),
        "3|3|1\n"
    );
    let first = metrics(&db, &a);
    assert_eq!(first.len(), 3 * 2, "an evaluation every 10 of 20 steps");

    // Another process: features from the disk cache, and seed 1 again gives the same numbers.
    let b = c.submit(dir.path(), &sweep("b", "folder", "[1]", &r18));
    let log = run_worker(&c, &data, &models, &cache);
    assert!(!log.contains("computing backbone features"), "{log}");
    assert!(log.contains("backbone features from the cache"), "{log}");
    let seed1: Vec<&String> = first.iter().filter(|l| l.starts_with("1|")).collect();
    assert_eq!(metrics(&db, &b).iter().collect::<Vec<_>>(), seed1);
    // Different seeds differ.
    assert_ne!(
        first[1].split_once('|').unwrap().1,
        first[3].split_once('|').unwrap().1
    );

    // A corrupt cache is noticed and rebuilt, with the same numbers.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut bytes = std::fs::read(&path).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let d = c.submit(dir.path(), &sweep("d", "folder", "[1]", &r18));
    let log = run_worker(&c, &data, &models, &cache);
    assert!(log.contains("feature cache unusable"), "{log}");
    assert_eq!(
        log.matches("computing backbone features").count(),
        1,
        "{log}"
    );
    assert_eq!(metrics(&db, &d).iter().collect::<Vec<_>>(), seed1);

    // TorchScript: a small network exported by the script, on the CIFAR-layout set, upscaled.
    let exported = run(torch_python()
        .arg(repo_root().join("scripts/export_backbone.py"))
        .args(["tiny-cnn", "--input-size", "40", "--out"])
        .arg(models.join("tiny.pt")));
    assert!(exported.status.success(), "{}", stderr(&exported));
    let tiny = stdout(&exported);
    assert!(tiny.contains("format = \"torchscript\""), "{tiny}");
    let e = c.submit(dir.path(), &sweep("e", "synthetic", "[0, 1]", &tiny));
    run_worker(&c, &data, &models, &cache);
    assert_eq!(
        sqlite_query(
            &db,
            &format!("SELECT count(*), count(test_top5) FROM results WHERE sweep_id = '{e}'")
        ),
        "2|2\n"
    );

    // Augmented images through the frozen backbone (phase 1), then the whole network (phase 2):
    // no feature cache, the same numbers for the same seed, a metrics row per evaluation.
    let two_phase = format!(
        "{}[finetune.full]\nsteps = 10\nbatch_size = 8\nlr = 0.01\n",
        sweep("g", "synthetic", "[3, 4]", &tiny)
            .replace("[finetune]", "[finetune]\naugment = true")
    );
    let g = c.submit(dir.path(), &two_phase);
    let log = run_worker(&c, &data, &models, &cache);
    assert!(!log.contains("backbone features"), "{log}");
    let g_metrics = metrics(&db, &g);
    assert_eq!(g_metrics.len(), 2 * (2 + 1), "{g_metrics:?}");
    let h = c.submit(
        dir.path(),
        &two_phase
            .replace("name = \"g\"", "name = \"h\"")
            .replace("[3, 4]", "[3]"),
    );
    run_worker(&c, &data, &models, &cache);
    let seed3: Vec<&String> = g_metrics.iter().filter(|l| l.starts_with("3|")).collect();
    assert_eq!(metrics(&db, &h).iter().collect::<Vec<_>>(), seed3);

    // A backbone that does not match its checksum: the seed goes back unused, the worker stops.
    std::fs::write(models.join("tiny.pt"), b"something else").unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
    let f = c.submit(dir.path(), &sweep("f", "synthetic", "[5]", &tiny));
    let out = run(worker(&c.url, &data)
        .arg("--model-dir")
        .arg(&models)
        .arg("--feature-cache")
        .arg(&cache));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("SHA-256"), "{}", stderr(&out));
    assert_eq!(
        sqlite_query(
            &db,
            &format!("SELECT state, failures FROM seeds WHERE sweep_id = '{f}'")
        ),
        "pending|0\n"
    );
}

/// scripts/export_backbone.py on a real torchvision network (random weights: no download): its
/// safetensors weights load into the worker's own ResNet-18 and give the same numbers as the
/// TorchScript export of the same network.
#[test]
fn torchvision_exports_agree_across_formats() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    image_folder(&data.join("folder"));
    let export = |out: &str| {
        let done = run(torchvision_python()
            .arg(repo_root().join("scripts/export_backbone.py"))
            .args([
                "torchvision:resnet18",
                "--input-size",
                "32",
                "--seed",
                "5",
                "--out",
            ])
            .arg(models.join(out)));
        assert!(done.status.success(), "{}", stderr(&done));
        stdout(&done)
    };
    let weights = export("r18.safetensors");
    let script = export("r18.pt");
    assert!(weights.contains("arch = \"resnet18\"") && weights.contains("features = 512"));
    assert!(script.contains("format = \"torchscript\""), "{script}");
    let db = dir.path().join("s.db");
    let c = CoordinatorProcess::start(&format!("sqlite://{}", db.display()), &[]).unwrap();
    let a = c.submit(dir.path(), &sweep("w", "folder", "[2]", &weights));
    let b = c.submit(dir.path(), &sweep("s", "folder", "[2]", &script));
    run_worker(&c, &data, &models, &dir.path().join("cache"));
    let numbers = |sweep: &str| -> Vec<Vec<f64>> {
        metrics(&db, sweep)
            .iter()
            .map(|l| l.split('|').map(|v| v.parse().unwrap()).collect())
            .collect()
    };
    let (wa, sb) = (numbers(&a), numbers(&b));
    assert_eq!(wa.len(), 2);
    assert_eq!(wa.len(), sb.len());
    for (x, y) in wa.iter().zip(&sb) {
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() <= 1e-4 * (1.0 + u.abs()), "{wa:?} vs {sb:?}");
        }
    }
}
