//! Image prompts as token ids, built from the checkpoint's own files the way its transformers
//! processor builds them: the chat template (`chat_template.jinja`, `chat_template.json` or
//! `tokenizer_config.json`, rendered by minijinja with Python-compatible string methods and the
//! whitespace settings transformers uses), the image placeholder expanded to the number of image
//! features, and the tokenizer (`tokenizer.json`, the `tokenizers` crate).
//!
//! Per architecture (transformers' `processing_<arch>.py`):
//! - LLaVA: the template writes `<image>`; it becomes `<image>` x N.
//! - Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the template writes `<|image_pad|>` (between the vision start
//!   and end tokens); it becomes `<|image_pad|>` x N, N the merged patches of the image's grid.
//! - Gemma 3: the template writes `<start_of_image>`; it becomes
//!   `\n\n<start_of_image>` + `<image_soft_token>` x N + `<end_of_image>\n\n`.
//! - Idefics3 / SmolVLM: the template writes `<image>`; it becomes the tile layout of
//!   [`super::idefics::image_prompt_string`] (row/column tokens, the global image, `image_seq_len`
//!   image tokens per tile), which the caller passes to [`PromptBuilder::image_prompt_expanded`].
//! - PaliGemma (no chat template): `<image>` x N + bos + text + `\n`, tokenized without adding
//!   special tokens.
//! - Mistral 3 (Pixtral): the template writes `[IMG]`; it becomes one row of `[IMG]` per merged
//!   patch row, rows separated by `[IMG_BREAK]`, the last ended by `[IMG_END]`
//!   ([`PromptBuilder::image_grid_prompt`]).
//!
//! Special tokens are added by the tokenizer unless the rendered prompt already starts with the bos
//! token (transformers' `ProcessorMixin.apply_chat_template` rule).

use std::path::Path;

use serde_json::Value;

use super::weights::{read_json, read_json_or_null};
use super::{Result, VerifyError};

/// Where the image goes in the prompt text, per architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlaceholder {
    /// The template's image token is repeated once per feature (LLaVA).
    Repeat { token: String },
    /// Gemma 3: begin-of-image token written by the template, soft tokens, end-of-image token.
    Gemma3 {
        boi: String,
        image: String,
        eoi: String,
    },
    /// PaliGemma: image tokens, then bos, the text and a newline; no template.
    PaliGemma { token: String },
    /// Mistral 3 / Pixtral: the template's image token becomes rows of image tokens, each row ended
    /// by the break token, the last by the end token instead.
    Pixtral {
        image: String,
        brk: String,
        end: String,
    },
    /// Idefics3 / SmolVLM: the template's image token becomes a text that depends on the image's
    /// tiles ([`PromptBuilder::image_prompt_expanded`]).
    Tiles { token: String },
}

/// Builds image prompts for one checkpoint.
pub struct PromptBuilder {
    tokenizer: tokenizers::Tokenizer,
    template: Option<String>,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special: serde_json::Map<String, Value>,
    placeholder: ImagePlaceholder,
}

/// A special token's text: a string, or an AddedToken object's `content`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// transformers 5's `GemmaTokenizer` does not take `tokenizer.json`'s pipeline: it keeps the file's
/// vocabulary, merges and added tokens but builds its own (a BPE with byte fallback and fused unknowns,
/// spaces normalized to `\u{2581}`, split after each space). Rewrites the file's JSON to that pipeline
/// so the ids are the ones the processor gives (on a real Gemma tokenizer.json the two agree).
fn gemma_pipeline(tok: &mut Value, tok_config: &Value) {
    let unk = tok_config
        .get("unk_token")
        .and_then(token_text)
        .unwrap_or_else(|| "<unk>".into());
    if let Some(m) = tok.get_mut("model").and_then(Value::as_object_mut) {
        m.insert("unk_token".into(), Value::String(unk));
        m.insert("fuse_unk".into(), Value::Bool(true));
        m.insert("byte_fallback".into(), Value::Bool(true));
        m.insert("dropout".into(), Value::Null);
    }
    if let Some(o) = tok.as_object_mut() {
        o.insert(
            "normalizer".into(),
            serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
        );
        o.insert(
            "pre_tokenizer".into(),
            serde_json::json!({"type": "Split", "pattern": {"String": " "},
                               "behavior": "MergedWithPrevious", "invert": false}),
        );
    }
}

/// The chat template of `dir`, looked up where transformers looks: `chat_template.jinja`,
/// `chat_template.json`, then `tokenizer_config.json` (a string, or a list of named templates whose
/// `default` is used).
fn find_template(dir: &Path, tok_config: &Value) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| crate::Error::read(&jinja, e).into());
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        if let Some(t) = read_json(&json)?
            .get("chat_template")
            .and_then(Value::as_str)
        {
            return Ok(Some(t.to_string()));
        }
    }
    Ok(match tok_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

impl PromptBuilder {
    /// Reads the tokenizer, template and special tokens of `dir`; `config` is its config.json.
    pub fn from_dir(dir: &Path, config: &Value) -> Result<PromptBuilder> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(VerifyError::Unsupported(format!(
                "{}: no tokenizer.json (image prompts need the fast tokenizer file)",
                dir.display()
            )));
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tok_config = read_json_or_null(&tc_path)?;
        let mut tok_json = read_json(&tok_path)?;
        let class = tok_config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if class.trim_end_matches("Fast") == "GemmaTokenizer" {
            gemma_pipeline(&mut tok_json, &tok_config);
        }
        let bytes =
            serde_json::to_vec(&tok_json).map_err(|e| VerifyError::BadInput(e.to_string()))?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| VerifyError::Config {
                path: tok_path.clone(),
                msg: format!("cannot load the tokenizer: {e}"),
            })?;
        let mut special = serde_json::Map::new();
        let stm = dir.join("special_tokens_map.json");
        let stm = read_json_or_null(&stm)?;
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = tok_config
                .get(key)
                .and_then(token_text)
                .or_else(|| stm.get(key).and_then(token_text))
            {
                special.insert(key.to_string(), Value::String(t));
            }
        }
        let image_token_id = config
            .get("image_token_index")
            .or_else(|| config.get("image_token_id"))
            .and_then(Value::as_u64);
        let token_of = |id: Option<u64>, what: &str| -> Result<String> {
            id.and_then(|i| tokenizer.id_to_token(i as u32))
                .ok_or_else(|| VerifyError::Config {
                    path: dir.join("config.json"),
                    msg: format!("the {what} token id is missing or not in the tokenizer"),
                })
        };
        let placeholder = match model_type {
            // Qwen-VL templates write `<|vision_start|><|image_pad|><|vision_end|>`; the processor
            // repeats the pad token once per merged patch.
            "llava" | "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" => ImagePlaceholder::Repeat {
                token: token_of(image_token_id, "image")?,
            },
            "idefics3" | "smolvlm" => ImagePlaceholder::Tiles {
                token: token_of(image_token_id, "image")?,
            },
            // Any-res: one `<image>` per packed feature (base tile, unpadded grid, newlines).
            "llava_next" | "llava_onevision" => ImagePlaceholder::Repeat {
                token: token_of(image_token_id, "image")?,
            },
            "paligemma" => ImagePlaceholder::PaliGemma {
                token: token_of(image_token_id, "image")?,
            },
            "gemma3" => ImagePlaceholder::Gemma3 {
                boi: token_of(config.get("boi_token_index").and_then(Value::as_u64), "boi")?,
                image: token_of(image_token_id, "image")?,
                eoi: token_of(config.get("eoi_token_index").and_then(Value::as_u64), "eoi")?,
            },
            "mistral3" => {
                // transformers' PixtralProcessor reads the break and end tokens from
                // processor_config.json (its defaults otherwise).
                let pc = dir.join("processor_config.json");
                let pc = read_json_or_null(&pc)?;
                let named = |key: &str, default: &str| -> Result<String> {
                    let t = pc
                        .get(key)
                        .and_then(token_text)
                        .unwrap_or_else(|| default.into());
                    match tokenizer.token_to_id(&t) {
                        Some(_) => Ok(t),
                        None => Err(VerifyError::Config {
                            path: tok_path.clone(),
                            msg: format!("the {key} `{t}` is not in the tokenizer"),
                        }),
                    }
                };
                ImagePlaceholder::Pixtral {
                    image: token_of(image_token_id, "image")?,
                    brk: named("image_break_token", "[IMG_BREAK]")?,
                    end: named("image_end_token", "[IMG_END]")?,
                }
            }
            other => {
                return Err(VerifyError::Unsupported(format!(
                    "image prompts for `{other}`"
                )))
            }
        };
        let template = find_template(dir, &tok_config)?;
        if template.is_none() && !matches!(placeholder, ImagePlaceholder::PaliGemma { .. }) {
            return Err(VerifyError::Unsupported(format!(
                "{}: no chat template",
                dir.display()
            )));
        }
        Ok(PromptBuilder {
            tokenizer,
            template,
            special,
            placeholder,
        })
    }

    /// The prompt text before the image expansion: the chat template applied to one user turn holding
    /// the image and `text`, with the generation prompt.
    pub fn render(&self, text: &str) -> Result<String> {
        let Some(template) = &self.template else {
            return Ok(text.to_string());
        };
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| VerifyError::BadInput(format!("template syntax: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // transformers' `{% generation %}` marks assistant text for masks; it renders its body as is.
        let generation = regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}")
            .map_err(|e| VerifyError::BadInput(e.to_string()))?;
        let source = generation.replace_all(template, "");
        let tmpl = env.template_from_str(&source).map_err(|e| {
            VerifyError::Unsupported(format!("the chat template does not parse: {e}"))
        })?;
        let mut ctx = self.special.clone();
        ctx.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": text}
            ]}]),
        );
        ctx.insert("add_generation_prompt".into(), Value::Bool(true));
        tmpl.render(to_jinja(&Value::Object(ctx)))
            .map_err(|e| VerifyError::Unsupported(format!("the chat template fails: {e}")))
    }

    /// Token ids of an image prompt: `text` with one image of `image_tokens` features.
    pub fn image_prompt(&self, text: &str, image_tokens: usize) -> Result<Vec<i32>> {
        let rendered = self.render(text)?;
        let (expanded, add_special) = match &self.placeholder {
            ImagePlaceholder::Repeat { token } => (
                expand_once(&rendered, token, &token.repeat(image_tokens))?,
                None,
            ),
            ImagePlaceholder::Gemma3 { boi, image, eoi } => {
                let full = format!("\n\n{boi}{}{eoi}\n\n", image.repeat(image_tokens));
                (expand_once(&rendered, boi, &full)?, None)
            }
            ImagePlaceholder::Tiles { .. } => return Err(VerifyError::Unsupported(
                "this image placeholder depends on the image's tiles: use image_prompt_expanded"
                    .into(),
            )),
            ImagePlaceholder::PaliGemma { token } => {
                let bos = self
                    .special
                    .get("bos_token")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                (
                    format!("{}{bos}{rendered}\n", token.repeat(image_tokens)),
                    Some(false),
                )
            }
            ImagePlaceholder::Pixtral { .. } => {
                return Err(VerifyError::Unsupported(
                    "Pixtral image prompts depend on the image's token grid \
                     (PromptBuilder::image_grid_prompt)"
                        .into(),
                ))
            }
        };
        self.encode(&expanded, add_special)
    }

    /// Token ids of an image prompt whose image is a grid of `rows x cols` tokens (Mistral 3); for
    /// other placeholders, [`PromptBuilder::image_prompt`] with `rows * cols` tokens.
    pub fn image_grid_prompt(&self, text: &str, rows: usize, cols: usize) -> Result<Vec<i32>> {
        let ImagePlaceholder::Pixtral { image, brk, end } = &self.placeholder else {
            return self.image_prompt(text, rows * cols);
        };
        if rows == 0 || cols == 0 {
            return Err(VerifyError::BadInput(format!(
                "an image of {rows}x{cols} tokens"
            )));
        }
        let grid = vec![image.repeat(cols); rows].join(brk.as_str()) + end;
        let expanded = expand_once(&self.render(text)?, image, &grid)?;
        self.encode(&expanded, None)
    }

    /// Token ids of an image prompt whose image placeholder (the template's image token) becomes
    /// `expansion` (Idefics3 / SmolVLM tiles).
    pub fn image_prompt_expanded(&self, text: &str, expansion: &str) -> Result<Vec<i32>> {
        let token = match &self.placeholder {
            ImagePlaceholder::Tiles { token } | ImagePlaceholder::Repeat { token } => token,
            _ => {
                return Err(VerifyError::Unsupported(
                    "an explicit image expansion for this architecture".into(),
                ))
            }
        };
        let rendered = self.render(text)?;
        self.encode(&expand_once(&rendered, token, expansion)?, None)
    }

    /// The image placeholder's token text (`<image>`, `<|image_pad|>`, ...).
    pub fn image_token(&self) -> &str {
        match &self.placeholder {
            ImagePlaceholder::Repeat { token }
            | ImagePlaceholder::Tiles { token }
            | ImagePlaceholder::PaliGemma { token } => token,
            ImagePlaceholder::Gemma3 { image, .. } | ImagePlaceholder::Pixtral { image, .. } => {
                image
            }
        }
    }

    /// Tokenizes a prompt; `add_special` `None`: unless it starts with the bos token.
    fn encode(&self, expanded: &str, add_special: Option<bool>) -> Result<Vec<i32>> {
        let starts_with_bos = self
            .special
            .get("bos_token")
            .and_then(Value::as_str)
            .is_some_and(|b| !b.is_empty() && expanded.starts_with(b));
        let add_special = add_special.unwrap_or(!starts_with_bos);
        let enc = self
            .tokenizer
            .encode(expanded, add_special)
            .map_err(|e| VerifyError::BadInput(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }
}

/// A JSON value as a template value.
fn to_jinja(v: &Value) -> minijinja::Value {
    match v {
        Value::Null => minijinja::Value::from(()),
        Value::Bool(b) => minijinja::Value::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => minijinja::Value::from(i),
            None => minijinja::Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => minijinja::Value::from(s.as_str()),
        Value::Array(a) => minijinja::Value::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => minijinja::Value::from(
            o.iter()
                .map(|(k, v)| (k.clone(), to_jinja(v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
    }
}

/// Replaces the single occurrence of `placeholder` in `text` by `with`.
fn expand_once(text: &str, placeholder: &str, with: &str) -> Result<String> {
    let count = text.matches(placeholder).count();
    if count != 1 {
        return Err(VerifyError::Unsupported(format!(
            "the chat template wrote the image placeholder `{placeholder}` {count} times for one image"
        )));
    }
    Ok(text.replacen(placeholder, with, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_expands_exactly_once() {
        assert_eq!(
            expand_once("a <i> b", "<i>", "<i><i>").unwrap(),
            "a <i><i> b"
        );
        assert!(expand_once("a b", "<i>", "x").is_err());
        assert!(expand_once("<i><i>", "<i>", "x").is_err());
    }

    #[test]
    fn special_token_text() {
        assert_eq!(token_text(&serde_json::json!("<s>")).unwrap(), "<s>");
        assert_eq!(
            token_text(&serde_json::json!({"content": "<bos>", "lstrip": false})).unwrap(),
            "<bos>"
        );
        assert!(token_text(&Value::Null).is_none());
    }
}
