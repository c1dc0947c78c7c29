//! [`SagaStore`]: where saga documents live. Implemented for the DHT [`Client`], for embedded
//! [`Storage`], and by [`MemoryStore`] for tests.

use async_trait::async_trait;
use bytes::Bytes;
use rhinobus_dht::{Client, ClientError, PutRequest, Sibling, Storage, StorageError, Version};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// What a store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An optimistic write's parents were not the current versions; nothing changed.
    #[error("conflict: the current versions are not the ones loaded")]
    Conflict,
    /// Anything else (unreachable node, I/O, limits).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// One write of a saga document.
#[derive(Debug, Clone, Default)]
pub struct SaveRequest {
    /// The DHT key.
    pub key: String,
    /// The encoded document.
    pub value: Vec<u8>,
    /// The versions it supersedes.
    pub parents: Vec<Version>,
    /// Fail with [`StoreError::Conflict`] unless `parents` are exactly the current versions.
    pub optimistic: bool,
    /// When the document may be forgotten (completed sagas).
    pub expires_at: Option<SystemTime>,
}

/// A versioned key/value store with siblings, as rhinobus-dht provides.
///
/// The saga persisters use only `load` and `save`; implement it to put sagas on something
/// else, or to wrap a store (fault injection, metrics).
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Every current version of `key`, oldest first (empty when there is none).
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError>;
    /// Writes a version and returns it.
    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError>;
}

fn put_request(r: SaveRequest) -> PutRequest {
    PutRequest {
        key: Bytes::from(r.key),
        value: Bytes::from(r.value),
        parents: r.parents,
        optimistic: r.optimistic,
        expires_at: r.expires_at,
    }
}

#[async_trait]
impl SagaStore for Client {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        self.get(Bytes::copy_from_slice(key.as_bytes()))
            .await
            .map_err(|e| StoreError::Other(e.into()))
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        match self.put(put_request(request)).await {
            Ok(outcome) => Ok(outcome.version),
            Err(ClientError::Conflict(_)) => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::Other(e.into())),
        }
    }
}

/// Embedded storage. Calls run on the caller's thread: with [`rhinobus_dht::Durability::Fsync`]
/// a save blocks it for the sync.
///
/// Completed sagas leave a marker that expires (so late messages are recognised, not
/// restarted); expired records are hidden from reads but stay on disk until
/// [`Storage::purge_expired`] removes them. A `rhinobus-dht` node runs it every minute;
/// an application embedding the storage calls it itself, from a timer.
#[async_trait]
impl SagaStore for Storage {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        self.get(key.as_bytes())
            .map_err(|e| StoreError::Other(e.into()))
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        match self.put(put_request(request)) {
            Ok(outcome) => Ok(outcome.version),
            Err(StorageError::Conflict(_)) => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::Other(e.into())),
        }
    }
}

#[async_trait]
impl<T: SagaStore + ?Sized> SagaStore for Arc<T> {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        (**self).load(key).await
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        (**self).save(request).await
    }
}

/// Versions and siblings in memory, with the DHT's rules: a save supersedes exactly its
/// parents, an optimistic save conflicts unless its parents are the current versions. For the
/// [`crate::SagaHarness`] and unit tests. Expiry is ignored.
///
/// ```
/// use rhinobus_sagas::{MemoryStore, SagaStore, SaveRequest};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rhinobus_sagas::StoreError> {
/// let store = MemoryStore::new();
/// let put = |v: &str, parents| SaveRequest { key: "k".into(), value: v.into(), parents, ..Default::default() };
/// let a = store.save(put("a", vec![])).await?;
/// store.save(put("b", vec![])).await?;             // concurrent: a sibling
/// assert_eq!(store.load("k").await?.len(), 2);
/// let all = store.load("k").await?.iter().map(|s| s.version).collect();
/// store.save(put("ab", all)).await?;               // merged: one version again
/// assert_eq!(store.load("k").await?.len(), 1);
/// # let _ = a; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    keys: Arc<Mutex<HashMap<String, Vec<Sibling>>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.get(key).cloned().unwrap_or_default())
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let siblings = keys.entry(request.key).or_default();
        if request.optimistic {
            let mut current: Vec<Version> = siblings.iter().map(|s| s.version).collect();
            let mut parents = request.parents.clone();
            current.sort();
            parents.sort();
            parents.dedup();
            if current != parents {
                return Err(StoreError::Conflict);
            }
        }
        siblings.retain(|s| !request.parents.contains(&s.version));
        let version = Version::new();
        siblings.push(Sibling {
            version,
            value: Bytes::from(request.value),
            expires_at: request.expires_at,
        });
        Ok(version)
    }
}
