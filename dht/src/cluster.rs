//! The cluster file: which nodes make up the cluster, by name and address, and the topology
//! it stands for. The topology is also stored in the DHT itself (under [`TOPOLOGY_KEY`] on every
//! node), so any node can answer for it and a newer stored topology wins over an older file.
//!
//! ```json
//! { "version": 1, "nodes": [ { "name": "n1", "addr": "10.0.0.1:7480" },
//!                            { "name": "n2", "addr": "10.0.0.2:7480" },
//!                            { "name": "n3", "addr": "10.0.0.3:7480" } ] }
//! ```

use crate::routing::Topology;
use crate::storage::{Change, Storage, StorageError};
use crate::version::Version;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where the topology lives in every node's table. The leading zero byte keeps it apart from
/// keys people choose.
pub const TOPOLOGY_KEY: &[u8] = b"\0rhinobus-dht/topology";

/// One node of the cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's name: letters, digits, `.`, `-` and `_`. Its replication queue is
    /// [`queue_name`]`(name)`.
    pub name: String,
    /// Where clients reach it (`host:port`).
    pub addr: String,
}

/// The cluster file: a version and the nodes in order. Ranges are laid out by
/// [`Topology::blocks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Bump it whenever the node list changes; clients with another version are told to
    /// refresh.
    pub version: u64,
    /// The nodes, in order.
    pub nodes: Vec<NodeSpec>,
}

/// A cluster file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The file could not be read.
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("cluster file is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// The content breaks a rule.
    #[error("cluster file: {0}")]
    Invalid(String),
    /// The node named on the command line is not in the file.
    #[error("node {0:?} is not in the cluster file")]
    UnknownNode(String),
    /// The stored topology could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The durable queue that carries replication to node `name`.
pub fn queue_name(name: &str) -> String {
    format!("rhinobus-dht.{name}")
}

impl ClusterSpec {
    /// Reads and checks a cluster file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ClusterError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks the JSON text of a cluster file.
    pub fn parse(text: &str) -> Result<Self, ClusterError> {
        let spec: Self = serde_json::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the rules: at least one node, names valid and unique, addresses unique, version
    /// above zero (zero is what a client that knows nothing sends).
    pub fn validate(&self) -> Result<(), ClusterError> {
        let invalid = |m: String| Err(ClusterError::Invalid(m));
        if self.version == 0 {
            return invalid("version must be at least 1".into());
        }
        if self.nodes.is_empty() {
            return invalid("no nodes".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let ok = !n.name.is_empty()
                && n.name.len() <= 200
                && n.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok {
                return invalid(format!(
                    "node name {:?} must be 1-200 letters, digits, '.', '-' or '_'",
                    n.name
                ));
            }
            if n.addr.is_empty() {
                return invalid(format!("node {:?} has no address", n.name));
            }
            if self.nodes[..i].iter().any(|m| m.name == n.name) {
                return invalid(format!("node name {:?} appears twice", n.name));
            }
            if self.nodes[..i].iter().any(|m| m.addr == n.addr) {
                return invalid(format!("address {:?} appears twice", n.addr));
            }
        }
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeSpec, ClusterError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ClusterError::UnknownNode(name.to_owned()))
    }

    /// The topology this file stands for.
    pub fn topology(&self) -> Topology {
        Topology::blocks(
            self.version,
            self.nodes.iter().map(|n| (n.name.clone(), n.addr.clone())),
        )
    }
}

/// The version id a topology is stored under: derived from the topology version, so every
/// node stores the same record and replicas stay byte-for-byte comparable.
fn topology_version_id(version: u64) -> Version {
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&version.to_be_bytes());
    Version::from_bytes(b)
}

/// The newest valid topology stored in `storage`, if any.
///
/// A stored record that cannot be decoded or fails [`Topology::validate`] is logged and
/// skipped, never trusted: the file's topology then replaces it (see [`store_topology`]).
pub fn stored_topology(storage: &Storage) -> Result<Option<Topology>, ClusterError> {
    let mut best: Option<Topology> = None;
    for s in storage.get(TOPOLOGY_KEY)? {
        let t = match rmp_serde::from_slice::<Topology>(&s.value) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(version = %s.version, error = %e, "stored topology cannot be decoded; ignored");
                continue;
            }
        };
        if let Err(e) = t.validate() {
            tracing::error!(version = %s.version, topology = t.version, error = %e, "stored topology is invalid; ignored");
            continue;
        }
        if best.as_ref().is_none_or(|b| t.version > b.version) {
            best = Some(t);
        }
    }
    Ok(best)
}

/// Stores `topology` in the table unless a newer one is there already, and returns the one in
/// force (the newer of the two). Older stored versions are superseded.
pub fn store_topology(storage: &Storage, topology: &Topology) -> Result<Topology, ClusterError> {
    if let Some(stored) = stored_topology(storage)?
        && stored.version >= topology.version
    {
        return Ok(stored);
    }
    let value = rmp_serde::to_vec_named(topology)
        .map_err(|e| ClusterError::Invalid(format!("topology cannot be encoded: {e}")))?;
    // Every sibling but one stored under this very version (one that no longer decodes or
    // validates): naming it as a parent would tombstone the version being written. Left out,
    // it is overwritten in place.
    let version = topology_version_id(topology.version);
    let parents = storage
        .get(TOPOLOGY_KEY)?
        .into_iter()
        .map(|s| s.version)
        .filter(|v| *v != version)
        .collect();
    let change = Change::Put {
        key: Bytes::from_static(TOPOLOGY_KEY),
        version,
        parents,
        value: Bytes::from(value),
        expires_at: None,
    };
    storage.batch(|b| b.apply_change(&change))?;
    Ok(topology.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageOptions;

    const FILE: &str = r#"{"version": 3, "nodes": [
        {"name": "n1", "addr": "h:1"}, {"name": "n2", "addr": "h:2"}, {"name": "n3", "addr": "h:3"}]}"#;

    #[test]
    fn a_cluster_file_becomes_a_block_topology() {
        let spec = ClusterSpec::parse(FILE).unwrap();
        let t = spec.topology();
        assert_eq!(t.version, 3);
        assert_eq!(t.names, ["n1", "n2", "n3"]);
        assert_eq!(spec.node("n2").unwrap().addr, "h:2");
        assert!(matches!(spec.node("n9"), Err(ClusterError::UnknownNode(_))));
        assert_eq!(queue_name("n1"), "rhinobus-dht.n1");
    }

    #[test]
    fn bad_cluster_files_are_refused() {
        for bad in [
            r#"{"version": 0, "nodes": [{"name": "a", "addr": "h:1"}]}"#,
            r#"{"version": 1, "nodes": []}"#,
            r#"{"version": 1, "nodes": [{"name": "a b", "addr": "h:1"}]}"#,
            r#"{"version": 1, "nodes": [{"name": "a", "addr": "h:1"}, {"name": "a", "addr": "h:2"}]}"#,
            r#"{"version": 1, "nodes": [{"name": "a", "addr": "h:1"}, {"name": "b", "addr": "h:1"}]}"#,
            r#"{"version": 1}"#,
            "not json",
        ] {
            assert!(ClusterSpec::parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn the_newest_topology_wins_and_is_stored_identically_everywhere() {
        let spec = ClusterSpec::parse(FILE).unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = Storage::open(a.path(), StorageOptions::default()).unwrap();
        let sb = Storage::open(b.path(), StorageOptions::default()).unwrap();
        let mut newer = spec.topology();
        newer.version = 4;
        assert_eq!(store_topology(&sa, &newer).unwrap().version, 4);
        // An older file does not replace a newer stored topology.
        assert_eq!(store_topology(&sa, &spec.topology()).unwrap().version, 4);
        store_topology(&sb, &spec.topology()).unwrap();
        store_topology(&sb, &newer).unwrap();
        assert_eq!(sa.get(TOPOLOGY_KEY).unwrap(), sb.get(TOPOLOGY_KEY).unwrap());
        assert_eq!(stored_topology(&sb).unwrap(), Some(newer));
    }

    #[test]
    fn an_invalid_stored_topology_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let mut forged = ClusterSpec::parse(FILE).unwrap().topology();
        forged.version = 99;
        forged.ranges.truncate(3);
        let forged = rmp_serde::to_vec_named(&forged).unwrap();
        for value in [forged, b"not a topology".to_vec()] {
            s.put(crate::storage::PutRequest::new(TOPOLOGY_KEY, value))
                .unwrap();
        }
        assert_eq!(stored_topology(&s).unwrap(), None);
        let file = ClusterSpec::parse(FILE).unwrap().topology();
        assert_eq!(store_topology(&s, &file).unwrap(), file);
        assert_eq!(
            s.get(TOPOLOGY_KEY).unwrap().len(),
            1,
            "the bad ones are superseded"
        );
        assert_eq!(stored_topology(&s).unwrap(), Some(file));
    }

    #[test]
    fn an_invalid_topology_stored_under_the_files_version_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let file = ClusterSpec::parse(FILE).unwrap().topology();
        // As a record written by a build whose topologies the current one no longer accepts.
        let bad = Change::Put {
            key: Bytes::from_static(TOPOLOGY_KEY),
            version: topology_version_id(file.version),
            parents: vec![],
            value: Bytes::from_static(b"not a topology"),
            expires_at: None,
        };
        s.batch(|b| b.apply_change(&bad)).unwrap();
        assert_eq!(stored_topology(&s).unwrap(), None);
        assert_eq!(store_topology(&s, &file).unwrap(), file);
        assert_eq!(
            stored_topology(&s).unwrap(),
            Some(file),
            "stored, not tombstoned"
        );
        assert_eq!(s.get(TOPOLOGY_KEY).unwrap().len(), 1);
    }
}
