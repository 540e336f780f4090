//! The JSON API: enqueue (one or a batch, with `Idempotency-Key`), read and
//! list jobs, act on them (retry, cancel, delete, replay dead letters),
//! pause and resume queues, and stats. Each handler is described for the
//! OpenAPI document served at `/api/openapi.json` right where it is defined,
//! so the description cannot drift from the code.
//!
//! A `202 Accepted` is sent only after the jobs are committed.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use super::{Actor, ApiError, AppState, blocking, parse_json, read_json, read_json_body};
use crate::store::{
    Attempt, AttemptOutcome, BulkAction, DeadAction, DeadFilter, Enqueued, Job, JobFilter,
    JobState, NewJob, Once, QueueOverview, Transition,
};

/// Longest queue or kind name.
const MAX_NAME: usize = 100;
/// Longest unique key or idempotency key.
const MAX_KEY: usize = 255;
/// Longest accepted timeout: a week.
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Furthest accepted delay: ten years.
const MAX_DELAY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Every error: a stable code and a message that says what to do.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: `malformed_json`, `unsupported_media_type`,
    /// `payload_too_large`, `too_deep`, `invalid_field`, `unknown_kind`,
    /// `idempotency_key_reused`, `unauthorized`, `not_found`, `conflict`,
    /// `lease_lost`, `unavailable`, `no_route`, `method_not_allowed`, `bad_request`, `internal`.
    pub error: String,
    /// For a person: what went wrong and what to do.
    pub message: String,
}

/// A job to enqueue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// Queue name (letters, digits, `_ . : -`; at most 100). Default `default`.
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,100}$")]
    queue: Option<String>,
    /// A job kind this server knows (same characters as queue names); on a
    /// queue named by `--external-queues`, any kind.
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,100}$")]
    kind: String,
    /// The arguments, any JSON. Default `{}`.
    #[schema(value_type = Object)]
    args: Option<Box<RawValue>>,
    /// Lower runs first, from -32768 to 32767. Default 0.
    #[schema(minimum = -32768, maximum = 32767)]
    priority: Option<i32>,
    /// Run no earlier than this instant (RFC 3339). Not with `delay_ms`.
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Run no earlier than this many milliseconds from now (up to ten
    /// years). Not with `run_at`.
    #[schema(maximum = 315_360_000_000_u64)]
    delay_ms: Option<u64>,
    /// Attempts before the job goes to `dead`, 1 to 1000. Default: the kind's, else 25.
    #[schema(minimum = 1, maximum = 1000)]
    max_attempts: Option<i32>,
    /// How long one attempt may run, in ms (up to a week). Default: the kind's, else 5 min.
    #[schema(minimum = 1, maximum = 604_800_000_u64)]
    timeout_ms: Option<u64>,
    /// While an unfinished job has this key, enqueueing returns that job
    /// (200) instead of creating another.
    #[schema(min_length = 1, max_length = 255)]
    unique_key: Option<String>,
}

/// Several jobs, enqueued in one transaction: all or none.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to `--batch-max` (default 1,000) jobs.
    #[schema(min_items = 1)]
    jobs: Vec<EnqueueRequest>,
}

/// The answer to an enqueue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnqueuedBody {
    pub id: i64,
    /// Null when a job returned for a repeated `Idempotency-Key` has since
    /// been deleted or pruned.
    pub state: Option<JobState>,
    /// False when an existing job was returned (same `unique_key` or
    /// `Idempotency-Key`).
    pub created: bool,
    /// Where to follow the job.
    pub url: String,
}

/// The answer to a batch enqueue, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchBody {
    pub jobs: Vec<EnqueuedBody>,
}

/// A job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobBody {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    #[schema(value_type = Object)]
    pub args: Box<serde_json::value::RawValue>,
    pub state: JobState,
    /// A `queued` job whose `run_at` is still ahead.
    pub scheduled: bool,
    pub priority: i32,
    /// Attempts started so far.
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub heartbeat_at: Option<String>,
    pub deadline_at: Option<String>,
    pub timeout_ms: i64,
    /// The worker that holds, or last held, the job.
    pub locked_by: Option<String>,
    pub rescue_count: i32,
    pub last_error: Option<String>,
    pub unique_key: Option<String>,
    pub cancel_requested: bool,
    pub url: String,
}

/// One attempt of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptBody {
    pub attempt: i32,
    pub worker: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: i64,
    #[schema(value_type = String, example = "error")]
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
    /// What the attempt recorded (an HTTP job's status, duration and
    /// response excerpt; an email's SMTP reply), as JSON.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
}

/// A job with every attempt, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobDetailBody {
    #[serde(flatten)]
    pub job: JobBody,
    pub attempts: Vec<AttemptBody>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobListBody {
    pub jobs: Vec<JobBody>,
    /// The next page (older jobs), or null at the end.
    pub next: Option<String>,
}

/// Filters for `GET /api/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// States, comma-separated (`queued,retrying`); empty means all.
    #[param(
        pattern = r"^((queued|running|retrying|completed|dead|cancelled)(,(queued|running|retrying|completed|dead|cancelled))*)?$"
    )]
    state: Option<String>,
    /// Empty means every queue.
    #[param(pattern = r"^[A-Za-z0-9_.:-]{0,100}$")]
    queue: Option<String>,
    /// Empty means every kind.
    #[param(pattern = r"^[A-Za-z0-9_.:-]{0,100}$")]
    kind: Option<String>,
    /// Page size, clamped to 1..=1000. Default 25.
    limit: Option<i64>,
    /// Only jobs older than this id (from the previous page's `next`).
    after: Option<i64>,
}

/// Which dead jobs to replay; name at least one filter, or `all: true`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct ReplayRequest {
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,100}$")]
    queue: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,100}$")]
    kind: Option<String>,
    /// A dead-letter group's error signature (see the dashboard's groups).
    signature: Option<String>,
    ids: Option<Vec<i64>>,
    /// Replay every dead job.
    #[serde(default)]
    all: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplayBody {
    /// Dead jobs put back to `queued`.
    pub replayed: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurgeBody {
    /// Dead jobs deleted.
    pub purged: usize,
}

/// One action on several jobs.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// `retry`, `cancel` or `delete`.
    #[schema(pattern = "^(retry|cancel|delete)$")]
    action: String,
    /// 1 to 1,000 job ids.
    #[schema(min_items = 1, max_items = 1000)]
    ids: Vec<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkBody {
    pub applied: usize,
    /// In a state the action does not fit (e.g. deleting a running job).
    pub refused: usize,
    /// No such job.
    pub missing: usize,
}

/// A queue and its jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueBody {
    pub name: String,
    pub paused: bool,
    /// Jobs per state (all six states, zeros included).
    pub counts: BTreeMap<String, i64>,
    /// Queued jobs whose `run_at` is still ahead.
    pub scheduled: i64,
    /// How long the oldest claimable job has waited, or null when none waits.
    pub oldest_claimable_age_ms: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueListBody {
    pub queues: Vec<QueueBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueStateBody {
    pub name: String,
    pub paused: bool,
}

/// Totals over every queue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsBody {
    /// Jobs per state (all six states, zeros included).
    pub jobs: BTreeMap<String, i64>,
    pub scheduled: i64,
    pub queues: usize,
    /// Live worker processes.
    pub workers: usize,
    pub oldest_claimable_age_ms: Option<i64>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "errand",
        description = "Background jobs you can see into. Enqueue answers 202 only after the job is \
                       committed; every error is JSON `{error, message}`."
    ),
    paths(
        enqueue, enqueue_batch, list_jobs, get_job, retry_job, cancel_job, delete_job,
        bulk_jobs, replay_dead, purge_dead, list_queues, pause_queue, resume_queue, stats,
        super::workers::fetch, super::workers::heartbeat, super::workers::complete,
        super::workers::fail, super::workers::snooze, healthz_doc, readyz_doc,
        metrics_doc, openapi_doc
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Enqueue, read and act on jobs"),
        (name = "queues", description = "Queues and totals"),
        (name = "external workers", description = "Workers in any language, over HTTP: fetch jobs \
            from the queues named by `--external-queues` with a lease, heartbeat them, and report \
            how they ended. A stale lease is refused with 409 and changes nothing"),
        (name = "operations", description = "Probes, metrics and this document")
    )
)]
pub struct ApiDoc;

/// What every route shares, added to the document in one place: the bearer
/// token on `/api` and `/metrics` (and its 401), and the 503 of every route
/// that needs the database.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let api = path.starts_with("/api/") && path != "/api/openapi.json";
            let guarded = api || path == "/metrics";
            let needs_database = api || path == "/readyz";
            for operation in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                if guarded {
                    operation.security = Some(vec![SecurityRequirement::new(
                        "bearer",
                        Vec::<String>::new(),
                    )]);
                    operation
                        .responses
                        .responses
                        .insert("401".into(), error("Missing or wrong bearer token").into());
                }
                if needs_database {
                    operation.responses.responses.insert(
                        "503".into(),
                        error(
                            "The database is unavailable; nothing was changed. Retry after \
                             `Retry-After` seconds",
                        )
                        .into(),
                    );
                }
            }
        }
    }
}

impl utoipa::PartialSchema for JobState {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(JobState::ALL.iter().map(|s| s.as_str())))
            .into()
    }
}

impl ToSchema for JobState {}

/// The routes under `/api` (all behind the bearer token).
pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(
        resource("/jobs", "GET, POST")
            .route(web::post().to(enqueue))
            .route(web::get().to(list_jobs)),
    )
    .service(resource("/jobs/batch", "POST").route(web::post().to(enqueue_batch)))
    .service(resource("/jobs/bulk", "POST").route(web::post().to(bulk_jobs)))
    .service(
        resource("/jobs/{id}", "GET, DELETE")
            .route(web::get().to(get_job))
            .route(web::delete().to(delete_job)),
    )
    .service(resource("/jobs/{id}/retry", "POST").route(web::post().to(retry_job)))
    .service(resource("/jobs/{id}/cancel", "POST").route(web::post().to(cancel_job)))
    .service(resource("/dead/replay", "POST").route(web::post().to(replay_dead)))
    .service(resource("/dead/purge", "POST").route(web::post().to(purge_dead)))
    .service(resource("/queues", "GET").route(web::get().to(list_queues)))
    .service(resource("/queues/{name}/pause", "POST").route(web::post().to(pause_queue)))
    .service(resource("/queues/{name}/resume", "POST").route(web::post().to(resume_queue)))
    .service(resource("/stats", "GET").route(web::get().to(stats)));
}

pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes"),
    )
}

// ---------------------------------------------------------------------------
// Enqueue
// ---------------------------------------------------------------------------

/// Enqueue a job.
#[utoipa::path(
    post, path = "/api/jobs", tag = "jobs",
    request_body = EnqueueRequest,
    params(("Idempotency-Key" = Option<String>, Header,
            description = "Repeat a request safely: the same key and body return the same job (200); \
                           the same key with another body is refused (422). Remembered for 24 h.")),
    responses(
        (status = 202, description = "Enqueued and committed", body = EnqueuedBody,
         headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "An existing job: same `unique_key` (unfinished) or same `Idempotency-Key`", body = EnqueuedBody),
        (status = 400, description = "Malformed JSON, or nested too deep", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field, unknown kind, or reused idempotency key", body = ErrorBody),
    )
)]
async fn enqueue(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json_body(&req, payload, state.config.body_limit).await?;
    let request: EnqueueRequest = parse_json(&body)?;
    let job = new_job(&state, request, "")?;
    let results = submit(&state, &req, "POST /api/jobs", &body, vec![job]).await?;
    let answer = results.into_iter().next().expect("one job, one answer");
    let status = if answer.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status)
        .insert_header((header::LOCATION, answer.url.clone()))
        .json(answer))
}

/// Enqueue jobs in one transaction.
#[utoipa::path(
    post, path = "/api/jobs/batch", tag = "jobs",
    request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "As for `POST /api/jobs`.")),
    responses(
        (status = 202, description = "Enqueued and committed, in request order", body = BatchBody),
        (status = 200, description = "Nothing new: every job already existed (unique keys, or a repeated idempotency key)", body = BatchBody),
        (status = 400, description = "Malformed JSON, or nested too deep", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "An invalid job (its index is named), too many or no jobs; nothing stored", body = ErrorBody),
    )
)]
async fn enqueue_batch(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json_body(&req, payload, state.config.body_limit).await?;
    let batch: BatchRequest = parse_json(&body)?;
    let max = state.config.batch_max;
    if batch.jobs.is_empty() || batch.jobs.len() > max {
        return Err(ApiError::invalid(format!(
            "a batch holds 1 to {max} jobs, not {}; split it into several requests",
            batch.jobs.len()
        )));
    }
    let jobs = batch
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, r)| new_job(&state, r, &format!("jobs[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let results = submit(&state, &req, "POST /api/jobs/batch", &body, jobs).await?;
    let status = if results.iter().any(|r| r.created) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(BatchBody { jobs: results }))
}

/// Stores `jobs` (under the request's idempotency key, if any) and answers
/// for each.
async fn submit(
    state: &AppState,
    req: &HttpRequest,
    endpoint: &str,
    body: &[u8],
    jobs: Vec<NewJob>,
) -> Result<Vec<EnqueuedBody>, ApiError> {
    let key = idempotency_key(req)?;
    let store = state.store.clone();
    let ttl = state.config.idempotency_ttl;
    let queues: Vec<String> = jobs.iter().map(|j| j.queue.clone()).collect();
    let results: Vec<EnqueuedBody> = match key {
        None => {
            let enqueued = blocking(move || Ok(store.jobs_enqueue(&jobs)?)).await?;
            enqueued.into_iter().map(enqueued_body).collect()
        }
        Some(key) => {
            // Parsed again only here: the hash is over canonical JSON.
            let hash = request_hash(endpoint, &parse_json::<Value>(body)?);
            let once = blocking(move || {
                Ok(match store.jobs_enqueue_once(&key, &hash, ttl, &jobs)? {
                    Once::Fresh(enqueued) => {
                        Some(enqueued.into_iter().map(enqueued_body).collect())
                    }
                    // A repeat answers with the jobs' current states.
                    Once::Repeat(ids) => {
                        let mut answers = Vec::with_capacity(ids.len());
                        for id in ids {
                            answers.push(EnqueuedBody {
                                id,
                                state: store.job_get(id)?.map(|j| j.state),
                                created: false,
                                url: job_url(id),
                            });
                        }
                        Some(answers)
                    }
                    Once::Mismatch => None,
                })
            })
            .await?;
            once.ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was already used for a different request; \
                     use a new key for a new request",
                )
            })?
        }
    };
    for (answer, queue) in results.iter().zip(&queues) {
        if answer.created {
            state.metrics.enqueued(queue, 1);
        }
    }
    Ok(results)
}

fn enqueued_body(e: Enqueued) -> EnqueuedBody {
    EnqueuedBody {
        id: e.id,
        state: Some(e.state),
        created: e.created,
        url: job_url(e.id),
    }
}

fn job_url(id: i64) -> String {
    format!("/api/jobs/{id}")
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key must be printable ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_KEY} characters"
        )));
    }
    Ok(Some(key.to_string()))
}

/// SHA-256 of the endpoint and the body in canonical form (object keys
/// sorted), so that a retry with the same JSON matches whatever its
/// whitespace or key order.
fn request_hash(endpoint: &str, body: &Value) -> String {
    fn canonical(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = format!("{endpoint}\n");
    canonical(body, &mut text);
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A JSON value as a request type: wrong types and unknown fields are 422.
fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("{e}")))
}

/// Checks a queue or kind name.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} must be 1 to {MAX_NAME} letters, digits, '_', '.', ':' or '-'"
        )))
    }
}

/// Validates a request into a job, with the kind's defaults applied.
/// `at` prefixes field names in messages (`jobs[3].`).
fn new_job(state: &AppState, r: EnqueueRequest, at: &str) -> Result<NewJob, ApiError> {
    let field = |name: &str| format!("{at}{name}");
    let queue = r
        .queue
        .unwrap_or_else(|| crate::store::DEFAULT_QUEUE.to_string());
    check_name(&field("queue"), &queue)?;
    check_name(&field("kind"), &r.kind)?;
    // An external queue takes any kind: its workers, not this process, know
    // what they run.
    let external = state.config.external_queues.contains(&queue);
    if !external && !state.registry.contains(&r.kind) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kind",
            format!(
                "{}: {}; to hand other kinds to external workers, enqueue them on a queue \
                 named by --external-queues (ERRAND_EXTERNAL_QUEUES)",
                field("kind"),
                state.registry.unknown(&r.kind)
            ),
        ));
    }
    let mut job = match r.args {
        Some(args) => NewJob::with_raw_args(r.kind, args),
        None => NewJob::new(r.kind, Value::Object(Default::default())),
    }
    .queue(queue);
    if let Some(priority) = r.priority {
        if !(i32::from(i16::MIN)..=i32::from(i16::MAX)).contains(&priority) {
            return Err(ApiError::invalid(format!(
                "{} must be between -32768 and 32767",
                field("priority")
            )));
        }
        job = job.priority(priority);
    }
    match (r.run_at, r.delay_ms) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(format!(
                "give {} or {}, not both",
                field("run_at"),
                field("delay_ms")
            )));
        }
        (Some(at_text), None) => {
            let at_time = DateTime::parse_from_rfc3339(&at_text).map_err(|e| {
                ApiError::invalid(format!(
                    "{} '{at_text}' is not an RFC 3339 instant ({e}); e.g. 2026-12-01T09:00:00Z",
                    field("run_at")
                ))
            })?;
            job = job.run_at(at_time.timestamp_millis());
        }
        (None, Some(delay)) => {
            if delay > MAX_DELAY_MS {
                return Err(ApiError::invalid(format!(
                    "{} is more than ten years",
                    field("delay_ms")
                )));
            }
            job = job.delay(Duration::from_millis(delay));
        }
        (None, None) => {}
    }
    if let Some(n) = r.max_attempts {
        if !(1..=1000).contains(&n) {
            return Err(ApiError::invalid(format!(
                "{} must be between 1 and 1000, not {n}",
                field("max_attempts")
            )));
        }
        job = job.max_attempts(n);
    }
    if let Some(ms) = r.timeout_ms {
        if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
            return Err(ApiError::invalid(format!(
                "{} must be between 1 and {MAX_TIMEOUT_MS} (a week)",
                field("timeout_ms")
            )));
        }
        job = job.timeout(Duration::from_millis(ms));
    }
    if let Some(key) = r.unique_key {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(ApiError::invalid(format!(
                "{} must be 1 to {MAX_KEY} characters",
                field("unique_key")
            )));
        }
        job = job.unique_key(key);
    }
    if external && !state.registry.contains(&job.kind) {
        job.max_attempts = job
            .max_attempts
            .or(Some(crate::store::DEFAULT_MAX_ATTEMPTS));
        job.timeout = job.timeout.or(Some(crate::store::DEFAULT_TIMEOUT));
        return Ok(job);
    }
    state.registry.prepare(job).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kind",
            e.to_string(),
        )
    })
}

// ---------------------------------------------------------------------------
// Read
// ---------------------------------------------------------------------------

pub(crate) fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn job_body(job: Job, now_ms: i64) -> JobBody {
    let args = serde_json::value::RawValue::from_string(job.args)
        .unwrap_or_else(|_| serde_json::value::RawValue::from_string("null".into()).expect("null"));
    JobBody {
        id: job.id,
        url: job_url(job.id),
        queue: job.queue,
        kind: job.kind,
        args,
        state: job.state,
        scheduled: job.state == JobState::Queued && job.run_at > now_ms,
        priority: job.priority,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        run_at: time(job.run_at),
        created_at: time(job.created_at),
        started_at: job.started_at.map(time),
        finished_at: job.finished_at.map(time),
        heartbeat_at: job.heartbeat_at.map(time),
        deadline_at: job.deadline_at.map(time),
        timeout_ms: job.timeout_ms,
        locked_by: job.locked_by,
        rescue_count: job.rescue_count,
        last_error: job.last_error,
        unique_key: job.unique_key,
        cancel_requested: job.cancel_requested,
    }
}

fn attempt_body(a: Attempt) -> AttemptBody {
    AttemptBody {
        attempt: a.attempt,
        worker: a.worker,
        started_at: time(a.started_at),
        finished_at: time(a.finished_at),
        duration_ms: a.finished_at - a.started_at,
        outcome: a.outcome,
        error: a.error,
        // Stored capped: a cut-off detail comes back as a string.
        detail: a
            .detail
            .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d))),
    }
}

/// A job with its attempts.
#[utoipa::path(
    get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job and every attempt", body = JobDetailBody),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
async fn get_job(state: web::Data<AppState>, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let store = state.store.clone();
    let (job, attempts, now) = blocking(move || {
        let job = store.job_get(id)?.ok_or_else(|| ApiError::not_found(id))?;
        Ok((job, store.job_attempts(id)?, store.now_ms()?))
    })
    .await?;
    Ok(HttpResponse::Ok().json(JobDetailBody {
        job: job_body(job, now),
        attempts: attempts.into_iter().map(attempt_body).collect(),
    }))
}

/// Jobs, newest first, filtered, a page at a time.
#[utoipa::path(
    get, path = "/api/jobs", tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, description = "A page of jobs; follow `next` for older ones", body = JobListBody),
        (status = 400, description = "A parameter is not a number", body = ErrorBody),
        (status = 422, description = "Unknown state, or a bad queue or kind name", body = ErrorBody),
    )
)]
async fn list_jobs(
    state: web::Data<AppState>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let mut params = params.into_inner();
    // An empty filter (`?queue=`, as a form sends it) is no filter.
    for field in [&mut params.state, &mut params.queue, &mut params.kind] {
        if field.as_deref() == Some("") {
            *field = None;
        }
    }
    let states = match &params.state {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<JobState>().map_err(ApiError::invalid))
            .collect::<Result<_, _>>()?,
    };
    if let Some(queue) = &params.queue {
        check_name("queue", queue)?;
    }
    if let Some(kind) = &params.kind {
        check_name("kind", kind)?;
    }
    let limit = params.limit.unwrap_or(25).clamp(1, 1000);
    let filter = JobFilter {
        states,
        queue: params.queue.clone(),
        kind: params.kind.clone(),
        before_id: params.after,
        limit,
        ..JobFilter::default()
    };
    let store = state.store.clone();
    let (jobs, now) = blocking(move || Ok((store.jobs_list(&filter)?, store.now_ms()?))).await?;
    let next = (jobs.len() as i64 == limit).then(|| {
        let mut query = vec![format!("limit={limit}")];
        if let Some(s) = &params.state {
            query.push(format!("state={}", urlencode(s)));
        }
        if let Some(q) = &params.queue {
            query.push(format!("queue={}", urlencode(q)));
        }
        if let Some(k) = &params.kind {
            query.push(format!("kind={}", urlencode(k)));
        }
        query.push(format!("after={}", jobs.last().map_or(0, |j| j.id)));
        format!("/api/jobs?{}", query.join("&"))
    });
    Ok(HttpResponse::Ok().json(JobListBody {
        jobs: jobs.into_iter().map(|j| job_body(j, now)).collect(),
        next,
    }))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Act
// ---------------------------------------------------------------------------

/// Runs an admin action on one job, audits it, and answers with the job.
async fn act(
    state: &AppState,
    actor: Actor,
    id: i64,
    action: &'static str,
    run: fn(&crate::store::Store, i64) -> crate::store::Result<Transition>,
    refused: fn(JobState) -> String,
) -> Result<(Transition, Option<JobBody>), ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let transition = run(&store, id)?;
        match transition {
            Transition::Missing => return Err(ApiError::not_found(id)),
            Transition::Refused(current) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    refused(current),
                ));
            }
            Transition::Applied(_) => {}
        }
        store.audit_record(&actor.0, action, &format!("job {id}"), 1, None)?;
        let job = store.job_get(id)?;
        let now = store.now_ms()?;
        Ok((transition, job.map(|j| job_body(j, now))))
    })
    .await
}

/// Retry a job now (also replays a dead or cancelled job).
#[utoipa::path(
    post, path = "/api/jobs/{id}/retry", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "Queued again, claimable now, attempts kept", body = JobBody),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Only dead, cancelled or retrying jobs can be retried", body = ErrorBody),
    )
)]
async fn retry_job(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let (_, job) = act(
        &state,
        actor.into_inner(),
        id.into_inner(),
        "job.retry",
        |s, id| s.job_retry(id),
        |current| {
            format!("the job is {current}: only dead, cancelled or retrying jobs can be retried")
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(job))
}

/// Cancel a job.
#[utoipa::path(
    post, path = "/api/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled (it was queued or retrying)", body = JobBody),
        (status = 202, description = "It is running: cancel requested; its worker sees it at the next heartbeat", body = JobBody),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is already finished", body = ErrorBody),
    )
)]
async fn cancel_job(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let (transition, job) = act(
        &state,
        actor.into_inner(),
        id.into_inner(),
        "job.cancel",
        |s, id| s.job_cancel(id),
        |current| format!("the job is already {current}: there is nothing to cancel"),
    )
    .await?;
    let status = if transition == Transition::Applied(JobState::Running) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(job))
}

/// Delete a job and its attempts.
#[utoipa::path(
    delete, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is running: cancel it first", body = ErrorBody),
    )
)]
async fn delete_job(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    act(
        &state,
        actor.into_inner(),
        id.into_inner(),
        "job.delete",
        |s, id| s.job_delete(id),
        |_| "the job is running: cancel it first, then delete it".to_string(),
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Replay dead jobs matching a filter.
#[utoipa::path(
    post, path = "/api/dead/replay", tag = "jobs",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "How many dead jobs went back to queued", body = ReplayBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "No filter and no `all`, or a bad name", body = ErrorBody),
    )
)]
async fn replay_dead(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let replayed = dead_apply(
        &state,
        actor.into_inner(),
        &req,
        payload,
        DeadAction::Replay,
    )
    .await?;
    Ok(HttpResponse::Ok().json(ReplayBody { replayed }))
}

/// Delete dead jobs matching a filter, with their attempts.
#[utoipa::path(
    post, path = "/api/dead/purge", tag = "jobs",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "How many dead jobs were deleted", body = PurgeBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "No filter and no `all`, or a bad name", body = ErrorBody),
    )
)]
async fn purge_dead(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let purged = dead_apply(&state, actor.into_inner(), &req, payload, DeadAction::Purge).await?;
    Ok(HttpResponse::Ok().json(PurgeBody { purged }))
}

/// Replays or purges the dead jobs a request names, in batches, and audits it.
async fn dead_apply(
    state: &AppState,
    actor: Actor,
    req: &HttpRequest,
    payload: web::Payload,
    action: DeadAction,
) -> Result<usize, ApiError> {
    let body = read_json(req, payload, state.config.body_limit).await?;
    let r: ReplayRequest = from_value(body)?;
    if r.queue.is_none() && r.kind.is_none() && r.ids.is_none() && r.signature.is_none() && !r.all {
        return Err(ApiError::invalid(
            "name a queue, a kind, a signature or ids, or send \"all\": true to take every dead job",
        ));
    }
    if let Some(queue) = &r.queue {
        check_name("queue", queue)?;
    }
    if let Some(kind) = &r.kind {
        check_name("kind", kind)?;
    }
    let mut target = String::from("dead jobs");
    for (name, value) in [
        ("queue", &r.queue),
        ("kind", &r.kind),
        ("signature", &r.signature),
    ] {
        if let Some(value) = value {
            target.push_str(&format!(" {name}={value}"));
        }
    }
    if let Some(ids) = &r.ids {
        target.push_str(&format!(" ids={}", ids.len()));
    }
    let filter = DeadFilter {
        queue: r.queue,
        kind: r.kind,
        ids: r.ids,
        signature: r.signature,
    };
    let store = state.store.clone();
    let audit = match action {
        DeadAction::Replay => "dead.replay",
        DeadAction::Purge => "dead.purge",
    };
    blocking(move || {
        let n = store.jobs_dead_apply(&filter, action, |_| {})?;
        store.audit_record(&actor.0, audit, &target, n as i64, None)?;
        Ok(n)
    })
    .await
}

/// Retry, cancel or delete several jobs by id.
#[utoipa::path(
    post, path = "/api/jobs/bulk", tag = "jobs",
    request_body = BulkRequest,
    responses(
        (status = 200, description = "What applied; the rest were in a state the action does not fit, or gone", body = BulkBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "Unknown action, or no ids or more than 1,000", body = ErrorBody),
    )
)]
async fn bulk_jobs(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload, state.config.body_limit).await?;
    let r: BulkRequest = from_value(body)?;
    let action = match r.action.as_str() {
        "retry" => BulkAction::Retry,
        "cancel" => BulkAction::Cancel,
        "delete" => BulkAction::Delete,
        other => {
            return Err(ApiError::invalid(format!(
                "action '{other}': use retry, cancel or delete"
            )));
        }
    };
    if r.ids.is_empty() || r.ids.len() > 1000 {
        return Err(ApiError::invalid(format!(
            "give 1 to 1000 ids, not {}",
            r.ids.len()
        )));
    }
    let store = state.store.clone();
    let actor = actor.into_inner();
    let report = blocking(move || {
        let report = store.jobs_bulk(action, &r.ids)?;
        store.audit_record(
            &actor.0,
            &format!("job.{}", r.action),
            &format!("{} jobs by id", r.ids.len()),
            report.applied as i64,
            None,
        )?;
        Ok(report)
    })
    .await?;
    Ok(HttpResponse::Ok().json(BulkBody {
        applied: report.applied,
        refused: report.refused,
        missing: report.missing,
    }))
}

// ---------------------------------------------------------------------------
// Queues and stats
// ---------------------------------------------------------------------------

fn counts(q: &QueueOverview) -> BTreeMap<String, i64> {
    JobState::ALL
        .iter()
        .map(|s| (s.to_string(), q.count(*s)))
        .collect()
}

/// Queues with their jobs per state and backlog age.
#[utoipa::path(
    get, path = "/api/queues", tag = "queues",
    responses(
        (status = 200, description = "Every queue with jobs or a pause", body = QueueListBody),
    )
)]
async fn list_queues(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    let (queues, now) = blocking(move || Ok((store.queues_overview()?, store.now_ms()?))).await?;
    Ok(HttpResponse::Ok().json(QueueListBody {
        queues: queues
            .iter()
            .map(|q| QueueBody {
                name: q.name.clone(),
                paused: q.paused,
                counts: counts(q),
                scheduled: q.scheduled,
                oldest_claimable_age_ms: q.oldest_claimable_at.map(|at| (now - at).max(0)),
            })
            .collect(),
    }))
}

async fn set_paused(
    state: &AppState,
    actor: Actor,
    name: String,
    paused: bool,
) -> Result<HttpResponse, ApiError> {
    check_name("queue", &name)?;
    let store = state.store.clone();
    let body = QueueStateBody {
        name: name.clone(),
        paused,
    };
    blocking(move || {
        store.queue_set_paused(&name, paused)?;
        let action = if paused {
            "queue.pause"
        } else {
            "queue.resume"
        };
        store.audit_record(&actor.0, action, &format!("queue {name}"), 0, None)?;
        Ok(())
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

/// Pause a queue: workers claim nothing from it until it is resumed.
#[utoipa::path(
    post, path = "/api/queues/{name}/pause", tag = "queues",
    params(("name" = String, Path, description = "Queue name", pattern = r"^[A-Za-z0-9_.:-]{1,100}$")),
    responses(
        (status = 200, description = "Paused", body = QueueStateBody),
        (status = 422, description = "Bad queue name", body = ErrorBody),
    )
)]
async fn pause_queue(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_paused(&state, actor.into_inner(), name.into_inner(), true).await
}

/// Resume a paused queue.
#[utoipa::path(
    post, path = "/api/queues/{name}/resume", tag = "queues",
    params(("name" = String, Path, description = "Queue name", pattern = r"^[A-Za-z0-9_.:-]{1,100}$")),
    responses(
        (status = 200, description = "Resumed", body = QueueStateBody),
        (status = 422, description = "Bad queue name", body = ErrorBody),
    )
)]
async fn resume_queue(
    state: web::Data<AppState>,
    actor: web::ReqData<Actor>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    set_paused(&state, actor.into_inner(), name.into_inner(), false).await
}

/// Totals over every queue.
#[utoipa::path(
    get, path = "/api/stats", tag = "queues",
    responses(
        (status = 200, description = "Jobs per state, queues, live workers, backlog age", body = StatsBody),
    )
)]
async fn stats(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    let (queues, workers, now) = blocking(move || {
        Ok((
            store.queues_overview()?,
            store.workers_list()?.len(),
            store.now_ms()?,
        ))
    })
    .await?;
    let mut jobs: BTreeMap<String, i64> =
        JobState::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    for q in &queues {
        for (state, n) in counts(q) {
            *jobs.entry(state).or_default() += n;
        }
    }
    let oldest = queues.iter().filter_map(|q| q.oldest_claimable_at).min();
    Ok(HttpResponse::Ok().json(StatsBody {
        jobs,
        scheduled: queues.iter().map(|q| q.scheduled).sum(),
        queues: queues.len(),
        workers,
        oldest_claimable_age_ms: oldest.map(|at| (now - at).max(0)),
    }))
}

// ---------------------------------------------------------------------------
// Routes outside /api, described here so the document lists every route.
// ---------------------------------------------------------------------------

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
#[allow(dead_code)]
fn healthz_doc() {}

/// The database answers: ready for work.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ready\"}`")))]
#[allow(dead_code)]
fn readyz_doc() {}

/// Metrics in the Prometheus text format (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Counters, gauges and histograms", content_type = "application/openmetrics-text"),
    ))]
#[allow(dead_code)]
fn metrics_doc() {}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI description of this API", content_type = "application/json")))]
#[allow(dead_code)]
fn openapi_doc() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_hash_ignores_key_order_and_whitespace() {
        let a: Value =
            serde_json::from_str(r#"{"kind": "noop", "args": {"b": 1, "a": [1, 2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"args":{"a":[1,2],"b":1},"kind":"noop"}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"args":{"a":[2,1],"b":1},"kind":"noop"}"#).unwrap();
        assert_eq!(request_hash("e", &a), request_hash("e", &b));
        assert_ne!(request_hash("e", &a), request_hash("e", &c));
        assert_ne!(request_hash("e", &a), request_hash("f", &a));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("queue", "mail.high-priority_2:x").is_ok());
        assert!(check_name("queue", "").is_err());
        assert!(check_name("queue", &"q".repeat(101)).is_err());
        assert!(check_name("queue", "<script>").is_err());
        assert!(check_name("queue", "a b").is_err());
    }
}
