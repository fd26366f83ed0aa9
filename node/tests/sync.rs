//! `LocalOp::Sync` and `Node::unsynced_chunks`: what a block device's FLUSH
//! needs from a leaf whose writes are acknowledged before the root has them
//! durably (async and semi-sync modes).
//!
//! The tree is A (root) ← B (a lazy proxy, itself async, so what it passes
//! on is not made durable for it) ← D (async leaf) and S (semi-sync leaf).
//! Messages are delivered by hand in FIFO order, as in `examples.rs`. The
//! root's origin keeps what was written apart from what was fdatasynced, so
//! "durable at the root" is checked, not assumed.

mod common;

use canopy_node::{LocalOp, LocalReply, NodeConfig, WriteMode};
use canopy_proto::{Perm, Status};

use common::{Mem, Tree};

const CHUNK: usize = 64;
const CHUNKS: usize = 16;
common::topology!(A, B: A, D: B, S: B);

/// The tree with the root writing in `root_mode`, every link up.
fn tree(root_mode: WriteMode) -> Tree {
    tree_with(root_mode, WriteMode::Async)
}

/// The same with the proxy B in `proxy_mode`.
fn tree_with(root_mode: WriteMode, proxy_mode: WriteMode) -> Tree {
    let mut t = Tree::new(NAMES, PARENT, Mem::new(CHUNK, CHUNKS), |i, role| {
        let mut cfg = NodeConfig::new(role, "vol", 500);
        cfg.connect_lazily = i == B;
        cfg.write_mode = match i {
            A => root_mode,
            B => proxy_mode,
            D => WriteMode::Async,
            S => WriteMode::SemiSync,
            _ => WriteMode::Async,
        };
        cfg
    });
    for i in [B, D, S] {
        t.link_up(i, 0);
    }
    t.deliver_all(0);
    t
}

#[test]
fn async_leaf_sync_pushes_its_dirty_chunk_to_the_root_and_keeps_write() {
    let mut t = tree(WriteMode::Sync);
    let data = [0xD1; CHUNK];
    t.write(D, 1, 3, 0, &data, 10);
    let v = t.nodes[D].inspect(3, 10);
    assert!(
        v.dirty && v.held == Perm::Write,
        "acknowledged locally: {v:?}"
    );
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![3]);
    assert_eq!(t.origin.durable_chunk(3), vec![0; CHUNK]);

    let syncs = t.origin.syncs();
    // Our copy goes up with FORCE_SYNC, keeping WRITE; the proxy passes it on
    // the same way and answers only once the root has fdatasynced.
    let flush: &[&str] = &[
        "IO_REQUEST/FLUSH",
        "FORCE_SYNC",
        "BLOCK_NUM=3",
        "PERMISSIONS=WRITE_PERMS",
        "DATA=<64 bytes>",
    ];
    let mark = t.run_ok(D, 2, LocalOp::Sync { chunk: 3 }, 20);
    t.expect_lacking(
        mark,
        &[
            ("D->B", flush, &[]),
            ("B->A", flush, &[]),
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
    let mark = t.run_ok(D, 3, LocalOp::Sync { chunk: 3 }, 30);
    t.expect_lacking(
        mark,
        &[
            ("D->B", &["IO_REQUEST/FLUSH", "FORCE_SYNC"], &["DATA="]),
            ("B->A", &["IO_REQUEST/FLUSH", "FORCE_SYNC"], &["DATA="]),
            ("A->B", &["OK_REPLY"], &[]),
            ("B->D", &["OK_REPLY"], &[]),
        ],
    );
    // The root had already made the chunk durable: no second fdatasync.
    assert_eq!(t.origin.syncs(), syncs + 1);
    assert_eq!(t.nodes[D].inspect(3, 30).held, Perm::Write);
}

#[test]
fn async_write_sent_up_by_the_sync_daemon_stays_unsynced_until_a_sync() {
    let mut t = tree(WriteMode::Sync);
    let data = [0xD2; CHUNK];
    t.write(D, 1, 4, 0, &data, 10);
    // The sync daemon sends the chunk up without FORCE_SYNC and gives WRITE
    // up (D has not used it since); B passes it on to the root, which writes
    // its origin without fdatasync. Nothing is dirty at D any more.
    t.tick(D, &[10, 6_000, 12_000]);
    assert_eq!(t.nodes[D].dirty_chunks(), 0);
    assert_eq!(t.nodes[D].inspect(4, 12_000).held, Perm::No);
    assert_eq!(t.origin.written_chunk(4), data.to_vec());
    assert_ne!(t.origin.durable_chunk(4), data.to_vec());
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![4]);
    let syncs = t.origin.syncs();

    // A barrier from D (holding nothing), passed on by B (clean), makes the
    // root fdatasync.
    let mark = t.run_ok(D, 2, LocalOp::Sync { chunk: 4 }, 13_000);
    t.expect_lacking(
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
    let mut t = tree(WriteMode::Sync);
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

    let mark = t.run_ok(S, 3, LocalOp::Sync { chunk: 5 }, 20);
    t.expect_lacking(
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
    let mut t = tree(WriteMode::Sync);
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

/// A proxy that loses its parent while holding a child's dirty data cannot
/// pass it on, and the child no longer has it. The proxy closes its
/// children, so the child runs its own parent loss and its next Sync says
/// the write may be lost, rather than send a barrier that the root would
/// answer OK for data it never got (found by the simulation with proxy
/// links breaking, seeds 17 and 138).
#[test]
fn a_proxy_losing_its_parent_makes_its_childrens_next_sync_report_the_loss() {
    let mut t = tree(WriteMode::Sync);
    let data = [0xD4; CHUNK];
    t.write(D, 1, 4, 0, &data, 10);
    // Two sync daemon passes with a write in between: the chunk goes up
    // to B without FORCE_SYNC, D keeping WRITE since it used it.
    t.tick(D, &[6_000]);
    t.write(D, 2, 4, 0, &data, 6_500);
    t.tick(D, &[12_000]);
    assert!(!t.nodes[D].inspect(4, 12_000).dirty);
    assert!(t.nodes[B].inspect(4, 12_000).dirty, "only B has the write");
    assert_eq!(t.nodes[D].unsynced_chunks(), vec![4]);

    // B's link to A breaks: B closes D too.
    t.nodes[B].parent_down(13_000);
    t.drain(B);
    t.nodes[A].child_gone(B as u64, 13_000);
    t.drain(A);
    t.deliver_all(13_000);
    assert_eq!(t.nodes[D].inspect(4, 13_000).held, Perm::No);
    assert!(t.nodes[B].inspect(4, 13_000).data.is_none());

    // Everything reconnects; the root never got the write.
    t.link_up(B, 14_000);
    t.link_up(D, 14_000);
    t.deliver_all(14_000);
    assert_ne!(t.origin.written_chunk(4), data.to_vec());
    assert_eq!(
        t.run(D, 3, LocalOp::Sync { chunk: 4 }, 15_000),
        Err(Status::IoError),
        "the write is reported lost, not claimed durable"
    );
    assert_eq!(
        t.run(D, 4, LocalOp::Sync { chunk: 4 }, 16_000),
        Ok(LocalReply::Done)
    );
}

/// A sync proxy holding data that is not at the root yet sends it up with
/// FORCE_SYNC before it lets another child read it: a parent failure could
/// otherwise lose a write a reader has seen (the simulation's seed 7664).
/// An async proxy serves it as it is.
#[test]
fn a_sync_proxy_syncs_dirty_data_before_another_child_reads_it() {
    for proxy_mode in [WriteMode::Sync, WriteMode::Async] {
        let mut t = tree_with(WriteMode::Sync, proxy_mode);
        let data = [0xE5; CHUNK];
        t.write(D, 1, 5, 0, &data, 10);
        // D's sync daemon sends the chunk up without FORCE_SYNC, keeping
        // WRITE (used since the last pass): B holds it dirty.
        t.tick(D, &[6_000]);
        t.write(D, 2, 5, 0, &data, 6_500);
        t.tick(D, &[12_000]);
        assert!(t.nodes[B].inspect(5, 12_000).dirty);
        let syncs = t.origin.syncs();

        let mark = t.log.len();
        let got = t.run(S, 3, LocalOp::Read { chunk: 5 }, 13_000);
        assert_eq!(got, Ok(LocalReply::Data(data.to_vec().into())));
        let flushed_first = t.log[mark..]
            .iter()
            .position(|l| l.starts_with("B->A") && l.contains("FORCE_SYNC") && l.contains("DATA="))
            .zip(t.log[mark..].iter().position(|l| l.starts_with("B->S")));
        match proxy_mode {
            WriteMode::Sync => {
                let (flush, reply) = flushed_first.expect("B synced, then replied");
                assert!(flush < reply, "{:#?}", &t.log[mark..]);
                assert_eq!(t.origin.syncs(), syncs + 1);
                assert_eq!(t.origin.durable_chunk(5), data.to_vec());
            }
            _ => {
                assert!(flushed_first.is_none(), "{:#?}", &t.log[mark..]);
                assert_eq!(t.origin.syncs(), syncs);
            }
        }
    }
}

/// A lock held when the parent is lost is void (the root forgot the
/// grant): its release says so, once.
#[test]
fn a_lock_lost_with_the_parent_is_reported_to_its_release() {
    let mut t = tree(WriteMode::Sync);
    let lock = |perm| LocalOp::Lock { chunk: 9, perm };
    t.run_ok(D, 1, lock(Perm::Write), 10);
    t.nodes[D].parent_down(20);
    t.drain(D);
    t.nodes[B].child_gone(D as u64, 20);
    t.drain(B);
    t.link_up(D, 30);
    t.deliver_all(30);
    assert_eq!(t.nodes[D].stats().locks_lost, 1);
    assert_eq!(t.run(D, 2, lock(Perm::No), 40), Err(Status::NoPermission));
    // Reported once: the lock can be taken and released again.
    t.run_ok(D, 3, lock(Perm::Write), 50);
    t.run_ok(D, 4, lock(Perm::No), 60);
}

#[test]
fn root_lists_its_own_writes_until_the_origin_is_fdatasynced() {
    // A root writing in sync mode fdatasyncs every write: nothing to list.
    let mut t = tree(WriteMode::Sync);
    t.write(A, 1, 1, 0, &[0x11; CHUNK], 10);
    assert!(t.nodes[A].unsynced_chunks().is_empty());
    assert_eq!(t.origin.durable_chunk(1), vec![0x11; CHUNK]);

    // In async mode its writes reach the origin unsynced until a Sync.
    let mut t = tree(WriteMode::Async);
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

/// Since `mark`, heartbeats aside, exactly: B's FLUSH with its data,
/// asking to keep `perm`, and the root's refusal (its disk failed).
fn expect_refused_flush(t: &Tree, mark: usize, perm: &str) {
    let got = since(t, mark);
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got[0].starts_with("B->A IO_REQUEST/FLUSH")
            && got[0].contains(perm)
            && got[0].contains("DATA="),
        "{got:#?}"
    );
    assert!(
        got[1].starts_with("A->B ERR_REPLY") && got[1].contains("IO_ERROR"),
        "{got:#?}"
    );
}

#[test]
fn a_refused_sync_daemon_flush_keeping_write_leaves_the_chunk_dirty() {
    let mut t = tree(WriteMode::Sync);
    // B writes for itself (async): it holds WRITE on chunk 5, dirty.
    t.write(B, 1, 5, 0, &[0xB1; CHUNK], 10);
    t.origin.fail_writes(true);
    // First pass ages the chunk; a write before the second keeps it in use,
    // so the second pass FLUSHes it keeping WRITE, and the root refuses.
    t.tick(B, &[10, 6_000]);
    t.write(B, 2, 5, 0, &[0xB2; CHUNK], 7_000);
    let mark = t.log.len();
    t.tick(B, &[12_000]);
    expect_refused_flush(&t, mark, "PERMISSIONS=WRITE_PERMS");
    assert_eq!(t.nodes[B].dirty_chunks(), 1, "refused data is dirty again");
    assert_eq!(t.nodes[B].stats().lost_dirty, 0);
    // The disk recovers: a later pass sends it up again and it lands.
    t.origin.fail_writes(false);
    t.tick(B, &[18_000, 24_000, 30_000]);
    assert_eq!(t.nodes[B].dirty_chunks(), 0);
    assert_eq!(t.origin.written_chunk(5), vec![0xB2; CHUNK]);
}

#[test]
fn a_refused_release_of_the_only_copy_is_counted_and_fails_the_next_sync() {
    let mut t = tree(WriteMode::Sync);
    t.write(B, 1, 6, 0, &[0xB3; CHUNK], 10);
    t.origin.fail_writes(true);
    // Unused since the first pass: the second gives WRITE up with the data,
    // dropping B's copy, and the root refuses it.
    let mark = t.log.len();
    t.tick(B, &[10, 6_000, 12_000]);
    expect_refused_flush(&t, mark, "PERMISSIONS=NO_PERMS");
    assert_eq!(t.nodes[B].stats().lost_dirty, 1);
    t.origin.fail_writes(false);
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
