//! The outbox's two keyspaces, used in turn, so that confirmed records leave the disk a keyspace
//! at a time rather than one by one.
//!
//! Deleting a confirmed record costs as much as writing it: a tombstone in the journal and the
//! memtable, and both carried through flushes until compaction drops them. So records are not
//! deleted. Writers stage them in the *active* generation (one of two keyspaces); once it holds
//! [`ROTATE_AFTER`] records and the other generation is empty, the other becomes active and
//! the old one *drains*: no record is added to it any more, and when the broker has confirmed
//! the last of its records it is cleared whole (fjall's `Keyspace::clear`, one journal marker).
//! When everything is confirmed and nothing new comes, the active generation is retired the
//! same way, so an idle node's outbox ends empty on disk.
//!
//! A draining generation that does not empty (a peer that stays away: its records wait) keeps
//! the active one from rotating: once it is due and cannot rotate, confirmed records of the
//! active generation are deleted one by one again, as before generations, so the disk holds at
//! most about [`ROTATE_AFTER`] confirmed records meanwhile.
//!
//! The bookkeeping here is in memory. After a crash every record still on disk is sent again:
//! a duplicate, which applying replication writes again identically. Generation changes happen
//! under the storage write lock, as do the commits that add records, so a generation is never
//! cleared while a commit that wrote into it is still to be counted.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// How many records a generation takes before writers move to the other one (when that one is
/// empty): about a second of writes on a busy node (`bench dht-put-replicated`), and a few
/// megabytes of memtable, which a generation is cleared before it ever flushes.
pub(crate) const ROTATE_AFTER: usize = 16 * 1024;

/// Which generations there are, and what each holds.
#[derive(Debug, Default)]
pub(crate) struct Generations {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    active: usize,
    generations: [Generation; 2],
}

impl State {
    /// Whether the active generation holds only confirmed records and the other is empty.
    fn idle(&self) -> bool {
        let current = self.generations[self.active];
        current.pending == 0 && current.stored > 0 && self.generations[1 - self.active].is_empty()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Generation {
    /// Records committed here that are not yet confirmed.
    pending: usize,
    /// Records on disk here: committed since the last clear, less those deleted one by one.
    stored: usize,
    /// Handed to a caller to clear; neither cleared nor activated again until it is done.
    clearing: bool,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.stored == 0 && !self.clearing
    }
}

/// What to do on disk after records were confirmed ([`Generations::confirmed`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Release {
    /// Records of the active generation to delete one by one, as indexes into those given.
    pub delete: Vec<usize>,
    /// Generations to clear whole, then report with [`Generations::cleared`].
    pub clear: Vec<usize>,
}

impl Generations {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts from what the keyspaces hold (records per generation, all unconfirmed), with
    /// `active` taking new records. Call before any record is staged.
    pub(crate) fn recovered(stored: [usize; 2], active: usize) -> Self {
        let generation = |n| Generation {
            pending: n,
            stored: n,
            clearing: false,
        };
        Self {
            state: Mutex::new(State {
                active,
                generations: stored.map(generation),
            }),
        }
    }

    /// The generation a record staged now goes to. Call under the storage write lock.
    pub(crate) fn active(&self) -> usize {
        self.lock().active
    }

    /// Counts `records` committed into `generation`, and moves writers to the other
    /// generation if this one is due and the other is empty. Call under the storage write lock,
    /// right after the commit.
    pub(crate) fn committed(&self, generation: usize, records: usize) {
        let mut st = self.lock();
        let g = &mut st.generations[generation];
        g.pending += records;
        g.stored += records;
        let other = 1 - st.active;
        if st.generations[st.active].stored >= ROTATE_AFTER && st.generations[other].is_empty() {
            st.active = other;
        }
    }

    /// Records the records at `confirmed` (their generations) as confirmed by every destination
    /// and says what to do on disk.
    pub(crate) fn confirmed(&self, confirmed: impl IntoIterator<Item = usize>) -> Release {
        let mut st = self.lock();
        let active = st.active;
        // Due but held up by a draining generation: keep the disk from growing meanwhile.
        let one_by_one = st.generations[active].stored >= ROTATE_AFTER;
        let mut release = Release::default();
        for (i, generation) in confirmed.into_iter().enumerate() {
            let g = &mut st.generations[generation];
            g.pending = g.pending.saturating_sub(1);
            if generation == active && one_by_one {
                g.stored = g.stored.saturating_sub(1);
                release.delete.push(i);
            }
        }
        let other = 1 - active;
        let drained = st.generations[other];
        if drained.pending == 0 && drained.stored > 0 && !drained.clearing {
            st.generations[other].clearing = true;
            release.clear.push(other);
        }
        release
    }

    /// Whether the active generation holds only confirmed records and the other is empty:
    /// then [`retire_idle`](Self::retire_idle) retires it.
    pub(crate) fn idle(&self) -> bool {
        self.lock().idle()
    }

    /// Starts counting afresh: `pending` records of each generation wait for confirmation,
    /// `stored` are on disk. The active generation stays. Call under the storage write lock.
    pub(crate) fn reset(&self, pending: [usize; 2], stored: [usize; 2]) {
        let mut st = self.lock();
        for ((g, pending), stored) in st.generations.iter_mut().zip(pending).zip(stored) {
            g.pending = pending;
            g.stored = stored;
        }
    }

    /// Moves writers to the other generation if the active one holds only confirmed records
    /// and the other is empty; returns the retired generation, for the caller to clear and then
    /// report with [`cleared`](Self::cleared). Call under the storage write lock.
    pub(crate) fn retire_idle(&self) -> Option<usize> {
        let mut st = self.lock();
        if !st.idle() {
            return None;
        }
        let active = st.active;
        st.active = 1 - active;
        st.generations[active].clearing = true;
        Some(active)
    }

    /// Reports a clear handed out by [`confirmed`](Self::confirmed) or
    /// [`retire_idle`](Self::retire_idle) as done (`ok`), or failed (it is handed out again
    /// with the next confirmation).
    pub(crate) fn cleared(&self, generation: usize, ok: bool) {
        let mut st = self.lock();
        let g = &mut st.generations[generation];
        g.clearing = false;
        if ok {
            g.stored = 0;
            g.pending = 0;
        }
    }

    /// The generations in the order their records were written, oldest first: the draining
    /// one before the active one.
    pub(crate) fn oldest_first(&self) -> [usize; 2] {
        let active = self.lock().active;
        [1 - active, active]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(g: &Generations) -> [usize; 2] {
        g.lock().generations.map(|g| g.stored)
    }

    #[test]
    fn a_full_generation_rotates_and_is_cleared_once_its_records_are_confirmed() {
        let g = Generations::default();
        assert_eq!(g.active(), 0);
        g.committed(0, ROTATE_AFTER - 1);
        assert_eq!(g.active(), 0, "not due yet");
        g.committed(0, 1);
        assert_eq!(g.active(), 1, "due, and the other one is empty");
        g.committed(1, 5);
        // Confirming all but one of the old generation's records: nothing on disk changes.
        let release = g.confirmed(std::iter::repeat_n(0, ROTATE_AFTER - 1));
        assert_eq!(release, Release::default());
        let release = g.confirmed([0]);
        assert_eq!(release.clear, vec![0]);
        assert!(release.delete.is_empty());
        assert!(!g.idle(), "the new one still waits for its records");
        // Being cleared: not handed out twice, and not activated meanwhile.
        assert!(g.confirmed([]).clear.is_empty());
        g.committed(1, ROTATE_AFTER);
        assert_eq!(g.active(), 1);
        g.cleared(0, true);
        assert_eq!(stored(&g), [0, ROTATE_AFTER + 5]);
        g.committed(1, 1);
        assert_eq!(
            g.active(),
            0,
            "rotates at the next commit once the other is empty"
        );
    }

    #[test]
    fn an_idle_generation_whose_records_are_all_confirmed_is_retired() {
        let g = Generations::default();
        g.committed(0, 3);
        g.confirmed([0, 0]);
        assert!(!g.idle());
        g.confirmed([0]);
        assert!(g.idle());
        assert_eq!(g.retire_idle(), Some(0));
        assert_eq!(g.active(), 1);
        assert_eq!(g.retire_idle(), None, "nothing left to retire");
        g.cleared(0, true);
        assert_eq!(stored(&g), [0, 0]);
    }

    #[test]
    fn a_generation_that_never_drains_makes_the_active_one_delete_one_by_one_once_due() {
        let g = Generations::default();
        g.committed(0, ROTATE_AFTER);
        assert_eq!(g.active(), 1);
        // One record of generation 0 is never confirmed (its destination is gone).
        g.confirmed(std::iter::repeat_n(0, ROTATE_AFTER - 1));
        g.committed(1, 10);
        let release = g.confirmed([1, 1]);
        assert!(
            release.delete.is_empty() && release.clear.is_empty(),
            "not due yet"
        );
        g.committed(1, ROTATE_AFTER);
        assert_eq!(
            g.active(),
            1,
            "cannot rotate: generation 0 still holds a record"
        );
        let release = g.confirmed([1, 1]);
        assert_eq!(release.delete, vec![0, 1]);
        assert_eq!(stored(&g), [ROTATE_AFTER, ROTATE_AFTER + 8]);
        assert!(release.clear.is_empty());
    }

    #[test]
    fn a_failed_clear_is_handed_out_again() {
        let g = Generations::default();
        g.committed(0, ROTATE_AFTER);
        assert_eq!(
            g.confirmed(std::iter::repeat_n(0, ROTATE_AFTER)).clear,
            vec![0]
        );
        g.cleared(0, false);
        assert_eq!(g.confirmed([]).clear, vec![0]);
    }

    #[test]
    fn recovery_counts_everything_pending() {
        let g = Generations::recovered([4, 2], 1);
        assert_eq!(g.active(), 1);
        assert_eq!(g.oldest_first(), [0, 1]);
        let release = g.confirmed([0, 0, 0]);
        assert!(release.clear.is_empty());
        assert_eq!(g.confirmed([0]).clear, vec![0]);
        // Recounted as a node queues them: one of generation 0 was owed to nobody.
        let g = Generations::recovered([2, 0], 1);
        g.reset([1, 0], [2, 0]);
        assert_eq!(g.confirmed([0]).clear, vec![0]);
        assert!(!g.idle(), "nothing in the active one");
    }

    #[test]
    fn a_generation_drained_and_the_active_one_done_with_in_one_go_are_both_cleared() {
        let g = Generations::default();
        g.committed(0, ROTATE_AFTER);
        g.committed(1, 2);
        let release = g.confirmed(std::iter::repeat_n(0, ROTATE_AFTER).chain([1, 1]));
        assert_eq!(release.clear, vec![0]);
        assert!(!g.idle(), "not while the other is being cleared");
        g.cleared(0, true);
        assert!(g.idle(), "once it is");
        assert_eq!(g.retire_idle(), Some(1));
    }
}
