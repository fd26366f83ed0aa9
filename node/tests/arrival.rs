//! A chunk that arrives for a waiting local read answers it with the bytes
//! that came (no copy out of the cache), while a published copy, which
//! outlives the event, gets bytes of its own: the arrived bytes may be a
//! slice of a link's whole read buffer.

use bytes::Bytes;
use canopy_node::{Action, LocalId, LocalOp, LocalReply, NodeConfig, Role};
use canopy_proto::{IoOp, Message, Opcode, Perm};

const CHUNK: u32 = 4096;

mod common;

use common::{connected_child, drain_actions as drain};

#[test]
fn an_arrived_chunk_answers_its_reader_and_is_published_apart() {
    let mut cfg = NodeConfig::new(Role::Child, "vol", 9);
    cfg.publish_reads = true;
    let mut n = connected_child(cfg, 30_000, CHUNK, 16 * u64::from(CHUNK));

    n.local(LocalId(1), LocalOp::Read { chunk: 3 }, 1);
    let xid = drain(&mut n)
        .into_iter()
        .find_map(|a| match a {
            Action::ToParent(m) if m.params.io_op == Some(IoOp::Get) => Some(m.header.xid),
            _ => None,
        })
        .expect("GET");
    // The chunk arrives as a slice of a bigger buffer, as from a socket.
    let buffer = Bytes::from(vec![7u8; 3 * CHUNK as usize]);
    let data = buffer.slice(CHUNK as usize..2 * CHUNK as usize);
    let mut m = Message::new(Opcode::OkReply, xid);
    m.params.volume_id = Some(5);
    m.params.block_num = Some(3);
    m.params.permissions = Some(Perm::Read);
    m.params.ttl_ms = Some(60_000);
    m.params.version = Some(1);
    m.params.data = Some(data.clone());
    n.handle_parent(m, 2);
    let actions = drain(&mut n);
    let answered = actions.iter().find_map(|a| match a {
        Action::LocalDone(LocalId(1), Ok(LocalReply::Data(d))) => Some(d.clone()),
        _ => None,
    });
    let published = actions.iter().find_map(|a| match a {
        Action::Publish { chunk: 3, data, .. } => Some(data.clone()),
        _ => None,
    });
    let answered = answered.expect("the read is answered");
    let published = published.expect("the read is published");
    assert_eq!(answered, data);
    assert_eq!(
        answered.as_ptr(),
        data.as_ptr(),
        "answered with the bytes that came"
    );
    assert_eq!(published, data);
    assert_ne!(
        published.as_ptr(),
        data.as_ptr(),
        "published apart from the buffer"
    );
    // A later read is served from the cache, with the same contents.
    n.local(LocalId(2), LocalOp::Read { chunk: 3 }, 3);
    let again = drain(&mut n).into_iter().find_map(|a| match a {
        Action::LocalDone(LocalId(2), Ok(LocalReply::Data(d))) => Some(d),
        _ => None,
    });
    assert_eq!(again.expect("served"), data);
}
