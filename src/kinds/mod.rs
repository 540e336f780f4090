//! Job kinds errand runs itself, so that teams that do not write Rust get
//! real work done: `http` delivers a request, `email` sends a message through
//! the configured SMTP server. Both record what each attempt saw
//! ([`crate::job::JobContext::record`]).

use std::sync::Arc;
use std::time::Duration;

use crate::job::Registry;

pub mod email;
pub mod http;

/// Settings of the built-in kinds; the defaults are `errand serve`'s.
#[derive(Debug, Clone, Default)]
pub struct KindsConfig {
    pub http: HttpConfig,
    pub email: EmailConfig,
}

/// The `http` kind's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Targets a request may go to. Empty: any. Each entry is a host
    /// (`hooks.example.com`, any port), a host and port
    /// (`127.0.0.1:9000`), a wildcard domain (`*.example.com`, its
    /// subdomains), or a URL prefix (`https://api.example.com/hooks/`).
    pub allow: Vec<String>,
    /// Signs each request's body (HMAC-SHA256) in an `Errand-Signature`
    /// header when set.
    pub signing_secret: Option<String>,
    /// A request's timeout when its args give none. Default 30 s.
    pub timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allow: Vec::new(),
            signing_secret: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The `email` kind's settings.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    /// The SMTP server (lettre's URL forms, as for alerts). None: email
    /// jobs fail with a message saying how to configure one.
    pub smtp_url: Option<String>,
    /// The sender when the job's args give none.
    pub from: String,
    /// SMTP connect and command timeout. Default 30 s.
    pub timeout: Duration,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            smtp_url: None,
            from: "errand <errand@localhost>".to_string(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Registers `http` and `email`.
pub fn register(registry: &mut Registry, config: &KindsConfig) {
    http::register(registry, Arc::new(config.http.clone()));
    email::register(registry, Arc::new(config.email.clone()));
}
