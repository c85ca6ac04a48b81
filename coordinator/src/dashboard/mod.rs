//! `coordinator serve --http-listen ADDR`: the dashboard. Server-rendered pages (the sweep list,
//! a sweep, a seed, a comparison) read through the same service methods as the gRPC API, and
//! server-sent events push each page's live part again as results arrive (woken by the same
//! signal as `WatchSweep`). No JavaScript beyond a few lines per page, no build chain.

mod access;
mod download;
mod pages;
pub mod tls;

use crate::auth::Tokens;
use crate::service::CoordinatorService;
use access::{Access, Visitor};
use anyhow::{Context, bail};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use seedsweep_core::domain::SweepId;
use seedsweep_core::stats::document::ComparisonDocument;
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_server::Coordinator as _;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::{Code, Request, Status};

/// How often a live part is sent again at most, and at least (for what no result announces:
/// a pause, another replica's results).
const LIVE_MIN: Duration = Duration::from_secs(2);
const LIVE_MAX: Duration = Duration::from_secs(15);

/// How many sweeps of the list, the newest, show their score's summary.
const SCORED: usize = 100;

/// Where the dashboard may listen: loopback, or anywhere with tokens (visitors sign in). It
/// serves under the gRPC side's TLS when that is configured ([`tls`]).
pub fn check_exposure(addr: SocketAddr, tokens: bool, insecure: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || tokens || insecure {
        return Ok(());
    }
    bail!(
        "refusing --http-listen {addr} without tokens: anyone who can reach it could read and cancel sweeps. Give admin and worker tokens (and --viewer-token-file for read-only users), or listen on 127.0.0.1"
    )
}

struct Dashboard {
    service: Arc<CoordinatorService>,
    access: Access,
    rates: Rates,
    /// Served under TLS: session cookies are `Secure`.
    tls: bool,
}

/// Binds `addr` and serves the dashboard in the background, under TLS when `tls` is given;
/// the bound address.
pub async fn serve(
    addr: SocketAddr,
    service: Arc<CoordinatorService>,
    tokens: Option<Tokens>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr} (--http-listen)"))?;
    let bound = listener.local_addr()?;
    let state = Arc::new(Dashboard {
        service,
        access: Access::new(tokens),
        rates: Rates::default(),
        tls: tls.is_some(),
    });
    let app = axum::Router::new()
        .route("/", get(front))
        .route("/events", get(front_events))
        .route("/login", get(sign_in_form).post(sign_in))
        .route("/logout", post(sign_out))
        .route("/compare", get(compare))
        .route("/sweeps/{id}", get(sweep))
        .route("/sweeps/{id}/events", get(sweep_events))
        .route("/sweeps/{id}/report", get(report_page))
        .route("/sweeps/{id}/export/{file}", get(download::download))
        .route("/sweeps/{id}/state", post(set_state))
        .route("/sweeps/{id}/extend", post(extend))
        .route("/sweeps/{id}/seeds/{seed}", get(seed))
        .with_state(state);
    let https = tls.is_some();
    match tls {
        Some(config) => spawn_serving(tls::TlsListener::new(listener, config)?, app),
        None => spawn_serving(listener, app),
    }
    tracing::info!(%bound, tls = https, "dashboard listening");
    Ok(bound)
}

fn spawn_serving<L>(listener: L, app: axum::Router)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the dashboard stopped");
        }
    });
}

type Shared = State<Arc<Dashboard>>;

/// The answer to a visitor who has not signed in.
fn to_sign_in() -> Response {
    Redirect::to("/login").into_response()
}

/// The sweep a path names; a 404 when it names none.
fn sweep_id(id: &str) -> Result<SweepId, Problem> {
    id.parse()
        .map_err(|e: String| Problem(StatusCode::NOT_FOUND, e))
}

/// A refusal or failure, as a page with its status.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.0.canonical_reason().unwrap_or("Error");
        (self.0, Html(pages::problem(title, &self.1, None))).into_response()
    }
}

impl From<Status> for Problem {
    fn from(s: Status) -> Problem {
        let code = match s.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Problem(code, s.message().to_string())
    }
}

impl Dashboard {
    /// The visitor; None: not signed in (answer [`to_sign_in`]).
    fn visitor(&self, headers: &HeaderMap) -> Option<Visitor> {
        let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
        self.access.visitor(cookie)
    }

    async fn sweeps(&self) -> Result<Vec<pb::SweepSummary>, Problem> {
        let r = self
            .service
            .list_sweeps(Request::new(pb::ListSweepsRequest {}));
        Ok(r.await?.into_inner().sweeps)
    }

    /// The front page's live part: the sweeps, the newest [`SCORED`] with their score's live
    /// aggregate.
    async fn sweep_list(&self) -> Result<String, Problem> {
        let sweeps = self.sweeps().await?;
        let mut rows = Vec::with_capacity(sweeps.len());
        for (i, s) in sweeps.into_iter().rev().enumerate() {
            let score = match s.sweep_id.parse::<SweepId>() {
                Ok(id) if i < SCORED => self.service.score_aggregate(id).await?,
                _ => None,
            };
            rows.push((s, score));
        }
        Ok(pages::sweep_table(&rows))
    }

    async fn status(&self, id: &str) -> Result<pb::SweepStatus, Problem> {
        let req = pb::GetSweepStatusRequest {
            sweep_id: id.to_string(),
        };
        Ok(self
            .service
            .get_sweep_status(Request::new(req))
            .await?
            .into_inner())
    }

    /// A sweep's live part for `metric` ("": its score).
    async fn sweep_live(&self, id: &str, metric: &str) -> Result<String, Problem> {
        let sweep = sweep_id(id)?;
        let status = self.status(id).await?;
        let metric = self.service.metric(sweep, metric).await?;
        let data = self.service.report_data(sweep, metric).await?;
        let done = status.counts.as_ref().map_or(0, |c| c.done);
        let per_minute = self.rates.observe(sweep, done);
        let progress = pages::Progress { status, per_minute };
        let id = id.to_string();
        // Drawing the figures is CPU work.
        tokio::task::spawn_blocking(move || pages::sweep_live(&id, &progress, data.as_ref()))
            .await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }
}

async fn front(State(d): Shared, headers: HeaderMap) -> Response {
    let Some(visitor) = d.visitor(&headers) else {
        return to_sign_in();
    };
    match d.sweep_list().await {
        Ok(table) => {
            let main = format!(
                "<h1>Sweeps</h1><section id=\"sweeps\" aria-live=\"polite\">{table}</section>"
            );
            let script = pages::live_script("/events", "sweeps", "sweeps");
            Html(pages::page("Sweeps", Some(&visitor), &main, &script)).into_response()
        }
        Err(p) => p.into_response(),
    }
}

/// The front page's live part, again whenever a result is recorded (at most every
/// [`LIVE_MIN`]) and at least every [`LIVE_MAX`].
async fn front_events(State(d): Shared, headers: HeaderMap) -> Response {
    if d.visitor(&headers).is_none() {
        return to_sign_in();
    }
    let render = move |d: Arc<Dashboard>| async move { d.sweep_list().await.ok() };
    live_events(d, None, "sweeps", render)
}

/// A sweep's live part, as [`front_events`] sends the front page's.
async fn sweep_events(
    State(d): Shared,
    Path(id): Path<String>,
    Query(q): Query<MetricQuery>,
    headers: HeaderMap,
) -> Response {
    if d.visitor(&headers).is_none() {
        return to_sign_in();
    }
    let sweep = match sweep_id(&id) {
        Ok(sweep) => sweep,
        Err(p) => return p.into_response(),
    };
    let metric = q.metric.unwrap_or_default();
    let render = move |d: Arc<Dashboard>| {
        let (id, metric) = (id.clone(), metric.clone());
        async move { d.sweep_live(&id, &metric).await.ok() }
    };
    live_events(d, Some(sweep), "live", render)
}

/// A stream of `event`s, each what `render` makes, sent when a result of `sweep` (any sweep:
/// None) is recorded, throttled to one per [`LIVE_MIN`], and at least every [`LIVE_MAX`]. It
/// ends when the browser goes.
fn live_events<F, Fut>(
    d: Arc<Dashboard>,
    sweep: Option<SweepId>,
    event: &'static str,
    render: F,
) -> Response
where
    F: Fn(Arc<Dashboard>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(4);
    let mut recorded = d.service.recorded_results();
    tokio::spawn(async move {
        loop {
            let woken = async {
                loop {
                    match recorded.recv().await {
                        Ok(id) if sweep.is_none_or(|s| s == id) => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(LIVE_MAX, woken).await;
            let update = render(d.clone())
                .await
                .map(|html| Event::default().event(event).data(html));
            if let Some(update) = update
                && tx.send(Ok(update)).await.is_err()
            {
                return;
            }
            tokio::time::sleep(LIVE_MIN).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct MetricQuery {
    metric: Option<String>,
}

async fn sweep(
    State(d): Shared,
    Path(id): Path<String>,
    Query(q): Query<MetricQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(visitor) = d.visitor(&headers) else {
        return to_sign_in();
    };
    let metric = q.metric.unwrap_or_default();
    let page = async {
        let live = d.sweep_live(&id, &metric).await?;
        let status = d.status(&id).await?;
        Ok::<_, Problem>(pages::sweep_page(&status, &live, &visitor, &metric))
    };
    match page.await {
        Ok(html) => Html(html).into_response(),
        Err(p) => p.into_response(),
    }
}

/// The report's own page (`sweep report`'s report.html), figures inline.
async fn report_page(
    State(d): Shared,
    Path(id): Path<String>,
    Query(q): Query<MetricQuery>,
    headers: HeaderMap,
) -> Response {
    if d.visitor(&headers).is_none() {
        return to_sign_in();
    }
    let page = async {
        let sweep = sweep_id(&id)?;
        let metric = d
            .service
            .metric(sweep, &q.metric.unwrap_or_default())
            .await?;
        let Some(data) = d.service.report_data(sweep, metric).await? else {
            return Err(Problem(
                StatusCode::CONFLICT,
                format!("sweep {id} has no result yet: nothing to report"),
            ));
        };
        let html =
            tokio::task::spawn_blocking(move || seedsweep_core::report::page(&data.input(&id)));
        html.await
            .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    };
    match page.await {
        Ok(html) => Html(html).into_response(),
        Err(p) => p.into_response(),
    }
}

async fn seed(
    State(d): Shared,
    Path((id, seed)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Response {
    let Some(visitor) = d.visitor(&headers) else {
        return to_sign_in();
    };
    let page = async {
        let sweep = sweep_id(&id)?;
        let status = d.status(&id).await?;
        let history = d.service.seed_history(sweep, seed).await?;
        let results = d.service.list_results(Request::new(pb::ListResultsRequest {
            sweep_id: id.clone(),
            page_size: 1,
            after_seed: seed.checked_sub(1),
        }));
        let results = results.await?.into_inner().results;
        let result = results.iter().find(|r| r.seed == seed);
        let epochs = d
            .service
            .list_epoch_metrics(Request::new(pb::ListEpochMetricsRequest {
                sweep_id: id.clone(),
                page_size: 10_000,
                after: seed.checked_sub(1).map(|s| pb::EpochKey {
                    seed: s,
                    epoch: u32::MAX,
                }),
            }));
        let mut epochs = epochs.await?.into_inner().rows;
        epochs.retain(|e| e.seed == seed);
        let sweep = status.sweep.unwrap_or_default();
        let seen = pages::SeedSeen {
            seed,
            history: &history,
            result,
            epochs: &epochs,
        };
        Ok::<_, Problem>(pages::seed_page(&sweep, &seen, &visitor))
    };
    match page.await {
        Ok(html) => Html(html).into_response(),
        Err(p) => p.into_response(),
    }
}

#[derive(Deserialize)]
struct CompareQuery {
    a: Option<String>,
    b: Option<String>,
    metric: Option<String>,
}

async fn compare(State(d): Shared, Query(q): Query<CompareQuery>, headers: HeaderMap) -> Response {
    let Some(visitor) = d.visitor(&headers) else {
        return to_sign_in();
    };
    let sweeps = match d.sweeps().await {
        Ok(s) => s,
        Err(p) => return p.into_response(),
    };
    let (a, b) = (q.a.unwrap_or_default(), q.b.unwrap_or_default());
    let outcome = if a.is_empty() || b.is_empty() {
        None
    } else {
        let req = pb::CompareSweepsRequest {
            sweep_a: a.clone(),
            sweep_b: b.clone(),
            metric: q.metric.unwrap_or_default(),
        };
        Some(match d.service.compare_sweeps(Request::new(req)).await {
            Ok(doc) => serde_json::from_str::<ComparisonDocument>(&doc.into_inner().json)
                .map(|c| c.comparison)
                .map_err(|e| format!("unreadable comparison: {e}")),
            Err(s) => Err(s.message().to_string()),
        })
    };
    Html(pages::compare_page(&sweeps, (&a, &b), outcome, &visitor)).into_response()
}

async fn sign_in_form(State(d): Shared) -> Response {
    if !d.access.needs_sign_in() {
        return Redirect::to("/").into_response();
    }
    Html(pages::sign_in(None)).into_response()
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(State(d): Shared, headers: HeaderMap, Form(f): Form<SignIn>) -> Response {
    match d.access.sign_in(&f.token) {
        Ok(id) => {
            let secure = d.tls
                || headers
                    .get("x-forwarded-proto")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let cookie = access::session_cookie(&id, secure);
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(why) => (StatusCode::UNAUTHORIZED, Html(pages::sign_in(Some(&why)))).into_response(),
    }
}

#[derive(Deserialize)]
struct Csrf {
    csrf: String,
}

async fn sign_out(State(d): Shared, headers: HeaderMap, Form(f): Form<Csrf>) -> Response {
    if let Some(v) = d.visitor(&headers)
        && Access::csrf_ok(&v, &f.csrf)
    {
        d.access
            .sign_out(headers.get(header::COOKIE).and_then(|v| v.to_str().ok()));
    }
    (
        [(header::SET_COOKIE, access::expired_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct NewState {
    csrf: String,
    state: String,
}

/// Pause, resume or cancel a sweep: admins only, with the visitor's CSRF token.
async fn set_state(
    State(d): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<NewState>,
) -> Response {
    if let Err(refused) = admin_form(&d, &headers, &f.csrf) {
        return refused.into_response();
    }
    let req = pb::SetSweepStateRequest {
        sweep_id: id.clone(),
        state: f.state,
    };
    let done = d.service.set_sweep_state(Request::new(req)).await;
    after_change(&id, done.map(|_| ()))
}

#[derive(Deserialize)]
struct Extension {
    csrf: String,
    range: String,
}

/// Add seeds to a sweep (a range, as in a sweep file): admins only, as [`set_state`].
async fn extend(
    State(d): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<Extension>,
) -> Response {
    if let Err(refused) = admin_form(&d, &headers, &f.csrf) {
        return refused.into_response();
    }
    let req = pb::ExtendSweepRequest {
        sweep_id: id.clone(),
        range: f.range.trim().to_string(),
        list: Vec::new(),
    };
    let done = d.service.extend_sweep(Request::new(req)).await;
    after_change(&id, done.map(|_| ()))
}

/// Whether a form that changes a sweep may go ahead: a signed-in admin, the session's CSRF token.
fn admin_form(d: &Dashboard, headers: &HeaderMap, csrf: &str) -> Result<Visitor, Problem> {
    let Some(visitor) = d.visitor(headers) else {
        return Err(Problem(StatusCode::UNAUTHORIZED, "sign in first".into()));
    };
    if !Access::csrf_ok(&visitor, csrf) {
        return Err(Problem(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong: reload the page and try again".into(),
        ));
    }
    if !visitor.may_change_sweeps() {
        return Err(Problem(
            StatusCode::FORBIDDEN,
            "a viewer may not change sweeps: sign in with an admin token".into(),
        ));
    }
    Ok(visitor)
}

/// Back to the sweep's page once a change went through; the refusal otherwise.
fn after_change(id: &str, done: Result<(), Status>) -> Response {
    match done {
        Ok(()) => {
            tracing::info!(sweep = %id, "sweep changed from the dashboard");
            Redirect::to(&format!("/sweeps/{id}")).into_response()
        }
        Err(s) => Problem::from(s).into_response(),
    }
}

/// Seeds finished per minute, per sweep, from the counts the pages saw over the last few
/// minutes; at most [`Rates::SWEEPS`] sweeps, [`Rates::SAMPLES`] samples each.
#[derive(Default)]
struct Rates(Mutex<HashMap<SweepId, VecDeque<(Instant, u64)>>>);

impl Rates {
    const SWEEPS: usize = 256;
    const SAMPLES: usize = 64;
    const WINDOW: Duration = Duration::from_secs(300);

    /// Notes `done` now; the rate over the window, once it spans 5 s.
    fn observe(&self, sweep: SweepId, done: u64) -> Option<f64> {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= Self::SWEEPS && !all.contains_key(&sweep) {
            // Forget the sweep looked at longest ago.
            let stalest = all
                .iter()
                .min_by_key(|(_, s)| s.back().map(|(t, _)| *t))
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                all.remove(&k);
            }
        }
        let samples = all.entry(sweep).or_default();
        let now = Instant::now();
        samples.push_back((now, done));
        while samples.len() > Self::SAMPLES
            || samples
                .front()
                .is_some_and(|(t, _)| now - *t > Self::WINDOW)
        {
            samples.pop_front();
        }
        let (t0, d0) = *samples.front()?;
        let span = (now - t0).as_secs_f64();
        (span >= 5.0).then(|| done.saturating_sub(d0) as f64 * 60.0 / span)
    }
}
