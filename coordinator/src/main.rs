use anyhow::Context;
use clap::{Parser, Subcommand};
use seedsweep_coordinator::server::{Coordinator, ServerSettings};
use seedsweep_coordinator::{admin, store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// seedsweep's coordinator: holds sweeps of seeds and leases them to workers over gRPC.
///
/// Run `coordinator serve` on the head node, submit sweep files with `coordinator sweep submit`,
/// and start `worker` processes wherever there are GPUs (or CPUs).
#[derive(Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API, backed by SQLite (one host) or PostgreSQL (fleets). Migrates the schema at start.
    Serve {
        /// Address to listen on. Port 0 picks a free port (see --addr-file).
        #[arg(long, env = "SEEDSWEEP_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Database: sqlite://FILE (created if missing) or postgres://USER:PASSWORD@HOST:PORT/DB.
        #[arg(
            long,
            env = "SEEDSWEEP_DATABASE_URL",
            default_value = "sqlite://seedsweep.db"
        )]
        database_url: String,
        /// Seconds a lease lives without a heartbeat before its seed goes back to the queue.
        #[arg(long, env = "SEEDSWEEP_LEASE_TTL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=86400))]
        lease_ttl: u64,
        /// Once listening, write the bound address (HOST:PORT) to this file.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Create or update the database schema, then exit.
    Migrate {
        /// Database: sqlite://FILE or postgres://USER:PASSWORD@HOST:PORT/DB.
        #[arg(
            long,
            env = "SEEDSWEEP_DATABASE_URL",
            default_value = "sqlite://seedsweep.db"
        )]
        database_url: String,
    },
    /// Manage sweeps on a running coordinator.
    Sweep {
        /// The coordinator's gRPC URL.
        #[arg(
            long,
            global = true,
            env = "SEEDSWEEP_COORDINATOR",
            default_value = "http://127.0.0.1:50051"
        )]
        coordinator: String,
        #[command(subcommand)]
        command: SweepCommand,
    },
}

#[derive(Subcommand)]
enum SweepCommand {
    /// Validate a sweep file (TOML) and create the sweep; prints the new sweep's id alone on stdout.
    ///
    /// Keys: `name`; `task` ("resnet9"); `dataset` (a folder name under each worker's --data-dir,
    /// e.g. "cifar10" or "synthetic"); `seeds` ("START..END", end exclusive, or a list of integers);
    /// optional `max_attempts` (default 3), `priority` (default 0; higher sweeps are served
    /// first), `retry_backoff_seconds` (default 10) and `retry_backoff_max_seconds` (default 600):
    /// a failed seed waits base * 2^(failures-1), capped, times a random factor in [0.5, 1.5). Optional `[train]` table (defaults: Page's DAWNBench
    /// ResNet-9 recipe): epochs = 24, batch_size = 512, width = 1.0 (channel multiplier), lr = 0.4
    /// (peak), lr_peak_epoch (default 5/24 of epochs), momentum = 0.9, nesterov = true,
    /// weight_decay = 5e-4, label_smoothing = 0.0, crop_padding = 4, flip = true.
    ///
    /// Example:  name = "baseline"  task = "resnet9"  dataset = "cifar10"  seeds = "0..100"
    /// (one key per line), then `[train]` and `epochs = 24`. Unknown keys and bad values are
    /// rejected with a message naming the key; nothing is created.
    Submit {
        /// The sweep file.
        file: PathBuf,
    },
    /// Seed counts per state and running statistics of final test accuracy.
    Status {
        /// The sweep's id, as printed by `sweep submit`.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop handing out this sweep's seeds; seeds already leased run to completion.
    Pause { id: String },
    /// Hand out a paused sweep's seeds again.
    Resume { id: String },
    /// End a sweep: no new leases, and workers holding its seeds drop them at their next heartbeat. Final.
    Cancel { id: String },
    /// Add seeds to a sweep; seeds it already has (finished or not) are left untouched.
    Extend {
        id: String,
        /// The seeds to add: START..END (end exclusive) or a comma-separated list.
        #[arg(long)]
        seeds: String,
    },
    /// All sweeps, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Per-seed final results of a sweep.
    Results {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Statistics over the sweep's seeds: summary (n, mean, std, quartiles, min and max with
    /// their seeds, gap), black swans (robust MAD and classic z), exact best-of-k, 95% intervals,
    /// seeds needed for a target interval, the per-epoch spread, and variance by seed factor.
    Stats {
        id: String,
        /// test_accuracy, test_loss, train_accuracy, train_loss, test_top5, val_accuracy,
        /// val_loss or seconds.
        #[arg(long, default_value = "test_accuracy")]
        metric: String,
        /// Also say how many seeds a 95% interval of the mean this wide needs.
        #[arg(long, value_parser = positive)]
        ci_width: Option<f64>,
        /// The test-set size (10000 for CIFAR-10): adds the binomial std of the mean accuracy.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        test_examples: Option<u64>,
        /// The JSON document (keys in README, "Statistics").
        #[arg(long)]
        json: bool,
    },
    /// Figures (score histogram with a density estimate, every seed's per-epoch curve, best-of-k,
    /// variance by source) as SVG and PNG, one self-contained report.html, and summary.md (a
    /// Markdown table for a paper), written into a folder.
    Report {
        id: String,
        /// The folder to write into (created if missing; files of the same names are replaced).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "test_accuracy")]
        metric: String,
    },
    /// Write the sweep's results (one row per finished seed) or epoch metrics (one row per seed
    /// and epoch) to a CSV or Parquet file, with the columns of the SQL tables.
    Export {
        /// The sweep's id, as printed by `sweep submit`.
        id: String,
        /// The file format.
        #[arg(long, value_parser = ["csv", "parquet"])]
        format: String,
        /// The file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// results or epochs.
        #[arg(long, default_value = "results", value_parser = ["results", "epochs"])]
        table: String,
    },
    /// Compare two sweeps: difference of means with a 95% interval, Welch's t-test, the
    /// Mann-Whitney rank test, and P(a random seed of A beats one of B).
    Compare {
        a: String,
        b: String,
        #[arg(long, default_value = "test_accuracy")]
        metric: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a sweep live until no seed is left to run: progress with rate and ETA, the
    /// summary, the newest black swans (one line per update when stdout is not a terminal).
    Watch {
        id: String,
        #[arg(long, default_value = "test_accuracy")]
        metric: String,
    },
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number > 0")),
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            database_url,
            lease_ttl,
            addr_file,
        } => {
            let coordinator = Coordinator::build(ServerSettings {
                listen,
                database_url,
                lease_ttl: Duration::from_secs(lease_ttl),
            })
            .await?;
            if let Some(path) = addr_file {
                write_atomically(&path, &coordinator.local_addr().to_string())
                    .with_context(|| format!("failed to write {}", path.display()))?;
            }
            coordinator.run_until(shutdown_signal()).await?;
            tracing::info!("coordinator stopped");
        }
        Command::Migrate { database_url } => {
            store::connect(&database_url).await.with_context(|| {
                format!("failed to migrate {}", store::redact_url(&database_url))
            })?;
            eprintln!(
                "database {} is up to date",
                store::redact_url(&database_url)
            );
        }
        Command::Sweep {
            coordinator,
            command,
        } => {
            let out = match command {
                SweepCommand::Submit { file } => admin::submit(&coordinator, &file).await? + "\n",
                SweepCommand::Status { id, json } => admin::status(&coordinator, &id, json).await?,
                SweepCommand::List { json } => admin::list(&coordinator, json).await?,
                SweepCommand::Pause { id } => admin::set_state(&coordinator, &id, "paused").await?,
                SweepCommand::Resume { id } => {
                    admin::set_state(&coordinator, &id, "active").await?
                }
                SweepCommand::Cancel { id } => {
                    admin::set_state(&coordinator, &id, "cancelled").await?
                }
                SweepCommand::Extend { id, seeds } => {
                    admin::extend(&coordinator, &id, &seeds).await?
                }
                SweepCommand::Stats {
                    id,
                    metric,
                    ci_width,
                    test_examples,
                    json,
                } => {
                    admin::stats(&coordinator, &id, &metric, ci_width, test_examples, json).await?
                }
                SweepCommand::Report { id, out, metric } => {
                    admin::report(&coordinator, &id, &metric, &out).await?
                }
                SweepCommand::Export {
                    id,
                    format,
                    out,
                    table,
                } => admin::export(&coordinator, &id, &table, &format, &out).await?,
                SweepCommand::Compare { a, b, metric, json } => {
                    admin::compare(&coordinator, &a, &b, &metric, json).await?
                }
                SweepCommand::Watch { id, metric } => {
                    admin::watch(&coordinator, &id, &metric).await?;
                    String::new()
                }
                SweepCommand::Results { id, json } => {
                    admin::results(&coordinator, &id, json).await?
                }
            };
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
        }
    }
    Ok(())
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
