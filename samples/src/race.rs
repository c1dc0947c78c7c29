//! [`RaceStore`]: a saga store wrapper that makes concurrent handlings read the same version,
//! so the samples show the race of the seed's phone-billing post on every run, not only when
//! the scheduler happens to interleave the workers that way.

use async_trait::async_trait;
use rhinobus_dht::{Sibling, Version};
use rhinobus_sagas::{SagaStore, SaveRequest, StoreError};
use std::sync::{Arc, Mutex};
use tokio::sync::Barrier;

/// Loads still to hold, and the barrier they meet at.
type Armed = (usize, Arc<Barrier>);

/// Wraps a store. After [`RaceStore::arm`]`(n)`, the next `n` loads each wait until all `n`
/// have read, then go on: `n` handlings all start from the same version.
#[derive(Clone)]
pub struct RaceStore<T> {
    inner: T,
    armed: Arc<Mutex<Option<Armed>>>,
}

impl<T> RaceStore<T> {
    /// Wraps `inner`, unarmed: loads go straight through.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            armed: Arc::default(),
        }
    }

    /// The wrapped store, for looking without taking part in the race.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Makes the next `n` loads wait for each other.
    pub fn arm(&self, n: usize) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((n, Arc::new(Barrier::new(n))));
    }
}

#[async_trait]
impl<T: SagaStore> SagaStore for RaceStore<T> {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        let loaded = self.inner.load(key).await?;
        let barrier = {
            let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            match armed.as_mut() {
                Some((left, barrier)) if *left > 0 => {
                    *left -= 1;
                    Some(barrier.clone())
                }
                _ => None,
            }
        };
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        Ok(loaded)
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        self.inner.save(request).await
    }
}
