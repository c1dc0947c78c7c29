//! [`Requester`]: a request sent and its reply awaited, as MassTransit's request client and
//! NServiceBus's callbacks do: for the caller that must answer someone now (a web request, a
//! command-line tool) and so cannot wait for the reply in a handler of its own.
//!
//! A requester owns a queue. Each request names it as the reply address and carries its
//! timeout as its time to be received ([`crate::Message::TIME_TO_BE_RECEIVED`]), so a
//! responder that falls behind drops the requests nobody waits for any more instead of
//! answering them. The responder answers with [`Context::reply`](crate::Context::reply),
//! which names the request in its correlation id; the requester hands the reply to whoever
//! waits for that request. A reply nobody waits for (its request timed out, or the requester
//! restarted meanwhile) goes to the requester's error queue with reason `no-request`: late,
//! but not lost.

use crate::bus::{Bus, MAX_TIME_TO_BE_RECEIVED, SendOptions};
use crate::error::BusError;
use crate::headers::{Headers, names};
use crate::message::{CodecError, Message, decode};
use crate::recoverability::Failure;
use crate::transport::{Deliveries, Delivery, Destination, EndpointTopology, Transport};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How many replies a requester takes from the broker ahead of handing them out.
const PREFETCH: u16 = 64;

/// Sends requests and awaits their replies on a queue of its own.
///
/// The queue is an endpoint queue like any other (declared durable as the requester starts),
/// and a reply goes to whoever consumes it: give each process its own, with a name that
/// tells it apart (a host name, an instance number), not one shared by the instances of a
/// scaled-out service.
///
/// ```
/// use rhinobus::request::Requester;
/// use rhinobus::{Context, Endpoint, HandlerError, Message, transport::InMemory};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Serialize, Deserialize)]
/// struct GetPrice { sku: String }
/// impl Message for GetPrice { const NAME: &'static str = "catalog.get-price"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct Price { cents: u64 }
/// impl Message for Price { const NAME: &'static str = "catalog.price"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = InMemory::new();
/// let catalog = Endpoint::builder("catalog", broker.clone())
///     .handle(|_: GetPrice, ctx: Context| async move {
///         ctx.reply(&Price { cents: 1250 })?;
///         Ok::<_, HandlerError>(())
///     })
///     .start()
///     .await?;
/// let web = Requester::builder("web-1.replies", broker.clone()).start().await?;
/// let ask = GetPrice { sku: "A-1".into() };
/// let price: Price = web.request("catalog", &ask, Duration::from_secs(5)).await?;
/// assert_eq!(price.cents, 1250);
/// web.shutdown().await;
/// catalog.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Requester {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bus: Bus,
    waiting: Waiting,
    stop: CancellationToken,
    done: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    /// The last clone gone: replies stop being taken (they wait in the queue).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Who waits for the reply to which request (by the request's message id); `None` once the
/// requester stopped taking replies.
type Waiting = Arc<Mutex<Option<HashMap<String, oneshot::Sender<Reply>>>>>;

fn lock(waiting: &Waiting) -> MutexGuard<'_, Option<HashMap<String, oneshot::Sender<Reply>>>> {
    waiting.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many replies a requester remembers having handed over, to know a second copy of one
/// (redelivered after a lost ack or a reconnect, or sent twice by a responder that ran
/// twice) for what it is.
const REMEMBERED_REPLIES: usize = 4096;

/// Builds a [`Requester`]; see [`Requester::builder`].
pub struct RequesterBuilder {
    queue: String,
    error_queue: String,
    expires: Option<Duration>,
    transport: Arc<dyn Transport>,
}

/// A reply as it came: its envelope headers and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Its envelope headers.
    pub headers: Headers,
    /// Its body, byte for byte.
    pub body: Vec<u8>,
}

impl Reply {
    /// Its message type (wire name), if it has one.
    pub fn message_type(&self) -> Option<&str> {
        self.headers.get(names::MESSAGE_TYPE).map(String::as_str)
    }

    /// Its body decoded as `M`.
    pub fn decode<M: Message>(&self) -> Result<M, CodecError> {
        decode(&self.body)
    }
}

/// Why a request got no reply of the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request could not be built or sent: a timeout under 1 ms, a queue that does not
    /// exist, a body that does not encode, a broker that did not confirm it.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// No reply came in time. One that comes later goes to the requester's error queue.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The reply is of another type than the one asked for (an error reply, say): here whole.
    #[error("the reply is a {:?}, not a {expected}", .reply.message_type().unwrap_or("message without a type"))]
    OtherType {
        /// The type asked for.
        expected: &'static str,
        /// The reply.
        reply: Reply,
    },
    /// The reply has the type asked for but its body does not decode as it: here whole.
    #[error("the reply does not decode: {source}")]
    Undecodable {
        /// The reply.
        reply: Reply,
        /// What the decoder said.
        source: CodecError,
    },
    /// The requester was shut down (or stopped taking replies) before the reply came.
    #[error("the requester has been shut down")]
    ShutDown,
}

impl RequesterBuilder {
    /// Where replies nobody waits for go (default `error`).
    pub fn error_queue(mut self, name: impl Into<String>) -> Self {
        self.error_queue = name.into();
        self
    }

    /// Has the broker delete the reply queue, with any replies still in it, once no requester
    /// has taken from it for `idle` (RabbitMQ's `x-expires`): for a process whose queue name
    /// never comes back (an autoscaled instance named at random), whose queue would otherwise
    /// stay. Make `idle` longer than a restart takes. A queue declared before without it, or
    /// with another time, makes [`start`](Self::start) fail: delete it first.
    pub fn expires_after_idle(mut self, idle: Duration) -> Self {
        self.expires = Some(idle);
        self
    }

    /// Declares the reply queue and starts taking replies from it.
    pub async fn start(self) -> Result<Requester, BusError> {
        if self.queue.is_empty() || self.queue == self.error_queue {
            return Err(BusError::Config(
                "a requester's queue needs a name, other than its error queue's".into(),
            ));
        }
        let topology = EndpointTopology {
            endpoint: self.queue.clone(),
            queue: self.queue.clone(),
            subscriptions: Vec::new(),
            error_queue: self.error_queue.clone(),
            audit_queue: None,
            delay_queues: Vec::new(),
            prefetch: PREFETCH,
            queue_expires: self.expires,
        };
        let stop = CancellationToken::new();
        let deliveries = self.transport.start(&topology, stop.clone()).await?;
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let done = tokio::spawn(take_replies(
            deliveries,
            waiting.clone(),
            topology,
            stop.clone(),
            self.transport.clone(),
        ));
        info!(queue = %self.queue, "requester started");
        Ok(Requester {
            inner: Arc::new(Inner {
                bus: Bus::from_shared(self.transport, self.queue),
                waiting,
                stop,
                done: tokio::sync::Mutex::new(Some(done)),
            }),
        })
    }
}

impl Requester {
    /// A requester taking its replies from `queue`.
    pub fn builder(queue: impl Into<String>, transport: impl Transport) -> RequesterBuilder {
        RequesterBuilder {
            queue: queue.into(),
            error_queue: "error".into(),
            expires: None,
            transport: Arc::new(transport),
        }
    }

    /// Sends `request` to `queue` and waits up to `timeout` for its reply, which must be an
    /// `R`. The request carries `timeout` as its time to be received (or its type's own, when
    /// shorter; at most [`MAX_TIME_TO_BE_RECEIVED`]). A reply of another type, or one that
    /// does not decode, comes back whole in the error.
    pub async fn request<M: Message, R: Message>(
        &self,
        queue: &str,
        request: &M,
        timeout: Duration,
    ) -> Result<R, RequestError> {
        self.request_with(queue, request, timeout, SendOptions::default())
            .await
    }

    /// [`Requester::request`] with extra headers (a tenant, a user for the responder's
    /// behaviors to read), and a time to be received if shorter than `timeout`. A request
    /// cannot be delayed: a delay is [`BusError::Invalid`].
    ///
    /// ```
    /// # use rhinobus::{Message, SendOptions, Requester, request::RequestError, transport::InMemory};
    /// # use serde::{Deserialize, Serialize};
    /// # use std::time::Duration;
    /// # #[derive(Serialize, Deserialize)]
    /// # struct GetPrice { sku: String }
    /// # impl Message for GetPrice { const NAME: &'static str = "catalog.get-price"; }
    /// # #[derive(Serialize, Deserialize)]
    /// # struct Price { cents: u64 }
    /// # impl Message for Price { const NAME: &'static str = "catalog.price"; }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = InMemory::new();
    /// # broker.declare_queue("catalog");
    /// # let web = Requester::builder("web-1.replies", broker.clone()).start().await?;
    /// let mut for_acme = SendOptions::default();
    /// for_acme.headers.insert("tenant".into(), "acme".into());
    /// let ask = GetPrice { sku: "A-1".into() };
    /// let price = web.request_with::<_, Price>("catalog", &ask, Duration::from_millis(50), for_acme);
    /// # assert!(matches!(price.await, Err(RequestError::Timeout(_))));
    /// # Ok(()) }
    /// ```
    pub async fn request_with<M: Message, R: Message>(
        &self,
        queue: &str,
        request: &M,
        timeout: Duration,
        mut options: SendOptions,
    ) -> Result<R, RequestError> {
        if options.delay.is_some() {
            return Err(BusError::Invalid("a request cannot be delayed".into()).into());
        }
        let inner = &self.inner;
        let shortest = [options.time_to_be_received, M::TIME_TO_BE_RECEIVED]
            .into_iter()
            .flatten()
            .fold(timeout, Duration::min);
        options.time_to_be_received = Some(shortest.min(MAX_TIME_TO_BE_RECEIVED));
        let destination = Destination::Queue(queue.into());
        let (id, message) = inner.bus.envelope(destination, request, None, options)?;
        // Waiting before it is sent: the reply can come before the broker's confirm.
        let (tx, rx) = oneshot::channel();
        let _waits = WaitsFor::register(&inner.waiting, id.to_string(), tx)?;
        let reply = tokio::time::timeout(timeout, async {
            inner.bus.transport().send(vec![message]).await?;
            rx.await.map_err(|_| RequestError::ShutDown)
        })
        .await
        .map_err(|_| RequestError::Timeout(timeout))??;
        if reply.message_type() != Some(R::NAME) {
            return Err(RequestError::OtherType {
                expected: R::NAME,
                reply,
            });
        }
        reply
            .decode()
            .map_err(|source| RequestError::Undecodable { reply, source })
    }

    /// Stops taking replies and closes the requester's connection; requests waiting, on
    /// this clone or another, fail with [`RequestError::ShutDown`], and so do later ones.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        if let Some(done) = self.inner.done.lock().await.take() {
            let _ = done.await;
        }
    }
}

/// A caller waiting for a reply; no longer waiting once dropped (a timeout, a caller that
/// gave up), so that a reply coming after that is not taken for a waited one.
struct WaitsFor<'a> {
    waiting: &'a Waiting,
    id: String,
}

impl<'a> WaitsFor<'a> {
    /// Waits for the reply to request `id`, unless the requester stopped taking replies.
    fn register(
        waiting: &'a Waiting,
        id: String,
        tx: oneshot::Sender<Reply>,
    ) -> Result<Self, RequestError> {
        let mut waiting_now = lock(waiting);
        let by_id = waiting_now.as_mut().ok_or(RequestError::ShutDown)?;
        by_id.insert(id.clone(), tx);
        Ok(Self { waiting, id })
    }
}

impl Drop for WaitsFor<'_> {
    fn drop(&mut self) {
        if let Some(by_id) = lock(self.waiting).as_mut() {
            by_id.remove(&self.id);
        }
    }
}

/// Hands each reply to whoever waits for it until `stop`, then lets the waiting know that
/// nothing more comes.
async fn take_replies(
    mut deliveries: Deliveries,
    waiting: Waiting,
    topology: EndpointTopology,
    stop: CancellationToken,
    transport: Arc<dyn Transport>,
) {
    let mut answered = Answered::default();
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = deliveries.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        hand_over(delivery, &waiting, &mut answered, &topology).await;
    }
    // Replies taken but not handed over go back to the queue as they are dropped.
    drop(deliveries);
    lock(&waiting).take();
    transport.close().await;
    info!(queue = %topology.queue, "requester stopped");
}

/// The requests whose replies were handed over lately, oldest first.
#[derive(Default)]
struct Answered {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Answered {
    fn note(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
        }
        while self.order.len() > REMEMBERED_REPLIES {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

/// Gives a reply to whoever waits for it and removes it from the queue; removes a second copy
/// of one already handed over; moves one nobody waits for to the error queue.
async fn hand_over(
    mut delivery: Box<dyn Delivery>,
    waiting: &Waiting,
    answered: &mut Answered,
    topology: &EndpointTopology,
) {
    let headers = delivery.headers().clone();
    let request = headers
        .get(names::CORRELATION_ID)
        .map_or("", String::as_str);
    let waiter = lock(waiting).as_mut().and_then(|w| w.remove(request));
    let reply = Reply {
        headers: (*headers).clone(),
        body: delivery.body().to_vec(),
    };
    let taken = waiter.is_some_and(|tx| tx.send(reply).is_ok());
    let settled = if taken || answered.ids.contains(request) {
        if !taken {
            debug!(
                request,
                "a second copy of a reply already handed over; removed"
            );
        }
        answered.note(request);
        delivery.ack().await
    } else {
        let failure = Failure {
            reason: "no-request",
            error_type: "rhinobus::UnclaimedReply".into(),
            message: format!(
                "a reply to request {request:?}, which nobody waits for (it timed out, or \
                 the requester restarted since)"
            ),
            causes: Vec::new(),
            attempts: 0,
        };
        warn!(queue = %topology.queue, request, "a reply nobody waits for; moving it to the error queue");
        let extra = failure.headers(&headers, &topology.endpoint, &topology.queue);
        delivery.forward(&topology.error_queue, extra).await
    };
    if let Err(e) = settled {
        // Back to the queue once dropped, and known for a copy when it comes again.
        warn!(error = %e, "could not settle a reply; it will be delivered again");
    }
}
