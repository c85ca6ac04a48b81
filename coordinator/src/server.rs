//! The start-up seam shared by `coordinator serve` and the tests: check the security settings,
//! connect and migrate the store, bind the listener (port 0 allowed), report the bound address,
//! serve until told to stop. Beside the Coordinator service: the standard gRPC health service
//! (for Kubernetes probes), server reflection (for grpcurl), and the Prometheus endpoint.

use crate::auth::{AuthLayer, Tokens};
use crate::metrics::Metrics;
use crate::service::CoordinatorService;
use crate::store::{self, Clock, Store, redact_url};
use anyhow::{Context, bail};
use seedsweep_proto::v1::coordinator_server::CoordinatorServer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub database_url: String,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
    /// Accepted tokens; `None` serves without authentication (loopback only unless `insecure`).
    pub tokens: Option<Tokens>,
    pub tls: Option<TlsSettings>,
    /// Allow a non-loopback address without tokens.
    pub insecure: bool,
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the web dashboard (`None`: not at all).
    pub http_listen: Option<SocketAddr>,
}

/// The server's certificate and key (PEM), and optionally the CA whose client certificates it
/// requires.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsSettings {
    fn config(&self) -> anyhow::Result<ServerTlsConfig> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p)
                .with_context(|| format!("failed to read the TLS {what} {}", p.display()))
        };
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
            read(&self.cert, "certificate")?,
            read(&self.key, "key")?,
        ));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(config)
    }

    /// The dashboard's TLS: the same certificate and key (no client certificates: browsers sign
    /// in with tokens).
    fn dashboard_config(&self) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
        crate::dashboard::tls::server_config(&self.cert, &self.key)
    }
}

/// Refuses to expose an unauthenticated coordinator beyond this host unless told to.
pub fn check_exposure(settings: &ServerSettings) -> anyhow::Result<()> {
    if settings.tokens.is_some() || settings.listen.ip().is_loopback() {
        return Ok(());
    }
    if !settings.insecure {
        bail!(
            "refusing to listen on {} without authentication: anyone who can reach it could submit, cancel or read sweeps. Give worker and admin tokens (--worker-token-file/--admin-token-file or SEEDSWEEP_WORKER_TOKEN/SEEDSWEEP_ADMIN_TOKEN), listen on 127.0.0.1, or pass --insecure on a network you trust",
            settings.listen
        );
    }
    tracing::warn!(listen = %settings.listen, "--insecure: serving WITHOUT authentication on a non-loopback address; anyone who can reach it can drive this coordinator");
    Ok(())
}

/// A coordinator that has connected to its database and bound its port(s), ready to serve.
pub struct Coordinator {
    listener: TcpListener,
    service: Arc<CoordinatorService>,
    store: Arc<dyn Store>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    dashboard_addr: Option<SocketAddr>,
    tls: Option<ServerTlsConfig>,
    tokens: Option<Arc<Tokens>>,
}

impl Coordinator {
    pub async fn build(settings: ServerSettings) -> anyhow::Result<Coordinator> {
        Coordinator::build_with_clock(settings, Clock::database()).await
    }

    /// [`Coordinator::build`] with a store clock the caller controls (tests move it to make
    /// leases expire and backoffs pass without sleeping).
    pub async fn build_with_clock(
        settings: ServerSettings,
        clock: Clock,
    ) -> anyhow::Result<Coordinator> {
        check_exposure(&settings)?;
        if let Some(at) = settings.http_listen {
            crate::dashboard::check_exposure(at, settings.tokens.is_some(), settings.insecure)?;
        }
        let tls = settings.tls.as_ref().map(TlsSettings::config).transpose()?;
        let url = redact_url(&settings.database_url);
        let store = store::connect_with_clock(&settings.database_url, clock)
            .await
            .with_context(|| format!("failed to open the database {url}"))?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("failed to listen on {}", settings.listen))?;
        let addr = listener
            .local_addr()
            .context("failed to read the bound address")?;
        let metrics = Arc::new(Metrics::new(settings.lease_ttl));
        let metrics_addr = match settings.metrics_listen {
            Some(at) => {
                let (m, s) = (metrics.clone(), store.clone());
                let render = move || {
                    let (m, s) = (m.clone(), s.clone());
                    async move { m.render(s.as_ref()).await }
                };
                Some(seedsweep_ops::serve_metrics(at, render).await?)
            }
            None => None,
        };
        tracing::info!(%addr, database = %url, tls = tls.is_some(),
            client_certificates = settings.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            auth = if settings.tokens.is_some() { "tokens" } else { "none" }, "coordinator listening");
        let service = Arc::new(CoordinatorService::new(
            store.clone(),
            settings.lease_ttl,
            metrics,
        ));
        let dashboard_addr = match settings.http_listen {
            Some(at) => {
                let tokens = settings.tokens.clone();
                let tls = settings.tls.as_ref().map(TlsSettings::dashboard_config);
                let tls = tls.transpose()?;
                Some(crate::dashboard::serve(at, service.clone(), tokens, tls).await?)
            }
            None => None,
        };
        Ok(Coordinator {
            listener,
            service,
            store,
            addr,
            metrics_addr,
            dashboard_addr,
            tls,
            tokens: settings.tokens.map(Arc::new),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn dashboard_addr(&self) -> Option<SocketAddr> {
        self.dashboard_addr
    }

    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Both reflection versions: grpcurl and older clients ask for v1alpha.
        let described = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(seedsweep_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = described()
            .build_v1()
            .context("failed to build the reflection service")?;
        let reflection_alpha = described()
            .build_v1alpha()
            .context("failed to build the reflection service")?;
        let watch = tokio::spawn(report_health(health.clone(), self.store.clone()));
        let fold = tokio::spawn(fold_tallies(self.store.clone()));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).context("bad TLS settings")?;
        }
        let served = builder
            .layer(AuthLayer(self.tokens))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(CoordinatorServer::from_arc(self.service))
            // Without TCP_NODELAY, a reply written in several small pieces waits out the
            // client's delayed ACK (40 ms on Linux) under Nagle's algorithm.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                async move {
                    shutdown.await;
                    // Probes see the replica leaving before its connections close.
                    health
                        .set_service_status("", ServingStatus::NotServing)
                        .await;
                    health
                        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
                        .await;
                },
            )
            .await
            .context("gRPC server failed");
        watch.abort();
        fold.abort();
        served
    }
}

/// Keeps the health service's answer true: SERVING while the database answers, NOT_SERVING
/// while it does not (checked every 5 s), so a replica cut off from its database leaves the
/// load balancer's rotation.
async fn report_health(health: tonic_health::server::HealthReporter, store: Arc<dyn Store>) {
    let mut last = None;
    loop {
        let status = match store.ping().await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %e, "database unreachable: health is NOT_SERVING");
                }
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health
                .set_service_status("seedsweep.v1.Coordinator", status)
                .await;
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Folds recorded results into their sweeps' tallies every 2 s (`Store::fold_tallies`), so that
/// a completion only queues its result and a reader finds little left to fold.
async fn fold_tallies(store: Arc<dyn Store>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sweeps = match store.unfolded_sweeps().await {
            Ok(sweeps) => sweeps,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for results to fold");
                continue;
            }
        };
        for id in sweeps {
            if let Err(e) = store.fold_tallies(id).await {
                tracing::warn!(sweep = %id, error = %e, "could not fold results into the sweep's tallies");
            }
        }
    }
}
