//! The persistent hash table: versioned values with siblings, lists, expiry and atomic batches,
//! on fjall.
//!
//! The rules, as in Rhino PHT:
//! - a key holds zero or more *siblings*, each a value with its own [`Version`];
//! - [`put`](Storage::put) adds a new version that supersedes exactly the listed parent versions;
//!   current versions it does not list stay, as siblings, for a reader to merge;
//! - with [`PutRequest::optimistic`], the put is rejected with [`StorageError::Conflict`] unless
//!   the parents are exactly the current versions;
//! - lists ([`add_item`](Storage::add_item) ...) have no concurrency control at all;
//! - [`batch`](Storage::batch) commits several operations atomically, or none of them.
//!
//! A superseded version leaves a tombstone behind. That is what makes applying a replicated write
//! ([`Batch::apply_change`]) idempotent and independent of order: a version that was already
//! superseded is never brought back, whatever order the writes arrive in.

mod batch;
mod copy;
mod dump;
mod group_commit;
mod layout;
mod outbox;
mod outbox_generations;
mod packed;
mod write_turn;

pub use batch::Batch;
pub use copy::{Merged, PAGE_BYTES, PageCursor, RangePage, Tombstone};
pub use dump::{KeyDump, RangeDigest};
pub use outbox::{OutboxId, OutboxRecord};
pub use packed::{ChangeRef, PackedChanges, unpack_array, write_array};
pub use write_turn::WriteTurn;

use crate::version::{ItemId, Version};
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use group_commit::GroupCommit;
use outbox::OutboxStore;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest key accepted, in bytes (64 KiB). The empty key is a valid key.
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// The largest value or list item accepted, in bytes (16 MiB). A node that replicates takes
/// only as much as a message to its broker leaves room for, with the key (see
/// [`ReplicationOutbox::stage`](crate::replication::ReplicationOutbox::stage)).
pub const MAX_VALUE_LEN: usize = 16 * 1024 * 1024;
/// The most parent versions one put or remove may list.
pub const MAX_PARENTS: usize = 1024;

/// When a commit counts as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Written to the operating system before the call returns: survives a crash of the process,
    /// not of the machine.
    #[default]
    Buffered,
    /// `fdatasync`ed before the call returns. Concurrent writers share one sync (group commit),
    /// so throughput grows with concurrency.
    Fsync,
}

/// How to open a [`Storage`].
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    /// When a commit counts as done.
    pub durability: Durability,
    /// Block cache size in bytes; fjall's default when `None`.
    pub cache_size: Option<u64>,
}

impl StorageOptions {
    /// Options with the given durability.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}

/// What went wrong in the hash table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("key is {len} bytes, more than the limit of {max}")]
    KeyTooLarge {
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is longer than [`MAX_VALUE_LEN`], or than a replication message leaves room
    /// for with its key (`max` is then the longest this key, with the same parents, may take).
    #[error("value is {len} bytes, more than the limit of {max}")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More parent versions than [`MAX_PARENTS`].
    #[error("{count} parent versions listed, more than the limit of {max}")]
    TooManyParents {
        /// How many were listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An optimistic write listed parents that are not exactly the current versions. Nothing was
    /// changed; reload and try again.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// Stored data could not be decoded.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// The storage engine failed (I/O, or a poisoned journal after an earlier I/O failure).
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
}

/// The parents of an optimistic write were not the current versions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("conflict: the write named {} parent version(s) but the key has {} current version(s) [{}]", .parents.len(), .current.len(), crate::storage::list_versions(.current))]
pub struct Conflict {
    /// The parents the write listed.
    pub parents: Vec<Version>,
    /// The versions that are current now.
    pub current: Vec<Version>,
}

pub(crate) fn list_versions(vs: &[Version]) -> String {
    vs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One current value of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    /// The version to name as a parent when superseding this value.
    pub version: Version,
    /// The bytes stored.
    pub value: Bytes,
    /// When the value stops being returned, if ever.
    #[serde(default)]
    pub expires_at: Option<SystemTime>,
}

/// Reads every current sibling of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetRequest {
    /// The key.
    pub key: Bytes,
}

impl GetRequest {
    /// A read of `key`.
    pub fn new(key: impl Into<Bytes>) -> Self {
        Self { key: key.into() }
    }
}

/// Writes a new version of a key.
///
/// ```
/// use rhinobus_dht::PutRequest;
///
/// let first = PutRequest::new("user/1", "alice");
/// assert!(first.parents.is_empty() && !first.optimistic);
/// let guarded = PutRequest { optimistic: true, ..PutRequest::new("user/1", "bob") };
/// assert!(guarded.optimistic);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PutRequest {
    /// The key.
    pub key: Bytes,
    /// The new value.
    pub value: Bytes,
    /// The versions this value replaces. Current versions not listed stay as siblings.
    pub parents: Vec<Version>,
    /// Reject the write with a [`Conflict`] unless `parents` are exactly the current versions.
    pub optimistic: bool,
    /// When the value stops being returned; it is cleaned up some time after.
    pub expires_at: Option<SystemTime>,
}

impl PutRequest {
    /// A put of `value` under `key` with no parents, not optimistic, never expiring.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            ..Self::default()
        }
    }

    /// The same request superseding `parents`.
    pub fn parents(mut self, parents: impl IntoIterator<Item = Version>) -> Self {
        self.parents = parents.into_iter().collect();
        self
    }

    /// The same request, optimistic or not.
    pub fn optimistic(mut self, optimistic: bool) -> Self {
        self.optimistic = optimistic;
        self
    }
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOutcome {
    /// The version of the stored value.
    pub version: Version,
    /// Which of the listed parents were current and are now gone.
    pub superseded: Vec<Version>,
}

/// Removes versions of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoveRequest {
    /// The key.
    pub key: Bytes,
    /// The versions to remove; other current versions stay.
    pub parents: Vec<Version>,
    /// Reject with a [`Conflict`] unless `parents` are exactly the current versions.
    pub optimistic: bool,
}

impl RemoveRequest {
    /// A removal of the given versions of `key`.
    pub fn new(key: impl Into<Bytes>, parents: impl IntoIterator<Item = Version>) -> Self {
        Self {
            key: key.into(),
            parents: parents.into_iter().collect(),
            optimistic: false,
        }
    }
}

/// What a remove did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveOutcome {
    /// Which of the listed versions were current and are now gone.
    pub removed: Vec<Version>,
}

/// Adds an item to the list under a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AddItemRequest {
    /// The list's key.
    pub key: Bytes,
    /// The item.
    pub value: Bytes,
}

impl AddItemRequest {
    /// Adds `value` to the list `key`.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// Removes one item from a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveItemRequest {
    /// The list's key.
    pub key: Bytes,
    /// The item, as [`add_item`](Storage::add_item) returned it.
    pub id: ItemId,
}

/// One item of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListItem {
    /// The item's id.
    pub id: ItemId,
    /// The item.
    pub value: Bytes,
}

/// One operation of a batch, as data: what a client sends over the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// [`Storage::get`].
    Get(GetRequest),
    /// [`Storage::put`].
    Put(PutRequest),
    /// [`Storage::remove`].
    Remove(RemoveRequest),
    /// [`Storage::add_item`].
    AddItem(AddItemRequest),
    /// [`Storage::remove_item`].
    RemoveItem(RemoveItemRequest),
    /// [`Storage::get_items`].
    GetItems(GetRequest),
}

impl Op {
    /// Whether it is an optimistic put or remove.
    pub fn is_optimistic(&self) -> bool {
        match self {
            Op::Put(r) => r.optimistic,
            Op::Remove(r) => r.optimistic,
            Op::Get(_) | Op::AddItem(_) | Op::RemoveItem(_) | Op::GetItems(_) => false,
        }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &Bytes {
        match self {
            Op::Get(r) | Op::GetItems(r) => &r.key,
            Op::Put(r) => &r.key,
            Op::Remove(r) => &r.key,
            Op::AddItem(r) => &r.key,
            Op::RemoveItem(r) => &r.key,
        }
    }
}

/// The result of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// Of [`Op::Get`].
    Siblings(Vec<Sibling>),
    /// Of [`Op::Put`].
    Put(PutOutcome),
    /// Of [`Op::Remove`].
    Removed(RemoveOutcome),
    /// Of [`Op::AddItem`].
    ItemAdded(ItemId),
    /// Of [`Op::RemoveItem`]: whether the item was there.
    ItemRemoved(bool),
    /// Of [`Op::GetItems`].
    Items(Vec<ListItem>),
}

/// A committed change, in the form another replica applies it with [`Batch::apply_change`].
///
/// Applying the same set of changes in any order, any number of times, leaves the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Version `version` of `key` was written, superseding `parents`.
    Put {
        /// The key.
        key: Bytes,
        /// The new version.
        version: Version,
        /// Versions it supersedes.
        parents: Vec<Version>,
        /// The value.
        value: Bytes,
        /// When it expires.
        expires_at: Option<SystemTime>,
    },
    /// The listed versions of `key` were removed.
    Remove {
        /// The key.
        key: Bytes,
        /// The removed versions.
        parents: Vec<Version>,
    },
    /// An item was added to a list.
    AddItem {
        /// The list's key.
        key: Bytes,
        /// The item's id.
        id: ItemId,
        /// The item.
        value: Bytes,
    },
    /// An item was removed from a list.
    RemoveItem {
        /// The list's key.
        key: Bytes,
        /// The item's id.
        id: ItemId,
    },
}

impl Change {
    /// The key the change touches.
    pub fn key(&self) -> &Bytes {
        match self {
            Change::Put { key, .. }
            | Change::Remove { key, .. }
            | Change::AddItem { key, .. }
            | Change::RemoveItem { key, .. } => key,
        }
    }

    /// The value the change writes, if it writes one.
    pub fn value(&self) -> Option<&Bytes> {
        match self {
            Change::Put { value, .. } | Change::AddItem { value, .. } => Some(value),
            Change::Remove { .. } | Change::RemoveItem { .. } => None,
        }
    }

    /// About how many bytes the change takes encoded (in a replication message or an outbox
    /// record): its key and value, 32 per version it names (16 bytes and their MessagePack
    /// framing, generously), and 128 for field names and the rest.
    pub fn encoded_size(&self) -> usize {
        const PER_VERSION: usize = 32;
        const OVERHEAD: usize = 128;
        OVERHEAD
            + match self {
                Change::Put {
                    key,
                    value,
                    parents,
                    ..
                } => key.len() + value.len() + PER_VERSION * (parents.len() + 1),
                Change::Remove { key, parents } => key.len() + PER_VERSION * parents.len(),
                Change::AddItem { key, value, .. } => key.len() + value.len() + PER_VERSION,
                Change::RemoveItem { key, .. } => key.len() + PER_VERSION,
            }
    }
}

/// What one [`Storage::purge_tombstones`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TombstonesPurged {
    /// How many tombstones went.
    pub purged: usize,
    /// Whether the limit left tombstones that old for another call.
    pub more: bool,
}

/// The persistent hash table. Cheap to clone; clones share one database.
///
/// Calls block the calling thread for the duration of a local read or write (and an fsync with
/// [`Durability::Fsync`]); async callers with long operations should use `spawn_blocking`.
///
/// ```
/// use rhinobus_dht::{PutRequest, Storage, StorageError, StorageOptions};
///
/// # fn main() -> Result<(), StorageError> {
/// # let dir = tempfile::tempdir().unwrap();
/// let table = Storage::open(dir.path(), StorageOptions::default())?;
///
/// // Two writers that both saw "no value" create two siblings.
/// let a = table.put(PutRequest::new("555-5421", "call"))?;
/// let b = table.put(PutRequest::new("555-5421", "sms"))?;
/// assert_eq!(table.get(b"555-5421")?.len(), 2);
///
/// // A reader merges them and supersedes both.
/// let merged = table.put(PutRequest::new("555-5421", "call+sms").parents([a.version, b.version]))?;
/// let now = table.get(b"555-5421")?;
/// assert_eq!(now.len(), 1);
/// assert_eq!(now[0].version, merged.version);
///
/// // An optimistic write based on a stale version changes nothing.
/// let stale = PutRequest::new("555-5421", "late").parents([a.version]).optimistic(true);
/// assert!(matches!(table.put(stale), Err(StorageError::Conflict(_))));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    versions: Keyspace,
    superseded: Keyspace,
    /// The tombstones of `superseded` by the time they were written (see `layout`).
    superseded_by_time: Keyspace,
    expiry: Keyspace,
    items: Keyspace,
    /// Replication records not yet confirmed by the broker, or confirmed but not yet cleared
    /// with the rest of their generation: `id` (see `layout`).
    outbox: OutboxStore,
    /// Outbox records that could not be decoded, moved out of the way (same keys and values)
    /// for an operator to look at.
    outbox_corrupt: Keyspace,
    /// Writers read current versions and then write; one writer at a time keeps that
    /// read-check-write (and whole batches) serializable. Readers never take it.
    write_lock: Mutex<()>,
    /// Turns at `write_lock` for async writers: long ones ([`Storage::long_write`]) and those
    /// that wait for them ([`Storage::short_write`]) queue here as parked tasks.
    turns: Arc<tokio::sync::Mutex<()>>,
    /// How many [`Storage::long_write`]s wait for their turn or run.
    long_writes: AtomicUsize,
    durability: Durability,
    group_commit: GroupCommit,
    /// Makes every fsync fail, to test what a failed [`Durability::Fsync`] leaves behind.
    #[cfg(test)]
    fail_sync: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Syncs the journal: what [`Durability::Fsync`] waits for.
    fn sync(&self) -> Result<(), fjall::Error> {
        #[cfg(test)]
        if self.fail_sync.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(fjall::Error::Io(std::io::Error::other(
                "fsync failed (test)",
            )));
        }
        self.db.persist(PersistMode::SyncData)
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("durability", &self.inner.durability)
            .finish_non_exhaustive()
    }
}

impl Storage {
    /// Opens (or creates) the table in directory `path`.
    pub fn open(path: impl AsRef<Path>, options: StorageOptions) -> Result<Self, StorageError> {
        let mut builder = Database::builder(path.as_ref());
        if let Some(size) = options.cache_size {
            builder = builder.cache_size(size);
        }
        let db = builder.open()?;
        // Values up to 16 MiB: keep big ones out of the LSM tree so compaction does not rewrite
        // them again and again.
        let versions = db.keyspace("versions", || {
            KeyspaceCreateOptions::default().with_kv_separation(Some(Default::default()))
        })?;
        let superseded = db.keyspace("superseded", KeyspaceCreateOptions::default)?;
        let superseded_by_time =
            db.keyspace("superseded-by-time", KeyspaceCreateOptions::default)?;
        let expiry = db.keyspace("expiry", KeyspaceCreateOptions::default)?;
        let items = db.keyspace("items", || {
            KeyspaceCreateOptions::default().with_kv_separation(Some(Default::default()))
        })?;
        let outbox = OutboxStore::open(&db)?;
        let outbox_corrupt = db.keyspace("outbox-corrupt", KeyspaceCreateOptions::default)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                versions,
                superseded,
                superseded_by_time,
                expiry,
                items,
                outbox,
                outbox_corrupt,
                write_lock: Mutex::new(()),
                turns: Arc::default(),
                long_writes: AtomicUsize::new(0),
                durability: options.durability,
                group_commit: GroupCommit::default(),
                #[cfg(test)]
                fail_sync: Default::default(),
            }),
        })
    }

    /// The durability commits get.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// Every current, unexpired sibling of `key`, oldest first.
    pub fn get(&self, key: &[u8]) -> Result<Vec<Sibling>, StorageError> {
        check_key(key)?;
        batch::read_siblings(&self.inner, key, now_ms())
    }

    /// Writes a new version; see [`PutRequest`].
    pub fn put(&self, request: PutRequest) -> Result<PutOutcome, StorageError> {
        self.batch(|b| b.put(request))
    }

    /// Removes versions of a key; see [`RemoveRequest`].
    pub fn remove(&self, request: RemoveRequest) -> Result<RemoveOutcome, StorageError> {
        self.batch(|b| b.remove(request))
    }

    /// Adds an item to a list and returns its id.
    pub fn add_item(&self, request: AddItemRequest) -> Result<ItemId, StorageError> {
        self.batch(|b| b.add_item(request))
    }

    /// Removes an item from a list; `false` if it was not there.
    pub fn remove_item(&self, request: RemoveItemRequest) -> Result<bool, StorageError> {
        self.batch(|b| b.remove_item(request))
    }

    /// Every item of the list under `key`, in the order they were added.
    pub fn get_items(&self, key: &[u8]) -> Result<Vec<ListItem>, StorageError> {
        check_key(key)?;
        batch::read_items(&self.inner, key)
    }

    /// Runs `f` with a [`Batch`] and commits everything it did atomically when it returns `Ok`;
    /// when it returns `Err`, nothing is written.
    ///
    /// Batches run one at a time, so reads inside a batch see exactly the state the batch
    /// writes over (and the batch's own earlier writes).
    ///
    /// ```
    /// use rhinobus_dht::{AddItemRequest, PutRequest, Storage, StorageError, StorageOptions};
    ///
    /// # fn main() -> Result<(), StorageError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// let version = table.batch(|b| {
    ///     let put = b.put(PutRequest::new("order/7", "paid"))?;
    ///     b.add_item(AddItemRequest::new("orders", "order/7"))?;
    ///     Ok::<_, StorageError>(put.version)
    /// })?;
    /// assert_eq!(table.get(b"order/7")?[0].version, version);
    /// assert_eq!(table.get_items(b"orders")?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn batch<T, E>(&self, f: impl FnOnce(&mut Batch<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StorageError>,
    {
        self.batch_then(f, |_| {})
    }

    /// [`batch`](Self::batch), running `committed` on `f`'s result as soon as the batch
    /// committed, before waiting for durability.
    ///
    /// `committed` runs whenever the changes are visible, even when the fsync of
    /// [`Durability::Fsync`] then fails and the call returns an error: what must follow every
    /// committed write (handing its replication to the senders) goes there, not after the call.
    /// It does not run when `f` fails or the commit itself fails.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, Storage, StorageError, StorageOptions};
    ///
    /// # fn main() -> Result<(), StorageError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// let mut seen = None;
    /// table.batch_then(
    ///     |b| b.put(PutRequest::new("k", "v")),
    ///     |put| seen = Some(put.version),
    /// )?;
    /// assert_eq!(table.get(b"k")?[0].version, seen.unwrap());
    /// # Ok(()) }
    /// ```
    pub fn batch_then<T, E>(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<T, E>,
        committed: impl FnOnce(&mut T),
    ) -> Result<T, E>
    where
        E: From<StorageError>,
    {
        let inner = &*self.inner;
        let guard = inner
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = Batch::new(inner);
        let mut out = f(&mut batch)?;
        let wrote = batch.commit()?;
        let ticket = wrote.then(|| inner.group_commit.ticket());
        drop(guard);
        committed(&mut out);
        if let (Some(ticket), Durability::Fsync) = (ticket, inner.durability) {
            inner
                .group_commit
                .wait_durable(ticket, || inner.sync())
                .map_err(StorageError::from)?;
        }
        Ok(out)
    }

    /// Supersedes values whose expiry is at or before `now`, at most `limit` of them; returns
    /// how many were cleaned up. A node calls this periodically; expired values are never
    /// returned even before it runs.
    pub fn purge_expired(&self, now: SystemTime, limit: usize) -> Result<usize, StorageError> {
        self.batch(|b| b.purge_expired(system_time_ms(now), limit))
    }

    /// Deletes the tombstones of versions and list items superseded before `before`, looking
    /// at most `limit` of them up, oldest first. A node calls this periodically with the time
    /// its tombstone grace ago, again while [`more`](TombstonesPurged::more) are left.
    ///
    /// A tombstone is what makes a replica drop a write that arrives after the write that
    /// superseded it. Once it is gone, such a late write (a replication message held up for
    /// longer than the grace, or replayed from an error queue after it) comes back as a
    /// sibling. Tombstones written before this index existed are kept.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, Storage, StorageError, StorageOptions};
    /// use std::time::{Duration, SystemTime};
    ///
    /// # fn main() -> Result<(), StorageError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// let first = table.put(PutRequest::new("k", "v1"))?;
    /// table.put(PutRequest::new("k", "v2").parents([first.version]))?;
    /// // The tombstone of v1 is younger than an hour: kept.
    /// let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    /// assert_eq!(table.purge_tombstones(an_hour_ago, 100)?.purged, 0);
    /// let soon = SystemTime::now() + Duration::from_secs(1);
    /// let purge = table.purge_tombstones(soon, 100)?;
    /// assert_eq!((purge.purged, purge.more), (1, false));
    /// # Ok(()) }
    /// ```
    pub fn purge_tombstones(
        &self,
        before: SystemTime,
        limit: usize,
    ) -> Result<TombstonesPurged, StorageError> {
        self.batch(|b| b.purge_tombstones(system_time_ms(before), limit))
    }

    /// Makes every later fsync fail (or succeed again), for tests of what a failed
    /// [`Durability::Fsync`] leaves behind.
    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.inner
            .fail_sync
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forces everything written so far to disk.
    pub fn flush(&self) -> Result<(), StorageError> {
        Ok(self.inner.db.persist(PersistMode::SyncAll)?)
    }
}

pub(crate) fn check_key(key: &[u8]) -> Result<(), StorageError> {
    if key.len() > MAX_KEY_LEN {
        return Err(StorageError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<(), StorageError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(StorageError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

pub(crate) fn check_parents(parents: &[Version]) -> Result<(), StorageError> {
    if parents.len() > MAX_PARENTS {
        return Err(StorageError::TooManyParents {
            count: parents.len(),
            max: MAX_PARENTS,
        });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch; times before it count as the epoch itself.
pub(crate) fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn ms_system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}

#[cfg(test)]
mod tests;
