//! The leaf's line protocol on stdin/stdout, for tests and scripting.
//!
//! One command per line, one reply line per command, in order:
//!
//! | command | reply |
//! |---|---|
//! | `read CHUNK [OFFSET LEN]` | `ok HEX` — that byte range (default: the first 16 bytes) |
//! | `write CHUNK OFFSET HEX [sync]` | `ok` — `sync` forces a durable write at the root |
//! | `lock CHUNK read\|write\|no` | `ok` |
//! | `stats` | `ok JSON` |
//!
//! A refused request answers `err STATUS` (`err NO_PERMISSION`, `err
//! OUT_OF_RANGE`, `err STOPPED`); a malformed command answers `err USAGE
//! explanation`. Blank lines and lines starting with `#` get no reply.
//! Commands run one at a time, so replies need no tags.

use bytes::Bytes;
use canopy_proto::Perm;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::driver::{NodeHandle, RequestError};

/// Bytes a `read` shows when no range is given: enough to recognise a
/// pattern, short enough for a terminal line.
pub const DEFAULT_READ_LEN: usize = 16;

/// Lowercase hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

/// Bytes from hex (either case); None if the text is not whole hex bytes.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

fn usage(msg: &str) -> String {
    format!("err USAGE {msg}")
}

fn refused(e: RequestError) -> String {
    format!("err {e}")
}

fn num<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<T, String> {
    let s = s.ok_or_else(|| usage(&format!("missing {what}")))?;
    s.parse().map_err(|_| usage(&format!("bad {what} '{s}'")))
}

/// Run one command line; None for a line that gets no reply.
pub async fn execute(handle: &NodeHandle, line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    Some(match run(handle, line).await {
        Ok(s) | Err(s) => s,
    })
}

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Read {
        chunk: u64,
        off: usize,
        len: usize,
    },
    Write {
        chunk: u64,
        offset: u32,
        data: Vec<u8>,
        sync: bool,
    },
    Lock {
        chunk: u64,
        perm: Perm,
    },
    Stats,
}

/// Parse a whole line before doing anything, so a malformed command never
/// half-runs.
fn parse(line: &str) -> Result<Command, String> {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or_default();
    let c = match cmd {
        "read" => {
            let chunk = num(words.next(), "CHUNK")?;
            let (off, len) = match words.next() {
                None => (0, DEFAULT_READ_LEN),
                Some(o) => (num(Some(o), "OFFSET")?, num(words.next(), "LEN")?),
            };
            Command::Read { chunk, off, len }
        }
        "write" => {
            let chunk = num(words.next(), "CHUNK")?;
            let offset = num(words.next(), "OFFSET")?;
            let hex = words.next().ok_or_else(|| usage("missing HEX"))?;
            let data =
                from_hex(hex).ok_or_else(|| usage("HEX must be whole bytes of hex digits"))?;
            let sync = match words.next() {
                None => false,
                Some("sync") => true,
                Some(w) => {
                    return Err(usage(&format!("unexpected '{w}' (only 'sync' may follow)")))
                }
            };
            Command::Write {
                chunk,
                offset,
                data,
                sync,
            }
        }
        "lock" => {
            let chunk = num(words.next(), "CHUNK")?;
            let perm = match words.next() {
                Some("read") => Perm::Read,
                Some("write") => Perm::Write,
                Some("no") => Perm::No,
                _ => return Err(usage("lock CHUNK read|write|no")),
            };
            Command::Lock { chunk, perm }
        }
        "stats" => Command::Stats,
        other => {
            return Err(usage(&format!(
                "unknown command '{other}' (read, write, lock, stats)"
            )))
        }
    };
    if words.next().is_some() {
        return Err(usage("too many arguments"));
    }
    Ok(c)
}

async fn run(handle: &NodeHandle, line: &str) -> Result<String, String> {
    Ok(match parse(line)? {
        Command::Read { chunk, off, len } => {
            let data = handle.read(chunk).await.map_err(refused)?;
            let end = off.checked_add(len).filter(|&e| e <= data.len());
            let Some(end) = end else {
                return Err(format!("err OUT_OF_RANGE (chunk has {} bytes)", data.len()));
            };
            format!("ok {}", to_hex(&data[off..end]))
        }
        Command::Write {
            chunk,
            offset,
            data,
            sync,
        } => {
            handle
                .write(chunk, offset, Bytes::from(data), sync)
                .await
                .map_err(refused)?;
            "ok".to_string()
        }
        Command::Lock { chunk, perm } => {
            handle.lock(chunk, perm).await.map_err(refused)?;
            "ok".to_string()
        }
        Command::Stats => {
            let s = handle.stats().await.map_err(refused)?;
            let json = serde_json::to_string(&s).map_err(|e| format!("err IO_ERROR {e}"))?;
            format!("ok {json}")
        }
    })
}

/// Serve commands from `input` until end of file, replying on `output`.
pub async fn serve<R, W>(handle: &NodeHandle, input: R, mut output: W) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = input.lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(reply) = execute(handle, &line).await {
            output.write_all(reply.as_bytes()).await?;
            output.write_all(b"\n").await?;
            output.flush().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(from_hex("00AB7f"), Some(vec![0, 0xab, 0x7f]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(""), Some(vec![]));
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("read 7"),
            Ok(Command::Read {
                chunk: 7,
                off: 0,
                len: 16
            })
        );
        assert_eq!(
            parse("read 7 4 2"),
            Ok(Command::Read {
                chunk: 7,
                off: 4,
                len: 2
            })
        );
        assert_eq!(
            parse("write 7 0 abcd sync"),
            Ok(Command::Write {
                chunk: 7,
                offset: 0,
                data: vec![0xab, 0xcd],
                sync: true
            })
        );
        assert_eq!(
            parse("lock 3 no"),
            Ok(Command::Lock {
                chunk: 3,
                perm: Perm::No
            })
        );
        assert_eq!(parse("stats"), Ok(Command::Stats));
        for bad in [
            "read",
            "read x",
            "read 1 2",
            "write 1 0 abc",
            "write 1 0 ab fast",
            "lock 1 maybe",
            "stats now",
            "frob",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with("err USAGE "), "{bad}: {e}");
        }
    }
}
