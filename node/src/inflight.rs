//! The requests a node sent its parent and has not had answered, by XID.

use std::collections::HashMap;

use crate::node::Outstanding;

/// The requests sent up and not yet answered, with a running count of the
/// releases among them: a stopping driver asks for that count after every
/// event, and counting by a walk of thousands of give-backs made a leaf's
/// stop quadratic in its cache (B2 and B4 stopped slowly after reading a
/// volume).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    by_xid: HashMap<u32, Outstanding>,
    releases: usize,
}

fn is_release(o: &Outstanding) -> bool {
    matches!(o, Outstanding::Release { .. })
}

impl InFlight {
    /// Record a request sent under `xid` (replacing one that reused it).
    pub(crate) fn insert(&mut self, xid: u32, what: Outstanding) {
        self.releases += usize::from(is_release(&what));
        if let Some(old) = self.by_xid.insert(xid, what) {
            self.releases -= usize::from(is_release(&old));
        }
    }

    /// The request sent under `xid`, if it is still unanswered.
    pub(crate) fn get(&self, xid: &u32) -> Option<&Outstanding> {
        self.by_xid.get(xid)
    }

    /// Forget the request sent under `xid`, returning it.
    pub(crate) fn remove(&mut self, xid: &u32) -> Option<Outstanding> {
        let old = self.by_xid.remove(xid)?;
        self.releases -= usize::from(is_release(&old));
        Some(old)
    }

    /// Keep only the requests `keep` accepts (a lost link; rare, so the
    /// count is taken again).
    pub(crate) fn retain(&mut self, keep: impl FnMut(&u32, &mut Outstanding) -> bool) {
        self.by_xid.retain(keep);
        self.releases = self.by_xid.values().filter(|o| is_release(o)).count();
    }

    /// Every unanswered request.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Outstanding> {
        self.by_xid.values()
    }

    /// How many of them are releases (give-backs, FLUSHes, FORWARDs and
    /// PUSHes that nothing waits for).
    pub(crate) fn releases(&self) -> usize {
        self.releases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(chunk: u64) -> Outstanding {
        Outstanding::Release {
            chunk,
            carried: false,
        }
    }

    #[test]
    fn the_release_count_follows_every_change() {
        let mut f = InFlight::default();
        f.insert(1, release(1));
        f.insert(2, Outstanding::Connect);
        f.insert(3, release(3));
        assert_eq!(f.releases(), 2);
        // A reused XID replaces its old request, in the count too.
        f.insert(3, Outstanding::Connect);
        assert_eq!(f.releases(), 1);
        f.insert(2, release(2));
        assert_eq!(f.releases(), 2);
        assert!(f.remove(&1).is_some());
        assert!(f.remove(&1).is_none());
        assert_eq!(f.releases(), 1);
        f.insert(4, release(4));
        f.retain(|xid, _| *xid != 2);
        assert_eq!(f.releases(), 1);
        assert_eq!(f.values().count(), 2);
        assert!(matches!(
            f.get(&4),
            Some(Outstanding::Release { chunk: 4, .. })
        ));
    }
}
