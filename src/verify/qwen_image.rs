//! Qwen2-VL's image preprocessing (also Qwen2.5-VL's and Qwen3-VL's: all three checkpoints name
//! `Qwen2VLImageProcessor`), as transformers 5's PIL/numpy processor runs it: `smart_resize` to a size
//! both of whose sides are multiples of `patch_size * merge_size` with a pixel count in
//! `[min_pixels, max_pixels]`, the resize itself (Pillow's resampler, [`super::image::resize`]),
//! rescale and normalize (the generic steps of [`super::image::ImageProcessor`]), then the image
//! repeated `temporal_patch_size` times and cut into patches in merge-block order: the
//! `[N, C*T*P*P]` rows and the `(1, h, w)` grid [`super::QwenVision`] takes.

use std::path::Path;

use serde_json::Value;

use super::image::{channel_triple, ImageProcessor, Resample, ResizePolicy, RgbImage};
use super::{Result, VerifyError};

/// transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`, the processor's defaults (its literals, rounded
/// to float32 as numpy rounds them).
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The processor of a Qwen2-VL-family checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenImageProcessor {
    /// `size.shortest_edge` (or `min_pixels`): the least pixel count after resizing.
    pub min_pixels: usize,
    /// `size.longest_edge` (or `max_pixels`): the greatest pixel count after resizing.
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub do_resize: bool,
    pub resample: Resample,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// One preprocessed image: `[t * h * w, 3 * T * P * P]` float32 rows and its grid (in patches).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenPixels {
    pub data: Vec<f32>,
    pub grid_thw: [usize; 3],
}

/// transformers' `smart_resize`: the `(height, width)` to resize to. Sides round to the nearest
/// multiple of `factor` (ties to even, Python's `round`); if that leaves more than `max_pixels` both
/// shrink by `sqrt(h * w / max_pixels)` and round down, if fewer than `min_pixels` both grow by
/// `sqrt(min_pixels / (h * w))` and round up. An aspect ratio above 200 is refused, as there.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(VerifyError::BadInput(format!(
            "cannot resize a {width}x{height} image to multiples of {factor}"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(VerifyError::BadInput(format!(
            "a {width}x{height} image: the aspect ratio must be at most 200 (Qwen2-VL's processor \
             refuses it)"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// Channel-first pixels `[C, H, W]` to patch rows: merge blocks row-major, inside a block its
/// `merge x merge` patches row-major; each row is `[C, T, P, P]` with the frame repeated `T` times
/// (transformers' `patchify`). `H` and `W` must be multiples of `patch * merge`.
pub fn patchify(
    chw: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    patch: usize,
    merge: usize,
    temporal: usize,
) -> Vec<f32> {
    let (gh, gw) = (height / patch, width / patch);
    let row = channels * temporal * patch * patch;
    let mut out = Vec::with_capacity(gh * gw * row);
    for bh in 0..gh / merge {
        for bw in 0..gw / merge {
            for ih in 0..merge {
                for iw in 0..merge {
                    let (y0, x0) = ((bh * merge + ih) * patch, (bw * merge + iw) * patch);
                    for c in 0..channels {
                        let plane = &chw[c * height * width..(c + 1) * height * width];
                        for _ in 0..temporal {
                            for py in 0..patch {
                                let start = (y0 + py) * width + x0;
                                out.extend_from_slice(&plane[start..start + patch]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

impl QwenImageProcessor {
    /// Reads `preprocessor_config.json` in `dir` (else `processor_config.json`'s `image_processor`).
    pub fn from_dir(dir: &Path) -> Result<QwenImageProcessor> {
        let (path, value) = super::image::processor_config(dir)?;
        QwenImageProcessor::from_config(&value, &path)
    }

    /// From the parsed config, with transformers' defaults and precedence: `min_pixels`/`max_pixels`
    /// override `size.shortest_edge`/`size.longest_edge` (older configs spell those `size.min_pixels`
    /// / `size.max_pixels`).
    pub fn from_config(v: &Value, path: &Path) -> Result<QwenImageProcessor> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("Qwen2VLImageProcessor");
        let base = kind.trim_end_matches("Fast").trim_end_matches("Pil");
        if base != "Qwen2VLImageProcessor" {
            return Err(VerifyError::Unsupported(format!(
                "{}: image processor `{kind}` is not Qwen2-VL's",
                path.display()
            )));
        }
        let uint = |x: &Value, key: &str| -> Result<usize> {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("`{key}` is not a whole number")))
        };
        let get = |key: &str| v.get(key).filter(|x| !x.is_null());
        let size = get("size").and_then(Value::as_object);
        let size_key = |names: &[&str]| -> Result<Option<usize>> {
            for n in names {
                if let Some(x) = size.and_then(|s| s.get(*n)).filter(|x| !x.is_null()) {
                    return uint(x, &format!("size.{n}")).map(Some);
                }
            }
            Ok(None)
        };
        let min_pixels = match get("min_pixels") {
            Some(x) => uint(x, "min_pixels")?,
            None => size_key(&["shortest_edge", "min_pixels"])?.unwrap_or(56 * 56),
        };
        let max_pixels = match get("max_pixels") {
            Some(x) => uint(x, "max_pixels")?,
            None => size_key(&["longest_edge", "max_pixels"])?.unwrap_or(28 * 28 * 1280),
        };
        let int_or =
            |key: &str, d: usize| -> Result<usize> { get(key).map_or(Ok(d), |x| uint(x, key)) };
        let flag = |key: &str| get(key).and_then(Value::as_bool).unwrap_or(true);
        let triple = |key: &str, d: [f32; 3]| channel_triple(get(key), key, d).map_err(err);
        let resample = match get("resample") {
            None => Resample::Bicubic,
            Some(x) => {
                let code = uint(x, "resample")? as u64;
                Resample::from_pil(code)
                    .ok_or_else(|| err(format!("`resample` = {code} is not a PIL filter")))?
            }
        };
        let rescale = if flag("do_rescale") {
            Some(
                get("rescale_factor")
                    .map(|x| {
                        x.as_f64()
                            .ok_or_else(|| err("`rescale_factor` is not a number".into()))
                    })
                    .transpose()?
                    .unwrap_or(1.0 / 255.0),
            )
        } else {
            None
        };
        let normalize = if flag("do_normalize") {
            Some((
                triple("image_mean", CLIP_MEAN)?,
                triple("image_std", CLIP_STD)?,
            ))
        } else {
            None
        };
        let p = QwenImageProcessor {
            min_pixels,
            max_pixels,
            patch_size: int_or("patch_size", 14)?,
            temporal_patch_size: int_or("temporal_patch_size", 2)?,
            merge_size: int_or("merge_size", 2)?,
            do_resize: flag("do_resize"),
            resample,
            rescale,
            normalize,
        };
        if p.patch_size == 0 || p.temporal_patch_size == 0 || p.merge_size == 0 {
            return Err(err(
                "patch_size, temporal_patch_size and merge_size must be positive".into(),
            ));
        }
        if p.min_pixels > p.max_pixels {
            return Err(err(format!(
                "min_pixels {} is above max_pixels {}",
                p.min_pixels, p.max_pixels
            )));
        }
        Ok(p)
    }

    /// `patch_size * merge_size`: both sides of a resized image are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The `(height, width)` an image of `height x width` is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        smart_resize(
            height,
            width,
            self.factor(),
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Resize, rescale, normalize, patchify one image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<QwenPixels> {
        let (h, w) = if self.do_resize {
            self.target_size(img.height, img.width)?
        } else {
            (img.height, img.width)
        };
        if h % self.factor() != 0 || w % self.factor() != 0 {
            return Err(VerifyError::BadInput(format!(
                "a {}x{} image without resizing is not a multiple of {} pixels per side",
                img.width,
                img.height,
                self.factor()
            )));
        }
        // The generic steps: an exact-size resize with no crop, then rescale and normalize.
        let generic = ImageProcessor {
            kind: "Qwen2VLImageProcessor".into(),
            resize: self.do_resize.then_some(ResizePolicy::Fixed {
                width: w,
                height: h,
            }),
            resample: self.resample,
            crop: None,
            rescale: self.rescale,
            normalize: self.normalize,
        };
        let px = generic.preprocess(img)?;
        let data = patchify(
            &px.data,
            3,
            px.height,
            px.width,
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
        );
        Ok(QwenPixels {
            data,
            grid_thw: [1, px.height / self.patch_size, px.width / self.patch_size],
        })
    }

    /// Several images, their rows concatenated in order (the `pixel_values` of one prompt).
    pub fn preprocess_all(&self, imgs: &[RgbImage]) -> Result<(Vec<f32>, Vec<[usize; 3]>)> {
        let mut data = Vec::new();
        let mut grids = Vec::with_capacity(imgs.len());
        for img in imgs {
            let p = self.preprocess(img)?;
            data.extend(p.data);
            grids.push(p.grid_thw);
        }
        Ok((data, grids))
    }

    /// How many image tokens an image of this grid becomes in the prompt.
    pub fn image_tokens(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw[0] * grid_thw[1] * grid_thw[2] / (self.merge_size * self.merge_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_like_transformers() {
        // Values computed with transformers' smart_resize (factor 28, default pixel range).
        let (min, max) = (56 * 56, 28 * 28 * 1280);
        assert_eq!(smart_resize(72, 96, 28, min, max).unwrap(), (84, 84));
        assert_eq!(smart_resize(1000, 2000, 28, min, max).unwrap(), (700, 1400));
        assert_eq!(smart_resize(10, 12, 28, min, max).unwrap(), (56, 84));
        // ties round to even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2
        assert_eq!(smart_resize(42, 70, 28, 0, max).unwrap(), (56, 56));
        assert!(smart_resize(1, 300, 28, min, max).is_err());
        assert!(smart_resize(0, 3, 28, min, max).is_err());
    }

    #[test]
    fn patchify_order() {
        // 1 channel, 4 x 4 pixels, patch 1, merge 2, T 2: blocks (0,0),(0,1),(1,0),(1,1).
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let p = patchify(&img, 1, 4, 4, 1, 2, 2);
        let firsts: Vec<f32> = p.chunks(2).map(|r| r[0]).collect();
        assert_eq!(
            firsts,
            [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
        );
        assert!(p.chunks(2).all(|r| r[0] == r[1]), "frames repeat");
    }

    #[test]
    fn config_precedence_and_defaults() {
        let p = QwenImageProcessor::from_config(
            &serde_json::json!({
                "image_processor_type": "Qwen2VLImageProcessorFast",
                "size": {"shortest_edge": 100, "longest_edge": 5000},
                "max_pixels": 4000, "patch_size": 8
            }),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (100, 4000));
        assert_eq!(
            (p.patch_size, p.merge_size, p.temporal_patch_size),
            (8, 2, 2)
        );
        assert_eq!(p.resample, Resample::Bicubic);
        assert_eq!(p.normalize, Some((CLIP_MEAN, CLIP_STD)));
        let e = QwenImageProcessor::from_config(
            &serde_json::json!({"image_processor_type": "CLIPImageProcessor"}),
            Path::new("x"),
        );
        assert!(matches!(e, Err(VerifyError::Unsupported(_))));
    }
}
