//! Starting the real `rhinobus-dht node` binary for integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_rhinobus-dht");

/// A node child process on a port of its own choosing; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub addr: String,
}

impl NodeProcess {
    /// Starts a node on `data` with extra arguments, listening on a free port unless `extra`
    /// says `--listen`.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(BIN)
            .arg("node")
            .arg("--data")
            .arg(data)
            .args(listen)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start rhinobus-dht node");
        let stdout = child.stdout.take().expect("node stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the node's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from node: {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    /// Sends a signal by name (TERM, INT, KILL) and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        self.child.wait().expect("wait for node")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI against `addr`; returns (exit code, stdout, stderr).
pub fn cli(addr: &str, args: &[&str], secret: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["--node", addr]).args(args);
    cmd.env_remove("RHINOBUS_DHT_SECRET");
    if let Some(s) = secret {
        cmd.env("RHINOBUS_DHT_SECRET", s);
    }
    let out = cmd.output().expect("run rhinobus-dht");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn temp_data() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    (dir, data)
}

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`) until [`start_again`], or until
/// dropped: a failing test must not leave the broker down for the tests after it.
///
/// [`start_again`]: BrokerStopped::start_again
pub struct BrokerStopped {
    started: bool,
}

impl BrokerStopped {
    pub fn now() -> Self {
        rabbitmqctl("stop_app");
        Self { started: false }
    }

    /// Starts the broker and waits until it answers.
    pub fn start_again(mut self) {
        rabbitmqctl("start_app");
        rabbitmqctl("await_startup");
        self.started = true;
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            // Unwinding already: no second panic, just the best try.
            let _ = Command::new("rabbitmqctl").arg("start_app").output();
        }
    }
}

fn rabbitmqctl(command: &str) {
    let out = Command::new("rabbitmqctl")
        .arg(command)
        .output()
        .expect("rabbitmqctl must be on PATH for the broker-restart test");
    assert!(
        out.status.success(),
        "rabbitmqctl {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
