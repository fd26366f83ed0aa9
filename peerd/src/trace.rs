//! `--trace-protocol`: one line per message sent or received.
//!
//! Format: `<node-name> <send|recv> <peer> <message>`, where the peer is
//! `parent` or `child#N` and the message is [`canopy_proto::Message`]'s
//! `Display` (`IO_REQUEST/GET xid=5 hops=32 VOLUME_ID=... BLOCK_NUM=7 ...`).
//! Every line is flushed as it is written, because tests and operators read
//! the file while the daemon runs.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use canopy_node::ChildId;
use canopy_proto::Message;

/// The other end of a link, as traces and logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerName {
    /// This node's parent.
    Parent,
    /// A child, numbered by the driver in accept order from 1.
    Child(ChildId),
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerName::Parent => f.write_str("parent"),
            PeerName::Child(id) => write!(f, "child#{id}"),
        }
    }
}

/// Where trace lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceTarget {
    /// A file, created (truncated) at start.
    File(PathBuf),
    /// Standard output.
    Stdout,
    /// Standard error (a leaf's standard output carries command replies).
    Stderr,
}

/// Direction of a traced message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Written to a link.
    Send,
    /// Read from a link.
    Recv,
}

impl Direction {
    fn word(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Recv => "recv",
        }
    }
}

/// An open trace sink with the node's name.
pub struct Tracer {
    name: String,
    out: Option<Box<dyn Write + Send>>,
}

impl Tracer {
    /// Open `target` for a node called `name`.
    pub fn open(name: &str, target: &TraceTarget) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            TraceTarget::File(p) => Box::new(File::create(p)?),
            TraceTarget::Stdout => Box::new(io::stdout()),
            TraceTarget::Stderr => Box::new(io::stderr()),
        };
        Ok(Tracer {
            name: name.to_string(),
            out: Some(out),
        })
    }

    /// A tracer writing to any sink (tests).
    pub fn to_writer(name: &str, out: Box<dyn Write + Send>) -> Self {
        Tracer {
            name: name.to_string(),
            out: Some(out),
        }
    }

    /// Write one line and flush it. A failing sink is reported once and then
    /// dropped: losing the trace must not stop the node.
    pub fn record(&mut self, dir: Direction, peer: PeerName, msg: &Message) {
        let Some(out) = self.out.as_mut() else { return };
        let line = format!("{} {} {} {}\n", self.name, dir.word(), peer, msg);
        let r = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        if let Err(e) = r {
            tracing::error!(error = %e, "protocol trace failed; tracing stops");
            self.out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn line_format() {
        let buf = Shared::default();
        let mut t = Tracer::to_writer("C", Box::new(buf.clone()));
        let mut m = Message::new(canopy_proto::Opcode::IoRequest, 5);
        m.params.io_op = Some(canopy_proto::IoOp::Get);
        m.params.volume_id = Some(26924852);
        m.params.block_num = Some(7);
        m.params.permissions = Some(canopy_proto::Perm::Read);
        t.record(Direction::Recv, PeerName::Child(1), &m);
        t.record(Direction::Send, PeerName::Parent, &m);
        let s = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            s,
            "C recv child#1 IO_REQUEST/GET xid=5 hops=32 VOLUME_ID=26924852 BLOCK_NUM=7 PERMISSIONS=READ_PERMS\n\
             C send parent IO_REQUEST/GET xid=5 hops=32 VOLUME_ID=26924852 BLOCK_NUM=7 PERMISSIONS=READ_PERMS\n"
        );
    }
}
