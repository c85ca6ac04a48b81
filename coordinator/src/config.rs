//! `coordinator serve`'s settings and where each comes from. Precedence, highest first:
//! command-line flags, `SEEDSWEEP_…` environment variables, the configuration file (`--config`,
//! TOML, keys named as the flags), built-in defaults. Tokens are never flags: they come from
//! files (`--worker-token-file`, `--admin-token-file`, `--viewer-token-file`) or the variables
//! `SEEDSWEEP_WORKER_TOKEN`, `SEEDSWEEP_ADMIN_TOKEN` and `SEEDSWEEP_VIEWER_TOKEN`. `coordinator config` prints the result with secrets masked.

use crate::auth::Tokens;
use crate::server::{ServerSettings, TlsSettings};
use crate::store::redact_url;
use anyhow::{Context, bail};
use clap::parser::ValueSource;
use seedsweep_proto::client::read_tokens;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML) whose keys are these flags' names, e.g. `listen = "0.0.0.0:50051"`
    /// and `lease-ttl = 120`; flags and environment variables override it.
    #[arg(long, env = "SEEDSWEEP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on. Port 0 picks a free port (see --addr-file). Without tokens only a
    /// loopback address is allowed (see --insecure).
    #[arg(long, env = "SEEDSWEEP_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Database: sqlite://FILE (created if missing) or postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(
        long,
        env = "SEEDSWEEP_DATABASE_URL",
        default_value = "sqlite://seedsweep.db"
    )]
    pub database_url: String,
    /// Seconds a lease lives without a heartbeat before its seed goes back to the queue.
    #[arg(long, env = "SEEDSWEEP_LEASE_TTL", default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=86400))]
    pub lease_ttl: u64,
    /// Once listening, write the bound address (HOST:PORT) to this file.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
    /// File of worker tokens, one per line (several: rotation). Or set SEEDSWEEP_WORKER_TOKEN.
    #[arg(long, env = "SEEDSWEEP_WORKER_TOKEN_FILE", value_name = "FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// File of admin tokens, one per line. Or set SEEDSWEEP_ADMIN_TOKEN.
    #[arg(long, env = "SEEDSWEEP_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File of viewer tokens, one per line: read-only (the dashboard, and reading sweeps over
    /// gRPC); needs worker and admin tokens too. Or set SEEDSWEEP_VIEWER_TOKEN.
    #[arg(long, env = "SEEDSWEEP_VIEWER_TOKEN_FILE", value_name = "FILE")]
    pub viewer_token_file: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        env = "SEEDSWEEP_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(
        long,
        env = "SEEDSWEEP_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by this CA (PEM); needs --tls-cert.
    #[arg(
        long,
        env = "SEEDSWEEP_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback --listen address without tokens (a trusted network only).
    #[arg(long, env = "SEEDSWEEP_INSECURE")]
    pub insecure: bool,
    /// Serve Prometheus metrics over HTTP at this address (path /metrics), e.g. 0.0.0.0:9090.
    #[arg(long, env = "SEEDSWEEP_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the web dashboard at this address, e.g. 127.0.0.1:8080 (off by default). Without
    /// tokens only loopback; with tokens, browsers sign in with an admin or viewer token. HTTPS
    /// with the --tls-cert certificate when one is given (no client certificate asked for).
    #[arg(long, env = "SEEDSWEEP_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
}

/// The settings the file may set (the flags' ids; `config` and `addr-file` are left out).
const FILE_KEYS: [&str; 12] = [
    "listen",
    "database_url",
    "lease_ttl",
    "worker_token_file",
    "admin_token_file",
    "viewer_token_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "insecure",
    "metrics_listen",
    "http_listen",
];

/// Extra arguments standing for the configuration file's settings, for the settings neither a
/// flag nor an environment variable gave (`matches`: the serve or config subcommand's). Returns
/// them with the ids they set.
pub fn file_arguments(
    matches: &clap::ArgMatches,
) -> anyhow::Result<(Vec<OsString>, BTreeSet<String>)> {
    let Some(path) = matches.get_one::<PathBuf>("config") else {
        return Ok((Vec::new(), BTreeSet::new()));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the configuration file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut args = Vec::new();
    let mut from_file = BTreeSet::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        if !FILE_KEYS.contains(&id.as_str()) {
            bail!(
                "unknown key `{key}` in {}: the keys are {}",
                path.display(),
                FILE_KEYS.map(|k| k.replace('_', "-")).join(", ")
            );
        }
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{}", id.replace('_', "-"));
        let text = match value {
            toml::Value::Boolean(true) => {
                args.push(flag.into());
                from_file.insert(id);
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            _ => bail!(
                "`{key}` in {}: write a string, a whole number or true/false",
                path.display()
            ),
        };
        args.push(format!("{flag}={text}").into());
        from_file.insert(id);
    }
    Ok((args, from_file))
}

impl ServeArgs {
    /// The tokens, or `None` when neither role has any.
    pub fn tokens(&self) -> anyhow::Result<Option<Tokens>> {
        let worker = read_tokens(self.worker_token_file.as_deref(), "SEEDSWEEP_WORKER_TOKEN")?;
        let admin = read_tokens(self.admin_token_file.as_deref(), "SEEDSWEEP_ADMIN_TOKEN")?;
        let viewer = read_tokens(self.viewer_token_file.as_deref(), "SEEDSWEEP_VIEWER_TOKEN")?;
        if worker.is_empty() && admin.is_empty() {
            if !viewer.is_empty() {
                bail!(
                    "viewer tokens need worker and admin tokens too (without any, the coordinator serves loopback only and nobody signs in)"
                );
            }
            return Ok(None);
        }
        Tokens::new(&worker, &admin)?
            .with_viewers(&viewer)
            .map(Some)
    }

    pub fn settings(&self) -> anyhow::Result<ServerSettings> {
        Ok(ServerSettings {
            listen: self.listen,
            database_url: self.database_url.clone(),
            lease_ttl: Duration::from_secs(self.lease_ttl),
            tokens: self.tokens()?,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsSettings {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
            insecure: self.insecure,
            metrics_listen: self.metrics_listen,
            http_listen: self.http_listen,
        })
    }

    /// The effective settings as TOML (usable as a configuration file), each with where it came
    /// from; the database password and the tokens masked.
    pub fn describe(
        &self,
        matches: &clap::ArgMatches,
        from_file: &BTreeSet<String>,
    ) -> anyhow::Result<String> {
        let source = |id: &str| {
            if from_file.contains(id) {
                "file"
            } else {
                match matches.value_source(id) {
                    Some(ValueSource::CommandLine) => "flag",
                    Some(ValueSource::EnvVariable) => "environment",
                    _ => "default",
                }
            }
        };
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| quote(&p.display().to_string()));
        let rows: Vec<(&str, Option<String>)> = vec![
            ("listen", Some(quote(&self.listen.to_string()))),
            ("database_url", Some(quote(&redact_url(&self.database_url)))),
            ("lease_ttl", Some(self.lease_ttl.to_string())),
            ("worker_token_file", path(&self.worker_token_file)),
            ("admin_token_file", path(&self.admin_token_file)),
            ("viewer_token_file", path(&self.viewer_token_file)),
            ("tls_cert", path(&self.tls_cert)),
            ("tls_key", path(&self.tls_key)),
            ("tls_client_ca", path(&self.tls_client_ca)),
            ("insecure", Some(self.insecure.to_string())),
            (
                "metrics_listen",
                self.metrics_listen.map(|a| quote(&a.to_string())),
            ),
            (
                "http_listen",
                self.http_listen.map(|a| quote(&a.to_string())),
            ),
        ];
        let mut out = String::new();
        if let Some(p) = &self.config {
            out += &format!("# configuration file: {}\n", p.display());
        }
        for (id, value) in rows {
            let key = id.replace('_', "-");
            match value {
                Some(v) => out += &format!("{key} = {v}  # {}\n", source(id)),
                None => out += &format!("# {key} is not set\n"),
            }
        }
        let auth = match self.tokens()? {
            Some(t) => format!("tokens {t:?}"),
            None => "none (loopback only unless --insecure)".to_string(),
        };
        out += &format!("# authentication: {auth}\n");
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// Parses as `coordinator serve` does: once, then again with the file's settings added.
    fn parse(args: &[&str]) -> anyhow::Result<(ServeArgs, String)> {
        let mut argv: Vec<OsString> = std::iter::once("serve")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let first = Cli::command().try_get_matches_from(&argv)?;
        let (extra, from_file) = file_arguments(&first)?;
        argv.extend(extra);
        let matches = Cli::command().try_get_matches_from(&argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let text = cli.serve.describe(&matches, &from_file)?;
        Ok((cli.serve, text))
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\nlease-ttl = 90\ndatabase_url = \"postgres://u:secret@db/s\"\ninsecure = true\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let (s, text) = parse(&["--config", f, "--lease-ttl", "30"]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(s.lease_ttl, 30);
        assert!(s.insecure);
        assert!(
            text.contains("listen = \"127.0.0.1:7000\"  # file"),
            "{text}"
        );
        assert!(text.contains("lease-ttl = 30  # flag"), "{text}");
        assert!(text.contains("metrics-listen is not set"), "{text}");
        assert!(
            !text.contains("secret") && text.contains("u:***@db"),
            "{text}"
        );

        std::fs::write(&file, "listne = \"x\"\n").unwrap();
        let err = parse(&["--config", f]).unwrap_err().to_string();
        assert!(
            err.contains("unknown key `listne`") && err.contains("listen"),
            "{err}"
        );
        std::fs::write(&file, "lease-ttl = 1\n").unwrap();
        assert!(
            parse(&["--config", f]).is_err(),
            "the file's values are validated too"
        );
    }

    #[test]
    fn a_token_file_gives_every_line_and_tokens_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let (w, a) = (dir.path().join("w"), dir.path().join("a"));
        std::fs::write(&w, "worker-token-0123456789\n\nworker-token-next-0123\n").unwrap();
        std::fs::write(&a, "admin-token-0123456789\n").unwrap();
        let (s, text) = parse(&[
            "--worker-token-file",
            w.to_str().unwrap(),
            "--admin-token-file",
            a.to_str().unwrap(),
        ])
        .unwrap();
        assert!(s.tokens().unwrap().is_some());
        assert!(
            text.contains("worker:") && text.contains("admin:"),
            "{text}"
        );
        assert!(!text.contains("0123456789\""), "{text}");
        assert!(!text.contains("token-0123456789"), "{text}");
    }
}
