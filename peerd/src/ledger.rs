//! The spent-cookie ledger of a trusted node that serves children on a
//! volume with keys (issue 4; seed 001 "Untrusted Intermediaries"; DESIGN.md
//! "Cookies").
//!
//! The node issues raw cookies and accepts each one once. Its cookie values
//! carry a tag keyed by a secret of its own, new at every start
//! ([`ISSUER_TAG_LEN`] bytes of a keyed BLAKE3 of the rest), so it accepts
//! only the cookies it issued since it started: one spent here cannot be
//! replayed at another trusted node, whose ledger has never seen it, and
//! one whose write was in flight when the node stopped (applied or not,
//! never recorded) cannot be replayed after the restart. Writers drop their
//! pools when they connect to a parent, so they do not offer old ones.
//!
//! **Persistence.** With a file, every spent cookie (value, expiry, and the
//! hash of the baked cookie it was spent on) survives a restart until the
//! cookie expires, so a retried write is still answered from the reply
//! cache. Safety does not rest on the file: a cookie issued before a
//! restart no longer checks, so nothing is applied twice whatever the file
//! lost. Spends are therefore appended without an fsync each (a process
//! restart keeps them; a host crash may lose the last ones, and their
//! retries then get an error instead of the receipt). [`Issuer::sync`],
//! which the driver calls every minute on a blocking thread and at a
//! clean stop, makes them durable, and compacts the file to its live
//! entries once it has outgrown them by [`COMPACT_SLACK`], so the file
//! stays about the size of the last [`COOKIE_TTL_MS`]'s spends. Without a
//! file a retry across any restart gets that error.
//!
//! **Reply cache.** ed25519 signatures are deterministic, so the receipt of
//! a spent cookie is made again from the same baked cookie: the ledger only
//! keeps the baked cookie's hash, to tell a retry (the same write) from a
//! conflicting use of the same cookie.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use canopy_keys::{BakedCookie, Receipt, TrustedKeys, COOKIE_VALUE_LEN};
use parking_lot::Mutex;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

/// How long a raw cookie is valid after it is issued.
pub const COOKIE_TTL_MS: u64 = 10 * 60 * 1000;

/// Bytes of a cookie value that are the issuer's tag.
pub const ISSUER_TAG_LEN: usize = 8;

/// The ledger file's first bytes.
const MAGIC: &[u8; 8] = b"CNPYLDG1";
/// magic ‖ volume id.
const HEADER_LEN: usize = 8 + 32;
/// value ‖ expiry ‖ baked-cookie hash.
const ENTRY_LEN: usize = COOKIE_VALUE_LEN + 8 + 32;
/// Compact the file once it holds this many entries more than are live
/// (5.6 MB).
pub const COMPACT_SLACK: usize = 100_000;

/// Why a ledger file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file cannot be read, written or synced.
    #[error("cookie ledger {path}: {source}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a ledger, or a ledger for another volume.
    #[error("cookie ledger {path}: {why}")]
    Format {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// What the ledger says of a write's cookie (see [`Issuer::admit`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Unspent: the write may go on; [`Issuer::complete`] spends it.
    Accept,
    /// Spent on this same write: a retry (or a replay). It must not be
    /// applied again; here is its original receipt.
    Retry(Receipt),
    /// In use by this same write, which the node has not answered yet: a
    /// retry that came before the original's answer (its link was lost).
    /// The writer asks again later, and then gets the receipt or learns
    /// that the write failed.
    InProgress,
    /// Spent on another write, voided (its write failed), or in use by
    /// another write not answered yet.
    Spent,
    /// Not a cookie this node issued, or expired.
    Unknown,
}

struct Spent {
    expires_ms: u64,
    baked: [u8; 32],
}

struct State {
    spent: HashMap<[u8; COOKIE_VALUE_LEN], Spent>,
    /// Spent values in the order spent, to drop them once expired.
    order: VecDeque<(u64, [u8; COOKIE_VALUE_LEN])>,
    /// Cookies of writes accepted but not answered yet, with the hash of
    /// the baked cookie each was accepted on.
    pending: HashMap<[u8; COOKIE_VALUE_LEN], [u8; 32]>,
    file: Option<(PathBuf, File)>,
    /// Entries in the file (live or not).
    in_file: usize,
    /// Entries appended to the file since it was opened, and how many of
    /// them a completed fsync covers.
    appended: u64,
    synced: u64,
    /// While a rewrite runs, the entries recorded since its snapshot, for
    /// the new file.
    compacting: Option<Vec<u8>>,
}

/// A rewrite's view of the ledger when it began (see `Issuer::rewrite`).
struct Snapshot {
    /// The new file's bytes: header and live entries.
    bytes: Vec<u8>,
    /// Entries in `bytes`.
    live: usize,
    /// `State::appended` then: the spends the new file's fsync covers.
    covered: u64,
}

/// A trusted node's cookie issuer and spent-cookie ledger.
pub struct Issuer {
    keys: Arc<TrustedKeys>,
    secret: Zeroizing<[u8; 32]>,
    state: Mutex<State>,
    /// Held through a sync or rewrite, so that one runs at a time and an
    /// fsync of the old file never counts for spends that a concurrent
    /// rewrite moved to a new one. The write path never takes it.
    syncing: Mutex<()>,
    /// [`COMPACT_SLACK`]; smaller in tests.
    compact_slack: usize,
}

/// The baked-cookie hash of a voided cookie: no baked cookie hashes to it,
/// so every later use is refused without a receipt.
const VOID: [u8; 32] = [0; 32];

fn baked_hash(b: &BakedCookie) -> [u8; 32] {
    *blake3::hash(&b.encode()).as_bytes()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Issuer {
    /// An issuer whose ledger lives in memory, with a new secret.
    pub fn in_memory(keys: Arc<TrustedKeys>) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut secret[..]);
        Issuer {
            keys,
            secret,
            state: Mutex::new(State {
                spent: HashMap::new(),
                order: VecDeque::new(),
                pending: HashMap::new(),
                file: None,
                in_file: 0,
                appended: 0,
                synced: 0,
                compacting: None,
            }),
            syncing: Mutex::new(()),
            compact_slack: COMPACT_SLACK,
        }
    }

    /// An issuer whose ledger persists in `path`: loaded (its unexpired
    /// entries) if the file exists, created otherwise.
    pub fn open(keys: Arc<TrustedKeys>, path: &Path, now_ms: u64) -> Result<Self, LedgerError> {
        Self::open_with_slack(keys, path, now_ms, COMPACT_SLACK)
    }

    fn open_with_slack(
        keys: Arc<TrustedKeys>,
        path: &Path,
        now_ms: u64,
        slack: usize,
    ) -> Result<Self, LedgerError> {
        let mut issuer = Issuer::in_memory(keys);
        issuer.compact_slack = slack;
        let mut live: Vec<([u8; COOKIE_VALUE_LEN], Spent)> = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(io(path))?;
                let bad = |why| LedgerError::Format {
                    path: path.to_path_buf(),
                    why,
                };
                if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
                    return Err(bad("not a canopy cookie ledger"));
                }
                if bytes[8..40] != issuer.keys.id().0 {
                    return Err(bad("the ledger of another volume"));
                }
                // A torn last entry was never acknowledged: its receipt
                // waits for the fsync.
                for e in bytes[HEADER_LEN..].chunks_exact(ENTRY_LEN) {
                    let mut value = [0u8; COOKIE_VALUE_LEN];
                    value.copy_from_slice(&e[..COOKIE_VALUE_LEN]);
                    let mut exp = [0u8; 8];
                    exp.copy_from_slice(&e[COOKIE_VALUE_LEN..COOKIE_VALUE_LEN + 8]);
                    let mut baked = [0u8; 32];
                    baked.copy_from_slice(&e[COOKIE_VALUE_LEN + 8..]);
                    let expires_ms = u64::from_le_bytes(exp);
                    if expires_ms > now_ms {
                        live.push((value, Spent { expires_ms, baked }));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        {
            let mut st = issuer.state.lock();
            for (value, s) in live {
                st.order.push_back((s.expires_ms, value));
                st.spent.insert(value, s);
            }
            st.order.make_contiguous().sort_unstable();
        }
        {
            let _one = issuer.syncing.lock();
            issuer.rewrite(path)?;
        }
        Ok(issuer)
    }

    /// Write the ledger afresh (header and live entries) beside `path`,
    /// fsync it and move it into place: at start, and to compact.
    ///
    /// Only the snapshot and the swap hold the state lock; the write and
    /// the fsyncs run outside it, so that a compaction of a large ledger
    /// does not stall every write's admission. Spends recorded meanwhile
    /// go to the old file as usual and are also kept aside (`compacting`),
    /// to be appended to the new file at the swap. Callers hold
    /// `self.syncing`, so no other sync or rewrite runs meanwhile.
    fn rewrite(&self, path: &Path) -> Result<(), LedgerError> {
        let snap = self.snapshot();
        let tmp = path.with_extension("tmp");
        let written = write_synced(&tmp, &snap.bytes);
        self.swap(path, &tmp, &snap, written)
    }

    /// The live entries as a new file's bytes; from now on `record` also
    /// keeps what it appends, for [`Issuer::swap`].
    fn snapshot(&self) -> Snapshot {
        let mut st = self.state.lock();
        let mut bytes = Vec::with_capacity(HEADER_LEN + st.spent.len() * ENTRY_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.keys.id().0);
        for (value, s) in &st.spent {
            bytes.extend_from_slice(&entry(value, s.expires_ms, &s.baked));
        }
        st.compacting = Some(Vec::new());
        Snapshot {
            bytes,
            live: st.spent.len(),
            covered: st.appended,
        }
    }

    /// Put the new file `tmp` (`written`: the snapshot, fsynced) in place
    /// of `path`, with the spends recorded since the snapshot appended.
    fn swap(
        &self,
        path: &Path,
        tmp: &Path,
        snap: &Snapshot,
        written: Result<File, LedgerError>,
    ) -> Result<(), LedgerError> {
        let mut st = self.state.lock();
        let extra = st.compacting.take().unwrap_or_default();
        // On failure the old file stays in use: it holds every entry.
        let mut f = written?;
        // The few spends made during the write: written, not yet synced,
        // like any other append.
        f.write_all(&extra).map_err(io(tmp))?;
        fs::rename(tmp, path).map_err(io(path))?;
        st.in_file = snap.live + extra.len() / ENTRY_LEN;
        st.file = Some((path.to_path_buf(), f));
        drop(st);
        // Until the directory is synced a crash may bring back the old
        // file, which lacks the unsynced tail of what the new one holds.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        let mut st = self.state.lock();
        st.synced = st.synced.max(snap.covered);
        Ok(())
    }

    fn tag(&self, head: &[u8]) -> [u8; ISSUER_TAG_LEN] {
        let h = blake3::keyed_hash(&self.secret, head);
        let mut t = [0u8; ISSUER_TAG_LEN];
        t.copy_from_slice(&h.as_bytes()[..ISSUER_TAG_LEN]);
        t
    }

    /// `n` fresh sealed cookies, one after another, valid until
    /// `now_ms` + [`COOKIE_TTL_MS`].
    pub fn issue(&self, n: usize, now_ms: u64) -> Bytes {
        let expires = now_ms.saturating_add(COOKIE_TTL_MS);
        let mut out = BytesMut::with_capacity(n * canopy_keys::SEALED_COOKIE_LEN);
        let head_len = COOKIE_VALUE_LEN - ISSUER_TAG_LEN;
        for _ in 0..n {
            let mut value = Zeroizing::new([0u8; COOKIE_VALUE_LEN]);
            OsRng.fill_bytes(&mut value[..head_len]);
            let mut tagged = [0u8; COOKIE_VALUE_LEN];
            tagged[..head_len].copy_from_slice(&value[..head_len]);
            let tag = self.tag(&tag_input(&value[..head_len], expires));
            tagged[head_len..].copy_from_slice(&tag);
            value.copy_from_slice(&tagged);
            out.extend_from_slice(self.keys.issue_cookie_value(&value, expires).as_bytes());
        }
        out.freeze()
    }

    /// Whether this node issued `b`'s cookie (its tag checks), and it has
    /// not expired.
    fn issued_here(&self, b: &BakedCookie, now_ms: u64) -> bool {
        let head_len = COOKIE_VALUE_LEN - ISSUER_TAG_LEN;
        let tag = self.tag(&tag_input(&b.value[..head_len], b.expires_ms));
        b.expires_ms > now_ms && tag[..] == b.value[head_len..]
    }

    /// Look up a write's (already verified) baked cookie. `Accept` marks it
    /// in use until [`Issuer::complete`].
    pub fn admit(&self, b: &BakedCookie, now_ms: u64) -> Admit {
        let hash = baked_hash(b);
        let mut st = self.state.lock();
        if let Some(s) = st.spent.get(&b.value) {
            return if s.baked == hash {
                Admit::Retry(self.keys.burn(b))
            } else {
                Admit::Spent
            };
        }
        if let Some(p) = st.pending.get(&b.value) {
            return if *p == hash {
                Admit::InProgress
            } else {
                Admit::Spent
            };
        }
        if !self.issued_here(b, now_ms) {
            return Admit::Unknown;
        }
        st.pending.insert(b.value, hash);
        Admit::Accept
    }

    /// The write `b` authorised is answered (also when the link it came on
    /// has closed meanwhile: the driver passes every answer here): spend
    /// its cookie, with the receipt if it succeeded. A failed write's
    /// cookie is voided, not freed: a relay that kept the write must not
    /// get it applied later, so the writer writes again with a new cookie.
    /// The spend is on disk only after [`Issuer::sync`].
    pub fn complete(&self, b: &BakedCookie, ok: bool, now_ms: u64) -> Option<Receipt> {
        let hash = if ok { baked_hash(b) } else { VOID };
        let recorded = self.record(b.value, b.expires_ms, hash, now_ms);
        (recorded && ok).then(|| self.keys.burn(b))
    }

    /// Record `value` as spent on the baked cookie with hash `hash`; false
    /// if it could not be written down.
    fn record(
        &self,
        value: [u8; COOKIE_VALUE_LEN],
        expires_ms: u64,
        hash: [u8; 32],
        now_ms: u64,
    ) -> bool {
        let mut st = self.state.lock();
        st.pending.remove(&value);
        st.spent.insert(
            value,
            Spent {
                expires_ms,
                baked: hash,
            },
        );
        st.order.push_back((expires_ms, value));
        // Expired entries go: their cookies are refused as expired anyway.
        while st.order.front().is_some_and(|(exp, _)| *exp <= now_ms) {
            if let Some((_, v)) = st.order.pop_front() {
                if st.spent.get(&v).is_some_and(|s| s.expires_ms <= now_ms) {
                    st.spent.remove(&v);
                }
            }
        }
        let e = entry(&value, expires_ms, &hash);
        if let Some(c) = &mut st.compacting {
            c.extend_from_slice(&e);
        }
        if let Some((path, f)) = &mut st.file {
            if let Err(err) = f.write_all(&e) {
                // No receipt for a spend we could not record: the writer
                // gets an error and retries with another cookie.
                tracing::error!(ledger = %path.display(), error = %err, "cannot record a spent cookie");
                return false;
            }
            st.in_file += 1;
            st.appended += 1;
        }
        true
    }

    /// Make every spend so far durable. Compacts the file when it has
    /// grown well past the live set. The driver calls it every
    /// `LEDGER_SYNC` on a blocking thread, and at a clean stop.
    pub fn sync(&self) -> Result<(), LedgerError> {
        let _one = self.syncing.lock();
        // The fsync runs on a duplicate of the file's descriptor, outside
        // the lock, so that writes keep being admitted meanwhile. Each
        // caller's fsync covers the spends appended when it began
        // (`appended` then), and `synced` never counts one still running.
        let (path, file, target, compact) = {
            let st = self.state.lock();
            if st.synced >= st.appended {
                return Ok(());
            }
            let Some((path, f)) = &st.file else {
                return Ok(());
            };
            let compact = st.in_file > st.spent.len() + self.compact_slack;
            let file = f.try_clone().map_err(io(path))?;
            (path.clone(), file, st.appended, compact)
        };
        file.sync_data().map_err(io(&path))?;
        {
            let mut st = self.state.lock();
            st.synced = st.synced.max(target);
        }
        if compact {
            self.rewrite(&path)?;
        }
        Ok(())
    }

    /// Spent cookies remembered (unexpired).
    pub fn spent_len(&self) -> usize {
        self.state.lock().spent.len()
    }
}

/// One ledger entry: value ‖ expiry ‖ baked-cookie hash.
fn entry(value: &[u8; COOKIE_VALUE_LEN], expires_ms: u64, baked: &[u8; 32]) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[..COOKIE_VALUE_LEN].copy_from_slice(value);
    e[COOKIE_VALUE_LEN..COOKIE_VALUE_LEN + 8].copy_from_slice(&expires_ms.to_le_bytes());
    e[COOKIE_VALUE_LEN + 8..].copy_from_slice(baked);
    e
}

/// Create `path` (mode 0600) holding `bytes`, fsynced; the file is left
/// open for writing at its end.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<File, LedgerError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    set_private(&f, path)?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(f)
}

fn tag_input(head: &[u8], expires_ms: u64) -> [u8; COOKIE_VALUE_LEN] {
    let mut t = [0u8; COOKIE_VALUE_LEN];
    let n = head.len().min(COOKIE_VALUE_LEN - 8);
    t[..n].copy_from_slice(&head[..n]);
    t[COOKIE_VALUE_LEN - 8..].copy_from_slice(&expires_ms.to_le_bytes());
    t
}

/// The ledger holds which cookies were spent: others must not read it.
fn set_private(f: &File, path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_keys::SealedCookie;

    const NOW: u64 = 1_000_000;

    fn keys() -> Arc<TrustedKeys> {
        Arc::new(TrustedKeys::generate("vol").expect("keys"))
    }

    fn baked(i: &Issuer, k: &TrustedKeys, data: &[u8]) -> BakedCookie {
        let sealed = i.issue(1, NOW);
        let raw = k
            .open_cookie(&SealedCookie::from_bytes(&sealed).expect("len"))
            .expect("opens");
        let rec = k.seal(3, 9, data);
        k.bake(&raw, &rec)
    }

    #[test]
    fn a_cookie_is_spent_once_and_a_retry_gets_the_same_receipt() {
        let k = keys();
        let i = Issuer::in_memory(k.clone());
        let b = baked(&i, &k, b"one");
        assert_eq!(i.admit(&b, NOW), Admit::Accept);
        // A retry before the answer waits for it; another write with the
        // same cookie is refused.
        assert_eq!(i.admit(&b, NOW), Admit::InProgress, "in use until answered");
        let mut other = b.clone();
        other.digest = [1; 32];
        assert_eq!(i.admit(&other, NOW), Admit::Spent);
        let r = i.complete(&b, true, NOW).expect("receipt");
        k.verifier().verify_receipt(&b, &r).expect("valid");
        assert_eq!(i.admit(&b, NOW), Admit::Retry(r));
        // The same cookie baked for other data is refused.
        assert_eq!(i.admit(&other, NOW), Admit::Spent);
    }

    #[test]
    fn a_failed_write_voids_its_cookie() {
        let k = keys();
        let i = Issuer::in_memory(k.clone());
        let b = baked(&i, &k, b"x");
        assert_eq!(i.admit(&b, NOW), Admit::Accept);
        assert!(i.complete(&b, false, NOW).is_none());
        assert_eq!(i.admit(&b, NOW), Admit::Spent, "no receipt, not again");
    }

    #[test]
    fn another_issuers_or_expired_cookies_are_unknown() {
        let k = keys();
        let a = Issuer::in_memory(k.clone());
        let b = Issuer::in_memory(k.clone());
        let c = baked(&a, &k, b"x");
        assert_eq!(b.admit(&c, NOW), Admit::Unknown);
        assert_eq!(a.admit(&c, NOW + COOKIE_TTL_MS), Admit::Unknown);
        let mut forged = c.clone();
        forged.expires_ms += 1;
        assert_eq!(a.admit(&forged, NOW), Admit::Unknown, "tag binds expiry");
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vol.cookies");
        let k = keys();
        let (spent, unspent, receipt) = {
            let i = Issuer::open(k.clone(), &path, NOW).expect("new ledger");
            let spent = baked(&i, &k, b"a");
            let unspent = baked(&i, &k, b"b");
            assert_eq!(i.admit(&spent, NOW), Admit::Accept);
            let r = i.complete(&spent, true, NOW).expect("receipt");
            i.sync().expect("sync");
            (spent, unspent, r)
        };
        let i = Issuer::open(k.clone(), &path, NOW + 1).expect("reopens");
        assert_eq!(i.admit(&spent, NOW + 1), Admit::Retry(receipt));
        // Issued before the restart and not recorded (its write may have
        // been in flight): never accepted after it.
        assert_eq!(i.admit(&unspent, NOW + 1), Admit::Unknown);
        // Past the cookie's expiry the entry is gone, and the cookie dead.
        let later = NOW + COOKIE_TTL_MS + 1;
        let i = Issuer::open(k.clone(), &path, later).expect("reopens");
        assert_eq!(i.spent_len(), 0);
        assert_eq!(i.admit(&spent, later), Admit::Unknown);
        let mode = fs::metadata(&path).expect("meta").permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_torn_last_entry_is_ignored_and_other_files_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vol.cookies");
        let k = keys();
        drop(Issuer::open(k.clone(), &path, NOW).expect("new"));
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[1; ENTRY_LEN - 3]).expect("write");
        drop(f);
        assert_eq!(
            Issuer::open(k.clone(), &path, NOW)
                .expect("opens")
                .spent_len(),
            0
        );
        let other = Arc::new(TrustedKeys::generate("other").expect("keys"));
        assert!(matches!(
            Issuer::open(other, &path, NOW),
            Err(LedgerError::Format { .. })
        ));
        fs::write(&path, b"garbage").expect("write");
        assert!(matches!(
            Issuer::open(k, &path, NOW),
            Err(LedgerError::Format { .. })
        ));
    }

    fn value(i: u64) -> [u8; COOKIE_VALUE_LEN] {
        let mut v = [0u8; COOKIE_VALUE_LEN];
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    }

    fn file_entries(path: &Path) -> usize {
        let len = fs::metadata(path).expect("meta").len() as usize;
        (len - HEADER_LEN) / ENTRY_LEN
    }

    #[test]
    fn a_running_ledger_is_compacted_by_sync() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vol.cookies");
        let k = keys();
        let i = Issuer::open_with_slack(k.clone(), &path, NOW, 50).expect("ledger");
        // 100 spends that expire, then one that does not: that record
        // drops the expired ones from memory, not from the file.
        for n in 0..100 {
            assert!(i.record(value(n), NOW + 10, [1; 32], NOW));
        }
        assert!(i.record(value(1000), NOW + COOKIE_TTL_MS, [2; 32], NOW + 20));
        assert_eq!(i.spent_len(), 1);
        assert_eq!(file_entries(&path), 101);
        i.sync().expect("sync");
        assert_eq!(file_entries(&path), 1, "compacted to the live set");
        // The new file takes further spends, and a restart finds them.
        assert!(i.record(value(1001), NOW + COOKIE_TTL_MS, [3; 32], NOW + 20));
        i.sync().expect("sync");
        drop(i);
        assert_eq!(file_entries(&path), 2);
        let i = Issuer::open(k, &path, NOW + 20).expect("reopens");
        assert_eq!(i.spent_len(), 2);
    }

    /// Spends recorded while a compaction writes its new file are neither
    /// lost nor reordered: they go to the old file and, at the swap, to
    /// the new one; a restart finds each value with its last hash.
    #[test]
    fn spends_during_a_compaction_survive_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vol.cookies");
        let k = keys();
        let i = Issuer::open(k.clone(), &path, NOW).expect("ledger");
        let exp = NOW + COOKIE_TTL_MS;
        for n in 0..10 {
            assert!(i.record(value(n), exp, [1; 32], NOW));
        }
        // A compaction begins; while its file is written, spends go on:
        // new values, and a value of the snapshot spent again.
        let snap = i.snapshot();
        let tmp = path.with_extension("tmp");
        let written = write_synced(&tmp, &snap.bytes);
        assert!(i.record(value(3), exp, [2; 32], NOW));
        for n in 10..15 {
            assert!(i.record(value(n), exp, [3; 32], NOW));
        }
        i.swap(&path, &tmp, &snap, written).expect("swap");
        assert_eq!(file_entries(&path), 16);
        // And after it, into the new file.
        assert!(i.record(value(15), exp, [4; 32], NOW));
        i.sync().expect("sync");
        drop(i);
        let i = Issuer::open(k, &path, NOW).expect("reopens");
        let st = i.state.lock();
        assert_eq!(st.spent.len(), 16);
        for n in 0..16 {
            let want = match n {
                3 => [2; 32],
                0..=9 => [1; 32],
                10..=14 => [3; 32],
                _ => [4; 32],
            };
            assert_eq!(
                st.spent.get(&value(n)).map(|s| s.baked),
                Some(want),
                "value {n}"
            );
        }
    }

    /// A compaction whose new file cannot be written leaves the old one
    /// in use, with every spend.
    #[test]
    fn a_failed_compaction_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vol.cookies");
        let k = keys();
        let i = Issuer::open(k.clone(), &path, NOW).expect("ledger");
        let exp = NOW + COOKIE_TTL_MS;
        assert!(i.record(value(1), exp, [1; 32], NOW));
        let snap = i.snapshot();
        let tmp = dir.path().join("missing").join("vol.tmp");
        let written = write_synced(&tmp, &snap.bytes);
        assert!(written.is_err());
        assert!(i.record(value(2), exp, [2; 32], NOW));
        assert!(i.swap(&path, &tmp, &snap, written).is_err());
        assert!(i.record(value(3), exp, [3; 32], NOW));
        i.sync().expect("sync");
        drop(i);
        assert_eq!(Issuer::open(k, &path, NOW).expect("reopens").spent_len(), 3);
    }

    /// What a sequence of writers, a replaying relay and restarts can do
    /// to a ledger on a file: each cookie is accepted at most once, a
    /// receipt comes only for a write that succeeded (and always the same
    /// one), a retry of a write not answered yet is told to wait (also
    /// after its link closed: the answer still comes), and a failed
    /// write's cookie is never accepted again.
    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            /// A writer takes a fresh cookie and sends a write with it.
            Write,
            /// The node answers write `i` (ok or not).
            Answer(usize, bool),
            /// A relay sends write `i` again, as captured.
            Replay(usize),
            /// The same cookie baked for other data.
            Reuse(usize),
            /// The node restarts (its ledger reloads from the file).
            Restart,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Write),
                3 => (0..16usize, any::<bool>()).prop_map(|(i, ok)| Op::Answer(i, ok)),
                3 => (0..16usize).prop_map(Op::Replay),
                1 => (0..16usize).prop_map(Op::Reuse),
                1 => Just(Op::Restart),
            ]
        }

        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        enum Fate {
            InFlight,
            Done,
            Failed,
            Lost,
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn cookies_are_spent_once(ops in proptest::collection::vec(op(), 1..60)) {
                let dir = tempfile::tempdir().expect("tmp");
                let path = dir.path().join("vol.cookies");
                let k = keys();
                let mut i = Issuer::open(k.clone(), &path, NOW).expect("ledger");
                let mut writes: Vec<(BakedCookie, Fate, Option<Receipt>)> = Vec::new();
                for (n, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Write => {
                            let b = baked(&i, &k, &n.to_le_bytes());
                            prop_assert_eq!(i.admit(&b, NOW), Admit::Accept);
                            writes.push((b, Fate::InFlight, None));
                        }
                        Op::Answer(w, ok) => {
                            let Some((b, fate, receipt)) = writes.get_mut(w) else { continue };
                            if *fate != Fate::InFlight { continue; }
                            let r = i.complete(b, ok, NOW);
                            prop_assert_eq!(r.is_some(), ok);
                            if let Some(r) = &r {
                                prop_assert!(k.verifier().verify_receipt(b, r).is_ok());
                            }
                            *fate = if ok { Fate::Done } else { Fate::Failed };
                            *receipt = r;
                            i.sync().expect("sync");
                        }
                        Op::Replay(w) => {
                            let Some((b, fate, receipt)) = writes.get(w) else { continue };
                            let got = i.admit(b, NOW);
                            match fate {
                                Fate::Done => prop_assert_eq!(got, Admit::Retry(receipt.clone().expect("receipt"))),
                                Fate::InFlight => prop_assert_eq!(got, Admit::InProgress),
                                // Never applied again (Unknown: in flight
                                // at a restart).
                                _ => prop_assert!(matches!(got, Admit::Spent | Admit::Unknown), "{:?}", got),
                            }
                        }
                        Op::Reuse(w) => {
                            let Some((b, _, _)) = writes.get(w) else { continue };
                            let rec = k.seal(b.chunk, b.version, b"other data");
                            let raw = canopy_keys::RawCookie { value: b.value, expires_ms: b.expires_ms };
                            let other = k.bake(&raw, &rec);
                            let got = i.admit(&other, NOW);
                            prop_assert!(matches!(got, Admit::Spent | Admit::Unknown), "{:?}", got);
                        }
                        Op::Restart => {
                            drop(i);
                            i = Issuer::open(k.clone(), &path, NOW).expect("reopen");
                            // A write in flight at the restart was never
                            // answered, nor recorded.
                            for (_, fate, _) in writes.iter_mut() {
                                if *fate == Fate::InFlight {
                                    *fate = Fate::Lost;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
