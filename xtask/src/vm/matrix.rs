//! The support matrix: per guest kernel, how memleak followed each kind of memory and which
//! free paths, read from the module check's report, and what it could not do. `vm-test` writes
//! it to `target/vm/support-matrix.md` after every run; docs/kernels.md holds the last one.
use memleak::trace::report::Report;

use memleak::vm::guest::GuestResults;

/// The kinds in the matrix's column order.
const KINDS: [&str; 4] = ["slab", "page", "vmalloc", "percpu"];

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub kernel: String,
    /// One method per entry of [`KINDS`]: `tp_btf`, `raw_tp`, `tracepoint`, `fexit/fentry`,
    /// `none`, or `?` where the guest sent no report.
    pub methods: [String; 4],
    pub free_paths: Vec<String>,
    /// Why a kind is not followed the cheapest way, or not at all; what memleak noted missing.
    pub missing: Vec<String>,
    pub seconds: f64,
    pub verdict: String,
}

impl Row {
    /// The row of a guest, from the module check's report (`leaky.json`); without one, from
    /// what that check printed.
    pub fn from_results(release: &str, results: &GuestResults) -> Self {
        let report = results
            .file("leaky.json")
            .ok()
            .and_then(|text| serde_json::from_str::<Report>(text).ok());
        let Some(report) = report else {
            let stderr = results.file("leaky.stderr").unwrap_or_default();
            return Self {
                kernel: release.to_owned(),
                methods: KINDS.map(|_| "?".to_owned()),
                free_paths: Vec::new(),
                missing: vec![format!(
                    "no report: {}",
                    stderr.lines().last().unwrap_or("(nothing printed)")
                )],
                seconds: 0.0,
                verdict: "failed".to_owned(),
            };
        };
        let methods = KINDS.map(|kind| {
            report
                .methods
                .iter()
                .find(|method| method.kind == kind)
                .map_or_else(|| "?".to_owned(), |method| method.method.clone())
        });
        let missing = report
            .methods
            .iter()
            // Pages are on classic tracepoints by design, on every kernel (docs/kernels.md).
            .filter(|method| !(method.kind == "page" && method.method == "tracepoint"))
            .filter_map(|method| {
                let why = method.why.as_deref()?;
                Some(format!(
                    "{} ({}): {}",
                    method.kind,
                    method.method,
                    shorten(why)
                ))
            })
            .chain(
                report
                    .notes
                    .iter()
                    .filter(|note| note.starts_with("frees through "))
                    .map(|note| shorten(note)),
            )
            .collect();
        Self {
            kernel: release.to_owned(),
            methods,
            free_paths: report.free_paths,
            missing,
            seconds: 0.0,
            verdict: "passed".to_owned(),
        }
    }
}

/// A reason cut to its first clause: verifier logs make long ones.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 160;
    if text.chars().count() <= LIMIT {
        return text.to_owned();
    }
    let cut: String = text.chars().take(LIMIT).collect();
    format!("{cut}…")
}

/// The matrix as Markdown.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| kernel | slab | page | vmalloc | percpu | free paths followed | guest time | verdict |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} s | {} |\n",
            row.kernel,
            row.methods[0],
            row.methods[1],
            row.methods[2],
            row.methods[3],
            row.free_paths.join(", "),
            row.seconds,
            row.verdict
        ));
    }
    for row in rows.iter().filter(|row| !row.missing.is_empty()) {
        out.push_str(&format!("\n**{}**\n\n", row.kernel));
        for missing in &row.missing {
            out.push_str(&format!("- {}\n", missing.replace('|', "\\|")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{super::verdict::tests::run_report, *};

    fn results(files: &[(&str, &str)]) -> GuestResults {
        GuestResults::from_files(files.iter().copied())
    }

    #[test]
    fn a_guest_without_a_report_shows_why_and_no_methods() {
        let row = Row::from_results(
            "5.10.0-32-amd64",
            &results(&[("leaky.stderr", "loading\nmemleak: error: mounting tracefs")]),
        );
        assert_eq!(row.methods, KINDS.map(|_| "?".to_owned()));
        assert_eq!(row.missing, ["no report: memleak: error: mounting tracefs"]);
        assert_eq!(row.verdict, "failed");
    }

    #[test]
    fn methods_fall_in_their_columns_and_reasons_are_listed() {
        let mut report: serde_json::Value = serde_json::from_str(&run_report(
            "raw_tp",
            &["frees through kmem_cache_free_bulk are not followed as they happen"],
            true,
            Vec::new(),
            Vec::new(),
        ))
        .unwrap();
        report["methods"] = serde_json::json!([
            {"kind": "percpu", "method": "tp_btf"},
            {"kind": "slab", "method": "raw_tp", "why": "tp_btf: rejected"},
            {"kind": "vmalloc", "method": "fexit/fentry", "why": "no tracepoints"},
        ]);
        report["free_paths"] = serde_json::json!(["kfree (raw_tp)"]);
        let report = report.to_string();
        let parsed = serde_json::from_str::<Report>(&report);
        assert!(parsed.is_ok(), "{parsed:?}");
        let row = Row::from_results("6.1.0-57-amd64", &results(&[("leaky.json", &report)]));
        assert_eq!(row.methods, ["raw_tp", "?", "fexit/fentry", "tp_btf"]);
        assert_eq!(
            row.missing,
            [
                "slab (raw_tp): tp_btf: rejected",
                "vmalloc (fexit/fentry): no tracepoints",
                "frees through kmem_cache_free_bulk are not followed as they happen"
            ]
        );
        let table = render(&[row]);
        assert!(table.contains("| 6.1.0-57-amd64 | raw_tp | ? | fexit/fentry | tp_btf |"));
        assert!(table.contains("- slab (raw_tp): tp_btf: rejected"));
    }
}
