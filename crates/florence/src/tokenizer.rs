//! The BART byte-level BPE tokenizer with Florence-2's 1024 added tokens (spec §2).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The tokens the original processor adds, in its order (ids 50265..51288).
pub fn florence_tokens() -> Vec<String> {
    let mut t: Vec<String> = ["<od>", "</od>", "<ocr>", "</ocr>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    t.extend((0..1000).map(|i| format!("<loc_{i}>")));
    t.extend(
        [
            "<cap>",
            "</cap>",
            "<ncap>",
            "</ncap>",
            "<dcap>",
            "</dcap>",
            "<grounding>",
            "</grounding>",
            "<seg>",
            "</seg>",
            "<sep>",
            "<region_cap>",
            "</region_cap>",
            "<region_to_desciption>",
            "</region_to_desciption>",
            "<proposal>",
            "</proposal>",
            "<poly>",
            "</poly>",
            "<and>",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    t
}

/// Encodes prompts and decodes generations.
#[derive(Clone)]
pub struct FlorenceTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for FlorenceTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlorenceTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

impl FlorenceTokenizer {
    /// Loads `tokenizer.json`, or builds the tokenizer from `vocab.json` + `merges.txt`, and adds
    /// the Florence tokens when the files lack them.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            if !vocab.is_file() || !merges.is_file() {
                return Err(Error::Tokenizer(format!(
                    "{}: no tokenizer.json, nor vocab.json and merges.txt; download the model's tokenizer files",
                    dir.display()
                )));
            }
            Self::from_bpe_files(&vocab, &merges)?
        };
        if inner.token_to_id("<loc_0>").is_none() {
            let tokens: Vec<AddedToken> = florence_tokens()
                .into_iter()
                .map(|t| AddedToken::from(t, true))
                .collect();
            inner.add_special_tokens(&tokens);
        }
        let expect = inner.token_to_id("<od>");
        if expect != Some(50265) {
            return Err(Error::Tokenizer(format!(
                "{}: <od> has id {expect:?}, expected 50265; this is not a Florence-2 (BART) tokenizer",
                dir.display()
            )));
        }
        Ok(Self { inner })
    }

    /// The roberta-base tokenizer setup, from its vocabulary and merges files.
    fn from_bpe_files(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.with_post_processor(Some(
            RobertaProcessing::new(("</s>".into(), 2), ("<s>".into(), 0))
                .trim_offsets(true)
                .add_prefix_space(false),
        ));
        let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>"]
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .chain(std::iter::once(AddedToken::from("<mask>", true).lstrip(true)))
            .collect();
        tok.add_special_tokens(&specials);
        Ok(tok)
    }

    /// `<s> prompt </s>` token ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids keeping special tokens, as `batch_decode(ids, skip_special_tokens=False)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
