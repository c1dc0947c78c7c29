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
use super::{Change, Storage, StorageError, ms_system_time, now_ms};
use crate::routing::RangeId;
use bytes::Bytes;
use fjall::Keyspace;
use serde::{Deserialize, Serialize};

/// About how many bytes of entries one page carries (at least one entry, however large): well
/// inside the default frame limit.
pub const PAGE_BYTES: usize = 1024 * 1024;

/// Bytes counted for one tombstone against [`PAGE_BYTES`].
const TOMBSTONE_BYTES: usize = 64;

/// One page of a range's contents; see the [module](self) documentation.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

    fn range_page_within(
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
                bytes += match section {
                    Section::Tombstones => {
                        page.tombstones.push(tombstone(&k, &v)?);
                        TOMBSTONE_BYTES
                    }
                    Section::Versions => {
                        let (version, record) = decode_version(&k, &v)?;
                        if !is_live(&record, now) {
                            continue;
                        }
                        let change = Change::Put {
                            key: record.key,
                            version,
                            parents: Vec::new(),
                            value: record.value,
                            expires_at: record.expires_at_ms.map(ms_system_time),
                        };
                        page.changes.push(change);
                        page.changes.last().map_or(0, Change::encoded_size)
                    }
                    Section::Items => {
                        let (id, record) = decode_item(&k, &v)?;
                        page.changes.push(Change::AddItem {
                            key: record.key,
                            id,
                            value: record.value,
                        });
                        page.changes.last().map_or(0, Change::encoded_size)
                    }
                };
                if bytes >= budget {
                    page.next = Some(PageCursor {
                        section,
                        after: Some(Bytes::copy_from_slice(&k)),
                    });
                    return Ok(page);
                }
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
