//! The admin commands: gRPC clients of a running coordinator that print for people (or `--json`).

use crate::spec::SweepSpec;
use anyhow::{Context, bail};
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_client::CoordinatorClient;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

pub async fn connect(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("`{url}` is not a coordinator URL: write it as http://HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.with_context(|| {
        format!("cannot reach the coordinator at {url}: is `coordinator serve` running there? (set --coordinator or SEEDSWEEP_COORDINATOR)")
    })?;
    Ok(CoordinatorClient::new(channel))
}

/// A gRPC error as a one-line message for people.
fn rpc(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

pub async fn submit(url: &str, file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read sweep file {}", file.display()))?;
    // Validate before contacting anyone, so a typo is reported even with no coordinator running.
    SweepSpec::parse(&text).with_context(|| format!("{} was not submitted", file.display()))?;
    let mut client = connect(url).await?;
    let reply = client
        .submit_sweep(pb::SubmitSweepRequest { sweep_toml: text })
        .await
        .map_err(rpc)
        .with_context(|| format!("the coordinator refused {}", file.display()))?;
    Ok(reply.into_inner().sweep_id)
}

pub async fn status(url: &str, id: &str, json: bool) -> anyhow::Result<String> {
    let mut client = connect(url).await?;
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
        let acc = s.test_accuracy.map(|a| {
            serde_json::json!({"n": a.n, "mean": a.mean, "std": a.std, "min": a.min, "max": a.max,
                                "worst_seed": a.worst_seed, "best_seed": a.best_seed})
        });
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "sweep_id": sweep.sweep_id, "name": sweep.name, "task": sweep.task, "dataset": sweep.dataset,
            "created_at": sweep.created_at, "total": sweep.total, "done": sweep.done,
            "state": sweep.state, "priority": sweep.priority,
            "counts": {"pending": c.pending, "leased": c.leased, "done": c.done, "failed": c.failed,
                       "cancelled": c.cancelled},
            "test_accuracy": acc,
        }))?);
    }
    let mut out = format!(
        "sweep    {}  {}  ({} on {}, created {}, {}, priority {})\nseeds    {}/{} done  pending {}  leased {}  failed {}  cancelled {}\n",
        sweep.sweep_id,
        sweep.name,
        sweep.task,
        sweep.dataset,
        sweep.created_at,
        sweep.state,
        sweep.priority,
        sweep.done,
        sweep.total,
        c.pending,
        c.leased,
        c.failed,
        c.cancelled
    );
    match s.test_accuracy {
        Some(a) => {
            out += &format!(
                "test accuracy over {} seeds: mean {:.4}  std {:.4}  min {:.4} (seed {})  max {:.4} (seed {})\n",
                a.n, a.mean, a.std, a.min, a.worst_seed, a.max, a.best_seed
            )
        }
        None => out += "test accuracy: no seed finished yet\n",
    }
    Ok(out)
}

/// Pauses, resumes or cancels a sweep.
pub async fn set_state(url: &str, id: &str, state: &str) -> anyhow::Result<String> {
    let mut client = connect(url).await?;
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
pub async fn extend(url: &str, id: &str, seeds: &str) -> anyhow::Result<String> {
    let mut req = pb::ExtendSweepRequest {
        sweep_id: id.to_string(),
        ..Default::default()
    };
    if seeds.contains("..") {
        // Validate before contacting anyone, as `submit` does.
        crate::spec::SeedSet::parse_range(seeds).map_err(|e| {
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
    let mut client = connect(url).await?;
    let added = client
        .extend_sweep(req)
        .await
        .map_err(rpc)?
        .into_inner()
        .added;
    Ok(format!("added {added} seeds to sweep {id}\n"))
}

pub async fn list(url: &str, json: bool) -> anyhow::Result<String> {
    let mut client = connect(url).await?;
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

pub async fn results(url: &str, id: &str, json: bool) -> anyhow::Result<String> {
    let mut client = connect(url).await?;
    let rows = client
        .list_results(pb::ListResultsRequest {
            sweep_id: id.to_string(),
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .results;
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"seed": r.seed, "test_accuracy": r.test_accuracy, "test_loss": r.test_loss,
                "train_loss": r.train_loss, "train_accuracy": r.train_accuracy, "epochs": r.epochs,
                "seconds": r.seconds, "worker_id": r.worker_id, "device": r.device,
                "data_fingerprint": r.data_fingerprint, "finished_at": r.finished_at,
                "precision": r.precision, "deterministic": r.deterministic,
                "init_seed": r.factors.map(|f| f.init), "order_seed": r.factors.map(|f| f.order),
                "augment_seed": r.factors.map(|f| f.augment), "split_seed": r.factors.map(|f| f.split),
                "test_top5": r.test_top5, "val_loss": r.val_loss, "val_accuracy": r.val_accuracy}))
            .collect();
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    let mut out = format!(
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
    for r in rows {
        let factors = r
            .factors
            .map(|f| format!("{}/{}/{}", f.init, f.order, f.augment))
            .unwrap_or_default();
        out += &format!(
            "{:>8}  {:>9.4}  {:>9.4}  {:>10.4}  {:>6}  {:>8.1}  {:>20}  {}\n",
            r.seed,
            r.test_accuracy,
            r.test_loss,
            r.train_loss,
            r.epochs,
            r.seconds,
            factors,
            r.worker_id
        );
    }
    Ok(out)
}
