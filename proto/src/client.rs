//! How clients (workers and the admin commands) reach a coordinator: the URL, TLS for `https://`
//! URLs, and the bearer token sent with every call.
//!
//! Tokens are read from a file or an environment variable, never from a command-line argument
//! (other users of a shared host can read those with `ps`).

use crate::v1::coordinator_client::CoordinatorClient;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A coordinator client that sends the bearer token, if any, with every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// Where a coordinator is and how to prove who we are to it.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `http://HOST:PORT`, or `https://HOST:PORT` for TLS.
    pub url: String,
    /// PEM file of the certificate authority that signed the coordinator's certificate (https
    /// only; without it the system's trusted roots are used).
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate and key this client presents, for coordinators that check clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The bearer token (from [`read_token`]).
    pub token: Option<String>,
}

/// Reads tokens: every non-empty line of `file` when given (several lines: a rotation), else
/// the environment variable `env` when set and non-empty, else none.
pub fn read_tokens(file: Option<&Path>, env: &str) -> anyhow::Result<Vec<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the token file {}", path.display()))?;
        let list: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if list.is_empty() {
            bail!("the token file {} is empty", path.display());
        }
        return Ok(list);
    }
    Ok(std::env::var(env)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .into_iter()
        .collect())
}

/// Reads the token a client sends: the first of [`read_tokens`], checked.
pub fn read_token(file: Option<&Path>, env: &str) -> anyhow::Result<Option<String>> {
    let Some(token) = read_tokens(file, env)?.into_iter().next() else {
        return Ok(None);
    };
    check_token(&token).with_context(|| match file {
        Some(p) => format!("bad token in {}", p.display()),
        None => format!("bad token in ${env}"),
    })?;
    Ok(Some(token))
}

/// The shape every token must have: 16 to 512 visible ASCII characters without spaces (so it
/// fits an HTTP header and is long enough not to be guessed).
pub fn check_token(token: &str) -> anyhow::Result<()> {
    if token.len() < 16 {
        bail!("a token must have at least 16 characters (make one with `openssl rand -hex 32`)");
    }
    if token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("a token must be at most 512 visible ASCII characters, without spaces");
    }
    Ok(())
}

impl Connection {
    /// The endpoint, with TLS configured for `https://` URLs.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let url = &self.url;
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| {
                format!("`{url}` is not a coordinator URL: write it as http://HOST:PORT or https://HOST:PORT")
            })?
            .connect_timeout(Duration::from_secs(5));
        let tls = url.starts_with("https://");
        if !tls && (self.tls_ca.is_some() || self.tls_cert.is_some()) {
            bail!("TLS files were given but the coordinator URL `{url}` is not https://");
        }
        if !tls {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
            None => config.with_native_roots(),
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => bail!("a client certificate needs both --tls-client-cert and --tls-client-key"),
        }
        endpoint
            .tls_config(config)
            .with_context(|| format!("bad TLS settings for {url}"))
    }

    /// A client over `channel` that sends this connection's token.
    pub fn client(&self, channel: Channel) -> anyhow::Result<Client> {
        let bearer = match &self.token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {t}"))
                    .context("the token cannot be sent in a header")?,
            ),
            None => None,
        };
        Ok(CoordinatorClient::with_interceptor(channel, Bearer(bearer)))
    }

    /// Connects once (5 s timeout) and returns the client.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let channel = self.endpoint()?.connect().await.with_context(|| {
            format!(
                "cannot reach the coordinator at {}: is `coordinator serve` running there? (set --coordinator or SEEDSWEEP_COORDINATOR)",
                self.url
            )
        })?;
        self.client(channel)
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("failed to read the {what} {}", path.display()))
}

/// Adds `authorization: Bearer TOKEN` to each call.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_be_long_and_header_safe() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789 abcdef").is_err());
        assert!(check_token("0123456789abcdeé").is_err());
    }

    #[test]
    fn a_token_file_gives_its_first_line_and_wins_over_the_environment() {
        let dir = std::env::temp_dir().join(format!("seedsweep-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "\n  0123456789abcdef0123  \nsecond-line-ignored\n").unwrap();
        let got = read_token(Some(&file), "SEEDSWEEP_TEST_TOKEN_UNSET").unwrap();
        assert_eq!(got.as_deref(), Some("0123456789abcdef0123"));
        std::fs::write(&file, "\n\n").unwrap();
        assert!(read_token(Some(&file), "X").is_err());
        assert!(
            read_token(None, "SEEDSWEEP_TEST_TOKEN_UNSET")
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tls_files_need_an_https_url() {
        let c = Connection {
            url: "http://127.0.0.1:1".into(),
            tls_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(
            c.endpoint()
                .unwrap_err()
                .to_string()
                .contains("not https://")
        );
    }
}
