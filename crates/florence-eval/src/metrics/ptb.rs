//! Stanford PTBTokenizer (CoreNLP 3.4.1) as the COCO caption toolkit runs it.
//!
//! `pycocoevalcap`'s `PTBTokenizer` replaces `'\n'` in every caption by a space, writes the
//! captions one per line to a file, runs `edu.stanford.nlp.process.PTBTokenizer -preserveLines
//! -lowerCase` from `stanford-corenlp-3.4.1.jar` on it, and keeps, of each output line (after
//! Python's `rstrip()`), the `' '`-separated tokens not in its punctuation list. This module does
//! the same without Java: a port of the JFlex lexer `PTBLexer.flex` of the v3.4.1 release with
//! the options that command line leaves in effect (`tokenizeNLs`; the PTB3 normalisations;
//! `americanize`, `escapeForwardSlashAsterisk`, `strictTreebank3` and `invertible` off).
//!
//! The lexer is a table of rules, each a regular expression (in a small syntax of this module,
//! close to JFlex's) with an optional trailing context and an action, matched as JFlex does: at
//! every position the rule with the longest match (trailing context included) wins, the earlier
//! one on a tie; letters outside character classes match either case. Characters are UTF-16 code
//! units as in Java, so characters beyond the BMP (emoji) are dropped as untokenizable, and the
//! `[:letter:]`/`[:digit:]` classes are the Unicode 6.x sets the 3.4.1 lexer was generated with
//! (tables below, measured from the jar by `tools/reference/ptb_ref.py --tables`).
//!
//! What the jar does that surprises:
//! - `-lowerCase` lowercases `-LRB-`, `-RRB-`, `-LCB-` and `-RCB-` too, so they no longer equal the
//!   toolkit's punctuation entries: brackets of every kind stay in the captions as `-lrb-`,
//!   `-rrb-`, `-lcb-`, `-rcb-`, `-lsb-`, `-rsb-`.
//! - No Americanization and no escaping of `/` and `*` (the defaults of the lexer, which the
//!   command line does not change); `cannot`, `gonna`, `gotta`, `wanna`, `lemme`, `gimme`, `'tis`
//!   and `'twas` are split; `&amp;` becomes `&`; `£` becomes `#`, `€` `$` and `¢` `cents`.
//! - Fractions and phone numbers keep a space inside, as U+00A0 (`1 1/2` is one token).
//! - One caption's tokens can depend on the next caption, because trailing contexts reach across
//!   the line break: a one-letter acronym ends up without its period (`b.` gives `b`) when the
//!   next caption begins with one of some forty words (`A `, `The `, `It `, ...), and `no.`,
//!   `fig.`, `ca.`... keep their period when it begins with a digit. The last caption is followed
//!   by the end of the file instead (`:)` splits there). [`tokenize_batch`] reproduces all of this;
//!   [`tokenize`] tokenizes a caption alone, as the last and only line.
//! - Other line breaks the lexer knows (`\r`, U+2028, U+2029, U+000B, U+000C) are not replaced by
//!   the toolkit and start a new output line, which shifts every later caption of the call onto
//!   its neighbour's tokens; [`tokenize_batch`] shifts them the same way.
//!
//! Differences left: Java 17 lowercases by Unicode 13, Rust by its own (newer) version, which
//! differ only on letters the lexer does not tokenize; a token holding half a surrogate pair
//! (never seen) would read U+FFFD where Java writes `?`.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::text::py_rstrip;

/// The tokens `pycocoevalcap` removes (compared after lowercasing, hence the brackets stay).
const PUNCTUATIONS: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
];

/// One caption's tokens, as `pycocoevalcap`'s `PTBTokenizer` gives them for a call with this
/// caption alone, split on `' '`. A caption without tokens (empty, blank, only punctuation or
/// emoji) gives none (the toolkit's `""`, which its scorers split into no words). Tokens are
/// lowercase and never empty, and can hold U+00A0 (`1\u{a0}1/2`), which the scorers split on.
pub fn tokenize(caption: &str) -> Vec<String> {
    tokenize_batch(&[caption]).pop().unwrap_or_default()
}

/// [`tokenize`]'s tokens joined by single spaces: the toolkit's tokenized caption.
pub fn tokenize_joined(caption: &str) -> String {
    tokenize(caption).join(" ")
}

/// The tokens of each caption, as one `PTBTokenizer.tokenize` call of `pycocoevalcap` gives them
/// for these captions in this order (the module documentation says why the order matters).
pub fn tokenize_batch<S: AsRef<str>>(captions: &[S]) -> Vec<Vec<String>> {
    let text = captions
        .iter()
        .map(|c| c.as_ref().replace('\n', " "))
        .collect::<Vec<_>>()
        .join("\n");
    let output = java_output(&text.encode_utf16().collect::<Vec<_>>());
    let mut lines = output.split('\n');
    captions
        .iter()
        .map(|_| lines.next().map(python_line).unwrap_or_default())
        .collect()
}

/// What `PTBTokenizer -preserveLines -lowerCase` prints for the text: the tokens lowercased and
/// separated by spaces, a line break for each line break of the text.
fn java_output(text: &[u16]) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut line_start = true;
    lex(text, |token| match token {
        None => {
            out.push('\n');
            line_start = true;
        }
        Some(word) => {
            if !line_start {
                out.push(' ');
            }
            out.push_str(&word.to_lowercase());
            line_start = false;
        }
    });
    out
}

/// The toolkit's treatment of one output line: `rstrip()`, split on `' '`, drop punctuation.
fn python_line(line: &str) -> Vec<String> {
    py_rstrip(line)
        .split(' ')
        .filter(|t| !t.is_empty() && !PUNCTUATIONS.contains(t))
        .map(String::from)
        .collect()
}

/// Named parts of the rules, as `PTBLexer.flex` defines them (some merged or split), in the
/// pattern syntax of [`Parser`]; each may use those above it. A line beginning with a space
/// continues the one above.
const MACROS: &str = r#"
SPACE      [ \t\u{a0}\u{2000}-\u{200a}\u{3000}]
NEWLINE    \r|\r?\n|[\u{2028}\u{2029}\u{b}\u{c}\u{85}]
SPACENL    {SPACE}|{NEWLINE}
NAMECH     [A-Za-z0-9_:.\-]
ATTR       [A-Za-z]{NAMECH}*( *= *('[^']*'|"[^"]*"))?
SGML       <([!?][A-Za-z\-][^>\r\n]*|[A-Za-z]{NAMECH}*( +{ATTR})* *\/?|\/[A-Za-z]{NAMECH}*) *>
SENTEND    {SPACENL}({SPACENL}|\P|{SGML})
NUM        \D+|\D*([.:,\u{ad}\u{66b}\u{66c}]\D+)+
LETTER     \L|&[aeiouAEIOU](acute|grave|uml);
WORD       {LETTER}({LETTER}|\D)*([.!?]{LETTER}({LETTER}|\D)*)*
APOS       ['\u{92}\u{2019}]|&apos;
APOSETC    {APOS}|[`\u{91}\u{2018}\u{201b}]
REDAUX     {APOS}([msdMSD]|re|ve|ll)
SREDAUX    n{APOSETC}t
APOWORD    {APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|[A-HJ-XZn]{APOSETC}\A\A\A*
           |{APOS}[2-9]0s|{APOS}till?|\A\A*[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]\A*|{APOS}cause|cont'd\.?|'twas
           |nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{APOSETC}o
URLEND     [^ \t\n\f\r"<>|.!?(){},\-]
LIKELYURL  (www\.([^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|([^ \t\n\f\r"`'<>|.!?(){},-_$]+\.)+(com|net|org|edu))
           (\/[^ \t\n\f\r"<>|()]+{URLEND})?
EMAILCH    [^ \t\n\f\r"<>|(){}.\u{a0}]
EMAIL      (&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u{a0}{}]*@({EMAILCH}+\.)*{EMAILCH}+(&gt;|>)?
FILENAME   ({LETTER}|\D)+(\.({LETTER}|\D)+)*\.(bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java
           |jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)
HYPHEN     [\-_\u{58a}\u{2010}\u{2011}]
THINGPART  ([dDoOlL]{APOSETC}[\A\D])?[\A\D]+
THING      {THINGPART}({HYPHEN}{THINGPART})*
THINGA     [A-Z]+(([+&]|&amp;)[A-Z]+)+
ACROX      (Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(U\.K|U\.S\.S\.R)
ACRO       [A-Za-z](\.[A-Za-z])*|{ACROX}
HTHING     [A-Za-z0-9][A-Za-z0-9.,\u{ad}]*(-([A-Za-z0-9\u{ad}]+|([A-Za-z](\.[A-Za-z])+|{ACROX})\.))+
ABBREV1    (Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri|Ala|Ariz|[A]z|[A]rk
           |Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss|Mo|Mont|Neb|Nev
           |Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd
           |Assn|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros|(Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\.
ABBREV4    Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt
           |Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr
           |Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{ACRO}|Invt|Elec|Natl|M[ft]g|Dept
SENTSTART  [A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere
           |[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he
           |[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen
           |[W]hile|[W]hat|[Y]et|[Y]ou|{SGML}
PHONE      (\([0-9]{2,3}\)[ \u{a0}]?|(\+\+?)?([0-9]{2,4}[\- \u{a0}])?[0-9]{2,4}[\- \u{a0}])[0-9]{3,4}[\- \u{a0}]?
           [0-9]{3,5}|((\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}
INSENTP    [,;:\u{3001}]
SMILEYCH   [\-\^x=~<>']
MISC       [+%&~\^|\\\u{a6}-\u{a9}\u{ac}\u{ae}-\u{ba}\u{d7}\u{f7}\u{387}\u{5be}\u{5c0}\u{5c3}\u{5c6}\u{5f3}\u{5f4}
           \u{600}-\u{603}\u{606}-\u{60a}\u{60c}\u{614}\u{61b}\u{61e}\u{66a}\u{66d}\u{703}-\u{70d}\u{7f6}-\u{7f8}
           \u{964}\u{965}\u{e4f}\u{1fbd}\u{2016}\u{2017}\u{2020}-\u{2023}\u{2030}-\u{2038}\u{203b}\u{203e}-\u{2042}
           \u{2044}\u{207a}-\u{207f}\u{208a}-\u{208e}\u{2100}-\u{214f}\u{2190}-\u{2bff}\u{3012}\u{30fb}
           \u{ff01}-\u{ff0f}\u{ff1a}-\u{ff20}\u{ff3b}-\u{ff40}\u{ff5b}-\u{ff65}]
"#;

/// The rules in `PTBLexer.flex`'s order, which breaks ties: an action ([`Act::parse`]) and a
/// pattern, with JFlex's trailing context (must follow, counts for the longest match, is not
/// part of the token) after a top-level `/`. Rules with the same action next to each other are
/// merged.
const RULES: &str = r#"
plain     c\+\+|(c|f)#
back3     cannot|'twas
back2     'tis|gonna|gotta|lemme|gimme|wanna
nbsp      {SGML}
=--       &(MD|mdash|ndash);|[\u{96}\u{97}\u{2013}\u{2014}\u{2015}]
amp       &amp;
plain     &(HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);
soft      {WORD}/{REDAUX}
soft      [A-Za-z\u{ad}]*[A-MO-Za-mo-z]\u{ad}*/{SREDAUX}
soft      {WORD}
plain     {APOWORD}
plain     y{APOS}/\A
plain     https?:\/\/[^ \t\n\f\r"<>|(){}]+{URLEND}|{LIKELYURL}|{EMAIL}|@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+
right     ({REDAUX}|{SREDAUX})/[^A-Za-z]
plain     \D{1,2}[\-/]\D{1,2}[\-/]\D{2,4}
soft      [\-+]?{NUM}
plain     [\u{207a}\u{207b}\u{208a}\u{208b}]?([\u{2070}\u{b9}\u{b2}\u{b3}\u{2074}-\u{2079}]+|[\u{2080}-\u{2089}]+)
nbsp      (\D{1,4}[\- \u{a0}])?\D{1,4}(\\?\/|\u{2044})\D{1,4}
fraction  [\u{bc}\u{bd}\u{be}\u{2153}-\u{215e}]
amp       -(RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(&|&amp;)P-500|S(&|&amp;)Ls|Cap{APOS}n|c{APOS}est
plain     [A-Za-z0-9]+(-[A-Za-z]+){0,2}(\\?\/[A-Za-z0-9]+(-[A-Za-z]+){0,2}){1,2}|[A-Z]*\$|#
currency  [\u{a2}-\u{a5}\u{80}\u{20a0}\u{20ac}\u{60b}\u{e3f}\u{20a4}\u{ffe0}\u{ffe1}\u{ffe5}\u{ffe6}]
acronym   {ACRO}\./{SPACENL}+({SENTSTART}){SPACENL}
plain     (ca|figs?|prop|nos?|art|bldg|pp|op)\./{SPACENL}?\D
plain     (pt[eyEY]|co)\./{SPACE}(ltd|lim)
period    {ABBREV1}/{SENTEND}
plain     {ABBREV1}/[^][^]
period    {ABBREV1}
plain     ({ABBREV4})\.
plain     {ABBREV4}/{SPACE}
plain     {ACRO}/{SPACENL}
plain     {APOS}[0-9][0-9]/{SPACENL}
plain     {FILENAME}/{SPACENL}|[.?!,]
soft      {WORD}\./{INSENTP}
phone     {PHONE}
left      "|&quot;/[A-Za-z0-9$]
right     "|&quot;
skip      \u{7f}
=<        <|&lt;
=>        >|&gt;
parens    [<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]/[^A-Za-z0-9]
parens    [\^x=~<>]\.\[\^x=~<>\]|{SMILEYCH}_{SMILEYCH}|\({SMILEYCH}[_.]?{SMILEYCH}\)|\([\^x=~<>']-[\^x=~<>'`]\)
=-LCB-    \{
=-RCB-    \}
=-LSB-    \[
=-RSB-    \]
=-LRB-    \(
=-RRB-    \)
dashes    -+
ellipsis  \.{3,5}|(\.[ \u{a0}]){2,4}\.|[\u{85}\u{2026}]
plain     @+|#+|_+|\*+|(\\\*){1,3}|{INSENTP}|[?!]+
          |[.\u{a1}\u{bf}\u{37e}\u{589}\u{61f}\u{6d4}\u{700}-\u{702}\u{7fa}\u{3002}=/]
soft      {HTHING}\./{INSENTP}
soft      {HTHING}
plain     {THING}\./{INSENTP}
plain     {THING}
amp       {THINGA}\./{INSENTP}
amp       {THINGA}
left      '/[A-Za-z][^ \t\n\r\u{a0}]
right     {REDAUX}|{SREDAUX}|{APOS}|''|[`\u{2018}-\u{201f}\u{91}-\u{94}\u{2039}\u{203a}\u{ab}\u{bb}]{1,2}
plain     <<|>>|{MISC}
skip      \u{0}|{SPACE}+|[\u{200b}\u{200e}\u{200f}\u{feff}]|&nbsp;
newline   {NEWLINE}
skip      [^\n\r\u{b}\u{c}\u{85}\u{2028}\u{2029}]
"#;

/// What a rule does with its match (with its name in [`RULES`]).
#[derive(Clone, Copy)]
enum Act {
    Plain,            // `plain`: the text as it is
    Back(usize),      // `back2`, `back3`: the text less its last units, lexed again (`can` `not`)
    Nbsp,             // `nbsp`: spaces become U+00A0 (SGML tags, fractions)
    Is(&'static str), // `=TOKEN`: a fixed token
    Amp,              // `amp`: `&amp;` becomes `&`
    Soft,             // `soft`: soft hyphens (U+00AD) go
    Quote(bool),      // `left`, `right`: LaTeX quotes, ASCII ones by the side they probably stand on
    Fraction,         // `fraction`: ¼ ½ ¾ ⅓ ⅔ spelled with a slash
    Currency,         // `currency`: ¢ `cents`, £ `#`, € and the generic signs `$`
    Acronym,          // `acronym`: before a sentence start `U.S.` then `.`, but `I.` gives `I` then `.`
    Period,           // `period`: the text, then its final period once more (a sentence ends)
    Phone,            // `phone`: spaces to U+00A0, parentheses to `-LRB-`/`-RRB-`
    Parens,           // `parens`: parentheses to `-LRB-`/`-RRB-` (smileys)
    Dashes,           // `dashes`: three or four hyphens become `--`
    Ellipsis,         // `ellipsis`: `...`
    Skip,             // `skip`: no token (spaces, controls, characters the lexer does not know)
    Newline,          // `newline`: a line break (`tokenizeNLs`)
}

impl Act {
    fn parse(name: &'static str) -> Act {
        match name {
            "plain" => Act::Plain,
            "back2" => Act::Back(2),
            "back3" => Act::Back(3),
            "nbsp" => Act::Nbsp,
            "amp" => Act::Amp,
            "soft" => Act::Soft,
            "left" => Act::Quote(true),
            "right" => Act::Quote(false),
            "fraction" => Act::Fraction,
            "currency" => Act::Currency,
            "acronym" => Act::Acronym,
            "period" => Act::Period,
            "phone" => Act::Phone,
            "parens" => Act::Parens,
            "dashes" => Act::Dashes,
            "ellipsis" => Act::Ellipsis,
            "skip" => Act::Skip,
            "newline" => Act::Newline,
            _ => Act::Is(name.strip_prefix('=').unwrap_or_else(|| panic!("no action {name}"))),
        }
    }
}

struct Rule {
    pat: Pat,
    trail: Option<Pat>,
    act: Act,
    /// Bit `u` set where a match can begin with the ASCII unit `u` (a quick test).
    ascii_starts: u128,
}

/// The lines of [`MACROS`] or [`RULES`] as (first word, rest), continuation lines joined.
fn entries(block: &'static str) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_once(' ') {
            _ if line.starts_with(' ') => out
                .last_mut()
                .expect("a line to continue")
                .1
                .push_str(line.trim_start()),
            Some((head, rest)) => out.push((head, rest.trim_start().to_string())),
            None => panic!("no pattern in {line:?}"),
        }
    }
    out
}

static LEXER: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let mut macros = HashMap::new();
    for (name, src) in entries(MACROS) {
        let (pat, _) = Parser::parse(&src, &macros, false);
        macros.insert(name, pat);
    }
    let rule = |(act, src): (&'static str, String)| {
        let (pat, trail) = Parser::parse(&src, &macros, true);
        let ascii_starts = (0..128u16)
            .filter(|&u| pat.may_start(u))
            .fold(0, |bits, u| bits | 1u128 << u);
        Rule {
            pat,
            trail,
            act: Act::parse(act),
            ascii_starts,
        }
    };
    entries(RULES).into_iter().map(rule).collect()
});

impl Rule {
    /// The longest match at `at`, as (its end with the trailing context, the token's end).
    fn longest(&self, s: &[u16], at: usize) -> Option<(usize, usize)> {
        let first = s[at];
        let may_start = if first < 128 {
            self.ascii_starts & 1 << first != 0
        } else {
            self.pat.may_start(first)
        };
        if !may_start {
            return None;
        }
        let ends = self.pat.ends(s, &[at]);
        let Some(trail) = &self.trail else {
            return ends.last().map(|&e| (e, e));
        };
        let mut best: Option<(usize, usize)> = None;
        for &e in ends.iter().rev() {
            if let Some(&end) = trail.ends(s, &[e]).last() {
                if best.is_none_or(|(b, _)| end > b) {
                    best = Some((end, e));
                }
            }
        }
        best
    }
}

/// Runs the lexer over the text; `emit` gets each token, `None` for a line break.
fn lex(s: &[u16], mut emit: impl FnMut(Option<String>)) {
    let mut at = 0;
    while at < s.len() {
        let mut best: Option<(usize, usize, Act)> = None;
        for rule in LEXER.iter() {
            if let Some((total, end)) = rule.longest(s, at) {
                if best.is_none_or(|(b, _, _)| total > b) {
                    best = Some((total, end, rule.act));
                }
            }
        }
        // The last rule takes any unit the others leave (but a line break).
        let (_, end, act) = best.unwrap_or((at + 1, at + 1, Act::Skip));
        let (token, used) = apply(act, &s[at..end]);
        match (token, act) {
            (Some(token), _) => emit(Some(token)),
            (None, Act::Newline) => emit(None),
            (None, _) => {}
        }
        at += used;
    }
}

/// A rule's token for its match, and how many units of the match it uses.
fn apply(act: Act, units: &[u16]) -> (Option<String>, usize) {
    let n = units.len();
    let text = String::from_utf16_lossy(units);
    let token = match act {
        Act::Plain => text,
        Act::Back(k) => return (Some(String::from_utf16_lossy(&units[..n - k])), n - k),
        Act::Nbsp => text.replace(' ', "\u{a0}"),
        Act::Is(s) => s.to_string(),
        Act::Amp => replace_ascii_ci(&text, "&amp;", "&"),
        Act::Soft => {
            let t: String = text.chars().filter(|&c| c != '\u{ad}').collect();
            if t.is_empty() {
                "-".to_string()
            } else {
                t
            }
        }
        Act::Quote(left) => latex_quotes(&text, left),
        Act::Fraction => text
            .replace('¼', "1/4")
            .replace('½', "1/2")
            .replace('¾', "3/4")
            .replace('⅓', "1/3")
            .replace('⅔', "2/3"),
        Act::Currency => text
            .replace('¢', "cents")
            .replace('£', "#")
            .replace(['\u{80}', '¤', '\u{20a0}', '€'], "$"),
        // Two units are a one-letter acronym: the letter, then the period as the next token.
        Act::Acronym if n == 2 => return (Some(String::from_utf16_lossy(&units[..1])), 1),
        Act::Acronym | Act::Period => return (Some(text), n - 1),
        Act::Phone => text.replace(' ', "\u{a0}").replace('(', "-LRB-").replace(')', "-RRB-"),
        Act::Parens => text.replace('(', "-LRB-").replace(')', "-RRB-"),
        Act::Dashes if (3..=4).contains(&n) => "--".to_string(),
        Act::Dashes => text,
        Act::Ellipsis => "...".to_string(),
        Act::Skip | Act::Newline => return (None, n),
    };
    (Some(token), n)
}

/// `from` (ASCII) replaced by `to` wherever it occurs in any ASCII case.
fn replace_ascii_ci(s: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.to_ascii_lowercase().find(from) {
        out.push_str(&rest[..i]);
        out.push_str(to);
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

/// The lexer's `latexQuotes`: ASCII quotes by the side they probably stand on, curly and angle
/// ones by their shape.
fn latex_quotes(s: &str, left: bool) -> String {
    let (single, double) = if left { ("`", "``") } else { ("'", "''") };
    let mut out = String::with_capacity(s.len());
    for c in s.replace("&apos;", single).replace("&quot;", double).chars() {
        match c {
            '\'' => out.push_str(single),
            '"' => out.push_str(double),
            '\u{91}' | '\u{2018}' | '\u{201b}' | '\u{2039}' => out.push('`'),
            '\u{92}' | '\u{2019}' | '\u{203a}' => out.push('\''),
            '\u{93}' | '\u{201c}' | '\u{ab}' => out.push_str("``"),
            '\u{94}' | '\u{201d}' | '\u{bb}' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out
}

/// A regular expression over UTF-16 units, evaluated on sets of positions: [`Pat::ends`] gives
/// every end of a match from any of the start positions, which is what longest match needs.
#[derive(Clone)]
enum Pat {
    Set(Set),
    Seq(Vec<Pat>),
    Alt(Vec<Pat>),
    /// At least `.1`, at most `.2` times.
    Rep(Box<Pat>, usize, usize),
}

/// A character class: unit ranges and named classes, perhaps negated.
#[derive(Clone, Default)]
struct Set {
    negated: bool,
    ranges: Vec<(u16, u16)>,
    named: Vec<Named>,
}

#[derive(Clone, Copy, Debug)]
enum Named {
    /// The lexer's `LETTER`: `[:letter:]` and the marks and modifiers it adds.
    Letter,
    /// `[:letter:]`.
    Alpha,
    /// `[:digit:]`.
    Digit,
    /// `[:uppercase:]` (Rust's; only which abbreviations end a sentence depends on it, and the
    /// period that decides is punctuation the toolkit removes).
    Upper,
}

impl Set {
    fn has(&self, u: u16) -> bool {
        let named = |n: &Named| match n {
            Named::Letter => in_table(&TABLES.0, u) || in_table(&TABLES.1, u),
            Named::Alpha => in_table(&TABLES.0, u),
            Named::Digit => DIGIT_ZEROS.iter().any(|&z| (z..z + 10).contains(&u)),
            Named::Upper => char::from_u32(u32::from(u)).is_some_and(char::is_uppercase),
        };
        let hit = self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&u)) || self.named.iter().any(named);
        hit != self.negated
    }
}

impl Pat {
    /// The sorted end positions of the matches that start at any of the sorted positions `from`.
    fn ends(&self, s: &[u16], from: &[usize]) -> Vec<usize> {
        match self {
            Pat::Set(set) => from
                .iter()
                .filter(|&&p| p < s.len() && set.has(s[p]))
                .map(|p| p + 1)
                .collect(),
            Pat::Seq(items) => {
                let mut at = from.to_vec();
                for item in items {
                    if at.is_empty() {
                        break;
                    }
                    at = item.ends(s, &at);
                }
                at
            }
            Pat::Alt(alts) => alts.iter().fold(Vec::new(), |acc, alt| union(acc, alt.ends(s, from))),
            Pat::Rep(inner, min, max) => {
                let mut out = if *min == 0 { from.to_vec() } else { Vec::new() };
                let mut at = from.to_vec();
                for n in 1..=*max {
                    at = inner.ends(s, &at);
                    if n >= *min {
                        // A position reached before went on from there, with more repetitions left.
                        at.retain(|p| out.binary_search(p).is_err());
                        out = union(out, at.clone());
                    }
                    if at.is_empty() {
                        break;
                    }
                }
                out
            }
        }
    }

    /// Whether a match can begin with the unit `u`.
    fn may_start(&self, u: u16) -> bool {
        match self {
            Pat::Set(set) => set.has(u),
            // The first item that can begin with `u` or must match something decides.
            Pat::Seq(items) => items
                .iter()
                .find(|i| i.may_start(u) || !i.nullable())
                .is_some_and(|i| i.may_start(u)),
            Pat::Alt(alts) => alts.iter().any(|a| a.may_start(u)),
            Pat::Rep(inner, _, _) => inner.may_start(u),
        }
    }

    fn nullable(&self) -> bool {
        match self {
            Pat::Set(_) => false,
            Pat::Seq(items) => items.iter().all(Pat::nullable),
            Pat::Alt(alts) => alts.iter().any(Pat::nullable),
            Pat::Rep(inner, min, _) => *min == 0 || inner.nullable(),
        }
    }
}

fn union(mut a: Vec<usize>, b: Vec<usize>) -> Vec<usize> {
    if a.is_empty() {
        return b;
    }
    a.extend(b);
    a.sort_unstable();
    a.dedup();
    a
}

/// The pattern syntax: `|`, `( )`, `* + ? {m} {m,n}`, classes `[...]` and `[^...]` (`[^]` is any
/// unit), `{NAME}` for a macro, `\u{hex}`, `\t \n \r \f`, the named classes `\L` (`LETTER`),
/// `\A` (`[:letter:]`), `\D` (`[:digit:]`) and `\P` (`[:uppercase:]`), `\` before any other
/// character for itself, and in rules a top-level `/` before the trailing context. Letters
/// outside classes match either case (JFlex's `%caseless`).
struct Parser<'a> {
    src: Vec<char>,
    at: usize,
    macros: &'a HashMap<&'static str, Pat>,
}

impl Parser<'_> {
    /// The pattern and, where `rule`, its trailing context.
    fn parse(src: &str, macros: &HashMap<&'static str, Pat>, rule: bool) -> (Pat, Option<Pat>) {
        let mut p = Parser {
            src: src.chars().collect(),
            at: 0,
            macros,
        };
        let pat = p.alt();
        let trail = (rule && p.peek() == Some('/')).then(|| {
            p.at += 1;
            p.alt()
        });
        assert!(
            p.at == p.src.len(),
            "pattern {src:?}: unexpected {:?} at {}",
            p.peek(),
            p.at
        );
        (pat, trail)
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.at).copied()
    }

    fn next(&mut self) -> char {
        self.at += 1;
        self.src[self.at - 1]
    }

    /// The text up to `end`, which is skipped.
    fn until(&mut self, end: char) -> String {
        std::iter::from_fn(|| Some(self.next()))
            .take_while(|&c| c != end)
            .collect()
    }

    fn alt(&mut self) -> Pat {
        let mut alts = vec![self.seq()];
        while self.peek() == Some('|') {
            self.at += 1;
            alts.push(self.seq());
        }
        if alts.len() == 1 {
            alts.remove(0)
        } else {
            Pat::Alt(alts)
        }
    }

    fn seq(&mut self) -> Pat {
        let mut items = Vec::new();
        while self.peek().is_some_and(|c| !"|)/".contains(c)) {
            let atom = self.atom();
            items.push(self.repeats(atom));
        }
        if items.len() == 1 {
            items.remove(0)
        } else {
            Pat::Seq(items)
        }
    }

    fn atom(&mut self) -> Pat {
        let set = |ranges, named| {
            Pat::Set(Set {
                negated: false,
                ranges,
                named,
            })
        };
        match self.next() {
            '(' => {
                let pat = self.alt();
                assert_eq!(self.next(), ')', "unclosed group");
                pat
            }
            '[' => Pat::Set(self.class()),
            '{' => {
                let name = self.until('}');
                self.macros
                    .get(name.as_str())
                    .unwrap_or_else(|| panic!("no macro {name}"))
                    .clone()
            }
            '\\' => match self.escape() {
                Ok(u) => set(vec![(u, u)], vec![]),
                Err(named) => set(vec![], vec![named]),
            },
            c if c.is_ascii_alphabetic() => {
                let (lower, upper) = (c.to_ascii_lowercase() as u16, c.to_ascii_uppercase() as u16);
                set(vec![(lower, lower), (upper, upper)], vec![])
            }
            c => set(vec![(c as u16, c as u16)], vec![]),
        }
    }

    fn repeats(&mut self, mut pat: Pat) -> Pat {
        loop {
            let (min, max) = match self.peek() {
                Some('*') => (0, usize::MAX),
                Some('+') => (1, usize::MAX),
                Some('?') => (0, 1),
                Some('{') if self.src.get(self.at + 1).is_some_and(char::is_ascii_digit) => {
                    self.at += 1;
                    let counts = self.until('}');
                    self.at -= 1;
                    let (lo, hi) = counts.split_once(',').unwrap_or((&counts, &counts));
                    (lo.parse().expect("a count"), hi.parse().expect("a count"))
                }
                _ => return pat,
            };
            self.at += 1;
            pat = Pat::Rep(Box::new(pat), min, max);
        }
    }

    fn class(&mut self) -> Set {
        let mut set = Set {
            negated: self.peek() == Some('^'),
            ..Set::default()
        };
        self.at += usize::from(set.negated);
        loop {
            let lo = match self.next() {
                ']' => return set,
                '\\' => match self.escape() {
                    Ok(u) => u,
                    Err(named) => {
                        set.named.push(named);
                        continue;
                    }
                },
                c => c as u16,
            };
            let mut hi = lo;
            if self.peek() == Some('-') && self.src.get(self.at + 1) != Some(&']') {
                self.at += 1;
                hi = match self.next() {
                    '\\' => self.escape().expect("a unit after -"),
                    c => c as u16,
                };
            }
            set.ranges.push((lo, hi));
        }
    }

    /// After a backslash: a unit, or a named class.
    fn escape(&mut self) -> Result<u16, Named> {
        Ok(match self.next() {
            'L' => return Err(Named::Letter),
            'A' => return Err(Named::Alpha),
            'D' => return Err(Named::Digit),
            'P' => return Err(Named::Upper),
            't' => 9,
            'n' => 10,
            'r' => 13,
            'f' => 12,
            'u' => {
                assert_eq!(self.next(), '{');
                u16::from_str_radix(&self.until('}'), 16).expect("a hex unit")
            }
            c => c as u16,
        })
    }
}

/// `[:letter:]` (Java's letters of Unicode 6.x in the BMP, as the 3.4.1 lexer has them) and what
/// the lexer's `LETTER` adds (the soft hyphen, modifier letters, combining marks), parsed from
/// [`ALPHA`] and [`LETTER_EXTRA`].
static TABLES: LazyLock<(Ranges, Ranges)> = LazyLock::new(|| (ranges(ALPHA), ranges(LETTER_EXTRA)));

/// Sorted inclusive ranges of UTF-16 units.
type Ranges = Vec<(u16, u16)>;

/// `[:digit:]`: the BMP's decimal digits of Unicode 6.x, ten from each of these zeros.
const DIGIT_ZEROS: [u16; 35] = [
    0x30, 0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66, 0xe50, 0xed0, 0xf20,
    0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90, 0x1b50, 0x1bb0, 0x1c40, 0x1c50, 0xa620, 0xa8d0,
    0xa900, 0xa9d0, 0xaa50, 0xabf0, 0xff10,
];

fn ranges(hex_ranges: &str) -> Ranges {
    let hex = |h: &str| u16::from_str_radix(h, 16).expect("hex");
    let range = |r: &str| {
        r.split_once('-')
            .map_or_else(|| (hex(r), hex(r)), |(a, b)| (hex(a), hex(b)))
    };
    hex_ranges.split_whitespace().map(range).collect()
}

fn in_table(table: &[(u16, u16)], u: u16) -> bool {
    let i = table.partition_point(|&(_, hi)| hi < u);
    table.get(i).is_some_and(|&(lo, _)| lo <= u)
}

/// The units the 3.4.1 lexer counts as `[:letter:]`, as hex ranges (measured from the jar:
/// `tools/reference/ptb_ref.py --tables`).
const ALPHA: &str = "
    41-5a 61-7a aa b5 ba c0-d6 d8-f6 f8-2c1 2c6-2d1 2e0-2e4 2ec 2ee 370-374 376-377 37a-37d 386 388-38a 38c 38e-3a1
    3a3-3f5 3f7-481 48a-527 531-556 559 561-587 5d0-5ea 5f0-5f2 620-64a 66e-66f 671-6d3 6d5 6e5-6e6 6ee-6ef 6fa-6fc
    6ff 710 712-72f 74d-7a5 7b1 7ca-7ea 7f4-7f5 7fa 800-815 81a 824 828 840-858 8a0 8a2-8ac 904-939 93d 950 958-961
    971-977 979-97f 985-98c 98f-990 993-9a8 9aa-9b0 9b2 9b6-9b9 9bd 9ce 9dc-9dd 9df-9e1 9f0-9f1 a05-a0a a0f-a10
    a13-a28 a2a-a30 a32-a33 a35-a36 a38-a39 a59-a5c a5e a72-a74 a85-a8d a8f-a91 a93-aa8 aaa-ab0 ab2-ab3 ab5-ab9 abd
    ad0 ae0-ae1 b05-b0c b0f-b10 b13-b28 b2a-b30 b32-b33 b35-b39 b3d b5c-b5d b5f-b61 b71 b83 b85-b8a b8e-b90 b92-b95
    b99-b9a b9c b9e-b9f ba3-ba4 ba8-baa bae-bb9 bd0 c05-c0c c0e-c10 c12-c28 c2a-c33 c35-c39 c3d c58-c59 c60-c61
    c85-c8c c8e-c90 c92-ca8 caa-cb3 cb5-cb9 cbd cde ce0-ce1 cf1-cf2 d05-d0c d0e-d10 d12-d3a d3d d4e d60-d61 d7a-d7f
    d85-d96 d9a-db1 db3-dbb dbd dc0-dc6 e01-e30 e32-e33 e40-e46 e81-e82 e84 e87-e88 e8a e8d e94-e97 e99-e9f ea1-ea3
    ea5 ea7 eaa-eab ead-eb0 eb2-eb3 ebd ec0-ec4 ec6 edc-edf f00 f40-f47 f49-f6c f88-f8c 1000-102a 103f 1050-1055
    105a-105d 1061 1065-1066 106e-1070 1075-1081 108e 10a0-10c5 10c7 10cd 10d0-10fa 10fc-1248 124a-124d 1250-1256
    1258 125a-125d 1260-1288 128a-128d 1290-12b0 12b2-12b5 12b8-12be 12c0 12c2-12c5 12c8-12d6 12d8-1310 1312-1315
    1318-135a 1380-138f 13a0-13f4 1401-166c 166f-167f 1681-169a 16a0-16ea 1700-170c 170e-1711 1720-1731 1740-1751
    1760-176c 176e-1770 1780-17b3 17d7 17dc 1820-1877 1880-18a8 18aa 18b0-18f5 1900-191c 1950-196d 1970-1974
    1980-19ab 19c1-19c7 1a00-1a16 1a20-1a54 1aa7 1b05-1b33 1b45-1b4b 1b83-1ba0 1bae-1baf 1bba-1be5 1c00-1c23
    1c4d-1c4f 1c5a-1c7d 1ce9-1cec 1cee-1cf1 1cf5-1cf6 1d00-1dbf 1e00-1f15 1f18-1f1d 1f20-1f45 1f48-1f4d 1f50-1f57
    1f59 1f5b 1f5d 1f5f-1f7d 1f80-1fb4 1fb6-1fbc 1fbe 1fc2-1fc4 1fc6-1fcc 1fd0-1fd3 1fd6-1fdb 1fe0-1fec 1ff2-1ff4
    1ff6-1ffc 2071 207f 2090-209c 2102 2107 210a-2113 2115 2119-211d 2124 2126 2128 212a-212d 212f-2139 213c-213f
    2145-2149 214e 2183-2184 2c00-2c2e 2c30-2c5e 2c60-2ce4 2ceb-2cee 2cf2-2cf3 2d00-2d25 2d27 2d2d 2d30-2d67 2d6f
    2d80-2d96 2da0-2da6 2da8-2dae 2db0-2db6 2db8-2dbe 2dc0-2dc6 2dc8-2dce 2dd0-2dd6 2dd8-2dde 2e2f 3005-3006
    3031-3035 303b-303c 3041-3096 309d-309f 30a1-30fa 30fc-30ff 3105-312d 3131-318e 31a0-31ba 31f0-31ff 3400-4db5
    4e00-9fcc a000-a48c a4d0-a4fd a500-a60c a610-a61f a62a-a62b a640-a66e a67f-a697 a6a0-a6e5 a717-a71f a722-a788
    a78b-a78e a790-a793 a7a0-a7aa a7f8-a801 a803-a805 a807-a80a a80c-a822 a840-a873 a882-a8b3 a8f2-a8f7 a8fb
    a90a-a925 a930-a946 a960-a97c a984-a9b2 a9cf aa00-aa28 aa40-aa42 aa44-aa4b aa60-aa76 aa7a aa80-aaaf aab1
    aab5-aab6 aab9-aabd aac0 aac2 aadb-aadd aae0-aaea aaf2-aaf4 ab01-ab06 ab09-ab0e ab11-ab16 ab20-ab26 ab28-ab2e
    abc0-abe2 ac00-d7a3 d7b0-d7c6 d7cb-d7fb f900-fa6d fa70-fad9 fb00-fb06 fb13-fb17 fb1d fb1f-fb28 fb2a-fb36
    fb38-fb3c fb3e fb40-fb41 fb43-fb44 fb46-fbb1 fbd3-fd3d fd50-fd8f fd92-fdc7 fdf0-fdfb fe70-fe74 fe76-fefc
    ff21-ff3a ff41-ff5a ff66-ffbe ffc2-ffc7 ffca-ffcf ffd2-ffd7 ffda-ffdc
";

/// What the lexer's `LETTER` adds to `[:letter:]`, as hex ranges.
const LETTER_EXTRA: &str = "
    ad 2c2-2c5 2d2-2df 2e5-2eb 2ed 2ef-36f 375 378-379 384-385 3f6 483-487 55a-55f 591-5bd 5bf 5c1-5c2 5c4-5c5 5c7
    615-61a 64b-65e 670 6d6-6e4 6e7-6ed 6fd-6fe 70f 711 730-74c 7a6-7b0 7eb-7f3 900-903 93c 93e-94e 951-955 962-963
    981-983 9bc 9be-9c4 9c7-9c8 9cb-9cd 9d7 9e2-9e3 a01-a03 a3c a3e-a4f a81-a83 abc abe-acf b82 bbe-bc2 bc6-bc8
    bca-bcd c01-c03 c3e-c56 d3e-d44 d46-d48 e31 e34-e3a e47-e4e eb1 eb4-ebc ec8-ecd
";
