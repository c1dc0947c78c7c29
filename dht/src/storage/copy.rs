//! Copying a range from one replica to another, page by page: what a node that lost its data
//! needs from the other replicas before it serves again.
//!
//! A page carries a range's raw contents, not only what [`dump`](Storage::dump) shows: the
//! tombstones of superseded versions and removed list items come first, then the live versions
//! (as [`Change::Put`]s naming no parents), then the list items (as [`Change::AddItem`]s).
//! Merging pages goes through the same order-independent, idempotent apply as replication, so
//! pages from several replicas, taken at different moments, merge into their union minus
//! everything any of them superseded. Copying from every other replica matters when they
//! differ: one that has not yet applied a supersession would otherwise bring the superseded
//! version back here for good.
//!
//! Each page is read from a snapshot of its own. What changes between pages reaches the node
//! the usual way, through its replication queue.

use super::batch::{decode_item, decode_version, is_live};
use super::dump::scan;
use super::layout::EntryKey;
use super::{
    Change, Storage, StorageError, check_key, check_parents, check_value, ms_system_time, now_ms,
};
use crate::routing::RangeId;
use bytes::Bytes;
use fjall::Keyspace;
use serde::{Deserialize, Serialize};

/// About how many bytes of entries one page carries (at least one entry, however large): well
/// inside the default frame limit.
pub const PAGE_BYTES: usize = 1024 * 1024;

/// Bytes counted for one tombstone against [`PAGE_BYTES`].
const TOMBSTONE_BYTES: usize = 64;

/// One page of a range's contents, tombstones included, as [`Storage::range_page`] reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    /// Tombstones: what was superseded or removed, and when.
    pub tombstones: Vec<Tombstone>,
    /// Live versions as puts naming no parents, and list items as item additions.
    pub changes: Vec<Change>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<PageCursor>,
}

/// That a version or list item is gone for good, as another replica recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The storage entry: the key's MD5 digest and the version or item id, 32 bytes.
    pub entry: Bytes,
    /// When it was superseded, in milliseconds since the Unix epoch: the tombstone grace runs
    /// from then on every replica.
    pub at_ms: u64,
}

impl RangePage {
    /// Whether the page holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tombstones.is_empty() && self.changes.is_empty()
    }

    /// Checks a page that came from another node before it is merged: only tombstones of
    /// 32-byte entries, puts and list items, keys and values within the limits, all of
    /// `range`.
    pub fn check(&self, range: RangeId) -> Result<(), StorageError> {
        let outside = |what: &str, got: RangeId| StorageError::Corrupt {
            what: "range page",
            detail: format!(
                "{what} of range {} in a page of range {}",
                got.get(),
                range.get()
            ),
        };
        for t in &self.tombstones {
            let entry = t.entry_key()?;
            let mut digest = [0u8; 16];
            digest.copy_from_slice(&entry[..16]);
            let got = RangeId::from_digest(&digest);
            if got != range {
                return Err(outside("a tombstone", got));
            }
        }
        for c in &self.changes {
            match c {
                Change::Put {
                    key,
                    value,
                    parents,
                    ..
                } => {
                    check_key(key)?;
                    check_value(value)?;
                    check_parents(parents)?;
                }
                Change::AddItem { key, value, .. } => {
                    check_key(key)?;
                    check_value(value)?;
                }
                Change::Remove { .. } | Change::RemoveItem { .. } => {
                    return Err(StorageError::Corrupt {
                        what: "range page",
                        detail: "a removal (pages carry tombstones instead)".into(),
                    });
                }
            }
            let got = RangeId::of(c.key());
            if got != range {
                return Err(outside("a key", got));
            }
        }
        Ok(())
    }
}

impl Tombstone {
    pub(super) fn entry_key(&self) -> Result<EntryKey, StorageError> {
        EntryKey::try_from(&self.entry[..]).map_err(|_| StorageError::Corrupt {
            what: "tombstone entry",
            detail: format!("{} bytes instead of 32", self.entry.len()),
        })
    }
}

/// A position inside a range's copy, handed back by [`RangePage::next`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCursor {
    section: Section,
    /// The last storage key already sent in `section`; from its start when `None`.
    after: Option<Bytes>,
}

/// The parts of a range's copy, in the order they are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Section {
    Tombstones,
    Versions,
    Items,
}

impl Section {
    fn next(self) -> Option<Self> {
        match self {
            Section::Tombstones => Some(Section::Versions),
            Section::Versions => Some(Section::Items),
            Section::Items => None,
        }
    }
}

/// What merging pages changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Merged {
    /// Tombstones new here.
    pub tombstones: usize,
    /// Versions and list items written here: those it held already are written again,
    /// identically, as replication does (it does not look them up first), and counted too.
    pub changes: usize,
}

impl std::ops::AddAssign for Merged {
    fn add_assign(&mut self, other: Self) {
        self.tombstones += other.tombstones;
        self.changes += other.changes;
    }
}

impl Storage {
    /// The page of `range` that starts at `from` (the range's start when `None`), for another
    /// replica to [`merge`](Self::merge_range_page).
    ///
    /// ```
    /// use rhinobus_dht::{PutRequest, RangeId, Storage, StorageError, StorageOptions};
    ///
    /// # fn main() -> Result<(), StorageError> {
    /// # let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    /// let source = Storage::open(a.path(), StorageOptions::default())?;
    /// let copy = Storage::open(b.path(), StorageOptions::default())?;
    /// source.put(PutRequest::new("hello", "world"))?;
    ///
    /// let range = RangeId::of(b"hello");
    /// let mut from = None;
    /// loop {
    ///     let page = source.range_page(range, from.as_ref())?;
    ///     copy.merge_range_page(&page)?;
    ///     match page.next {
    ///         Some(next) => from = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// assert_eq!(copy.dump(range)?, source.dump(range)?);
    /// # Ok(()) }
    /// ```
    pub fn range_page(
        &self,
        range: RangeId,
        from: Option<&PageCursor>,
    ) -> Result<RangePage, StorageError> {
        self.range_page_within(range, from, PAGE_BYTES)
    }

    /// [`range_page`](Self::range_page) with about `budget` bytes of entries at most, instead
    /// of [`PAGE_BYTES`] (one entry still goes, however large).
    pub fn range_page_within(
        &self,
        range: RangeId,
        from: Option<&PageCursor>,
        budget: usize,
    ) -> Result<RangePage, StorageError> {
        let snapshot = self.inner.db.snapshot();
        let now = now_ms();
        let mut page = RangePage::default();
        let mut bytes = 0;
        let mut section = from.map_or(Section::Tombstones, |c| c.section);
        let mut after = from.and_then(|c| c.after.clone());
        loop {
            for kv in scan(&snapshot, self.keyspace(section), range, after.as_deref()) {
                let (k, v) = kv.into_inner()?;
                let Some(entry) = entry(section, &k, &v, now)? else {
                    continue;
                };
                let size = entry.size();
                // Whole entries only: one that would take the page past the budget starts the
                // next (a page holds one entry at least, however large).
                if !page.is_empty() && bytes + size > budget {
                    page.next = Some(PageCursor { section, after });
                    return Ok(page);
                }
                entry.push_to(&mut page);
                bytes += size;
                after = Some(Bytes::copy_from_slice(&k));
            }
            match section.next() {
                Some(next) => (section, after) = (next, None),
                None => return Ok(page),
            }
        }
    }

    fn keyspace(&self, section: Section) -> &Keyspace {
        match section {
            Section::Tombstones => &self.inner.superseded,
            Section::Versions => &self.inner.versions,
            Section::Items => &self.inner.items,
        }
    }

    /// Merges a page of another replica's [`range_page`](Self::range_page) into this table, in
    /// one batch, as replication is applied: merging the same page twice, or pages of several
    /// replicas in any order, ends the same. Nothing is staged for replication: the other
    /// replicas have it.
    pub fn merge_range_page(&self, page: &RangePage) -> Result<Merged, StorageError> {
        self.batch(|b| {
            let mut merged = Merged::default();
            for t in &page.tombstones {
                merged.tombstones += usize::from(b.apply_tombstone(t)?);
            }
            for c in &page.changes {
                merged.changes += usize::from(b.apply_change(c)?);
            }
            Ok(merged)
        })
    }
}

/// One entry of a page.
enum Entry {
    Tombstone(Tombstone),
    Change(Change),
}

impl Entry {
    /// What it counts against [`PAGE_BYTES`].
    fn size(&self) -> usize {
        match self {
            Entry::Tombstone(_) => TOMBSTONE_BYTES,
            Entry::Change(c) => c.encoded_size(),
        }
    }

    fn push_to(self, page: &mut RangePage) {
        match self {
            Entry::Tombstone(t) => page.tombstones.push(t),
            Entry::Change(c) => page.changes.push(c),
        }
    }
}

/// The entry stored under `k` in `section`'s keyspace; `None` for a version expired at `now`.
fn entry(section: Section, k: &[u8], v: &[u8], now: u64) -> Result<Option<Entry>, StorageError> {
    Ok(Some(match section {
        Section::Tombstones => Entry::Tombstone(tombstone(k, v)?),
        Section::Versions => {
            let (version, record) = decode_version(k, v)?;
            if !is_live(&record, now) {
                return Ok(None);
            }
            Entry::Change(Change::Put {
                key: record.key,
                version,
                parents: Vec::new(),
                value: record.value,
                expires_at: record.expires_at_ms.map(ms_system_time),
            })
        }
        Section::Items => {
            let (id, record) = decode_item(k, v)?;
            Entry::Change(Change::AddItem {
                key: record.key,
                id,
                value: record.value,
            })
        }
    }))
}

fn tombstone(k: &[u8], v: &[u8]) -> Result<Tombstone, StorageError> {
    let at = <[u8; 8]>::try_from(v).map_err(|_| StorageError::Corrupt {
        what: "tombstone",
        detail: format!("a date of {} bytes", v.len()),
    })?;
    Ok(Tombstone {
        entry: Bytes::copy_from_slice(k),
        at_ms: u64::from_be_bytes(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{
        AddItemRequest, PutRequest, RemoveItemRequest, RemoveRequest, StorageOptions,
    };

    fn open() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        (dir, s)
    }

    /// Copies every range of `from` into `to`, `budget` bytes a page; returns the pages taken.
    fn copy_all(from: &Storage, to: &Storage, budget: usize) -> usize {
        let mut pages = 0;
        for range in RangeId::all() {
            let mut cursor = None;
            loop {
                let page = from
                    .range_page_within(range, cursor.as_ref(), budget)
                    .unwrap();
                page.check(range).unwrap();
                let bytes: usize = (page.tombstones.len() * TOMBSTONE_BYTES)
                    + page.changes.iter().map(Change::encoded_size).sum::<usize>();
                let entries = page.tombstones.len() + page.changes.len();
                assert!(
                    entries <= 1 || bytes <= budget,
                    "{entries} entries, {bytes} bytes"
                );
                to.merge_range_page(&page).unwrap();
                pages += 1;
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        pages
    }

    fn dump_all(s: &Storage) -> Vec<crate::storage::KeyDump> {
        RangeId::all().flat_map(|r| s.dump(r).unwrap()).collect()
    }

    #[test]
    fn small_pages_copy_versions_items_and_tombstones_exactly() {
        let (_a, source) = open();
        let mut superseded = Vec::new();
        for n in 0..200 {
            let key = format!("k{n}");
            let first = source.put(PutRequest::new(key.clone(), "1")).unwrap();
            // Every other key also has a sibling, every third a superseded first version.
            if n % 2 == 0 {
                source.put(PutRequest::new(key.clone(), "2")).unwrap();
            }
            if n % 3 == 0 {
                source
                    .put(PutRequest::new(key.clone(), "3").parents([first.version]))
                    .unwrap();
                superseded.push((key.clone(), first.version));
            }
            let item = source
                .add_item(AddItemRequest::new(key.clone(), "i"))
                .unwrap();
            if n % 5 == 0 {
                source
                    .remove_item(RemoveItemRequest {
                        key: key.clone().into(),
                        id: item,
                    })
                    .unwrap();
            }
        }
        let (_b, copy) = open();
        // Tiny pages: a page boundary falls inside every section of the fuller ranges.
        let pages = copy_all(&source, &copy, 150);
        assert!(
            pages > 1024,
            "expected ranges of several pages, took {pages}"
        );
        assert_eq!(dump_all(&copy), dump_all(&source));
        // The tombstones came too: a late replication of a superseded version stays out.
        for (key, version) in superseded {
            let late = Change::Put {
                key: key.into(),
                version,
                parents: vec![],
                value: "1".into(),
                expires_at: None,
            };
            assert!(!copy.batch(|b| b.apply_change(&late)).unwrap());
        }
        assert_eq!(dump_all(&copy), dump_all(&source));
        assert_eq!(copy_all(&source, &copy, PAGE_BYTES), 1024);
        assert_eq!(
            dump_all(&copy),
            dump_all(&source),
            "copying again changes nothing"
        );
    }

    #[test]
    fn copies_of_replicas_that_differ_merge_to_what_both_will_hold() {
        // `ahead` applied a write superseding v1 that `behind` has not received yet.
        let (_a, ahead) = open();
        let (_b, behind) = open();
        let v1 = ahead.put(PutRequest::new("k", "1")).unwrap().version;
        let replicate = |to: &Storage, change: Change| {
            to.batch(|b| b.apply_change(&change)).unwrap();
        };
        replicate(
            &behind,
            Change::Put {
                key: "k".into(),
                version: v1,
                parents: vec![],
                value: "1".into(),
                expires_at: None,
            },
        );
        let v2 = ahead
            .put(PutRequest::new("k", "2").parents([v1]))
            .unwrap()
            .version;
        let removed = ahead.put(PutRequest::new("gone", "x")).unwrap().version;
        replicate(
            &behind,
            Change::Put {
                key: "gone".into(),
                version: removed,
                parents: vec![],
                value: "x".into(),
                expires_at: None,
            },
        );
        ahead.remove(RemoveRequest::new("gone", [removed])).unwrap();

        // The rebuilt replica copies from both, in either order.
        for order in [[&ahead, &behind], [&behind, &ahead]] {
            let (_c, rebuilt) = open();
            for from in order {
                copy_all(from, &rebuilt, PAGE_BYTES);
            }
            let k = rebuilt.get(b"k").unwrap();
            assert_eq!(k.len(), 1);
            assert_eq!(k[0].version, v2);
            assert!(rebuilt.get(b"gone").unwrap().is_empty());
            assert_eq!(dump_all(&rebuilt), dump_all(&ahead));
        }
    }

    /// The tombstones `s` holds, with their dates.
    fn tombstones(s: &Storage) -> Vec<Tombstone> {
        RangeId::all()
            .flat_map(|r| s.range_page(r, None).unwrap().tombstones)
            .collect()
    }

    #[test]
    fn of_two_dates_for_one_tombstone_the_later_stays_and_none_is_in_the_future() {
        let (_a, source) = open();
        let v = source.put(PutRequest::new("k", "v")).unwrap().version;
        source.remove(RemoveRequest::new("k", [v])).unwrap();
        let [original] = &tombstones(&source)[..] else {
            panic!("one tombstone expected")
        };
        let dated = |at_ms| RangePage {
            tombstones: vec![Tombstone {
                entry: original.entry.clone(),
                at_ms,
            }],
            ..RangePage::default()
        };
        let early = original.at_ms - 1000;
        for order in [[early, original.at_ms], [original.at_ms, early]] {
            let (_b, copy) = open();
            for at in order {
                copy.merge_range_page(&dated(at)).unwrap();
            }
            assert_eq!(tombstones(&copy), std::slice::from_ref(original));
        }
        let (_c, copy) = open();
        copy.merge_range_page(&dated(u64::MAX)).unwrap();
        let kept = tombstones(&copy)[0].at_ms;
        assert!(kept <= now_ms(), "a tombstone dated in the future: {kept}");
    }

    #[test]
    fn a_cursor_outside_its_range_reads_nothing_of_other_ranges() {
        let (_a, s) = open();
        for n in 0..2000 {
            s.put(PutRequest::new(format!("k{n}"), "v")).unwrap();
        }
        let range = RangeId::new(500).unwrap();
        let full = s.range_page(range, None).unwrap();
        assert!(!full.changes.is_empty());
        // A cursor below the range starts at its start; one past its end reads nothing.
        for (after, expected) in [(vec![0u8; 32], full.changes.len()), (vec![0xff; 32], 0)] {
            let cursor = PageCursor {
                section: Section::Versions,
                after: Some(after.into()),
            };
            let page = s.range_page(range, Some(&cursor)).unwrap();
            page.check(range).unwrap();
            assert_eq!(page.changes.len(), expected);
        }
    }

    #[test]
    fn a_page_with_entries_of_another_range_or_removals_does_not_check_out() {
        let (_a, s) = open();
        s.put(PutRequest::new("hello", "v")).unwrap();
        let hello = RangeId::of(b"hello");
        let page = s.range_page(hello, None).unwrap();
        page.check(hello).unwrap();
        let other = RangeId::new((hello.get() + 1) % 1024).unwrap();
        assert!(matches!(
            page.check(other),
            Err(StorageError::Corrupt { .. })
        ));
        let removal = RangePage {
            changes: vec![Change::Remove {
                key: "hello".into(),
                parents: vec![],
            }],
            ..RangePage::default()
        };
        assert!(removal.check(hello).is_err());
        let huge = RangePage {
            changes: vec![Change::AddItem {
                key: vec![b'k'; crate::storage::MAX_KEY_LEN + 1].into(),
                id: crate::version::ItemId::new(),
                value: "v".into(),
            }],
            ..RangePage::default()
        };
        assert!(matches!(
            huge.check(hello),
            Err(StorageError::KeyTooLarge { .. })
        ));
    }

    #[test]
    fn a_tombstone_of_the_wrong_size_is_refused() {
        let (_a, s) = open();
        let page = RangePage {
            tombstones: vec![Tombstone {
                entry: Bytes::from_static(b"short"),
                at_ms: 1,
            }],
            ..RangePage::default()
        };
        let err = s.merge_range_page(&page).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
    }
}
