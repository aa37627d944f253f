//! Every metric equals its reference implementation on the committed corpora, whose expected
//! numbers `tools/reference/eval_ref.py` computed with sacreBLEU, rouge-score and pycocoevalcap.

use std::path::PathBuf;

use florence_eval::metrics::{self, coco, rouge, sacrebleu, Scored};
use serde_json::Value;

const TOLERANCE: f64 = 1e-6;

struct Corpus {
    name: &'static str,
    items: Vec<(Vec<String>, String)>,
    expected: Value,
}

fn corpus(name: &'static str) -> Corpus {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let read = |f: String| -> Value { serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap() };
    let items = read(format!("{name}.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let refs = i["references"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            (refs, i["prediction"].as_str().unwrap().to_string())
        })
        .collect();
    Corpus {
        name,
        items,
        expected: read(format!("{name}.expected.json")),
    }
}

fn corpora() -> [Corpus; 2] {
    [corpus("captions"), corpus("captions_coco_style")]
}

/// Collects every value further than the tolerance from the reference, to report them all.
#[derive(Default)]
struct Check(Vec<String>);

impl Check {
    fn close(&mut self, what: String, got: f64, want: &Value) {
        let want = want.as_f64().unwrap_or_else(|| panic!("{what}: no reference value"));
        if (got - want).abs() > TOLERANCE {
            self.0.push(format!("{what}: {got} vs reference {want}"));
        }
    }

    fn done(self) {
        assert!(
            self.0.is_empty(),
            "{} differences:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

#[test]
fn corpus_and_sentence_scores_equal_the_references() {
    let mut check = Check::default();
    for c in corpora() {
        let scored: Vec<Scored> = c
            .items
            .iter()
            .map(|(refs, pred)| Scored {
                prediction: pred,
                references: refs,
            })
            .collect();
        let (corpus, images) = metrics::score(&scored);
        let want = &c.expected["corpus"];
        let n = c.name;
        check.close(format!("{n} sacrebleu"), corpus.sacrebleu, &want["sacrebleu"]);
        check.close(format!("{n} chrf"), corpus.chrf, &want["chrf"]);
        check.close(format!("{n} rouge_l"), corpus.rouge_l, &want["rouge_l"]);
        check.close(format!("{n} bleu4_coco"), corpus.bleu4_coco, &want["bleu4_coco"]);
        check.close(format!("{n} cider_d"), corpus.cider_d, &want["cider_d"]);
        for k in 0..4 {
            check.close(
                format!("{n} bleu_coco[{k}]"),
                corpus.bleu_coco[k],
                &want["bleu_coco"][k],
            );
        }
        let detail = &want["sacrebleu_detail"];
        assert_eq!(
            serde_json::to_value(corpus.sacrebleu_detail.counts).unwrap(),
            detail["counts"],
            "{n}"
        );
        assert_eq!(
            serde_json::to_value(corpus.sacrebleu_detail.totals).unwrap(),
            detail["totals"],
            "{n}"
        );
        assert_eq!(
            corpus.sacrebleu_detail.ref_len,
            detail["ref_len"].as_u64().unwrap(),
            "{n}"
        );
        for (k, (got, want)) in images
            .iter()
            .zip(c.expected["sentences"].as_array().unwrap())
            .enumerate()
        {
            check.close(format!("{n}[{k}] sacrebleu"), got.sacrebleu, &want["sacrebleu"]);
            check.close(format!("{n}[{k}] chrf"), got.chrf, &want["chrf"]);
            check.close(format!("{n}[{k}] rouge_l"), got.rouge_l, &want["rouge_l"]);
            check.close(format!("{n}[{k}] bleu4_coco"), got.bleu4_coco, &want["bleu4_coco"]);
            check.close(format!("{n}[{k}] cider_d"), got.cider_d, &want["cider_d"]);
        }
    }
    check.done();
}

/// The COCO metrics on the reference's own PTB tokens, so that they are checked apart from the
/// tokenizer; and the tokenizer on every caption of the corpora.
#[test]
fn coco_metrics_on_the_reference_tokens_and_ptb_tokens_equal() {
    let mut check = Check::default();
    let mut tokens = Vec::new();
    for c in corpora() {
        let sentences = c.expected["sentences"].as_array().unwrap();
        let ptb: Vec<(String, Vec<String>)> = sentences
            .iter()
            .map(|s| {
                let refs = s["ptb_references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().into())
                    .collect();
                (s["ptb_prediction"].as_str().unwrap().to_string(), refs)
            })
            .collect();
        let tokenized: Vec<coco::Tokenized> = ptb
            .iter()
            .map(|(p, r)| coco::Tokenized {
                prediction: p,
                references: r,
            })
            .collect();
        let (bleu, bleu_images) = coco::bleu(&tokenized);
        let (cider, cider_images) = coco::cider_d(&tokenized);
        let n = c.name;
        check.close(format!("{n} bleu4_coco"), bleu[3], &c.expected["corpus"]["bleu4_coco"]);
        check.close(format!("{n} cider_d"), cider, &c.expected["corpus"]["cider_d"]);
        for (k, s) in sentences.iter().enumerate() {
            for o in 0..4 {
                check.close(
                    format!("{n}[{k}] bleu_coco[{o}]"),
                    bleu_images[k][o],
                    &s["bleu_coco"][o],
                );
            }
            check.close(format!("{n}[{k}] cider_d"), cider_images[k], &s["cider_d"]);
        }
        for ((refs, pred), (ptb_pred, ptb_refs)) in c.items.iter().zip(&ptb) {
            tokens.push((pred.clone(), metrics::ptb::tokenize(pred).join(" "), ptb_pred.clone()));
            for (r, want) in refs.iter().zip(ptb_refs) {
                tokens.push((r.clone(), metrics::ptb::tokenize(r).join(" "), want.clone()));
            }
        }
    }
    for (caption, got, want) in tokens {
        if got != want {
            check
                .0
                .push(format!("PTB {caption:?}:\n  ours      {got:?}\n  reference {want:?}"));
        }
    }
    check.done();
}

/// The public single-sentence entry points agree with the corpus path on one segment.
#[test]
fn sentence_functions_match_the_reference() {
    let c = corpus("captions");
    let mut check = Check::default();
    for ((refs, pred), want) in c.items.iter().zip(c.expected["sentences"].as_array().unwrap()) {
        check.close(
            format!("{pred:?} bleu"),
            sacrebleu::sentence_bleu(pred, refs).score,
            &want["sacrebleu"],
        );
        let default = sacrebleu::corpus_bleu(&[pred], std::slice::from_ref(refs)).score;
        check.close(
            format!("{pred:?} bleu (no effective order)"),
            default,
            &want["sacrebleu_default"],
        );
        check.close(
            format!("{pred:?} chrf"),
            sacrebleu::sentence_chrf(pred, refs),
            &want["chrf"],
        );
        check.close(
            format!("{pred:?} rouge"),
            rouge::rouge_l_multi(refs, pred),
            &want["rouge_l"],
        );
    }
    check.done();
}
