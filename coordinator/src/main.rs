use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use seedsweep_coordinator::config::{ServeArgs, file_arguments};
use seedsweep_coordinator::server::Coordinator;
use seedsweep_coordinator::store;

mod cli;
use cli::{admin, paper};
use seedsweep_ops::LogFormat;
use seedsweep_proto::client::{Connection, read_token};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

/// seedsweep's coordinator: holds sweeps of seeds and leases them to workers over gRPC.
///
/// Run `coordinator serve` on the head node, submit sweep files with `coordinator sweep submit`,
/// and start `worker` processes wherever there are GPUs (or CPUs).
#[derive(Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    /// Log lines for people (text) or one JSON object per line (json).
    #[arg(
        long,
        global = true,
        env = "SEEDSWEEP_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How the sweep commands reach the coordinator.
#[derive(Args)]
struct ClientArgs {
    /// The coordinator's gRPC URL: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(
        long,
        global = true,
        env = "SEEDSWEEP_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// File holding the admin token (its first line). Or set SEEDSWEEP_ADMIN_TOKEN.
    #[arg(
        long,
        global = true,
        env = "SEEDSWEEP_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// coordinator (default: the system's roots).
    #[arg(long, global = true, env = "SEEDSWEEP_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires one; needs --tls-client-key.
    #[arg(
        long,
        global = true,
        env = "SEEDSWEEP_CLIENT_CERT",
        value_name = "FILE"
    )]
    tls_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "SEEDSWEEP_CLIENT_KEY", value_name = "FILE")]
    tls_client_key: Option<PathBuf>,
}

impl ClientArgs {
    fn connection(self) -> anyhow::Result<Connection> {
        Ok(Connection {
            token: read_token(self.token_file.as_deref(), "SEEDSWEEP_ADMIN_TOKEN")?,
            url: self.coordinator,
            tls_ca: self.tls_ca,
            tls_cert: self.tls_client_cert,
            tls_key: self.tls_client_key,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API, backed by SQLite (one host) or PostgreSQL (fleets). Migrates the
    /// schema at start. Settings come from flags, SEEDSWEEP_… environment variables and
    /// --config FILE, in that order of precedence (see `coordinator config`).
    Serve(ServeArgs),
    /// Print the settings `serve` would run with (same flags, environment and file), where each
    /// came from, with the database password and tokens masked; checks them without serving.
    Config(ServeArgs),
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
        #[command(flatten)]
        client: ClientArgs,
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
    /// weight_decay = 5e-4, label_smoothing = 0.0, crop_padding = 4, crop_padding_mode =
    /// "reflect", flip = true, cutout = 8, init = "pytorch", drop_last = true, lr_in_momentum =
    /// true; `recipe` picks another (README, "Recipes", lists every setting).
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
        /// val_loss, seconds, or a custom metric of a command sweep's program (default: the
        /// sweep's score, `command.score`, else test_accuracy).
        #[arg(long)]
        metric: Option<String>,
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
        /// The metric (default: the sweep's score, `command.score`, else test_accuracy).
        #[arg(long)]
        metric: Option<String>,
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
        /// The metric (default: the sweep's score, `command.score`, else test_accuracy).
        #[arg(long)]
        metric: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The paper's table for one or more sweeps: per sweep n, mean with its 95% interval, std,
    /// min and max with their seeds, median, and converged / diverged / failed seeds; per pair
    /// the difference of means with its interval and P(A > B); a paragraph of how each number
    /// was made (what was varied, the intervals, devices, precision, determinism, versions,
    /// device-hours). Writes table.md, table.tex (booktabs), evidence/ (each sweep's settings,
    /// results and epochs as CSV and Parquet) and MANIFEST.sha256 (`sha256sum -c` checks it)
    /// into a new folder.
    Paper {
        /// The sweeps' ids, in the table's order.
        #[arg(required = true)]
        ids: Vec<String>,
        /// The folder to write (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// The metric (default: the first sweep's score, `command.score`, else test_accuracy).
        #[arg(long)]
        metric: Option<String>,
    },
    /// Follow a sweep live until no seed is left to run: progress with rate and ETA, the
    /// summary, the newest black swans (one line per update when stdout is not a terminal).
    Watch {
        id: String,
        /// The metric (default: the sweep's score, `command.score`, else test_accuracy).
        #[arg(long)]
        metric: Option<String>,
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
    let (cli, matches, from_file) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(e) => e.exit(),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
    };
    seedsweep_ops::init_logging(cli.log_format, "info,sqlx=warn");
    if let Err(e) = run(cli, &matches, &from_file).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Parses the command line; for `serve` and `config`, parses it again with the configuration
/// file's settings added where no flag or environment variable gave one. Returns the serve
/// arguments' matches and the settings the file gave, for `config`'s report.
fn parse() -> anyhow::Result<(Cli, clap::ArgMatches, BTreeSet<String>)> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let (extra, from_file) = match matches.subcommand() {
        Some(("serve" | "config", sub)) => file_arguments(sub)?,
        _ => (Vec::new(), BTreeSet::new()),
    };
    argv.extend(extra);
    // A bad value the file gave is reported under its flag's name: say where it came from.
    let matches = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(|e| match from_file.is_empty() {
            true => anyhow::Error::from(e),
            false => anyhow::anyhow!(
                "{}(the configuration file set: {}; fix the value there, or override it with the flag)",
                e.render().to_string().trim_start_matches("error: "),
                from_file.iter().map(|k| k.replace('_', "-")).collect::<Vec<_>>().join(", ")
            ),
        })?;
    let cli = Cli::from_arg_matches(&matches)?;
    let sub = match matches.subcommand() {
        Some((_, sub)) => sub.clone(),
        None => matches,
    };
    Ok((cli, sub, from_file))
}

async fn run(
    cli: Cli,
    matches: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let coordinator = Coordinator::build(args.settings()?).await?;
            if let Some(path) = args.addr_file {
                write_atomically(&path, &coordinator.local_addr().to_string())
                    .with_context(|| format!("failed to write {}", path.display()))?;
            }
            coordinator.run_until(shutdown_signal()).await?;
            tracing::info!("coordinator stopped");
        }
        Command::Config(args) => {
            let text = args.describe(matches, from_file)?;
            print!("{text}");
            seedsweep_coordinator::server::check_exposure(&args.settings()?)?;
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
        Command::Sweep { client, command } => {
            let coordinator = &client.connection()?;
            let out = match command {
                SweepCommand::Submit { file } => admin::submit(coordinator, &file).await? + "\n",
                SweepCommand::Status { id, json } => admin::status(coordinator, &id, json).await?,
                SweepCommand::List { json } => admin::list(coordinator, json).await?,
                SweepCommand::Pause { id } => admin::set_state(coordinator, &id, "paused").await?,
                SweepCommand::Resume { id } => admin::set_state(coordinator, &id, "active").await?,
                SweepCommand::Cancel { id } => {
                    admin::set_state(coordinator, &id, "cancelled").await?
                }
                SweepCommand::Extend { id, seeds } => {
                    admin::extend(coordinator, &id, &seeds).await?
                }
                SweepCommand::Stats {
                    id,
                    metric,
                    ci_width,
                    test_examples,
                    json,
                } => {
                    admin::stats(
                        coordinator,
                        &id,
                        metric.as_deref().unwrap_or_default(),
                        ci_width,
                        test_examples,
                        json,
                    )
                    .await?
                }
                SweepCommand::Report { id, out, metric } => {
                    admin::report(
                        coordinator,
                        &id,
                        metric.as_deref().unwrap_or_default(),
                        &out,
                    )
                    .await?
                }
                SweepCommand::Export {
                    id,
                    format,
                    out,
                    table,
                } => admin::export(coordinator, &id, &table, &format, &out).await?,
                SweepCommand::Compare { a, b, metric, json } => {
                    admin::compare(
                        coordinator,
                        &a,
                        &b,
                        metric.as_deref().unwrap_or_default(),
                        json,
                    )
                    .await?
                }
                SweepCommand::Watch { id, metric } => {
                    admin::watch(coordinator, &id, metric.as_deref().unwrap_or_default()).await?;
                    String::new()
                }
                SweepCommand::Paper { ids, out, metric } => {
                    paper::paper(
                        coordinator,
                        &ids,
                        metric.as_deref().unwrap_or_default(),
                        &out,
                    )
                    .await?
                }
                SweepCommand::Results { id, json } => {
                    admin::results(coordinator, &id, json).await?
                }
            };
            print!("{out}");
            if !out.is_empty() && !out.ends_with('\n') {
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
