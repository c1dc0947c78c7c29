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
    /// Exactly [`RANGE_COUNT`] entries, indexed by range number.
    pub ranges: Vec<RangeAssignment>,
}

/// A topology that cannot be routed by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The range table does not have one entry per range.
    #[error("topology has {0} ranges, expected {RANGE_COUNT}")]
    RangeCount(usize),
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
            ranges: (0..RANGE_COUNT)
                .map(|_| RangeAssignment {
                    primary: 0,
                    secondary: None,
                    tertiary: None,
                })
                .collect(),
        }
    }

    /// Checks that every range is assigned to a known node.
    pub fn validate(&self) -> Result<(), TopologyError> {
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
