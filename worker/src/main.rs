use anyhow::Context;
use clap::{Args, Parser};
#[cfg(feature = "torch")]
use clap::{Subcommand, ValueEnum};
use seedsweep_proto::client::{Connection, read_token};
#[cfg(feature = "torch")]
use seedsweep_worker::data;
use seedsweep_worker::metrics::WorkerMetrics;
use seedsweep_worker::runner::{Device, Worker, WorkerSettings};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// seedsweep's worker: leases seeds from a coordinator, trains each with libtorch or runs the
/// sweep's own program on it, streams per-epoch metrics back and reports the result.
///
/// Start one per GPU (`worker --gpu 0`, `worker --gpu 1`, ...) or `worker --cpu`. SIGINT or
/// SIGTERM stops training and hands the current seed back (a second signal exits at once).
#[derive(Parser)]
#[command(
    name = "worker",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Log lines for people (text) or one JSON object per line (json).
    #[arg(
        long,
        global = true,
        env = "SEEDSWEEP_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: seedsweep_ops::LogFormat,
    #[command(flatten)]
    run: RunArgs,
    #[cfg(feature = "torch")]
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[cfg(feature = "torch")]
    #[command(flatten)]
    builtin: BuiltinArgs,
    /// The coordinator's gRPC URL: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(
        long,
        env = "SEEDSWEEP_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// File holding the worker token (its first line). Or set SEEDSWEEP_WORKER_TOKEN.
    #[arg(long, env = "SEEDSWEEP_WORKER_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// coordinator (default: the system's roots).
    #[arg(long, env = "SEEDSWEEP_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires one; needs --tls-client-key.
    #[arg(long, env = "SEEDSWEEP_CLIENT_CERT", value_name = "FILE")]
    tls_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SEEDSWEEP_CLIENT_KEY", value_name = "FILE")]
    tls_client_key: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at this address (path /metrics), e.g. 0.0.0.0:9091.
    #[arg(long, env = "SEEDSWEEP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Exit (status 0) once the coordinator has no seed left to lease; without it the worker waits for new work.
    #[arg(long)]
    exit_when_idle: bool,
    /// Name this worker reports (default: HOSTNAME:PID:DEVICE).
    #[arg(long, env = "SEEDSWEEP_WORKER_ID")]
    worker_id: Option<String>,
    /// Exit (status 0) after this many seeds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_seeds: Option<u64>,
    /// Seeds to train at once on the device, each with its own lease (fills a large GPU with a
    /// small network). On a CPU, --threads is shared by the slots.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    slots: u64,
    /// Folder for checkpoints of sweeps that set `checkpoint_every` (shared storage on a cluster,
    /// so that a seed whose lease was lost resumes on any worker).
    #[arg(long, env = "SEEDSWEEP_CHECKPOINT_DIR", value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Local folder where finished results wait until the coordinator has recorded them (default:
    /// ${XDG_STATE_HOME:-~/.local/state}/seedsweep/spool). Keep it on a disk that outlives the
    /// worker process (a pod's volume, not its container layer): a restarted worker delivers
    /// what it holds before it leases anything new.
    #[arg(long, env = "SEEDSWEEP_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Let sweeps of task `command` run PROGRAM (repeat for more): a name found through PATH or a
    /// path, matched against each sweep's program after both are resolved (links followed).
    /// Running a sweep's program is running code its submitter chose: without this flag the
    /// worker runs none: it hands such a seed back and stops.
    #[arg(long = "allow-command", value_name = "PROGRAM")]
    allow_command: Vec<String>,
    /// Pass the worker's variable NAME on to the programs it runs (repeat for more; e.g.
    /// PYTHONPATH, HF_HOME). A program starts from a clean environment: PATH, HOME, USER,
    /// LOGNAME, SHELL, LANG, LANGUAGE, TZ, TMPDIR, LC_*, CUDA_* and NVIDIA_* from the worker's,
    /// the sweep's `env`, and the run's SEEDSWEEP_* variables; never the worker's own SEEDSWEEP_*
    /// settings (its token among them).
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// Let a sweep's `env` set NAME, a variable that changes what a program loads or runs first
    /// (LD_*, BASH_ENV, PYTHONPATH, NODE_OPTIONS, PATH, ...: README, "How a run is supervised");
    /// repeat for more. Without it the worker hands such a seed back and stops.
    #[arg(long = "allow-env", value_name = "NAME")]
    allow_env: Vec<String>,
    /// How every process a program starts is ended with its run: `cgroup` (a cgroup v2 group
    /// per run, killed whole; needs a cgroup v2 hierarchy this worker may create groups in, and
    /// Linux 5.14), `subreaper` (the worker adopts what a program orphans and finds a run's
    /// processes by ancestry and environment), or `auto`: cgroup where the host allows it.
    #[arg(
        long,
        value_enum,
        env = "SEEDSWEEP_CONTAINMENT",
        default_value = "auto"
    )]
    containment: seedsweep_worker::command::contain::Choice,
    /// Folder for the output (stdout and stderr) and reports of each command run, one log file
    /// per lease, cut at 32 MiB (default: ${XDG_STATE_HOME:-~/.local/state}/seedsweep/logs).
    #[arg(long, env = "SEEDSWEEP_LOG_DIR", value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Seconds to keep trying to reach the coordinator at start before giving up.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
}

/// The settings of the built-in training tasks (feature `torch`).
#[cfg(feature = "torch")]
#[derive(Args)]
struct BuiltinArgs {
    /// Folder holding the datasets: DATA_DIR/NAME/cifar-10-batches-bin/.
    #[arg(long, env = "SEEDSWEEP_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Where to download CIFAR-10 (cifar-10-binary.tar.gz) from when the dataset `cifar10` is missing; its MD5 is checked.
    #[arg(long, env = "SEEDSWEEP_CIFAR10_URL", default_value = data::CIFAR10_URL)]
    cifar10_url: String,
    /// CPU threads libtorch may use (default: libtorch's choice, usually one per core).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    threads: Option<i32>,
    /// Folder holding backbone files (task finetune-head); sweeps name files relative to it.
    #[arg(long, env = "SEEDSWEEP_MODEL_DIR", default_value = "./models")]
    model_dir: PathBuf,
    /// Local folder for cached backbone features (default: the per-user cache,
    /// ~/.cache/seedsweep/features).
    #[arg(long, env = "SEEDSWEEP_FEATURE_CACHE", value_name = "DIR")]
    feature_cache: Option<PathBuf>,
    /// Threads decoding images (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    decode_threads: Option<u64>,
}

#[cfg(feature = "torch")]
impl BuiltinArgs {
    fn settings(self) -> seedsweep_worker::builtin::Settings {
        seedsweep_worker::builtin::Settings {
            data_dir: self.data_dir,
            cifar10_url: self.cifar10_url,
            model_dir: self.model_dir,
            feature_cache: self.feature_cache.unwrap_or_else(|| {
                per_user("XDG_CACHE_HOME", ".cache", "features", "feature-cache")
            }),
            decode_threads: self
                .decode_threads
                .map(|n| n as usize)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct DeviceArgs {
    /// Train on CUDA device N.
    #[arg(long, value_name = "N")]
    gpu: Option<usize>,
    /// Train on the CPU.
    #[arg(long)]
    cpu: bool,
}

#[cfg(feature = "torch")]
#[derive(Subcommand)]
enum Command {
    /// Write a dataset (use --out DATA_DIR/NAME): `synthetic` (generated) or `digits` (real
    /// handwritten digits, from --source) in the CIFAR-10 binary layout, `image-folder`
    /// (generated) as PNG and JPEG files.
    MakeDataset {
        kind: DatasetKind,
        /// Dataset folder; `--out DATA_DIR/synthetic` makes it the dataset `synthetic`.
        #[arg(long)]
        out: PathBuf,
        /// Training images (generated kinds; default 5000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        train: Option<u64>,
        /// Test images (generated kinds; default 1000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        test: Option<u64>,
        /// Seed of the generator (generated kinds; default 0).
        #[arg(long)]
        seed: Option<u64>,
        /// Image side in pixels (image-folder only).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=1024))]
        size: u32,
        /// scikit-learn's `sklearn/datasets/data/digits.csv.gz` (digits only; scripts/digits.sh
        /// fetches it and prints its path). Checked against its SHA-256.
        #[arg(long, value_name = "FILE")]
        source: Option<PathBuf>,
    },
    /// Measure how fast this host decodes an ImageFolder dataset's training images (resize and
    /// centre crop, as for the feature cache), to choose --decode-threads. Prints JSON.
    DecodeBench {
        /// The dataset folder (holding train/ and val/).
        dir: PathBuf,
        /// Output side in pixels.
        #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(8..=1024))]
        size: u32,
        /// Decoding threads (default: one per core).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
        threads: Option<u64>,
        /// Decode at most this many images.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// Write a randomly initialised (seeded) backbone in safetensors with torchvision's names,
    /// and print the sweep file's [backbone] table for it: for trying task finetune-head, or a
    /// fleet's set-up, without downloading weights. Pretrained backbones come from
    /// scripts/export_backbone.py.
    MakeBackbone {
        arch: BackboneArch,
        /// Output file (.safetensors), normally under the workers' --model-dir.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Input side the [backbone] table states.
        #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(8..=1024))]
        input_size: u32,
    },
}

#[cfg(feature = "torch")]
#[derive(Clone, Copy, ValueEnum)]
enum BackboneArch {
    Resnet18,
    Resnet34,
    Resnet50,
}

#[cfg(feature = "torch")]
#[derive(Clone, Copy, ValueEnum)]
enum DatasetKind {
    /// Ten classes of coloured stripe patterns with shifts, mixing and noise, in the CIFAR-10
    /// binary layout.
    Synthetic,
    /// The same images as an ImageFolder (train/ and val/ with a folder per class), upscaled to
    /// --size, alternately PNG and JPEG files: for trying task finetune-head.
    ImageFolder,
    /// The UCI handwritten digits as scikit-learn ships them (1,437 training and 360 test
    /// images, 8x8 upscaled to 32x32, grey): real data that nobody here generated.
    Digits,
}

/// glibc's malloc as training needs it: one arena, so that the training thread (a tokio
/// blocking thread, which would get an arena of 64 MiB heaps of its own) reuses its freed
/// activations from the main heap; the largest mmap threshold glibc allows (32 MiB) fixed
/// rather than adapting; and freed memory kept rather than trimmed. Without it every step gave
/// its activations back to the kernel and faulted them in again: about 40% more page faults and
/// 1.18x PyTorch's time per epoch on airbench94 on 2 CPU cores (BENCHMARKS.md, "CPU training").
/// GLIBC_TUNABLES, when set, wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    unsafe extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    const M_ARENA_MAX: std::ffi::c_int = -8;
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    for (param, value) in [
        (M_ARENA_MAX, 1),
        (M_MMAP_THRESHOLD, 32 << 20),
        (M_TRIM_THRESHOLD, std::ffi::c_int::MAX),
    ] {
        // SAFETY: mallopt only sets malloc's parameters; no other thread exists yet.
        unsafe { mallopt(param, value) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() {
    tune_malloc();
    // cuBLAS needs this before it starts for deterministic results (sweeps with
    // `deterministic = true`); it costs a few MiB of GPU memory.
    if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8") };
    }
    let cli = Cli::parse();
    seedsweep_ops::init_logging(cli.log_format, "info");
    #[cfg(feature = "torch")]
    let result = match cli.command {
        Some(command) => tool(command),
        None => run(cli.run),
    };
    #[cfg(not(feature = "torch"))]
    let result = run(cli.run);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The subcommands: datasets, backbones and a decoding benchmark for the built-in tasks.
#[cfg(feature = "torch")]
fn tool(command: Command) -> anyhow::Result<()> {
    match command {
        Command::MakeDataset {
            kind,
            out,
            train,
            test,
            seed,
            size,
            source,
        } => {
            let generated = (
                train.unwrap_or(5000) as usize,
                test.unwrap_or(1000) as usize,
                seed.unwrap_or(0),
            );
            match (kind, source) {
                (DatasetKind::Digits, Some(source)) if train.or(test).or(seed).is_none() => {
                    make_digits(&source, &out)
                }
                (DatasetKind::Digits, Some(_)) => Err(anyhow::anyhow!(
                    "--train, --test and --seed are for generated datasets; digits has a fixed split"
                )),
                (DatasetKind::Digits, None) => Err(anyhow::anyhow!(
                    "digits needs --source FILE: scikit-learn's sklearn/datasets/data/digits.csv.gz (scripts/digits.sh prints its path)"
                )),
                (_, Some(_)) => Err(anyhow::anyhow!("--source is for digits only")),
                (DatasetKind::Synthetic, None) => {
                    make_synthetic(&out, generated.0, generated.1, generated.2)
                }
                (DatasetKind::ImageFolder, None) => {
                    make_image_folder(&out, generated.0, generated.1, generated.2, size)
                }
            }
        }
        Command::DecodeBench {
            dir,
            size,
            threads,
            limit,
        } => decode_bench(&dir, size, threads.map(|t| t as usize), limit as usize),
        Command::MakeBackbone {
            arch,
            out,
            seed,
            input_size,
        } => make_backbone(arch, &out, seed, input_size),
    }
}

#[cfg(feature = "torch")]
fn make_backbone(
    arch: BackboneArch,
    out: &std::path::Path,
    seed: u64,
    input_size: u32,
) -> anyhow::Result<()> {
    use tch::nn;
    anyhow::ensure!(
        out.extension().is_some_and(|e| e == "safetensors"),
        "--out {}: the file must end in .safetensors",
        out.display()
    );
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let (name, features) = match arch {
        BackboneArch::Resnet18 => {
            let _ = tch::vision::resnet::resnet18_no_final_layer(&vs.root());
            ("resnet18", 512)
        }
        BackboneArch::Resnet34 => {
            let _ = tch::vision::resnet::resnet34_no_final_layer(&vs.root());
            ("resnet34", 512)
        }
        BackboneArch::Resnet50 => {
            let _ = tch::vision::resnet::resnet50_no_final_layer(&vs.root());
            ("resnet50", 2048)
        }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    vs.save(out)
        .with_context(|| format!("failed to write {}", out.display()))?;
    let bytes = std::fs::read(out)?;
    let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let file = out.file_name().unwrap_or_default().to_string_lossy();
    println!(
        "[backbone]\nfile = \"{file}\"\nsha256 = \"{sha}\"\nformat = \"safetensors\"\narch = \"{name}\"\nfeatures = {features}\ninput_size = {input_size}"
    );
    eprintln!("wrote a random {name} (seed {seed}) to {}", out.display());
    Ok(())
}

#[cfg(feature = "torch")]
fn decode_bench(
    dir: &std::path::Path,
    size: u32,
    threads: Option<usize>,
    limit: usize,
) -> anyhow::Result<()> {
    use seedsweep_worker::imagefolder::{self, Decoding, OnBadImage, Transform};
    let folder = imagefolder::scan(dir)?;
    let items = &folder.train[..folder.train.len().min(limit)];
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let how = Decoding {
        size,
        transform: Transform::ResizeCentreCrop,
        threads,
        chunk: 256,
        on_bad: OnBadImage::Skip,
    };
    let started = std::time::Instant::now();
    let mut decoded = 0usize;
    imagefolder::decode_chunks(items, how, &|_| 0, |chunk| {
        decoded += chunk.labels.len();
        Ok::<_, imagefolder::FolderError>(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "images": decoded,
            "threads": threads,
            "size": size,
            "seconds": seconds,
            "images_per_second": decoded as f64 / seconds,
        })
    );
    Ok(())
}

#[cfg(feature = "torch")]
fn make_image_folder(
    out: &std::path::Path,
    train: usize,
    test: usize,
    seed: u64,
    size: u32,
) -> anyhow::Result<()> {
    let (train_records, test_records) = data::synthetic_records(train, test, seed);
    for (split, records) in [("train", &train_records), ("val", &test_records)] {
        for (i, record) in records.chunks(data::RECORD_BYTES).enumerate() {
            let dir = out.join(split).join(format!("class{}", record[0]));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let side = data::SIDE as u32;
            let plane = data::SIDE * data::SIDE;
            let pixels = &record[1..];
            let img = image::RgbImage::from_fn(side, side, |x, y| {
                let at = (y * side + x) as usize;
                image::Rgb([pixels[at], pixels[plane + at], pixels[2 * plane + at]])
            });
            let img =
                image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle);
            let path = dir.join(format!("{i:06}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
            img.save(&path)
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
    }
    eprintln!(
        "wrote {train} training and {test} validation images ({size}x{size}) to {}",
        out.display()
    );
    Ok(())
}

#[cfg(feature = "torch")]
fn make_synthetic(
    out: &std::path::Path,
    train: usize,
    test: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let (train_records, test_records) = data::synthetic_records(train, test, seed);
    data::write_dataset(out, &train_records, &test_records)
        .with_context(|| format!("failed to write the dataset to {}", out.display()))?;
    eprintln!(
        "wrote {train} training and {test} test images to {}",
        out.join(data::BATCH_DIR).display()
    );
    Ok(())
}

#[cfg(feature = "torch")]
fn make_digits(source: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let (train_records, test_records) = seedsweep_worker::digits::records(source)?;
    data::write_dataset(out, &train_records, &test_records)
        .with_context(|| format!("failed to write the dataset to {}", out.display()))?;
    eprintln!(
        "wrote {} training and {} test images (UCI handwritten digits) to {}",
        train_records.len() / data::RECORD_BYTES,
        test_records.len() / data::RECORD_BYTES,
        out.join(data::BATCH_DIR).display()
    );
    Ok(())
}

/// `${XDG_...:-~/DEFAULT}/seedsweep/LEAF` (the XDG base directories), or `./HOMELESS` without a
/// home.
fn per_user(xdg: &str, default: &str, leaf: &str, homeless: &str) -> PathBuf {
    std::env::var_os(xdg)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)))
        .map(|c| c.join("seedsweep").join(leaf))
        .unwrap_or_else(|| PathBuf::from(homeless))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether CUDA device `n` is there: libtorch counts them. A worker without libtorch cannot
/// count them: it hands `--gpu` to its programs as CUDA_VISIBLE_DEVICES, as given.
#[cfg_attr(
    not(feature = "torch"),
    expect(unused_variables, reason = "nothing counts devices")
)]
fn check_gpu(n: usize) -> anyhow::Result<()> {
    #[cfg(feature = "torch")]
    {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            anyhow::bail!(
                "--gpu {n}: this host has {count} CUDA device(s) visible to libtorch (CUDA available: {}); use --gpu 0..{} or --cpu",
                tch::Cuda::is_available(),
                count.max(1) - 1
            );
        }
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let device = match args.device.gpu {
        Some(n) => {
            check_gpu(n)?;
            Device::Cuda(n)
        }
        None => Device::Cpu,
    };
    #[cfg(feature = "torch")]
    if let Some(t) = args.builtin.threads {
        tch::set_num_threads(t);
    }
    let worker_id = args
        .worker_id
        .unwrap_or_else(|| format!("{}:{}:{}", hostname(), std::process::id(), device.label()));
    let connection = Connection {
        token: read_token(args.token_file.as_deref(), "SEEDSWEEP_WORKER_TOKEN")?,
        url: args.coordinator,
        tls_ca: args.tls_ca,
        tls_cert: args.tls_client_cert,
        tls_key: args.tls_client_key,
    };
    // Checked before libtorch or the data are touched, so a typo fails fast.
    connection.endpoint()?;
    let allowed_commands = args
        .allow_command
        .iter()
        .map(|p| {
            seedsweep_worker::command::resolve(p, None).with_context(|| {
                format!(
                    "--allow-command {p}: not an executable file here (a name on PATH, or a path)"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let env_policy = seedsweep_worker::command::env::EnvPolicy::new(args.pass_env, args.allow_env)
        .map_err(anyhow::Error::msg)?;
    if !allowed_commands.is_empty() {
        let containment = seedsweep_worker::command::contain::init(args.containment)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(%containment, "programs run contained");
    }
    if !cfg!(feature = "torch") && allowed_commands.is_empty() {
        anyhow::bail!(
            "this worker was built without the built-in training tasks (cargo feature `torch`): it runs only the programs of task command sweeps; give --allow-command PROGRAM"
        );
    }
    let allowed_programs = (args.allow_command.iter().cloned())
        .chain(allowed_commands.iter().map(|p| p.display().to_string()))
        .collect();
    let settings = WorkerSettings {
        coordinator: connection,
        device,
        #[cfg(feature = "torch")]
        builtin: args.builtin.settings(),
        worker_id,
        exit_when_idle: args.exit_when_idle,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        idle_poll: Duration::from_secs(2),
        max_seeds: args.max_seeds,
        lease_patience: Duration::from_secs(60),
        slots: args.slots as usize,
        checkpoint_dir: args.checkpoint_dir,
        spool_dir: args
            .spool_dir
            .unwrap_or_else(|| per_user("XDG_STATE_HOME", ".local/state", "spool", "spool")),
        allowed_commands,
        allowed_programs,
        log_dir: args
            .log_dir
            .unwrap_or_else(|| per_user("XDG_STATE_HOME", ".local/state", "logs", "logs")),
        env_policy,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let ran = runtime.block_on(async {
        let shutdown = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_signals(shutdown.clone()));
        let metrics = Arc::new(WorkerMetrics::default());
        if let Some(at) = args.metrics_listen {
            let m = metrics.clone();
            seedsweep_ops::serve_metrics(at, move || {
                let page = m.render();
                async move { Ok(page) }
            })
            .await?;
        }
        match Worker::connect(settings, shutdown, metrics).await? {
            Some(worker) => worker.run().await,
            None => {
                tracing::info!("stopped before the coordinator answered");
                Ok(())
            }
        }
    });
    // Work abandoned at shutdown (a stalled download) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    seedsweep_worker::command::contain::finish();
    ran
}

/// First SIGINT/SIGTERM: ask the worker to stop and hand its seed back. Second: exit at once.
async fn watch_signals(shutdown: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    for n in 0.. {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        if n > 0 {
            eprintln!("second signal: exiting now");
            seedsweep_worker::command::kill_all();
            std::process::exit(130);
        }
        tracing::info!("signal received: stopping after handing the current seed back");
        shutdown.store(true, Ordering::Relaxed);
    }
}
