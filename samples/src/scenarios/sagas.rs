//! `saga-optimistic` and `saga-merging`: the `bus` scenario's stream, each message updating
//! its own saga instance (distinct sagas: no contention), with the state in a one-node
//! rhinobus-dht served from this process over loopback TCP. Per message: a DHT get, the
//! handler, a DHT put (optimistic, or listing every sibling), then the bus's ack.

use crate::cpu::CpuClock;
use crate::node::InProcessNode;
use crate::report::{Latencies, Report};
use crate::scenarios::amqp::{Load, delete_queues};
use crate::tally::{TallyMerger, TallySaga, TallyUpdate};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rhinobus::transport::RabbitMq;
use rhinobus::{Bus, Context, Endpoint, HandlerError};
use rhinobus_dht::{Client, ClientOptions, Durability};
use rhinobus_sagas::{Persister, SagaEndpointExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

type BenchError = Box<dyn std::error::Error>;

/// Sends waiting for their confirm at once, as in the `bus` scenario.
const PUBLISH_WINDOW: usize = 1024;
/// Connections from the endpoint to the DHT node.
const DHT_CONNECTIONS: usize = 4;

/// Which persister a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersisterKind {
    /// Optimistic concurrency.
    Optimistic,
    /// Merging of siblings.
    Merging,
}

struct Receipts {
    start: Instant,
    expected: u64,
    seen: Mutex<(u64, Latencies)>,
    all_in: Notify,
}

impl Receipts {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn received(&self, sent_at_micros: u64) {
        let latency = Duration::from_micros(self.micros().saturating_sub(sent_at_micros));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.0 += 1;
        seen.1.record(latency);
        if seen.0 == self.expected {
            self.all_in.notify_one();
        }
    }
}

/// Runs one saga scenario on RabbitMQ at `load.amqp_url`.
pub async fn saga_rabbitmq(load: &Load, kind: PersisterKind) -> Result<Report, BenchError> {
    let scenario = match kind {
        PersisterKind::Optimistic => "saga-optimistic",
        PersisterKind::Merging => "saga-merging",
    };
    let node = InProcessNode::start(Durability::Buffered)
        .await
        .map_err(|e| e as BenchError)?;
    let client = Client::connect_with(
        [node.addr.clone()],
        ClientOptions::default().connections_per_node(DHT_CONNECTIONS),
    )
    .await?;
    let persister = match kind {
        PersisterKind::Optimistic => Persister::optimistic(client),
        PersisterKind::Merging => Persister::merging(client, TallyMerger),
    };
    let run = uuid::Uuid::now_v7().simple().to_string();
    let endpoint = format!("bench-{scenario}-{run}");
    let receipts = Arc::new(Receipts {
        start: Instant::now(),
        expected: load.messages,
        seen: Mutex::new((0, Latencies::with_capacity(load.messages as usize))),
        all_in: Notify::new(),
    });
    let handled = receipts.clone();
    let ep = Endpoint::builder(endpoint.as_str(), RabbitMq::new(&load.amqp_url))
        .concurrency(load.concurrency)
        .error_queue(format!("{endpoint}-error"))
        .saga(TallySaga::default(), persister)
        // Runs after the saga's handler succeeded: counts the message as done.
        .handle(move |m: TallyUpdate, _: Context| {
            let handled = handled.clone();
            async move {
                handled.received(m.sent_at_micros);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await?;
    let sender = Bus::new(
        RabbitMq::new(&load.amqp_url).connection_name(format!("{endpoint}-sender")),
        format!("{endpoint}-sender"),
    );
    let clock = CpuClock::start_with_broker(&load.amqp_url);
    let mut sends = FuturesUnordered::new();
    for n in 0..load.messages {
        if sends.len() >= PUBLISH_WINDOW {
            sends.next().await.expect("non-empty")?;
        }
        let message = TallyUpdate {
            tally: format!("{run}-{n}"),
            update: n,
            sent_at_micros: receipts.micros(),
        };
        let (sender, endpoint) = (&sender, endpoint.as_str());
        sends.push(async move { sender.send(endpoint, &message).await });
    }
    while let Some(s) = sends.next().await {
        s?;
    }
    receipts.all_in.notified().await;
    let elapsed = receipts.start.elapsed();
    let cpu = clock.stop();
    let latencies = std::mem::take(&mut receipts.seen.lock().unwrap_or_else(|p| p.into_inner()).1);
    ep.shutdown().await;
    node.stop().await.map_err(|e| e as BenchError)?;
    delete_queues(&load.amqp_url, &[&endpoint, &format!("{endpoint}-error")]).await?;
    Ok(Report::new(scenario, load.messages, elapsed, latencies)
        .with_cpu(&cpu)
        .with("concurrency", load.concurrency)
        .with("dht_nodes", 1))
}
