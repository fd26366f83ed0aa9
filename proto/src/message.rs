//! A decoded message: header plus typed parameters.

use std::fmt;
use std::net::Ipv6Addr;

use bytes::Bytes;

use crate::types::{ConnectFlags, Flags, IoOp, Opcode, Perm, Status};

/// The fixed message header (seed 001, table 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the message is.
    pub opcode: Opcode,
    /// Hops the message may still travel; a request arriving with 0 is a loop.
    pub hops_left: u8,
    /// FORCE_SYNC and RECOVERY_OP. PARAMS is set by the encoder and cleared
    /// by the decoder, so two equal messages compare equal.
    pub flags: Flags,
    /// Address of the node that first sent the request.
    pub originator: Ipv6Addr,
    /// The requester's transaction id; a reply repeats it.
    pub xid: u32,
}

/// The parameters a message may carry, each at most once.
///
/// Fields are `None` when absent; the encoder writes present ones in
/// parameter-type order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// `VOLUME_NAME`.
    pub volume_name: Option<String>,
    /// `VOLUME_ID` (per hop; proxies may remap it).
    pub volume_id: Option<u32>,
    /// `CONNECT_FLAGS`.
    pub connect_flags: Option<ConnectFlags>,
    /// `BLOCK_NUM`: the chunk number.
    pub block_num: Option<u64>,
    /// `PERMISSIONS`.
    pub permissions: Option<Perm>,
    /// `DATA`: a whole chunk.
    pub data: Option<Bytes>,
    /// `VERIFIER`.
    pub verifier: Option<Bytes>,
    /// `KEY`.
    pub key: Option<Bytes>,
    /// `TTL` in milliseconds.
    pub ttl_ms: Option<u32>,
    /// `HB_TTL` in milliseconds.
    pub hb_ttl_ms: Option<u32>,
    /// `STATUS`.
    pub status: Option<Status>,
    /// `ERR_PARAM`: the type of the parameter an error is about.
    pub err_param: Option<u16>,
    /// `ERR_VALUE`: the offending value or bits.
    pub err_value: Option<Bytes>,
    /// `IO_OP`: which IO_REQUEST this is.
    pub io_op: Option<IoOp>,
    /// `CHUNK_SIZE` in bytes.
    pub chunk_size: Option<u32>,
    /// `VOLUME_SIZE` in bytes.
    pub volume_size: Option<u64>,
    /// `VERSION` of the chunk.
    pub version: Option<u64>,
    /// `GRANT`: the signed expiry of the permission a message grants.
    pub grant: Option<Bytes>,
    /// `COOKIE`: the baked cookie authorising a write going up.
    pub cookie: Option<Bytes>,
    /// `RECEIPT`: the burnt cookie answering a write.
    pub receipt: Option<Bytes>,
    /// `COOKIES`: sealed raw cookies for the writer's pool.
    pub cookies: Option<Bytes>,
}

impl Params {
    /// Whether no parameter is present (the encoder then leaves PARAMS unset).
    pub fn is_empty(&self) -> bool {
        *self == Params::default()
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The fixed header.
    pub header: Header,
    /// The parameters.
    pub params: Params,
}

impl Message {
    /// A message with the given opcode and XID, default hops, no flags, an
    /// unspecified originator and no parameters.
    pub fn new(opcode: Opcode, xid: u32) -> Self {
        Message {
            header: Header {
                opcode,
                hops_left: crate::DEFAULT_HOPS,
                flags: Flags::default(),
                originator: Ipv6Addr::UNSPECIFIED,
                xid,
            },
            params: Params::default(),
        }
    }

    /// An ERR_REPLY to `xid` with `status`.
    pub fn err_reply(xid: u32, status: Status) -> Self {
        let mut m = Message::new(Opcode::ErrReply, xid);
        m.params.status = Some(status);
        m
    }
}

/// One line per message, `OPCODE[/IO_OP] xid=N k=v ...`, for `--trace-protocol`.
///
/// Data is shown by length only: traces are for message sequences, not contents.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        let p = &self.params;
        write!(f, "{}", h.opcode)?;
        if let Some(op) = p.io_op {
            write!(f, "/{}", op.name())?;
        }
        write!(f, " xid={} hops={}", h.xid, h.hops_left)?;
        if h.flags.contains(Flags::FORCE_SYNC) {
            f.write_str(" FORCE_SYNC")?;
        }
        if h.flags.contains(Flags::RECOVERY_OP) {
            f.write_str(" RECOVERY_OP")?;
        }
        if let Some(v) = &p.volume_name {
            write!(f, " VOLUME_NAME={v:?}")?;
        }
        if let Some(v) = p.volume_id {
            write!(f, " VOLUME_ID={v}")?;
        }
        if let Some(v) = p.connect_flags {
            write!(f, " CONNECT_FLAGS={:#x}", v.0)?;
        }
        if let Some(v) = p.block_num {
            write!(f, " BLOCK_NUM={v}")?;
        }
        if let Some(v) = p.permissions {
            write!(f, " PERMISSIONS={}", v.name())?;
        }
        if let Some(v) = &p.data {
            write!(f, " DATA=<{} bytes>", v.len())?;
        }
        if let Some(v) = &p.verifier {
            write!(f, " VERIFIER=<{} bytes>", v.len())?;
        }
        if let Some(v) = &p.key {
            write!(f, " KEY=<{} bytes>", v.len())?;
        }
        if let Some(v) = p.ttl_ms {
            write!(f, " TTL={v}ms")?;
        }
        if let Some(v) = p.hb_ttl_ms {
            write!(f, " HB_TTL={v}ms")?;
        }
        if let Some(v) = p.status {
            write!(f, " STATUS={v}")?;
        }
        if let Some(v) = p.err_param {
            write!(f, " ERR_PARAM={v}")?;
        }
        if let Some(v) = &p.err_value {
            write!(f, " ERR_VALUE=<{} bytes>", v.len())?;
        }
        if let Some(v) = p.chunk_size {
            write!(f, " CHUNK_SIZE={v}")?;
        }
        if let Some(v) = p.volume_size {
            write!(f, " VOLUME_SIZE={v}")?;
        }
        if let Some(v) = p.version {
            write!(f, " VERSION={v}")?;
        }
        if let Some(v) = &p.grant {
            write!(f, " GRANT=<{} bytes>", v.len())?;
        }
        if let Some(v) = &p.cookie {
            write!(f, " COOKIE=<{} bytes>", v.len())?;
        }
        if let Some(v) = &p.receipt {
            write!(f, " RECEIPT=<{} bytes>", v.len())?;
        }
        if let Some(v) = &p.cookies {
            write!(f, " COOKIES=<{} bytes>", v.len())?;
        }
        Ok(())
    }
}
