//! The `errand` binary and other programs as child processes: their output
//! collected line by line, killed when the test ends.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wait_for;

/// How long a process has to say or do what a test waits for.
const WAIT: Duration = Duration::from_secs(60);

/// Intervals short enough for a test to watch a rescue happen.
pub const FAST: &[&str] = &[
    "--poll-interval=100ms",
    "--heartbeat-interval=200ms",
    "--stale-after=1s",
    "--rescue-interval=200ms",
    "--leader-ttl=1s",
    "--retry-delay=0s",
];

/// `errand` on `db_url`, with no `ERRAND_*` setting inherited from the
/// environment, logging at info.
pub fn errand_cmd(db_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_errand"));
    for (key, _) in std::env::vars() {
        if key.starts_with("ERRAND_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ERRAND_DATABASE_URL", db_url)
        .env("RUST_LOG", "info");
    cmd
}

/// A running child process, killed if the test ends first.
pub struct Proc {
    pub child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// `errand` on `db_url` with `args`.
    pub fn start(db_url: &str, args: &[&str]) -> Proc {
        let mut cmd = errand_cmd(db_url);
        cmd.args(args);
        Proc::spawn(cmd, "errand")
    }

    /// Starts `cmd` (`what` names it in a failure), collecting its output.
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let collect = |pipe: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first output line (stdout or stderr) containing `containing`,
    /// once it has been written.
    pub fn line(&self, containing: &str) -> String {
        wait_for(&format!("an output line with '{containing}'"), WAIT, || {
            let stdout = self.stdout.lock().unwrap();
            let stderr = self.stderr.lock().unwrap();
            stdout
                .iter()
                .chain(stderr.iter())
                .find(|l| l.contains(containing))
                .cloned()
        })
    }

    /// Everything written so far, for a failure message.
    pub fn output(&self) -> String {
        let mut text = self.stdout.lock().unwrap().join("\n");
        text.push_str("\n--- stderr ---\n");
        text.push_str(&self.stderr.lock().unwrap().join("\n"));
        text
    }

    /// Sends `signal` (as `kill` spells it: `-TERM`, `-KILL`, …).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_for("the process to exit", WAIT, || {
            self.child.try_wait().unwrap()
        })
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
