//! [`NodeStatus`]: what a node reports about itself (`rhinobus-dht status`), for operators
//! watching replication fall behind while a peer or the broker is away.

use crate::replication::ReplicationOutbox;
use crate::routing::Topology;
use serde::{Deserialize, Serialize};

/// A node's own account of itself, as [`Client::status`](crate::Client::status) returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The version of the topology the node serves.
    pub topology: u64,
    /// The node's name in that topology; `None` for a node that does not replicate.
    #[serde(default)]
    pub node: Option<String>,
    /// For each other node, in name order, the writes this one accepted whose replication there
    /// the broker has not confirmed yet: each put, remove and list item change (a client's
    /// batch counts each of its writes) of a key that node holds a replica of. They are on
    /// this node's disk meanwhile: a backlog that grows means the broker or that node's queue
    /// is out of reach. Empty for a node that does not replicate.
    #[serde(default)]
    pub backlog: Vec<Backlog>,
    /// At most how many bytes of memory the outbox's queues take (see
    /// [`ReplicationOutbox::queued_bytes`]).
    #[serde(default)]
    pub outbox_bytes: u64,
}

/// Replication owed to one destination; see [`NodeStatus::backlog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    /// The destination's name in the topology.
    pub destination: String,
    /// Writes whose replication to it is not confirmed yet.
    pub pending: u64,
}

impl NodeStatus {
    /// The status of a node serving `topology`, replicating through `outbox` if it does.
    pub fn of(topology: &Topology, outbox: Option<&ReplicationOutbox>) -> Self {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Self {
            topology: topology.version,
            node: outbox.map(|o| o.node().to_owned()),
            backlog: outbox
                .map(|o| {
                    o.pending_by_destination()
                        .into_iter()
                        .map(|(destination, pending)| Backlog {
                            destination,
                            pending: count(pending),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            outbox_bytes: outbox.map_or(0, |o| count(o.queued_bytes())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Request, Response};
    use crate::request::{execute, execute_replicated};
    use crate::routing::RangeId;
    use crate::storage::{Op, PutRequest, Storage, StorageOptions};
    use std::sync::Arc;

    fn status(response: Response) -> NodeStatus {
        match response {
            Response::Status(s) => s,
            other => panic!("expected a status, got {other:?}"),
        }
    }

    #[test]
    fn a_node_reports_what_it_still_owes_each_peer() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology = Topology::blocks(1, [("a", "a:1"), ("b", "b:1"), ("c", "c:1")]);
        let outbox =
            ReplicationOutbox::open(storage.clone(), "a", Arc::new(topology.clone())).unwrap();
        let ask = || {
            let r = execute_replicated(&storage, &topology, Some(&outbox), Request::Status);
            status(r.unwrap())
        };
        let before = ask();
        assert_eq!(before.node.as_deref(), Some("a"));
        assert_eq!(before.topology, topology.version);
        let pending: Vec<_> = before.backlog.iter().map(|b| b.pending).collect();
        assert_eq!(pending, [0, 0]);

        // No senders run: two writes stay owed to both other replicas.
        for key in ["k1", "k2"] {
            let put = Request::Put(PutRequest::new(key, "v"));
            execute_replicated(&storage, &topology, Some(&outbox), put).unwrap();
        }
        let after = ask();
        let backlog: Vec<_> = after
            .backlog
            .iter()
            .map(|b| (b.destination.as_str(), b.pending))
            .collect();
        assert_eq!(backlog, [("b", 2), ("c", 2)]);
        assert!(after.outbox_bytes > before.outbox_bytes);
    }

    /// In a cluster of four, one batch of writes to keys of many ranges: each peer is owed the
    /// writes to the ranges it holds a replica of, until the broker confirms them.
    #[test]
    fn each_peer_is_owed_the_writes_to_its_own_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology =
            Topology::blocks(1, [("a", "a:1"), ("b", "b:1"), ("c", "c:1"), ("d", "d:1")]);
        let outbox =
            ReplicationOutbox::open(storage.clone(), "a", Arc::new(topology.clone())).unwrap();
        let keys: Vec<String> = (0..40).map(|i| format!("key/{i}")).collect();
        let ops = (keys.iter())
            .map(|k| Op::Put(PutRequest::new(k.clone(), "v")))
            .collect();
        execute_replicated(&storage, &topology, Some(&outbox), Request::Batch { ops }).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for key in &keys {
            for i in topology.replica_indexes(RangeId::of(key.as_bytes())) {
                let name = &topology.names[i as usize];
                if name != "a" {
                    *expected.entry(name.clone()).or_insert(0u64) += 1;
                }
            }
        }
        let r = execute_replicated(&storage, &topology, Some(&outbox), Request::Status);
        let owed: std::collections::BTreeMap<_, _> = (status(r.unwrap()).backlog.into_iter())
            .map(|b| (b.destination, b.pending))
            .collect();
        assert_eq!(owed, expected);
        assert_eq!(owed.len(), 3, "40 keys reach every other node: {owed:?}");
        assert!(
            owed.values().all(|&n| n < 40),
            "nobody holds every range: {owed:?}"
        );
    }

    #[test]
    fn a_node_that_does_not_replicate_owes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology = Topology::single("a:1");
        let s = status(execute(&storage, &topology, Request::Status).unwrap());
        assert_eq!(s.node, None);
        assert!(s.backlog.is_empty());
        assert_eq!(s.outbox_bytes, 0);
    }
}
