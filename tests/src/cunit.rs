//! Parser for the CUnit console output of `iscsi-test-cu` (verbose mode, the default).
//!
//! The counts come from CUnit's "Run Summary" table. Failed test names come from the per-test
//! lines: `Suite: NAME`, `  Test: NAME ...` and a result token — `passed`/`FAILED` either right
//! after the `...` or alone on a later line (libiscsi's own messages come in between, and
//! messages containing `[FAILED]` are not results). A test with no result token (stdout
//! interleaving loses some) counts as passed, as CUnit itself does for skipped tests.

/// Totals and failures of one `iscsi-test-cu` run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CunitSummary {
    /// `tests` row, "Ran" column.
    pub run: u32,
    /// `tests` row, "Passed" column (CUnit counts skipped tests as passed).
    pub passed: u32,
    /// `tests` row, "Failed" column.
    pub failed: u32,
    /// `Suite.Test` of each failed test, in output order.
    pub failed_tests: Vec<String>,
    /// False when no "Run Summary" table was found (tool crashed or timed out).
    pub complete: bool,
}

impl CunitSummary {
    pub fn parse(stdout: &str) -> Self {
        let mut out = CunitSummary::default();
        let mut suite = String::new();
        let mut test: Option<String> = None;
        let mut in_summary = false;
        for line in stdout.lines() {
            let t = line.trim();
            if t.starts_with("Run Summary:") {
                in_summary = true;
                continue;
            }
            if in_summary {
                let cols: Vec<&str> = t.split_whitespace().collect();
                if cols.first() == Some(&"tests") {
                    let num = |i: usize| cols.get(i).and_then(|c| c.parse().ok()).unwrap_or(0);
                    out.run = num(2);
                    out.passed = num(3);
                    out.failed = num(4);
                    out.complete = cols.len() >= 5;
                }
                continue;
            }
            if let Some(name) = t.strip_prefix("Suite: ") {
                suite = name.trim().to_owned();
                test = None;
            } else if let Some(rest) = t.strip_prefix("Test: ") {
                let (name, tail) = rest.split_once(" ...").unwrap_or((rest, ""));
                let full = format!("{suite}.{}", name.trim());
                match result_token(tail) {
                    Some(false) => {
                        out.failed_tests.push(full);
                        test = None;
                    }
                    Some(true) => test = None,
                    None => test = Some(full),
                }
            } else if let Some(r) = result_token(t) {
                if let (false, Some(name)) = (r, test.take()) {
                    out.failed_tests.push(name);
                }
            }
        }
        out
    }

    /// One line for logs: "run 230, passed 222, failed 8".
    pub fn line(&self) -> String {
        format!(
            "run {}, passed {}, failed {}",
            self.run, self.passed, self.failed
        )
    }
}

/// `Some(true)` for a leading `passed`, `Some(false)` for a leading `FAILED`, else `None`.
fn result_token(s: &str) -> Option<bool> {
    if s.starts_with("passed") {
        Some(true)
    } else if s.starts_with("FAILED") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of tgt 1.0.85 on this machine (Debian 12, libiscsi 1.19).
    const TGT: &str = include_str!("../fixtures/tgt-1.0.85-iscsi-test-cu.txt");

    #[test]
    fn parses_tgt_run() {
        let s = CunitSummary::parse(TGT);
        assert!(s.complete);
        assert_eq!((s.run, s.passed, s.failed), (230, 222, 8));
        assert_eq!(
            s.failed_tests,
            [
                "GetLBAStatus.BeyondEol",
                "PrinServiceactionRange.Range",
                "ProutReserve.OwnershipEA",
                "ProutReserve.OwnershipWE",
                "ProutReserve.OwnershipEARO",
                "ProutReserve.OwnershipWERO",
                "Reserve6.2Initiators",
                "iSCSIdatasn.iSCSIDataSnInvalid",
            ]
        );
    }

    #[test]
    fn truncated_output_is_incomplete() {
        let s = CunitSummary::parse("Suite: Read10\n  Test: Simple ...FAILED\n");
        assert!(!s.complete);
        assert_eq!(s.failed_tests, ["Read10.Simple"]);
    }

    #[test]
    fn failed_marker_inside_message_is_not_a_result() {
        let s = CunitSummary::parse(
            "Suite: S\n  Test: A ...    [FAILED] something\npassed\n  Test: B ...passed\n",
        );
        assert!(s.failed_tests.is_empty());
    }
}
