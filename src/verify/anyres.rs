//! "Any-res" image prompts of LLaVA-NeXT and LLaVA-OneVision: the image is cut into tiles at the
//! best-fitting resolution of `image_grid_pinpoints` plus a base (whole-image) tile, every tile goes
//! through the tower, and the features are packed back into one sequence.
//!
//! - [`AnyResProcessor`]: transformers' `LlavaNextImageProcessor` / `LlavaOnevisionImageProcessor`
//!   (PIL backend, one image): best resolution, aspect-preserving resize, zero padding centred, tiles
//!   in row-major order after the base image (resized to the tile size), each tile through the
//!   fixed-size steps of [`ImageProcessor`] (resize, crop, rescale, normalize).
//! - [`AnyResVision`]: the tower on all tiles in one batch ([`VisionModel::tile_features`]), the
//!   projector, then the packing mlx-vlm's `llava_onevision.pack_image_features` does: the tiles'
//!   feature grid unpadded to the image's aspect ratio, bilinearly downsampled when it exceeds
//!   `anyres_max_N` tiles (OneVision), `image_newline` after every row, the base tile's features first;
//!   merged at the image tokens. The packing is planned on the host as row indices (and, for the
//!   downsampling, bilinear weights computed in float32 as mlx-vlm's `resize_bilinear` computes them),
//!   so on the device it is gathers and one weighted sum in mlx-vlm's order.
//! - [`image_tokens`]: the processor's count of image tokens for an image size.
//!
//! mlx-vlm 0.7.10's LLaVA-NeXT model does not pack: it appends a copy of every tile's features made of
//! `image_newline` and inserts one whole tile per image token, so its embeddings do not line up with
//! the processor's token ids (97 ids give 187 embeddings on the fixture). LLaVA-NeXT therefore follows
//! transformers (the same packing, without OneVision's downsampling; the unpadded height or width
//! rounded to 7 decimals as transformers does, where mlx-vlm's OneVision truncates).

use std::path::Path;

use serde_json::Value;

use crate::mlx::{self, Array, Dtype};

use super::image::{processor_config, resize, ImageProcessor, Resample, RgbImage};
use super::text::{EmbedInput, TextModel};
use super::vision::{merge_image_features, VisionModel};
use super::weights::Store;
use super::{Result, VerifyError};

/// The two any-res families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyResKind {
    /// LLaVA-NeXT (LLaVA-1.6): CLIP tower, no downsampling.
    Next,
    /// LLaVA-OneVision: SigLIP tower, `anyres_max_N` downsampling of large feature grids.
    OneVision,
}

impl AnyResKind {
    pub fn from_model_type(model_type: &str) -> Option<AnyResKind> {
        match model_type {
            "llava_next" => Some(AnyResKind::Next),
            "llava_onevision" => Some(AnyResKind::OneVision),
            _ => None,
        }
    }
}

/// Preprocessed tiles of one image: the base image then the grid tiles, `[tiles, 3, height, width]`
/// float32 channel-first, and the image's original size.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyResPixels {
    pub data: Vec<f32>,
    pub tiles: usize,
    pub height: usize,
    pub width: usize,
    /// `(height, width)` of the image before preprocessing (transformers' `image_sizes`).
    pub image_size: (usize, usize),
}

impl AnyResPixels {
    pub fn shape(&self) -> [usize; 4] {
        [self.tiles, 3, self.height, self.width]
    }
}

/// transformers' `select_best_resolution`: the `(height, width)` pinpoint that keeps the most of the
/// image's resolution, then wastes the least; the first such in list order.
pub fn select_best_resolution(
    (height, width): (usize, usize),
    pinpoints: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let (oh, ow) = (height as f64, width as f64);
    let mut best = None;
    let (mut max_effective, mut min_wasted) = (0usize, usize::MAX);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
        let effective = (dw * dh).min(width * height);
        let wasted = (w * h).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the aspect-preserving size `(height, width)` of an image
/// resized to fit `target`.
pub fn patch_output_size((oh, ow): (usize, usize), (th, tw): (usize, usize)) -> (usize, usize) {
    let scale_w = tw as f64 / ow as f64;
    let scale_h = th as f64 / oh as f64;
    if scale_w < scale_h {
        (((oh as f64 * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow as f64 * scale_h).ceil() as usize).min(tw))
    }
}

/// How the unpadded height (or width) of the feature grid is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unpad {
    /// transformers: `int(round(x, 7))`.
    Round7,
    /// mlx-vlm's OneVision: `int(x)`.
    Truncate,
}

impl Unpad {
    fn apply(self, x: f64) -> usize {
        let r = x.round();
        match self {
            // `round(x, 7)` moves x to the integer only when it is within 5e-8 of it.
            Unpad::Round7 if (x - r).abs() < 5e-8 => r as usize,
            _ => x as usize,
        }
    }
}

/// The unpadded window `(top, left, height, width)` of a `cur_h x cur_w` feature grid covering an
/// image of `(oh, ow)` pixels resized and padded to the grid's aspect (transformers' and mlx-vlm's
/// `unpad_image`).
fn unpad_window(
    (oh, ow): (usize, usize),
    (cur_h, cur_w): (usize, usize),
    rounding: Unpad,
) -> (usize, usize, usize, usize) {
    let original = ow as f64 / oh as f64;
    let current = cur_w as f64 / cur_h as f64;
    if original > current {
        let new_h = rounding.apply(oh as f64 * (cur_w as f64 / ow as f64));
        let pad = cur_h.saturating_sub(new_h) / 2;
        (pad, 0, cur_h - 2 * pad, cur_w)
    } else {
        let new_w = rounding.apply(ow as f64 * (cur_h as f64 / oh as f64));
        let pad = cur_w.saturating_sub(new_w) / 2;
        (0, pad, cur_h, cur_w - 2 * pad)
    }
}

/// Python's `a // b` for floats (`float_floor_div`: `fmod`-based, so it can differ from
/// `floor(a / b)` by one near integers).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div == 0.0 {
        return 0.0;
    }
    let f = div.floor();
    if div - f > 0.5 {
        f + 1.0
    } else {
        f
    }
}

/// OneVision's `anyres_max_N` downsampling: the target `(height, width)` of an unpadded
/// `h x w` feature grid, if it is more than 1.1 times `max_tiles` tiles of `side x side`.
fn downsampled(h: usize, w: usize, side: usize, max_tiles: usize) -> Option<(usize, usize)> {
    let ratio = ((h * w) as f64 / (max_tiles * side * side) as f64).sqrt();
    (ratio > 1.1).then(|| {
        (
            py_floordiv(h as f64, ratio) as usize,
            py_floordiv(w as f64, ratio) as usize,
        )
    })
}

/// The image grid layout: tiles of the best resolution and the unpadded (and possibly downsampled)
/// feature grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Tile rows and columns (without the base tile).
    rows: usize,
    cols: usize,
    /// Patches per tile side.
    side: usize,
    /// Unpadded window `(top, left, height, width)` in the `rows*side x cols*side` grid.
    window: (usize, usize, usize, usize),
    /// The downsampled size of the window, if any.
    resized: Option<(usize, usize)>,
}

impl Layout {
    fn new(
        image_size: (usize, usize),
        pinpoints: &[(usize, usize)],
        tile_px: usize,
        side: usize,
        rounding: Unpad,
        max_tiles: Option<usize>,
    ) -> Result<Layout> {
        let (bh, bw) = select_best_resolution(image_size, pinpoints).ok_or_else(|| {
            VerifyError::BadInput(format!(
                "no image_grid_pinpoints resolution fits a {}x{} image",
                image_size.1, image_size.0
            ))
        })?;
        let (rows, cols) = (bh / tile_px, bw / tile_px);
        if rows == 0 || cols == 0 || side == 0 {
            return Err(VerifyError::BadInput(format!(
                "image_grid_pinpoints resolution {bh}x{bw} is smaller than one {tile_px}-pixel tile"
            )));
        }
        let window = unpad_window(image_size, (rows * side, cols * side), rounding);
        let resized = max_tiles.and_then(|m| downsampled(window.2, window.3, side, m));
        Ok(Layout {
            rows,
            cols,
            side,
            window,
            resized,
        })
    }

    /// Image features after packing: base tile, then each row of the (resized) window plus a newline.
    fn tokens(&self) -> usize {
        let (h, w) = self.resized.unwrap_or((self.window.2, self.window.3));
        self.side * self.side + h * (w + 1)
    }

    /// Row of the projected features (`[tiles * side^2, D]`, base tile first) holding the grid
    /// position `(y, x)` of the full `rows*side x cols*side` grid.
    fn source_row(&self, y: usize, x: usize) -> usize {
        let s = self.side;
        let tile = 1 + (y / s) * self.cols + x / s;
        tile * s * s + (y % s) * s + x % s
    }
}

/// transformers' processor count of image tokens for an image of `image_size` `(height, width)`:
/// base tile + unpadded grid + one newline per row (OneVision: after its downsampling).
/// `tile_px` is the tile side in pixels and `side` the patches per tile side.
pub fn image_tokens(
    kind: AnyResKind,
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_px: usize,
    side: usize,
    max_tiles: usize,
) -> Result<usize> {
    let max = (kind == AnyResKind::OneVision).then_some(max_tiles);
    Ok(Layout::new(image_size, pinpoints, tile_px, side, Unpad::Round7, max)?.tokens())
}

fn pinpoints_of(v: &Value, path: &Path) -> Result<Vec<(usize, usize)>> {
    let err = || VerifyError::Config {
        path: path.to_path_buf(),
        msg: "`image_grid_pinpoints` must be a list of [height, width] pairs".into(),
    };
    let list = v
        .get("image_grid_pinpoints")
        .and_then(Value::as_array)
        .ok_or_else(err)?;
    let out = list
        .iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                (Some(h), Some(w)) if h > 0 && w > 0 => Some((h as usize, w as usize)),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(err)?;
    if out.is_empty() {
        return Err(err());
    }
    Ok(out)
}

/// The any-res image processor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyResProcessor {
    pub kind: AnyResKind,
    /// `(height, width)` resolutions the image may be tiled at.
    pub pinpoints: Vec<(usize, usize)>,
    /// `(height, width)` the base image is resized to.
    pub base_size: (usize, usize),
    /// Tile side in pixels.
    pub tile: usize,
    pub resample: Resample,
    /// The steps every tile goes through (resize to `size`, crop, rescale, normalize).
    pub per_tile: ImageProcessor,
}

impl AnyResProcessor {
    /// Reads `preprocessor_config.json` (or `processor_config.json`'s `image_processor`) in `dir`.
    pub fn from_dir(dir: &Path) -> Result<AnyResProcessor> {
        let (path, value) = processor_config(dir)?;
        AnyResProcessor::from_config(&value, &path)
    }

    /// Builds the processor from the parsed config; `path` names it in errors. Settings the file
    /// leaves out take the processor class's defaults.
    pub fn from_config(v: &Value, path: &Path) -> Result<AnyResProcessor> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let class = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = match class.trim_end_matches("Fast").trim_end_matches("Pil") {
            "LlavaNextImageProcessor" => AnyResKind::Next,
            "LlavaOnevisionImageProcessor" => AnyResKind::OneVision,
            other => {
                return Err(VerifyError::Unsupported(format!(
                    "image processor `{other}` for an any-res model (expected \
                     LlavaNextImageProcessor or LlavaOnevisionImageProcessor)"
                )))
            }
        };
        let pinpoints = pinpoints_of(v, path)?;
        let mut cfg = v.as_object().cloned().unwrap_or_default();
        let clip_mean = serde_json::json!([0.48145466, 0.4578275, 0.40821073]);
        let clip_std = serde_json::json!([0.26862954, 0.26130258, 0.27577711]);
        let (size, crop, do_crop) = match kind {
            AnyResKind::Next => (
                serde_json::json!({"shortest_edge": 224}),
                serde_json::json!({"height": 224, "width": 224}),
                true,
            ),
            AnyResKind::OneVision => (
                serde_json::json!({"height": 384, "width": 384}),
                Value::Null,
                false,
            ),
        };
        for (key, default) in [
            ("size", size),
            ("crop_size", crop),
            ("do_center_crop", Value::Bool(do_crop)),
            ("image_mean", clip_mean),
            ("image_std", clip_std),
        ] {
            if cfg.get(key).is_none_or(Value::is_null) {
                cfg.insert(key.into(), default);
            }
        }
        // The per-tile steps are CLIP's (a bare `size` number is a shortest edge, as with these
        // classes' `default_to_square = False`).
        cfg.insert(
            "image_processor_type".into(),
            Value::String("CLIPImageProcessor".into()),
        );
        let cfg = Value::Object(cfg);
        let per_tile = ImageProcessor::from_config(&cfg, path)?;
        let dim = |key: &str, k: &str| {
            cfg.get(key)
                .and_then(|s| s.get(k))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .filter(|&n| n > 0)
        };
        let size_num = cfg.get("size").and_then(Value::as_u64).map(|n| n as usize);
        let edge = dim("size", "shortest_edge").or(size_num);
        let base_size = match (dim("size", "height"), dim("size", "width"), edge) {
            (Some(h), Some(w), _) => (h, w),
            (_, _, Some(e)) => (e, e),
            _ => return Err(err(format!("`size` {} is not supported", cfg["size"]))),
        };
        let crop_num = cfg
            .get("crop_size")
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        // transformers: the tiles are `crop_size.height`, else `size.height`, else the shortest edge.
        let tile = dim("crop_size", "height")
            .or(crop_num)
            .or(dim("size", "height"))
            .or(edge)
            .ok_or_else(|| err("no tile size in `crop_size` or `size`".into()))?;
        Ok(AnyResProcessor {
            kind,
            pinpoints,
            base_size,
            tile,
            resample: per_tile.resample,
            per_tile,
        })
    }

    /// The base image and the tiles of `img`, preprocessed.
    pub fn preprocess(&self, img: &RgbImage) -> Result<AnyResPixels> {
        let image_size = (img.height, img.width);
        let (bh, bw) = select_best_resolution(image_size, &self.pinpoints).ok_or_else(|| {
            VerifyError::BadInput("no image_grid_pinpoints resolution fits the image".into())
        })?;
        let (nh, nw) = patch_output_size(image_size, (bh, bw));
        let resized = resize(img, nw, nh, self.resample)?;
        let padded = pad_centered(&resized, bh, bw);
        let mut patches = vec![resize(
            img,
            self.base_size.1,
            self.base_size.0,
            self.resample,
        )?];
        for y in (0..bh).step_by(self.tile) {
            for x in (0..bw).step_by(self.tile) {
                patches.push(crop(
                    &padded,
                    y,
                    x,
                    self.tile.min(bh - y),
                    self.tile.min(bw - x),
                ));
            }
        }
        let mut data = Vec::new();
        let mut dims = None;
        for p in &patches {
            let px = self.per_tile.preprocess(p)?;
            if *dims.get_or_insert((px.height, px.width)) != (px.height, px.width) {
                return Err(VerifyError::BadInput(format!(
                    "image tiles of different sizes ({}x{} and {}x{}): the pinpoints are not \
                     multiples of the {}-pixel tile",
                    px.width,
                    px.height,
                    dims.map_or(0, |d| d.1),
                    dims.map_or(0, |d| d.0),
                    self.tile
                )));
            }
            data.extend(px.data);
        }
        let (height, width) = dims.unwrap_or_default();
        Ok(AnyResPixels {
            data,
            tiles: patches.len(),
            height,
            width,
            image_size,
        })
    }
}

/// `img` centred on a black `height x width` canvas (transformers' `_pad_for_patching`: the odd
/// pixel of padding goes to the bottom/right).
fn pad_centered(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let top = height.saturating_sub(img.height) / 2;
    let left = width.saturating_sub(img.width) / 2;
    let mut data = vec![0u8; height * width * 3];
    for y in 0..img.height.min(height) {
        let src = &img.data[y * img.width * 3..][..img.width.min(width) * 3];
        data[((y + top) * width + left) * 3..][..src.len()].copy_from_slice(src);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// The `h x w` window of `img` at `(top, left)`.
fn crop(img: &RgbImage, top: usize, left: usize, h: usize, w: usize) -> RgbImage {
    let mut data = Vec::with_capacity(h * w * 3);
    for y in top..top + h {
        data.extend_from_slice(&img.data[(y * img.width + left) * 3..][..w * 3]);
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// The vision path of an any-res model: tower + projector ([`VisionModel`]), `image_newline`, and the
/// packing.
///
/// Not `Send` (MLX arrays).
pub struct AnyResVision {
    kind: AnyResKind,
    tower: VisionModel,
    newline: Option<Array>,
    pinpoints: Vec<(usize, usize)>,
    /// OneVision's `anyres_max_N`.
    max_tiles: usize,
}

impl AnyResVision {
    /// The vision side over tensors in a [`Store`]; `config` is the config.json to follow.
    pub(crate) fn from_store(dir: &Path, config: &Value, store: &Store) -> Result<AnyResVision> {
        let cfg_path = dir.join("config.json");
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = AnyResKind::from_model_type(model_type).ok_or_else(|| {
            VerifyError::Unsupported(format!("`{model_type}` is not an any-res architecture"))
        })?;
        let pinpoints = pinpoints_of(config, &cfg_path)?;
        let aspect = config
            .get("vision_aspect_ratio")
            .and_then(Value::as_str)
            .unwrap_or("anyres_max_9");
        // mlx-vlm and transformers: `int(vision_aspect_ratio.strip("anyres_max_"))`.
        let max_tiles = aspect
            .trim_matches(|c: char| "anyres_max_".contains(c))
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| VerifyError::Config {
                path: cfg_path.clone(),
                msg: format!("`vision_aspect_ratio` `{aspect}` (expected anyres_max_N)"),
            })?;
        let tower = VisionModel::from_store(dir, config, store)?;
        // LLaVA-NeXT always has the newline; OneVision unless `use_image_newline_parameter` is false.
        let wants_newline = kind == AnyResKind::Next
            || config
                .get("use_image_newline_parameter")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        let newline = if wants_newline {
            Some(store.float("image_newline")?)
        } else {
            None
        };
        Ok(AnyResVision {
            kind,
            tower,
            newline,
            pinpoints,
            max_tiles,
        })
    }

    pub fn kind(&self) -> AnyResKind {
        self.kind
    }

    pub fn image_token_id(&self) -> i32 {
        self.tower.image_token_id()
    }

    /// The processor's image-token count for an image of `image_size` `(height, width)`.
    ///
    /// Unsupported when the packing gives another count: mlx-vlm's OneVision truncates the unpadded
    /// height or width where the processor rounds it, which on rare sizes (110x176 on the fixture's
    /// pinpoints) changes the unpadding, and mlx-vlm then fails on the token count too.
    pub fn image_tokens(&self, image_size: (usize, usize)) -> Result<usize> {
        let n = image_tokens(
            self.kind,
            image_size,
            &self.pinpoints,
            self.tower.image_size(),
            self.tower.patches_per_side(),
            self.max_tiles,
        )?;
        let packed = self.layout(image_size)?.tokens();
        if packed != n {
            return Err(VerifyError::Unsupported(format!(
                "a {}x{} image: the processor writes {n} image tokens but mlx-vlm's packing gives                  {packed} features (mlx-vlm fails on it too); use an image of another size",
                image_size.1, image_size.0
            )));
        }
        Ok(n)
    }

    fn layout(&self, image_size: (usize, usize)) -> Result<Layout> {
        let (rounding, max) = match self.kind {
            AnyResKind::Next => (Unpad::Round7, None),
            AnyResKind::OneVision => (Unpad::Truncate, Some(self.max_tiles)),
        };
        Layout::new(
            image_size,
            &self.pinpoints,
            self.tower.image_size(),
            self.tower.patches_per_side(),
            rounding,
            max,
        )
    }

    /// Packed image features `[1, tokens, text hidden]` (lazy) for preprocessed tiles.
    pub fn features(&self, px: &AnyResPixels) -> Result<Array> {
        let side = self.tower.patches_per_side();
        let per_tile = self.tower.tokens_per_image();
        if per_tile != side * side {
            return Err(VerifyError::Unsupported(format!(
                "{per_tile} features per tile for a {side}x{side} patch grid (any-res packing needs \
                 the `full` strategy on SigLIP or `default` on CLIP)"
            )));
        }
        let tiles = Array::from_slice(&px.data, &px.shape())?.transpose(&[0, 2, 3, 1])?;
        let f = self.tower.tile_features(&tiles)?;
        let s = f.shape()?;
        let d = s[2];
        let flat = f.reshape(&[(s[0] * s[1]) as i32, d as i32])?;
        let dtype = flat.dtype()?;
        let newline = match &self.newline {
            Some(n) => Some(n.reshape(&[1, d as i32])?.astype(dtype)?),
            None => None,
        };
        let rows_of = |idx: &[i32], table: &Array| -> Result<Array> {
            Ok(table.take(&Array::from_slice(idx, &[idx.len()])?, 0)?)
        };
        let base: Vec<i32> = (0..per_tile as i32).collect();
        if px.tiles == 1 {
            let mut parts = vec![rows_of(&base, &flat)?];
            parts.extend(newline.as_ref().map(|n| n.try_clone()).transpose()?);
            let refs: Vec<&Array> = parts.iter().collect();
            return Ok(mlx::concatenate(&refs, 0)?.reshape(&[1, -1, d as i32])?);
        }
        let layout = self.layout(px.image_size)?;
        if px.tiles != 1 + layout.rows * layout.cols {
            return Err(VerifyError::BadInput(format!(
                "{} image tiles, but a {}x{} image tiles as 1 + {}x{}",
                px.tiles, px.image_size.1, px.image_size.0, layout.rows, layout.cols
            )));
        }
        let (top, left, h, w) = layout.window;
        // The unpadded grid (before any downsampling), as a table of rows.
        let (grid, (gh, gw)) = match layout.resized {
            None => {
                let idx: Vec<i32> = (0..h)
                    .flat_map(|y| (0..w).map(move |x| (y, x)))
                    .map(|(y, x)| layout.source_row(top + y, left + x) as i32)
                    .collect();
                (rows_of(&idx, &flat)?, (h, w))
            }
            Some((nh, nw)) => {
                let plan = bilinear_plan((h, w), (nh, nw));
                let src = |(y, x): (usize, usize)| layout.source_row(top + y, left + x) as i32;
                let mut acc: Option<Array> = None;
                for corner in 0..4 {
                    let idx: Vec<i32> = plan.iter().map(|t| src(t.taps[corner])).collect();
                    let wts: Vec<f32> = plan.iter().map(|t| t.weights[corner]).collect();
                    let term = Array::from_slice(&wts, &[wts.len(), 1])?
                        .multiply(&rows_of(&idx, &flat)?)?;
                    acc = Some(match acc {
                        None => term,
                        Some(a) => a.add(&term)?,
                    });
                }
                let grid = acc.ok_or_else(|| VerifyError::BadInput("empty grid".into()))?;
                (grid, (nh, nw))
            }
        };
        // Rows of the grid, each followed by the newline (the table's last row).
        let newline = newline.map(|n| n.astype(grid.dtype()?)).transpose()?;
        let table = match &newline {
            Some(n) => mlx::concatenate(&[&grid, n], 0)?,
            None => grid,
        };
        let nl_row = (gh * gw) as i32;
        let mut idx = Vec::with_capacity(gh * (gw + 1));
        for y in 0..gh {
            idx.extend((0..gw).map(|x| (y * gw + x) as i32));
            if newline.is_some() {
                idx.push(nl_row);
            }
        }
        let body = rows_of(&idx, &table)?;
        let base = rows_of(&base, &flat)?;
        Ok(mlx::concatenate(&[&base, &body], 0)?.reshape(&[1, -1, d as i32])?)
    }

    /// The language model's input for `ids` with the image's features at the image tokens (mlx-vlm's
    /// `_scatter_features`: features cast to the embeddings' dtype, placed in order).
    pub fn input(&self, text: &TextModel, ids: &[i32], px: &AnyResPixels) -> Result<EmbedInput> {
        let embeds = text.embed_tokens(ids)?;
        let f = self.features(px)?;
        let dtype: Dtype = embeds.dtype()?;
        Ok(EmbedInput {
            embeds: merge_image_features(ids, &embeds, &f, self.image_token_id(), None, dtype)?,
            positions: None,
            deepstack: None,
        })
    }
}

/// One output position of a bilinear resize: its four source positions (top-left, top-right,
/// bottom-left, bottom-right) and their weights.
#[derive(Debug, Clone, PartialEq)]
struct BilinearTap {
    taps: [(usize, usize); 4],
    weights: [f32; 4],
}

/// mlx-vlm's `bilinear_interpolate` (no antialias, `align_corners=False`) from `(h, w)` to
/// `(nh, nw)`, row-major over the output: positions `(i + 0.5) * in / out - 0.5` in float32, the
/// floor and ceil clipped to the input, weights `pos - floor` and the products
/// `(1 - r)(1 - c)`, `(1 - r)c`, `r(1 - c)`, `rc` in float32.
fn bilinear_plan((h, w): (usize, usize), (nh, nw): (usize, usize)) -> Vec<BilinearTap> {
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        (0..n_out)
            .map(|i| {
                let pos = if n_out == 1 {
                    0.0f32
                } else {
                    (i as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5
                };
                let fl = pos.floor() as i64;
                let clip = |v: i64| v.clamp(0, n_in as i64 - 1) as usize;
                let (lo, hi) = (clip(fl), clip(fl + 1));
                (lo, hi, pos - lo as f32)
            })
            .collect()
    };
    let (rows, cols) = (axis(h, nh), axis(w, nw));
    let mut out = Vec::with_capacity(nh * nw);
    for &(r0, r1, r) in &rows {
        for &(c0, c1, c) in &cols {
            out.push(BilinearTap {
                taps: [(r0, c0), (r0, c1), (r1, c0), (r1, c1)],
                weights: [(1.0 - r) * (1.0 - c), (1.0 - r) * c, r * (1.0 - c), r * c],
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_resolution_and_patch_size() {
        let pins = [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)];
        // 96 wide, 72 high: every pinpoint loses resolution; 56x56 keeps the most.
        assert_eq!(select_best_resolution((72, 96), &pins), Some((56, 56)));
        assert_eq!(patch_output_size((72, 96), (56, 56)), (42, 56));
        assert_eq!(patch_output_size((100, 20), (84, 28)), (84, 17));
    }

    #[test]
    fn token_counts_match_the_processor() {
        // transformers' processors on the fixtures (tests/vision_anyres.rs checks more live).
        let next = [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)];
        assert_eq!(
            image_tokens(AnyResKind::Next, (72, 96), &next, 28, 4, 9).unwrap(),
            16 + 6 * 9
        );
        let mut ov = Vec::new();
        for h in 1..=6 {
            for w in 1..=6 {
                ov.push((28 * h, 28 * w));
            }
        }
        // 3x4 tiles -> 12x16 grid, ratio sqrt(192 / 144) > 1.1 -> 10x13, plus newlines.
        assert_eq!(
            image_tokens(AnyResKind::OneVision, (72, 96), &ov, 28, 4, 9).unwrap(),
            16 + 10 * 14
        );
    }

    #[test]
    fn unpad_rounding() {
        // 49x49 on a 16x8 grid: 49 * (8 / 49) is 7.999... (mlx-vlm: 7, transformers: 8).
        assert_eq!(Unpad::Truncate.apply(49.0 * (8.0 / 49.0)), 7);
        assert_eq!(Unpad::Round7.apply(49.0 * (8.0 / 49.0)), 8);
        assert_eq!(
            unpad_window((72, 96), (12, 16), Unpad::Round7),
            (0, 0, 12, 16)
        );
        assert_eq!(
            unpad_window((20, 100), (8, 16), Unpad::Round7),
            (2, 0, 4, 16)
        );
    }

    #[test]
    fn processor_and_packing_counts_can_disagree() {
        let mut ov = Vec::new();
        for h in 1..=6 {
            for w in 1..=6 {
                ov.push((28 * h, 28 * w));
            }
        }
        let count = |size, rounding| {
            Layout::new(size, &ov, 28, 4, rounding, Some(9))
                .unwrap()
                .tokens()
        };
        // 110 high, 176 wide on a 16x24 grid: 110 * (24 / 176) is 14.999..., so the unpadded grid
        // keeps 14 rows (truncated; padding 1) or 16 (rounded to 15; padding 0).
        assert_ne!(
            count((110, 176), Unpad::Truncate),
            count((110, 176), Unpad::Round7)
        );
        assert_eq!(
            count((72, 96), Unpad::Truncate),
            count((72, 96), Unpad::Round7)
        );
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(py_floordiv(12.0, 1.1547005383792515), 10.0);
        assert_eq!(py_floordiv(16.0, 1.1547005383792515), 13.0);
        assert_eq!(py_floordiv(1.0, 0.1), 9.0); // Python: 1 // 0.1 == 9.0
    }

    #[test]
    fn bilinear_weights_sum_to_one() {
        for t in bilinear_plan((12, 16), (10, 13)) {
            let s: f32 = t.weights.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{t:?}");
        }
    }
}
