//! [`Endpoint`]: a queue, its handlers and subscriptions, and the loop that feeds them.

use crate::behavior::Behavior;
use crate::bus::Bus;
use crate::error::BusError;
use crate::handler::{Handler, Handlers};
use crate::message::Message;
use crate::pipeline::Pipeline;
use crate::recoverability::{DelayedRetries, Recoverability};
use crate::transport::{Deliveries, EndpointTopology, Transport};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Configures an endpoint; [`EndpointBuilder::start`] declares its topology and starts it.
pub struct EndpointBuilder {
    name: String,
    transport: Arc<dyn Transport>,
    concurrency: u16,
    handlers: Handlers,
    behaviors: Vec<Arc<dyn Behavior>>,
    subscriptions: BTreeSet<String>,
    recoverability: Recoverability,
    audit_queue: Option<String>,
}

impl std::fmt::Debug for EndpointBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointBuilder")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("subscriptions", &self.subscriptions)
            .field("recoverability", &self.recoverability)
            .field("audit_queue", &self.audit_queue)
            .finish_non_exhaustive()
    }
}

impl EndpointBuilder {
    /// How many messages are handled at once (default 8). The broker's prefetch is the same,
    /// so no more messages than that are taken from the queue ahead of time.
    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n;
        self
    }

    /// Adds a handler for messages of type `M`. Several handlers for one type all run, in the
    /// order they were added, and the message counts as handled only when all succeeded.
    pub fn handle<M: Message, H: Handler<M>>(mut self, handler: H) -> Self {
        self.handlers.add::<M, H>(handler);
        self
    }

    /// Runs `behavior` around every attempt at handling a message here (see
    /// [`Behavior`]). The first added is the outermost: it runs first and finishes last.
    pub fn wrap(mut self, behavior: impl Behavior) -> Self {
        self.behaviors.push(Arc::new(behavior));
        self
    }

    /// Receives every publication of `M`. Its handlers must be added with
    /// [`EndpointBuilder::handle`], or the publications go to the error queue.
    pub fn subscribe<M: Message>(mut self) -> Self {
        self.subscriptions.insert(M::NAME.to_owned());
        self
    }

    /// Replaces the whole recoverability policy.
    pub fn recoverability(mut self, policy: Recoverability) -> Self {
        self.recoverability = policy;
        self
    }

    /// Immediate retries after the first attempt (default 5; 0 disables them).
    pub fn immediate_retries(mut self, n: u32) -> Self {
        self.recoverability.immediate_retries = n;
        self
    }

    /// Turns on delayed retries.
    pub fn delayed_retries(mut self, policy: DelayedRetries) -> Self {
        self.recoverability.delayed_retries = Some(policy);
        self
    }

    /// Conflict re-runs before a conflict counts as a failure (default 100).
    pub fn conflict_retries(mut self, n: u32) -> Self {
        self.recoverability.conflict_retries = n;
        self
    }

    /// Takes every handler error of Rust type `E` (returned with `?`, or as
    /// [`HandlerError::unrecoverable`](crate::HandlerError::unrecoverable) does) as one that no
    /// retry can mend: the message goes to the error queue at once, without immediate or
    /// delayed retries, as NServiceBus's unrecoverable exceptions do.
    ///
    /// ```
    /// # use rhinobus::{Endpoint, transport::InMemory};
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("invalid order: {0}")]
    /// struct InvalidOrder(String);
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), rhinobus::BusError> {
    /// let endpoint = Endpoint::builder("orders", InMemory::new())
    ///     .unrecoverable::<InvalidOrder>()
    ///     .start()
    ///     .await?;
    /// # endpoint.shutdown().await; Ok(()) }
    /// ```
    pub fn unrecoverable<E: std::error::Error + 'static>(mut self) -> Self {
        self.recoverability
            .unrecoverable
            .push(std::any::TypeId::of::<E>());
        self
    }

    /// The error queue (default `error`).
    pub fn error_queue(mut self, name: impl Into<String>) -> Self {
        self.recoverability.error_queue = name.into();
        self
    }

    /// Copies every message this endpoint handles into `queue` (declared, durable, as the
    /// endpoint starts), as Rhino Service Bus's message logging and NServiceBus's audit queue
    /// do: a record of what was processed, where and when, that `rhinobus errors --queue
    /// QUEUE` lists, shows and replays (to the queue that handled it) like an error queue.
    ///
    /// The copy is the message byte for byte plus the `rhinobus-processing-*` headers
    /// ([`names::PROCESSING_ENDPOINT`](crate::headers::names::PROCESSING_ENDPOINT) and the
    /// others). It is made once the handlers succeeded and what they sent was confirmed, and
    /// the message leaves its queue only once the broker confirmed the copy. If the broker does
    /// not take the copy (the queue was deleted, a length limit refuses it), the message goes
    /// to the error queue instead, with the failure reason `audit`, rather than being handled
    /// again and again.
    ///
    /// ```
    /// use rhinobus::{Context, Endpoint, HandlerError, Message, headers::names, transport::InMemory};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Ping;
    /// impl Message for Ping { const NAME: &'static str = "demo.ping"; }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), rhinobus::BusError> {
    /// let broker = InMemory::new();
    /// let endpoint = Endpoint::builder("pinged", broker.clone())
    ///     .audit_queue("audit")
    ///     .handle(|_: Ping, _: Context| async { Ok::<_, HandlerError>(()) })
    ///     .start()
    ///     .await?;
    /// endpoint.bus().send("pinged", &Ping).await?;
    /// let mut copy = None;
    /// for _ in 0..1_000 {
    ///     copy = broker.take("audit");
    ///     if copy.is_some() { break; }
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// let (headers, _body) = copy.expect("audited within 5 s");
    /// assert_eq!(headers[names::PROCESSING_ENDPOINT], "pinged");
    /// endpoint.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn audit_queue(mut self, queue: impl Into<String>) -> Self {
        self.audit_queue = Some(queue.into());
        self
    }

    /// Declares the topology and starts consuming.
    pub async fn start(self) -> Result<Endpoint, BusError> {
        if self.name.is_empty() {
            return Err(BusError::Config("an endpoint needs a name".into()));
        }
        if self.concurrency == 0 {
            return Err(BusError::Config("concurrency must be at least 1".into()));
        }
        if self.recoverability.error_queue == self.name {
            return Err(BusError::Config(
                "the error queue cannot be the endpoint's own queue".into(),
            ));
        }
        let queue = self.name.clone();
        let delay_queues = self.recoverability.delay_queues(&queue);
        if let Some(audit) = &self.audit_queue
            && (audit.is_empty()
                || *audit == queue
                || *audit == self.recoverability.error_queue
                || delay_queues.iter().any(|d| d.name == *audit))
        {
            return Err(BusError::Config(format!(
                "the audit queue {audit:?} must have a name, and not that of the endpoint's own \
                 queue, its error queue or one of its delay queues"
            )));
        }
        let topology = EndpointTopology {
            endpoint: self.name.clone(),
            queue: queue.clone(),
            subscriptions: self.subscriptions.into_iter().collect(),
            error_queue: self.recoverability.error_queue.clone(),
            audit_queue: self.audit_queue.clone(),
            delay_queues: delay_queues.clone(),
            prefetch: self.concurrency,
            queue_expires: None,
        };
        let stop = CancellationToken::new();
        let deliveries = self.transport.start(&topology, stop.clone()).await?;
        let bus = Bus::from_shared(self.transport.clone(), self.name.clone());
        info!(
            endpoint = %self.name,
            concurrency = self.concurrency,
            handled = ?self.handlers.types().collect::<Vec<_>>(),
            subscriptions = ?topology.subscriptions,
            "endpoint started"
        );
        let pipeline = Arc::new(Pipeline {
            bus: bus.clone(),
            handlers: self.handlers,
            behaviors: self.behaviors,
            policy: self.recoverability,
            queue,
            delay_queues,
            audit_queue: self.audit_queue,
            host: crate::pipeline::this_process(),
        });
        let done = tokio::spawn(receive(
            pipeline,
            deliveries,
            usize::from(self.concurrency),
            stop.clone(),
            self.transport,
        ));
        Ok(Endpoint {
            name: self.name,
            bus,
            stop,
            done,
        })
    }
}

/// A running endpoint.
///
/// ```
/// use rhinobus::{Context, Endpoint, HandlerError, Message, transport::InMemory};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping { n: u32 }
/// impl Message for Ping { const NAME: &'static str = "demo.ping"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rhinobus::BusError> {
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let endpoint = Endpoint::builder("pinged", InMemory::new())
///     .handle(move |ping: Ping, _ctx: Context| {
///         let tx = tx.clone();
///         async move {
///             tx.send(ping.n)?;
///             Ok::<_, HandlerError>(())
///         }
///     })
///     .start()
///     .await?;
/// endpoint.bus().send("pinged", &Ping { n: 42 }).await?;
/// assert_eq!(rx.recv().await, Some(42));
/// endpoint.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    bus: Bus,
    stop: CancellationToken,
    done: JoinHandle<()>,
}

/// Stops an endpoint from anywhere: the endpoint stops taking messages, lets the ones in
/// flight finish, and closes its connection.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

impl Endpoint {
    /// Starts configuring an endpoint named `name`, whose input queue is also `name`.
    pub fn builder(name: impl Into<String>, transport: impl Transport) -> EndpointBuilder {
        Self::builder_shared(name, Arc::new(transport))
    }

    /// [`Endpoint::builder`] with a transport shared with other endpoints or buses.
    pub fn builder_shared(
        name: impl Into<String>,
        transport: Arc<dyn Transport>,
    ) -> EndpointBuilder {
        EndpointBuilder {
            name: name.into(),
            transport,
            concurrency: 8,
            handlers: Handlers::default(),
            behaviors: Vec::new(),
            subscriptions: BTreeSet::new(),
            recoverability: Recoverability::default(),
            audit_queue: None,
        }
    }

    /// The endpoint's name (and input queue).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A bus that sends in this endpoint's name: replies come back to it.
    pub fn bus(&self) -> Bus {
        self.bus.clone()
    }

    /// A handle that shuts the endpoint down from elsewhere (another task, a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Stops taking messages, waits for those in flight to finish and be settled, and closes
    /// the connection. Messages taken from the broker but not started go back to the queue.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.stopped().await;
    }

    /// Waits until the endpoint has stopped (after a [`ShutdownHandle::shutdown`]).
    pub async fn stopped(self) {
        let _ = self.done.await;
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        info!(endpoint = %self.name, "signal received; shutting down");
        self.shutdown().await;
    }
}

/// Waits for SIGINT or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Takes deliveries while there is room, and hands each to the pipeline on its own task.
async fn receive(
    pipeline: Arc<Pipeline>,
    mut deliveries: Deliveries,
    concurrency: usize,
    stop: CancellationToken,
    transport: Arc<dyn Transport>,
) {
    let room = Arc::new(Semaphore::new(concurrency));
    let in_flight = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = room.clone().acquire_owned() => p.expect("never closed"),
        };
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let pipeline = pipeline.clone();
        in_flight.spawn(async move {
            pipeline.process(delivery).await;
            drop(permit);
        });
    }
    // Deliveries buffered but not started go back to their queue as they are dropped.
    drop(deliveries);
    in_flight.close();
    in_flight.wait().await;
    transport.close().await;
    info!(endpoint = %pipeline.bus.endpoint(), "endpoint stopped");
}
