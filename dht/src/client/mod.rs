//! The client: routes each key to the node that serves its range, keeps a few pipelined
//! connections per node (`pool`), and turns node answers back into typed results.

mod pool;

use crate::frame::{self, Request, Response, WireError};
use crate::routing::{RangeId, Topology};
use crate::status::NodeStatus;
use crate::storage::{
    AddItemRequest, Conflict, GetRequest, KeyDump, ListItem, Merged, Op, OpResult, PageCursor,
    PutOutcome, PutRequest, RangeDigest, RangePage, RemoveItemRequest, RemoveOutcome,
    RemoveRequest, Sibling, check_key, check_parents, check_value,
};
use crate::version::ItemId;
use bytes::Bytes;
use pool::{NodePool, Reach};
use serde::Serialize;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The nodes' shared secret, if they have one.
    pub secret: Option<String>,
    /// The most connections kept per node; requests are pipelined on each. A connection
    /// carries 32 requests at once before the next one is opened or used: fuller connections
    /// mean fewer syscalls per request, on both sides. A client that keeps more requests than
    /// that in flight to one many-core node spreads them over more of its cores with more
    /// connections.
    pub connections_per_node: usize,
    /// How long to wait for an answer.
    pub timeout: Duration,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// The largest frame sent or accepted.
    pub max_frame: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            secret: None,
            connections_per_node: 4,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_frame: frame::DEFAULT_MAX_FRAME,
        }
    }
}

impl ClientOptions {
    /// The same options with a shared secret.
    pub fn secret(mut self, secret: Option<String>) -> Self {
        self.secret = secret;
        self
    }

    /// The same options with another answer timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same options with another number of connections per node.
    pub fn connections_per_node(mut self, n: usize) -> Self {
        self.connections_per_node = n.max(1);
        self
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// An optimistic write's parents were not the current versions; nothing changed. Reload and
    /// try again.
    #[error(transparent)]
    Conflict(Conflict),
    /// The request was refused, by the node or before it was sent (limits, secret, ...).
    #[error("rejected: {0}")]
    Rejected(WireError),
    /// No answer in time; the request may or may not have been applied.
    #[error(
        "no answer from {addr} within {timeout:?}; the request may or may not have been applied"
    )]
    Timeout {
        /// The node.
        addr: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The node could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The node.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection closed before the answer came; the request may or may not have been
    /// applied.
    #[error("connection to {addr} lost; the request may or may not have been applied")]
    ConnectionLost {
        /// The node.
        addr: String,
    },
    /// The node answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The topology has no node for a range, or a batch's keys live on different nodes.
    #[error("routing: {0}")]
    Routing(String),
}

impl ClientError {
    /// Whether the node could not be reached or went away: the cases in which the client
    /// fails over to the next replica.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::ConnectionLost { .. }
                | ClientError::Timeout { .. }
        )
    }

    /// Whether the request may have reached the node and been applied there: it went away, or
    /// did not answer in time, after the request was sent.
    pub fn may_have_been_applied(&self) -> bool {
        matches!(
            self,
            ClientError::ConnectionLost { .. } | ClientError::Timeout { .. }
        )
    }
}

/// Whether `request`, failed with `error` on one replica, goes on to the next. Not when the
/// node answered (the answer stands), and not for an optimistic write that may have been
/// applied: on another replica, which has not seen it yet, its check would pass against the
/// older state, and the two versions would meet as siblings, which an optimistic writer never
/// expects. Such a write returns the error: reload and decide, as after a conflict.
fn fails_over(request: &Request, error: &ClientError) -> bool {
    error.is_unreachable() && !(request.is_optimistic() && error.may_have_been_applied())
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Conflict(c) => ClientError::Conflict(c),
            other => ClientError::Rejected(other),
        }
    }
}

impl From<crate::storage::StorageError> for ClientError {
    fn from(e: crate::storage::StorageError) -> Self {
        WireError::from(e).into()
    }
}

/// A connection to a rhinobus-dht cluster. Cheap to clone; clones share connections.
///
/// ```no_run
/// use rhinobus_dht::{Client, ClientError, PutRequest};
///
/// # async fn run() -> Result<(), ClientError> {
/// let client = Client::connect("127.0.0.1:7480").await?;
/// let put = client.put(PutRequest::new("user/1", "alice")).await?;
/// let siblings = client.get("user/1").await?;
/// assert_eq!(siblings[0].version, put.version);
///
/// // Optimistic update: fails with ClientError::Conflict if someone else wrote meanwhile.
/// let next = PutRequest::new("user/1", "alice v2").parents([put.version]).optimistic(true);
/// match client.put(next).await {
///     Ok(_) => {}
///     Err(ClientError::Conflict(c)) => println!("reload, current is {:?}", c.current),
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    seeds: Vec<String>,
    options: ClientOptions,
    topology: RwLock<Arc<Topology>>,
    pools: Mutex<HashMap<String, Arc<NodePool>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("seeds", &self.inner.seeds)
            .field("topology_version", &self.topology().version)
            .finish_non_exhaustive()
    }
}

/// A frame borrowing its request, so a retry does not clone values. Same encoding as
/// [`frame::RequestFrame`].
#[derive(Serialize)]
struct RequestFrameRef<'a> {
    id: u64,
    topology: u64,
    request: &'a Request,
}

impl Client {
    /// Connects to the cluster that `addr` belongs to, with default options.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with([addr.into()], ClientOptions::default()).await
    }

    /// Connects through the first reachable of `seeds` and fetches the topology from it.
    pub async fn connect_with(
        seeds: impl IntoIterator<Item = impl Into<String>>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        if seeds.is_empty() {
            return Err(ClientError::Routing("no node address given".into()));
        }
        let client = Self {
            inner: Arc::new(Inner {
                topology: RwLock::new(Arc::new(Topology::single(seeds[0].clone()))),
                seeds,
                options,
                pools: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        client.refresh_topology().await?;
        Ok(client)
    }

    /// The topology requests are routed by.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner
            .topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fetches the current topology from the cluster (any node that answers) and routes by it.
    pub async fn refresh_topology(&self) -> Result<Arc<Topology>, ClientError> {
        let current = self.topology();
        let mut candidates: Vec<String> = current.nodes.clone();
        candidates.extend(self.inner.seeds.iter().cloned());
        let last = candidates.len().saturating_sub(1);
        let mut last_error = None;
        for (i, addr) in candidates.into_iter().enumerate() {
            let reach = if i == last {
                Reach::Always
            } else {
                Reach::UnlessRecentlyDown
            };
            match self.send(&addr, 0, &Request::Topology, reach).await {
                Ok(Response::Topology(t)) => {
                    t.validate()
                        .map_err(|e| ClientError::Protocol(format!("node sent {e}")))?;
                    let t = Arc::new(t);
                    *self
                        .inner
                        .topology
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = t.clone();
                    return Ok(t);
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::Routing("no node to ask".into())))
    }

    /// Every current sibling of `key`.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Vec<Sibling>, ClientError> {
        let key = key.into();
        check_key(&key)?;
        match self
            .call(&key, Request::Get(GetRequest { key: key.clone() }))
            .await?
        {
            Response::Siblings(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes a new version; see [`PutRequest`]. An optimistic put that loses fails with
    /// [`ClientError::Conflict`].
    pub async fn put(&self, request: PutRequest) -> Result<PutOutcome, ClientError> {
        check_key(&request.key)?;
        check_value(&request.value)?;
        check_parents(&request.parents)?;
        let key = request.key.clone();
        match self.call(&key, Request::Put(request)).await? {
            Response::Put(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes versions of a key; see [`RemoveRequest`].
    pub async fn remove(&self, request: RemoveRequest) -> Result<RemoveOutcome, ClientError> {
        check_key(&request.key)?;
        check_parents(&request.parents)?;
        let key = request.key.clone();
        match self.call(&key, Request::Remove(request)).await? {
            Response::Removed(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds an item to the list under a key.
    pub async fn add_item(&self, request: AddItemRequest) -> Result<ItemId, ClientError> {
        check_key(&request.key)?;
        check_value(&request.value)?;
        let key = request.key.clone();
        match self.call(&key, Request::AddItem(request)).await? {
            Response::ItemAdded(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes an item from a list; `false` if it was not there.
    pub async fn remove_item(&self, request: RemoveItemRequest) -> Result<bool, ClientError> {
        check_key(&request.key)?;
        let key = request.key.clone();
        match self.call(&key, Request::RemoveItem(request)).await? {
            Response::ItemRemoved(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    /// Every item of the list under `key`.
    pub async fn get_items(&self, key: impl Into<Bytes>) -> Result<Vec<ListItem>, ClientError> {
        let key = key.into();
        check_key(&key)?;
        match self
            .call(&key, Request::GetItems(GetRequest { key: key.clone() }))
            .await?
        {
            Response::Items(items) => Ok(items),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs `ops` atomically on the node that serves their keys: all of them or none. Every key
    /// must route to the same node.
    pub async fn batch(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ClientError> {
        let Some(first) = ops.first().map(|op| op.key().clone()) else {
            return Ok(Vec::new());
        };
        for op in &ops {
            check_key(op.key())?;
            match op {
                Op::Put(r) => {
                    check_value(&r.value)?;
                    check_parents(&r.parents)?;
                }
                Op::Remove(r) => check_parents(&r.parents)?,
                Op::AddItem(r) => check_value(&r.value)?,
                Op::Get(_) | Op::GetItems(_) | Op::RemoveItem(_) => {}
            }
        }
        let topology = self.topology();
        let node = route(&topology, &first)?;
        for op in &ops {
            if route(&topology, op.key())? != node {
                return Err(ClientError::Routing(format!(
                    "a batch must stay on one node, but its keys live on {node} and {}",
                    route(&topology, op.key())?
                )));
            }
        }
        match self.call(&first, Request::Batch { ops }).await? {
            Response::Batch(results) => Ok(results),
            other => Err(unexpected(&other)),
        }
    }

    /// Everything node `addr` holds for `range`, whatever its role for it: for comparing
    /// replicas (`rhinobus-dht dump`).
    pub async fn dump(&self, addr: &str, range: RangeId) -> Result<Vec<KeyDump>, ClientError> {
        match self
            .send(addr, 0, &Request::Dump { range }, Reach::Always)
            .await?
        {
            Response::Dump(keys) => Ok(keys),
            other => Err(unexpected(&other)),
        }
    }

    /// The digest of `range` as node `addr` holds it, whatever its role for it: for comparing
    /// replicas (`rhinobus-dht verify`).
    pub async fn digest(&self, addr: &str, range: RangeId) -> Result<RangeDigest, ClientError> {
        match self
            .send(addr, 0, &Request::Digest { range }, Reach::Always)
            .await?
        {
            Response::Digest(digest) => Ok(digest),
            other => Err(unexpected(&other)),
        }
    }

    /// The page of `range` starting at `from` as node `addr` holds it, tombstones included,
    /// of about `max_bytes` at most (when less than the node's own page size): what a replica
    /// that lost its data copies back (see [`crate::rebuild`]).
    pub async fn range_page(
        &self,
        addr: &str,
        range: RangeId,
        from: Option<PageCursor>,
        max_bytes: Option<u64>,
    ) -> Result<RangePage, ClientError> {
        let request = Request::RangePage {
            range,
            from,
            max_bytes,
        };
        match self.send(addr, 0, &request, Reach::Always).await? {
            Response::RangePage(page) => Ok(page),
            other => Err(unexpected(&other)),
        }
    }

    /// Merges `page` (of `range`, as some replica answered [`Client::range_page`]) into node
    /// `addr`, as a rebuild merges it, and returns what that wrote there: for repairing
    /// replicas that differ (see [`crate::verify::repair`]).
    pub async fn merge_page(
        &self,
        addr: &str,
        range: RangeId,
        page: RangePage,
    ) -> Result<Merged, ClientError> {
        let request = Request::MergePage { range, page };
        match self.send(addr, 0, &request, Reach::Always).await? {
            Response::Merged(merged) => Ok(merged),
            other => Err(unexpected(&other)),
        }
    }

    /// What node `addr` reports about itself: its topology version and the replication it
    /// still owes each peer (`rhinobus-dht status`).
    pub async fn status(&self, addr: &str) -> Result<NodeStatus, ClientError> {
        match self.send(addr, 0, &Request::Status, Reach::Always).await? {
            Response::Status(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// Every current sibling of `key` as node `addr` holds it, whether or not it is the
    /// primary: for checking how far replication got.
    pub async fn get_from(
        &self,
        addr: &str,
        key: impl Into<Bytes>,
    ) -> Result<Vec<Sibling>, ClientError> {
        let key = key.into();
        check_key(&key)?;
        let version = self.topology().version;
        match self
            .send(
                addr,
                version,
                &Request::Get(GetRequest { key }),
                Reach::Always,
            )
            .await?
        {
            Response::Siblings(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a routed request to the key's primary, failing over to the secondary and then the
    /// tertiary when a node cannot be reached; refreshes the topology and retries once when a
    /// node says it changed.
    ///
    /// A write whose node went away before answering may have been applied there; retried on
    /// the next replica it is applied again, as a new version: a sibling, never a loss. An
    /// optimistic write is the exception: it fails over only when it never reached the node
    /// (see [`fails_over`]).
    async fn call(&self, key: &[u8], request: Request) -> Result<Response, ClientError> {
        let mut refreshed = false;
        'routing: loop {
            let topology = self.topology();
            let replicas = topology.replicas(RangeId::of(key));
            if replicas.is_empty() {
                return Err(ClientError::Routing(format!(
                    "no node serves range {}",
                    RangeId::of(key).get()
                )));
            }
            let mut last_error = None;
            let last = replicas.len() - 1;
            for (i, addr) in replicas.into_iter().enumerate() {
                // Skipping a node that refused moments ago only helps when there is another
                // replica to fail over to; the last one is always tried.
                let reach = if i == last {
                    Reach::Always
                } else {
                    Reach::UnlessRecentlyDown
                };
                match self.send(addr, topology.version, &request, reach).await {
                    Err(ClientError::Rejected(WireError::TopologyChanged { .. })) if !refreshed => {
                        refreshed = true;
                        self.refresh_topology().await?;
                        continue 'routing;
                    }
                    Err(e) if fails_over(&request, &e) => {
                        tracing::debug!(%addr, error = %e, "node unreachable; failing over");
                        last_error = Some(e);
                    }
                    other => return other,
                }
            }
            return Err(last_error.unwrap_or_else(|| ClientError::Routing("no replica".into())));
        }
    }

    async fn send(
        &self,
        addr: &str,
        topology: u64,
        request: &Request,
        reach: Reach,
    ) -> Result<Response, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let body = frame::encode(&RequestFrameRef {
            id,
            topology,
            request,
        })
        .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        if body.len() > self.inner.options.max_frame {
            return Err(ClientError::Rejected(WireError::FrameTooLarge {
                max: self.inner.options.max_frame as u64,
            }));
        }
        let conn = self.pool(addr).conn(&self.inner.options, reach).await?;
        let frame = conn
            .call(id, Bytes::from(body), self.inner.options.timeout)
            .await?;
        frame.result.map_err(ClientError::from)
    }

    fn pool(&self, addr: &str) -> Arc<NodePool> {
        let mut pools = self
            .inner
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pools
            .entry(addr.to_owned())
            .or_insert_with(|| {
                Arc::new(NodePool::new(
                    addr.to_owned(),
                    self.inner.options.connections_per_node,
                ))
            })
            .clone()
    }
}

fn route<'t>(topology: &'t Topology, key: &[u8]) -> Result<&'t str, ClientError> {
    let range = RangeId::of(key);
    topology
        .primary(range)
        .ok_or_else(|| ClientError::Routing(format!("no node serves range {}", range.get())))
}

fn unexpected(r: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected answer {r:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{NodeOptions, serve};
    use crate::storage::{Storage, StorageOptions};
    use tokio::sync::oneshot;

    /// A node served in this process until the returned sender is dropped.
    pub(super) async fn node() -> (tempfile::TempDir, String, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve_on(listener, NodeOptions::default())
    }

    fn serve_on(
        listener: tokio::net::TcpListener,
        options: NodeOptions,
    ) -> (tempfile::TempDir, String, oneshot::Sender<()>) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, storage, options, async move {
            let _ = stopped.await;
        }));
        (dir, addr, stop)
    }

    /// A primary that takes requests and never answers (hung, or answering too late), and a
    /// working secondary: a non-optimistic write fails over, an optimistic one does not, since
    /// the primary may have applied it.
    #[tokio::test]
    async fn an_optimistic_write_does_not_fail_over_once_it_may_have_been_applied() {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_addr = hung.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hung.accept().await {
                held.push(socket);
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let topology = Topology::blocks(1, [("hung", hung_addr.clone()), ("ok", addr.clone())]);
        let key = (0..)
            .map(|n| format!("k{n}"))
            .find(|k| topology.replicas(RangeId::of(k.as_bytes()))[0] == hung_addr)
            .unwrap();
        let (_dir, _, _stop) = serve_on(listener, NodeOptions::default().topology(topology));
        let options = ClientOptions {
            timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        };
        let client = Client::connect_with([addr], options).await.unwrap();

        let plain = client.put(PutRequest::new(key.clone(), "a")).await;
        assert!(plain.is_ok(), "a plain write fails over: {plain:?}");
        let parents = [plain.unwrap().version];
        let optimistic = PutRequest::new(key, "b").parents(parents).optimistic(true);
        let outcome = client.put(optimistic).await;
        assert!(
            matches!(outcome, Err(ClientError::Timeout { .. })),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn requests_aimed_at_a_node_reach_it_even_if_it_was_down_moments_ago() {
        let (_dir, addr, _stop) = node().await;
        let client = Client::connect(addr.clone()).await.unwrap();
        client.put(PutRequest::new("k", "v")).await.unwrap();
        client.pool(&addr).mark_down_for_an_hour();
        let dumped = client.dump(&addr, RangeId::of(b"k")).await.unwrap();
        assert_eq!(dumped.len(), 1);
        // The connect succeeded, so the node is no longer skipped by anyone.
        assert!(!client.pool(&addr).marked_down());

        client.pool(&addr).mark_down_for_an_hour();
        assert_eq!(client.get_from(&addr, "k").await.unwrap().len(), 1);
        // The only replica of a key is the last candidate of its failover: it is tried too.
        client.pool(&addr).mark_down_for_an_hour();
        assert_eq!(client.get("k").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn failover_skips_a_node_that_was_down_moments_ago_when_another_replica_remains() {
        let (_dir, addr, _stop) = node().await;
        let client = Client::connect(addr.clone()).await.unwrap();
        client.pool(&addr).mark_down_for_an_hour();
        let skipped = client
            .pool(&addr)
            .conn(&client.inner.options, Reach::UnlessRecentlyDown)
            .await
            .err();
        assert!(
            matches!(skipped, Some(ClientError::Connect { .. })),
            "{skipped:?}"
        );
    }
}
