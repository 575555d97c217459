//! Our image preprocessing (`vlm_convert::verify::image`) against transformers' image processors as
//! `AutoImageProcessor` runs them without torch (the PIL/numpy backend), live through
//! `tests/py/image_processor.py` in the CI venv, for every fixture whose processor we support:
//!
//! - the built-in synthetic image (handed to Python as a PNG): the same decoded pixels, so the
//!   pixel values must be equal (our resampler is Pillow's fixed-point one);
//! - `fixtures/images/photo.jpg` (a JPEG, decoded on each side by a different decoder): the decoded
//!   pixels may differ by a few levels; preprocessing our decoded pixels must still match exactly, and
//!   the end-to-end difference is reported.
//!
//! Each comparison prints `image-preprocess <arch> <image> max|diff| ...` (run with `--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::path::Path;

use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::{ImageProcessor, RgbImage};

/// transformers' pixel values for `image` with the fixture `arch`'s processor: (pixel values, the RGB
/// pixels PIL decoded).
fn transformers_pixels(arch: &str, image: &Path, tmp: &Path) -> (Vec<f32>, Vec<u8>) {
    let out = tmp.join(format!("{arch}-px.safetensors"));
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/image_processor.py"))
        .args([
            "--model",
            s(&fixture(arch)),
            "--image",
            s(image),
            "--out",
            s(&out),
        ])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "image_processor.py {arch}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let f = SafetensorsFile::open(&out).unwrap();
    let px = f.data(&f.tensors["pixel_values"]);
    let px = px
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (px, f.data(&f.tensors["rgb"]).to_vec())
}

fn matches_transformers(arch: &str) {
    let t = tempfile::tempdir().unwrap();
    let proc = ImageProcessor::from_dir(&fixture(arch)).unwrap();

    // 1. The synthetic image: identical input pixels, so identical output.
    let synth = RgbImage::synthetic();
    let png = t.path().join("synthetic.png");
    synth.save_png(&png).unwrap();
    let (want, rgb) = transformers_pixels(arch, &png, t.path());
    assert_eq!(rgb, synth.data, "PIL reads back the PNG we wrote");
    let ours = proc.preprocess(&synth).unwrap();
    let d = max_abs_diff(&ours.data, &want);
    eprintln!(
        "image-preprocess {arch:10} synthetic {:?} max|diff| {d:.3e}",
        ours.shape()
    );
    assert_eq!(d, 0.0, "{arch}: synthetic image preprocessing differs");

    // 2. A JPEG photo: decoders may differ; preprocessing of our decoded pixels must not.
    let jpg = root().join("fixtures/images/photo.jpg");
    let decoded = RgbImage::open(&jpg).unwrap();
    let (want, pil_rgb) = transformers_pixels(arch, &jpg, t.path());
    assert_eq!(pil_rgb.len(), decoded.data.len());
    let decode_diff = decoded
        .data
        .iter()
        .zip(&pil_rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    let same_input = RgbImage::new(decoded.width, decoded.height, pil_rgb).unwrap();
    let d_pre = max_abs_diff(&proc.preprocess(&same_input).unwrap().data, &want);
    let d_all = max_abs_diff(&proc.preprocess(&decoded).unwrap().data, &want);
    eprintln!(
        "image-preprocess {arch:10} photo.jpg decode max|diff| {decode_diff}/255, preprocess (PIL's \
         pixels) {d_pre:.3e}, end to end {d_all:.3e}"
    );
    assert_eq!(d_pre, 0.0, "{arch}: photo preprocessing differs");
    // JPEG decoders may round the IDCT and chroma upsampling differently: a few levels, i.e. a few
    // 1/255 steps divided by the std (0.26 to 0.5).
    assert!(
        decode_diff <= 8,
        "{arch}: JPEG decoders differ by {decode_diff}"
    );
    assert!(d_all <= 8.0 / 255.0 / 0.26, "{arch}: end to end {d_all}");
}

#[test]
fn llava() {
    matches_transformers("llava");
}

#[test]
fn paligemma() {
    matches_transformers("paligemma");
}

#[test]
fn gemma3() {
    matches_transformers("gemma3");
}

#[test]
fn unsupported_processors_say_so() {
    for arch in ["qwen2_vl", "llava_next", "idefics3"] {
        let e = ImageProcessor::from_dir(&fixture(arch)).unwrap_err();
        assert!(
            matches!(e, vlm_convert::verify::VerifyError::Unsupported(_)),
            "{arch}: {e}"
        );
    }
}

#[test]
fn bad_image_files_are_errors() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("x.png");
    std::fs::write(&p, b"not an image").unwrap();
    assert!(RgbImage::open(&p).is_err());
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    assert!(RgbImage::open(&p).is_err());
    assert!(RgbImage::open(&t.path().join("missing.png")).is_err());
}

/// `fixtures/images/synthetic.png` is the built-in image, for Python tools (`scripts/reference_logits.py
/// --image`) that need the same pixels. `VLM_CONVERT_BLESS=1` rewrites it.
#[test]
fn synthetic_png_is_the_builtin_image() {
    let path = root().join("fixtures/images/synthetic.png");
    if std::env::var_os("VLM_CONVERT_BLESS").is_some() {
        RgbImage::synthetic().save_png(&path).unwrap();
    }
    assert_eq!(RgbImage::open(&path).unwrap(), RgbImage::synthetic());
}
