//! The `http` kind: delivers one HTTP request per attempt.
//!
//! Args: `{url, method?, headers?, body?, timeout_ms?}` (see [`HttpArgs`]).
//! A 2xx response completes the job; 408, 5xx and connection errors
//! (refused, DNS, TLS, timeout) are retried with backoff; 429 waits for its
//! `Retry-After` (a snooze, which spends no attempt) or is retried without
//! one; any other 4xx is permanent (dead at once). Redirects are not followed
//! (one could leave the allow list): a 3xx is permanent too. Targets outside
//! [`HttpConfig::allow`] are refused before any connection is made. Each
//! attempt records the method, URL, status, duration and the first 2 KiB of
//! the response (never header values: some are credentials). With
//! [`HttpConfig::signing_secret`] set, every request carries an
//! `Errand-Signature` header that receivers check with [`sign`].

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tracing::warn;
use ureq::http::header::{CONTENT_TYPE, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use ureq::http::{Method, Request, Response, StatusCode, Uri};

use crate::job::{JobContext, Outcome, Registry};

use super::HttpConfig;

/// How much of a response body an attempt records.
const EXCERPT_BYTES: usize = 2048;

/// The longest `Retry-After` honoured; longer ones wait this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Headers errand sets itself; args may not set them.
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// An `http` job's arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpArgs {
    /// `http://` or `https://`, allowed by `--http-allow`.
    pub url: String,
    /// GET, POST, PUT, PATCH, DELETE or HEAD (any case). Default POST.
    #[serde(default)]
    pub method: Option<String>,
    /// Extra request headers, name to value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON string is sent as-is (`text/plain; charset=utf-8` unless a
    /// content-type header is given); any other JSON value is sent as JSON
    /// (`application/json` unless given). Absent or null: no body.
    #[serde(default)]
    pub body: Option<Value>,
    /// The request's whole timeout (connect to last body byte). Default
    /// `HttpConfig::timeout`; never beyond the attempt's deadline.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The v1 signature of a request: lowercase hex HMAC-SHA256 with key
/// `secret` over `"<timestamp>.<body>"` (the timestamp in decimal unix
/// seconds, then a dot, then the body's exact bytes; an empty body when the
/// request has none).
///
/// Errand sends it as `Errand-Signature: t=<timestamp>,v1=<signature>`. A
/// receiver verifies a request by:
///
/// 1. splitting the header on `,` and taking `t` and `v1`;
/// 2. recomputing `sign(secret, t, raw_body)` over the body bytes as
///    received (before any JSON parsing);
/// 3. comparing it with `v1` in constant time (e.g. `hmac.compare_digest`
///    in Python, `subtle::ConstantTimeEq` in Rust);
/// 4. rejecting `t` more than 5 minutes away from its own clock, so that a
///    captured request cannot be replayed later.
///
/// `Errand-Job-Id` and `Errand-Attempt` identify the delivery; a retried
/// delivery has the same job id, so receivers can deduplicate on it.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC-SHA256 takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Registers `http` with `config`.
pub fn register(registry: &mut Registry, config: Arc<HttpConfig>) {
    for entry in &config.allow {
        if AllowEntry::parse(entry).is_none() {
            warn!(
                entry = %entry,
                "--http-allow entry is not a host, host:port, *.domain or http(s):// URL prefix; \
                 it allows nothing"
            );
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("errand/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    registry.register_fn("http", move |args: HttpArgs, job: &JobContext| {
        deliver(&agent, &config, args, job)
    });
}

/// A request checked and ready to send.
struct Prepared {
    method: Method,
    uri: Uri,
    /// The URL without user info, for records and messages.
    shown: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
}

fn deliver(agent: &ureq::Agent, config: &HttpConfig, args: HttpArgs, job: &JobContext) -> Outcome {
    let prepared = match prepare(config, args, job) {
        Ok(p) => p,
        Err((detail, message)) => {
            job.record(detail);
            return Outcome::Dead(message);
        }
    };
    let Prepared {
        method,
        uri,
        shown,
        mut headers,
        body,
        timeout,
    } = prepared;
    if let Some(secret) = &config.signing_secret {
        let t = chrono::Utc::now().timestamp();
        let v1 = sign(secret, t, body.as_deref().unwrap_or_default());
        headers.push((
            HeaderName::from_static("errand-signature"),
            HeaderValue::from_str(&format!("t={t},v1={v1}")).expect("ASCII"),
        ));
    }
    headers.push((
        HeaderName::from_static("errand-job-id"),
        HeaderValue::from(job.id),
    ));
    headers.push((
        HeaderName::from_static("errand-attempt"),
        HeaderValue::from(job.attempt),
    ));
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let started = Instant::now();
    let result = match body {
        Some(body) => builder.body(body).map_err(ureq::Error::from).and_then(|r| {
            agent.run(
                agent
                    .configure_request(r)
                    .timeout_global(Some(timeout))
                    .build(),
            )
        }),
        None => builder.body(()).map_err(ureq::Error::from).and_then(|r| {
            agent.run(
                agent
                    .configure_request(r)
                    .timeout_global(Some(timeout))
                    .build(),
            )
        }),
    };
    let mut detail = json!({ "method": method.as_str(), "url": shown });
    let outcome = match result {
        Ok(mut response) => {
            let excerpt = read_excerpt(&mut response);
            detail["status"] = json!(response.status().as_u16());
            detail["duration_ms"] = json!(millis(started.elapsed()));
            detail["response"] = json!(excerpt);
            judge(&response, &method, &shown, &mut detail)
        }
        Err(e) => {
            let elapsed = started.elapsed();
            detail["duration_ms"] = json!(millis(elapsed));
            let message = match &e {
                ureq::Error::Timeout(which) => format!(
                    "http: {method} {shown} timed out after {} ms ({which} timeout; took {} ms)",
                    millis(timeout),
                    millis(elapsed)
                ),
                ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => format!(
                    "http: {method} {shown} timed out after {} ms ({io})",
                    millis(elapsed)
                ),
                ureq::Error::HostNotFound => {
                    format!("http: {method} {shown} failed: host not found (DNS)")
                }
                e => format!("http: {method} {shown} failed: {e}"),
            };
            detail["error"] = json!(message);
            Outcome::Retry(message)
        }
    };
    job.record(detail);
    outcome
}

/// The outcome a response calls for.
fn judge(
    response: &Response<ureq::Body>,
    method: &Method,
    url: &str,
    detail: &mut Value,
) -> Outcome {
    let status = response.status();
    let line = status_line(status);
    if status.is_success() {
        return Outcome::Done;
    }
    if status.is_redirection() {
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
            .unwrap_or_else(|| "(no Location header)".to_string());
        return Outcome::Dead(format!(
            "http: {method} {url}: HTTP {line}, redirected to {location}; errand does not \
             follow redirects: point the job at the final URL"
        ));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        return match retry_after {
            Some(delay) => {
                detail["retry_after_s"] = json!(delay.as_secs());
                Outcome::Snooze(delay)
            }
            None => Outcome::Retry(format!("HTTP {line} from {url} (no Retry-After)")),
        };
    }
    if status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        return Outcome::Retry(format!("HTTP {line} from {url}"));
    }
    if status.is_client_error() {
        return Outcome::Dead(format!(
            "HTTP {line} from {url}; a 4xx other than 408 and 429 is permanent: fix the \
             request (url, method, headers, body) and replay the job"
        ));
    }
    // 1xx that ureq passed through, or a status outside 100..=599.
    Outcome::Retry(format!("HTTP {line} from {url} (unexpected status)"))
}

fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first [`EXCERPT_BYTES`] of the body as text (lossy UTF-8, not cut
/// inside a character), with `…` when there was more. Errors reading the
/// body end the excerpt.
fn read_excerpt(response: &mut Response<ureq::Body>) -> String {
    let mut buf = Vec::with_capacity(EXCERPT_BYTES + 1);
    let _ = response
        .body_mut()
        .as_reader()
        .take(EXCERPT_BYTES as u64 + 1)
        .read_to_end(&mut buf);
    excerpt(&buf)
}

fn excerpt(bytes: &[u8]) -> String {
    if bytes.len() <= EXCERPT_BYTES {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut cut = &bytes[..EXCERPT_BYTES];
    // Do not leave half a character at the end.
    if let Err(e) = std::str::from_utf8(cut)
        && e.error_len().is_none()
    {
        cut = &cut[..e.valid_up_to()];
    }
    let mut text = String::from_utf8_lossy(cut).into_owned();
    text.push('…');
    text
}

/// `Retry-After` as a delay from `now`: delta-seconds or an HTTP-date,
/// capped at a day, never negative.
fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Checks the args into a [`Prepared`] request, or says what to fix (with
/// what to record).
fn prepare(
    config: &HttpConfig,
    args: HttpArgs,
    job: &JobContext,
) -> Result<Prepared, (Value, String)> {
    let method_text = args
        .method
        .as_deref()
        .unwrap_or("POST")
        .to_ascii_uppercase();
    let refuse = |shown: &str, message: String| {
        (
            json!({ "method": method_text, "url": shown, "sent": false, "error": message }),
            message,
        )
    };
    let uri: Uri = args.url.parse().map_err(|e| {
        refuse(
            &args.url,
            format!(
                "http: url '{}' does not parse ({e}); give an absolute http:// or https:// URL",
                args.url
            ),
        )
    })?;
    let target = Target::of(&uri).ok_or_else(|| {
        refuse(
            &args.url,
            format!(
                "http: url '{}' is not an absolute http:// or https:// URL with a host; fix the url",
                args.url
            ),
        )
    })?;
    let shown = without_userinfo(&uri);
    let method = match method_text.as_str() {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        "HEAD" => Method::HEAD,
        other => {
            return Err(refuse(
                &shown,
                format!(
                    "http: method '{other}' is not supported; use GET, POST, PUT, PATCH, DELETE or HEAD"
                ),
            ));
        }
    };
    if !allowed(&config.allow, &target) {
        return Err(refuse(
            &shown,
            format!(
                "http: target {shown} is not allowed by --http-allow (allowed: {}); add it to \
                 ERRAND_HTTP_ALLOW or fix the url",
                config.allow.join(", ")
            ),
        ));
    }
    let mut headers = Vec::with_capacity(args.headers.len() + 1);
    let mut has_content_type = false;
    for (name, value) in &args.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            refuse(
                &shown,
                format!(
                    "http: header name '{name}' is not a valid HTTP header name; fix the headers"
                ),
            )
        })?;
        if RESERVED_HEADERS.contains(&header.as_str()) || header.as_str().starts_with("errand-") {
            return Err(refuse(
                &shown,
                format!(
                    "http: header '{name}' is set by errand itself; remove it from the headers"
                ),
            ));
        }
        // The value is never quoted back: it may be a credential.
        let value = HeaderValue::from_str(value).map_err(|_| {
            refuse(
                &shown,
                format!(
                    "http: the value of header '{name}' is not a valid HTTP header value \
                     (control characters or non-ASCII); fix the headers"
                ),
            )
        })?;
        has_content_type |= header == CONTENT_TYPE;
        headers.push((header, value));
    }
    let body = match args.body {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            if !has_content_type {
                headers.push((
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                ));
            }
            Some(text.into_bytes())
        }
        Some(value) => {
            if !has_content_type {
                headers.push((CONTENT_TYPE, HeaderValue::from_static("application/json")));
            }
            Some(value.to_string().into_bytes())
        }
    };
    if body.is_some() && method == Method::HEAD {
        return Err(refuse(
            &shown,
            "http: a HEAD request cannot have a body; remove the body or change the method"
                .to_string(),
        ));
    }
    let wanted = match args.timeout_ms {
        Some(0) => {
            return Err(refuse(
                &shown,
                "http: timeout_ms must be at least 1; fix the args".to_string(),
            ));
        }
        Some(ms) => Duration::from_millis(ms),
        None => config.timeout,
    };
    let left = job.deadline().saturating_duration_since(Instant::now());
    let timeout = wanted.min(left).max(Duration::from_millis(1));
    Ok(Prepared {
        method,
        uri,
        shown,
        headers,
        body,
        timeout,
    })
}

/// The URL as text without `user:password@`.
fn without_userinfo(uri: &Uri) -> String {
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            format!(
                "{}://***@{host_port}{path}",
                uri.scheme_str().unwrap_or("http")
            )
        }
        _ => uri.to_string(),
    }
}

/// Where a request goes: scheme, host (lowercase, no IPv6 brackets), port
/// (the scheme's default when the URL gives none), and path with query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn of(uri: &Uri) -> Option<Target> {
        let https = match uri.scheme_str()?.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let host = normalize_host(uri.host()?);
        if host.is_empty() {
            return None;
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/".to_string(),
            Some(p) => p.to_string(),
        };
        Some(Target {
            https,
            host,
            port,
            path,
        })
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// One `--http-allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowEntry {
    /// `host`: any port.
    Host(String),
    /// `host:port`.
    HostPort(String, u16),
    /// `*.domain`: strict subdomains of `domain`.
    Subdomains(String),
    /// `http(s)://host[:port]/path`: the same scheme, host and port, and a
    /// path (with query) that starts with the entry's.
    Prefix(Target),
}

impl AllowEntry {
    fn parse(entry: &str) -> Option<AllowEntry> {
        let entry = entry.trim();
        let lower = entry.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let uri: Uri = entry.parse().ok()?;
            return Target::of(&uri).map(AllowEntry::Prefix);
        }
        if entry.is_empty() || entry.contains(['/', '@', '?', '#', ' ']) {
            return None;
        }
        if let Some(domain) = lower.strip_prefix("*.") {
            let domain = normalize_host(domain);
            return (!domain.is_empty() && !domain.contains([':', '*']))
                .then_some(AllowEntry::Subdomains(domain));
        }
        if lower.contains('*') {
            return None;
        }
        // `[v6]:port`, `[v6]`, bare v6 (two colons or more), `host:port`, `host`.
        if let Some(rest) = lower.strip_prefix('[') {
            let (host, after) = rest.split_once(']')?;
            return match after {
                "" => Some(AllowEntry::Host(host.to_string())),
                _ => {
                    let port = after.strip_prefix(':')?.parse().ok()?;
                    Some(AllowEntry::HostPort(host.to_string(), port))
                }
            };
        }
        match lower.matches(':').count() {
            0 => Some(AllowEntry::Host(normalize_host(&lower))),
            1 => {
                let (host, port) = lower.split_once(':')?;
                let host = normalize_host(host);
                (!host.is_empty()).then_some(())?;
                Some(AllowEntry::HostPort(host, port.parse().ok()?))
            }
            _ => Some(AllowEntry::Host(lower)),
        }
    }

    fn permits(&self, target: &Target) -> bool {
        match self {
            AllowEntry::Host(host) => target.host == *host,
            AllowEntry::HostPort(host, port) => target.host == *host && target.port == *port,
            AllowEntry::Subdomains(domain) => target
                .host
                .strip_suffix(domain.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            AllowEntry::Prefix(prefix) => {
                prefix.https == target.https
                    && prefix.host == target.host
                    && prefix.port == target.port
                    && target.path.starts_with(&prefix.path)
            }
        }
    }
}

/// Whether `allow` (empty: anything) lets a request go to `target`.
fn allowed(allow: &[String], target: &Target) -> bool {
    allow.is_empty()
        || allow
            .iter()
            .filter_map(|e| AllowEntry::parse(e))
            .any(|e| e.permits(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        Target::of(&url.parse().unwrap()).unwrap()
    }

    fn permits(allow: &[&str], url: &str) -> bool {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        allowed(&allow, &target(url))
    }

    #[test]
    fn an_empty_allow_list_permits_anything() {
        assert!(permits(&[], "https://anywhere.example/x"));
    }

    #[test]
    fn hosts_match_any_port_case_insensitively() {
        let allow = ["Hooks.Example.com"];
        assert!(permits(&allow, "https://hooks.example.com/a"));
        assert!(permits(&allow, "http://HOOKS.example.COM:8080/a"));
        assert!(!permits(&allow, "https://hooks.example.com.evil.net/"));
        assert!(!permits(&allow, "https://evil.net/hooks.example.com"));
        assert!(!permits(&allow, "https://hooks.example.com@evil.net/"));
        assert!(!permits(&allow, "https://sub.hooks.example.com/"));
    }

    #[test]
    fn host_and_port_match_that_port_only() {
        let allow = ["127.0.0.1:9000"];
        assert!(permits(&allow, "http://127.0.0.1:9000/x"));
        assert!(!permits(&allow, "http://127.0.0.1:9001/x"));
        assert!(!permits(&allow, "http://127.0.0.1/x"));
        // A default port counts as given.
        assert!(permits(&["example.com:443"], "https://example.com/"));
        assert!(!permits(&["example.com:443"], "http://example.com/"));
    }

    #[test]
    fn wildcards_match_strict_subdomains() {
        let allow = ["*.example.com"];
        assert!(permits(&allow, "https://a.example.com/"));
        assert!(permits(&allow, "https://a.b.EXAMPLE.com:444/"));
        assert!(!permits(&allow, "https://example.com/"));
        assert!(!permits(&allow, "https://badexample.com/"));
        assert!(!permits(&allow, "https://a.example.com.evil.net/"));
    }

    #[test]
    fn url_prefixes_match_scheme_host_port_and_path() {
        let allow = ["https://api.example.com/hooks/"];
        assert!(permits(&allow, "https://api.example.com/hooks/order?x=1"));
        assert!(permits(&allow, "https://API.example.com:443/hooks/"));
        assert!(!permits(&allow, "http://api.example.com/hooks/order"));
        assert!(!permits(&allow, "https://api.example.com:8443/hooks/order"));
        assert!(!permits(&allow, "https://api.example.com/other"));
        assert!(!permits(&allow, "https://api.example.com.evil.net/hooks/"));
        assert!(!permits(&allow, "https://api.example.com@evil.net/hooks/"));
        // Without a path, the prefix is the whole origin.
        assert!(permits(
            &["http://127.0.0.1:8080"],
            "http://127.0.0.1:8080/any"
        ));
        assert!(!permits(
            &["http://127.0.0.1:8080"],
            "http://127.0.0.1:8081/any"
        ));
    }

    #[test]
    fn ipv6_hosts_and_malformed_entries() {
        assert!(permits(&["[::1]:8080"], "http://[::1]:8080/"));
        assert!(permits(&["::1"], "http://[::1]:1234/"));
        assert!(permits(&["[::1]"], "http://[::1]/"));
        assert!(!permits(&["[::1]:8080"], "http://[::1]:8081/"));
        for bad in ["", "a/b", "*", "host:port", "*.", "user@host", "ftp://x/"] {
            assert_eq!(AllowEntry::parse(bad), None, "{bad:?}");
        }
        // A malformed entry allows nothing, yet the list is not empty.
        assert!(!permits(&["a/b"], "http://a/b"));
    }

    #[test]
    fn only_absolute_http_urls_are_targets() {
        for url in ["ftp://example.com/", "/relative", "example.com"] {
            let uri: Uri = url.parse().unwrap();
            assert_eq!(Target::of(&uri), None, "{url}");
        }
        assert_eq!(target("http://Example.com").path, "/");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_capped_and_floored() {
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn excerpts_are_capped_on_a_character_boundary() {
        assert_eq!(excerpt(b"short"), "short");
        let long = "é".repeat(EXCERPT_BYTES); // 2 bytes each
        let cut = excerpt(long.as_bytes());
        assert!(cut.ends_with('…'));
        assert_eq!(cut.chars().count(), EXCERPT_BYTES / 2 + 1);
        let odd = format!("a{long}");
        let cut = excerpt(odd.as_bytes());
        assert!(!cut.contains('\u{fffd}'), "no half character");
        assert_eq!(cut.len(), EXCERPT_BYTES - 1 + '…'.len_utf8());
    }

    #[test]
    fn signatures_are_hex_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231-style check against an independent computation.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected = hex(&mac.finalize().into_bytes());
        assert_eq!(sign("key", 1_700_000_000, b"{\"a\":1}"), expected);
        assert_eq!(expected.len(), 64);
        assert!(
            expected
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(sign("key", 1_700_000_001, b"{\"a\":1}"), expected);
        assert_ne!(sign("other", 1_700_000_000, b"{\"a\":1}"), expected);
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"The quick brown fox jumps over the lazy dog");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn userinfo_is_kept_out_of_what_is_shown() {
        let uri: Uri = "https://user:secret@example.com/x?y=1".parse().unwrap();
        assert_eq!(without_userinfo(&uri), "https://***@example.com/x?y=1");
        let uri: Uri = "https://example.com/x".parse().unwrap();
        assert_eq!(without_userinfo(&uri), "https://example.com/x");
    }
}
