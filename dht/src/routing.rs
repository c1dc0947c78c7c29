//! Which node serves a key: the 1024 hash ranges and the versioned topology that maps them to
//! nodes.

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// How many ranges the hash space is cut into.
pub const RANGE_COUNT: u16 = 1024;

/// One of the [`RANGE_COUNT`] slices of the MD5 hash space (4,194,304 hashes each).
///
/// MD5 is used because it is the same on every machine and platform, not for security.
///
/// ```
/// use rhinobus_dht::RangeId;
///
/// assert_eq!(RangeId::of(b"hello").get(), 373);
/// assert_eq!(RangeId::of(b"").get(), 848);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RangeId(u16);

impl RangeId {
    /// The range a key belongs to: the top 10 bits of the key's MD5 digest.
    pub fn of(key: &[u8]) -> Self {
        Self::from_digest(&key_digest(key))
    }

    /// The range of an already computed MD5 digest.
    pub fn from_digest(digest: &[u8; 16]) -> Self {
        let top = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        // The shift leaves 10 bits, so the value always fits.
        Self((top >> 22) as u16)
    }

    /// The range with this number, if it is below [`RANGE_COUNT`].
    pub fn new(n: u16) -> Option<Self> {
        (n < RANGE_COUNT).then_some(Self(n))
    }

    /// The range number, `0..1024`.
    pub fn get(self) -> u16 {
        self.0
    }

    /// Every range in order.
    pub fn all() -> impl Iterator<Item = RangeId> {
        (0..RANGE_COUNT).map(Self)
    }
}

/// The MD5 digest of a key; storage orders keys by it, so a range is a contiguous slice on disk.
pub fn key_digest(key: &[u8]) -> [u8; 16] {
    Md5::digest(key).into()
}

/// Where one range lives: a primary and optional failover nodes (indexes into
/// [`Topology::nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeAssignment {
    /// The node that normally serves the range.
    pub primary: u32,
    /// The first failover node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<u32>,
    /// The second failover node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tertiary: Option<u32>,
}

/// The cluster layout a client routes by: node addresses, the owner of every range, and a
/// version that changes whenever the layout does.
///
/// Every request carries the version the client routed with; a node with a different version
/// answers `TopologyChanged` and the client refreshes its copy.
///
/// ```
/// use rhinobus_dht::{RangeId, Topology};
///
/// let t = Topology::single("127.0.0.1:7480");
/// assert_eq!(t.primary(RangeId::of(b"user/1")), Some("127.0.0.1:7480"));
/// assert!(t.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Changes whenever anything else here changes.
    pub version: u64,
    /// Node addresses (`host:port`).
    pub nodes: Vec<String>,
    /// Node names, in the order of [`nodes`](Self::nodes): what replication addresses a node
    /// by (its queue is named after it). Empty for a node that does not replicate.
    #[serde(default)]
    pub names: Vec<String>,
    /// Exactly [`RANGE_COUNT`] entries, indexed by range number.
    pub ranges: Vec<RangeAssignment>,
}

/// A topology that cannot be routed by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The range table does not have one entry per range.
    #[error("topology has {0} ranges, expected {RANGE_COUNT}")]
    RangeCount(usize),
    /// Node names are given, but not one per node address.
    #[error("topology has {names} node names for {nodes} nodes")]
    NameCount {
        /// How many names there are.
        names: usize,
        /// How many node addresses there are.
        nodes: usize,
    },
    /// A range names a node that is not in the node list.
    #[error("range {range} refers to node #{node}, but there are only {nodes} nodes")]
    UnknownNode {
        /// The range number.
        range: u16,
        /// The node index it refers to.
        node: u32,
        /// How many nodes there are.
        nodes: usize,
    },
}

impl Topology {
    /// One node serving every range, at version 1.
    pub fn single(addr: impl Into<String>) -> Self {
        Self {
            version: 1,
            nodes: vec![addr.into()],
            names: Vec::new(),
            ranges: (0..RANGE_COUNT)
                .map(|_| RangeAssignment {
                    primary: 0,
                    secondary: None,
                    tertiary: None,
                })
                .collect(),
        }
    }

    /// The layout of Rhino DHT's four-node example, for any number of nodes: the ranges are cut
    /// into one contiguous block per node, in order; node `i` is primary of block `i`, and the
    /// nodes before it in the list (wrapping around) are its secondary and tertiary. With four
    /// nodes, node 1 is primary of 0–255, secondary of 256–511 and tertiary of 512–767.
    ///
    /// `nodes` are `(name, address)` pairs. With fewer than three nodes, ranges have fewer
    /// replicas.
    ///
    /// ```
    /// use rhinobus_dht::{RangeId, Topology};
    ///
    /// let t = Topology::blocks(1, [("a", "h:1"), ("b", "h:2"), ("c", "h:3"), ("d", "h:4")]);
    /// assert_eq!(t.replicas(RangeId::new(0).unwrap()), ["h:1", "h:4", "h:3"]);
    /// assert_eq!(t.replicas(RangeId::new(300).unwrap()), ["h:2", "h:1", "h:4"]);
    /// ```
    pub fn blocks<N: Into<String>, A: Into<String>>(
        version: u64,
        nodes: impl IntoIterator<Item = (N, A)>,
    ) -> Self {
        let (names, nodes): (Vec<String>, Vec<String>) =
            nodes.into_iter().map(|(n, a)| (n.into(), a.into())).unzip();
        let n = nodes.len().max(1) as u32;
        let count = u32::from(RANGE_COUNT);
        let ranges = (0..count)
            .map(|r| {
                let primary = r * n / count;
                let back = |k: u32| (k < n).then(|| (primary + n - k) % n);
                RangeAssignment {
                    primary,
                    secondary: back(1),
                    tertiary: back(2),
                }
            })
            .collect();
        Self {
            version,
            nodes,
            names,
            ranges,
        }
    }

    /// The indexes of the nodes that hold `range`, primary first.
    pub fn replica_indexes(&self, range: RangeId) -> impl Iterator<Item = u32> {
        let a = self.ranges.get(usize::from(range.get()));
        a.into_iter()
            .flat_map(|a| [Some(a.primary), a.secondary, a.tertiary])
            .flatten()
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Checks that every range is assigned to a known node, and that node names, when given,
    /// match the node addresses one for one.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if !self.names.is_empty() && self.names.len() != self.nodes.len() {
            return Err(TopologyError::NameCount {
                names: self.names.len(),
                nodes: self.nodes.len(),
            });
        }
        if self.ranges.len() != usize::from(RANGE_COUNT) {
            return Err(TopologyError::RangeCount(self.ranges.len()));
        }
        for (range, a) in (0u16..).zip(&self.ranges) {
            for node in [Some(a.primary), a.secondary, a.tertiary]
                .into_iter()
                .flatten()
            {
                if node as usize >= self.nodes.len() {
                    return Err(TopologyError::UnknownNode {
                        range,
                        node,
                        nodes: self.nodes.len(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The address of the node that serves `range` first, if the topology is valid.
    pub fn primary(&self, range: RangeId) -> Option<&str> {
        let a = self.ranges.get(usize::from(range.get()))?;
        self.nodes.get(a.primary as usize).map(String::as_str)
    }

    /// The addresses that serve `range`, primary first, then the failovers.
    pub fn replicas(&self, range: RangeId) -> Vec<&str> {
        let Some(a) = self.ranges.get(usize::from(range.get())) else {
            return Vec::new();
        };
        [Some(a.primary), a.secondary, a.tertiary]
            .into_iter()
            .flatten()
            .filter_map(|n| self.nodes.get(n as usize).map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_ranges() {
        // Pinned by DESIGN.md: other implementations and tools route by the same numbers.
        assert_eq!(RangeId::of(b"").get(), 848);
        assert_eq!(RangeId::of(b"hello").get(), 373);
        assert_eq!(RangeId::of(b"user/1").get(), 456);
        assert_eq!(RangeId::of(b"555-5421").get(), 978);
    }

    #[test]
    fn range_bounds() {
        assert!(RangeId::new(1023).is_some());
        assert!(RangeId::new(1024).is_none());
        assert_eq!(RangeId::all().count(), 1024);
    }

    #[test]
    fn single_node_topology_routes_everything_to_it() {
        let t = Topology::single("a:1");
        t.validate().unwrap();
        assert!(RangeId::all().all(|r| t.primary(r) == Some("a:1")));
        assert_eq!(t.replicas(RangeId::of(b"x")), vec!["a:1"]);
    }

    #[test]
    fn four_nodes_are_laid_out_as_in_the_rhino_dht_post() {
        let t = Topology::blocks(1, (1..=4).map(|i| (format!("n{i}"), format!("h:{i}"))));
        t.validate().unwrap();
        let at = |r: u16| t.replicas(RangeId::new(r).unwrap());
        // Node 1: primary 0-256, secondary 256-512, tertiary 512-768; and so on.
        assert_eq!(at(0), ["h:1", "h:4", "h:3"]);
        assert_eq!(at(255), ["h:1", "h:4", "h:3"]);
        assert_eq!(at(256), ["h:2", "h:1", "h:4"]);
        assert_eq!(at(512), ["h:3", "h:2", "h:1"]);
        assert_eq!(at(1023), ["h:4", "h:3", "h:2"]);
    }

    #[test]
    fn uneven_and_small_clusters_cover_every_range() {
        let three = Topology::blocks(2, [("a", "1"), ("b", "2"), ("c", "3")]);
        three.validate().unwrap();
        for r in RangeId::all() {
            let mut replicas: Vec<_> = three.replica_indexes(r).collect();
            replicas.sort();
            assert_eq!(replicas, [0, 1, 2]);
        }
        let one = Topology::blocks(1, [("a", "1")]);
        one.validate().unwrap();
        assert!(RangeId::all().all(|r| one.replicas(r) == ["1"]));
        assert_eq!(one.index_of("a"), Some(0));
        assert_eq!(one.index_of("z"), None);
    }

    #[test]
    fn invalid_topologies_are_reported() {
        let mut t = Topology::single("a:1");
        t.ranges[5].secondary = Some(3);
        assert_eq!(
            t.validate(),
            Err(TopologyError::UnknownNode {
                range: 5,
                node: 3,
                nodes: 1
            })
        );
        t.ranges.pop();
        assert_eq!(t.validate(), Err(TopologyError::RangeCount(1023)));
    }
}
