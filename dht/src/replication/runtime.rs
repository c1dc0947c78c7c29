//! [`Replication`]: a node's side of replication, started before the node serves clients.
//!
//! Start-up order matters:
//! 1. **Catch up.** Consume the node's queue one message at a time and send a
//!    [`CatchUpMarker`] to it; when the marker comes back, everything the other replicas
//!    accepted in this node's name while it was down has been applied.
//! 2. **Receive.** Keep applying what arrives on the queue, several messages at once (order
//!    does not matter).
//! 3. **Send.** Ship the outbox, starting with what an earlier run left unsent.
//!
//! Only then does the node open its port.

use super::apply::apply_message;
use super::message::{CatchUpMarker, Replicate};
use super::outbox::{
    DEFAULT_BROKER_MAX_MESSAGE_BYTES, MIN_BROKER_MAX_MESSAGE_BYTES, ReplicationOutbox,
};
use crate::cluster::queue_name;
use crate::routing::Topology;
use crate::shutdown::{self, ShutdownTrigger};
use crate::storage::{Storage, StorageError};
use rhinobus::transport::Transport;
use rhinobus::{BusError, Context, Endpoint, HandlerError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// Makes a fresh transport for the options it is given, which it may follow (the RabbitMQ
/// one takes [`ReplicationOptions::max_message_bytes`] from them, whatever they were changed
/// to after it was made). Replication needs two in turn: one for catching up, one for the
/// running node.
///
/// Still needed although endpoints sharing a `RabbitMq` now keep its connection open for each
/// other (rhinobus 8a8e1ea): the catch-up endpoint must stop before the running one starts
/// (both consuming the node's queue at once would let messages queued before the marker be
/// applied after it came back), so it is the *last* endpoint on its transport when it stops,
/// and that closes the transport for good.
pub type TransportFactory = Arc<dyn Fn(&ReplicationOptions) -> Arc<dyn Transport> + Send + Sync>;

/// How a node replicates.
#[derive(Clone)]
pub struct ReplicationOptions {
    /// This node's name in the topology.
    pub node: String,
    /// Where the replication queues live.
    pub transport: TransportFactory,
    /// Replication messages applied at once after catch-up.
    pub concurrency: u16,
    /// Where replication messages that cannot be applied go.
    pub error_queue: String,
    /// How long a write's replication may wait for a message's worth of changes before it
    /// goes with fewer: throughput against replication lag (see
    /// [`ReplicationOutbox::run_senders`]).
    pub linger: Duration,
    /// The largest message the broker takes (its `max_message_size`), at least
    /// [`MIN_BROKER_MAX_MESSAGE_BYTES`]: messages stay within it, and a write with a value too
    /// long to travel in one is refused (see [`ReplicationOutbox::stage`]).
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for ReplicationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationOptions")
            .field("node", &self.node)
            .field("concurrency", &self.concurrency)
            .field("error_queue", &self.error_queue)
            .field("linger", &self.linger)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl ReplicationOptions {
    /// Options for node `node` over RabbitMQ at `amqp_url`.
    pub fn rabbitmq(node: impl Into<String>, amqp_url: impl Into<String>) -> Self {
        let node = node.into();
        let url = amqp_url.into();
        let name = format!("rhinobus-dht:{node}:{}", std::process::id());
        Self {
            node,
            transport: Arc::new(move |options: &ReplicationOptions| {
                Arc::new(
                    rhinobus::transport::RabbitMq::new(url.clone())
                        .connection_name(name.clone())
                        .max_message_bytes(options.max_message_bytes),
                ) as Arc<dyn Transport>
            }),
            concurrency: 4,
            error_queue: "rhinobus-dht.error".into(),
            linger: super::outbox::DEFAULT_LINGER,
            max_message_bytes: DEFAULT_BROKER_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The node is not in the topology.
    #[error("node {0:?} is not in the topology")]
    UnknownNode(String),
    /// The broker could not be reached or refused the queues.
    #[error("replication over the bus: {0}")]
    Bus(#[from] BusError),
    /// The outbox could not be read.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Catch-up ended before its marker came back.
    #[error("catch-up stopped before the queue was drained")]
    CatchUpInterrupted,
    /// [`ReplicationOptions::max_message_bytes`] is below [`MIN_BROKER_MAX_MESSAGE_BYTES`].
    #[error(
        "a broker taking messages of at most {bytes} bytes cannot carry every change: at least \
         {min} are needed"
    )]
    MessageLimitTooSmall {
        /// The limit given.
        bytes: usize,
        /// The least limit a node takes.
        min: usize,
    },
}

/// A node's running replication: its queue's endpoint and the outbox senders.
pub struct Replication {
    outbox: ReplicationOutbox,
    endpoint: Endpoint,
    stop: ShutdownTrigger,
    senders: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

type MarkerWaiter = Arc<Mutex<Option<(String, oneshot::Sender<()>)>>>;

fn endpoint_builder(
    storage: &Storage,
    options: &ReplicationOptions,
    concurrency: u16,
    waiter: MarkerWaiter,
) -> rhinobus::EndpointBuilder {
    let applier = storage.clone();
    Endpoint::builder_shared(queue_name(&options.node), (options.transport)(options))
        .concurrency(concurrency)
        .error_queue(options.error_queue.clone())
        .handle(move |m: Replicate, _ctx: Context| {
            let storage = applier.clone();
            async move {
                // Clients' writes to this node wait for the turn as parked tasks while the
                // message is applied, not as threads blocked on the lock.
                let from = m.from.clone();
                let changed = storage
                    .long_write_in_turns(move |s, turn| apply_message(s, &m, turn))
                    .await
                    .map_err(HandlerError::msg)??;
                tracing::trace!(%from, changed, "replication applied");
                Ok::<_, HandlerError>(())
            }
        })
        .handle(move |m: CatchUpMarker, _ctx: Context| {
            let waiter = waiter.clone();
            async move {
                let mut w = waiter.lock().unwrap_or_else(PoisonError::into_inner);
                if w.as_ref().is_some_and(|(token, _)| *token == m.token)
                    && let Some((_, done)) = w.take()
                {
                    let _ = done.send(());
                }
                // Markers of earlier lives are simply consumed.
                Ok::<_, HandlerError>(())
            }
        })
}

impl Replication {
    /// Catches up with the node's queue, then starts receiving and sending. Returns once the
    /// node may serve clients.
    pub async fn start(
        storage: Storage,
        topology: Arc<Topology>,
        options: ReplicationOptions,
    ) -> Result<Self, ReplicationError> {
        if topology.index_of(&options.node).is_none() {
            return Err(ReplicationError::UnknownNode(options.node));
        }
        if options.max_message_bytes < MIN_BROKER_MAX_MESSAGE_BYTES {
            return Err(ReplicationError::MessageLimitTooSmall {
                bytes: options.max_message_bytes,
                min: MIN_BROKER_MAX_MESSAGE_BYTES,
            });
        }
        Self::catch_up(&storage, &options).await?;
        let no_markers: MarkerWaiter = Arc::default();
        let endpoint = endpoint_builder(&storage, &options, options.concurrency.max(1), no_markers)
            .start()
            .await?;
        let outbox = {
            let storage = storage.clone();
            let node = options.node.clone();
            let topology = topology.clone();
            let limit = options.max_message_bytes;
            tokio::task::spawn_blocking(move || {
                ReplicationOutbox::open_for_broker(storage, &node, topology, limit)
            })
            .await
            .map_err(|e| StorageError::Corrupt {
                what: "outbox",
                detail: format!("loading task failed: {e}"),
            })??
        };
        let (stop, stopped) = shutdown::channel();
        let senders = {
            let outbox = outbox.clone();
            let bus = endpoint.bus();
            let linger = options.linger;
            tokio::spawn(async move { outbox.run_senders(bus, stopped, linger).await })
        };
        Ok(Self {
            outbox,
            endpoint,
            stop,
            senders,
        })
    }

    /// Applies everything queued for this node, one message at a time, until the marker it
    /// sends itself comes back.
    async fn catch_up(
        storage: &Storage,
        options: &ReplicationOptions,
    ) -> Result<(), ReplicationError> {
        let token = uuid::Uuid::now_v7().to_string();
        let (done, caught_up) = oneshot::channel();
        let waiter: MarkerWaiter = Arc::new(Mutex::new(Some((token.clone(), done))));
        // One at a time: when the marker is handled, everything queued before it is applied.
        let endpoint = endpoint_builder(storage, options, 1, waiter)
            .start()
            .await?;
        let sent = endpoint
            .bus()
            .send(
                &queue_name(&options.node),
                &CatchUpMarker {
                    node: options.node.clone(),
                    token,
                },
            )
            .await;
        let result = match sent {
            Ok(_) => caught_up
                .await
                .map_err(|_| ReplicationError::CatchUpInterrupted),
            Err(e) => Err(e.into()),
        };
        endpoint.shutdown().await;
        if result.is_ok() {
            tracing::info!(node = %options.node, "caught up with the replication queue");
        }
        result
    }

    /// The outbox that writes stage their replication in.
    pub fn outbox(&self) -> &ReplicationOutbox {
        &self.outbox
    }

    /// Stops sending and receiving. Unsent records stay in the outbox for the next start.
    pub async fn shutdown(self) {
        self.stop.trigger();
        let _ = self.senders.await;
        self.endpoint.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhinobus::transport::{Destination, OutgoingMessage};

    /// The transport refuses, before it connects, a message bigger than the broker takes,
    /// the limit set after the options were made.
    #[tokio::test]
    async fn the_rabbitmq_transport_takes_the_brokers_limit_from_the_options() {
        let options = ReplicationOptions {
            max_message_bytes: MIN_BROKER_MAX_MESSAGE_BYTES,
            // Nothing listens there: the size is checked first.
            ..ReplicationOptions::rabbitmq("n1", "amqp://127.0.0.1:1")
        };
        let transport = (options.transport)(&options);
        let message = OutgoingMessage {
            destination: Destination::Queue("q".into()),
            headers: Default::default(),
            body: vec![0; MIN_BROKER_MAX_MESSAGE_BYTES + 1],
        };
        let sent = transport.send(vec![message]).await;
        assert!(matches!(sent, Err(BusError::Invalid(_))), "{sent:?}");
    }
}
