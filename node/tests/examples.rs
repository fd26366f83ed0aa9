//! Seed 001's worked examples 1–4 on the Fig. 7 tree (A root; B, C under A;
//! D under B; E, F under C), checked message by message.
//!
//! Messages are delivered by hand in FIFO order with explicit times, so the
//! TTL arithmetic of the seed (1200 s reduced to 1198 s by a 2 s round trip,
//! to 1150 s 50 s later) is reproduced exactly.

mod common;

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{LocalOp, LocalReply, NodeConfig, WriteMode};
use canopy_proto::Perm;

use common::{Mem, Tree};

const CHUNK: usize = 4096;
common::topology!(A, B: A, C: A, D: B, E: C, F: C);

/// The Fig. 7 tree over a zeroed 64-chunk origin, no link up yet.
/// Heartbeats are not part of the seed's sequences: they and their replies
/// stay out of the log.
fn tree() -> Tree {
    let origin = Mem::new(CHUNK, 64);
    Tree::new(NAMES, PARENT, origin, |i, role| {
        // Example 1: A gives 32002, C remaps to 26924852; example 4: B
        // passes A's id on unchanged.
        let id = match i {
            A | B => 32002,
            C => 26924852,
            _ => 7000 + i as u32,
        };
        let mut cfg = NodeConfig::new(role, "volume_X", id);
        cfg.connect_lazily = matches!(i, B | C);
        cfg.write_mode = if i == D {
            WriteMode::Async
        } else {
            WriteMode::Sync
        };
        cfg
    })
    .hide_heartbeats()
}

fn chunk_of(byte: u8) -> Bytes {
    Bytes::from(vec![byte; CHUNK])
}

#[test]
fn seed_examples_one_to_four() {
    let mut t = tree();
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
        t.origin.written_chunk(7)[0],
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
        t.origin.written_chunk(7)[0],
        0xB3,
        "an async write stays at the writer"
    );
    // The sync daemon: armed at the first call, it sees the chunk dirty at
    // the next pass and sends it at the one after, giving it up since D has
    // not used it meanwhile.
    let before = t.log.len();
    t.tick(D, &[T + 5000, T + 10_000, T + 20_000]);
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
        t.origin.written_chunk(7)[0],
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
