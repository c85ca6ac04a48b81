//! The coordinator served from the test process (`spawn_coordinator`: `Coordinator::build`, port
//! 0, its own database, a clock the test moves): status mapping, expiry and backoff, and the
//! token check, through real gRPC calls and without release binaries or sleeping.

use seedsweep_proto::client::Client;
use seedsweep_proto::v1 as pb;
use seedsweep_tests::{InProcessCoordinator, spawn_coordinator};
use std::time::Duration;
use tonic::Code;

const TTL: Duration = Duration::from_secs(30);

/// Two seeds, two attempts each, a fixed 100 s backoff.
const SWEEP: &str = "name = \"svc\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"0..2\"\n\
    max_attempts = 2\nretry_backoff_seconds = 100\nretry_backoff_max_seconds = 100\n[train]\nepochs = 2\n";

async fn submit(c: &mut Client) -> String {
    let r = c
        .submit_sweep(pb::SubmitSweepRequest {
            sweep_toml: SWEEP.into(),
        })
        .await
        .unwrap();
    r.into_inner().sweep_id
}

async fn lease(c: &mut Client) -> Option<pb::Lease> {
    let r = c
        .lease_seed(pb::LeaseSeedRequest {
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    match r.into_inner().outcome.unwrap() {
        pb::lease_seed_response::Outcome::Lease(l) => Some(l),
        pb::lease_seed_response::Outcome::NoWork(_) => None,
    }
}

fn lref(l: &pb::Lease) -> Option<pb::LeaseRef> {
    Some(pb::LeaseRef {
        sweep_id: l.sweep_id.clone(),
        seed: l.seed,
        fence: l.fence,
        key: l.key.clone(),
    })
}

fn heartbeat(lease: Option<pb::LeaseRef>) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        lease,
        worker_id: "w".into(),
    }
}

async fn counts(c: &mut Client, sweep: &str) -> pb::SeedCounts {
    let r = c
        .get_sweep_status(pb::GetSweepStatusRequest {
            sweep_id: sweep.into(),
        })
        .await
        .unwrap();
    r.into_inner().counts.unwrap()
}

async fn started() -> (InProcessCoordinator, Client) {
    let coordinator = spawn_coordinator(TTL, None).await.unwrap();
    let client = coordinator.client(None).await;
    (coordinator, client)
}

#[tokio::test]
async fn a_stale_fence_is_failed_precondition() {
    let (coordinator, mut c) = started().await;
    submit(&mut c).await;
    let first = lease(&mut c).await.unwrap();
    let released = c
        .fail_seed(pb::FailSeedRequest {
            lease: lref(&first),
            worker_id: "w".into(),
            cause: "handed back".into(),
            counts_as_attempt: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(released.into_inner().state, "pending");
    let again = lease(&mut c).await.unwrap();
    assert_eq!((again.seed, again.fence), (first.seed, first.fence + 1));
    let stale = c.heartbeat(heartbeat(lref(&first))).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(
        stale.message().contains("stale lease"),
        "{}",
        stale.message()
    );
    c.heartbeat(heartbeat(lref(&again))).await.unwrap();
    coordinator.stop().await;
}

/// Anyone with a worker token can name a lease (its fence is a small number); only the worker
/// granted it has its key. Every write with a missing, wrong or cut key is refused and changes
/// nothing; the holder's go through.
#[tokio::test]
async fn writes_without_the_lease_key_are_refused() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let held = lease(&mut c).await.unwrap();
    assert_eq!(held.key.len(), 16);
    for key in [vec![], vec![0u8; 16], held.key[..15].to_vec()] {
        let forged = Some(pb::LeaseRef {
            key,
            ..lref(&held).unwrap()
        });
        let refused = [
            c.heartbeat(heartbeat(forged.clone())).await.unwrap_err(),
            c.stream_epoch_metrics(tokio_stream::iter([pb::EpochMetrics {
                lease: forged.clone(),
                epoch: 1,
                test_accuracy: Some(0.999),
                test_loss: Some(0.01),
                ..Default::default()
            }]))
            .await
            .unwrap_err(),
            c.complete_seed(pb::CompleteSeedRequest {
                lease: forged.clone(),
                worker_id: "forger".into(),
                test_accuracy: Some(0.999),
                epochs: 1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
            c.fail_seed(pb::FailSeedRequest {
                lease: forged.clone(),
                worker_id: "forger".into(),
                cause: "forged".into(),
                counts_as_attempt: true,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("lease key does not match"), "{e:?}");
        }
    }
    let now = counts(&mut c, &sweep).await;
    assert_eq!((now.leased, now.done, now.failed), (1, 0, 0), "{now:?}");
    c.heartbeat(heartbeat(lref(&held))).await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn unknown_sweeps_and_seeds_are_not_found() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let nobody = "00000000-0000-0000-0000-000000000000";
    let e = c
        .get_sweep_status(pb::GetSweepStatusRequest {
            sweep_id: nobody.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let no_seed = Some(pb::LeaseRef {
        sweep_id: sweep,
        seed: 99,
        fence: 1,
        ..Default::default()
    });
    let e = c.heartbeat(heartbeat(no_seed)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    coordinator.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let (coordinator, mut c) = started().await;
    let e = c
        .get_sweep_status(pb::GetSweepStatusRequest {
            sweep_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.heartbeat(heartbeat(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .lease_seed(pb::LeaseSeedRequest {
            worker_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A worker's allowed variables are names a sweep could set, and its tasks names.
    for bad in [
        pb::LeaseSeedRequest {
            worker_id: "w".into(),
            allowed_env: vec!["LD_PRELOAD=/tmp/x.so".into()],
            ..Default::default()
        },
        pb::LeaseSeedRequest {
            worker_id: "w".into(),
            tasks: vec!["command\n".into()],
            ..Default::default()
        },
    ] {
        let e = c.lease_seed(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let e = c
        .submit_sweep(pb::SubmitSweepRequest {
            sweep_toml: "name = 3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Bytes that are no protobuf message at all (a varint that never ends), from a client that
    // sends whatever it is given.
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/seedsweep.v1.Coordinator/LeaseSeed");
    let e = raw
        .unary(tonic::Request::new(vec![0xff; 12]), path, RawBytes)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("malformed"), "{e:?}");
    coordinator.stop().await;
}

/// A test double's codec: sends the bytes it is given as the request, whatever they are, and
/// ignores the reply.
#[derive(Clone, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use prost::bytes::Buf;
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

/// An expired lease counts as an attempt and its seed waits out the backoff; the last attempt
/// ends the seed failed. Time moves by the store's clock only.
#[tokio::test]
async fn expiry_counts_and_the_backoff_is_waited_out() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let first = lease(&mut c).await.unwrap();
    let other = lease(&mut c).await.unwrap();
    assert_ne!(first.seed, other.seed);
    c.heartbeat(heartbeat(lref(&other))).await.unwrap();
    coordinator.clock.advance(TTL + Duration::from_secs(1));
    // The claim that expires both leases finds both seeds backing off.
    assert!(
        lease(&mut c).await.is_none(),
        "a seed leased inside its backoff"
    );
    let e = c.heartbeat(heartbeat(lref(&first))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(counts(&mut c, &sweep).await.pending, 2);
    // The backoff is 100 s times a jitter in [0.5, 1.5).
    coordinator.clock.advance(Duration::from_secs(151));
    let retried = lease(&mut c).await.unwrap();
    assert_eq!(retried.fence, 2);
    coordinator.clock.advance(TTL + Duration::from_secs(1));
    lease(&mut c).await.unwrap();
    let after = counts(&mut c, &sweep).await;
    assert_eq!((after.failed, after.leased), (1, 1), "{after:?}");
    coordinator.stop().await;
}

/// A coordinator that was down while leases ran out expires none of them for one TTL after it is
/// back: their holders could not heartbeat meanwhile, and get that long to do so. A lease still
/// not heartbeated after the grace expires as usual.
#[tokio::test]
async fn an_outage_costs_no_attempt() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let kept = lease(&mut c).await.unwrap();
    let abandoned = lease(&mut c).await.unwrap();
    // Down for ten TTLs: both deadlines pass while nobody can heartbeat.
    coordinator.clock.advance(TTL * 10);
    let coordinator = coordinator.restart().await.unwrap();
    let mut c = coordinator.client(None).await;
    assert!(lease(&mut c).await.is_none(), "a lease expired at once");
    c.heartbeat(heartbeat(lref(&kept))).await.unwrap();
    coordinator.clock.advance(TTL - Duration::from_secs(1));
    assert!(
        lease(&mut c).await.is_none(),
        "a lease expired inside the grace"
    );
    c.heartbeat(heartbeat(lref(&kept))).await.unwrap();
    let status = counts(&mut c, &sweep).await;
    assert_eq!((status.leased, status.pending), (2, 0), "{status:?}");
    // Past the grace, the lease nobody heartbeated expires; the other holds.
    coordinator.clock.advance(Duration::from_secs(2));
    assert!(
        lease(&mut c).await.is_none(),
        "the expired seed waits out its backoff"
    );
    let e = c.heartbeat(heartbeat(lref(&abandoned))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    c.heartbeat(heartbeat(lref(&kept))).await.unwrap();
    let status = counts(&mut c, &sweep).await;
    assert_eq!((status.leased, status.pending), (1, 1), "{status:?}");
    coordinator.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_before_any_handler() {
    let worker = vec!["w".repeat(32)];
    let admin = vec!["a".repeat(32)];
    let coordinator = spawn_coordinator(TTL, Some((&worker, &admin)))
        .await
        .unwrap();
    let mut nobody = coordinator.client(None).await;
    let e = nobody
        .lease_seed(pb::LeaseSeedRequest {
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut as_worker = coordinator.client(Some(&worker[0])).await;
    let e = as_worker
        .submit_sweep(pb::SubmitSweepRequest {
            sweep_toml: SWEEP.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut as_admin = coordinator.client(Some(&admin[0])).await;
    submit(&mut as_admin).await;
    assert!(lease(&mut as_worker).await.is_some());
    coordinator.stop().await;
}

/// An epoch number past what the databases store (2^31, or -1 on the wire) is refused at the
/// edge, and the sweep's epochs stay readable.
#[tokio::test]
async fn out_of_range_epoch_numbers_are_refused_and_reads_still_work() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let held = lease(&mut c).await.unwrap();
    let epoch = |n: u32| pb::EpochMetrics {
        lease: lref(&held),
        epoch: n,
        train_loss: Some(0.5),
        train_accuracy: Some(0.5),
        lr: Some(0.1),
        seconds: 1.0,
        ..Default::default()
    };
    for n in [1u32 << 31, u32::MAX, 0] {
        let sent = c
            .stream_epoch_metrics(tokio_stream::iter(vec![epoch(n)]))
            .await
            .unwrap_err();
        assert_eq!(sent.code(), Code::InvalidArgument, "epoch {n}: {sent:?}");
        assert!(sent.message().contains("epoch"), "{}", sent.message());
    }
    c.stream_epoch_metrics(tokio_stream::iter(vec![epoch(1)]))
        .await
        .unwrap();
    let rows = c
        .list_epoch_metrics(pb::ListEpochMetricsRequest {
            sweep_id: sweep,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let epochs: Vec<u32> = rows.rows.iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, [1]);
    coordinator.stop().await;
}

/// Epoch rows and results that the sweep's runs cannot produce are INVALID_ARGUMENT naming the
/// field, and leave nothing behind: an epoch past the sweep's count, metrics its task or settings
/// do not report, a result of the wrong length or whose final accuracy is not its last epoch's,
/// a stream past its bound. The right ones are
/// recorded afterwards, and every reader sees only them.
#[tokio::test]
async fn reports_of_the_wrong_shape_are_refused_and_leave_nothing() {
    let (coordinator, mut c) = started().await;
    let sweep = submit(&mut c).await;
    let held = lease(&mut c).await.unwrap();
    let epoch = |n: u32| pb::EpochMetrics {
        lease: lref(&held),
        epoch: n,
        train_loss: Some(0.5),
        train_accuracy: Some(0.5),
        test_loss: Some(0.7),
        test_accuracy: Some(0.6),
        lr: Some(0.1),
        seconds: 1.0,
        ..Default::default()
    };
    let refused = [
        (pb::EpochMetrics { ..epoch(3) }, "epoch = 3"),
        (
            pb::EpochMetrics {
                test_top5: Some(0.9),
                ..epoch(1)
            },
            "test_top5",
        ),
        (
            pb::EpochMetrics {
                val_accuracy: Some(0.9),
                ..epoch(1)
            },
            "holdout",
        ),
        (
            pb::EpochMetrics {
                custom: [("ece".to_string(), 0.1)].into(),
                ..epoch(1)
            },
            "only a task = \"command\" program",
        ),
        (
            pb::EpochMetrics {
                custom: [("Bad Name".to_string(), 0.1)].into(),
                ..epoch(1)
            },
            "`Bad Name` is not a metric name",
        ),
        (
            pb::EpochMetrics {
                custom: [("ece".to_string(), f64::INFINITY)].into(),
                ..epoch(1)
            },
            "must be finite",
        ),
    ];
    for (m, field) in refused {
        let e = c
            .stream_epoch_metrics(tokio_stream::iter(vec![m]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    let flood = (0..100).map(|i| epoch(1 + i % 2)).collect::<Vec<_>>();
    let e = c
        .stream_epoch_metrics(tokio_stream::iter(flood))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("more than"), "{}", e.message());
    c.stream_epoch_metrics(tokio_stream::iter(vec![epoch(1), epoch(2)]))
        .await
        .unwrap();
    let result = |epochs: u32| pb::CompleteSeedRequest {
        lease: lref(&held),
        worker_id: "w".into(),
        test_accuracy: Some(0.6),
        test_loss: Some(0.7),
        train_loss: Some(0.5),
        train_accuracy: Some(0.5),
        epochs,
        seconds: 2.0,
        device: "cpu".into(),
        data_fingerprint: "f".into(),
        precision: "fp32".into(),
        ..Default::default()
    };
    for (r, field) in [
        (result(1), "epochs = 1"),
        (result(3), "epochs = 3"),
        (
            pb::CompleteSeedRequest {
                test_top5: Some(0.9),
                ..result(2)
            },
            "test_top5",
        ),
        (
            pb::CompleteSeedRequest {
                test_accuracy: Some(0.61),
                ..result(2)
            },
            "test_accuracy differs from epoch 2",
        ),
        (
            pb::CompleteSeedRequest {
                custom: [("ece".to_string(), 0.1)].into(),
                ..result(2)
            },
            "only a task = \"command\" program",
        ),
    ] {
        let e = c.complete_seed(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    let status = counts(&mut c, &sweep).await;
    assert_eq!((status.leased, status.done), (1, 0), "{status:?}");
    assert!(
        c.complete_seed(result(2))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    let rows = c
        .list_epoch_metrics(pb::ListEpochMetricsRequest {
            sweep_id: sweep.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let epochs: Vec<(i64, u32)> = rows.rows.iter().map(|r| (r.seed, r.epoch)).collect();
    assert_eq!(epochs, [(held.seed, 1), (held.seed, 2)]);
    let results = c
        .list_results(pb::ListResultsRequest {
            sweep_id: sweep.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(results.results.len(), 1);
    // Paged: a full page says where to go on; the page after the last result is empty.
    let page = |after_seed| pb::ListResultsRequest {
        sweep_id: sweep.clone(),
        page_size: 1,
        after_seed,
    };
    let first = c.list_results(page(None)).await.unwrap().into_inner();
    assert_eq!(first.next_after_seed, Some(held.seed));
    let rest = c
        .list_results(page(first.next_after_seed))
        .await
        .unwrap()
        .into_inner();
    assert!(
        rest.results.is_empty() && rest.next_after_seed.is_none(),
        "{rest:?}"
    );
    let epochs = c
        .list_epoch_metrics(pb::ListEpochMetricsRequest {
            sweep_id: sweep.clone(),
            page_size: 1,
            after: Some(pb::EpochKey {
                seed: held.seed,
                epoch: 1,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(epochs.rows.len(), 1);
    assert_eq!(epochs.rows[0].epoch, 2);
    assert_eq!(epochs.next_after.map(|k| k.epoch), Some(2));
    // A custom metric is a command sweep's only.
    let e = c
        .get_sweep_stats(pb::GetSweepStatsRequest {
            sweep_id: sweep.clone(),
            metric: "ece".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("has no metric `ece`"),
        "{}",
        e.message()
    );
    coordinator.stop().await;
}
