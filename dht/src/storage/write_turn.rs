//! Write turns: how writers on an async runtime share a table's one writer at a time. A long
//! write (a replica applying a replication message) runs on a blocking thread in its turn and
//! may pass it between batches; the short writes that queue meanwhile wait as parked tasks,
//! not as runtime threads blocked on the lock.

use super::Storage;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The write turn of a [`Storage::long_write_in_turns`].
#[derive(Debug)]
pub struct WriteTurn {
    turns: Arc<tokio::sync::Mutex<()>>,
    /// Held but for the moment of passing it.
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTurn {
    /// Lets the writers that wait for a turn take theirs, in the order they came, then takes
    /// the next one, blocking the thread meanwhile: the blocking thread that
    /// [`Storage::long_write_in_turns`] runs its work on, the only place a turn is lent.
    pub fn pass(&mut self) {
        // Released before the next turn is asked for, so that every writer already waiting
        // comes first: the lock is fair.
        self.held = None;
        self.held = Some(self.turns.clone().blocking_lock_owned());
    }
}

/// Counts a [`Storage::long_write`] in [`Inner::long_writes`] from before it waits for its turn
/// until dropped: when it is done, or when the future waiting for its turn is dropped.
struct LongWrite(Storage);

impl LongWrite {
    fn counted(storage: &Storage) -> Self {
        storage.inner.long_writes.fetch_add(1, Ordering::AcqRel);
        Self(storage.clone())
    }
}

impl Drop for LongWrite {
    fn drop(&mut self) {
        self.0.inner.long_writes.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Storage {
    /// Runs `f`, a write that may hold the write lock for milliseconds (a replica applying a
    /// replication message, a clean-up), on a blocking thread, in the table's next write
    /// turn. While it waits for the turn or runs,
    /// [`long_writes_pending`](Self::long_writes_pending) says so, and writers on an async
    /// runtime wait for their turn with [`short_write`](Self::short_write), as parked tasks,
    /// rather than block a runtime thread on the lock. Fails only when `f` panicked or the
    /// runtime is shutting down.
    ///
    /// Turns only order async writers: batches run one at a time whether or not their callers
    /// took one.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, Storage, StorageOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// let put = table
    ///     .long_write(|t| {
    ///         assert!(t.long_writes_pending());
    ///         t.put(PutRequest::new("k", "v"))
    ///     })
    ///     .await??;
    /// assert!(!table.long_writes_pending());
    /// assert_eq!(table.get(b"k")?[0].version, put.version);
    /// # Ok(()) }
    /// ```
    pub async fn long_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Storage) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.long_write_in_turns(move |s, _| f(s)).await
    }

    /// [`long_write`](Self::long_write) for work that can stop between batches: `f` may
    /// [`pass`](WriteTurn::pass) its turn, so that writers waiting for one commit theirs before
    /// it goes on, and a client does not wait for the whole of it.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, Storage, StorageOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// table
    ///     .long_write_in_turns(|t, turn| {
    ///         for key in ["a", "b", "c"] {
    ///             t.put(PutRequest::new(key, "v"))?;
    ///             turn.pass();
    ///         }
    ///         Ok::<_, rhinobus_dht::StorageError>(())
    ///     })
    ///     .await??;
    /// assert_eq!(table.get(b"c")?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn long_write_in_turns<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Storage, &mut WriteTurn) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        // Counted while it waits too: a writer that went inline in the hand-over from one
        // long write to the next would block its thread for the whole of the next.
        let counted = LongWrite::counted(self);
        let turns = self.inner.turns.clone();
        let mut turn = WriteTurn {
            held: Some(turns.clone().lock_owned().await),
            turns,
        };
        let storage = self.clone();
        // The turn ends with `f`, on its thread, even if this future is dropped meanwhile.
        tokio::task::spawn_blocking(move || {
            let _counted = counted;
            f(&storage, &mut turn)
        })
        .await
    }

    /// Runs `f`, a write of microseconds, on the calling task once the table's write turn
    /// comes: how a writer on an async runtime waits for a [`long_write`](Self::long_write)
    /// without blocking its thread.
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, Storage, StorageOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let table = Storage::open(dir.path(), StorageOptions::default())?;
    /// let put = table.short_write(|t| t.put(PutRequest::new("k", "v"))).await?;
    /// assert_eq!(table.get(b"k")?[0].version, put.version);
    /// # Ok(()) }
    /// ```
    pub async fn short_write<T>(&self, f: impl FnOnce(&Storage) -> T) -> T {
        let _turn = self.inner.turns.lock().await;
        f(self)
    }

    /// Whether a [`long_write`](Self::long_write) waits for its turn or runs now: a hint,
    /// stale as soon as it returns, for writers that must not block their thread for long.
    pub fn long_writes_pending(&self) -> bool {
        self.inner.long_writes.load(Ordering::Acquire) > 0
    }
}
