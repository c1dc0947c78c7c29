//! The RabbitMQ transport (lapin): one connection per transport, kept alive by a supervisor
//! that reconnects with back-off and restores the topology and consumers.
//!
//! Topology, declared idempotently when an endpoint starts and after every reconnect:
//! - a durable topic exchange (`rhinobus` by default) that publications go through, with the
//!   message type's wire name as the routing key;
//! - the endpoint's durable input queue, bound to the exchange once per subscribed type;
//! - the durable error queue, and the audit queue if there is one;
//! - one durable delay queue per delayed-retry delay (`<queue>.delay.<ms>ms`), whose messages
//!   expire after the level's delay and are dead-lettered back into the input queue;
//! - for delayed sends (see the `delay` module), once per connection: the delivery exchange
//!   and the undeliverable queue, with the endpoint's queue bound to the delivery exchange.
//!   The delay levels themselves are declared before a connection's first delayed send, which
//!   binds the queues it goes to as well.

mod acks;
pub(crate) mod amqp;
pub(crate) mod batch;
mod delay;
mod delivery;
mod publisher;

use super::{Deliveries, Destination, EndpointTopology, OutgoingMessage, Transport};
use crate::error::BusError;
use crate::headers::names;
use async_trait::async_trait;
use batch::{Publication, Routing};
use delivery::RabbitDelivery;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Event, ExchangeKind};
use publisher::Publisher;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a stopping endpoint's last deliveries may take to be settled once its handlers
/// are done (a delivery its consumer still held is given back as the consumer notices).
const SETTLE_GRACE: Duration = Duration::from_secs(1);

/// The largest message body sent by default: RabbitMQ 3's default `max_message_size`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// The default RabbitMQ address, overridden by `RHINOBUS_AMQP_URL`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The RabbitMQ transport.
///
/// ```no_run
/// use rhinobus::transport::RabbitMq;
///
/// let transport = RabbitMq::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .connection_name("billing-worker-1");
/// ```
#[derive(Clone)]
pub struct RabbitMq {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMq")
            .field("url", &redact(&self.inner.url))
            .finish_non_exhaustive()
    }
}

struct Inner {
    url: String,
    exchange: String,
    connection_name: StdMutex<Option<String>>,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    max_message_bytes: AtomicUsize,
    /// The live connection, if there is one.
    link: watch::Sender<Option<Arc<Link>>>,
    /// Consumers to restore after every reconnect.
    consumers: Mutex<Vec<ConsumerRegistration>>,
    supervisor: std::sync::Once,
    /// Wakes the supervisor when a user of the link saw it break.
    broken: Notify,
    shutdown: CancellationToken,
}

/// One live connection and its publisher.
pub(crate) struct Link {
    generation: u64,
    connection: Arc<Connection>,
    publisher: Publisher,
    /// Queues seen to exist on this connection (see [`RabbitMq::check_queues`]).
    known_queues: StdMutex<HashSet<String>>,
    /// The delay infrastructure, as far as this connection declared it.
    delays: delay::Delays,
}

struct ConsumerRegistration {
    topology: EndpointTopology,
    deliveries: mpsc::Sender<Box<dyn super::Delivery>>,
    stop: CancellationToken,
    started_on: Option<u64>,
    /// The acks of the consumer's current channel, flushed when the endpoint stops.
    acks: Option<Arc<acks::Acks>>,
}

impl ConsumerRegistration {
    /// Whether its endpoint stopped and every delivery it took is settled.
    fn finished(&self) -> bool {
        self.stop.is_cancelled() && self.acks.as_ref().is_none_or(|a| a.settled())
    }
}

impl RabbitMq {
    /// A transport for the broker at `url` (`amqp://user:pass@host:port/vhost`). Nothing
    /// connects until an endpoint starts or a message is sent.
    pub fn new(url: impl Into<String>) -> Self {
        let (link, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                url: url.into(),
                exchange: "rhinobus".into(),
                connection_name: StdMutex::new(None),
                connect_timeout: Duration::from_secs(10),
                confirm_timeout: Duration::from_secs(30),
                max_message_bytes: AtomicUsize::new(DEFAULT_MAX_MESSAGE_BYTES),
                link,
                consumers: Mutex::new(Vec::new()),
                supervisor: std::sync::Once::new(),
                broken: Notify::new(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// A transport for `RHINOBUS_AMQP_URL`, or [`DEFAULT_URL`] when it is not set.
    pub fn from_env() -> Self {
        Self::new(std::env::var("RHINOBUS_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.into()))
    }

    /// The connection name shown by `rabbitmqctl list_connections client_properties` and the
    /// management UI. Defaults to `rhinobus:<endpoint>:<pid>` for the first endpoint started.
    pub fn connection_name(self, name: impl Into<String>) -> Self {
        *self.inner.connection_name.lock().expect("not poisoned") = Some(name.into());
        self
    }

    /// The largest message body to send, to match the broker's `max_message_size`
    /// ([`DEFAULT_MAX_MESSAGE_BYTES`], RabbitMQ 3's default, unless set; RabbitMQ 4 defaults
    /// to 16 MiB). A bigger message fails at once with [`BusError::Invalid`]: the broker would
    /// close the channel over it, failing the messages published with it, and retrying would
    /// never get it through.
    ///
    /// ```no_run
    /// use rhinobus::transport::RabbitMq;
    ///
    /// let transport = RabbitMq::from_env().max_message_bytes(16 * 1024 * 1024);
    /// ```
    pub fn max_message_bytes(self, bytes: usize) -> Self {
        self.inner.max_message_bytes.store(bytes, Ordering::Relaxed);
        self
    }

    /// A message body within [`RabbitMq::max_message_bytes`], or the error saying it is not.
    fn check_size(&self, body: &[u8], destination: &str) -> Result<(), BusError> {
        let max = self.inner.max_message_bytes.load(Ordering::Relaxed);
        if body.len() <= max {
            return Ok(());
        }
        Err(BusError::Invalid(format!(
            "a message of {} bytes for {destination:?} is larger than the {max} bytes the broker \
             accepts (RabbitMq::max_message_bytes, the broker's max_message_size)",
            body.len()
        )))
    }

    /// The queue where a delayed send waits for an operator when its queue was deleted while
    /// it waited (`rhinobus.delay.undeliverable`). `rhinobus errors --queue
    /// rhinobus.delay.undeliverable replay --all` sends its messages to the queues they were
    /// meant for, once those exist again.
    pub fn undeliverable_queue(&self) -> String {
        delay::undeliverable_queue(&self.inner.exchange)
    }

    /// The envelope headers of a message received through some other AMQP client, read as
    /// rhinobus reads them: the headers table plus the envelope headers that travel as AMQP
    /// properties (message id, type, content type, correlation id, reply-to, app id).
    pub fn headers_of(props: &lapin::BasicProperties) -> crate::Headers {
        amqp::envelope_headers(props)
    }

    /// Waits for a live connection, starting the supervisor on first use.
    pub(crate) async fn link(&self) -> Result<Arc<Link>, BusError> {
        let inner = &self.inner;
        inner.supervisor.call_once(|| {
            tokio::spawn(supervise(self.inner.clone()));
        });
        let mut rx = inner.link.subscribe();
        let wait = rx.wait_for(|l| l.is_some());
        match tokio::time::timeout(inner.connect_timeout, wait).await {
            Ok(Ok(link)) => Ok(link.clone().expect("waited for some")),
            Ok(Err(_)) => Err(BusError::ShutDown),
            Err(_) => Err(BusError::Transport(format!(
                "cannot reach RabbitMQ at {} within {:?}; is it running? \
                 (set RHINOBUS_AMQP_URL to point elsewhere)",
                redact(&inner.url),
                inner.connect_timeout
            ))),
        }
    }

    /// Tells the supervisor that `link` broke, so that it reconnects now.
    fn report_broken(&self, link: &Link) {
        if self.inner.link.borrow().as_ref().map(|l| l.generation) == Some(link.generation) {
            self.inner.broken.notify_one();
        }
    }

    /// Makes a batch of sends all or nothing, as far as missing queues go: before a batch of
    /// more than one message goes out, the queues it sends to that this connection has not
    /// seen yet are looked up, and a missing one fails the batch before anything is sent. (A
    /// single message needs no check: `mandatory` returns it. A queue deleted after it was
    /// seen can still leave a batch half sent.)
    async fn check_queues(
        &self,
        link: &Link,
        publications: &[Publication],
    ) -> Result<(), BusError> {
        if publications.len() < 2 {
            return Ok(());
        }
        let unseen: Vec<String> = {
            let known = link
                .known_queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let unseen: BTreeSet<&str> = publications
                .iter()
                .filter_map(Publication::queue)
                .filter(|q| !known.contains(*q))
                .collect();
            unseen.into_iter().map(str::to_owned).collect()
        };
        if unseen.is_empty() {
            return Ok(());
        }
        if let Some(queue) = amqp::first_missing(&link.connection, &unseen).await? {
            return Err(BusError::Unroutable { queue });
        }
        link.known_queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(unseen);
        Ok(())
    }

    /// The messages as AMQP publications, their names checked, and the queues that those
    /// delayed go to.
    fn publications(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(Arc<[Publication]>, BTreeSet<String>), BusError> {
        let mut delayed = BTreeSet::new();
        let publications = messages
            .into_iter()
            .map(|mut m| {
                let delay = m.remaining_delay()?;
                let exchange = self.inner.exchange.as_str();
                let (destination, routing): (&str, _) = match &m.destination {
                    Destination::Queue(q) => (q, Routing::Required),
                    Destination::Topic(t) => (t, Routing::Optional),
                };
                self.check_size(&m.body, destination)?;
                let (exchange, routing_key): (Cow<str>, Cow<str>) = match (&m.destination, delay) {
                    (Destination::Queue(q), Some(delay)) => {
                        let (exchange, key) = delay::route(exchange, delay);
                        delayed.insert(q.clone());
                        m.headers.insert(names::DELIVER_TO.into(), q.clone());
                        (exchange.into(), key.into())
                    }
                    (Destination::Queue(q), None) => ("".into(), q.as_str().into()),
                    (Destination::Topic(t), _) => (exchange.into(), t.as_str().into()),
                };
                let mut properties = amqp::properties_for(&m.headers)?;
                // The broker drops a message left in a queue past its time. A delayed one gets
                // no TTL: the broker takes it off as the first delay queue passes the message
                // on, so it would be of no use; the endpoint checks the time.
                if let (None, Some(left)) = (delay, m.time_left()?) {
                    let ms = left.min(crate::MAX_TIME_TO_BE_RECEIVED).as_millis();
                    properties = properties.with_expiration(ms.to_string().into());
                }
                Publication::new(&exchange, &routing_key, m.body, properties, routing)
            })
            .collect::<Result<_, _>>()?;
        Ok((publications, delayed))
    }

    /// Everything a batch needs on `link` before it is published: its queues seen to exist
    /// and, for delayed sends, the delay levels declared and their queues bound.
    async fn prepare(
        &self,
        link: &Link,
        publications: &[Publication],
        delayed: &BTreeSet<String>,
    ) -> Result<(), BusError> {
        self.check_queues(link, publications).await?;
        if delayed.is_empty() {
            return Ok(());
        }
        let queues: Vec<&str> = delayed.iter().map(String::as_str).collect();
        link.delays.prepare(&link.connection, &queues).await
    }

    /// Publishes a copy of a received message into `queue` and waits for the confirm.
    pub(crate) async fn republish(
        &self,
        queue: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> Result<(), BusError> {
        // No size check: the broker took this body once already.
        let copy = Publication::new("", queue, body.to_vec(), props, Routing::Required)?;
        let link = self.link().await?;
        link.publisher
            .publish(Arc::new([copy]))
            .await
            .inspect_err(|e| {
                if matches!(e, BusError::Transport(_)) {
                    self.report_broken(&link);
                }
            })
    }
}

#[async_trait]
impl Transport for RabbitMq {
    async fn start(
        &self,
        topology: &EndpointTopology,
        stop: CancellationToken,
    ) -> Result<Deliveries, BusError> {
        self.inner
            .connection_name
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(|| {
                format!("rhinobus:{}:{}", topology.endpoint, std::process::id())
            });
        let link = self.link().await?;
        let (tx, rx) = mpsc::channel(usize::from(topology.prefetch.max(1)));
        self.inner
            .consumers
            .lock()
            .await
            .push(ConsumerRegistration {
                topology: topology.clone(),
                deliveries: tx,
                stop: stop.clone(),
                started_on: None,
                acks: None,
            });
        // Declare and consume now, so that a bad topology is reported to the caller; an
        // endpoint that failed to start must not be restored after a reconnect.
        self.ensure_consumers_in_time(&link)
            .await
            .inspect_err(|_| stop.cancel())?;
        Ok(rx)
    }

    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let (publications, delayed) = self.publications(messages)?;
        let deadline = tokio::time::Instant::now() + self.inner.confirm_timeout;
        loop {
            let link = self.link().await?;
            let sent = match self.prepare(&link, &publications, &delayed).await {
                Ok(()) => link.publisher.publish(publications.clone()).await,
                Err(e) => Err(e),
            };
            match sent {
                // A broken connection leaves the fate of the batch unknown: send it again on
                // the next connection. Receivers may see duplicates, never a gap.
                Err(BusError::Transport(e)) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "publish failed; resending on a new connection");
                    self.report_broken(&link);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends the held acks of the endpoints that stopped, and forgets those whose every
    /// delivery is settled; closes the connection once no endpoint is left on it. Endpoints
    /// that share one `RabbitMq` keep it open for each other, also while one that is stopping
    /// still has handlers finishing (it calls `close` again when they are done).
    async fn close(&self) {
        let stopped: Vec<_> = {
            let consumers = self.inner.consumers.lock().await;
            consumers
                .iter()
                .filter(|c| c.stop.is_cancelled())
                .filter_map(|c| c.acks.clone())
                .collect()
        };
        let write_within = self.inner.confirm_timeout;
        let flushes = stopped.iter().map(|a| a.flush(SETTLE_GRACE, write_within));
        futures_util::future::join_all(flushes).await;
        {
            let mut consumers = self.inner.consumers.lock().await;
            consumers.retain(|c| !c.finished());
            if !consumers.is_empty() {
                return;
            }
        }
        self.inner.shutdown.cancel();
        let link = self.inner.link.send_replace(None);
        if let Some(link) = link {
            link.publisher.finished(self.inner.confirm_timeout).await;
            let _ = link.connection.close(200, "endpoint stopped".into()).await;
        }
    }
}

impl RabbitMq {
    /// [`RabbitMq::ensure_consumers`] within the connect timeout: a broker that accepted the
    /// connection but does not answer (a resource alarm, say) must not hang a start-up.
    async fn ensure_consumers_in_time(&self, link: &Link) -> Result<(), BusError> {
        let timeout = self.inner.connect_timeout;
        tokio::time::timeout(timeout, self.ensure_consumers(link))
            .await
            .map_err(|_| BusError::Timeout(timeout))?
    }

    /// Declares and starts every registered consumer not yet running on `link`, except those
    /// of endpoints that are stopping; forgets the endpoints that have finished.
    async fn ensure_consumers(&self, link: &Link) -> Result<(), BusError> {
        let mut consumers = self.inner.consumers.lock().await;
        consumers.retain(|c| !c.finished());
        for c in consumers.iter_mut() {
            if c.stop.is_cancelled() || c.started_on == Some(link.generation) {
                continue;
            }
            let channel = link.connection.create_channel().await?;
            declare(&channel, &self.inner.exchange, &c.topology).await?;
            // Delayed sends find the queue through its binding, which a queue deleted and
            // declared again has lost: bound afresh at every start and reconnect.
            let queue = [c.topology.queue.as_str()];
            link.delays.bind(&link.connection, &queue).await?;
            channel
                .basic_qos(c.topology.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    amqp::short("queue name", &c.topology.queue)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            c.started_on = Some(link.generation);
            // One ack with `multiple` per quarter of the prefetch, and at most another
            // quarter held behind a slow handler.
            let quarter = usize::from(c.topology.prefetch / 4);
            let acks = acks::Acks::start(channel.clone(), quarter, quarter);
            c.acks = Some(acks.clone());
            tokio::spawn(consume(
                self.clone(),
                link.generation,
                channel,
                acks,
                consumer,
                c.deliveries.clone(),
                c.stop.clone(),
            ));
        }
        Ok(())
    }
}

/// Declares the durable topic exchange publications go through.
async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    channel
        .exchange_declare(
            amqp::short("exchange", exchange)?,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares an endpoint's queues, delay queues and bindings (the exchange is declared by every
/// connection as it opens).
async fn declare(channel: &Channel, exchange: &str, t: &EndpointTopology) -> Result<(), BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [&t.queue, &t.error_queue].into_iter().chain(&t.audit_queue) {
        let mut args = FieldTable::default();
        if let (true, Some(idle)) = (queue == &t.queue, t.queue_expires) {
            let ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX).max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        channel
            .queue_declare(amqp::short("queue name", queue)?, durable, args)
            .await?;
    }
    for d in &t.delay_queues {
        let mut args = FieldTable::default();
        let ttl = i64::try_from(d.delay.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(t.queue.as_str().into()),
        );
        channel
            .queue_declare(amqp::short("delay queue name", &d.name)?, durable, args)
            .await?;
    }
    for message_type in &t.subscriptions {
        channel
            .queue_bind(
                amqp::short("queue name", &t.queue)?,
                amqp::short("exchange", exchange)?,
                amqp::short("message type", message_type)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Feeds one consumer's deliveries to its endpoint until it stops or the connection breaks.
async fn consume(
    transport: RabbitMq,
    generation: u64,
    channel: Channel,
    acks: Arc<acks::Acks>,
    mut consumer: lapin::Consumer,
    deliveries: mpsc::Sender<Box<dyn super::Delivery>>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => {
                // Stop taking new messages; the ones already taken finish and are settled on
                // this channel, and whatever the broker had sent ahead is requeued when the
                // channel closes.
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                return;
            }
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(d)) => {
                let delivery = RabbitDelivery::new(transport.clone(), acks.clone(), d);
                if deliveries.send(Box::new(delivery)).await.is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                warn!(error = %e, "consumer failed; reconnecting");
                break;
            }
            None => {
                debug!("consumer stream ended; reconnecting");
                break;
            }
        }
    }
    let current = transport.inner.link.borrow().as_ref().map(|l| l.generation);
    if current == Some(generation) {
        transport.inner.broken.notify_one();
    }
}

/// Keeps one connection alive: connects with back-off, restores consumers, and starts over
/// when the connection breaks.
async fn supervise(inner: Arc<Inner>) {
    let transport = RabbitMq { inner };
    let inner = &transport.inner;
    let mut generation = 0;
    let mut backoff = Duration::from_millis(100);
    while !inner.shutdown.is_cancelled() {
        generation += 1;
        match connect(inner, generation).await {
            Ok((link, mut events)) => {
                let link = Arc::new(link);
                info!(generation, "connected to RabbitMQ");
                inner.link.send_replace(Some(link.clone()));
                if let Err(e) = transport.ensure_consumers_in_time(&link).await {
                    warn!(error = %e, "could not restore consumers; reconnecting");
                } else {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        _ = inner.broken.notified() => {}
                        _ = async {
                            while let Some(event) = events.next().await {
                                if let Event::Error(e) = event {
                                    warn!(error = %e, "RabbitMQ connection failed");
                                    return;
                                }
                            }
                        } => {}
                    }
                }
                inner.link.send_replace(None);
                // Acks held back go out first: the connection may still be good. (Not while
                // an endpoint is starting on it: rather than wait for that, the broker
                // redelivers.)
                if let Ok(consumers) = inner.consumers.try_lock() {
                    for acks in consumers.iter().filter_map(|c| c.acks.as_ref()) {
                        acks.release();
                    }
                }
                // A broken connection may never answer the close either.
                let close = link.connection.close(320, "reconnecting".into());
                let _ = tokio::time::timeout(inner.connect_timeout, close).await;
            }
            Err(e) => warn!(error = %e, url = %redact(&inner.url), "cannot connect to RabbitMQ"),
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

type EventStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// Connects and declares the exchange, all within the connect timeout: a broker that accepts
/// the connection while it is still starting (or already stopping) may never answer a
/// channel's opening, and the supervisor must not wait for it forever.
async fn connect(inner: &Inner, generation: u64) -> Result<(Link, EventStream), BusError> {
    tokio::time::timeout(inner.connect_timeout, open_link(inner, generation))
        .await
        .map_err(|_| BusError::Timeout(inner.connect_timeout))?
}

async fn open_link(inner: &Inner, generation: u64) -> Result<(Link, EventStream), BusError> {
    let name = inner
        .connection_name
        .lock()
        .expect("not poisoned")
        .clone()
        .unwrap_or_else(|| format!("rhinobus:client:{}", std::process::id()));
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connection = Arc::new(Connection::connect(&inner.url, props).await?);
    let events: EventStream = Box::pin(connection.events_listener());
    // Declared here as well as by endpoints: a bus that publishes before any endpoint
    // subscribed must find the exchange (a publication nobody receives is not an error).
    let channel = connection.create_channel().await?;
    declare_exchange(&channel, &inner.exchange).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok((
        Link {
            generation,
            publisher: Publisher::start(connection.clone(), inner.confirm_timeout),
            connection,
            known_queues: StdMutex::default(),
            delays: delay::Delays::new(&inner.exchange),
        },
        events,
    ))
}

/// The URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }
}
