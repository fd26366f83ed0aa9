//! A peer's settings, from a TOML file or from the command line.
//!
//! Both map onto one [`PeerConfig`], so a flag and a key can never drift
//! apart: the CLI builds a `PeerConfig` and the daemon only ever reads that.
//!
//! Units, chosen so a value means one thing wherever it is written:
//! - sizes (`chunk_size`, `size`) are an integer number of bytes or a string
//!   with a binary suffix: `4096`, `"64K"`, `"1G"`;
//! - durations (`hb_ttl`, `grant_ttl`, `sync_interval`) are an integer number
//!   of **milliseconds** or a string with a unit: `"500ms"`, `"30s"`, `"5m"`,
//!   `"1h"` (a string without a unit is milliseconds too).
//!
//! Keys that the chosen role would silently ignore (an `origin` on a proxy,
//! a `hb_ttl` on a leaf, which takes its parent's) are refused, so a typo in
//! the role does not leave a half-applied configuration running.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use canopy_origin::size::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a node sits in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    /// Holds the authoritative copy in an origin file; has no parent.
    Root,
    /// Caches and forwards for its children; connects upward on demand.
    Proxy,
    /// Accesses the volume itself (line protocol on stdin); may also serve
    /// children when it listens.
    Leaf,
    /// An untrusted relay run by a third party: holds only the volume's
    /// verifying key, caches and forwards sealed records it can neither
    /// read nor forge, and checks every one it receives.
    Relay,
}

impl PeerRole {
    /// The lowercase name used in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PeerRole::Root => "root",
            PeerRole::Proxy => "proxy",
            PeerRole::Leaf => "leaf",
            PeerRole::Relay => "relay",
        }
    }
}

/// When a local write is acknowledged (DRBD's protocols C, B and A).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteModeSetting {
    /// Once the root holds it durably.
    #[default]
    Sync,
    /// Once the parent holds it.
    SemiSync,
    /// Once this node holds it; the sync daemon sends it up later.
    Async,
}

impl WriteModeSetting {
    /// The node's equivalent.
    pub fn to_node(self) -> canopy_node::WriteMode {
        match self {
            WriteModeSetting::Sync => canopy_node::WriteMode::Sync,
            WriteModeSetting::SemiSync => canopy_node::WriteMode::SemiSync,
            WriteModeSetting::Async => canopy_node::WriteMode::Async,
        }
    }
}

impl FromStr for WriteModeSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(WriteModeSetting::Sync),
            "semi-sync" => Ok(WriteModeSetting::SemiSync),
            "async" => Ok(WriteModeSetting::Async),
            _ => Err(format!(
                "'{s}' is not a write mode (sync, semi-sync, async)"
            )),
        }
    }
}

/// A byte count: an integer, or a string with a binary suffix (`"64K"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<ByteSize>()
            .map(|b| Size(b.0))
            .map_err(|e| e.to_string())
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ByteSize(self.0).fmt(f)
    }
}

/// A disk tier of the cache: `PATH:SIZE`, e.g. `/var/cache/canopy/v.cache:10G`.
/// The file is created when the node learns the chunk size and removed when
/// it stops; a block device is used as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskTier {
    /// The cache file or block device.
    pub path: PathBuf,
    /// Its capacity.
    pub size: Size,
}

impl FromStr for DiskTier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The size comes last, so a path may itself contain ':'.
        let (path, size) = s.rsplit_once(':').ok_or_else(|| {
            format!("'{s}' is not PATH:SIZE (e.g. /var/cache/canopy/v.cache:10G)")
        })?;
        if path.is_empty() {
            return Err(format!("'{s}' has an empty path"));
        }
        Ok(DiskTier {
            path: PathBuf::from(path),
            size: size.parse().map_err(|e| format!("'{s}': {e}"))?,
        })
    }
}

impl fmt::Display for DiskTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.size)
    }
}

impl<'de> Deserialize<'de> for DiskTier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for DiskTier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// An integer or a string, as TOML may give either for a size or duration.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrString::deserialize(d)? {
            IntOrString::Int(n) => Ok(Size(n)),
            IntOrString::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A duration in milliseconds: an integer (milliseconds) or a string with a
/// unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`; no unit means milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!("'{s}' is not a duration (examples: 500ms, 30s, 5m, 1h, or milliseconds as a number)")
        };
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        let scale: u64 = match unit.trim() {
            "" | "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(Millis).ok_or_else(bad)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 && self.0 % 1_000 == 0 {
            write!(f, "{}s", self.0 / 1_000)
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrString::deserialize(d)? {
            IntOrString::Int(n) => Ok(Millis(n)),
            IntOrString::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// Read-ahead of a leaf or proxy when `read_ahead` is not given: 2 MiB,
/// 32 chunks of the default size, as far as a shuffled whole-volume read
/// gains much (hits: 34% of reads at 8 chunks, 44% at 32, 48% at 64). In
/// B2 (depth 8) 42% of the shuffled 64k pattern's reads were served by
/// it; fio through the page cache, B2's peer, has the kernel's readahead.
pub const DEFAULT_READ_AHEAD: u64 = 2 << 20;

/// Everything a peer is told at start; the TOML file's schema.
///
/// Optional keys left out take the defaults documented on each accessor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// `root`, `proxy` or `leaf`.
    pub role: PeerRole,
    /// Name in protocol traces and logs; default: the role's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Address to accept children on (`HOST:PORT`); required for root and
    /// proxy, optional for a leaf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The parent's address (`HOST:PORT`); proxy and leaf only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The volume's name, checked in every CONNECT.
    pub volume: String,
    /// The root's authoritative store: a file or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<PathBuf>,
    /// Chunk size (root only); default 64K.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<Size>,
    /// Volume size (root only). When given, a missing origin file is
    /// created and a shorter one extended; without it the file's size is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    /// The memory tier of a proxy's or leaf's cache, in chunks; default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_chunks: Option<usize>,
    /// The same limit in bytes (proxy, leaf), for operators who size caches
    /// in memory: the node divides it by the chunk size the root announces.
    /// At most one of `cache_mem` and `cache_chunks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_mem: Option<Size>,
    /// Bytes a leaf or proxy reads ahead of a local reader whose reads
    /// follow one another (`canopy_node::Node::local`); default 2M, 0 off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ahead: Option<Size>,
    /// Disk tiers below the memory tier (proxy, leaf), in order:
    /// `["/var/cache/canopy/v.cache:10G"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_disk: Vec<DiskTier>,
    /// Commit the memory tier's RAM when the node first connects, instead
    /// of page by page as chunks arrive (proxy, leaf, relay); default
    /// false. For a host that dedicates the memory: reads never wait for
    /// the kernel to zero a page, and a host short of the memory shows at
    /// start rather than under load later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_prefault: Option<bool>,
    /// How this node's writes are acknowledged (proxy, leaf); default sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_mode: Option<WriteModeSetting>,
    /// Global TTL the root gives its children (root only; the others pass
    /// their parent's down); default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hb_ttl: Option<Millis>,
    /// Lifetime of a grant made by the root (root only); default 1200s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_ttl: Option<Millis>,
    /// How often dirty chunks are sent up (proxy, leaf); default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval: Option<Millis>,
    /// The VOLUME_ID this node gives its children; default: a hash of the
    /// volume name at the root, of name, role and listen address elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<u32>,
    /// Write one line per message sent or received to this file (`-`:
    /// standard output, or standard error for a leaf, whose standard output
    /// carries command replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_protocol: Option<String>,
    /// Chunks to PUSH ahead of a child reading sequentially; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_ahead: Option<u32>,
    /// The volume's trusted key file (`canopy-keys new`), on a volume made
    /// with keys (root, proxy, leaf): chunk data is sealed on every link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<PathBuf>,
    /// The volume's relay file, holding only the verifying key (relay
    /// only, and required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_key: Option<PathBuf>,
    /// With `keys`: where this node records the write cookies it spent
    /// (see `canopy-peerd root --help`); default for a root whose origin
    /// is a regular file: ORIGIN.cookies, else in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<PathBuf>,
    /// Bad records (failed signature or tag) from the parent before it is
    /// counted as failed and the link dropped (proxy, leaf, relay on a
    /// volume with keys); default 3, 0 for never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parent_faults: Option<u32>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (toml's message names the
    /// key and shows the line).
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's error, with line, column and key.
        source: Box<toml::de::Error>,
    },
    /// A key is missing, out of range or does not apply to the role.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file's path, or "command line".
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Milliseconds that must fit in the protocol's 32-bit TTL fields.
fn ttl_u32(key: &str, v: Millis) -> Result<u32, String> {
    match u32::try_from(v.0) {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err(format!("{key} must be greater than zero")),
        Err(_) => Err(format!(
            "{key} = {v} is longer than the protocol's limit of {}ms",
            u32::MAX
        )),
    }
}

/// FNV-1a: a hash that is the same on every build and platform, unlike
/// std's `DefaultHasher`, so a node's default VOLUME_ID survives a restart.
fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for &b in *part {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        // Separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl PeerConfig {
    /// A configuration with only the role and volume set.
    pub fn new(role: PeerRole, volume: &str) -> Self {
        PeerConfig {
            role,
            name: None,
            listen: None,
            parent: None,
            volume: volume.to_string(),
            origin: None,
            chunk_size: None,
            size: None,
            cache_chunks: None,
            cache_mem: None,
            read_ahead: None,
            cache_disk: Vec::new(),
            cache_prefault: None,
            write_mode: None,
            hb_ttl: None,
            grant_ttl: None,
            sync_interval: None,
            volume_id: None,
            trace_protocol: None,
            push_ahead: None,
            keys: None,
            verify_key: None,
            ledger: None,
            max_parent_faults: None,
        }
    }

    /// Parse and validate a TOML document; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: PeerConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Read, parse and validate a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Check that the keys present suit the role; `origin` names the source
    /// (a file path, or "command line") in the error.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.check().map_err(|message| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        })
    }

    fn check(&self) -> Result<(), String> {
        let role = self.role.name();
        let present = |key: &str, set: bool| -> Result<(), String> {
            if set {
                Err(format!("`{key}` does not apply to role = \"{role}\""))
            } else {
                Ok(())
            }
        };
        let required = |key: &str, set: bool| -> Result<(), String> {
            if set {
                Ok(())
            } else {
                Err(format!("role = \"{role}\" needs `{key}`"))
            }
        };
        if self.volume.is_empty() || self.volume.len() > canopy_proto::MAX_VOLUME_NAME {
            return Err(format!(
                "`volume` must be 1 to {} bytes long",
                canopy_proto::MAX_VOLUME_NAME
            ));
        }
        match self.role {
            PeerRole::Root => {
                required("listen", self.listen.is_some())?;
                required("origin", self.origin.is_some())?;
                present("parent", self.parent.is_some())?;
                present("cache_chunks", self.cache_chunks.is_some())?;
                present("cache_mem", self.cache_mem.is_some())?;
                present("read_ahead", self.read_ahead.is_some())?;
                present("cache_disk", !self.cache_disk.is_empty())?;
                present("cache_prefault", self.cache_prefault.is_some())?;
                present("write_mode", self.write_mode.is_some())?;
                present("sync_interval", self.sync_interval.is_some())?;
                present("verify_key", self.verify_key.is_some())?;
                present("max_parent_faults", self.max_parent_faults.is_some())?;
            }
            PeerRole::Proxy | PeerRole::Leaf | PeerRole::Relay => {
                if matches!(self.role, PeerRole::Proxy | PeerRole::Relay) {
                    required("listen", self.listen.is_some())?;
                }
                if self.role == PeerRole::Relay {
                    required("verify_key", self.verify_key.is_some())?;
                    // A relay cannot open or write chunks; it passes writes
                    // on as its children sent them.
                    present("keys", self.keys.is_some())?;
                    present("ledger", self.ledger.is_some())?;
                    present("write_mode", self.write_mode.is_some())?;
                } else {
                    present("verify_key", self.verify_key.is_some())?;
                }
                required("parent", self.parent.is_some())?;
                present("origin", self.origin.is_some())?;
                present("chunk_size", self.chunk_size.is_some())?;
                present("size", self.size.is_some())?;
                present("hb_ttl", self.hb_ttl.is_some())?;
                present("grant_ttl", self.grant_ttl.is_some())?;
            }
        }
        if self.ledger.is_some() && self.keys.is_none() {
            return Err("`ledger` needs `keys`".into());
        }
        if let Some(cs) = self.chunk_size {
            let ok = usize::try_from(cs.0)
                .ok()
                .is_some_and(|n| canopy_origin::check_chunk_size(n).is_ok());
            if !ok {
                return Err(format!(
                    "chunk_size = {cs} must be a power of two between 4K and 1M"
                ));
            }
        }
        if let Some(s) = self.size {
            canopy_origin::check_volume_size(s.0).map_err(|e| format!("size: {e}"))?;
        }
        if self.cache_chunks == Some(0) {
            return Err("cache_chunks must be at least 1".into());
        }
        if self.cache_chunks.is_some() && self.cache_mem.is_some() {
            return Err("give `cache_chunks` or `cache_mem`, not both".into());
        }
        for (i, t) in self.cache_disk.iter().enumerate() {
            // The largest chunk must fit, or the tier could hold nothing.
            if t.size.0 < 1 << 20 {
                return Err(format!("cache_disk {t}: a disk tier needs at least 1M"));
            }
            if self.cache_disk[..i].iter().any(|u| u.path == t.path) {
                return Err(format!("cache_disk: {} is given twice", t.path.display()));
            }
        }
        ttl_u32("hb_ttl", self.hb_ttl())?;
        ttl_u32("grant_ttl", self.grant_ttl())?;
        if self.sync_interval().0 == 0 {
            return Err("sync_interval must be greater than zero".into());
        }
        if self
            .name
            .as_deref()
            .is_some_and(|n| n.is_empty() || n.contains(char::is_whitespace))
        {
            return Err("`name` must be non-empty and without spaces (it is a trace field)".into());
        }
        Ok(())
    }

    /// The node's name in traces and logs.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.role.name().to_string())
    }

    /// Chunk size in bytes (root); default 64K.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size.map_or(64 << 10, |s| s.0)
    }

    /// Global TTL the root hands out; default 30 s (seed 001's example).
    pub fn hb_ttl(&self) -> Millis {
        self.hb_ttl.unwrap_or(Millis(30_000))
    }

    /// Grant lifetime at the root; default 1200 s (seed 001's example).
    pub fn grant_ttl(&self) -> Millis {
        self.grant_ttl.unwrap_or(Millis(1_200_000))
    }

    /// Sync daemon period; default 5 s.
    pub fn sync_interval(&self) -> Millis {
        self.sync_interval.unwrap_or(Millis(5_000))
    }

    /// Write mode; default sync, the one that loses nothing.
    pub fn write_mode(&self) -> WriteModeSetting {
        self.write_mode.unwrap_or_default()
    }

    /// Cache capacity in chunks; default 4096.
    pub fn cache_chunks(&self) -> usize {
        self.cache_chunks.unwrap_or(4096)
    }

    /// The VOLUME_ID this node gives its children.
    ///
    /// The root's default depends only on the volume name, so it is stable
    /// across restarts. Other nodes mix in their role and listen address, so
    /// a proxy's children see a different id than the proxy sees from its
    /// parent: the remapping of seed example 1, which catches a request sent
    /// to the wrong hop.
    pub fn volume_id(&self) -> u32 {
        if let Some(id) = self.volume_id {
            return id;
        }
        match self.role {
            PeerRole::Root => fnv1a(&[self.volume.as_bytes()]),
            _ => fnv1a(&[
                self.volume.as_bytes(),
                self.role.name().as_bytes(),
                self.listen.as_deref().unwrap_or("").as_bytes(),
            ]),
        }
    }

    /// The settings for the sans-IO node.
    pub fn node_config(&self) -> canopy_node::NodeConfig {
        let role = match self.role {
            PeerRole::Root => canopy_node::Role::Root,
            _ => canopy_node::Role::Child,
        };
        let mut c = canopy_node::NodeConfig::new(role, &self.volume, self.volume_id());
        // Validation bounded these to u32; the fallbacks are never used.
        c.grant_ttl_ms = u32::try_from(self.grant_ttl().0).unwrap_or(u32::MAX);
        c.hb_ttl_ms = u32::try_from(self.hb_ttl().0).unwrap_or(u32::MAX);
        c.sync_interval_ms = self.sync_interval().0;
        c.capacity_chunks = self.cache_chunks();
        c.capacity_bytes = self.cache_mem.map(|s| s.0);
        c.read_ahead_bytes = self.read_ahead.map_or(DEFAULT_READ_AHEAD, |s| s.0);
        c.cache_disk = self
            .cache_disk
            .iter()
            .map(|t| (t.path.clone(), t.size.0))
            .collect();
        c.cache_prefault = self.cache_prefault.unwrap_or(false);
        c.write_mode = self.write_mode().to_node();
        if self.role == PeerRole::Relay {
            // Writes are answered once the parent has them: a relay
            // acknowledges nothing itself (`NodeConfig::relay`).
            c.write_mode = canopy_node::WriteMode::SemiSync;
            c.relay = Some(crate::seal::RELAY_OVERHEAD);
        }
        // Seed example 1: a proxy connects upward when its first child needs
        // the volume, not when it starts.
        c.connect_lazily = matches!(self.role, PeerRole::Proxy | PeerRole::Relay);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PeerConfig, ConfigError> {
        PeerConfig::from_toml(s, Path::new("peer.toml"))
    }

    #[test]
    fn full_root_config() {
        let c = parse(
            r#"
            role = "root"
            name = "A"
            listen = "127.0.0.1:7000"
            volume = "vol"
            origin = "/tmp/x.img"
            chunk_size = "4K"
            size = 1048576
            hb_ttl = "30s"
            grant_ttl = 1200000
            volume_id = 7
            trace_protocol = "-"
            push_ahead = 2
            "#,
        )
        .unwrap();
        assert_eq!(c.chunk_size(), 4096);
        assert_eq!(c.size, Some(Size(1 << 20)));
        assert_eq!(c.hb_ttl(), Millis(30_000));
        assert_eq!(c.grant_ttl(), Millis(1_200_000));
        assert_eq!(c.volume_id(), 7);
        assert_eq!(c.name(), "A");
        let n = c.node_config();
        assert_eq!(n.hb_ttl_ms, 30_000);
        assert!(!n.connect_lazily);
    }

    #[test]
    fn read_ahead_defaults_turns_off_and_is_no_roots_business() {
        let leaf = "role = \"leaf\"\nvolume = \"v\"\nparent = \"x:1\"\n";
        let c = parse(leaf).unwrap();
        assert_eq!(c.node_config().read_ahead_bytes, DEFAULT_READ_AHEAD);
        let c = parse(&format!("{leaf}read_ahead = \"4M\"\n")).unwrap();
        assert_eq!(c.node_config().read_ahead_bytes, 4 << 20);
        let c = parse(&format!("{leaf}read_ahead = 0\n")).unwrap();
        assert_eq!(c.node_config().read_ahead_bytes, 0);
        let root = "role = \"root\"\nvolume = \"v\"\nlisten = \"127.0.0.1:1\"\norigin = \"/tmp/x\"\nread_ahead = \"1M\"\n";
        let e = parse(root).and_then(|c| c.validate("test")).unwrap_err();
        assert!(e.to_string().contains("read_ahead"), "{e}");
    }

    #[test]
    fn prefault_is_off_by_default_and_no_roots_business() {
        let leaf = "role = \"leaf\"\nvolume = \"v\"\nparent = \"x:1\"\n";
        assert!(!parse(leaf).unwrap().node_config().cache_prefault);
        let c = parse(&format!("{leaf}cache_prefault = true\n")).unwrap();
        assert!(c.node_config().cache_prefault);
        let root = "role = \"root\"\nvolume = \"v\"\nlisten = \"127.0.0.1:1\"\norigin = \"/tmp/x\"\ncache_prefault = true\n";
        let e = parse(root).and_then(|c| c.validate("test")).unwrap_err();
        assert!(e.to_string().contains("cache_prefault"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("role = \"leaf\"\nvolume = \"v\"\nparent = \"x:1\"\ncache_chunkz = 3\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("peer.toml") && s.contains("cache_chunkz"), "{s}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = parse(
            "role = \"leaf\"\nvolume = \"v\"\nparent = \"x:1\"\nsync_interval = \"5 parsecs\"\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("sync_interval") && s.contains("parsecs"), "{s}");
        let e = parse("role = \"stem\"\nvolume = \"v\"\n").unwrap_err();
        assert!(e.to_string().contains("role"), "{e}");
    }

    #[test]
    fn role_checks() {
        let e = parse("role = \"proxy\"\nvolume = \"v\"\nparent = \"x:1\"\n").unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
        let e = parse("role = \"leaf\"\nvolume = \"v\"\nparent = \"x:1\"\norigin = \"/f\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("`origin` does not apply"), "{e}");
        let e = parse("role = \"root\"\nvolume = \"v\"\nlisten = \"x:1\"\norigin = \"/f\"\nchunk_size = \"3K\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("chunk_size"), "{e}");
        let e = parse("role = \"root\"\nvolume = \"v\"\nlisten = \"x:1\"\norigin = \"/f\"\nhb_ttl = \"2000h\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("hb_ttl"), "{e}");
    }

    #[test]
    fn cache_disk_checks() {
        let base = "role = \"proxy\"\nvolume = \"v\"\nparent = \"x:1\"\nlisten = \"y:2\"\n";
        let c = parse(&format!("{base}cache_disk = [\"/c/t:2G\"]\n")).unwrap();
        assert_eq!(c.cache_disk[0].to_string(), "/c/t:2G");
        for (bad, why) in [
            ("[\"/c/t\"]", "PATH:SIZE"),
            ("[\":2G\"]", "empty path"),
            ("[\"/c/t:2Q\"]", "/c/t:2Q"),
            ("[\"/c/t:64K\"]", "at least 1M"),
            ("[\"/c/t:1G\", \"/c/t:2G\"]", "twice"),
        ] {
            let e = parse(&format!("{base}cache_disk = {bad}\n")).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let e = parse("role = \"root\"\nvolume = \"v\"\nlisten = \"x:1\"\norigin = \"/f\"\ncache_disk = [\"/c:1G\"]\n")
            .unwrap_err();
        assert!(e.to_string().contains("`cache_disk` does not apply"), "{e}");
    }

    #[test]
    fn proxy_remaps_volume_id_and_connects_lazily() {
        let mut root = PeerConfig::new(PeerRole::Root, "vol");
        root.listen = Some("127.0.0.1:1".into());
        let mut proxy = PeerConfig::new(PeerRole::Proxy, "vol");
        proxy.listen = Some("127.0.0.1:2".into());
        assert_ne!(root.volume_id(), proxy.volume_id());
        assert_eq!(
            root.volume_id(),
            PeerConfig::new(PeerRole::Root, "vol").volume_id()
        );
        assert!(proxy.node_config().connect_lazily);
    }

    #[test]
    fn durations() {
        assert_eq!("250".parse(), Ok(Millis(250)));
        assert_eq!("250ms".parse(), Ok(Millis(250)));
        assert_eq!("30s".parse(), Ok(Millis(30_000)));
        assert_eq!("2m".parse(), Ok(Millis(120_000)));
        assert_eq!("1h".parse(), Ok(Millis(3_600_000)));
        assert!("s".parse::<Millis>().is_err());
        assert!("1d".parse::<Millis>().is_err());
        assert_eq!(Millis(30_000).to_string(), "30s");
        assert_eq!(Millis(1_500).to_string(), "1500ms");
    }
}
