//! A full-chunk PUT whose answer is lost with the parent, with
//! `NodeConfig::retry_writes`: the write waits, its PUT goes again
//! (RECOVERY_OP, same version and data) once the node is connected again,
//! IN_RECOVERY makes it ask again shortly, and it fails only after its
//! window. Without `retry_writes` it fails at once, as before.

use bytes::Bytes;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, Node, NodeConfig, Role};
use canopy_proto::{Flags, IoOp, Message, Opcode, Perm, Status};

const HB: u32 = 30_000;
const CHUNK: usize = 4096;

fn drain(n: &mut Node) -> Vec<Action> {
    std::iter::from_fn(|| n.poll_action()).collect()
}

fn to_parent(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ToParent(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn done(actions: &[Action]) -> Vec<(LocalId, Result<LocalReply, Status>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::LocalDone(id, r) => Some((*id, r.clone())),
            _ => None,
        })
        .collect()
}

/// Connect `n` (after `parent_up`) at `now`, answering its CONNECT.
fn connect(n: &mut Node, now: u64) -> Vec<Action> {
    n.parent_up(now);
    let connect = to_parent(&drain(n))
        .into_iter()
        .find(|m| m.header.opcode == Opcode::Connect)
        .expect("CONNECT");
    let mut ok = Message::new(Opcode::OkReply, connect.header.xid);
    ok.params.volume_id = Some(5);
    ok.params.hb_ttl_ms = Some(HB);
    ok.params.chunk_size = Some(CHUNK as u32);
    ok.params.volume_size = Some(1 << 20);
    n.handle_parent(ok, now);
    assert!(n.is_ready());
    drain(n)
}

/// A connected child writing synchronously, and the PUT of its write of
/// chunk 3, in flight.
fn writing(retry: bool) -> (Node, Message) {
    let mut cfg = NodeConfig::new(Role::Child, "vol", 9);
    cfg.retry_writes = retry;
    let mut n = Node::new_child(cfg);
    connect(&mut n, 0);
    n.local(
        LocalId(1),
        LocalOp::Write {
            chunk: 3,
            offset: 0,
            data: Bytes::from(vec![0xAB; CHUNK]),
            force_sync: true,
        },
        10,
    );
    let sent = to_parent(&drain(&mut n));
    assert_eq!(sent.len(), 1, "{sent:?}");
    let put = sent[0].clone();
    assert_eq!(put.params.io_op, Some(IoOp::Put));
    (n, put)
}

fn ok_for(m: &Message, perm: Perm) -> Message {
    let mut ok = Message::new(Opcode::OkReply, m.header.xid);
    ok.params.volume_id = Some(5);
    ok.params.block_num = m.params.block_num;
    ok.params.permissions = Some(perm);
    ok.params.version = Some(7);
    ok.params.ttl_ms = Some(10_000);
    ok
}

#[test]
fn a_lost_put_goes_again_once_reconnected() {
    let (mut n, put) = writing(true);
    n.parent_down(20);
    let a = drain(&mut n);
    assert!(done(&a).is_empty(), "the write waits: {a:?}");
    // Not connected: nothing to send to, nothing fails yet.
    n.handle_timeout(1_000);
    assert!(drain(&mut n).is_empty());

    let a = connect(&mut n, 2_000);
    let again = to_parent(&a);
    assert_eq!(again.len(), 1, "{again:?}");
    let again = &again[0];
    assert!(again.header.flags.contains(Flags::RECOVERY_OP));
    assert!(again.header.flags.contains(Flags::FORCE_SYNC));
    assert_ne!(again.header.xid, put.header.xid);
    assert_eq!(again.params.data, put.params.data);
    assert_eq!(again.params.version, put.params.version);
    assert_eq!(again.params.block_num, Some(3));
    assert_eq!(n.stats().puts_resent, 1);

    // The first attempt is still being applied above: ask again shortly.
    n.handle_parent(
        Message::err_reply(again.header.xid, Status::InRecovery),
        2_010,
    );
    assert!(drain(&mut n).is_empty());
    assert!(n.poll_timeout().is_some_and(|t| t <= 2_010 + 250));
    n.handle_timeout(2_010 + 250);
    let third = to_parent(&drain(&mut n));
    assert_eq!(third.len(), 1, "{third:?}");
    assert!(third[0].header.flags.contains(Flags::RECOVERY_OP));
    assert_eq!(third[0].params.data, put.params.data);

    // Answered from the reply cache (the link's OK that grants nothing):
    // the write is done.
    n.handle_parent(ok_for(&third[0], Perm::No), 2_300);
    let d = done(&drain(&mut n));
    assert_eq!(d, vec![(LocalId(1), Ok(LocalReply::Done))]);
}

#[test]
fn a_lost_put_fails_after_its_window() {
    let (mut n, _) = writing(true);
    n.parent_down(20);
    assert!(done(&drain(&mut n)).is_empty());
    let window = 2 * u64::from(HB);
    assert_eq!(n.poll_timeout(), Some(20 + window));
    n.handle_timeout(20 + window - 1);
    assert!(done(&drain(&mut n)).is_empty());
    n.handle_timeout(20 + window);
    let d = done(&drain(&mut n));
    assert_eq!(d, vec![(LocalId(1), Err(Status::ParentUnavailable))]);
    // The row is free again: a later write of the chunk goes up normally
    // once connected.
    connect(&mut n, 20 + window + 1);
    n.local(
        LocalId(2),
        LocalOp::Write {
            chunk: 3,
            offset: 0,
            data: Bytes::from(vec![0xCD; CHUNK]),
            force_sync: true,
        },
        20 + window + 2,
    );
    let sent = to_parent(&drain(&mut n));
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].header.flags.contains(Flags::RECOVERY_OP));
}

#[test]
fn a_second_loss_keeps_the_first_window() {
    let (mut n, _) = writing(true);
    n.parent_down(20);
    drain(&mut n);
    let a = connect(&mut n, 1_000);
    assert_eq!(to_parent(&a).len(), 1);
    n.parent_down(1_500);
    assert!(done(&drain(&mut n)).is_empty());
    assert_eq!(n.poll_timeout(), Some(20 + 2 * u64::from(HB)));
}

#[test]
fn without_retry_writes_a_lost_put_fails_at_once() {
    let (mut n, _) = writing(false);
    n.parent_down(20);
    let d = done(&drain(&mut n));
    assert_eq!(d, vec![(LocalId(1), Err(Status::ParentUnavailable))]);
}

#[test]
fn a_write_that_failed_above_is_not_sent_again() {
    let (mut n, put) = writing(true);
    n.handle_parent(Message::err_reply(put.header.xid, Status::CookieSpent), 30);
    let d = done(&drain(&mut n));
    assert_eq!(d, vec![(LocalId(1), Err(Status::CookieSpent))]);
    n.parent_down(40);
    assert!(drain(&mut n)
        .iter()
        .all(|a| !matches!(a, Action::ToParent(_))));
    assert_eq!(n.stats().puts_resent, 0);
}
