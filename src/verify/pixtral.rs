//! Mistral 3 image prompts: the Pixtral image processor ([`PixtralImageProcessor`]) and the vision
//! path of a converted Mistral 3 directory ([`PixtralVision`]: the Pixtral encoder, Mistral 3's patch
//! merger and projector), run over MLX with mlx-vlm's semantics (`mlx_vlm/models/pixtral/vision.py`,
//! `mlx_vlm/models/mistral3/mistral3.py`) so that its image features and merged embeddings match
//! mlx-vlm's on the same pixels.
//!
//! - Preprocessing follows transformers 5's `PixtralProcessor` over `PixtralImageProcessorPil`: the
//!   image shrinks (never grows) so that both sides fit `size.longest_edge`, each side rounded down,
//!   then each side rounds *up* to a multiple of the processor's patch, `patch_size *
//!   spatial_merge_size` (the processor passes that product to the image processor, so one image
//!   token covers one merged patch); the resize, rescale and normalize are the generic steps of
//!   [`ImageProcessor`]. No crop, no square: the image keeps its own aspect ratio.
//! - The prompt: per merged patch row, `[IMG]` per merged patch then `[IMG_BREAK]`, the last break
//!   replaced by `[IMG_END]` ([`super::prompt::ImagePlaceholder::Pixtral`]); only the `[IMG]` rows
//!   receive image features, the break and end tokens keep their text embeddings.
//! - The encoder: patch convolution (no bias), `ln_pre` (RMSNorm), blocks of RMSNorm, attention with a
//!   2-D rotary embedding (the first half of each head's frequencies turn with the patch row, the
//!   second with the column, positions `row * max_side + column` in a table of `image_size /
//!   patch_size` patches per side) and a SiLU-gated MLP. Then the projector: RMSNorm (the text
//!   model's eps), the patch merger (each 2x2 block of patches concatenated channel-major, a linear
//!   layer), `linear_2(gelu(linear_1(x)))`.
//!
//! Dtypes are mlx-vlm's: the pixels are cast to the patch convolution's dtype, the rotary tables are
//! computed in float32 and cast to the activations' dtype, the attention has an all-zero additive
//! mask in that dtype (mlx-vlm's block mask for one image).

use std::path::Path;

use serde_json::Value;

use crate::mlx::fast::{self, Mask};
use crate::mlx::{self, Array, Dtype};

use super::image::{processor_config, ImageProcessor, PixelValues, ResizePolicy, RgbImage};
use super::rope::{inv_freq, mlx_cos, mlx_sin};
use super::text::{EmbedInput, TextModel};
use super::vision::merge_image_features;
use super::weights::{read_json_or_null, Linear, Store};
use super::{Result, VerifyError};

/// transformers' `PixtralProcessor` defaults when neither processor_config.json nor config.json
/// says otherwise.
const DEFAULT_PATCH: usize = 16;
const DEFAULT_MERGE: usize = 1;

/// The image processor of a Mistral 3 checkpoint, as its `PixtralProcessor` drives it.
#[derive(Debug, Clone, PartialEq)]
pub struct PixtralImageProcessor {
    /// `(height, width)` an image must fit: `size.longest_edge` twice, or `size.height`/`size.width`.
    /// `None`: `do_resize` is off.
    pub max_size: Option<(usize, usize)>,
    /// The processor's patch: `patch_size * spatial_merge_size` (pixels per image token side).
    pub patch: usize,
    /// Rescale, normalize and the resampling filter (its resize is set per image).
    pub generic: ImageProcessor,
}

/// One preprocessed image: `[1, 3, H, W]` float32, `H` and `W` multiples of the processor's patch;
/// `(H, W)` is also the `image_sizes` entry mlx-vlm's forward takes.
pub type PixtralPixels = PixelValues;

/// transformers' Pixtral `get_resize_output_image_size`: shrink so that both sides fit (each side
/// `floor(side / ratio)`, in float64 as Python computes it), then round each side up to a multiple
/// of `patch`. Returns `(height, width)`.
pub fn pixtral_target_size(
    height: usize,
    width: usize,
    max_size: (usize, usize),
    patch: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || patch == 0 || max_size.0 == 0 || max_size.1 == 0 {
        return Err(VerifyError::BadInput(format!(
            "cannot resize a {width}x{height} image to fit {}x{} in multiples of {patch}",
            max_size.1, max_size.0
        )));
    }
    let ratio = (height as f64 / max_size.0 as f64).max(width as f64 / max_size.1 as f64);
    let (mut h, mut w) = (height, width);
    if ratio > 1.0 {
        h = (height as f64 / ratio).floor() as usize;
        w = (width as f64 / ratio).floor() as usize;
    }
    // A side that floors to 0 becomes one patch, as `(0 - 1) // p + 1` does in Python.
    let up = |x: usize| x.div_ceil(patch).max(1) * patch;
    Ok((up(h), up(w)))
}

impl PixtralImageProcessor {
    /// Reads the image processor settings of `dir` (`preprocessor_config.json`, else
    /// `processor_config.json`'s `image_processor`) and the processor's `patch_size` and
    /// `spatial_merge_size` (`processor_config.json`, else config.json as mlx-vlm reads them, else
    /// transformers' defaults 16 and 1).
    pub fn from_dir(dir: &Path, config: &Value) -> Result<PixtralImageProcessor> {
        let (path, value) = processor_config(dir)?;
        let proc_path = dir.join("processor_config.json");
        let proc = read_json_or_null(&proc_path)?;
        let uint = |v: Option<&Value>, what: &str, file: &Path| -> Result<Option<usize>> {
            match v.filter(|x| !x.is_null()) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| VerifyError::Config {
                        path: file.to_path_buf(),
                        msg: format!("`{what}` is {x}, expected a positive whole number"),
                    }),
            }
        };
        let cfg_path = dir.join("config.json");
        let patch = match uint(proc.get("patch_size"), "patch_size", &proc_path)? {
            Some(p) => p,
            None => uint(
                config.pointer("/vision_config/patch_size"),
                "vision_config.patch_size",
                &cfg_path,
            )?
            .unwrap_or(DEFAULT_PATCH),
        };
        let merge = match uint(
            proc.get("spatial_merge_size"),
            "spatial_merge_size",
            &proc_path,
        )? {
            Some(m) => m,
            None => uint(
                config.get("spatial_merge_size"),
                "spatial_merge_size",
                &cfg_path,
            )?
            .unwrap_or(DEFAULT_MERGE),
        };
        PixtralImageProcessor::from_config(&value, &path, patch * merge)
    }

    /// From the image processor's parsed config (`path` names it in errors) and the processor's
    /// patch (`patch_size * spatial_merge_size`).
    pub fn from_config(v: &Value, path: &Path, patch: usize) -> Result<PixtralImageProcessor> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("PixtralImageProcessor");
        if kind.trim_end_matches("Fast").trim_end_matches("Pil") != "PixtralImageProcessor" {
            return Err(VerifyError::Unsupported(format!(
                "{}: image processor `{kind}` is not Pixtral's",
                path.display()
            )));
        }
        let on = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(true);
        let max_size = if on("do_resize") {
            let size = v.get("size").filter(|s| !s.is_null());
            let dim = |k: &str| {
                size.and_then(|s| s.get(k))
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
            };
            Some(match (dim("longest_edge"), dim("height"), dim("width")) {
                (Some(e), _, _) if e > 0 => (e, e),
                (None, Some(h), Some(w)) if h > 0 && w > 0 => (h, w),
                // transformers' class default.
                _ if size.is_none() => (1024, 1024),
                _ => {
                    return Err(err(format!(
                        "`size` is {}, expected longest_edge or height and width",
                        size.map_or("missing".into(), Value::to_string)
                    )))
                }
            })
        } else {
            None
        };
        if v.get("do_center_crop").and_then(Value::as_bool) == Some(true) {
            return Err(VerifyError::Unsupported(format!(
                "{}: a center crop in a Pixtral image processor",
                path.display()
            )));
        }
        // The generic steps (resample, rescale, normalize) parse as the generic processor's; only the
        // size policy is Pixtral's, so the resize is left to `preprocess`.
        let mut generic_cfg = v.clone();
        if let Some(o) = generic_cfg.as_object_mut() {
            o.insert("image_processor_type".into(), "CLIPImageProcessor".into());
            o.insert("do_resize".into(), false.into());
            o.insert("do_center_crop".into(), false.into());
        }
        let mut generic = ImageProcessor::from_config(&generic_cfg, path)?;
        generic.kind = kind.to_string();
        Ok(PixtralImageProcessor {
            max_size,
            patch,
            generic,
        })
    }

    /// The `(height, width)` an image of `height x width` is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        match self.max_size {
            Some(max) => pixtral_target_size(height, width, max, self.patch),
            None => Ok((height, width)),
        }
    }

    /// Resize, rescale, normalize one image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixtralPixels> {
        let (h, w) = self.target_size(img.height, img.width)?;
        if !h.is_multiple_of(self.patch) || !w.is_multiple_of(self.patch) {
            return Err(VerifyError::BadInput(format!(
                "a {}x{} image without resizing is not a multiple of {} pixels per side",
                img.width, img.height, self.patch
            )));
        }
        let mut generic = self.generic.clone();
        generic.resize = self.max_size.map(|_| ResizePolicy::Fixed {
            width: w,
            height: h,
        });
        generic.preprocess(img)
    }

    /// `(rows, columns)` of image tokens for preprocessed pixels (one token per merged patch).
    pub fn token_grid(&self, px: &PixtralPixels) -> (usize, usize) {
        (px.height / self.patch, px.width / self.patch)
    }
}

/// The encoder's and projector's settings (config.json, mlx-vlm's defaults where a key is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct PixtralConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    /// The rotary embedding's width per head (`vision_config.head_dim`).
    pub head_dim: usize,
    pub patch_size: usize,
    /// The rotary table covers `image_size / patch_size` patches per side.
    pub image_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    /// The projector norm's eps (`text_config.rms_norm_eps`).
    pub projector_eps: f32,
    pub spatial_merge_size: usize,
    /// Index into the hidden states `[after ln_pre, layer 0, ...]` (negative from the end).
    pub feature_layer: i64,
    pub image_token_id: i32,
}

impl PixtralConfig {
    /// Parses config.json (the whole file); `path` names it in errors.
    pub fn from_config(config: &Value, path: &Path) -> Result<PixtralConfig> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v = config
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| err("`vision_config` is missing".into()))?;
        let uint = |x: &Value, key: &str, default: usize| -> Result<usize> {
            match x.get(key).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(n) => n
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| err(format!("`{key}` is {n}, expected a positive integer"))),
            }
        };
        let float = |x: &Value, key: &str, default: Option<f64>| -> Result<f32> {
            match x.get(key).filter(|x| !x.is_null()) {
                None => default
                    .map(|d| d as f32)
                    .ok_or_else(|| err(format!("`{key}` is missing"))),
                Some(n) => n
                    .as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| err(format!("`{key}` is {n}, expected a number"))),
            }
        };
        let text = config.get("text_config").unwrap_or(config);
        let feature_layer = match config.get("vision_feature_layer") {
            None | Some(Value::Null) => -1,
            Some(x) => x.as_i64().ok_or_else(|| {
                VerifyError::Unsupported(format!(
                    "{}: `vision_feature_layer` {x} (Mistral 3 image prompts take one layer)",
                    path.display()
                ))
            })?,
        };
        let image_token_id = config
            .get("image_token_index")
            .or_else(|| config.get("image_token_id"))
            .and_then(Value::as_i64)
            .ok_or_else(|| err("`image_token_index` is missing".into()))?;
        let c = PixtralConfig {
            hidden_size: uint(v, "hidden_size", 1024)?,
            num_heads: uint(v, "num_attention_heads", 16)?,
            head_dim: uint(v, "head_dim", 64)?,
            patch_size: uint(v, "patch_size", 14)?,
            image_size: uint(v, "image_size", 336)?,
            rope_theta: float(v, "rope_theta", Some(10000.0))?,
            rms_norm_eps: float(v, "rms_norm_eps", Some(1e-5))?,
            // mlx-vlm's Mistral 3 TextConfig has no default for it.
            projector_eps: float(text, "rms_norm_eps", None)?,
            spatial_merge_size: uint(config, "spatial_merge_size", 2)?,
            feature_layer,
            image_token_id: image_token_id as i32,
        };
        if !c.hidden_size.is_multiple_of(c.num_heads) || c.hidden_size / c.num_heads != c.head_dim {
            return Err(err(format!(
                "vision hidden_size {} with {} heads does not give head_dim {}",
                c.hidden_size, c.num_heads, c.head_dim
            )));
        }
        if !c.head_dim.is_multiple_of(4) || c.image_size < c.patch_size {
            return Err(err(format!(
                "vision head_dim {} (must be a multiple of 4) / image_size {} / patch_size {}",
                c.head_dim, c.image_size, c.patch_size
            )));
        }
        Ok(c)
    }

    /// Patches per side of the rotary table.
    pub fn max_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

struct Block {
    attention_norm: Array,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Array,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The vision side of a converted Mistral 3 directory.
///
/// Not `Send` (MLX arrays).
pub struct PixtralVision {
    cfg: PixtralConfig,
    patch_conv: Array,
    ln_pre: Array,
    blocks: Vec<Block>,
    projector_norm: Array,
    merging_layer: Linear,
    linear_1: Linear,
    linear_2: Linear,
}

impl PixtralVision {
    /// Builds the model over tensors in a [`Store`] (a converted directory or a reference made from
    /// the source); `config` is the config.json to follow.
    pub(crate) fn from_store(dir: &Path, config: &Value, store: &Store) -> Result<PixtralVision> {
        let cfg = PixtralConfig::from_config(config, &dir.join("config.json"))?;
        let werr = |msg: String| VerifyError::Weights {
            dir: dir.to_path_buf(),
            msg,
        };
        let p = "vision_tower.vision_model.";
        let conv_name = format!("{p}patch_conv.weight");
        let patch_conv = store.float(&conv_name)?;
        let shape = patch_conv.shape()?;
        let ps = cfg.patch_size;
        if shape != [cfg.hidden_size, ps, ps, 3] {
            return Err(werr(format!(
                "`{conv_name}` has shape {shape:?}; MLX's layout is [{}, {ps}, {ps}, 3] (a PyTorch \
                 [out, 3, kH, kW] weight was not transposed?)",
                cfg.hidden_size
            )));
        }
        let mut blocks = Vec::new();
        loop {
            let l = format!("{p}transformer.layers.{}.", blocks.len());
            if !store.has(&format!("{l}attention_norm.weight")) {
                break;
            }
            blocks.push(Block {
                attention_norm: store.norm(&format!("{l}attention_norm.weight"), false)?,
                q: store.linear(&format!("{l}attention.q_proj"))?,
                k: store.linear(&format!("{l}attention.k_proj"))?,
                v: store.linear(&format!("{l}attention.v_proj"))?,
                o: store.linear(&format!("{l}attention.o_proj"))?,
                ffn_norm: store.norm(&format!("{l}ffn_norm.weight"), false)?,
                gate: store.linear(&format!("{l}feed_forward.gate_proj"))?,
                up: store.linear(&format!("{l}feed_forward.up_proj"))?,
                down: store.linear(&format!("{l}feed_forward.down_proj"))?,
            });
        }
        if blocks.is_empty() {
            return Err(werr(format!("no `{p}transformer.layers.0.*` tensors")));
        }
        if let Some(n) = config
            .pointer("/vision_config/num_hidden_layers")
            .and_then(Value::as_u64)
        {
            if n as usize != blocks.len() {
                return Err(VerifyError::Config {
                    path: dir.join("config.json"),
                    msg: format!(
                        "vision `num_hidden_layers` is {n} but {} layers are stored",
                        blocks.len()
                    ),
                });
            }
        }
        let m = "multi_modal_projector.";
        Ok(PixtralVision {
            patch_conv,
            ln_pre: store.norm(&format!("{p}ln_pre.weight"), false)?,
            blocks,
            projector_norm: store.norm(&format!("{m}norm.weight"), false)?,
            merging_layer: store.linear(&format!("{m}patch_merger.merging_layer"))?,
            linear_1: store.linear(&format!("{m}linear_1"))?,
            linear_2: store.linear(&format!("{m}linear_2"))?,
            cfg,
        })
    }

    pub fn config(&self) -> &PixtralConfig {
        &self.cfg
    }

    /// The placeholder token id the image features replace (`[IMG]`).
    pub fn image_token_id(&self) -> i32 {
        self.cfg.image_token_id
    }

    /// `(rows, columns)` of patches for preprocessed pixels, checked against what the encoder and
    /// the merger take.
    fn patch_grid(&self, px: &PixtralPixels) -> Result<(usize, usize)> {
        let (ps, merge) = (self.cfg.patch_size, self.cfg.spatial_merge_size);
        let unit = ps * merge;
        if px.data.len() != 3 * px.height * px.width
            || !px.height.is_multiple_of(unit)
            || !px.width.is_multiple_of(unit)
            || px.height == 0
            || px.width == 0
        {
            return Err(VerifyError::BadInput(format!(
                "pixel values of {}x{} ({} values): the Pixtral encoder takes sides that are \
                 multiples of patch_size x spatial_merge_size = {unit}",
                px.width,
                px.height,
                px.data.len()
            )));
        }
        let (h, w) = (px.height / ps, px.width / ps);
        let side = self.cfg.max_side();
        if h > side || w > side {
            return Err(VerifyError::BadInput(format!(
                "a {h}x{w}-patch image exceeds the rotary table of {side}x{side} patches \
                 (vision_config.image_size {} / patch_size {ps})",
                self.cfg.image_size
            )));
        }
        Ok((h, w))
    }

    /// The encoder's hidden states `[1, h*w, D]` (`[after ln_pre, layer 0, ...]`) for one image.
    fn encoder(&self, px: &PixtralPixels, h: usize, w: usize) -> Result<Vec<Array>> {
        let ps = self.cfg.patch_size as i32;
        let pixels = Array::from_slice(&px.data, &px.shape())?
            .transpose(&[0, 2, 3, 1])?
            .astype(self.patch_conv.dtype()?)?;
        let d = self.cfg.hidden_size as i32;
        let n = (h * w) as i32;
        let x = pixels
            .conv2d(&self.patch_conv, (ps, ps), (0, 0))?
            .reshape(&[1, n, d])?;
        let mut x = fast::rms_norm(&x, Some(&self.ln_pre), 1e-5)?;
        let dtype = x.dtype()?;
        let (cos, sin) = self.rotary(h, w, dtype)?;
        let mask = Array::from_slice(
            &vec![0f32; (n * n) as usize],
            &[1, 1, n as usize, n as usize],
        )?
        .astype(dtype)?;
        let heads = self.cfg.num_heads as i32;
        let hd = self.cfg.head_dim as i32;
        // mlx-vlm: `head_dim ** -0.5` in Python (float64), rounded to float32 by the kernel.
        let scale = (f64::from(hd)).powf(-0.5) as f32;
        let eps = self.cfg.rms_norm_eps;
        let mut states = vec![x.try_clone()?];
        for b in &self.blocks {
            let y = fast::rms_norm(&x, Some(&b.attention_norm), eps)?;
            let split = |a: Array| -> Result<Array> {
                Ok(a.reshape(&[1, n, heads, hd])?.transpose(&[0, 2, 1, 3])?)
            };
            let q = rotate(&split(b.q.forward(&y)?)?, &cos, &sin)?;
            let k = rotate(&split(b.k.forward(&y)?)?, &cos, &sin)?;
            let v = split(b.v.forward(&y)?)?;
            let o = fast::scaled_dot_product_attention(&q, &k, &v, scale, Mask::Array(&mask))?
                .transpose(&[0, 2, 1, 3])?
                .reshape(&[1, n, d])?;
            x = x.add(&b.o.forward(&o)?)?;
            let y = fast::rms_norm(&x, Some(&b.ffn_norm), eps)?;
            let g = b.gate.forward(&y)?.silu()?.multiply(&b.up.forward(&y)?)?;
            x = x.add(&b.down.forward(&g)?)?;
            states.push(x.try_clone()?);
        }
        Ok(states)
    }

    /// mlx-vlm's `PixtralRotaryEmbedding` for an `h x w` patch grid: `[h*w, head_dim]` cos and sin
    /// in `dtype`. Patch `(r, c)` turns by `r * f[0], r * f[2], ...` then `c * f[1], c * f[3], ...`
    /// (the frequencies `f` of the head width), the half repeated.
    fn rotary(&self, h: usize, w: usize, dtype: Dtype) -> Result<(Array, Array)> {
        let hd = self.cfg.head_dim;
        let freqs = inv_freq(hd, self.cfg.rope_theta)?;
        let (mut cos, mut sin) = (
            Vec::with_capacity(h * w * hd),
            Vec::with_capacity(h * w * hd),
        );
        let mut half = Vec::with_capacity(hd / 2);
        for r in 0..h {
            for c in 0..w {
                half.clear();
                half.extend(freqs.iter().step_by(2).map(|&f| r as f32 * f));
                half.extend(freqs.iter().skip(1).step_by(2).map(|&f| c as f32 * f));
                for _ in 0..2 {
                    cos.extend(half.iter().map(|&a| mlx_cos(a)));
                    sin.extend(half.iter().map(|&a| mlx_sin(a)));
                }
            }
        }
        let shape = [h * w, hd];
        Ok((
            Array::from_slice(&cos, &shape)?.astype(dtype)?,
            Array::from_slice(&sin, &shape)?.astype(dtype)?,
        ))
    }

    /// Image features `[1, tokens, text hidden]` for one preprocessed image: one per merged patch,
    /// row-major.
    pub fn features(&self, px: &PixtralPixels) -> Result<Array> {
        let (h, w) = self.patch_grid(px)?;
        let states = self.encoder(px, h, w)?;
        let count = states.len() as i64;
        let idx = if self.cfg.feature_layer < 0 {
            count + self.cfg.feature_layer
        } else {
            self.cfg.feature_layer
        };
        let x = usize::try_from(idx)
            .ok()
            .and_then(|i| states.get(i))
            .ok_or_else(|| {
                VerifyError::BadInput(format!(
                    "vision_feature_layer {}: the encoder has {count} hidden states",
                    self.cfg.feature_layer
                ))
            })?;
        let d = self.cfg.hidden_size as i32;
        let x = fast::rms_norm(x, Some(&self.projector_norm), self.cfg.projector_eps)?;
        // The patch merger: each `m x m` block of patches becomes one row, channel-major
        // (`[c, di, dj]`), as mlx-vlm's unfold lays it out.
        let m = self.cfg.spatial_merge_size as i32;
        let (bh, bw) = (h as i32 / m, w as i32 / m);
        let blocks = x
            .reshape(&[bh, m, bw, m, d])?
            .transpose(&[0, 2, 4, 1, 3])?
            .reshape(&[bh * bw, d * m * m])?;
        let merged = self.merging_layer.forward(&blocks)?;
        let f = self
            .linear_2
            .forward(&self.linear_1.forward(&merged)?.gelu()?)?;
        let s = f.shape()?;
        Ok(f.reshape(&[1, s[0] as i32, s[1] as i32])?)
    }

    /// The language model's input for `ids` and one image: token embeddings with the features at
    /// the `[IMG]` tokens (mlx-vlm's `merge_input_ids_with_image_features`: features cast to the
    /// embeddings' dtype, written in order).
    pub fn input(&self, text: &TextModel, ids: &[i32], px: &PixtralPixels) -> Result<EmbedInput> {
        let embeds = text.embed_tokens(ids)?;
        let f = self.features(px)?;
        let dtype = embeds.dtype()?;
        Ok(EmbedInput {
            embeds: merge_image_features(ids, &embeds, &f, self.cfg.image_token_id, None, dtype)?,
            positions: None,
            deepstack: None,
        })
    }
}

/// `x * cos + rotate_half(x) * sin` in `x`'s dtype (`x`: `[1, H, L, hd]`, tables `[L, hd]`).
fn rotate(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let s = x.shape()?;
    let (b, nh, l, hd) = (s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32);
    let half = hd / 2;
    let x1 = x.slice(&[0, 0, 0, 0], &[b, nh, l, half], &[1, 1, 1, 1])?;
    let x2 = x.slice(&[0, 0, 0, half], &[b, nh, l, hd], &[1, 1, 1, 1])?;
    let rot = mlx::concatenate(&[&x2.negative()?, &x1], -1)?;
    Ok(x.multiply(cos)?.add(&rot.multiply(sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_size_shrinks_then_rounds_up() {
        // The synthetic image (96x72) into 28 with 14-pixel tokens: 28x21 -> 28x28.
        assert_eq!(pixtral_target_size(72, 96, (28, 28), 14).unwrap(), (28, 28));
        // With the image processor's own 7-pixel patch: 21 stays.
        assert_eq!(pixtral_target_size(72, 96, (28, 28), 7).unwrap(), (21, 28));
        // Small images are not enlarged, only rounded up.
        assert_eq!(
            pixtral_target_size(10, 30, (1024, 1024), 16).unwrap(),
            (16, 32)
        );
        // Tall images.
        assert_eq!(
            pixtral_target_size(1000, 50, (100, 100), 16).unwrap(),
            (112, 16)
        );
        assert!(pixtral_target_size(0, 5, (28, 28), 14).is_err());
    }

    #[test]
    fn processor_from_config() {
        let p = PixtralImageProcessor::from_config(
            &serde_json::json!({
                "image_processor_type": "PixtralImageProcessor", "patch_size": 7,
                "size": {"longest_edge": 28}, "resample": 3,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
            }),
            Path::new("x"),
            14,
        )
        .unwrap();
        assert_eq!(p.max_size, Some((28, 28)));
        let px = p.preprocess(&RgbImage::synthetic()).unwrap();
        assert_eq!(px.shape(), [1, 3, 28, 28]);
        assert_eq!(p.token_grid(&px), (2, 2));
        let e = PixtralImageProcessor::from_config(
            &serde_json::json!({"image_processor_type": "CLIPImageProcessor"}),
            Path::new("x"),
            14,
        )
        .unwrap_err();
        assert!(matches!(e, VerifyError::Unsupported(_)), "{e}");
    }
}
