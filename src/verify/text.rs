//! [`TextModel`]: the language model of a converted directory and its forward pass.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::mlx::fast::{self, Mask};
use crate::mlx::{self, Array, Dtype};
use crate::recipe::Recipe;

use super::config::{self, ActKind, ArchSpec, EmbedScale, LayerSpec, RopeKind, TextConfig};
use super::rope::{mrope_cos_sin, mrope_text_positions};
use super::weights::{read_config, Embedding, Linear, Store};
use super::{Precision, Result, VerifyError};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Array>,
    k_norm: Option<Array>,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Layer {
    input_norm: Array,
    post_attn_norm: Array,
    pre_ff_norm: Option<Array>,
    post_ff_norm: Option<Array>,
    attn: Attention,
    mlp: Mlp,
    spec: LayerSpec,
}

/// One captured hidden state (`[n, hidden_size]`, row-major, converted to float32).
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenState {
    /// `embed` (after any embedding scale), `layer.<i>` (output of decoder layer i), `norm` (after the
    /// final norm, the input of the head).
    pub name: String,
    pub shape: [usize; 2],
    pub data: Vec<f32>,
}

/// A prompt entering the language model as input embeddings rather than token ids: an image prompt,
/// whose image-token rows hold the vision features (see [`super::multimodal`]).
pub struct EmbedInput {
    /// `[1, n, hidden]`, before any embedding scale (the model applies it, as mlx-vlm's language
    /// models do to `inputs_embeds`).
    pub embeds: Array,
    /// M-RoPE positions (Qwen-VL image prompts); `None`: the ordinary `0..n`.
    pub positions: Option<Vec<[i64; 3]>>,
    /// Qwen3-VL's deepstack features.
    pub deepstack: Option<Deepstack>,
}

/// Qwen3-VL's deepstack: after decoder layer `k` the hidden states of the image tokens get
/// `layers[k]` added (mlx-vlm `_deepstack_process`), for the first `layers.len()` layers.
pub struct Deepstack {
    /// Indices of the image tokens in the prompt.
    pub positions: Vec<usize>,
    /// One `[positions.len(), hidden]` array per layer.
    pub layers: Vec<Array>,
}

impl Deepstack {
    /// `h + rows` where the image tokens are, as `[1, n, d]` (the other rows add an exact zero).
    fn add(&self, h: &Array, layer: usize) -> Result<Array> {
        let Some(rows) = self.layers.get(layer) else {
            return Ok(h.try_clone()?);
        };
        let s = h.shape()?;
        let (n, d) = (s[1], s[2]);
        let m = self.positions.len();
        if rows.shape()? != [m, d] || self.positions.iter().any(|&p| p >= n) {
            return Err(VerifyError::BadInput(format!(
                "deepstack features {:?} for {m} image tokens of width {d} in {n} tokens",
                rows.shape()?
            )));
        }
        let dtype = h.dtype()?;
        let table = mlx::concatenate(
            &[
                &Array::from_slice(&vec![0f32; d], &[1, d])?.astype(dtype)?,
                &rows.astype(dtype)?,
            ],
            0,
        )?;
        let mut idx = vec![0i32; n];
        for (k, &p) in self.positions.iter().enumerate() {
            idx[p] = k as i32 + 1;
        }
        let add = table
            .take(&Array::from_slice(&idx, &[n])?, 0)?
            .reshape(&[1, n as i32, d as i32])?;
        Ok(h.add(&add)?)
    }
}

/// The language model of a converted MLX directory.
///
/// Not `Send`: MLX arrays belong to the thread that made them (see [`crate::mlx::Array`]).
pub struct TextModel {
    dir: PathBuf,
    precision: Precision,
    prefix: String,
    config: TextConfig,
    arch: ArchSpec,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Array,
    head: Head,
}

enum Head {
    /// `embed_tokens.as_linear` (tied).
    Tied,
    Linear(Linear),
}

/// Finds the language model's name prefix (`language_model.model.` or `language_model.`) from the
/// stored names: the one holding `layers.0.input_layernorm.weight`.
fn detect_prefix<'a>(names: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut found: Vec<String> = names
        .filter_map(|n| n.strip_suffix("layers.0.input_layernorm.weight"))
        .filter(|p| p.starts_with("language_model."))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    (found.len() == 1).then(|| found.remove(0))
}

impl TextModel {
    /// Loads the language model of the converted directory `dir` (config.json + safetensors).
    /// [`crate::mlx::init`] must have been called.
    /// The built-in recipe is chosen by config.json's `model_type`, as the converter does.
    pub fn load(dir: &Path, precision: Precision) -> Result<TextModel> {
        let config = read_config(dir)?;
        let recipe = Recipe::for_config(&config)?;
        TextModel::load_inner(dir, precision, &config, &recipe)
    }

    /// [`TextModel::load`] with an explicit recipe (the converter's `--recipe FILE`).
    pub fn load_with_recipe(
        dir: &Path,
        precision: Precision,
        recipe: &Recipe,
    ) -> Result<TextModel> {
        let config = read_config(dir)?;
        TextModel::load_inner(dir, precision, &config, recipe)
    }

    fn load_inner(
        dir: &Path,
        precision: Precision,
        config: &Value,
        recipe: &Recipe,
    ) -> Result<TextModel> {
        let store = Store::open(dir, config, "language_model.", precision)?;
        TextModel::from_store(dir, precision, config, recipe, store)
    }

    /// Builds the model over tensors already in a [`Store`] (a converted directory, or a reference
    /// made from the source checkpoint); `config` is the config.json to follow.
    pub(crate) fn from_store(
        dir: &Path,
        precision: Precision,
        config: &Value,
        recipe: &Recipe,
        store: Store,
    ) -> Result<TextModel> {
        let cfg_path = dir.join("config.json");
        let werr = |msg: String| VerifyError::Weights {
            dir: dir.to_path_buf(),
            msg,
        };
        let prefix = detect_prefix(store.names()).ok_or_else(|| {
            werr("no unique `language_model.…layers.0.input_layernorm.weight`: not a language model this \
                  forward knows"
                .into())
        })?;
        let embed_name = format!("{prefix}embed_tokens");
        if let Some(head) = &recipe.head {
            if head.embedding != format!("{embed_name}.weight") {
                return Err(werr(format!(
                    "the recipe {} names the embedding `{}` but the weights have `{embed_name}.weight`",
                    recipe.name, head.embedding
                )));
            }
        }

        // Sizes from the stored shapes (quantized: rows of the packed weight; the scales give columns).
        let rows = |name: &str| -> Result<usize> {
            store
                .shape(&format!("{name}.weight"))
                .and_then(|s| s.first().copied())
                .ok_or_else(|| werr(format!("tensor `{name}.weight` is missing")))
        };
        let embed_shape = store
            .shape(&format!("{embed_name}.weight"))
            .ok_or_else(|| werr(format!("tensor `{embed_name}.weight` is missing")))?
            .to_vec();
        let hidden_size = match store.shape(&format!("{embed_name}.scales")) {
            // Packed: the true width is the last dim of the dequantized rows; take it from the norm.
            Some(_) => rows(&format!("{prefix}norm"))?,
            None => embed_shape[1],
        };
        let num_layers = {
            let mut n = 0;
            while store.has(&format!("{prefix}layers.{n}.input_layernorm.weight")) {
                n += 1;
            }
            n
        };
        let l0 = format!("{prefix}layers.0.");
        let facts = config::WeightFacts {
            vocab_size: embed_shape[0],
            hidden_size,
            num_layers,
            q_out: rows(&format!("{l0}self_attn.q_proj"))?,
            k_out: rows(&format!("{l0}self_attn.k_proj"))?,
            intermediate: rows(&format!("{l0}mlp.gate_proj"))?,
            qk_norm: store.has(&format!("{l0}self_attn.q_norm.weight")),
            attn_bias: store.has(&format!("{l0}self_attn.q_proj.bias")),
        };
        let (cfg, arch) = config::resolve(config, recipe, &facts, &cfg_path)?;

        let plus_one = arch.norm_plus_one;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, spec) in arch.layers.iter().enumerate() {
            let p = format!("{prefix}layers.{i}.");
            let opt_norm = |name: &str| -> Result<Option<Array>> {
                let n = format!("{p}{name}.weight");
                if store.has(&n) {
                    Ok(Some(store.norm(&n, plus_one)?))
                } else {
                    Ok(None)
                }
            };
            let (pre_ff_norm, post_ff_norm) = if arch.sandwich_norms {
                (
                    Some(store.norm(&format!("{p}pre_feedforward_layernorm.weight"), plus_one)?),
                    Some(store.norm(&format!("{p}post_feedforward_layernorm.weight"), plus_one)?),
                )
            } else {
                (None, None)
            };
            let (q_norm, k_norm) = if arch.qk_norm {
                (opt_norm("self_attn.q_norm")?, opt_norm("self_attn.k_norm")?)
            } else {
                (None, None)
            };
            if arch.qk_norm && (q_norm.is_none() || k_norm.is_none()) {
                return Err(werr(format!("layer {i} lacks self_attn.q_norm / k_norm")));
            }
            layers.push(Layer {
                input_norm: store.norm(&format!("{p}input_layernorm.weight"), plus_one)?,
                post_attn_norm: store
                    .norm(&format!("{p}post_attention_layernorm.weight"), plus_one)?,
                pre_ff_norm,
                post_ff_norm,
                attn: Attention {
                    q: store.linear(&format!("{p}self_attn.q_proj"))?,
                    k: store.linear(&format!("{p}self_attn.k_proj"))?,
                    v: store.linear(&format!("{p}self_attn.v_proj"))?,
                    o: store.linear(&format!("{p}self_attn.o_proj"))?,
                    q_norm,
                    k_norm,
                },
                mlp: Mlp {
                    gate: store.linear(&format!("{p}mlp.gate_proj"))?,
                    up: store.linear(&format!("{p}mlp.up_proj"))?,
                    down: store.linear(&format!("{p}mlp.down_proj"))?,
                },
                spec: *spec,
            });
        }
        let embed = store.embedding(&embed_name)?;
        let norm = store.norm(&format!("{prefix}norm.weight"), plus_one)?;

        // The head: a stored `lm_head` (weight, or only scales/biases when it aliases the embedding's
        // weight, as mlx-vlm's Gemma 3 loader does), else the tied embedding.
        let head_name = "language_model.lm_head";
        let head = if store.has(&format!("{head_name}.weight")) {
            Head::Linear(store.linear(head_name)?)
        } else if store.has(&format!("{head_name}.scales")) {
            Head::Linear(store.linear_from(head_name, &embed_name, head_name)?)
        } else {
            Head::Tied
        };
        let head_rows = match &head {
            Head::Tied => embed.rows()?,
            Head::Linear(l) => l.out_features()?,
        };
        if head_rows != cfg.vocab_size {
            return Err(werr(format!(
                "the head has {head_rows} rows but the embedding {}",
                cfg.vocab_size
            )));
        }

        Ok(TextModel {
            dir: dir.to_path_buf(),
            precision,
            prefix,
            config: cfg,
            arch,
            embed,
            layers,
            norm,
            head,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The language model's weight-name prefix (`language_model.model.` or `language_model.`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    pub fn arch(&self) -> &ArchSpec {
        &self.arch
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Logits `[n, vocab]` (row-major, float32) for a whole prompt, every position, as mlx-vlm's
    /// forward on a text-only prompt (causal, or bidirectional where mlx-vlm runs the prompt as a
    /// prefix: PaliGemma).
    pub fn logits(&self, input_ids: &[i32]) -> Result<Vec<f32>> {
        self.logits_at(input_ids, None)
    }

    /// [`TextModel::logits`] with explicit M-RoPE positions (`[t, h, w]` per token, e.g. for image
    /// tokens of Qwen2-VL); `None` is the text-only `[i, i, i]`. Only M-RoPE models accept positions.
    pub fn logits_at(&self, input_ids: &[i32], positions: Option<&[[i64; 3]]>) -> Result<Vec<f32>> {
        let (logits, _) = self.run(input_ids, positions, false)?;
        Ok(logits.to_vec_f32()?)
    }

    /// The hidden states of a prompt: the (scaled) embeddings, the output of every decoder layer, and
    /// the final norm's output, for finding the first layer where two models diverge.
    pub fn hidden_states(&self, input_ids: &[i32]) -> Result<Vec<HiddenState>> {
        self.hidden_states_at(input_ids, None)
    }

    /// [`TextModel::hidden_states`] with explicit M-RoPE positions (see [`TextModel::logits_at`]).
    pub fn hidden_states_at(
        &self,
        input_ids: &[i32],
        positions: Option<&[[i64; 3]]>,
    ) -> Result<Vec<HiddenState>> {
        Ok(self.logits_and_states(input_ids, positions)?.1)
    }

    /// Logits and hidden states of one forward pass (see [`TextModel::logits_at`] and
    /// [`TextModel::hidden_states`]).
    pub fn logits_and_states(
        &self,
        input_ids: &[i32],
        positions: Option<&[[i64; 3]]>,
    ) -> Result<(Vec<f32>, Vec<HiddenState>)> {
        let (logits, states) = self.run(input_ids, positions, true)?;
        self.collect_states(input_ids.len(), logits, states)
    }

    fn collect_states(
        &self,
        n: usize,
        logits: Array,
        states: Vec<Array>,
    ) -> Result<(Vec<f32>, Vec<HiddenState>)> {
        let logits = logits.to_vec_f32()?;
        let d = self.config.hidden_size;
        let count = states.len();
        states
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let name = if i == 0 {
                    "embed".to_string()
                } else if i + 1 == count {
                    "norm".to_string()
                } else {
                    format!("layer.{}", i - 1)
                };
                Ok(HiddenState {
                    name,
                    shape: [n, d],
                    data: a
                        .astype(Dtype::F32)?
                        .reshape(&[n as i32, d as i32])?
                        .to_vec_f32()?,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(|states| (logits, states))
    }

    /// The token embeddings `[1, n, hidden]` of `ids` as the model looks them up (stored dtype,
    /// dequantized rows when quantized), before any embedding scale: what image features are merged
    /// into ([`super::vision::merge_image_features`]).
    pub fn embed_tokens(&self, ids: &[i32]) -> Result<Array> {
        self.check_ids(ids)?;
        let ids_arr = Array::from_slice(ids, &[1, ids.len()])?;
        self.embed.lookup(&ids_arr)
    }

    /// Logits `[n, vocab]` (row-major, float32) of a forward pass from precomputed input embeddings
    /// (`[1, n, hidden]`, e.g. token embeddings with image features merged in, before the embedding
    /// scale, which is applied here as mlx-vlm's language models do to `inputs_embeds`). `ids` are the
    /// prompt's token ids (their count must match); `positions` as in [`TextModel::logits_at`].
    pub fn logits_from_embeds(
        &self,
        ids: &[i32],
        embeds: &Array,
        positions: Option<&[[i64; 3]]>,
    ) -> Result<Vec<f32>> {
        Ok(self
            .run_inner(ids, Some(embeds), positions, None, false, None)?
            .0
            .to_vec_f32()?)
    }

    /// [`TextModel::logits_from_embeds`] and the hidden states (see [`TextModel::hidden_states`]).
    pub fn logits_and_states_from_embeds(
        &self,
        ids: &[i32],
        embeds: &Array,
        positions: Option<&[[i64; 3]]>,
    ) -> Result<(Vec<f32>, Vec<HiddenState>)> {
        let (logits, states) = self.run_inner(ids, Some(embeds), positions, None, true, None)?;
        self.collect_states(ids.len(), logits, states)
    }

    /// Logits of a prompt given as an [`EmbedInput`] (an image prompt), with the hidden states when
    /// `states` is set.
    pub fn logits_from_input(
        &self,
        ids: &[i32],
        input: &EmbedInput,
        states: bool,
    ) -> Result<(Vec<f32>, Vec<HiddenState>)> {
        let (logits, st) = self.run_inner(
            ids,
            Some(&input.embeds),
            input.positions.as_deref(),
            input.deepstack.as_ref(),
            states,
            None,
        )?;
        self.collect_states(ids.len(), logits, st)
    }

    /// [`TextModel::greedy`] for a prompt given as an [`EmbedInput`]: the prompt's logits and
    /// `new_tokens` greedy tokens. Generated tokens enter as token embeddings; with M-RoPE they take
    /// the positions mlx-vlm decodes with (`index + rope delta` on all axes).
    pub fn greedy_from_input(
        &self,
        ids: &[i32],
        input: &EmbedInput,
        new_tokens: usize,
    ) -> Result<(Vec<f32>, Vec<i32>)> {
        let vocab = self.config.vocab_size;
        let argmax = |l: &[f32]| super::metrics::argmax(&l[l.len() - vocab..]) as i32;
        let cached = self.arch.causal && !self.arch.eager_attention;
        let mut cache = KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            offset: 0,
        };
        let positions = input.positions.as_deref();
        let (logits, _) = self.run_inner(
            ids,
            Some(&input.embeds),
            positions,
            input.deepstack.as_ref(),
            false,
            cached.then_some(&mut cache),
        )?;
        let logits = logits.to_vec_f32()?;
        let delta = positions.map(super::rope::mrope_delta);
        let pos_of = |j: usize| -> Option<[i64; 3]> { delta.map(|d| [j as i64 + d; 3]) };
        let mut seq = ids.to_vec();
        let mut pos: Option<Vec<[i64; 3]>> = input.positions.clone();
        let mut embeds = input.embeds.try_clone()?;
        let mut out = Vec::with_capacity(new_tokens);
        let mut next = argmax(&logits);
        for step in 0..new_tokens {
            out.push(next);
            let j = seq.len();
            seq.push(next);
            if step + 1 == new_tokens {
                break;
            }
            let p1 = pos_of(j);
            let l = if cached {
                let p = p1.map(|p| vec![p]);
                self.run_inner(&[next], None, p.as_deref(), None, false, Some(&mut cache))?
                    .0
            } else {
                // Re-run the whole sequence: the new token's embedding appended to the prompt's.
                let e = self.embed_tokens(&[next])?.astype(embeds.dtype()?)?;
                embeds = mlx::concatenate(&[&embeds, &e], 1)?;
                if let (Some(v), Some(p)) = (pos.as_mut(), p1) {
                    v.push(p);
                }
                self.run_inner(
                    &seq,
                    Some(&embeds),
                    pos.as_deref(),
                    input.deepstack.as_ref(),
                    false,
                    None,
                )?
                .0
            };
            next = argmax(&l.to_vec_f32()?);
        }
        Ok((logits, out))
    }

    fn check_ids(&self, ids: &[i32]) -> Result<()> {
        if ids.is_empty() {
            return Err(VerifyError::BadInput("empty prompt".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(VerifyError::BadInput(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        Ok(())
    }

    /// The forward pass: logits `[n, vocab]` float32 (lazy) and, with `capture`, the hidden states.
    fn run(
        &self,
        ids: &[i32],
        positions: Option<&[[i64; 3]]>,
        capture: bool,
    ) -> Result<(Array, Vec<Array>)> {
        self.run_with(ids, positions, capture, None)
    }

    /// Greedy decoding: the prompt's logits (`[n, vocab]`) and `new_tokens` tokens, each the argmax of
    /// the last position. Causal models decode one token at a time over a KV cache, as mlx-vlm's
    /// `generate` does; prefix-LM models (PaliGemma: the whole sequence attends bidirectionally) and
    /// the explicit-attention path re-run the whole sequence per token.
    pub fn greedy(&self, ids: &[i32], new_tokens: usize) -> Result<(Vec<f32>, Vec<i32>)> {
        let vocab = self.config.vocab_size;
        let argmax = |l: &[f32]| super::metrics::argmax(&l[l.len() - vocab..]) as i32;
        let cached = self.arch.causal && !self.arch.eager_attention;
        let mut cache = KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            offset: 0,
        };
        let (logits, _) = self.run_with(ids, None, false, cached.then_some(&mut cache))?;
        let logits = logits.to_vec_f32()?;
        let mut seq = ids.to_vec();
        let mut out = Vec::with_capacity(new_tokens);
        let mut next = argmax(&logits);
        for step in 0..new_tokens {
            out.push(next);
            seq.push(next);
            if step + 1 == new_tokens {
                break;
            }
            let l = if cached {
                self.run_with(&[next], None, false, Some(&mut cache))?.0
            } else {
                self.run(&seq, None, false)?.0
            };
            next = argmax(&l.to_vec_f32()?);
        }
        Ok((logits, out))
    }

    /// [`TextModel::run`] continuing from `cache` (keys/values of the tokens before `ids`), which it
    /// extends. With a non-empty cache, `ids` is one token.
    fn run_with(
        &self,
        ids: &[i32],
        positions: Option<&[[i64; 3]]>,
        capture: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<(Array, Vec<Array>)> {
        self.run_inner(ids, None, positions, None, capture, cache)
    }

    /// [`TextModel::run_with`] from precomputed input embeddings when `embeds` is given (else the
    /// token embeddings of `ids`).
    fn run_inner(
        &self,
        ids: &[i32],
        embeds: Option<&Array>,
        positions: Option<&[[i64; 3]]>,
        deepstack: Option<&Deepstack>,
        capture: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Array, Vec<Array>)> {
        let offset = cache.as_ref().map_or(0, |c| c.offset);
        let n = ids.len();
        if offset > 0 && n != 1 {
            return Err(VerifyError::BadInput(
                "a cached step takes exactly one text token".into(),
            ));
        }
        if n == 0 {
            return Err(VerifyError::BadInput("empty prompt".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(VerifyError::BadInput(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        if let Some(p) = positions {
            if p.len() != n {
                return Err(VerifyError::BadInput(format!(
                    "{} positions for {n} tokens",
                    p.len()
                )));
            }
            if !matches!(self.arch.rope, RopeKind::Mrope { .. }) {
                return Err(VerifyError::BadInput(format!(
                    "explicit positions need an M-RoPE model; {} uses ordinary rope",
                    self.arch.family
                )));
            }
        }
        let arch = &self.arch;
        let mut h = match embeds {
            Some(e) => {
                let s = e.shape()?;
                if s != [1, n, self.config.hidden_size] {
                    return Err(VerifyError::BadInput(format!(
                        "input embeddings of shape {s:?} for {n} tokens of width {}",
                        self.config.hidden_size
                    )));
                }
                e.try_clone()?
            }
            None => self.embed.lookup(&Array::from_slice(ids, &[1, n])?)?,
        };
        if arch.embeds_to_norm_dtype {
            h = h.astype(self.norm.dtype()?)?;
        }
        let dtype = h.dtype()?;
        let sqrt_hidden = (self.config.hidden_size as f64).sqrt() as f32;
        match arch.embed_scale {
            EmbedScale::None => {}
            EmbedScale::SqrtHidden => h = h.multiply(&Array::scalar(sqrt_hidden, dtype)?)?,
            EmbedScale::SqrtHiddenBf16 => {
                let c = Array::scalar(sqrt_hidden, Dtype::BF16)?.astype(dtype)?;
                h = h.multiply(&c)?;
            }
        }
        let mut states = Vec::new();
        if capture {
            states.push(h.try_clone()?);
        }

        let rope_tables = match &arch.rope {
            RopeKind::Mrope {
                section,
                style,
                base,
            } => {
                let text_pos;
                let pos = match positions {
                    Some(p) => p,
                    None => {
                        text_pos = mrope_text_positions(offset + n).split_off(offset);
                        &text_pos
                    }
                };
                Some(mrope_cos_sin(
                    pos,
                    self.config.head_dim,
                    *base,
                    section,
                    *style,
                    dtype,
                )?)
            }
            RopeKind::Fast { .. } => None,
        };
        let ctx = Ctx {
            cfg: &self.config,
            arch,
            n,
            offset,
            rope_tables: rope_tables.as_ref(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, &ctx, kv)?;
            if let Some(ds) = deepstack {
                if i < ds.layers.len() {
                    h = ds.add(&h, i)?;
                }
            }
            if capture {
                states.push(h.try_clone()?);
            }
        }
        if let Some(c) = cache {
            c.offset += n;
        }
        let h = fast::rms_norm(&h, Some(&self.norm), self.config.rms_norm_eps)?;
        if capture {
            states.push(h.try_clone()?);
        }
        let mut logits = match &self.head {
            Head::Tied => self.embed.as_linear(&h)?,
            Head::Linear(l) => l.forward(&h)?,
        };
        if let Some(cap) = arch.final_logit_softcap {
            let c = Array::scalar(cap, logits.dtype()?)?;
            logits = logits.divide(&c)?.tanh()?.multiply(&c)?;
        }
        let logits = logits
            .reshape(&[n as i32, vocab as i32])?
            .astype(Dtype::F32)?;
        let mut all: Vec<&Array> = vec![&logits];
        all.extend(states.iter());
        mlx::eval(&all)?;
        Ok((logits, states))
    }
}

/// Keys and values of the tokens seen so far, per layer (`[1, kv_heads, L, head_dim]`, after rope).
struct KvCache {
    layers: Vec<Option<(Array, Array)>>,
    offset: usize,
}

/// What every layer needs for one forward pass.
struct Ctx<'a> {
    cfg: &'a TextConfig,
    arch: &'a ArchSpec,
    /// Tokens in this pass.
    n: usize,
    /// Tokens before them (in the KV cache).
    offset: usize,
    rope_tables: Option<&'a (Array, Array)>,
}

impl Ctx<'_> {
    fn norm(&self, x: &Array, w: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(w), self.cfg.rms_norm_eps)?)
    }

    /// Gemma 3's float16 guard: `clip(x.f32, -f16::MAX, f16::MAX).f16`; identity for other dtypes.
    fn clip(&self, x: Array) -> Result<Array> {
        if !self.arch.clip_f16_residual || x.dtype()? != Dtype::F16 {
            return Ok(x);
        }
        let bound = half::f16::MAX.to_f32();
        let lo = Array::scalar(-bound, Dtype::F32)?;
        let hi = Array::scalar(bound, Dtype::F32)?;
        Ok(x.astype(Dtype::F32)?
            .clip(Some(&lo), Some(&hi))?
            .astype(Dtype::F16)?)
    }
}

/// `x[..., start:stop]` on the last axis of a 4-d array.
fn last_axis(x: &Array, start: i32, stop: i32) -> Result<Array> {
    let s = x.shape()?;
    let mut lo = vec![0i32; s.len()];
    let mut hi: Vec<i32> = s.iter().map(|&d| d as i32).collect();
    let last = s.len() - 1;
    lo[last] = start;
    hi[last] = stop;
    Ok(x.slice(&lo, &hi, &vec![1; s.len()])?)
}

/// `q * cos + rotate_half(q) * sin` in `q`'s dtype (mlx-vlm `_apply_rotary_embedding`).
fn apply_mrope(x: &Array, cos: &Array, sin: &Array, head_dim: usize) -> Result<Array> {
    let half = (head_dim / 2) as i32;
    let x1 = last_axis(x, 0, half)?;
    let x2 = last_axis(x, half, 2 * half)?;
    let rot = mlx::concatenate(&[&x2.negative()?, &x1], -1)?;
    let out = x.multiply(cos)?.add(&rot.multiply(sin)?)?;
    Ok(out.astype(x.dtype()?)?)
}

/// The sliding-window mask `(i >= j) & (i < j + window)` as a bool `[n, n]` array.
fn window_mask(n: usize, window: usize) -> Result<Array> {
    let mut m = vec![0u8; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = u8::from(i >= j && i < j + window);
        }
    }
    Ok(Array::from_bytes(&m, &[n, n], Dtype::Bool)?)
}

impl Layer {
    fn forward(
        &self,
        x: &Array,
        ctx: &Ctx<'_>,
        kv: Option<&mut Option<(Array, Array)>>,
    ) -> Result<Array> {
        let x = ctx.clip(x.try_clone()?)?;
        let r = self.attention(&ctx.norm(&x, &self.input_norm)?, ctx, kv)?;
        match (&self.pre_ff_norm, &self.post_ff_norm) {
            (Some(pre), Some(post)) => {
                let h = ctx.clip(x.add(&ctx.norm(&r, &self.post_attn_norm)?)?)?;
                let r = self.mlp(&ctx.norm(&h, pre)?, ctx.arch.act)?;
                ctx.clip(h.add(&ctx.norm(&r, post)?)?)
            }
            _ => {
                let h = x.add(&r)?;
                let r = self.mlp(&ctx.norm(&h, &self.post_attn_norm)?, ctx.arch.act)?;
                Ok(h.add(&r)?)
            }
        }
    }

    fn mlp(&self, x: &Array, act: ActKind) -> Result<Array> {
        let g = self.mlp.gate.forward(x)?;
        let g = match act {
            ActKind::Silu => g.silu()?,
            ActKind::GeluApprox => g.gelu_approx()?,
            ActKind::Gelu => g.gelu()?,
        };
        let u = self.mlp.up.forward(x)?;
        self.mlp.down.forward(&g.multiply(&u)?)
    }

    fn attention(
        &self,
        x: &Array,
        ctx: &Ctx<'_>,
        kv: Option<&mut Option<(Array, Array)>>,
    ) -> Result<Array> {
        let cfg = ctx.cfg;
        let arch = ctx.arch;
        let (n, hd) = (ctx.n as i32, cfg.head_dim as i32);
        let (nh, nkv) = (
            cfg.num_attention_heads as i32,
            cfg.num_key_value_heads as i32,
        );
        let a = &self.attn;
        let mut q = a.q.forward(x)?.reshape(&[1, n, nh, hd])?;
        let mut k = a.k.forward(x)?.reshape(&[1, n, nkv, hd])?;
        let v = a.v.forward(x)?.reshape(&[1, n, nkv, hd])?;
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = ctx.norm(&q, qn)?;
            k = ctx.norm(&k, kn)?;
        }
        let perm = [0, 2, 1, 3];
        let (mut q, mut k, v) = (
            q.transpose(&perm)?,
            k.transpose(&perm)?,
            v.transpose(&perm)?,
        );
        match (&arch.rope, ctx.rope_tables) {
            (RopeKind::Mrope { .. }, Some((cos, sin))) => {
                q = apply_mrope(&q, cos, sin, cfg.head_dim)?;
                k = apply_mrope(&k, cos, sin, cfg.head_dim)?;
            }
            (RopeKind::Fast { traditional }, _) => {
                let s = &self.spec;
                let off = ctx.offset as i32;
                q = fast::rope(&q, hd, *traditional, s.rope_base, s.rope_scale, off)?;
                k = fast::rope(&k, hd, *traditional, s.rope_base, s.rope_scale, off)?;
            }
            (RopeKind::Mrope { .. }, None) => {
                return Err(VerifyError::BadInput("M-RoPE tables missing".into()))
            }
        }
        let (mut k, mut v) = (k, v);
        if let Some(slot) = kv {
            if let Some((ck, cv)) = slot.take() {
                k = mlx::concatenate(&[&ck, &k], 2)?;
                v = mlx::concatenate(&[&cv, &v], 2)?;
            }
            *slot = Some((k.try_clone()?, v.try_clone()?));
        }
        if ctx.offset > 0 {
            // One new token: it sees every cached key, or the last `window` of them (the keys a
            // rotating cache of that size holds), so no mask is needed.
            let len = ctx.offset + 1;
            if let Some(w) = self.spec.sliding_window.filter(|&w| len > w) {
                let s = k.shape()?;
                let (lo, hi) = (
                    [0, 0, (len - w) as i32, 0],
                    [s[0] as i32, s[1] as i32, len as i32, s[3] as i32],
                );
                k = k.slice(&lo, &hi, &[1, 1, 1, 1])?;
                v = v.slice(&lo, &hi, &[1, 1, 1, 1])?;
            }
            let out = fast::scaled_dot_product_attention(&q, &k, &v, arch.attn_scale, Mask::None)?;
            let out = out.transpose(&perm)?.reshape(&[1, n, nh * hd])?;
            return a.o.forward(&out);
        }
        let window = self.spec.sliding_window.filter(|&w| ctx.n > w);
        let wmask = match window {
            Some(w) if arch.causal => Some(window_mask(ctx.n, w)?),
            _ => None,
        };
        let out = if arch.eager_attention {
            eager_attention(&q, &k, &v, ctx, wmask.as_ref())?
        } else {
            let mask = match (&wmask, arch.causal) {
                (Some(m), _) => Mask::Array(m),
                (None, true) => Mask::Causal,
                (None, false) => Mask::None,
            };
            fast::scaled_dot_product_attention(&q, &k, &v, arch.attn_scale, mask)?
        };
        let out = out.transpose(&perm)?.reshape(&[1, n, nh * hd])?;
        a.o.forward(&out)
    }
}

/// mlx-vlm's explicit attention (PaliGemma's Gemma 2 path): `q * scale`, scores in float32, optional
/// `tanh` soft-capping, additive mask, precise softmax cast back to the queries' dtype, `@ v`. Grouped
/// heads are broadcast rather than repeated (same products).
fn eager_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    ctx: &Ctx<'_>,
    window: Option<&Array>,
) -> Result<Array> {
    let cfg = ctx.cfg;
    let (n, hd) = (ctx.n as i32, cfg.head_dim as i32);
    let nkv = cfg.num_key_value_heads as i32;
    let rep = (cfg.num_attention_heads / cfg.num_key_value_heads) as i32;
    let dtype = q.dtype()?;
    let q = q
        .multiply(&Array::scalar(ctx.arch.attn_scale, dtype)?)?
        .reshape(&[1, nkv, rep, n, hd])?;
    let k = k.reshape(&[1, nkv, 1, n, hd])?;
    let v = v.reshape(&[1, nkv, 1, n, hd])?;
    let mut scores = q
        .astype(Dtype::F32)?
        .matmul(&k.astype(Dtype::F32)?.transpose(&[0, 1, 2, 4, 3])?)?;
    if let Some(cap) = ctx.arch.attn_logit_softcap {
        let c = Array::scalar(cap, Dtype::F32)?;
        scores = scores.divide(&c)?.tanh()?.multiply(&c)?;
    }
    if ctx.arch.causal {
        // (1 - mask) * finfo(f32).min, as mlx-vlm turns a boolean mask into an additive one.
        let nn = ctx.n;
        let allowed = match window {
            Some(_) => {
                return Err(VerifyError::Unsupported(
                    "sliding windows with explicit attention".into(),
                ))
            }
            None => (0..nn * nn).map(|i| i / nn >= i % nn).collect::<Vec<_>>(),
        };
        let add: Vec<f32> = allowed
            .iter()
            .map(|&ok| if ok { 0.0 } else { f32::MIN })
            .collect();
        scores = scores.add(&Array::from_slice(&add, &[nn, nn])?)?;
    }
    let p = scores.softmax(&[-1], true)?.astype(dtype)?;
    Ok(p.matmul(&v)?.reshape(&[1, nkv * rep, n, hd])?)
}
