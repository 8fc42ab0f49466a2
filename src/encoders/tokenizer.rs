//! Text to token ids for the BERT-family text towers, with the `tokenizers`
//! crate (the library behind Hugging Face's fast tokenizers), from a
//! model's `tokenizer.json`, or built from `vocab.txt` as a BERT WordPiece
//! tokenizer when only that is shipped.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tch::Tensor;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

pub struct TextTokenizer {
    tok: Tokenizer,
    pub max_tokens: usize,
    /// The file it was built from (tokenizer.json or vocab.txt).
    pub source: PathBuf,
}

/// Token ids and attention mask of a batch, padded to its longest text.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
}

fn err(path: &Path) -> impl Fn(tokenizers::Error) -> anyhow::Error + '_ {
    move |e| anyhow!("{}: {e}", path.display())
}

impl TextTokenizer {
    /// From a tokenizer.json, or a vocab.txt (BERT WordPiece).
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<TextTokenizer> {
        let mut tok = if path.extension().and_then(|e| e.to_str()) == Some("txt") {
            wordpiece_from_vocab(path)?
        } else {
            Tokenizer::from_file(path).map_err(err(path))?
        };
        // Whatever the file says about padding and truncation (MiniLM's pads
        // to a fixed 128), the encoders take batch-longest padding and their
        // own context length, as sentence-transformers and open_clip do.
        let pad_id = tok
            .token_to_id("[PAD]")
            .or_else(|| tok.get_padding().map(|p| p.pad_id))
            .unwrap_or(0);
        tok.with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .map_err(err(path))?;
        let pad_token = tok.id_to_token(pad_id).unwrap_or_else(|| "[PAD]".into());
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(TextTokenizer {
            tok,
            max_tokens,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of one text, with special tokens, truncated.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tok.encode(text, true).map_err(err(&self.source))?;
        Ok(e.get_ids().to_vec())
    }

    pub fn encode(&self, texts: &[&str]) -> Result<Batch> {
        let enc = self.tok.encode_batch(texts.to_vec(), true).map_err(err(&self.source))?;
        let b = enc.len() as i64;
        let t = enc.first().map(|e| e.get_ids().len()).unwrap_or(0) as i64;
        let ids: Vec<i64> = enc.iter().flat_map(|e| e.get_ids().iter().map(|&i| i as i64)).collect();
        let mask: Vec<i64> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().iter().map(|&i| i as i64))
            .collect();
        Ok(Batch {
            ids: Tensor::from_slice(&ids).view([b, t]),
            mask: Tensor::from_slice(&mask).view([b, t]),
        })
    }
}

/// BERT's tokenizer from a vocab.txt: lower-casing (unless the folder's
/// tokenizer_config.json says otherwise), basic pre-tokenisation,
/// WordPiece, [CLS] ... [SEP].
fn wordpiece_from_vocab(vocab: &Path) -> Result<Tokenizer> {
    let lower = vocab
        .parent()
        .and_then(|d| std::fs::read(d.join("tokenizer_config.json")).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|x| x.as_bool()))
        .unwrap_or(true);
    let vocab_s = vocab.to_str().context("vocab path is not UTF-8")?;
    let wp = WordPiece::from_file(vocab_s)
        .unk_token("[UNK]".into())
        .build()
        .map_err(err(vocab))?;
    let id = |t: &str| -> Result<u32> {
        use tokenizers::Model;
        wp.token_to_id(t)
            .with_context(|| format!("{}: no {t} token", vocab.display()))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lower)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    Ok(tok)
}
