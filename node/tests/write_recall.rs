//! A write that goes up as a PUT and comes back with less than WRITE must
//! still recall the writer's siblings that read the old contents (found by
//! the simulation, seed 29319 once flushes were added to its workload).
//!
//! The tree: A (root) ← B ← B2 ← {D, E}, and A ← C. B holds WRITE (its own
//! async write) and has given B2, and through it D, READ. E's full-chunk
//! sync write goes up as a PUT from B2 to B, which applies it and sends it
//! on to A in a FLUSH; meanwhile C's read makes A invalidate B down to READ,
//! so B answers B2's PUT with READ (TTL 0) rather than WRITE. B2 recalled
//! nobody before sending the PUT up, so it must recall D before it answers
//! E, or D keeps reading what E's completed write replaced.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role, WriteMode};
use canopy_proto::{Message, Perm, Status};

const CHUNK: usize = 32;
const CHUNKS: usize = 4;
const A: usize = 0;
const B: usize = 1;
const B2: usize = 2;
const D: usize = 3;
const E: usize = 4;
const C: usize = 5;
const NAMES: [&str; 6] = ["A", "B", "B2", "D", "E", "C"];
const PARENT: [Option<usize>; 6] = [None, Some(A), Some(B), Some(B2), Some(B2), Some(A)];

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
    /// In flight: (from, to, message); each link stays FIFO.
    wire: VecDeque<(usize, usize, Message)>,
    log: Vec<String>,
    done: Vec<(usize, LocalId, Result<LocalReply, Status>)>,
}

impl Tree {
    fn new() -> Tree {
        let origin = Mem(Arc::new(Mutex::new(vec![0; CHUNK * CHUNKS])));
        let mut nodes = Vec::new();
        for i in 0..NAMES.len() {
            let role = if i == A { Role::Root } else { Role::Child };
            let mut cfg = NodeConfig::new(role, "vol", 900);
            cfg.write_mode = if i == B {
                WriteMode::Async
            } else {
                WriteMode::Sync
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
        };
        // Parents first, so each CONNECT finds its parent connected.
        for i in [B, C, B2, D, E] {
            t.nodes[i].parent_up(0);
            t.drain(i);
            t.deliver_all();
        }
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
                Action::OriginRead { chunk } => self.nodes[i].serve_origin_read(chunk, 10),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Deliver the oldest message on the link `from` → `to`.
    fn deliver(&mut self, from: usize, to: usize) {
        let pos = self
            .wire
            .iter()
            .position(|(f, t, _)| *f == from && *t == to)
            .unwrap_or_else(|| panic!("nothing in flight {} -> {}", NAMES[from], NAMES[to]));
        let (from, to, m) = self.wire.remove(pos).unwrap();
        self.log.push(format!("{}->{} {m}", NAMES[from], NAMES[to]));
        if PARENT[from] == Some(to) {
            self.nodes[to].handle_child(from as u64, m, 10);
        } else {
            self.nodes[to].handle_parent(m, 10);
        }
        self.drain(to);
    }

    fn deliver_all(&mut self) {
        for _ in 0..1000 {
            let Some(&(from, to, _)) = self.wire.front() else {
                return;
            };
            self.deliver(from, to);
        }
        panic!("messages never stopped");
    }

    fn start(&mut self, i: usize, id: u64, op: LocalOp) {
        self.nodes[i].local(LocalId(id), op, 10);
        self.drain(i);
    }

    fn result(&mut self, i: usize, id: u64) -> Result<LocalReply, Status> {
        let pos = self
            .done
            .iter()
            .position(|(n, l, _)| *n == i && *l == LocalId(id))
            .expect("the request completed");
        self.done.remove(pos).2
    }
}

#[test]
fn put_answered_with_read_still_recalls_the_writers_siblings() {
    let mut t = Tree::new();
    let old = Bytes::from(vec![0xB0; CHUNK]);
    let new = Bytes::from(vec![0xE1; CHUNK]);

    // B writes (async: it holds WRITE, dirty); D reads B's data through B2.
    t.start(
        B,
        1,
        LocalOp::Write {
            chunk: 1,
            offset: 0,
            data: old.clone(),
            force_sync: false,
        },
    );
    t.deliver_all();
    assert_eq!(t.result(B, 1), Ok(LocalReply::Done));
    t.start(D, 2, LocalOp::Read { chunk: 1 });
    t.deliver_all();
    assert_eq!(t.result(D, 2), Ok(LocalReply::Data(old.clone())));
    assert_eq!(t.nodes[B2].inspect(1, 10).held, Perm::Read);

    // E's full-chunk sync write: PUT to B2, PUT to B, which applies it and
    // sends it to A in a FLUSH.
    t.start(
        E,
        3,
        LocalOp::Write {
            chunk: 1,
            offset: 0,
            data: new.clone(),
            force_sync: false,
        },
    );
    t.deliver(E, B2);
    t.deliver(B2, B);
    // Before A sees that FLUSH, C's read makes A invalidate B to READ.
    t.start(C, 4, LocalOp::Read { chunk: 1 });
    t.deliver(C, A);
    t.deliver(A, B);
    let mark = t.log.len();
    t.deliver_all();
    assert_eq!(t.result(E, 3), Ok(LocalReply::Done));
    assert_eq!(t.result(C, 4), Ok(LocalReply::Data(new.clone())));
    let after = t.log[mark..].join("\n");
    let put_reply = after
        .lines()
        .find(|l| l.starts_with("B->B2 OK_REPLY"))
        .expect("B answers B2's PUT");
    assert!(
        put_reply.contains("PERMISSIONS=READ_PERMS"),
        "B had only READ left to give:\n{after}"
    );
    let recall = after
        .find("B2->D INVALIDATE")
        .unwrap_or_else(|| panic!("B2 never recalled D:\n{after}"));
    let reply = after.find("B2->E OK_REPLY").expect("E answered");
    assert!(
        recall < reply,
        "D recalled before E's write completes:\n{after}"
    );

    // So D, reading after E's write completed, sees it.
    t.start(D, 5, LocalOp::Read { chunk: 1 });
    t.deliver_all();
    assert_eq!(t.result(D, 5), Ok(LocalReply::Data(new)));
}
