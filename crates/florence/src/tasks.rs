//! Florence-2's tasks: turning a task token into the prompt text (spec §2.1) and the generated
//! text into captions, boxes, quad boxes or polygons in original-image pixels (spec §8), as the
//! original processor's `post_process_generation` does.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Serialize, Serializer};

use crate::error::{Error, Result};

/// How a task's generated text is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostProcess {
    /// Plain text with `<s>`/`</s>` removed.
    PureText,
    /// `label<loc_x1><loc_y1><loc_x2><loc_y2>...` to boxes and labels.
    DescriptionWithBboxes,
    /// Boxes without labels.
    Bboxes,
    /// Text lines with 8-coordinate quadrilaterals.
    Ocr,
    /// Phrases with all their boxes, minus pronouns and other non-grounding phrases.
    PhraseGrounding,
    /// Polygons separated by `<sep>`.
    Polygons,
    /// Polygons when the output has `<poly>`, boxes otherwise.
    DescriptionWithBboxesOrPolygons,
}

/// A Florence-2 task token, its prompt template and its post-processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task token, such as `<CAPTION>`.
    pub token: &'static str,
    /// The prompt text; `{input}` is replaced by the task's text input.
    pub template: &'static str,
    /// How the generated text is parsed.
    pub post_process: PostProcess,
}

impl TaskSpec {
    /// Whether the task takes a text input (a phrase, an expression or a region).
    pub fn needs_input(&self) -> bool {
        self.template.contains("{input}")
    }
}

/// The 15 task tokens of the published checkpoints.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        token: "<OCR>",
        template: "What is the text in the image?",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<OCR_WITH_REGION>",
        template: "What is the text in the image, with regions?",
        post_process: PostProcess::Ocr,
    },
    TaskSpec {
        token: "<CAPTION>",
        template: "What does the image describe?",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<DETAILED_CAPTION>",
        template: "Describe in detail what is shown in the image.",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<MORE_DETAILED_CAPTION>",
        template: "Describe with a paragraph what is shown in the image.",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<OD>",
        template: "Locate the objects with category name in the image.",
        post_process: PostProcess::DescriptionWithBboxes,
    },
    TaskSpec {
        token: "<DENSE_REGION_CAPTION>",
        template: "Locate the objects in the image, with their descriptions.",
        post_process: PostProcess::DescriptionWithBboxes,
    },
    TaskSpec {
        token: "<REGION_PROPOSAL>",
        template: "Locate the region proposals in the image.",
        post_process: PostProcess::Bboxes,
    },
    TaskSpec {
        token: "<CAPTION_TO_PHRASE_GROUNDING>",
        template: "Locate the phrases in the caption: {input}",
        post_process: PostProcess::PhraseGrounding,
    },
    TaskSpec {
        token: "<REFERRING_EXPRESSION_SEGMENTATION>",
        template: "Locate {input} in the image with mask",
        post_process: PostProcess::Polygons,
    },
    TaskSpec {
        token: "<REGION_TO_SEGMENTATION>",
        template: "What is the polygon mask of region {input}",
        post_process: PostProcess::Polygons,
    },
    TaskSpec {
        token: "<OPEN_VOCABULARY_DETECTION>",
        template: "Locate {input} in the image.",
        post_process: PostProcess::DescriptionWithBboxesOrPolygons,
    },
    TaskSpec {
        token: "<REGION_TO_CATEGORY>",
        template: "What is the region {input}?",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<REGION_TO_DESCRIPTION>",
        template: "What does the region {input} describe?",
        post_process: PostProcess::PureText,
    },
    TaskSpec {
        token: "<REGION_TO_OCR>",
        template: "What text is in the region {input}?",
        post_process: PostProcess::PureText,
    },
];

/// A request: a known task token (with its input, if it takes one) or free prompt text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The task token, or the whole prompt for free-text prompts.
    pub name: String,
    /// The text fed to the tokenizer.
    pub prompt: String,
    /// How the generated text is parsed.
    pub post_process: PostProcess,
}

impl Task {
    /// Builds the prompt the original processor builds for `task` and `text_input`.
    ///
    /// A known token that takes an input needs `text_input`; one that does not rejects it.
    /// Anything else is a free-text prompt (as fine-tunes with custom prompts use), passed verbatim
    /// with `text_input` appended.
    pub fn new(task: &str, text_input: Option<&str>) -> Result<Self> {
        let Some(spec) = TASKS.iter().find(|t| t.token == task) else {
            let prompt = format!("{task}{}", text_input.unwrap_or(""));
            return Ok(Self {
                name: task.to_string(),
                prompt,
                post_process: PostProcess::PureText,
            });
        };
        let prompt = match (spec.needs_input(), text_input) {
            (true, Some(input)) => spec.template.replace("{input}", input),
            (true, None) => {
                return Err(Error::usage(format!(
                    "task {task} needs a text input: pass --text-input (e.g. a phrase, or a region as \
                     <loc_x1><loc_y1><loc_x2><loc_y2>)"
                )))
            }
            (false, Some(input)) if !input.is_empty() => {
                return Err(Error::usage(format!(
                    "task {task} takes no text input, but got {input:?}"
                )))
            }
            (false, _) => spec.template.to_string(),
        };
        Ok(Self {
            name: task.to_string(),
            prompt,
            post_process: spec.post_process,
        })
    }

    /// Parses the decoded generation (special tokens kept) for an image of `width` x `height`.
    pub fn post_process(&self, raw: &str, width: u32, height: u32) -> TaskResult {
        post_process(self.post_process, raw, (width, height))
    }
}

/// A task's answer for one image, coordinates in pixels of the original image. It serializes
/// to the JSON of Microsoft's processor: a string for text tasks, an object for the others.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TaskResult {
    /// The text of captioning, OCR and region-description tasks.
    Text(String),
    /// Boxes with a label each (detection, dense captions, grounding, region proposals).
    Boxes {
        /// `[x1, y1, x2, y2]` per box.
        bboxes: Vec<Coords>,
        /// One label per box (empty for region proposals).
        labels: Vec<String>,
    },
    /// Text lines with their quadrilaterals (`<OCR_WITH_REGION>`).
    Quads {
        /// One text line per quadrilateral.
        labels: Vec<String>,
        /// `[x1, y1, ..., x4, y4]` per line.
        quad_boxes: Vec<Coords>,
    },
    /// Polygons grouped by label (segmentation tasks).
    Polygons {
        /// One label per group.
        labels: Vec<String>,
        /// Per label, its polygons as `[x1, y1, x2, y2, ...]`.
        polygons: Vec<Vec<Coords>>,
    },
    /// Boxes or polygons, whichever the model produced (`<OPEN_VOCABULARY_DETECTION>`).
    BoxesOrPolygons {
        /// `[x1, y1, x2, y2]` per box.
        bboxes: Vec<Coords>,
        /// One label per box.
        bboxes_labels: Vec<String>,
        /// Per label, its polygons.
        polygons: Vec<Vec<Coords>>,
        /// One label per polygon group.
        polygons_labels: Vec<String>,
    },
}

impl TaskResult {
    /// The text, for text tasks.
    pub fn text(&self) -> Option<&str> {
        match self {
            TaskResult::Text(t) => Some(t),
            _ => None,
        }
    }
}

impl std::fmt::Display for TaskResult {
    /// The text for text tasks, the JSON object for the others.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskResult::Text(t) => f.write_str(t),
            other => f.write_str(&serde_json::to_string(other).map_err(|_| std::fmt::Error)?),
        }
    }
}

/// Coordinates in pixels, computed in float32 as the original processor does; written to JSON
/// as the float64 values Python prints for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Coords(pub Vec<f32>);

impl Serialize for Coords {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|&x| x as f64))
    }
}

/// Bin centre in pixels, in the original's float32 arithmetic: `(bin + 0.5) * (size / 1000)`.
fn dequantize(bin: u32, size: u32) -> f32 {
    (bin as f32 + 0.5) * (size as f64 / 1000.0) as f32
}

fn loc_values(s: &str) -> Vec<u32> {
    static LOC: OnceLock<Regex> = OnceLock::new();
    let re = LOC.get_or_init(|| Regex::new(r"<loc_(\d+)>").unwrap());
    re.captures_iter(s).filter_map(|c| c[1].parse().ok()).collect()
}

fn boxes_in(s: &str, size: (u32, u32)) -> Vec<Vec<f32>> {
    static BOX: OnceLock<Regex> = OnceLock::new();
    let re = BOX.get_or_init(|| Regex::new(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>").unwrap());
    re.captures_iter(s)
        .map(|c| {
            (1..=4)
                .map(|j| {
                    let bin: u32 = c[j].parse().unwrap_or(0);
                    dequantize(bin, if j % 2 == 1 { size.0 } else { size.1 })
                })
                .collect()
        })
        .collect()
}

fn points(bins: &[u32], size: (u32, u32)) -> Vec<f32> {
    let even = bins.len() - bins.len() % 2;
    bins[..even]
        .iter()
        .enumerate()
        .map(|(i, &b)| dequantize(b, if i % 2 == 0 { size.0 } else { size.1 }))
        .collect()
}

/// The phrase before the first location-like token (`^\s*(.*?)(?=<od>|...|<loc_)`), stripped.
/// `None` when no such token follows on the same line.
fn phrase_before_markers(text: &str, with_poly: bool) -> Option<String> {
    const MARKERS: &[&str] = &["<od>", "</od>", "<box>", "</box>", "<bbox>", "</bbox>", "<loc_"];
    let poly: &[&str] = if with_poly { &["<poly>"] } else { &[] };
    let body = text.trim_start();
    let end = MARKERS.iter().chain(poly).filter_map(|m| body.find(m)).min()?;
    // The original's `.` does not cross a newline.
    if body[..end].contains('\n') {
        return None;
    }
    Some(body[..end].trim().to_string())
}

fn ascii_only(s: &str) -> String {
    s.chars().filter(char::is_ascii).collect()
}

fn clean(raw: &str) -> String {
    raw.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
}

/// Pronouns and other phrases the original phrase-grounding parser drops.
const GROUNDING_BLACKLIST: &[&str] = &[
    "it",
    "I",
    "me",
    "mine",
    "you",
    "your",
    "yours",
    "he",
    "him",
    "his",
    "she",
    "her",
    "hers",
    "they",
    "them",
    "their",
    "theirs",
    "one",
    "oneself",
    "we",
    "us",
    "our",
    "ours",
    "its",
    "myself",
    "yourself",
    "himself",
    "herself",
    "itself",
    "ourselves",
    "yourselves",
    "themselves",
    "this",
    "that",
    "these",
    "those",
    "who",
    "whom",
    "whose",
    "which",
    "what",
    "all",
    "another",
    "any",
    "anybody",
    "anyone",
    "anything",
    "each",
    "everybody",
    "everyone",
    "everything",
    "few",
    "many",
    "nobody",
    "none",
    "several",
    "some",
    "somebody",
    "someone",
    "something",
    "each other",
    "one another",
    "the image",
    "image",
    "images",
    "the",
    "a",
    "an",
    "a group",
    "other objects",
    "lots",
    "a set",
];

/// `(label, boxes)` per phrase of a `label<loc>x4...` text.
fn phrases_with_boxes(text: &str, allow_empty: bool, size: (u32, u32)) -> Vec<(String, Vec<Vec<f32>>)> {
    static WITH_TEXT: OnceLock<Regex> = OnceLock::new();
    static EMPTY: OnceLock<Regex> = OnceLock::new();
    let re = if allow_empty {
        EMPTY.get_or_init(|| Regex::new(r"(?:<loc_\d+>){4,}").unwrap())
    } else {
        WITH_TEXT.get_or_init(|| Regex::new(r"[^<]+(?:<loc_\d+>){4,}").unwrap())
    };
    re.find_iter(text)
        .filter_map(|m| {
            let phrase_text = m.as_str();
            let label = phrase_before_markers(phrase_text, false)?;
            let boxes = boxes_in(phrase_text, size);
            (!boxes.is_empty()).then_some((label, boxes))
        })
        .collect()
}

fn polygons_of(text: &str, allow_empty: bool, size: (u32, u32)) -> Vec<(String, Vec<Vec<f32>>)> {
    static WITH_TEXT: OnceLock<Regex> = OnceLock::new();
    static EMPTY: OnceLock<Regex> = OnceLock::new();
    static INSTANCE: OnceLock<Regex> = OnceLock::new();
    static POLY: OnceLock<Regex> = OnceLock::new();
    let re = if allow_empty {
        EMPTY.get_or_init(|| Regex::new(r"(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}").unwrap())
    } else {
        WITH_TEXT.get_or_init(|| Regex::new(r"[^<]+(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}").unwrap())
    };
    let instance_re = INSTANCE.get_or_init(|| Regex::new(r"<poly>(.*?)</poly>").unwrap());
    let poly_re = POLY.get_or_init(|| Regex::new(r"((?:<loc_\d+>)+)(?:<sep>|$)").unwrap());
    let mut out = Vec::new();
    for m in re.find_iter(text) {
        let phrase_text = m.as_str();
        let Some(label) = phrase_before_markers(phrase_text, true) else {
            continue;
        };
        let instances: Vec<&str> = if phrase_text.contains("<poly>") && phrase_text.contains("</poly>") {
            instance_re
                .captures_iter(phrase_text)
                .map(|c| c.get(1).unwrap().as_str())
                .collect()
        } else {
            vec![phrase_text]
        };
        for inst in instances {
            let polys: Vec<Vec<f32>> = poly_re
                .captures_iter(inst)
                .map(|c| points(&loc_values(&c[1]), size))
                .collect();
            if !polys.is_empty() {
                out.push((label.clone(), polys));
            }
        }
    }
    out
}

/// One box per entry, each labelled with its phrase (ASCII only, as the original keeps it).
fn flat_boxes(phrases: impl IntoIterator<Item = (String, Vec<Vec<f32>>)>) -> (Vec<Coords>, Vec<String>) {
    let (mut bboxes, mut labels) = (Vec::new(), Vec::new());
    for (label, boxes) in phrases {
        let label = ascii_only(&label);
        for b in boxes {
            bboxes.push(Coords(b));
            labels.push(label.clone());
        }
    }
    (bboxes, labels)
}

/// One polygon group per phrase, with its label.
fn polygon_groups(phrases: Vec<(String, Vec<Vec<f32>>)>) -> (Vec<Vec<Coords>>, Vec<String>) {
    phrases
        .into_iter()
        .map(|(label, polys)| (polys.into_iter().map(Coords).collect(), label))
        .unzip()
}

/// Parses `raw` (decoded with special tokens) by `kind`; `size` is the original `(width, height)`.
pub fn post_process(kind: PostProcess, raw: &str, size: (u32, u32)) -> TaskResult {
    let text = clean(raw);
    match kind {
        PostProcess::PureText => TaskResult::Text(raw.replace("<s>", "").replace("</s>", "")),
        PostProcess::DescriptionWithBboxes | PostProcess::Bboxes => {
            let (bboxes, labels) = flat_boxes(phrases_with_boxes(&text, kind == PostProcess::Bboxes, size));
            TaskResult::Boxes { bboxes, labels }
        }
        PostProcess::PhraseGrounding => {
            // The blacklist is checked before non-ASCII characters are dropped, as in the original.
            let phrases = phrases_with_boxes(&text, false, size)
                .into_iter()
                .filter(|(label, _)| !GROUNDING_BLACKLIST.contains(&label.as_str()));
            let (bboxes, labels) = flat_boxes(phrases);
            TaskResult::Boxes { bboxes, labels }
        }
        PostProcess::Ocr => {
            // Like the native processor, and unlike the original one, `</s>` and `<pad>` are
            // removed and labels stripped, so the first label does not start with "</s>".
            static OCR: OnceLock<Regex> = OnceLock::new();
            let re = OCR.get_or_init(|| Regex::new(&format!("(.+?){}", r"<loc_(\d+)>".repeat(8))).unwrap());
            let (mut quad_boxes, mut labels) = (Vec::new(), Vec::new());
            for c in re.captures_iter(&text) {
                let bins: Vec<u32> = (2..=9).map(|j| c[j].parse().unwrap_or(0)).collect();
                quad_boxes.push(Coords(points(&bins, size)));
                labels.push(c[1].trim().to_string());
            }
            TaskResult::Quads { labels, quad_boxes }
        }
        PostProcess::Polygons => {
            let (polygons, labels) = polygon_groups(polygons_of(&text, true, size));
            TaskResult::Polygons { labels, polygons }
        }
        PostProcess::DescriptionWithBboxesOrPolygons => {
            let ((bboxes, bboxes_labels), (polygons, polygons_labels)) = if raw.contains("<poly>") {
                (Default::default(), polygon_groups(polygons_of(&text, false, size)))
            } else {
                (flat_boxes(phrases_with_boxes(&text, false, size)), Default::default())
            };
            TaskResult::BoxesOrPolygons {
                bboxes,
                bboxes_labels,
                polygons,
                polygons_labels,
            }
        }
    }
}
