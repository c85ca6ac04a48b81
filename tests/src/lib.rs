//! Helpers for the end-to-end tests: the built binaries, a throwaway PostgreSQL cluster, and a
//! coordinator process on a free port. Every resource is removed when its handle drops.

use anyhow::{Context, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary of this workspace, built by `cargo build --bins` into the same target folder as the
/// running test (scripts/test.sh builds them first).
/// The binary `name` under test: this build's, but for a `worker` named by
/// `SEEDSWEEP_TEST_WORKER` (the build without libtorch: scripts/test-programs-only.sh).
pub fn bin(name: &str) -> PathBuf {
    match std::env::var_os("SEEDSWEEP_TEST_WORKER").filter(|_| name == "worker") {
        Some(worker) => PathBuf::from(worker),
        None => built(name),
    }
}

/// This build's binary `name` (the tools that make test data: `worker make-dataset`).
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target folder")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --release --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a command to completion, with its output captured.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

/// The repository's root (where scripts/ is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

/// A `python3` command that can import the torch the worker links (the per-user libtorch cache,
/// which scripts/libtorch.sh installs and prints; scripts/test.sh exports it as LIBTORCH).
pub fn torch_python() -> Command {
    python_with(&[])
}

/// Python with the cached torch and torchvision (scripts/torchvision.sh installs it once).
pub fn torchvision_python() -> Command {
    let out = run(Command::new("bash").arg(repo_root().join("scripts/torchvision.sh")));
    assert!(
        out.status.success(),
        "scripts/torchvision.sh failed: {}",
        stderr(&out)
    );
    python_with(&[PathBuf::from(stdout(&out).trim())])
}

fn python_with(extra: &[PathBuf]) -> Command {
    let torch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let out = run(Command::new("bash").arg(repo_root().join("scripts/libtorch.sh")));
            assert!(out.status.success(), "scripts/libtorch.sh failed");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        });
    let mut path = vec![torch.parent().expect("torch/ has a parent").to_path_buf()];
    path.extend_from_slice(extra);
    let mut c =
        Command::new(std::env::var("SEEDSWEEP_PYTHON").unwrap_or_else(|_| "python3".into()));
    c.arg("-W").arg("ignore").env(
        "PYTHONPATH",
        std::env::join_paths(path).expect("paths without ':'"),
    );
    c
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A PostgreSQL server for one test: `DATABASE_URL` when set, else a cluster of its own made with
/// initdb in a temporary folder (as the `postgres` user when running as root), stopped and deleted
/// on drop. Each call to [`PgServer::fresh_database`] creates a new empty database.
pub struct PgServer {
    admin_url: String,
    cluster: Option<Cluster>,
}

/// A throwaway cluster: the server binaries, its folder, and the server's options.
struct Cluster {
    bindir: PathBuf,
    dir: tempfile::TempDir,
    options: String,
}

fn pg_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().context("PostgreSQL server binaries (initdb, pg_ctl) not found: install PostgreSQL or set DATABASE_URL")
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}

/// A command run as the `postgres` user when we are root (initdb refuses to run as root).
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    pub fn start() -> anyhow::Result<PgServer> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Ok(PgServer {
                admin_url: url,
                cluster: None,
            });
        }
        let bindir = pg_bindir()?;
        let dir = tempfile::Builder::new().prefix("seedsweep-pg-").tempdir()?;
        if is_root() {
            let uid = run(Command::new("id").args(["-u", "postgres"]));
            let gid = run(Command::new("id").args(["-g", "postgres"]));
            if !uid.status.success() {
                bail!("running as root, but there is no `postgres` user to run initdb as");
            }
            let parse = |o: &Output| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            };
            std::os::unix::fs::chown(dir.path(), parse(&uid), parse(&gid))?;
        }
        let data = dir.path().join("data");
        let init = run(pg_command(&bindir.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data));
        if !init.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        }
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            dir.path().display()
        );
        let start = run(pg_command(&bindir.join("pg_ctl"))
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.path().join("log"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "start"])
            .stdin(Stdio::null()));
        if !start.status.success() {
            let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}{log}",
                String::from_utf8_lossy(&start.stderr)
            );
        }
        Ok(PgServer {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            cluster: Some(Cluster {
                bindir,
                dir,
                options: opts,
            }),
        })
    }

    fn psql_path(&self) -> PathBuf {
        match &self.cluster {
            Some(c) => c.bindir.join("psql"),
            None => PathBuf::from("psql"),
        }
    }

    /// Runs one query with psql against `url`; returns the rows as `a|b|c` lines, as sqlite3 does.
    pub fn psql(&self, url: &str, query: &str) -> String {
        let out = run(Command::new(self.psql_path())
            .args([
                "-X",
                "-A",
                "-t",
                "-F",
                "|",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                query,
            ])
            .arg(url));
        assert!(
            out.status.success(),
            "psql failed on\n{query}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Restarts the server (fast shutdown, then start), as an operator or a failover would. Returns
    /// false when the server is not ours to restart (DATABASE_URL).
    pub fn restart(&self) -> anyhow::Result<bool> {
        self.ctl("restart")
    }

    /// Stops the server (fast shutdown: sessions are cut), for [`PgServer::resume`] to start
    /// again; false when the server is not ours (DATABASE_URL).
    pub fn halt(&self) -> anyhow::Result<bool> {
        self.ctl("stop")
    }

    /// Starts a server [`PgServer::halt`] stopped.
    pub fn resume(&self) -> anyhow::Result<bool> {
        self.ctl("start")
    }

    fn ctl(&self, action: &str) -> anyhow::Result<bool> {
        let Some(c) = &self.cluster else {
            return Ok(false);
        };
        let out = run(pg_command(&c.bindir.join("pg_ctl"))
            .args(["-w", "-t", "60", "-m", "fast", "-l"])
            .arg(c.dir.path().join("log"))
            .arg("-D")
            .arg(c.dir.path().join("data"))
            .args(["-o", &c.options, action])
            .stdin(Stdio::null()));
        if !out.status.success() {
            bail!(
                "pg_ctl {action} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(true)
    }

    /// Creates an empty database and returns its URL.
    pub fn fresh_database(&self) -> anyhow::Result<String> {
        let name = format!("seedsweep_test_{}", uuid::Uuid::new_v4().simple());
        let out = run(Command::new(self.psql_path()).arg(&self.admin_url).args([
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            &format!("CREATE DATABASE {name}"),
        ]));
        if !out.status.success() {
            bail!(
                "CREATE DATABASE failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (base, _) = self
            .admin_url
            .rsplit_once('/')
            .context("DATABASE_URL has no database name")?;
        Ok(format!("{base}/{name}"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(c) = &self.cluster {
            let _ = run(pg_command(&c.bindir.join("pg_ctl"))
                .args(["-m", "immediate", "-D"])
                .arg(c.dir.path().join("data"))
                .arg("stop"));
        }
    }
}

/// A `coordinator serve` process on a free port, killed on drop.
pub struct CoordinatorProcess {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Starts a coordinator on a free port.
    pub fn start(database_url: &str, extra: &[&str]) -> anyhow::Result<CoordinatorProcess> {
        Self::start_on(database_url, "127.0.0.1:0", extra)
    }

    /// Starts a coordinator listening on `listen` (to restart one where its workers expect it).
    pub fn start_on(
        database_url: &str,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<CoordinatorProcess> {
        let dir = tempfile::tempdir()?;
        let addr_file = dir.path().join("addr");
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        let mut child = Command::new(bin("coordinator"))
            .args([
                "serve",
                "--listen",
                listen,
                "--database-url",
                database_url,
                "--addr-file",
            ])
            .arg(&addr_file)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !addr_file.exists() {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default();
                bail!("coordinator exited with {status} before listening:\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("coordinator did not start listening within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = std::fs::read_to_string(&addr_file)?;
        Ok(CoordinatorProcess {
            child,
            url: format!("http://{}", addr.trim()),
            _dir: dir,
        })
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the coordinator process.
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Writes `text` to a new sweep file in `dir`, submits it, and returns the sweep id.
    pub fn submit(&self, dir: &Path, text: &str) -> String {
        let file = dir.join(format!("sweep-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, text).expect("write the sweep file");
        let out = self.sweep(&["submit", file.to_str().expect("a UTF-8 path")]);
        assert!(out.status.success(), "submit failed: {}", stderr(&out));
        stdout(&out).trim().to_string()
    }

    /// Starts `workers` and waits for each to exit, asserting that each succeeded (with this
    /// coordinator's log if not).
    pub fn run_to_end(&self, workers: impl IntoIterator<Item = Command>) {
        let running: Vec<Child> = workers
            .into_iter()
            .map(|mut w| w.spawn().expect("start a worker"))
            .collect();
        for w in running {
            let out = w.wait_with_output().expect("wait for a worker");
            assert!(
                out.status.success(),
                "worker failed: {}\ncoordinator log:\n{}",
                stderr(&out),
                self.log()
            );
        }
    }

    /// Runs `coordinator sweep ARGS --coordinator URL`.
    pub fn sweep(&self, args: &[&str]) -> Output {
        run(Command::new(bin("coordinator"))
            .arg("sweep")
            .args(args)
            .args(["--coordinator", &self.url]))
    }
}

impl CoordinatorProcess {
    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a generated dataset named `synthetic` under `data_dir`.
pub fn make_synthetic(data_dir: &Path, train: u32, test: u32) {
    let out = run(Command::new(built("worker"))
        .args([
            "make-dataset",
            "synthetic",
            "--train",
            &train.to_string(),
            "--test",
            &test.to_string(),
            "--out",
        ])
        .arg(data_dir.join("synthetic")));
    assert!(
        out.status.success(),
        "make-dataset failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the real dataset `digits` (UCI handwritten digits from scikit-learn) under `data_dir`,
/// from the file scripts/digits.sh fetches once into the per-user cache.
pub fn make_digits(data_dir: &Path) {
    let fetched = run(Command::new("bash").arg(repo_root().join("scripts/digits.sh")));
    assert!(
        fetched.status.success(),
        "scripts/digits.sh failed: {}",
        stderr(&fetched)
    );
    let out = run(Command::new(built("worker"))
        .args([
            "make-dataset",
            "digits",
            "--source",
            stdout(&fetched).trim(),
            "--out",
        ])
        .arg(data_dir.join("digits")));
    assert!(
        out.status.success(),
        "make-dataset digits failed: {}",
        stderr(&out)
    );
}

/// A CPU worker with one libtorch thread that exits when no seed is left (the worker without
/// libtorch has neither threads nor data to set: `SEEDSWEEP_TEST_WORKER`).
pub fn worker(coordinator: &str, data_dir: &Path) -> Command {
    let mut c = Command::new(bin("worker"));
    c.args([
        "--cpu",
        "--exit-when-idle",
        "--connect-timeout",
        "10",
        "--coordinator",
        coordinator,
    ])
    // Beside the test's data, so tests never deliver each other's results.
    .arg("--spool-dir")
    .arg(spool_dir(data_dir));
    if std::env::var_os("SEEDSWEEP_TEST_WORKER").is_none() {
        c.args(["--threads", "1"]).arg("--data-dir").arg(data_dir);
    }
    c
}

/// The spool folder of the workers [`worker`] starts on `data_dir`.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.with_file_name("spool")
}

/// Runs one query with the sqlite3 command-line client; returns the rows as `a|b|c` lines.
pub fn sqlite_query(db: &Path, query: &str) -> String {
    let out = run(Command::new("sqlite3").arg(db).arg(query));
    assert!(
        out.status.success(),
        "sqlite3 failed on\n{query}\n{}",
        stderr(&out)
    );
    stdout(&out)
}

/// Polls `cond` every 100 ms for up to `limit`; panics with `what` if it never holds.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a signal (`TERM`, `KILL`, ...) to a process.
pub fn signal(child: &Child, name: &str) {
    let out = run(Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string()));
    assert!(
        out.status.success(),
        "kill -{name} failed: {}",
        stderr(&out)
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A coordinator served from the test process: built by `Coordinator::build_with_clock` exactly as
/// `coordinator serve` builds it, on port 0 of loopback, with its own SQLite database and a store
/// clock the test moves (leases expire and backoffs pass without sleeping).
pub struct InProcessCoordinator {
    pub url: String,
    pub clock: seedsweep_coordinator::store::Clock,
    pub database: PathBuf,
    lease_ttl: Duration,
    tokens: Option<(Vec<String>, Vec<String>)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// Starts an [`InProcessCoordinator`] with leases of `lease_ttl` and, when given, these worker and
/// admin tokens.
pub async fn spawn_coordinator(
    lease_ttl: Duration,
    tokens: Option<(&[String], &[String])>,
) -> anyhow::Result<InProcessCoordinator> {
    let dir = tempfile::tempdir()?;
    let database = dir.path().join("seedsweep.db");
    let tokens = tokens.map(|(w, a)| (w.to_vec(), a.to_vec()));
    let clock = seedsweep_coordinator::store::Clock::database();
    serve_in_process(lease_ttl, tokens, database, clock, dir).await
}

async fn serve_in_process(
    lease_ttl: Duration,
    tokens: Option<(Vec<String>, Vec<String>)>,
    database: PathBuf,
    clock: seedsweep_coordinator::store::Clock,
    dir: tempfile::TempDir,
) -> anyhow::Result<InProcessCoordinator> {
    use seedsweep_coordinator::auth::Tokens;
    use seedsweep_coordinator::server::{Coordinator, ServerSettings};
    let settings = ServerSettings {
        listen: "127.0.0.1:0".parse()?,
        database_url: format!("sqlite://{}", database.display()),
        lease_ttl,
        tokens: tokens
            .as_ref()
            .map(|(worker, admin)| Tokens::new(worker, admin))
            .transpose()?,
        tls: None,
        insecure: false,
        metrics_listen: None,
        http_listen: None,
    };
    let coordinator = Coordinator::build_with_clock(settings, clock.clone()).await?;
    let url = format!("http://{}", coordinator.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(coordinator.run_until(async {
        let _ = stopped.await;
    }));
    Ok(InProcessCoordinator {
        url,
        clock,
        database,
        lease_ttl,
        tokens,
        stop: Some(stop),
        served,
        _dir: Some(dir),
    })
}

impl InProcessCoordinator {
    /// A client of this coordinator that sends `token`, if any.
    pub async fn client(&self, token: Option<&str>) -> seedsweep_proto::client::Client {
        let connection = seedsweep_proto::client::Connection {
            url: self.url.clone(),
            token: token.map(str::to_string),
            ..Default::default()
        };
        connection
            .connect()
            .await
            .expect("connect to the in-process coordinator")
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.served).await;
        served
            .expect("the server task panicked")
            .expect("the server failed");
    }

    /// Stops this coordinator and starts a new one on the same database and clock, as an
    /// upgrade or a crash and restart would (on a new port: connect again to `url`).
    pub async fn restart(mut self) -> anyhow::Result<InProcessCoordinator> {
        self.halt().await;
        let dir = self
            ._dir
            .take()
            .expect("a running coordinator owns its folder");
        let (tokens, database) = (self.tokens.take(), self.database.clone());
        serve_in_process(self.lease_ttl, tokens, database, self.clock.clone(), dir).await
    }
}
