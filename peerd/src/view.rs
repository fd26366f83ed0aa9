//! Published reads, as the driver keeps them for threads outside tokio: a
//! ublk leaf's queue threads serve a read whose chunks are all here without
//! waking the node task (see canopy-node's `Action::Publish`).
//!
//! The node task writes it in the order the node's actions come, so a
//! revocation lands before the message or acknowledgement that made it
//! necessary leaves. Readers take a shared lock on one of 64 shards and
//! copy the bytes out: no allocation, and readers never wait for each
//! other, only (briefly) for the node task updating that shard.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;

const SHARDS: usize = 64;

/// One published chunk: its contents and when its grant runs out.
struct Copy {
    data: Bytes,
    until: Option<Instant>,
}

/// Chunks readable without the node. Shared between the node task and
/// reader threads (`Arc<ReadView>`).
pub struct ReadView {
    shards: Box<[RwLock<HashMap<u64, Copy>>]>,
}

impl Default for ReadView {
    fn default() -> Self {
        ReadView {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
}

impl ReadView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, chunk: u64) -> &RwLock<HashMap<u64, Copy>> {
        // Sequential chunks land in different shards.
        &self.shards[(chunk % SHARDS as u64) as usize]
    }

    pub(crate) fn publish(&self, chunk: u64, data: Bytes, until: Option<Instant>) {
        self.shard(chunk)
            .write()
            .insert(chunk, Copy { data, until });
    }

    pub(crate) fn revoke(&self, chunk: u64) {
        self.shard(chunk).write().remove(&chunk);
    }

    /// Forget everything (the driver stops: nobody would revoke any more).
    pub(crate) fn clear(&self) {
        for s in self.shards.iter() {
            s.write().clear();
        }
    }

    /// Copy `buf.len()` bytes of `chunk` from offset `at` into `buf` if the
    /// chunk is published and its grant has not run out. False (and `buf`
    /// unspecified) otherwise: ask the node.
    pub fn read(&self, chunk: u64, at: usize, buf: &mut [u8]) -> bool {
        let shard = self.shard(chunk).read();
        let Some(copy) = shard.get(&chunk) else {
            return false;
        };
        if copy.until.is_some_and(|t| Instant::now() >= t) {
            return false;
        }
        let Some(src) = at
            .checked_add(buf.len())
            .and_then(|end| copy.data.get(at..end))
        else {
            return false;
        };
        buf.copy_from_slice(src);
        true
    }

    /// Chunks published now (for statistics and tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reads_what_is_published_until_revoked_or_expired() {
        let v = ReadView::new();
        let mut buf = [0u8; 4];
        assert!(!v.read(7, 0, &mut buf));
        v.publish(7, Bytes::from_static(b"abcdefgh"), None);
        assert!(v.read(7, 2, &mut buf));
        assert_eq!(&buf, b"cdef");
        assert!(
            !v.read(7, 6, &mut buf),
            "past the end is a miss, not a panic"
        );
        assert!(!v.read(7, usize::MAX, &mut buf));
        v.revoke(7);
        assert!(!v.read(7, 0, &mut buf));
        let past = Instant::now().checked_sub(Duration::from_millis(1));
        v.publish(8, Bytes::from_static(b"abcdefgh"), past);
        assert!(!v.read(8, 0, &mut buf), "an expired grant is not served");
        v.publish(9, Bytes::from_static(b"abcdefgh"), None);
        assert_eq!(v.len(), 2);
        v.clear();
        assert!(v.is_empty());
    }
}
