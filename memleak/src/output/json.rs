//! JSON reports: every model serializes itself; this is the one place that prints it.
use serde::Serialize;

pub fn render_json(report: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(report).unwrap_or_else(|error| {
        // Serializing plain structs cannot fail; say so loudly if it ever does.
        format!("{{\"error\": \"serializing the report failed: {error}\"}}")
    });
    text.push('\n');
    text
}
