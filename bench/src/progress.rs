//! Progress for long runs (issue 5 item 4): indicatif bars and spinners on
//! stderr, so that stdout stays the tables alone. indicatif draws nothing
//! when stderr is not a terminal (CI logs), so stage lines are also printed
//! there as plain text.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where the workloads report what they are doing.
pub struct Progress {
    bars: MultiProgress,
}

impl Progress {
    /// Progress on stderr.
    pub fn new() -> Progress {
        Progress {
            bars: MultiProgress::new(),
        }
    }

    /// Say what starts now (one line, kept in the log).
    pub fn stage(&self, what: &str) {
        // println through MultiProgress keeps live bars intact; it prints
        // nothing when hidden, so fall back to eprintln for logs.
        if self.bars.is_hidden() {
            eprintln!("canopy-bench: {what}");
        } else {
            let _ = self.bars.println(format!("canopy-bench: {what}"));
        }
    }

    /// A bar for `len` units of work (`unit` names them: "accesses",
    /// "MiB"); finish it with [`ProgressBar::finish_and_clear`].
    pub fn bar(&self, len: u64, what: &str, unit: &str) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new(len));
        let template =
            format!("{{msg}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{eta}})");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar
    }

    /// A spinner for work of unknown length (an external tool's run).
    pub fn spinner(&self, what: &str) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new_spinner());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}
