//! A load generator, not a worker: `--workers` simulated workers, each looping lease, heartbeat,
//! `--epochs` epoch reports over a stream, complete, against a real coordinator. Prints one JSON
//! line: lease cycles per second and claim-latency percentiles.
//!
//! By default the loop is closed with no pause (each simulated worker claims again the moment it
//! completes): that measures the most cycles per second the coordinator can serve. With
//! `--think-ms` each simulated worker "trains" for about that long (uniformly 0.5x to 1.5x)
//! between its heartbeat and its completion, as real workers do, so the coordinator sees a fleet
//! at a realistic load and the claim latency is the one such a fleet gets.

use anyhow::{Context, bail};
use clap::Parser;
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_client::CoordinatorClient;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Plays many workers against a coordinator and measures lease cycles.
#[derive(Parser)]
#[command(name = "loadgen")]
struct Args {
    /// The coordinator's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// Simulated workers, each one task with its own connection.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Epoch reports per lease.
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    /// Seeds in the sweep the run submits (more than it can finish).
    #[arg(long, default_value_t = 100_000)]
    seeds: u64,
    /// Mean simulated training time per lease, in milliseconds (0: a closed loop at full speed).
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
}

async fn client(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(CoordinatorClient::new(channel))
}

/// One simulated worker: returns the claim latencies of its completed cycles.
async fn simulate(
    url: String,
    n: usize,
    epochs: u32,
    think: Duration,
    until: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut c = client(&url).await?;
    // A tiny per-worker generator (xorshift) spreads the think times, so the workers drift apart
    // instead of arriving in lockstep.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    if !think.is_zero() {
        // Start at a random point of a cycle, as a fleet that has been running a while does.
        tokio::time::sleep(think.mul_f64(uniform())).await;
    }
    let worker_id = format!("loadgen-{n}");
    let mut claims = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let reply = c
            .lease_seed(pb::LeaseSeedRequest {
                worker_id: worker_id.clone(),
            })
            .await?
            .into_inner();
        let claim = started.elapsed();
        let Some(pb::lease_seed_response::Outcome::Lease(l)) = reply.outcome else {
            bail!("the sweep ran out of seeds: raise --seeds");
        };
        let lease = pb::LeaseRef {
            sweep_id: l.sweep_id,
            seed: l.seed,
            fence: l.fence,
        };
        c.heartbeat(pb::HeartbeatRequest {
            lease: Some(lease.clone()),
            worker_id: worker_id.clone(),
        })
        .await?;
        if !think.is_zero() {
            tokio::time::sleep(think.mul_f64(0.5 + uniform())).await;
        }
        let metrics: Vec<_> = (1..=epochs)
            .map(|epoch| pb::EpochMetrics {
                lease: Some(lease.clone()),
                epoch,
                train_loss: 1.0,
                train_accuracy: 0.5,
                test_loss: Some(1.0),
                test_accuracy: Some(0.5),
                test_top5: None,
                val_loss: None,
                val_accuracy: None,
                lr: 0.1,
                seconds: 1.0,
            })
            .collect();
        c.stream_epoch_metrics(tokio_stream::iter(metrics)).await?;
        c.complete_seed(pb::CompleteSeedRequest {
            lease: Some(lease),
            worker_id: worker_id.clone(),
            test_accuracy: 0.5,
            test_loss: 1.0,
            train_loss: 1.0,
            train_accuracy: 0.5,
            epochs,
            seconds: 1.0,
            device: "loadgen".into(),
            data_fingerprint: "loadgen".into(),
            precision: "fp32".into(),
            deterministic: true,
            ..Default::default()
        })
        .await?;
        claims.push(claim);
    }
    Ok(claims)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut c = client(&args.coordinator).await?;
    let sweep = format!(
        "name = \"loadgen\"\ntask = \"resnet9\"\ndataset = \"loadgen\"\nseeds = \"0..{}\"\n[train]\nepochs = {}\n",
        args.seeds, args.epochs
    );
    c.submit_sweep(pb::SubmitSweepRequest { sweep_toml: sweep })
        .await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.workers)
        .map(|n| {
            tokio::spawn(simulate(
                args.coordinator.clone(),
                n,
                args.epochs,
                Duration::from_millis(args.think_ms),
                until,
            ))
        })
        .collect();
    let mut claims = Vec::new();
    for t in tasks {
        claims.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    claims.sort();
    println!(
        "{}",
        serde_json::json!({
            "workers": args.workers,
            "epochs": args.epochs,
            "think_ms": args.think_ms,
            "cycles": claims.len(),
            "cycles_per_second": claims.len() as f64 / elapsed,
            "claim_p50_ms": percentile(&claims, 0.5),
            "claim_p99_ms": percentile(&claims, 0.99),
        })
    );
    Ok(())
}
