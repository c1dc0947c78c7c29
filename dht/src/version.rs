//! Identifiers that must be unique across nodes and restarts: value versions and list items.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// The identity of one stored version of a value.
///
/// A version is a UUID v7: 48 bits of milliseconds followed by 74 random bits, so two nodes (or
/// two lives of one node) never mint the same id without coordination, and ids sort roughly by
/// creation time, which is the order [`get`](crate::Storage::get) returns siblings in.
///
/// Its text form is the hyphenated UUID, which is what the CLI prints and parses:
///
/// ```
/// use rhinobus_dht::Version;
///
/// let v = Version::new();
/// let parsed: Version = v.to_string().parse().unwrap();
/// assert_eq!(v, parsed);
/// assert!("not-a-version".parse::<Version>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(Uuid);

impl Version {
    /// Mints a fresh, globally unique version.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The 16 bytes that identify this version (big-endian, sortable).
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Rebuilds a version from [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl Default for Version {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.0.hyphenated())
    }
}

/// The text was not a version id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a version id: {0:?} (expected a UUID such as 0190b6c4-3f1e-7c2a-9d5e-0123456789ab)")]
pub struct ParseVersionError(String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(Self)
            .map_err(|_| ParseVersionError(s.to_owned()))
    }
}

/// The identity of one item of a list (see [`Storage::add_item`](crate::Storage::add_item)).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(Uuid);

impl ItemId {
    /// Mints a fresh, globally unique item id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The 16 bytes that identify this item.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Rebuilds an item id from [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl Default for ItemId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemId({})", self.0.hyphenated())
    }
}

impl FromStr for ItemId {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(Self)
            .map_err(|_| ParseVersionError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn versions_are_unique_and_round_trip() {
        let all: HashSet<Version> = (0..10_000).map(|_| Version::new()).collect();
        assert_eq!(all.len(), 10_000);
        for v in all.iter().take(10) {
            assert_eq!(Version::from_bytes(v.to_bytes()), *v);
            assert_eq!(v.to_string().parse::<Version>().unwrap(), *v);
        }
    }

    #[test]
    fn versions_survive_messagepack() {
        let v = Version::new();
        let bytes = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(rmp_serde::from_slice::<Version>(&bytes).unwrap(), v);
    }
}
