//! What the coordinator and the worker share for operations: how they log (for people, or one
//! JSON object per line for a log pipeline) and the HTTP endpoint Prometheus scrapes.

use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people; coloured at a terminal.
    Text,
    /// One JSON object per event: timestamp, level, target, message and fields.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the global logger. `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        // Colours only for a person at a terminal, not in log files.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Text exposition of a registry (the OpenMetrics format Prometheus scrapes).
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encoding metrics");
    out
}

/// Serves `GET /metrics` on `addr` (port 0 picks one) in the background; returns the bound
/// address. `render` produces the page for each scrape; an error becomes a 503 with its message.
pub async fn serve_metrics<F, Fut>(addr: SocketAddr, render: F) -> anyhow::Result<SocketAddr>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send + 'static,
{
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                match render().await {
                    Ok(body) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    ),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        e,
                    ),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_what_render_gives_and_503_on_error() {
        let mut registry = prometheus_client::registry::Registry::default();
        let c: Counter = Counter::default();
        registry.register("demo_events", "Events", c.clone());
        c.inc_by(3);
        let page = encode(&registry);
        let addr = serve_metrics("127.0.0.1:0".parse().unwrap(), move || {
            let page = page.clone();
            async move { Ok(page) }
        })
        .await
        .unwrap();
        let got = get(addr).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.contains("demo_events_total 3"), "{got}");

        let addr = serve_metrics("127.0.0.1:0".parse().unwrap(), || async {
            Err("database unavailable".to_string())
        })
        .await
        .unwrap();
        let got = get(addr).await;
        assert!(got.starts_with("HTTP/1.1 503") && got.contains("database unavailable"));
    }
}
