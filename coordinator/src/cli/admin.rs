//! The admin commands: gRPC clients of a running coordinator that print for people (or `--json`).

use super::render;
use anyhow::{Context, bail};
use seedsweep_coordinator::export::{EPOCH_PAGES, PAGE, for_each_page};
use seedsweep_core::metric::Direction;
use seedsweep_core::spec::SweepSpec;
use seedsweep_core::stats::document::{ComparisonDocument, StatsDocument};
use seedsweep_proto::client::{Client, Connection};
use seedsweep_proto::v1 as pb;
use std::path::Path;
use std::time::Duration;

/// A gRPC error as a one-line message for people.
pub(crate) fn rpc(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

pub async fn submit(coordinator: &Connection, file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read sweep file {}", file.display()))?;
    // Validate before contacting anyone, so a typo is reported even with no coordinator running.
    SweepSpec::parse(&text).with_context(|| format!("{} was not submitted", file.display()))?;
    let mut client = coordinator.connect().await?;
    let reply = client
        .submit_sweep(pb::SubmitSweepRequest { sweep_toml: text })
        .await
        .map_err(rpc)
        .with_context(|| format!("the coordinator refused {}", file.display()))?
        .into_inner();
    for warning in &reply.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(reply.sweep_id)
}

pub async fn status(coordinator: &Connection, id: &str, json: bool) -> anyhow::Result<String> {
    let mut client = coordinator.connect().await?;
    let s = client
        .get_sweep_status(pb::GetSweepStatusRequest {
            sweep_id: id.to_string(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let (Some(sweep), Some(c)) = (s.sweep, s.counts) else {
        bail!("the coordinator sent an incomplete status")
    };
    if json {
        let stats = |a: pb::AccuracyStats| {
            serde_json::json!({"n": a.n, "mean": a.mean, "std": a.std, "min": a.min, "max": a.max,
                                "worst_seed": a.worst_seed, "best_seed": a.best_seed})
        };
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "sweep_id": sweep.sweep_id, "name": sweep.name, "task": sweep.task, "dataset": sweep.dataset,
            "created_at": sweep.created_at, "total": sweep.total, "done": sweep.done,
            "state": sweep.state, "priority": sweep.priority,
            "counts": {"pending": c.pending, "leased": c.leased, "done": c.done,
                       "diverged": c.diverged, "failed": c.failed, "cancelled": c.cancelled},
            "test_accuracy": s.test_accuracy.map(stats),
            "score": s.score, "score_direction": s.score_direction,
            "score_stats": s.score_stats.map(stats),
        }))?);
    }
    let mut out = format!(
        "sweep    {}  {}  ({} on {}, created {}, {}, priority {})\nseeds    {}/{} done ({} diverged)  pending {}  leased {}  failed {}  cancelled {}\n",
        sweep.sweep_id,
        sweep.name,
        sweep.task,
        sweep.dataset,
        sweep.created_at,
        sweep.state,
        sweep.priority,
        sweep.done,
        sweep.total,
        c.diverged,
        c.pending,
        c.leased,
        c.failed,
        c.cancelled
    );
    let direction = Direction::parse(&s.score_direction).unwrap_or_default();
    let lower = if direction == Direction::Min {
        ", lower is better"
    } else {
        ""
    };
    match s.score_stats {
        Some(a) => {
            let (best, worst) = direction.best_worst(a.min, a.max);
            out += &format!(
                "score {} ({} seeds{lower}): mean {:.4}  std {:.4}  best {:.4} (seed {})  worst {:.4} (seed {})\n",
                s.score, a.n, a.mean, a.std, best, a.best_seed, worst, a.worst_seed
            )
        }
        None => out += &format!("score {}{lower}: no seed finished yet\n", s.score),
    }
    Ok(out)
}

/// Pauses, resumes or cancels a sweep.
pub async fn set_state(coordinator: &Connection, id: &str, state: &str) -> anyhow::Result<String> {
    let mut client = coordinator.connect().await?;
    client
        .set_sweep_state(pb::SetSweepStateRequest {
            sweep_id: id.to_string(),
            state: state.to_string(),
        })
        .await
        .map_err(rpc)?;
    Ok(format!("sweep {id} is now {state}\n"))
}

/// Adds seeds, written "START..END" (end exclusive) or "1,2,3", to a sweep.
pub async fn extend(coordinator: &Connection, id: &str, seeds: &str) -> anyhow::Result<String> {
    let mut req = pb::ExtendSweepRequest {
        sweep_id: id.to_string(),
        ..Default::default()
    };
    if seeds.contains("..") {
        // Validate before contacting anyone, as `submit` does.
        seedsweep_core::spec::SeedSet::parse_range(seeds).map_err(|e| {
            let why = e.to_string();
            anyhow::anyhow!(
                "--seeds: {}",
                why.trim_start_matches("invalid sweep file: ")
            )
        })?;
        req.range = seeds.to_string();
    } else {
        req.list = seeds
            .split(',')
            .map(|s| {
                s.trim().parse::<i64>().with_context(|| {
                    format!("--seeds `{seeds}`: write START..END (end exclusive) or a comma-separated list of integers")
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    let mut client = coordinator.connect().await?;
    let added = client
        .extend_sweep(req)
        .await
        .map_err(rpc)?
        .into_inner()
        .added;
    Ok(format!("added {added} seeds to sweep {id}\n"))
}

pub async fn list(coordinator: &Connection, json: bool) -> anyhow::Result<String> {
    let mut client = coordinator.connect().await?;
    let sweeps = client
        .list_sweeps(pb::ListSweepsRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .sweeps;
    if json {
        let v: Vec<_> = sweeps
            .iter()
            .map(|s| {
                serde_json::json!({"sweep_id": s.sweep_id, "name": s.name, "task": s.task,
                "dataset": s.dataset, "created_at": s.created_at, "total": s.total, "done": s.done,
                "state": s.state, "priority": s.priority})
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    let mut out = format!(
        "{:<36}  {:<24}  {:<8}  {:<12}  {:>15}  {}\n",
        "SWEEP", "NAME", "TASK", "DATASET", "DONE", "CREATED"
    );
    for s in sweeps {
        out += &format!(
            "{:<36}  {:<24}  {:<8}  {:<12}  {:>15}  {}\n",
            s.sweep_id,
            s.name,
            s.task,
            s.dataset,
            format!("{}/{}", s.done, s.total),
            s.created_at
        );
    }
    Ok(out)
}

/// The largest listing page a client accepts: a page of 50,000 epoch rows is about 5 MB, past
/// gRPC's default 4 MiB.
const PAGE_BYTES: usize = 64 << 20;

/// Every result of sweep `id`, in seed order, a page at a time.
pub(crate) async fn result_pages(
    client: &Client,
    id: &str,
    mut each: impl FnMut(Vec<pb::SeedResult>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let fetch = |after_seed| {
        let mut client = client.clone().max_decoding_message_size(PAGE_BYTES);
        let sweep_id = id.to_string();
        async move {
            let req = pb::ListResultsRequest {
                sweep_id,
                page_size: PAGE,
                after_seed,
            };
            let page = client.list_results(req).await.map_err(rpc)?.into_inner();
            Ok((page.results, page.next_after_seed))
        }
    };
    for_each_page(fetch, |rows| std::future::ready(each(rows))).await
}

/// Every epoch row of sweep `id`, by seed and epoch, a page at a time.
async fn epoch_pages(
    client: &Client,
    id: &str,
    mut each: impl FnMut(Vec<pb::EpochRow>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let fetch = |after| {
        let mut client = client.clone().max_decoding_message_size(PAGE_BYTES);
        let sweep_id = id.to_string();
        async move {
            let req = pb::ListEpochMetricsRequest {
                sweep_id,
                page_size: PAGE * EPOCH_PAGES,
                after,
            };
            let page = client
                .list_epoch_metrics(req)
                .await
                .map_err(rpc)?
                .into_inner();
            Ok((page.rows, page.next_after))
        }
    };
    for_each_page(fetch, |rows| std::future::ready(each(rows))).await
}

/// Prints a sweep's results to stdout a page at a time (a table, or a JSON array of objects).
pub async fn results(coordinator: &Connection, id: &str, json: bool) -> anyhow::Result<String> {
    use std::io::Write;
    let client = coordinator.connect().await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    if json {
        out.write_all(b"[")?;
    } else {
        out.write_all(result_line(None).as_bytes())?;
    }
    result_pages(&client, id, |rows| {
        for r in &rows {
            if json {
                let sep = if first { "\n  " } else { ",\n  " };
                write!(out, "{sep}{}", result_json(r))?;
            } else {
                out.write_all(result_line(Some(r)).as_bytes())?;
            }
            first = false;
        }
        Ok(())
    })
    .await?;
    if json {
        out.write_all(if first { b"]\n" } else { b"\n]\n" })?;
    }
    out.flush()?;
    Ok(String::new())
}

fn result_json(r: &pb::SeedResult) -> serde_json::Value {
    serde_json::json!({"seed": r.seed, "test_accuracy": r.test_accuracy, "test_loss": r.test_loss,
        "train_loss": r.train_loss, "train_accuracy": r.train_accuracy, "epochs": r.epochs,
        "seconds": r.seconds, "worker_id": r.worker_id, "device": r.device,
        "data_fingerprint": r.data_fingerprint, "finished_at": r.finished_at,
        "precision": r.precision, "deterministic": r.deterministic,
        "init_seed": r.factors.map(|f| f.init), "order_seed": r.factors.map(|f| f.order),
        "augment_seed": r.factors.map(|f| f.augment), "split_seed": r.factors.map(|f| f.split),
        "test_top5": r.test_top5, "val_loss": r.val_loss, "val_accuracy": r.val_accuracy,
        "custom": r.custom})
}

/// One line of the results table: its header for None.
fn result_line(r: Option<&pb::SeedResult>) -> String {
    let Some(r) = r else {
        return format!(
            "{:>8}  {:>9}  {:>9}  {:>10}  {:>6}  {:>8}  {:>20}  {}\n",
            "SEED",
            "TEST_ACC",
            "TEST_LOSS",
            "TRAIN_LOSS",
            "EPOCHS",
            "SECONDS",
            "INIT/ORDER/AUGMENT",
            "WORKER"
        );
    };
    let factors = r
        .factors
        .map(|f| format!("{}/{}/{}", f.init, f.order, f.augment))
        .unwrap_or_default();
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    format!(
        "{:>8}  {:>9}  {:>9}  {:>10}  {:>6}  {:>8.1}  {:>20}  {}\n",
        r.seed,
        cell(r.test_accuracy),
        cell(r.test_loss),
        cell(r.train_loss),
        r.epochs,
        r.seconds,
        factors,
        r.worker_id
    )
}

/// Statistics of a sweep's metric, as a table or as the JSON document.
pub async fn stats(
    coordinator: &Connection,
    id: &str,
    metric: &str,
    ci_width: Option<f64>,
    test_examples: Option<u64>,
    json: bool,
) -> anyhow::Result<String> {
    let client = coordinator.connect().await?;
    let req = pb::GetSweepStatsRequest {
        sweep_id: id.to_string(),
        metric: metric.to_string(),
        ci_width: ci_width.unwrap_or(0.0),
        test_examples: test_examples.unwrap_or(0),
    };
    let doc = stats_document(&client, req).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&doc)? + "\n");
    }
    Ok(render::stats_table(&doc))
}

/// The statistics document `GetSweepStats` sends, parsed.
pub(crate) async fn stats_document(
    client: &Client,
    req: pb::GetSweepStatsRequest,
) -> anyhow::Result<StatsDocument> {
    let doc = client.clone().get_sweep_stats(req).await.map_err(rpc)?;
    serde_json::from_str(&doc.into_inner().json)
        .context("the coordinator sent statistics that do not parse")
}

/// Two sweeps against each other.
pub async fn compare(
    coordinator: &Connection,
    a: &str,
    b: &str,
    metric: &str,
    json: bool,
) -> anyhow::Result<String> {
    let client = coordinator.connect().await?;
    let doc = comparison_document(&client, a, b, metric).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&doc)? + "\n");
    }
    Ok(render::comparison(&doc))
}

/// The comparison document `CompareSweeps` sends, parsed.
pub(crate) async fn comparison_document(
    client: &Client,
    a: &str,
    b: &str,
    metric: &str,
) -> anyhow::Result<ComparisonDocument> {
    let req = pb::CompareSweepsRequest {
        sweep_a: a.to_string(),
        sweep_b: b.to_string(),
        metric: metric.to_string(),
    };
    let doc = client.clone().compare_sweeps(req).await.map_err(rpc)?;
    serde_json::from_str(&doc.into_inner().json)
        .context("the coordinator sent a comparison that does not parse")
}

/// Follows a sweep until it ends: a live view at a terminal, one line per update otherwise.
pub async fn watch(coordinator: &Connection, id: &str, metric: &str) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let mut client = coordinator.connect().await?;
    let mut updates = client
        .watch_sweep(pb::WatchSweepRequest {
            sweep_id: id.to_string(),
            metric: metric.to_string(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let terminal = std::io::stdout().is_terminal();
    let started = std::time::Instant::now();
    let mut first_done = None;
    let mut swans: Vec<pb::BlackSwan> = Vec::new();
    let mut stdout = std::io::stdout();
    while let Some(u) = updates.message().await.map_err(rpc)? {
        let (Some(sweep), Some(c)) = (&u.sweep, &u.counts) else {
            bail!("the coordinator sent an incomplete update")
        };
        let done = c.done + c.failed + c.cancelled;
        let total = sweep.total.max(1);
        let base = *first_done.get_or_insert(done);
        let elapsed = started.elapsed().as_secs_f64();
        let rate = (done - base) as f64 / elapsed.max(1e-9) * 3600.0;
        let eta = if rate > 0.0 && done < total {
            let secs = (total - done) as f64 / rate * 3600.0;
            humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
        } else {
            "-".into()
        };
        let summary = u.summary.as_ref().map_or("no result yet".to_string(), |a| {
            let direction = Direction::parse(&u.direction).unwrap_or_default();
            let (best, worst) = direction.best_worst(a.min, a.max);
            format!(
                "n {}  mean {:.4}  std {:.4}  median {:.4}  best {:.4} (seed {})  worst {:.4} (seed {})",
                a.n, a.mean, a.std, u.median, best, a.best_seed, worst, a.worst_seed
            )
        });
        let swan_text = |b: &pb::BlackSwan| {
            format!(
                "seed {} {} ({}) {:.4} (z {:.2}{})",
                b.seed,
                b.side,
                if b.lucky { "lucky" } else { "unlucky" },
                b.score,
                b.z,
                b.robust_z
                    .map_or(String::new(), |r| format!(", robust z {r:.2}"))
            )
        };
        if terminal {
            swans.extend(u.new_black_swans.iter().cloned());
            let width = 40usize;
            let filled = (done as usize * width / total as usize).min(width);
            let mut screen = format!(
                "\x1b[2J\x1b[H{} ({})  {}  {}\n[{}{}] {}/{}  {:.0} seeds/h  ETA {}\npending {}  leased {}  diverged {}  failed {}  cancelled {}\n{} over the converged seeds: {}\n",
                sweep.name,
                sweep.sweep_id,
                sweep.state,
                u.metric,
                "#".repeat(filled),
                "-".repeat(width - filled),
                done,
                total,
                rate,
                eta,
                c.pending,
                c.leased,
                c.diverged,
                c.failed,
                c.cancelled,
                u.metric,
                summary
            );
            screen += "newest black swans:\n";
            if swans.is_empty() {
                screen += "  none\n";
            }
            for b in swans.iter().rev().take(8) {
                screen += &format!("  {}\n", swan_text(b));
            }
            write!(stdout, "{screen}")?;
        } else {
            writeln!(
                stdout,
                "{done}/{total} done ({:.0} seeds/h, ETA {eta})  pending {} leased {} diverged {} failed {}  {} over the converged seeds: {summary}",
                rate, c.pending, c.leased, c.diverged, c.failed, u.metric
            )?;
            for b in &u.new_black_swans {
                writeln!(stdout, "black swan: {}", swan_text(b))?;
            }
        }
        stdout.flush()?;
        if u.finished {
            writeln!(stdout, "sweep {} has no seed left to run", sweep.sweep_id)?;
            return Ok(());
        }
    }
    bail!("the coordinator ended the watch before the sweep ended")
}

/// Writes a sweep's report (figures as SVG and PNG, report.html, summary.md) into `out`,
/// creating it; each file goes to a temporary name first, so none is left half-written.
pub async fn report(
    coordinator: &Connection,
    id: &str,
    metric: &str,
    out: &Path,
) -> anyhow::Result<String> {
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    let mut client = coordinator
        .connect()
        .await?
        .max_decoding_message_size(1 << 30);
    let files = client
        .get_sweep_report(pb::GetSweepReportRequest {
            sweep_id: id.to_string(),
            metric: metric.to_string(),
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .files;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = Vec::new();
    for f in &files {
        let plain = !f.name.is_empty()
            && !f.name.starts_with('.')
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !plain {
            bail!(
                "the coordinator sent a file named {:?}; refusing to write it",
                f.name
            );
        }
        let path = out.join(&f.name);
        let tmp = out.join(format!(".{}.tmp", f.name));
        std::fs::write(&tmp, &f.content)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(format!("wrote {}\n", written.join("\n      ")))
}

/// Writes a sweep's results (or epoch metrics) as CSV or Parquet to `out` a page at a time,
/// through a temporary file beside it, so that a failed export leaves nothing half-written.
pub async fn export(
    coordinator: &Connection,
    id: &str,
    table: &str,
    format: &str,
    out: &Path,
) -> anyhow::Result<String> {
    use seedsweep_coordinator::export::{Format, Sink, epochs_table, results_table};
    let format: Format = format.parse()?;
    let results = match table {
        "results" => true,
        "epochs" => false,
        other => bail!("--table {other}: use results or epochs"),
    };
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: give a file name", out.display()))?;
    let client = coordinator.connect().await?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let written = async {
        let file = std::io::BufWriter::new(file);
        let (rows, name) = if results {
            let mut sink = Sink::new(format, file, &results_table(id, &[]))?;
            result_pages(&client, id, |page| sink.write(&results_table(id, &page))).await?;
            (sink.finish()?, "results")
        } else {
            let mut sink = Sink::new(format, file, &epochs_table(id, &[]))?;
            epoch_pages(&client, id, |page| sink.write(&epochs_table(id, &page))).await?;
            (sink.finish()?, "epoch_metrics")
        };
        let ((file, rows), name) = (rows, name);
        file.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
        anyhow::Ok(format!("wrote {} ({rows} rows of {name})\n", out.display()))
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
