//! A child counts its parent as failed when it has heard nothing from it
//! for HB_TTL, not when one HEARTBEAT reply is late: under a bulk transfer
//! the reply can wait behind many chunks in the same stream.

use canopy_node::{Action, Node, NodeConfig, Role};
use canopy_proto::{Message, Opcode, Perm};

const HB: u32 = 30_000;

mod common;

use common::{connected_child, drain_actions as drain};

fn reset(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::ResetParent))
}

/// A connected child; returns it with the parent's VOLUME_ID.
fn child() -> Node {
    connected_child(NodeConfig::new(Role::Child, "vol", 9), HB, 4096, 1 << 20)
}

/// An INVALIDATE of a chunk the child does not hold: any message will do.
fn chatter(n: &mut Node, xid: u32, now: u64) {
    let mut m = Message::new(Opcode::Invalidate, xid);
    m.params.volume_id = Some(5);
    m.params.block_num = Some(3);
    m.params.permissions = Some(Perm::No);
    n.handle_parent(m, now);
}

#[test]
fn any_message_from_the_parent_keeps_it_alive() {
    let mut n = child();
    // Heartbeats go out but are never answered; other messages arrive.
    for (i, now) in (10_000..=90_000).step_by(10_000).enumerate() {
        chatter(&mut n, 100 + i as u32, now - 1);
        n.handle_timeout(now);
        assert!(
            !reset(&drain(&mut n)),
            "reset at {now} although the parent spoke"
        );
    }
    // Then silence: failed once HB_TTL has passed since the last message.
    n.handle_timeout(90_000 + u64::from(HB) - 2);
    assert!(!reset(&drain(&mut n)));
    n.handle_timeout(90_000 + u64::from(HB));
    assert!(reset(&drain(&mut n)), "a silent parent is failed");
}
