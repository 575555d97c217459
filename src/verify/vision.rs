//! [`VisionModel`]: the vision tower and multi-modal projector of a converted directory, turning
//! preprocessed pixels ([`super::image::PixelValues`]) into image features in the language model's
//! embedding space, and [`merge_image_features`], which places them at the image-token positions.
//!
//! Semantics follow mlx-vlm (`models/<arch>/vision.py` and `<arch>.py`), including its dtypes:
//! - LLaVA (CLIP ViT): the pixels enter in float32 (mlx-vlm does not cast them, so the tower runs in
//!   float32 with its weights promoted), a class token, `pre_layrnorm`, fast-GELU MLPs; the features
//!   are the hidden state `vision_feature_layer` (an index into [embeddings, layer 0, ...], or a list
//!   concatenated), without the class token under the `default` strategy; projector
//!   `linear_2(gelu(linear_1(x)))`.
//! - PaliGemma (SigLIP): pixels cast to the embeddings' dtype, tanh-GELU MLPs, `post_layernorm` on the
//!   last layer, the result cast back to float32, one linear projection; the features are divided by
//!   `sqrt(hidden_size)` (config.json's top level, mlx-vlm's default 2048 when absent) before merging.
//! - Gemma 3 (SigLIP): as PaliGemma up to `post_layernorm`, then average pooling of the patch grid to
//!   `mm_tokens_per_image`, Gemma RMSNorm (`1 + w`) and `x @ mm_input_projection_weight`, cast to the
//!   tower's dtype, divided by `sqrt(hidden_size)` as PaliGemma.
//!
//! Layers stored quantized run `quantized_matmul` ([`super::weights::Linear`]); [`Precision::Float32`]
//! upcasts every weight as for the language model. The patch embedding must be stored in MLX's layout
//! (`[out, kH, kW, in]`, SPEC.md section 4): any other shape is a broken conversion.

use std::path::Path;

use serde_json::Value;

use crate::mlx::{self, fast, Array, Dtype};

use super::image::PixelValues;
use super::weights::{read_config, Linear, Store};
use super::{Precision, Result, VerifyError};

/// The vision architectures [`VisionModel`] runs, by top-level `model_type`.
pub const SUPPORTED_VISION: &[&str] = &[
    "llava",
    "paligemma",
    "gemma3",
    "llava_next",
    "llava_onevision",
];

/// How the features leave the tower and enter the language model.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionArch {
    /// CLIP + two-layer MLP projector.
    Llava {
        /// Hidden-state indices (Python-style, negative from the end) concatenated on the features axis.
        feature_layers: Vec<i64>,
        /// `vision_feature_select_strategy == "default"`: drop the class token.
        drop_cls: bool,
    },
    /// SigLIP + one linear projection; features scaled by `1 / sqrt(hidden)`.
    PaliGemma { hidden_size: usize },
    /// SigLIP + average pool + soft-embedding norm + projection; features scaled by `1 / sqrt(hidden)`.
    Gemma3 {
        hidden_size: usize,
        tokens_per_image: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// `x * sigmoid(1.702 x)` (`nn.GELU(approx="fast")`, mlx-vlm's CLIP MLP).
    FastGelu,
    /// Tanh-approximated GELU (`nn.GELU(approx="precise")`, mlx-vlm's SigLIP MLP; the projector of
    /// LLaVA uses the exact one).
    GeluTanh,
}

pub(crate) struct LayerNorm {
    w: Array,
    b: Option<Array>,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(store: &Store, module: &str, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: store.float(&format!("{module}.weight"))?,
            b: store.float_opt(&format!("{module}.bias"))?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::layer_norm(
            x,
            Some(&self.w),
            self.b.as_ref(),
            self.eps,
        )?)
    }
}

pub(crate) struct EncoderLayer {
    norm1: LayerNorm,
    norm2: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The layers `{prefix}encoder.layers.{0,1,...}` of a CLIP/SigLIP-style encoder (LLaVA, PaliGemma,
/// Gemma 3, LLaVA-NeXT/OneVision, Idefics3/SmolVLM), as many as are stored.
pub(crate) fn load_encoder(store: &Store, prefix: &str, eps: f32) -> Result<Vec<EncoderLayer>> {
    let mut layers = Vec::new();
    while store.has(&format!(
        "{prefix}encoder.layers.{}.layer_norm1.weight",
        layers.len()
    )) {
        let l = format!("{prefix}encoder.layers.{}.", layers.len());
        layers.push(EncoderLayer {
            norm1: LayerNorm::load(store, &format!("{l}layer_norm1"), eps)?,
            norm2: LayerNorm::load(store, &format!("{l}layer_norm2"), eps)?,
            q: store.linear(&format!("{l}self_attn.q_proj"))?,
            k: store.linear(&format!("{l}self_attn.k_proj"))?,
            v: store.linear(&format!("{l}self_attn.v_proj"))?,
            o: store.linear(&format!("{l}self_attn.out_proj"))?,
            fc1: store.linear(&format!("{l}mlp.fc1"))?,
            fc2: store.linear(&format!("{l}mlp.fc2"))?,
        });
    }
    Ok(layers)
}

/// Runs `layers` on `x` (`[B, L, D]`): pre-norm attention over all positions, then the MLP with
/// `act`; `each` sees the output of every layer.
pub(crate) fn run_encoder(
    layers: &[EncoderLayer],
    mut x: Array,
    heads: usize,
    act: Act,
    mut each: impl FnMut(&Array) -> Result<()>,
) -> Result<Array> {
    let s = x.shape()?;
    let (b, len, d) = (s[0] as i32, s[1] as i32, s[2] as i32);
    let heads = heads as i32;
    let hd = d / heads;
    let scale = (hd as f32).powf(-0.5);
    for l in layers {
        let y = l.norm1.forward(&x)?;
        let split = |a: Array| -> Result<Array> {
            Ok(a.reshape(&[b, len, heads, hd])?.transpose(&[0, 2, 1, 3])?)
        };
        let q = split(l.q.forward(&y)?)?;
        let k = split(l.k.forward(&y)?)?;
        let v = split(l.v.forward(&y)?)?;
        let o = fast::scaled_dot_product_attention(&q, &k, &v, scale, fast::Mask::None)?
            .transpose(&[0, 2, 1, 3])?
            .reshape(&[b, len, d])?;
        x = x.add(&l.o.forward(&o)?)?;
        let h = l.fc1.forward(&l.norm2.forward(&x)?)?;
        let h = match act {
            Act::FastGelu => {
                let c = Array::scalar(1.702, h.dtype()?)?;
                h.multiply(&c.multiply(&h)?.sigmoid()?)?
            }
            Act::GeluTanh => h.gelu_approx()?,
        };
        x = x.add(&l.fc2.forward(&h)?)?;
        each(&x)?;
    }
    Ok(x)
}

enum Projector {
    Llava { l1: Linear, l2: Linear },
    PaliGemma { linear: Linear },
    Gemma3 { norm: Array, proj: Array, eps: f32 },
}

/// The vision tower and projector of a converted directory.
///
/// Not `Send` (MLX arrays, see [`crate::mlx::Array`]).
pub struct VisionModel {
    arch: VisionArch,
    /// Top-level `model_type`.
    model_type: String,
    image_token_id: i32,
    pad_token_id: Option<i32>,
    image_size: usize,
    patch_size: usize,
    heads: usize,
    act: Act,
    patch_w: Array,
    patch_b: Option<Array>,
    class_emb: Option<Array>,
    pos_emb: Array,
    pre_norm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projector: Projector,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|n| n as usize)
}

impl VisionModel {
    /// Whether `config` (a config.json) names an architecture whose vision path is implemented.
    pub fn supports(config: &Value) -> bool {
        config
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(|t| SUPPORTED_VISION.contains(&t))
    }

    /// Loads the vision tower and projector of the converted directory `dir`.
    pub fn load(dir: &Path, precision: Precision) -> Result<VisionModel> {
        let config = read_config(dir)?;
        let store = Store::open_roots(
            dir,
            &config,
            &["vision_tower.", "multi_modal_projector."],
            precision,
        )?;
        VisionModel::from_store(dir, &config, &store)
    }

    /// Builds the model over tensors in a [`Store`] (a converted directory or a reference made from
    /// the source); `config` is the config.json to follow.
    pub(crate) fn from_store(dir: &Path, config: &Value, store: &Store) -> Result<VisionModel> {
        let cfg_path = dir.join("config.json");
        let cerr = |msg: String| VerifyError::Config {
            path: cfg_path.clone(),
            msg,
        };
        let werr = |msg: String| VerifyError::Weights {
            dir: dir.to_path_buf(),
            msg,
        };
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !SUPPORTED_VISION.contains(&model_type.as_str()) {
            return Err(VerifyError::Unsupported(format!(
                "the vision path of `{model_type}` (image prompts support {})",
                SUPPORTED_VISION.join(", ")
            )));
        }
        let vc = config
            .get("vision_config")
            .ok_or_else(|| cerr("`vision_config` is missing".into()))?;
        let image_token_id = config
            .get("image_token_index")
            .or_else(|| config.get("image_token_id"))
            .and_then(Value::as_i64)
            .ok_or_else(|| cerr("`image_token_index` is missing".into()))?
            as i32;
        // mlx-vlm's ModelConfig defaults where config.json is silent.
        let top_hidden = get_usize(config, "hidden_size").unwrap_or(2048);
        let (arch, act, ln_eps_default, pad_token_id) = match model_type.as_str() {
            "llava" | "llava_next" | "llava_onevision" => {
                let layers = match config.get("vision_feature_layer") {
                    None | Some(Value::Null) => vec![-2],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(Value::as_i64)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| cerr("`vision_feature_layer` must be integers".into()))?,
                    Some(v) => vec![v
                        .as_i64()
                        .ok_or_else(|| cerr(format!("`vision_feature_layer` is {v}")))?],
                };
                let strategy = config
                    .get("vision_feature_select_strategy")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let drop_cls = match strategy {
                    "default" => true,
                    "full" => false,
                    other => {
                        return Err(cerr(format!(
                            "`vision_feature_select_strategy` `{other}` (expected default or full)"
                        )))
                    }
                };
                // LLaVA-OneVision's SigLIP tower: mlx-vlm's tanh-GELU MLP and SigLIP's default eps.
                let (act, eps) = if model_type == "llava_onevision" {
                    (Act::GeluTanh, 1e-6)
                } else {
                    (Act::FastGelu, 1e-5)
                };
                (
                    VisionArch::Llava {
                        feature_layers: layers,
                        drop_cls,
                    },
                    act,
                    eps,
                    None,
                )
            }
            "paligemma" => (
                VisionArch::PaliGemma {
                    hidden_size: top_hidden,
                },
                Act::GeluTanh,
                1e-6,
                Some(
                    config
                        .get("pad_token_id")
                        .and_then(Value::as_i64)
                        .unwrap_or(0) as i32,
                ),
            ),
            _ => {
                let tokens = config
                    .get("mm_tokens_per_image")
                    .or_else(|| {
                        config
                            .get("text_config")
                            .and_then(|t| t.get("mm_tokens_per_image"))
                    })
                    .and_then(Value::as_u64)
                    .unwrap_or(256) as usize;
                (
                    VisionArch::Gemma3 {
                        hidden_size: top_hidden,
                        tokens_per_image: tokens,
                    },
                    Act::GeluTanh,
                    1e-6,
                    Some(
                        config
                            .get("pad_token_id")
                            .and_then(Value::as_i64)
                            .unwrap_or(0) as i32,
                    ),
                )
            }
        };
        let ln_eps = vc
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(ln_eps_default) as f32;
        let image_size = get_usize(vc, "image_size").unwrap_or(224);
        let patch_size = get_usize(vc, "patch_size").unwrap_or(14);
        let heads = get_usize(vc, "num_attention_heads").unwrap_or(16);
        if patch_size == 0 || !image_size.is_multiple_of(patch_size) || heads == 0 {
            return Err(cerr(format!(
                "vision image_size {image_size} / patch_size {patch_size} / {heads} heads"
            )));
        }

        let p = "vision_tower.vision_model.";
        let patch_w = store.float(&format!("{p}embeddings.patch_embedding.weight"))?;
        let shape = patch_w.shape()?;
        let hidden = shape.first().copied().unwrap_or(0);
        if shape.len() != 4 || shape[1] != patch_size || shape[2] != patch_size || shape[3] != 3 {
            return Err(werr(format!(
                "`{p}embeddings.patch_embedding.weight` has shape {shape:?}; MLX's layout is \
                 [out, {patch_size}, {patch_size}, 3] (a PyTorch [out, 3, kH, kW] weight was not \
                 transposed?)"
            )));
        }
        if hidden % heads != 0 {
            return Err(cerr(format!(
                "vision hidden size {hidden} is not a multiple of {heads} heads"
            )));
        }
        let layers = load_encoder(store, p, ln_eps)?;
        if layers.is_empty() {
            return Err(werr(format!("no `{p}encoder.layers.0.*` tensors")));
        }
        if let Some(n) = get_usize(vc, "num_hidden_layers") {
            if n != layers.len() {
                return Err(cerr(format!(
                    "vision `num_hidden_layers` is {n} but {} layers are stored",
                    layers.len()
                )));
            }
        }
        let is_clip = matches!(arch, VisionArch::Llava { .. })
            && vc.get("model_type").and_then(Value::as_str) != Some("siglip_vision_model");
        let projector = match &arch {
            VisionArch::Llava { .. } => Projector::Llava {
                l1: store.linear("multi_modal_projector.linear_1")?,
                l2: store.linear("multi_modal_projector.linear_2")?,
            },
            VisionArch::PaliGemma { .. } => Projector::PaliGemma {
                linear: store.linear("multi_modal_projector.linear")?,
            },
            VisionArch::Gemma3 { .. } => Projector::Gemma3 {
                norm: store.norm("multi_modal_projector.mm_soft_emb_norm.weight", true)?,
                proj: store.float("multi_modal_projector.mm_input_projection_weight")?,
                eps: ln_eps,
            },
        };
        Ok(VisionModel {
            arch,
            model_type,
            image_token_id,
            pad_token_id,
            image_size,
            patch_size,
            heads,
            act,
            patch_w,
            patch_b: store.float_opt(&format!("{p}embeddings.patch_embedding.bias"))?,
            class_emb: if is_clip {
                Some(store.float(&format!("{p}embeddings.class_embedding"))?)
            } else {
                None
            },
            pos_emb: store.float(&format!("{p}embeddings.position_embedding.weight"))?,
            pre_norm: if is_clip {
                // mlx-vlm builds `pre_layrnorm` and `post_layernorm` with nn.LayerNorm's default eps.
                Some(LayerNorm::load(store, &format!("{p}pre_layrnorm"), 1e-5)?)
            } else {
                None
            },
            layers,
            post_norm: LayerNorm::load(store, &format!("{p}post_layernorm"), 1e-5)?,
            projector,
        })
    }

    pub fn arch(&self) -> &VisionArch {
        &self.arch
    }

    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// The placeholder token id the image features replace.
    pub fn image_token_id(&self) -> i32 {
        self.image_token_id
    }

    /// The side, in pixels, of the square images the tower takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Patches per side of one image (`image_size / patch_size`).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Image features (tokens) per image.
    pub fn tokens_per_image(&self) -> usize {
        let grid = self.image_size / self.patch_size;
        match &self.arch {
            // The class token (CLIP only) unless the `default` strategy drops the first token.
            VisionArch::Llava { drop_cls, .. } => {
                grid * grid + usize::from(self.class_emb.is_some()) - usize::from(*drop_cls)
            }
            VisionArch::PaliGemma { .. } => grid * grid,
            VisionArch::Gemma3 {
                tokens_per_image, ..
            } => *tokens_per_image,
        }
    }

    /// Image features `[1, tokens, text hidden]` (lazy) for one preprocessed image: the projector's
    /// output, before the scaling [`VisionModel::merge`] applies for PaliGemma and Gemma 3. `embed_dtype` is
    /// the dtype of the language model's token embeddings (SigLIP towers run in it, as in mlx-vlm).
    pub fn features(&self, px: &PixelValues, embed_dtype: Dtype) -> Result<Array> {
        if px.height != self.image_size || px.width != self.image_size {
            return Err(VerifyError::BadInput(format!(
                "pixel values are {}x{}, the vision tower takes {}x{}",
                px.width, px.height, self.image_size, self.image_size
            )));
        }
        let pixels = Array::from_slice(&px.data, &px.shape())?.transpose(&[0, 2, 3, 1])?;
        let states = match &self.arch {
            VisionArch::Llava { .. } => self.tower(&pixels)?,
            _ => self.tower(&pixels.astype(embed_dtype)?)?,
        };
        match (&self.arch, &self.projector) {
            (VisionArch::Llava { .. }, _) => self.llava_project(&states),
            (VisionArch::PaliGemma { .. }, Projector::PaliGemma { linear }) => {
                let last = states
                    .last()
                    .ok_or_else(|| VerifyError::BadInput("no layers".into()))?;
                let h = self.post_norm.forward(last)?.astype(Dtype::F32)?;
                linear.forward(&h)
            }
            (
                VisionArch::Gemma3 {
                    tokens_per_image, ..
                },
                Projector::Gemma3 { norm, proj, eps },
            ) => {
                let last = states
                    .last()
                    .ok_or_else(|| VerifyError::BadInput("no layers".into()))?;
                let h = self.post_norm.forward(last)?;
                let dtype = h.dtype()?;
                let grid = self.image_size / self.patch_size;
                let side = (*tokens_per_image as f64).sqrt() as usize;
                if side == 0 || side * side != *tokens_per_image || !grid.is_multiple_of(side) {
                    return Err(VerifyError::BadInput(format!(
                        "mm_tokens_per_image {tokens_per_image} does not pool a {grid}x{grid} patch grid"
                    )));
                }
                let k = (grid / side) as i32;
                let d = h.shape()?[2] as i32;
                let s = side as i32;
                let pooled = h
                    .reshape(&[1, s, k, s, k, d])?
                    .mean(&[2, 4], false)?
                    .reshape(&[1, s * s, d])?;
                let normed = fast::rms_norm(&pooled, Some(norm), *eps)?;
                Ok(normed.matmul(proj)?.astype(dtype)?)
            }
            _ => Err(VerifyError::Unsupported("vision projector mismatch".into())),
        }
    }

    /// Features `[B, tokens, text hidden]` (lazy) of a batch of tiles `[B, H, W, 3]` (channel-last,
    /// float32, each at the tower's size), as mlx-vlm's LLaVA-NeXT and LLaVA-OneVision run their
    /// tiles: one batched tower pass, the selected hidden states, the projector. LLaVA-style
    /// architectures only.
    pub(crate) fn tile_features(&self, tiles: &Array) -> Result<Array> {
        let s = tiles.shape()?;
        if s.len() != 4 || s[1] != self.image_size || s[2] != self.image_size || s[3] != 3 {
            return Err(VerifyError::BadInput(format!(
                "image tiles of shape {s:?}; the vision tower takes [tiles, {n}, {n}, 3]",
                n = self.image_size
            )));
        }
        let states = self.tower(tiles)?;
        self.llava_project(&states)
    }

    /// The LLaVA projector over the selected hidden state(s) (`vision_feature_layer`, class token
    /// dropped under the `default` strategy).
    fn llava_project(&self, states: &[Array]) -> Result<Array> {
        let (
            VisionArch::Llava {
                feature_layers,
                drop_cls,
            },
            Projector::Llava { l1, l2 },
        ) = (&self.arch, &self.projector)
        else {
            return Err(VerifyError::Unsupported(
                "the LLaVA projector on a non-LLaVA vision model".into(),
            ));
        };
        let n = states.len() as i64;
        let mut picked = Vec::new();
        for &i in feature_layers {
            let idx = if i < 0 { n + i } else { i };
            let s = usize::try_from(idx)
                .ok()
                .and_then(|k| states.get(k))
                .ok_or_else(|| {
                    VerifyError::BadInput(format!(
                        "vision_feature_layer {i}: the tower has {n} hidden states"
                    ))
                })?;
            picked.push(if *drop_cls {
                drop_first_token(s)?
            } else {
                s.try_clone()?
            });
        }
        let refs: Vec<&Array> = picked.iter().collect();
        let x = if refs.len() == 1 {
            picked.remove(0)
        } else {
            mlx::concatenate(&refs, -1)?
        };
        l2.forward(&l1.forward(&x)?.gelu()?)
    }

    /// The tower: every hidden state (`[embeddings (after pre_layrnorm), layer 0, ...]`) of a batch
    /// `[B, H, W, 3]`.
    fn tower(&self, pixels: &Array) -> Result<Vec<Array>> {
        let p = self.patch_size as i32;
        let mut x = pixels.conv2d(&self.patch_w, (p, p), (0, 0))?;
        if let Some(b) = &self.patch_b {
            x = x.add(b)?;
        }
        let s = x.shape()?;
        let (b, n, d) = (s[0] as i32, (s[1] * s[2]) as i32, s[3] as i32);
        x = x.reshape(&[b, n, d])?;
        if let Some(cls) = &self.class_emb {
            // One class token per image of the batch (a gather broadcasts it).
            let rows = Array::from_slice(&vec![0i32; b as usize], &[b as usize])?;
            let cls = cls
                .reshape(&[1, 1, d])?
                .astype(x.dtype()?)?
                .take(&rows, 0)?;
            x = mlx::concatenate(&[&cls, &x], 1)?;
        }
        let positions = x.shape()?[1];
        if self.pos_emb.shape()?[0] != positions {
            return Err(VerifyError::BadInput(format!(
                "the position embedding has {} rows for {positions} positions",
                self.pos_emb.shape()?[0]
            )));
        }
        x = x.add(&self.pos_emb.reshape(&[1, positions as i32, d])?)?;
        if let Some(pre) = &self.pre_norm {
            x = pre.forward(&x)?;
        }
        let mut states = vec![x.try_clone()?];
        run_encoder(&self.layers, x, self.heads, self.act, |h| {
            states.push(h.try_clone()?);
            Ok(())
        })?;
        Ok(states)
    }

    /// The pad token whose embedding mlx-vlm zeroes when merging (PaliGemma, Gemma 3).
    pub fn pad_token_id(&self) -> Option<i32> {
        self.pad_token_id
    }

    /// The dtype of the merged input embeddings for token embeddings of `embed_dtype`: mlx-vlm's
    /// PaliGemma merge leaves them in float32 (so its language model then runs in float32), the
    /// others cast back.
    pub fn merged_dtype(&self, embed_dtype: Dtype) -> Dtype {
        match self.arch {
            VisionArch::PaliGemma { .. } => Dtype::F32,
            _ => embed_dtype,
        }
    }

    /// Token embeddings of `ids` with this image's `features` at the image-token positions
    /// ([`merge_image_features`] with this architecture's pad handling and dtype).
    ///
    /// PaliGemma's image tokens must open the prompt (its processor puts them first): mlx-vlm places
    /// its features by position (`where(image_mask, padded_features, ...)`), which equals an ordered
    /// scatter only for that layout.
    pub fn merge(&self, ids: &[i32], embeds: &Array, features: &Array) -> Result<Array> {
        if let VisionArch::PaliGemma { .. } = self.arch {
            let count = ids.iter().filter(|&&t| t == self.image_token_id).count();
            if ids[..count.min(ids.len())]
                .iter()
                .any(|&t| t != self.image_token_id)
            {
                return Err(VerifyError::BadInput(
                    "PaliGemma prompts must start with the image tokens (as its processor builds them)"
                        .into(),
                ));
            }
        }
        let dtype = self.merged_dtype(embeds.dtype()?);
        let scaled;
        let features = match self.arch {
            VisionArch::PaliGemma { hidden_size } | VisionArch::Gemma3 { hidden_size, .. } => {
                scaled = scale_features(features, hidden_size)?;
                &scaled
            }
            VisionArch::Llava { .. } => features,
        };
        merge_image_features(
            ids,
            embeds,
            features,
            self.image_token_id,
            self.pad_token_id,
            dtype,
        )
    }
}

/// `x[:, 1:]` of a `[1, L, D]` array.
fn drop_first_token(x: &Array) -> Result<Array> {
    let s = x.shape()?;
    Ok(x.slice(
        &[0, 1, 0],
        &[s[0] as i32, s[1] as i32, s[2] as i32],
        &[1, 1, 1],
    )?)
}

/// `features / hidden_size ** 0.5`, the constant in the features' dtype (a Python float).
fn scale_features(f: &Array, hidden_size: usize) -> Result<Array> {
    let c = Array::scalar((hidden_size as f64).sqrt() as f32, f.dtype()?)?;
    Ok(f.divide(&c)?)
}

/// Places `features` (`[1, T, D]`) at the positions of `image_token_id` in `ids` within `embeds`
/// (`[1, n, D]`, the token embeddings before any embedding scale), in order; the count must match.
/// `pad_token_id`'s embeddings are zeroed and the sum is computed in float32 then cast to
/// `out_dtype`, as mlx-vlm's PaliGemma/Gemma 3 merges do; without a pad token (LLaVA) the features are
/// cast to the embeddings' dtype and written in place.
pub fn merge_image_features(
    ids: &[i32],
    embeds: &Array,
    features: &Array,
    image_token_id: i32,
    pad_token_id: Option<i32>,
    out_dtype: Dtype,
) -> Result<Array> {
    let positions: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == image_token_id)
        .map(|(i, _)| i)
        .collect();
    let fs = features.shape()?;
    let t = fs.get(1).copied().unwrap_or(0);
    if positions.len() != t {
        return Err(VerifyError::BadInput(format!(
            "the prompt has {} image tokens (id {image_token_id}) but the image gives {t} features",
            positions.len()
        )));
    }
    let es = embeds.shape()?;
    let (n, d) = (es[1], es[2]);
    if fs[2] != d {
        return Err(VerifyError::BadInput(format!(
            "image features have width {} but the embeddings {d}",
            fs[2]
        )));
    }
    // Source row per position: a text row (0..n) or an image row (n..n+T), gathered in one `take`.
    let mut src = Vec::with_capacity(n);
    let mut next_image = 0usize;
    let mut pad_rows = vec![0u8; n];
    for (i, &tok) in ids.iter().enumerate() {
        if tok == image_token_id {
            src.push((n + next_image) as i32);
            next_image += 1;
        } else {
            src.push(i as i32);
            if pad_token_id == Some(tok) {
                pad_rows[i] = 1;
            }
        }
    }
    let work = if pad_token_id.is_some() {
        Dtype::F32
    } else {
        embeds.dtype()?
    };
    let table = mlx::concatenate(
        &[
            &embeds.reshape(&[n as i32, d as i32])?.astype(work)?,
            &features.reshape(&[t as i32, d as i32])?.astype(work)?,
        ],
        0,
    )?;
    let idx = Array::from_slice(&src, &[n])?;
    let mut merged = table.take(&idx, 0)?;
    if pad_rows.contains(&1) {
        let mask = Array::from_bytes(&pad_rows, &[n, 1], Dtype::Bool)?;
        merged = mlx::where_(&mask, &Array::scalar(0.0, work)?, &merged)?;
    }
    Ok(merged
        .reshape(&[1, n as i32, d as i32])?
        .astype(out_dtype)?)
}
