//! Seed 001's worked examples 1–4 on the Fig. 7 tree (A root; B, C under A;
//! D under B; E, F under C), checked message by message.
//!
//! Messages are delivered by hand in FIFO order with explicit times, so the
//! TTL arithmetic of the seed (1200 s reduced to 1198 s by a 2 s round trip,
//! to 1150 s 50 s later) is reproduced exactly.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role, WriteMode};
use canopy_proto::{Message, Perm};

const CHUNK: usize = 4096;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;
const F: usize = 5;
const NAMES: [&str; 6] = ["A", "B", "C", "D", "E", "F"];
const PARENT: [Option<usize>; 6] = [None, Some(A), Some(A), Some(B), Some(C), Some(C)];

#[derive(Clone)]
struct Mem(Arc<Mutex<Vec<u8>>>);
impl Backing for Mem {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = chunk as usize * CHUNK;
        buf.copy_from_slice(&self.0.lock().unwrap()[off..off + CHUNK]);
        Ok(())
    }
    fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()> {
        let off = chunk as usize * CHUNK;
        self.0.lock().unwrap()[off..off + CHUNK].copy_from_slice(data);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
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
    done: Vec<(usize, LocalId, Result<LocalReply, canopy_proto::Status>)>,
    origin: Mem,
    /// (sender, xid) of heartbeats, to leave them and their replies out of the log.
    heartbeats: Vec<(usize, u32)>,
    /// The latest time given to the tree, for the origin reads `drain` serves.
    clock: u64,
}

impl Tree {
    fn new() -> Tree {
        let origin = Mem(Arc::new(Mutex::new(vec![0; CHUNK * 64])));
        let mut nodes = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            // Example 1: A gives 32002, C remaps to 26924852; example 4: B
            // passes A's id on unchanged.
            let id = match i {
                A | B => 32002,
                C => 26924852,
                _ => 7000 + i as u32,
            };
            let role = if i == A { Role::Root } else { Role::Child };
            let mut cfg = NodeConfig::new(role, "volume_X", id);
            cfg.connect_lazily = matches!(i, B | C);
            cfg.write_mode = if i == D {
                WriteMode::Async
            } else {
                WriteMode::Sync
            };
            let _ = name;
            nodes.push(if i == A {
                Node::new_root(
                    cfg,
                    Some(Box::new(origin.clone())),
                    CHUNK as u32,
                    (CHUNK * 64) as u64,
                )
            } else {
                Node::new_child(cfg)
            });
        }
        Tree {
            nodes,
            wire: VecDeque::new(),
            log: Vec::new(),
            done: Vec::new(),
            origin,
            heartbeats: Vec::new(),
            clock: 0,
        }
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

    /// Deliver the oldest message in flight at time `now`.
    fn deliver_one(&mut self, now: u64) {
        self.clock = now;
        let (from, to, m) = self.wire.pop_front().expect("a message in flight");
        // Heartbeats are not part of the seed's sequences: keep them out of
        // the log, and their replies too.
        if m.header.opcode == canopy_proto::Opcode::Heartbeat {
            self.heartbeats.push((from, m.header.xid));
        } else if !self.heartbeats.contains(&(to, m.header.xid)) {
            self.log.push(format!("{}->{} {m}", NAMES[from], NAMES[to]));
        }
        if PARENT[from] == Some(to) {
            self.nodes[to].handle_child(from as u64, m, now);
        } else {
            self.nodes[to].handle_parent(m, now);
        }
        self.drain(to);
    }

    fn deliver_all(&mut self, now: u64) {
        for _ in 0..1000 {
            if self.wire.is_empty() {
                return;
            }
            self.deliver_one(now);
        }
        panic!("messages never stopped");
    }

    fn local(&mut self, i: usize, id: u64, op: LocalOp, now: u64) {
        self.clock = now;
        self.nodes[i].local(LocalId(id), op, now);
        self.drain(i);
    }

    fn link_up(&mut self, i: usize, now: u64) {
        self.clock = now;
        self.nodes[i].parent_up(now);
        self.drain(i);
    }

    /// The log since `from`, checked against `expected` (each line: the
    /// hop, then substrings the message must contain).
    fn expect(&self, from: usize, expected: &[(&str, &[&str])]) {
        let got = &self.log[from..];
        let show = got.join("\n");
        assert_eq!(got.len(), expected.len(), "message count differs:\n{show}");
        for (line, (hop, parts)) in got.iter().zip(expected) {
            assert!(
                line.starts_with(&format!("{hop} ")),
                "expected {hop}, got {line}\nall:\n{show}"
            );
            for p in *parts {
                assert!(line.contains(p), "{line} lacks {p}\nall:\n{show}");
            }
        }
    }
}

fn chunk_of(byte: u8) -> Bytes {
    Bytes::from(vec![byte; CHUNK])
}

#[test]
fn seed_examples_one_to_four() {
    let mut t = Tree::new();
    // Proxies' links are up from the start (they connect upward only when a
    // child needs it); each leaf's link comes up when its example starts.
    for i in [B, C, E] {
        t.link_up(i, 0);
    }
    t.origin.write_chunk(7, &[7; CHUNK]).unwrap();

    // Example 1: E reads block 7 through C, which connects to A on demand.
    let mark = t.log.len();
    t.deliver_all(0);
    t.local(E, 1, LocalOp::Read { chunk: 7 }, 1000);
    t.deliver_one(1000); // E->C GET
    t.deliver_one(1000); // C->A GET
    t.deliver_one(3000); // A->C OK, 2 s after C asked
    t.deliver_one(3000); // C->E OK
    t.expect(
        mark,
        &[
            ("E->C", &["CONNECT", "VOLUME_NAME=\"volume_X\""]),
            ("C->A", &["CONNECT", "VOLUME_NAME=\"volume_X\""]),
            ("A->C", &["OK_REPLY", "VOLUME_ID=32002", "HB_TTL=30000ms"]),
            (
                "C->E",
                &["OK_REPLY", "VOLUME_ID=26924852", "HB_TTL=30000ms"],
            ),
            (
                "E->C",
                &[
                    "IO_REQUEST/GET",
                    "VOLUME_ID=26924852",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                ],
            ),
            (
                "C->A",
                &[
                    "IO_REQUEST/GET",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                ],
            ),
            (
                "A->C",
                &[
                    "OK_REPLY",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                    "TTL=1200000ms",
                    "HB_TTL=30000ms",
                ],
            ),
            (
                "C->E",
                &[
                    "OK_REPLY",
                    "VOLUME_ID=26924852",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                    "TTL=1198000ms",
                    "HB_TTL=30000ms",
                ],
            ),
        ],
    );
    assert_eq!(
        t.done.pop().map(|d| d.2),
        Some(Ok(LocalReply::Data(chunk_of(7))))
    );

    // Example 2: F connects (C answers at once) and reads block 7 from C's
    // copy 50 s after C asked for it: TTL 1150 s.
    let mark = t.log.len();
    t.link_up(F, 50_000);
    t.deliver_all(50_000);
    t.local(F, 2, LocalOp::Read { chunk: 7 }, 51_000);
    t.deliver_all(51_000);
    t.expect(
        mark,
        &[
            ("F->C", &["CONNECT", "VOLUME_NAME=\"volume_X\""]),
            (
                "C->F",
                &["OK_REPLY", "VOLUME_ID=26924852", "HB_TTL=30000ms"],
            ),
            (
                "F->C",
                &[
                    "IO_REQUEST/GET",
                    "VOLUME_ID=26924852",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                ],
            ),
            (
                "C->F",
                &["OK_REPLY", "PERMISSIONS=READ_PERMS", "TTL=1150000ms"],
            ),
        ],
    );
    assert_eq!(
        t.done.pop().map(|d| d.2),
        Some(Ok(LocalReply::Data(chunk_of(7))))
    );

    // Example 3: B overwrites block 7 with a synchronous PUT. A invalidates
    // C, which invalidates E and F and answers only after both did.
    let mark = t.log.len();
    t.local(
        B,
        3,
        LocalOp::Write {
            chunk: 7,
            offset: 0,
            data: chunk_of(0xB3),
            force_sync: true,
        },
        60_000,
    );
    t.deliver_all(60_000);
    let connect = &t.log[mark..mark + 2];
    assert!(
        connect[0].starts_with("B->A CONNECT") && connect[1].starts_with("A->B OK_REPLY"),
        "{connect:?}"
    );
    t.expect(
        mark + 2,
        &[
            (
                "B->A",
                &[
                    "IO_REQUEST/PUT",
                    "FORCE_SYNC",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=WRITE_PERMS",
                    "DATA=<4096 bytes>",
                ],
            ),
            (
                "A->C",
                &[
                    "INVALIDATE",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=NO_PERMS",
                ],
            ),
            (
                "C->E",
                &[
                    "INVALIDATE",
                    "VOLUME_ID=26924852",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=NO_PERMS",
                ],
            ),
            (
                "C->F",
                &[
                    "INVALIDATE",
                    "VOLUME_ID=26924852",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=NO_PERMS",
                ],
            ),
            ("E->C", &["OK_REPLY"]),
            ("F->C", &["OK_REPLY"]),
            ("C->A", &["OK_REPLY", "VOLUME_ID=32002", "BLOCK_NUM=7"]),
            ("A->B", &["OK_REPLY", "BLOCK_NUM=7", "TTL=1200000ms"]),
        ],
    );
    assert_eq!(t.done.pop().map(|d| d.2), Some(Ok(LocalReply::Done)));
    assert_eq!(
        t.origin.0.lock().unwrap()[7 * CHUNK],
        0xB3,
        "a sync write is at the root when acknowledged"
    );

    // Example 4: D writes asynchronously. B's own grant from example 3 has
    // run out by now (TTL 1200 s), so B forwards the request for WRITE.
    // Later D's sync daemon flushes and gives the chunk up in the same
    // FLUSH, and B passes it on keeping only READ.
    const T: u64 = 1_300_000;
    let mark = t.log.len();
    t.link_up(D, T);
    t.deliver_all(T);
    t.local(
        D,
        4,
        LocalOp::Write {
            chunk: 7,
            offset: 0,
            data: chunk_of(0xD4),
            force_sync: false,
        },
        T,
    );
    t.deliver_one(T); // D->B GET WRITE
    t.deliver_one(T); // B->A
    t.deliver_one(T + 2000); // A->B OK, 2 s later
    t.deliver_one(T + 2000); // B->D
    assert_eq!(
        t.done.pop().map(|d| d.2),
        Some(Ok(LocalReply::Done)),
        "async write acknowledged locally"
    );
    assert_eq!(
        t.origin.0.lock().unwrap()[7 * CHUNK],
        0xB3,
        "an async write stays at the writer"
    );
    // The sync daemon: armed at the first call, it sees the chunk dirty at
    // the next pass and sends it at the one after, giving it up since D has
    // not used it meanwhile.
    let before = t.log.len();
    for now in [T + 5000, T + 10_000, T + 20_000] {
        t.nodes[D].handle_timeout(now);
        t.drain(D);
        t.deliver_all(now);
    }
    let sync_msgs = t.log[before..].join("\n");
    t.expect(
        mark,
        &[
            ("D->B", &["CONNECT"]),
            ("B->D", &["OK_REPLY", "VOLUME_ID=32002"]),
            (
                "D->B",
                &[
                    "IO_REQUEST/GET",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=WRITE_PERMS",
                ],
            ),
            (
                "B->A",
                &[
                    "IO_REQUEST/GET",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=WRITE_PERMS",
                ],
            ),
            (
                "A->B",
                &["OK_REPLY", "PERMISSIONS=WRITE_PERMS", "TTL=1200000ms"],
            ),
            (
                "B->D",
                &[
                    "OK_REPLY",
                    "VOLUME_ID=32002",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=WRITE_PERMS",
                    "TTL=1198000ms",
                    "HB_TTL=30000ms",
                ],
            ),
            (
                "D->B",
                &[
                    "IO_REQUEST/FLUSH",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=NO_PERMS",
                    "DATA=<4096 bytes>",
                ],
            ),
            (
                "B->A",
                &[
                    "IO_REQUEST/FLUSH",
                    "BLOCK_NUM=7",
                    "PERMISSIONS=READ_PERMS",
                    "DATA=<4096 bytes>",
                ],
            ),
            ("A->B", &["OK_REPLY"]),
            ("B->D", &["OK_REPLY"]),
        ],
    );
    assert!(!sync_msgs.is_empty());
    assert_eq!(
        t.origin.0.lock().unwrap()[7 * CHUNK],
        0xD4,
        "the flushed write reached the root"
    );
    assert_eq!(
        t.nodes[B].inspect(7, T + 20_000).held,
        Perm::Read,
        "B keeps a copy for reading"
    );
    assert_eq!(
        t.nodes[D].inspect(7, T + 20_000).held,
        Perm::No,
        "D gave the chunk up"
    );
}
