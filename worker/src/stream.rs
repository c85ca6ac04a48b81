//! The metrics stream: each epoch's metrics from the training thread to the coordinator over
//! `StreamEpochMetrics`, replayed on a new stream whenever the coordinator was away.

use crate::lease::is_transient;
use seedsweep_proto::client::Client;
use seedsweep_proto::v1 as pb;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

type StreamCall =
    tokio::task::JoinHandle<Result<tonic::Response<pb::StreamEpochMetricsResponse>, Status>>;

/// Opens a metrics stream that first replays `sent` (re-recording an epoch is idempotent).
fn open_stream(
    mut client: Client,
    sent: &[pb::EpochMetrics],
) -> (mpsc::Sender<pb::EpochMetrics>, StreamCall) {
    let (tx, rx) = mpsc::channel(sent.len() + 64);
    for m in sent {
        // Capacity was reserved above, so this cannot fail.
        let _ = tx.try_send(m.clone());
    }
    let call =
        tokio::spawn(async move { client.stream_epoch_metrics(ReceiverStream::new(rx)).await });
    (tx, call)
}

/// Forwards each epoch's metrics from the training thread over a `StreamEpochMetrics` stream. When
/// the stream breaks (the coordinator is unreachable), the metrics are kept and replayed on a new
/// stream, so every epoch arrives once the coordinator is back, for up to `patience` after
/// training ends. Returns the stream's verdict: Ok, or the status that ended it.
pub(crate) async fn ship_metrics(
    client: Client,
    mut from_training: mpsc::Receiver<pb::EpochMetrics>,
    patience: Duration,
) -> Result<(), Status> {
    let mut sent: Vec<pb::EpochMetrics> = Vec::new();
    let mut stream: Option<(mpsc::Sender<pb::EpochMetrics>, StreamCall)> = None;
    while let Some(m) = from_training.recv().await {
        sent.push(m.clone());
        let delivered = match &stream {
            Some((tx, _)) => tx.send(m).await.is_ok(),
            None => false,
        };
        if !delivered {
            if let Some((_, call)) = stream.take()
                && let Ok(Err(s)) = call.await
            {
                if !is_transient(&s) {
                    return Err(s);
                }
                tracing::warn!(error = s.message(), "metrics stream broke; will replay it");
            }
            stream = Some(open_stream(client.clone(), &sent));
        }
    }
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        let (tx, call) = stream
            .take()
            .unwrap_or_else(|| open_stream(client.clone(), &sent));
        drop(tx);
        match call.await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) if is_transient(&s) && Instant::now() < deadline => {
                tracing::warn!(
                    error = s.message(),
                    "coordinator unreachable; will replay the metrics"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                stream = Some(open_stream(client.clone(), &sent));
            }
            Ok(Err(s)) => return Err(s),
            Err(e) => return Err(Status::internal(format!("metrics stream task failed: {e}"))),
        }
    }
}
