//! MessagePack encoding with named fields.
//!
//! `rmp_serde::to_vec` writes structs as positional arrays, so adding or skipping a field breaks
//! every old reader; we always write maps (`to_vec_named`). Decoding is size-checked first, and a
//! decode failure is a value the caller turns into a typed protocol error.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Encodes a value as MessagePack with named fields.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a MessagePack value of at most [`MAX_FRAME_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_limited(bytes, MAX_FRAME_BYTES)
}

/// Decodes a MessagePack value of at most `limit` bytes.
pub fn decode_limited<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(rmp_serde::from_slice(bytes)?)
}
