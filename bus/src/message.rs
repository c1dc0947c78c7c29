//! Typed messages with stable wire names, and their MessagePack encoding.

use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// A message that travels on the bus.
///
/// The wire name identifies the type on the wire and in the error queue; it must not change
/// when the Rust type is renamed or moved, so it is spelled out instead of derived from
/// `std::any::type_name`.
///
/// ```
/// use rhinobus::Message;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct CallMade {
///     account: String,
///     seconds: u32,
/// }
///
/// impl Message for CallMade {
///     const NAME: &'static str = "billing.call-made";
/// }
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable wire name, e.g. `"billing.call-made"`.
    const NAME: &'static str;

    /// How long after it is sent (after it is due, for a delayed send) a message of this type
    /// is still worth handling; `None`, the default, is for ever. A message received later is
    /// acknowledged without being handled: a price or a position that a newer one has
    /// replaced, a notification nobody waits for any more. On RabbitMQ the broker also drops
    /// it from a queue it waited in too long, without delivering it (unless it was delayed, or
    /// is back from a delayed retry: the endpoint drops those). A message in the error queue
    /// is kept there whatever its time, and a replay handles it. Not for a saga's timeouts: a
    /// timeout dropped while its endpoint was down would never come.
    ///
    /// [`SendOptions::time_to_be_received`](crate::SendOptions::time_to_be_received) sets it
    /// for one send. It is checked against the receiving host's clock, so keep it well above
    /// the skew between hosts.
    ///
    /// ```
    /// use rhinobus::Message;
    /// use serde::{Deserialize, Serialize};
    /// use std::time::Duration;
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct PriceQuoted {
    ///     sku: String,
    ///     cents: u64,
    /// }
    ///
    /// impl Message for PriceQuoted {
    ///     const NAME: &'static str = "catalog.price-quoted";
    ///     const TIME_TO_BE_RECEIVED: Option<Duration> = Some(Duration::from_secs(30));
    /// }
    /// ```
    const TIME_TO_BE_RECEIVED: Option<Duration> = None;

    /// About how many bytes this message takes encoded: [`encode`] starts with a buffer this
    /// big rather than growing one from empty. Worth overriding for big messages (a batch of
    /// thousands of items); a wrong guess costs a reallocation or some spare bytes, nothing
    /// more.
    ///
    /// ```
    /// use rhinobus::Message;
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct PricesChanged {
    ///     skus: Vec<String>,
    /// }
    ///
    /// impl Message for PricesChanged {
    ///     const NAME: &'static str = "catalog.prices-changed";
    ///
    ///     fn encoded_size_hint(&self) -> usize {
    ///         // Each SKU, its string marker, and the field name once.
    ///         16 + self.skus.iter().map(|s| s.len() + 5).sum::<usize>()
    ///     }
    /// }
    ///
    /// let m = PricesChanged { skus: vec!["A-1".into(); 1000] };
    /// let body = rhinobus::message::encode(&m).unwrap();
    /// assert!(body.len() <= m.encoded_size_hint());
    /// ```
    fn encoded_size_hint(&self) -> usize {
        256
    }
}

/// The content type of every body rhinobus writes: MessagePack with named fields.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Why a body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be written as MessagePack.
    #[error("cannot encode {type_name} as MessagePack: {source}")]
    Encode {
        /// The wire name of the message.
        type_name: &'static str,
        /// What the encoder said.
        source: rmp_serde::encode::Error,
    },
    /// The bytes are not a valid MessagePack body of the expected type.
    #[error("cannot decode body as {type_name}: {source}")]
    Decode {
        /// The wire name of the message.
        type_name: &'static str,
        /// What the decoder said.
        source: rmp_serde::decode::Error,
    },
    /// The type's `Deserialize` panicked on these bytes (a `deserialize_with` that unwraps,
    /// say): as bad as undecodable bytes, and handled the same way.
    #[error("decoding body as {type_name} panicked: {message}")]
    DecodePanicked {
        /// The wire name of the message.
        type_name: &'static str,
        /// The panic's message.
        message: String,
    },
}

/// Encodes a message as MessagePack with named fields, so that readers of an older or newer
/// version of the type can skip fields they do not know.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, CodecError> {
    let mut body = Vec::with_capacity(message.encoded_size_hint());
    rmp_serde::encode::write_named(&mut body, message).map_err(|source| CodecError::Encode {
        type_name: M::NAME,
        source,
    })?;
    Ok(body)
}

/// Decodes a MessagePack body as `M`.
///
/// A `Deserialize` that panics is caught and reported as [`CodecError::DecodePanicked`].
pub fn decode<M: Message>(body: &[u8]) -> Result<M, CodecError> {
    std::panic::catch_unwind(|| rmp_serde::from_slice(body))
        .map_err(|panic| CodecError::DecodePanicked {
            type_name: M::NAME,
            message: panic_text(panic.as_ref()),
        })?
        .map_err(|source| CodecError::Decode {
            type_name: M::NAME,
            source,
        })
}

/// What a caught panic said, when it said it with a string.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        id: u32,
    }
    impl Message for V1 {
        const NAME: &'static str = "test.v";
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        id: u32,
        #[serde(default)]
        note: Option<String>,
    }
    impl Message for V2 {
        const NAME: &'static str = "test.v";
    }

    #[test]
    fn new_optional_fields_do_not_break_old_or_new_readers() {
        let old = encode(&V1 { id: 7 }).unwrap();
        assert_eq!(decode::<V2>(&old).unwrap(), V2 { id: 7, note: None });
        let new = encode(&V2 {
            id: 8,
            note: Some("x".into()),
        })
        .unwrap();
        assert_eq!(decode::<V1>(&new).unwrap(), V1 { id: 8 });
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let err = decode::<V1>(&[0xc1, 0xff, 0x00]).unwrap_err();
        assert!(err.to_string().contains("test.v"), "{err}");
    }
}
