//! Chunk versions (`node/src/version.rs`): they start at the root's base,
//! travel with every copy, rise with every write, and a version never names
//! two contents. Sealed records and signed grants rest on that last point.

mod common;

use bytes::Bytes;
use canopy_node::{LocalOp, LocalReply, NodeConfig, WriteMode};

use common::{Mem, Tree};

const CHUNK: usize = 32;
const CHUNKS: usize = 4;
const BASE: u64 = 1 << 40;
const NOW: u64 = 10;

common::topology!(A, B: A, D: B, E: B, C: A);

/// The tree with every link up; B writes back (async), the others `mode`.
fn tree(mode: WriteMode) -> Tree {
    let mut t = Tree::new(NAMES, PARENT, Mem::new(CHUNK, CHUNKS), |i, role| {
        let mut cfg = NodeConfig::new(role, "vol", 900);
        cfg.write_mode = if i == B { WriteMode::Async } else { mode };
        // Short grants, so a test can let one run out.
        cfg.grant_ttl_ms = 1_000;
        cfg
    })
    .hide_heartbeats();
    t.nodes[A].set_version_base(BASE);
    for i in [B, C, D, E] {
        t.link_up(i, 0);
        t.deliver_all(NOW);
    }
    t
}

fn write(chunk: u64, byte: u8, force_sync: bool) -> LocalOp {
    LocalOp::Write {
        chunk,
        offset: 0,
        data: Bytes::from(vec![byte; CHUNK]),
        force_sync,
    }
}

#[test]
fn versions_start_at_the_base_and_rise_with_each_write() {
    let mut t = tree(WriteMode::Sync);
    assert_eq!(t.nodes[A].inspect(0, NOW).version, BASE);

    // A read brings the chunk with the root's version.
    let mark = t.log.len();
    assert!(t.run(C, 1, LocalOp::Read { chunk: 0 }, NOW).is_ok());
    let grant = t.log[mark..]
        .iter()
        .find(|l| l.starts_with("A->C OK_REPLY"))
        .expect("A grants C");
    assert!(grant.contains(&format!("VERSION={BASE}")), "{grant}");
    assert_eq!(t.nodes[C].inspect(0, NOW).version, BASE);

    // C's sync write: its copy and the root's are one version up, and the
    // FLUSH that carried it said so.
    let mark = t.run_ok(C, 2, write(0, 0xC1, false), NOW);
    assert_eq!(t.nodes[C].inspect(0, NOW).version, BASE + 1);
    assert_eq!(t.nodes[A].inspect(0, NOW).version, BASE + 1);
    // (A full-chunk sync write goes up as a PUT, with the version above
    // C's as its floor.)
    let put = t.log[mark..]
        .iter()
        .find(|l| l.starts_with("C->A IO_REQUEST/") && l.contains("DATA="))
        .expect("C's data goes up");
    assert!(put.contains(&format!("VERSION={}", BASE + 1)), "{put}");

    // D reads it through B: the same version names the same contents.
    assert_eq!(
        t.run(D, 3, LocalOp::Read { chunk: 0 }, NOW),
        Ok(LocalReply::Data(Bytes::from(vec![0xC1; CHUNK])))
    );
    assert_eq!(t.nodes[D].inspect(0, NOW).version, BASE + 1);
    assert_eq!(t.nodes[B].inspect(0, NOW).version, BASE + 1);

    // A chunk nobody wrote stays at the base.
    assert_eq!(t.nodes[A].inspect(1, NOW).version, BASE);
}

/// B holds a dirty copy (version v+1, not at the root yet) when E's
/// full-chunk sync write passes through it as a PUT. The root must give
/// E's data a version above B's, or v+1 would name both (the simulation's
/// seed 30, where a reader still held B's contents under v+1).
#[test]
fn a_put_takes_a_version_above_a_dirty_copy_on_its_way() {
    let mut t = tree(WriteMode::Sync);
    // B writes back: WRITE held, dirty at BASE + 1, the root still at BASE.
    t.run_ok(B, 1, write(2, 0xB1, false), NOW);
    assert_eq!(t.nodes[B].inspect(2, NOW).version, BASE + 1);
    assert!(t.nodes[B].inspect(2, NOW).dirty);
    assert_eq!(t.nodes[A].inspect(2, NOW).version, BASE);

    // C's full-chunk sync write: A recalls B (its dirty copy lands at
    // BASE + 1), then applies C's.
    t.run_ok(C, 2, write(2, 0xC2, true), NOW);
    let root = t.nodes[A].inspect(2, NOW).version;
    assert!(root > BASE + 1, "root at {root}");

    // B writes chunk 3 back too, and its grant then runs out (no sync
    // daemon pass in between): E's full-chunk sync write must go up from B
    // as a PUT, its data passing B's dirty copy, and carries a floor.
    t.run_ok(B, 3, write(3, 0xB3, false), NOW);
    let dirty = t.nodes[B].inspect(3, NOW).version;
    let later = NOW + 5_000;
    assert!(!t.nodes[B].inspect(3, later).usable);
    let mark = t.run_ok(E, 4, write(3, 0xE4, true), later);
    let put = t.log[mark..]
        .iter()
        .find(|l| l.starts_with("B->A IO_REQUEST/PUT"))
        .unwrap_or_else(|| {
            panic!(
                "B sends E's write up as a PUT:\n{}",
                t.log[mark..].join("\n")
            )
        });
    assert!(put.contains(&format!("VERSION={}", dirty + 1)), "{put}");
    let root = t.nodes[A].inspect(3, later).version;
    assert!(
        root > dirty,
        "root gave E's write version {root}, not above B's dirty {dirty}"
    );
    assert_eq!(t.origin.written_chunk(3), vec![0xE4; CHUNK]);
}

/// A failed origin write is refused to its writer, and what the origin
/// holds afterwards gets a version of its own: the refused data's version
/// never names what readers are served.
#[test]
fn a_failed_origin_write_leaves_its_version_behind() {
    let mut t = tree(WriteMode::Sync);
    t.run_ok(C, 1, write(1, 0xC1, false), NOW);
    let before = t.nodes[A].inspect(1, NOW).version;

    // D's full-chunk sync write goes up as a PUT (D holds nothing to keep
    // it in), and the root's origin refuses it.
    t.origin.fail_writes(true);
    assert!(t.run(D, 2, write(1, 0xD2, false), NOW).is_err());
    t.origin.fail_writes(false);
    let after = t.nodes[A].inspect(1, NOW).version;
    assert!(
        after >= before + 2,
        "the refused write took a version above {before}, and the origin's contents need another: {after}"
    );
    // E reads what the origin has, at the version after the refused one.
    let read = t.run(E, 3, LocalOp::Read { chunk: 1 }, NOW);
    assert_eq!(read, Ok(LocalReply::Data(Bytes::from(vec![0xC1; CHUNK]))));
    assert_eq!(t.nodes[E].inspect(1, NOW).version, after);
}
