//! `canopy-ublk add --config FILE`: the same settings as the flags, from TOML.
//!
//! The file is turned back into `add`'s own arguments and parsed by clap, so
//! a value is checked by exactly the code that checks the flag, and the
//! defaults stay in one place. serde rejects unknown keys with the key's name
//! and line, which a typo in a systemd unit's config deserves.

use std::path::Path;

use serde::Deserialize;

/// A number or a size string ("64K"): TOML users write either.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Value {
    Text(String),
    Number(u64),
}

impl Value {
    fn arg(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Number(n) => n.to_string(),
        }
    }
}

/// The keys: `add`'s long options with `_` for `-`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct AddConfig {
    origin: Option<String>,
    parent: Option<String>,
    volume: Option<String>,
    write_mode: Option<String>,
    listen: Option<String>,
    trace_protocol: Option<String>,
    keys: Option<String>,
    max_parent_faults: Option<u32>,
    size: Option<Value>,
    chunk_size: Option<Value>,
    cache_mem: Option<Value>,
    #[serde(default)]
    cache_disk: Vec<String>,
    #[serde(default)]
    cache_prefault: bool,
    cache_mode: Option<String>,
    queues: Option<u16>,
    depth: Option<u16>,
    id: Option<u32>,
    export_nbd: Option<String>,
    #[serde(default)]
    no_device: bool,
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for `add`.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why, with the line and key (not a `source`: its text is already
        /// in this message, and a chain would print it twice).
        reason: toml::de::Error,
    },
}

/// The `add` arguments a config file stands for, as `--flag value` pairs.
pub fn config_args(path: &Path) -> Result<Vec<String>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let cfg: AddConfig = toml::from_str(&text).map_err(|reason| ConfigError::Parse {
        path: shown,
        reason,
    })?;
    let mut args = Vec::new();
    let mut push = |flag: &str, v: String| {
        args.push(format!("--{flag}"));
        args.push(v);
    };
    if let Some(v) = cfg.origin {
        push("origin", v);
    }
    for (flag, v) in [
        ("parent", cfg.parent),
        ("volume", cfg.volume),
        ("write-mode", cfg.write_mode),
        ("listen", cfg.listen),
        ("trace-protocol", cfg.trace_protocol),
        ("keys", cfg.keys),
        (
            "max-parent-faults",
            cfg.max_parent_faults.map(|n| n.to_string()),
        ),
    ] {
        if let Some(v) = v {
            push(flag, v);
        }
    }
    if let Some(v) = cfg.size {
        push("size", v.arg());
    }
    if let Some(v) = cfg.chunk_size {
        push("chunk-size", v.arg());
    }
    if let Some(v) = cfg.cache_mem {
        push("cache-mem", v.arg());
    }
    for d in cfg.cache_disk {
        push("cache-disk", d);
    }
    if let Some(v) = cfg.cache_mode {
        push("cache-mode", v);
    }
    if let Some(v) = cfg.queues {
        push("queues", v.to_string());
    }
    if let Some(v) = cfg.depth {
        push("depth", v.to_string());
    }
    if let Some(v) = cfg.id {
        push("id", v.to_string());
    }
    if let Some(v) = cfg.export_nbd {
        push("export-nbd", v);
    }
    // Switches, not `--flag value` pairs.
    if cfg.no_device {
        args.push("--no-device".to_string());
    }
    if cfg.cache_prefault {
        args.push("--cache-prefault".to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(text: &str) -> Result<Vec<String>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.toml");
        std::fs::write(&p, text).unwrap();
        config_args(&p)
    }

    #[test]
    fn keys_become_flags() {
        let a = args_of("origin = \"/o\"\nsize = \"1G\"\nchunk_size = 65536\ncache_disk = [\"/c:1G\", \"/d:2G\"]\nqueues = 2\n").unwrap();
        assert_eq!(
            a,
            [
                "--origin",
                "/o",
                "--size",
                "1G",
                "--chunk-size",
                "65536",
                "--cache-disk",
                "/c:1G",
                "--cache-disk",
                "/d:2G",
                "--queues",
                "2"
            ]
        );
    }

    #[test]
    fn leaf_keys_become_flags() {
        let a = args_of("parent = \"10.0.0.1:7400\"\nvolume = \"vol0\"\nwrite_mode = \"semi-sync\"\ncache_mem = \"1G\"\n").unwrap();
        assert_eq!(
            a,
            [
                "--parent",
                "10.0.0.1:7400",
                "--volume",
                "vol0",
                "--write-mode",
                "semi-sync",
                "--cache-mem",
                "1G"
            ]
        );
    }

    #[test]
    fn nbd_keys_become_flags() {
        let a = args_of(
            "origin = \"/o\"\nexport_nbd = \"unix:/run/v.sock\"\nno_device = true\ncache_prefault = true\n",
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "--origin",
                "/o",
                "--export-nbd",
                "unix:/run/v.sock",
                "--no-device",
                "--cache-prefault"
            ]
        );
        let a = args_of("origin = \"/o\"\nno_device = false\n").unwrap();
        assert_eq!(a, ["--origin", "/o"]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = args_of("origin = \"/o\"\ncache_mdoe = \"writeback\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache_mdoe"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = config_args(Path::new("/nonexistent/canopy.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/canopy.toml"), "{e}");
    }
}
