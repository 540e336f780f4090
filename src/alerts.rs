//! Email alerts: rules over the job tables, evaluated by the maintenance
//! leader, and the emails they cause, delivered by one sender thread.
//!
//! Deciding and sending are separate. The [`Evaluator`] derives each rule's
//! value with SQL and moves its state (inactive → pending → firing →
//! resolved) in the database; a change that deserves an email writes it to
//! the outbox in the same transaction. The [`Mailer`] delivers the outbox:
//! everything due goes in one email, transient failures are retried with
//! backoff, permanent ones are marked failed, and at most `max_per_hour`
//! emails leave per hour (what waits goes out as one digest). Workers never
//! talk to SMTP, so an SMTP outage cannot slow jobs down.

use std::path::Path;
use std::time::Duration;

use askama::Template;
use chrono::{DateTime, Utc};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Message, SmtpTransport, Transport};
use serde::Deserialize;
use tracing::{info, warn};

use crate::store::{self, AlertState, Email, Metric, Scope, Store};

/// One alert rule: fire when `metric` over `scope` is at least `threshold`
/// for `pending`; resolve when it has been below for `resolve_after`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub metric: Metric,
    /// Counts, a rate from 0 to 1, or seconds (backlog age).
    pub threshold: f64,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// The window for counts and rates. Default 5 min (10 for rates).
    pub window: Duration,
    /// For the failure rate: finished attempts needed to judge. Default 20.
    pub min_finished: i64,
    /// How long the condition must hold before the rule fires.
    pub pending: Duration,
    /// How long it must be clear before the rule resolves.
    pub resolve_after: Duration,
}

impl Rule {
    fn scope(&self, stale_after: Duration) -> Scope {
        Scope {
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            window: self.window,
            min_finished: self.min_finished,
            stale_after,
        }
    }

    /// What the rule watches, in words.
    pub fn describe(&self) -> String {
        let window = humantime::format_duration(self.window);
        let what = match self.metric {
            Metric::Failures => format!("failed attempts in the last {window}"),
            Metric::FailureRate => format!(
                "failure rate in the last {window} (at least {} finished)",
                self.min_finished
            ),
            Metric::NewDead => format!("new dead letters in the last {window}"),
            Metric::DeadTotal => "dead letters stored".to_string(),
            Metric::BacklogAge => "age of the oldest waiting job".to_string(),
            Metric::Rescued => format!("jobs rescued from lost workers in the last {window}"),
            Metric::NoWorkers => "jobs waiting with no live worker".to_string(),
        };
        let scope: Vec<String> = [
            self.queue.as_ref().map(|q| format!("queue {q}")),
            self.kind.as_ref().map(|k| format!("kind {k}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if scope.is_empty() {
            what
        } else {
            format!("{what}, {}", scope.join(", "))
        }
    }

    /// A value in the rule's unit: "12", "23.5%", "4m 10s".
    pub fn format(&self, value: f64) -> String {
        match self.metric {
            Metric::FailureRate => format!("{:.1}%", value * 100.0),
            Metric::BacklogAge => {
                humantime::format_duration(Duration::from_secs(value.max(0.0) as u64)).to_string()
            }
            _ => format!("{}", value.round() as i64),
        }
    }

    /// The dashboard view that shows what the rule is about.
    fn view(&self) -> String {
        let pairs: Vec<(&str, &str)> = [
            ("queue", self.queue.as_deref()),
            ("kind", self.kind.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        let query = |path: &str, extra: &[(&str, &str)]| {
            let all: Vec<String> = extra
                .iter()
                .chain(pairs.iter())
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect();
            if all.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", all.join("&"))
            }
        };
        match self.metric {
            Metric::NewDead | Metric::DeadTotal => query("/dead", &[]),
            Metric::Failures | Metric::FailureRate | Metric::Rescued => {
                query("/jobs", &[("state", "retrying")])
            }
            Metric::BacklogAge => "/queues".to_string(),
            Metric::NoWorkers => "/workers".to_string(),
        }
    }
}

fn urlencode(value: &str) -> String {
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

/// Everything about alerts; [`AlertConfig::default`] sends nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    pub rules: Vec<Rule>,
    /// `smtp://host:port`, `smtps://user:pass@host:465`,
    /// `smtp://host:587?tls=required` (lettre's URL forms).
    pub smtp_url: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    /// errand's address as readers of the emails reach it, for links.
    pub public_url: Option<String>,
    /// How often the leader evaluates the rules. Default 30 s.
    pub evaluate_every: Duration,
    /// How often a still-firing alert is sent again. Default 4 h.
    pub repeat_every: Duration,
    /// Most emails per `cap_window` (an hour); the rest wait and go as one
    /// digest. Default 12.
    pub max_per_hour: u32,
    /// The window of the cap. Default 1 h (shorter only in tests).
    pub cap_window: Duration,
    /// SMTP connect and command timeout. Default 10 s.
    pub smtp_timeout: Duration,
    /// Delay before the first retry of a failed delivery, doubling up to
    /// `retry_max`. Defaults 5 s and 5 min.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often the sender looks at the outbox. Default 1 s.
    pub send_every: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            rules: Vec::new(),
            smtp_url: None,
            from: format!(
                "errand <errand@{}>",
                gethostname::gethostname().to_string_lossy()
            ),
            to: Vec::new(),
            public_url: None,
            evaluate_every: Duration::from_secs(30),
            repeat_every: Duration::from_secs(4 * 3600),
            max_per_hour: 12,
            cap_window: Duration::from_secs(3600),
            smtp_timeout: Duration::from_secs(10),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            send_every: Duration::from_secs(1),
        }
    }
}

impl AlertConfig {
    /// Whether emails can be sent (a server and at least one recipient).
    pub fn can_send(&self) -> bool {
        self.smtp_url.is_some() && !self.to.is_empty()
    }

    /// The rules used when a recipient is set and no rule is configured:
    /// new dead letters, a failure rate over 25%, a backlog older than 5
    /// minutes, and jobs waiting with no live worker.
    pub fn default_rules() -> Vec<Rule> {
        let rule = |name: &str, metric, threshold, window: u64, pending: u64| Rule {
            name: name.to_string(),
            metric,
            threshold,
            queue: None,
            kind: None,
            window: Duration::from_secs(window),
            min_finished: 20,
            pending: Duration::from_secs(pending),
            resolve_after: Duration::from_secs(120),
        };
        vec![
            rule("new dead letters", Metric::NewDead, 1.0, 300, 0),
            rule("failure rate", Metric::FailureRate, 0.25, 600, 120),
            rule("backlog age", Metric::BacklogAge, 300.0, 300, 60),
            rule("no live workers", Metric::NoWorkers, 1.0, 300, 60),
        ]
    }

    /// Reads a TOML configuration file (see the README for its form).
    pub fn from_file(path: &Path) -> Result<AlertConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        AlertConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<AlertConfig, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut config = AlertConfig {
            public_url: file.public_url,
            ..AlertConfig::default()
        };
        let timing = file.alerts.unwrap_or_default();
        let dur =
            |field: &str, text: Option<String>, default: Duration| -> Result<Duration, String> {
                match text {
                    None => Ok(default),
                    Some(t) => humantime::parse_duration(&t)
                        .map_err(|e| format!("{field} = '{t}': {e} (write e.g. 30s, 5m, 4h)")),
                }
            };
        config.evaluate_every = dur(
            "alerts.evaluate_every",
            timing.evaluate_every,
            config.evaluate_every,
        )?;
        config.repeat_every = dur(
            "alerts.repeat_every",
            timing.repeat_every,
            config.repeat_every,
        )?;
        config.retry_base = dur("alerts.retry_base", timing.retry_base, config.retry_base)?;
        config.retry_max = dur("alerts.retry_max", timing.retry_max, config.retry_max)?;
        config.send_every = dur("alerts.send_every", timing.send_every, config.send_every)?;
        config.max_per_hour = timing.max_per_hour.unwrap_or(config.max_per_hour);
        let pending = dur("alerts.pending", timing.pending, Duration::from_secs(60))?;
        let resolve_after = dur(
            "alerts.resolve_after",
            timing.resolve_after,
            Duration::from_secs(120),
        )?;
        if let Some(smtp) = file.smtp {
            config.smtp_timeout = dur("smtp.timeout", smtp.timeout, config.smtp_timeout)?;
            config.smtp_url = smtp
                .url
                .map(Ok)
                .or_else(|| {
                    smtp.host.map(|host| {
                        smtp_url(
                            &host,
                            smtp.port,
                            smtp.tls.as_deref(),
                            smtp.username.as_deref(),
                            smtp.password.as_deref(),
                        )
                    })
                })
                .transpose()?;
            if let Some(from) = smtp.from {
                config.from = from;
            }
            config.to = smtp.to;
        }
        let mut names = std::collections::HashSet::new();
        for r in file.rule {
            let name = r.name.trim().to_string();
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(format!("rule '{name}': every rule needs a name of its own"));
            }
            let default_window = if r.metric == Metric::FailureRate {
                600
            } else {
                300
            };
            let threshold = match r.threshold {
                Threshold::Number(n) => n,
                Threshold::Text(t) => parse_threshold(&t)
                    .ok_or_else(|| format!("rule '{name}': threshold '{t}' is not a number, a percentage (25%) or a duration (5m)"))?,
            };
            config.rules.push(Rule {
                metric: r.metric,
                threshold,
                queue: r.queue,
                kind: r.kind,
                window: dur(
                    &format!("rule '{name}' window"),
                    r.window,
                    Duration::from_secs(default_window),
                )?,
                min_finished: r.min_finished.unwrap_or(20),
                pending: dur(&format!("rule '{name}' pending"), r.pending, pending)?,
                resolve_after: dur(
                    &format!("rule '{name}' resolve_after"),
                    r.resolve_after,
                    resolve_after,
                )?,
                name,
            });
        }
        Ok(config)
    }

    /// Applies flags over the file; with a recipient and no rules, the
    /// default rules.
    pub fn with_overrides(
        mut self,
        smtp_url: Option<String>,
        to: Vec<String>,
        from: Option<String>,
        public_url: Option<String>,
    ) -> Result<AlertConfig, String> {
        if smtp_url.is_some() {
            self.smtp_url = smtp_url;
        }
        if !to.is_empty() {
            self.to = to;
        }
        if let Some(from) = from {
            self.from = from;
        }
        if public_url.is_some() {
            self.public_url = public_url;
        }
        self.to.retain(|t| !t.trim().is_empty());
        if !self.to.is_empty() && self.rules.is_empty() {
            self.rules = AlertConfig::default_rules();
        }
        if !self.to.is_empty() && self.smtp_url.is_none() {
            return Err(
                "alert recipients are set but no SMTP server: set --smtp-url (or ERRAND_SMTP_URL, \
                 or [smtp] url in the config file), e.g. smtp://127.0.0.1:25"
                    .into(),
            );
        }
        // Checked now, not at the first alert.
        Mailer::new(&self)?;
        Ok(self)
    }
}

fn parse_threshold(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        return pct.trim().parse::<f64>().ok().map(|p| p / 100.0);
    }
    t.parse::<f64>()
        .ok()
        .or_else(|| humantime::parse_duration(t).ok().map(|d| d.as_secs_f64()))
}

/// An SMTP URL from the file's separate fields.
fn smtp_url(
    host: &str,
    port: Option<u16>,
    tls: Option<&str>,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<String, String> {
    let (scheme, query) = match tls.unwrap_or("starttls") {
        "none" => ("smtp", ""),
        "starttls" => ("smtp", "?tls=required"),
        "tls" => ("smtps", ""),
        other => {
            return Err(format!("smtp.tls = '{other}': use none, starttls or tls"));
        }
    };
    let credentials = match (username, password) {
        (Some(u), Some(p)) => format!("{}:{}@", urlencode(u), urlencode(p)),
        (Some(u), None) => format!("{}@", urlencode(u)),
        _ => String::new(),
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    Ok(format!("{scheme}://{credentials}{host}{port}{query}"))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    public_url: Option<String>,
    smtp: Option<SmtpFile>,
    alerts: Option<TimingFile>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SmtpFile {
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    /// none, starttls (default) or tls.
    tls: Option<String>,
    username: Option<String>,
    password: Option<String>,
    from: Option<String>,
    #[serde(default)]
    to: Vec<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimingFile {
    evaluate_every: Option<String>,
    pending: Option<String>,
    resolve_after: Option<String>,
    repeat_every: Option<String>,
    max_per_hour: Option<u32>,
    retry_base: Option<String>,
    retry_max: Option<String>,
    send_every: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    metric: Metric,
    threshold: Threshold,
    window: Option<String>,
    min_finished: Option<i64>,
    queue: Option<String>,
    kind: Option<String>,
    pending: Option<String>,
    resolve_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Threshold {
    Number(f64),
    Text(String),
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

/// What one evaluation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalReport {
    pub evaluated: usize,
    pub fired: usize,
    pub repeated: usize,
    pub resolved: usize,
}

/// Evaluates every rule once and moves its state (run by the leader).
pub struct Evaluator<'a> {
    pub store: &'a Store,
    pub config: &'a AlertConfig,
    /// A worker silent this long is not alive (for `no_workers`).
    pub stale_after: Duration,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Evaluator<'_> {
    pub fn run_once(&self) -> store::Result<EvalReport> {
        let mut report = EvalReport::default();
        for rule in &self.config.rules {
            let value = self
                .store
                .alert_value(rule.metric, &rule.scope(self.stale_after))?;
            let now = self.store.now_ms()?;
            let holds = value.is_some_and(|v| v >= rule.threshold);
            let read = self.store.alert_state_get(&rule.name)?;
            let before = read.clone().unwrap_or(AlertState {
                rule: rule.name.clone(),
                state: "inactive".into(),
                since: now,
                value: None,
                evaluated_at: 0,
                clear_since: None,
                notified_at: None,
                incident: 0,
            });
            let mut next = AlertState {
                value,
                evaluated_at: now.max(before.evaluated_at + 1),
                ..before.clone()
            };
            let mut event = None;
            match (before.state.as_str(), holds) {
                ("inactive" | "resolved", true) => {
                    next.state = "pending".into();
                    next.since = now;
                    if rule.pending.is_zero() {
                        event = Some("firing");
                    }
                }
                ("pending", true) if now - before.since >= ms(rule.pending) => {
                    event = Some("firing")
                }
                ("pending", false) => {
                    // A blip: it cleared before the pending period ended.
                    next.state = "inactive".into();
                    next.since = now;
                }
                ("firing", true) => {
                    next.clear_since = None;
                    if before
                        .notified_at
                        .is_none_or(|at| now - at >= ms(self.config.repeat_every))
                    {
                        next.notified_at = Some(now);
                        event = Some("repeat");
                    }
                }
                ("firing", false) => {
                    let clear = before.clear_since.unwrap_or(now);
                    next.clear_since = Some(clear);
                    if now - clear >= ms(rule.resolve_after) {
                        next.state = "resolved".into();
                        next.since = now;
                        next.clear_since = None;
                        event = Some("resolved");
                    }
                }
                _ => {}
            }
            if event == Some("firing") {
                next.state = "firing".into();
                next.since = now;
                next.notified_at = Some(now);
                next.clear_since = None;
                next.incident += 1;
            }
            let email = match event {
                Some(event) if self.config.can_send() => Some(self.email(rule, &next, event)?),
                _ => None,
            };
            if self
                .store
                .alert_transition(read.map(|r| r.evaluated_at), &next, email.as_ref())?
            {
                report.evaluated += 1;
                match event {
                    Some("firing") => {
                        report.fired += 1;
                        warn!(rule = %rule.name, value = ?value, "alert firing");
                    }
                    Some("repeat") => report.repeated += 1,
                    Some("resolved") => {
                        report.resolved += 1;
                        info!(rule = %rule.name, "alert resolved");
                    }
                    _ => {}
                }
            }
        }
        Ok(report)
    }

    fn email(&self, rule: &Rule, state: &AlertState, event: &str) -> store::Result<Email> {
        let context = self.store.alert_context(&rule.scope(self.stale_after))?;
        let value = state
            .value
            .map_or_else(|| "no value".into(), |v| rule.format(v));
        let threshold = rule.format(rule.threshold);
        let title = match event {
            "resolved" => format!("RESOLVED: {}", rule.name),
            "repeat" => format!(
                "STILL FIRING: {} - {value} (threshold {threshold})",
                rule.name
            ),
            _ => format!("FIRING: {} - {value} (threshold {threshold})", rule.name),
        };
        let since = time(state.since);
        let link = |path: &str| {
            self.config
                .public_url
                .as_deref()
                .map(|base| format!("{}{path}", base.trim_end_matches('/')))
        };
        let view = link(&rule.view());
        let alerts_link = link("/alerts");
        let mut text = format!(
            "{title}\n\n{}: {value} (threshold {threshold})\n",
            rule.describe()
        );
        text.push_str(&match event {
            "resolved" => format!("Resolved at {since}.\n"),
            _ => format!("Firing since {since} (incident {}).\n", state.incident),
        });
        if !context.queues.is_empty() {
            let list: Vec<String> = context
                .queues
                .iter()
                .map(|(q, n)| format!("{q} ({n})"))
                .collect();
            text.push_str(&format!(
                "\nQueues with the most failures: {}\n",
                list.join(", ")
            ));
            let list: Vec<String> = context
                .kinds
                .iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            text.push_str(&format!(
                "Kinds with the most failures: {}\n",
                list.join(", ")
            ));
        }
        if !context.samples.is_empty() {
            text.push_str("\nRecent errors:\n");
            for (id, kind, error) in &context.samples {
                text.push_str(&format!("  job {id} ({kind}): {error}\n"));
            }
        }
        if let Some(view) = &view {
            text.push_str(&format!("\nSee: {view}\n"));
        }
        if let Some(alerts) = &alerts_link {
            text.push_str(&format!("All alerts: {alerts}\n"));
        }
        let html = EmailHtml {
            title: &title,
            description: rule.describe(),
            value: &value,
            threshold: &threshold,
            event,
            since: &since,
            incident: state.incident,
            queues: &context.queues,
            kinds: &context.kinds,
            samples: &context.samples,
            view: view.as_deref(),
            alerts: alerts_link.as_deref(),
        }
        .render()
        .unwrap_or_else(|_| format!("<pre>{}</pre>", html_escape(&text)));
        Ok(Email {
            rule: rule.name.clone(),
            event: event.to_string(),
            subject: format!("[errand] {title}"),
            text,
            html,
        })
    }
}

fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Template)]
#[template(path = "email.html")]
struct EmailHtml<'a> {
    title: &'a str,
    description: String,
    value: &'a str,
    threshold: &'a str,
    event: &'a str,
    since: &'a str,
    incident: i64,
    queues: &'a [(String, i64)],
    kinds: &'a [(String, i64)],
    samples: &'a [(i64, String, String)],
    view: Option<&'a str>,
    alerts: Option<&'a str>,
}

/// The email a "send a test email" button queues.
pub fn test_email(config: &AlertConfig, by: &str) -> Email {
    let text = format!(
        "This is a test email from errand, sent by {by}.\n\nIf you read this, alerts reach {}.\n",
        config.to.join(", ")
    );
    Email {
        rule: "(test)".into(),
        event: "test".into(),
        subject: "[errand] test email".into(),
        html: format!("<p>{}</p>", html_escape(&text).replace('\n', "<br>")),
        text,
    }
}

// ---------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------

/// What one pass of the sender did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Emails sent (each may carry several notifications).
    pub sent: usize,
    pub notifications: usize,
    /// Notifications to retry later.
    pub retrying: usize,
    /// Notifications given up (refused permanently).
    pub failed: usize,
    /// Notifications held back by the hourly cap.
    pub held: usize,
}

/// Delivers the outbox over SMTP (lettre, blocking, short timeouts).
pub struct Mailer {
    transport: SmtpTransport,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl Mailer {
    /// A mailer for `config`, or why it cannot be built.
    pub fn new(config: &AlertConfig) -> Result<Option<Mailer>, String> {
        let Some(url) = &config.smtp_url else {
            return Ok(None);
        };
        let transport = SmtpTransport::from_url(url)
            .map_err(|e| format!("the SMTP URL is not usable ({e}): write e.g. smtp://host:25 or smtps://user:pass@host:465"))?
            .timeout(Some(config.smtp_timeout))
            .build();
        let from: Mailbox = config.from.parse().map_err(|e| {
            format!(
                "alert sender '{}' is not an email address: {e}",
                config.from
            )
        })?;
        let to = config
            .to
            .iter()
            .map(|t| {
                t.trim()
                    .parse::<Mailbox>()
                    .map_err(|e| format!("alert recipient '{t}' is not an email address: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Mailer {
            transport,
            from,
            to,
        }))
    }

    /// Sends everything due as one email (or holds it under the hourly cap).
    pub fn run_once(&self, store: &Store, config: &AlertConfig) -> store::Result<SendReport> {
        let mut report = SendReport::default();
        let due = store.outbox_due()?;
        if due.is_empty() {
            return Ok(report);
        }
        let (sent_last_hour, _) = store.outbox_sent_within(config.cap_window)?;
        if sent_last_hour >= i64::from(config.max_per_hour) {
            // They wait, and leave together as one digest when the hour
            // has room again.
            report.held = due.len();
            return Ok(report);
        }
        let ids: Vec<i64> = due.iter().map(|r| r.id).collect();
        let (subject, text, html) = if due.len() == 1 {
            (
                due[0].subject.clone(),
                due[0].body_text.clone(),
                due[0].body_html.clone(),
            )
        } else {
            let names: Vec<String> = due
                .iter()
                .map(|r| format!("{} {}", r.rule, r.event))
                .collect();
            let subject = format!(
                "[errand] {} alert notifications: {}",
                due.len(),
                names.join(", ")
            );
            let text = due
                .iter()
                .map(|r| r.body_text.as_str())
                .collect::<Vec<_>>()
                .join("\n----------------------------------------\n\n");
            let html = due
                .iter()
                .map(|r| r.body_html.as_str())
                .collect::<Vec<_>>()
                .join("<hr>");
            (cut_subject(&subject), text, html)
        };
        let mut builder = Message::builder().from(self.from.clone()).subject(subject);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = match builder.multipart(MultiPart::alternative_plain_html(text, html)) {
            Ok(message) => message,
            Err(e) => {
                store.outbox_failed(&ids, &format!("the email could not be built: {e}"), None)?;
                report.failed = ids.len();
                return Ok(report);
            }
        };
        match self.transport.send(&message) {
            Ok(_) => {
                store.outbox_sent(&ids, ids[0])?;
                report.sent = 1;
                report.notifications = ids.len();
                info!(notifications = ids.len(), "alert email sent");
            }
            Err(e) if e.is_permanent() => {
                warn!(error = %e, "the SMTP server refused the alert email; not retried");
                store.outbox_failed(&ids, &format!("refused: {e}"), None)?;
                report.failed = ids.len();
            }
            Err(e) => {
                let attempts = due.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
                let delay = config
                    .retry_base
                    .saturating_mul(1 << (attempts - 1).clamp(0, 16) as u32)
                    .min(config.retry_max);
                warn!(error = %e, retry_in = ?delay, "sending the alert email failed; will retry");
                store.outbox_failed(&ids, &format!("{e}"), Some(delay))?;
                report.retrying = ids.len();
            }
        }
        Ok(report)
    }
}

fn cut_subject(subject: &str) -> String {
    if subject.chars().count() <= 150 {
        subject.to_string()
    } else {
        let mut s: String = subject.chars().take(149).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_reads_with_defaults_and_clear_errors() {
        let config = AlertConfig::from_toml(
            r#"
            public_url = "https://errand.example.com"
            [smtp]
            host = "mail.example.com"
            port = 587
            username = "errand"
            password = "p@ss"
            from = "errand <errand@example.com>"
            to = ["ops@example.com"]
            [alerts]
            pending = "30s"
            repeat_every = "1h"
            [[rule]]
            name = "payments failing"
            metric = "failure_rate"
            threshold = "20%"
            queue = "payments"
            [[rule]]
            name = "stuck"
            metric = "backlog_age"
            threshold = "10m"
            pending = "0s"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.smtp_url.as_deref(),
            Some("smtp://errand:p%40ss@mail.example.com:587?tls=required")
        );
        assert_eq!(config.repeat_every, Duration::from_secs(3600));
        assert_eq!(config.rules[0].threshold, 0.2);
        assert_eq!(config.rules[0].window, Duration::from_secs(600));
        assert_eq!(config.rules[0].pending, Duration::from_secs(30));
        assert_eq!(config.rules[1].threshold, 600.0);
        assert_eq!(config.rules[1].pending, Duration::ZERO);
        assert!(config.rules[0].describe().contains("queue payments"));
        assert_eq!(config.rules[0].format(0.2345), "23.4%");
        let err =
            AlertConfig::from_toml("[[rule]]\nname = \"x\"\nmetric = \"nonsense\"\nthreshold = 1")
                .unwrap_err();
        assert!(err.contains("unknown variant"), "{err}");
        let err = AlertConfig::from_toml("[smtp]\nurl = \"smtp://x\"\nbogus = 1").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn a_recipient_without_rules_gets_the_defaults() {
        let config = AlertConfig::default()
            .with_overrides(
                Some("smtp://127.0.0.1:2525".into()),
                vec!["ops@example.com".into()],
                None,
                None,
            )
            .unwrap();
        let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "new dead letters",
                "failure rate",
                "backlog age",
                "no live workers"
            ]
        );
        let err = AlertConfig::default()
            .with_overrides(None, vec!["ops@example.com".into()], None, None)
            .unwrap_err();
        assert!(err.contains("--smtp-url"), "{err}");
        let err = AlertConfig::default()
            .with_overrides(
                Some("smtp://127.0.0.1:2525".into()),
                vec!["not an address".into()],
                None,
                None,
            )
            .unwrap_err();
        assert!(err.contains("not an email address"), "{err}");
    }
}
