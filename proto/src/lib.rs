//! canopy's wire protocol (seed 001, tables 1–5).
//!
//! A message is a fixed [`Header`] followed, when the `PARAMS` flag is set, by
//! TLV parameters ended by `END_MSG`. On a byte stream every message is framed
//! by a big-endian `u32` length ([`frame`]).
//!
//! Departures from the seed, and why:
//! - `BLOCK_NUM` is 64-bit (volumes are larger than 65 536 chunks).
//! - A parameter's length is 32-bit, so one `DATA` can carry a 1 MiB chunk.
//! - The originator is 16 bytes (IPv6, with IPv4 mapped), not 4.
//! - The `IO_OP` parameter names the kind of `IO_REQUEST` (GET, PUT, FLUSH,
//!   LOCK, RECOVER); the seed shows it as "OPCODE = GET" without a field.
//! - Parameter types with the high bit ([`OPTIONAL_PARAM_BIT`]) set may be
//!   skipped by a receiver that does not know them; any other unknown type is
//!   `BAD_PARAM_ID`, as table 4 requires for "a required parameter".
//!
//! The decoder never panics: any input maps to a [`Message`] or to a
//! [`DecodeError`] that carries the status, `ERR_PARAM` and `ERR_VALUE` of the
//! `ERR_REPLY` a node sends back.
#![warn(missing_docs)]

mod codec;
mod error;
pub mod frame;
mod message;
mod types;

pub use codec::{decode, encode, encode_to_vec};
pub use error::DecodeError;
pub use message::{Header, Message, Params};
pub use types::{ConnectFlags, Flags, IoOp, Opcode, ParamType, Perm, Status};

/// Size of the fixed header in bytes: opcode, hops-left, flags, originator, XID.
pub const HEADER_LEN: usize = 1 + 1 + 2 + 16 + 4;

/// Parameter types with this bit set are optional to understand.
pub const OPTIONAL_PARAM_BIT: u16 = 0x8000;

/// The largest `DATA` parameter accepted: the largest chunk size.
pub const MAX_DATA: usize = 1 << 20;

/// The largest message accepted on a stream: one chunk plus room for the
/// header and the other parameters.
pub const MAX_MESSAGE: usize = MAX_DATA + 64 * 1024;

/// The longest `VOLUME_NAME`, in bytes.
pub const MAX_VOLUME_NAME: usize = 255;

/// The longest opaque parameter (`VERIFIER`, `KEY`, `ERR_VALUE`, `COOKIES`),
/// in bytes:
/// ample for any checksum, signature or key, small enough that a peer cannot
/// make a node hold megabytes outside `DATA`.
pub const MAX_OPAQUE: usize = 4096;

/// Hops-left given to a fresh request: deeper than any sane tree, shallow
/// enough that a loop is caught quickly.
pub const DEFAULT_HOPS: u8 = 32;
