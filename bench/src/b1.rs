//! B1 (issue 5), warm cache: fio's `nbd` engine against canopy's NBD export
//! (`canopy-ublk add --no-device --export-nbd unix:PATH`, no ublk, so it
//! runs on the host) with the whole volume in the memory tier, beside the
//! nbdkit `memory` plugin holding the same bytes, both on Unix sockets.
//! Two workloads: 4k random read at QD32 and 1M sequential read at QD8.
//! The same again over loopback TCP follows as an extra table (the design
//! gives nbdkit's figures for both).
//!
//! Both servers hold the same random bytes (an origin file written here;
//! nbdkit's copy by `nbdcopy` into it), so neither serves holes. canopy's
//! volume is warmed by reading it through once with `nbdcopy`. That the
//! measured runs were served from memory is checked, not assumed: canopy
//! reads its origin with `pread`, which the kernel counts in the daemon's
//! `/proc/PID/io` `rchar` (its socket traffic goes through `recv`, which is
//! not counted there), so any growth during the runs is an origin read and
//! fails the workload.
//!
//! The servers run alternately, round after round, each fio run time-based;
//! the table reports the median of each side and the ratio of the medians,
//! with the range of the per-round ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use crate::peers::{self, Endpoint, FioJob, Server};
use crate::progress::Progress;
use crate::table::{median, ratio, Table};

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Volume bytes (both servers).
    pub volume: u64,
    /// Seconds of each fio run.
    pub runtime: Duration,
    /// Rounds; each runs both servers on both workloads.
    pub rounds: usize,
}

impl Size {
    /// The figures' run: a 256 MiB volume, 10 s per run, three rounds.
    pub const FULL: Size = Size {
        volume: 256 << 20,
        runtime: Duration::from_secs(10),
        rounds: 3,
    };
    /// A run that only shows the path works (CI): 16 MiB, 1 s, two rounds.
    pub const SMOKE: Size = Size {
        volume: 16 << 20,
        runtime: Duration::from_secs(1),
        rounds: 2,
    };
}

/// One of B1's fio workloads.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Its name in the table.
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    /// Block size.
    pub bs: u64,
    /// Queue depth.
    pub iodepth: u32,
    /// True when the figure is I/Os per second, false for bytes per second.
    pub iops: bool,
}

/// The two workloads.
pub const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "4k random read, QD32",
        rw: "randread",
        bs: 4096,
        iodepth: 32,
        iops: true,
    },
    Workload {
        name: "1M sequential read, QD8",
        rw: "read",
        bs: 1 << 20,
        iodepth: 8,
        iops: false,
    },
];

/// The figures of one workload: one per round for each side.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// canopy's figure per round.
    pub canopy: Vec<f64>,
    /// nbdkit's figure per round.
    pub nbdkit: Vec<f64>,
}

/// A table row of a workload run against nbdkit (B1, B6): its name,
/// canopy's and nbdkit's medians (shown by `fmt`), their ratio, the range
/// of per-round ratios, and whether the ≥ 1.0× target is met.
pub fn ratio_row(name: &str, s: &Samples, fmt: impl Fn(f64) -> String) -> Vec<String> {
    let (c, k) = (median(&s.canopy), median(&s.nbdkit));
    let range = match ratio_range(s) {
        Some((lo, hi)) => format!("{lo:.2}–{hi:.2}"),
        None => "n/a".to_string(),
    };
    let met = if k > 0.0 && c >= k { "yes" } else { "no" };
    vec![
        name.to_string(),
        fmt(c),
        fmt(k),
        ratio(c, k),
        range,
        met.to_string(),
    ]
}

/// The lowest and highest per-round ratio canopy / nbdkit.
pub fn ratio_range(s: &Samples) -> Option<(f64, f64)> {
    let ratios: Vec<f64> = s
        .canopy
        .iter()
        .zip(&s.nbdkit)
        .filter(|(_, k)| **k > 0.0)
        .map(|(c, k)| c / k)
        .collect();
    let lo = ratios.iter().copied().reduce(f64::min)?;
    let hi = ratios.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// Run B1 at the full size, or the smoke size.
pub fn bench(smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
    let size = if smoke { Size::SMOKE } else { Size::FULL };
    let mut tables = Vec::new();
    for transport in Transport::ALL {
        let samples = run(size, transport, progress)?;
        tables.push(table(&samples, size, transport));
    }
    Ok(tables)
}

/// Where canopy's binaries are: `CANOPY_UBLK` if set, else beside this
/// executable (`bench/run` builds both into target/release).
pub fn canopy_ublk() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CANOPY_UBLK") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating canopy-bench")?;
    let dir = exe
        .parent()
        .context("canopy-bench's executable has no directory")?;
    let p = dir.join("canopy-ublk");
    if !p.is_file() {
        bail!(
            "{} is missing: build it (`cargo build --release -p canopy-ublk`; bench/run does) \
             or set CANOPY_UBLK",
            p.display()
        );
    }
    Ok(p)
}

/// Bytes the process has read through `read`/`pread` so far (its
/// `/proc/PID/io` `rchar`).
fn rchar(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rchar(&text).with_context(|| format!("no rchar in {path}"))
}

/// The `rchar:` line of a `/proc/PID/io`.
fn parse_rchar(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Run a tool to completion, failing with its output.
fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// A file of `len` seeded random bytes.
fn write_random(path: &Path, len: u64) -> Result<()> {
    use std::io::Write as _;
    let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(0xb1);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// How fio reaches the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Unix sockets: the B1.
    Unix,
    /// Loopback TCP: the same, for comparison with the design's reference
    /// figures over TCP.
    Tcp,
}

impl Transport {
    /// Both, the first.
    pub const ALL: [Transport; 2] = [Transport::Unix, Transport::Tcp];

    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "a Unix socket",
            Transport::Tcp => "loopback TCP",
        }
    }

    /// A fresh endpoint: `file` in `dir`, or a free loopback port.
    fn endpoint(self, dir: &Path, file: &str) -> Result<Endpoint> {
        match self {
            Transport::Unix => Ok(Endpoint::Unix(dir.join(file))),
            Transport::Tcp => Endpoint::free_tcp(),
        }
    }
}

/// Start both servers on `transport`, fill and warm them, then run the
/// rounds.
pub fn run(size: Size, transport: Transport, progress: &Progress) -> Result<Vec<Samples>> {
    peers::require("nbdcopy")?;
    let ublk = canopy_ublk()?;
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let origin = dir.path().join("origin.img");
    progress.stage(&format!(
        "B1 over {}: writing a {} MiB volume of random bytes",
        transport.name(),
        size.volume >> 20
    ));
    write_random(&origin, size.volume)?;

    let canopy_at = transport.endpoint(dir.path(), "canopy.sock")?;
    let mut cmd = Command::new(&ublk);
    // A memory tier with room to spare: the tier is 8-way set-associative,
    // so a quarter more than the volume keeps every set below its ways.
    let cache_mem = size.volume + size.volume / 4;
    cmd.arg("add")
        .arg("--origin")
        .arg(&origin)
        .arg("--cache-mem")
        .arg(cache_mem.to_string())
        .arg("--export-nbd")
        .arg(canopy_at.canopy_arg())
        .arg("--no-device");
    let canopy = Server::spawn(
        cmd,
        "canopy-ublk --no-device",
        &canopy_at,
        &dir.path().join("canopy.log"),
    )?;
    let kit_at = transport.endpoint(dir.path(), "nbdkit.sock")?;
    let kit = peers::nbdkit(
        "memory",
        &[format!("size={}", size.volume)],
        &kit_at,
        &dir.path().join("nbdkit.log"),
    )?;

    progress.stage("B1: copying the volume into nbdkit, reading canopy's through once");
    run_tool(
        Command::new("nbdcopy").arg(&origin).arg(kit_at.uri()),
        "nbdcopy into nbdkit",
    )?;
    run_tool(
        Command::new("nbdcopy").arg(canopy_at.uri()).arg("null:"),
        "nbdcopy warming canopy",
    )?;
    let read_before = rchar(canopy.pid())?;

    let mut samples = vec![Samples::default(); WORKLOADS.len()];
    let runs = (size.rounds * WORKLOADS.len() * 2) as u64;
    let bar = progress.bar(runs, "B1 fio runs", "runs");
    for round in 1..=size.rounds {
        for (w, s) in WORKLOADS.iter().zip(samples.iter_mut()) {
            let job = FioJob {
                rw: w.rw,
                bs: w.bs,
                iodepth: w.iodepth,
                size: size.volume,
                runtime: Some(size.runtime),
                numjobs: 1,
            };
            // Which server goes first alternates, so neither always runs
            // on a machine the other just warmed (or heated).
            let order = if round % 2 == 1 {
                [true, false]
            } else {
                [false, true]
            };
            for is_canopy in order {
                let (uri, who) = if is_canopy {
                    (canopy_at.uri(), "canopy")
                } else {
                    (kit_at.uri(), "nbdkit")
                };
                let what = format!("B1 round {round}/{}: {} on {who}", size.rounds, w.name);
                let r = peers::fio(&uri, &job, progress, &what)?;
                let figure = if w.iops { r.iops } else { r.bytes_per_sec };
                if is_canopy {
                    s.canopy.push(figure);
                } else {
                    s.nbdkit.push(figure);
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let origin_reads = rchar(canopy.pid())?.saturating_sub(read_before);
    if origin_reads > 0 {
        bail!(
            "canopy read {origin_reads} bytes from its origin during the runs: the volume was \
             not wholly in the memory tier, so these are not B1's figures"
        );
    }
    drop(kit);
    drop(canopy);
    Ok(samples)
}

/// B1's table.
pub fn table(samples: &[Samples], size: Size, transport: Transport) -> Table {
    let mut t = Table::new(
        format!(
            "B1{}, warm cache: fio's nbd engine over {}, {} MiB volume in the memory tier, \
             {} rounds of {} s per server",
            if transport == Transport::Unix {
                ""
            } else {
                " (extra)"
            },
            transport.name(),
            size.volume >> 20,
            size.rounds,
            size.runtime.as_secs_f64()
        ),
        &[
            "workload",
            "canopy",
            "nbdkit memory",
            "canopy / nbdkit",
            "per-round ratios",
            "target ≥ 1.0×",
        ],
    );
    for (w, s) in WORKLOADS.iter().zip(samples) {
        let fmt = |x: f64| {
            if w.iops {
                format!("{:.1}k IOPS", x / 1e3)
            } else {
                format!("{:.0} MB/s", x / 1e6)
            }
        };
        t.row(ratio_row(w.name, s, fmt));
    }
    t.note(
        "Medians over the rounds; the servers alternate within each round. canopy: \
         `canopy-ublk add --no-device`, 64 KiB chunks, the volume read through once before the \
         runs, no origin read during them (checked). nbdkit: the memory plugin holding the same \
         bytes.",
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratio_ranges() {
        let s = Samples {
            canopy: vec![2.0, 3.0],
            nbdkit: vec![2.0, 2.0],
        };
        assert_eq!(ratio_range(&s), Some((1.0, 1.5)));
        assert_eq!(ratio_range(&Samples::default()), None);
    }

    #[test]
    fn rchar_is_read_from_proc_io() {
        let text = "rchar: 268445418\nwchar: 4253\nsyscr: 4113\n";
        assert_eq!(parse_rchar(text), Some(268445418));
        assert_eq!(parse_rchar("wchar: 1\n"), None);
        // Our own counter exists and parses.
        assert!(rchar(std::process::id()).is_ok());
    }

    #[test]
    fn the_table_has_a_row_per_workload() {
        let s = vec![
            Samples {
                canopy: vec![100e3, 120e3],
                nbdkit: vec![100e3, 100e3],
            },
            Samples {
                canopy: vec![1e9],
                nbdkit: vec![2e9],
            },
        ];
        let md = table(&s, Size::SMOKE, Transport::Unix).markdown();
        assert!(
            md.contains(
                "| 4k random read, QD32 | 110.0k IOPS | 100.0k IOPS | 1.10× | 1.00–1.20 | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| 1M sequential read, QD8 | 1000 MB/s | 2000 MB/s | 0.50× | 0.50–0.50 | no |"
            ),
            "{md}"
        );
    }
}
