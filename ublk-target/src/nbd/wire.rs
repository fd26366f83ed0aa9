//! The NBD wire format: handshake, options, requests and replies, as pure
//! functions over byte slices (no I/O), so that every decoder is unit
//! tested, round-trip tested and fuzzed without a socket.
//!
//! Only what canopy serves is modelled: the fixed newstyle handshake,
//! simple replies, and the commands READ, WRITE, DISC, FLUSH, TRIM and
//! WRITE_ZEROES. Everything else a client may send decodes to a value the
//! server can refuse properly (an unknown option, an unknown command),
//! never to an error that would drop the connection: the protocol asks a
//! server to refuse what it does not understand, not to hang up.
//!
//! The specification is the NBD project's `doc/proto.md`; the names of the
//! constants below are its names without the `NBD_` prefix.

use thiserror::Error;

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after `NBDMAGIC` and
/// by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is served.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is honoured.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is served.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is served.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the export may be used over several connections at
/// once (FLUSH and FUA on one are visible through all).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and start transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not served).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies (not served: simple replies only).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of export information.
pub const REP_INFO: u32 = 3;
/// Option reply error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply error: the option's data is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply error: the option's data is too large to process.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by its payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Reply error: operation not permitted.
pub const EPERM: u32 = 1;
/// Reply error: I/O error.
pub const EIO: u32 = 5;
/// Reply error: invalid argument (also: unknown command or flag).
pub const EINVAL: u32 = 22;
/// Reply error: a write beyond the end of the export.
pub const ENOSPC: u32 = 28;
/// Reply error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Size of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The reserved zeros after an `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// A violation that leaves no way to answer: the server hangs up (a "hard
/// disconnect", which the specification allows for these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum WireError {
    /// The client set a flag the server did not offer.
    #[error("client flags {0:#x} include flags the server did not offer")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// A request did not start with the request magic.
    #[error("request magic {0:#010x} is wrong")]
    BadRequestMagic(u32),
}

/// The server's first 18 bytes: the magics and its handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client's flags word says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (may send any option).
    pub fixed: bool,
    /// Omit the zeros after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Decode the client's flags; an unknown flag is a hard disconnect (the
/// specification says the server MUST drop the connection).
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, WireError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of an option the client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number (`OPT_*`).
    pub option: u32,
    /// How many bytes of data follow.
    pub len: u32,
}

/// Decode an option header; a wrong magic is a hard disconnect (the stream
/// is out of step, so nothing after it can be trusted).
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, WireError> {
    let magic = be_u64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(bytes, 8),
        len: be_u32(bytes, 12),
    })
}

/// An option header as a client sends it (for tests and clients).
pub fn encode_option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..].copy_from_slice(&len.to_be_bytes());
    out
}

/// An option the server understands, with its data decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `NBD_OPT_EXPORT_NAME` with the export's name.
    ExportName(&'a [u8]),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO` (`go: false`) or `NBD_OPT_GO` (`go: true`).
    Info {
        /// Whether transmission starts after the reply.
        go: bool,
        /// The export's name.
        name: &'a [u8],
        /// The information types asked for (each `INFO_*`).
        requests: Vec<u16>,
    },
    /// Any other option (including STARTTLS and STRUCTURED_REPLY, which
    /// canopy refuses): answered with `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// Why an option's data could not be decoded: answered with
/// `NBD_REP_ERR_INVALID`, after which negotiation goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum OptionError {
    /// `NBD_OPT_LIST` (or ABORT) carried data.
    #[error("option {0} takes no data")]
    UnexpectedData(u32),
    /// The INFO/GO data is shorter or longer than its own lengths say.
    #[error("INFO/GO data of {0} bytes does not match its name and request counts")]
    BadInfoLength(usize),
}

/// Decode an option's data. `data` is exactly the `len` bytes announced in
/// the header (the caller bounds `len` before reading them).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption<'_>, OptionError> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(data)),
        // The specification asks the server to answer ABORT with an ACK
        // whatever it carries, so its data is ignored rather than refused.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST if data.is_empty() => Ok(ClientOption::List),
        OPT_LIST => Err(OptionError::UnexpectedData(option)),
        OPT_INFO | OPT_GO => {
            let bad = || OptionError::BadInfoLength(data.len());
            let name_len = data.get(..4).map(|b| be_u32(b, 0)).ok_or_else(bad)?;
            let name_end = usize::try_from(name_len)
                .ok()
                .and_then(|n| n.checked_add(4))
                .filter(|&end| end <= data.len())
                .ok_or_else(bad)?;
            let name = &data[4..name_end];
            let rest = &data[name_end..];
            let count = rest.get(..2).map(|b| be_u16(b, 0)).ok_or_else(bad)?;
            let list = &rest[2..];
            if list.len() != usize::from(count) * 2 {
                return Err(bad());
            }
            let requests = list
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Ok(ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// The data of an INFO/GO option as a client sends it (for tests and
/// clients). `None` if the name does not fit the format's length fields.
pub fn encode_info_data(name: &[u8], requests: &[u16]) -> Option<Vec<u8>> {
    let name_len = u32::try_from(name.len()).ok()?;
    let count = u16::try_from(requests.len()).ok()?;
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&count.to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    Some(out)
}

/// Append an option reply (header and data) to `out`. `data` is at most a
/// few hundred bytes here (names and info items canopy chose).
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8], out: &mut Vec<u8>) {
    // The server only ever sends short, self-made replies; saturating keeps
    // this total without a panic path.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// A decoded option reply header (for tests and clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Decode an option reply header; `None` on a wrong magic.
pub fn parse_option_reply_header(bytes: &[u8; 20]) -> Option<OptionReplyHeader> {
    (be_u64(bytes, 0) == OPTION_REPLY_MAGIC).then(|| OptionReplyHeader {
        option: be_u32(bytes, 8),
        reply: be_u32(bytes, 12),
        len: be_u32(bytes, 16),
    })
}

/// `NBD_INFO_EXPORT`: the export's size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(sizes: BlockSizes) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&sizes.minimum.to_be_bytes());
    out[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
    out[10..].copy_from_slice(&sizes.maximum.to_be_bytes());
    out
}

/// `NBD_INFO_NAME`: the export's canonical name.
pub fn info_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&INFO_NAME.to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// `NBD_REP_SERVER` data: one export name (no description).
pub fn rep_server(name: &[u8]) -> Vec<u8> {
    let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client
/// asked otherwise) 124 reserved zeros.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_ZEROES, 0);
    }
    out
}

/// The block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths must be multiples of this (a power of two).
    pub minimum: u32,
    /// Requests of (multiples of) this size avoid read-modify-write.
    pub preferred: u32,
    /// The largest READ or WRITE payload served.
    pub maximum: u32,
}

/// A transmission request header, as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`, or anything else a client sends).
    pub command: u16,
    /// Opaque to the server: echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (a WRITE's payload length).
    pub len: u32,
}

/// Decode a request header; a wrong magic is a hard disconnect.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(bytes, 4),
        command: be_u16(bytes, 6),
        handle: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        len: be_u32(bytes, 24),
    })
}

/// Encode a request header (for tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.command.to_be_bytes());
    out[8..16].copy_from_slice(&r.handle.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// A simple reply header; a successful READ's data follows it.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Decode a simple reply header into `(error, handle)` (for tests and
/// clients); `None` on a wrong magic.
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Option<(u32, u64)> {
    (be_u32(bytes, 0) == SIMPLE_REPLY_MAGIC).then(|| (be_u32(bytes, 4), be_u64(bytes, 8)))
}

/// The export as the request checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportShape {
    /// Size in bytes.
    pub size: u64,
    /// The advertised block sizes.
    pub block: BlockSizes,
}

/// What a valid request asks the volume to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length (at most the maximum block size).
        len: u32,
    },
    /// Write the `len`-byte payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte length (at most the maximum block size).
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make every write already answered durable.
    Flush,
    /// Discard the range (canopy makes it read back as zeros).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make the range read back as zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// The client forbade punching a hole (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
    },
    /// End the session once the requests in flight are answered.
    Disconnect,
}

/// A request refused with an NBD error. For a WRITE the payload still has
/// to be consumed (or the connection dropped) to stay in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error for the reply (`EINVAL`, `ENOSPC`).
    pub error: u32,
    /// Why, for the log.
    pub reason: &'static str,
}

/// Decide what a request asks for, or which error it earns. The checks are
/// the specification's: unknown commands and flags get `EINVAL`; a range
/// past the end gets `ENOSPC` for the commands that write data and
/// `EINVAL` otherwise; offsets and lengths must be multiples of the
/// minimum block size; a READ or WRITE longer than the maximum block size
/// is refused before anything is allocated for it.
pub fn check_request(r: &Request, export: &ExportShape) -> Result<Action, Refusal> {
    let refuse = |error, reason| Err(Refusal { error, reason });
    let fua = r.flags & CMD_FLAG_FUA != 0;
    // FUA is valid on every command once offered (the specification says
    // the server MUST accept it, even where it means nothing); NO_HOLE
    // only on WRITE_ZEROES. Everything else was never offered.
    let allowed = match r.command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    match r.command {
        CMD_DISC => return Ok(Action::Disconnect),
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {}
        _ => return refuse(EINVAL, "unknown command"),
    }
    if r.flags & !allowed != 0 {
        return refuse(EINVAL, "flag not valid for this command");
    }
    if r.command == CMD_FLUSH {
        if r.offset != 0 || r.len != 0 {
            return refuse(EINVAL, "FLUSH with a non-zero offset or length");
        }
        return Ok(Action::Flush);
    }
    let carries_data = matches!(r.command, CMD_READ | CMD_WRITE);
    if carries_data && r.len > export.block.maximum {
        return refuse(EINVAL, "longer than the maximum block size");
    }
    let min = u64::from(export.block.minimum.max(1));
    if !r.offset.is_multiple_of(min) || !u64::from(r.len).is_multiple_of(min) {
        return refuse(EINVAL, "not aligned to the minimum block size");
    }
    let fits = r
        .offset
        .checked_add(u64::from(r.len))
        .is_some_and(|end| end <= export.size);
    if !fits {
        // Writing past the end is "no space"; reading or trimming there
        // is a bad argument (as nbdkit and qemu-nbd answer).
        let error = match r.command {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        };
        return refuse(error, "beyond the end of the export");
    }
    let (offset, len) = (r.offset, r.len);
    Ok(match r.command {
        CMD_READ => Action::Read { offset, len },
        CMD_WRITE => Action::Write { offset, len, fua },
        CMD_TRIM => Action::Trim { offset, len, fua },
        _ => Action::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: r.flags & CMD_FLAG_NO_HOLE != 0,
        },
    })
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHAPE: ExportShape = ExportShape {
        size: 1 << 20,
        block: BlockSizes {
            minimum: 512,
            preferred: 65536,
            maximum: 32 << 20,
        },
    };

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_is_the_fixed_newstyle_one() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 0]),
            Ok(ClientFlags {
                fixed: false,
                no_zeroes: false
            })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(WireError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header_needs_its_magic() {
        let mut h = encode_option_header(OPT_GO, 9);
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 9
            })
        );
        h[0] ^= 1;
        assert!(matches!(
            parse_option_header(&h),
            Err(WireError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn info_data_lengths_are_checked() {
        // Name longer than the data.
        assert_eq!(
            parse_option(OPT_GO, &[0, 0, 0, 9, b'a', 0, 0]),
            Err(OptionError::BadInfoLength(7))
        );
        // Count says 1 request, none present.
        assert_eq!(
            parse_option(OPT_INFO, &[0, 0, 0, 0, 0, 1]),
            Err(OptionError::BadInfoLength(6))
        );
        // Trailing garbage.
        assert_eq!(
            parse_option(OPT_INFO, &[0, 0, 0, 0, 0, 0, 9]),
            Err(OptionError::BadInfoLength(7))
        );
        // A huge name length must not overflow.
        assert_eq!(
            parse_option(OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]),
            Err(OptionError::BadInfoLength(6))
        );
        assert_eq!(
            parse_option(OPT_GO, &[]),
            Err(OptionError::BadInfoLength(0))
        );
        assert_eq!(
            parse_option(OPT_LIST, &[1]),
            Err(OptionError::UnexpectedData(OPT_LIST))
        );
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, &[]),
            Ok(ClientOption::Unsupported(OPT_STRUCTURED_REPLY))
        );
        assert_eq!(parse_option(OPT_ABORT, &[1, 2]), Ok(ClientOption::Abort));
    }

    #[test]
    fn export_name_reply_pads_unless_told_not_to() {
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        let short = export_name_reply(0x1234, FLAG_HAS_FLAGS, true);
        assert_eq!(short, [0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 1]);
    }

    #[test]
    fn requests_map_to_actions() {
        assert_eq!(
            check_request(&req(CMD_READ, 0, 512, 4096), &SHAPE),
            Ok(Action::Read {
                offset: 512,
                len: 4096
            })
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &SHAPE),
            Ok(Action::Write {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &SHAPE),
            Ok(Action::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true
            })
        );
        assert_eq!(
            check_request(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &SHAPE),
            Ok(Action::Flush)
        );
        assert_eq!(
            check_request(&req(CMD_DISC, 0, 0, 0), &SHAPE),
            Ok(Action::Disconnect)
        );
    }

    #[test]
    fn bad_requests_get_the_specified_errors() {
        let err = |r: Request| check_request(&r, &SHAPE).map_err(|e| e.error);
        assert_eq!(err(req(99, 0, 0, 0)), Err(EINVAL));
        assert_eq!(err(req(5, 0, 0, 512)), Err(EINVAL)); // CACHE: not offered
        assert_eq!(err(req(CMD_READ, 1 << 4, 0, 512)), Err(EINVAL));
        assert_eq!(err(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512)), Err(EINVAL));
        assert_eq!(err(req(CMD_FLUSH, 0, 1, 0)), Err(EINVAL));
        assert_eq!(err(req(CMD_READ, 0, 1, 512)), Err(EINVAL));
        assert_eq!(err(req(CMD_WRITE, 0, 0, 100)), Err(EINVAL));
        assert_eq!(err(req(CMD_READ, 0, 1 << 20, 512)), Err(EINVAL));
        assert_eq!(err(req(CMD_TRIM, 0, 1 << 20, 512)), Err(EINVAL));
        assert_eq!(err(req(CMD_WRITE, 0, 1 << 20, 512)), Err(ENOSPC));
        assert_eq!(err(req(CMD_WRITE_ZEROES, 0, 1 << 20, 512)), Err(ENOSPC));
        assert_eq!(err(req(CMD_WRITE, 0, u64::MAX - 511, 512)), Err(ENOSPC));
        assert_eq!(err(req(CMD_READ, 0, 0, (32 << 20) + 512)), Err(EINVAL));
        // Trim and zero carry no payload, so their length is not capped by
        // the maximum block size, only by the export.
        let big = ExportShape {
            size: 1 << 33,
            ..SHAPE
        };
        assert!(check_request(&req(CMD_TRIM, 0, 0, u32::MAX - 511), &big).is_ok());
    }

    fn any_request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(flags, command, handle, offset, len)| Request {
                flags,
                command,
                handle,
                offset,
                len,
            })
    }

    proptest! {
        #[test]
        fn request_round_trips(r in any_request()) {
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }

        #[test]
        fn simple_reply_round_trips(error in any::<u32>(), handle in any::<u64>()) {
            prop_assert_eq!(parse_simple_reply(&simple_reply(error, handle)), Some((error, handle)));
        }

        #[test]
        fn option_header_round_trips(option in any::<u32>(), len in any::<u32>()) {
            prop_assert_eq!(
                parse_option_header(&encode_option_header(option, len)),
                Ok(OptionHeader { option, len })
            );
        }

        #[test]
        fn info_data_round_trips(
            name in proptest::collection::vec(any::<u8>(), 0..300),
            requests in proptest::collection::vec(any::<u16>(), 0..20),
            go in any::<bool>(),
        ) {
            let data = encode_info_data(&name, &requests).unwrap();
            let option = if go { OPT_GO } else { OPT_INFO };
            prop_assert_eq!(
                parse_option(option, &data),
                Ok(ClientOption::Info { go, name: &name[..], requests: requests.clone() })
            );
        }

        #[test]
        fn option_reply_round_trips(
            option in any::<u32>(),
            reply in any::<u32>(),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut out = Vec::new();
            encode_option_reply(option, reply, &data, &mut out);
            let header: [u8; 20] = out[..20].try_into().unwrap();
            prop_assert_eq!(
                parse_option_reply_header(&header),
                Some(OptionReplyHeader { option, reply, len: data.len() as u32 })
            );
            prop_assert_eq!(&out[20..], &data[..]);
        }

        /// Whatever a client sends, an accepted request stays inside the
        /// export, is aligned, and carries at most the maximum payload.
        #[test]
        fn accepted_requests_are_in_bounds(r in any_request()) {
            if let Ok(action) = check_request(&r, &SHAPE) {
                let range = match action {
                    Action::Read { offset, len } | Action::Write { offset, len, .. } => {
                        prop_assert!(len <= SHAPE.block.maximum);
                        Some((offset, len))
                    }
                    Action::Trim { offset, len, .. } | Action::WriteZeroes { offset, len, .. } => {
                        Some((offset, len))
                    }
                    Action::Flush | Action::Disconnect => None,
                };
                if let Some((offset, len)) = range {
                    prop_assert!(offset + u64::from(len) <= SHAPE.size);
                    prop_assert_eq!(offset % 512, 0);
                    prop_assert_eq!(len % 512, 0);
                }
            }
        }
    }
}
