#!/usr/bin/env python3
"""Reference tokens for florence-eval's PTB tokenizer port (crates/florence-eval/src/metrics/ptb.rs).

Default: reads crates/florence-eval/tests/data/ptb_cases.json (a list of captions), runs
pycocoevalcap's PTBTokenizer (stanford-corenlp-3.4.1.jar) on all of them in one call, in order, and
writes crates/florence-eval/tests/data/ptb_cases.expected.json: a list of
{"caption": ..., "tokens": "..."}, plus "tokens_alone" where a call with that caption alone gives
other tokens (a caption's tokens can depend on the next caption, and the last one is followed by the
end of the file). One call per caption for that part: about a minute.

--tables: probes the jar for the character classes the lexer was generated with ([:letter:], the
lexer's LETTER, [:digit:]) and prints them in the form ptb.rs holds them.

Needs pycocoevalcap 1.2 and java (run with /root/.pyenv/versions/3.11.7/bin/python3 here).
"""

import json
import os
import subprocess
import sys
import tempfile
import unicodedata

from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "crates", "florence-eval", "tests", "data")


def coco_tokenize(captions):
    """One PTBTokenizer.tokenize call on the captions, in order; its tokenized captions."""
    if not captions:
        return []
    out = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})
    return out[0]


def dumps(value):
    """JSON with the characters one cannot see (controls, format characters, spaces but ' ',
    combining marks) escaped, the others as they are."""
    text = json.dumps(value, ensure_ascii=False)
    hidden = ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn")
    return "".join("\\u%04x" % ord(c) if c != " " and ord(c) < 0x10000 and unicodedata.category(c) in hidden else c for c in text)


def write_expected():
    with open(os.path.join(DATA, "ptb_cases.json"), encoding="utf-8") as f:
        captions = json.load(f)
    together = coco_tokenize(captions)
    assert len(together) == len(captions)
    cases = []
    for i, (caption, tokens) in enumerate(zip(captions, together)):
        case = {"caption": caption, "tokens": tokens}
        alone = coco_tokenize([caption])[0]
        if alone != tokens:
            case["tokens_alone"] = alone
        cases.append(case)
        print(f"\r{i + 1}/{len(captions)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    path = os.path.join(DATA, "ptb_cases.expected.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(dumps(case) for case in cases) + "\n]\n")
    differ = sum("tokens_alone" in c for c in cases)
    print(f"{len(cases)} cases ({differ} depend on their neighbours) -> {path}")


def raw_lines(lines):
    """The jar's output lines (before punctuation removal), run as pycocoevalcap runs it."""
    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write("\n".join(lines).encode())
    cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", f.name]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode()
    os.remove(f.name)
    return out.split("\n")


def ranges(units):
    out = []
    for u in sorted(units):
        if out and out[-1][1] == u - 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return " ".join("%x" % a if a == b else "%x-%x" % (a, b) for a, b in out)


def print_tables():
    line_breaks = {0x0A, 0x0D, 0x0B, 0x0C, 0x85, 0x2028, 0x2029}
    units = [u for u in range(0x10000) if not 0xD800 <= u < 0xE000 and u not in line_breaks]
    # x?x is one word where ? is a LETTER or digit, ?.5 one number where ? is a digit, ?-x one
    # hyphenated THING where ? is a [:letter:] or [:digit:].
    contexts = [lambda c: "x" + c + "x", lambda c: c + ".5", lambda c: c + "-x"]
    out = raw_lines([f(chr(u)) for u in units for f in contexts])
    word, digit, thing = set(), set(), set()
    for k, u in enumerate(units):
        got = out[3 * k : 3 * k + 3]
        for found, f, into in zip(got, contexts, (word, digit, thing)):
            if found == f(chr(u)).lower() and " " not in found:
                into.add(u)
    # Units that join their neighbours by other rules: . ! ? (WORD), / (THING3), @ (EMAIL),
    # +/- (signed numbers), hyphens and _ (THING).
    others = {ord(c) for c in "!./?@_-+"} | {0x58A, 0x2010, 0x2011}
    digits = digit - others
    alpha = thing - digits - others
    letter = (word - digits - others) | {0xAD}  # the soft hyphen is a LETTER, removed from words
    assert alpha <= letter
    zeros = sorted(u for u in digits if u - 1 not in digits)
    assert all(z + i in digits for z in zeros for i in range(10)) and len(digits) == 10 * len(zeros)
    print("ALPHA:", ranges(alpha))
    print("LETTER_EXTRA:", ranges(letter - alpha))
    print("DIGIT_ZEROS:", ", ".join("0x%x" % z for z in zeros))


if __name__ == "__main__":
    if sys.argv[1:] == ["--tables"]:
        print_tables()
    else:
        write_expected()
