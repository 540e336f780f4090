//! The `email` kind: sends one message through the configured SMTP server
//! (lettre, the same URL forms as alerts: `--smtp-url` / `ERRAND_SMTP_URL`).
//!
//! Args: `{"to", "subject", "text", "html"?, "from"?, "reply_to"?, "cc"?,
//! "bcc"?}`; `to`, `cc` and `bcc` take an address or a list of them (1 to 50
//! recipients in all), `from` defaults to `--email-from`. With `html` the
//! message has a plain-text and an HTML alternative.
//!
//! Outcomes:
//! - the server accepts the message: `Done`;
//! - an address that does not parse, or too many recipients: `Dead` at once,
//!   without contacting the server, saying which field to fix;
//! - the server refuses it for good (5xx, e.g. `550 5.1.1 No such user`):
//!   `Dead` with the reply. With several recipients one refusal stops the
//!   whole message: nobody got it, so replaying after the fix is safe;
//! - a transient refusal (4xx), a connection failure or a timeout: `Retry`;
//! - no SMTP server configured, an unusable SMTP URL or sender, or a login
//!   the server refuses (530/534/535/538): `Retry` with what to set, so that
//!   jobs go out once the configuration is fixed.
//!
//! Every attempt that talks to the server records `{"to": [recipients],
//! "smtp_code": 250, "smtp": "250 <reply>"}` (`smtp` is the error's text when
//! there was no reply). Delivery is at least once: a connection lost after
//! the message was sent but before the reply arrived is retried.

use std::error::Error as _;
use std::sync::{Arc, OnceLock};

use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::Error as SmtpError;
use lettre::{Message, SmtpTransport, Transport};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::{Value, json};

use crate::job::{JobContext, Outcome, Registry};

use super::EmailConfig;

/// Most recipients (`to`, `cc` and `bcc` together) one job may have.
pub const MAX_RECIPIENTS: usize = 50;

/// SMTP replies to AUTH (RFC 4954): a configuration problem, not the
/// message's.
const AUTH_CODES: [u16; 4] = [530, 534, 535, 538];

/// An `email` job's arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailArgs {
    #[serde(deserialize_with = "addresses")]
    to: Vec<String>,
    subject: String,
    text: String,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default, deserialize_with = "addresses")]
    cc: Vec<String>,
    #[serde(default, deserialize_with = "addresses")]
    bcc: Vec<String>,
}

/// An address, or a list of addresses (null: none).
fn addresses<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Addresses;

    impl<'de> Visitor<'de> for Addresses {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an email address or a list of email addresses")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut all = Vec::new();
            while let Some(address) = seq.next_element::<String>()? {
                all.push(address);
            }
            Ok(all)
        }
    }

    deserializer.deserialize_any(Addresses)
}

/// Registers `email` with `config`. The SMTP transport (a connection pool)
/// is built at the first job, and shared by the worker threads.
pub fn register(registry: &mut Registry, config: Arc<EmailConfig>) {
    let sender = Sender {
        config,
        transport: OnceLock::new(),
    };
    registry.register_fn("email", move |args: EmailArgs, job: &JobContext| {
        sender.send(args, job)
    });
}

struct Sender {
    config: Arc<EmailConfig>,
    transport: OnceLock<Result<SmtpTransport, String>>,
}

impl Sender {
    fn transport(&self) -> Result<&SmtpTransport, String> {
        self.transport
            .get_or_init(|| {
                let Some(url) = &self.config.smtp_url else {
                    return Err("email: no SMTP server is configured: set --smtp-url (or \
                         ERRAND_SMTP_URL, or [smtp] url in the config file), e.g. \
                         smtp://127.0.0.1:25; the job is retried and goes out once it is set"
                        .to_string());
                };
                SmtpTransport::from_url(url)
                    .map(|builder| builder.timeout(Some(self.config.timeout)).build())
                    .map_err(|e| {
                        format!(
                            "email: the SMTP URL is not usable ({e}): set --smtp-url (or \
                             ERRAND_SMTP_URL) to e.g. smtp://host:25 or \
                             smtps://user:pass@host:465; the job is retried"
                        )
                    })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn send(&self, args: EmailArgs, job: &JobContext) -> Outcome {
        let message = match self.message(args) {
            Ok(message) => message,
            Err(outcome) => return outcome,
        };
        let transport = match self.transport() {
            Ok(transport) => transport,
            Err(e) => return Outcome::Retry(e),
        };
        let recipients: Vec<String> = message
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        match transport.send(&message) {
            Ok(response) => {
                let code = u16::from(response.code());
                let text = response.message().collect::<Vec<_>>().join(" ");
                job.record(json!({
                    "to": recipients,
                    "smtp_code": code,
                    "smtp": format!("{code} {text}").trim_end(),
                }));
                Outcome::Done
            }
            Err(e) => {
                let (code, reply) = describe(&e);
                let mut detail = json!({"to": recipients, "smtp": reply});
                if let Some(code) = code {
                    detail["smtp_code"] = Value::from(code);
                }
                job.record(detail);
                if code.is_some_and(|c| AUTH_CODES.contains(&c)) {
                    Outcome::Retry(format!(
                        "SMTP server refused errand's login: {reply}; fix the credentials in \
                         --smtp-url (ERRAND_SMTP_URL); the job is retried"
                    ))
                } else if e.is_permanent() {
                    let hint = if recipients.len() > 1 {
                        format!(
                            " (the message went to none of its {} recipients: fix or remove \
                             the refused address and replay the job)",
                            recipients.len()
                        )
                    } else {
                        String::new()
                    };
                    Outcome::Dead(format!("SMTP server refused: {reply}{hint}"))
                } else if e.is_transient() {
                    Outcome::Retry(format!("SMTP server deferred: {reply}"))
                } else {
                    Outcome::Retry(format!(
                        "email: sending through the SMTP server failed: {e}"
                    ))
                }
            }
        }
    }

    /// The message `args` describe, or `Dead` (bad args) / `Retry` (bad
    /// configuration) saying what to fix.
    fn message(&self, args: EmailArgs) -> Result<Message, Outcome> {
        if args.to.is_empty() {
            return Err(Outcome::Dead(
                "email: `to` is empty; give at least one address and replay the job".into(),
            ));
        }
        let count = args.to.len() + args.cc.len() + args.bcc.len();
        if count > MAX_RECIPIENTS {
            return Err(Outcome::Dead(format!(
                "email: {count} recipients (`to`, `cc` and `bcc`); at most {MAX_RECIPIENTS} per \
                 job: split it into several jobs"
            )));
        }
        let from = match &args.from {
            Some(from) => mailbox("from", from).map_err(Outcome::Dead)?,
            None => self.config.from.trim().parse::<Mailbox>().map_err(|e| {
                Outcome::Retry(format!(
                    "email: the default sender '{}' is not an email address ({e}); set \
                     --email-from (ERRAND_EMAIL_FROM), or give `from` in the job's args",
                    self.config.from
                ))
            })?,
        };
        // One line: a header cannot hold line breaks.
        let subject = args
            .subject
            .split(['\r', '\n'])
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let mut builder = Message::builder().from(from).subject(subject);
        for to in &args.to {
            builder = builder.to(mailbox("to", to).map_err(Outcome::Dead)?);
        }
        for cc in &args.cc {
            builder = builder.cc(mailbox("cc", cc).map_err(Outcome::Dead)?);
        }
        for bcc in &args.bcc {
            builder = builder.bcc(mailbox("bcc", bcc).map_err(Outcome::Dead)?);
        }
        if let Some(reply_to) = &args.reply_to {
            builder = builder.reply_to(mailbox("reply_to", reply_to).map_err(Outcome::Dead)?);
        }
        let built = match args.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(args.text, html)),
            None => builder.singlepart(SinglePart::plain(args.text)),
        };
        built.map_err(|e| {
            Outcome::Dead(format!(
                "email: the message could not be built ({e}); fix the args and replay the job"
            ))
        })
    }
}

/// `address` as a mailbox (`a@b.c` or `Name <a@b.c>`), or why not.
fn mailbox(field: &str, address: &str) -> Result<Mailbox, String> {
    address.trim().parse::<Mailbox>().map_err(|e| {
        format!(
            "email: '{address}' is not an email address ({e}); fix `{field}` and replay the job"
        )
    })
}

/// The reply's code and text (`550 5.1.1 No such user here`), or the
/// error's text when the server gave no reply.
fn describe(e: &SmtpError) -> (Option<u16>, String) {
    match e.status() {
        Some(code) => {
            let code = u16::from(code);
            let text = e.source().map(ToString::to_string).unwrap_or_default();
            (Some(code), format!("{code} {text}").trim_end().to_string())
        }
        None => (None, e.to_string()),
    }
}
