//! Markdown tables of figures and ratios.

use std::fmt::Write as _;

/// One workload's table: a title, a header row, rows, and notes.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    /// An empty table with these columns.
    pub fn new(title: String, header: &[&str]) -> Table {
        Table {
            title,
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Add a row (as many cells as columns).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Add a line printed under the table.
    pub fn note(&mut self, text: &str) {
        self.notes.push(text.to_string());
    }

    /// The table as markdown: a `###` title, the table, then the notes.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {}\n", self.title);
        let line = |cells: &[String]| format!("| {} |", cells.join(" | "));
        let _ = writeln!(s, "{}", line(&self.header));
        let rule: Vec<String> = self.header.iter().map(|_| "---".to_string()).collect();
        let _ = writeln!(s, "{}", line(&rule));
        for r in &self.rows {
            let _ = writeln!(s, "{}", line(r));
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n{n}");
        }
        s
    }
}

/// The median of `v`'s finite figures (the mean of the middle two for an
/// even count; 0 when there are none).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// `ours / theirs` as "1.23×", or "n/a" when theirs is zero.
pub fn ratio(ours: f64, theirs: f64) -> String {
    if theirs > 0.0 {
        format!("{:.2}×", ours / theirs)
    } else {
        "n/a".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_renders_as_markdown() {
        let mut t = Table::new("B0, test".into(), &["a", "b"]);
        t.row(vec!["1".into(), ratio(3.0, 2.0)]);
        t.note("a note");
        assert_eq!(
            t.markdown(),
            "### B0, test\n\n| a | b |\n| --- | --- |\n| 1 | 1.50× |\n\na note\n"
        );
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }

    #[test]
    fn medians_skip_what_is_not_a_number() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }
}
