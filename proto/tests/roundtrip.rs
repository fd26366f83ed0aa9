//! Property tests: every valid message survives encode → decode (alone and
//! through stream framing cut at arbitrary points), and the decoder never
//! panics on arbitrary or damaged input, answering only with messages that
//! are themselves stable under re-encoding.

use std::net::Ipv6Addr;

use bytes::{Buf, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use canopy_proto::frame::{split_frame, write_frame, FrameBuf, SPLIT_AT};
use canopy_proto::{
    decode, encode_to_vec, ConnectFlags, Flags, Header, IoOp, Message, Opcode, Params, Perm,
    Status, MAX_OPAQUE, MAX_VOLUME_NAME,
};

/// Data is capped well below `MAX_DATA` to keep each case fast; the limit
/// itself is covered by the unit tests.
const TEST_MAX_DATA: usize = 4096;

fn opcode() -> impl Strategy<Value = Opcode> {
    (1u8..=10).prop_map(|b| Opcode::from_u8(b).expect("1..=10 are opcodes"))
}

fn io_op() -> impl Strategy<Value = IoOp> {
    (1u16..=5).prop_map(|v| IoOp::from_u16(v).expect("1..=5 are io ops"))
}

fn perm() -> impl Strategy<Value = Perm> {
    (0u16..=2).prop_map(|v| Perm::from_u16(v).expect("0..=2 are perms"))
}

fn status() -> impl Strategy<Value = Status> {
    (1u16..=16).prop_map(|v| Status::from_u16(v).expect("1..=16 are statuses"))
}

/// Any subset of the known header flags except PARAMS, which the in-memory
/// header never carries.
fn flags() -> impl Strategy<Value = Flags> {
    any::<u16>().prop_map(|b| Flags(b & Flags::KNOWN).without(Flags::PARAMS))
}

fn connect_flags() -> impl Strategy<Value = ConnectFlags> {
    any::<u32>().prop_map(|b| ConnectFlags(b & ConnectFlags::KNOWN))
}

/// A UTF-8 name of 1..=255 bytes (at most 63 chars of up to 4 bytes each).
fn volume_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{1,255}",
        "\\PC{1,63}".prop_filter("non-empty", |s| !s.is_empty()),
    ]
    .prop_map(|s| {
        assert!(s.len() <= MAX_VOLUME_NAME);
        s
    })
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn header() -> impl Strategy<Value = Header> {
    (
        opcode(),
        any::<u8>(),
        flags(),
        any::<[u8; 16]>(),
        any::<u32>(),
    )
        .prop_map(|(opcode, hops_left, flags, orig, xid)| Header {
            opcode,
            hops_left,
            flags,
            originator: Ipv6Addr::from(orig),
            xid,
        })
}

/// Any combination of parameters, each present or not.
fn params() -> impl Strategy<Value = Params> {
    let a = (
        proptest::option::of(volume_name()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(connect_flags()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(perm()),
        proptest::option::of(blob(TEST_MAX_DATA)),
        proptest::option::of(blob(MAX_OPAQUE)),
        proptest::option::of(blob(MAX_OPAQUE)),
        proptest::option::of(any::<u32>()),
    );
    let b = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(status()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(blob(MAX_OPAQUE)),
        proptest::option::of(io_op()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(blob(MAX_OPAQUE)),
    );
    let c = (
        proptest::option::of(blob(MAX_OPAQUE)),
        proptest::option::of(blob(MAX_OPAQUE)),
        proptest::option::of(blob(MAX_OPAQUE)),
    );
    (a, b, c).prop_map(
        |(
            (
                volume_name,
                volume_id,
                connect_flags,
                block_num,
                permissions,
                data,
                verifier,
                key,
                ttl_ms,
            ),
            (
                hb_ttl_ms,
                status,
                err_param,
                err_value,
                io_op,
                chunk_size,
                volume_size,
                version,
                grant,
            ),
            (cookie, receipt, cookies),
        )| Params {
            volume_name,
            volume_id,
            connect_flags,
            block_num,
            permissions,
            data,
            verifier,
            key,
            ttl_ms,
            hb_ttl_ms,
            status,
            err_param,
            err_value,
            io_op,
            chunk_size,
            volume_size,
            version,
            grant,
            cookie,
            receipt,
            cookies,
        },
    )
}

/// Values to fill in whatever the opcode requires and `params` left out.
#[derive(Debug, Clone)]
struct Required {
    volume_id: u32,
    block_num: u64,
    permissions: Perm,
    data: Bytes,
    status: Status,
    io_op: IoOp,
    name: String,
}

fn required() -> impl Strategy<Value = Required> {
    (
        any::<u32>(),
        any::<u64>(),
        perm(),
        blob(TEST_MAX_DATA),
        status(),
        io_op(),
        volume_name(),
    )
        .prop_map(
            |(volume_id, block_num, permissions, data, status, io_op, name)| Required {
                volume_id,
                block_num,
                permissions,
                data,
                status,
                io_op,
                name,
            },
        )
}

/// A message the decoder must accept: any header and parameters, with the
/// opcode's required parameters made present.
fn message() -> impl Strategy<Value = Message> {
    (header(), params(), required()).prop_map(|(header, mut p, r)| {
        let vid = |p: &mut Params| {
            p.volume_id.get_or_insert(r.volume_id);
        };
        let blk = |p: &mut Params| {
            p.block_num.get_or_insert(r.block_num);
        };
        let perm = |p: &mut Params| {
            p.permissions.get_or_insert(r.permissions);
        };
        let data = |p: &mut Params| {
            p.data.get_or_insert_with(|| r.data.clone());
        };
        match header.opcode {
            Opcode::IoRequest => {
                let op = *p.io_op.get_or_insert(r.io_op);
                vid(&mut p);
                blk(&mut p);
                perm(&mut p);
                if op == IoOp::Put {
                    data(&mut p);
                }
            }
            Opcode::ErrReply => {
                p.status.get_or_insert(r.status);
            }
            Opcode::Invalidate => {
                vid(&mut p);
                blk(&mut p);
                perm(&mut p);
            }
            Opcode::Push => {
                vid(&mut p);
                blk(&mut p);
                perm(&mut p);
                data(&mut p);
            }
            Opcode::Forward => {
                vid(&mut p);
                blk(&mut p);
            }
            Opcode::Connect => {
                if p.volume_id.is_none() && p.volume_name.is_none() {
                    p.volume_name = Some(r.name.clone());
                }
            }
            Opcode::Disconnect | Opcode::OkReply | Opcode::Heartbeat | Opcode::GetCookies => {}
        }
        Message { header, params: p }
    })
}

/// Whatever `decode` says about `buf`, it must be self-consistent: a message
/// re-encodes to one that decodes equal, and an error's ERR_REPLY (if any)
/// is itself a valid message carrying the request's XID.
fn check_consistent(buf: &Bytes) -> Result<(), TestCaseError> {
    match decode(buf) {
        Ok(m) => {
            let again = decode(&Bytes::from(encode_to_vec(&m)));
            prop_assert_eq!(again, Ok(m));
        }
        Err(e) => {
            prop_assert!(!e.reason.is_empty());
            if let Some(reply) = e.to_err_reply() {
                prop_assert_eq!(Some(reply.header.xid), e.xid);
                let again = decode(&Bytes::from(encode_to_vec(&reply)));
                prop_assert_eq!(again, Ok(reply));
            }
        }
    }
    Ok(())
}

/// A change to an encoded message.
#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Flip(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(buf: &mut Vec<u8>, m: &Mutation) {
    if buf.is_empty() {
        if let Mutation::Insert(_, b) = m {
            buf.push(*b);
        }
        return;
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(buf.len());
            buf[i] = *b;
        }
        Mutation::Flip(i, bit) => {
            let i = i.index(buf.len());
            buf[i] ^= 1 << bit;
        }
        Mutation::Insert(i, b) => {
            let i = i.index(buf.len() + 1);
            buf.insert(i, *b);
        }
        Mutation::Remove(i) => {
            let i = i.index(buf.len());
            buf.remove(i);
        }
        Mutation::Truncate(i) => {
            let i = i.index(buf.len());
            buf.truncate(i);
        }
    }
}

proptest! {
    #[test]
    fn decode_inverts_encode(m in message()) {
        let wire = encode_to_vec(&m);
        prop_assert_eq!(decode(&Bytes::from(wire)), Ok(m));
    }

    #[test]
    fn framing_survives_any_split_points(
        msgs in vec(message(), 1..5),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for m in &msgs {
            write_frame(m, &mut stream);
        }
        let stream = stream.freeze();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();

        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for cut in cuts {
            buf.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            while let Some(frame) = split_frame(&mut buf).expect("valid frame lengths") {
                got.push(decode(&frame).expect("valid message"));
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn a_frame_buf_writes_the_bytes_write_frame_writes(
        msgs in vec(message(), 1..5),
        big in vec(proptest::option::of(vec(any::<u8>(), SPLIT_AT..SPLIT_AT * 3)), 1..5),
        steps in vec((1usize..4, any::<Index>()), 1..40),
    ) {
        // Some messages get a DATA value long enough to be sent from its
        // own buffer rather than copied.
        let msgs: Vec<Message> = msgs
            .into_iter()
            .zip(big.into_iter().chain(std::iter::repeat(None)))
            .map(|(mut m, d)| {
                if let Some(d) = d {
                    m.params.data = Some(Bytes::from(d));
                }
                m
            })
            .collect();
        let mut want = BytesMut::new();
        let mut fb = FrameBuf::new();
        for m in &msgs {
            write_frame(m, &mut want);
            fb.push(m);
        }
        prop_assert_eq!(fb.len(), want.len());
        // Drain it as a vectored writer would: gather up to `slots`
        // pieces, "write" part of them, advance by that much.
        let mut got = Vec::new();
        let mut steps = steps.into_iter().cycle();
        while fb.has_remaining() {
            // `steps` is not empty, so its cycle never ends.
            let Some((slots, take)) = steps.next() else { break };
            let mut io = [std::io::IoSlice::new(&[]); 3];
            let n = fb.chunks_vectored(&mut io[..slots]);
            prop_assert!(n >= 1);
            let gathered: Vec<u8> = io[..n].iter().flat_map(|s| s.iter().copied()).collect();
            prop_assert!(gathered.starts_with(fb.chunk()));
            // At least one byte, so the loop ends.
            let wrote = take.index(gathered.len()).max(1);
            got.extend_from_slice(&gathered[..wrote]);
            fb.advance(wrote);
            prop_assert_eq!(fb.len(), want.len() - got.len());
        }
        prop_assert_eq!(&got[..], &want[..]);
        prop_assert!(fb.is_empty());
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(raw in vec(any::<u8>(), 0..512)) {
        check_consistent(&Bytes::from(raw))?;
    }

    /// Arbitrary bytes rarely get past the header; damaged valid messages
    /// reach every parameter check.
    #[test]
    fn decode_never_panics_on_damaged_messages(
        m in message(),
        mutations in vec(mutation(), 1..6),
    ) {
        let mut wire = encode_to_vec(&m);
        for mu in &mutations {
            apply(&mut wire, mu);
        }
        check_consistent(&Bytes::from(wire))?;
    }

    #[test]
    fn split_frame_never_panics(raw in vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&raw[..]);
        while let Ok(Some(frame)) = split_frame(&mut buf) {
            check_consistent(&frame)?;
        }
    }
}
