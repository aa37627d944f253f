"""Scores a caption corpus with the reference implementations `florence eval` must match, and
writes the numbers to <corpus>.expected.json beside each corpus (or to --out).

    python tools/reference/eval_ref.py crates/florence-eval/tests/data/captions.json \\
        crates/florence-eval/tests/data/captions_coco_style.json
    python tools/reference/eval_ref.py my_corpus.json --out /tmp/my_corpus.expected.json

A corpus is a JSON list of {"id": "img_000.jpg", "references": ["...", ...], "prediction": "..."}
(ids unique, at least one reference each; the number of references may vary per image).

Metrics, each computed the way it is usually cited (needs requirements.txt and Java):
  sacrebleu   sacrebleu.metrics.BLEU() defaults (13a, exp smoothing, closest ref length), 0-100.
              Corpus: corpus_score over reference streams padded with None (see below).
              Per sentence: BLEU(effective_order=True).sentence_score (what sacrebleu recommends
              for sentence BLEU), stored as "sacrebleu"; the default BLEU().sentence_score
              (effective_order=False) is stored as "sacrebleu_default".
  chrf        sacrebleu.metrics.CHRF() defaults (chrF2, char order 6, no word n-grams), 0-100.
  rouge_l     rouge_score RougeScorer(["rougeL"], use_stemmer=False) F-measure, 0-1; several
              references: score_multi (the reference with the highest F-measure). Corpus value:
              plain mean over images, summed left to right in corpus order.
  bleu_coco   pycocoevalcap Bleu(4) on PTB-tokenized text (PTBTokenizer as pycocoevalcap's
              eval.py runs it: references and predictions tokenized in two separate calls),
              [Bleu_1, Bleu_2, Bleu_3, Bleu_4]; "bleu4_coco" is Bleu_4. 0-1.
  cider_d     pycocoevalcap Cider() (the COCO "CIDEr", which is CIDEr-D: clipped counts, Gaussian
              length penalty sigma 6, x10) on the PTB-tokenized text. Corpus = numpy mean.
  meteor      pycocoevalcap Meteor() (java -jar meteor-1.5.jar - - -stdio -l en -norm) on the
              PTB-tokenized text.

Variable reference counts in sacrebleu 2.6 (metrics/base.py, Metric._cache_references): the
references are "streams" (stream k = the k-th reference of every segment); zip(*streams) gives
each segment's references and `None` entries are dropped there (`lines = [x for x in refs if x
is not None]`), so a segment with fewer references is padded with None. An empty string '' is
NOT dropped: it would count as a reference of length 0 (and change the closest reference length),
so None is the supported padding. With None the statistics are exactly those of each segment
scored against only its own references (checked below against per-segment statistics).

Any exception a library raises is caught and its text stored under "errors"; then the corpus is
scored again without the items that caused it, under "excluding" (not needed for the committed
corpora: nothing raises, see the expected files).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
import traceback
from importlib import metadata

from sacrebleu.metrics import BLEU, CHRF
from rouge_score import rouge_scorer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor

# sacrebleu warns on every default-order sentence_score; the numbers are what we want here.
logging.getLogger("sacrebleu").setLevel(logging.ERROR)


def fail(msg):
    print(f"eval_ref: {msg}", file=sys.stderr)
    sys.exit(2)


def load_corpus(path):
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list) or not items:
        fail(f"{path}: expected a non-empty JSON list")
    seen = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict) or set(it) != {"id", "references", "prediction"}:
            fail(f"{path}: item {i} must have exactly id, references, prediction")
        if not isinstance(it["id"], str) or it["id"] in seen:
            fail(f"{path}: item {i}: id missing or duplicated")
        seen.add(it["id"])
        refs = it["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            fail(f"{path}: item {i}: references must be a non-empty list of strings")
        if not isinstance(it["prediction"], str):
            fail(f"{path}: item {i}: prediction must be a string")
    return items


def num(x):
    """A plain float (numpy scalars and ints included), kept at full precision by json."""
    return float(x)


def mean_left_to_right(values):
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def versions():
    out = {"python": platform.python_version()}
    for dist in ("sacrebleu", "rouge-score", "pycocoevalcap", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
        out["java"] = (java.stderr or java.stdout).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        out["java"] = f"unavailable: {e}"
    return out


def error_text(e):
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    return text or type(e).__name__


# ---------------------------------------------------------------------------------------------
# sacrebleu and rouge-score (raw text)
# ---------------------------------------------------------------------------------------------


def reference_streams(items):
    """Stream k holds the k-th reference of every item, None where an item has fewer."""
    width = max(len(it["references"]) for it in items)
    return [[it["references"][k] if k < len(it["references"]) else None for it in items]
            for k in range(width)]


def bleu_detail(score):
    return {
        "score": num(score.score),
        "counts": [int(c) for c in score.counts],
        "totals": [int(t) for t in score.totals],
        "sys_len": int(score.sys_len),
        "ref_len": int(score.ref_len),
        "precisions": [num(p) for p in score.precisions],
        "bp": num(score.bp),
    }


def sacrebleu_corpus(items, corpus, sentences):
    hyps = [it["prediction"] for it in items]
    streams = reference_streams(items)

    bleu = BLEU()
    score = bleu.corpus_score(hyps, streams)
    corpus["sacrebleu"] = num(score.score)
    corpus["sacrebleu_detail"] = bleu_detail(score)
    corpus["sacrebleu_signature"] = str(bleu.get_signature())

    # The None padding gives exactly the per-segment statistics, summed.
    per_segment = [BLEU()._extract_corpus_statistics([it["prediction"]], [[r] for r in it["references"]])[0]
                   for it in items]
    summed = [sum(col) for col in zip(*per_segment)]
    whole = [sum(col) for col in zip(*BLEU()._extract_corpus_statistics(hyps, streams))]
    assert summed == whole, (summed, whole)

    chrf = CHRF()
    corpus["chrf"] = num(chrf.corpus_score(hyps, streams).score)
    corpus["chrf_signature"] = str(chrf.get_signature())

    for it, s in zip(items, sentences):
        eff = BLEU(effective_order=True).sentence_score(it["prediction"], it["references"])
        default = BLEU().sentence_score(it["prediction"], it["references"])
        s["sacrebleu"] = num(eff.score)
        s["sacrebleu_detail"] = bleu_detail(eff)
        s["sacrebleu_default"] = num(default.score)
        s["chrf"] = num(CHRF().sentence_score(it["prediction"], it["references"]).score)


def rouge_corpus(items, corpus, sentences):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    values = []
    for it, s in zip(items, sentences):
        refs = it["references"]
        if len(refs) > 1:
            value = scorer.score_multi(refs, it["prediction"])["rougeL"].fmeasure
        else:
            value = scorer.score(refs[0], it["prediction"])["rougeL"].fmeasure
        s["rouge_l"] = num(value)
        values.append(num(value))
    corpus["rouge_l"] = mean_left_to_right(values)


# ---------------------------------------------------------------------------------------------
# pycocoevalcap (PTB-tokenized text)
# ---------------------------------------------------------------------------------------------


PTB_LINE_BREAKS = "\r\x0b\x0c\u2028\u2029"


def ptb_tokenize(items, sentences):
    # The wrapper writes one caption per line ('\n' replaced by a space) and pairs the output
    # lines with the captions by position. Java's PTBTokenizer also ends a line at \r, \v, \f,
    # U+2028 and U+2029, so such a caption would silently shift every later caption onto the
    # wrong image (zip drops the surplus): refuse those instead.
    for it in items:
        for text in it["references"] + [it["prediction"]]:
            bad = sorted({f"U+{ord(c):04X}" for c in text if c in PTB_LINE_BREAKS})
            if bad:
                raise RuntimeError(f"{it['id']}: caption contains {', '.join(bad)}, which the PTBTokenizer "
                                   "wrapper turns into extra lines (its output would be misaligned)")
    gts = {it["id"]: [{"caption": r} for r in it["references"]] for it in items}
    res = {it["id"]: [{"caption": it["prediction"]}] for it in items}
    tokenizer = PTBTokenizer()
    gts_tok = tokenizer.tokenize(gts)
    res_tok = tokenizer.tokenize(res)
    for it in items:
        if len(gts_tok.get(it["id"], [])) != len(it["references"]) or len(res_tok.get(it["id"], [])) != 1:
            raise RuntimeError(f"PTBTokenizer output does not line up with the input at {it['id']}")
    for it, s in zip(items, sentences):
        s["ptb_prediction"] = res_tok[it["id"]][0]
        s["ptb_references"] = list(gts_tok[it["id"]])
    return gts_tok, res_tok


def bleu_coco(gts, res, corpus, sentences):
    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    corpus["bleu_coco"] = [num(x) for x in score]
    corpus["bleu4_coco"] = num(score[3])
    for k, s in enumerate(sentences):
        s["bleu_coco"] = [num(scores[n][k]) for n in range(4)]
        s["bleu4_coco"] = num(scores[3][k])

    # Aggregate statistics for debugging, from the same scorer class Bleu uses.
    scorer = BleuScorer(n=4)
    for key in gts:
        scorer += (res[key][0], gts[key])
    scorer.compute_score(option="closest")
    guess, correct = [0] * 4, [0] * 4
    for comps in scorer.ctest:
        for n in range(4):
            guess[n] += comps["guess"][n]
            correct[n] += comps["correct"][n]
    corpus["bleu_coco_detail"] = {"testlen": scorer._testlen, "reflen": scorer._reflen,
                                  "guess": guess, "correct": correct}


def cider(gts, res, corpus, sentences):
    score, scores = Cider().compute_score(gts, res)
    corpus["cider_d"] = num(score)
    for k, s in enumerate(sentences):
        s["cider_d"] = num(scores[k])


def meteor(gts, res, corpus, sentences):
    m = Meteor()
    try:
        score, scores = m.compute_score(gts, res)
    except Exception as e:
        # compute_score leaves its lock held when it raises, and Meteor.__del__ takes that lock:
        # release it so that the object can be collected, and add what java said.
        if m.lock.locked():
            m.lock.release()
        m.meteor_p.kill()
        stderr = m.meteor_p.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"{error_text(e)}; java stderr: {stderr[-2000:]}") from e
    corpus["meteor"] = num(score)
    for k, s in enumerate(sentences):
        s["meteor"] = num(scores[k])


# ---------------------------------------------------------------------------------------------


def score_items(items):
    """Every metric over `items`; returns (corpus, sentences, errors)."""
    corpus = {}
    sentences = [{"id": it["id"]} for it in items]
    errors = {}

    def guarded(name, fn, *args):
        try:
            # pycocoevalcap prints progress; keep stdout for our own messages.
            with contextlib.redirect_stdout(io.StringIO()):
                fn(*args)
            return True
        except Exception as e:  # noqa: BLE001
            errors[name] = error_text(e)
            return False

    guarded("sacrebleu", sacrebleu_corpus, items, corpus, sentences)
    guarded("rouge_l", rouge_corpus, items, corpus, sentences)
    tok = {}

    def tokenize():
        tok["gts"], tok["res"] = ptb_tokenize(items, sentences)

    if guarded("ptb", tokenize):
        guarded("bleu_coco", bleu_coco, tok["gts"], tok["res"], corpus, sentences)
        guarded("cider_d", cider, tok["gts"], tok["res"], corpus, sentences)
        guarded("meteor", meteor, tok["gts"], tok["res"], corpus, sentences)
    return corpus, sentences, errors


def culprits(items, errors):
    """Items that raise on their own in the metrics that failed on the whole corpus."""
    bad = []
    for it in items:
        _, _, errs = score_items([it])
        if any(name in errs for name in errors):
            bad.append(it["id"])
    return bad


def evaluate(path):
    items = load_corpus(path)
    corpus, sentences, errors = score_items(items)
    out = {
        "corpus_file": os.path.basename(path),
        "versions": versions(),
        "notes": {
            "sentences.sacrebleu": "BLEU(effective_order=True).sentence_score (sacrebleu's recommendation "
                                   "for sentence BLEU); sentences.sacrebleu_default is BLEU().sentence_score",
            "corpus.sacrebleu": "BLEU().corpus_score(predictions, reference streams padded with None)",
            "corpus.rouge_l": "mean over images (left-to-right sum / count) of rougeL fmeasure, "
                              "score_multi when an image has several references",
            "corpus.cider_d": "pycocoevalcap Cider() score (numpy mean of the per-image scores)",
            "ptb": "pycocoevalcap PTBTokenizer, references and predictions tokenized in separate calls",
        },
        "n_items": len(items),
        "corpus": corpus,
        "sentences": sentences,
        "errors": errors,
    }
    if errors:
        bad = culprits(items, errors)
        kept = [it for it in items if it["id"] not in bad]
        ex_corpus, ex_sentences, ex_errors = score_items(kept)
        out["excluding"] = {"excluded_ids": bad, "corpus": ex_corpus, "sentences": ex_sentences,
                            "errors": ex_errors}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpora", nargs="+", help="corpus JSON file(s)")
    p.add_argument("--out", help="output path (only with a single corpus); default <corpus>.expected.json")
    args = p.parse_args()
    if args.out and len(args.corpora) != 1:
        fail("--out takes a single corpus")
    for path in args.corpora:
        result = evaluate(path)
        dest = args.out or os.path.splitext(path)[0] + ".expected.json"
        with open(dest, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False, allow_nan=False)
            f.write("\n")
        c = result["corpus"]
        summary = ", ".join(f"{k} {c[k]:.4f}" for k in ("sacrebleu", "chrf", "rouge_l", "bleu4_coco", "cider_d", "meteor")
                            if k in c)
        print(f"{path} -> {dest}: {summary}" + (f"; errors: {sorted(result['errors'])}" if result["errors"] else ""))


if __name__ == "__main__":
    main()
