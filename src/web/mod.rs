//! The web server (actix-web): the JSON API under `/api` (see `api.rs`),
//! health and readiness probes, and `/metrics`.
//!
//! This module owns what every route shares: the application state, bearer
//! token checks (constant-time), the JSON error type and its HTTP mapping,
//! and reading a JSON body with limits. Store calls run inside
//! `web::block`, never on the async threads.

pub mod access;
pub mod api;
pub mod pages;
pub mod workers;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError, web};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::job::Registry;
use crate::metrics::{DatabaseState, Metrics};
use crate::shutdown::{Shutdown, Stage};
use crate::store::{self, Store};

/// Web settings; the defaults are `errand serve`'s.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Bearer tokens accepted by the API and `/metrics`. None: those answer
    /// only on a loopback bind (and `errand serve` refuses any other).
    pub api_tokens: Vec<String>,
    /// Largest request body, in bytes. Default 4 MiB.
    pub body_limit: usize,
    /// Most jobs in one `POST /api/jobs/batch`. Default 1,000.
    pub batch_max: usize,
    /// How long an `Idempotency-Key` is remembered. Default 24 h.
    pub idempotency_ttl: Duration,
    /// Dashboard users. None: the dashboard answers only on loopback.
    pub dashboard_users: Vec<access::DashboardUser>,
    /// Alert rules and delivery, shown on `/alerts`.
    pub alerts: Arc<crate::alerts::AlertConfig>,
    /// Queues worked by external workers (`POST /api/workers/fetch`): any
    /// kind may be enqueued there, and only there may external workers fetch.
    pub external_queues: Vec<String>,
    /// How often external workers are told to heartbeat (the workers'
    /// `--heartbeat-interval`). Default 15 s.
    pub heartbeat_interval: Duration,
    /// Delay before retrying an external worker's failed job of a kind this
    /// process does not know (`--retry-delay`). Default the exponential
    /// backoff.
    pub retry_backoff: crate::job::Backoff,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            api_tokens: Vec::new(),
            body_limit: 4 * 1024 * 1024,
            batch_max: 1000,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            dashboard_users: Vec::new(),
            alerts: Arc::default(),
            external_queues: Vec::new(),
            heartbeat_interval: Duration::from_secs(15),
            retry_backoff: crate::job::Backoff::Exponential,
        }
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub config: Arc<WebConfig>,
    /// SHA-256 of each API token: compared in constant time, and the first
    /// bytes name the token in the audit log without revealing it.
    token_digests: Arc<Vec<[u8; 32]>>,
    pub(crate) access: Arc<access::Access>,
    pub(crate) tasks: Arc<pages::Tasks>,
}

impl AppState {
    pub fn new(store: Store, registry: Arc<Registry>, metrics: Metrics, config: WebConfig) -> Self {
        let token_digests = config
            .api_tokens
            .iter()
            .map(|t| digest(t.as_bytes()))
            .collect();
        AppState {
            access: Arc::new(access::Access::new(&config.dashboard_users)),
            tasks: Arc::default(),
            store,
            registry,
            metrics,
            config: Arc::new(config),
            token_digests: Arc::new(token_digests),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Refuses to expose an unauthenticated API: without tokens, only a
/// loopback address may be bound.
pub fn check_exposure(address: SocketAddr, config: &WebConfig) -> Result<(), String> {
    if address.ip().is_loopback() {
        return Ok(());
    }
    if config.api_tokens.is_empty() {
        return Err(format!(
            "refusing to listen on {address} without an API token: anyone who can reach it \
             could enqueue, retry and delete jobs. Set one with --api-token (or \
             ERRAND_API_TOKENS, comma-separated), or bind to 127.0.0.1"
        ));
    }
    if config.dashboard_users.is_empty() {
        return Err(format!(
            "refusing to listen on {address} without dashboard users: anyone who can reach \
             it could act on jobs from the dashboard. Add one with --dashboard-user \
             name:password:admin (or ERRAND_DASHBOARD_USERS, comma-separated), or bind to \
             127.0.0.1"
        ));
    }
    Ok(())
}

/// An API error: an HTTP status and a JSON body `{"error": code, "message":
/// text}` whose message says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: `malformed_json`, `invalid_field`, …
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    }

    pub fn not_found(id: i64) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no job {id}: it never existed, was deleted, or was pruned after its retention"
            ),
        )
    }

    fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                response.insert_header((header::RETRY_AFTER, "5"));
            }
            StatusCode::UNAUTHORIZED => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.json(api::ErrorBody {
            error: self.code.to_string(),
            message: self.message.clone(),
        })
    }
}

/// The database could not do it: unreachable or overloaded means 503 (try
/// again), anything else 500. Details go to the log, not to the client.
impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        if is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::unavailable(
                "the database is unavailable right now; nothing was changed. Retry after a few seconds",
            )
        } else if let store::Error::Conflict(message) = e {
            ApiError::unavailable(message)
        } else {
            tracing::error!(error = %e, "database error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the database refused the request; nothing was changed. The server log has the details",
            )
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::unavailable("the server is shutting down; retry against another instance")
    }
}

fn is_unavailable(e: &store::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as Q};
    match e {
        store::Error::Pool(_) => true,
        store::Error::Query(Q::DatabaseError(kind, info)) => {
            let message = info.message();
            matches!(
                kind,
                DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::UnableToSendCommand
                    | DatabaseErrorKind::SerializationFailure
            ) || [
                "database is locked",
                "database is busy",
                "terminating connection",
                "the database system is",
                "server closed the connection",
                "could not connect",
                "connection",
            ]
            .iter()
            .any(|needle| message.contains(needle))
        }
        store::Error::Query(Q::BrokenTransactionManager) => true,
        _ => false,
    }
}

/// Runs a store call on the blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    web::block(f).await?
}

/// Who made an authenticated request: `api:<token fingerprint>` or
/// `api:local` (no tokens configured, loopback only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Checks the bearer token (every configured token is compared, in constant
/// time) and records who is calling.
async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
        .clone();
    let actor = authenticate(req.request(), &state)?;
    req.extensions_mut().insert(actor);
    next.call(req).await
}

fn authenticate(req: &HttpRequest, state: &AppState) -> Result<Actor, ApiError> {
    if state.token_digests.is_empty() {
        // Without tokens only loopback peers are served (the bind is
        // loopback too; this is the second lock on the same door).
        let local = req.peer_addr().is_none_or(|a| a.ip().is_loopback());
        return if local {
            Ok(Actor("api:local".into()))
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server has no API token configured and only answers on loopback",
            ))
        };
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token: send the header `Authorization: Bearer <token>`",
        ));
    };
    let presented = digest(presented.as_bytes());
    let mut matched = subtle::Choice::from(0);
    for known in state.token_digests.iter() {
        matched |= known.ct_eq(&presented);
    }
    if bool::from(matched) {
        Ok(Actor(format!("api:{}", hex(&presented[..4]))))
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid for this server",
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON nested deeper than this is refused before it is looked at.
pub const MAX_JSON_DEPTH: usize = 64;

/// Reads a JSON request body: 415 unless it says `application/json`, 413
/// past the body limit, 400 for malformed JSON (with its line and column) or
/// nesting deeper than [`MAX_JSON_DEPTH`].
pub async fn read_json(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<serde_json::Value, ApiError> {
    parse_json(&read_json_body(req, payload, limit).await?)
}

/// Parses a body read by [`read_json_body`] straight into `T`: 400 for
/// malformed JSON, 422 (`invalid_field`) for JSON of the wrong shape.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        Category::Data => ApiError::invalid(e.to_string()),
        Category::Io | Category::Syntax | Category::Eof => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            // serde_json's message ends with the line and column.
            format!("the body is not valid JSON: {e}"),
        ),
    })
}

/// The checks of [`read_json`] but not the parse: the body's bytes.
pub async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the body is larger than {limit} bytes; send fewer jobs per request or smaller args"
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the body failed: {e}"),
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if json_depth(&body) > MAX_JSON_DEPTH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_deep",
            format!("the JSON is nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    Ok(body)
}

/// The deepest nesting of arrays and objects in `json`, counted without
/// parsing (strings are skipped), so that hostile input costs no stack.
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Process up (it answers).
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready to take work: the database answers.
async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    blocking(move || Ok(store.ping()?)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

/// Prometheus text exposition.
async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store.clone();
    let database = web::block(move || -> Option<DatabaseState> {
        Some(DatabaseState {
            queues: store.queues_overview().ok()?,
            now_ms: store.now_ms().ok()?,
            workers: store.workers_list().ok()?.len(),
        })
    })
    .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.encode(database.as_ref())))
}

/// Turns extractor failures (a bad path id, a bad query string) into JSON
/// errors like every other.
fn extractor_error(err: impl std::fmt::Display, what: &str) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("{what}: {err}"),
    )
    .into()
}

/// A route's resource: methods other than `allow` (e.g. `"GET, POST"`) get
/// 405 with an `Allow` header, not 404.
pub(crate) fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |req: HttpRequest| async move {
        let mut response = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{} is not allowed on {}: use {allow}; the API is described at /api/openapi.json",
                req.method(),
                req.path()
            ),
        )
        .error_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        response
    }))
}

/// Everything the server routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PathConfig::default().error_handler(|e, _| extractor_error(e, "bad path")))
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| extractor_error(e, "bad query string")),
        )
        .service(resource("/healthz", "GET").route(web::get().to(healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(readyz)))
        .service(
            resource("/metrics", "GET")
                .wrap(from_fn(require_token))
                .route(web::get().to(metrics)),
        )
        .service(resource("/api/openapi.json", "GET").route(web::get().to(api::openapi_json)))
        .service(
            web::scope("/api")
                .wrap(from_fn(require_token))
                .configure(api::routes)
                .configure(workers::routes),
        )
        .configure(pages::static_routes)
        .service(
            web::scope("")
                .wrap(from_fn(access::guard))
                .configure(pages::routes),
        );
}

/// Serves on `listener` until `shutdown` leaves [`Stage::Running`], then
/// finishes the requests in progress and returns.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(configure)
            .default_service(web::to(not_found))
    })
    // errand handles SIGTERM/SIGINT itself (drain workers first).
    .disable_signals()
    .shutdown_timeout(10)
    .listen(listener)?
    .run();
    let handle = server.handle();
    std::thread::Builder::new()
        .name("errand-web-stop".into())
        .spawn(move || {
            shutdown.wait_for(Stage::Draining, None);
            // `stop` sends its command at once; the returned future only
            // waits for completion, which `server.await` below does.
            drop(handle.stop(true));
        })?;
    server.await
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no route for {} {}; the API is described at /api/openapi.json",
            req.method(),
            req.path()
        ),
    )
    .error_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(br#"{"a": [1, {"b": 2}]}"#), 3);
        assert_eq!(json_depth(br#"{"a": "[[[[{{{{"}"#), 1);
        assert_eq!(json_depth(br#"{"a": "\"[[["}"#), 1);
        assert_eq!(json_depth(b"1"), 0);
    }

    #[test]
    fn an_open_bind_needs_a_token() {
        let open: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(check_exposure(local, &WebConfig::default()).is_ok());
        let err = check_exposure(open, &WebConfig::default()).unwrap_err();
        assert!(err.contains("--api-token"), "{err}");
        let with_token = WebConfig {
            api_tokens: vec!["s3cret".into()],
            ..WebConfig::default()
        };
        let err = check_exposure(open, &with_token).unwrap_err();
        assert!(err.contains("--dashboard-user"), "{err}");
        let with_both = WebConfig {
            dashboard_users: vec!["ada:pw:admin".parse().unwrap()],
            ..with_token
        };
        assert!(check_exposure(open, &with_both).is_ok());
    }
}
