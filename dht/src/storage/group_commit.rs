//! fsync once for many writers: a commit waits until some fsync that started after it finishes,
//! and a writer that arrives while an fsync is running joins the next one instead of starting its
//! own.

use std::sync::{Condvar, Mutex, PoisonError};

/// Tickets are handed out in journal order (while the storage write lock is held), so syncing
/// the journal at the moment ticket `n` is the latest covers every ticket `<= n`.
#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    synced: Condvar,
}

#[derive(Default)]
struct State {
    /// The latest ticket handed out.
    written: u64,
    /// Every ticket up to this one is on disk.
    synced: u64,
    /// Whether some writer is running an fsync right now.
    syncing: bool,
}

impl GroupCommit {
    /// Records a commit that reached the journal and returns its ticket.
    pub(crate) fn ticket(&self) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.written += 1;
        st.written
    }

    /// Returns once `ticket` is durable, running `sync` itself when no one else is.
    pub(crate) fn wait_durable<E>(
        &self,
        ticket: u64,
        sync: impl Fn() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if st.synced >= ticket {
                return Ok(());
            }
            if st.syncing {
                st = self.synced.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            let target = st.written;
            drop(st);
            let result = sync();
            st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.syncing = false;
            if result.is_ok() {
                st.synced = st.synced.max(target);
            }
            self.synced.notify_all();
            result?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn concurrent_writers_share_syncs() {
        let gc = Arc::new(GroupCommit::default());
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let gc = gc.clone();
                let syncs = syncs.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let t = gc.ticket();
                        gc.wait_durable(t, || {
                            syncs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            Ok::<(), ()>(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = gc.state.lock().unwrap();
        assert_eq!(st.synced, 800);
        assert!(syncs.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn a_failed_sync_is_reported_and_retried_by_the_next_writer() {
        let gc = GroupCommit::default();
        let t = gc.ticket();
        assert_eq!(
            gc.wait_durable(t, || Err("disk on fire")),
            Err("disk on fire")
        );
        assert_eq!(gc.wait_durable(t, || Ok::<(), &str>(())), Ok(()));
    }
}
