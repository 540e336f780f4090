//! The dashboard: HTML pages rendered with askama and driven by htmx.
//!
//! A page is one struct and one template; its htmx fragment is a named block
//! of the same template. A handler answers an htmx request with the fragment
//! and a plain request with the whole page, so every view has a URL that can
//! be shared and reloaded. Mutations are POSTs that answer with the changed
//! fragment and a toast. Every value reaching a page passes through askama's
//! HTML escaping; URLs are built here, percent-encoded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::access::Operator;
use super::{ApiError, AppState};
use crate::store::{
    self, AuditEntry, BulkAction, DeadAction, DeadFilter, Job, JobFilter, JobState, QueueSummary,
    Transition,
};

// ---------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------

/// Whether htmx sent the request (then a fragment is the answer).
pub(crate) fn is_htmx(req: &HttpRequest) -> bool {
    req.headers().contains_key("HX-Request")
}

/// The layout's data: who is signed in and where they are.
pub struct Chrome {
    pub user: String,
    pub role: &'static str,
    pub can_act: bool,
    pub csrf: String,
    pub section: &'static str,
    pub version: &'static str,
}

impl Chrome {
    fn new(op: &Operator, section: &'static str) -> Chrome {
        Chrome {
            user: op.name.clone(),
            role: if op.can_act() { "admin" } else { "viewer" },
            can_act: op.can_act(),
            csrf: op.csrf.clone(),
            section,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// An instant as shown: relative, with the exact UTC time on hover.
pub struct When {
    pub iso: String,
    pub exact: String,
    pub ago: String,
}

fn when(ms: i64, now: i64) -> When {
    let time = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    When {
        iso: time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        exact: time.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
        ago: relative(now - ms),
    }
}

/// "just now", "42s ago", "5m ago", "3h ago", "2d ago"; "in 5m" ahead.
fn relative(delta_ms: i64) -> String {
    let (ahead, ms) = (delta_ms < 0, delta_ms.unsigned_abs());
    let s = ms / 1000;
    let text = match s {
        0 if ms < 1000 => return "just now".into(),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if ahead {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A duration as shown: "850ms", "2.3s", "4m 10s", "1h 2m".
fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m {}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h {}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// `text` cut to `max` characters with an ellipsis.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Percent-encodes a query value.
fn enc(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `path?k=v&…` with the non-empty pairs, encoded.
fn url(path: &str, pairs: &[(&str, &str)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

fn job_url(id: i64) -> String {
    format!("/jobs/{id}")
}

/// A `<select>` option.
pub struct Opt {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

fn options(values: impl IntoIterator<Item = String>, current: &str, any: &str) -> Vec<Opt> {
    let mut out = vec![Opt {
        value: String::new(),
        label: any.to_string(),
        selected: current.is_empty(),
    }];
    out.extend(values.into_iter().map(|v| Opt {
        selected: v == current,
        label: v.clone(),
        value: v,
    }));
    out
}

/// A failure of a page handler, shown as a toast (htmx) or an error page.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> PageError {
        PageError {
            status,
            message: message.into(),
        }
    }

    fn not_found(what: impl Into<String>) -> PageError {
        PageError::new(StatusCode::NOT_FOUND, what)
    }

    fn forbidden_for_viewers() -> PageError {
        PageError::new(
            StatusCode::FORBIDDEN,
            "viewers can look but not act: ask an admin",
        )
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::new(e.status, e.message)
    }
}

impl From<store::Error> for PageError {
    fn from(e: store::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl From<actix_web::error::BlockingError> for PageError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<askama::Error> for PageError {
    fn from(e: askama::Error) -> Self {
        tracing::error!(error = %e, "rendering a page failed");
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the page could not be rendered",
        )
    }
}

type PageResult = Result<HttpResponse, PageError>;

/// Turns a handler's result into a response: errors become a toast for
/// htmx (nothing else swapped) or a small page.
fn respond(req: &HttpRequest, result: PageResult) -> HttpResponse {
    match result {
        Ok(response) => response,
        Err(e) => {
            let mut response = HttpResponse::build(e.status);
            response.content_type("text/html; charset=utf-8");
            if is_htmx(req) {
                response
                    .insert_header(("HX-Reswap", "none"))
                    .body(toast_html("error", &e.message))
            } else {
                response.body(error_page(e.status, &e.message))
            }
        }
    }
}

fn html(body: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

/// A toast, delivered beside the main swap.
#[derive(Template)]
#[template(path = "toast.html")]
struct Toast<'a> {
    kind: &'a str,
    message: &'a str,
}

pub(crate) fn toast_html(kind: &str, message: &str) -> String {
    Toast { kind, message }
        .render()
        .unwrap_or_else(|_| String::new())
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

pub(crate) fn error_page(status: StatusCode, message: &str) -> String {
    ErrorPage {
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("Error"),
        message,
    }
    .render()
    .unwrap_or_else(|_| message.to_string())
}

/// The fragment for htmx, the page otherwise.
macro_rules! page_or_fragment {
    ($req:expr, $page:expr, $block:ident) => {{
        let page = $page;
        let body = if is_htmx($req) {
            page.$block().render()?
        } else {
            page.render()?
        };
        Ok(html(body))
    }};
}

// ---------------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------------

/// A queue as the overview and the queues page show it.
pub struct QueueView {
    pub name: String,
    pub jobs_url: String,
    pub dead_url: String,
    pub pause_url: String,
    pub resume_url: String,
    pub paused: bool,
    pub ready: i64,
    pub scheduled: i64,
    pub running: i64,
    pub retrying: i64,
    pub dead: i64,
    pub completed_last_hour: i64,
    pub failed_last_hour: i64,
    pub failure_rate: String,
    pub oldest_age: String,
    /// The backlog has waited more than a minute.
    pub backlog_warn: bool,
}

fn queue_view(q: &QueueSummary, now: i64) -> QueueView {
    let age = q.oldest_claimable_at.map(|at| (now - at).max(0));
    QueueView {
        name: q.name.clone(),
        jobs_url: url("/jobs", &[("queue", &q.name)]),
        dead_url: url("/dead", &[("queue", &q.name)]),
        pause_url: format!("/queues/{}/pause", enc(&q.name)),
        resume_url: format!("/queues/{}/resume", enc(&q.name)),
        paused: q.paused,
        ready: q.ready,
        scheduled: q.scheduled,
        running: q.running,
        retrying: q.retrying,
        dead: q.dead,
        completed_last_hour: q.completed_last_hour,
        failed_last_hour: q.failed_last_hour,
        failure_rate: q
            .failure_rate()
            .map_or_else(|| "—".into(), |r| format!("{:.1}%", r * 100.0)),
        oldest_age: age.map_or_else(|| "—".into(), duration),
        backlog_warn: age.is_some_and(|a| a > 60_000),
    }
}

/// One minute's bar in the overview chart (SVG coordinates).
pub struct Bar {
    pub x: f64,
    pub width: f64,
    pub ok_y: f64,
    pub ok_height: f64,
    pub fail_y: f64,
    pub fail_height: f64,
    pub title: String,
}

/// Throughput and failures per minute over the last hour.
pub struct Chart {
    pub width: u32,
    pub height: u32,
    pub bars: Vec<Bar>,
    pub peak: i64,
    pub completed: i64,
    pub failed: i64,
}

fn chart(minutes: &[store::Minute]) -> Chart {
    let (width, height) = (600.0, 120.0);
    let peak = minutes
        .iter()
        .map(|m| m.completed + m.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = width / minutes.len().max(1) as f64;
    let scale = |n: i64| n as f64 / peak as f64 * (height - 4.0);
    let bars = minutes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let ok = scale(m.completed);
            let fail = scale(m.failed);
            let start = DateTime::<Utc>::from_timestamp_millis(m.start).unwrap_or_default();
            Bar {
                x: i as f64 * slot + 1.0,
                width: (slot - 2.0).max(1.0),
                ok_y: height - ok,
                ok_height: ok,
                fail_y: height - ok - fail,
                fail_height: fail,
                title: format!(
                    "{} UTC: {} completed, {} failed",
                    start.format("%H:%M"),
                    m.completed,
                    m.failed
                ),
            }
        })
        .collect();
    Chart {
        width: width as u32,
        height: height as u32,
        bars,
        peak,
        completed: minutes.iter().map(|m| m.completed).sum(),
        failed: minutes.iter().map(|m| m.failed).sum(),
    }
}

#[derive(Template)]
#[template(path = "overview.html", blocks = ["overview"])]
struct OverviewPage {
    chrome: Chrome,
    refresh: u32,
    refresh_options: Vec<Opt>,
    queues: Vec<QueueView>,
    totals: QueueView,
    chart: Chart,
    workers: usize,
    now: When,
    /// Alert rules firing now.
    firing: Vec<String>,
}

#[derive(Deserialize)]
struct OverviewQuery {
    refresh: Option<u32>,
}

/// The refresh intervals offered, in seconds (0: off).
const REFRESH_CHOICES: [u32; 6] = [2, 5, 10, 30, 60, 0];

async fn overview(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    query: web::Query<OverviewQuery>,
) -> HttpResponse {
    let result = async {
        // Clamped to the choices offered; 5 s by default.
        let refresh = query
            .refresh
            .filter(|r| REFRESH_CHOICES.contains(r))
            .unwrap_or(5);
        let store = state.store.clone();
        let (d, alerts) = web::block(move || -> store::Result<_> {
            Ok((store.dashboard()?, store.alert_states()?))
        })
        .await??;
        let firing = alerts
            .into_iter()
            .filter(|a| a.state == "firing")
            .map(|a| a.rule)
            .collect();
        let queues: Vec<QueueView> = d.queues.iter().map(|q| queue_view(q, d.now_ms)).collect();
        let total = d.queues.iter().fold(QueueSummary::default(), |mut t, q| {
            t.ready += q.ready;
            t.scheduled += q.scheduled;
            t.running += q.running;
            t.retrying += q.retrying;
            t.dead += q.dead;
            t.completed_last_hour += q.completed_last_hour;
            t.failed_last_hour += q.failed_last_hour;
            t.oldest_claimable_at = match (t.oldest_claimable_at, q.oldest_claimable_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            t
        });
        let page = OverviewPage {
            chrome: Chrome::new(&op, "overview"),
            refresh,
            refresh_options: REFRESH_CHOICES
                .iter()
                .map(|&r| Opt {
                    value: r.to_string(),
                    label: if r == 0 {
                        "off".into()
                    } else {
                        format!("{r}s")
                    },
                    selected: r == refresh,
                })
                .collect(),
            totals: queue_view(&total, d.now_ms),
            queues,
            chart: chart(&d.minutes),
            workers: d.workers,
            now: when(d.now_ms, d.now_ms),
            firing,
        };
        page_or_fragment!(&req, page, as_overview)
    }
    .await;
    respond(&req, result)
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// A job in a list.
pub struct JobRow {
    pub id: i64,
    pub url: String,
    pub queue: String,
    pub kind: String,
    pub state: String,
    pub scheduled: bool,
    pub attempt: i32,
    pub max_attempts: i32,
    pub priority: i32,
    pub args: String,
    pub error: String,
    pub created: When,
    pub changed: When,
}

fn job_row(job: &Job, now: i64) -> JobRow {
    let changed = job.finished_at.or(job.started_at).unwrap_or(job.created_at);
    JobRow {
        id: job.id,
        url: job_url(job.id),
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        state: job.state.to_string(),
        scheduled: job.state == JobState::Queued && job.run_at > now,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        priority: job.priority,
        args: cut(&job.args, 120),
        error: job
            .last_error
            .as_deref()
            .map(|e| cut(e.lines().next().unwrap_or_default(), 160))
            .unwrap_or_default(),
        created: when(job.created_at, now),
        changed: when(changed, now),
    }
}

/// The job list's filters, as they come in the URL.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    signature: String,
    after: Option<i64>,
    limit: Option<i64>,
}

impl JobsQuery {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(50).clamp(10, 200)
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("state", self.state.clone()),
            ("queue", self.queue.clone()),
            ("kind", self.kind.clone()),
            ("q", self.q.clone()),
            ("signature", self.signature.clone()),
        ]
    }

    fn url(&self, after: Option<i64>) -> String {
        let mut pairs = self.pairs();
        if let Some(limit) = self.limit {
            pairs.push(("limit", self.limit().min(limit.max(1)).to_string()));
        }
        if let Some(after) = after {
            pairs.push(("after", after.to_string()));
        }
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        url("/jobs", &borrowed)
    }

    fn filter(&self) -> Result<JobFilter, PageError> {
        let invalid =
            |what: &str| PageError::new(StatusCode::UNPROCESSABLE_ENTITY, what.to_string());
        let (states, scheduled) = match self.state.as_str() {
            "" => (Vec::new(), None),
            "scheduled" => (vec![JobState::Queued], Some(true)),
            "queued" => (vec![JobState::Queued], Some(false)),
            other => (
                vec![
                    other
                        .parse::<JobState>()
                        .map_err(|_| invalid("unknown state filter"))?,
                ],
                None,
            ),
        };
        let name = |v: &str| -> Result<Option<String>, PageError> {
            if v.is_empty() {
                Ok(None)
            } else if v.len() <= 100 {
                Ok(Some(v.to_string()))
            } else {
                Err(invalid("filter value too long"))
            }
        };
        Ok(JobFilter {
            states,
            scheduled,
            queue: name(&self.queue)?,
            kind: name(&self.kind)?,
            search: (!self.q.trim().is_empty()).then(|| cut(self.q.trim(), 200)),
            signature: (!self.signature.is_empty()).then(|| self.signature.clone()),
            before_id: self.after,
            limit: self.limit(),
        })
    }
}

#[derive(Template)]
#[template(path = "jobs.html", blocks = ["results"])]
struct JobsPage {
    chrome: Chrome,
    query: JobsQuery,
    states: Vec<Opt>,
    queues: Vec<Opt>,
    kinds: Vec<Opt>,
    rows: Vec<JobRow>,
    next_url: Option<String>,
    first_url: Option<String>,
    /// Where the results fragment comes from (for refreshing after a bulk
    /// action).
    self_url: String,
}

const STATE_FILTERS: [&str; 7] = [
    "queued",
    "scheduled",
    "running",
    "retrying",
    "completed",
    "dead",
    "cancelled",
];

/// The job list; `with_filters` false for a fragment, which has no filter
/// form (so its queue names need not be read).
fn jobs_page_data(
    state: &AppState,
    op: &Operator,
    query: JobsQuery,
    with_filters: bool,
) -> Result<JobsPage, PageError> {
    let filter = query.filter()?;
    let store = &state.store;
    let jobs = store.jobs_list(&filter)?;
    let now = store.now_ms()?;
    let queue_names: Vec<String> = if with_filters {
        store.dashboard_queue_names()?
    } else {
        Vec::new()
    };
    let next_url = (jobs.len() as i64 == filter.limit)
        .then(|| jobs.last().map(|j| query.url(Some(j.id))))
        .flatten();
    let first_url = query.after.map(|_| query.url(None));
    Ok(JobsPage {
        chrome: Chrome::new(op, "jobs"),
        states: options(
            STATE_FILTERS.iter().map(|s| s.to_string()),
            &query.state,
            "any state",
        ),
        queues: options(queue_names, &query.queue, "any queue"),
        kinds: options(
            state.registry.kinds().map(str::to_string),
            &query.kind,
            "any kind",
        ),
        rows: jobs.iter().map(|j| job_row(j, now)).collect(),
        next_url,
        first_url,
        self_url: query.url(query.after),
        query,
    })
}

async fn jobs(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    query: web::Query<JobsQuery>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let whole = !is_htmx(&req);
        let page = web::block(move || jobs_page_data(&s, &op, query.into_inner(), whole)).await??;
        page_or_fragment!(&req, page, as_results)
    }
    .await;
    respond(&req, result)
}

/// Bulk actions on the selected jobs of a list.
#[derive(Deserialize)]
struct BulkForm {
    action: String,
    #[serde(default)]
    ids: Vec<i64>,
    /// The list's URL, to answer with its refreshed results.
    #[serde(default)]
    back: String,
}

async fn jobs_bulk(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    form: web::Form<Vec<(String, String)>>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        if !op.can_act() {
            return Err(PageError::forbidden_for_viewers());
        }
        let form = bulk_form(form.into_inner())?;
        let action = match form.action.as_str() {
            "retry" => BulkAction::Retry,
            "cancel" => BulkAction::Cancel,
            "delete" => BulkAction::Delete,
            _ => {
                return Err(PageError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown action",
                ));
            }
        };
        if form.ids.is_empty() {
            return Err(PageError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "select some jobs first",
            ));
        }
        let ids = form.ids.clone();
        let back: JobsQuery = form
            .back
            .split_once('?')
            .and_then(|(_, q)| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        let s = state.clone();
        let (report, page) = web::block(move || -> Result<_, PageError> {
            let report = s.store.jobs_bulk(action, &ids)?;
            s.store.audit_record(
                &op.actor(),
                &format!("job.{}", form.action),
                &format!("{} selected jobs", ids.len()),
                report.applied as i64,
                None,
            )?;
            Ok((report, jobs_page_data(&s, &op, back, false)?))
        })
        .await??;
        let mut message = format!("{}: {} job(s)", past_tense(action), report.applied);
        if report.refused > 0 {
            message.push_str(&format!(
                ", {} not in a state that allows it",
                report.refused
            ));
        }
        if report.missing > 0 {
            message.push_str(&format!(", {} gone", report.missing));
        }
        let body = page.as_results().render()? + &toast_html("ok", &message);
        Ok(html(body))
    }
    .await;
    respond(&req, result)
}

fn past_tense(action: BulkAction) -> &'static str {
    match action {
        BulkAction::Retry => "Retried",
        BulkAction::Cancel => "Cancelled",
        BulkAction::Delete => "Deleted",
    }
}

/// A urlencoded form with repeated `ids`.
fn bulk_form(pairs: Vec<(String, String)>) -> Result<BulkForm, PageError> {
    let mut form = BulkForm {
        action: String::new(),
        ids: Vec::new(),
        back: String::new(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "action" => form.action = v,
            "ids" => form.ids.push(
                v.parse()
                    .map_err(|_| PageError::new(StatusCode::BAD_REQUEST, "bad job id"))?,
            ),
            "back" => form.back = v,
            _ => {}
        }
    }
    form.ids.truncate(1000);
    Ok(form)
}

// ---------------------------------------------------------------------------
// One job
// ---------------------------------------------------------------------------

/// One attempt on the timeline.
pub struct AttemptView {
    pub attempt: i32,
    pub worker: String,
    pub started: When,
    pub took: String,
    pub outcome: String,
    pub error: String,
    /// What the attempt recorded, as name and value pairs.
    pub detail: Vec<(String, String)>,
}

/// An attempt's recorded JSON as name and value pairs: an object's fields
/// (strings bare, the rest as JSON), anything else as one `detail` pair.
fn detail_pairs(detail: Option<&str>) -> Vec<(String, String)> {
    let Some(text) = detail else {
        return Vec::new();
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                v => (k, v.to_string()),
            })
            .collect(),
        _ => vec![("detail".to_string(), text.to_string())],
    }
}

pub struct JobView {
    pub row: JobRow,
    pub run_at: When,
    pub started: Option<When>,
    pub finished: Option<When>,
    pub heartbeat: Option<When>,
    pub timeout: String,
    pub locked_by: String,
    pub rescue_count: i32,
    pub unique_key: String,
    pub cancel_requested: bool,
    pub last_error: String,
}

#[derive(Template)]
#[template(path = "job.html", blocks = ["job"])]
struct JobPage {
    chrome: Chrome,
    job: JobView,
    args: String,
    attempts: Vec<AttemptView>,
    /// Still moving: the fragment refreshes itself.
    live: bool,
    can_retry: bool,
    can_cancel: bool,
    can_delete: bool,
    can_edit: bool,
    retry_label: &'static str,
}

fn job_page_data(state: &AppState, op: &Operator, id: i64) -> Result<JobPage, PageError> {
    let store = &state.store;
    let job = store.job_get(id)?.ok_or_else(|| {
        PageError::not_found(format!("no job {id}: deleted, pruned, or never existed"))
    })?;
    let attempts = store.job_attempts(id)?;
    let now = store.now_ms()?;
    let args = serde_json::from_str::<serde_json::Value>(&job.args)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| job.args.clone());
    let s = job.state;
    Ok(JobPage {
        chrome: Chrome::new(op, "jobs"),
        args,
        attempts: attempts
            .iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                worker: a.worker.clone(),
                started: when(a.started_at, now),
                took: duration(a.finished_at - a.started_at),
                outcome: a.outcome.to_string(),
                error: a.error.clone().unwrap_or_default(),
                detail: detail_pairs(a.detail.as_deref()),
            })
            .collect(),
        live: !s.is_final(),
        can_retry: matches!(s, JobState::Dead | JobState::Cancelled | JobState::Retrying),
        can_cancel: !s.is_final() && !job.cancel_requested,
        can_delete: s != JobState::Running,
        can_edit: matches!(s, JobState::Dead | JobState::Cancelled),
        retry_label: if s == JobState::Retrying {
            "Retry now"
        } else {
            "Replay"
        },
        job: JobView {
            row: job_row(&job, now),
            run_at: when(job.run_at, now),
            started: job.started_at.map(|t| when(t, now)),
            finished: job.finished_at.map(|t| when(t, now)),
            heartbeat: job.heartbeat_at.map(|t| when(t, now)),
            timeout: duration(job.timeout_ms),
            locked_by: job.locked_by.clone().unwrap_or_default(),
            rescue_count: job.rescue_count,
            unique_key: job.unique_key.clone().unwrap_or_default(),
            cancel_requested: job.cancel_requested,
            last_error: job.last_error.clone().unwrap_or_default(),
        },
    })
}

async fn job(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    id: web::Path<i64>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let (s, id) = (state.clone(), id.into_inner());
        let page = web::block(move || job_page_data(&s, &op, id)).await??;
        page_or_fragment!(&req, page, as_job)
    }
    .await;
    respond(&req, result)
}

#[derive(Deserialize)]
struct RetryForm {
    /// New args (JSON) for a dead or cancelled job, from the edit form.
    args: Option<String>,
}

/// Retry, cancel or delete one job; answers with the job's fragment.
async fn job_action(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    path: web::Path<(i64, String)>,
    form: Option<web::Form<RetryForm>>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        if !op.can_act() {
            return Err(PageError::forbidden_for_viewers());
        }
        let (id, action) = path.into_inner();
        let args = form.and_then(|f| f.into_inner().args);
        if let Some(args) = &args {
            check_args(args)?;
        }
        let s = state.clone();
        let op2 = op.clone();
        let action2 = action.clone();
        let (transition, page) = web::block(move || -> Result<_, PageError> {
            let store = &s.store;
            let transition = match (action2.as_str(), &args) {
                ("retry", Some(args)) => store.job_retry_with_args(id, args)?,
                ("retry", None) => store.job_retry(id)?,
                ("cancel", _) => store.job_cancel(id)?,
                ("delete", _) => store.job_delete(id)?,
                _ => return Err(PageError::not_found("no such action")),
            };
            if let Transition::Applied(_) = transition {
                let detail = args.as_ref().map(|_| "with edited args");
                store.audit_record(
                    &op2.actor(),
                    &format!("job.{action2}"),
                    &format!("job {id}"),
                    1,
                    detail,
                )?;
            }
            let page = match job_page_data(&s, &op2, id) {
                Ok(page) => Some(page),
                Err(e) if e.status == StatusCode::NOT_FOUND => None,
                Err(e) => return Err(e),
            };
            Ok((transition, page))
        })
        .await??;
        match transition {
            Transition::Missing => Err(PageError::not_found(format!("no job {id}"))),
            Transition::Refused(current) => Err(PageError::new(
                StatusCode::CONFLICT,
                format!(
                    "job {id} is {current}: it cannot be {}",
                    past_participle(&action)
                ),
            )),
            Transition::Applied(_) if action == "delete" => Ok(HttpResponse::Ok()
                .insert_header(("HX-Redirect", "/jobs"))
                .content_type("text/html; charset=utf-8")
                .body(toast_html("ok", &format!("Deleted job {id}")))),
            Transition::Applied(new_state) => {
                let message = match (action.as_str(), new_state) {
                    ("cancel", JobState::Running) => {
                        format!("Cancel requested: job {id}'s worker sees it at its next heartbeat")
                    }
                    ("cancel", _) => format!("Cancelled job {id}"),
                    _ => format!("Job {id} is queued again"),
                };
                let page = page.ok_or_else(|| PageError::not_found(format!("no job {id}")))?;
                Ok(html(page.as_job().render()? + &toast_html("ok", &message)))
            }
        }
    }
    .await;
    respond(&req, result)
}

fn past_participle(action: &str) -> &'static str {
    match action {
        "retry" => "retried",
        "cancel" => "cancelled",
        _ => "deleted",
    }
}

/// Edited args must be JSON, within the API's limits.
fn check_args(args: &str) -> Result<(), PageError> {
    if args.len() > 1024 * 1024 {
        return Err(PageError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "args larger than 1 MiB",
        ));
    }
    serde_json::from_str::<serde_json::Value>(args)
        .map(drop)
        .map_err(|e| {
            PageError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the args are not valid JSON: {e}; nothing was changed"),
            )
        })
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

pub struct GroupView {
    pub kind: String,
    pub signature: String,
    pub count: i64,
    pub first: When,
    pub last: When,
    pub sample_url: String,
    pub sample_error: String,
    pub jobs_url: String,
    pub export_url: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeadQuery {
    #[serde(default)]
    queue: String,
    #[serde(default)]
    kind: String,
}

#[derive(Template)]
#[template(path = "dead.html", blocks = ["groups"])]
struct DeadPage {
    chrome: Chrome,
    query: DeadQuery,
    queues: Vec<Opt>,
    kinds: Vec<Opt>,
    groups: Vec<GroupView>,
    total: i64,
    self_url: String,
    export_url: String,
}

fn dead_page_data(
    state: &AppState,
    op: &Operator,
    query: DeadQuery,
    with_filters: bool,
) -> Result<DeadPage, PageError> {
    let store = &state.store;
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
    let groups = store.dead_groups(opt(&query.queue).as_deref(), opt(&query.kind).as_deref())?;
    let now = store.now_ms()?;
    let total = groups.iter().map(|g| g.count).sum();
    let mut kinds: Vec<String> = state.registry.kinds().map(str::to_string).collect();
    kinds.extend(groups.iter().map(|g| g.kind.clone()));
    kinds.sort();
    kinds.dedup();
    Ok(DeadPage {
        chrome: Chrome::new(op, "dead"),
        queues: if with_filters {
            options(store.dashboard_queue_names()?, &query.queue, "any queue")
        } else {
            Vec::new()
        },
        kinds: options(kinds, &query.kind, "any kind"),
        groups: groups
            .into_iter()
            .map(|g| GroupView {
                jobs_url: url(
                    "/jobs",
                    &[
                        ("state", "dead"),
                        ("queue", &query.queue),
                        ("kind", &g.kind),
                        ("signature", &g.signature),
                    ],
                ),
                export_url: url(
                    "/dead/export",
                    &[
                        ("queue", &query.queue),
                        ("kind", &g.kind),
                        ("signature", &g.signature),
                    ],
                ),
                sample_url: job_url(g.sample_id),
                sample_error: cut(g.sample_error.as_deref().unwrap_or_default(), 600),
                first: when(g.first_at, now),
                last: when(g.last_at, now),
                count: g.count,
                kind: g.kind,
                signature: g.signature,
            })
            .collect(),
        total,
        self_url: url("/dead", &[("queue", &query.queue), ("kind", &query.kind)]),
        export_url: url(
            "/dead/export",
            &[("queue", &query.queue), ("kind", &query.kind)],
        ),
        query,
    })
}

async fn dead(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    query: web::Query<DeadQuery>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let whole = !is_htmx(&req);
        let page = web::block(move || dead_page_data(&s, &op, query.into_inner(), whole)).await??;
        page_or_fragment!(&req, page, as_groups)
    }
    .await;
    respond(&req, result)
}

/// Which dead letters a replay or purge takes: a group (kind + signature),
/// everything matching queue/kind, or the selected ids.
#[derive(Debug, Default, Deserialize)]
struct DeadForm {
    #[serde(default)]
    queue: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    signature: String,
    /// Set (to anything) when the form means "every group" rather than one.
    #[serde(default)]
    all: String,
}

impl DeadForm {
    fn filter(&self) -> DeadFilter {
        let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
        DeadFilter {
            queue: opt(&self.queue),
            kind: opt(&self.kind),
            // A group is kind + signature; the empty signature is a group too.
            signature: if self.all.is_empty() {
                Some(self.signature.clone())
            } else {
                None
            },
            ids: None,
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.queue.is_empty() {
            parts.push(format!("queue={}", self.queue));
        }
        if !self.kind.is_empty() {
            parts.push(format!("kind={}", self.kind));
        }
        if self.all.is_empty() {
            parts.push(format!("signature={}", self.signature));
        }
        if parts.is_empty() {
            "all dead jobs".into()
        } else {
            format!("dead jobs {}", parts.join(" "))
        }
    }
}

/// A long bulk action running in the background, polled by the page.
pub(crate) struct Task {
    label: String,
    total: i64,
    done: AtomicUsize,
    finished: AtomicBool,
    error: Mutex<Option<String>>,
}

/// The bulk actions this process is running or has recently run.
#[derive(Default)]
pub(crate) struct Tasks {
    next: AtomicU64,
    running: Mutex<HashMap<u64, Arc<Task>>>,
}

impl Tasks {
    fn start(&self, label: String, total: i64) -> (u64, Arc<Task>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let task = Arc::new(Task {
            label,
            total,
            done: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the last hundred, finished ones first to go.
        if running.len() >= 100
            && let Some(old) = running
                .iter()
                .filter(|(_, t)| t.finished.load(Ordering::Relaxed))
                .map(|(id, _)| *id)
                .min()
        {
            running.remove(&old);
        }
        running.insert(id, task.clone());
        (id, task)
    }

    fn get(&self, id: u64) -> Option<Arc<Task>> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

#[derive(Template)]
#[template(path = "task.html")]
struct TaskFragment {
    id: u64,
    label: String,
    done: usize,
    total: i64,
    percent: u32,
    finished: bool,
    error: String,
}

fn task_fragment(id: u64, task: &Task) -> TaskFragment {
    let done = task.done.load(Ordering::Relaxed);
    let total = task.total.max(done as i64);
    TaskFragment {
        id,
        label: task.label.clone(),
        done,
        total,
        percent: if total == 0 {
            100
        } else {
            (done as f64 / total as f64 * 100.0) as u32
        },
        finished: task.finished.load(Ordering::Relaxed),
        error: task
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default(),
    }
}

/// Starts a replay or purge of dead letters in the background and answers
/// with its progress fragment, which polls until the task is done.
async fn dead_bulk(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    action: web::Path<String>,
    form: web::Form<DeadForm>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        if !op.can_act() {
            return Err(PageError::forbidden_for_viewers());
        }
        let action = match action.as_str() {
            "replay" => DeadAction::Replay,
            "purge" => DeadAction::Purge,
            _ => return Err(PageError::not_found("no such action")),
        };
        let form = form.into_inner();
        let filter = form.filter();
        let store = state.store.clone();
        let count_filter = filter.clone();
        let total = web::block(move || store.jobs_dead_count(&count_filter)).await??;
        let verb = if action == DeadAction::Replay {
            "Replaying"
        } else {
            "Purging"
        };
        let target = form.describe();
        let (id, task) = state.tasks.start(format!("{verb} {target}"), total);
        let store = state.store.clone();
        let work = task.clone();
        std::thread::Builder::new()
            .name("errand-bulk".into())
            .spawn(move || {
                let result = store.jobs_dead_apply(&filter, action, |done| {
                    work.done.store(done, Ordering::Relaxed);
                });
                match result {
                    Ok(done) => {
                        work.done.store(done, Ordering::Relaxed);
                        let name = if action == DeadAction::Replay {
                            "dead.replay"
                        } else {
                            "dead.purge"
                        };
                        let _ = store.audit_record(&op.actor(), name, &target, done as i64, None);
                    }
                    Err(e) => {
                        *work.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    }
                }
                work.finished.store(true, Ordering::Relaxed);
            })
            .map_err(|e| {
                PageError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot start: {e}"),
                )
            })?;
        Ok(html(task_fragment(id, &task).render()?))
    }
    .await;
    respond(&req, result)
}

async fn task(req: HttpRequest, state: web::Data<AppState>, id: web::Path<u64>) -> HttpResponse {
    let result = async {
        let id = id.into_inner();
        let task = state.tasks.get(id).ok_or_else(|| {
            PageError::not_found("this task is unknown here (it may run on another errand server)")
        })?;
        let fragment = task_fragment(id, &task);
        let mut response = HttpResponse::Ok();
        if fragment.finished {
            // Let the groups table (and any list) reload.
            response.insert_header(("HX-Trigger", "dead-changed"));
        }
        Ok(response
            .content_type("text/html; charset=utf-8")
            .body(fragment.render()?))
    }
    .await;
    respond(&req, result)
}

/// The matching dead letters as a JSON array (streamed, a batch at a time).
async fn dead_export(state: web::Data<AppState>, query: web::Query<DeadForm>) -> HttpResponse {
    let form = query.into_inner();
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
    let filter = JobFilter {
        states: vec![JobState::Dead],
        queue: opt(&form.queue),
        kind: opt(&form.kind),
        signature: opt(&form.signature),
        limit: 500,
        ..JobFilter::default()
    };
    let store = state.store.clone();
    let stream = futures_util::stream::unfold(
        (store, filter, true, false),
        |(store, mut filter, first, done)| async move {
            if done {
                return None;
            }
            let s = store.clone();
            let f = filter.clone();
            let page =
                web::block(move || -> store::Result<_> { Ok((s.jobs_list(&f)?, s.now_ms()?)) })
                    .await;
            let (jobs, now) = match page {
                Ok(Ok(page)) => page,
                _ => {
                    return Some((
                        Err(actix_web::error::ErrorServiceUnavailable(
                            "database unavailable",
                        )),
                        (store, filter, false, true),
                    ));
                }
            };
            let mut chunk = String::new();
            if first {
                chunk.push('[');
            }
            for (i, job) in jobs.iter().enumerate() {
                if !(first && i == 0) {
                    chunk.push(',');
                }
                chunk.push('\n');
                let body = super::api::job_body(job.clone(), now);
                chunk.push_str(&serde_json::to_string(&body).unwrap_or_default());
            }
            let last = (jobs.len() as i64) < filter.limit;
            if last {
                chunk.push_str("\n]\n");
            }
            filter.before_id = jobs.last().map(|j| j.id);
            Some((
                Ok::<_, actix_web::Error>(web::Bytes::from(chunk)),
                (store, filter, false, last),
            ))
        },
    );
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"errand-dead-letters.json\"",
        ))
        .streaming(stream)
}

// ---------------------------------------------------------------------------
// Queues, workers, audit
// ---------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "queues.html", blocks = ["queues"])]
struct QueuesPage {
    chrome: Chrome,
    queues: Vec<QueueView>,
}

fn queues_page_data(state: &AppState, op: &Operator) -> Result<QueuesPage, PageError> {
    let d = state.store.dashboard()?;
    Ok(QueuesPage {
        chrome: Chrome::new(op, "queues"),
        queues: d.queues.iter().map(|q| queue_view(q, d.now_ms)).collect(),
    })
}

async fn queues(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let page = web::block(move || queues_page_data(&s, &op)).await??;
        page_or_fragment!(&req, page, as_queues)
    }
    .await;
    respond(&req, result)
}

async fn queue_action(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        if !op.can_act() {
            return Err(PageError::forbidden_for_viewers());
        }
        let (name, action) = path.into_inner();
        let paused = match action.as_str() {
            "pause" => true,
            "resume" => false,
            _ => return Err(PageError::not_found("no such action")),
        };
        if name.is_empty() || name.len() > 100 {
            return Err(PageError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad queue name",
            ));
        }
        let s = state.clone();
        let queue = name.clone();
        let page = web::block(move || -> Result<_, PageError> {
            s.store.queue_set_paused(&queue, paused)?;
            s.store.audit_record(
                &op.actor(),
                &format!("queue.{action}"),
                &format!("queue {queue}"),
                0,
                None,
            )?;
            queues_page_data(&s, &op)
        })
        .await??;
        let message = if paused {
            format!("Paused {name}: no new jobs start until it is resumed")
        } else {
            format!("Resumed {name}")
        };
        Ok(html(
            page.as_queues().render()? + &toast_html("ok", &message),
        ))
    }
    .await;
    respond(&req, result)
}

pub struct RunningJob {
    pub url: String,
    pub id: i64,
    pub kind: String,
    pub queue: String,
    pub started: When,
}

pub struct WorkerView {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub queues: String,
    pub concurrency: i32,
    pub version: String,
    pub started: When,
    pub heartbeat: When,
    /// Silent for over a minute: probably gone, soon rescued.
    pub stale: bool,
    /// A worker fetching over HTTP (`POST /api/workers/fetch`), not an
    /// errand process.
    pub external: bool,
    pub jobs: Vec<RunningJob>,
}

#[derive(Template)]
#[template(path = "workers.html", blocks = ["workers"])]
struct WorkersPage {
    chrome: Chrome,
    workers: Vec<WorkerView>,
    orphans: Vec<RunningJob>,
}

async fn workers(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let page = web::block(move || -> Result<_, PageError> {
            let store = &s.store;
            let workers = store.workers_list()?;
            let running = store.jobs_list(&JobFilter {
                states: vec![JobState::Running],
                limit: 1000,
                ..JobFilter::default()
            })?;
            let now = store.now_ms()?;
            let mut by_worker: HashMap<String, Vec<RunningJob>> = HashMap::new();
            for job in running {
                by_worker
                    .entry(job.locked_by.clone().unwrap_or_default())
                    .or_default()
                    .push(RunningJob {
                        url: job_url(job.id),
                        id: job.id,
                        kind: job.kind.clone(),
                        queue: job.queue.clone(),
                        started: when(job.started_at.unwrap_or(job.created_at), now),
                    });
            }
            let views = workers
                .into_iter()
                .map(|w| WorkerView {
                    jobs: by_worker.remove(&w.id).unwrap_or_default(),
                    stale: now - w.heartbeat_at > 60_000,
                    external: w.version == super::workers::EXTERNAL_VERSION
                        && w.id.starts_with(super::workers::EXTERNAL_PREFIX),
                    started: when(w.started_at, now),
                    heartbeat: when(w.heartbeat_at, now),
                    id: w.id,
                    host: w.host,
                    pid: w.pid,
                    queues: w.queues,
                    concurrency: w.concurrency,
                    version: w.version,
                })
                .collect();
            Ok(WorkersPage {
                chrome: Chrome::new(&op, "workers"),
                workers: views,
                orphans: by_worker.into_values().flatten().collect(),
            })
        })
        .await??;
        page_or_fragment!(&req, page, as_workers)
    }
    .await;
    respond(&req, result)
}

pub struct AuditView {
    pub at: When,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub jobs: i64,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "audit.html", blocks = ["entries"])]
struct AuditPage {
    chrome: Chrome,
    entries: Vec<AuditView>,
    next_url: Option<String>,
}

#[derive(Deserialize)]
struct AuditQuery {
    before: Option<i64>,
}

async fn audit(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
    query: web::Query<AuditQuery>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let before = query.before;
        let (entries, now) = web::block(move || -> store::Result<(Vec<AuditEntry>, i64)> {
            Ok((s.store.audit_list(before, 50)?, s.store.now_ms()?))
        })
        .await??;
        let next_url = (entries.len() == 50)
            .then(|| entries.last().map(|e| format!("/audit?before={}", e.id)))
            .flatten();
        let page = AuditPage {
            chrome: Chrome::new(&op, "audit"),
            entries: entries
                .into_iter()
                .map(|e| AuditView {
                    at: when(e.at, now),
                    actor: e.actor,
                    action: e.action,
                    target: e.target,
                    jobs: e.jobs,
                    detail: e.detail.unwrap_or_default(),
                })
                .collect(),
            next_url,
        };
        page_or_fragment!(&req, page, as_entries)
    }
    .await;
    respond(&req, result)
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

pub struct RuleView {
    pub name: String,
    pub description: String,
    pub threshold: String,
    pub value: String,
    pub state: String,
    pub since: Option<When>,
    pub evaluated: Option<When>,
    pub pending: String,
}

pub struct NotificationView {
    pub created: When,
    pub rule: String,
    pub event: String,
    pub subject: String,
    pub status: String,
    pub attempts: i32,
    pub sent: Option<When>,
    pub error: String,
}

#[derive(Template)]
#[template(path = "alerts.html", blocks = ["alerts"])]
struct AlertsPage {
    chrome: Chrome,
    rules: Vec<RuleView>,
    notifications: Vec<NotificationView>,
    can_send: bool,
    recipients: String,
}

fn alerts_page_data(state: &AppState, op: &Operator) -> Result<AlertsPage, PageError> {
    let config = &state.config.alerts;
    let store = &state.store;
    let states: HashMap<String, store::AlertState> = store
        .alert_states()?
        .into_iter()
        .map(|s| (s.rule.clone(), s))
        .collect();
    let now = store.now_ms()?;
    let rules = config
        .rules
        .iter()
        .map(|rule| {
            let st = states.get(&rule.name);
            RuleView {
                name: rule.name.clone(),
                description: rule.describe(),
                threshold: rule.format(rule.threshold),
                value: st
                    .and_then(|s| s.value)
                    .map_or_else(|| "—".into(), |v| rule.format(v)),
                state: st.map_or_else(|| "inactive".into(), |s| s.state.clone()),
                since: st.map(|s| when(s.since, now)),
                evaluated: st.map(|s| when(s.evaluated_at, now)),
                pending: humantime::format_duration(rule.pending).to_string(),
            }
        })
        .collect();
    let notifications = store
        .outbox_recent(50)?
        .into_iter()
        .map(|n| NotificationView {
            created: when(n.created_at, now),
            rule: n.rule,
            event: n.event,
            subject: n.subject,
            status: n.status,
            attempts: n.attempts,
            sent: n.sent_at.map(|t| when(t, now)),
            error: n.last_error.unwrap_or_default(),
        })
        .collect();
    Ok(AlertsPage {
        chrome: Chrome::new(op, "alerts"),
        rules,
        notifications,
        can_send: config.can_send(),
        recipients: config.to.join(", "),
    })
}

async fn alerts(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        let s = state.clone();
        let page = web::block(move || alerts_page_data(&s, &op)).await??;
        page_or_fragment!(&req, page, as_alerts)
    }
    .await;
    respond(&req, result)
}

/// Queues a test email to the configured recipients.
async fn alerts_test(
    req: HttpRequest,
    state: web::Data<AppState>,
    op: web::ReqData<Operator>,
) -> HttpResponse {
    let op = op.into_inner();
    let result = async {
        if !op.can_act() {
            return Err(PageError::forbidden_for_viewers());
        }
        if !state.config.alerts.can_send() {
            return Err(PageError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no recipients or SMTP server configured: set --alert-to and --smtp-url",
            ));
        }
        let s = state.clone();
        let page = web::block(move || -> Result<_, PageError> {
            let email = crate::alerts::test_email(&s.config.alerts, &op.actor());
            s.store.outbox_push(&email)?;
            s.store
                .audit_record(&op.actor(), "alerts.test", "test email", 0, None)?;
            alerts_page_data(&s, &op)
        })
        .await??;
        let message = format!(
            "Test email queued for {}: it leaves within seconds (see its status below)",
            state.config.alerts.to.join(", ")
        );
        Ok(html(
            page.as_alerts().render()? + &toast_html("ok", &message),
        ))
    }
    .await;
    respond(&req, result)
}

// ---------------------------------------------------------------------------
// Static files and routes
// ---------------------------------------------------------------------------

/// The vendored assets, compiled in: no CDN, no build step.
async fn static_file(file: web::Path<String>) -> HttpResponse {
    let (body, content_type): (&'static [u8], &str) = match file.as_str() {
        "htmx.min.js" => (
            include_bytes!("../../static/htmx.min.js"),
            "text/javascript",
        ),
        "errand.js" => (include_bytes!("../../static/errand.js"), "text/javascript"),
        "errand.css" => (include_bytes!("../../static/errand.css"), "text/css"),
        "favicon.svg" => (include_bytes!("../../static/favicon.svg"), "image/svg+xml"),
        _ => return HttpResponse::NotFound().finish(),
    };
    HttpResponse::Ok()
        .content_type(format!("{content_type}; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

/// The dashboard's routes (behind [`super::access::guard`]).
pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(resource("/", "GET").route(web::get().to(overview)))
        .service(resource("/jobs", "GET").route(web::get().to(jobs)))
        .service(resource("/jobs/bulk", "POST").route(web::post().to(jobs_bulk)))
        .service(resource("/jobs/{id}", "GET").route(web::get().to(job)))
        .service(resource("/jobs/{id}/{action}", "POST").route(web::post().to(job_action)))
        .service(resource("/dead", "GET").route(web::get().to(dead)))
        .service(resource("/dead/export", "GET").route(web::get().to(dead_export)))
        .service(resource("/dead/{action}", "POST").route(web::post().to(dead_bulk)))
        .service(resource("/tasks/{id}", "GET").route(web::get().to(task)))
        .service(resource("/queues", "GET").route(web::get().to(queues)))
        .service(resource("/queues/{name}/{action}", "POST").route(web::post().to(queue_action)))
        .service(resource("/workers", "GET").route(web::get().to(workers)))
        .service(resource("/audit", "GET").route(web::get().to(audit)))
        .service(resource("/alerts", "GET").route(web::get().to(alerts)))
        .service(resource("/alerts/test", "POST").route(web::post().to(alerts_test)));
}

/// Static assets (public: they hold no data).
pub fn static_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource("/static/{file}", "GET").route(web::get().to(static_file)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_naturally() {
        assert_eq!(relative(500), "just now");
        assert_eq!(relative(42_000), "42s ago");
        assert_eq!(relative(5 * 60_000), "5m ago");
        assert_eq!(relative(-5 * 60_000), "in 5m");
        assert_eq!(relative(3 * 86_400_000), "3d ago");
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(2300), "2.3s");
        assert_eq!(duration(250_000), "4m 10s");
    }

    #[test]
    fn urls_encode_their_values() {
        assert_eq!(
            url("/jobs", &[("queue", "a b&c"), ("kind", "")]),
            "/jobs?queue=a%20b%26c"
        );
        assert_eq!(url("/jobs", &[]), "/jobs");
    }
}
