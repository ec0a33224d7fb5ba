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

/// One JSON object on one line (JSON Lines), for reports that stream.
pub fn render_json_line(model: &impl Serialize) -> String {
    let mut line = serde_json::to_string(model)
        .unwrap_or_else(|error| format!("{{\"error\": \"serializing failed: {error}\"}}"));
    line.push('\n');
    line
}
