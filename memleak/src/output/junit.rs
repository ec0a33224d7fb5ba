//! The leak check's verdict as JUnit XML: one test suite with one test case for the scope.
use std::fmt::Write as _;

use super::text::trace::{verdict_details, verdict_summary};
use crate::trace::report::Verdict;

/// One test suite with one test case for the scope.
pub fn render(verdict: &Verdict, seconds: f64) -> String {
    let failures = u32::from(verdict.failed);
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"memleak\" tests=\"1\" failures=\"{failures}\" time=\"{seconds:.3}\">"
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"memleak\" tests=\"1\" failures=\"{failures}\" time=\"{seconds:.3}\">"
    );
    let _ = write!(
        xml,
        "    <testcase classname=\"memleak\" name=\"no kernel memory leaks ({})\" time=\"{seconds:.3}\"",
        escape(&verdict.scope)
    );
    if verdict.failed {
        let _ = writeln!(
            xml,
            ">\n      <failure type=\"leak\" message=\"{}\">{}</failure>\n    </testcase>",
            escape(&verdict_summary(verdict)),
            escape(&verdict_details(verdict))
        );
    } else {
        xml.push_str("/>\n");
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => escaped.push('?'),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::check::{LeakCheck, fixtures::entries};

    #[test]
    fn junit_reports_failures_with_the_leaking_sites() {
        let args = LeakCheck {
            modules: vec!["leaky".into()],
            ..Default::default()
        };
        let xml = render(&args.evaluate(&entries()), 1.5);
        assert!(xml.starts_with("<?xml"));
        assert!(xml.contains("tests=\"1\" failures=\"1\" time=\"1.500\""));
        assert!(xml.contains("name=\"no kernel memory leaks (module=leaky function=* cache=*)\""));
        assert!(xml.contains("<failure type=\"leak\""));
        assert!(xml.contains("leaky_kmalloc+0x10/0x40 [leaky]"));
        let passing = LeakCheck {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        let xml = render(&passing.evaluate(&entries()), 0.2);
        assert!(xml.contains("failures=\"0\""));
        assert!(!xml.contains("<failure"));
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(escape("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos;?");
    }

    #[test]
    fn summaries_say_what_was_found_and_allowed() {
        let args = LeakCheck {
            modules: vec!["leaky".into()],
            max_count: 10,
            ..Default::default()
        };
        assert_eq!(
            verdict_summary(&args.evaluate(&entries())),
            "leak check failed (module=leaky function=* cache=*): 9.4 KiB in 150 objects from 2 \
             allocation sites outstanding (allowed: 0 bytes, 10 objects)"
        );
        let passing = LeakCheck {
            function: Some("clean_alloc".into()),
            ..Default::default()
        };
        assert_eq!(
            verdict_summary(&passing.evaluate(&entries())),
            "leak check passed (module=* function=clean_alloc cache=*): 0 B in 0 objects \
             outstanding"
        );
        let details = verdict_details(&args.evaluate(&entries()));
        assert!(
            details.starts_with("6.2 KiB in 100 objects, kmalloc (kmalloc-64) at leaky_kmalloc"),
            "{details}"
        );
    }

    #[test]
    fn escapes_keep_newlines_and_tabs() {
        assert_eq!(escape("a\n\tb"), "a\n\tb");
    }
}
