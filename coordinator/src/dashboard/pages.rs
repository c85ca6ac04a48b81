//! The dashboard's HTML: whole pages, and the live parts that server-sent events replace. The
//! statistics and figures are the report's own (`seedsweep_core::report::body`), so the
//! dashboard and `sweep report` never disagree.

use super::access::Visitor;
use crate::service::ReportData;
use seedsweep_core::domain::{Aggregate, Attempt, SeedHistory};
use seedsweep_core::report::{self, escape, f};
use seedsweep_core::stats::compare::Comparison;
use seedsweep_proto::v1 as pb;
use std::fmt::Write;

const EXTRA_STYLE: &str = r#"nav{display:flex;gap:1em;align-items:center;border-bottom:1px solid #ccc;padding-bottom:.5em}
nav form{margin-left:auto}a{color:#0052a3}a:focus,button:focus,input:focus{outline:3px solid #e69f00}
progress{width:12em}.muted{color:#555}.live{border-left:4px solid #0072b2;padding-left:.8em}
@media (max-width:640px){body{margin:.5em}table{font-size:85%;display:block;overflow-x:auto}}"#;

/// A whole page: `title`, the navigation bar, `main`; `script` runs at the end.
pub fn page(title: &str, visitor: Option<&Visitor>, main: &str, script: &str) -> String {
    let who = match visitor {
        Some(v) if v.signed_in => format!(
            "<form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><span class=\"muted\">{}</span> <button>Sign out</button></form>",
            v.csrf,
            v.role.as_str()
        ),
        _ => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · seedsweep</title><style>{}\n{EXTRA_STYLE}</style></head><body>\n\
         <nav><a href=\"/\"><b>seedsweep</b></a><a href=\"/compare\">Compare</a>{who}</nav>\n\
         <main>\n{main}\n</main>\n<script>{script}</script></body></html>\n",
        report::STYLE,
        title = escape(title)
    )
}

/// The sign-in page.
pub fn sign_in(error: Option<&str>) -> String {
    let error = error.map_or(String::new(), |e| {
        format!("<p role=\"alert\"><b>{}</b></p>", escape(e))
    });
    let main = format!(
        "<h1>Sign in</h1>{error}<form method=\"post\" action=\"/login\">\
         <label for=\"token\">Admin or viewer token</label><br>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" size=\"40\" autofocus> \
         <button>Sign in</button></form>\
         <p class=\"muted\">The token is exchanged for a session cookie; it is not kept in the page or its address.</p>"
    );
    page("Sign in", None, &main, "")
}

/// A time as RFC 3339 UTC, shown in the viewer's zone by the page's script.
fn time(rfc3339: &str) -> String {
    format!("<time datetime=\"{0}\">{0}</time>", escape(rfc3339))
}

/// Rewrites every `<time>` in the viewer's zone.
pub const LOCAL_TIMES: &str = "function localTimes(){for(const t of document.querySelectorAll('time[datetime]')){const d=new Date(t.getAttribute('datetime'));if(!isNaN(d))t.textContent=d.toLocaleString();}}localTimes();";

/// Replaces the element `id`'s content with each `event` the stream at `url` sends.
pub fn live_script(url: &str, event: &str, id: &str) -> String {
    format!(
        "{LOCAL_TIMES}const es=new EventSource('{url}');es.addEventListener('{event}',e=>{{document.getElementById('{id}').innerHTML=e.data;localTimes();}});"
    )
}

/// The table of sweeps, newest first, each with its score's live aggregate when known: the
/// front page's live part.
pub fn sweep_table(sweeps: &[(pb::SweepSummary, Option<Aggregate>)]) -> String {
    if sweeps.is_empty() {
        return "<p>No sweeps yet: submit one with <code>coordinator sweep submit FILE</code>.</p>"
            .into();
    }
    let mut h = String::from(
        "<table><caption>Sweeps, newest first</caption><tr><th>name</th><th>task</th><th>state</th><th>progress</th><th>finished</th><th>score: mean ± std (min, max)</th><th>created</th></tr>\n",
    );
    for (s, score) in sweeps {
        let _ = writeln!(
            h,
            "<tr><td><a href=\"/sweeps/{id}\">{name}</a></td><td>{task}</td><td>{state}</td>\
             <td><progress max=\"{total}\" value=\"{done}\" aria-label=\"seeds finished\"></progress></td>\
             <td data-sweep=\"{id}\">{done} / {total}</td><td>{score}</td><td>{created}</td></tr>",
            score = score.as_ref().map_or("-".into(), score_text),
            id = escape(&s.sweep_id),
            name = escape(&s.name),
            task = escape(&s.task),
            state = escape(&s.state),
            total = s.total,
            done = s.done,
            created = time(&s.created_at),
        );
    }
    h + "</table>"
}

/// `metric mean ± std (min, max)`.
fn score_text(a: &Aggregate) -> String {
    format!(
        "<span class=\"muted\">{}</span> {} ± {} ({}, {})",
        escape(a.metric.name()),
        f(a.moments.mean),
        f(a.moments.std()),
        f(a.min),
        f(a.max)
    )
}

/// Progress, rate and ETA of a sweep.
pub struct Progress {
    pub status: pb::SweepStatus,
    /// Seeds finished per minute lately; None until measured.
    pub per_minute: Option<f64>,
}

fn progress(p: &Progress) -> String {
    let c = p.status.counts.unwrap_or_default();
    let s = p.status.sweep.clone().unwrap_or_default();
    let left = c.pending + c.leased;
    let rate = match p.per_minute {
        _ if left == 0 => "Nothing left to run".into(),
        Some(r) if r > 0.0 => {
            let eta = left as f64 / r;
            format!(
                "{r:.1} seeds/min; about {} left",
                if eta < 120.0 {
                    format!("{eta:.0} min")
                } else {
                    format!("{:.1} h", eta / 60.0)
                }
            )
        }
        _ => "rate: measuring".into(),
    };
    format!(
        "<p><progress max=\"{total}\" value=\"{done}\" aria-label=\"seeds finished\"></progress> \
         <b id=\"done\">{done}</b> of {total} seeds finished (<b id=\"diverged\">{diverged}</b> \
         diverged); {pending} pending, {leased} training, {failed} failed, {cancelled} cancelled. \
         State: <b>{state}</b>. {rate}.</p>",
        total = s.total,
        done = c.done,
        diverged = c.diverged,
        pending = c.pending,
        leased = c.leased,
        failed = c.failed,
        cancelled = c.cancelled,
        state = escape(&s.state),
    )
}

/// A sweep's live part: progress, then the report's tables and figures (none yet: says so).
pub fn sweep_live(id: &str, p: &Progress, data: Option<&ReportData>) -> String {
    let mut h = progress(p);
    match data {
        Some(d) => {
            let figures = report::figures(&d.input(id));
            let link = |seed: i64| format!("<a href=\"/sweeps/{id}/seeds/{seed}\">{seed}</a>");
            h += &report::body(&d.input(id), &figures, &link);
            if d.runs.len() > report::MAX_CURVES {
                let _ = write!(
                    h,
                    "<p class=\"muted\">The curves are a sample of {} of the {} seeds, spread over the scores (the best and the worst among them).</p>",
                    report::MAX_CURVES,
                    d.runs.len()
                );
            }
        }
        None => h += "<p>No seed has finished yet.</p>",
    }
    h
}

/// A sweep's page around its live part.
pub fn sweep_page(status: &pb::SweepStatus, live: &str, visitor: &Visitor, metric: &str) -> String {
    let s = status.sweep.clone().unwrap_or_default();
    let id = escape(&s.sweep_id);
    let controls = if visitor.may_change_sweeps() && s.state != "cancelled" {
        let button = |state: &str, label: &str| {
            format!(
                "<form method=\"post\" action=\"/sweeps/{id}/state\" style=\"display:inline\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"state\" value=\"{state}\">\
                 <button>{label}</button></form> ",
                visitor.csrf
            )
        };
        let toggle = if s.state == "paused" {
            button("active", "Resume")
        } else {
            button("paused", "Pause")
        };
        let extend = format!(
            "<form method=\"post\" action=\"/sweeps/{id}/extend\" style=\"display:inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <label for=\"range\">Add seeds</label> <input id=\"range\" name=\"range\" placeholder=\"START..END\" size=\"14\"> \
             <button>Extend</button></form>",
            visitor.csrf
        );
        format!("<p>{toggle}{}{extend}</p>", button("cancelled", "Cancel"))
    } else {
        String::new()
    };
    let main = format!(
        "<h1>{name}</h1><p class=\"muted\">Sweep <code>{id}</code>, task {task}, dataset {dataset}, created {created}. \
         <a href=\"/sweeps/{id}/report\">Report</a> · results as <a href=\"/sweeps/{id}/export/results.csv\" download>CSV</a> or \
         <a href=\"/sweeps/{id}/export/results.parquet\" download>Parquet</a> · epochs as \
         <a href=\"/sweeps/{id}/export/epochs.csv\" download>CSV</a> or <a href=\"/sweeps/{id}/export/epochs.parquet\" download>Parquet</a></p>\
         {controls}<section id=\"live\" class=\"live\" aria-live=\"polite\">{live}</section>",
        name = escape(&s.name),
        task = escape(&s.task),
        dataset = escape(&s.dataset),
        created = time(&s.created_at),
    );
    let events = format!("/sweeps/{id}/events?metric={}", escape(metric));
    page(
        &s.name,
        Some(visitor),
        &main,
        &live_script(&events, "live", "live"),
    )
}

/// One seed: its result and its curve.
/// What the seed page shows of one seed.
pub struct SeedSeen<'a> {
    pub seed: i64,
    pub history: &'a SeedHistory,
    pub result: Option<&'a pb::SeedResult>,
    pub epochs: &'a [pb::EpochRow],
}

pub fn seed_page(sweep: &pb::SweepSummary, seen: &SeedSeen, visitor: &Visitor) -> String {
    let (seed, epochs) = (seen.seed, seen.epochs);
    let mut h = format!(
        "<h1>Seed {seed}</h1><p>Of sweep <a href=\"/sweeps/{id}\">{name}</a>; <span id=\"seed-state\">{state}</span>.</p>",
        id = escape(&sweep.sweep_id),
        name = escape(&sweep.name),
        state = seen.history.state.as_str(),
    );
    if let Some(r) = seen.result {
        h += &result_table(r);
    }
    if !epochs.is_empty() {
        h += &curve_table(epochs);
    }
    h += &attempts(&seen.history.attempts);
    page(&format!("seed {seed}"), Some(visitor), &h, LOCAL_TIMES)
}

/// A seed's result: the metrics it has (a program's own need report only its score), then how
/// it ran.
fn result_table(r: &pb::SeedResult) -> String {
    let known = [
        ("test accuracy", r.test_accuracy),
        ("test loss", r.test_loss),
        ("train loss", r.train_loss),
        ("train accuracy", r.train_accuracy),
        ("test top-5", r.test_top5),
        ("val loss", r.val_loss),
        ("val accuracy", r.val_accuracy),
    ];
    let metrics: Vec<(String, f64)> = known
        .into_iter()
        .filter_map(|(name, v)| Some((name.to_string(), v?)))
        .chain(r.custom.iter().map(|(k, v)| (k.clone(), *v)))
        .collect();
    let mut head = String::new();
    let mut row = String::new();
    for (name, v) in &metrics {
        let _ = write!(head, "<th>{}</th>", escape(name));
        let _ = write!(row, "<td>{}</td>", f(*v));
    }
    format!(
        "<table id=\"result\"><tr>{head}<th>epochs</th><th>seconds</th><th>worker</th><th>device</th><th>finished</th></tr>\
         <tr>{row}<td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        r.epochs,
        r.seconds,
        escape(&r.worker_id),
        escape(&r.device),
        time(&r.finished_at)
    )
}

/// A known metric of an epoch row: its heading and how to read it.
type EpochColumn = (&'static str, fn(&pb::EpochRow) -> Option<f64>);

/// A seed's epochs: a column for each metric some epoch reported, "-" where one did not.
fn curve_table(epochs: &[pb::EpochRow]) -> String {
    let known: [EpochColumn; 8] = [
        ("train loss", |e| e.train_loss),
        ("train accuracy", |e| e.train_accuracy),
        ("test loss", |e| e.test_loss),
        ("test accuracy", |e| e.test_accuracy),
        ("test top-5", |e| e.test_top5),
        ("val loss", |e| e.val_loss),
        ("val accuracy", |e| e.val_accuracy),
        ("lr", |e| e.lr),
    ];
    let known: Vec<_> = known
        .into_iter()
        .filter(|(_, get)| epochs.iter().any(|e| get(e).is_some()))
        .collect();
    let custom: std::collections::BTreeSet<&String> =
        epochs.iter().flat_map(|e| e.custom.keys()).collect();
    let opt = |v: Option<f64>| v.map_or("-".into(), f);
    let mut h = "<h2>Curve</h2><table id=\"curve\"><tr><th>epoch</th>".to_string();
    for (name, _) in &known {
        let _ = write!(h, "<th>{name}</th>");
    }
    for name in &custom {
        let _ = write!(h, "<th>{}</th>", escape(name));
    }
    h += "</tr>";
    for e in epochs {
        let _ = write!(h, "<tr><td>{}</td>", e.epoch);
        for (_, get) in &known {
            let _ = write!(h, "<td>{}</td>", opt(get(e)));
        }
        for name in &custom {
            let _ = write!(h, "<td>{}</td>", opt(e.custom.get(*name).copied()));
        }
        h += "</tr>";
    }
    h + "</table>"
}

/// A seed's attempts: one row per lease, with how it ended and why.
fn attempts(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "<h2>Attempts</h2><p>None yet: the seed has not been leased.</p>".into();
    }
    let shown = if attempts.len() as i64 >= crate::store::HISTORY {
        format!(" (the newest {})", attempts.len())
    } else {
        String::new()
    };
    let mut h = format!(
        "<h2>Attempts</h2><p class=\"muted\">One per lease{shown}, numbered by its fence; the log is on the worker.</p>\
         <table id=\"attempts\"><tr><th>fence</th><th>worker</th><th>started</th><th>ended</th><th>outcome</th><th>cause</th><th>log</th></tr>"
    );
    let opt = |v: &Option<String>| v.as_deref().map_or("-".into(), escape);
    for a in attempts {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.fence,
            escape(&a.worker_id),
            time(&a.started_at),
            a.ended_at.as_deref().map_or("-".into(), time),
            a.outcome.as_str(),
            opt(&a.cause),
            opt(&a.log)
        );
    }
    h + "</table>"
}

/// The comparison form, with the result when two sweeps were given.
pub fn compare_page(
    sweeps: &[pb::SweepSummary],
    chosen: (&str, &str),
    outcome: Option<Result<Comparison, String>>,
    visitor: &Visitor,
) -> String {
    let options = |selected: &str| -> String {
        sweeps
            .iter()
            .rev()
            .map(|s| {
                format!(
                    "<option value=\"{id}\"{sel}>{name} ({id})</option>",
                    id = escape(&s.sweep_id),
                    name = escape(&s.name),
                    sel = if s.sweep_id == selected {
                        " selected"
                    } else {
                        ""
                    }
                )
            })
            .collect()
    };
    let mut h = format!(
        "<h1>Compare two sweeps</h1><form method=\"get\" action=\"/compare\">\
         <label for=\"a\">A</label> <select id=\"a\" name=\"a\">{}</select> \
         <label for=\"b\">B</label> <select id=\"b\" name=\"b\">{}</select> <button>Compare</button></form>",
        options(chosen.0),
        options(chosen.1)
    );
    match outcome {
        Some(Ok(c)) => h += &comparison(&c),
        Some(Err(e)) => {
            let _ = write!(h, "<p role=\"alert\">{}</p>", escape(&e));
        }
        None => {}
    }
    page("Compare", Some(visitor), &h, "")
}

fn comparison(c: &Comparison) -> String {
    let side = |name: &str, s: &seedsweep_core::stats::compare::Side| {
        format!(
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.n,
            f(s.mean),
            f(s.std)
        )
    };
    format!(
        "<table><tr><th>sweep</th><th>n</th><th>mean</th><th>std</th></tr>{}{}</table>\
         <table><tr><th>measure</th><th>value</th></tr>\
         <tr><td>mean(A) - mean(B)</td><td data-stat=\"difference\">{}</td></tr>\
         <tr><td>95% interval of the difference (Welch)</td><td>[{}, {}]</td></tr>\
         <tr><td>Welch t (df)</td><td>{} ({:.1})</td></tr><tr><td>Welch p</td><td>{}</td></tr>\
         <tr><td>Mann-Whitney U (p)</td><td>{} ({})</td></tr>\
         <tr><td>P(a seed of A beats a seed of B)</td><td>{}</td></tr></table>",
        side("A", &c.a),
        side("B", &c.b),
        f(c.difference),
        f(c.difference_ci.low),
        f(c.difference_ci.high),
        f(c.welch_t),
        c.welch_df,
        f(c.welch_p),
        f(c.mann_whitney_u),
        f(c.mann_whitney_p),
        f(c.prob_a_beats_b)
    )
}

/// A page that says what went wrong.
pub fn problem(title: &str, message: &str, visitor: Option<&Visitor>) -> String {
    page(
        title,
        visitor,
        &format!("<h1>{}</h1><p>{}</p>", escape(title), escape(message)),
        "",
    )
}
