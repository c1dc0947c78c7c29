use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn open(dir: &tempfile::TempDir) -> Storage {
    Storage::open(dir.path(), StorageOptions::default()).unwrap()
}

fn versions(siblings: &[Sibling]) -> BTreeSet<Version> {
    siblings.iter().map(|s| s.version).collect()
}

#[test]
fn put_supersedes_exactly_the_listed_parents() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let a = t.put(PutRequest::new("k", "a")).unwrap().version;
    let b = t.put(PutRequest::new("k", "b")).unwrap().version;
    let c = t.put(PutRequest::new("k", "c").parents([a])).unwrap();
    assert_eq!(c.superseded, vec![a]);
    assert_eq!(
        versions(&t.get(b"k").unwrap()),
        BTreeSet::from([b, c.version])
    );
    let d = t
        .put(PutRequest::new("k", "d").parents([b, c.version]))
        .unwrap();
    let now = t.get(b"k").unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].version, d.version);
    assert_eq!(now[0].value, Bytes::from_static(b"d"));
}

#[test]
fn optimistic_conflict_changes_nothing_and_reports_current_versions() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let a = t
        .put(PutRequest::new("k", "a").optimistic(true))
        .unwrap()
        .version;
    let err = t
        .put(PutRequest::new("k", "b").optimistic(true))
        .unwrap_err();
    match err {
        StorageError::Conflict(c) => {
            assert_eq!(c.current, vec![a]);
            assert!(c.parents.is_empty());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([a]));
    let b = t
        .put(PutRequest::new("k", "b").parents([a]).optimistic(true))
        .unwrap();
    assert_eq!(b.superseded, vec![a]);
    let err = t
        .remove(RemoveRequest {
            optimistic: true,
            ..RemoveRequest::new("k", [a])
        })
        .unwrap_err();
    assert!(matches!(err, StorageError::Conflict(_)));
    assert_eq!(t.get(b"k").unwrap().len(), 1);
}

#[test]
fn remove_takes_only_the_listed_versions() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let a = t.put(PutRequest::new("k", "a")).unwrap().version;
    let b = t.put(PutRequest::new("k", "b")).unwrap().version;
    let out = t
        .remove(RemoveRequest::new("k", [a, Version::new()]))
        .unwrap();
    assert_eq!(out.removed, vec![a]);
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([b]));
    t.remove(RemoveRequest::new("k", [b])).unwrap();
    assert!(t.get(b"k").unwrap().is_empty());
}

#[test]
fn key_and_value_limits() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    // The empty key and the longest key are ordinary keys.
    t.put(PutRequest::new("", "empty")).unwrap();
    let longest = vec![7u8; MAX_KEY_LEN];
    t.put(PutRequest::new(longest.clone(), "long")).unwrap();
    assert_eq!(t.get(b"").unwrap()[0].value, Bytes::from_static(b"empty"));
    assert_eq!(
        t.get(&longest).unwrap()[0].value,
        Bytes::from_static(b"long")
    );

    let too_long = vec![7u8; MAX_KEY_LEN + 1];
    assert!(matches!(
        t.put(PutRequest::new(too_long.clone(), "x")),
        Err(StorageError::KeyTooLarge { len, max }) if len == MAX_KEY_LEN + 1 && max == MAX_KEY_LEN
    ));
    assert!(matches!(
        t.get(&too_long),
        Err(StorageError::KeyTooLarge { .. })
    ));
    assert!(matches!(
        t.add_item(AddItemRequest::new(too_long, "x")),
        Err(StorageError::KeyTooLarge { .. })
    ));

    let biggest = vec![1u8; MAX_VALUE_LEN];
    t.put(PutRequest::new("big", biggest)).unwrap();
    assert_eq!(t.get(b"big").unwrap()[0].value.len(), MAX_VALUE_LEN);
    assert!(matches!(
        t.put(PutRequest::new("big", vec![1u8; MAX_VALUE_LEN + 1])),
        Err(StorageError::ValueTooLarge { .. })
    ));
    assert!(matches!(
        t.put(PutRequest::new("k", "v").parents((0..=MAX_PARENTS).map(|_| Version::new()))),
        Err(StorageError::TooManyParents { .. })
    ));
    // A rejected write leaves nothing behind.
    assert_eq!(t.get(b"big").unwrap().len(), 1);
}

#[test]
fn keys_whose_bytes_are_prefixes_of_each_other_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    for k in ["a", "ab", "abc", ""] {
        t.put(PutRequest::new(k, k)).unwrap();
        t.add_item(AddItemRequest::new(k, k)).unwrap();
    }
    for k in ["a", "ab", "abc", ""] {
        let got = t.get(k.as_bytes()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].value, Bytes::from(k));
        assert_eq!(t.get_items(k.as_bytes()).unwrap().len(), 1);
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn keys_with_the_same_md5_stay_apart() {
    // The 2004 Wang et al. MD5 collision: two different 128-byte keys, one digest. Storage is
    // laid out by digest, so this is the worst case for it.
    let a = hex(concat!(
        "d131dd02c5e6eec4693d9a0698aff95c2fcab58712467eab4004583eb8fb7f89",
        "55ad340609f4b30283e488832571415a085125e8f7cdc99fd91dbdf280373c5b",
        "d8823e3156348f5bae6dacd436c919c6dd53e2b487da03fd02396306d248cda0",
        "e99f33420f577ee8ce54b67080a80d1ec69821bcb6a8839396f9652b6ff72a70",
    ));
    let b = hex(concat!(
        "d131dd02c5e6eec4693d9a0698aff95c2fcab50712467eab4004583eb8fb7f89",
        "55ad340609f4b30283e4888325f1415a085125e8f7cdc99fd91dbd7280373c5b",
        "d8823e3156348f5bae6dacd436c919c6dd53e23487da03fd02396306d248cda0",
        "e99f33420f577ee8ce54b67080280d1ec69821bcb6a8839396f965ab6ff72a70",
    ));
    assert_ne!(a, b);
    assert_eq!(
        crate::routing::key_digest(&a),
        crate::routing::key_digest(&b)
    );
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let va = t
        .put(PutRequest::new(a.clone(), "a").optimistic(true))
        .unwrap();
    // Optimistic "create" of b must not see a's version as current.
    let vb = t
        .put(PutRequest::new(b.clone(), "b").optimistic(true))
        .unwrap();
    assert_eq!(versions(&t.get(&a).unwrap()), BTreeSet::from([va.version]));
    assert_eq!(versions(&t.get(&b).unwrap()), BTreeSet::from([vb.version]));
    t.add_item(AddItemRequest::new(a.clone(), "ia")).unwrap();
    assert!(t.get_items(&b).unwrap().is_empty());
    t.remove(RemoveRequest::new(b.clone(), [vb.version]))
        .unwrap();
    assert_eq!(t.get(&a).unwrap().len(), 1);
    assert!(t.get(&b).unwrap().is_empty());
}

#[test]
fn expired_values_are_never_returned_and_get_purged() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let past = SystemTime::now() - Duration::from_secs(1);
    let future = SystemTime::now() + Duration::from_secs(3600);
    let old = t
        .put(PutRequest {
            expires_at: Some(past),
            ..PutRequest::new("k", "old")
        })
        .unwrap();
    let fresh = t
        .put(PutRequest {
            expires_at: Some(future),
            ..PutRequest::new("k", "fresh")
        })
        .unwrap();
    let got = t.get(b"k").unwrap();
    assert_eq!(versions(&got), BTreeSet::from([fresh.version]));
    assert!(got[0].expires_at.is_some());
    // An expired version is not current for optimistic writes either.
    t.put(
        PutRequest::new("k", "next")
            .parents([fresh.version])
            .optimistic(true),
    )
    .unwrap();
    assert!(t.batch(|b| b.knows_version(b"k", old.version)).unwrap());
    let other = t
        .put(PutRequest {
            expires_at: Some(past),
            ..PutRequest::new("other", "x")
        })
        .unwrap();
    assert_eq!(t.purge_expired(SystemTime::now(), 100).unwrap(), 1);
    assert_eq!(t.purge_expired(SystemTime::now(), 100).unwrap(), 0);
    assert!(
        t.batch(|b| b.knows_version(b"other", other.version))
            .unwrap()
    );
    assert!(t.get(b"other").unwrap().is_empty());
}

#[test]
fn a_put_naming_an_expired_parent_removes_it_without_reporting_it() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let old = t
        .put(PutRequest {
            expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
            ..PutRequest::new("k", "old")
        })
        .unwrap();
    let live = t.put(PutRequest::new("k", "live")).unwrap();
    let next = t
        .put(PutRequest::new("k", "next").parents([old.version, live.version]))
        .unwrap();
    assert_eq!(next.superseded, vec![live.version]);
    assert_eq!(
        versions(&t.get(b"k").unwrap()),
        BTreeSet::from([next.version])
    );
    assert!(t.batch(|b| b.knows_version(b"k", old.version)).unwrap());
    // The expired version went with the write: nothing is left to purge.
    assert_eq!(t.purge_expired(SystemTime::now(), 100).unwrap(), 0);
}

/// A reader never sees a batch half applied: a key whose only version is replaced again and
/// again always has exactly one, and a list whose only item is replaced always has one.
#[test]
fn readers_see_whole_batches_only() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let mut version = t.put(PutRequest::new("k", "0")).unwrap().version;
    let mut item = t.add_item(AddItemRequest::new("list", "0")).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(t.get(b"k").unwrap().len(), 1, "after {reads} reads");
                assert_eq!(
                    t.get_items(b"list").unwrap().len(),
                    1,
                    "after {reads} reads"
                );
                reads += 1;
            }
        });
        for n in 1..5_000 {
            let value = n.to_string();
            version = t
                .put(PutRequest::new("k", value.clone()).parents([version]))
                .unwrap()
                .version;
            item = t
                .batch(|b| {
                    b.remove_item(RemoveItemRequest {
                        key: "list".into(),
                        id: item,
                    })?;
                    b.add_item(AddItemRequest::new("list", value))
                })
                .unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
    });
}

#[test]
fn lists_add_remove_and_list_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let one = t.add_item(AddItemRequest::new("l", "1")).unwrap();
    let two = t.add_item(AddItemRequest::new("l", "2")).unwrap();
    let items = t.get_items(b"l").unwrap();
    assert_eq!(
        items.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![one, two]
    );
    assert!(
        t.remove_item(RemoveItemRequest {
            key: "l".into(),
            id: one
        })
        .unwrap()
    );
    assert!(
        !t.remove_item(RemoveItemRequest {
            key: "l".into(),
            id: one
        })
        .unwrap()
    );
    // The id belongs to list "l", not "m".
    assert!(
        !t.remove_item(RemoveItemRequest {
            key: "m".into(),
            id: two
        })
        .unwrap()
    );
    assert_eq!(
        t.get_items(b"l").unwrap()[0].value,
        Bytes::from_static(b"2")
    );
}

#[test]
fn a_failed_batch_writes_nothing_and_a_good_one_everything() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let existing = t.put(PutRequest::new("guarded", "v")).unwrap();
    let r: Result<(), StorageError> = t.batch(|b| {
        b.put(PutRequest::new("a", "1"))?;
        b.add_item(AddItemRequest::new("l", "x"))?;
        // Sees its own write.
        assert_eq!(b.get(b"a")?.len(), 1);
        b.put(PutRequest::new("guarded", "w").optimistic(true))?;
        Ok(())
    });
    assert!(matches!(r, Err(StorageError::Conflict(_))));
    assert!(t.get(b"a").unwrap().is_empty());
    assert!(t.get_items(b"l").unwrap().is_empty());

    let results = t
        .batch(|b| {
            [
                Op::Put(PutRequest::new("a", "1")),
                Op::Put(
                    PutRequest::new("guarded", "w")
                        .parents([existing.version])
                        .optimistic(true),
                ),
                Op::Get(GetRequest::new("a")),
            ]
            .into_iter()
            .map(|op| b.execute(op))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert!(matches!(&results[2], OpResult::Siblings(s) if s.len() == 1));
    assert_eq!(
        t.get(b"guarded").unwrap()[0].value,
        Bytes::from_static(b"w")
    );
}

#[test]
fn a_batch_reads_each_key_of_its_own_writes_over_the_stored_ones() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let stored = t.put(PutRequest::new("k0", "stored")).unwrap();
    t.batch(|b| {
        // Many keys pending at once: each read must find its own among the others.
        for i in 0..50 {
            b.put(PutRequest::new(format!("k{i}"), format!("new {i}")))?;
            b.add_item(AddItemRequest::new(format!("l{i}"), format!("item {i}")))?;
        }
        b.remove(RemoveRequest::new("k0", vec![stored.version]))?;
        for i in 0..50 {
            let siblings = b.get(format!("k{i}").as_bytes())?;
            let values: Vec<_> = siblings.iter().map(|s| s.value.clone()).collect();
            assert_eq!(values, [Bytes::from(format!("new {i}"))], "key k{i}");
            let items = b.get_items(format!("l{i}").as_bytes())?;
            assert_eq!(items.len(), 1, "list l{i}");
        }
        Ok::<_, StorageError>(())
    })
    .unwrap();
    assert_eq!(t.get(b"k0").unwrap()[0].value, Bytes::from_static(b"new 0"));
    assert_eq!(t.get(b"k0").unwrap().len(), 1);
}

#[test]
fn fsync_durability_with_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let t = Storage::open(
        dir.path(),
        StorageOptions::default().durability(Durability::Fsync),
    )
    .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                for j in 0..25 {
                    t.put(PutRequest::new(format!("{i}/{j}"), "v")).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    drop(t);
    let t = open(&dir);
    for i in 0..4 {
        for j in 0..25 {
            assert_eq!(t.get(format!("{i}/{j}").as_bytes()).unwrap().len(), 1);
        }
    }
}

/// A long write that passes its turn lets a writer waiting for one commit before it goes on,
/// and has the turn back afterwards: a writer that comes later waits until it ends.
#[tokio::test]
async fn a_passed_turn_lets_a_waiting_writer_in_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let (started, has_started) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let long = tokio::spawn({
        let t = t.clone();
        async move {
            t.long_write_in_turns(move |t, turn| {
                let _ = started.send(());
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut passes = 0;
                while t.get(b"waiting").unwrap().is_empty() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the waiting writer got no turn in {passes} passes"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                    turn.pass();
                    passes += 1;
                }
                let late = runtime.spawn({
                    let t = t.clone();
                    async move { t.short_write(|t| t.put(PutRequest::new("late", "v"))).await }
                });
                std::thread::sleep(Duration::from_millis(50));
                let late_went_first = !t.get(b"late").unwrap().is_empty();
                (late, late_went_first)
            })
            .await
        }
    });
    has_started.await.unwrap();
    t.short_write(|t| t.put(PutRequest::new("waiting", "v")))
        .await
        .unwrap();
    let (late, late_went_first) = long
        .await
        .unwrap()
        .expect("the long write saw the waiting one");
    assert!(
        !late_went_first,
        "a writer got the turn while the long write held it"
    );
    late.await.unwrap().unwrap();
    assert_eq!(t.get(b"late").unwrap().len(), 1);
}

#[test]
fn replicated_changes_are_idempotent_and_do_not_resurrect() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let a = Version::new();
    let b = Version::new();
    let put_b = Change::Put {
        key: "k".into(),
        version: b,
        parents: vec![a],
        value: "b".into(),
        expires_at: None,
    };
    let put_a = Change::Put {
        key: "k".into(),
        version: a,
        parents: vec![],
        value: "a".into(),
        expires_at: None,
    };
    // The successor arrives first; its parent, arriving late, stays superseded.
    assert!(t.batch(|x| x.apply_change(&put_b)).unwrap());
    assert!(!t.batch(|x| x.apply_change(&put_a)).unwrap());
    // Applied again, it is written again, identically.
    assert!(t.batch(|x| x.apply_change(&put_b)).unwrap());
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([b]));
}

/// A put of `version` of `k` with no parents, as a late replication message carries it.
fn late_put(version: Version) -> Change {
    Change::Put {
        key: "k".into(),
        version,
        parents: vec![],
        value: "late".into(),
        expires_at: None,
    }
}

/// [`Storage::purge_tombstones`]: how many went, and whether more are left.
fn purged(t: &Storage, before: SystemTime, limit: usize) -> (usize, bool) {
    let purge = t.purge_tombstones(before, limit).unwrap();
    (purge.purged, purge.more)
}

/// A moment strictly between the writes before and after it.
fn a_moment_later() -> SystemTime {
    std::thread::sleep(Duration::from_millis(5));
    let moment = SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    moment
}

#[test]
fn tombstones_older_than_the_cutoff_are_purged_and_younger_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let a = t.put(PutRequest::new("k", "a")).unwrap().version;
    let b = t
        .put(PutRequest::new("k", "b").parents([a]))
        .unwrap()
        .version;
    let cutoff = a_moment_later();
    let c = t
        .put(PutRequest::new("k", "c").parents([b]))
        .unwrap()
        .version;
    assert_eq!(purged(&t, cutoff, 100), (1, false), "a's tombstone only");
    assert_eq!(purged(&t, cutoff, 100), (0, false), "nothing left that old");
    // b's tombstone still turns a late copy of b away ...
    assert!(!t.batch(|x| x.apply_change(&late_put(b))).unwrap());
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([c]));
    // ... while a late copy of a, older than the cutoff, comes back as a sibling: what the
    // grace a node keeps tombstones for protects against.
    assert!(t.batch(|x| x.apply_change(&late_put(a))).unwrap());
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([a, c]));
}

#[test]
fn a_tombstone_written_again_goes_with_its_later_entry() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let id = t.add_item(AddItemRequest::new("list", "x")).unwrap();
    let remove = || {
        t.remove_item(RemoveItemRequest {
            key: "list".into(),
            id,
        })
        .unwrap()
    };
    assert!(remove());
    let between = a_moment_later();
    // Removed again: the tombstone is written again, later.
    assert!(!remove());
    assert_eq!(purged(&t, between, 100), (0, false));
    let late_add = Change::AddItem {
        key: "list".into(),
        id,
        value: "x".into(),
    };
    assert!(
        !t.batch(|x| x.apply_change(&late_add)).unwrap(),
        "still tombstoned"
    );
    assert_eq!(purged(&t, a_moment_later(), 100), (1, false));
    assert!(t.batch(|x| x.apply_change(&late_add)).unwrap());
    assert_eq!(t.get_items(b"list").unwrap().len(), 1);
}

#[test]
fn tombstones_are_purged_at_most_a_limit_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir);
    let mut parent = t.put(PutRequest::new("k", "0")).unwrap().version;
    for n in 1..=5 {
        let put = PutRequest::new("k", n.to_string()).parents([parent]);
        parent = t.put(put).unwrap().version;
    }
    let now = a_moment_later();
    assert_eq!(purged(&t, now, 2), (2, true));
    assert_eq!(purged(&t, now, 2), (2, true));
    assert_eq!(purged(&t, now, 2), (1, false));
    assert_eq!(purged(&t, now, 2), (0, false));
    assert_eq!(versions(&t.get(b"k").unwrap()), BTreeSet::from([parent]));
}

// ---- model-based property tests ----

const KEYS: [&[u8]; 4] = [b"", b"k", b"k2", b"\x00\xff binary"];

#[derive(Debug, Clone)]
enum Step {
    Put {
        key: usize,
        value: u8,
        parents: Vec<usize>,
        optimistic: bool,
        all_current: bool,
    },
    Remove {
        key: usize,
        parents: Vec<usize>,
        optimistic: bool,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..KEYS.len(), any::<u8>(), prop::collection::vec(0..16usize, 0..4), any::<bool>(), any::<bool>())
            .prop_map(|(key, value, parents, optimistic, all_current)| Step::Put { key, value, parents, optimistic, all_current }),
        2 => (0..KEYS.len(), prop::collection::vec(0..16usize, 0..4), any::<bool>())
            .prop_map(|(key, parents, optimistic)| Step::Remove { key, parents, optimistic }),
        1 => Just(Step::Reopen),
    ]
}

/// Picks parents among every version seen so far (current or stale, this key or another), so
/// the test exercises exact matches, subsets, supersets and strangers.
fn pick(seen: &[Version], picks: &[usize]) -> Vec<Version> {
    if seen.is_empty() {
        return Vec::new();
    }
    picks.iter().map(|i| seen[i % seen.len()]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn siblings_follow_the_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut t = open(&dir);
        let mut model: BTreeMap<usize, BTreeMap<Version, u8>> = BTreeMap::new();
        let mut seen: Vec<Version> = Vec::new();
        for s in steps {
            match s {
                Step::Put { key, value, parents, optimistic, all_current } => {
                    let current = model.entry(key).or_default();
                    let parents = if all_current {
                        current.keys().copied().collect()
                    } else {
                        pick(&seen, &parents)
                    };
                    let req = PutRequest {
                        key: Bytes::from_static(KEYS[key]),
                        value: Bytes::from(vec![value]),
                        parents: parents.clone(),
                        optimistic,
                        expires_at: None,
                    };
                    let want: BTreeSet<Version> = parents.iter().copied().collect();
                    let have: BTreeSet<Version> = current.keys().copied().collect();
                    match t.put(req) {
                        Ok(out) => {
                            prop_assert!(!optimistic || want == have);
                            let expected: BTreeSet<Version> = have.intersection(&want).copied().collect();
                            prop_assert_eq!(out.superseded.iter().copied().collect::<BTreeSet<_>>(), expected);
                            for p in &parents { current.remove(p); }
                            current.insert(out.version, value);
                            seen.push(out.version);
                        }
                        Err(StorageError::Conflict(c)) => {
                            prop_assert!(optimistic && want != have);
                            prop_assert_eq!(c.current.iter().copied().collect::<BTreeSet<_>>(), have);
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Step::Remove { key, parents, optimistic } => {
                    let current = model.entry(key).or_default();
                    let parents = pick(&seen, &parents);
                    let want: BTreeSet<Version> = parents.iter().copied().collect();
                    let have: BTreeSet<Version> = current.keys().copied().collect();
                    let req = RemoveRequest { key: Bytes::from_static(KEYS[key]), parents: parents.clone(), optimistic };
                    match t.remove(req) {
                        Ok(_) => {
                            prop_assert!(!optimistic || want == have);
                            for p in &parents { current.remove(p); }
                        }
                        Err(StorageError::Conflict(_)) => prop_assert!(optimistic && want != have),
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Step::Reopen => {
                    drop(t);
                    t = open(&dir);
                }
            }
            for (i, key) in KEYS.iter().enumerate() {
                let got: BTreeMap<Version, u8> = t
                    .get(key)
                    .unwrap()
                    .into_iter()
                    .map(|s| (s.version, s.value[0]))
                    .collect();
                let want = model.get(&i).cloned().unwrap_or_default();
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn replicas_converge_whatever_the_order(
        steps in prop::collection::vec(step(), 1..30),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
    ) {
        let src_dir = tempfile::tempdir().unwrap();
        let src = open(&src_dir);
        let mut changes: Vec<Change> = Vec::new();
        let mut seen: Vec<Version> = Vec::new();
        for s in steps {
            let r = src.batch(|b| {
                match &s {
                    Step::Put { key, value, parents, optimistic, .. } => {
                        let out = b.put(PutRequest {
                            key: Bytes::from_static(KEYS[*key]),
                            value: Bytes::from(vec![*value]),
                            parents: pick(&seen, parents),
                            optimistic: *optimistic,
                            expires_at: None,
                        })?;
                        seen.push(out.version);
                    }
                    Step::Remove { key, parents, .. } => {
                        b.remove(RemoveRequest::new(Bytes::from_static(KEYS[*key]), pick(&seen, parents)))?;
                    }
                    Step::Reopen => {}
                }
                Ok::<_, StorageError>(b.changes().to_vec())
            });
            if let Ok(c) = r { changes.extend(c); }
        }
        // Deliver every change at least once, in a shuffled order, with duplicates.
        let mut delivery: Vec<Change> = changes.clone();
        for idx in &order {
            if !changes.is_empty() {
                delivery.push(changes[idx.index(changes.len())].clone());
            }
        }
        for (i, idx) in order.iter().enumerate() {
            if delivery.len() > 1 {
                let n = delivery.len();
                delivery.swap(i % n, idx.index(n));
            }
        }
        let replica_dir = tempfile::tempdir().unwrap();
        let replica = open(&replica_dir);
        for c in &delivery {
            replica.batch(|b| b.apply_change(c)).unwrap();
        }
        for key in KEYS {
            prop_assert_eq!(src.get(key).unwrap(), replica.get(key).unwrap());
        }
    }
}
