//! External workers over HTTP: programs in any language that fetch jobs from
//! the queues named by `--external-queues`, run them, and report back.
//!
//! `POST /api/workers/fetch` claims jobs exactly as this process's own
//! fetchers do (same statement, same lease), long-polling on the store's
//! wake-ups while nothing is claimable (the answer is then streamed, so that
//! a worker gone mid-wait is noticed before a job is claimed for it). Every later call names the job's
//! `lease_id`: the lease is the fencing token that every write must match, so
//! a worker whose job was rescued (it stopped heartbeating) or finished
//! elsewhere gets 409 `lease_lost` and changes nothing. External jobs
//! heartbeat through `POST /api/jobs/{id}/heartbeat`, so the leader's rescue
//! of silent jobs applies to them unchanged.
//!
//! Each external worker is registered in `workers` as `ext:<name>` (its
//! jobs' `locked_by` too), refreshed by its fetches and heartbeats, so it
//! shows on the Workers page beside errand's processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::api::{ErrorBody, check_name, time};
use super::{ApiError, AppState, blocking, parse_json, read_json_body};
use crate::store::{
    AttemptOutcome, CompletedDetail, Failure, Job, JobState, Lease, Store, WorkerInfo,
};
use crate::wake::{Seen, Wake};

/// Most queues one fetch may name.
const MAX_QUEUES: usize = 20;
/// Most jobs one fetch may claim.
const MAX_FETCH: u32 = 100;
/// Longest long-poll.
const MAX_WAIT_MS: u64 = 60_000;
/// Long-poll when the request names none.
const DEFAULT_WAIT_MS: u64 = 30_000;
/// Longest external worker name.
const MAX_WORKER: usize = 100;
/// While long-polling, look for jobs no wake-up announced (scheduled jobs
/// coming due, retries, SQLite writers in other processes) this often, like
/// the internal fetchers' default poll interval.
const POLL: Duration = Duration::from_secs(1);
/// While long-polling, refresh the worker's row this often.
const REFRESH: Duration = Duration::from_secs(5);
/// While long-polling, write a space this often to find out whether the
/// worker is still there.
const PROBE: Duration = Duration::from_millis(200);
/// Furthest accepted snooze or retry delay: ten years.
const MAX_DELAY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
/// The `version` of an external worker's row in `workers`.
pub(crate) const EXTERNAL_VERSION: &str = "external";
/// The prefix of an external worker's id (and its jobs' `locked_by`).
pub(crate) const EXTERNAL_PREFIX: &str = "ext:";

/// Ask for jobs.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// 1 to 20 queues, each named by `--external-queues`; claimed from in
    /// this order until `max` jobs are held.
    #[schema(min_items = 1, max_items = 20)]
    queues: Vec<String>,
    /// Most jobs to claim, 1 to 100. Default 1.
    #[schema(minimum = 1, maximum = 100)]
    max: Option<u32>,
    /// This worker's name, 1 to 100 printable characters, stable across its
    /// fetches (e.g. `host-pid`). It is shown on the Workers page as
    /// `ext:<worker>` and kept in each job's `locked_by`.
    #[schema(min_length = 1, max_length = 100)]
    worker: String,
    /// How long to wait for a job when none is ready, in ms (0 to 60,000).
    /// Default 30,000. The answer comes as soon as one is claimed.
    #[schema(minimum = 0, maximum = 60_000)]
    wait_ms: Option<u64>,
}

/// A job handed to an external worker, with its lease.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FetchedJob {
    pub id: i64,
    /// Send it back with every call about this job.
    pub lease_id: i64,
    pub queue: String,
    pub kind: String,
    /// The arguments, as enqueued (any JSON).
    #[schema(value_type = Object)]
    pub args: Box<RawValue>,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    /// When this attempt times out (RFC 3339): after it the job is taken
    /// back, whatever the heartbeats.
    pub deadline: String,
    /// Heartbeat this often while working on it (the server's
    /// `--heartbeat-interval`); a job silent for `--stale-after` is rescued.
    pub heartbeat_ms: u64,
}

/// The jobs claimed: empty when none became ready within `wait_ms`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FetchBody {
    pub jobs: Vec<FetchedJob>,
}

/// Still working on it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// From the fetch.
    lease_id: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatBody {
    /// An operator cancelled the job: stop, and report it with `fail` (the
    /// job then ends `cancelled`).
    pub cancel_requested: bool,
}

/// Done.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    lease_id: i64,
    /// What the attempt produced, any JSON; kept with the attempt and shown
    /// on the job's page.
    #[schema(value_type = Option<Object>)]
    detail: Option<Box<RawValue>>,
}

/// The attempt failed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    lease_id: i64,
    /// What went wrong (kept up to 16 KiB).
    #[schema(min_length = 1)]
    error: String,
    /// False: a permanent error, the job goes to `dead` at once. Default
    /// true: it is retried after a backoff while attempts remain.
    retry: Option<bool>,
    /// Retry after this many ms instead of the server's backoff.
    #[schema(maximum = 315_360_000_000_u64)]
    retry_in_ms: Option<u64>,
    /// Whatever helps to understand the failure, any JSON.
    #[schema(value_type = Option<Object>)]
    detail: Option<Box<RawValue>>,
}

/// Not now: put the job back without spending the attempt.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnoozeRequest {
    lease_id: i64,
    /// Claimable again after this many ms (up to ten years).
    #[schema(maximum = 315_360_000_000_u64)]
    delay_ms: u64,
    /// Why, any JSON; kept as a `snoozed` attempt.
    #[schema(value_type = Option<Object>)]
    detail: Option<Box<RawValue>>,
}

/// The job's state after the call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseStateBody {
    pub state: JobState,
}

/// The routes under `/api` for external workers.
pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(resource("/workers/fetch", "POST").route(web::post().to(fetch)))
        .service(resource("/jobs/{id}/heartbeat", "POST").route(web::post().to(heartbeat)))
        .service(resource("/jobs/{id}/complete", "POST").route(web::post().to(complete)))
        .service(resource("/jobs/{id}/fail", "POST").route(web::post().to(fail)))
        .service(resource("/jobs/{id}/snooze", "POST").route(web::post().to(snooze)));
}

fn lease_lost(id: i64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "lease_lost",
        format!(
            "job {id} is no longer held under this lease: the job was rescued or finished \
             elsewhere; drop it and fetch again"
        ),
    )
}

// ---------------------------------------------------------------------------
// Fetch
// ---------------------------------------------------------------------------

/// Claim jobs from external queues, waiting for one if none is ready.
#[utoipa::path(
    post, path = "/api/workers/fetch", tag = "external workers",
    request_body = FetchRequest,
    responses(
        (status = 200, description = "The jobs claimed (running, leased to this worker); \
            `{\"jobs\": []}` when none became ready within `wait_ms`. While it waits the \
            answer is streamed, led by spaces (ordinary JSON whitespace) that tell the server \
            the worker is still there", body = FetchBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "A queue not named by `--external-queues`, or a bad \
            `max`, `worker` or `wait_ms`", body = ErrorBody),
    )
)]
pub(crate) async fn fetch(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json_body(&req, payload, state.config.body_limit).await?;
    let r: FetchRequest = parse_json(&body)?;
    if r.queues.is_empty() || r.queues.len() > MAX_QUEUES {
        return Err(ApiError::invalid(format!(
            "queues: name 1 to {MAX_QUEUES} queues, not {}",
            r.queues.len()
        )));
    }
    let mut queues: Vec<String> = Vec::with_capacity(r.queues.len());
    for queue in r.queues {
        check_name("queues[]", &queue)?;
        if !state.config.external_queues.contains(&queue) {
            return Err(ApiError::invalid(format!(
                "queue '{queue}' is not an external queue: this server's own workers may claim \
                 from it. Name it in --external-queues (ERRAND_EXTERNAL_QUEUES) to hand it to \
                 external workers{}",
                if state.config.external_queues.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; the external queues are {}",
                        state.config.external_queues.join(", ")
                    )
                }
            )));
        }
        if !queues.contains(&queue) {
            queues.push(queue);
        }
    }
    let max = r.max.unwrap_or(1);
    if !(1..=MAX_FETCH).contains(&max) {
        return Err(ApiError::invalid(format!(
            "max must be between 1 and {MAX_FETCH}, not {max}"
        )));
    }
    let wait_ms = r.wait_ms.unwrap_or(DEFAULT_WAIT_MS);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(format!(
            "wait_ms must be between 0 and {MAX_WAIT_MS}, not {wait_ms}"
        )));
    }
    let name_ok = !r.worker.trim().is_empty()
        && r.worker.chars().count() <= MAX_WORKER
        && !r.worker.chars().any(char::is_control);
    if !name_ok {
        return Err(ApiError::invalid(format!(
            "worker must be 1 to {MAX_WORKER} printable characters naming this worker, e.g. \
             its host and pid"
        )));
    }
    let info = WorkerInfo {
        id: format!("{EXTERNAL_PREFIX}{}", r.worker),
        host: req
            .peer_addr()
            .map_or_else(|| "external".to_string(), |a| a.ip().to_string()),
        pid: 0,
        queues: queues.join(","),
        concurrency: max as i32,
        version: EXTERNAL_VERSION.to_string(),
        started_at: 0,
        heartbeat_at: 0,
    };

    // A ready job (or a database error) answers at once, as usual.
    let mut poll = LongPoll {
        store: state.store.clone(),
        wake: state.store.wake().clone(),
        queues,
        info,
        max: max as usize,
        deadline: Instant::now() + Duration::from_millis(wait_ms),
        seen: Vec::new(),
        claimed_at: Instant::now(),
        refreshed_at: Instant::now(),
    };
    let heartbeat_ms =
        u64::try_from(state.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    let jobs = poll.claim(true).await?;
    if !jobs.is_empty() || wait_ms == 0 {
        return Ok(HttpResponse::Ok().json(FetchBody {
            jobs: jobs.into_iter().map(|j| fetched(j, heartbeat_ms)).collect(),
        }));
    }
    // Nothing ready: wait, answering with a streamed body. While it waits,
    // a space (JSON allows leading whitespace) goes out every
    // `PROBE`: once the worker has gone away (killed, or it gave up) a write
    // fails, the server drops this stream, and no job is claimed for it.
    // (actix-web keeps a handler running after its client disconnects; a
    // write is how it finds out.)
    let body = futures_util::stream::unfold(Some(poll), move |poll| async move {
        let mut poll = poll?;
        let chunk = match poll.step().await {
            None => return Some((Ok(web::Bytes::from_static(b" ")), Some(poll))),
            Some(jobs) => serde_json::to_vec(&FetchBody {
                jobs: jobs.into_iter().map(|j| fetched(j, heartbeat_ms)).collect(),
            })
            .expect("the fetch answer serializes"),
        };
        Some((
            Ok::<_, std::convert::Infallible>(web::Bytes::from(chunk)),
            None,
        ))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .streaming(body))
}

/// A fetch waiting for jobs.
struct LongPoll {
    store: Store,
    wake: Arc<Wake>,
    queues: Vec<String>,
    info: WorkerInfo,
    max: usize,
    deadline: Instant,
    /// The queues' wake-up generations before the last claim.
    seen: Vec<Seen>,
    claimed_at: Instant,
    refreshed_at: Instant,
}

impl LongPoll {
    /// Claims from the queues (refreshing the worker's row first when due).
    async fn claim(&mut self, refresh: bool) -> Result<Vec<Job>, ApiError> {
        // Taken before the claim: a job committed between the claim and the
        // next wait still wakes it.
        self.seen = self.queues.iter().map(|q| self.wake.seen(q)).collect();
        let refresh = refresh || self.refreshed_at.elapsed() >= REFRESH;
        let (store, info, queues, max) = (
            self.store.clone(),
            self.info.clone(),
            self.queues.clone(),
            self.max,
        );
        let jobs = blocking(move || {
            if refresh {
                store.worker_register(&info)?;
            }
            Ok(claim(&store, &queues, &info.id, max)?)
        })
        .await?;
        self.claimed_at = Instant::now();
        if refresh {
            self.refreshed_at = self.claimed_at;
        }
        Ok(jobs)
    }

    /// Waits up to `PROBE` and claims when woken (or at the poll): the jobs
    /// claimed, an empty answer once the deadline passes, or `None` to keep
    /// waiting.
    async fn step(&mut self) -> Option<Vec<Job>> {
        let pause = self
            .deadline
            .saturating_duration_since(Instant::now())
            .min(PROBE);
        let (wake, queues, seen) = (self.wake.clone(), self.queues.clone(), self.seen.clone());
        let woken = blocking(move || Ok(wait_any(&wake, &queues, &seen, pause)))
            .await
            .unwrap_or(true);
        let over = Instant::now() >= self.deadline;
        if !(woken || over || self.claimed_at.elapsed() >= POLL) {
            return None;
        }
        match self.claim(false).await {
            Ok(jobs) if !jobs.is_empty() || over => Some(jobs),
            Ok(_) => None,
            // The answer has begun (200): end it with no jobs; the worker
            // fetches again.
            Err(e) => {
                tracing::warn!(error = %e, worker = %self.info.id, "external fetch failed while waiting");
                Some(Vec::new())
            }
        }
    }
}

/// Claims up to `max` jobs from `queues`, in order.
fn claim(
    store: &Store,
    queues: &[String],
    worker: &str,
    max: usize,
) -> crate::store::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for queue in queues {
        if jobs.len() >= max {
            break;
        }
        jobs.extend(store.jobs_claim(queue, worker, max - jobs.len())?);
    }
    Ok(jobs)
}

/// Waits until one of `queues` moves past what `seen` recorded (true), or
/// `timeout` (false).
fn wait_any(wake: &Wake, queues: &[String], seen: &[Seen], timeout: Duration) -> bool {
    if let [queue] = queues {
        return wake.wait(queue, seen[0], timeout);
    }
    // The wake-ups are per queue: wait on the first in short slices and
    // look at the others (in memory) between them.
    let deadline = Instant::now() + timeout;
    loop {
        if queues.iter().zip(seen).any(|(q, s)| wake.seen(q) != *s) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        wake.wait(
            &queues[0],
            seen[0],
            (deadline - now).min(Duration::from_millis(50)),
        );
    }
}

fn fetched(job: Job, heartbeat_ms: u64) -> FetchedJob {
    let args = RawValue::from_string(job.args)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null"));
    FetchedJob {
        id: job.id,
        lease_id: job.lease_id,
        queue: job.queue,
        kind: job.kind,
        args,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        timeout_ms: job.timeout_ms,
        deadline: time(job.deadline_at.unwrap_or_default()),
        heartbeat_ms,
    }
}

// ---------------------------------------------------------------------------
// Heartbeat, complete, fail, snooze
// ---------------------------------------------------------------------------

/// The job, if it is running under `lease`: 404 when there is no such job,
/// 409 when it is not (or no longer) held under this lease.
fn held(store: &Store, lease: Lease) -> Result<Job, ApiError> {
    let job = store
        .job_get(lease.id)?
        .ok_or_else(|| ApiError::not_found(lease.id))?;
    if job.state != JobState::Running || job.lease_id != lease.lease_id {
        return Err(lease_lost(lease.id));
    }
    Ok(job)
}

/// When a fenced write found nothing: 404 or 409.
fn lost_or_missing(store: &Store, id: i64) -> ApiError {
    match store.job_get(id) {
        Ok(None) => ApiError::not_found(id),
        Ok(Some(_)) => lease_lost(id),
        Err(e) => e.into(),
    }
}

/// A call about a held job: its body names the job's lease.
trait LeaseCall: serde::de::DeserializeOwned {
    fn lease_id(&self) -> i64;
}

macro_rules! lease_calls {
    ($($t:ty),+) => {
        $(impl LeaseCall for $t {
            fn lease_id(&self) -> i64 {
                self.lease_id
            }
        })+
    };
}

lease_calls!(
    HeartbeatRequest,
    CompleteRequest,
    FailRequest,
    SnoozeRequest
);

/// Reads a call about job `id`: its body, and the lease it names.
async fn lease_call<T: LeaseCall>(
    state: &AppState,
    req: &HttpRequest,
    id: web::Path<i64>,
    payload: web::Payload,
) -> Result<(T, Lease), ApiError> {
    let body = read_json_body(req, payload, state.config.body_limit).await?;
    let call: T = parse_json(&body)?;
    let lease = Lease {
        id: id.into_inner(),
        lease_id: call.lease_id(),
    };
    Ok((call, lease))
}

fn raw_text(detail: Option<Box<RawValue>>) -> Option<String> {
    detail.map(|d| String::from(Box::<str>::from(d)))
}

/// Still working: refresh the job's heartbeat (and the worker's).
#[utoipa::path(
    post, path = "/api/jobs/{id}/heartbeat", tag = "external workers",
    params(("id" = i64, Path, description = "Job id")),
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "Heartbeat recorded; send the next well within \
            `--stale-after` (default 60 s)", body = HeartbeatBody),
        (status = 400, description = "Malformed JSON, or the id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "`lease_lost`: the job was rescued or finished elsewhere; \
            drop it and fetch again. Nothing changed", body = ErrorBody),
        (status = 422, description = "No `lease_id`", body = ErrorBody),
    )
)]
pub(crate) async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (_, lease): (HeartbeatRequest, Lease) = lease_call(&state, &req, id, payload).await?;
    let store = state.store.clone();
    let cancel_requested = blocking(move || {
        let held = store.jobs_heartbeat(&[lease])?;
        let Some(&(_, cancel_requested)) = held.first() else {
            return Err(lost_or_missing(&store, lease.id));
        };
        store.worker_heartbeat_holder(lease)?;
        Ok(cancel_requested)
    })
    .await?;
    Ok(HttpResponse::Ok().json(HeartbeatBody { cancel_requested }))
}

/// The job succeeded.
#[utoipa::path(
    post, path = "/api/jobs/{id}/complete", tag = "external workers",
    params(("id" = i64, Path, description = "Job id")),
    request_body = CompleteRequest,
    responses(
        (status = 200, description = "Completed", body = LeaseStateBody),
        (status = 400, description = "Malformed JSON, or the id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "`lease_lost`: the job was rescued or finished elsewhere \
            (another worker may be running it). Nothing changed", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "No `lease_id`, or an unknown field", body = ErrorBody),
    )
)]
pub(crate) async fn complete(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (r, lease): (CompleteRequest, Lease) = lease_call(&state, &req, id, payload).await?;
    let detail = raw_text(r.detail);
    let store = state.store.clone();
    let queue = blocking(move || {
        let job = held(&store, lease)?;
        let completed = match detail {
            None => store.jobs_complete(&[lease])?,
            // The detail's attempt row in the completion's transaction.
            Some(detail) => store.jobs_complete_recorded(&[CompletedDetail {
                lease,
                attempt: job.attempt,
                worker: job.locked_by.unwrap_or_default(),
                started_at: job.started_at.unwrap_or_default(),
                detail,
            }])?,
        };
        if completed.is_empty() {
            return Err(lost_or_missing(&store, lease.id));
        }
        Ok(job.queue)
    })
    .await?;
    state.metrics.completed(&queue);
    Ok(HttpResponse::Ok().json(LeaseStateBody {
        state: JobState::Completed,
    }))
}

/// The attempt failed: retry later, or give up.
#[utoipa::path(
    post, path = "/api/jobs/{id}/fail", tag = "external workers",
    params(("id" = i64, Path, description = "Job id")),
    request_body = FailRequest,
    responses(
        (status = 200, description = "`retrying` (claimable again after the backoff), `dead` \
            (`retry: false`, or no attempts left) or `cancelled` (an operator cancelled it)",
            body = LeaseStateBody),
        (status = 400, description = "Malformed JSON, or the id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "`lease_lost`: the job was rescued or finished elsewhere. \
            Nothing changed", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "No `lease_id` or `error`, or a bad `retry_in_ms`", body = ErrorBody),
    )
)]
pub(crate) async fn fail(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (r, lease): (FailRequest, Lease) = lease_call(&state, &req, id, payload).await?;
    if r.error.trim().is_empty() {
        return Err(ApiError::invalid(
            "error must say what went wrong; it is kept with the attempt",
        ));
    }
    if r.retry_in_ms.is_some_and(|ms| ms > MAX_DELAY_MS) {
        return Err(ApiError::invalid("retry_in_ms is more than ten years"));
    }
    let store = state.store.clone();
    let registry = state.registry.clone();
    let retry_backoff = state.config.retry_backoff;
    let (queue, new_state) = blocking(move || {
        let job = held(&store, lease)?;
        let retry = r.retry.unwrap_or(true) && job.attempt < job.max_attempts;
        let backoff = registry
            .options(&job.kind)
            .and_then(|o| o.backoff)
            .unwrap_or(retry_backoff);
        let failure = Failure {
            outcome: AttemptOutcome::Error,
            error: r.error,
            retry_in: retry.then(|| {
                r.retry_in_ms
                    .map_or_else(|| backoff.delay(job.attempt), Duration::from_millis)
            }),
            detail: raw_text(r.detail),
        };
        match store.job_fail(lease, &failure)? {
            Some(state) => Ok((job.queue, state)),
            None => Err(lost_or_missing(&store, lease.id)),
        }
    })
    .await?;
    state.metrics.failed(&queue, new_state == JobState::Dead);
    Ok(HttpResponse::Ok().json(LeaseStateBody { state: new_state }))
}

/// Put the job back to wait, without spending the attempt.
#[utoipa::path(
    post, path = "/api/jobs/{id}/snooze", tag = "external workers",
    params(("id" = i64, Path, description = "Job id")),
    request_body = SnoozeRequest,
    responses(
        (status = 200, description = "`queued` again, claimable after `delay_ms` (or \
            `cancelled`, when an operator cancelled it)", body = LeaseStateBody),
        (status = 400, description = "Malformed JSON, or the id is not a number", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "`lease_lost`: the job was rescued or finished elsewhere. \
            Nothing changed", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body not JSON", body = ErrorBody),
        (status = 422, description = "No `lease_id` or `delay_ms`, or a delay over ten years", body = ErrorBody),
    )
)]
pub(crate) async fn snooze(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (r, lease): (SnoozeRequest, Lease) = lease_call(&state, &req, id, payload).await?;
    if r.delay_ms > MAX_DELAY_MS {
        return Err(ApiError::invalid("delay_ms is more than ten years"));
    }
    let detail = raw_text(r.detail);
    let store = state.store.clone();
    let new_state = blocking(move || {
        let snoozed = store.job_snooze_recorded(
            lease,
            Duration::from_millis(r.delay_ms),
            detail.as_deref(),
        )?;
        if !snoozed {
            return Err(lost_or_missing(&store, lease.id));
        }
        // `queued`, or `cancelled` when an operator had asked for it.
        Ok(store
            .job_get(lease.id)?
            .map_or(JobState::Queued, |j| j.state))
    })
    .await?;
    Ok(HttpResponse::Ok().json(LeaseStateBody { state: new_state }))
}
