//! `report.md`: the metrics table and the model card's comparison table.

use std::fmt::Write;

use super::{metric_cells, HEADINGS};
use crate::evaluation::Evaluation;

/// Text safe inside a Markdown table cell: pipes, emphasis, links, code and HTML are escaped,
/// line breaks become `<br>`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.trim().chars() {
        match c {
            '\n' => out.push_str("<br>"),
            '\r' => {}
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '|' | '\\' | '*' | '_' | '`' | '[' | ']' | '#' | '~' | '!' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// `thumbnails[k]` is the path, relative to the report, of image `k`'s thumbnail.
pub fn render(eval: &Evaluation, thumbnails: &[Option<String>], plot: bool) -> String {
    let mut s = String::from("# Caption evaluation\n\n");
    let _ = writeln!(
        s,
        "{} images scored against their ground truth{}.\n",
        eval.images.len(),
        if eval.left_out.is_empty() {
            String::new()
        } else {
            format!("; {} left out", eval.left_out.len())
        }
    );
    s.push_str("## Metrics\n\n| model |");
    for heading in HEADINGS {
        let _ = write!(s, " {heading} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(HEADINGS.len()));
    s.push('\n');
    for m in &eval.models {
        let _ = write!(s, "| {} |", escape(&m.name));
        for cell in metric_cells(m) {
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    if plot {
        s.push_str("\n## Loss\n\n![Training and validation loss](loss.png)\n");
    }
    s.push_str("\n## Captions\n\n| image | ground truth |");
    for m in &eval.models {
        let _ = write!(s, " {} |", escape(&m.name));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(eval.models.len()));
    s.push('\n');
    for (row, thumb) in eval.images.iter().zip(thumbnails) {
        let name = escape(&super::file_name(&row.image));
        let picture = thumb
            .as_ref()
            .map(|t| format!("![{name}]({t})<br>"))
            .unwrap_or_default();
        let truth: Vec<String> = row.references.iter().map(|r| escape(r)).collect();
        let _ = write!(s, "| {picture}{name} | {} |", truth.join("<br><br>"));
        for c in &row.captions {
            let _ = write!(s, " {} |", escape(c));
        }
        s.push('\n');
    }
    if !eval.left_out.is_empty() {
        s.push_str("\n## Left out\n\n");
        for e in &eval.left_out {
            let _ = writeln!(s, "- {}: {}", escape(&e.path.display().to_string()), escape(&e.reason));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_table_breakers() {
        assert_eq!(super::escape(" a|b *c* <i>\nx_y "), r"a\|b \*c\* &lt;i&gt;<br>x\_y");
    }
}
