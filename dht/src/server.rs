//! The node: accepts connections and serves requests against one [`Storage`], many in flight per
//! connection, until shut down. Writes that arrive together on a connection are served as one
//! storage batch, each still answered as if served alone.

use crate::connection::{self, FrameReader, ReadError};
use crate::frame::{self, Request, RequestFrame, ResponseFrame, WireError};
use crate::replication::ReplicationOutbox;
use crate::request::{self, KeyWrite};
use crate::routing::Topology;
use crate::shutdown::{self, Shutdown};
use crate::storage::{Durability, Storage};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

/// How a node serves.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// When set, every connection must open with a `Hello` carrying this secret.
    pub secret: Option<String>,
    /// The largest frame accepted; a longer one closes the connection.
    pub max_frame: usize,
    /// How many requests (a batch of writes served together counting as one) one connection
    /// may have served off the runtime's threads at once: writes waiting for a sync with
    /// [`Durability::Fsync`] (they share fsyncs, so more in flight means more throughput),
    /// requests waiting for the write lock, range dumps.
    pub max_in_flight: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// The topology to serve; by default one node (this one, at its listening address) owning
    /// every range.
    pub topology: Option<Topology>,
    /// Where writes stage their replication; none for a node that does not replicate.
    pub outbox: Option<ReplicationOutbox>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            secret: None,
            max_frame: frame::DEFAULT_MAX_FRAME,
            max_in_flight: 256,
            max_connections: 1024,
            topology: None,
            outbox: None,
        }
    }
}

impl NodeOptions {
    /// The same options with a shared secret.
    pub fn secret(mut self, secret: Option<String>) -> Self {
        self.secret = secret;
        self
    }

    /// The same options serving `topology`.
    pub fn topology(mut self, topology: Topology) -> Self {
        self.topology = Some(topology);
        self
    }

    /// The same options, replicating writes through `outbox`.
    pub fn outbox(mut self, outbox: ReplicationOutbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// The same options with another frame limit.
    pub fn max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }
}

struct Node {
    storage: Storage,
    topology: Topology,
    options: NodeOptions,
}

impl Node {
    fn execute(&self, request: Request) -> Result<frame::Response, WireError> {
        request::execute_replicated(
            &self.storage,
            &self.topology,
            self.options.outbox.as_ref(),
            request,
        )
    }
}

/// Serves `storage` on `listener` until `shutdown` resolves, then stops accepting, lets every
/// connection finish the request it is on, and flushes storage.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use rhinobus::endpoint::wait_for_signal;
/// use rhinobus_dht::{NodeOptions, Storage, StorageOptions, serve};
///
/// let storage = Storage::open("data", StorageOptions::default()).expect("open storage");
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:7480").await?;
/// serve(listener, storage, NodeOptions::default(), wait_for_signal()).await
/// # }
/// ```
pub async fn serve(
    listener: TcpListener,
    storage: Storage,
    options: NodeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let topology = match options.topology.clone() {
        Some(t) => t,
        None => Topology::single(listener.local_addr()?.to_string()),
    };
    let node = Arc::new(Node {
        storage,
        topology,
        options,
    });
    let (trigger, stop) = shutdown::channel();
    // Every connection task holds a clone; when all are gone, `recv` returns `None`.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let slots = Arc::new(Semaphore::new(node.options.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let node = node.clone();
                let stop = stop.clone();
                let alive = alive_tx.clone();
                tokio::spawn(async move {
                    tracing::debug!(%peer, "connection opened");
                    serve_connection(stream, node, stop).await;
                    tracing::debug!(%peer, "connection closed");
                    drop(alive);
                    drop(permit);
                });
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("shutting down: draining connections");
    trigger.trigger();
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    let storage = node.storage.clone();
    tokio::task::spawn_blocking(move || storage.flush())
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::other)?;
    tracing::info!("stopped");
    Ok(())
}

/// Compares without stopping at the first difference, so timing does not leak the secret.
fn secret_matches(expected: &str, given: Option<&str>) -> bool {
    let Some(given) = given else { return false };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Sends the answer to request `id`. An answer longer than `max` (the node's frame limit)
/// becomes a [`WireError::ResponseTooLarge`] instead: a client with the same limit could not
/// read it and would lose its connection, and every request on it, to the frame. The
/// topology is exempt: it is the node's own, and clients need it whatever the limit.
async fn respond(
    tx: &mpsc::Sender<Bytes>,
    id: u64,
    result: Result<frame::Response, WireError>,
    max: usize,
) {
    let exempt = matches!(result, Ok(frame::Response::Topology(_)));
    let encoded = |result| {
        frame::encode(&ResponseFrame { id, result }).or_else(|e| {
            frame::encode(&ResponseFrame {
                id,
                result: Err(WireError::Internal {
                    message: format!("cannot encode response: {e}"),
                }),
            })
        })
    };
    let body = encoded(result).and_then(|body| {
        if body.len() <= max || exempt {
            return Ok(body);
        }
        encoded(Err(WireError::ResponseTooLarge {
            len: body.len() as u64,
            max: max as u64,
        }))
    });
    match body {
        // A send error means the writer is gone (peer closed); nothing left to tell.
        Ok(body) => {
            let _ = tx.send(Bytes::from(body)).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot encode an error response"),
    }
}

/// The most writes a connection serves as one batch ([`request::execute_writes`]): about a
/// third of a millisecond at the write lock.
const MAX_GROUP: usize = 64;
/// Gathering writes into one batch stops once the requests gathered after its first reach
/// this many bytes.
const MAX_GROUP_BYTES: usize = 1024 * 1024;

/// What a connection's loop takes up next: what its reader gives, or a frame read and decoded
/// already, while writes were gathered, that did not join them.
enum Next {
    Read(Option<Result<BytesMut, ReadError>>),
    Frame(RequestFrame),
}

/// What a connection serves in one go.
enum Work {
    /// One request.
    One(u64, Request),
    /// Two or more consecutive writes of one key each, served as one batch.
    Writes(Vec<(u64, KeyWrite)>),
}

impl Work {
    fn ids(&self) -> Vec<u64> {
        match self {
            Work::One(id, _) => vec![*id],
            Work::Writes(writes) => writes.iter().map(|(id, _)| *id).collect(),
        }
    }
}

type Answer = (u64, Result<frame::Response, WireError>);

/// What a connection sends back for one [`Work`]: a lone request's answer costs no
/// allocation.
enum Answers {
    One(Answer),
    Many(Vec<Answer>),
}

impl Node {
    fn serve(&self, work: Work) -> Answers {
        match work {
            Work::One(id, request) => Answers::One((id, self.execute(request))),
            Work::Writes(writes) => {
                let (ids, writes): (Vec<u64>, Vec<KeyWrite>) = writes.into_iter().unzip();
                let results =
                    request::execute_writes(&self.storage, self.options.outbox.as_ref(), writes);
                Answers::Many(ids.into_iter().zip(results).collect())
            }
        }
    }
}

/// Gathers, after write `first` (request `id`), the writes of one key that have already
/// arrived on the connection (up to [`MAX_GROUP`] in all, until they reach
/// [`MAX_GROUP_BYTES`]), to be served with it as one batch; a write that finds none is served
/// alone, as any request. The first frame that cannot join them, or the connection's end or
/// failure, is left in `held` for the connection's loop.
fn gather(
    reader: &mut FrameReader,
    id: u64,
    first: KeyWrite,
    topology: u64,
    held: &mut Option<Next>,
) -> Work {
    // The writes after the first; no allocation unless one comes.
    let mut writes = Vec::new();
    let mut bytes = 0;
    while writes.len() + 1 < MAX_GROUP && bytes < MAX_GROUP_BYTES {
        let Some(read) = reader.ready() else {
            break;
        };
        let body = match read {
            Some(Ok(body)) => body,
            end_or_failure => {
                *held = Some(Next::Read(end_or_failure));
                break;
            }
        };
        let Ok(frame) = frame::decode_request(&body) else {
            // Decoded again, and answered, by the loop.
            *held = Some(Next::Read(Some(Ok(body))));
            break;
        };
        bytes += body.len();
        if frame.topology != topology {
            *held = Some(Next::Frame(frame));
            break;
        }
        match KeyWrite::of(frame.request) {
            Ok(write) => writes.push((frame.id, write)),
            Err(request) => {
                *held = Some(Next::Frame(RequestFrame { request, ..frame }));
                break;
            }
        }
    }
    if writes.is_empty() {
        return Work::One(id, first.into());
    }
    writes.insert(0, (id, first));
    Work::Writes(writes)
}

async fn respond_all(tx: &mpsc::Sender<Bytes>, answers: Answers, max: usize) {
    match answers {
        Answers::One((id, result)) => respond(tx, id, result, max).await,
        Answers::Many(answers) => {
            for (id, result) in answers {
                respond(tx, id, result, max).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, node: Arc<Node>, mut stop: Shutdown) {
    let (mut reader, tx, writer) = connection::split(stream, node.options.max_frame);
    let limit = node.options.max_frame;
    let mut authenticated = node.options.secret.is_none();
    let in_flight = Arc::new(Semaphore::new(node.options.max_in_flight.max(1)));
    let mut held = None;
    loop {
        let next = match held.take() {
            Some(next) => next,
            None => tokio::select! {
                _ = stop.recv() => break,
                next = reader.next() => Next::Read(next),
            },
        };
        let frame = match next {
            Next::Frame(frame) => frame,
            Next::Read(None) => break,
            Next::Read(Some(Ok(body))) => match frame::decode_request(&body) {
                Ok(frame) => frame,
                Err((id, err)) => {
                    tracing::debug!(error = %err, "malformed request");
                    respond(&tx, id.unwrap_or(0), Err(err), limit).await;
                    if id.is_none() || !authenticated {
                        break;
                    }
                    continue;
                }
            },
            Next::Read(Some(Err(ReadError::TooLarge { max }))) => {
                // The rest of the stream cannot be re-synchronised: answer and close.
                respond(
                    &tx,
                    0,
                    Err(WireError::FrameTooLarge { max: max as u64 }),
                    limit,
                )
                .await;
                break;
            }
            Next::Read(Some(Err(ReadError::Io(e)))) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
        };
        if !authenticated {
            match (&frame.request, &node.options.secret) {
                (Request::Hello { secret }, Some(expected))
                    if secret_matches(expected, secret.as_deref()) =>
                {
                    authenticated = true;
                }
                _ => {
                    respond(&tx, frame.id, Err(WireError::Unauthorized), limit).await;
                    break;
                }
            }
        }
        if frame.request.is_routed() && frame.topology != node.topology.version {
            respond(
                &tx,
                frame.id,
                Err(WireError::TopologyChanged {
                    version: node.topology.version,
                }),
                limit,
            )
            .await;
            continue;
        }
        let id = frame.id;
        let waits_for_sync =
            node.storage.durability() == Durability::Fsync && frame.request.is_write();
        // A write that would wait for a long one (a replica applying a replication message
        // holds the write lock for a millisecond or more) waits for its turn on a task of its
        // own, parked, not on a runtime thread blocked on the lock; and the connection goes
        // on serving. Waiting out another client's write, microseconds, is cheaper inline.
        let after_long_write = request::takes_write_lock(&frame.request)
            && !waits_for_sync
            && node.storage.long_writes_pending();
        // Writes wait for an fsync off the runtime's threads, many at once, so that group
        // commit can share each sync between them; a range dump or digest reads a 1,024th of
        // the table, and a range page up to a megabyte of it.
        let blocking = waits_for_sync
            || matches!(
                frame.request,
                Request::Dump { .. }
                    | Request::Digest { .. }
                    | Request::RangePage { .. }
                    | Request::MergePage { .. }
            );
        // Writes that arrived together are served as one batch, whichever way they go.
        let work = match KeyWrite::of(frame.request) {
            Ok(write) => gather(&mut reader, id, write, node.topology.version, &mut held),
            Err(request) => Work::One(id, request),
        };
        if after_long_write || blocking {
            // On a task of its own; answers may overtake each other.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let node = node.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let answers = if blocking {
                    let ids = work.ids();
                    tokio::task::spawn_blocking(move || node.serve(work))
                        .await
                        .unwrap_or_else(|e| {
                            let failed = WireError::Internal {
                                message: format!("request task failed: {e}"),
                            };
                            Answers::Many(
                                ids.into_iter()
                                    .map(|id| (id, Err(failed.clone())))
                                    .collect(),
                            )
                        })
                } else {
                    (node.storage).short_write(|_| node.serve(work)).await
                };
                respond_all(&tx, answers, limit).await;
                drop(permit);
            });
        } else {
            // Local reads and uncontended buffered writes take microseconds: answering inline
            // avoids a task per request. (Answers may still overtake one served on a task;
            // clients match them by id.)
            respond_all(&tx, node.serve(work), limit).await;
        }
    }
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "connection write failed"),
        Err(e) => tracing::warn!(error = %e, "connection writer task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{GetRequest, Op, OpResult, PutRequest, StorageError, StorageOptions};
    use crate::{Client, ClientOptions};
    use std::sync::mpsc as std_mpsc;

    /// One runtime thread: a write that waited for the write lock on it would keep the node
    /// from answering anything else until the lock came free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn requests_waiting_for_the_write_lock_do_not_hold_up_reads() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        storage.put(PutRequest::new("read-me", "v")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(serve(
            listener,
            storage.clone(),
            NodeOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = Client::connect_with([addr], ClientOptions::default().connections_per_node(1))
            .await
            .unwrap();

        // A long write, as a replica applying a big replication message, holds the lock
        // until the read below was answered (or a backstop ran out).
        let (locked_tx, locked) = tokio::sync::oneshot::channel();
        let (answered, answered_rx) = std_mpsc::channel::<()>();
        let holder = {
            let storage = storage.clone();
            tokio::spawn(async move {
                storage
                    .long_write(move |s| {
                        s.batch(|_| {
                            locked_tx.send(()).unwrap();
                            Ok::<_, StorageError>(answered_rx.recv_timeout(Duration::from_secs(10)))
                        })
                    })
                    .await
            })
        };
        locked.await.unwrap();
        let write = tokio::spawn({
            let client = client.clone();
            async move { client.put(PutRequest::new("written", "w")).await }
        });
        // A batch that only reads takes the lock too.
        let batch = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .batch(vec![Op::Get(GetRequest::new("read-me"))])
                    .await
            }
        });
        // Let both reach the node and find the lock taken.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = tokio::time::timeout(Duration::from_secs(5), client.get("read-me")).await;
        let _ = answered.send(());
        let waited = holder.await.unwrap().unwrap().unwrap();
        assert!(
            matches!(read, Ok(Ok(ref siblings)) if siblings.len() == 1),
            "the read was not answered while a write waited for the lock: {read:?}"
        );
        assert!(waited.is_ok(), "the lock was held until the backstop");
        write.await.unwrap().unwrap();
        assert_eq!(storage.get(b"written").unwrap().len(), 1);
        let batch = batch.await.unwrap().unwrap();
        assert!(matches!(&batch[..], [OpResult::Siblings(s)] if s.len() == 1));
        drop(client);
        let _ = stop.send(());
        node.await.unwrap().unwrap();
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secret_matches("s3cret", Some("s3cret")));
        assert!(!secret_matches("s3cret", Some("s3cre")));
        assert!(!secret_matches("s3cret", Some("s3cret!")));
        assert!(!secret_matches("s3cret", Some("")));
        assert!(!secret_matches("s3cret", None));
        assert!(secret_matches("", Some("")));
    }
}
