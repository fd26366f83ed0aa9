//! A volume created with keys talks only to peers with the same keys
//! (`NodeConfig::volume_key`): CONNECT carries the volume's global identity
//! both ways, and a mismatch, or keys on one side only, is refused with
//! BAD_VERIFIER before any data moves.

mod common;

use canopy_node::{LocalOp, NodeConfig};
use canopy_proto::Status;

use common::{Mem, Tree};

const CHUNK: usize = 32;
common::topology!(A, B: A);

const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];

/// Root A with `root` keys, child B with `child` keys; B's first read.
fn read_through(root: Option<[u8; 32]>, child: Option<[u8; 32]>) -> (Tree, Result<(), Status>) {
    let mut t = Tree::new(NAMES, PARENT, Mem::new(CHUNK, 4), |i, role| {
        let mut cfg = NodeConfig::new(role, "vol", 900);
        cfg.volume_key = if i == A { root } else { child };
        cfg
    })
    .hide_heartbeats();
    t.link_up(B, 0);
    t.deliver_all(1);
    let r = t.run(B, 1, LocalOp::Read { chunk: 0 }, 2).map(|_| ());
    (t, r)
}

#[test]
fn same_keys_connect_and_say_so() {
    let (t, r) = read_through(Some(K1), Some(K1));
    assert_eq!(r, Ok(()));
    let connect = &t.log[0];
    assert!(
        connect.starts_with("B->A CONNECT") && connect.contains("KEY=<32 bytes>"),
        "{connect}"
    );
    let reply = &t.log[1];
    assert!(
        reply.starts_with("A->B OK_REPLY") && reply.contains("KEY=<32 bytes>"),
        "{reply}"
    );
}

#[test]
fn no_keys_on_either_side_is_an_ordinary_volume() {
    let (t, r) = read_through(None, None);
    assert_eq!(r, Ok(()));
    assert!(!t.log[0].contains("KEY="), "{}", t.log[0]);
}

#[test]
fn a_keyed_root_refuses_a_child_without_keys() {
    let (t, r) = read_through(Some(K1), None);
    assert_eq!(r, Err(Status::BadVerifier));
    assert!(
        t.log[1].starts_with("A->B ERR_REPLY") && t.log[1].contains("BAD_VERIFIER"),
        "{}",
        t.log[1]
    );
    assert!(!t.nodes[B].is_ready());
}

#[test]
fn a_keyed_child_refuses_a_parent_without_keys() {
    let (t, r) = read_through(None, Some(K1));
    // The keyless root refuses the keyed child (it would get sealed data
    // it cannot open); either way nothing is served.
    assert_eq!(r, Err(Status::BadVerifier));
    assert!(!t.nodes[B].is_ready());
}

#[test]
fn other_keys_are_refused() {
    let (t, r) = read_through(Some(K1), Some(K2));
    assert_eq!(r, Err(Status::BadVerifier));
    assert!(!t.nodes[B].is_ready());
}

/// A parent that does not check (a keyless build, or a relay lying about
/// the volume) and answers a keyed child's CONNECT without the identity
/// is not joined.
#[test]
fn a_keyed_child_refuses_a_connect_reply_without_its_identity() {
    use canopy_node::{Action, Node, Role};
    use canopy_proto::{Message, Opcode};

    let mut cfg = NodeConfig::new(Role::Child, "vol", 900);
    cfg.volume_key = Some(K1);
    let mut b = Node::new_child(cfg);
    b.parent_up(0);
    let Some(Action::ToParent(connect)) = b.poll_action() else {
        panic!("B sends CONNECT");
    };
    let mut reply = Message::new(Opcode::OkReply, connect.header.xid);
    reply.params.volume_name = Some("vol".into());
    reply.params.volume_id = Some(7);
    reply.params.chunk_size = Some(CHUNK as u32);
    reply.params.volume_size = Some(4 * CHUNK as u64);
    b.handle_parent(reply, 1);
    assert!(!b.is_ready());
}
