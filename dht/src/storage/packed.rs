//! Changes packed as their MessagePack encodings: encoded once, when a write stages its
//! replication, then copied as they are into the outbox record and into every replication
//! message, and applied on the other replicas straight from the message's bytes.
//!
//! A change is encoded exactly as serde encodes a [`Change`] (named fields), so a run of them
//! behind an array header is what a `Vec<Change>` encodes to, and readers of either form
//! agree. What this saves over values: no copy of each key and value per destination, no
//! encoding per message, and, on the receiving side, no allocation per key and value
//! ([`ChangeRef`] borrows them from the message).

use super::{Change, StorageError};
use crate::routing::RangeId;
use crate::version::{ItemId, Version};
use serde::Deserialize;
use std::time::SystemTime;

/// A [`Change`] borrowed from its encoding: what a replica applies, with
/// [`Batch::apply_change_ref`](super::Batch::apply_change_ref), without copying keys and values
/// out of the message first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum ChangeRef<'a> {
    /// [`Change::Put`].
    Put {
        /// The key.
        key: &'a [u8],
        /// The new version.
        version: Version,
        /// Versions it supersedes.
        parents: Vec<Version>,
        /// The value.
        value: &'a [u8],
        /// When it expires.
        expires_at: Option<SystemTime>,
    },
    /// [`Change::Remove`].
    Remove {
        /// The key.
        key: &'a [u8],
        /// The removed versions.
        parents: Vec<Version>,
    },
    /// [`Change::AddItem`].
    AddItem {
        /// The list's key.
        key: &'a [u8],
        /// The item's id.
        id: ItemId,
        /// The item.
        value: &'a [u8],
    },
    /// [`Change::RemoveItem`].
    RemoveItem {
        /// The list's key.
        key: &'a [u8],
        /// The item's id.
        id: ItemId,
    },
}

impl<'a> ChangeRef<'a> {
    /// The key the change touches.
    pub fn key(&self) -> &'a [u8] {
        match self {
            ChangeRef::Put { key, .. }
            | ChangeRef::Remove { key, .. }
            | ChangeRef::AddItem { key, .. }
            | ChangeRef::RemoveItem { key, .. } => key,
        }
    }
}

impl<'a> From<&'a Change> for ChangeRef<'a> {
    fn from(change: &'a Change) -> Self {
        match change {
            Change::Put {
                key,
                version,
                parents,
                value,
                expires_at,
            } => ChangeRef::Put {
                key,
                version: *version,
                parents: parents.clone(),
                value,
                expires_at: *expires_at,
            },
            Change::Remove { key, parents } => ChangeRef::Remove {
                key,
                parents: parents.clone(),
            },
            Change::AddItem { key, id, value } => ChangeRef::AddItem {
                key,
                id: *id,
                value,
            },
            Change::RemoveItem { key, id } => ChangeRef::RemoveItem { key, id: *id },
        }
    }
}

/// Decodes a MessagePack array of changes (what [`write_array`] wrote, or a
/// serde-encoded `Vec<Change>`), borrowing keys and values from `bytes`.
///
/// ```
/// use rhinobus_dht::storage::{ChangeRef, PackedChanges, unpack_array, write_array};
/// use rhinobus_dht::{Change, Version};
///
/// let put = Change::Put {
///     key: "k".into(),
///     version: Version::new(),
///     parents: vec![],
///     value: "v".into(),
///     expires_at: None,
/// };
/// let packed = PackedChanges::pack(std::slice::from_ref(&put)).unwrap();
/// let mut message = Vec::new();
/// write_array(packed.iter().map(|(_, bytes)| bytes), &mut message);
/// assert_eq!(message, rmp_serde::to_vec_named(&vec![put.clone()]).unwrap());
/// assert_eq!(unpack_array(&message).unwrap(), vec![ChangeRef::from(&put)]);
/// ```
pub fn unpack_array(bytes: &[u8]) -> Result<Vec<ChangeRef<'_>>, StorageError> {
    rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        what: "packed changes",
        detail: e.to_string(),
    })
}

/// Changes encoded one after the other, each with the range of its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedChanges {
    bytes: Vec<u8>,
    /// Per change: the range of its key and where its encoding ends in `bytes`.
    ends: Vec<(RangeId, usize)>,
}

impl PackedChanges {
    /// Encodes `changes`. Fails only for a time MessagePack cannot hold (an expiry before
    /// 1970, which [`Batch::put`](super::Batch::put) never records).
    pub fn pack(changes: &[Change]) -> Result<Self, StorageError> {
        let size = changes.iter().map(Change::encoded_size).sum();
        let mut packed = Self {
            bytes: Vec::with_capacity(size),
            ends: Vec::with_capacity(changes.len()),
        };
        for change in changes {
            rmp_serde::encode::write_named(&mut packed.bytes, change).map_err(|e| {
                StorageError::Corrupt {
                    what: "change to replicate",
                    detail: e.to_string(),
                }
            })?;
            let end = packed.bytes.len();
            packed.ends.push((RangeId::of(change.key()), end));
        }
        Ok(packed)
    }

    /// How many changes.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// How many bytes their encodings take.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The encoding of change `n`.
    ///
    /// # Panics
    /// When there are not that many changes.
    pub fn encoded(&self, n: usize) -> &[u8] {
        let start = n.checked_sub(1).map_or(0, |before| self.ends[before].1);
        &self.bytes[start..self.ends[n].1]
    }

    /// Each change's key range and encoding, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (RangeId, &[u8])> + Clone {
        (0..self.ends.len()).map(|n| (self.ends[n].0, self.encoded(n)))
    }
}

/// Appends to `out` a MessagePack array of the encoded changes `pieces` (taken from
/// [`PackedChanges::iter`] of one or more packs): what a `Vec<Change>` of them encodes to.
pub fn write_array<'a>(pieces: impl ExactSizeIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    write_array_len(pieces.len(), out);
    for piece in pieces {
        out.extend_from_slice(piece);
    }
}

/// Appends to `out` the header of a MessagePack array of `len` values.
pub(crate) fn write_array_len(len: usize, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail; an array longer than u32::MAX is not something a
    // message or a record ever holds.
    let _ = rmp::encode::write_array_len(out, u32::try_from(len).unwrap_or(u32::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{PutRequest, Storage, StorageOptions};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_time_messagepack_cannot_hold_is_an_error_not_a_gap() {
        let before_1970 = Change::Put {
            key: "k".into(),
            version: Version::new(),
            parents: vec![],
            value: "v".into(),
            expires_at: Some(UNIX_EPOCH - Duration::from_secs(1)),
        };
        assert!(PackedChanges::pack(&[before_1970]).is_err());
        // A put records such an expiry as 1970: long past, and encodable.
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let changes = s
            .batch(|b| {
                b.put(PutRequest {
                    expires_at: Some(UNIX_EPOCH - Duration::from_secs(1)),
                    ..PutRequest::new("k", "v")
                })?;
                Ok::<_, StorageError>(b.take_changes())
            })
            .unwrap();
        assert!(matches!(&changes[0], Change::Put { expires_at: Some(t), .. } if *t == UNIX_EPOCH));
        let packed = PackedChanges::pack(&changes).unwrap();
        assert_eq!(packed.len(), 1);
        assert!(s.get(b"k").unwrap().is_empty(), "expired");
    }
}
