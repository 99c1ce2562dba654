//! Output in the Prometheus text exposition format.

use super::Metrics;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// All metrics in the Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut om = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut om, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        openmetrics_to_prometheus(&om)
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4:
/// counters' HELP/TYPE lines take the `_total` name their samples carry,
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let lines: Vec<&str> = om.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("# UNIT ") || *line == "# EOF" {
            continue;
        }
        let rename = |rest: &str, kind: &str| -> Option<String> {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let is_counter = if kind == "TYPE" {
                tail == "counter"
            } else {
                // A HELP line: look ahead for its TYPE line.
                lines[i + 1..]
                    .iter()
                    .take(3)
                    .any(|l| *l == format!("# TYPE {name} counter"))
            };
            (is_counter && !name.ends_with("_total")).then(|| {
                format!("# {kind} {name}_total {tail}")
                    .trim_end()
                    .to_owned()
            })
        };
        let rewritten = if !line.starts_with('#') {
            // Prometheus spells infinities +Inf/-Inf.
            line.strip_suffix(" inf")
                .map(|l| format!("{l} +Inf"))
                .or_else(|| line.strip_suffix(" -inf").map(|l| format!("{l} -Inf")))
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            rename(rest, "TYPE")
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            rename(rest, "HELP")
        } else {
            None
        };
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
