//! A property test of the lease protocol: random sequences of claims, heartbeats, clock advances,
//! epoch reports, completions and failures, from fresh and stale leases, run against each store and
//! checked step by step against a small model. Time comes from a clock the test controls.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use seedsweep_coordinator::store::{self, Clock, Store, StoreError};
use seedsweep_core::domain::{
    ClaimOutcome, CompleteOutcome, EpochRecord, LeaseRef, SeedResult, SeedState, SweepId,
};
use seedsweep_core::policy::Charge;
use seedsweep_core::spec::SweepSpec;
use seedsweep_tests::PgServer;
use std::collections::BTreeMap;
use std::time::Duration;

const SEEDS: i64 = 3;
const MAX_ATTEMPTS: u32 = 4;
const TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    Pending,
    Leased { expires: u64 },
    Done { fence: i64 },
    Failed,
}

/// What the protocol promises, in a few lines: time `now` counts clock advances of TTL + 1 s.
#[derive(Debug)]
struct Model {
    now: u64,
    seeds: BTreeMap<i64, (St, i64, u32)>, // state, fence, failures
    epochs: BTreeMap<(i64, i64), u32>,    // (seed, fence) -> epochs recorded
}

impl Model {
    fn live(&self, l: LeaseRef) -> bool {
        matches!(self.seeds[&l.seed], (St::Leased { .. }, f, _) if f == l.fence)
    }

    fn expire(&mut self) {
        for (st, _, failures) in self.seeds.values_mut() {
            if let St::Leased { expires } = *st
                && expires <= self.now
            {
                *failures += 1;
                *st = if *failures >= MAX_ATTEMPTS {
                    St::Failed
                } else {
                    St::Pending
                };
            }
        }
    }
}

fn epoch(n: u32) -> EpochRecord {
    EpochRecord {
        epoch: n,
        train_loss: Some(1.0),
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

fn result(seed: i64) -> SeedResult {
    SeedResult {
        seed,
        test_accuracy: Some(0.5),
        test_loss: Some(1.0),
        train_loss: Some(1.0),
        train_accuracy: Some(0.5),
        epochs: 2,
        diverged_epoch: None,
        seconds: 1.0,
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

fn stale(r: &Result<(), StoreError>) -> bool {
    matches!(r, Err(StoreError::StaleLease(_)))
}

async fn run_one(s: &dyn Store, clock: &Clock, rng_seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(rng_seed);
    let id = SweepId::new();
    let spec = SweepSpec::parse(&format!(
        "name = \"model\"\ntask = \"resnet9\"\ndataset = \"d\"\nseeds = \"0..{SEEDS}\"\n\
         max_attempts = {MAX_ATTEMPTS}\nretry_backoff_seconds = 0\n[train]\nepochs = 2\n"
    ))
    .unwrap();
    s.create_sweep(id, &spec).await.unwrap();
    let mut m = Model {
        now: 0,
        seeds: (0..SEEDS).map(|i| (i, (St::Pending, 0, 0))).collect(),
        epochs: BTreeMap::new(),
    };
    let mut leases: Vec<LeaseRef> = Vec::new(); // every lease ever handed out: fresh and stale
    for step in 0..steps {
        let pick =
            |rng: &mut StdRng, leases: &[LeaseRef]| leases[rng.random_range(0..leases.len())];
        let ctx = format!("seed {rng_seed} step {step}");
        match rng.random_range(0..10) {
            0..=2 => {
                m.expire();
                let expected = m
                    .seeds
                    .iter()
                    .find(|(_, (st, _, _))| *st == St::Pending)
                    .map(|(k, _)| *k);
                match (s.claim("w", TTL).await.unwrap(), expected) {
                    (ClaimOutcome::Leased(l), Some(seed)) => {
                        let (st, fence, _) = m.seeds.get_mut(&seed).unwrap();
                        assert_eq!((l.lease.seed, l.lease.fence), (seed, *fence + 1), "{ctx}");
                        *fence += 1;
                        *st = St::Leased { expires: m.now + 1 };
                        leases.push(l.lease);
                    }
                    (ClaimOutcome::Empty { .. }, None) => {}
                    (got, want) => panic!("{ctx}: claim gave {got:?}, model expected {want:?}"),
                }
            }
            3 => {
                clock.advance(TTL + Duration::from_secs(1));
                m.now += 1;
            }
            _ if leases.is_empty() => {}
            4 => {
                let l = pick(&mut rng, &leases);
                let r = s.heartbeat(l, TTL).await;
                if m.live(l) {
                    r.unwrap_or_else(|e| panic!("{ctx}: heartbeat of live {l}: {e}"));
                    m.seeds.get_mut(&l.seed).unwrap().0 = St::Leased { expires: m.now + 1 };
                } else {
                    assert!(stale(&r), "{ctx}: heartbeat of dead {l} gave {r:?}");
                }
            }
            5..=6 => {
                let l = pick(&mut rng, &leases);
                let n = *m.epochs.get(&(l.seed, l.fence)).unwrap_or(&0);
                let r = s.record_epoch(l, &epoch((n + 1).min(2))).await;
                if m.live(l) {
                    r.unwrap_or_else(|e| panic!("{ctx}: epoch of live {l}: {e}"));
                    m.epochs.insert((l.seed, l.fence), (n + 1).min(2));
                } else {
                    assert!(stale(&r), "{ctx}: epoch of dead {l} gave {r:?}");
                }
            }
            7..=8 => {
                let l = pick(&mut rng, &leases);
                let r = s.complete(l, &result(l.seed)).await;
                let (st, _, _) = m.seeds[&l.seed];
                match r {
                    Ok(CompleteOutcome::Recorded) => {
                        assert!(
                            m.live(l) && m.epochs.get(&(l.seed, l.fence)) == Some(&2),
                            "{ctx}: {l} recorded"
                        );
                        m.seeds.get_mut(&l.seed).unwrap().0 = St::Done { fence: l.fence };
                    }
                    Ok(CompleteOutcome::AlreadyRecorded) => {
                        assert_eq!(
                            st,
                            St::Done { fence: l.fence },
                            "{ctx}: {l} already recorded"
                        )
                    }
                    Err(StoreError::Conflict(_)) => {
                        assert!(
                            m.live(l) && m.epochs.get(&(l.seed, l.fence)) != Some(&2),
                            "{ctx}"
                        )
                    }
                    Err(StoreError::StaleLease(_)) => {
                        assert!(!m.live(l) && st != St::Done { fence: l.fence }, "{ctx}")
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            _ => {
                let l = pick(&mut rng, &leases);
                let counts = rng.random_bool(0.5);
                let r = s
                    .fail(
                        l,
                        &format!("cause {step}"),
                        Charge::from_report(counts, true),
                    )
                    .await;
                if m.live(l) {
                    let state = r.unwrap_or_else(|e| panic!("{ctx}: fail of live {l}: {e}"));
                    let (st, _, failures) = m.seeds.get_mut(&l.seed).unwrap();
                    *failures += counts as u32;
                    *st = if counts && *failures >= MAX_ATTEMPTS {
                        St::Failed
                    } else {
                        St::Pending
                    };
                    let want = if *st == St::Failed {
                        SeedState::Failed
                    } else {
                        SeedState::Pending
                    };
                    assert_eq!(state, want, "{ctx}");
                } else {
                    assert!(
                        matches!(r, Err(StoreError::StaleLease(_))),
                        "{ctx}: fail of dead {l} gave {r:?}"
                    );
                }
            }
        }
        // The store agrees with the model on every count, and no seed has two results.
        let p = s.sweep_progress(id).await.unwrap();
        let count = |f: fn(&St) -> bool| m.seeds.values().filter(|(st, _, _)| f(st)).count() as u64;
        assert_eq!(
            p.counts.done,
            count(|s| matches!(s, St::Done { .. })),
            "{ctx}"
        );
        assert_eq!(p.counts.failed, count(|s| *s == St::Failed), "{ctx}");
        assert_eq!(
            p.counts.leased,
            count(|s| matches!(s, St::Leased { .. })),
            "{ctx}"
        );
        assert_eq!(
            p.aggregate(seedsweep_core::domain::Metric::TestAccuracy)
                .map_or(0, |a| a.moments.n),
            p.counts.done,
            "{ctx}"
        );
    }
}

async fn property(fresh: impl Fn() -> String) {
    for rng_seed in 0..6 {
        let clock = Clock::database();
        let s = store::connect_with_clock(&fresh(), clock.clone())
            .await
            .unwrap();
        run_one(s.as_ref(), &clock, rng_seed, 150).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_protocol_matches_the_model_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    property(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("sqlite://{}", dir.path().join(format!("m{i}.db")).display())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_protocol_matches_the_model_on_postgres() {
    let pg = PgServer::start().unwrap();
    property(|| pg.fresh_database().unwrap()).await;
}
