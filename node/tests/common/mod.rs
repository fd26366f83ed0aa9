//! The harness shared by the hand-driven integration tests: an in-memory
//! origin and a tree of [`Node`]s whose messages are delivered by hand.
//!
//! Each test file keeps its own topology (names, parents, per-node config)
//! and its special behaviour; what is here is what they all do the same way.
//! Cargo builds `tests/common/mod.rs` into every test that says
//! `mod common;`, not as a test of its own.

// Each test uses only part of the harness; the rest would warn as unused
// in that test's crate.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role};
use canopy_proto::{Message, Opcode, Status};

/// Declares a test's tree: `topology!(A, B: A, C: A, D: B)` is root `A`,
/// `B` and `C` under it, `D` under `B`. It defines a `usize` constant per
/// node (its index, in the order given: the root first), `NAMES` (each
/// node's name in the log) and `PARENT` (each node's parent), the two
/// slices [`Tree::new`] takes.
#[allow(unused_macros)] // unused in the tests without a tree
macro_rules! topology {
    ($root:ident $(, $name:ident: $parent:ident)* $(,)?) => {
        // Only to number the nodes: each variant's discriminant is its index.
        #[allow(dead_code, clippy::upper_case_acronyms)]
        enum Index {
            $root,
            $($name,)*
        }
        const $root: usize = Index::$root as usize;
        $(const $name: usize = Index::$name as usize;)*
        const NAMES: &[&str] = &[stringify!($root), $(stringify!($name),)*];
        const PARENT: &[Option<usize>] = &[None, $(Some($parent),)*];
    };
}
#[allow(unused_imports)] // likewise
pub(crate) use topology;

/// An origin in memory, like a disk with a volatile cache: writes land in
/// `written` and become `durable` only at the next `sync` (fdatasync), so a
/// test can tell what the root has from what would survive its crash.
/// Clones share the same disk.
#[derive(Clone)]
pub struct Mem {
    chunk: usize,
    written: Arc<Mutex<Vec<u8>>>,
    durable: Arc<Mutex<Vec<u8>>>,
    syncs: Arc<Mutex<usize>>,
    /// A failing disk: every write errors while set.
    fail_writes: Arc<Mutex<bool>>,
}

impl Mem {
    /// `chunks` chunks of `chunk` bytes, all zero.
    pub fn new(chunk: usize, chunks: usize) -> Mem {
        Mem::with_contents(chunk, vec![0; chunk * chunks])
    }

    /// A disk holding `bytes` (written and durable), in chunks of `chunk`.
    pub fn with_contents(chunk: usize, bytes: Vec<u8>) -> Mem {
        assert_eq!(bytes.len() % chunk, 0, "whole chunks only");
        Mem {
            chunk,
            durable: Arc::new(Mutex::new(bytes.clone())),
            written: Arc::new(Mutex::new(bytes)),
            syncs: Arc::new(Mutex::new(0)),
            fail_writes: Arc::new(Mutex::new(false)),
        }
    }

    /// The chunk size, in bytes.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// The disk's size, in bytes.
    pub fn len(&self) -> usize {
        self.written.lock().unwrap().len()
    }

    /// `chunk` as written (what the root reads back), synced or not.
    pub fn written_chunk(&self, chunk: u64) -> Vec<u8> {
        self.written.lock().unwrap()[self.range(chunk)].to_vec()
    }

    /// `chunk` as of the last `sync`: what would survive a crash.
    pub fn durable_chunk(&self, chunk: u64) -> Vec<u8> {
        self.durable.lock().unwrap()[self.range(chunk)].to_vec()
    }

    /// Make every write fail (`true`) until called again with `false`.
    pub fn fail_writes(&self, fail: bool) {
        *self.fail_writes.lock().unwrap() = fail;
    }

    /// How many times the origin has been fdatasynced.
    pub fn syncs(&self) -> usize {
        *self.syncs.lock().unwrap()
    }

    fn range(&self, chunk: u64) -> std::ops::Range<usize> {
        let off = chunk as usize * self.chunk;
        off..off + self.chunk
    }
}

impl Backing for Mem {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(&self.written.lock().unwrap()[self.range(chunk)]);
        Ok(())
    }
    fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()> {
        if *self.fail_writes.lock().unwrap() {
            return Err(std::io::Error::other("injected write failure"));
        }
        let range = self.range(chunk);
        self.written.lock().unwrap()[range].copy_from_slice(data);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let w = self.written.lock().unwrap();
        self.durable.lock().unwrap().copy_from_slice(&w);
        *self.syncs.lock().unwrap() += 1;
        Ok(())
    }
    fn zero_chunk(&self, chunk: u64) -> std::io::Result<()> {
        self.write_chunk(chunk, &vec![0; self.chunk])
    }
}

/// A tree of nodes over one [`Mem`] origin, its messages delivered by hand.
///
/// Node `i` is called `names[i]` in the log and has `parent[i]` as its
/// parent; the one without a parent is the root. Each link is FIFO, and
/// nothing moves until a test delivers it, so a test fixes the exact
/// interleaving (and the time of each delivery).
pub struct Tree {
    pub nodes: Vec<Node>,
    names: &'static [&'static str],
    parent: &'static [Option<usize>],
    /// In flight: (from, to, message).
    pub wire: VecDeque<(usize, usize, Message)>,
    /// Every message delivered, as "FROM->TO <message>" (heartbeats left
    /// out after [`Tree::hide_heartbeats`]).
    pub log: Vec<String>,
    /// Local requests completed: (node, id, result), oldest first.
    pub done: Vec<(usize, LocalId, Result<LocalReply, Status>)>,
    pub origin: Mem,
    /// The latest time given to the tree, for the origin reads `drain`
    /// serves (they come with no time of their own).
    pub clock: u64,
    /// (sender, xid) of heartbeats seen, when they are kept out of the log;
    /// `None` logs them like any other message.
    heartbeats: Option<Vec<(usize, u32)>>,
}

impl Tree {
    /// The nodes of the topology `names`/`parent`, the root over `origin`
    /// (its chunk size and length are the volume's); `config(i, role)` gives
    /// node `i`'s configuration. No link is up yet.
    pub fn new(
        names: &'static [&'static str],
        parent: &'static [Option<usize>],
        origin: Mem,
        mut config: impl FnMut(usize, Role) -> NodeConfig,
    ) -> Tree {
        assert_eq!(names.len(), parent.len());
        let nodes = (0..names.len())
            .map(|i| match parent[i] {
                None => Node::new_root(
                    config(i, Role::Root),
                    Some(Box::new(origin.clone())),
                    origin.chunk_size() as u32,
                    origin.len() as u64,
                ),
                Some(_) => Node::new_child(config(i, Role::Child)),
            })
            .collect();
        Tree {
            nodes,
            names,
            parent,
            wire: VecDeque::new(),
            log: Vec::new(),
            done: Vec::new(),
            origin,
            clock: 0,
            heartbeats: None,
        }
    }

    /// Keep heartbeats, and the replies to them, out of the log: for
    /// sequences written without them (their timing is not the point).
    pub fn hide_heartbeats(mut self) -> Tree {
        self.heartbeats = Some(Vec::new());
        self
    }

    /// Take `i`'s pending actions: messages go on the wire, completions to
    /// `done`.
    pub fn drain(&mut self, i: usize) {
        while let Some(a) = self.nodes[i].poll_action() {
            match a {
                Action::ToParent(m) => self.wire.push_back((i, self.parent[i].unwrap(), m)),
                Action::ToChild(c, m) => self.wire.push_back((i, c as usize, m)),
                Action::LocalDone(id, r) => self.done.push((i, id, r)),
                // The root's origin reads are served at once, on this
                // thread, so message order is as with a synchronous origin.
                // (Tests of their asynchrony drive a lone root instead.)
                Action::OriginRead { chunk } => self.nodes[i].serve_origin_read(chunk, self.clock),
                Action::OriginSync => self.nodes[i].serve_origin_sync(self.clock),
                Action::OriginWrite { chunk, data } => {
                    self.nodes[i].serve_origin_write(chunk, &data, self.clock)
                }
                // The connection closes: what is in flight on it is lost,
                // and the child sees its transport fail.
                Action::CloseChild(c) => {
                    let c = c as usize;
                    self.wire
                        .retain(|(f, t, _)| !((*f == i && *t == c) || (*f == c && *t == i)));
                    self.nodes[c].parent_down(self.clock);
                    self.drain(c);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Deliver the oldest message in flight, at time `now`.
    pub fn deliver_one(&mut self, now: u64) {
        let (from, to, _) = *self.wire.front().expect("a message in flight");
        self.deliver(from, to, now);
    }

    /// Deliver the oldest message on the link `from` → `to` at time `now`,
    /// overtaking what is in flight on other links.
    pub fn deliver(&mut self, from: usize, to: usize, now: u64) {
        self.clock = now;
        let pos = self
            .wire
            .iter()
            .position(|(f, t, _)| *f == from && *t == to)
            .unwrap_or_else(|| {
                panic!(
                    "nothing in flight {} -> {}",
                    self.names[from], self.names[to]
                )
            });
        let (from, to, m) = self.wire.remove(pos).unwrap();
        self.record(from, to, &m);
        if self.parent[from] == Some(to) {
            self.nodes[to].handle_child(from as u64, m, now);
        } else {
            self.nodes[to].handle_parent(m, now);
        }
        self.drain(to);
    }

    fn record(&mut self, from: usize, to: usize, m: &Message) {
        if let Some(heartbeats) = &mut self.heartbeats {
            if m.header.opcode == Opcode::Heartbeat {
                heartbeats.push((from, m.header.xid));
                return;
            }
            if heartbeats.contains(&(to, m.header.xid)) {
                return;
            }
        }
        let line = format!("{}->{} {m}", self.names[from], self.names[to]);
        self.log.push(line);
    }

    /// Deliver everything in flight, and what it causes, at time `now`.
    pub fn deliver_all(&mut self, now: u64) {
        self.clock = now;
        for _ in 0..1000 {
            if self.wire.is_empty() {
                return;
            }
            self.deliver_one(now);
        }
        panic!("messages never stopped");
    }

    /// `i`'s link to its parent comes up at `now` (nothing delivered yet).
    pub fn link_up(&mut self, i: usize, now: u64) {
        self.clock = now;
        self.nodes[i].parent_up(now);
        self.drain(i);
    }

    /// Start local request `id` at `i` (nothing delivered yet).
    pub fn local(&mut self, i: usize, id: u64, op: LocalOp, now: u64) {
        self.clock = now;
        self.nodes[i].local(LocalId(id), op, now);
        self.drain(i);
    }

    /// The result of `i`'s local request `id`, which must have completed.
    pub fn result(&mut self, i: usize, id: u64) -> Result<LocalReply, Status> {
        let pos = self
            .done
            .iter()
            .position(|(n, l, _)| *n == i && *l == LocalId(id))
            .expect("the request completed");
        self.done.remove(pos).2
    }

    /// Run a local request to completion, all at `now`, and return its
    /// result.
    pub fn run(&mut self, i: usize, id: u64, op: LocalOp, now: u64) -> Result<LocalReply, Status> {
        self.local(i, id, op, now);
        self.deliver_all(now);
        self.result(i, id)
    }

    /// [`Tree::run`] a request that must succeed with no data (a write, a
    /// sync); returns where the log stood before it, to check the messages
    /// it caused.
    pub fn run_ok(&mut self, i: usize, id: u64, op: LocalOp, now: u64) -> usize {
        let mark = self.log.len();
        assert_eq!(self.run(i, id, op, now), Ok(LocalReply::Done));
        mark
    }

    /// Write `data` at `offset` in `chunk` from `i` (no FORCE_SYNC), run to
    /// completion, and check it succeeded.
    pub fn write(&mut self, i: usize, id: u64, chunk: u64, offset: u32, data: &[u8], now: u64) {
        let op = LocalOp::Write {
            chunk,
            offset,
            data: Bytes::copy_from_slice(data),
            force_sync: false,
        };
        self.run_ok(i, id, op, now);
    }

    /// Run `i`'s timers at each time, delivering everything in between.
    pub fn tick(&mut self, i: usize, times: &[u64]) {
        for &now in times {
            self.clock = now;
            self.nodes[i].handle_timeout(now);
            self.drain(i);
            self.deliver_all(now);
        }
    }

    /// The log since `from`, checked against `expected` (each line: the
    /// hop, then substrings the message must contain).
    pub fn expect(&self, from: usize, expected: &[(&str, &[&str])]) {
        let expected: Vec<(&str, &[&str], &[&str])> = expected
            .iter()
            .map(|&(hop, has)| (hop, has, &[][..]))
            .collect();
        self.expect_lacking(from, &expected);
    }

    /// [`Tree::expect`], each line also with substrings the message must
    /// not contain.
    pub fn expect_lacking(&self, from: usize, expected: &[(&str, &[&str], &[&str])]) {
        let got = &self.log[from..];
        let show = got.join("\n");
        assert_eq!(got.len(), expected.len(), "message count differs:\n{show}");
        for (line, (hop, has, lacks)) in got.iter().zip(expected) {
            assert!(
                line.starts_with(&format!("{hop} ")),
                "expected {hop}, got {line}\nall:\n{show}"
            );
            for p in *has {
                assert!(line.contains(p), "{line} lacks {p}\nall:\n{show}");
            }
            for p in *lacks {
                assert!(!line.contains(p), "{line} has {p}\nall:\n{show}");
            }
        }
    }
}

/// Every action `n` has queued, in order.
pub fn drain_actions(n: &mut Node) -> Vec<Action> {
    std::iter::from_fn(|| n.poll_action()).collect()
}

/// A child made with `cfg`, connected: it sent CONNECT and its parent
/// answered with VOLUME_ID 5, `hb_ttl_ms`, `chunk_size` and `volume_size`.
/// Its actions so far are drained.
pub fn connected_child(cfg: NodeConfig, hb_ttl_ms: u32, chunk_size: u32, volume_size: u64) -> Node {
    let mut n = Node::new_child(cfg);
    n.parent_up(0);
    let connect = drain_actions(&mut n)
        .into_iter()
        .find_map(|a| match a {
            Action::ToParent(m) if m.header.opcode == Opcode::Connect => Some(m),
            _ => None,
        })
        .expect("CONNECT");
    let mut ok = Message::new(Opcode::OkReply, connect.header.xid);
    ok.params.volume_id = Some(5);
    ok.params.hb_ttl_ms = Some(hb_ttl_ms);
    ok.params.chunk_size = Some(chunk_size);
    ok.params.volume_size = Some(volume_size);
    n.handle_parent(ok, 0);
    assert!(n.is_ready());
    drain_actions(&mut n);
    n
}
