//! What travels on the wire: request and response frames, MessagePack with named fields inside a
//! 4-byte big-endian length prefix.
//!
//! Decoding never panics: a frame that cannot be read becomes a [`WireError`], and when even the
//! request id cannot be recovered the connection is closed after the error is sent.

use crate::routing::{RangeId, Topology};
use crate::status::NodeStatus;
use crate::storage::{
    AddItemRequest, Conflict, GetRequest, KeyDump, ListItem, Merged, Op, OpResult, PageCursor,
    PutOutcome, PutRequest, RangeDigest, RangePage, RemoveItemRequest, RemoveOutcome,
    RemoveRequest, Sibling, StorageError,
};
use crate::version::ItemId;
use serde::{Deserialize, Serialize};

/// The default largest frame a node or client accepts: the largest value, the largest key and
/// room for the rest.
pub const DEFAULT_MAX_FRAME: usize = crate::storage::MAX_VALUE_LEN + 1024 * 1024;

/// One request, tagged with the id its response will carry and the topology version the client
/// routed it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client; unique among its requests in flight on a connection.
    pub id: u64,
    /// The client's topology version.
    #[serde(default)]
    pub topology: u64,
    /// What to do.
    pub request: Request,
}

/// Everything a node can be asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Opens a connection; must come first when the node has a shared secret.
    Hello {
        /// The node's shared secret, if it has one.
        #[serde(default)]
        secret: Option<String>,
    },
    /// [`Storage::get`](crate::Storage::get).
    Get(GetRequest),
    /// [`Storage::put`](crate::Storage::put).
    Put(PutRequest),
    /// [`Storage::remove`](crate::Storage::remove).
    Remove(RemoveRequest),
    /// [`Storage::add_item`](crate::Storage::add_item).
    AddItem(AddItemRequest),
    /// [`Storage::remove_item`](crate::Storage::remove_item).
    RemoveItem(RemoveItemRequest),
    /// [`Storage::get_items`](crate::Storage::get_items).
    GetItems(GetRequest),
    /// Several operations, committed atomically.
    Batch {
        /// The operations, in order.
        ops: Vec<Op>,
    },
    /// The node's current topology (answered whatever the request's topology version).
    Topology,
    /// Everything this node holds for one range, whatever its role for it: for comparing
    /// replicas (answered whatever the request's topology version).
    Dump {
        /// The range.
        range: RangeId,
    },
    /// The node's [`NodeStatus`] (answered whatever the request's topology version).
    Status,
    /// The [`RangeDigest`] of a range as this node holds it, whatever its role for it: for
    /// comparing replicas without their contents (answered whatever the request's topology
    /// version).
    Digest {
        /// The range.
        range: RangeId,
    },
    /// One page of everything this node holds for a range, tombstones included, for a replica
    /// that rebuilds it ([`Storage::range_page`](crate::Storage::range_page); answered
    /// whatever the request's topology version).
    RangePage {
        /// The range.
        range: RangeId,
        /// Where the page starts: the previous page's `next`, or `None` for the first.
        #[serde(default)]
        from: Option<PageCursor>,
        /// At most about this many bytes of entries (a bigger entry still goes alone), when
        /// less than the node's own [`PAGE_BYTES`](crate::storage::PAGE_BYTES).
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    /// Merges a page another replica answered to [`Request::RangePage`] into this node, as a
    /// rebuild merges it, for repairing replicas that differ
    /// ([`verify::repair`](crate::verify::repair)); not replicated onward (answered whatever
    /// the request's topology version).
    MergePage {
        /// The page's range.
        range: RangeId,
        /// The page.
        page: RangePage,
    },
}

impl Request {
    /// Whether the node checks the request's topology version before serving it.
    pub fn is_routed(&self) -> bool {
        !matches!(
            self,
            Request::Hello { .. }
                | Request::Topology
                | Request::Dump { .. }
                | Request::Status
                | Request::Digest { .. }
                | Request::RangePage { .. }
                | Request::MergePage { .. }
        )
    }

    /// Whether the request makes an optimistic write (a put or remove, alone or in a batch).
    pub fn is_optimistic(&self) -> bool {
        match self {
            Request::Put(r) => r.optimistic,
            Request::Remove(r) => r.optimistic,
            Request::Batch { ops } => ops.iter().any(Op::is_optimistic),
            _ => false,
        }
    }

    /// Whether the request writes.
    pub fn is_write(&self) -> bool {
        match self {
            Request::Put(_) | Request::Remove(_) | Request::AddItem(_) | Request::RemoveItem(_) => {
                true
            }
            Request::Batch { ops } => ops
                .iter()
                .any(|op| !matches!(op, Op::Get(_) | Op::GetItems(_))),
            Request::Hello { .. }
            | Request::Get(_)
            | Request::GetItems(_)
            | Request::Topology
            | Request::Dump { .. }
            | Request::Status
            | Request::Digest { .. }
            | Request::RangePage { .. }
            | Request::MergePage { .. } => false,
        }
    }
}

/// The answer to the request with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The request's id (0 when the request was too broken to have one).
    pub id: u64,
    /// What happened.
    pub result: Result<Response, WireError>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// To [`Request::Hello`].
    Hello {
        /// The node's topology version.
        topology: u64,
    },
    /// To [`Request::Get`].
    Siblings(Vec<Sibling>),
    /// To [`Request::Put`].
    Put(PutOutcome),
    /// To [`Request::Remove`].
    Removed(RemoveOutcome),
    /// To [`Request::AddItem`].
    ItemAdded(ItemId),
    /// To [`Request::RemoveItem`].
    ItemRemoved(bool),
    /// To [`Request::GetItems`].
    Items(Vec<ListItem>),
    /// To [`Request::Batch`], one result per operation.
    Batch(Vec<OpResult>),
    /// To [`Request::Topology`].
    Topology(Topology),
    /// To [`Request::Dump`], ordered by key.
    Dump(Vec<KeyDump>),
    /// To [`Request::Status`].
    Status(NodeStatus),
    /// To [`Request::Digest`].
    Digest(RangeDigest),
    /// To [`Request::RangePage`].
    RangePage(RangePage),
    /// To [`Request::MergePage`]: what merging the page wrote.
    Merged(Merged),
}

/// Why a node refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// An optimistic write's parents were not the current versions; nothing changed.
    #[error(transparent)]
    Conflict(Conflict),
    /// See [`StorageError::KeyTooLarge`].
    #[error("key is {len} bytes, more than the limit of {max}")]
    KeyTooLarge {
        /// The key's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// See [`StorageError::ValueTooLarge`].
    #[error("value is {len} bytes, more than the limit of {max}")]
    ValueTooLarge {
        /// The value's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// See [`StorageError::TooManyParents`].
    #[error("{count} parent versions listed, more than the limit of {max}")]
    TooManyParents {
        /// How many were listed.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// The key starts with a zero byte: such keys are reserved for the node's own records
    /// (the stored topology), which clients may neither read nor write. Nothing changed.
    #[error("key starts with a zero byte, which is reserved for the node's own records")]
    ReservedKey,
    /// The client routed with an old topology; fetch the current one and retry.
    #[error("topology changed: the node is at version {version}")]
    TopologyChanged {
        /// The node's topology version.
        version: u64,
    },
    /// The connection did not open with the right shared secret.
    #[error("unauthorized: the node requires its shared secret")]
    Unauthorized,
    /// The frame was longer than the node accepts; the connection is closed.
    #[error("frame too large: the limit is {max} bytes")]
    FrameTooLarge {
        /// The limit.
        max: u64,
    },
    /// The answer would be longer than the node's frame limit (a key's siblings, a list or a
    /// range dump grown that large); nothing was sent. Resolve the siblings (a put naming
    /// them as parents), or raise `--max-frame` on the nodes and the clients together.
    #[error(
        "answer too large: {len} bytes, more than the frame limit of {max} (resolve the key's \
         siblings, or raise --max-frame on nodes and clients alike)"
    )]
    ResponseTooLarge {
        /// The answer's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The frame was not a request this node understands.
    #[error("malformed request: {message}")]
    Malformed {
        /// The decoder's complaint.
        message: String,
    },
    /// The node failed; the request may or may not have been applied.
    #[error("node error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

impl From<StorageError> for WireError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::KeyTooLarge { len, max } => WireError::KeyTooLarge {
                len: len as u64,
                max: max as u64,
            },
            StorageError::ValueTooLarge { len, max } => WireError::ValueTooLarge {
                len: len as u64,
                max: max as u64,
            },
            StorageError::TooManyParents { count, max } => WireError::TooManyParents {
                count: count as u64,
                max: max as u64,
            },
            StorageError::Conflict(c) => WireError::Conflict(c),
            other => WireError::Internal {
                message: other.to_string(),
            },
        }
    }
}

/// Encodes a frame body (without the length prefix).
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    /// Most frames (a key, a 100-byte value, a version) fit: grown from nothing, one would be
    /// reallocated six times.
    const TYPICAL: usize = 256;
    let mut body = Vec::with_capacity(TYPICAL);
    rmp_serde::encode::write_named(&mut body, frame)?;
    Ok(body)
}

/// Just the id of a request, to answer a frame whose request could not be decoded.
#[derive(Deserialize)]
struct Header {
    id: u64,
}

/// Decodes a request frame body. On failure, returns the request id when it could be recovered
/// (the connection can go on) together with the error to send back.
pub fn decode_request(body: &[u8]) -> Result<RequestFrame, (Option<u64>, WireError)> {
    rmp_serde::from_slice::<RequestFrame>(body).map_err(|e| {
        let id = rmp_serde::from_slice::<Header>(body).ok().map(|h| h.id);
        (
            id,
            WireError::Malformed {
                message: e.to_string(),
            },
        )
    })
}

/// Decodes a response frame body.
pub fn decode_response(body: &[u8]) -> Result<ResponseFrame, rmp_serde::decode::Error> {
    rmp_serde::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::codec;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    #[test]
    fn requests_round_trip() {
        let frame = RequestFrame {
            id: 7,
            topology: 1,
            request: Request::Put(PutRequest::new("k", "v")),
        };
        let body = encode(&frame).unwrap();
        assert_eq!(decode_request(&body).unwrap(), frame);
    }

    #[test]
    fn unknown_request_kinds_keep_their_id() {
        #[derive(Serialize)]
        enum Future {
            Teleport { to: String },
        }
        #[derive(Serialize)]
        struct Frame {
            id: u64,
            topology: u64,
            request: Future,
        }
        let body = encode(&Frame {
            id: 42,
            topology: 1,
            request: Future::Teleport { to: "mars".into() },
        })
        .unwrap();
        let (id, err) = decode_request(&body).unwrap_err();
        assert_eq!(id, Some(42));
        assert!(matches!(err, WireError::Malformed { message } if message.contains("Teleport")));
    }

    #[test]
    fn garbage_has_no_id() {
        assert_eq!(decode_request(b"\xc1\xc1").unwrap_err().0, None);
        assert_eq!(decode_request(b"").unwrap_err().0, None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = codec(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode frames until the codec wants more input or gives up on the stream.
            while let Ok(Some(frame)) = codec.decode(&mut buf) {
                let _ = decode_request(&frame);
            }
            let _ = decode_request(&bytes);
        }

        #[test]
        fn arbitrary_keys_and_values_round_trip(key in prop::collection::vec(any::<u8>(), 0..64), value in prop::collection::vec(any::<u8>(), 0..64), id in any::<u64>()) {
            let frame = RequestFrame { id, topology: 3, request: Request::Put(PutRequest::new(key, value)) };
            let body = encode(&frame).unwrap();
            prop_assert_eq!(decode_request(&body).unwrap(), frame);
        }
    }
}
