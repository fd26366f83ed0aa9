//! The protocol's enumerations and bitfields, with their wire values.

use std::fmt;

/// A message's opcode (seed 001, table 5, plus GET_COOKIES).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// A child joins the tree for a volume.
    Connect = 1,
    /// A child leaves.
    Disconnect = 2,
    /// GET, PUT, FLUSH, LOCK or RECOVER, named by the `IO_OP` parameter.
    IoRequest = 3,
    /// Success reply; its XID is the request's.
    OkReply = 4,
    /// Failure reply with `STATUS`, and `ERR_PARAM`/`ERR_VALUE` for a bad parameter.
    ErrReply = 5,
    /// A parent revokes or downgrades a child's permission on a chunk.
    Invalidate = 6,
    /// Data sent down ahead of demand.
    Push = 7,
    /// Keeps a child's global TTL (HB_TTL) alive.
    Heartbeat = 8,
    /// A semi-sync writer asks its parent to send a chunk one level further up.
    Forward = 9,
    /// A writer asks the root for a batch of raw write cookies.
    GetCookies = 10,
}

impl Opcode {
    /// The opcode for a wire byte, if it is one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Connect,
            2 => Self::Disconnect,
            3 => Self::IoRequest,
            4 => Self::OkReply,
            5 => Self::ErrReply,
            6 => Self::Invalidate,
            7 => Self::Push,
            8 => Self::Heartbeat,
            9 => Self::Forward,
            10 => Self::GetCookies,
            _ => return None,
        })
    }

    /// Whether this opcode answers a request (and so reuses its XID).
    pub fn is_reply(self) -> bool {
        matches!(self, Self::OkReply | Self::ErrReply)
    }

    /// The name used in protocol traces, as the seed spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Disconnect => "DISCONNECT",
            Self::IoRequest => "IO_REQUEST",
            Self::OkReply => "OK_REPLY",
            Self::ErrReply => "ERR_REPLY",
            Self::Invalidate => "INVALIDATE",
            Self::Push => "PUSH",
            Self::Heartbeat => "HEARTBEAT",
            Self::Forward => "FORWARD",
            Self::GetCookies => "GET_COOKIES",
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Header flags (`hdrFlags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// The write must reach the volume root durably before it is acknowledged.
    pub const FORCE_SYNC: Flags = Flags(0x0001);
    /// Parameters follow the header, ended by `END_MSG`.
    pub const PARAMS: Flags = Flags(0x0002);
    /// The message is part of recovery and revalidation.
    pub const RECOVERY_OP: Flags = Flags(0x0004);
    /// Every flag this version knows.
    pub const KNOWN: u16 = 0x0007;

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags with `other`'s bits added.
    pub fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// These flags with `other`'s bits removed.
    pub fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

/// Parameter types (seed 001, table 3, plus the ones canopy adds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ParamType {
    /// Ends the parameter list; empty value.
    EndMsg = 0,
    /// UTF-8 volume name, 1..=255 bytes.
    VolumeName = 1,
    /// Per-hop volume id, `u32`.
    VolumeId = 2,
    /// [`ConnectFlags`], `u32`.
    ConnectFlags = 3,
    /// Chunk number, `u64`.
    BlockNum = 4,
    /// [`Perm`], `u16`.
    Permissions = 5,
    /// Chunk contents, up to [`crate::MAX_DATA`] bytes.
    Data = 6,
    /// Checksum or signature over the data; opaque here.
    Verifier = 7,
    /// Key material; opaque here.
    Key = 8,
    /// Grant lifetime in milliseconds, `u32`.
    Ttl = 9,
    /// Global (per-parent) lifetime in milliseconds, `u32`.
    HbTtl = 10,
    /// [`Status`] of an ERR_REPLY, `u16`.
    Status = 11,
    /// Type of the parameter an error is about, `u16`.
    ErrParam = 12,
    /// The offending value or bits; opaque.
    ErrValue = 13,
    /// [`IoOp`] of an IO_REQUEST, `u16`.
    IoOp = 14,
    /// Chunk size of the volume in bytes, `u32`.
    ChunkSize = 15,
    /// Volume size in bytes, `u64`.
    VolumeSize = 16,
    /// Chunk version, `u64`: rises with every write that reaches the root.
    Version = 17,
    /// A grant's signed expiry on a volume with keys (chunk, version,
    /// permission, wall-clock expiry, signature); opaque here.
    Grant = 18,
    /// A baked write cookie on a write going up (volume with keys); opaque
    /// here.
    Cookie = 19,
    /// A burnt cookie: the receipt in the reply to a write; opaque here.
    Receipt = 20,
    /// Raw cookies sealed under the data key, one after another, for the
    /// writer's pool; opaque here.
    Cookies = 21,
}

impl ParamType {
    /// The parameter type for a wire value, if this version knows it.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::EndMsg,
            1 => Self::VolumeName,
            2 => Self::VolumeId,
            3 => Self::ConnectFlags,
            4 => Self::BlockNum,
            5 => Self::Permissions,
            6 => Self::Data,
            7 => Self::Verifier,
            8 => Self::Key,
            9 => Self::Ttl,
            10 => Self::HbTtl,
            11 => Self::Status,
            12 => Self::ErrParam,
            13 => Self::ErrValue,
            14 => Self::IoOp,
            15 => Self::ChunkSize,
            16 => Self::VolumeSize,
            17 => Self::Version,
            18 => Self::Grant,
            19 => Self::Cookie,
            20 => Self::Receipt,
            21 => Self::Cookies,
            _ => return None,
        })
    }
}

/// A permission on a chunk, granted root → child one hop at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum Perm {
    /// No right to the chunk (`NO_PERMS`).
    #[default]
    No = 0,
    /// Read only (`READ_PERMS`).
    Read = 1,
    /// Read and write (`WRITE_PERMS`).
    Write = 2,
}

impl Perm {
    /// The permission for a wire value, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::No,
            1 => Self::Read,
            2 => Self::Write,
            _ => return None,
        })
    }

    /// The seed's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::No => "NO_PERMS",
            Self::Read => "READ_PERMS",
            Self::Write => "WRITE_PERMS",
        }
    }
}

/// The kind of an IO_REQUEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum IoOp {
    /// Fetch a chunk with READ or WRITE permission.
    Get = 1,
    /// Write a chunk the sender does not hold WRITE on.
    Put = 2,
    /// Send back a chunk the sender holds WRITE on, keeping `PERMISSIONS`.
    Flush = 3,
    /// Change permission without moving data (upgrade or give up).
    Lock = 4,
    /// Revalidate permissions after a failure.
    Recover = 5,
}

impl IoOp {
    /// The operation for a wire value, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Get,
            2 => Self::Put,
            3 => Self::Flush,
            4 => Self::Lock,
            5 => Self::Recover,
            _ => return None,
        })
    }

    /// The seed's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Flush => "FLUSH",
            Self::Lock => "LOCK",
            Self::Recover => "RECOVER",
        }
    }
}

/// CONNECT_FLAGS: option flags a child asks for, information flags a parent gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectFlags(pub u32);

impl ConnectFlags {
    /// Every write of this connection goes to the root before it is acknowledged.
    pub const SYNC_WRITE: ConnectFlags = ConnectFlags(0x0001);
    /// Writes are acknowledged by the receiving node.
    pub const ASYNC_WRITE: ConnectFlags = ConnectFlags(0x0002);
    /// Writes are acknowledged once the parent holds them.
    pub const SEMI_SYNC_WRITE: ConnectFlags = ConnectFlags(0x0004);
    /// Information: the replying node is the volume's root.
    pub const IS_ROOT: ConnectFlags = ConnectFlags(0x0100);
    /// Information: the replying node is a proxy with a parent.
    pub const IS_PROXY: ConnectFlags = ConnectFlags(0x0200);
    /// Information, on a volume with keys: the connecting node holds the
    /// data key and opens the records it receives itself, so its parent
    /// may send it records and grants without signatures (which only
    /// relays need). A node that claims it falsely gets records it cannot
    /// check or pass on: it harms only itself and what is below it.
    pub const OPENS_RECORDS: ConnectFlags = ConnectFlags(0x0400);
    /// Every flag this version knows.
    pub const KNOWN: u32 = 0x0707;

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: ConnectFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags with `other`'s bits added.
    pub fn with(self, other: ConnectFlags) -> ConnectFlags {
        ConnectFlags(self.0 | other.0)
    }
}

/// STATUS values of an ERR_REPLY (seed 001, table 4, plus canopy's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// The message header was invalid.
    InvalidHeader = 1,
    /// A required parameter was not recognised.
    BadParamId = 2,
    /// A parameter's length was wrong.
    BadParamLength = 3,
    /// A parameter's value was not allowed.
    BadParamValue = 4,
    /// The request came back round (hops-left ran out).
    LoopDetected = 5,
    /// The verifier did not match the data.
    BadVerifier = 6,
    /// The chunk is frozen during recovery.
    InRecovery = 7,
    /// The sender lacks the permission the request needs.
    NoPermission = 8,
    /// The write cookie was already spent.
    CookieSpent = 9,
    /// A parameter this opcode requires is missing (`ERR_PARAM` names it).
    MissingParam = 10,
    /// No volume by that name or id here.
    NoSuchVolume = 11,
    /// The chunk is beyond the end of the volume.
    OutOfRange = 12,
    /// The node's store failed.
    IoError = 13,
    /// The request needs a CONNECT first.
    NotConnected = 14,
    /// The node does not support this request.
    Unsupported = 15,
    /// The node cannot reach its parent.
    ParentUnavailable = 16,
}

impl Status {
    /// The status for a wire value, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::InvalidHeader,
            2 => Self::BadParamId,
            3 => Self::BadParamLength,
            4 => Self::BadParamValue,
            5 => Self::LoopDetected,
            6 => Self::BadVerifier,
            7 => Self::InRecovery,
            8 => Self::NoPermission,
            9 => Self::CookieSpent,
            10 => Self::MissingParam,
            11 => Self::NoSuchVolume,
            12 => Self::OutOfRange,
            13 => Self::IoError,
            14 => Self::NotConnected,
            15 => Self::Unsupported,
            16 => Self::ParentUnavailable,
            _ => return None,
        })
    }

    /// The seed's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidHeader => "INVALID_HEADER",
            Self::BadParamId => "BAD_PARAM_ID",
            Self::BadParamLength => "BAD_PARAM_LENGTH",
            Self::BadParamValue => "BAD_PARAM_VALUE",
            Self::LoopDetected => "LOOP_DETECTED",
            Self::BadVerifier => "BAD_VERIFIER",
            Self::InRecovery => "IN_RECOVERY",
            Self::NoPermission => "NO_PERMISSION",
            Self::CookieSpent => "COOKIE_SPENT",
            Self::MissingParam => "MISSING_PARAM",
            Self::NoSuchVolume => "NO_SUCH_VOLUME",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::IoError => "IO_ERROR",
            Self::NotConnected => "NOT_CONNECTED",
            Self::Unsupported => "UNSUPPORTED",
            Self::ParentUnavailable => "PARENT_UNAVAILABLE",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
