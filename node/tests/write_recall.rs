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

mod common;

use bytes::Bytes;
use canopy_node::{LocalOp, LocalReply, NodeConfig, WriteMode};
use canopy_proto::Perm;

use common::{Mem, Tree};

const CHUNK: usize = 32;
const CHUNKS: usize = 4;
common::topology!(A, B: A, B2: B, D: B2, E: B2, C: A);

/// Time stands still: only the order of deliveries matters here.
const NOW: u64 = 10;

/// The tree with every link up, B writing async and the rest sync.
fn tree() -> Tree {
    let mut t = Tree::new(NAMES, PARENT, Mem::new(CHUNK, CHUNKS), |i, role| {
        let mut cfg = NodeConfig::new(role, "vol", 900);
        cfg.write_mode = if i == B {
            WriteMode::Async
        } else {
            WriteMode::Sync
        };
        cfg
    });
    // Parents first, so each CONNECT finds its parent connected.
    for i in [B, C, B2, D, E] {
        t.link_up(i, 0);
        t.deliver_all(NOW);
    }
    t
}

#[test]
fn put_answered_with_read_still_recalls_the_writers_siblings() {
    let mut t = tree();
    let old = Bytes::from(vec![0xB0; CHUNK]);
    let new = Bytes::from(vec![0xE1; CHUNK]);

    // B writes (async: it holds WRITE, dirty); D reads B's data through B2.
    let write = LocalOp::Write {
        chunk: 1,
        offset: 0,
        data: old.clone(),
        force_sync: false,
    };
    assert_eq!(t.run(B, 1, write, NOW), Ok(LocalReply::Done));
    assert_eq!(
        t.run(D, 2, LocalOp::Read { chunk: 1 }, NOW),
        Ok(LocalReply::Data(old.clone()))
    );
    assert_eq!(t.nodes[B2].inspect(1, NOW).held, Perm::Read);

    // E's full-chunk sync write: PUT to B2, PUT to B, which applies it and
    // sends it to A in a FLUSH.
    let write = LocalOp::Write {
        chunk: 1,
        offset: 0,
        data: new.clone(),
        force_sync: false,
    };
    t.local(E, 3, write, NOW);
    t.deliver(E, B2, NOW);
    t.deliver(B2, B, NOW);
    // Before A sees that FLUSH, C's read makes A invalidate B to READ.
    t.local(C, 4, LocalOp::Read { chunk: 1 }, NOW);
    t.deliver(C, A, NOW);
    t.deliver(A, B, NOW);
    let mark = t.log.len();
    t.deliver_all(NOW);
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
    assert_eq!(
        t.run(D, 5, LocalOp::Read { chunk: 1 }, NOW),
        Ok(LocalReply::Data(new))
    );
}
