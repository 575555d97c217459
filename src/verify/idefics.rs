//! Idefics3 and SmolVLM image prompts: the image processor (tiles of `max_image_size` plus the global
//! image, [`IdeficsImageProcessor`]), the prompt text the processor expands the image into
//! ([`image_prompt_string`]), and the vision path ([`IdeficsVision`]: the SigLIP-style vision
//! transformer run over every tile, the pixel-shuffle connector and its projection).
//!
//! Preprocessing follows transformers 5's PIL backend (`Idefics3ImageProcessorPil`, whose SmolVLM twin
//! is the same code): the longest edge resized to `size.longest_edge` (the other side truncated, then
//! rounded up to even), both sides rounded up to multiples of the tile size, then cut into
//! `rows x cols` tiles plus the whole image resized to one tile (the global image), every resize by
//! Pillow's resampler on 8-bit pixels ([`resize`]); rescale and normalize as
//! [`ImageProcessor::preprocess`] does. An image that fits one tile is not split (rows = cols = 0).
//!
//! The forward follows mlx-vlm (`models/idefics3`, which `smolvlm` reuses), including its dtypes: the
//! patch embedding runs on the float32 pixels, the embeddings are cast to the tower's dtype, the
//! tower's output back to float32 for the connector, whose features are cast to the token
//! embeddings' dtype where they replace the image tokens. Its position ids bucket fractional patch
//! coordinates in float32 as mlx-vlm does ([`position_ids`]); on grids that are not powers of two
//! that repeats some positions where transformers counts 0..n: on Idefics3's 26x26 grid row (and
//! column) 3 takes position 2 and rows 15..25 positions 14..24 (SmolVLM's 32x32 and the fixtures'
//! grids are exact).

use std::path::Path;

use serde_json::Value;

use crate::mlx::{Array, Dtype};

use super::image::{channel_triple, processor_config, resize, ImageProcessor, Resample, RgbImage};
use super::text::{EmbedInput, TextModel};
use super::vision::{
    load_encoder, merge_image_features, run_encoder, Act, EncoderLayer, LayerNorm,
};
use super::weights::{read_json, Linear, Store};
use super::{Result, VerifyError};

/// transformers' `MAX_IMAGE_SIZE`: no side grows beyond this after the first resize.
const MAX_IMAGE_SIZE: usize = 4096;

/// The image processor's first resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdeficsResize {
    /// The longest edge becomes `n`, the aspect ratio kept (the usual `size`).
    LongestEdge(usize),
    /// Exactly `width x height`.
    Fixed { width: usize, height: usize },
}

/// The processor of an Idefics3 or SmolVLM checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct IdeficsImageProcessor {
    /// `None` when `do_resize` is false.
    pub resize: Option<IdeficsResize>,
    /// `max_image_size.longest_edge`: the side of every tile.
    pub tile: usize,
    pub splitting: bool,
    pub resample: Resample,
    /// Rescale and normalize (no resize or crop): the per-tile pixel steps.
    pub pixels: ImageProcessor,
    /// Image tokens per tile (processor_config.json `image_seq_len`).
    pub image_seq_len: usize,
}

/// One preprocessed image: `tiles` channel-first float32 tiles (`[tiles, 3, height, width]`), the
/// split tiles row-major then the global image; `rows x cols` split tiles (0 x 0: not split).
#[derive(Debug, Clone, PartialEq)]
pub struct IdeficsPixels {
    pub tiles: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl IdeficsPixels {
    pub fn shape(&self) -> [usize; 4] {
        [self.tiles, 3, self.height, self.width]
    }
}

/// transformers' `_resize_output_size_rescale_to_max_len`: `(height, width)` with the longest side
/// `max_len`, the other truncated and then rounded up to even, at least `1`.
fn rescale_to_max_len(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let even = |x: usize| x + x % 2;
    let (h, w) = if width >= height {
        (even((max_len as f64 / aspect) as usize), max_len)
    } else {
        (max_len, even((max_len as f64 * aspect) as usize))
    };
    (h.max(1), w.max(1))
}

/// transformers' `_resize_output_size_scale_below_upper_bound`: shrink so no side exceeds `max_len`.
fn scale_below_upper_bound(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if width >= height && width > max_len {
        w = max_len;
        h = (w as f64 / aspect) as usize;
    } else if height > width && height > max_len {
        h = max_len;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// transformers' `resize_for_vision_encoder`: both sides rounded up to multiples of `tile` (the
/// shorter one recomputed from the aspect ratio first).
fn vision_encoder_size(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |x: usize| x.div_ceil(tile) * tile;
    if width >= height {
        let w = up(width);
        let h = up((w as f64 / aspect) as usize);
        (h, w)
    } else {
        let h = up(height);
        let w = up((h as f64 * aspect) as usize);
        (h, w)
    }
}

/// The window `x0..x0+w, y0..y0+h` of `img` (inside it).
fn crop(img: &RgbImage, x0: usize, y0: usize, w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        let s = (y * img.width + x0) * 3;
        data.extend_from_slice(&img.data[s..s + w * 3]);
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

impl IdeficsImageProcessor {
    /// Reads `preprocessor_config.json` in `dir` (else `processor_config.json`'s `image_processor`)
    /// and `image_seq_len` from `processor_config.json` (transformers' default 169 without one).
    pub fn from_dir(dir: &Path) -> Result<IdeficsImageProcessor> {
        let (path, value) = processor_config(dir)?;
        let proc_path = dir.join("processor_config.json");
        let seq = if proc_path.exists() {
            let v = read_json(&proc_path)?;
            match v.get("image_seq_len").filter(|x| !x.is_null()) {
                None => None,
                Some(x) => {
                    Some(
                        x.as_u64()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| VerifyError::Config {
                                path: proc_path.clone(),
                                msg: format!(
                                    "`image_seq_len` is {x}, expected a positive whole number"
                                ),
                            })? as usize,
                    )
                }
            }
        } else {
            None
        };
        IdeficsImageProcessor::from_config(&value, &path, seq.unwrap_or(169))
    }

    /// From the parsed image-processor config (`path` names it in errors), with the defaults of
    /// transformers' `Idefics3ImageProcessor` / `SmolVLMImageProcessor`.
    pub fn from_config(
        v: &Value,
        path: &Path,
        image_seq_len: usize,
    ) -> Result<IdeficsImageProcessor> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("Idefics3ImageProcessor");
        let base = kind.trim_end_matches("Fast").trim_end_matches("Pil");
        if !matches!(base, "Idefics3ImageProcessor" | "SmolVLMImageProcessor") {
            return Err(VerifyError::Unsupported(format!(
                "{}: image processor `{kind}` is not Idefics3's or SmolVLM's",
                path.display()
            )));
        }
        let get = |key: &str| v.get(key).filter(|x| !x.is_null());
        let flag = |key: &str| -> Result<bool> {
            match get(key) {
                None => Ok(true),
                Some(b) => b
                    .as_bool()
                    .ok_or_else(|| err(format!("`{key}` is {b}, expected true or false"))),
            }
        };
        let uint = |s: &Value, key: &str| -> Result<Option<usize>> {
            match s.get(key).filter(|x| !x.is_null()) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| {
                        err(format!("`{key}` is {x}, expected a positive whole number"))
                    }),
            }
        };
        let resize = if flag("do_resize")? {
            Some(match get("size") {
                None => IdeficsResize::LongestEdge(4 * 364),
                Some(s) => match (
                    uint(s, "longest_edge")?,
                    uint(s, "height")?,
                    uint(s, "width")?,
                ) {
                    (Some(n), _, _) => IdeficsResize::LongestEdge(n),
                    (None, Some(height), Some(width)) => IdeficsResize::Fixed { width, height },
                    _ => {
                        return Err(err(format!(
                            "`size` {s}: expected `longest_edge`, or `height` and `width`"
                        )))
                    }
                },
            })
        } else {
            None
        };
        let tile = match get("max_image_size") {
            None => 364,
            Some(s) => uint(s, "longest_edge")?
                .ok_or_else(|| err(format!("`max_image_size` {s}: expected `longest_edge`")))?,
        };
        let resample = match get("resample") {
            None => Resample::Lanczos,
            Some(r) => r.as_u64().and_then(Resample::from_pil).ok_or_else(|| {
                err(format!(
                    "`resample` is {r}, expected a PIL filter number 0-5"
                ))
            })?,
        };
        let rescale = if flag("do_rescale")? {
            Some(match get("rescale_factor") {
                None => 1.0 / 255.0,
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| err(format!("`rescale_factor` is {x}, expected a number")))?,
            })
        } else {
            None
        };
        // Absent: transformers' IMAGENET_STANDARD_MEAN / _STD.
        let triple = |key: &str| channel_triple(get(key), key, [0.5; 3]).map_err(err);
        let normalize = if flag("do_normalize")? {
            let (mean, std) = (triple("image_mean")?, triple("image_std")?);
            if std.contains(&0.0) {
                return Err(err("`image_std` has a zero".into()));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(IdeficsImageProcessor {
            resize,
            tile,
            splitting: flag("do_image_splitting")?,
            resample,
            pixels: ImageProcessor {
                kind: base.to_string(),
                resize: None,
                resample,
                crop: None,
                rescale,
                normalize,
            },
            image_seq_len,
        })
    }

    /// The 8-bit tiles of `img` (split tiles row-major, then the global image) and the split grid.
    pub fn tiles(&self, img: &RgbImage) -> Result<(Vec<RgbImage>, usize, usize)> {
        let mut img = match self.resize {
            None => img.clone(),
            Some(r) => {
                let (h, w) = match r {
                    IdeficsResize::LongestEdge(n) => {
                        let (h, w) = rescale_to_max_len(img.height, img.width, n);
                        scale_below_upper_bound(h, w, MAX_IMAGE_SIZE)
                    }
                    IdeficsResize::Fixed { width, height } => (height, width),
                };
                resize(img, w, h, self.resample)?
            }
        };
        let t = self.tile;
        if !self.splitting {
            return Ok((vec![resize(&img, t, t, self.resample)?], 0, 0));
        }
        let (h, w) = vision_encoder_size(img.height, img.width, t);
        img = resize(&img, w, h, self.resample)?;
        if img.height <= t && img.width <= t {
            return Ok((vec![img], 0, 0));
        }
        // Both sides are multiples of the tile, so the tiles cover the image exactly.
        let (rows, cols) = (img.height / t, img.width / t);
        let mut out = Vec::with_capacity(rows * cols + 1);
        for r in 0..rows {
            for c in 0..cols {
                out.push(crop(&img, c * t, r * t, t, t));
            }
        }
        out.push(resize(&img, t, t, self.resample)?);
        Ok((out, rows, cols))
    }

    /// Tiles, rescaled and normalized, channel-first.
    pub fn preprocess(&self, img: &RgbImage) -> Result<IdeficsPixels> {
        let (tiles, rows, cols) = self.tiles(img)?;
        let (height, width) = (tiles[0].height, tiles[0].width);
        let mut data = Vec::with_capacity(tiles.len() * 3 * height * width);
        for tile in &tiles {
            // A single unsplit image keeps its own size; several tiles always share the tile size.
            data.extend(self.pixels.preprocess(tile)?.data);
        }
        Ok(IdeficsPixels {
            tiles: tiles.len(),
            height,
            width,
            data,
            rows,
            cols,
        })
    }
}

/// The special-token texts of the image expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdeficsTokens {
    pub image: String,
    pub fake: String,
    pub global: String,
}

impl IdeficsTokens {
    /// The processor's tokens: `<image>` as config.json's `image_token_id` names it; SmolVLM reads the
    /// others from tokenizer_config.json `extra_special_tokens`, Idefics3 uses fixed texts.
    pub fn from_dir(dir: &Path, image: String) -> Result<IdeficsTokens> {
        let path = dir.join("tokenizer_config.json");
        let extra = if path.exists() {
            read_json(&path)?.get("extra_special_tokens").cloned()
        } else {
            None
        };
        let named = |key: &str, default: &str| {
            extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        Ok(IdeficsTokens {
            image,
            fake: named("fake_image_token", "<fake_token_around_image>"),
            global: named("global_image_token", "<global-img>"),
        })
    }
}

/// What the processor writes in place of the template's image token: per split tile
/// `<fake><row_r_col_c>` and `seq_len` image tokens (a newline after each row), then a newline and
/// `<fake><global>` + image tokens + `<fake>`; an unsplit image is only the global part, without the
/// newline.
pub fn image_prompt_string(
    tok: &IdeficsTokens,
    rows: usize,
    cols: usize,
    seq_len: usize,
) -> String {
    let images = tok.image.repeat(seq_len);
    let mut s = String::new();
    if rows > 0 || cols > 0 {
        for r in 1..=rows {
            for c in 1..=cols {
                s.push_str(&format!("{}<row_{r}_col_{c}>{images}", tok.fake));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s.push_str(&format!("{}{}{images}{}", tok.fake, tok.global, tok.fake));
    s
}

/// mlx-vlm's position ids of an `nb_h x nb_w` patch grid for a `side x side` position embedding:
/// fractional coordinates `i / nb` (float32, clipped below 1) bucketed by the boundaries
/// `arange(1/side, 1, 1/side)` (float32, MLX's arange), row-major. The float32 values come from MLX
/// itself; comparing two float32 values is exact anywhere.
pub fn position_ids(side: usize, nb_h: usize, nb_w: usize) -> Result<Vec<i32>> {
    let n = side as f64;
    let bounds = Array::arange(1.0 / n, 1.0, 1.0 / n, Dtype::F32)?.to_vec_f32()?;
    let bucket = |nb: usize| -> Result<Vec<i32>> {
        let hi = Array::scalar((1.0 - 1e-6) as f32, Dtype::F32)?;
        let frac = Array::arange(0.0, nb as f64, 1.0, Dtype::F32)?
            .divide(&Array::scalar(nb as f32, Dtype::F32)?)?
            .clip(Some(&Array::scalar(0.0, Dtype::F32)?), Some(&hi))?
            .to_vec_f32()?;
        Ok(frac
            .iter()
            .map(|&f| bounds.iter().filter(|&&b| f >= b).count() as i32)
            .collect())
    };
    let (bh, bw) = (bucket(nb_h)?, bucket(nb_w)?);
    let mut ids = Vec::with_capacity(nb_h * nb_w);
    for &h in &bh {
        for &w in &bw {
            ids.push(h * side as i32 + w);
        }
    }
    Ok(ids)
}

/// The vision side of an Idefics3 / SmolVLM model: `vision_model.*` and `connector.*`.
///
/// Not `Send` (MLX arrays).
pub struct IdeficsVision {
    image_token_id: i32,
    patch_size: usize,
    /// `image_size / patch_size`: the position-embedding grid.
    side: usize,
    heads: usize,
    scale_factor: usize,
    patch_w: Array,
    patch_b: Option<Array>,
    pos_emb: Array,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    proj: Linear,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|n| n as usize)
}

impl IdeficsVision {
    /// Builds the vision side over `store`; `config` is the config.json to follow (mlx-vlm's defaults
    /// where it is silent).
    pub(crate) fn from_store(dir: &Path, config: &Value, store: &Store) -> Result<IdeficsVision> {
        let cfg_path = dir.join("config.json");
        let cerr = |msg: String| VerifyError::Config {
            path: cfg_path.clone(),
            msg,
        };
        let werr = |msg: String| VerifyError::Weights {
            dir: dir.to_path_buf(),
            msg,
        };
        let vc = config
            .get("vision_config")
            .ok_or_else(|| cerr("`vision_config` is missing".into()))?;
        let image_token_id = config
            .get("image_token_id")
            .or_else(|| config.get("image_token_index"))
            .and_then(Value::as_i64)
            .unwrap_or(49153) as i32;
        let scale_factor = get_usize(config, "scale_factor").unwrap_or(2);
        let p = "vision_model.";
        let patch_w = store.float(&format!("{p}embeddings.patch_embedding.weight"))?;
        let shape = patch_w.shape()?;
        let hidden = shape.first().copied().unwrap_or(0);
        let patch_size = get_usize(vc, "patch_size").unwrap_or(14);
        if shape.len() != 4 || shape[1] != patch_size || shape[2] != patch_size || shape[3] != 3 {
            return Err(werr(format!(
                "`{p}embeddings.patch_embedding.weight` has shape {shape:?}; MLX's layout is \
                 [out, {patch_size}, {patch_size}, 3] (a PyTorch [out, 3, kH, kW] weight was not \
                 transposed?)"
            )));
        }
        // mlx-vlm's SmolVLM default: one head per 64 features (16 otherwise).
        let heads = get_usize(vc, "num_attention_heads").unwrap_or(if hidden.is_multiple_of(64) {
            hidden / 64
        } else {
            16
        });
        let image_size = get_usize(vc, "image_size").unwrap_or(224);
        if heads == 0
            || !hidden.is_multiple_of(heads)
            || scale_factor == 0
            || image_size < patch_size
        {
            return Err(cerr(format!(
                "vision hidden size {hidden}, {heads} heads, image_size {image_size}, patch_size \
                 {patch_size}, scale_factor {scale_factor}"
            )));
        }
        let eps = vc
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6) as f32;
        let layers = load_encoder(store, p, eps)?;
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
        let side = image_size / patch_size;
        let pos_emb = store.float(&format!("{p}embeddings.position_embedding.weight"))?;
        if pos_emb.shape()? != [side * side, hidden] {
            return Err(werr(format!(
                "`{p}embeddings.position_embedding.weight` has shape {:?}, expected [{}, {hidden}] \
                 for image_size {image_size} / patch_size {patch_size}",
                pos_emb.shape()?,
                side * side
            )));
        }
        Ok(IdeficsVision {
            image_token_id,
            patch_size,
            side,
            heads,
            scale_factor,
            patch_b: store.float_opt(&format!("{p}embeddings.patch_embedding.bias"))?,
            patch_w,
            pos_emb,
            layers,
            // mlx-vlm builds `post_layernorm` with nn.LayerNorm's default eps.
            post_norm: LayerNorm::load(store, &format!("{p}post_layernorm"), 1e-5)?,
            proj: store.linear("connector.modality_projection.proj")?,
        })
    }

    /// The placeholder token id the image features replace.
    pub fn image_token_id(&self) -> i32 {
        self.image_token_id
    }

    /// Image features (tokens) per `height x width` tile: the patches over `scale_factor²`.
    pub fn tokens_per_tile(&self, height: usize, width: usize) -> usize {
        let patches = (height / self.patch_size) * (width / self.patch_size);
        patches / (self.scale_factor * self.scale_factor)
    }

    /// Image features `[T, text hidden]` (lazy) for the tiles `px`, in the connector's output dtype.
    /// Tiles that are exactly zero are dropped first (mlx-vlm's padding-image rule).
    pub fn features(&self, px: &IdeficsPixels) -> Result<Array> {
        let [n, _, h, w] = px.shape();
        if px.data.len() != n * 3 * h * w || n == 0 {
            return Err(VerifyError::BadInput(format!(
                "{} pixel values are not {n} tiles of 3x{h}x{w}",
                px.data.len()
            )));
        }
        let per = 3 * h * w;
        let real: Vec<usize> = (0..n)
            .filter(|&i| px.data[i * per..(i + 1) * per].iter().any(|&v| v != 0.0))
            .collect();
        if real.is_empty() {
            return Err(VerifyError::BadInput("every image tile is zero".into()));
        }
        let data: Vec<f32> = real
            .iter()
            .flat_map(|&i| px.data[i * per..(i + 1) * per].iter().copied())
            .collect();
        let b = real.len();
        let pixels = Array::from_slice(&data, &[b, 3, h, w])?.transpose(&[0, 2, 3, 1])?;
        let states = self.tower(&pixels)?.astype(Dtype::F32)?;
        let shuffled = self.pixel_shuffle(&states)?;
        let f = self.proj.forward(&shuffled)?;
        let d = f.shape()?[2] as i32;
        Ok(f.reshape(&[-1, d])?)
    }

    /// Embeddings, encoder, `post_layernorm`: `[B, L, D]` in the tower's dtype.
    fn tower(&self, pixels: &Array) -> Result<Array> {
        let p = self.patch_size as i32;
        let mut x = pixels.conv2d(&self.patch_w, (p, p), (0, 0))?;
        if let Some(b) = &self.patch_b {
            x = x.add(b)?;
        }
        let s = x.shape()?;
        let (b, gh, gw, d) = (s[0] as i32, s[1], s[2], s[3] as i32);
        let len = (gh * gw) as i32;
        x = x.reshape(&[b, len, d])?;
        let ids = position_ids(self.side, gh, gw)?;
        if ids
            .iter()
            .any(|&i| i < 0 || i as usize >= self.side * self.side)
        {
            return Err(VerifyError::BadInput(format!(
                "a {gw}x{gh} patch grid does not fit the {0}x{0} position embedding",
                self.side
            )));
        }
        let pos = self
            .pos_emb
            .take(&Array::from_slice(&ids, &[ids.len()])?, 0)?;
        x = x
            .add(&pos.reshape(&[1, len, d])?)?
            .astype(self.patch_w.dtype()?)?;
        // SigLIP layers: tanh-approximated GELU.
        let x = run_encoder(&self.layers, x, self.heads, Act::GeluTanh, |_| Ok(()))?;
        self.post_norm.forward(&x)
    }

    /// The connector's pixel shuffle: each `s x s` block of the square patch grid becomes one token
    /// of `s² D` features, in mlx-vlm's reshape/transpose order.
    fn pixel_shuffle(&self, x: &Array) -> Result<Array> {
        let sh = x.shape()?;
        let (b, seq, d) = (sh[0], sh[1], sh[2]);
        let side = (seq as f64).sqrt() as usize;
        let s = self.scale_factor;
        if side * side != seq || !side.is_multiple_of(s) {
            return Err(VerifyError::BadInput(format!(
                "the pixel shuffle needs a square patch grid divisible by scale_factor {s}; the tiles \
                 give {seq} patches"
            )));
        }
        let [b, side, s, d] = [b, side, s, d].map(|v| v as i32);
        Ok(x.reshape(&[b, side, side, d])?
            .reshape(&[b, side, side / s, d * s])?
            .transpose(&[0, 2, 1, 3])?
            .reshape(&[b, side / s, side / s, d * s * s])?
            .transpose(&[0, 2, 1, 3])?
            .reshape(&[b, (side / s) * (side / s), d * s * s])?)
    }

    /// The language model's input for `ids` and the tiles `px`: the token embeddings with the image
    /// features at the image tokens (cast to the embeddings' dtype, as mlx-vlm's scatter does).
    pub fn input(&self, text: &TextModel, ids: &[i32], px: &IdeficsPixels) -> Result<EmbedInput> {
        let embeds = text.embed_tokens(ids)?;
        let f = self.features(px)?;
        let sh = f.shape()?;
        let f = f.reshape(&[1, sh[0] as i32, sh[1] as i32])?;
        let dtype = embeds.dtype()?;
        Ok(EmbedInput {
            embeds: merge_image_features(ids, &embeds, &f, self.image_token_id, None, dtype)?,
            positions: None,
            deepstack: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_transformers() {
        // 96x72 with longest edge 112: 112 x 84, already multiples of 28 -> 3 x 4 tiles.
        assert_eq!(rescale_to_max_len(72, 96, 112), (84, 112));
        assert_eq!(vision_encoder_size(84, 112, 28), (84, 112));
        // Odd results round up to even; tall images scale the width.
        assert_eq!(rescale_to_max_len(100, 33, 50), (50, 16));
        assert_eq!(rescale_to_max_len(33, 100, 50), (16, 50));
        assert_eq!(vision_encoder_size(50, 16, 28), (56, 28));
        assert_eq!(scale_below_upper_bound(100, 8000, 4096), (51, 4096));
    }

    #[test]
    fn prompt_string_layout() {
        let t = IdeficsTokens {
            image: "<i>".into(),
            fake: "<f>".into(),
            global: "<g>".into(),
        };
        assert_eq!(image_prompt_string(&t, 0, 0, 2), "<f><g><i><i><f>");
        assert_eq!(
            image_prompt_string(&t, 1, 2, 1),
            "<f><row_1_col_1><i><f><row_1_col_2><i>\n\n<f><g><i><f>"
        );
    }

    #[test]
    fn position_ids_as_mlx_vlm_buckets_them() {
        crate::mlx::init().unwrap();
        // Powers of two: the identity.
        let ids = position_ids(8, 8, 8).unwrap();
        assert_eq!(ids, (0..64).collect::<Vec<i32>>());
        // Idefics3's 26x26 grid: mlx-vlm 0.7.10's buckets (measured), where transformers counts 0..26.
        let buckets = [
            0, 1, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 14, 15, 16, 17, 18, 19, 20, 21, 22,
            23, 24,
        ];
        let ids = position_ids(26, 26, 1).unwrap();
        assert_eq!(ids, buckets.map(|b| b * 26).to_vec());
    }

    #[test]
    fn tiles_cover_the_image() {
        let p = IdeficsImageProcessor::from_config(
            &serde_json::json!({
                "image_processor_type": "Idefics3ImageProcessor",
                "size": {"longest_edge": 112}, "max_image_size": {"longest_edge": 28},
                "resample": 1
            }),
            Path::new("x"),
            4,
        )
        .unwrap();
        let px = p.preprocess(&RgbImage::synthetic()).unwrap();
        assert_eq!((px.rows, px.cols, px.tiles), (3, 4, 13));
        assert_eq!(px.shape(), [13, 3, 28, 28]);
        let no_split = IdeficsImageProcessor {
            splitting: false,
            ..p
        };
        let px = no_split.preprocess(&RgbImage::synthetic()).unwrap();
        assert_eq!((px.rows, px.cols, px.tiles), (0, 0, 1));
    }
}
