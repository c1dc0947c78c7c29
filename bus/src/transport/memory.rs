//! The in-memory transport: queues and subscriptions in one process, with broker semantics.

use super::{Deliveries, Delivery, Destination, EndpointTopology, OutgoingMessage, Transport};
use crate::error::BusError;
use crate::headers::Headers;
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// A broker in one process. Clones share the same queues, so several endpoints built on
/// clones of one `InMemory` talk to each other as they would through RabbitMQ.
///
/// ```
/// use rhinobus::transport::InMemory;
///
/// let broker = InMemory::new();
/// broker.declare_queue("audit");
/// assert_eq!(broker.queue_len("audit"), 0);
/// ```
#[derive(Clone, Default)]
pub struct InMemory {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for InMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemory").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Arc<Queue>>,
    /// Message type → subscribed queues.
    bindings: HashMap<String, BTreeSet<String>>,
    /// Delay queue → (target queue, delay).
    delays: HashMap<String, (String, Duration)>,
}

#[derive(Default)]
struct Queue {
    messages: Mutex<VecDeque<Stored>>,
    ready: Notify,
}

struct Stored {
    headers: Arc<Headers>,
    body: Vec<u8>,
    redelivered: bool,
}

impl Queue {
    fn push_back(&self, m: Stored) {
        lock(&self.messages).push_back(m);
        self.ready.notify_one();
    }

    fn push_front(&self, m: Stored) {
        lock(&self.messages).push_front(m);
        self.ready.notify_one();
    }

    async fn pop(&self) -> Stored {
        loop {
            let ready = self.ready.notified();
            if let Some(m) = lock(&self.messages).pop_front() {
                return m;
            }
            ready.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking handler never holds these locks; recover the data rather than cascade.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InMemory {
    /// A new, empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a queue (idempotent).
    pub fn declare_queue(&self, name: &str) {
        self.queue(name);
    }

    /// How many messages wait in a queue (0 for a queue that does not exist). Deliveries that
    /// are taken but not settled are not counted.
    pub fn queue_len(&self, name: &str) -> usize {
        let queue = lock(&self.state).queues.get(name).cloned();
        queue.map_or(0, |q| lock(&q.messages).len())
    }

    /// Removes and returns the first message of a queue, with its headers and body.
    pub fn take(&self, name: &str) -> Option<(Headers, Vec<u8>)> {
        let queue = lock(&self.state).queues.get(name).cloned()?;
        let m = lock(&queue.messages).pop_front()?;
        Some((Arc::unwrap_or_clone(m.headers), m.body))
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        lock(&self.state)
            .queues
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn existing(&self, name: &str) -> Option<Arc<Queue>> {
        lock(&self.state).queues.get(name).cloned()
    }

    /// Puts a message in a queue, or in the queue a delay queue feeds after its delay.
    fn enqueue(&self, queue: &str, headers: Headers, body: Vec<u8>) -> Result<(), BusError> {
        self.enqueue_after(queue, headers, body, None)
    }

    /// [`InMemory::enqueue`], once `delay` has passed (if any).
    fn enqueue_after(
        &self,
        queue: &str,
        headers: Headers,
        body: Vec<u8>,
        delay: Option<Duration>,
    ) -> Result<(), BusError> {
        let stored = Stored {
            headers: Arc::new(headers),
            body,
            redelivered: false,
        };
        let (target, delay) = match lock(&self.state).delays.get(queue) {
            Some((target, delay)) => (target.clone(), Some(*delay)),
            None => (queue.to_owned(), delay),
        };
        let target = self
            .existing(&target)
            .ok_or(BusError::Unroutable { queue: target })?;
        match delay {
            Some(delay) => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    target.push_back(stored);
                });
            }
            None => target.push_back(stored),
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for InMemory {
    async fn start(
        &self,
        topology: &EndpointTopology,
        stop: CancellationToken,
    ) -> Result<Deliveries, BusError> {
        let queue = self.queue(&topology.queue);
        self.declare_queue(&topology.error_queue);
        if let Some(audit) = &topology.audit_queue {
            self.declare_queue(audit);
        }
        {
            let mut state = lock(&self.state);
            for t in &topology.subscriptions {
                state
                    .bindings
                    .entry(t.clone())
                    .or_default()
                    .insert(topology.queue.clone());
            }
            for d in &topology.delay_queues {
                state
                    .delays
                    .insert(d.name.clone(), (topology.queue.clone(), d.delay));
            }
        }
        let prefetch = Arc::new(Semaphore::new(usize::from(topology.prefetch.max(1))));
        let (tx, rx) = mpsc::channel::<Box<dyn Delivery>>(usize::from(topology.prefetch.max(1)));
        let broker = self.clone();
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    p = prefetch.clone().acquire_owned() => p.expect("never closed"),
                };
                let stored = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = queue.pop() => m,
                };
                let delivery = MemoryDelivery {
                    broker: broker.clone(),
                    queue: queue.clone(),
                    message: Some(stored),
                    _permit: permit,
                };
                if tx.send(Box::new(delivery)).await.is_err() {
                    return; // the endpoint went away; the dropped delivery went back
                }
            }
        });
        Ok(rx)
    }

    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), BusError> {
        // Check every destination first so that a batch is all or nothing.
        let mut resolved = Vec::with_capacity(messages.len());
        for m in messages {
            // A time to be received set by hand is checked as RabbitMQ checks it.
            m.time_left()?;
            match &m.destination {
                Destination::Queue(q) => {
                    let delayed = lock(&self.state).delays.contains_key(q);
                    if !delayed && self.existing(q).is_none() {
                        return Err(BusError::Unroutable { queue: q.clone() });
                    }
                    let delay = m.remaining_delay()?;
                    resolved.push((q.clone(), m.headers, m.body, delay));
                }
                Destination::Topic(t) => {
                    let queues = lock(&self.state).bindings.get(t).cloned();
                    for q in queues.into_iter().flatten() {
                        resolved.push((q, m.headers.clone(), m.body.clone(), None));
                    }
                }
            }
        }
        for (q, headers, body, delay) in resolved {
            self.enqueue_after(&q, headers, body, delay)?;
        }
        Ok(())
    }

    async fn close(&self) {}
}

struct MemoryDelivery {
    broker: InMemory,
    queue: Arc<Queue>,
    message: Option<Stored>,
    _permit: OwnedSemaphorePermit,
}

impl MemoryDelivery {
    fn stored(&self) -> &Stored {
        self.message.as_ref().expect("present until settled")
    }
}

#[async_trait]
impl Delivery for MemoryDelivery {
    fn headers(&self) -> &Arc<Headers> {
        &self.stored().headers
    }

    fn body(&self) -> &[u8] {
        &self.stored().body
    }

    fn redelivered(&self) -> bool {
        self.stored().redelivered
    }

    async fn ack(&mut self) -> Result<(), BusError> {
        self.message = None;
        Ok(())
    }

    async fn forward(&mut self, queue: &str, extra: Headers) -> Result<(), BusError> {
        let stored = self.stored();
        let mut headers = Headers::clone(&stored.headers);
        headers.extend(extra);
        self.broker.enqueue(queue, headers, stored.body.clone())?;
        self.message = None;
        Ok(())
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if let Some(mut m) = self.message.take() {
            m.redelivered = true;
            self.queue.push_front(m);
        }
    }
}
