//! One suite of store behaviour, run against every implementation.

use seedsweep_coordinator::store::{self, Clock, Store, StoreError};
use seedsweep_core::domain::Correctness;
use seedsweep_core::domain::SweepId;
use seedsweep_core::domain::SweepState;
use seedsweep_core::domain::{
    ClaimOutcome, CompleteOutcome, EpochRecord, Lease, LeaseRef, Metric, SeedResult, SeedState,
};
use seedsweep_core::metric::Direction;
use seedsweep_core::policy::Charge;
use seedsweep_core::spec::SeedSet;
use seedsweep_core::spec::SweepSpec;
use seedsweep_core::stats;
use seedsweep_core::stats::noise::TestSetTally;
use std::sync::Arc;
use std::time::Duration;

const TTL: Duration = Duration::from_secs(60);

/// A sweep with no retry backoff unless `extra` sets one.
fn spec_with(seeds: &str, max_attempts: u32, extra: &str) -> SweepSpec {
    let extra = if extra.contains("retry_backoff_seconds") {
        extra.to_string()
    } else {
        format!("retry_backoff_seconds = 0\n{extra}")
    };
    SweepSpec::parse(&format!(
        "name = \"conf\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = {seeds}\nmax_attempts = {max_attempts}\n\
         {extra}\n[train]\nepochs = 2\n"
    ))
    .unwrap()
}

fn spec(seeds: &str, max_attempts: u32) -> SweepSpec {
    spec_with(seeds, max_attempts, "")
}

fn epoch(n: u32) -> EpochRecord {
    EpochRecord {
        epoch: n,
        train_loss: Some(1.0 / n as f64),
        train_accuracy: Some(0.5),
        test_loss: Some(1.0),
        test_accuracy: Some(0.5),
        test_top5: None,
        val_loss: None,
        val_accuracy: None,
        lr: Some(0.1),
        seconds: 1.0,
        custom: Default::default(),
    }
}

/// The last of a run's two epochs, ending at test accuracy `acc`: what [`result`] reports.
fn last_epoch(acc: f64) -> EpochRecord {
    EpochRecord {
        test_accuracy: Some(acc),
        ..epoch(2)
    }
}

/// A two-epoch run's result, its final metrics those of [`last_epoch`].
fn result(seed: i64, acc: f64) -> SeedResult {
    SeedResult {
        seed,
        test_accuracy: Some(acc),
        test_loss: Some(1.0),
        train_loss: Some(0.5),
        train_accuracy: Some(0.5),
        epochs: 2,
        diverged_epoch: None,
        seconds: 3.0,
        worker_id: "w".into(),
        device: "cpu".into(),
        data_fingerprint: "sha256:00".into(),
        precision: seedsweep_core::spec::Precision::Fp32,
        deterministic: true,
        test_top5: None,
        val_loss: None,
        val_accuracy: None,
        custom: Default::default(),
        factors: None,
        finished_at: String::new(),
        test_correct: None,
    }
}

async fn claim(s: &dyn Store, worker: &str) -> Lease {
    match s.claim(worker, TTL).await.unwrap() {
        ClaimOutcome::Leased(l) => *l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn finish(s: &dyn Store, l: LeaseRef, acc: f64) {
    s.record_epoch(l, &epoch(1)).await.unwrap();
    s.record_epoch(l, &last_epoch(acc)).await.unwrap();
    assert_eq!(
        s.complete(l, &result(l.seed, acc)).await.unwrap(),
        CompleteOutcome::Recorded
    );
}

async fn suite(s: Arc<dyn Store>, clock: Clock) {
    let s = s.as_ref();
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 0 }
    ));

    // Seeds are leased oldest sweep first, lowest seed first, each once.
    let a = SweepId::new();
    s.create_sweep(a, &spec("[5, 2, 9]", 2)).await.unwrap();
    let b = SweepId::new();
    s.create_sweep(b, &spec("\"0..2\"", 1)).await.unwrap();
    let l1 = claim(s, "w1").await;
    assert_eq!(
        (l1.lease.sweep_id, l1.lease.seed, l1.lease.fence),
        (a, 2, 1)
    );
    assert_eq!(l1.train.epochs, 2);
    assert_eq!(l1.dataset, "synthetic");
    let l2 = claim(s, "w2").await;
    assert_eq!((l2.lease.sweep_id, l2.lease.seed), (a, 5));

    // A result needs all its epochs, and is recorded once; a retried completion is acknowledged.
    s.record_epoch(l1.lease, &epoch(1)).await.unwrap();
    assert!(matches!(
        s.complete(l1.lease, &result(2, 0.8)).await,
        Err(StoreError::Conflict(_))
    ));
    s.record_epoch(l1.lease, &epoch(2)).await.unwrap();
    s.record_epoch(l1.lease, &last_epoch(0.8)).await.unwrap();
    // A result that is not its last epoch's evaluation is refused, naming the metric.
    match s.complete(l1.lease, &result(2, 0.7)).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("test_accuracy"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.complete(l1.lease, &result(2, 0.8)).await.unwrap(),
        CompleteOutcome::Recorded
    );
    assert_eq!(
        s.complete(l1.lease, &result(2, 0.8)).await.unwrap(),
        CompleteOutcome::AlreadyRecorded
    );
    assert!(matches!(
        s.heartbeat(l1.lease, TTL).await,
        Err(StoreError::StaleLease(_))
    ));

    // A failure that counts goes back to the queue with a new fence; the old lease is stale.
    assert_eq!(
        s.fail(
            l2.lease,
            "boom",
            Charge::Counted {
                deterministic: true
            }
        )
        .await
        .unwrap(),
        SeedState::Pending
    );
    assert!(matches!(
        s.record_epoch(l2.lease, &epoch(1)).await,
        Err(StoreError::StaleLease(_))
    ));
    let l2b = claim(s, "w3").await;
    assert_eq!((l2b.lease.seed, l2b.lease.fence), (5, 2));
    for stale in [
        l2.lease,
        LeaseRef {
            fence: 99,
            ..l2b.lease
        },
    ] {
        assert!(matches!(
            s.heartbeat(stale, TTL).await,
            Err(StoreError::StaleLease(_))
        ));
        assert!(matches!(
            s.complete(stale, &result(5, 0.1)).await,
            Err(StoreError::StaleLease(_))
        ));
        assert!(matches!(
            s.fail(
                stale,
                "x",
                Charge::Counted {
                    deterministic: true
                }
            )
            .await,
            Err(StoreError::StaleLease(_))
        ));
    }
    s.heartbeat(l2b.lease, TTL).await.unwrap();
    // Out of attempts (max 2): failed for good.
    assert_eq!(
        s.fail(
            l2b.lease,
            "boom again",
            Charge::Counted {
                deterministic: true
            }
        )
        .await
        .unwrap(),
        SeedState::Failed
    );

    // A release does not use up an attempt; the next lease starts with none of the last one's
    // epochs (a partial curve never mixes with the new lease's in what readers see).
    let l3 = claim(s, "w").await;
    assert_eq!(l3.lease.seed, 9);
    s.record_epoch(l3.lease, &epoch(1)).await.unwrap();
    s.record_epoch(l3.lease, &epoch(2)).await.unwrap();
    assert_eq!(
        s.fail(l3.lease, "data missing", Charge::Uncounted)
            .await
            .unwrap(),
        SeedState::Pending
    );
    let l3b = claim(s, "w").await;
    assert_eq!((l3b.lease.seed, l3b.lease.fence), (9, 2));
    let seed_9 = s.list_epochs(a, None, 1000).await.unwrap();
    assert!(
        seed_9.iter().all(|(seed, _)| *seed != 9),
        "the released lease's epochs are still listed: {seed_9:?}"
    );
    finish(s, l3b.lease, 0.7).await;

    // An expired lease returns its seed at the next claim and counts as an attempt; expiry follows
    // the store's clock.
    let l4 = claim(s, "w").await.lease;
    assert_eq!((l4.sweep_id, l4.seed), (b, 0));
    clock.advance(TTL + Duration::from_secs(1));
    // max_attempts is 1 for sweep b: the expiry fails the seed, and the claim moves on to seed 1.
    let l5 = claim(s, "w").await;
    assert_eq!((l5.lease.sweep_id, l5.lease.seed), (b, 1));
    assert!(matches!(
        s.complete(l4, &result(0, 0.5)).await,
        Err(StoreError::StaleLease(_))
    ));
    match s.claim("w", TTL).await.unwrap() {
        ClaimOutcome::Empty { outstanding } => assert_eq!(outstanding, 1),
        other => panic!("{other:?}"),
    }
    finish(s, l5.lease, 0.6).await;

    // Progress and results.
    let pa = s.sweep_progress(a).await.unwrap();
    assert_eq!(
        (
            pa.counts.done,
            pa.counts.failed,
            pa.counts.pending,
            pa.counts.leased
        ),
        (2, 1, 0, 0)
    );
    let acc = pa.aggregate(Metric::TestAccuracy).unwrap();
    assert_eq!((acc.moments.n, acc.min_seed, acc.max_seed), (2, 9, 2));
    assert!((acc.moments.mean - 0.75).abs() < 1e-12);
    assert_eq!((pa.summary.total, pa.summary.done), (3, 2));
    let pb = s.sweep_progress(b).await.unwrap();
    assert_eq!((pb.counts.done, pb.counts.failed), (1, 1));
    let rows = s.list_results(a, None, 1000).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.seed).collect::<Vec<_>>(), vec![2, 9]);
    // Pages: in seed order, each after the last one's key.
    let first = s.list_results(a, None, 1).await.unwrap();
    let second = s.list_results(a, Some(first[0].seed), 1).await.unwrap();
    let third = s.list_results(a, Some(second[0].seed), 1).await.unwrap();
    assert_eq!((first[0].seed, second[0].seed, third.len()), (2, 9, 0));
    let epochs = s.list_epochs(a, None, 1000).await.unwrap();
    let keys =
        |rows: &[(i64, EpochRecord)]| rows.iter().map(|(s, e)| (*s, e.epoch)).collect::<Vec<_>>();
    assert_eq!(keys(&epochs), [(2, 1), (2, 2), (9, 1), (9, 2)]);
    let page = s.list_epochs(a, Some((2, 2)), 2).await.unwrap();
    assert_eq!(keys(&page), [(9, 1), (9, 2)]);
    assert!(
        rows[0].finished_at.ends_with('Z'),
        "{}",
        rows[0].finished_at
    );
    let sweeps = s.list_sweeps().await.unwrap();
    assert_eq!(sweeps.iter().map(|w| w.id).collect::<Vec<_>>(), vec![a, b]);
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 0 }
    ));

    // Unknown sweeps and seeds.
    let nobody = SweepId::new();
    assert!(matches!(
        s.sweep_progress(nobody).await,
        Err(StoreError::SweepNotFound(_))
    ));
    assert!(matches!(
        s.list_results(nobody, None, 10).await,
        Err(StoreError::SweepNotFound(_))
    ));
    let ghost = LeaseRef {
        sweep_id: nobody,
        seed: 0,
        fence: 1,
    };
    assert!(matches!(
        s.heartbeat(ghost, TTL).await,
        Err(StoreError::SweepNotFound(_))
    ));
    let ghost_seed = LeaseRef {
        sweep_id: a,
        seed: 1000,
        fence: 1,
    };
    assert!(matches!(
        s.record_epoch(ghost_seed, &epoch(1)).await,
        Err(StoreError::SeedNotFound { .. })
    ));
}

/// Retry backoff, repeated failures, pause / resume / cancel, priority and extension.
async fn retries_and_control(s: Arc<dyn Store>, clock: Clock) {
    let s = s.as_ref();
    // A counted failure waits out the backoff (30 s x [0.5, 1.5)) on the store's clock.
    let a = SweepId::new();
    s.create_sweep(a, &spec_with("[1]", 5, "retry_backoff_seconds = 30"))
        .await
        .unwrap();
    let l = claim(s, "w1").await.lease;
    assert_eq!(
        s.fail(
            l,
            "cuda oom",
            Charge::Counted {
                deterministic: true
            }
        )
        .await
        .unwrap(),
        SeedState::Pending
    );
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 1 }
    ));
    clock.advance(Duration::from_secs(14));
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { .. }
    ));
    clock.advance(Duration::from_secs(32));
    let l = claim(s, "w2").await.lease;
    assert_eq!(l.fence, 2);
    // The same cause on a second worker: failed for good, attempts left or not.
    assert_eq!(
        s.fail(
            l,
            "cuda oom",
            Charge::Counted {
                deterministic: true
            }
        )
        .await
        .unwrap(),
        SeedState::Failed
    );
    // The seed's history: both attempts, oldest first, with their workers and causes.
    let h = s.seed_history(a, 1).await.unwrap();
    assert_eq!(h.state, SeedState::Failed);
    let seen: Vec<_> = h
        .attempts
        .iter()
        .map(|t| {
            (
                t.fence,
                t.worker_id.as_str(),
                t.outcome.as_str(),
                t.cause.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "w1", "failed", Some("cuda oom")),
            (2, "w2", "failed", Some("cuda oom"))
        ]
    );
    assert!(h.attempts.iter().all(|t| {
        t.started_at.ends_with('Z')
            && t.ended_at
                .as_ref()
                .is_some_and(|e| e.ends_with('Z') && *e >= t.started_at)
    }));
    assert!(matches!(
        s.seed_history(a, 2).await,
        Err(StoreError::SeedNotFound { .. })
    ));
    assert!(matches!(
        s.seed_history(SweepId::new(), 1).await,
        Err(StoreError::SweepNotFound(_))
    ));

    // Priority orders sweeps; pause stops leases, resume restarts them.
    let low = SweepId::new();
    s.create_sweep(low, &spec("\"0..3\"", 3)).await.unwrap();
    let high = SweepId::new();
    s.create_sweep(high, &spec_with("\"100..102\"", 3, "priority = 5"))
        .await
        .unwrap();
    assert_eq!(claim(s, "w").await.lease.sweep_id, high);
    s.set_sweep_state(high, SweepState::Paused).await.unwrap();
    let from_low = claim(s, "w").await.lease;
    assert_eq!(from_low.sweep_id, low);
    s.set_sweep_state(high, SweepState::Active).await.unwrap();
    let held = claim(s, "w").await.lease;
    assert_eq!((held.sweep_id, held.seed), (high, 101));
    let summaries = s.list_sweeps().await.unwrap();
    assert_eq!(summaries.iter().find(|w| w.id == high).unwrap().priority, 5);

    // Extending adds only new seeds and leaves finished ones alone.
    finish(s, from_low, 0.5).await;
    assert_eq!(
        s.extend_sweep(low, &SeedSet::parse_range("0..5").unwrap())
            .await
            .unwrap(),
        2
    );
    let p = s.sweep_progress(low).await.unwrap();
    assert_eq!(
        (p.summary.total, p.counts.done, p.counts.pending),
        (5, 1, 4)
    );
    assert_eq!(
        p.aggregate(Metric::TestAccuracy)
            .map(|a| (a.moments.n, a.max)),
        Some((1, 0.5))
    );

    // Cancelling ends held leases and pending seeds, for good.
    s.set_sweep_state(high, SweepState::Cancelled)
        .await
        .unwrap();
    assert!(matches!(
        s.heartbeat(held, TTL).await,
        Err(StoreError::StaleLease(_))
    ));
    let p = s.sweep_progress(high).await.unwrap();
    assert_eq!(
        (p.counts.cancelled, p.counts.leased, p.counts.pending),
        (2, 0, 0)
    );
    assert_eq!(p.summary.state, SweepState::Cancelled);
    assert!(matches!(
        s.set_sweep_state(high, SweepState::Active).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.extend_sweep(high, &SeedSet::parse_range("0..1").unwrap())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.set_sweep_state(SweepId::new(), SweepState::Paused).await,
        Err(StoreError::SweepNotFound(_))
    ));
    // Paused sweeps do not count as outstanding work.
    s.set_sweep_state(low, SweepState::Paused).await.unwrap();
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 0 }
    ));
}

/// Many claimers at once never get the same seed.
async fn concurrent_claims(s: Arc<dyn Store>) {
    let id = SweepId::new();
    s.create_sweep(id, &spec("\"0..200\"", 3)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let ClaimOutcome::Leased(l) = s.claim(&format!("w{w}"), TTL).await.unwrap() {
                got.push(l.lease.seed);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
}

/// The live aggregates equal a recomputation from scratch after every delivery of a
/// randomised stream of results that includes late deliveries (a lease that expired and was
/// re-leased) and duplicates (the same result twice); and the SQL views agree with them.
async fn live_aggregates(s: Arc<dyn Store>, clock: Clock, url: &str) {
    use rand::{Rng, SeedableRng};
    let id = SweepId::new();
    // Two factors vary, two stay at the base seed: the factor seeds differ from the seed.
    let design = "vary = [\"init\", \"order\"]\nbase_seed = 7";
    s.create_sweep(id, &spec_with("\"0..30\"", 5, design))
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut held: Vec<LeaseRef> = Vec::new();
    let mut delivered: Vec<LeaseRef> = Vec::new();
    let (mut late, mut duplicates) = (0, 0);
    loop {
        match rng.random_range(0..10) {
            // Lease one more.
            0..=3 => match s.claim("w", TTL).await.unwrap() {
                ClaimOutcome::Leased(l) => held.push(l.lease),
                _ if held.is_empty() => break,
                _ => {}
            },
            // Time passes: every held lease expires; their holders deliver late, if at all.
            4 => clock.advance(TTL + Duration::from_secs(1)),
            // Deliver a held lease's result, or the same one again.
            _ => {
                let again = rng.random_bool(0.2) && !delivered.is_empty();
                let l = if again {
                    delivered[rng.random_range(0..delivered.len())]
                } else if held.is_empty() {
                    continue;
                } else {
                    held.swap_remove(rng.random_range(0..held.len()))
                };
                let acc = (rng.random_range(0.80..0.95f64) * 1e4).round() / 1e4;
                let r = async {
                    if !again {
                        s.record_epoch(l, &epoch(1)).await?;
                        s.record_epoch(l, &last_epoch(acc)).await?;
                    }
                    let hits = (acc * 1e4).round() as u32;
                    let correct = Correctness::new(10_000, bitmap(l.seed, hits), acc).unwrap();
                    let r = SeedResult {
                        test_correct: Some(correct),
                        ..result(l.seed, acc)
                    };
                    s.complete(l, &r).await
                }
                .await;
                match r {
                    Ok(CompleteOutcome::Recorded) => delivered.push(l),
                    Ok(CompleteOutcome::AlreadyRecorded) => duplicates += 1,
                    Err(StoreError::StaleLease(_)) | Err(StoreError::Conflict(_)) => late += 1,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let (scores, _) = s.scores(id, Metric::TestAccuracy, 0).await.unwrap();
        let live = s
            .aggregates(id)
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.metric == Metric::TestAccuracy);
        let pairs: Vec<(i64, f64)> = scores.iter().map(|r| (r.seed, r.value)).collect();
        match (stats::summarize(&pairs, Direction::Max), live) {
            (None, None) => {}
            (Some(want), Some(got)) => {
                assert_eq!(got.moments.n, want.n);
                assert!(
                    (got.moments.mean - want.mean).abs() < 1e-12,
                    "{got:?} {want:?}"
                );
                assert!(
                    (got.moments.std() - want.std).abs() < 1e-9,
                    "{got:?} {want:?}"
                );
                assert_eq!((got.min, got.min_seed), (want.min, want.worst_seed));
                assert_eq!((got.max, got.max_seed), (want.max, want.best_seed));
            }
            (want, got) => panic!("recomputed {want:?}, live {got:?}"),
        }
    }
    assert!(
        late > 0 && duplicates > 0,
        "late {late}, duplicates {duplicates}"
    );
    let (scores, last) = s.scores(id, Metric::TestAccuracy, 0).await.unwrap();
    let p = s.sweep_progress(id).await.unwrap();
    assert_eq!(p.counts.done + p.counts.failed, 30, "every seed ends");
    let mut seeds: Vec<i64> = scores.iter().map(|r| r.seed).collect();
    seeds.sort();
    seeds.dedup();
    assert_eq!(
        seeds.len() as u64,
        p.counts.done,
        "each finished seed counted once"
    );
    let (tail, _) = s.scores(id, Metric::TestAccuracy, last).await.unwrap();
    assert!(tail.is_empty(), "nothing after the last position");
    // The unordered full read holds the same runs.
    let key = |r: &seedsweep_core::domain::Scored| (r.seed, r.factors, r.value.to_bits());
    let mut all: Vec<_> = s
        .all_scores(id, Metric::TestAccuracy)
        .await
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let mut ordered: Vec<_> = scores.iter().map(key).collect();
    all.sort();
    ordered.sort();
    assert_eq!(all, ordered);
    // Epochs of the finished seeds (a seed that ran out of attempts keeps its partial curve in
    // epoch_metrics, outside the statistics).
    let epoch_points: Vec<(u32, f64)> = s
        .epoch_scores(id, Metric::TestAccuracy, None)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e, v)| (e, v))
        .collect();
    assert_eq!(epoch_points.len() as u64, 2 * p.counts.done);
    // The curves of chosen seeds only (the report's sample).
    let chosen = scores[0].seed;
    let some = s
        .epoch_scores(id, Metric::TestAccuracy, Some(&[chosen]))
        .await
        .unwrap();
    assert_eq!(some.len(), 2);
    assert!(some.iter().all(|(seed, _, _)| *seed == chosen), "{some:?}");
    test_sets_are_kept(s.as_ref(), id, url, p.counts.done).await;
    let at_two = epoch_points.iter().filter(|e| e.0 == 2).count() as i64;
    // The store's per-epoch spread (from the live epoch_values counts) equals the one computed
    // here, and so does the scan it replaces (SQL on PostgreSQL).
    let spread = s.epoch_spread(id, Metric::TestAccuracy).await.unwrap();
    let scanned = s.epoch_spread_scan(id, Metric::TestAccuracy).await.unwrap();
    let want_spread = stats::describe::epoch_spread(&epoch_points);
    assert_eq!(spread.len(), want_spread.len());
    assert_eq!(scanned.len(), want_spread.len());
    for (g, w) in spread
        .iter()
        .chain(&scanned)
        .zip(want_spread.iter().chain(&want_spread))
    {
        assert_eq!((g.epoch, g.n), (w.epoch, w.n));
        for (a, b) in [
            (g.mean, w.mean),
            (g.std, w.std),
            (g.min, w.min),
            (g.max, w.max),
            (g.q1, w.q1),
            (g.median, w.median),
            (g.q3, w.q3),
        ] {
            assert!((a - b).abs() < 1e-9, "{g:?} vs {w:?}");
        }
    }
    let want = stats::summarize(
        &scores.iter().map(|r| (r.seed, r.value)).collect::<Vec<_>>(),
        Direction::Max,
    )
    .unwrap();

    // The views, through plain SQL.
    let (view, epochs): ((i64, f64, f64, i64), (i64, f64)) = if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let sql = "SELECT n, mean, std, best_seed FROM sweep_summary WHERE sweep_id::text = $1";
        let v = sqlx::query_as(sql)
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        let sql = "SELECT n, mean FROM epoch_summary WHERE sweep_id::text = $1 AND epoch = 2";
        (
            v,
            sqlx::query_as(sql)
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap(),
        )
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let sql = "SELECT n, mean, std, best_seed FROM sweep_summary WHERE sweep_id = ?";
        let v = sqlx::query_as(sql)
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        let sql = "SELECT n, mean FROM epoch_summary WHERE sweep_id = ? AND epoch = 2";
        (
            v,
            sqlx::query_as(sql)
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap(),
        )
    };
    assert_eq!(view.0 as u64, want.n);
    assert!((view.1 - want.mean).abs() < 1e-12 && (view.2 - want.std).abs() < 1e-9);
    assert_eq!(view.3, want.best_seed);
    let two: Vec<f64> = epoch_points
        .iter()
        .filter(|e| e.0 == 2)
        .map(|e| e.1)
        .collect();
    assert_eq!(epochs.0, at_two);
    assert!((epochs.1 - two.iter().sum::<f64>() / two.len() as f64).abs() < 1e-12);
}

/// Big sweeps load in batches: a load in progress is hidden from claims and listings, a whole
/// sweep is all there once created, extensions count into the total and are refused up front
/// past the limit, and the next submission deletes a load abandoned long ago.
async fn loading(s: Arc<dyn Store>, clock: Clock) {
    let s = s.as_ref();
    let n = store::LOAD_BATCH * 2 + 7;
    let big = spec(&format!("\"0..{n}\""), 1);
    let stuck = SweepId::new();
    s.begin_sweep(stuck, &big, &big.seeds.as_slice()[..10])
        .await
        .unwrap();
    assert!(matches!(
        s.claim("w", TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 0 }
    ));
    assert!(s.list_sweeps().await.unwrap().is_empty());
    let one = SeedSet::parse_range("0..1").unwrap();
    assert!(matches!(
        s.extend_sweep(stuck, &one).await,
        Err(StoreError::SweepNotFound(_))
    ));

    let id = SweepId::new();
    s.create_sweep(id, &big).await.unwrap();
    let listed = s.list_sweeps().await.unwrap();
    assert_eq!(
        (listed.len(), listed[0].id, listed[0].total),
        (1, id, n as u64)
    );
    assert_eq!(s.sweep_progress(id).await.unwrap().counts.pending, n as u64);
    assert_eq!(claim(s, "w").await.lease.seed, 0);

    // An extension overlapping the sweep adds only what is new, batch by batch.
    let more = SeedSet::parse_range(&format!("{}..{}", n - 5, n + store::LOAD_BATCH + 3)).unwrap();
    assert_eq!(
        s.extend_sweep(id, &more).await.unwrap(),
        store::LOAD_BATCH as u64 + 3
    );
    let total = (n + store::LOAD_BATCH + 3) as u64;
    assert_eq!(s.list_sweeps().await.unwrap()[0].total, total);
    let past = SeedSet::parse_range(&format!("0..{}", seedsweep_core::spec::MAX_SEEDS)).unwrap();
    let Err(StoreError::Conflict(msg)) = s.extend_sweep(id, &past).await else {
        panic!("an extension past the limit")
    };
    assert!(msg.contains("at most 10000000"), "{msg}");
    assert_eq!(s.list_sweeps().await.unwrap()[0].total, total);

    // The stuck load is deleted by a submission once it has been still for ten minutes.
    s.create_sweep(SweepId::new(), &spec("[1]", 1))
        .await
        .unwrap();
    assert!(s.sweep_config(stuck).await.is_ok());
    clock.advance(Duration::from_secs(601));
    s.create_sweep(SweepId::new(), &spec("[1]", 1))
        .await
        .unwrap();
    assert!(matches!(
        s.sweep_config(stuck).await,
        Err(StoreError::SweepNotFound(_))
    ));
    assert_eq!(s.list_sweeps().await.unwrap().len(), 3);
}

/// `hits` of 10,000 test examples marked right, which ones depending on the seed.
fn bitmap(seed: i64, hits: u32) -> Vec<u8> {
    let mut bits = vec![0u8; 1250];
    for i in 0..10_000i64 {
        // i -> (7919 i + 104729 seed) mod 10^4 is a bijection: exactly `hits` examples.
        if (i * 7919 + seed * 104_729).rem_euclid(10_000) < i64::from(hits) {
            bits[i as usize / 8] |= 1 << (i % 8);
        }
    }
    bits
}

/// The sweep's test-set tally, folded from the bitmaps queued as results were recorded, is the
/// one its bitmaps make; a fold leaves nothing queued; and a sweep whose bitmaps are all queued
/// again (as migration 0006 queues those that predate the tallies) is tallied whole.
async fn test_sets_are_kept(s: &dyn Store, id: SweepId, url: &str, done: u64) {
    let mut want = TestSetTally::new(10_000);
    for (_, c) in s.correctness(id).await.unwrap() {
        want.add(&c.bits);
    }
    assert_eq!(want.sums.runs as u64, done);
    // Queued, unless a read of the aggregates folded it already (PostgreSQL folds all at once).
    let queued = s.unfolded_sweeps().await.unwrap();
    assert!(queued.is_empty() || queued == vec![id], "{queued:?}");
    assert_eq!(s.test_sets(id).await.unwrap(), vec![want.clone()]);
    assert_eq!(s.unfolded_sweeps().await.unwrap(), vec![]);
    assert_eq!(s.fold_tallies(id).await.unwrap(), 0);
    let forget = "DELETE FROM test_sets";
    let queue = "INSERT INTO test_sets_unfolded SELECT sweep_id, seed FROM result_bitmaps";
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(forget).execute(&pool).await.unwrap();
        sqlx::query(queue).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(forget).execute(&pool).await.unwrap();
        sqlx::query(queue).execute(&pool).await.unwrap();
    }
    assert_eq!(s.folded_test_sets(id).await.unwrap(), vec![]);
    assert_eq!(s.fold_tallies(id).await.unwrap(), done);
    assert_eq!(s.folded_test_sets(id).await.unwrap(), vec![want]);
}

/// Epoch rows of many leases written in one batch: each judged on its own (a stale lease's and an
/// unknown seed's refused, the others written), a key sent twice keeps its last row, and a
/// re-leased seed starts with none of the earlier lease's rows.
async fn epoch_batches(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let id = SweepId::new();
    s.create_sweep(id, &spec("\"0..3\"", 3)).await.unwrap();
    let a = claim(s, "a").await.lease;
    let b = claim(s, "b").await.lease;
    let stale = LeaseRef {
        fence: b.fence + 1,
        ..b
    };
    let unknown = LeaseRef { seed: 99, ..a };
    let mut again = epoch(1);
    again.train_loss = Some(0.25);
    let rows = [
        (a, epoch(1)),
        (stale, epoch(1)),
        (unknown, epoch(1)),
        (b, epoch(1)),
        (a, again),
    ];
    let verdicts = s.record_epochs(&rows).await.unwrap();
    assert!(verdicts[0].is_ok() && verdicts[3].is_ok() && verdicts[4].is_ok());
    assert!(matches!(verdicts[1], Err(StoreError::StaleLease(_))));
    assert!(matches!(verdicts[2], Err(StoreError::SeedNotFound { .. })));
    let rows = s.list_epochs(id, None, 100).await.unwrap();
    let seeds: Vec<(i64, u32, Option<f64>)> = rows
        .iter()
        .map(|(seed, e)| (*seed, e.epoch, e.train_loss))
        .collect();
    assert_eq!(seeds, vec![(a.seed, 1, Some(0.25)), (b.seed, 1, Some(1.0))]);
    let gone = SweepId::new();
    let verdicts = s
        .record_epochs(&[(
            LeaseRef {
                sweep_id: gone,
                ..a
            },
            epoch(1),
        )])
        .await
        .unwrap();
    assert!(matches!(verdicts[0], Err(StoreError::SweepNotFound(_))));
    // The lease of `a` handed back and re-leased: its rows went with it.
    s.fail(a, "gone", Charge::Uncounted).await.unwrap();
    let a2 = claim(s, "c").await.lease;
    assert_eq!(a2.seed, a.seed);
    let left: Vec<i64> = s
        .list_epochs(id, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(left, vec![b.seed]);
}

/// A program's custom metrics (task command) are kept with their rows and read like columns:
/// scores, curves, spread, aggregates; a re-sent epoch row replaces them with its own.
async fn custom_metrics(s: Arc<dyn Store>) {
    let s = s.as_ref();
    let id = SweepId::new();
    s.create_sweep(id, &spec("\"0..3\"", 3)).await.unwrap();
    let ece = Metric::custom("ece").unwrap();
    let with = |e: EpochRecord, pairs: &[(&str, f64)]| EpochRecord {
        custom: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..e
    };
    let mut expected = Vec::new();
    for i in 0..3 {
        let l = claim(s, "w").await.lease;
        let v = 0.05 + 0.01 * i as f64;
        // A first report of epoch 1 that the re-sent one replaces, custom metrics and all.
        s.record_epoch(l, &with(epoch(1), &[("ece", 9.0), ("gone", 1.0)]))
            .await
            .unwrap();
        s.record_epoch(l, &with(epoch(1), &[("ece", v + 0.1)]))
            .await
            .unwrap();
        s.record_epoch(l, &with(last_epoch(0.5), &[("ece", v)]))
            .await
            .unwrap();
        let mut r = result(l.seed, 0.5);
        r.custom = [
            ("ece".to_string(), v),
            ("bleu".to_string(), 30.0 + i as f64),
        ]
        .into();
        s.complete(l, &r).await.unwrap();
        expected.push((l.seed, v));
    }
    let mut scores: Vec<(i64, f64)> = s
        .all_scores(id, ece)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.seed, r.value))
        .collect();
    scores.sort_by_key(|p| p.0);
    assert_eq!(scores, expected);
    assert_eq!(s.scores(id, ece, 0).await.unwrap().0.len(), 3);
    let curves = s.epoch_scores(id, ece, None).await.unwrap();
    assert_eq!(curves.len(), 6);
    assert!(curves.iter().all(|&(seed, e, v)| {
        let last = expected.iter().find(|p| p.0 == seed).unwrap().1;
        (v - if e == 2 { last } else { last + 0.1 }).abs() < 1e-12
    }));
    let spread = s.epoch_spread(id, ece).await.unwrap();
    assert_eq!(spread.iter().map(|e| e.n).collect::<Vec<_>>(), vec![3, 3]);
    assert!((spread[1].mean - 0.06).abs() < 1e-12);
    let bleu = s.aggregates(id).await.unwrap();
    let bleu = bleu
        .iter()
        .find(|a| a.metric == Metric::custom("bleu").unwrap())
        .expect("an aggregate of the custom metric");
    assert_eq!((bleu.moments.n, bleu.min, bleu.max), (3, 30.0, 32.0));
    let listed = s.list_results(id, None, 10).await.unwrap();
    assert_eq!(listed[0].custom.get("bleu"), Some(&30.0));
    let rows = s.list_epochs(id, None, 10).await.unwrap();
    assert_eq!(rows[0].1.custom.keys().collect::<Vec<_>>(), vec!["ece"]);
    // A metric no result has reads as no scores, not an error.
    let none = Metric::custom("absent").unwrap();
    assert!(s.all_scores(id, none).await.unwrap().is_empty());
}

/// Two coordinators on one database (replicas): a result is recorded once, whichever replica
/// wrote its epoch rows and whichever takes its completion, and what a replica remembers of the
/// rows it wrote never stands in for what the database holds.
async fn replicas(url: &str) {
    let (a, _) = open(url).await;
    let (b, _) = open(url).await;
    let (a, b) = (a.as_ref(), b.as_ref());
    let id = SweepId::new();
    a.create_sweep(id, &spec("\"0..3\"", 3)).await.unwrap();
    let both = |l: LeaseRef| [(l, epoch(1)), (l, last_epoch(0.5))];
    // The last epoch re-sent through the other replica (a replay after a reconnect).
    let replayed = claim(a, "w").await.lease;
    a.record_epochs(&both(replayed)).await.unwrap();
    b.record_epochs(&[(replayed, last_epoch(0.5))])
        .await
        .unwrap();
    assert_eq!(
        a.complete(replayed, &result(replayed.seed, 0.5))
            .await
            .unwrap(),
        CompleteOutcome::Recorded
    );
    // The last epoch replaced through the other replica: the result is judged against the row
    // the database holds, which its final metrics do not match.
    let replaced = claim(a, "w").await.lease;
    a.record_epochs(&both(replaced)).await.unwrap();
    b.record_epochs(&[(replaced, last_epoch(0.75))])
        .await
        .unwrap();
    let refused = a.complete(replaced, &result(replaced.seed, 0.5)).await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    // Completed through the other replica, then retried through the one that wrote the rows.
    let elsewhere = claim(a, "w").await.lease;
    a.record_epochs(&both(elsewhere)).await.unwrap();
    assert_eq!(
        b.complete(elsewhere, &result(elsewhere.seed, 0.5))
            .await
            .unwrap(),
        CompleteOutcome::Recorded
    );
    assert_eq!(
        a.complete(elsewhere, &result(elsewhere.seed, 0.5))
            .await
            .unwrap(),
        CompleteOutcome::AlreadyRecorded
    );
    let recorded: Vec<i64> = a
        .list_results(id, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seed)
        .collect();
    assert_eq!(recorded, vec![replayed.seed, elsewhere.seed]);
}

async fn run_replicas(url: String) {
    replicas(&url).await;
}

async fn run_custom_metrics(url: String) {
    custom_metrics(open(&url).await.0).await;
}

async fn run_epoch_batches(url: String) {
    let s = open(&url).await.0;
    epoch_batches(s.clone()).await;
    deleting_a_sweep_deletes_its_rows(s, &url).await;
}

/// The tables holding rows of a seed: a deleted sweep leaves none in any of them. (SQLite has
/// no `aggregates_unfolded`: it updates the aggregates as it records each result.)
const SEED_TABLES: [&str; 6] = [
    "epoch_metrics",
    "attempts",
    "results",
    "result_bitmaps",
    "test_sets_unfolded",
    "aggregates_unfolded",
];

/// A sweep deleted with SQL (as a user cleaning up does) takes its seeds' rows with it (attempts,
/// epoch rows, results, bitmaps, fold queues): by foreign keys on SQLite, by a trigger on
/// PostgreSQL (migrations 0011 and 0012). Another sweep's rows stay.
async fn deleting_a_sweep_deletes_its_rows(s: Arc<dyn Store>, url: &str) {
    let id = SweepId::new();
    s.create_sweep(id, &spec("\"0..2\"", 3)).await.unwrap();
    let kept = SweepId::new();
    s.create_sweep(kept, &spec("\"0..2\"", 3)).await.unwrap();
    let mut rows = Vec::new();
    let mut leases = Vec::new();
    // The scenario before left a seed pending in an older sweep: it may come first.
    for worker in ["a", "b", "c", "d", "e"] {
        let lease = claim(s.as_ref(), worker).await.lease;
        if [id, kept].contains(&lease.sweep_id) {
            rows.extend([(lease, epoch(1)), (lease, last_epoch(0.5))]);
            leases.push(lease);
        }
    }
    assert_eq!(rows.len(), 8);
    for verdict in s.record_epochs(&rows).await.unwrap() {
        verdict.unwrap();
    }
    // One seed of each sweep finishes, with its bitmap; the other is still leased.
    for sweep in [id, kept] {
        let lease = *leases.iter().find(|l| l.sweep_id == sweep).unwrap();
        let r = SeedResult {
            test_correct: Some(Correctness {
                examples: 10_000,
                bits: bitmap(lease.seed, 5_000),
            }),
            ..result(lease.seed, 0.5)
        };
        assert_eq!(
            s.complete(lease, &r).await.unwrap(),
            CompleteOutcome::Recorded
        );
    }
    let before = rows_of(url, id).await;
    // The fold queues may have been folded already.
    assert!(before[..4].iter().all(|&n| n > 0), "{before:?}");
    let kept_before = rows_of(url, kept).await;
    delete_sweep(url, id).await;
    let after = rows_of(url, id).await;
    assert!(
        after.iter().all(|&n| n == 0),
        "rows of {SEED_TABLES:?} left: {after:?}"
    );
    assert_eq!(rows_of(url, kept).await, kept_before);
    assert_eq!(s.list_epochs(kept, None, 100).await.unwrap().len(), 4);
    assert!(matches!(
        s.list_epochs(id, None, 100).await,
        Err(StoreError::SweepNotFound(_))
    ));
}

/// How many rows of sweep `id` each of [`SEED_TABLES`] holds, read with SQL.
async fn rows_of(url: &str, id: SweepId) -> Vec<i64> {
    let postgres = url.starts_with("postgres");
    let counts = SEED_TABLES
        .iter()
        .filter(|&&table| postgres || table != "aggregates_unfolded")
        .map(|table| format!("SELECT count(*) FROM {table} WHERE sweep_id = $1"));
    let mut rows = Vec::new();
    if postgres {
        let db = sqlx::PgPool::connect(url).await.unwrap();
        for sql in counts {
            let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(id.0);
            rows.push(query.fetch_one(&db).await.unwrap());
        }
    } else {
        let db = sqlx::SqlitePool::connect(url).await.unwrap();
        for sql in counts {
            let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(id.0.to_string());
            rows.push(query.fetch_one(&db).await.unwrap());
        }
    }
    rows
}

/// Deletes sweep `id` with SQL, as a user would.
async fn delete_sweep(url: &str, id: SweepId) {
    let sql = "DELETE FROM sweeps WHERE id = $1";
    if url.starts_with("postgres") {
        let db = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).bind(id.0).execute(&db).await.unwrap();
    } else {
        let db = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql)
            .bind(id.0.to_string())
            .execute(&db)
            .await
            .unwrap();
    }
}

/// The store at `url` with a clock the scenario moves.
async fn open(url: &str) -> (Arc<dyn Store>, Clock) {
    let clock = Clock::database();
    let s = store::connect_with_clock(url, clock.clone()).await.unwrap();
    (s, clock)
}

async fn run_leases(url: String) {
    let (s, clock) = open(&url).await;
    suite(s, clock).await;
}

async fn run_retries_and_control(url: String) {
    let (s, clock) = open(&url).await;
    retries_and_control(s, clock).await;
}

async fn run_loading(url: String) {
    let (s, clock) = open(&url).await;
    loading(s, clock).await;
}

async fn run_concurrent_claims(url: String) {
    concurrent_claims(open(&url).await.0).await;
}

async fn run_live_aggregates(url: String) {
    let (s, clock) = open(&url).await;
    live_aggregates(s, clock, &url).await;
}

/// A claim serves only sweeps of the tasks the worker runs, and counts only their seeds as
/// outstanding: a program-only worker never takes a recipe's seed, and leaves once its own work
/// is done though a recipe's seeds wait.
async fn claims_by_task(url: String) {
    use seedsweep_core::spec::Task;
    let (s, _) = open(&url).await;
    let recipe = SweepId::new();
    let mut first = spec("\"0..2\"", 3);
    first.priority = 5;
    s.create_sweep(recipe, &first).await.unwrap();
    let program = SweepId::new();
    let own = SweepSpec::parse(
        "name = \"own\"\ntask = \"command\"\nseeds = \"0..1\"\n[command]\nargv = [\"x\"]\n",
    )
    .unwrap();
    s.create_sweep(program, &own).await.unwrap();
    let only_programs = [Task::Command];
    let ClaimOutcome::Leased(l) = s.claim_for("cpu", &only_programs, TTL).await.unwrap() else {
        panic!("the command sweep's seed was not leased")
    };
    assert_eq!((l.lease.sweep_id, l.task), (program, Task::Command));
    // Only the command sweep's leased seed is outstanding for it.
    assert!(matches!(
        s.claim_for("cpu", &only_programs, TTL).await.unwrap(),
        ClaimOutcome::Empty { outstanding: 1 }
    ));
    // Any task: the higher-priority recipe first.
    assert_eq!(claim(s.as_ref(), "gpu").await.lease.sweep_id, recipe);
    let builtin = [Task::Resnet9, Task::FinetuneHead];
    let ClaimOutcome::Leased(l) = s.claim_for("gpu", &builtin, TTL).await.unwrap() else {
        panic!("the recipe's second seed was not leased")
    };
    assert_eq!(l.lease.sweep_id, recipe);
}

/// One named test per scenario and database (`store_conformance::leases::sqlite`, ...), each on a
/// fresh database, so that one scenario's failure hides no other.
macro_rules! conformance {
    ($($scenario:ident => $run:ident),+ $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                super::$run(format!("sqlite://{}", dir.path().join("s.db").display())).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let pg = seedsweep_tests::PgServer::start().unwrap();
                super::$run(pg.fresh_database().unwrap()).await;
            }
        }
    )+};
}

conformance!(
    leases => run_leases,
    retries_and_control => run_retries_and_control,
    concurrent_claims => run_concurrent_claims,
    live_aggregates => run_live_aggregates,
    loading => run_loading,
    epoch_batches => run_epoch_batches,
    custom_metrics => run_custom_metrics,
    replicas => run_replicas,
    claims_by_task => claims_by_task,
);

/// Connections the PostgreSQL store keeps between statements, cut by the server while idle (an
/// administrator's `pg_terminate_backend`, `idle_session_timeout`, a failover), are replaced
/// without failing a statement: one idle for a while is pinged before it is lent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_cut_while_idle_are_replaced() {
    let pg = seedsweep_tests::PgServer::start().unwrap();
    let url = pg.fresh_database().unwrap();
    let s = open(&url).await.0;
    s.create_sweep(SweepId::new(), &spec("\"0..2\"", 3))
        .await
        .unwrap();
    let first = claim(s.as_ref(), "a").await.lease;
    finish(s.as_ref(), first, 0.5).await;
    let cut = pg.psql(
        &url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'seedsweep-coordinator'",
    );
    assert!(cut.trim().parse::<u32>().unwrap() >= 2, "cut {cut}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = claim(s.as_ref(), "b").await.lease;
    s.heartbeat(second, TTL).await.unwrap();
    finish(s.as_ref(), second, 0.6).await;
}

#[tokio::test]
async fn rejects_unknown_database_urls_without_leaking_passwords() {
    let e = store::connect("mysql://u:hunter2@h/db")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sqlite://") && !e.contains("hunter2"), "{e}");
}

/// A SQLite database written before migration 0004, holding results with bitmaps: opening it
/// moves the bitmaps to `result_bitmaps` and tallies them.
#[tokio::test]
async fn bitmaps_recorded_before_the_tallies_are_moved_and_tallied() {
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display());
    let before: Vec<Migration> = ["0001_init", "0002_statistics", "0003_epoch_values"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let path = seedsweep_tests::repo_root().join(format!("migrations/sqlite/{name}.sql"));
            let sql = std::fs::read_to_string(path).unwrap();
            let description = name.split_once('_').unwrap().1.replace('_', " ");
            Migration::new(
                i as i64 + 1,
                description.into(),
                MigrationType::Simple,
                sqlx::AssertSqlSafe(sql).into_sql_str(),
                false,
            )
        })
        .collect();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    Migrator::with_migrations(before).run(&pool).await.unwrap();
    let id = SweepId::new();
    sqlx::query(
        "INSERT INTO sweeps (id, seq, name, task, dataset, config, max_attempts, total_seeds)
         VALUES (?1, 1, 'old', 'resnet9', 'synthetic', '{}', 1, 3)",
    )
    .bind(id.0.to_string())
    .execute(&pool)
    .await
    .unwrap();
    let mut want = TestSetTally::new(10_000);
    for seed in 0..3i64 {
        let hits = 9_000 + 100 * seed as u32;
        let bits = bitmap(seed, hits);
        want.add(&bits);
        sqlx::query(
            "INSERT INTO seeds (sweep_id, seed, init_seed, order_seed, augment_seed, split_seed,
                                state, fence)
             VALUES (?1, ?2, ?2, ?2, ?2, ?2, 'done', 1)",
        )
        .bind(id.0.to_string())
        .bind(seed)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO results (sweep_id, seed, fence, test_accuracy, test_loss, train_loss,
                 train_accuracy, epochs, seconds, worker_id, device, data_fingerprint, init_seed,
                 order_seed, augment_seed, split_seed, precision, deterministic, test_examples,
                 test_correct)
             VALUES (?1, ?2, 1, ?3, 0.3, 0.2, 0.9, 2, 1, 'w', 'cpu', 'sha256:00', ?2, ?2, ?2, ?2,
                     'fp32', 1, 10000, ?4)",
        )
        .bind(id.0.to_string())
        .bind(seed)
        .bind(f64::from(hits) / 1e4)
        .bind(bits)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    let (s, _) = open(&url).await;
    assert_eq!(s.correctness(id).await.unwrap().len(), 3);
    assert_eq!(s.test_sets(id).await.unwrap(), vec![want]);
}
