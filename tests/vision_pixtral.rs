//! Mistral 3 image prompts (`vlm_convert::verify::PixtralVision`, `PixtralImageProcessor`, the
//! `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` prompt) against the references, on the `mistral3` fixture:
//!
//! 1. pixel values, image size and prompt ids against transformers' `PixtralProcessor` over its PIL
//!    image processor (`tests/py/pixtral_processor.py`, CI venv), for images of several shapes;
//! 2. image features, merged embeddings and logits against mlx-vlm's forward of the same converted
//!    directory (`tests/py/mlx_vlm_image.py --image-sizes`), bf16 and 4-bit conversions, each in
//!    native precision and in float32;
//! 3. float32 logits and greedy tokens against transformers' float32 forward of the source
//!    (`fixtures/golden/reference/mistral3.image.safetensors`, made by `scripts/reference_logits.py
//!    --image fixtures/images/synthetic.png --new-tokens 4` in the reference venv).
//!
//! Each comparison prints `vision-pixtral ...` (`--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use vlm_convert::mlx::{Array, Dtype};
use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::{PixelValues, RgbImage};
use vlm_convert::verify::prompt::PromptBuilder;
use vlm_convert::verify::{
    ImagePrompt, Pixels, PixtralImageProcessor, Precision, TextModel, VerifyError, Vision,
};

const ARCH: &str = "mistral3";
const TEXT: &str = "Describe the image.";

fn read_i64(file: &SafetensorsFile, name: &str) -> Vec<i64> {
    file.data(&file.tensors[name])
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn config(dir: &Path) -> serde_json::Value {
    read_json(&dir.join("config.json"))
}

/// `w x h` pixels of the synthetic image from `(x0, y0)`.
fn crop(x0: usize, y0: usize, w: usize, h: usize) -> RgbImage {
    let src = RgbImage::synthetic();
    let mut data = Vec::with_capacity(w * h * 3);
    for y in y0..y0 + h {
        let row = (y * src.width + x0) * 3;
        data.extend_from_slice(&src.data[row..row + w * 3]);
    }
    RgbImage::new(w, h, data).unwrap()
}

/// The test images: the synthetic one (wide, shrunk), a tall strip (2 x 1 image tokens, so a
/// transposed grid shows) and a small image (grown to one token). The strip keeps its width (14 ->
/// 14): where both sides shrink, Pillow 13 sometimes runs its vertical pass first (20x72 -> 14x28
/// does), which `image::resize` does not model yet (one level of 255 on some pixels).
fn images() -> Vec<(&'static str, RgbImage)> {
    vec![
        ("synthetic", RgbImage::synthetic()),
        ("tall", crop(22, 0, 14, 72)),
        ("small", crop(60, 8, 10, 6)),
    ]
}

/// transformers' processor output for `image` (a PNG/JPEG file) and `text`.
fn transformers_processor(image: &Path, text: &str, out: &Path) -> SafetensorsFile {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/pixtral_processor.py"))
        .args(["--model", s(&fixture(ARCH)), "--image", s(image)])
        .args(["--text", text, "--out", s(out)])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "pixtral_processor.py: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    SafetensorsFile::open(out).unwrap()
}

fn pixtral_pixels(p: &ImagePrompt) -> &PixelValues {
    match &p.pixels {
        Pixels::Pixtral(px) => px,
        other => panic!("not Pixtral pixels: {other:?}"),
    }
}

#[test]
fn preprocessing_and_prompt_match_transformers() {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(ARCH, &dir, &[]);
    let cfg = config(&dir);
    let vision = Vision::load(&dir, Precision::Native).unwrap();
    for (name, img) in images() {
        let png = t.path().join(format!("{name}.png"));
        img.save_png(&png).unwrap();
        for text in [TEXT, "What is in the top right corner? Answer briefly."] {
            let want = transformers_processor(&png, text, &t.path().join("p.safetensors"));
            let ours = vision.prompt(&dir, &cfg, &img, name, text).unwrap();
            let px = pixtral_pixels(&ours);
            let sizes = read_i64(&want, "image_sizes");
            assert_eq!(
                sizes,
                [px.height as i64, px.width as i64],
                "{name}: image size"
            );
            let d = max_abs_diff(&px.data, &read_f32(&want, "pixel_values"));
            let want_ids: Vec<i32> = read_i64(&want, "input_ids")
                .iter()
                .map(|&i| i as i32)
                .collect();
            eprintln!(
                "vision-pixtral {name:9} {}x{} -> {}x{}: pixel values max|diff| {d:.3e}, {} ids",
                img.width,
                img.height,
                px.width,
                px.height,
                ours.ids.len()
            );
            assert_eq!(d, 0.0, "{name}: pixel values");
            assert_eq!(ours.ids, want_ids, "{name} {text:?}: prompt ids");
        }
    }

    // A JPEG: the decoders may differ by a few levels; preprocessing PIL's own pixels must not.
    let jpg = root().join("fixtures/images/photo.jpg");
    let want = transformers_processor(&jpg, TEXT, &t.path().join("jpg.safetensors"));
    let decoded = RgbImage::open(&jpg).unwrap();
    let pil = RgbImage::new(
        decoded.width,
        decoded.height,
        want.data(&want.tensors["rgb"]).to_vec(),
    )
    .unwrap();
    let proc = PixtralImageProcessor::from_dir(&dir, &cfg).unwrap();
    let want_px = read_f32(&want, "pixel_values");
    let d_pre = max_abs_diff(&proc.preprocess(&pil).unwrap().data, &want_px);
    let d_all = max_abs_diff(&proc.preprocess(&decoded).unwrap().data, &want_px);
    eprintln!(
        "vision-pixtral photo.jpg preprocess (PIL's pixels) {d_pre:.3e}, end to end {d_all:.3e}"
    );
    assert_eq!(d_pre, 0.0, "photo preprocessing");
    assert!(d_all <= 8.0 / 255.0 / 0.26, "photo end to end {d_all}");
}

fn save_pixels(px: &PixelValues, path: &Path) {
    let bytes: Vec<u8> = px.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, px.shape().to_vec(), &bytes)
            .unwrap();
    let mut m = HashMap::new();
    m.insert("pixel_values".to_string(), view);
    safetensors::serialize_to_file(&m, None, path).unwrap();
}

fn mlx_vlm(dir: &Path, px: &PixelValues, ids: &[i32], upcast: bool, tmp: &Path) -> SafetensorsFile {
    let pixels = tmp.join("px.safetensors");
    save_pixels(px, &pixels);
    let out = tmp.join("mlx-vlm.safetensors");
    let ids_s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut cmd = std::process::Command::new(python());
    cmd.arg(root().join("tests/py/mlx_vlm_image.py"))
        .args(["--model", s(dir), "--pixels", s(&pixels)])
        .args(["--ids", &ids_s.join(","), "--out", s(&out)])
        .args(["--image-sizes", &format!("{},{}", px.height, px.width)]);
    if upcast {
        cmd.arg("--upcast");
    }
    let res = cmd.output().expect("python runs");
    assert!(
        res.status.success(),
        "mlx_vlm_image.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    SafetensorsFile::open(&out).unwrap()
}

fn to_f32(a: &Array) -> Vec<f32> {
    a.astype(Dtype::F32).unwrap().to_vec_f32().unwrap()
}

#[test]
fn forward_matches_mlx_vlm() {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    for (run_name, flags) in [
        ("bf16", &[][..]),
        (
            "q4g64",
            &["-q", "--q-bits", "4", "--q-group-size", "64"][..],
        ),
    ] {
        let dir = t.path().join(run_name);
        convert_fixture(ARCH, &dir, flags);
        let cfg = config(&dir);
        for precision in [Precision::Native, Precision::Float32] {
            let text = TextModel::load(&dir, precision).unwrap();
            let vision = Vision::load(&dir, precision).unwrap();
            let Vision::Pixtral(pixtral) = &vision else {
                panic!("mistral3 must load the Pixtral vision path");
            };
            for (name, img) in images().into_iter().take(2) {
                let prompt = vision.prompt(&dir, &cfg, &img, name, TEXT).unwrap();
                let px = pixtral_pixels(&prompt);
                let ids = &prompt.ids;
                let theirs = mlx_vlm(&dir, px, ids, precision == Precision::Float32, t.path());
                let input = vision.input(&text, &prompt).unwrap();
                let (logits, _) = text.logits_from_input(ids, &input, false).unwrap();
                let features = to_f32(&pixtral.features(px).unwrap());
                let label = format!("{run_name} {precision:?} {name}");
                for (what, mine, key) in [
                    ("features", features, "image_features"),
                    ("embeds", to_f32(&input.embeds), "inputs_embeds"),
                    ("logits", logits, "logits"),
                ] {
                    let d = max_abs_diff(&mine, &read_f32(&theirs, key));
                    eprintln!("vision-pixtral mlx-vlm {label:24} {what:9} max|diff| {d:.3e}");
                    assert_eq!(d, 0.0, "{label} {what}: not bit-identical to mlx-vlm");
                }
            }
        }
    }
}

#[test]
fn float32_matches_transformers() {
    vlm_convert::mlx::init().unwrap();
    let golden = SafetensorsFile::open(&root().join(format!(
        "fixtures/golden/reference/{ARCH}.image.safetensors"
    )))
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(ARCH, &dir, &[]);
    let cfg = config(&dir);
    let text = TextModel::load(&dir, Precision::Float32).unwrap();
    let vision = Vision::load(&dir, Precision::Float32).unwrap();
    let mut prompt = vision
        .prompt(&dir, &cfg, &RgbImage::synthetic(), "synthetic", TEXT)
        .unwrap();
    let want_ids: Vec<i32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    assert_eq!(prompt.ids, want_ids, "prompt ids");
    // The reference venv has torch, so transformers ran its torchvision image processor there, which
    // resizes differently from PIL (tests/vision_reference.rs): the forwards are compared on the
    // golden's own pixels.
    let want_px = read_f32(&golden, "pixel_values");
    let px = pixtral_pixels(&prompt).clone();
    let d_px = max_abs_diff(&px.data, &want_px);
    eprintln!("vision-pixtral transformers pixel values max|diff| {d_px:.3e}");
    assert!(d_px <= 0.031, "pixel values differ by {d_px}");
    prompt.pixels = Pixels::Pixtral(PixelValues {
        data: want_px,
        ..px
    });

    let input = vision.input(&text, &prompt).unwrap();
    let ids = &prompt.ids;
    let (ours, _) = text.logits_from_input(ids, &input, false).unwrap();
    let want = read_f32(&golden, "logits");
    let vocab = text.vocab_size();
    let argmax = |r: &[f32]| vlm_convert::verify::metrics::argmax(r);
    let top1 = ours
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let d = max_abs_diff(&ours, &want);
    eprintln!(
        "vision-pixtral transformers float32 logits {} tokens: max|diff| {d:.3e}, top-1 {top1}/{}",
        ids.len(),
        ids.len()
    );
    assert!(
        d <= 1e-4,
        "float32 logits differ from transformers by {d:e}"
    );

    let want_gen: Vec<i32> = read_i64(&golden, "generated_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    let (first, gen) = text.greedy_from_input(ids, &input, want_gen.len()).unwrap();
    assert!(
        max_abs_diff(&first, &ours) <= 1e-5,
        "greedy's prompt logits"
    );
    eprintln!("vision-pixtral greedy {gen:?}, transformers {want_gen:?}");
    assert_eq!(gen, want_gen, "greedy continuation");
}

#[test]
fn bad_inputs_are_errors() {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(ARCH, &dir, &[]);
    let cfg = config(&dir);
    let vision = Vision::load(&dir, Precision::Native).unwrap();
    let Vision::Pixtral(pixtral) = &vision else {
        panic!("mistral3 must load the Pixtral vision path");
    };
    // Pixels that are not whole merged patches, and pixels larger than the rotary table.
    for (h, w) in [(21, 28), (42, 28)] {
        let px = PixelValues {
            height: h,
            width: w,
            data: vec![0.0; 3 * h * w],
        };
        let e = pixtral.features(&px).unwrap_err();
        assert!(matches!(e, VerifyError::BadInput(_)), "{e}");
    }
    // The Pixtral placeholder needs the token grid, not a count.
    let b = PromptBuilder::from_dir(&dir, &cfg).unwrap();
    let e = b.image_prompt(TEXT, 4).unwrap_err();
    assert!(matches!(e, VerifyError::Unsupported(_)), "{e}");
    // A patch convolution left in PyTorch's layout is a broken conversion, named.
    edit_patch_conv_layout(&dir);
    let e = Vision::load(&dir, Precision::Native).err().unwrap();
    assert!(e.to_string().contains("patch_conv.weight"), "{e}");
}

/// Rewrites `patch_conv.weight` `[O, kH, kW, C]` as `[O, C, kH, kW]` (the bytes kept: only the shape
/// matters to the loader's check).
fn edit_patch_conv_layout(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let file = SafetensorsFile::open(&p).unwrap();
        let items: Vec<_> = file
            .tensors
            .iter()
            .map(|(n, info)| {
                let mut info = info.clone();
                if n.ends_with("patch_conv.weight") {
                    let s = info.shape.clone();
                    info.shape = vec![s[0], s[3], s[1], s[2]];
                }
                (n.clone(), info, file.data(&file.tensors[n]).to_vec())
            })
            .collect();
        let meta = file.metadata.clone();
        drop(file);
        write_safetensors(&p, &meta, &items);
    }
}
