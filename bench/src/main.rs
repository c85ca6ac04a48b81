//! A load generator, not a worker: `--workers` simulated workers, each looping lease, `--epochs`
//! epoch reports over a stream (heartbeating while it "trains"), complete, against a real
//! coordinator. It sends what
//! real workers send: a correctness bitmap of 10,000 test examples with each result (as for
//! CIFAR-10), final metrics equal to the last epoch's, worker ids and fingerprints as long as
//! real ones. Prints one JSON line: lease cycles per second and claim- and heartbeat-latency
//! percentiles, of the cycles completed up to the end of the run (with `--think-ms`, from the end
//! of the fleet's first cycle: the ramp while workers join is left out).
//!
//! By default the loop is closed with no pause (each simulated worker claims again the moment it
//! completes): that measures the most cycles per second the coordinator can serve. With
//! `--think-ms` each simulated worker "trains" for about that long between its claim and its
//! completion (each epoch takes 0.5x to 1.5x of its share, uniformly), streaming each epoch's row
//! as it ends and heartbeating every `--heartbeat-ms`, as real workers do, so the coordinator sees
//! a fleet at a realistic load and the claim latency is the one such a fleet gets.

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
    /// While "training", heartbeat this often, in milliseconds, as real workers do every third
    /// of the lease TTL from the grant on (0: none, as a real worker's seed that ends within
    /// one interval).
    #[arg(long, default_value_t = 0)]
    heartbeat_ms: u64,
}

/// Test examples per result, as CIFAR-10's test set.
const TEST_EXAMPLES: u32 = 10_000;

/// A result's test hits and which examples they are, depending on the seed: about 93% right.
fn correctness(seed: i64) -> (u32, Vec<u8>) {
    let hits = 9_250 + (seed.wrapping_mul(7_919).rem_euclid(100)) as u32;
    let mut bits = vec![0u8; TEST_EXAMPLES as usize / 8];
    for i in 0..i64::from(TEST_EXAMPLES) {
        if (i * 7_919 + seed.wrapping_mul(104_729)).rem_euclid(i64::from(TEST_EXAMPLES))
            < i64::from(hits)
        {
            bits[i as usize / 8] |= 1 << (i % 8);
        }
    }
    (hits, bits)
}

/// Latencies of one simulated worker's calls, each with when the call ended.
#[derive(Default)]
struct Latencies {
    /// A completed cycle's claim latency and when the cycle completed.
    claims: Vec<(Instant, Duration)>,
    heartbeats: Vec<(Instant, Duration)>,
}

async fn client(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(CoordinatorClient::new(channel))
}

/// One simulated worker: returns the latencies of its completed cycles' claims and of every
/// heartbeat.
async fn simulate(url: String, n: usize, args: Pace, until: Instant) -> anyhow::Result<Latencies> {
    let Pace {
        epochs,
        think,
        heartbeat,
    } = args;
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
    let worker_id = format!(
        "gpu-node-{:04}.cluster.example.org/gpu{}-pid{}",
        n / 8,
        n % 8,
        40_000 + n
    );
    let mut seen = Latencies::default();
    while Instant::now() < until {
        let started = Instant::now();
        let reply = c
            .lease_seed(pb::LeaseSeedRequest {
                worker_id: worker_id.clone(),
                // What a GPU worker built with libtorch and no program to run sends.
                tasks: vec!["resnet9".into(), "finetune-head".into()],
                ..Default::default()
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
            key: l.key,
        };
        let beat = pb::HeartbeatRequest {
            lease: Some(lease.clone()),
            worker_id: worker_id.clone(),
        };
        let (hits, bits) = correctness(lease.seed);
        let accuracy = f64::from(hits) / f64::from(TEST_EXAMPLES);
        let metrics = epoch_metrics(&lease, epochs, accuracy);
        // The final metrics are the last epoch's, as the coordinator checks.
        let last = metrics
            .last()
            .context("--epochs must be at least 1")?
            .clone();
        // Each epoch goes on one stream as it is "trained", as a real worker sends them.
        let (tx, rx) = tokio::sync::mpsc::channel(epochs as usize);
        let mut streamer = c.clone();
        let stream = tokio::spawn(async move {
            streamer
                .stream_epoch_metrics(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut next_beat = Instant::now() + heartbeat;
        for m in metrics {
            if !think.is_zero() {
                let epoch_ends = Instant::now() + think.mul_f64(0.5 + uniform()) / epochs;
                while !heartbeat.is_zero() && next_beat < epoch_ends {
                    tokio::time::sleep_until(next_beat.into()).await;
                    let at = Instant::now();
                    c.heartbeat(beat.clone()).await?;
                    seen.heartbeats.push((Instant::now(), at.elapsed()));
                    next_beat += heartbeat;
                }
                tokio::time::sleep_until(epoch_ends.into()).await;
            }
            tx.send(m).await.context("the epoch stream ended early")?;
        }
        drop(tx);
        stream.await??;
        c.complete_seed(pb::CompleteSeedRequest {
            lease: Some(lease),
            worker_id: worker_id.clone(),
            test_accuracy: Some(accuracy),
            test_loss: last.test_loss,
            train_loss: last.train_loss,
            train_accuracy: last.train_accuracy,
            epochs,
            seconds: 2.5 * f64::from(epochs),
            device: "cuda:0 (NVIDIA H100 80GB HBM3, compute capability 9.0)".into(),
            data_fingerprint: format!("sha256:{}", "3f".repeat(32)),
            precision: "fp32".into(),
            deterministic: true,
            test_examples: TEST_EXAMPLES,
            test_correct: bits,
            ..Default::default()
        })
        .await?;
        seen.claims.push((Instant::now(), claim));
    }
    Ok(seen)
}

/// A simulated run's epoch rows, climbing to `accuracy` at the last.
fn epoch_metrics(lease: &pb::LeaseRef, epochs: u32, accuracy: f64) -> Vec<pb::EpochMetrics> {
    (1..=epochs)
        .map(|epoch| pb::EpochMetrics {
            lease: Some(lease.clone()),
            epoch,
            train_loss: Some(1.0 / f64::from(epoch)),
            train_accuracy: Some(0.5 + 0.4 * f64::from(epoch) / f64::from(epochs)),
            test_loss: Some(0.3 + 0.1 * f64::from(epochs - epoch)),
            test_accuracy: Some(accuracy - 0.01 * f64::from(epochs - epoch)),
            test_top5: None,
            val_loss: None,
            val_accuracy: None,
            lr: Some(0.4 * (1.0 - f64::from(epoch) / f64::from(epochs))),
            seconds: 2.5,
            custom: Default::default(),
        })
        .collect()
}

/// How each simulated worker paces its cycle.
#[derive(Clone, Copy)]
struct Pace {
    epochs: u32,
    think: Duration,
    heartbeat: Duration,
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
        "name = \"loadgen: resnet9 on cifar10, seed-variance study at fleet scale\"\ntask = \"resnet9\"\ndataset = \"loadgen\"\nseeds = \"0..{}\"\n[train]\nepochs = {}\n",
        args.seeds, args.epochs
    );
    c.submit_sweep(pb::SubmitSweepRequest { sweep_toml: sweep })
        .await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let pace = Pace {
        epochs: args.epochs,
        think: Duration::from_millis(args.think_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
    };
    let tasks: Vec<_> = (0..args.workers)
        .map(|n| tokio::spawn(simulate(args.coordinator.clone(), n, pace, until)))
        .collect();
    // Measured over the window after the first full cycle (the fleet's ramp, when the workers
    // start at random points of a cycle) up to the end of the run (cycles still going then are
    // left out).
    let warm_up = if pace.think.is_zero() {
        Duration::ZERO
    } else {
        (pace.think * 3 / 2).min(Duration::from_secs_f64(args.seconds / 2.0))
    };
    let window = (started + warm_up)..=until;
    let in_window = |calls: Vec<(Instant, Duration)>| -> Vec<Duration> {
        let calls = calls.into_iter().filter(|(at, _)| window.contains(at));
        calls.map(|(_, latency)| latency).collect()
    };
    let (mut claims, mut beats) = (Vec::new(), Vec::new());
    for t in tasks {
        let seen = t.await??;
        claims.extend(in_window(seen.claims));
        beats.extend(in_window(seen.heartbeats));
    }
    let elapsed = (until - started - warm_up).as_secs_f64();
    claims.sort();
    beats.sort();
    println!(
        "{}",
        serde_json::json!({
            "workers": args.workers,
            "epochs": args.epochs,
            "think_ms": args.think_ms,
            "cycles": claims.len(),
            "cycles_per_second": claims.len() as f64 / elapsed,
            "epoch_rows_per_second": (claims.len() * args.epochs as usize) as f64 / elapsed,
            "claim_p50_ms": percentile(&claims, 0.5),
            "claim_p99_ms": percentile(&claims, 0.99),
            "heartbeats": beats.len(),
            "heartbeat_p50_ms": percentile(&beats, 0.5),
            "heartbeat_p99_ms": percentile(&beats, 0.99),
            "heartbeat_max_ms": percentile(&beats, 1.0),
        })
    );
    Ok(())
}
