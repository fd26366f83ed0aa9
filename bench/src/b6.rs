//! B6 (issue 5), in the VM: fio on canopy's `/dev/ublkbN` with a warm cache
//! against `/dev/nbd0` attached to nbdkit's memory plugin in the same guest,
//! 4k random read at QD32 and 1M sequential read at QD8.
//!
//! The host has no ublk driver, so this boots the test VM
//! (`tests/vm/run-in-vm.sh`, Debian's kernel under qemu TCG) and runs the
//! guest's half, `bench/vm-fio.sh`, which leaves its figures in
//! `b6/results.tsv` of the VM's output directory; this module reads them
//! and builds the table. A VM that cannot boot, a guest script that fails,
//! or a result file missing or malformed fails the workload: nothing is
//! skipped. The VM is emulated (TCG), so the absolute figures are a small
//! fraction of the host's; the ratios are what the run is for.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::b1::{canopy_ublk, ratio_row, Samples};
use crate::progress::Progress;
use crate::table::Table;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Volume size in MiB (both devices).
    pub mib: u64,
    /// Seconds of each fio run.
    pub runtime: Duration,
    /// Seconds of fio ramp before each run.
    pub ramp: Duration,
    /// Rounds; each runs both devices on both workloads.
    pub rounds: usize,
}

impl Size {
    /// The figures' run: 256 MiB (the VM is small and slow), 10 s per run
    /// after a 2 s ramp, three rounds.
    pub const FULL: Size = Size {
        mib: 256,
        runtime: Duration::from_secs(10),
        ramp: Duration::from_secs(2),
        rounds: 3,
    };
    /// A run that only shows the path works: 16 MiB, 1 s, two rounds.
    pub const SMOKE: Size = Size {
        mib: 16,
        runtime: Duration::from_secs(1),
        ramp: Duration::ZERO,
        rounds: 2,
    };
}

/// The workloads, as the guest names them, with the table's name and
/// whether the figure is IOPS (else bytes per second).
pub const WORKLOADS: [(&str, &str, bool); 2] = [
    ("4k-randread", "4k random read, QD32", true),
    ("1m-read", "1M sequential read, QD8", false),
];

/// One fio run in the guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// Its round, from 1.
    pub round: usize,
    /// True for canopy's device, false for nbdkit's.
    pub canopy: bool,
    /// The guest's workload name.
    pub workload: String,
    /// Read I/Os per second.
    pub iops: f64,
    /// Read bytes per second.
    pub bytes_per_sec: f64,
}

/// What the guest reported.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestResults {
    /// Every fio run, in order.
    pub runs: Vec<Run>,
    /// canopy's origin reads during the runs (0 for a warm cache).
    pub origin_reads: u64,
}

/// Parse the guest's `results.tsv` (see `bench/vm-fio.sh`).
pub fn parse_results(text: &str) -> Result<GuestResults> {
    let mut runs = Vec::new();
    let mut origin_reads = None;
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        let bad = || anyhow!("line {}: cannot read {line:?}", n + 1);
        match fields.as_slice() {
            [] | [""] => {}
            ["run", round, who, workload, iops, bw] => {
                let canopy = match *who {
                    "canopy" => true,
                    "nbdkit" => false,
                    _ => return Err(bad()),
                };
                if !WORKLOADS.iter().any(|(w, _, _)| w == workload) {
                    return Err(bad());
                }
                let num = |s: &str| s.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
                runs.push(Run {
                    round: round.parse().map_err(|_| bad())?,
                    canopy,
                    workload: workload.to_string(),
                    iops: num(iops).ok_or_else(bad)?,
                    bytes_per_sec: num(bw).ok_or_else(bad)?,
                });
            }
            ["origin_reads", v] => origin_reads = Some(v.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        }
    }
    let origin_reads = origin_reads.context("no origin_reads line: the guest did not finish")?;
    if runs.is_empty() {
        bail!("no fio runs in the guest's results");
    }
    Ok(GuestResults { runs, origin_reads })
}

/// The runs of each workload, in [`WORKLOADS`] order, as per-round figures.
pub fn samples(r: &GuestResults) -> Vec<Samples> {
    WORKLOADS
        .iter()
        .map(|(w, _, iops)| {
            let mut s = Samples::default();
            let mut rounds: Vec<&Run> = r.runs.iter().filter(|x| x.workload == *w).collect();
            rounds.sort_by_key(|x| x.round);
            for run in rounds {
                let figure = if *iops { run.iops } else { run.bytes_per_sec };
                if run.canopy {
                    s.canopy.push(figure);
                } else {
                    s.nbdkit.push(figure);
                }
            }
            s
        })
        .collect()
}

/// The repository (the harness is run from its build).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The last `n` lines of a file, for an error message.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The error for a failed run, keeping the VM's output directory for a
/// look (with the console's last lines in the message).
fn kept(dir: tempfile::TempDir, what: String) -> anyhow::Error {
    let kept = dir.keep();
    anyhow!(
        "{what} (output kept in {}):\n{}",
        kept.display(),
        tail(&kept.join("vm.log"), 30)
    )
}

/// Run B6 at the full size, or the smoke size.
pub fn bench(smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
    let size = if smoke { Size::SMOKE } else { Size::FULL };
    let results = run(size, progress)?;
    Ok(vec![table(&samples(&results), size)])
}

/// Boot the VM, run the guest's half, and read what it reported.
pub fn run(size: Size, progress: &Progress) -> Result<GuestResults> {
    let repo = repo();
    let ublk = canopy_ublk()?;
    let script = repo.join("bench/vm-fio.sh");
    let runner = repo.join("tests/vm/run-in-vm.sh");
    let dir = tempfile::Builder::new()
        .prefix("canopy-b6.")
        .tempdir()
        .context("creating the VM's output directory")?;
    let log = dir.path().join("vm.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&runner);
    cmd.arg(&script)
        .env("CANOPY_VM_OUT", dir.path())
        .env("CANOPY_UBLK", &ublk)
        .env("CANOPY_B6_SIZE_MIB", size.mib.to_string())
        .env("CANOPY_B6_RUNTIME", size.runtime.as_secs().to_string())
        .env("CANOPY_B6_RAMP", size.ramp.as_secs().to_string())
        .env("CANOPY_B6_ROUNDS", size.rounds.to_string());
    // The guest hides the host's /tmp (and /run ...) behind fresh tmpfs;
    // a canopy-ublk built there must stay visible.
    if let Some(bin_dir) = ublk.parent() {
        let keep = match std::env::var_os("CANOPY_VM_KEEP") {
            Some(k) => format!("{}:{}", k.to_string_lossy(), bin_dir.display()),
            None => bin_dir.display().to_string(),
        };
        cmd.env("CANOPY_VM_KEEP", keep);
    }
    progress.stage(&format!(
        "B6: booting the VM ({} MiB, {} rounds of {} s; console in {})",
        size.mib,
        size.rounds,
        size.runtime.as_secs(),
        log.display()
    ));
    let spinner = progress.spinner("B6 in the VM");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("running {}", runner.display()));
    spinner.finish_and_clear();
    let status = status?;
    if !status.success() {
        return Err(kept(dir, format!("the VM run failed ({status})")));
    }
    let path = dir.path().join("b6/results.tsv");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return Err(kept(dir, format!("reading {}: {e}", path.display()))),
    };
    let results = match parse_results(&text) {
        Ok(r) => r,
        Err(e) => return Err(kept(dir, format!("{e:#}"))),
    };
    // The guest checks this too; a results file that says otherwise is
    // not B6's.
    if results.origin_reads > 0 {
        return Err(kept(
            dir,
            format!(
                "canopy read its origin {} times during the runs: not a warm cache",
                results.origin_reads
            ),
        ));
    }
    Ok(results)
}

/// B6's table.
pub fn table(samples: &[Samples], size: Size) -> Table {
    let mut t = Table::new(
        format!(
            "B6, in the VM: fio (libaio, O_DIRECT) on /dev/ublkb0 against /dev/nbd0 on nbdkit \
             memory, {} MiB, warm, {} rounds of {} s per device",
            size.mib,
            size.rounds,
            size.runtime.as_secs()
        ),
        &[
            "workload",
            "canopy /dev/ublkb0",
            "nbdkit /dev/nbd0",
            "canopy / nbdkit",
            "per-round ratios",
            "target ≥ 1.0×",
        ],
    );
    for ((_, name, iops), s) in WORKLOADS.iter().zip(samples) {
        let fmt = |x: f64| {
            if *iops {
                format!("{x:.0} IOPS")
            } else {
                format!("{:.1} MB/s", x / 1e6)
            }
        };
        t.row(ratio_row(name, s, fmt));
    }
    t.note(
        "Medians over the rounds; the devices alternate within each round. Debian's 6.12 kernel \
         under qemu TCG with 2 vCPUs, so absolute figures are far below the host's. canopy: the \
         embedded volume, 2 queues, the volume read through once before the runs, no origin \
         read during them (checked). nbdkit: the memory plugin holding the same bytes, attached \
         by nbd-client with 2 connections (2 hardware queues, as canopy's).",
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: &str = "run\t1\tcanopy\t4k-randread\t835.3\t3421460\n\
        run\t1\tnbdkit\t4k-randread\t1119.4\t4585074\n\
        run\t1\tcanopy\t1m-read\t56.5\t59263183\n\
        run\t1\tnbdkit\t1m-read\t4.8\t5070037\n\
        run\t2\tnbdkit\t4k-randread\t258.6\t1059310\n\
        run\t2\tcanopy\t4k-randread\t3548.4\t14534457\n\
        run\t2\tnbdkit\t1m-read\t13.1\t13742804\n\
        run\t2\tcanopy\t1m-read\t23.6\t24762012\n\
        origin_reads\t0\n";

    #[test]
    fn the_guests_results_parse_into_per_round_samples() {
        let r = parse_results(GUEST).unwrap();
        assert_eq!(r.runs.len(), 8);
        assert_eq!(r.origin_reads, 0);
        assert_eq!(
            r.runs[0],
            Run {
                round: 1,
                canopy: true,
                workload: "4k-randread".into(),
                iops: 835.3,
                bytes_per_sec: 3421460.0
            }
        );
        let s = samples(&r);
        assert_eq!(s[0].canopy, [835.3, 3548.4]);
        assert_eq!(s[0].nbdkit, [1119.4, 258.6]);
        assert_eq!(s[1].canopy, [59263183.0, 24762012.0]);
        assert_eq!(s[1].nbdkit, [5070037.0, 13742804.0]);
        let md = table(&s, Size::SMOKE).markdown();
        assert!(
            md.contains("| 4k random read, QD32 | 2192 IOPS | 689 IOPS | 3.18× |"),
            "{md}"
        );
        assert!(
            md.contains("| 1M sequential read, QD8 | 42.0 MB/s | 9.4 MB/s | 4.47× |"),
            "{md}"
        );
    }

    #[test]
    fn unfinished_or_garbled_results_are_refused() {
        // No origin_reads line: the guest stopped before the end.
        let cut = GUEST.replace("origin_reads\t0\n", "");
        assert!(parse_results(&cut).is_err());
        assert!(parse_results("origin_reads\t0\n").is_err());
        for bad in [
            "run\t1\tloop\t4k-randread\t1\t1",
            "run\t1\tcanopy\t8k-read\t1\t1",
            "run\tx\tcanopy\t1m-read\t1\t1",
            "run\t1\tcanopy\t1m-read\tNaN\t1",
            "run\t1\tcanopy\t1m-read\t-1\t1",
            "run\t1\tcanopy\t1m-read\t1",
            "origin_reads\tmany",
            "something else",
        ] {
            let text = format!("{bad}\n{GUEST}");
            assert!(parse_results(&text).is_err(), "{bad}");
        }
    }
}
