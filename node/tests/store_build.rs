//! Building a child's cache stack when the parent announces the chunk
//! size (`Node::build_store`): as configured, or with less cache rather
//! than none when the configuration cannot be built.

use canopy_node::{Node, NodeConfig, Role};

const CHUNK: u32 = 4096;

mod common;

use common::connected_child;

/// A connected child with a memory tier of 64 chunks, committed up front
/// if `prefault`, and the given disk tiers.
fn child(prefault: bool, disks: Vec<(std::path::PathBuf, u64)>) -> Node {
    let mut cfg = NodeConfig::new(Role::Child, "vol", 9);
    cfg.capacity_chunks = 64;
    cfg.cache_prefault = prefault;
    cfg.cache_disk = disks;
    connected_child(cfg, 30_000, CHUNK, 256 * u64::from(CHUNK))
}

/// The media of the child's tiers, top first.
fn media(n: &Node) -> Vec<String> {
    let stats = n.cache_stats().expect("a stack was built");
    stats.tiers.iter().map(|t| t.medium.clone()).collect()
}

#[test]
fn a_prefaulted_stack_is_built_as_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = child(true, vec![(dir.path().join("t.cache"), 1 << 20)]);
    assert_eq!(media(&n), ["memory", "disk"]);
    let stats = n.cache_stats().expect("stack");
    let top = &stats.tiers[0];
    assert_eq!(top.groups * top.ways, 64, "the configured capacity");
}

#[test]
fn a_stack_that_cannot_be_built_as_configured_falls_back_to_memory() {
    // A disk tier in a directory that does not exist: neither the stack
    // as configured nor the one without committed memory can be built;
    // the memory tier alone serves, uncommitted.
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-dir").join("t.cache");
    for prefault in [true, false] {
        let n = child(prefault, vec![(missing.clone(), 1 << 20)]);
        assert_eq!(media(&n), ["memory"], "prefault {prefault}");
    }
}
