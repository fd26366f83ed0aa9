//! What the in-process tree tests share: bounded waits, starting a peer,
//! its address, test data. Cargo builds this into every test that says
//! `mod common;`, not as a test of its own.

// Each test uses only part of it.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use canopy_peerd::config::PeerConfig;
use canopy_peerd::{start_peer, Peer};

/// Run `f`, failing the test if it takes more than 20 s: a protocol hang
/// fails instead of hanging CI. Nothing asserts on elapsed time.
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(20), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Start a peer from a valid `cfg` and wait until it is ready.
pub async fn start(cfg: PeerConfig) -> Peer {
    cfg.validate("test").expect("valid config");
    let peer = start_peer(&cfg).await.expect("peer starts");
    within("ready", peer.ready()).await.expect("peer ready");
    peer
}

/// The address a listening peer accepts children on.
pub fn addr(p: &Peer) -> String {
    p.local_addr().expect("peer listens").to_string()
}

/// `len` bytes counting up from `seed`.
pub fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add(i as u8))
            .collect::<Vec<u8>>(),
    )
}
