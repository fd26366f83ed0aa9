//! Encoding and strict decoding of one message, without the stream length
//! prefix (that is [`crate::frame`]).
//!
//! Wire layout (all integers big-endian):
//!
//! ```text
//! header (24 bytes): opcode u8 | hops_left u8 | flags u16 | originator [u8; 16] | xid u32
//! when PARAMS is set, TLVs:  type u16 | length u32 | value [u8; length]
//! ... ended by END_MSG:      0x0000   | 0x00000000
//! ```
//!
//! The decoder reads bytes straight from the network, so it is written to
//! never panic: every read is bounds-checked through [`Reader`], lengths are
//! compared rather than added, and every failure becomes a [`DecodeError`]
//! carrying the ERR_REPLY fields that answer it.

use std::net::Ipv6Addr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::message::{Header, Message, Params};
use crate::types::{ConnectFlags, Flags, IoOp, Opcode, ParamType, Perm, Status};
use crate::{HEADER_LEN, MAX_DATA, MAX_OPAQUE, MAX_VOLUME_NAME, OPTIONAL_PARAM_BIT};

/// Size of a TLV's type and length fields.
const TLV_HEADER_LEN: usize = 2 + 4;

/// A parameter's value as the encoder sees it, so the same walk over
/// [`Params`] can size the output and then write it.
enum Value<'a> {
    Raw(&'a [u8]),
    U16(u16),
    U32(u32),
    U64(u64),
}

impl Value<'_> {
    fn len(&self) -> usize {
        match self {
            Value::Raw(v) => v.len(),
            Value::U16(_) => 2,
            Value::U32(_) => 4,
            Value::U64(_) => 8,
        }
    }
}

/// Calls `f` on every present parameter, in parameter-type order (the order
/// the encoder promises; the decoder accepts any order).
fn for_each_param(p: &Params, mut f: impl FnMut(ParamType, Value<'_>)) {
    if let Some(v) = &p.volume_name {
        f(ParamType::VolumeName, Value::Raw(v.as_bytes()));
    }
    if let Some(v) = p.volume_id {
        f(ParamType::VolumeId, Value::U32(v));
    }
    if let Some(v) = p.connect_flags {
        f(ParamType::ConnectFlags, Value::U32(v.0));
    }
    if let Some(v) = p.block_num {
        f(ParamType::BlockNum, Value::U64(v));
    }
    if let Some(v) = p.permissions {
        f(ParamType::Permissions, Value::U16(v as u16));
    }
    if let Some(v) = &p.data {
        f(ParamType::Data, Value::Raw(v));
    }
    if let Some(v) = &p.verifier {
        f(ParamType::Verifier, Value::Raw(v));
    }
    if let Some(v) = &p.key {
        f(ParamType::Key, Value::Raw(v));
    }
    if let Some(v) = p.ttl_ms {
        f(ParamType::Ttl, Value::U32(v));
    }
    if let Some(v) = p.hb_ttl_ms {
        f(ParamType::HbTtl, Value::U32(v));
    }
    if let Some(v) = p.status {
        f(ParamType::Status, Value::U16(v as u16));
    }
    if let Some(v) = p.err_param {
        f(ParamType::ErrParam, Value::U16(v));
    }
    if let Some(v) = &p.err_value {
        f(ParamType::ErrValue, Value::Raw(v));
    }
    if let Some(v) = p.io_op {
        f(ParamType::IoOp, Value::U16(v as u16));
    }
    if let Some(v) = p.chunk_size {
        f(ParamType::ChunkSize, Value::U32(v));
    }
    if let Some(v) = p.volume_size {
        f(ParamType::VolumeSize, Value::U64(v));
    }
    if let Some(v) = p.version {
        f(ParamType::Version, Value::U64(v));
    }
    if let Some(v) = &p.grant {
        f(ParamType::Grant, Value::Raw(v));
    }
    if let Some(v) = &p.cookie {
        f(ParamType::Cookie, Value::Raw(v));
    }
    if let Some(v) = &p.receipt {
        f(ParamType::Receipt, Value::Raw(v));
    }
    if let Some(v) = &p.cookies {
        f(ParamType::Cookies, Value::Raw(v));
    }
}

/// Appends the wire form of `msg` to `out` (no stream length prefix).
///
/// The PARAMS flag is written iff `msg.params` is not empty, whatever
/// `msg.header.flags` says, so the flag can never disagree with the body.
/// Parameters are written in parameter-type order, then `END_MSG`.
///
/// The encoder does not validate: a message the decoder would refuse
/// (unknown flag bits, an over-long name, a missing required parameter) is
/// written as it is. Messages built by this crate's users are trusted, and
/// tests need a way to produce bad input.
///
/// # Panics
///
/// If a parameter value is longer than `u32::MAX` bytes, which no wire
/// length can express; such a value is a bug in the caller (the decoder
/// refuses anything over [`crate::MAX_DATA`]).
pub fn encode(msg: &Message, out: &mut BytesMut) {
    encode_parts(msg, out, usize::MAX, |_, _| {});
}

/// The number of bytes [`encode`] writes for `msg`.
pub(crate) fn encoded_len(msg: &Message) -> usize {
    let p = &msg.params;
    let mut len = HEADER_LEN;
    if !p.is_empty() {
        for_each_param(p, |_, v| len = len.saturating_add(TLV_HEADER_LEN + v.len()));
        len = len.saturating_add(TLV_HEADER_LEN);
    }
    len
}

/// [`encode`], except that a DATA value of `split_at` bytes or more is not
/// copied into `out`: `big` is called with `out` (holding everything
/// before the value) and the value, in its place in the byte stream. What
/// `big` does with them must keep that order (see `FrameBuf`).
pub(crate) fn encode_parts(
    msg: &Message,
    out: &mut BytesMut,
    split_at: usize,
    mut big: impl FnMut(&mut BytesMut, &Bytes),
) {
    let h = &msg.header;
    let p = &msg.params;
    let has_params = !p.is_empty();
    let flags = if has_params {
        h.flags.with(Flags::PARAMS)
    } else {
        h.flags.without(Flags::PARAMS)
    };
    let split = p.data.as_ref().filter(|d| d.len() >= split_at);

    // One reservation for the whole message, so a 1 MiB DATA is copied once
    // (and none for a DATA value that is not copied at all).
    let len = encoded_len(msg).saturating_sub(split.map_or(0, Bytes::len));
    out.reserve(len);

    out.put_u8(h.opcode as u8);
    out.put_u8(h.hops_left);
    out.put_u16(flags.0);
    out.put_slice(&h.originator.octets());
    out.put_u32(h.xid);
    if !has_params {
        return;
    }
    for_each_param(p, |ty, v| {
        let Ok(vlen) = u32::try_from(v.len()) else {
            panic!("parameter {ty:?} longer than u32::MAX bytes");
        };
        out.put_u16(ty as u16);
        out.put_u32(vlen);
        match (v, split) {
            (Value::Raw(_), Some(d)) if ty == ParamType::Data => big(out, d),
            (Value::Raw(b), _) => out.put_slice(b),
            (Value::U16(x), _) => out.put_u16(x),
            (Value::U32(x), _) => out.put_u32(x),
            (Value::U64(x), _) => out.put_u64(x),
        }
    });
    out.put_u16(ParamType::EndMsg as u16);
    out.put_u32(0);
}

/// The wire form of `msg` as a fresh vector; see [`encode`].
pub fn encode_to_vec(msg: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(msg, &mut out);
    out.into()
}

/// A bounds-checked cursor over the input. Every read returns `None` rather
/// than panicking when the input is too short, and byte strings come out as
/// `Bytes` slices of the input (no copy).
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes as a zero-copy slice of the input.
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Some(b)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let a = self.buf.get(self.pos..end)?.try_into().ok()?;
        self.pos = end;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
}

/// What the decoder knows about the message when something goes wrong: the
/// XID and opcode an ERR_REPLY needs, once the header has been read.
#[derive(Clone, Copy, Default)]
struct Ctx {
    xid: Option<u32>,
    opcode: Option<Opcode>,
}

impl Ctx {
    fn err(
        self,
        status: Status,
        err_param: Option<u16>,
        err_value: Bytes,
        reason: &'static str,
    ) -> DecodeError {
        DecodeError {
            status,
            err_param,
            err_value,
            xid: self.xid,
            opcode: self.opcode,
            reason,
        }
    }
}

/// A big-endian length (or bit set) as the ERR_VALUE of an error.
fn be32(v: u32) -> Bytes {
    Bytes::copy_from_slice(&v.to_be_bytes())
}

/// Decodes one message (without the stream length prefix) strictly.
///
/// Accepts exactly what [`encode`] can produce from a valid [`Message`], plus
/// parameters in any order, PARAMS with an empty list, and unknown
/// *optional* parameter types ([`OPTIONAL_PARAM_BIT`]), which are skipped.
/// Anything else is an error whose status, `err_param` and `err_value` are
/// those of the ERR_REPLY that answers it ([`DecodeError::to_err_reply`]);
/// the checks are, in order:
///
/// - the header: fewer than [`HEADER_LEN`] bytes, an unknown opcode (the
///   opcode byte is the ERR_VALUE) or unknown flag bits (those bits are the
///   ERR_VALUE) are INVALID_HEADER, as are bytes after a header without
///   PARAMS;
/// - each TLV: a cut-short TLV header, a length past the end of the input, a
///   fixed-size parameter of the wrong size or a variable one over its limit
///   is BAD_PARAM_LENGTH (the length is the ERR_VALUE); an unknown required
///   type or a repeated known type is BAD_PARAM_ID; a value outside its
///   enumeration (or unknown CONNECT_FLAGS bits, or a non-UTF-8 name) is
///   BAD_PARAM_VALUE; a missing `END_MSG`, an `END_MSG` with a value or bytes
///   after it are BAD_PARAM_LENGTH on parameter 0;
/// - the opcode's required parameters: a missing one is MISSING_PARAM.
///
/// The first failure wins. What needs the node's state is not checked here:
/// a hops-left of 0 (LOOP_DETECTED), permissions, volume ids.
///
/// The decoded header never carries PARAMS, so a decoded message equals the
/// one that was encoded. `DATA`, `VERIFIER`, `KEY` and `ERR_VALUE` are
/// slices of `buf`: no copy, but they keep `buf`'s allocation alive.
///
/// Never panics, whatever `buf` holds.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let mut ctx = Ctx::default();
    let mut r = Reader::new(buf);

    let short = || {
        ctx.err(
            Status::InvalidHeader,
            None,
            Bytes::new(),
            "message shorter than the header",
        )
    };
    if buf.len() < HEADER_LEN {
        return Err(short());
    }
    let (Some(op), Some(hops_left), Some(raw_flags), Some(orig), Some(xid)) =
        (r.u8(), r.u8(), r.u16(), r.array::<16>(), r.u32())
    else {
        return Err(short());
    };
    // The header is complete: from here on every error can be answered.
    ctx.xid = Some(xid);
    let Some(opcode) = Opcode::from_u8(op) else {
        return Err(ctx.err(
            Status::InvalidHeader,
            None,
            Bytes::copy_from_slice(&[op]),
            "unknown opcode",
        ));
    };
    ctx.opcode = Some(opcode);
    let unknown_flags = raw_flags & !(Flags::KNOWN | Flags::PARAMS.0);
    if unknown_flags != 0 {
        return Err(ctx.err(
            Status::InvalidHeader,
            None,
            Bytes::copy_from_slice(&unknown_flags.to_be_bytes()),
            "unknown header flag bits",
        ));
    }
    let flags = Flags(raw_flags);

    let params = if flags.contains(Flags::PARAMS) {
        decode_params(&mut r, ctx)?
    } else {
        if r.remaining() != 0 {
            return Err(ctx.err(
                Status::InvalidHeader,
                None,
                Bytes::new(),
                "bytes after a header without PARAMS",
            ));
        }
        Params::default()
    };
    check_required(opcode, &params, ctx)?;

    Ok(Message {
        header: Header {
            opcode,
            hops_left,
            flags: flags.without(Flags::PARAMS),
            originator: Ipv6Addr::from(orig),
            xid,
        },
        params,
    })
}

/// Reads TLVs up to and including `END_MSG`, which must end the input.
fn decode_params(r: &mut Reader<'_>, ctx: Ctx) -> Result<Params, DecodeError> {
    let mut p = Params::default();
    loop {
        if r.remaining() == 0 {
            return Err(ctx.err(
                Status::BadParamLength,
                Some(ParamType::EndMsg as u16),
                Bytes::new(),
                "parameters not ended by END_MSG",
            ));
        }
        let Some(ty) = r.u16() else {
            return Err(ctx.err(
                Status::BadParamLength,
                None,
                Bytes::new(),
                "parameter header cut short",
            ));
        };
        let known = ParamType::from_u16(ty);
        // ERR_PARAM names the parameter only when we know what it is: an
        // unknown type in a length error would mislead more than help.
        let known_ty = known.map(|_| ty);
        let Some(len) = r.u32() else {
            return Err(ctx.err(
                Status::BadParamLength,
                known_ty,
                Bytes::new(),
                "parameter header cut short",
            ));
        };
        // On a 16-bit usize a length may not convert; it cannot fit then either.
        let Some(value) = usize::try_from(len).ok().and_then(|n| r.take(n)) else {
            return Err(ctx.err(
                Status::BadParamLength,
                known_ty,
                be32(len),
                "parameter runs past the end of the message",
            ));
        };
        match known {
            Some(ParamType::EndMsg) => {
                if len != 0 {
                    return Err(ctx.err(
                        Status::BadParamLength,
                        Some(ty),
                        be32(len),
                        "END_MSG with a value",
                    ));
                }
                break;
            }
            Some(pt) => store_param(&mut p, pt, len, value, ctx)?,
            // Optional types exist so a newer sender can add hints an older
            // receiver may ignore; its length framing still had to be sound.
            None if ty & OPTIONAL_PARAM_BIT != 0 => {}
            None => {
                return Err(ctx.err(
                    Status::BadParamId,
                    Some(ty),
                    Bytes::new(),
                    "unknown required parameter type",
                ))
            }
        }
    }
    if r.remaining() != 0 {
        return Err(ctx.err(
            Status::BadParamLength,
            Some(ParamType::EndMsg as u16),
            Bytes::new(),
            "bytes after END_MSG",
        ));
    }
    Ok(p)
}

/// Whether parameter `pt` is present in `p`.
fn has(p: &Params, pt: ParamType) -> bool {
    match pt {
        ParamType::EndMsg => false,
        ParamType::VolumeName => p.volume_name.is_some(),
        ParamType::VolumeId => p.volume_id.is_some(),
        ParamType::ConnectFlags => p.connect_flags.is_some(),
        ParamType::BlockNum => p.block_num.is_some(),
        ParamType::Permissions => p.permissions.is_some(),
        ParamType::Data => p.data.is_some(),
        ParamType::Verifier => p.verifier.is_some(),
        ParamType::Key => p.key.is_some(),
        ParamType::Ttl => p.ttl_ms.is_some(),
        ParamType::HbTtl => p.hb_ttl_ms.is_some(),
        ParamType::Status => p.status.is_some(),
        ParamType::ErrParam => p.err_param.is_some(),
        ParamType::ErrValue => p.err_value.is_some(),
        ParamType::IoOp => p.io_op.is_some(),
        ParamType::ChunkSize => p.chunk_size.is_some(),
        ParamType::VolumeSize => p.volume_size.is_some(),
        ParamType::Version => p.version.is_some(),
        ParamType::Grant => p.grant.is_some(),
        ParamType::Cookie => p.cookie.is_some(),
        ParamType::Receipt => p.receipt.is_some(),
        ParamType::Cookies => p.cookies.is_some(),
    }
}

/// Validates one known parameter's value and stores it in `p`.
///
/// `len` is the wire length (equal to `value.len()`), kept as the `u32` the
/// peer sent so length errors can echo it.
fn store_param(
    p: &mut Params,
    pt: ParamType,
    len: u32,
    value: Bytes,
    ctx: Ctx,
) -> Result<(), DecodeError> {
    let ty = pt as u16;
    // A repeated parameter is refused rather than letting the first or last
    // one win: the two ends could pick differently, and a message whose
    // meaning depends on such a choice is malformed. BAD_PARAM_ID (the
    // parameter is not acceptable here) fits better than BAD_PARAM_VALUE,
    // since neither value is wrong by itself.
    if has(p, pt) {
        return Err(ctx.err(
            Status::BadParamId,
            Some(ty),
            Bytes::new(),
            "parameter repeated",
        ));
    }
    let bad_len = |reason| ctx.err(Status::BadParamLength, Some(ty), be32(len), reason);
    let wrong_size = || bad_len("fixed-size parameter of the wrong length");
    let at_most = |max: usize, reason| -> Result<(), DecodeError> {
        if value.len() <= max {
            Ok(())
        } else {
            Err(bad_len(reason))
        }
    };
    let bad_value = |err_value, reason| ctx.err(Status::BadParamValue, Some(ty), err_value, reason);
    let v16 = || fixed(&value, wrong_size).map(u16::from_be_bytes);
    let v32 = || fixed(&value, wrong_size).map(u32::from_be_bytes);
    let v64 = || fixed(&value, wrong_size).map(u64::from_be_bytes);

    match pt {
        // Never stored: the caller ends the list on it.
        ParamType::EndMsg => {}
        ParamType::VolumeName => {
            if value.is_empty() || value.len() > MAX_VOLUME_NAME {
                return Err(bad_len("VOLUME_NAME empty or too long"));
            }
            let Ok(name) = std::str::from_utf8(&value) else {
                return Err(bad_value(value.clone(), "VOLUME_NAME not UTF-8"));
            };
            p.volume_name = Some(name.to_owned());
        }
        ParamType::VolumeId => {
            p.volume_id = Some(v32()?);
        }
        ParamType::ConnectFlags => {
            let bits = v32()?;
            // ERR_VALUE names the bits the receiver failed to recognise (seed).
            let unknown = bits & !ConnectFlags::KNOWN;
            if unknown != 0 {
                return Err(bad_value(be32(unknown), "unknown CONNECT_FLAGS bits"));
            }
            p.connect_flags = Some(ConnectFlags(bits));
        }
        ParamType::BlockNum => {
            p.block_num = Some(v64()?);
        }
        ParamType::Permissions => {
            let Some(v) = Perm::from_u16(v16()?) else {
                return Err(bad_value(value.clone(), "unknown PERMISSIONS value"));
            };
            p.permissions = Some(v);
        }
        ParamType::Data => {
            at_most(MAX_DATA, "DATA larger than the largest chunk")?;
            p.data = Some(value);
        }
        ParamType::Verifier => {
            at_most(MAX_OPAQUE, "VERIFIER too long")?;
            p.verifier = Some(value);
        }
        ParamType::Key => {
            at_most(MAX_OPAQUE, "KEY too long")?;
            p.key = Some(value);
        }
        ParamType::Grant => {
            at_most(MAX_OPAQUE, "GRANT too long")?;
            p.grant = Some(value);
        }
        ParamType::Cookie => {
            at_most(MAX_OPAQUE, "COOKIE too long")?;
            p.cookie = Some(value);
        }
        ParamType::Receipt => {
            at_most(MAX_OPAQUE, "RECEIPT too long")?;
            p.receipt = Some(value);
        }
        ParamType::Cookies => {
            at_most(MAX_OPAQUE, "COOKIES too long")?;
            p.cookies = Some(value);
        }
        ParamType::Ttl => {
            p.ttl_ms = Some(v32()?);
        }
        ParamType::HbTtl => {
            p.hb_ttl_ms = Some(v32()?);
        }
        ParamType::Status => {
            let Some(v) = Status::from_u16(v16()?) else {
                return Err(bad_value(value.clone(), "unknown STATUS value"));
            };
            p.status = Some(v);
        }
        ParamType::ErrParam => {
            // Any type may be at fault, including ones this version lacks.
            p.err_param = Some(v16()?);
        }
        ParamType::ErrValue => {
            at_most(MAX_OPAQUE, "ERR_VALUE too long")?;
            p.err_value = Some(value);
        }
        ParamType::IoOp => {
            let Some(v) = IoOp::from_u16(v16()?) else {
                return Err(bad_value(value.clone(), "unknown IO_OP value"));
            };
            p.io_op = Some(v);
        }
        ParamType::ChunkSize => {
            p.chunk_size = Some(v32()?);
        }
        ParamType::VolumeSize => {
            p.volume_size = Some(v64()?);
        }
        ParamType::Version => {
            p.version = Some(v64()?);
        }
    }
    Ok(())
}

/// A fixed-size value as an array, or `wrong_size()` if it is not `N` bytes.
fn fixed<const N: usize>(
    value: &Bytes,
    wrong_size: impl FnOnce() -> DecodeError,
) -> Result<[u8; N], DecodeError> {
    <[u8; N]>::try_from(value.as_ref()).map_err(|_| wrong_size())
}

/// Checks that `opcode` has the parameters it cannot be acted on without,
/// so the node's handlers can rely on them. IO_OP is checked first, since
/// what else an IO_REQUEST needs depends on it; the rest in type order.
fn check_required(opcode: Opcode, p: &Params, ctx: Ctx) -> Result<(), DecodeError> {
    use ParamType as P;
    let missing = |pt: ParamType| {
        ctx.err(
            Status::MissingParam,
            Some(pt as u16),
            Bytes::new(),
            "required parameter missing",
        )
    };
    let need = |list: &[ParamType]| -> Result<(), DecodeError> {
        match list.iter().find(|&&pt| !has(p, pt)) {
            Some(&pt) => Err(missing(pt)),
            None => Ok(()),
        }
    };
    match opcode {
        Opcode::IoRequest => {
            need(&[P::IoOp, P::VolumeId, P::BlockNum, P::Permissions])?;
            if p.io_op == Some(IoOp::Put) {
                need(&[P::Data])?;
            }
            Ok(())
        }
        Opcode::ErrReply => need(&[P::Status]),
        Opcode::Invalidate => need(&[P::VolumeId, P::BlockNum, P::Permissions]),
        Opcode::Push => need(&[P::VolumeId, P::BlockNum, P::Permissions, P::Data]),
        Opcode::Forward => need(&[P::VolumeId, P::BlockNum]),
        // A child names a volume the first time and may use the id a parent
        // gave it after that; either will do. The name is what a child that
        // sent neither most likely forgot.
        Opcode::Connect => {
            if has(p, P::VolumeName) || has(p, P::VolumeId) {
                Ok(())
            } else {
                Err(missing(P::VolumeName))
            }
        }
        Opcode::Disconnect | Opcode::OkReply | Opcode::Heartbeat | Opcode::GetCookies => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XID: u32 = 0x0102_0304;

    /// A TLV with an arbitrary type and value.
    fn tlv(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }

    fn header(op: u8, flags: u16) -> Vec<u8> {
        let mut v = vec![op, 7];
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&[0xfe; 16]);
        v.extend_from_slice(&XID.to_be_bytes());
        v
    }

    /// A message with PARAMS set, the given TLVs and END_MSG.
    fn with_params(op: Opcode, tlvs: &[(u16, &[u8])]) -> Bytes {
        let mut v = header(op as u8, Flags::PARAMS.0);
        for (ty, val) in tlvs {
            tlv(&mut v, *ty, val);
        }
        tlv(&mut v, 0, &[]);
        v.into()
    }

    /// A HEARTBEAT (which needs no parameter) carrying `tlvs`.
    fn hb(tlvs: &[(u16, &[u8])]) -> Bytes {
        with_params(Opcode::Heartbeat, tlvs)
    }

    #[track_caller]
    fn assert_err(
        res: Result<Message, DecodeError>,
        status: Status,
        err_param: Option<u16>,
        err_value: &[u8],
    ) -> DecodeError {
        let e = res.expect_err("decode should fail");
        assert_eq!(e.status, status, "{e}");
        assert_eq!(e.err_param, err_param, "{e}");
        assert_eq!(&e.err_value[..], err_value, "{e}");
        assert!(!e.reason.is_empty());
        e
    }

    /// Errors after a complete header with a valid opcode carry both.
    #[track_caller]
    fn assert_full(e: &DecodeError, op: Opcode) {
        assert_eq!(e.xid, Some(XID));
        assert_eq!(e.opcode, Some(op));
    }

    #[track_caller]
    fn hb_err(tlvs: &[(u16, &[u8])], status: Status, param: Option<u16>, value: &[u8]) {
        let e = assert_err(decode(&hb(tlvs)), status, param, value);
        assert_full(&e, Opcode::Heartbeat);
    }

    fn get_request() -> Message {
        let mut m = Message::new(Opcode::IoRequest, XID);
        m.params.io_op = Some(IoOp::Get);
        m.params.volume_id = Some(3);
        m.params.block_num = Some(99);
        m.params.permissions = Some(Perm::Read);
        m
    }

    #[test]
    fn encodes_the_documented_layout() {
        let mut m = Message::new(Opcode::Forward, 0xdead_beef);
        m.header.hops_left = 5;
        m.header.flags = Flags::FORCE_SYNC;
        m.header.originator = "::ffff:10.0.0.1".parse().unwrap();
        m.params.volume_id = Some(0x0a0b_0c0d);
        m.params.block_num = Some(1);
        let mut want = vec![9, 5, 0x00, 0x03];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        want.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        want.extend_from_slice(&[0, 2, 0, 0, 0, 4, 0x0a, 0x0b, 0x0c, 0x0d]);
        want.extend_from_slice(&[0, 4, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_to_vec(&m), want);
        assert_eq!(decode(&want.into()), Ok(m));
    }

    #[test]
    fn params_flag_follows_the_params_not_the_header() {
        let mut m = Message::new(Opcode::Heartbeat, XID);
        m.header.flags = Flags::PARAMS.with(Flags::RECOVERY_OP);
        let wire = encode_to_vec(&m);
        assert_eq!(wire.len(), HEADER_LEN);
        assert_eq!(&wire[2..4], &[0, 4]);
        let back = decode(&wire.into()).unwrap();
        assert_eq!(back.header.flags, Flags::RECOVERY_OP);

        m.params.ttl_ms = Some(1);
        let wire = encode_to_vec(&m);
        assert_eq!(&wire[2..4], &[0, 6]);
        let back = decode(&wire.into()).unwrap();
        assert_eq!(back.header.flags, Flags::RECOVERY_OP, "PARAMS cleared");
        assert_eq!(back.params.ttl_ms, Some(1));
    }

    #[test]
    fn short_header_is_invalid_and_unanswerable() {
        for n in [0, 1, HEADER_LEN - 1] {
            let buf = Bytes::from(header(4, 0)[..n].to_vec());
            let e = assert_err(decode(&buf), Status::InvalidHeader, None, &[]);
            assert_eq!((e.xid, e.opcode), (None, None));
            assert_eq!(e.to_err_reply(), None);
        }
    }

    #[test]
    fn unknown_opcode_is_invalid_header_with_the_byte() {
        for op in [0u8, 11, 0xff] {
            let e = assert_err(
                decode(&header(op, 0).into()),
                Status::InvalidHeader,
                None,
                &[op],
            );
            assert_eq!((e.xid, e.opcode), (Some(XID), None));
            // The XID is known, so the sender gets an answer.
            let reply = e.to_err_reply().unwrap();
            assert_eq!(reply.header.xid, XID);
            assert_eq!(reply.params.err_value.as_deref(), Some(&[op][..]));
        }
    }

    #[test]
    fn unknown_flag_bits_are_invalid_header_with_the_bits() {
        let e = assert_err(
            decode(&header(8, 0x8009).into()),
            Status::InvalidHeader,
            None,
            &[0x80, 0x08],
        );
        assert_full(&e, Opcode::Heartbeat);
    }

    #[test]
    fn known_flags_survive_and_params_is_cleared() {
        let m = decode(&hb(&[])).unwrap();
        assert_eq!(m.header.flags, Flags::default());
        let mut v = header(8, Flags::KNOWN);
        tlv(&mut v, 0, &[]);
        let m = decode(&v.into()).unwrap();
        assert_eq!(m.header.flags, Flags::FORCE_SYNC.with(Flags::RECOVERY_OP));
        assert_eq!(m.header.hops_left, 7);
        assert_eq!(m.header.originator.octets(), [0xfe; 16]);
        assert!(m.params.is_empty());
    }

    #[test]
    fn bytes_after_a_header_without_params_are_invalid() {
        let mut v = header(8, 0);
        v.push(0);
        let e = assert_err(decode(&v.into()), Status::InvalidHeader, None, &[]);
        assert_full(&e, Opcode::Heartbeat);
        // Exactly a header is fine.
        assert!(decode(&header(8, 0).into()).is_ok());
    }

    #[test]
    fn cut_short_tlv_header_is_bad_length() {
        let base = header(8, Flags::PARAMS.0);
        // One byte: not even a type.
        let mut v = base.clone();
        v.push(0);
        assert_err(decode(&v.into()), Status::BadParamLength, None, &[]);
        // A known type with half a length.
        let mut v = base.clone();
        v.extend_from_slice(&[0, 2, 0, 0]);
        assert_err(decode(&v.into()), Status::BadParamLength, Some(2), &[]);
        // An unknown type is not named.
        let mut v = base.clone();
        v.extend_from_slice(&[0x80, 0x99, 0]);
        assert_err(decode(&v.into()), Status::BadParamLength, None, &[]);
        // END_MSG itself cut short.
        let mut v = base;
        v.extend_from_slice(&[0, 0, 0]);
        let e = assert_err(decode(&v.into()), Status::BadParamLength, Some(0), &[]);
        assert_full(&e, Opcode::Heartbeat);
    }

    #[test]
    fn length_past_the_end_is_bad_length() {
        for len in [5u32, 1000, u32::MAX] {
            let mut v = header(8, Flags::PARAMS.0);
            v.extend_from_slice(&6u16.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&[1, 2, 3, 4]);
            let e = assert_err(
                decode(&v.into()),
                Status::BadParamLength,
                Some(6),
                &len.to_be_bytes(),
            );
            assert_full(&e, Opcode::Heartbeat);
        }
    }

    #[test]
    fn end_msg_rules() {
        // END_MSG with a value.
        let mut v = header(8, Flags::PARAMS.0);
        tlv(&mut v, 0, &[1]);
        assert_err(
            decode(&v.into()),
            Status::BadParamLength,
            Some(0),
            &[0, 0, 0, 1],
        );
        // No END_MSG at all.
        let mut v = header(8, Flags::PARAMS.0);
        tlv(&mut v, 9, &[0, 0, 0, 1]);
        let e = assert_err(decode(&v.into()), Status::BadParamLength, Some(0), &[]);
        assert_full(&e, Opcode::Heartbeat);
        // PARAMS set but nothing follows.
        let v = header(8, Flags::PARAMS.0);
        assert_err(decode(&v.into()), Status::BadParamLength, Some(0), &[]);
        // Bytes after END_MSG.
        let mut v = hb(&[]).to_vec();
        v.push(0);
        assert_err(decode(&v.into()), Status::BadParamLength, Some(0), &[]);
    }

    #[test]
    fn unknown_types_optional_skipped_required_refused() {
        let m = decode(&hb(&[
            (0x8000, b""),
            (0xffff, b"whatever"),
            (9, &[0, 0, 0, 5]),
        ]))
        .unwrap();
        assert_eq!(m.params.ttl_ms, Some(5));
        assert_eq!(
            Params {
                ttl_ms: None,
                ..m.params
            },
            Params::default()
        );
        for ty in [22u16, 0x7fff] {
            hb_err(&[(ty, b"x")], Status::BadParamId, Some(ty), &[]);
        }
    }

    #[test]
    fn duplicate_parameter_is_bad_param_id() {
        hb_err(
            &[(9, &[0, 0, 0, 1]), (10, &[0, 0, 0, 1]), (9, &[0, 0, 0, 1])],
            Status::BadParamId,
            Some(9),
            &[],
        );
        hb_err(&[(6, b""), (6, b"")], Status::BadParamId, Some(6), &[]);
    }

    #[test]
    fn fixed_size_params_of_the_wrong_length() {
        let sizes: [(u16, usize); 12] = [
            (2, 4),
            (3, 4),
            (4, 8),
            (5, 2),
            (9, 4),
            (10, 4),
            (11, 2),
            (12, 2),
            (14, 2),
            (15, 4),
            (16, 8),
            (17, 8),
        ];
        for (ty, n) in sizes {
            for wrong in [0, n - 1, n + 1] {
                let v = vec![0u8; wrong];
                hb_err(
                    &[(ty, &v)],
                    Status::BadParamLength,
                    Some(ty),
                    &(wrong as u32).to_be_bytes(),
                );
            }
        }
    }

    #[test]
    fn volume_name_limits() {
        hb_err(&[(1, b"")], Status::BadParamLength, Some(1), &[0, 0, 0, 0]);
        let long = vec![b'a'; MAX_VOLUME_NAME + 1];
        hb_err(
            &[(1, &long)],
            Status::BadParamLength,
            Some(1),
            &[0, 0, 1, 0],
        );
        let max = "é".repeat(MAX_VOLUME_NAME / 2);
        let m = decode(&hb(&[(1, max.as_bytes())])).unwrap();
        assert_eq!(m.params.volume_name.as_deref(), Some(&max[..]));
        hb_err(&[(1, b"a\xff")], Status::BadParamValue, Some(1), b"a\xff");
    }

    #[test]
    fn opaque_and_data_limits() {
        let data = vec![7u8; MAX_DATA];
        let buf = hb(&[(6, &data)]);
        let m = decode(&buf).unwrap();
        // Zero-copy: DATA points into the input.
        let d = m.params.data.unwrap();
        assert_eq!(d.len(), MAX_DATA);
        assert_eq!(d.as_ptr(), buf[HEADER_LEN + TLV_HEADER_LEN..].as_ptr());
        let data = vec![7u8; MAX_DATA + 1];
        hb_err(
            &[(6, &data)],
            Status::BadParamLength,
            Some(6),
            &(MAX_DATA as u32 + 1).to_be_bytes(),
        );
        for ty in [7u16, 8, 13] {
            let ok = vec![1u8; MAX_OPAQUE];
            assert!(decode(&hb(&[(ty, &ok)])).is_ok());
            let bad = vec![1u8; MAX_OPAQUE + 1];
            hb_err(
                &[(ty, &bad)],
                Status::BadParamLength,
                Some(ty),
                &[0, 0, 0x10, 1],
            );
        }
    }

    #[test]
    fn enumerations_out_of_range_are_bad_value() {
        hb_err(&[(5, &[0, 3])], Status::BadParamValue, Some(5), &[0, 3]);
        hb_err(&[(14, &[0, 0])], Status::BadParamValue, Some(14), &[0, 0]);
        hb_err(&[(14, &[1, 1])], Status::BadParamValue, Some(14), &[1, 1]);
        hb_err(&[(11, &[0, 0])], Status::BadParamValue, Some(11), &[0, 0]);
        hb_err(&[(11, &[0, 17])], Status::BadParamValue, Some(11), &[0, 17]);
        // Any ERR_PARAM is fine: the error may be about a type we lack.
        let m = decode(&hb(&[(12, &[0xab, 0xcd])])).unwrap();
        assert_eq!(m.params.err_param, Some(0xabcd));
    }

    #[test]
    fn unknown_connect_flags_name_the_bits() {
        hb_err(
            &[(3, &[0, 0, 0x13, 0x0b])],
            Status::BadParamValue,
            Some(3),
            &[0, 0, 0x10, 0x08],
        );
        let m = decode(&hb(&[(3, &[0, 0, 7, 7])])).unwrap();
        assert_eq!(
            m.params.connect_flags,
            Some(ConnectFlags(ConnectFlags::KNOWN))
        );
    }

    /// A complete message of each opcode, then each of its required
    /// parameters taken away in turn.
    #[test]
    fn required_parameters() {
        let vid = |m: &mut Message| m.params.volume_id = Some(1);
        let blk = |m: &mut Message| m.params.block_num = Some(2);
        let perm = |m: &mut Message| m.params.permissions = Some(Perm::Write);
        let data = |m: &mut Message| m.params.data = Some(Bytes::from_static(b"x"));
        let full = |op: Opcode, io: Option<IoOp>| {
            let mut m = Message::new(op, XID);
            m.params.io_op = io;
            match op {
                Opcode::IoRequest => {
                    vid(&mut m);
                    blk(&mut m);
                    perm(&mut m);
                    if io == Some(IoOp::Put) {
                        data(&mut m);
                    }
                }
                Opcode::ErrReply => m.params.status = Some(Status::IoError),
                Opcode::Invalidate => {
                    vid(&mut m);
                    blk(&mut m);
                    perm(&mut m);
                }
                Opcode::Push => {
                    vid(&mut m);
                    blk(&mut m);
                    perm(&mut m);
                    data(&mut m);
                }
                Opcode::Forward => {
                    vid(&mut m);
                    blk(&mut m);
                }
                Opcode::Connect => m.params.volume_name = Some("v".into()),
                _ => {}
            }
            m
        };
        use ParamType as P;
        let io_needs = [P::IoOp, P::VolumeId, P::BlockNum, P::Permissions];
        let mut cases: Vec<(Opcode, Option<IoOp>, Vec<ParamType>)> = vec![
            (Opcode::ErrReply, None, vec![P::Status]),
            (
                Opcode::Invalidate,
                None,
                vec![P::VolumeId, P::BlockNum, P::Permissions],
            ),
            (
                Opcode::Push,
                None,
                vec![P::VolumeId, P::BlockNum, P::Permissions, P::Data],
            ),
            (Opcode::Forward, None, vec![P::VolumeId, P::BlockNum]),
            (Opcode::Connect, None, vec![P::VolumeName]),
            (Opcode::Disconnect, None, vec![]),
            (Opcode::OkReply, None, vec![]),
            (Opcode::Heartbeat, None, vec![]),
            (Opcode::GetCookies, None, vec![]),
        ];
        for io in [IoOp::Get, IoOp::Flush, IoOp::Lock, IoOp::Recover] {
            cases.push((Opcode::IoRequest, Some(io), io_needs.to_vec()));
        }
        let mut put = io_needs.to_vec();
        put.push(P::Data);
        cases.push((Opcode::IoRequest, Some(IoOp::Put), put));

        for (op, io, needs) in cases {
            let m = full(op, io);
            assert_eq!(
                decode(&encode_to_vec(&m).into()),
                Ok(m.clone()),
                "{op} {io:?}"
            );
            for need in needs {
                let mut wire = BytesMut::new();
                let mut bad = m.clone();
                match need {
                    P::IoOp => bad.params.io_op = None,
                    P::VolumeId => bad.params.volume_id = None,
                    P::BlockNum => bad.params.block_num = None,
                    P::Permissions => bad.params.permissions = None,
                    P::Data => bad.params.data = None,
                    P::Status => bad.params.status = None,
                    P::VolumeName => bad.params.volume_name = None,
                    other => unreachable!("{other:?}"),
                }
                encode(&bad, &mut wire);
                let e = assert_err(
                    decode(&wire.freeze()),
                    Status::MissingParam,
                    Some(need as u16),
                    &[],
                );
                assert_full(&e, op);
            }
        }
    }

    #[test]
    fn connect_takes_a_name_or_an_id() {
        let mut m = Message::new(Opcode::Connect, XID);
        m.params.volume_id = Some(4);
        assert_eq!(decode(&encode_to_vec(&m).into()), Ok(m.clone()));
        m.params.volume_name = Some("vol".into());
        assert_eq!(decode(&encode_to_vec(&m).into()), Ok(m));
        // Nothing at all, not even PARAMS.
        let e = assert_err(
            decode(&header(1, 0).into()),
            Status::MissingParam,
            Some(1),
            &[],
        );
        assert_full(&e, Opcode::Connect);
    }

    #[test]
    fn parameters_in_any_order() {
        let m = get_request();
        let buf = with_params(
            Opcode::IoRequest,
            &[
                (5, &[0, 1]),
                (4, &99u64.to_be_bytes()),
                (2, &[0, 0, 0, 3]),
                (14, &[0, 1]),
            ],
        );
        let mut want = m;
        want.header.hops_left = 7;
        want.header.originator = Ipv6Addr::from([0xfe; 16]);
        assert_eq!(decode(&buf), Ok(want));
    }

    #[test]
    fn error_becomes_an_err_reply_with_the_xid() {
        let buf = with_params(
            Opcode::IoRequest,
            &[
                (14, &[0, 1]),
                (2, &[0, 0, 0, 3]),
                (4, &[0; 8]),
                (5, &[0, 9]),
            ],
        );
        let e = decode(&buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "BAD_PARAM_VALUE (param 5): unknown PERMISSIONS value"
        );
        let reply = e.to_err_reply().unwrap();
        assert_eq!(reply.header.opcode, Opcode::ErrReply);
        assert_eq!(reply.header.xid, XID);
        assert_eq!(reply.params.status, Some(Status::BadParamValue));
        assert_eq!(reply.params.err_param, Some(5));
        assert_eq!(reply.params.err_value.as_deref(), Some(&[0, 9][..]));
        // The reply itself is a valid message.
        assert_eq!(decode(&encode_to_vec(&reply).into()), Ok(reply));

        // A bad reply is not answered: that could ping-pong forever.
        let mut v = header(Opcode::OkReply as u8, 0);
        v.push(1);
        let e = decode(&v.into()).unwrap_err();
        assert_full(&e, Opcode::OkReply);
        assert_eq!(e.to_err_reply(), None);
    }

    #[test]
    fn the_first_error_wins() {
        // Unknown opcode beats unknown flags; unknown flags beat trailing bytes.
        let mut v = header(0, 0x0100);
        v.push(1);
        assert_err(decode(&v.into()), Status::InvalidHeader, None, &[0]);
        // A bad parameter beats a missing one.
        let buf = with_params(Opcode::IoRequest, &[(14, &[0, 9])]);
        assert_err(decode(&buf), Status::BadParamValue, Some(14), &[0, 9]);
    }
}
