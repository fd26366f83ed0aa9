//! Read-ahead at a child node (`NodeConfig::read_ahead_bytes`): a local
//! read that follows two or more reads of the chunks just before it also
//! asks the parent for the chunks after it, as far ahead as the run
//! behind it reaches (up to the window), and a reader that comes for one
//! of them is served from the cache or waits behind its GET.

use bytes::Bytes;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role};
use canopy_proto::{IoOp, Message, Opcode, Perm};

const CHUNK: u32 = 4096;

mod common;

use common::{connected_child, drain_actions as drain};

/// A connected child reading ahead `window` chunks of a 64-chunk volume.
fn child(window: u64) -> Node {
    let mut cfg = NodeConfig::new(Role::Child, "vol", 9);
    cfg.read_ahead_bytes = window * u64::from(CHUNK);
    connected_child(cfg, 30_000, CHUNK, 64 * u64::from(CHUNK))
}

/// The GETs among `actions`: (xid, chunk).
fn gets(actions: &[Action]) -> Vec<(u32, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ToParent(m)
                if m.header.opcode == Opcode::IoRequest && m.params.io_op == Some(IoOp::Get) =>
            {
                Some((m.header.xid, m.params.block_num.unwrap_or(u64::MAX)))
            }
            _ => None,
        })
        .collect()
}

/// The local reads answered among `actions`.
fn done(actions: &[Action]) -> Vec<LocalId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::LocalDone(id, Ok(LocalReply::Data(_))) => Some(*id),
            _ => None,
        })
        .collect()
}

/// The parent grants READ on `chunk` with its contents.
fn grant(n: &mut Node, xid: u32, chunk: u64, now: u64) {
    let mut m = Message::new(Opcode::OkReply, xid);
    m.params.volume_id = Some(5);
    m.params.block_num = Some(chunk);
    m.params.permissions = Some(Perm::Read);
    m.params.ttl_ms = Some(60_000);
    m.params.version = Some(1);
    m.params.data = Some(Bytes::from(vec![chunk as u8; CHUNK as usize]));
    n.handle_parent(m, now);
}

fn read(n: &mut Node, id: u64, chunk: u64) -> Vec<Action> {
    n.local(LocalId(id), LocalOp::Read { chunk }, 1);
    drain(n)
}

fn chunks(g: &[(u32, u64)]) -> Vec<u64> {
    g.iter().map(|&(_, c)| c).collect()
}

#[test]
fn reads_in_order_fetch_ahead_as_far_as_the_run_behind_them() {
    let mut n = child(8);
    let mut out = Vec::new();
    let mut ask = |n: &mut Node, id, chunk| {
        let a = read(n, id, chunk);
        let g = gets(&a);
        out.extend(g.iter().copied());
        chunks(&g)
    };
    assert_eq!(ask(&mut n, 1, 10), vec![10]);
    // One chunk behind is not a run yet.
    assert_eq!(ask(&mut n, 2, 11), vec![11]);
    // Two behind: 12, and 13 and 14 ahead of it.
    assert_eq!(ask(&mut n, 3, 12), vec![12, 13, 14]);
    assert_eq!((n.stats().read_ahead, n.read_ahead_in_flight()), (2, 2));
    // A reader of 13 waits behind the GET already out (no second GET
    // for it), and with three behind reaches to 16.
    assert_eq!(ask(&mut n, 4, 13), vec![15, 16]);
    // Reading 14 with four behind reaches to 18.
    assert_eq!(ask(&mut n, 5, 14), vec![17, 18]);
    assert_eq!(n.read_ahead_in_flight(), 6);
    // The parent answers everything: the five readers are answered, the
    // read-aheads are not reported, and none is left in flight.
    let mut answered = Vec::new();
    for (xid, chunk) in out {
        grant(&mut n, xid, chunk, 2);
        answered.extend(done(&drain(&mut n)));
    }
    answered.sort();
    assert_eq!(answered, (1..=5).map(LocalId).collect::<Vec<_>>());
    assert_eq!(n.read_ahead_in_flight(), 0);
    // A reader of 15 finds it in the cache, and the window moves on.
    let a = read(&mut n, 6, 15);
    assert_eq!(done(&a), vec![LocalId(6)]);
    assert_eq!(chunks(&gets(&a)), vec![19, 20]);
}

#[test]
fn scattered_reads_fetch_nothing_ahead() {
    let mut n = child(8);
    let mut asked = Vec::new();
    for (id, chunk) in [(1, 5), (2, 20), (3, 7), (4, 40), (5, 6), (6, 63)] {
        asked.extend(chunks(&gets(&read(&mut n, id, chunk))));
    }
    assert_eq!(asked, vec![5, 20, 7, 40, 6, 63]);
    assert_eq!(n.stats().read_ahead, 0);
}

#[test]
fn off_without_a_window_and_bounded_by_it() {
    let mut n = child(0);
    let asked: Vec<u64> = (0..6)
        .flat_map(|c| chunks(&gets(&read(&mut n, c + 1, c))))
        .collect();
    assert_eq!(asked, (0..6).collect::<Vec<_>>());
    let mut n = child(2);
    for c in 0..2 {
        read(&mut n, c + 1, c);
    }
    assert_eq!(chunks(&gets(&read(&mut n, 3, 2))), vec![2, 3, 4]);
    // Two in flight fill the window: reading 3 (three behind) asks for
    // nothing more until they are answered.
    assert!(gets(&read(&mut n, 4, 3)).is_empty());
    assert_eq!(n.read_ahead_in_flight(), 2);
    // Past the volume's end nothing is asked for.
    let mut n = child(8);
    for c in 60..64 {
        read(&mut n, c, c);
    }
    assert_eq!(n.stats().read_ahead, 1, "63 only");
}
