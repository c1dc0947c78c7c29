//! `raw-amqp`, `bus` and `bus-inmemory`: the same stream of persistent 256-byte messages,
//! sent with confirms and consumed with manual acks, through plain lapin (the ceiling of the
//! machine), through rhinobus on RabbitMQ, and through rhinobus in memory.

use crate::cpu::CpuClock;
use crate::report::{Latencies, Report};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rhinobus::transport::{InMemory, RabbitMq, Transport};
use rhinobus::{Bus, Context, Endpoint, HandlerError, Message};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The size of every message body.
const BODY_BYTES: usize = 256;

/// How many messages the publisher keeps waiting for a confirm at once.
const PUBLISH_WINDOW: usize = 1024;

/// The parameters every messaging scenario shares.
#[derive(Debug, Clone)]
pub struct Load {
    /// Messages to send and receive.
    pub messages: u64,
    /// Consumer concurrency (and prefetch).
    pub concurrency: u16,
    /// RabbitMQ address.
    pub amqp_url: String,
}

type BenchError = Box<dyn std::error::Error>;

/// Counts received messages and their end-to-end latencies; wakes the bench at the last one.
struct Receipts {
    start: Instant,
    expected: u64,
    latencies: Mutex<(u64, Latencies)>,
    all_in: Notify,
}

impl Receipts {
    fn new(expected: u64) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            expected,
            latencies: Mutex::new((0, Latencies::with_capacity(expected as usize))),
            all_in: Notify::new(),
        })
    }

    fn micros_since_start(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn received(&self, sent_at_micros: u64) {
        let latency =
            Duration::from_micros(self.micros_since_start().saturating_sub(sent_at_micros));
        let mut guard = self.latencies.lock().expect("not poisoned");
        guard.0 += 1;
        guard.1.record(latency);
        if guard.0 == self.expected {
            self.all_in.notify_one();
        }
    }

    async fn wait(&self) -> (Duration, Latencies) {
        self.all_in.notified().await;
        let elapsed = self.start.elapsed();
        let latencies = std::mem::take(&mut self.latencies.lock().expect("not poisoned").1);
        (elapsed, latencies)
    }
}

/// A 256-byte body that starts with the send time.
fn raw_body(sent_at_micros: u64) -> Vec<u8> {
    let mut body = vec![b'x'; BODY_BYTES];
    body[..8].copy_from_slice(&sent_at_micros.to_be_bytes());
    body
}

/// What the raw scenario's messages carry besides the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    /// Nothing but the persistent flag: the ceiling.
    Bare,
    /// As much as a rhinobus envelope: six AMQP properties of the same sizes and three
    /// headers. Shows what the envelope alone costs at the broker, without rhinobus.
    Envelope,
}

impl Metadata {
    fn properties(self) -> BasicProperties {
        let props = BasicProperties::default().with_delivery_mode(2);
        if self == Metadata::Bare {
            return props;
        }
        let uuid = "0198a0b2-1c3d-7e4f-8a9b-0c1d2e3f4a5b";
        let endpoint = "bench-bus-0198a0b21c3d7e4f8a9b0c1d2e3f4a5b-sender";
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("rhinobus-conversation-id", uuid),
            ("rhinobus-sent-at", "2026-11-22T00:00:00.000Z"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        props
            .with_message_id(uuid.into())
            .with_type("bench.message".into())
            .with_content_type("application/msgpack".into())
            .with_correlation_id(uuid.into())
            .with_reply_to(endpoint.into())
            .with_app_id(endpoint.into())
            .with_headers(headers)
    }

    fn scenario(self) -> &'static str {
        match self {
            Metadata::Bare => "raw-amqp",
            Metadata::Envelope => "raw-amqp-envelope",
        }
    }
}

/// Plain lapin: publisher confirms pipelined, manual acks, prefetch = concurrency.
pub async fn raw_amqp(load: &Load, metadata: Metadata) -> Result<Report, BenchError> {
    let queue = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let publisher = Connection::connect(&load.amqp_url, ConnectionProperties::default()).await?;
    let consumer_conn =
        Connection::connect(&load.amqp_url, ConnectionProperties::default()).await?;
    let pub_channel = publisher.create_channel().await?;
    pub_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    pub_channel
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    let channel = consumer_conn.create_channel().await?;
    channel
        .basic_qos(load.concurrency, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let receipts = Receipts::new(load.messages);
    let clock = CpuClock::start_with_broker(&load.amqp_url);
    let consuming = tokio::spawn({
        let receipts = receipts.clone();
        async move {
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                let sent = u64::from_be_bytes(delivery.data[..8].try_into().expect("8 bytes"));
                delivery.ack(BasicAckOptions::default()).await?;
                receipts.received(sent);
            }
            Ok::<_, lapin::Error>(())
        }
    });
    let mut confirms = FuturesUnordered::new();
    for _ in 0..load.messages {
        if confirms.len() >= PUBLISH_WINDOW {
            confirms.next().await.expect("non-empty")?;
        }
        let confirm = pub_channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &raw_body(receipts.micros_since_start()),
                metadata.properties(),
            )
            .await?;
        confirms.push(confirm);
    }
    while let Some(c) = confirms.next().await {
        c?;
    }
    let (elapsed, latencies) = receipts.wait().await;
    let cpu = clock.stop();
    consuming.abort();
    pub_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = publisher.close(200, "bench done".into()).await;
    let _ = consumer_conn.close(200, "bench done".into()).await;
    Ok(
        Report::new(metadata.scenario(), load.messages, elapsed, latencies)
            .with_cpu(&cpu)
            .with("concurrency", load.concurrency),
    )
}

/// The bench message: the send time and a filler that makes the body about 256 bytes.
#[derive(Serialize, Deserialize)]
struct BenchMessage {
    sent_at_micros: u64,
    filler: String,
}

impl Message for BenchMessage {
    const NAME: &'static str = "bench.message";
}

/// rhinobus on RabbitMQ: a sender bus on its own connection, a no-op handler endpoint.
pub async fn bus_rabbitmq(load: &Load) -> Result<Report, BenchError> {
    bus_on_rabbitmq("bus", load, false).await
}

/// `bus` with an audit queue: every handled message is also copied there.
pub async fn bus_audit(load: &Load) -> Result<Report, BenchError> {
    bus_on_rabbitmq("bus-audit", load, true).await
}

async fn bus_on_rabbitmq(scenario: &str, load: &Load, audit: bool) -> Result<Report, BenchError> {
    let endpoint = format!("bench-{scenario}-{}", uuid::Uuid::now_v7().simple());
    let audit = audit.then(|| format!("{endpoint}-audit"));
    let report = bus_scenario(
        scenario,
        load,
        &endpoint,
        audit.as_deref(),
        RabbitMq::new(&load.amqp_url),
        RabbitMq::new(&load.amqp_url).connection_name(format!("{endpoint}-sender")),
        Some(&load.amqp_url),
    )
    .await;
    let error = format!("{endpoint}-error");
    let queues = [Some(&endpoint), Some(&error), audit.as_ref()];
    let queues: Vec<&str> = queues.into_iter().flatten().map(String::as_str).collect();
    delete_queues(&load.amqp_url, &queues).await?;
    report
}

/// rhinobus on the in-memory transport.
pub async fn bus_inmemory(load: &Load) -> Result<Report, BenchError> {
    let broker = InMemory::new();
    bus_scenario(
        "bus-inmemory",
        load,
        "bench-bus",
        None,
        broker.clone(),
        broker,
        None,
    )
    .await
}

async fn bus_scenario(
    scenario: &str,
    load: &Load,
    endpoint: &str,
    audit: Option<&str>,
    receiving: impl Transport,
    sending: impl Transport,
    broker: Option<&str>,
) -> Result<Report, BenchError> {
    let receipts = Receipts::new(load.messages);
    let handled = receipts.clone();
    let mut builder = Endpoint::builder(endpoint, receiving)
        .concurrency(load.concurrency)
        .error_queue(format!("{endpoint}-error"))
        .handle(move |m: BenchMessage, _: Context| {
            handled.received(m.sent_at_micros);
            async { Ok::<_, HandlerError>(()) }
        });
    if let Some(audit) = audit {
        builder = builder.audit_queue(audit);
    }
    let ep = builder.start().await?;
    let sender = Bus::new(sending, format!("{endpoint}-sender"));
    let clock = broker.map_or_else(CpuClock::start, CpuClock::start_with_broker);
    let filler = "x".repeat(BODY_BYTES - 48);
    // Like raw-amqp: one task keeps a window of sends waiting for their confirms.
    let mut sends = FuturesUnordered::new();
    for _ in 0..load.messages {
        if sends.len() >= PUBLISH_WINDOW {
            sends.next().await.expect("non-empty")?;
        }
        let message = BenchMessage {
            sent_at_micros: receipts.micros_since_start(),
            filler: filler.clone(),
        };
        let sender = &sender;
        sends.push(async move { sender.send(endpoint, &message).await });
    }
    while let Some(s) = sends.next().await {
        s?;
    }
    let (elapsed, latencies) = receipts.wait().await;
    let cpu = clock.stop();
    ep.shutdown().await;
    Ok(Report::new(scenario, load.messages, elapsed, latencies)
        .with_cpu(&cpu)
        .with("concurrency", load.concurrency))
}

/// Deletes the queues a scenario declared.
pub(crate) async fn delete_queues(url: &str, queues: &[&str]) -> Result<(), BenchError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    for q in queues {
        channel
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}
