//! `LocalOp::Sync` and `Node::unsynced_chunks`: what a block device's FLUSH
//! needs from a leaf whose writes are acknowledged before the root has them
//! durably (async and semi-sync modes).
//!
//! The tree is A (root) ← B (a lazy proxy, itself async, so what it passes
//! on is not made durable for it) ← D (async leaf) and S (semi-sync leaf). Messages are delivered by hand in FIFO order, as in
//! `examples.rs`. The root's origin keeps what was written apart from what
//! was fdatasynced, so "durable at the root" is checked, not assumed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role, WriteMode};
use canopy_proto::{Message, Perm, Status};

const CHUNK: usize = 64;
const CHUNKS: usize = 16;
const A: usize = 0;
const B: usize = 1;
const D: usize = 2;
const S: usize = 3;
const NAMES: [&str; 4] = ["A", "B", "D", "S"];
const PARENT: [Option<usize>; 4] = [None, Some(A), Some(B), Some(B)];

/// A disk with a volatile cache: `sync` makes `written` durable.
#[derive(Clone, Default)]
struct Mem {
    written: Arc<Mutex<Vec<u8>>>,
    durable: Arc<Mutex<Vec<u8>>>,
    syncs: Arc<Mutex<usize>>,
    /// A failing disk: every write errors while set.
    fail_writes: Arc<Mutex<bool>>,
}
impl Mem {
    fn new() -> Mem {
        Mem {
            written: Arc::new(Mutex::new(vec![0; CHUNK * CHUNKS])),
            durable: Arc::new(Mutex::new(vec![0; CHUNK * CHUNKS])),
            syncs: Arc::new(Mutex::new(0)),
            fail_writes: Arc::new(Mutex::new(false)),
        }
    }
    fn written_chunk(&self, chunk: u64) -> Vec<u8> {
        let off = chunk as usize * CHUNK;
        self.written.lock().unwrap()[off..off + CHUNK].to_vec()
    }
    fn durable_chunk(&self, chunk: u64) -> Vec<u8> {
        let off = chunk as usize * CHUNK;
        self.durable.lock().unwrap()[off..off + CHUNK].to_vec()
    }
    fn syncs(&self) -> usize {
        *self.syncs.lock().unwrap()
    }
}
impl Backing for Mem {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = chunk as usize * CHUNK;
        buf.copy_from_slice(&self.written.lock().unwrap()[off..off + CHUNK]);
        Ok(())
    }
    fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()> {
        if *self.fail_writes.lock().unwrap() {
            return Err(std::io::Error::other("injected write failure"));
        }
        let off = chunk as usize * CHUNK;
        self.written.lock().unwrap()[off..off + CHUNK].copy_from_slice(data);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let w = self.written.lock().unwrap();
        self.durable.lock().unwrap().copy_from_slice(&w);
        *self.syncs.lock().unwrap() += 1;
        Ok(())
    }
    fn zero_chunk(&self, chunk: u64) -> std::io::Result<()> {
        self.write_chunk(chunk, &[0; CHUNK])
    }
}

struct Tree {
    nodes: Vec<Node>,
    /// In flight: (from, to, message).
    wire: VecDeque<(usize, usize, Message)>,
    /// Every message delivered, as "FROM->TO <message>".
    log: Vec<String>,
    done: Vec<(usize, LocalId, Result<LocalReply, Status>)>,
    origin: Mem,
    /// The latest time given to the tree, for the origin reads `drain` serves.
    clock: u64,
}

impl Tree {
    /// The tree with the root writing in `root_mode`.
    fn new(root_mode: WriteMode) -> Tree {
        let origin = Mem::new();
        let mut nodes = Vec::new();
        for i in 0..NAMES.len() {
            let role = if i == A { Role::Root } else { Role::Child };
            let mut cfg = NodeConfig::new(role, "vol", 500);
            cfg.connect_lazily = i == B;
            cfg.write_mode = match i {
                A => root_mode,
                D => WriteMode::Async,
                S => WriteMode::SemiSync,
                _ => WriteMode::Async,
            };
            nodes.push(if i == A {
                Node::new_root(
                    cfg,
                    Some(Box::new(origin.clone())),
                    CHUNK as u32,
                    (CHUNK * CHUNKS) as u64,
                )
            } else {
                Node::new_child(cfg)
            });
        }
        let mut t = Tree {
            nodes,
            wire: VecDeque::new(),
            log: Vec::new(),
            done: Vec::new(),
            origin,
            clock: 0,
        };
        for i in [B, D, S] {
            t.nodes[i].parent_up(0);
            t.drain(i);
        }
        t.deliver_all(0);
        t
    }

    fn drain(&mut self, i: usize) {
        while let Some(a) = self.nodes[i].poll_action() {
            match a {
                Action::ToParent(m) => self.wire.push_back((i, PARENT[i].unwrap(), m)),
                Action::ToChild(c, m) => self.wire.push_back((i, c as usize, m)),
                Action::LocalDone(id, r) => self.done.push((i, id, r)),
                // The root's origin reads are served at once, on this
                // thread, so message order is as with a synchronous origin.
                Action::OriginRead { chunk } => self.nodes[i].serve_origin_read(chunk, self.clock),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn deliver_all(&mut self, now: u64) {
        self.clock = now;
        for _ in 0..1000 {
            let Some((from, to, m)) = self.wire.pop_front() else {
                return;
            };
            self.log.push(format!("{}->{} {m}", NAMES[from], NAMES[to]));
            if PARENT[from] == Some(to) {
                self.nodes[to].handle_child(from as u64, m, now);
            } else {
                self.nodes[to].handle_parent(m, now);
            }
            self.drain(to);
        }
        panic!("messages never stopped");
    }

    /// Run a local request to completion and return its result.
    fn run(&mut self, i: usize, id: u64, op: LocalOp, now: u64) -> Result<LocalReply, Status> {
        self.clock = now;
        self.nodes[i].local(LocalId(id), op, now);
        self.drain(i);
        self.deliver_all(now);
        let pos = self
            .done
            .iter()
            .position(|(n, l, _)| *n == i && *l == LocalId(id))
            .expect("the request completed");
        self.done.remove(pos).2
    }

    fn write(&mut self, i: usize, id: u64, chunk: u64, offset: u32, data: &[u8], now: u64) {
        let op = LocalOp::Write {
            chunk,
            offset,
            data: Bytes::copy_from_slice(data),
            force_sync: false,
        };
        assert_eq!(self.run(i, id, op, now), Ok(LocalReply::Done));
    }

    /// The log since `from`, checked against `expected` (each line: the
    /// hop, substrings it must contain, substrings it must not).
    fn expect(&self, from: usize, expected: &[(&str, &[&str], &[&str])]) {
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

#[test]
fn async_leaf_sync_pushes_its_dirty_chunk_to_the_root_and_keeps_write() {
    let mut t = Tree::new(WriteMode::Sync);
    let data = [0xD1; CHUNK];
    t.write(D, 1, 3, 0, &data, 10);
    let v = t.nodes[D].inspect(3, 10);
    assert!(
        v.dirty && v.held == Perm::Write,
        "acknowledged locally: {v:?}"
    );
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![3]);
    assert_eq!(t.origin.durable_chunk(3), vec![0; CHUNK]);

    let mark = t.log.len();
    let syncs = t.origin.syncs();
    assert_eq!(
        t.run(D, 2, LocalOp::Sync { chunk: 3 }, 20),
        Ok(LocalReply::Done)
    );
    // Our copy goes up with FORCE_SYNC, keeping WRITE; the proxy passes it on
    // the same way and answers only once the root has fdatasynced.
    t.expect(
        mark,
        &[
            (
                "D->B",
                &[
                    "IO_REQUEST/FLUSH",
                    "FORCE_SYNC",
                    "BLOCK_NUM=3",
                    "PERMISSIONS=WRITE_PERMS",
                    "DATA=<64 bytes>",
                ],
                &[],
            ),
            (
                "B->A",
                &[
                    "IO_REQUEST/FLUSH",
                    "FORCE_SYNC",
                    "BLOCK_NUM=3",
                    "PERMISSIONS=WRITE_PERMS",
                    "DATA=<64 bytes>",
                ],
                &[],
            ),
            ("A->B", &["OK_REPLY"], &[]),
            ("B->D", &["OK_REPLY"], &[]),
        ],
    );
    assert_eq!(t.origin.syncs(), syncs + 1, "the root fdatasynced once");
    assert_eq!(t.origin.durable_chunk(3), data.to_vec());
    let v = t.nodes[D].inspect(3, 20);
    assert_eq!(v.held, Perm::Write, "Sync gives nothing up");
    assert!(v.usable && !v.dirty, "{v:?}");
    assert_eq!(t.nodes[D].dirty_chunks(), 0);
    assert!(t.nodes[D].unsynced_chunks().is_empty());
    assert_eq!(
        t.nodes[B].inspect(3, 20).children,
        vec![(D as u64, Perm::Write)]
    );

    // A clean chunk still sends a FORCE_SYNC barrier (no data) all the way
    // up: data sent earlier without FORCE_SYNC may sit at a proxy.
    let mark = t.log.len();
    assert_eq!(
        t.run(D, 3, LocalOp::Sync { chunk: 3 }, 30),
        Ok(LocalReply::Done)
    );
    t.expect(
        mark,
        &[
            ("D->B", &["IO_REQUEST/FLUSH", "FORCE_SYNC"], &["DATA="]),
            ("B->A", &["IO_REQUEST/FLUSH", "FORCE_SYNC"], &["DATA="]),
            ("A->B", &["OK_REPLY"], &[]),
            ("B->D", &["OK_REPLY"], &[]),
        ],
    );
    assert_eq!(t.origin.syncs(), syncs + 2);
    assert_eq!(t.nodes[D].inspect(3, 30).held, Perm::Write);
}

#[test]
fn async_write_sent_up_by_the_sync_daemon_stays_unsynced_until_a_sync() {
    let mut t = Tree::new(WriteMode::Sync);
    let data = [0xD2; CHUNK];
    t.write(D, 1, 4, 0, &data, 10);
    // The sync daemon sends the chunk up without FORCE_SYNC and gives WRITE
    // up (D has not used it since); B passes it on to the root, which writes
    // its origin without fdatasync. Nothing is dirty at D any more.
    for now in [10, 6_000, 12_000] {
        t.nodes[D].handle_timeout(now);
        t.drain(D);
        t.deliver_all(now);
    }
    assert_eq!(t.nodes[D].dirty_chunks(), 0);
    assert_eq!(t.nodes[D].inspect(4, 12_000).held, Perm::No);
    assert_eq!(t.origin.written_chunk(4), data.to_vec());
    assert_ne!(t.origin.durable_chunk(4), data.to_vec());
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![4]);
    let syncs = t.origin.syncs();

    let mark = t.log.len();
    assert_eq!(
        t.run(D, 2, LocalOp::Sync { chunk: 4 }, 13_000),
        Ok(LocalReply::Done)
    );
    // A barrier from D (holding nothing), passed on by B (clean), makes the
    // root fdatasync.
    t.expect(
        mark,
        &[
            (
                "D->B",
                &["IO_REQUEST/FLUSH", "FORCE_SYNC", "PERMISSIONS=NO_PERMS"],
                &["DATA="],
            ),
            ("B->A", &["IO_REQUEST/FLUSH", "FORCE_SYNC"], &["DATA="]),
            ("A->B", &["OK_REPLY"], &[]),
            ("B->D", &["OK_REPLY"], &[]),
        ],
    );
    assert_eq!(t.origin.syncs(), syncs + 1);
    assert_eq!(t.origin.durable_chunk(4), data.to_vec());
    assert!(t.nodes[D].unsynced_chunks().is_empty());
}

#[test]
fn semi_sync_leaf_sync_clears_its_forward_duty() {
    let mut t = Tree::new(WriteMode::Sync);
    // Partial writes, so they go up as FLUSHes to B only (semi-sync).
    t.write(S, 1, 5, 0, &[0x55; 8], 10);
    t.write(S, 2, 6, 0, &[0x66; 8], 10);
    for chunk in [5, 6] {
        let v = t.nodes[S].inspect(chunk, 10);
        assert!(!v.dirty && v.held == Perm::Write, "{v:?}");
        assert!(t.nodes[B].inspect(chunk, 10).dirty, "B has it");
        assert_eq!(t.origin.durable_chunk(chunk)[0], 0, "the root has not");
    }
    assert_eq!(t.nodes[S].unsynced_chunks(), vec![5, 6]);

    let mark = t.log.len();
    assert_eq!(
        t.run(S, 3, LocalOp::Sync { chunk: 5 }, 20),
        Ok(LocalReply::Done)
    );
    t.expect(
        mark,
        &[
            (
                "S->B",
                &[
                    "IO_REQUEST/FLUSH",
                    "FORCE_SYNC",
                    "BLOCK_NUM=5",
                    "PERMISSIONS=WRITE_PERMS",
                ],
                &["DATA="],
            ),
            (
                "B->A",
                &["IO_REQUEST/FLUSH", "FORCE_SYNC", "DATA=<64 bytes>"],
                &[],
            ),
            ("A->B", &["OK_REPLY"], &[]),
            ("B->S", &["OK_REPLY"], &[]),
        ],
    );
    assert_eq!(t.origin.durable_chunk(5)[..8], [0x55; 8]);
    assert_eq!(t.nodes[S].inspect(5, 20).held, Perm::Write);
    assert_eq!(t.nodes[S].unsynced_chunks(), vec![6]);

    // Giving both chunks up: chunk 6 still owes a FORWARD (its data is only
    // at B), chunk 5 no longer does (it is durable at the root).
    let mark = t.log.len();
    assert_eq!(t.nodes[S].release_all(30), 2);
    t.drain(S);
    t.deliver_all(30);
    let sent: Vec<&String> = t.log[mark..]
        .iter()
        .filter(|l| l.starts_with("S->B"))
        .collect();
    let forwards: Vec<&&String> = sent.iter().filter(|l| l.contains("FORWARD")).collect();
    assert_eq!(forwards.len(), 1, "{sent:#?}");
    assert!(forwards[0].contains("BLOCK_NUM=6"), "{sent:#?}");
}

#[test]
fn sync_without_a_parent_fails_and_a_lost_parent_is_reported_once() {
    let mut t = Tree::new(WriteMode::Sync);
    t.write(D, 1, 2, 0, &[0x22; CHUNK], 10);
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![2]);

    // The link to B breaks: D's dirty copy dies with it.
    t.nodes[D].parent_down(20);
    t.drain(D);
    t.nodes[B].child_gone(D as u64, 20);
    t.drain(B);
    t.deliver_all(20);
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![2]);
    assert_eq!(
        t.run(D, 2, LocalOp::Sync { chunk: 2 }, 30),
        Err(Status::ParentUnavailable)
    );

    // Reconnected, the first Sync says the write may be lost; the chunk
    // stays listed and the next Sync goes through.
    t.nodes[D].parent_up(40);
    t.drain(D);
    t.deliver_all(40);
    assert_eq!(
        t.run(D, 3, LocalOp::Sync { chunk: 2 }, 50),
        Err(Status::IoError)
    );
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![2]);
    assert_eq!(
        t.run(D, 4, LocalOp::Sync { chunk: 2 }, 60),
        Ok(LocalReply::Done)
    );
    assert!(t.nodes[D].unsynced_chunks().is_empty());
}

#[test]
fn root_lists_its_own_writes_until_the_origin_is_fdatasynced() {
    // A root writing in sync mode fdatasyncs every write: nothing to list.
    let mut t = Tree::new(WriteMode::Sync);
    t.write(A, 1, 1, 0, &[0x11; CHUNK], 10);
    assert!(t.nodes[A].unsynced_chunks().is_empty());
    assert_eq!(t.origin.durable_chunk(1), vec![0x11; CHUNK]);

    // In async mode its writes reach the origin unsynced until a Sync.
    let mut t = Tree::new(WriteMode::Async);
    t.write(A, 1, 1, 0, &[0x12; CHUNK], 10);
    t.write(A, 2, 7, 0, &[0x17; CHUNK], 10);
    assert_eq!(t.nodes[A].unsynced_chunks(), vec![1, 7]);
    assert_eq!(t.origin.durable_chunk(1), vec![0; CHUNK]);
    let syncs = t.origin.syncs();
    assert_eq!(
        t.run(A, 3, LocalOp::Sync { chunk: 1 }, 20),
        Ok(LocalReply::Done)
    );
    assert_eq!(t.origin.syncs(), syncs + 1);
    assert_eq!(t.origin.durable_chunk(7), vec![0x17; CHUNK]);
    // One fdatasync covers every chunk.
    assert!(t.nodes[A].unsynced_chunks().is_empty());
}

/// The messages since `mark`, heartbeats and their replies left out.
fn since(t: &Tree, mark: usize) -> Vec<&str> {
    t.log[mark..]
        .iter()
        .map(String::as_str)
        .filter(|l| !l.contains("HEARTBEAT") && !l.contains("HB_TTL"))
        .collect()
}

/// Run `i`'s timers at each time, delivering everything in between.
fn tick(t: &mut Tree, i: usize, times: &[u64]) {
    for &now in times {
        t.nodes[i].handle_timeout(now);
        t.drain(i);
        t.deliver_all(now);
    }
}

#[test]
fn a_refused_sync_daemon_flush_keeping_write_leaves_the_chunk_dirty() {
    let mut t = Tree::new(WriteMode::Sync);
    // B writes for itself (async): it holds WRITE on chunk 5, dirty.
    t.write(B, 1, 5, 0, &[0xB1; CHUNK], 10);
    *t.origin.fail_writes.lock().unwrap() = true;
    // First pass ages the chunk; a write before the second keeps it in use,
    // so the second pass FLUSHes it keeping WRITE, and the root refuses.
    tick(&mut t, B, &[10, 6_000]);
    t.write(B, 2, 5, 0, &[0xB2; CHUNK], 7_000);
    let mark = t.log.len();
    tick(&mut t, B, &[12_000]);
    let got = since(&t, mark);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got[0].starts_with("B->A IO_REQUEST/FLUSH")
            && got[0].contains("PERMISSIONS=WRITE_PERMS")
            && got[0].contains("DATA="),
        "{got:#?}"
    );
    assert!(
        got[1].starts_with("A->B ERR_REPLY") && got[1].contains("IO_ERROR"),
        "{got:#?}"
    );
    assert_eq!(t.nodes[B].dirty_chunks(), 1, "refused data is dirty again");
    assert_eq!(t.nodes[B].stats().lost_dirty, 0);
    // The disk recovers: a later pass sends it up again and it lands.
    *t.origin.fail_writes.lock().unwrap() = false;
    tick(&mut t, B, &[18_000, 24_000, 30_000]);
    assert_eq!(t.nodes[B].dirty_chunks(), 0);
    assert_eq!(t.origin.written_chunk(5), vec![0xB2; CHUNK]);
}

#[test]
fn a_refused_release_of_the_only_copy_is_counted_and_fails_the_next_sync() {
    let mut t = Tree::new(WriteMode::Sync);
    t.write(B, 1, 6, 0, &[0xB3; CHUNK], 10);
    *t.origin.fail_writes.lock().unwrap() = true;
    // Unused since the first pass: the second gives WRITE up with the data,
    // dropping B's copy, and the root refuses it.
    let mark = t.log.len();
    tick(&mut t, B, &[10, 6_000, 12_000]);
    let got = since(&t, mark);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got[0].starts_with("B->A IO_REQUEST/FLUSH")
            && got[0].contains("PERMISSIONS=NO_PERMS")
            && got[0].contains("DATA="),
        "{got:#?}"
    );
    assert!(
        got[1].starts_with("A->B ERR_REPLY") && got[1].contains("IO_ERROR"),
        "{got:#?}"
    );
    assert_eq!(t.nodes[B].stats().lost_dirty, 1);
    *t.origin.fail_writes.lock().unwrap() = false;
    // The device FLUSH that covers the write says it was not kept, once.
    assert_eq!(
        t.run(B, 2, LocalOp::Sync { chunk: 6 }, 13_000),
        Err(Status::IoError)
    );
    assert_eq!(
        t.run(B, 3, LocalOp::Sync { chunk: 6 }, 14_000),
        Ok(LocalReply::Done)
    );
}
