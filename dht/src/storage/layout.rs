//! How the hash table sits in fjall: keyspaces, key encodings and record formats.
//!
//! Every fjall key starts with the MD5 digest of the user key, not the key itself:
//! - keys of any content and any length up to 64 KiB fit fjall's own key limit (65,536 bytes),
//!   and every fjall key has a fixed size, so prefixes never overlap ("a" is not a prefix of "ab");
//! - a routing range is the top 10 bits of the same digest, so one range is one contiguous slice
//!   of every keyspace, which is what moving a range to another node needs.
//!
//! Two user keys with the same digest would share a slice; every record therefore stores its full
//! user key and readers skip records whose key differs. Collisions cost a little time, never
//! correctness.
//!
//! Keyspaces:
//! - `versions`: `digest ++ version` → [`VersionRecord`] (the current siblings of each key)
//! - `superseded`: `digest ++ version-or-item-id` → superseded-at milliseconds (big-endian u64).
//!   Kept so that a replicated write that arrives after its successor is recognised and dropped
//!   instead of resurrected, until it is older than the node's tombstone grace.
//! - `superseded-by-time`: `superseded-at ms ++ digest ++ id` → empty (which tombstones to purge
//!   once they are older than the grace, in time order; a tombstone written again leaves its
//!   older entry behind, and the purge skips a tombstone whose time differs from the entry's)
//! - `expiry`: `expires-at ms ++ digest ++ version` → empty (what to clean up, in time order)
//! - `items`: `digest ++ item id` → [`ItemRecord`] (list items)
//! - `outbox`, `outbox-1`: `record id` → MessagePack `{ destinations, changes }`, one record
//!   per storage batch (replication not yet confirmed by the broker; see
//!   [`OutboxRecord`](super::OutboxRecord)); two generations, used in turn and cleared whole
//!   once their records are confirmed (see `outbox_generations`).
//! - `outbox-corrupt`: outbox records that could not be decoded, moved here unchanged.

use crate::routing::key_digest;
use crate::version::{ItemId, Version};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Digest plus a 16-byte id.
pub(crate) type EntryKey = [u8; 32];

pub(crate) fn entry_key(digest: &[u8; 16], id: [u8; 16]) -> EntryKey {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(digest);
    k[16..].copy_from_slice(&id);
    k
}

pub(crate) fn version_key(key: &[u8], version: Version) -> EntryKey {
    entry_key(&key_digest(key), version.to_bytes())
}

pub(crate) fn item_key(key: &[u8], id: ItemId) -> EntryKey {
    entry_key(&key_digest(key), id.to_bytes())
}

/// The id half of an entry key.
pub(crate) fn id_of(entry: &[u8]) -> Option<[u8; 16]> {
    entry.get(16..32)?.try_into().ok()
}

/// A time index key (`expiry`, `superseded-by-time`): the time first, so keys sort by it.
pub(crate) fn timed_key(at_ms: u64, entry: &EntryKey) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(entry);
    k
}

/// Splits a time index key back into its parts.
pub(crate) fn parse_timed_key(k: &[u8]) -> Option<(u64, EntryKey)> {
    let ms = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let entry: EntryKey = k.get(8..40)?.try_into().ok()?;
    Some((ms, entry))
}

/// One version of a value as stored. Named MessagePack fields so that later fields can be added
/// without rewriting old data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VersionRecord {
    pub key: Bytes,
    pub value: Bytes,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// One list item as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ItemRecord {
    pub key: Bytes,
    pub value: Bytes,
}

/// Borrowed bytes, encoded as MessagePack bin, as [`Bytes`] is.
struct Bin<'a>(&'a [u8]);

impl Serialize for Bin<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A [`VersionRecord`] encoded from borrowed parts: the same bytes, no copies of the key and
/// value into a record first.
#[derive(Serialize)]
struct VersionRecordRef<'a> {
    key: Bin<'a>,
    value: Bin<'a>,
    expires_at_ms: Option<u64>,
}

/// An [`ItemRecord`] encoded from borrowed parts.
#[derive(Serialize)]
struct ItemRecordRef<'a> {
    key: Bin<'a>,
    value: Bin<'a>,
}

/// Field names, markers, an expiry: what a record adds to its key and value.
const RECORD_FRAMING: usize = 48;

/// Writes the stored form of a [`VersionRecord`] of `key` and `value` into `buf`, replacing
/// what it held: a batch encodes every record into one buffer it reuses, and copies each out
/// once, into the slice fjall stores. Replicas encode one per change they apply.
pub(crate) fn encode_version_record(
    buf: &mut Vec<u8>,
    key: &[u8],
    value: &[u8],
    expires_at_ms: Option<u64>,
) {
    let record = VersionRecordRef {
        key: Bin(key),
        value: Bin(value),
        expires_at_ms,
    };
    encode_into(buf, &record, key.len() + value.len());
}

/// Writes the stored form of an [`ItemRecord`] of `key` and `value` into `buf`, replacing what
/// it held.
pub(crate) fn encode_item_record(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let record = ItemRecordRef {
        key: Bin(key),
        value: Bin(value),
    };
    encode_into(buf, &record, key.len() + value.len());
}

/// Encodes `record`, whose byte fields add up to `content` bytes, into `buf`, grown once to
/// fit (not a few bytes at a time).
fn encode_into<T: Serialize>(buf: &mut Vec<u8>, record: &T, content: usize) {
    buf.clear();
    buf.reserve(content + RECORD_FRAMING);
    // Serialising these plain structs into a Vec cannot fail: no maps with non-string keys, no
    // I/O. An empty record would be caught as corrupt on the way back in.
    if rmp_serde::encode::write_named(buf, record).is_err() {
        buf.clear();
    }
}

pub(crate) fn tombstone_value(at_ms: u64) -> [u8; 8] {
    at_ms.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keys_sort_by_time_and_parse_back() {
        let e = version_key(b"k", Version::new());
        let early = timed_key(5, &e);
        let late = timed_key(256, &e);
        assert!(early < late);
        assert_eq!(parse_timed_key(&late), Some((256, e)));
        assert_eq!(parse_timed_key(&late[..39]), None);
    }

    #[test]
    fn records_encoded_from_borrowed_parts_are_the_records_bytes() {
        for expires_at_ms in [Some(7), None] {
            let r = VersionRecord {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![b'v'; 300]),
                expires_at_ms,
            };
            let mut encoded = Vec::new();
            encode_version_record(&mut encoded, &r.key, &r.value, r.expires_at_ms);
            assert_eq!(encoded, rmp_serde::to_vec_named(&r).unwrap());
            let back: VersionRecord = rmp_serde::from_slice(&encoded).unwrap();
            assert_eq!((back.key, back.value), (r.key, r.value));
            assert_eq!(back.expires_at_ms, expires_at_ms);
        }
        let item = ItemRecord {
            key: Bytes::from_static(b"list"),
            value: Bytes::from_static(b"item"),
        };
        let mut encoded = vec![1, 2, 3];
        encode_item_record(&mut encoded, &item.key, &item.value);
        assert_eq!(encoded, rmp_serde::to_vec_named(&item).unwrap());
    }
}
