//! The start-up seam shared by `coordinator serve` and the tests: connect and migrate the store,
//! bind the listener (port 0 allowed), report the bound address, serve until told to stop.

use crate::service::CoordinatorService;
use crate::store::{self, redact_url};
use anyhow::Context;
use seedsweep_proto::v1::coordinator_server::CoordinatorServer;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub database_url: String,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
}

/// A coordinator that has connected to its database and bound its port, ready to serve.
pub struct Coordinator {
    listener: TcpListener,
    service: CoordinatorService,
    addr: SocketAddr,
}

impl Coordinator {
    pub async fn build(settings: ServerSettings) -> anyhow::Result<Coordinator> {
        let url = redact_url(&settings.database_url);
        let store = store::connect(&settings.database_url)
            .await
            .with_context(|| format!("failed to open the database {url}"))?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("failed to listen on {}", settings.listen))?;
        let addr = listener
            .local_addr()
            .context("failed to read the bound address")?;
        tracing::info!(%addr, database = %url, "coordinator listening");
        Ok(Coordinator {
            listener,
            service: CoordinatorService::new(store, settings.lease_ttl),
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(self.service))
            // Without TCP_NODELAY, a reply written in several small pieces waits out the
            // client's delayed ACK (40 ms on Linux) under Nagle's algorithm.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .context("gRPC server failed")
    }
}
