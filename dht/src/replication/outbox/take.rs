//! Taking a destination's queued records into a message: as many changes as one carries, the
//! rest of a record too big for one left for the next.

use super::MAX_CHANGES_PER_MESSAGE;
use crate::routing::RangeId;
use crate::storage::{PackedChanges, unpack_array, write_array};
use std::sync::Arc;

/// How much of a destination's queue one message took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// The first `n` records, completely.
    Whole(usize),
    /// The first `whole` records completely, and of the next one everything up to its change
    /// number `front_sent`.
    Partly { whole: usize, front_sent: usize },
}

/// The changes of one message: a MessagePack array of their encodings.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ChangeArray {
    /// How many changes.
    pub(super) len: usize,
    /// The array.
    pub(super) bytes: Vec<u8>,
}

/// The key and size of the one change in `packed`, for the log of a send that failed.
pub(super) fn lone_change(packed: &[u8]) -> (String, usize) {
    let key = match unpack_array(packed).as_deref() {
        Ok([change]) => String::from_utf8_lossy(change.key())
            .chars()
            .take(200)
            .collect(),
        _ => String::new(),
    };
    (key, packed.len())
}

/// The changes of the next message to a destination, `record(i)` giving its `i`th queued
/// record (`None` past the last) and `keep` the ranges the destination holds (asked only of
/// records of several changes), the first
/// `front_sent` kept changes of the front record being confirmed already; at most
/// [`MAX_CHANGES_PER_MESSAGE`] changes and `max_bytes` bytes of them, but at least one change
/// when there is any. Reads records only as far as the message needs, and copies the changes'
/// encodings as they are.
pub(super) fn take_message<E>(
    mut record: impl FnMut(usize) -> Result<Option<Arc<PackedChanges>>, E>,
    keep: impl Fn(RangeId) -> bool,
    front_sent: usize,
    max_bytes: usize,
) -> Result<(Taken, ChangeArray), E> {
    let mut records = Vec::new();
    // (record, change) of each change taken.
    let mut taken = Vec::new();
    let mut bytes = 0;
    let mut outcome = None;
    'records: while let Some(changes) = record(records.len())? {
        let i = records.len();
        records.push(changes);
        let start = if i == 0 { front_sent } else { 0 };
        // A record of one change is queued only for the replicas of its key.
        let all = records[i].len() == 1;
        let kept = (records[i].iter().enumerate()).filter(|(_, (range, _))| all || keep(*range));
        for (j, (n, (_, encoded))) in kept.enumerate().skip(start) {
            if !taken.is_empty()
                && (taken.len() == MAX_CHANGES_PER_MESSAGE || bytes + encoded.len() > max_bytes)
            {
                outcome = Some(if j == 0 {
                    Taken::Whole(i)
                } else {
                    Taken::Partly {
                        whole: i,
                        front_sent: j,
                    }
                });
                break 'records;
            }
            bytes += encoded.len();
            taken.push((i, n));
        }
        // Full: no need to read the next record to find out.
        if taken.len() == MAX_CHANGES_PER_MESSAGE || bytes >= max_bytes {
            break;
        }
    }
    let outcome = outcome.unwrap_or(Taken::Whole(records.len()));
    let mut array = ChangeArray {
        len: taken.len(),
        bytes: Vec::with_capacity(bytes + 5),
    };
    let encoded = |&(i, n): &(usize, usize)| records[i].encoded(n);
    write_array(taken.iter().map(encoded), &mut array.bytes);
    Ok((outcome, array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::outbox::MAX_BYTES_PER_MESSAGE;
    use crate::storage::Change;

    #[test]
    fn messages_are_limited_in_bytes_and_split_big_records() {
        let put = |len: usize| Change::Put {
            key: "k".into(),
            version: crate::Version::new(),
            parents: vec![],
            value: vec![0u8; len].into(),
            expires_at: None,
        };
        let mib = 1024 * 1024;
        let pack = |records: Vec<Vec<Change>>| -> Vec<Arc<PackedChanges>> {
            (records.iter())
                .map(|r| Arc::new(PackedChanges::pack(r).unwrap()))
                .collect()
        };
        let take_within = |queue: &[Arc<PackedChanges>], front_sent, max| {
            let record = |i| Ok(queue.get(i).cloned());
            let (taken, array) = take_message::<()>(record, |_| true, front_sent, max).unwrap();
            let changes: Vec<Change> = rmp_serde::from_slice(&array.bytes).unwrap();
            assert_eq!(changes.len(), array.len);
            (taken, changes.len())
        };
        let take = |queue: &[Arc<PackedChanges>], front_sent| {
            take_within(queue, front_sent, MAX_BYTES_PER_MESSAGE)
        };
        // A batch of three 3 MiB values, then a 16 MiB value, then a small one.
        let queue = pack(vec![
            vec![put(3 * mib), put(3 * mib), put(3 * mib)],
            vec![put(16 * mib)],
            vec![put(1)],
        ]);
        assert_eq!(
            take(&queue, 0),
            (
                Taken::Partly {
                    whole: 0,
                    front_sent: 2
                },
                2
            )
        );
        assert_eq!(take(&queue, 2), (Taken::Whole(1), 1));
        // A broker taking less: one 3 MiB value per message.
        let partly = |front_sent| Taken::Partly {
            whole: 0,
            front_sent,
        };
        assert_eq!(take_within(&queue, 0, 4 * mib), (partly(1), 1));
        assert_eq!(take_within(&queue, 1, 4 * mib), (partly(2), 1));
        // Too big for the limit alone: it still goes, alone.
        assert_eq!(take(&queue[1..], 0), (Taken::Whole(1), 1));
        assert_eq!(take(&queue[2..], 0), (Taken::Whole(1), 1));
        // A record with nothing to send (gone from disk) is taken along.
        assert_eq!(
            take(&pack(vec![vec![], vec![put(1)]]), 0),
            (Taken::Whole(2), 1)
        );
        assert_eq!(take(&pack(vec![vec![]]), 0), (Taken::Whole(1), 0));
        assert_eq!(take(&[], 0), (Taken::Whole(0), 0));
        // Many small changes: the count limit, without reading further than needed.
        let small = pack(
            (0..MAX_CHANGES_PER_MESSAGE + 1)
                .map(|_| vec![put(1)])
                .collect(),
        );
        let mut read = 0;
        let (taken, array) = take_message::<()>(
            |i| {
                read += 1;
                Ok(small.get(i).cloned())
            },
            |_| true,
            0,
            MAX_BYTES_PER_MESSAGE,
        )
        .unwrap();
        assert_eq!(array.len, MAX_CHANGES_PER_MESSAGE);
        assert_eq!(taken, Taken::Whole(MAX_CHANGES_PER_MESSAGE));
        assert_eq!(read, MAX_CHANGES_PER_MESSAGE, "records read");
    }

    #[test]
    fn a_destination_gets_only_the_changes_of_its_ranges() {
        let put = |key: &str| Change::Put {
            key: key.to_owned().into(),
            version: crate::Version::new(),
            parents: vec![],
            value: "v".into(),
            expires_at: None,
        };
        let record =
            Arc::new(PackedChanges::pack(&[put("a"), put("b"), put("c"), put("d")]).unwrap());
        let wanted = [RangeId::of(b"b"), RangeId::of(b"d")];
        let queue = [record];
        let take = |front_sent| {
            let keep = |range| wanted.contains(&range);
            take_message::<()>(
                |i| Ok(queue.get(i).cloned()),
                keep,
                front_sent,
                MAX_BYTES_PER_MESSAGE,
            )
            .unwrap()
        };
        let keys = |array: ChangeArray| {
            let changes: Vec<Change> = rmp_serde::from_slice(&array.bytes).unwrap();
            changes.iter().map(|c| c.key().clone()).collect::<Vec<_>>()
        };
        let (taken, array) = take(0);
        assert_eq!(taken, Taken::Whole(1));
        assert_eq!(keys(array), ["b", "d"]);
        // Resuming after the first kept change confirmed: the second only.
        assert_eq!(keys(take(1).1), ["d"]);
    }
}
