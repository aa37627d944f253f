//! The PTB tokenizer port against pycocoevalcap 1.2's `PTBTokenizer` (Stanford CoreNLP 3.4.1), on
//! the cases of `tests/data/ptb_cases.json` (references by `tools/reference/ptb_ref.py`) and the
//! evaluation corpus `tests/data/captions.json` (references by `tools/reference/eval_ref.py`).

use std::path::Path;

use florence_eval::metrics::ptb::{tokenize, tokenize_batch, tokenize_joined};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(v: &Value) -> String {
    v.as_str().expect("a string").to_string()
}

/// Panics with every mismatch, as (what, caption, got, want).
fn assert_all_equal(what: &str, total: usize, mismatches: &[(String, String, String, String)]) {
    let report: Vec<String> = mismatches
        .iter()
        .map(|(kind, caption, got, want)| format!("{kind} {caption:?}\n   got  {got:?}\n   want {want:?}"))
        .collect();
    assert!(
        report.is_empty(),
        "{what}: {} of {total} differ:\n{}",
        report.len(),
        report.join("\n")
    );
}

#[test]
fn every_case_equals_pycocoevalcap() {
    let cases = load("ptb_cases.expected.json");
    let cases = cases.as_array().expect("a list of cases");
    let inputs: Vec<String> = load("ptb_cases.json")
        .as_array()
        .expect("a list")
        .iter()
        .map(text)
        .collect();
    let captions: Vec<String> = cases.iter().map(|c| text(&c["caption"])).collect();
    assert_eq!(
        captions, inputs,
        "ptb_cases.expected.json is not up to date: run tools/reference/ptb_ref.py"
    );
    assert!(cases.len() >= 300, "{} cases", cases.len());

    let together = tokenize_batch(&captions);
    let mut mismatches = Vec::new();
    for ((case, caption), tokens) in cases.iter().zip(&captions).zip(&together) {
        let want = text(&case["tokens"]);
        let got = tokens.join(" ");
        if got != want {
            mismatches.push(("in one call:".into(), caption.clone(), got, want));
        }
        // Alone, the caption is the last line: no next caption, the end of the file after it.
        let want = case.get("tokens_alone").map_or_else(|| text(&case["tokens"]), text);
        let got = tokenize_joined(caption);
        if got != want {
            mismatches.push(("alone:".into(), caption.clone(), got, want));
        }
    }
    assert_all_equal("ptb_cases", 2 * cases.len(), &mismatches);
}

#[test]
fn tokens_are_never_empty_nor_hold_spaces() {
    for caption in ["", " ", "\t\u{3000} ", "...", "\u{1F600}", "-- ; :"] {
        assert_eq!(tokenize(caption), Vec::<String>::new(), "{caption:?}");
        assert_eq!(tokenize_joined(caption), "", "{caption:?}");
    }
    assert_eq!(tokenize_batch::<&str>(&[]), Vec::<Vec<String>>::new());
    assert_eq!(
        tokenize_batch(&["", "a b", "   ", "c"]),
        [vec![], vec!["a", "b"], vec![], vec!["c"]]
    );
    let cases = load("ptb_cases.json");
    let captions: Vec<String> = cases.as_array().expect("a list").iter().map(text).collect();
    for tokens in tokenize_batch(&captions) {
        assert!(tokens.iter().all(|t| !t.is_empty() && !t.contains(' ')), "{tokens:?}");
    }
    // Runs of ?/! are one token, not in the toolkit's list.
    assert_eq!(tokenize("?!"), ["?!"]);
    // Fractions and phone numbers keep their space, as U+00A0.
    assert_eq!(tokenize("1 1/2 cups"), ["1\u{a0}1/2", "cups"]);
}

#[test]
fn a_caption_can_depend_on_the_next() {
    let joined = |captions: &[&str]| tokenize_batch(captions).iter().map(|t| t.join(" ")).collect::<Vec<_>>();
    assert_eq!(joined(&["the letter B.", "A dog."]), ["the letter b", "a dog"]);
    assert_eq!(joined(&["the letter B.", "a dog."]), ["the letter b.", "a dog"]);
    assert_eq!(joined(&["it says no.", "3 dogs"]), ["it says no.", "3 dogs"]);
    assert_eq!(joined(&["it says no.", "dogs"]), ["it says no", "dogs"]);
    assert_eq!(joined(&["a smiley :)", "x"]), ["a smiley :-rrb-", "x"]);
    assert_eq!(tokenize_joined("a smiley :)"), "a smiley -rrb-");
    // '\n' is a space; '\r' and the other line breaks shift the later captions, as in the toolkit.
    assert_eq!(joined(&["a\nb", "c"]), ["a b", "c"]);
    assert_eq!(joined(&["a\rb", "c", "d"]), ["a", "b", "c"]);
}

/// Each corpus item's tokens as `eval_ref.py` got them: references in one call, predictions in
/// another (pycocoevalcap's `COCOEvalCap.evaluate`), and each caption alone.
#[test]
fn evaluation_corpus_equals_pycocoevalcap() {
    let mut mismatches = Vec::new();
    let mut total = 0;
    for (corpus, expected) in [
        ("captions.json", "captions.expected.json"),
        ("captions_coco_style.json", "captions_coco_style.expected.json"),
    ] {
        let items = load(corpus);
        let items = items.as_array().expect("a list of items");
        let expected = load(expected);
        let sentences = expected["sentences"].as_array().expect("sentences");
        assert_eq!(items.len(), sentences.len(), "{corpus}");
        let mut captions = Vec::new();
        let mut wants = Vec::new();
        for (item, sentence) in items.iter().zip(sentences) {
            let refs = item["references"].as_array().expect("references");
            let want_refs = sentence["ptb_references"].as_array().expect("ptb_references");
            assert_eq!(refs.len(), want_refs.len(), "{corpus} {}", item["id"]);
            captions.extend(refs.iter().map(text));
            wants.extend(want_refs.iter().map(text));
        }
        let predictions: Vec<String> = items.iter().map(|i| text(&i["prediction"])).collect();
        let want_predictions: Vec<String> = sentences.iter().map(|s| text(&s["ptb_prediction"])).collect();
        for (captions, wants) in [(captions, wants), (predictions, want_predictions)] {
            total += captions.len();
            let together = tokenize_batch(&captions);
            for ((caption, tokens), want) in captions.iter().zip(&together).zip(&wants) {
                let got = tokens.join(" ");
                if &got != want {
                    mismatches.push((format!("{corpus}, in one call:"), caption.clone(), got, want.clone()));
                }
                let got = tokenize_joined(caption);
                if &got != want {
                    mismatches.push((format!("{corpus}, alone:"), caption.clone(), got, want.clone()));
                }
            }
        }
    }
    assert_all_equal("evaluation corpora", total, &mismatches);
}
