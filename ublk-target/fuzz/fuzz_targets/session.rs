//! Plays arbitrary bytes as everything a client sends: the NBD handshake
//! (client flags, then options) through the server's real `handshake`, and,
//! if that starts transmission, the rest as requests through the server's
//! real `next_request`. Neither may panic; the server's answers must be
//! well-formed option replies; every request accepted must lie inside the
//! export, be aligned, and carry at most the maximum payload. run.sh also
//! caps any single allocation (-malloc_limit_mb), so a length taken from
//! the input and allocated would show up as a crash.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use canopy_ublk::nbd::server::{
    handshake, next_request, ExportInfo, HandshakeEnd, Incoming, MAX_PAYLOAD, MIN_BLOCK,
};
use canopy_ublk::nbd::wire::{self, Action, BlockSizes, ExportShape};
use libfuzzer_sys::fuzz_target;

/// An export whose size is not a multiple of the chunk, to reach the
/// range checks' edges.
const EXPORT: ExportInfo = ExportInfo {
    shape: ExportShape {
        size: (1 << 30) + 3 * 512,
        block: BlockSizes {
            minimum: MIN_BLOCK,
            preferred: 65536,
            maximum: MAX_PAYLOAD,
        },
    },
    flags: wire::FLAG_HAS_FLAGS
        | wire::FLAG_SEND_FLUSH
        | wire::FLAG_SEND_FUA
        | wire::FLAG_SEND_TRIM
        | wire::FLAG_SEND_WRITE_ZEROES
        | wire::FLAG_CAN_MULTI_CONN,
};

/// The client's bytes in, the server's bytes out.
struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Duplex {
        input: Cursor::new(data),
        output: Vec::new(),
    };
    let end = handshake(&mut s, &EXPORT);
    check_output(&s.output, matches!(end, Ok(HandshakeEnd::Transmission)));
    if !matches!(end, Ok(HandshakeEnd::Transmission)) {
        return;
    }
    // Transmission: at most one request per 28 input bytes, so bounded.
    let mut input = s.input;
    while let Ok(incoming) = next_request(&mut input, &EXPORT.shape) {
        match incoming {
            Incoming::Request { action, .. } => {
                check_action(action);
                if let Action::Write { len, .. } = action {
                    // The server reads exactly the payload next; here it is
                    // skipped without allocating.
                    let got = io::copy(&mut input.by_ref().take(u64::from(len)), &mut io::sink())
                        .unwrap_or(0);
                    if got < u64::from(len) {
                        return;
                    }
                }
            }
            Incoming::Refused { refusal, .. } => {
                assert!([wire::EINVAL, wire::ENOSPC].contains(&refusal.error));
            }
            Incoming::Disconnect => return,
        }
    }
});

/// The greeting, then option replies with their magic, then (only when
/// transmission started through NBD_OPT_EXPORT_NAME) that option's bare
/// answer of 10 or 134 bytes.
fn check_output(out: &[u8], transmission: bool) {
    assert_eq!(out.get(..wire::GREETING_LEN), Some(&wire::greeting()[..]));
    let mut rest = &out[wire::GREETING_LEN..];
    while rest.len() >= 20 {
        let Some(h) = wire::parse_option_reply_header(rest[..20].try_into().unwrap()) else {
            break;
        };
        assert!(h.len < 4096, "an option reply of {} bytes", h.len);
        let end = 20 + h.len as usize;
        assert!(end <= rest.len(), "an option reply cut short");
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        assert!(transmission, "stray bytes after the option replies");
        assert!(
            rest == wire::export_name_reply(EXPORT.shape.size, EXPORT.flags, true)
                || rest == wire::export_name_reply(EXPORT.shape.size, EXPORT.flags, false),
            "malformed EXPORT_NAME answer"
        );
    }
}

fn check_action(action: Action) {
    let (offset, len) = match action {
        Action::Read { offset, len } | Action::Write { offset, len, .. } => {
            assert!(len <= MAX_PAYLOAD);
            (offset, len)
        }
        Action::Trim { offset, len, .. } | Action::WriteZeroes { offset, len, .. } => (offset, len),
        Action::Flush => return,
        Action::Disconnect => unreachable!("DISC is returned as Incoming::Disconnect"),
    };
    let end = offset.checked_add(u64::from(len)).expect("range overflows");
    assert!(end <= EXPORT.shape.size, "request beyond the export");
    assert!(offset.is_multiple_of(u64::from(MIN_BLOCK)) && len.is_multiple_of(MIN_BLOCK));
}
