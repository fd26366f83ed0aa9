//! `canopy-bench`: canopy's benchmark harness (issue 5). Each workload runs
//! beside its peer in the same run, because these machines are noisy and
//! only ratios within one run mean anything; the results are one markdown
//! table per workload, printed and, with `--out`, written to a file
//! (`bench/run` writes `bench/results/DATE.md`).
//!
//! Workloads so far: B5 (the stacked cache against moka and an LRU). The
//! others of issue 5 (B1–B4, B6) have scripts of their own for now
//! (`bench/cold-read.sh`, `bench/vm-fio`, `peerd/benches/relay.rs`) and
//! join the harness as they are rebuilt on it.

mod b5;
mod table;
mod trace;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

/// Run canopy's benchmarks beside their peers and print a markdown table
/// of figures and ratios.
#[derive(Parser, Debug)]
#[command(name = "canopy-bench", version)]
struct Args {
    /// Workloads to run; all of them when none is named.
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
    /// The stacked cache against moka and an LRU of equal capacity, on
    /// Zipf(0.99) and on scans mixed with a hot set.
    B5,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let workloads = if args.workloads.is_empty() {
        vec![Workload::B5]
    } else {
        args.workloads.clone()
    };
    // Progress goes to stderr, so that stdout is the tables alone.
    let progress = |what: &str| eprintln!("canopy-bench: {what}");
    let mut doc = format!(
        "## canopy-bench{}\n\nRatios compare figures taken in this run, side by side.\n\n",
        if args.smoke {
            " (smoke run: figures mean nothing)"
        } else {
            ""
        }
    );
    for w in workloads {
        let t = match w {
            Workload::B5 => {
                let size = if args.smoke {
                    b5::Size::SMOKE
                } else {
                    b5::Size::FULL
                };
                let (rows, held) = b5::run(size, &progress)?;
                b5::table(&rows, held, size)
            }
        };
        doc.push_str(&t.markdown());
        doc.push('\n');
    }
    let mut out = std::io::stdout().lock();
    out.write_all(doc.as_bytes())
        .context("writing the tables")?;
    if let Some(path) = &args.out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, &doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("canopy-bench: tables written to {}", path.display());
    }
    Ok(())
}
