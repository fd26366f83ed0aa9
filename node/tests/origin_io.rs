//! The root's asynchronous origin I/O, driven by hand.
//!
//! Reads: children's GETs become `Action::OriginRead`s, one per chunk
//! however many wait, the replies follow the completions in whatever order
//! they come, a failed read fails only the requests waiting for it, and a
//! read overtaken by a write is never served.
//!
//! Writes: an `Action::OriginWrite` per chunk at a time; reads of the
//! chunk and the writer's reply wait for it; a failed one refuses the
//! writer's FLUSH and drops the bytes nobody has read.
//!
//! fdatasync (group commit): sync writes wait for an `Action::OriginSync`
//! that covers them, one in flight at a time; writes arriving while it
//! runs share the next one; a failed one fails only the requests it was
//! meant to cover, and a later barrier tries again.

mod common;

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_node::{Action, Node, NodeConfig, Role};
use canopy_proto::{IoOp, Message, Opcode, Perm, Status};

use common::Mem;

const CHUNK: usize = 64;
const CHUNKS: usize = 8;
const VOL: u32 = 77;

/// A root whose origin holds byte `chunk + 1` throughout each chunk, with
/// children 1..=3 connected. A lone node, not a `common::Tree`: the tree
/// serves origin reads as they are asked for, and these tests hold the
/// `Action::OriginRead`s back to complete them in an order of their own.
fn root(push_ahead: u32) -> (Node, Mem) {
    let mut bytes = vec![0; CHUNK * CHUNKS];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / CHUNK) as u8 + 1;
    }
    let origin = Mem::with_contents(CHUNK, bytes);
    let cfg = NodeConfig::new(Role::Root, "vol", VOL);
    let mut n = Node::new_root(
        cfg,
        Some(Box::new(origin.clone())),
        CHUNK as u32,
        (CHUNK * CHUNKS) as u64,
    );
    n.set_push_ahead(push_ahead);
    for child in 1..=3 {
        let mut m = Message::new(Opcode::Connect, 1);
        m.params.volume_name = Some("vol".into());
        n.handle_child(child, m, 0);
    }
    drain(&mut n);
    (n, origin)
}

/// The node's actions, with its origin writes served at once (the tests
/// below that hold writes back use `drain_raw`).
fn drain(n: &mut Node) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = n.poll_action() {
        match a {
            Action::OriginWrite { chunk, data } => n.serve_origin_write(chunk, &data, 1),
            other => out.push(other),
        }
    }
    out
}

fn drain_raw(n: &mut Node) -> Vec<Action> {
    std::iter::from_fn(|| n.poll_action()).collect()
}

fn request(op: IoOp, xid: u32, chunk: u64, perm: Perm, data: Option<Bytes>) -> Message {
    let mut m = Message::new(Opcode::IoRequest, xid);
    m.params.io_op = Some(op);
    m.params.volume_id = Some(VOL);
    m.params.block_num = Some(chunk);
    m.params.permissions = Some(perm);
    m.params.data = data;
    m
}

fn get(n: &mut Node, child: u64, xid: u32, chunk: u64) -> Vec<Action> {
    n.handle_child(child, request(IoOp::Get, xid, chunk, Perm::Read, None), 1);
    drain(n)
}

fn reads(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::OriginRead { chunk } => Some(*chunk),
            _ => None,
        })
        .collect()
}

/// The replies in `actions`: (child, xid, opcode, first data byte).
fn replies(actions: &[Action]) -> Vec<(u64, u32, Opcode, Option<u8>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ToChild(c, m) => Some((
                *c,
                m.header.xid,
                m.header.opcode,
                m.params.data.as_ref().map(|d| d[0]),
            )),
            _ => None,
        })
        .collect()
}

fn chunk_of(byte: u8) -> Bytes {
    Bytes::from(vec![byte; CHUNK])
}

#[test]
fn reads_overlap_and_complete_in_any_order() {
    let (mut n, origin) = root(0);
    let mut asked = Vec::new();
    for chunk in 0..4 {
        let a = get(&mut n, 1, 10 + chunk as u32, chunk);
        assert!(replies(&a).is_empty(), "no reply before the origin read");
        asked.extend(reads(&a));
    }
    // A second reader of chunk 2 waits for the same read.
    let a = get(&mut n, 2, 20, 2);
    assert!(reads(&a).is_empty() && replies(&a).is_empty(), "{a:?}");
    assert_eq!(asked, vec![0, 1, 2, 3]);

    // Completed backwards: each answers its own waiters at once.
    for chunk in (0..4u64).rev() {
        let mut buf = vec![0; CHUNK];
        origin.read_chunk(chunk, &mut buf).unwrap();
        n.origin_loaded(chunk, Ok(Bytes::from(buf)), 2);
        let r = replies(&drain(&mut n));
        let byte = Some(chunk as u8 + 1);
        let mut want = vec![(1, 10 + chunk as u32, Opcode::OkReply, byte)];
        if chunk == 2 {
            want.push((2, 20, Opcode::OkReply, byte));
        }
        assert_eq!(r, want);
        // Nothing is kept at the root once served.
        assert_eq!(n.inspect(chunk, 2).data, None);
    }
    // A completion nobody asked for is ignored.
    n.origin_loaded(5, Ok(chunk_of(9)), 3);
    assert!(drain(&mut n).is_empty());
}

#[test]
fn a_failed_read_fails_its_waiters_and_the_next_request_retries() {
    let (mut n, _origin) = root(0);
    assert_eq!(reads(&get(&mut n, 1, 10, 3)), vec![3]);
    assert!(drain(&mut n).is_empty());
    get(&mut n, 2, 11, 3);
    n.origin_loaded(3, Err(Status::IoError), 2);
    let a = drain(&mut n);
    // The head fails; the request behind it asks the origin again.
    assert_eq!(replies(&a), vec![(1, 10, Opcode::ErrReply, None)]);
    assert_eq!(reads(&a), vec![3]);
    n.serve_origin_read(3, 3);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![(2, 11, Opcode::OkReply, Some(4))]
    );
    // A wrong-sized result is an I/O error too.
    assert_eq!(reads(&get(&mut n, 3, 12, 4)), vec![4]);
    n.origin_loaded(4, Ok(Bytes::from_static(b"short")), 4);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![(3, 12, Opcode::ErrReply, None)]
    );
}

#[test]
fn read_ahead_pushes_once_loaded() {
    let (mut n, _origin) = root(2);
    let a = get(&mut n, 1, 10, 0);
    assert_eq!(reads(&a), vec![0]);
    n.serve_origin_read(0, 1);
    let a = drain(&mut n);
    assert_eq!(replies(&a), vec![(1, 10, Opcode::OkReply, Some(1))]);
    assert_eq!(reads(&a), vec![1, 2]);
    n.serve_origin_read(2, 2);
    n.serve_origin_read(1, 2);
    let pushes: Vec<_> = replies(&drain(&mut n))
        .into_iter()
        .map(|(c, _, op, d)| (c, op, d))
        .collect();
    assert_eq!(
        pushes,
        vec![(1, Opcode::Push, Some(3)), (1, Opcode::Push, Some(2))]
    );
    assert_eq!(n.inspect(1, 2).children, vec![(1, Perm::Read)]);
}

/// A read-ahead load of chunk 1 is in flight when a PUT replaces it and
/// another child's GET waits for the writer's recall; the load then brings
/// the old contents, which must not be what that GET gets.
#[test]
fn a_read_overtaken_by_a_write_is_not_served() {
    let (mut n, _origin) = root(1);
    get(&mut n, 1, 10, 0);
    n.serve_origin_read(0, 1);
    assert_eq!(reads(&drain(&mut n)), vec![1]);

    let put = request(IoOp::Put, 11, 1, Perm::Write, Some(chunk_of(0xAA)));
    n.handle_child(2, put, 2);
    // A sync connection's PUT is answered once the origin's fdatasync,
    // run off the node's thread, has completed.
    let a = drain(&mut n);
    assert!(a.contains(&Action::OriginSync), "{a:?}");
    assert_eq!(replies(&a), vec![]);
    n.serve_origin_sync(2);
    let a = drain(&mut n);
    assert_eq!(replies(&a), vec![(2, 11, Opcode::OkReply, None)]);

    // Child 3 reads: child 2 holds WRITE, so it is recalled first.
    let a = get(&mut n, 3, 12, 1);
    let inval = a
        .iter()
        .find_map(|x| match x {
            Action::ToChild(2, m) if m.header.opcode == Opcode::Invalidate => Some(m.header.xid),
            _ => None,
        })
        .expect("INVALIDATE to the writer");

    // The stale read completes now, with what the origin held before.
    n.origin_loaded(1, Ok(chunk_of(2)), 3);
    assert!(
        replies(&drain(&mut n)).is_empty(),
        "no PUSH beside a writer"
    );

    let mut ok = Message::new(Opcode::OkReply, inval);
    ok.params.permissions = Some(Perm::Read);
    n.handle_child(2, ok, 4);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![(3, 12, Opcode::OkReply, Some(0xAA))]
    );
}

fn sync_put(n: &mut Node, child: u64, xid: u32, chunk: u64, byte: u8) -> Vec<Action> {
    let mut m = request(IoOp::Put, xid, chunk, Perm::Write, Some(chunk_of(byte)));
    m.header.flags = m.header.flags.with(canopy_proto::Flags::FORCE_SYNC);
    n.handle_child(child, m, 1);
    drain(n)
}

fn syncs(actions: &[Action]) -> usize {
    actions.iter().filter(|a| **a == Action::OriginSync).count()
}

#[test]
fn sync_writes_share_fdatasyncs() {
    let (mut n, origin) = root(0);
    // The first sync write starts an fdatasync and waits for it.
    let a = sync_put(&mut n, 1, 10, 0, 0xA0);
    assert_eq!(syncs(&a), 1);
    assert_eq!(replies(&a), vec![]);
    // Two more arrive while it runs: written, but not covered by it.
    let a = sync_put(&mut n, 2, 11, 1, 0xA1);
    let b = sync_put(&mut n, 3, 12, 2, 0xA2);
    assert_eq!(
        syncs(&a) + syncs(&b),
        0,
        "one fdatasync in flight at a time"
    );
    assert_eq!(replies(&a).len() + replies(&b).len(), 0);
    assert_eq!(origin.written_chunk(2), vec![0xA2; CHUNK]);

    // The first completes: its writer is answered, and one more fdatasync
    // covers both of the others.
    n.serve_origin_sync(2);
    let a = drain(&mut n);
    assert_eq!(replies(&a), vec![(1, 10, Opcode::OkReply, None)]);
    assert_eq!(syncs(&a), 1);
    n.serve_origin_sync(3);
    let mut r = replies(&drain(&mut n));
    r.sort_unstable_by_key(|(c, x, _, _)| (*c, *x));
    assert_eq!(
        r,
        vec![
            (2, 11, Opcode::OkReply, None),
            (3, 12, Opcode::OkReply, None)
        ]
    );
    assert_eq!(n.stats().origin_syncs, 2);
    assert_eq!(origin.durable_chunk(1), vec![0xA1; CHUNK]);

    // A barrier on a chunk with nothing pending needs no fdatasync.
    let mut barrier = request(IoOp::Flush, 13, 1, Perm::No, None);
    barrier.header.flags = barrier.header.flags.with(canopy_proto::Flags::FORCE_SYNC);
    n.handle_child(2, barrier, 4);
    let a = drain(&mut n);
    assert_eq!(syncs(&a), 0);
    assert_eq!(replies(&a), vec![(2, 13, Opcode::OkReply, None)]);
}

#[test]
fn a_failed_fdatasync_fails_what_it_covered_and_a_barrier_retries() {
    let (mut n, origin) = root(0);
    let a = sync_put(&mut n, 1, 10, 3, 0xB3);
    assert_eq!(syncs(&a), 1);
    n.origin_synced(Err(Status::IoError), 2);
    let a = drain(&mut n);
    assert_eq!(
        replies(&a)
            .into_iter()
            .map(|(c, x, op, _)| (c, x, op))
            .collect::<Vec<_>>(),
        vec![(1, 10, Opcode::ErrReply)]
    );
    assert_ne!(origin.durable_chunk(3), vec![0xB3; CHUNK]);
    // The write is still pending: a FORCE_SYNC barrier makes it durable.
    let mut barrier = request(IoOp::Flush, 11, 3, Perm::No, None);
    barrier.header.flags = barrier.header.flags.with(canopy_proto::Flags::FORCE_SYNC);
    n.handle_child(1, barrier, 3);
    let a = drain(&mut n);
    assert_eq!(syncs(&a), 1);
    n.serve_origin_sync(4);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![(1, 11, Opcode::OkReply, None)]
    );
    assert_eq!(origin.durable_chunk(3), vec![0xB3; CHUNK]);
}

/// Child 4 connects asking for async writes, so its FLUSHes without
/// FORCE_SYNC are answered on arrival.
fn connect_async(n: &mut Node) {
    let mut m = Message::new(Opcode::Connect, 1);
    m.params.volume_name = Some("vol".into());
    m.params.connect_flags = Some(canopy_proto::ConnectFlags::ASYNC_WRITE);
    n.handle_child(4, m, 0);
    drain(n);
}

/// Child 4 PUTs `byte` into `chunk` with FORCE_SYNC, run to completion:
/// afterwards it holds WRITE.
fn put_through(n: &mut Node, chunk: u64, byte: u8) {
    connect_async(n);
    let a = sync_put(n, 4, 90, chunk, byte);
    assert_eq!(syncs(&a), 1);
    n.serve_origin_sync(1);
    assert_eq!(replies(&drain(n)), vec![(4, 90, Opcode::OkReply, None)]);
}

/// Child 4's FLUSH of `byte` into `chunk`, giving WRITE up, without
/// FORCE_SYNC: applied on arrival, answered once the origin has it.
fn flush_from_writer(n: &mut Node, xid: u32, chunk: u64, byte: u8) -> Vec<Action> {
    let m = request(IoOp::Flush, xid, chunk, Perm::No, Some(chunk_of(byte)));
    n.handle_child(4, m, 2);
    drain_raw(n)
}

#[test]
fn writes_run_one_per_chunk_and_reads_wait_for_them() {
    let (mut n, origin) = root(0);
    put_through(&mut n, 4, 0xC3);
    let a = flush_from_writer(&mut n, 10, 4, 0xC4);
    assert_eq!(replies(&a), vec![], "answered once written");
    let writes = |a: &[Action]| -> Vec<u64> {
        a.iter()
            .filter_map(|x| match x {
                Action::OriginWrite { chunk, .. } => Some(*chunk),
                _ => None,
            })
            .collect()
    };
    assert_eq!(writes(&a), vec![4]);
    // Another child reads chunk 4: it waits until the origin has the bytes.
    n.handle_child(2, request(IoOp::Get, 11, 4, Perm::Read, None), 3);
    assert_eq!(
        replies(&drain_raw(&mut n)),
        vec![],
        "the read waits for the write"
    );
    assert_eq!(origin.written_chunk(4), vec![0xC3; CHUNK]);
    n.serve_origin_write(4, &chunk_of(0xC4), 4);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![
            (4, 10, Opcode::OkReply, None),
            (2, 11, Opcode::OkReply, Some(0xC4))
        ]
    );
    assert_eq!(origin.written_chunk(4), vec![0xC4; CHUNK]);
}

#[test]
fn a_failed_write_refuses_its_flush_and_drops_its_bytes() {
    let (mut n, origin) = root(0);
    put_through(&mut n, 5, 0xD4);
    flush_from_writer(&mut n, 10, 5, 0xD5);
    n.origin_written(5, Err(Status::IoError), 3);
    // The FLUSH is refused, so its sender keeps the data (see sync.rs).
    assert_eq!(
        replies(&drain(&mut n))
            .into_iter()
            .map(|(c, x, op, _)| (c, x, op))
            .collect::<Vec<_>>(),
        vec![(4, 10, Opcode::ErrReply)]
    );
    assert!(
        n.inspect(5, 3).data.is_none(),
        "bytes the origin lacks are dropped"
    );
    // Reported once: a later barrier succeeds.
    let mut barrier = request(IoOp::Flush, 11, 5, Perm::No, None);
    barrier.header.flags = barrier.header.flags.with(canopy_proto::Flags::FORCE_SYNC);
    n.handle_child(4, barrier, 4);
    assert_eq!(
        replies(&drain(&mut n)),
        vec![(4, 11, Opcode::OkReply, None)]
    );
    // Readers get what the origin has: the write before the failed one.
    let a = get(&mut n, 2, 13, 5);
    let a = if reads(&a).is_empty() {
        a
    } else {
        n.serve_origin_read(5, 6);
        drain(&mut n)
    };
    assert_eq!(replies(&a), vec![(2, 13, Opcode::OkReply, Some(0xD4))]);
    assert_eq!(origin.written_chunk(5), vec![0xD4; CHUNK]);
}

/// A child that goes while its writes wait behind another request: the
/// one in progress stays, and each queued one is answered (into the void)
/// with an error and never applied. The driver learns from those answers
/// that the writes failed, so their cookies are voided, not left in use.
#[test]
fn a_gone_childs_queued_writes_are_answered_and_not_applied() {
    let (mut n, origin) = root(0);
    // Child 1's read waits for the origin; child 2's two PUTs queue behind.
    let a = get(&mut n, 1, 10, 2);
    assert_eq!(reads(&a), vec![2]);
    for (xid, byte) in [(21, 0xA1), (22, 0xA2)] {
        let put = request(IoOp::Put, xid, 2, Perm::Write, Some(chunk_of(byte)));
        n.handle_child(2, put, 1);
        assert!(replies(&drain(&mut n)).is_empty(), "queued");
    }
    n.child_gone(2, 2);
    let r = replies(&drain(&mut n));
    assert_eq!(
        r,
        vec![
            (2, 21, Opcode::ErrReply, None),
            (2, 22, Opcode::ErrReply, None)
        ]
    );
    // The read goes on; neither write lands.
    let mut buf = vec![0; CHUNK];
    origin.read_chunk(2, &mut buf).unwrap();
    n.origin_loaded(2, Ok(Bytes::from(buf)), 3);
    let r = replies(&drain(&mut n));
    assert_eq!(r, vec![(1, 10, Opcode::OkReply, Some(3))]);
    let mut now = vec![0; CHUNK];
    origin.read_chunk(2, &mut now).unwrap();
    assert_eq!(now, vec![3; CHUNK]);
}
