//! Support for the cross-crate integration tests: reaching RabbitMQ (or failing loudly when it
//! cannot be reached), unique names, raw AMQP access and `rabbitmqctl`.

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rhinobus::{Context, Handler, HandlerError, Message};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// The RabbitMQ the tests use: `RHINOBUS_AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("RHINOBUS_AMQP_URL")
        .unwrap_or_else(|_| rhinobus::transport::DEFAULT_AMQP_URL.into())
}

/// The message the bus tests send: a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub n: u32,
}

impl Message for Work {
    const NAME: &'static str = "tests.work";
}

/// A [`Work`] handler that reports the number of every message it handles.
pub struct ReportWork(pub tokio::sync::mpsc::UnboundedSender<u32>);

#[async_trait::async_trait]
impl Handler<Work> for ReportWork {
    async fn handle(&self, work: Work, _: Context) -> Result<(), HandlerError> {
        self.0.send(work.n)?;
        Ok(())
    }
}

/// An endpoint on `queue`, failing to `error`, that reports the number of every [`Work`] it
/// handles.
pub async fn reporting(
    queue: &str,
    error: &str,
) -> (
    rhinobus::Endpoint,
    tokio::sync::mpsc::UnboundedReceiver<u32>,
) {
    let (tx, handled) = tokio::sync::mpsc::unbounded_channel();
    let endpoint =
        rhinobus::Endpoint::builder(queue, rhinobus::transport::RabbitMq::new(amqp_url()))
            .error_queue(error)
            .handle(ReportWork(tx))
            .start()
            .await
            .expect("start");
    (endpoint, handled)
}

/// The next thing a handler reported, or a panic when none came within 20 seconds.
pub async fn recv<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("timed out waiting for a handler")
        .expect("channel open")
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("test-{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A raw AMQP connection for setting up and inspecting queues around the code under test.
/// Panics with a clear message when RabbitMQ cannot be reached: a test that needs the broker
/// must fail, never pass quietly.
pub struct Raw {
    pub connection: Connection,
    pub channel: Channel,
    created: Vec<String>,
}

impl Raw {
    pub async fn connect() -> Raw {
        let url = amqp_url();
        let connection = match tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(
                &url,
                ConnectionProperties::default().with_connection_name("rhinobus-tests:raw".into()),
            ),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "these tests need RabbitMQ at {url} (set RHINOBUS_AMQP_URL; `bash .ci/run` starts one): {e}"
            ),
            Err(_) => panic!("these tests need RabbitMQ at {url}: no answer within 10 s"),
        };
        let channel = connection.create_channel().await.expect("open a channel");
        // So that `publish` returns once the broker holds the message: without confirms a
        // test's burst of publishes can still be on its way when the code under test looks
        // at the queue (a replay then saw 528 of 700 messages).
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Raw {
            connection,
            channel,
            created: Vec::new(),
        }
    }

    /// Declares a durable queue that is deleted by [`Raw::cleanup`].
    pub async fn queue(&mut self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        self.forget_later(name);
    }

    /// A unique endpoint queue (declared) and a unique error queue (left to the endpoint to
    /// declare), both deleted at clean-up.
    pub async fn endpoint_queues(&mut self, prefix: &str) -> (String, String) {
        let (queue, error) = (unique(prefix), unique("error"));
        self.queue(&queue).await;
        self.forget_later(&error);
        (queue, error)
    }

    /// Deletes this queue too at clean-up (queues the code under test declared).
    pub fn forget_later(&mut self, name: &str) {
        self.created.push(name.to_owned());
    }

    /// Publishes raw bytes with raw headers, as a foreign client would.
    pub async fn publish(&self, queue: &str, body: &[u8], headers: FieldTable) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Takes every message now in `queue` (acking them), with text headers and body.
    pub async fn drain(&self, queue: &str) -> Vec<(BTreeMap<String, String>, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let headers = rhinobus::transport::RabbitMq::headers_of(&m.delivery.properties);
            out.push((headers, m.delivery.data.clone()));
        }
        out
    }

    /// Waits until `queue` holds `n` messages (or panics after `within`).
    pub async fn wait_for_count(&self, queue: &str, n: u32, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let count = self.count(queue).await;
            if count >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue {queue} holds {count} messages, expected {n} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many ready messages a queue holds.
    pub async fn count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
    }

    /// Deletes every queue this test created or registered.
    pub async fn cleanup(self) {
        for q in &self.created {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Runs `rabbitmqctl` and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be on PATH for the fault-injection tests");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The broker-side ids (pids, as `close_connection` takes them) of the connections whose
/// client-given name contains `needle`.
pub fn connections_named(needle: &str) -> Vec<String> {
    // The plain listing prints pids in the form close_connection accepts (JSON does not).
    rabbitmqctl(&["list_connections", "pid", "client_properties", "-q"])
        .lines()
        .filter(|line| line.contains(needle))
        .filter_map(|line| line.split('\t').next())
        .map(str::to_owned)
        .collect()
}

/// How many messages of `queue` were delivered to a consumer and not yet acknowledged.
pub fn unacknowledged(queue: &str) -> u32 {
    rabbitmqctl(&["list_queues", "name", "messages_unacknowledged", "-q"])
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("queue {queue} is not on the broker"))
}

/// The `rhinobus` binary built alongside these tests (`cargo test --workspace` builds it).
pub fn rhinobus_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join(format!("rhinobus{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p rhinobus` first)",
        bin.display()
    );
    bin
}

/// Runs `rhinobus ARGS` against the test broker; returns (exit success, stdout, stderr).
pub fn rhinobus_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(rhinobus_bin())
        .args(args)
        .env("RHINOBUS_AMQP_URL", amqp_url())
        .output()
        .expect("run rhinobus");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `rabbitmqctl` with its arguments when dropped, even by a failing test: the clean-up of
/// a broker object (a user, a virtual host, a policy) a test created.
pub struct RabbitmqctlOnDrop(Vec<String>);

impl RabbitmqctlOnDrop {
    /// Runs `rabbitmqctl ARGS` on drop.
    pub fn new(args: &[&str]) -> Self {
        Self(args.iter().map(|a| a.to_string()).collect())
    }
}

impl Drop for RabbitmqctlOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(&self.0).output();
    }
}
