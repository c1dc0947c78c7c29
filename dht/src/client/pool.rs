//! Connections to one node: a few pipelined connections, filled one after the other, opened as
//! the load needs them, re-opened when they break, and skipped for a moment after the node
//! refused one.

use super::{ClientError, ClientOptions, RequestFrameRef, unexpected};
use crate::connection::{self, FrameReader};
use crate::frame::{self, Request, Response, ResponseFrame};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Whether a request may skip a node that refused a connection moments ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Fail at once while the node is marked down: the caller has another replica to try.
    UnlessRecentlyDown,
    /// Always try to connect: the request is aimed at this node (dump, `get_from`) or it is the
    /// last candidate. An operator who restarts a node and dumps it right away must reach it,
    /// not be told what another request saw a moment before.
    Always,
}

/// How many requests a connection carries before the pool opens or uses the next one.
///
/// Pipelined requests on one connection share its writes (one syscall carries every frame
/// queued by then, on either side), so filling one connection before spreading over the next
/// makes fewer, fuller writes. Under heavier load every connection is used.
const FILL_BEFORE_NEXT: usize = 32;

/// A few connections to one node, filled one after the other ([`FILL_BEFORE_NEXT`]), opened
/// as the load needs them and re-opened when they break.
pub(super) struct NodePool {
    addr: String,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    /// After a failed connect, further attempts fail at once until then: callers fail over
    /// without each waiting for its own connect to a dead node.
    down_until: Mutex<Option<Instant>>,
}

/// How long a node that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_millis(250);

impl NodePool {
    pub(super) fn new(addr: String, size: usize) -> Self {
        Self {
            addr,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            down_until: Mutex::new(None),
        }
    }

    /// The first open connection with room for another request; the least loaded one when
    /// all are full and open; otherwise a new one, in the first slot without an open one.
    pub(super) async fn conn(
        &self,
        options: &ClientOptions,
        reach: Reach,
    ) -> Result<Arc<Conn>, ClientError> {
        let mut least_loaded: Option<(usize, Arc<Conn>)> = None;
        let mut empty = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref().and_then(|c| Some((c.in_flight()?, c))) {
                Some((load, c)) if load < FILL_BEFORE_NEXT => return Ok(c.clone()),
                Some((load, c)) => {
                    if least_loaded.as_ref().is_none_or(|(least, _)| load < *least) {
                        least_loaded = Some((load, c.clone()));
                    }
                }
                None => {
                    empty.get_or_insert(i);
                }
            }
        }
        if let (None, Some((_, c))) = (empty, &least_loaded) {
            return Ok(c.clone());
        }
        // Every slot was either open (and full) or empty: a slot is left, and there is one.
        let slot = &self.slots[empty.unwrap_or(0)];
        if reach == Reach::UnlessRecentlyDown
            && let Some(until) = *self
                .down_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            && Instant::now() < until
        {
            return Err(ClientError::Connect {
                addr: self.addr.clone(),
                source: io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "node was unreachable moments ago",
                ),
            });
        }
        // Two callers may both open a connection here; the later one replaces the earlier,
        // whose in-flight requests still complete.
        let c = match Conn::open(&self.addr, options).await {
            Ok(c) => c,
            Err(e) => {
                if matches!(e, ClientError::Connect { .. }) {
                    *self
                        .down_until
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + DOWN_FOR);
                }
                return Err(e);
            }
        };
        // The node is back: requests that may skip it stop doing so at once.
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(c.clone());
        Ok(c)
    }
}

/// One pipelined connection: requests go out through the writer task, answers are matched to
/// their callers by id.
pub(super) struct Conn {
    addr: String,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    pending: Arc<Mutex<Pending>>,
    /// The task matching answers to callers; stopped when the connection is given up.
    reader: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<ResponseFrame>>,
}

impl Pending {
    /// Marks the connection closed and drops every waiter, which tells each caller still
    /// waiting that the connection is gone.
    fn close(&mut self) {
        self.closed = true;
        self.waiters.clear();
    }
}

/// Hands each answer read from the node at `addr` to the caller waiting for it, until the
/// connection ends or an answer cannot be decoded; then fails the callers still waiting.
async fn deliver_answers(mut reader: FrameReader, pending: Arc<Mutex<Pending>>, addr: String) {
    while let Some(Ok(body)) = reader.next().await {
        let frame = match frame::decode_response(&body) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "undecodable answer; closing connection");
                break;
            }
        };
        let waiter = (pending.lock().unwrap_or_else(PoisonError::into_inner))
            .waiters
            .remove(&frame.id);
        match waiter {
            Some(w) => {
                let _ = w.send(frame);
            }
            None => {
                if let Err(e) = frame.result {
                    tracing::warn!(%addr, error = %e, "node reported a connection error");
                }
            }
        }
    }
    (pending.lock().unwrap_or_else(PoisonError::into_inner)).close();
}

impl Conn {
    async fn open(addr: &str, options: &ClientOptions) -> Result<Arc<Self>, ClientError> {
        let stream = tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_owned(),
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let (reader, tx, _writer) = connection::split(stream, options.max_frame);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader = tokio::spawn(deliver_answers(reader, pending.clone(), addr.to_owned()));
        let conn = Arc::new(Self {
            addr: addr.to_owned(),
            tx,
            pending,
            reader: reader.abort_handle(),
        });
        let id = 0;
        let hello = frame::encode(&RequestFrameRef {
            id,
            topology: 0,
            request: &Request::Hello {
                secret: options.secret.clone(),
            },
        })
        .map_err(|e| ClientError::Protocol(format!("cannot encode hello: {e}")))?;
        let answer = conn.call(id, Bytes::from(hello), options.timeout).await?;
        match answer.result {
            Ok(Response::Hello { .. }) => Ok(conn),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e.into()),
        }
    }

    /// How many requests wait for their answer; `None` once the connection is closed.
    fn in_flight(&self) -> Option<usize> {
        let p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        (!p.closed).then_some(p.waiters.len())
    }

    pub(super) async fn call(
        &self,
        id: u64,
        body: Bytes,
        timeout: Duration,
    ) -> Result<ResponseFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if p.closed {
                return Err(self.lost());
            }
            p.waiters.insert(id, tx);
        }
        // The timeout covers handing the frame to the writer too: with a node that stopped
        // reading, the socket and then the writer's queue fill up and `send` waits forever.
        let exchange = async {
            if self.tx.send(body).await.is_err() {
                return Err(self.lost());
            }
            rx.await.map_err(|_| self.lost())
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(e)) => {
                self.forget(id);
                Err(e)
            }
            Err(_) => {
                // A node that does not answer in time is given up on: the connection leaves
                // the pool (the next request opens a new one) and every request still waiting
                // on it fails over now instead of timing out one by one.
                self.close();
                Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                })
            }
        }
    }

    /// Marks the connection closed, so the pool replaces it, and fails every waiting caller.
    fn close(&self) {
        tracing::warn!(addr = %self.addr, "request timed out; closing the connection");
        self.reader.abort();
        (self.pending.lock().unwrap_or_else(PoisonError::into_inner)).close();
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiters
            .remove(&id);
    }

    fn lost(&self) -> ClientError {
        ClientError::ConnectionLost {
            addr: self.addr.clone(),
        }
    }
}

#[cfg(test)]
impl NodePool {
    /// As after the node refused a connection while it restarted: every pooled connection is
    /// gone and the pool says the node is down (for an hour, so timing cannot matter).
    pub(super) fn mark_down_for_an_hour(&self) {
        *self.down_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(3600));
        for slot in &self.slots {
            *slot.lock().unwrap() = None;
        }
    }

    /// Whether requests that may skip this node do.
    pub(super) fn marked_down(&self) -> bool {
        self.down_until.lock().unwrap().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::node;

    #[tokio::test]
    async fn a_pool_fills_one_connection_before_it_opens_the_next() {
        let (_dir, addr, _stop) = node().await;
        let options = ClientOptions::default().connections_per_node(3);
        let pool = NodePool::new(addr, options.connections_per_node);
        let mut ids = 1000..;
        let mut waiting = Vec::new();
        // Makes `n` more requests wait for an answer on `conn`.
        let mut load = |conn: &Conn, n: usize| {
            for id in ids.by_ref().take(n) {
                let (tx, rx) = oneshot::channel();
                conn.pending.lock().unwrap().waiters.insert(id, tx);
                waiting.push(rx);
            }
        };
        let first = pool.conn(&options, Reach::Always).await.unwrap();
        load(&first, FILL_BEFORE_NEXT - 1);
        let again = pool.conn(&options, Reach::Always).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "room left on the first");
        load(&first, 1);
        let second = pool.conn(&options, Reach::Always).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "the first is full");
        load(&second, FILL_BEFORE_NEXT + 2);
        let third = pool.conn(&options, Reach::Always).await.unwrap();
        load(&third, FILL_BEFORE_NEXT + 1);
        // Every slot open and full: the least loaded one.
        let least = pool.conn(&options, Reach::Always).await.unwrap();
        assert!(Arc::ptr_eq(&first, &least));
        // A closed connection's slot is opened again before a full one is used.
        first.close();
        let reopened = pool.conn(&options, Reach::Always).await.unwrap();
        assert!(
            ![&first, &second, &third]
                .iter()
                .any(|c| Arc::ptr_eq(c, &reopened))
        );
        assert_eq!(reopened.in_flight(), Some(0));
    }

    #[tokio::test]
    async fn a_request_that_cannot_even_be_handed_over_times_out_and_closes_the_connection() {
        // A writer queue that is full and never drained: a node that stopped reading.
        let (tx, _full) = tokio::sync::mpsc::channel(1);
        tx.try_send(Bytes::new()).unwrap();
        let (other_tx, other_rx) = oneshot::channel();
        let conn = Conn {
            addr: "stuck:1".into(),
            tx,
            pending: Arc::new(Mutex::new(Pending::default())),
            reader: tokio::spawn(std::future::pending::<()>()).abort_handle(),
        };
        // Another caller waiting on the same connection.
        conn.pending.lock().unwrap().waiters.insert(7, other_tx);
        let call = conn.call(1, Bytes::from_static(b"x"), Duration::from_millis(50));
        // The outer timeout is only a backstop against the hang being tested for.
        let result = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .expect("the send must be inside the request timeout");
        assert!(
            matches!(result, Err(ClientError::Timeout { .. })),
            "{result:?}"
        );
        assert!(
            conn.in_flight().is_none(),
            "a timed-out connection must leave the pool"
        );
        assert!(other_rx.await.is_err(), "other waiters are failed at once");
        assert!(matches!(
            conn.call(2, Bytes::new(), Duration::from_secs(60)).await,
            Err(ClientError::ConnectionLost { .. })
        ));
    }
}
