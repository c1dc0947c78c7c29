//! Rebuilding a node that lost its data (a new disk, a wiped directory): before it serves, it
//! copies every range it holds from the other replicas of that range.
//!
//! Catch-up alone cannot do it: a node's queue holds only what the others accepted while it
//! was down, and they never send it again what they already had. [`rebuild`] copies each range
//! from **every** other replica that answers, tombstones included
//! ([`Storage::range_page`]), and merges the pages as replication is merged, so the node ends
//! with the union of what they hold minus everything any of them superseded. What they accept
//! meanwhile waits in this node's queue, drained by catch-up right after.
//!
//! What it cannot bring back: writes this node accepted itself and had not yet sent (their
//! outbox records were on the lost disk), the price of asynchronous replication. Two cases can
//! leave it short of a write its peers hold, each needing a replica that is behind while the
//! node is rebuilt: a write this node sent just before it lost its data and that a peer applies
//! only after it was copied, and a write only a skipped (unreachable) replica and this node had
//! applied. [`verify`](crate::verify) finds such ranges; [`repair`](crate::verify::repair), or
//! rebuilding again (harmless), once the peers are caught up and reachable, mends them.

use crate::client::{Client, ClientError, ClientOptions};
use crate::frame::WireError;
use crate::routing::{RangeId, Topology};
use crate::storage::{Merged, PAGE_BYTES, PageCursor, Storage, StorageError};
use std::collections::{BTreeMap, BTreeSet};

/// What a rebuild copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Ranges of this node copied from at least one other replica (those it holds alone are
    /// not counted: there is nobody to copy them from).
    pub ranges: usize,
    /// Pages fetched, from all replicas.
    pub pages: usize,
    /// What merging the pages wrote here.
    pub merged: Merged,
    /// The replicas that could not be copied from, with why; every range they share with this
    /// node was copied from another one.
    pub skipped: BTreeMap<String, String>,
}

/// Why a node could not be rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The node is not in the topology.
    #[error("node {0:?} is not in the topology")]
    UnknownNode(String),
    /// Some ranges could not be copied from any other replica.
    #[error(
        "{ranges} ranges (range {first} the first) could not be copied from any other replica: {why}"
    )]
    Unreachable {
        /// How many ranges.
        ranges: usize,
        /// The lowest of them.
        first: u16,
        /// What each replica tried answered.
        why: String,
    },
    /// This node's storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The task merging a page died.
    #[error("merging a copied page failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Copies into `storage` every range node `node` holds in `topology` from the other replicas
/// of that range, as `options` reaches them (their shared secret, timeouts).
///
/// A replica that cannot be reached, fails, or sends a page that does not check out
/// ([`RangePage::check`](crate::storage::RangePage::check)) is skipped, and named in
/// [`Rebuilt::skipped`]; the rebuild fails only when some range could not be copied from any.
///
/// ```no_run
/// # async fn run(storage: rhinobus_dht::Storage, topology: rhinobus_dht::Topology)
/// #     -> Result<(), rhinobus_dht::rebuild::RebuildError> {
/// use rhinobus_dht::ClientOptions;
/// use rhinobus_dht::rebuild::rebuild;
///
/// let rebuilt = rebuild(&storage, &topology, "n3", ClientOptions::default()).await?;
/// println!("{} ranges copied, {} versions and items", rebuilt.ranges, rebuilt.merged.changes);
/// # Ok(()) }
/// ```
pub async fn rebuild(
    storage: &Storage,
    topology: &Topology,
    node: &str,
    options: ClientOptions,
) -> Result<Rebuilt, RebuildError> {
    let me = topology
        .index_of(node)
        .ok_or_else(|| RebuildError::UnknownNode(node.to_owned()))?;
    // The ranges of this node each other node holds too. A range held by this node alone has
    // nobody to copy from, and nothing that could have been kept elsewhere.
    let mut shared: BTreeMap<String, Vec<RangeId>> = BTreeMap::new();
    for range in RangeId::all() {
        if !topology.replica_indexes(range).any(|i| i == me) {
            continue;
        }
        for peer in topology.replica_indexes(range).filter(|i| *i != me) {
            // A valid topology has an address for every index it names.
            if let Some(addr) = topology.nodes.get(peer as usize) {
                shared.entry(addr.clone()).or_default().push(range);
            }
        }
    }
    let wanted: BTreeSet<RangeId> = shared.values().flatten().copied().collect();
    let mut copied = BTreeSet::new();
    let mut rebuilt = Rebuilt::default();
    if !shared.is_empty() {
        match Client::connect_with(shared.keys(), options).await {
            Ok(client) => {
                for (addr, ranges) in &shared {
                    match copy_ranges(&client, storage, addr, ranges, &mut rebuilt).await {
                        Ok(()) => copied.extend(ranges),
                        Err(CopyError::Local(e)) => return Err(e),
                        Err(CopyError::Peer(e)) => {
                            rebuilt.skipped.insert(addr.clone(), e.to_string());
                        }
                    }
                }
            }
            Err(e) => {
                for addr in shared.keys() {
                    rebuilt.skipped.insert(addr.clone(), e.to_string());
                }
            }
        }
    }
    if let Some(first) = wanted.difference(&copied).next() {
        let why = (rebuilt.skipped.iter())
            .map(|(addr, e)| format!("{addr}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(RebuildError::Unreachable {
            ranges: wanted.difference(&copied).count(),
            first: first.get(),
            why,
        });
    }
    rebuilt.ranges = copied.len();
    Ok(rebuilt)
}

/// The smallest page budget asked of a replica whose answers are too large for its frame
/// limit: below it, an entry itself is too large, and smaller pages would not help.
const MIN_PAGE_BYTES: u64 = 4096;

/// Why one range was not copied: the other replica failed (try the next), or this node did
/// (give up).
enum CopyError {
    Peer(ClientError),
    Local(RebuildError),
}

/// Copies `ranges` from the replica at `addr`, counting what came in `rebuilt`; stops at the
/// first failure (the ranges copied until then stay merged).
async fn copy_ranges(
    client: &Client,
    storage: &Storage,
    addr: &str,
    ranges: &[RangeId],
    rebuilt: &mut Rebuilt,
) -> Result<(), CopyError> {
    tracing::info!(from = %addr, ranges = ranges.len(), "copying ranges from a replica");
    // Smaller pages from a replica whose frame limit is below a page.
    let mut max_bytes: Option<u64> = None;
    for &range in ranges {
        let mut from: Option<PageCursor> = None;
        loop {
            let asked = client
                .range_page(addr, range, from.clone(), max_bytes)
                .await;
            let mut page = match asked {
                Err(e @ ClientError::Rejected(WireError::ResponseTooLarge { max, .. })) => {
                    let smaller = max_bytes.unwrap_or(PAGE_BYTES as u64).min(max) / 2;
                    if smaller < MIN_PAGE_BYTES {
                        return Err(CopyError::Peer(e));
                    }
                    max_bytes = Some(smaller);
                    continue;
                }
                asked => asked.map_err(CopyError::Peer)?,
            };
            page.check(range).map_err(|e| {
                CopyError::Peer(ClientError::Protocol(format!(
                    "a bad page of range {}: {e}",
                    range.get()
                )))
            })?;
            rebuilt.pages += 1;
            let next = page.next.take();
            rebuilt.merged += storage
                .long_write(move |s| s.merge_range_page(&page))
                .await
                .map_err(|e| CopyError::Local(e.into()))?
                .map_err(|e| CopyError::Local(e.into()))?;
            match next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{NodeOptions, serve};
    use crate::storage::{PutRequest, StorageOptions};
    use std::time::Duration;

    /// An address nothing listens on.
    fn closed_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn open(dir: &tempfile::TempDir) -> Storage {
        Storage::open(dir.path(), StorageOptions::default()).unwrap()
    }

    /// Also: a replica whose frame limit is below a page is copied in smaller pages.
    #[tokio::test]
    async fn a_replica_that_does_not_answer_is_skipped_and_named() {
        const FRAME: usize = 64 * 1024;
        let (a_dir, w_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = open(&a_dir);
        for n in 0..300 {
            a.put(PutRequest::new(format!("k{n}"), "v")).unwrap();
        }
        // 200 KiB in one range: more than one answer of `FRAME` bytes can carry.
        let crowded = RangeId::new(7).unwrap();
        let keys = (0..).map(|n| format!("big/{n}"));
        for key in keys
            .filter(|k| RangeId::of(k.as_bytes()) == crowded)
            .take(200)
        {
            a.put(PutRequest::new(key, vec![b'v'; 1024])).unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_addr = listener.local_addr().unwrap().to_string();
        let (b_addr, w_addr) = (closed_addr(), closed_addr());
        let topology = Topology::blocks(
            1,
            [("a", &a_addr), ("b", &b_addr), ("w", &w_addr)]
                .map(|(n, addr)| (n.to_owned(), addr.clone())),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(serve(
            listener,
            a.clone(),
            NodeOptions::default()
                .topology(topology.clone())
                .max_frame(FRAME),
            async move {
                let _ = stopped.await;
            },
        ));
        let w = open(&w_dir);
        let options = ClientOptions::default().timeout(Duration::from_secs(10));
        let rebuilt = rebuild(&w, &topology, "w", options.clone()).await.unwrap();
        assert_eq!(rebuilt.ranges, 1024);
        assert_eq!(rebuilt.merged.changes, 500);
        assert!(
            rebuilt.pages >= 1024 + 200 * 1024 / FRAME,
            "{} pages",
            rebuilt.pages
        );
        assert_eq!(rebuilt.skipped.keys().collect::<Vec<_>>(), [&b_addr]);
        for r in RangeId::all() {
            assert_eq!(w.dump(r).unwrap(), a.dump(r).unwrap());
        }

        // With neither replica answering, nothing is copied and it says so.
        let _ = stop.send(());
        node.await.unwrap().unwrap();
        let err = rebuild(&w, &topology, "w", options).await.unwrap_err();
        assert!(
            matches!(
                err,
                RebuildError::Unreachable {
                    ranges: 1024,
                    first: 0,
                    ..
                }
            ),
            "{err}"
        );
        let unknown = rebuild(&w, &topology, "x", ClientOptions::default()).await;
        assert!(matches!(unknown, Err(RebuildError::UnknownNode(_))));
    }
}
