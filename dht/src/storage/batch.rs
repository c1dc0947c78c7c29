//! A batch: reads and writes against one consistent view, committed as one fjall write batch.

use super::copy::Tombstone;
use super::layout::{
    self, EntryKey, ItemRecord, VersionRecord, id_of, item_key, parse_timed_key, timed_key,
    version_key,
};
use super::outbox::{OutboxId, OutboxRecord, check_destinations, encode_record};
use super::packed::PackedChanges;
use super::{
    AddItemRequest, Change, ChangeRef, Conflict, Inner, ListItem, Op, OpResult, PutOutcome,
    PutRequest, RemoveItemRequest, RemoveOutcome, RemoveRequest, Sibling, StorageError,
    TombstonesPurged, check_key, check_parents, check_value, ms_system_time, now_ms,
    system_time_ms,
};
use crate::routing::key_digest;
use crate::version::{ItemId, Version};
use fjall::{Keyspace, Readable, Slice, Snapshot};
use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

/// The operations of one atomic batch; see [`Storage::batch`](super::Storage::batch).
///
/// Writes are buffered in memory and reads consult that buffer first, so a batch sees its own
/// writes. Nothing reaches disk until the batch's closure returns `Ok`.
pub struct Batch<'a> {
    inner: &'a Inner,
    /// Taken at the first read (under the write lock, like the whole batch): a write that
    /// reads nothing, a put naming no parents, takes none.
    snapshot: OnceCell<Snapshot>,
    now_ms: u64,
    versions: Overlay,
    superseded: Overlay,
    superseded_by_time: Overlay,
    expiry: Overlay,
    items: Overlay,
    outbox: Overlay,
    /// The outbox generation `outbox` goes to, once a record is staged.
    outbox_generation: Option<usize>,
    changes: Vec<Change>,
    /// Where records are encoded before the overlay copies them: one buffer for the batch.
    scratch: Vec<u8>,
}

/// A time index key, and its time and entry when it parses.
type TimedEntry = (Vec<u8>, Option<(u64, EntryKey)>);

/// Pending writes to one keyspace: `None` deletes. Keys and values are held as the slices
/// fjall stores, each copied once, from the caller's bytes, and handed to the commit as they
/// are.
#[derive(Default)]
struct Overlay(BTreeMap<Slice, Option<Slice>>);

impl Overlay {
    fn set(&mut self, k: &[u8], v: &[u8]) {
        self.0.insert(Slice::new(k), Some(Slice::new(v)));
    }

    fn delete(&mut self, k: &[u8]) {
        self.0.insert(Slice::new(k), None);
    }

    fn get(&self, k: &[u8]) -> Option<&Option<Slice>> {
        self.0.get(k)
    }

    /// Entries under `prefix`, merged over what the snapshot holds.
    fn scan_prefix(
        &self,
        snapshot: &Snapshot,
        keyspace: &Keyspace,
        prefix: &[u8],
    ) -> Result<BTreeMap<Slice, Slice>, StorageError> {
        let mut out = BTreeMap::new();
        for kv in snapshot.prefix(keyspace, prefix) {
            let (k, v) = kv.into_inner()?;
            out.insert(k, v);
        }
        for (k, v) in self
            .0
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out)
    }
}

pub(super) fn decode_version(k: &[u8], v: &[u8]) -> Result<(Version, VersionRecord), StorageError> {
    let (id, record) = decode_entry(k, v, "version key", "version record")?;
    Ok((Version::from_bytes(id), record))
}

pub(super) fn decode_item(k: &[u8], v: &[u8]) -> Result<(ItemId, ItemRecord), StorageError> {
    let (id, record) = decode_entry(k, v, "item key", "list item")?;
    Ok((ItemId::from_bytes(id), record))
}

/// The id in an entry's key and the record in its value, or what is corrupt about them.
fn decode_entry<R: serde::de::DeserializeOwned>(
    k: &[u8],
    v: &[u8],
    key_what: &'static str,
    record_what: &'static str,
) -> Result<([u8; 16], R), StorageError> {
    let id = id_of(k).ok_or_else(|| StorageError::Corrupt {
        what: key_what,
        detail: format!("{} bytes", k.len()),
    })?;
    let record = rmp_serde::from_slice(v).map_err(|e| StorageError::Corrupt {
        what: record_what,
        detail: e.to_string(),
    })?;
    Ok((id, record))
}

pub(super) fn is_live(record: &VersionRecord, now_ms: u64) -> bool {
    record.expires_at_ms.is_none_or(|at| at > now_ms)
}

pub(super) fn to_sibling(version: Version, record: VersionRecord) -> Sibling {
    Sibling {
        version,
        value: record.value,
        expires_at: record.expires_at_ms.map(ms_system_time),
    }
}

/// The lock-free read path of [`Storage::get`](super::Storage::get).
///
/// Reads go through a snapshot, like everything else: fjall applies a batch to its memtables
/// one entry at a time and publishes it afterwards, and a plain keyspace read would see the
/// entries already applied (a replaced version gone and its successor not yet there).
pub(super) fn read_siblings(
    inner: &Inner,
    key: &[u8],
    now_ms: u64,
) -> Result<Vec<Sibling>, StorageError> {
    let mut out = Vec::new();
    for kv in inner.db.snapshot().prefix(&inner.versions, key_digest(key)) {
        let (k, v) = kv.into_inner()?;
        let (version, record) = decode_version(&k, &v)?;
        if record.key == key && is_live(&record, now_ms) {
            out.push(to_sibling(version, record));
        }
    }
    Ok(out)
}

/// The lock-free read path of [`Storage::get_items`](super::Storage::get_items).
pub(super) fn read_items(inner: &Inner, key: &[u8]) -> Result<Vec<ListItem>, StorageError> {
    let entries = inner
        .db
        .snapshot()
        .prefix(&inner.items, key_digest(key))
        .map(|kv| kv.into_inner());
    items_of(key, entries)
}

/// The items of `key` among `entries` of its digest's prefix (another key can share a digest).
fn items_of<K: AsRef<[u8]>, V: AsRef<[u8]>, E>(
    key: &[u8],
    entries: impl IntoIterator<Item = Result<(K, V), E>>,
) -> Result<Vec<ListItem>, StorageError>
where
    StorageError: From<E>,
{
    let mut out = Vec::new();
    for entry in entries {
        let (k, v) = entry?;
        let (id, record) = decode_item(k.as_ref(), v.as_ref())?;
        if record.key == key {
            out.push(ListItem {
                id,
                value: record.value,
            });
        }
    }
    Ok(out)
}

fn dedup(versions: &[Version]) -> Vec<Version> {
    let mut seen = BTreeSet::new();
    versions
        .iter()
        .copied()
        .filter(|v| seen.insert(*v))
        .collect()
}

impl<'a> Batch<'a> {
    pub(super) fn new(inner: &'a Inner) -> Self {
        Self {
            inner,
            snapshot: OnceCell::new(),
            now_ms: now_ms(),
            versions: Overlay::default(),
            superseded: Overlay::default(),
            superseded_by_time: Overlay::default(),
            expiry: Overlay::default(),
            items: Overlay::default(),
            outbox: Overlay::default(),
            outbox_generation: None,
            changes: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The consistent view this batch reads, taken the first time it is needed.
    fn snapshot(&self) -> &Snapshot {
        self.snapshot.get_or_init(|| self.inner.db.snapshot())
    }

    /// Every version stored for `key`, expired or not, oldest first.
    fn stored_versions(&self, key: &[u8]) -> Result<Vec<(Version, VersionRecord)>, StorageError> {
        let entries =
            self.versions
                .scan_prefix(self.snapshot(), &self.inner.versions, &key_digest(key))?;
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let (version, record) = decode_version(&k, &v)?;
            if record.key == key {
                out.push((version, record));
            }
        }
        Ok(out)
    }

    fn overlay_or_snapshot(
        &self,
        overlay: &Overlay,
        keyspace: &Keyspace,
        k: &[u8],
    ) -> Result<Option<Slice>, StorageError> {
        match overlay.get(k) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.snapshot().get(keyspace, k)?),
        }
    }

    /// Whether the version or list item under entry key `k` was superseded (or removed) here.
    fn is_superseded(&self, k: &[u8]) -> Result<bool, StorageError> {
        Ok(self
            .overlay_or_snapshot(&self.superseded, &self.inner.superseded, k)?
            .is_some())
    }

    /// Whether `version` of `key` is stored or was superseded here, i.e. whether this table has
    /// seen it.
    pub fn knows_version(&self, key: &[u8], version: Version) -> Result<bool, StorageError> {
        let k = version_key(key, version);
        Ok(self
            .overlay_or_snapshot(&self.versions, &self.inner.versions, &k)?
            .is_some()
            || self.is_superseded(&k)?)
    }

    /// Supersedes exactly `versions` of `key` (the parents a write names), stored here or not
    /// yet arrived, with point lookups only; returns the versions that were not yet
    /// tombstoned, each with its record if it was stored here.
    ///
    /// This does not scan the key's versions to clean up expired ones on the way: writes are
    /// the hot path of every replica, expired values are never returned anyway, and each
    /// node's own [`purge_expired`](Self::purge_expired) removes them.
    fn supersede_named(
        &mut self,
        key: &[u8],
        versions: &[Version],
    ) -> Result<Vec<(Version, Option<VersionRecord>)>, StorageError> {
        let mut newly = Vec::new();
        for v in dedup(versions) {
            let k = version_key(key, v);
            // A tombstone is written together with the deletion, so a tombstoned version is
            // not stored either: nothing left to do.
            if self
                .overlay_or_snapshot(&self.superseded, &self.inner.superseded, &k)?
                .is_some()
            {
                continue;
            }
            let record = match self.overlay_or_snapshot(&self.versions, &self.inner.versions, &k)? {
                Some(bytes) => Some(decode_version(&k, &bytes)?.1).filter(|r| r.key == key),
                None => None,
            };
            self.supersede(key, v, record.as_ref());
            newly.push((v, record));
        }
        Ok(newly)
    }

    /// Deletes `version` of `key` if stored and leaves a tombstone either way, so it can never
    /// come back.
    fn supersede(&mut self, key: &[u8], version: Version, record: Option<&VersionRecord>) {
        let k = version_key(key, version);
        if let Some(record) = record {
            self.delete_version(&k, record);
        }
        self.tombstone(&k);
    }

    /// Deletes the version stored under entry `k`, and its expiry.
    fn delete_version(&mut self, k: &EntryKey, record: &VersionRecord) {
        self.versions.delete(k);
        if let Some(at) = record.expires_at_ms {
            self.expiry.delete(&timed_key(at, k));
        }
    }

    /// Leaves a tombstone for entry `k` (a version or a list item), dated now.
    fn tombstone(&mut self, k: &EntryKey) {
        self.tombstone_at(k, self.now_ms);
    }

    /// Leaves a tombstone for entry `k` dated `at_ms`, indexed by that time for
    /// [`purge_tombstones`](Self::purge_tombstones).
    fn tombstone_at(&mut self, k: &EntryKey, at_ms: u64) {
        self.superseded.set(k, &layout::tombstone_value(at_ms));
        self.superseded_by_time.set(&timed_key(at_ms, k), &[]);
    }

    /// Merges `tombstone`, copied from another replica of its range
    /// ([`Storage::range_page`](super::Storage::range_page)): deletes the version or list item
    /// it names if it is stored here, and keeps the tombstone with its date (never later than
    /// now), so that what the other replica superseded does not live on here. Where this table
    /// has a tombstone for it already, the later of the two dates stays, so that merging
    /// tombstones in any order ends the same. Returns whether anything changed; merging it
    /// again changes nothing.
    pub fn apply_tombstone(&mut self, tombstone: &Tombstone) -> Result<bool, StorageError> {
        let k = tombstone.entry_key()?;
        let at = tombstone.at_ms.min(self.now_ms);
        if let Some(date) =
            self.overlay_or_snapshot(&self.superseded, &self.inner.superseded, &k)?
        {
            // Stored with the deletion: nothing left to delete, only the date to settle.
            let kept = <[u8; 8]>::try_from(date.as_slice()).map_or(0, u64::from_be_bytes);
            if kept >= at {
                return Ok(false);
            }
            self.tombstone_at(&k, at);
            return Ok(true);
        }
        if let Some(bytes) = self.overlay_or_snapshot(&self.versions, &self.inner.versions, &k)? {
            let (_, record) = decode_version(&k, &bytes)?;
            self.delete_version(&k, &record);
        }
        if (self.overlay_or_snapshot(&self.items, &self.inner.items, &k)?).is_some() {
            self.items.delete(&k);
        }
        self.tombstone_at(&k, at);
        Ok(true)
    }

    /// Stores a version of `key` under its entry key `k`.
    fn store_version(
        &mut self,
        k: &EntryKey,
        key: &[u8],
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) {
        if let Some(at) = expires_at_ms {
            self.expiry.set(&timed_key(at, k), &[]);
        }
        layout::encode_version_record(&mut self.scratch, key, value, expires_at_ms);
        self.versions.set(k, &self.scratch);
    }

    /// Supersedes `parents` of `key`, returning which of them were current (stored and not
    /// expired). With `optimistic`, first checks that `parents` are exactly the current
    /// versions: that takes a scan of the key's versions, which also cleans up its expired
    /// ones. Without, the parents are looked up one by one ([`supersede_named`]), so a write
    /// naming no parents reads nothing.
    ///
    /// [`supersede_named`]: Self::supersede_named
    fn supersede_parents(
        &mut self,
        key: &[u8],
        parents: &[Version],
        optimistic: bool,
    ) -> Result<Vec<Version>, StorageError> {
        let now = self.now_ms;
        if !optimistic {
            return Ok(self
                .supersede_named(key, parents)?
                .into_iter()
                .filter(|(_, record)| record.as_ref().is_some_and(|r| is_live(r, now)))
                .map(|(v, _)| v)
                .collect());
        }
        let stored = self.stored_versions(key)?;
        let live: Vec<Version> = stored
            .iter()
            .filter(|(_, r)| is_live(r, now))
            .map(|(v, _)| *v)
            .collect();
        let want: BTreeSet<Version> = parents.iter().copied().collect();
        let have: BTreeSet<Version> = live.iter().copied().collect();
        if want != have {
            return Err(Conflict {
                parents: parents.to_vec(),
                current: live,
            }
            .into());
        }
        // The parents are exactly the live versions: supersede them, and the expired ones
        // with them.
        for (version, record) in &stored {
            self.supersede(key, *version, Some(record));
        }
        Ok(live)
    }

    /// Every current, unexpired sibling of `key`, including this batch's writes.
    pub fn get(&self, key: &[u8]) -> Result<Vec<Sibling>, StorageError> {
        check_key(key)?;
        let now = self.now_ms;
        Ok(self
            .stored_versions(key)?
            .into_iter()
            .filter(|(_, r)| is_live(r, now))
            .map(|(v, r)| to_sibling(v, r))
            .collect())
    }

    /// Writes a new version; see [`PutRequest`].
    pub fn put(&mut self, request: PutRequest) -> Result<PutOutcome, StorageError> {
        check_key(&request.key)?;
        check_value(&request.value)?;
        check_parents(&request.parents)?;
        let superseded =
            self.supersede_parents(&request.key, &request.parents, request.optimistic)?;
        let version = Version::new();
        // An expiry before 1970 is one long past: 1970 itself, which replication can encode.
        let expires_at = request.expires_at.map(|t| t.max(std::time::UNIX_EPOCH));
        let expires_at_ms = expires_at.map(system_time_ms);
        let k = version_key(&request.key, version);
        self.store_version(&k, &request.key, &request.value, expires_at_ms);
        self.changes.push(Change::Put {
            key: request.key,
            version,
            parents: dedup(&request.parents),
            value: request.value,
            expires_at,
        });
        Ok(PutOutcome {
            version,
            superseded,
        })
    }

    /// Removes versions of a key; see [`RemoveRequest`].
    pub fn remove(&mut self, request: RemoveRequest) -> Result<RemoveOutcome, StorageError> {
        check_key(&request.key)?;
        check_parents(&request.parents)?;
        let removed = self.supersede_parents(&request.key, &request.parents, request.optimistic)?;
        if !request.parents.is_empty() {
            self.changes.push(Change::Remove {
                key: request.key,
                parents: dedup(&request.parents),
            });
        }
        Ok(RemoveOutcome { removed })
    }

    /// Adds an item to a list and returns its id.
    pub fn add_item(&mut self, request: AddItemRequest) -> Result<ItemId, StorageError> {
        check_key(&request.key)?;
        check_value(&request.value)?;
        let id = ItemId::new();
        self.store_item(&request.key, id, &request.value);
        self.changes.push(Change::AddItem {
            key: request.key,
            id,
            value: request.value,
        });
        Ok(id)
    }

    fn store_item(&mut self, key: &[u8], id: ItemId, value: &[u8]) {
        layout::encode_item_record(&mut self.scratch, key, value);
        self.items.set(&item_key(key, id), &self.scratch);
    }

    /// Removes an item from a list; `false` if it was not there.
    pub fn remove_item(&mut self, request: RemoveItemRequest) -> Result<bool, StorageError> {
        check_key(&request.key)?;
        let was_there = self.drop_item(&request.key, request.id)?;
        self.changes.push(Change::RemoveItem {
            key: request.key,
            id: request.id,
        });
        Ok(was_there)
    }

    fn drop_item(&mut self, key: &[u8], id: ItemId) -> Result<bool, StorageError> {
        let k = item_key(key, id);
        let was_there = match self.overlay_or_snapshot(&self.items, &self.inner.items, &k)? {
            Some(v) => decode_item(&k, &v)?.1.key == key,
            None => false,
        };
        if was_there {
            self.items.delete(&k);
        }
        // Item ids are unique, so the tombstone shares the versions' keyspace safely.
        self.tombstone(&k);
        Ok(was_there)
    }

    /// Every item of the list under `key`, including this batch's writes.
    pub fn get_items(&self, key: &[u8]) -> Result<Vec<ListItem>, StorageError> {
        check_key(key)?;
        let entries =
            self.items
                .scan_prefix(self.snapshot(), &self.inner.items, &key_digest(key))?;
        items_of(key, entries.into_iter().map(Ok::<_, StorageError>))
    }

    /// Runs one [`Op`].
    pub fn execute(&mut self, op: Op) -> Result<OpResult, StorageError> {
        Ok(match op {
            Op::Get(r) => OpResult::Siblings(self.get(&r.key)?),
            Op::Put(r) => OpResult::Put(self.put(r)?),
            Op::Remove(r) => OpResult::Removed(self.remove(r)?),
            Op::AddItem(r) => OpResult::ItemAdded(self.add_item(r)?),
            Op::RemoveItem(r) => OpResult::ItemRemoved(self.remove_item(r)?),
            Op::GetItems(r) => OpResult::Items(self.get_items(&r.key)?),
        })
    }

    /// Applies a change made on another replica. Idempotent and independent of order: a version
    /// already superseded is ignored, and the parents it names are superseded whether or not
    /// they have arrived yet. Returns whether it wrote anything.
    ///
    /// A version or list item already stored is written again, identically, rather than looked
    /// up first: duplicates are rare (a redelivery, a resend after a crash), and the lookup of a
    /// fresh version, which misses in the values' keyspace, was two fifths of a replica's work in
    /// `bench dht-put-replicated`. The tombstones are what must be looked up.
    ///
    /// The change is not recorded in [`changes`](Self::changes): it is someone else's write.
    pub fn apply_change(&mut self, change: &Change) -> Result<bool, StorageError> {
        self.apply_change_ref(change.into())
    }

    /// [`apply_change`](Self::apply_change) of a change borrowed from its encoding (a
    /// replication message), its key and value never copied but into the records stored.
    pub fn apply_change_ref(&mut self, change: ChangeRef<'_>) -> Result<bool, StorageError> {
        match change {
            ChangeRef::Put {
                key,
                version,
                parents,
                value,
                expires_at,
            } => {
                check_key(key)?;
                check_value(value)?;
                check_parents(&parents)?;
                // Parents are superseded even when this version itself was already removed:
                // a removal can overtake the write it removes, and the write's own
                // supersessions must still happen.
                let changed = !self.supersede_named(key, &parents)?.is_empty();
                let k = version_key(key, version);
                if self.is_superseded(&k)? {
                    return Ok(changed);
                }
                self.store_version(&k, key, value, expires_at.map(system_time_ms));
                Ok(true)
            }
            ChangeRef::Remove { key, parents } => {
                check_key(key)?;
                check_parents(&parents)?;
                Ok(!self.supersede_named(key, &parents)?.is_empty())
            }
            ChangeRef::AddItem { key, id, value } => {
                check_key(key)?;
                check_value(value)?;
                if self.is_superseded(&item_key(key, id))? {
                    return Ok(false);
                }
                self.store_item(key, id, value);
                Ok(true)
            }
            ChangeRef::RemoveItem { key, id } => {
                check_key(key)?;
                self.drop_item(key, id)
            }
        }
    }

    /// The changes this batch made so far, in order: what replication sends to other replicas.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// [`changes`](Self::changes), taken out of the batch (which then has none to show):
    /// staging their replication moves them rather than copying them.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Records, in this batch, that `changes` still have to reach `destinations`: one record,
    /// committed (or not) together with the writes that made the changes. Returns the record,
    /// to hand to the senders once the batch committed.
    pub fn enqueue_outbox(
        &mut self,
        destinations: Vec<String>,
        changes: Vec<Change>,
    ) -> Result<OutboxRecord, StorageError> {
        let id = self.enqueue_packed_outbox(&destinations, &PackedChanges::pack(&changes)?)?;
        Ok(OutboxRecord {
            id,
            destinations,
            changes,
        })
    }

    /// [`enqueue_outbox`](Self::enqueue_outbox) of changes already encoded: the record is
    /// their bytes copied, not encoded again. Returns the record's id.
    pub fn enqueue_packed_outbox(
        &mut self,
        destinations: &[impl AsRef<str>],
        changes: &PackedChanges,
    ) -> Result<OutboxId, StorageError> {
        check_destinations(destinations)?;
        let generation =
            *(self.outbox_generation).get_or_insert_with(|| self.inner.outbox.generations.active());
        let id = OutboxId::fresh(generation);
        encode_record(&mut self.scratch, destinations, changes);
        (self.outbox).set(&id.storage_key(), &self.scratch);
        Ok(id)
    }

    /// The first `limit` keys of time index `index` (`expiry`, `superseded-by-time`) before
    /// `before_ms`, oldest first, each with its time and entry. A key that does not parse is
    /// not one of ours: the caller deletes it with the others rather than stall on it forever.
    fn timed_entries(
        &self,
        index: &Keyspace,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<TimedEntry>, StorageError> {
        let end = timed_key(before_ms, &[0; 32]);
        let mut due = Vec::new();
        for kv in self.snapshot().range(index, ..end.as_slice()).take(limit) {
            let k = kv.key()?.to_vec();
            let parsed = parse_timed_key(&k);
            due.push((k, parsed));
        }
        Ok(due)
    }

    pub(super) fn purge_expired(
        &mut self,
        now_ms: u64,
        limit: usize,
    ) -> Result<usize, StorageError> {
        let due = self.timed_entries(&self.inner.expiry, now_ms.saturating_add(1), limit)?;
        let mut purged = 0;
        for (k, parsed) in due {
            self.expiry.delete(&k);
            let Some((at, entry)) = parsed else {
                continue;
            };
            let Some(v) = self.overlay_or_snapshot(&self.versions, &self.inner.versions, &entry)?
            else {
                continue;
            };
            let (version, record) = decode_version(&entry, &v)?;
            if record.expires_at_ms == Some(at) {
                let key = record.key.clone();
                self.supersede(&key, version, Some(&record));
                self.changes.push(Change::Remove {
                    key,
                    parents: vec![version],
                });
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// Deletes tombstones written before `before_ms`, looking at most `limit` index entries
    /// up. Not replicated: every node purges its own.
    pub(super) fn purge_tombstones(
        &mut self,
        before_ms: u64,
        limit: usize,
    ) -> Result<TombstonesPurged, StorageError> {
        // One more than the limit, to tell whether any are left.
        let index = &self.inner.superseded_by_time;
        let mut due = self.timed_entries(index, before_ms, limit.saturating_add(1))?;
        let more = due.len() > limit;
        due.truncate(limit);
        let mut purged = 0;
        for (k, parsed) in due {
            self.superseded_by_time.delete(&k);
            let Some((at, entry)) = parsed else {
                continue;
            };
            let written =
                self.overlay_or_snapshot(&self.superseded, &self.inner.superseded, &entry)?;
            // Written again since: its own, later entry purges it.
            if written.as_deref() == Some(&layout::tombstone_value(at)[..]) {
                self.superseded.delete(&entry);
                purged += 1;
            }
        }
        Ok(TombstonesPurged { purged, more })
    }

    /// Writes everything out as one fjall batch; `false` when there was nothing to write. Call
    /// under the write lock: it counts the outbox records it committed in their generation.
    pub(super) fn commit(self) -> Result<bool, StorageError> {
        let mut wb = self.inner.db.batch();
        let outbox = &self.inner.outbox;
        let generation = self.outbox_generation.unwrap_or_default();
        let records = self.outbox.0.len();
        for (overlay, keyspace) in [
            (self.versions, &self.inner.versions),
            (self.superseded, &self.inner.superseded),
            (self.superseded_by_time, &self.inner.superseded_by_time),
            (self.expiry, &self.inner.expiry),
            (self.items, &self.inner.items),
            (self.outbox, outbox.keyspace(generation)),
        ] {
            for (k, v) in overlay.0 {
                match v {
                    Some(v) => wb.insert(keyspace, k, v),
                    None => wb.remove(keyspace, k),
                }
            }
        }
        if wb.is_empty() {
            return Ok(false);
        }
        wb.commit()?;
        if records > 0 {
            outbox.generations.committed(generation, records);
        }
        Ok(true)
    }
}
