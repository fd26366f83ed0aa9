//! `canopy-bench`: canopy's benchmark harness (issue 5). Each workload runs
//! beside its peer in the same run, because these machines are noisy and
//! only ratios within one run mean anything; the results are one markdown
//! table per workload, printed and, with `--out`, written to a file
//! (`bench/run` writes `bench/results/DATE.md`).
//!
//! Each workload is a module (`b1` to `b6`) with a `bench(smoke, progress)`
//! that returns its tables; `peers` starts nbdkit and runs fio for the
//! workloads that compare against them, and `progress` shows long runs.

mod b1;
mod b2;
mod b3;
mod b4;
mod b5;
mod b6;
mod peers;
mod progress;
mod table;
mod trace;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::progress::Progress;
use crate::table::Table;

/// Run canopy's benchmarks beside their peers and print a markdown table
/// of figures and ratios.
#[derive(Parser, Debug)]
#[command(name = "canopy-bench", version)]
struct Args {
    /// Workloads to run; all of them when none is named (with --smoke,
    /// all but those that boot the VM).
    #[arg(value_enum)]
    workloads: Vec<Workload>,
    /// A tiny run that only shows the harness works (what CI runs); its
    /// figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Also write the tables to this file (created or replaced).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// A workload of issue 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Warm cache: fio's nbd engine against canopy's NBD export (no ublk)
    /// with the volume in the memory tier, and against nbdkit's memory
    /// plugin, 4k random read at QD32 and 1M sequential read at QD8, on
    /// Unix sockets.
    B1,
    /// Cold reads: a leaf with an empty cache reads a volume straight from
    /// a root over loopback TCP, sealed and plain, against fio reading the
    /// same file from nbdkit's file plugin; 1M sequential and 64k random.
    B2,
    /// A relay's verify-and-forward of sealed records, GB/s on one core,
    /// at 4 KiB–1 MiB chunks, one by one and batched.
    B3,
    /// Fan-out: a root, two untrusted relays, eight leaves reading the same
    /// volume cold at once; the root's bytes sent and the wall time,
    /// against eight fio jobs reading from one nbdkit.
    B4,
    /// The stacked cache against moka and an LRU of equal capacity, on
    /// Zipf(0.99) and on scans mixed with a hot set.
    B5,
    /// In the VM (boots it: the host has no ublk): fio on canopy's
    /// /dev/ublkb0 with a warm cache against /dev/nbd0 attached to nbdkit's
    /// memory plugin in the same guest, 4k random read and 1M sequential
    /// read. Left out of a `--smoke` run unless named.
    B6,
}

impl Workload {
    /// Run this workload; its tables, or why it could not run.
    fn run(self, smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
        match self {
            Workload::B1 => b1::bench(smoke, progress),
            Workload::B2 => b2::bench(smoke, progress),
            Workload::B3 => b3::bench(smoke, progress),
            Workload::B4 => b4::bench(smoke, progress),
            Workload::B5 => b5::bench(smoke, progress),
            Workload::B6 => b6::bench(smoke, progress),
        }
    }

    /// True for workloads that boot the test VM: a smoke run (what the
    /// host phase of `scripts/test` runs, which must not boot one) leaves
    /// them out unless they are named.
    fn boots_vm(self) -> bool {
        matches!(self, Workload::B6)
    }
}

fn main() -> Result<()> {
    // As canopy's daemons do, so that the in-process workloads (B2–B4) run
    // with the product's allocator settings: chunk buffers off mmap.
    canopy_peerd::alloc::tune_for_chunks();
    let args = Args::parse();
    let workloads = if args.workloads.is_empty() {
        Workload::value_variants()
            .iter()
            .copied()
            .filter(|w| !(args.smoke && w.boots_vm()))
            .collect()
    } else {
        args.workloads.clone()
    };
    let progress = Progress::new();
    let mut doc = format!(
        "## canopy-bench{}\n\nRatios compare figures taken in this run, side by side.\n\n",
        if args.smoke {
            " (smoke run: figures mean nothing)"
        } else {
            ""
        }
    );
    // A workload that fails is reported in its place and fails the run at
    // the end; the others still run (a full run is long).
    let mut failed = Vec::new();
    for w in workloads {
        match w.run(args.smoke, &progress) {
            Ok(tables) => {
                for t in tables {
                    doc.push_str(&t.markdown());
                    doc.push('\n');
                }
            }
            Err(e) => {
                let name = format!("{w:?}");
                progress.stage(&format!("{name} failed: {e:#}"));
                doc.push_str(&format!("### {name}: failed\n\n{e:#}\n\n"));
                failed.push(name);
            }
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(doc.as_bytes())
        .context("writing the tables")?;
    if let Some(path) = &args.out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, &doc).with_context(|| format!("writing {}", path.display()))?;
        progress.stage(&format!("tables written to {}", path.display()));
    }
    if !failed.is_empty() {
        bail!("workloads failed: {}", failed.join(", "));
    }
    Ok(())
}
