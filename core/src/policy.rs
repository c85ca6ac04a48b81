//! Lease policy: what a seed becomes when an attempt ends, whether a result or a state change is
//! accepted. Pure functions of what the store has read; each store wraps them in its own SQL and
//! locking, so the rules are written (and tested) once.

use crate::design::Design;
use crate::domain::{EpochRecord, LeaseRef, Metric, SeedResult, SeedState, SweepId, SweepState};
use crate::metric::Direction;
use crate::spec::command::CommandSpec;
use crate::spec::finetune::FinetuneSpec;
use crate::spec::{MAX_SEEDS, TrainSettings};

/// A failed attempt's seed waits `base * 2^(failures - 1)`, at most `max`, times a random factor in
/// [0.5, 1.5), before it can be leased again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    pub base_seconds: f64,
    pub max_seconds: f64,
}

impl RetrySettings {
    pub const DEFAULT: RetrySettings = RetrySettings {
        base_seconds: 10.0,
        max_seconds: 600.0,
    };

    /// The wait before the next attempt after `failures` failed attempts, with `jitter` in [0, 1).
    pub fn backoff_seconds(&self, failures: u32, jitter: f64) -> f64 {
        let doubled = self.base_seconds * 2f64.powi(failures.saturating_sub(1).min(60) as i32);
        doubled.min(self.max_seconds) * (0.5 + jitter)
    }
}

/// Whether a worker's failure report costs the seed an attempt (the wire's `counts_as_attempt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Training failed: the seed is charged an attempt. `deterministic`: the run repeats bit
    /// for bit (the wire's `deterministic`), so the same cause on another worker would recur.
    Counted { deterministic: bool },
    /// The worker hands the seed back through no fault of the seed (shutdown, host trouble).
    Uncounted,
}

impl Charge {
    pub fn from_report(counted: bool, deterministic: bool) -> Charge {
        if counted {
            Charge::Counted { deterministic }
        } else {
            Charge::Uncounted
        }
    }

    /// How the attempt ends, given whether an attempt on another worker already failed with the
    /// same cause. Only a deterministic run's repeated cause ends the seed at once: GPU training
    /// (by default) and most programs do not repeat, and may fail otherwise next time.
    pub fn end(self, same_cause_elsewhere: bool) -> AttemptEnd {
        match (self, same_cause_elsewhere) {
            (Charge::Uncounted, _) => AttemptEnd::Released,
            (
                Charge::Counted {
                    deterministic: true,
                },
                true,
            ) => AttemptEnd::FailedAsBefore,
            (Charge::Counted { .. }, _) => AttemptEnd::Failed,
        }
    }
}

/// How an attempt ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Handed back uncounted: the seed is pending again at once.
    Released,
    /// Training failed: counted; the seed retries after a backoff while it has attempts left.
    Failed,
    /// Training failed with a cause an earlier attempt on another worker also failed with:
    /// counted and final, since training is deterministic and a further try fails the same way.
    FailedAsBefore,
    /// The lease ran out without a heartbeat: counted, like a failure.
    Expired,
}

/// The `attempts.outcome` of an attempt, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Running,
    Succeeded,
    Failed,
    Released,
    Expired,
    Cancelled,
}

crate::domain::names!(AttemptOutcome {
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Released => "released",
    Expired => "expired",
    Cancelled => "cancelled",
});

impl AttemptEnd {
    pub fn counted(self) -> bool {
        self != AttemptEnd::Released
    }

    pub fn outcome(self) -> AttemptOutcome {
        match self {
            AttemptEnd::Released => AttemptOutcome::Released,
            AttemptEnd::Failed | AttemptEnd::FailedAsBefore => AttemptOutcome::Failed,
            AttemptEnd::Expired => AttemptOutcome::Expired,
        }
    }
}

/// The cause recorded for an expired lease.
pub const EXPIRED_CAUSE: &str = "lease expired: no heartbeat before its deadline";

/// Where a seed goes when an attempt ends without a result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NextState {
    /// Pending or failed.
    pub state: SeedState,
    /// Counted attempts so far, this one included.
    pub failures: u32,
    /// For a counted attempt whose seed is pending again: seconds before it may be leased.
    pub backoff_seconds: Option<f64>,
}

/// A seed's counted attempts so far and its sweep's retry rules, as the store reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempts {
    pub failures: u32,
    pub max_attempts: u32,
    pub retry: RetrySettings,
}

/// What an attempt's end does to a seed with `attempts` behind it, with `jitter` in [0, 1) for
/// the backoff.
pub fn after_attempt(end: AttemptEnd, attempts: &Attempts, jitter: f64) -> NextState {
    let failures = attempts.failures + end.counted() as u32;
    let out_of_attempts = end.counted() && failures >= attempts.max_attempts;
    let state = if end == AttemptEnd::FailedAsBefore || out_of_attempts {
        SeedState::Failed
    } else {
        SeedState::Pending
    };
    let backoff_seconds = (end.counted() && state == SeedState::Pending)
        .then(|| attempts.retry.backoff_seconds(failures, jitter));
    NextState {
        state,
        failures,
        backoff_seconds,
    }
}

/// Why the store refuses a write.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The lease named was superseded, released or finished: the caller no longer holds the seed.
    Stale(LeaseRef),
    /// The write is well-formed but contradicts what the store holds.
    Conflict(String),
}

/// A write under `lease` is accepted only while the seed (now `state` under `fence`) is leased
/// under exactly that fence.
pub fn check_held(lease: LeaseRef, state: SeedState, fence: i64) -> Result<(), Refusal> {
    match state {
        SeedState::Leased if fence == lease.fence => Ok(()),
        _ => Err(Refusal::Stale(lease)),
    }
}

/// What to do with a result sent under `lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Record,
    /// The same lease's result is already in (a retried call): accepted, nothing written.
    AlreadyRecorded,
}

/// Whether a result under `lease` is recorded, given the seed's `state` and `fence` now.
pub fn check_completion(
    lease: LeaseRef,
    state: SeedState,
    fence: i64,
) -> Result<Completion, Refusal> {
    match state {
        SeedState::Done if fence == lease.fence => Ok(Completion::AlreadyRecorded),
        _ => check_held(lease, state, fence).map(|()| Completion::Record),
    }
}

/// A result claiming `claimed` epochs is accepted only when exactly epochs `1..=claimed` were
/// recorded under its lease (`recorded` of them).
pub fn check_epochs_recorded(lease: LeaseRef, claimed: u32, recorded: u64) -> Result<(), Refusal> {
    if recorded == u64::from(claimed) {
        return Ok(());
    }
    Err(Refusal::Conflict(format!(
        "{lease}: the result claims {claimed} epochs but {recorded} epochs of metrics were recorded under this lease"
    )))
}

/// What every run of a sweep reports: how many epoch rows (epochs, or the fine-tune's
/// evaluations) and which optional metrics its task and settings can produce. A worker's report
/// of any other shape is refused: an under- or over-trained run must not enter the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    /// The epochs a run reports: exactly these, or at most these when not `exact` (a program
    /// of the researcher's own that decides when it is done).
    pub epochs: u32,
    pub exact: bool,
    /// The metric the sweep's statistics default to (`command.score`; else test_accuracy).
    pub score: Metric,
    /// Which way the score improves (`command.score_direction`; up for test_accuracy).
    pub direction: Direction,
    /// Top-5 accuracy: the fine-tune task's evaluations.
    pub top5: bool,
    /// Validation metrics: a ResNet-9 run with images held out (`holdout` > 0).
    pub validation: bool,
    /// Custom metrics: a program of the researcher's own (task command).
    pub custom: bool,
}

/// Which of the metrics a built-in task always reports, and which optional ones, a report
/// carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Every metric the built-in tasks always report: train_loss, train_accuracy and lr on each
    /// epoch; train_loss, train_accuracy, test_loss and test_accuracy on a result.
    pub basics: bool,
    pub top5: bool,
    pub validation: bool,
    pub custom: bool,
}

impl Reported {
    pub fn of_epoch(e: &EpochRecord) -> Reported {
        Reported {
            basics: e.train_loss.is_some() && e.train_accuracy.is_some() && e.lr.is_some(),
            top5: e.test_top5.is_some(),
            validation: e.val_loss.is_some() || e.val_accuracy.is_some(),
            custom: !e.custom.is_empty(),
        }
    }

    pub fn of_result(r: &SeedResult) -> Reported {
        let basics = [r.train_loss, r.train_accuracy, r.test_loss, r.test_accuracy];
        Reported {
            basics: basics.iter().all(Option::is_some),
            top5: r.test_top5.is_some(),
            validation: r.val_loss.is_some() || r.val_accuracy.is_some(),
            custom: !r.custom.is_empty(),
        }
    }
}

impl RunShape {
    pub fn of(
        train: &TrainSettings,
        finetune: Option<&FinetuneSpec>,
        command: Option<&CommandSpec>,
    ) -> RunShape {
        match (finetune, command) {
            (_, Some(c)) => RunShape {
                epochs: c.epochs.unwrap_or(crate::spec::command::MAX_EPOCHS),
                exact: c.epochs.is_some(),
                score: c.score.parse().unwrap_or(Metric::TestAccuracy),
                direction: c.direction(),
                top5: true,
                validation: true,
                custom: true,
            },
            (Some(f), None) => RunShape {
                epochs: f.finetune.evaluations(),
                exact: true,
                score: Metric::TestAccuracy,
                direction: Direction::Max,
                top5: true,
                validation: false,
                custom: false,
            },
            (None, None) => RunShape {
                epochs: train.epochs,
                exact: true,
                score: Metric::TestAccuracy,
                direction: Direction::Max,
                top5: false,
                validation: train.holdout > 0,
                custom: false,
            },
        }
    }

    /// Which way `metric` improves in this sweep: the score's direction for the score, the
    /// metric's natural one for any other ([`Direction::natural`]).
    pub fn direction_of(&self, metric: Metric) -> Direction {
        if metric == self.score {
            self.direction
        } else {
            Direction::natural(metric)
        }
    }

    /// Whether an epoch row numbered `epoch` carrying `reported` fits.
    pub fn check_epoch(&self, epoch: u32, reported: Reported) -> Result<(), String> {
        if epoch == 0 || epoch > self.epochs {
            return Err(format!(
                "epoch = {epoch}: this sweep's runs report epochs 1 to {}",
                self.epochs
            ));
        }
        self.check_metrics(reported)
    }

    /// Whether a result claiming `epochs` and carrying `reported` fits.
    pub fn check_result(&self, epochs: u32, reported: Reported) -> Result<(), String> {
        if !self.exact && (1..=self.epochs).contains(&epochs) {
            return self.check_metrics(reported);
        }
        if epochs != self.epochs {
            return Err(format!(
                "epochs = {epochs}: this sweep's runs train {} epochs (a run that stopped early reports FailSeed)",
                self.epochs
            ));
        }
        self.check_metrics(reported)
    }

    /// Whether a finished run's result fits: a converged run's epochs, metrics and score
    /// ([`RunShape::check_result`], [`RunShape::check_score`]), or a diverged run's.
    pub fn check_finished(&self, r: &SeedResult) -> Result<(), String> {
        let Some(at) = r.diverged_epoch else {
            return self
                .check_result(r.epochs, Reported::of_result(r))
                .and_then(|()| self.check_score(r));
        };
        if at == 0 || at > self.epochs {
            return Err(format!(
                "diverged_epoch = {at}: this sweep's runs train epochs 1 to {}",
                self.epochs
            ));
        }
        if r.epochs > at {
            return Err(format!(
                "epochs = {}: a run that diverged in epoch {at} finished at most {at} epochs with finite metrics",
                r.epochs
            ));
        }
        if r.test_correct.is_some() {
            return Err("test_correct was sent with diverged_epoch: a diverged run has no final evaluation to record".into());
        }
        // Whatever it measured before it diverged may be missing, but not of another task's shape.
        self.check_metrics(Reported {
            basics: true,
            ..Reported::of_result(r)
        })
    }

    /// Whether a result carries the sweep's score (a custom score is the program's to report).
    pub fn check_score(&self, result: &SeedResult) -> Result<(), String> {
        if self.score.of(result).is_none() {
            return Err(format!(
                "the result has no `{}`, the sweep's score: report it on the last epoch or the final line",
                self.score
            ));
        }
        Ok(())
    }

    fn check_metrics(&self, reported: Reported) -> Result<(), String> {
        // A built-in task always measures these: a report without them is not its worker's.
        if !reported.basics && !self.custom {
            return Err(
                "train_loss, train_accuracy and lr (a result: and test_loss, test_accuracy) are missing: the built-in tasks report them all; only a task = \"command\" program may leave them out"
                    .into(),
            );
        }
        if reported.custom && !self.custom {
            return Err(
                "custom metrics were sent, but only a task = \"command\" program reports them"
                    .into(),
            );
        }
        if reported.top5 && !self.top5 {
            return Err("test_top5 was sent, but only the finetune-head task reports it".into());
        }
        if reported.validation && !self.validation {
            return Err(
                "val_loss or val_accuracy was sent, but this sweep holds no images out (`holdout` = 0)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Whether a final metric `a` is its last epoch's `b` (equal but for rounding in transit).
pub fn same_value(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

/// A result's final metrics are those of its last epoch (a worker reports its last
/// evaluation), as recorded under its lease: a result that says otherwise is refused, naming the
/// field. A custom metric may be the result's alone (a program's evaluation at the end only). Without the last epoch's row there is nothing to compare (the completion is refused
/// for its missing epochs).
pub fn check_final_metrics(result: &SeedResult, last: Option<&EpochRecord>) -> Result<(), String> {
    let Some(last) = last else {
        return Ok(());
    };
    let same = same_value;
    let same_opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => same(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    let fields = [
        (
            "test_accuracy",
            same_opt(result.test_accuracy, last.test_accuracy),
        ),
        ("test_loss", same_opt(result.test_loss, last.test_loss)),
        ("train_loss", same_opt(result.train_loss, last.train_loss)),
        (
            "train_accuracy",
            same_opt(result.train_accuracy, last.train_accuracy),
        ),
        ("test_top5", same_opt(result.test_top5, last.test_top5)),
        ("val_loss", same_opt(result.val_loss, last.val_loss)),
        (
            "val_accuracy",
            same_opt(result.val_accuracy, last.val_accuracy),
        ),
    ];
    let custom = result.custom.iter().map(|(name, &v)| {
        let agrees = last
            .custom
            .get(name)
            .is_none_or(|&at_last| same(v, at_last));
        (name.as_str(), agrees)
    });
    let mut fields = fields.into_iter().chain(custom);
    match fields.find(|(_, agrees)| !agrees) {
        None => Ok(()),
        Some((field, _)) => Err(format!(
            "{field} differs from epoch {}'s, the last one recorded under this lease: a result is its last epoch's evaluation",
            last.epoch
        )),
    }
}

/// Whether sweep `id` may go from `current` to `target`: cancelled is final.
pub fn check_sweep_change(
    id: SweepId,
    current: SweepState,
    target: SweepState,
) -> Result<(), Refusal> {
    if current == SweepState::Cancelled && target != SweepState::Cancelled {
        return Err(Refusal::Conflict(format!(
            "sweep {id} is cancelled, which is final"
        )));
    }
    Ok(())
}

/// Whether sweep `id`, now `current`, may still take seeds: not once cancelled.
pub fn check_open(id: SweepId, current: SweepState) -> Result<(), Refusal> {
    if current == SweepState::Cancelled {
        return Err(Refusal::Conflict(format!(
            "sweep {id} is cancelled: submit a new sweep instead"
        )));
    }
    Ok(())
}

/// Whether sweep `id`, now `current` with `design`, may take more seeds: not once cancelled,
/// and never a crossed design, whose runs are the combinations of its factor seeds.
pub fn check_extendable(id: SweepId, current: SweepState, design: &Design) -> Result<(), Refusal> {
    check_open(id, current)?;
    if design.is_crossed() {
        return Err(Refusal::Conflict(format!(
            "sweep {id} has a crossed design: its runs are every combination of its factor seeds, so it cannot be extended; submit another sweep"
        )));
    }
    Ok(())
}

/// A sweep that holds `total` seeds may take `more`: the limit is [`MAX_SEEDS`] on a sweep's
/// total, not on each request, so repeated extensions cannot grow it without bound. Seeds named
/// again count too (checked before anything is written).
pub fn check_sweep_size(id: SweepId, total: u64, more: u64) -> Result<(), Refusal> {
    if total.saturating_add(more) <= MAX_SEEDS {
        return Ok(());
    }
    Err(Refusal::Conflict(format!(
        "sweep {id} holds {total} seeds and {more} more were named (seeds it already has count too); one sweep holds at most {MAX_SEEDS}: submit another sweep for the rest"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::design::Factor;

    const RETRY: RetrySettings = RetrySettings {
        base_seconds: 10.0,
        max_seconds: 60.0,
    };

    fn attempts(failures: u32, max_attempts: u32) -> Attempts {
        Attempts {
            failures,
            max_attempts,
            retry: RETRY,
        }
    }

    fn lease(fence: i64) -> LeaseRef {
        LeaseRef {
            sweep_id: SweepId::new(),
            seed: 7,
            fence,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(RETRY.backoff_seconds(1, 0.5), 10.0);
        assert_eq!(RETRY.backoff_seconds(2, 0.5), 20.0);
        assert_eq!(RETRY.backoff_seconds(5, 0.5), 60.0);
        assert_eq!(RETRY.backoff_seconds(2, 0.0), 10.0);
        assert_eq!(RETRY.backoff_seconds(2, 0.999), 20.0 * 1.499);
        assert_eq!(RETRY.backoff_seconds(u32::MAX, 0.5), 60.0);
    }

    #[test]
    fn a_release_costs_nothing_and_waits_for_nothing() {
        let next = after_attempt(AttemptEnd::Released, &attempts(2, 3), 0.5);
        assert_eq!(
            next,
            NextState {
                state: SeedState::Pending,
                failures: 2,
                backoff_seconds: None
            }
        );
        assert_eq!(AttemptEnd::Released.outcome(), AttemptOutcome::Released);
    }

    #[test]
    fn a_counted_end_backs_off_until_attempts_run_out() {
        for end in [AttemptEnd::Failed, AttemptEnd::Expired] {
            let first = after_attempt(end, &attempts(0, 3), 0.5);
            assert_eq!(
                (first.state, first.failures, first.backoff_seconds),
                (SeedState::Pending, 1, Some(10.0))
            );
            let second = after_attempt(end, &attempts(1, 3), 0.5);
            assert_eq!(
                (second.state, second.failures, second.backoff_seconds),
                (SeedState::Pending, 2, Some(20.0))
            );
            let last = after_attempt(end, &attempts(2, 3), 0.5);
            assert_eq!(
                (last.state, last.failures, last.backoff_seconds),
                (SeedState::Failed, 3, None)
            );
        }
        let once = after_attempt(AttemptEnd::Failed, &attempts(0, 1), 0.5);
        assert_eq!(once.state, SeedState::Failed);
        assert_eq!(AttemptEnd::Expired.outcome(), AttemptOutcome::Expired);
    }

    #[test]
    fn a_cause_seen_on_another_worker_ends_a_deterministic_seed_at_once() {
        let deterministic = Charge::Counted {
            deterministic: true,
        };
        let unrepeatable = Charge::Counted {
            deterministic: false,
        };
        assert_eq!(deterministic.end(true), AttemptEnd::FailedAsBefore);
        assert_eq!(deterministic.end(false), AttemptEnd::Failed);
        assert_eq!(unrepeatable.end(true), AttemptEnd::Failed);
        assert_eq!(Charge::Uncounted.end(true), AttemptEnd::Released);
        let next = after_attempt(AttemptEnd::FailedAsBefore, &attempts(1, 5), 0.5);
        assert_eq!(
            (next.state, next.failures, next.backoff_seconds),
            (SeedState::Failed, 2, None)
        );
        assert_eq!(AttemptEnd::FailedAsBefore.outcome(), AttemptOutcome::Failed);
    }

    #[test]
    fn only_the_current_fence_of_a_leased_seed_is_held() {
        let l = lease(4);
        assert_eq!(check_held(l, SeedState::Leased, 4), Ok(()));
        for (state, fence) in [
            (SeedState::Leased, 5),
            (SeedState::Leased, 3),
            (SeedState::Pending, 4),
            (SeedState::Done, 4),
            (SeedState::Failed, 4),
            (SeedState::Cancelled, 4),
        ] {
            assert_eq!(
                check_held(l, state, fence),
                Err(Refusal::Stale(l)),
                "{state:?} {fence}"
            );
        }
    }

    #[test]
    fn a_completion_is_recorded_once_under_its_own_fence() {
        let l = lease(2);
        assert_eq!(
            check_completion(l, SeedState::Leased, 2),
            Ok(Completion::Record)
        );
        assert_eq!(
            check_completion(l, SeedState::Done, 2),
            Ok(Completion::AlreadyRecorded)
        );
        assert_eq!(
            check_completion(l, SeedState::Done, 3),
            Err(Refusal::Stale(l))
        );
        assert_eq!(
            check_completion(l, SeedState::Leased, 3),
            Err(Refusal::Stale(l))
        );
        assert_eq!(
            check_completion(l, SeedState::Pending, 2),
            Err(Refusal::Stale(l))
        );
        assert_eq!(check_epochs_recorded(l, 3, 3), Ok(()));
        let Err(Refusal::Conflict(msg)) = check_epochs_recorded(l, 3, 2) else {
            panic!("two of three epochs accepted")
        };
        assert!(msg.contains("claims 3 epochs but 2"), "{msg}");
    }

    #[test]
    fn cancelled_is_final() {
        let id = SweepId::new();
        use SweepState::*;
        for (from, to, ok) in [
            (Active, Paused, true),
            (Paused, Active, true),
            (Active, Cancelled, true),
            (Paused, Cancelled, true),
            (Cancelled, Cancelled, true),
            (Cancelled, Active, false),
            (Cancelled, Paused, false),
        ] {
            assert_eq!(
                check_sweep_change(id, from, to).is_ok(),
                ok,
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn a_sweep_total_stays_within_the_limit() {
        let id = SweepId::new();
        assert!(check_sweep_size(id, MAX_SEEDS - 5, 5).is_ok());
        assert!(check_sweep_size(id, MAX_SEEDS, 0).is_ok());
        let Err(Refusal::Conflict(msg)) = check_sweep_size(id, MAX_SEEDS - 4, 5) else {
            panic!("a sweep past the limit")
        };
        assert!(msg.contains("at most 10000000"), "{msg}");
    }

    #[test]
    fn only_live_sweeps_of_independent_runs_are_extended() {
        let id = SweepId::new();
        let vary = Design::Vary {
            vary: Factor::ALL.to_vec(),
            base_seed: 0,
        };
        let crossed = Design::Crossed {
            levels: vec![(Factor::Init, vec![1, 2])],
            base_seed: 0,
        };
        assert!(check_extendable(id, SweepState::Active, &vary).is_ok());
        assert!(check_extendable(id, SweepState::Paused, &vary).is_ok());
        for (state, design, says) in [
            (SweepState::Cancelled, &vary, "cancelled"),
            (SweepState::Active, &crossed, "crossed design"),
        ] {
            let Err(Refusal::Conflict(msg)) = check_extendable(id, state, design) else {
                panic!("{state:?} extended")
            };
            assert!(msg.contains(says), "{msg}");
        }
    }

    #[test]
    fn a_run_reports_its_sweeps_epochs_and_only_the_metrics_its_settings_make() {
        let spec = crate::spec::SweepSpec::parse(
            "name = \"s\"\ntask = \"resnet9\"\ndataset = \"d\"\nseeds = \"0..2\"\n[train]\nepochs = 3\n",
        )
        .unwrap();
        let shape = RunShape::of(&spec.train, None, None);
        assert_eq!(shape.epochs, 3);
        let plain = Reported {
            basics: true,
            top5: false,
            validation: false,
            custom: false,
        };
        assert!(shape.check_epoch(3, plain).is_ok());
        let bare = Reported {
            basics: false,
            ..plain
        };
        assert!(
            shape
                .check_epoch(1, bare)
                .unwrap_err()
                .contains("train_loss")
        );
        assert!(
            shape
                .check_epoch(4, plain)
                .unwrap_err()
                .contains("epochs 1 to 3")
        );
        assert!(shape.check_result(3, plain).is_ok());
        for short_or_long in [2, 4] {
            assert!(shape.check_result(short_or_long, plain).is_err());
        }
        let top5 = Reported {
            top5: true,
            ..plain
        };
        assert!(
            shape
                .check_epoch(1, top5)
                .unwrap_err()
                .contains("test_top5")
        );
        let val = Reported {
            validation: true,
            ..plain
        };
        assert!(shape.check_result(3, val).unwrap_err().contains("holdout"));
        let custom = Reported {
            custom: true,
            ..plain
        };
        assert!(
            shape
                .check_epoch(1, custom)
                .unwrap_err()
                .contains("command")
        );
        let own = crate::spec::SweepSpec::parse(
            "name = \"s\"\ntask = \"command\"\nseeds = \"0..2\"\n[command]\nargv = [\"x\"]\nscore = \"bleu\"\n",
        )
        .unwrap();
        let shape = RunShape::of(&own.train, None, own.command.as_ref());
        assert!(shape.check_epoch(1, custom).is_ok());
        // A program need report only its score.
        assert!(shape.check_epoch(1, bare).is_ok());
        assert_eq!(shape.score, Metric::custom("bleu").unwrap());
        let mut r = SeedResult {
            seed: 0,
            test_accuracy: Some(0.5),
            test_loss: Some(1.0),
            train_loss: Some(1.0),
            train_accuracy: Some(0.5),
            epochs: 1,
            diverged_epoch: None,
            seconds: 1.0,
            worker_id: "w".into(),
            device: "cpu".into(),
            data_fingerprint: String::new(),
            precision: crate::spec::Precision::Fp32,
            deterministic: true,
            test_top5: None,
            val_loss: None,
            val_accuracy: None,
            custom: Default::default(),
            factors: None,
            finished_at: String::new(),
            test_correct: None,
        };
        assert!(shape.check_score(&r).unwrap_err().contains("no `bleu`"));
        r.custom.insert("bleu".into(), 30.0);
        assert!(shape.check_score(&r).is_ok());
        let mut held_out = spec.train.clone();
        held_out.holdout = 100;
        assert!(
            RunShape::of(&held_out, None, None)
                .check_result(3, val)
                .is_ok()
        );
    }
}
