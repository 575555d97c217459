//! Images for image prompts: decoding ([`RgbImage::open`], PNG and JPEG through the `image` crate), a
//! built-in synthetic test image ([`RgbImage::synthetic`]), and the checkpoint's own preprocessing
//! ([`ImageProcessor`], read from `preprocessor_config.json`) producing the `pixel_values` the vision
//! tower takes.
//!
//! The reference is transformers 5's image processors as they run without torch (the PIL/numpy
//! backend `AutoImageProcessor` picks then): convert to RGB (transparency composited onto white),
//! resize with PIL's resampling on 8-bit pixels, center crop, `x.f64 * rescale_factor -> f32`,
//! `(x - mean) / std` in float32, channel-first. [`resize`] reproduces Pillow's fixed-point separable
//! resampler (`libImaging/Resample.c`) exactly, so for the same decoded pixels the output is the same
//! bytes; what can differ is JPEG decoding (the `image` crate's decoder vs libjpeg, a few levels of 255
//! on some pixels).
//!
//! Covered processors: CLIP (LLaVA), SigLIP (PaliGemma) and Gemma 3 without pan-and-scan. The steps
//! are public so processors with their own policies (Qwen2-VL's dynamic resolution, LLaVA-NeXT's tiles)
//! can reuse them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::weights::read_json;
use super::{Result, VerifyError};

/// An 8-bit RGB image, row-major `height x width x 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// `width x height` pixels from `data` (`height * width * 3` bytes).
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if width == 0
            || height == 0
            || width.checked_mul(height).and_then(|n| n.checked_mul(3)) != Some(data.len())
        {
            return Err(VerifyError::BadInput(format!(
                "{} bytes are not a {width}x{height} RGB image",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// Decodes a PNG or JPEG file. Transparency is composited onto white as transformers'
    /// `convert_to_rgb` does (PIL `alpha_composite` arithmetic); grey images are replicated to RGB.
    pub fn open(path: &Path) -> Result<RgbImage> {
        let bytes = std::fs::read(path).map_err(|e| crate::Error::read(path, e))?;
        let bad = |msg: String| VerifyError::BadInput(format!("{}: {msg}", path.display()));
        let format = image::guess_format(&bytes)
            .map_err(|e| bad(format!("not a PNG or JPEG image ({e})")))?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
            return Err(bad(format!(
                "{format:?} images are not supported; use PNG or JPEG"
            )));
        }
        let img = image::load_from_memory_with_format(&bytes, format)
            .map_err(|e| bad(format!("cannot decode: {e}")))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if img.color().has_alpha() {
            let rgba = img.into_rgba8().into_raw();
            let mut out = Vec::with_capacity(w * h * 3);
            for px in rgba.chunks_exact(4) {
                out.extend(composite_on_white(px));
            }
            RgbImage::new(w, h, out)
        } else {
            RgbImage::new(w, h, img.into_rgb8().into_raw())
        }
    }

    /// Writes the image as a PNG (for handing it to other tools, e.g. a Python reference).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let buf =
            image::RgbImage::from_raw(self.width as u32, self.height as u32, self.data.clone())
                .ok_or_else(|| VerifyError::BadInput("image buffer of the wrong size".into()))?;
        buf.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| {
                VerifyError::BadInput(format!("{}: cannot write PNG: {e}", path.display()))
            })
    }

    /// The built-in test image: 96x72, deterministic, made of what a vision bug changes visibly —
    /// gradients in each channel along different axes, a disc, a bar, a checkerboard corner (high
    /// frequencies, so the resampling filter matters) and nothing symmetric (so a transposed or
    /// flipped patch layout sees different pixels). Not square, so the resize and crop policies run.
    pub fn synthetic() -> RgbImage {
        let (w, h) = (96usize, 72usize);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let mut r = (x * 255 / (w - 1)) as u8;
                let mut g = (y * 255 / (h - 1)) as u8;
                let mut b = ((x * 3 + y * 5) % 256) as u8;
                // A disc, off-centre.
                let (dx, dy) = (x as i64 - 30, y as i64 - 40);
                if dx * dx + dy * dy <= 18 * 18 {
                    (r, g, b) = (230, 40 + (y as u8 % 16) * 4, 60);
                }
                // A bar, top right.
                if (60..88).contains(&x) && (8..20).contains(&y) {
                    (r, g, b) = (20, 20, 200);
                }
                // A checkerboard of 2-pixel squares, bottom right.
                if x >= 70 && y >= 50 && ((x / 2) + (y / 2)) % 2 == 0 {
                    (r, g, b) = (255, 255, 255);
                }
                data.extend([r, g, b]);
            }
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }
}

/// One RGBA pixel over an opaque white background, as PIL's `alpha_composite` computes it (7-bit
/// fixed point, division by 255 through shifts).
fn composite_on_white(px: &[u8]) -> [u8; 3] {
    let a = u32::from(px[3]);
    if a == 0 {
        return [255, 255, 255];
    }
    const BITS: u32 = 7;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let mut out = [0u8; 3];
    for (o, &c) in out.iter_mut().zip(px) {
        let t = u32::from(c) * coef1 + 255 * coef2 + (0x80 << BITS);
        *o = ((((t >> 8) + t) >> 8) >> BITS) as u8;
    }
    out
}

/// PIL's resampling filters (`resample` in preprocessor_config.json: PIL's enum values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// From PIL's numbering (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
    pub fn from_pil(code: u64) -> Option<Resample> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// (support, kernel) as in Pillow's `Resample.c`.
    fn filter(self) -> (f64, fn(f64) -> f64) {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Resample::Box => (0.5, |x| if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 }),
            Resample::Bilinear => (1.0, |x| {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }),
            Resample::Hamming => (1.0, |x| {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }),
            Resample::Bicubic => (2.0, |x| {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }),
            Resample::Lanczos => (3.0, |x| {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }),
            // Handled separately (no kernel).
            Resample::Nearest => (0.0, |_| 0.0),
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampler (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Per output pixel: first input index, and fixed-point weights (Pillow's `precompute_coeffs` followed
/// by `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<(usize, Vec<i32>)> {
    let (support, kernel) = filter.filter();
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // `(int)` truncates toward zero, as in C.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| kernel((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let s = v * f64::from(1u32 << PRECISION_BITS);
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `width x height` exactly as Pillow's `Image.resize` does for an RGB image (no
/// `reducing_gap`): a horizontal then a vertical pass of the filter, each rounded to 8 bits.
pub fn resize(img: &RgbImage, width: usize, height: usize, filter: Resample) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(VerifyError::BadInput(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    if (width, height) == (img.width, img.height) {
        return Ok(img.clone());
    }
    if filter == Resample::Nearest {
        return Ok(resize_nearest(img, width, height));
    }
    // Two separable passes in Pillow's order: horizontal first, except that Pillow 13 runs the
    // vertical pass first when the height shrinks by more than twice what the width shrinks
    // (`ImagingResampleInner` in Pillow 13.0.0's Resample.c; a growing width counts as a negative
    // shrink). The order changes the rounding between the passes, so it matters for byte-identical
    // pixels (tests/qwen_vision.rs, tests/vision_idefics.rs).
    let dy = img.height as i64 - height as i64;
    let dx = img.width as i64 - width as i64;
    let vertical_first = dy > 0 && dy > 2 * dx;
    let mut cur = img.clone();
    if vertical_first {
        cur = resize_vertical(&cur, height, filter);
    }
    if width != cur.width {
        cur = resize_horizontal(&cur, width, filter);
    }
    if height != cur.height {
        cur = resize_vertical(&cur, height, filter);
    }
    Ok(cur)
}

/// Pillow's horizontal pass (8-bit fixed point, rounded and clipped per pixel).
fn resize_horizontal(cur: &RgbImage, width: usize, filter: Resample) -> RgbImage {
    let coeffs = coefficients(cur.width, width, filter);
    let mut out = Vec::with_capacity(width * cur.height * 3);
    for y in 0..cur.height {
        let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
        for (xmin, k) in &coeffs {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    acc += i64::from(row[(xmin + i) * 3 + c]) * i64::from(kv);
                }
                out.push(clip8(acc));
            }
        }
    }
    RgbImage {
        width,
        height: cur.height,
        data: out,
    }
}

/// Pillow's vertical pass.
fn resize_vertical(cur: &RgbImage, height: usize, filter: Resample) -> RgbImage {
    let coeffs = coefficients(cur.height, height, filter);
    let stride = cur.width * 3;
    let mut out = Vec::with_capacity(stride * height);
    for (ymin, k) in &coeffs {
        for xc in 0..stride {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kv) in k.iter().enumerate() {
                acc += i64::from(cur.data[(ymin + i) * stride + xc]) * i64::from(kv);
            }
            out.push(clip8(acc));
        }
    }
    RgbImage {
        width: cur.width,
        height,
        data: out,
    }
}
/// A processor's per-channel setting (`image_mean`, `image_std`): one number for all three channels
/// or a list of three; `default` when absent. `Err` holds the message.
pub(crate) fn channel_triple(
    v: Option<&Value>,
    key: &str,
    default: [f32; 3],
) -> std::result::Result<[f32; 3], String> {
    match v {
        None => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| format!("`{key}` holds a non-number"))?
                    as f32;
            }
            Ok(out)
        }
        Some(x) => Err(format!("`{key}` is {x}, expected a number or a list of 3")),
    }
}

/// The image processor settings of a checkpoint directory and the file they came from:
/// `preprocessor_config.json`, else the `image_processor` entry of `processor_config.json`.
pub(crate) fn processor_config(dir: &Path) -> Result<(PathBuf, Value)> {
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        let v = read_json(&pre)?;
        return Ok((pre, v));
    }
    let proc_path = dir.join("processor_config.json");
    if !proc_path.exists() {
        return Err(VerifyError::Unsupported(format!(
            "{}: no preprocessor_config.json or processor_config.json, so the image preprocessing \
             is unknown",
            dir.display()
        )));
    }
    let v = read_json(&proc_path)?;
    let ip = v.get("image_processor").cloned().ok_or_else(|| {
        VerifyError::Unsupported(format!(
            "{}: no `image_processor` entry",
            proc_path.display()
        ))
    })?;
    Ok((proc_path, ip))
}

/// Pillow's nearest-neighbour resize: source pixel `floor((x + 0.5) * in / out)`.
fn resize_nearest(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let sx = img.width as f64 / width as f64;
    let sy = img.height as f64 / height as f64;
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let iy = (((y as f64 + 0.5) * sy) as usize).min(img.height - 1);
        for x in 0..width {
            let ix = (((x as f64 + 0.5) * sx) as usize).min(img.width - 1);
            let p = (iy * img.width + ix) * 3;
            data.extend_from_slice(&img.data[p..p + 3]);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// transformers' `center_crop`: the centred `width x height` window (offsets rounded down), padded
/// with zeros where the image is smaller.
pub fn center_crop(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let top = (img.height as i64 - height as i64).div_euclid(2);
    let left = (img.width as i64 - width as i64).div_euclid(2);
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            let d = (y * width + x) * 3;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// Preprocessed pixels: `[1, 3, height, width]` float32, row-major (channel-first).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl PixelValues {
    pub fn shape(&self) -> [usize; 4] {
        [1, 3, self.height, self.width]
    }
}

/// How the resize target is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizePolicy {
    /// Exactly `width x height` (SigLIP, Gemma 3).
    Fixed { width: usize, height: usize },
    /// The shorter edge becomes `edge`, the longer scaled and truncated (CLIP).
    ShortestEdge { edge: usize },
}

/// The image processor of a checkpoint, from its `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// `image_processor_type` (e.g. `CLIPImageProcessor`).
    pub kind: String,
    pub resize: Option<ResizePolicy>,
    pub resample: Resample,
    /// `(width, height)` of the center crop, if any.
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    /// Per-channel mean and std, if normalizing.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// Processor types whose whole policy [`ImageProcessor`] implements.
const SUPPORTED: &[&str] = &[
    "CLIPImageProcessor",
    "SiglipImageProcessor",
    "Gemma3ImageProcessor",
];

impl ImageProcessor {
    /// Reads `preprocessor_config.json` in `dir` (else the `image_processor` entry of
    /// `processor_config.json`, transformers 5's layout).
    pub fn from_dir(dir: &Path) -> Result<ImageProcessor> {
        let (path, value) = processor_config(dir)?;
        ImageProcessor::from_config(&value, &path)
    }

    /// Builds the processor from the parsed config; `path` names it in errors.
    pub fn from_config(v: &Value, path: &Path) -> Result<ImageProcessor> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .map(|s| {
                s.trim_end_matches("Fast")
                    .trim_end_matches("Pil")
                    .to_string()
            })
            .ok_or_else(|| err("`image_processor_type` is missing".into()))?;
        if !SUPPORTED.contains(&kind.as_str()) {
            return Err(VerifyError::Unsupported(format!(
                "image processor `{kind}` (image prompts support {})",
                SUPPORTED.join(", ")
            )));
        }
        let flag = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(b) => b
                    .as_bool()
                    .ok_or_else(|| err(format!("`{key}` is {b}, expected true or false"))),
            }
        };
        if kind == "Gemma3ImageProcessor" && flag("do_pan_and_scan", false)? {
            return Err(VerifyError::Unsupported(
                "Gemma 3 pan-and-scan image crops".into(),
            ));
        }
        let size_of = |key: &str| -> Result<Option<ResizePolicy>> {
            let Some(s) = v.get(key).filter(|s| !s.is_null()) else {
                return Ok(None);
            };
            let dim = |k: &str| s.get(k).and_then(Value::as_u64).map(|n| n as usize);
            if let Some(n) = s.as_u64() {
                // A bare number: a square for crops and SigLIP-style sizes; CLIP reads it as the
                // shortest edge (transformers' `get_size_dict(default_to_square=False)`).
                let n = n as usize;
                return Ok(Some(if key == "size" && kind == "CLIPImageProcessor" {
                    ResizePolicy::ShortestEdge { edge: n }
                } else {
                    ResizePolicy::Fixed {
                        width: n,
                        height: n,
                    }
                }));
            }
            match (dim("height"), dim("width"), dim("shortest_edge")) {
                (Some(h), Some(w), _) if h > 0 && w > 0 => Ok(Some(ResizePolicy::Fixed {
                    width: w,
                    height: h,
                })),
                (None, None, Some(e)) if e > 0 && dim("longest_edge").is_none() => {
                    Ok(Some(ResizePolicy::ShortestEdge { edge: e }))
                }
                _ => Err(VerifyError::Unsupported(format!(
                    "{}: `{key}` {s} (supported: height+width, or shortest_edge alone)",
                    path.display()
                ))),
            }
        };
        let resize = if flag("do_resize", true)? {
            Some(size_of("size")?.ok_or_else(|| err("`do_resize` without `size`".into()))?)
        } else {
            None
        };
        let resample = match v.get("resample") {
            None | Some(Value::Null) => match kind.as_str() {
                "Gemma3ImageProcessor" => Resample::Bilinear,
                _ => Resample::Bicubic,
            },
            Some(r) => r.as_u64().and_then(Resample::from_pil).ok_or_else(|| {
                err(format!(
                    "`resample` is {r}, expected a PIL filter number 0-5"
                ))
            })?,
        };
        let crop = if flag("do_center_crop", false)? {
            match size_of("crop_size")? {
                Some(ResizePolicy::Fixed { width, height }) => Some((width, height)),
                _ => {
                    return Err(err(
                        "`do_center_crop` needs `crop_size` with height and width".into(),
                    ))
                }
            }
        } else {
            None
        };
        let rescale = if flag("do_rescale", true)? {
            Some(
                v.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0 / 255.0),
            )
        } else {
            None
        };
        // Required here: these processors always write their mean and std.
        let triple = |key: &str| -> Result<[f32; 3]> {
            match v.get(key) {
                None => Err(err(format!("`{key}` is missing, expected 3 numbers"))),
                x => channel_triple(x, key, [0.0; 3]).map_err(err),
            }
        };
        let normalize = if flag("do_normalize", true)? {
            let (mean, std) = (triple("image_mean")?, triple("image_std")?);
            if std.contains(&0.0) {
                return Err(err("`image_std` has a zero".into()));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(ImageProcessor {
            kind,
            resize,
            resample,
            crop,
            rescale,
            normalize,
        })
    }

    /// The resize target `(width, height)` for an input of `width x height`.
    pub fn target_size(&self, width: usize, height: usize) -> Option<(usize, usize)> {
        match self.resize? {
            ResizePolicy::Fixed { width, height } => Some((width, height)),
            ResizePolicy::ShortestEdge { edge } => {
                // transformers' get_resize_output_image_size: the long side is int(edge * long / short).
                let (short, long) = (width.min(height), width.max(height));
                let new_long = (edge as f64 * long as f64 / short as f64) as usize;
                Some(if width <= height {
                    (edge, new_long)
                } else {
                    (new_long, edge)
                })
            }
        }
    }

    /// Resize, crop, rescale, normalize; channel-first float32.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelValues> {
        let mut img = match self.target_size(img.width, img.height) {
            Some((w, h)) => resize(img, w, h, self.resample)?,
            None => img.clone(),
        };
        if let Some((w, h)) = self.crop {
            img = center_crop(&img, w, h);
        }
        let (w, h) = (img.width, img.height);
        let mut data = vec![0f32; 3 * w * h];
        for c in 0..3 {
            for p in 0..w * h {
                let raw = img.data[p * 3 + c];
                // numpy: `x.astype(f64) * scale` then cast to float32; without rescale, uint8 -> f32.
                let mut x = match self.rescale {
                    Some(s) => (f64::from(raw) * s) as f32,
                    None => f32::from(raw),
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                data[c * w * h + p] = x;
            }
        }
        Ok(PixelValues {
            height: h,
            width: w,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_and_box_downscale() {
        let img = RgbImage::synthetic();
        assert_eq!(resize(&img, 96, 72, Resample::Bicubic).unwrap(), img);
        // A box filter halving a constant image keeps it constant.
        let flat = RgbImage::new(4, 2, vec![77; 24]).unwrap();
        let r = resize(&flat, 2, 1, Resample::Box).unwrap();
        assert_eq!(r.data, vec![77; 6]);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Hamming,
            Resample::Box,
        ] {
            for (i, o) in [(96, 28), (72, 28), (28, 64), (5, 3)] {
                for (_, k) in coefficients(i, o, f) {
                    let s: i64 = k.iter().map(|&v| i64::from(v)).sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{f:?}");
                }
            }
        }
    }

    #[test]
    fn shortest_edge_and_crop() {
        let p = ImageProcessor::from_config(
            &serde_json::json!({
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28},
                "do_center_crop": true, "resample": 3,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
            }),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(p.target_size(96, 72), Some((37, 28)));
        assert_eq!(p.target_size(50, 101), Some((28, 56)));
        let px = p.preprocess(&RgbImage::synthetic()).unwrap();
        assert_eq!(px.shape(), [1, 3, 28, 28]);
        assert!(px.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn unknown_processor_is_unsupported() {
        let e = ImageProcessor::from_config(
            &serde_json::json!({"image_processor_type": "Qwen2VLImageProcessor"}),
            Path::new("x"),
        )
        .unwrap_err();
        assert!(matches!(e, VerifyError::Unsupported(_)), "{e}");
    }

    #[test]
    fn alpha_composite_matches_pil() {
        // PIL: Image.alpha_composite(white, RGBA(100, 0, 255, 128)).convert("RGB") == (177, 127, 255)
        assert_eq!(composite_on_white(&[100, 0, 255, 128]), [177, 127, 255]);
        assert_eq!(composite_on_white(&[9, 8, 7, 255]), [9, 8, 7]);
        assert_eq!(composite_on_white(&[9, 8, 7, 0]), [255, 255, 255]);
    }
}
