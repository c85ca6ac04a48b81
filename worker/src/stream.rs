//! The metrics stream: each epoch's metrics from the training thread to the coordinator over
//! `StreamEpochMetrics`, replayed on a new stream whenever the coordinator was away.

use crate::lease::is_transient;
use crate::run::EpochMetrics;
use seedsweep_proto::client::Client;
use seedsweep_proto::v1 as pb;
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
/// stream at the next epoch. Returns the stream's verdict once training ends: Ok when every epoch
/// arrived, else the status that ended it (a transient one means epochs may be missing: the
/// result's delivery replays them from the spool).
pub(crate) async fn ship_metrics(
    client: Client,
    mut from_training: mpsc::Receiver<pb::EpochMetrics>,
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
    let (tx, call) = stream.unwrap_or_else(|| open_stream(client.clone(), &sent));
    drop(tx);
    match call.await {
        Ok(verdict) => verdict.map(drop),
        Err(e) => Err(Status::internal(format!("metrics stream task failed: {e}"))),
    }
}

/// One epoch's metrics as the stream carries them.
pub(crate) fn epoch_pb(lease: &pb::LeaseRef, m: &EpochMetrics) -> pb::EpochMetrics {
    pb::EpochMetrics {
        lease: Some(lease.clone()),
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        test_loss: m.test_loss,
        test_accuracy: m.test_accuracy,
        test_top5: m.test_top5,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        lr: m.lr,
        seconds: m.seconds,
        custom: m.custom.clone(),
    }
}
