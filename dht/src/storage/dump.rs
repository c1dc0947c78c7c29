//! Reading a whole range back out, to compare replicas.

use super::batch::{decode_item, decode_version, is_live, to_sibling};
use super::{ListItem, Sibling, Storage, StorageError, now_ms};
use crate::routing::RangeId;
use bytes::Bytes;
use fjall::{Keyspace, Readable, Snapshot};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Everything one key holds: its current siblings and its list items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDump {
    /// The key.
    pub key: Bytes,
    /// Current, unexpired siblings, by version.
    pub siblings: Vec<Sibling>,
    /// List items, by id.
    pub items: Vec<ListItem>,
}

/// The fjall key bounds of one range: digests whose top 10 bits are the range number.
fn bounds(range: RangeId) -> (Vec<u8>, Option<Vec<u8>>) {
    let start = u32::from(range.get()) << 22;
    let end = (u32::from(range.get()) + 1)
        .checked_shl(22)
        .filter(|e| *e != 0);
    (
        start.to_be_bytes().to_vec(),
        end.map(|e| e.to_be_bytes().to_vec()),
    )
}

/// The entries of `range` in `keyspace` (any keyspace keyed by digest first), from the first,
/// or from the one after key `after`. An `after` outside the range (a cursor from another
/// node) cannot widen it: one below starts at the range's start, one past its end reads
/// nothing.
pub(super) fn scan(
    snapshot: &Snapshot,
    keyspace: &Keyspace,
    range: RangeId,
    after: Option<&[u8]>,
) -> fjall::Iter {
    let (start, end) = bounds(range);
    let from = match after {
        Some(k) if k >= start.as_slice() => match &end {
            Some(end) if k >= end.as_slice() => Bound::Included(end.clone()),
            _ => Bound::Excluded(k.to_vec()),
        },
        _ => Bound::Included(start),
    };
    let end = end.map_or(Bound::Unbounded, Bound::Excluded);
    snapshot.range(keyspace, (from, end))
}

/// A fingerprint of one range as a node holds it: what its [`dump`](Storage::dump) shows, the
/// current siblings and list items. Two replicas show the same data for the range exactly when
/// their digests are equal (short of an MD5 collision). Tombstones are not in it, and expiry
/// is judged by each node's clock, so a value expiring right then can differ for a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDigest {
    /// How many keys hold siblings or list items.
    pub keys: u64,
    /// The MD5 digest of the range's [`dump`](Storage::dump), in hex.
    pub md5: String,
}

impl Storage {
    /// The [`RangeDigest`] of `range`: what comparing replicas needs, without sending their
    /// contents.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, RangeId, Storage, StorageError, StorageOptions};
    ///
    /// # fn main() -> Result<(), StorageError> {
    /// # let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    /// let (one, other) = (
    ///     Storage::open(a.path(), StorageOptions::default())?,
    ///     Storage::open(b.path(), StorageOptions::default())?,
    /// );
    /// one.put(PutRequest::new("hello", "world"))?;
    /// let range = RangeId::of(b"hello");
    /// assert_eq!(one.digest(range)?.keys, 1);
    /// assert_ne!(one.digest(range)?, other.digest(range)?);
    /// # Ok(()) }
    /// ```
    pub fn digest(&self, range: RangeId) -> Result<RangeDigest, StorageError> {
        let keys = self.dump(range)?;
        let mut md5 = Md5::new();
        for key in &keys {
            let bytes = rmp_serde::to_vec(key).map_err(|e| StorageError::Corrupt {
                what: "range digest",
                detail: format!("a key's dump cannot be encoded: {e}"),
            })?;
            md5.update(bytes);
        }
        Ok(RangeDigest {
            keys: keys.len() as u64,
            md5: md5.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// Every key of `range` with its siblings and items, ordered by key. Two replicas hold the
    /// same data for the range exactly when their dumps are equal.
    pub fn dump(&self, range: RangeId) -> Result<Vec<KeyDump>, StorageError> {
        let now = now_ms();
        // One snapshot for both keyspaces: whole batches only, the same moment for both.
        let snapshot = self.inner.db.snapshot();
        let mut keys: BTreeMap<Bytes, KeyDump> = BTreeMap::new();
        for kv in scan(&snapshot, &self.inner.versions, range, None) {
            let (k, v) = kv.into_inner()?;
            let (version, record) = decode_version(&k, &v)?;
            if is_live(&record, now) {
                let key = record.key.clone();
                let siblings: &mut Vec<Sibling> = &mut keys
                    .entry(key.clone())
                    .or_insert_with(|| KeyDump {
                        key,
                        ..KeyDump::default()
                    })
                    .siblings;
                siblings.push(to_sibling(version, record));
            }
        }
        for kv in scan(&snapshot, &self.inner.items, range, None) {
            let (k, v) = kv.into_inner()?;
            let (id, record) = decode_item(&k, &v)?;
            let key = record.key.clone();
            keys.entry(key.clone())
                .or_insert_with(|| KeyDump {
                    key,
                    ..KeyDump::default()
                })
                .items
                .push(ListItem {
                    id,
                    value: record.value,
                });
        }
        let mut out: Vec<KeyDump> = keys.into_values().collect();
        for k in &mut out {
            k.siblings.sort_by_key(|s| s.version);
            k.items.sort_by_key(|i| i.id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{AddItemRequest, PutRequest, StorageOptions};

    #[test]
    fn a_dump_holds_exactly_the_keys_of_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let v = s.put(PutRequest::new("hello", "world")).unwrap().version;
        s.add_item(AddItemRequest::new("hello", "item")).unwrap();
        s.put(PutRequest::new("user/1", "alice")).unwrap();
        let hello = s.dump(RangeId::of(b"hello")).unwrap();
        assert_eq!(hello.len(), 1);
        assert_eq!(hello[0].key, "hello");
        assert_eq!(hello[0].siblings[0].version, v);
        assert_eq!(hello[0].items.len(), 1);
        let empty = RangeId::new(0).unwrap();
        assert!(
            s.dump(empty)
                .unwrap()
                .iter()
                .all(|k| RangeId::of(&k.key) == empty)
        );
        let last = RangeId::new(1023).unwrap();
        assert!(
            s.dump(last)
                .unwrap()
                .iter()
                .all(|k| RangeId::of(&k.key) == last)
        );
    }
}
