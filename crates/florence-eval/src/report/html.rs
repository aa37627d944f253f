//! `report.html`: one file with everything inline (thumbnails and the plot as `data:` URIs, the
//! style and the sorting script), so it opens anywhere and makes no requests.

use std::fmt::Write;

use base64::Engine;

use super::{metric_cells, HEADINGS};
use crate::evaluation::Evaluation;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:6px 8px;vertical-align:top}\
th{background:#f3f3f3}#metrics th{cursor:pointer}#metrics td.n{text-align:right;font-variant-numeric:tabular-nums}\
#captions td{max-width:32em}img.thumb{max-width:256px;max-height:256px}.scores{color:#777;font-size:.85em}\
ul{margin:0;padding-left:1.2em}";

/// Clicking a metrics heading sorts the models by it (again: the other way).
const SCRIPT: &str = "document.querySelectorAll('#metrics th').forEach((th,i)=>th.addEventListener('click',()=>{\
const body=th.closest('table').tBodies[0];const rows=[...body.rows];const up=th.dataset.up!=='1';\
th.dataset.up=up?'1':'0';const key=r=>{const t=r.cells[i].textContent;const x=parseFloat(t);return isNaN(x)?t:x};\
rows.sort((a,b)=>{const x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(up?1:-1)});rows.forEach(r=>body.appendChild(r))}));";

/// `thumbnails[k]` is the JPEG of image `k`, when it could be decoded.
pub fn render(eval: &Evaluation, thumbnails: &[Option<Vec<u8>>], plot_png: Option<&[u8]>) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Caption evaluation</title>\
         <style>{STYLE}</style></head><body>\n<h1>Caption evaluation</h1>\n<p>{} images scored against their ground truth{}.</p>\n",
        eval.images.len(),
        if eval.left_out.is_empty() { String::new() } else { format!("; {} left out", eval.left_out.len()) }
    );
    s.push_str("<h2>Metrics</h2>\n<table id=\"metrics\"><thead><tr><th>model</th>");
    for heading in HEADINGS {
        let _ = write!(s, "<th>{heading}</th>");
    }
    s.push_str("</tr></thead><tbody>\n");
    for m in &eval.models {
        let _ = write!(s, "<tr><td>{}</td>", escape(&m.name));
        for cell in metric_cells(m) {
            let _ = write!(s, "<td class=\"n\">{cell}</td>");
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
    if let Some(png) = plot_png {
        let _ = writeln!(
            s,
            "<h2>Loss</h2>\n<img id=\"loss\" alt=\"Training and validation loss\" src=\"{}\">",
            data_uri("image/png", png)
        );
    }
    captions_table(&mut s, eval, thumbnails);
    if !eval.left_out.is_empty() {
        s.push_str("<h2>Left out</h2>\n<ul>");
        for e in &eval.left_out {
            let _ = write!(
                s,
                "<li>{}: {}</li>",
                escape(&e.path.display().to_string()),
                escape(&e.reason)
            );
        }
        s.push_str("</ul>\n");
    }
    let _ = write!(s, "<script>{SCRIPT}</script>\n</body></html>\n");
    s
}

fn captions_table(s: &mut String, eval: &Evaluation, thumbnails: &[Option<Vec<u8>>]) {
    s.push_str("<h2>Captions</h2>\n<table id=\"captions\"><thead><tr><th>image</th><th>ground truth</th>");
    for m in &eval.models {
        let _ = write!(s, "<th>{}</th>", escape(&m.name));
    }
    s.push_str("</tr></thead><tbody>\n");
    for (row, jpeg) in eval.images.iter().zip(thumbnails) {
        let name = escape(&super::file_name(&row.image));
        let picture = match jpeg {
            Some(jpeg) => format!(
                "<img class=\"thumb\" alt=\"{name}\" src=\"{}\"><br>",
                data_uri("image/jpeg", jpeg)
            ),
            None => String::new(),
        };
        let _ = write!(s, "<tr><td>{picture}{name}</td><td><ul>");
        for r in &row.references {
            let _ = write!(s, "<li>{}</li>", escape(r));
        }
        s.push_str("</ul></td>");
        for (c, sc) in row.captions.iter().zip(&row.scores) {
            let _ = write!(
                s,
                "<td>{}<div class=\"scores\">BLEU {:.1} · chrF {:.1} · ROUGE-L {:.3} · CIDEr-D {:.3}</div></td>",
                if c.trim().is_empty() {
                    "<em>(empty)</em>".to_string()
                } else {
                    escape(c)
                },
                sc.sacrebleu,
                sc.chrf,
                sc.rouge_l,
                sc.cider_d
            );
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
}
