//! The daemon's own mount namespace.
//!
//! A ublk daemon that shares a mount namespace with a filesystem mounted on
//! its own device can deadlock on exit (libublk-rs issue 50): the exit path
//! may flush that filesystem, which needs the daemon. So the daemon gets a
//! private namespace, and drops from it any mount of a ublk device.

/// Put the daemon in its own mount namespace with private propagation, and
/// detach ublk mounts there. Must run before any thread is spawned, since
/// unshare affects only the calling thread.
pub fn isolate() {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    if let Err(e) = unshare(CloneFlags::CLONE_NEWNS) {
        tracing::warn!(error = %e, "could not unshare the mount namespace");
        return;
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        tracing::warn!(error = %e, "could not make mounts private in the daemon's namespace");
        return;
    }
    // The new namespace starts as a copy, including any filesystem already
    // mounted on a ublk device (always the case for `recover` under a
    // mounted volume). Holding such a copy would keep that filesystem alive
    // after the operator unmounts it, and could deadlock our exit; detach
    // them here, where propagation is private and the host never sees it.
    for target in ublk_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
    {
        if let Err(e) = nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(%target, error = %e, "could not detach a ublk mount in the daemon's namespace");
        }
    }
}

/// Mount points (deepest first) whose source is a ublk block device, from
/// the text of `/proc/self/mountinfo`.
pub fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    let mut found: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (pre, post) = line.split_once(" - ")?;
            let source = post.split_whitespace().nth(1)?;
            let target = pre.split_whitespace().nth(4)?;
            source
                .starts_with("/dev/ublkb")
                .then(|| unescape_mountinfo(target))
        })
        .collect();
    found.reverse();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_deepest_first() {
        let info = "\
22 1 0:21 / /proc rw - proc proc rw
40 1 259:0 / /mnt/c rw,relatime shared:1 - ext4 /dev/ublkb0 rw
41 40 259:1 / /mnt/c/inner\\040dir rw - xfs /dev/ublkb1 rw
42 1 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw
";
        assert_eq!(ublk_mounts(info), vec!["/mnt/c/inner dir", "/mnt/c"]);
        assert!(ublk_mounts("garbage line\n\n").is_empty());
    }
}
