//! A real SMTP server for tests: `tests/support/smtp_sink.py` (aiosmtpd,
//! Debian's `python3-aiosmtpd`) as a child process, and what it received.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::wait_for;

/// The SMTP server, as a child process; what it received, decoded.
pub struct Smtp {
    child: Option<Child>,
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
}

impl Smtp {
    pub fn start() -> Smtp {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut smtp = Smtp {
            child: None,
            port,
            received: Arc::default(),
        };
        smtp.up();
        smtp
    }

    /// (Re)starts the server on its port.
    pub fn up(&mut self) {
        let python =
            std::env::var("ERRAND_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_sink.py");
        let mut child = Command::new(&python)
            .args([script, &self.port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_else(|| {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!(
                "the SMTP test server did not start: install Debian's python3-aiosmtpd \
                 (.ci/run does), or set ERRAND_TEST_PYTHON.\n{err}"
            )
        });
        assert!(first.contains("ready"), "{first}");
        let received = self.received.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                received
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        self.child = Some(child);
    }

    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn emails(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// The email whose subject is `subject`, once it has arrived.
    pub fn wait_email(&self, subject: &str, within: Duration) -> Value {
        wait_for(&format!("an email '{subject}'"), within, || {
            self.emails().into_iter().find(|e| e["subject"] == subject)
        })
    }

    pub fn subjects(&self) -> Vec<String> {
        self.emails()
            .iter()
            .map(|e| e["subject"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.down();
    }
}
