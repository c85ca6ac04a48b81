//! `coordinator sweep paper`: the paper's table for one or more sweeps, and the evidence a
//! reviewer can check without seedsweep. Written into a fresh folder beside the one asked for,
//! renamed into place once whole, so that a failure leaves nothing half-written.

use super::admin::{comparison_document, export, result_pages, rpc, stats_document};
use anyhow::{Context, bail};
use seedsweep_core::design::Design;
use seedsweep_core::domain::Metric;
use seedsweep_core::metric::Direction;
use seedsweep_core::report::paper::{self, Paper, PaperPair, PaperSweep};
use seedsweep_core::stats::document::StatsBody;
use seedsweep_proto::client::{Client, Connection};
use seedsweep_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Writes `table.md`, `table.tex`, `evidence/` (each sweep's settings, results and epochs as
/// CSV and Parquet) and `MANIFEST.sha256` into `out`, which must not exist yet (or be empty).
pub async fn paper(
    coordinator: &Connection,
    ids: &[String],
    metric: &str,
    out: &Path,
) -> anyhow::Result<String> {
    if ids.is_empty() {
        bail!("name at least one sweep");
    }
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        bail!(
            "--out {}: exists and is not an empty folder; name a new one",
            out.display()
        );
    }
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: give a folder name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = write_all(coordinator, ids, metric, &tmp).await;
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir(out).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(format!(
        "wrote {0}/table.md, {0}/table.tex, {0}/evidence/ and {0}/MANIFEST.sha256\n",
        out.display()
    ))
}

async fn write_all(
    coordinator: &Connection,
    ids: &[String],
    metric: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let client = coordinator.connect().await?;
    let mut sweeps: Vec<PaperSweep> = Vec::new();
    let mut configs = Vec::new();
    // Every sweep in the first one's metric (its score unless --metric names one).
    let mut first = None;
    for id in ids {
        let asked = first.map_or(metric.to_string(), |(m, _): (Metric, _)| {
            m.name().to_string()
        });
        let (s, m, d, config) = describe(&client, id, &asked).await?;
        first.get_or_insert((m, d));
        sweeps.push(s);
        configs.push(config);
    }
    let (metric, direction) = first.context("name at least one sweep")?;
    let mut pairs = Vec::new();
    for a in 0..ids.len() {
        for b in a + 1..ids.len() {
            // A sweep without a converged seed has nothing to compare.
            if sweeps[a].stats.is_none() || sweeps[b].stats.is_none() {
                continue;
            }
            let doc = comparison_document(&client, &ids[a], &ids[b], metric.name()).await?;
            pairs.push(PaperPair {
                a,
                b,
                comparison: doc.comparison,
            });
        }
    }
    let p = Paper {
        metric,
        direction,
        sweeps,
        pairs,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let evidence = dir.join("evidence");
    std::fs::create_dir_all(&evidence)
        .with_context(|| format!("cannot create {}", evidence.display()))?;
    std::fs::write(dir.join("table.md"), paper::markdown(&p))?;
    std::fs::write(dir.join("table.tex"), paper::latex(&p))?;
    for (id, config) in ids.iter().zip(&configs) {
        write_evidence(coordinator, id, config, &evidence.join(id)).await?;
    }
    write_manifest(dir)
}

/// One sweep as the table needs it, with the metric its statistics are of, its direction and
/// its settings as stored.
async fn describe(
    client: &Client,
    id: &str,
    metric: &str,
) -> anyhow::Result<(PaperSweep, Metric, Direction, serde_json::Value)> {
    let status = client
        .clone()
        .get_sweep_status(pb::GetSweepStatusRequest {
            sweep_id: id.to_string(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let summary = status
        .sweep
        .context("the coordinator sent an incomplete status")?;
    let config: serde_json::Value = serde_json::from_str(&status.config)
        .context("the coordinator sent settings that do not parse")?;
    let design: Design = serde_json::from_value(config["design"].clone())
        .context("the sweep's settings have no design")?;
    let req = pb::GetSweepStatsRequest {
        sweep_id: id.to_string(),
        metric: metric.to_string(),
        ..Default::default()
    };
    let doc = stats_document(client, req).await?;
    let (stats, m) = match doc.body {
        StatsBody::Stats(s) => {
            let m = s.metric;
            (Some(*s), m)
        }
        StatsBody::NoResultYet { metric, .. } => (None, metric),
    };
    let direction = stats.as_ref().map_or_else(
        || Direction::parse(&status.score_direction).unwrap_or_default(),
        |s| s.summary.direction,
    );
    let mut s = PaperSweep {
        id: id.to_string(),
        name: summary.name,
        task: summary.task,
        dataset: summary.dataset,
        design: design.describe(),
        stats,
        outcomes: doc.outcomes,
        devices: Vec::new(),
        precisions: Vec::new(),
        deterministic: 0,
        seconds: 0.0,
    };
    result_pages(client, id, |page| {
        for r in page {
            count(&mut s.devices, &r.device);
            count(&mut s.precisions, &r.precision);
            s.deterministic += u64::from(r.deterministic);
            s.seconds += r.seconds;
        }
        Ok(())
    })
    .await?;
    Ok((s, m, direction, config))
}

fn count(tally: &mut Vec<(String, u64)>, key: &str) {
    match tally.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 += 1,
        None => tally.push((key.to_string(), 1)),
    }
}

/// The sweep's settings as stored, and its results and epochs as CSV and Parquet.
async fn write_evidence(
    coordinator: &Connection,
    id: &str,
    config: &serde_json::Value,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("sweep.json"),
        serde_json::to_string_pretty(config)? + "\n",
    )?;
    for table in ["results", "epochs"] {
        for format in ["csv", "parquet"] {
            export(
                coordinator,
                id,
                table,
                format,
                &dir.join(format!("{table}.{format}")),
            )
            .await?;
        }
    }
    Ok(())
}

/// `MANIFEST.sha256`: every file under `dir` with its SHA-256, as `sha256sum -c` reads it.
fn write_manifest(dir: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let mut manifest = String::new();
    for path in files {
        let bytes = std::fs::read(&path)?;
        let rel = path.strip_prefix(dir)?.display().to_string();
        manifest += &format!("{:x}  {rel}\n", Sha256::digest(&bytes));
    }
    std::fs::write(dir.join("MANIFEST.sha256"), manifest)?;
    Ok(())
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}
