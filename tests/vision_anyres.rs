//! LLaVA-NeXT and LLaVA-OneVision image prompts (any-res tiles, `vlm_convert::verify::anyres`):
//! - preprocessing and prompt ids against transformers' processor with its PIL image processor
//!   (`tests/py/anyres_mlx_vlm.py processor`, CI venv) on images of several shapes: pixels exactly
//!   equal, ids equal;
//! - our forward (tiles through the tower, projector, packing, merge, language model) against
//!   mlx-vlm's on the same converted directory (`tests/py/anyres_mlx_vlm.py forward`): the checkpoint's
//!   dtype and 4-bit g64 conversions, each in native precision and in float32 (`--upcast`).
//!   LLaVA-NeXT's reference is assembled from mlx-vlm's own pieces, because mlx-vlm 0.7.10's
//!   LLaVA-NeXT forward does not pack the tiles (see the script and `src/verify/anyres.rs`);
//! - our float32 logits against transformers' float32 forward of the source checkpoint
//!   (`fixtures/golden/reference/<arch>.image.safetensors`, made by `tests/py/anyres_golden.py`:
//!   `scripts/reference_logits.py` with the PIL image processor).
//!
//! Prints `anyres <arch> ... max|diff| ...` (`--nocapture`). Measured on the fixtures: pixels exact on
//! the synthetic image (elsewhere one or two 8-bit levels on some pixels, see below), ids equal at
//! every size; features, embeddings and logits bit-identical to mlx-vlm's; float32 logits within
//! 4.1e-6 (LLaVA-NeXT, 97 tokens) and 5.6e-6 (OneVision, 182 tokens, including mlx-vlm's bilinear
//! downsampling where transformers calls torch's `interpolate`) of transformers', top-1 and greedy
//! tokens equal.
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use vlm_convert::mlx::{Array, Dtype};
use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::anyres::AnyResPixels;
use vlm_convert::verify::image::{resize, Resample, RgbImage};
use vlm_convert::verify::{ImagePrompt, Pixels, Precision, TextModel, Vision};

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

fn py(args: &[&str]) {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/anyres_mlx_vlm.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "anyres_mlx_vlm.py {args:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Test images: the synthetic one, and resized copies that tile differently (tall, wide, small,
/// large), written as PNG.
fn images(dir: &Path) -> Vec<(String, RgbImage)> {
    let base = RgbImage::synthetic();
    let mut out = vec![("synthetic".to_string(), base.clone())];
    for (w, h) in [(40, 110), (200, 50), (20, 17), (230, 190)] {
        out.push((
            format!("{w}x{h}"),
            resize(&base, w, h, Resample::Bilinear).unwrap(),
        ));
    }
    for (name, img) in &out {
        img.save_png(&dir.join(format!("{name}.png"))).unwrap();
    }
    out
}

fn tiles(p: &ImagePrompt) -> &AnyResPixels {
    match &p.pixels {
        Pixels::AnyRes(px) => px,
        other => panic!("not any-res pixels: {other:?}"),
    }
}

fn preprocess_and_ids(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(arch, &dir, &[]);
    let cfg = config(&dir);
    let vision = Vision::load(&dir, Precision::Native).unwrap();
    for (name, img) in images(t.path()) {
        let out = t.path().join(format!("{name}.safetensors"));
        let png = t.path().join(format!("{name}.png"));
        py(&[
            "processor",
            "--model",
            s(&fixture(arch)),
            "--image",
            s(&png),
            "--text",
            TEXT,
            "--out",
            s(&out),
        ]);
        let want = SafetensorsFile::open(&out).unwrap();
        let prompt = vision.prompt(&dir, &cfg, &img, &name, TEXT).unwrap();
        let px = tiles(&prompt);
        let want_px = read_f32(&want, "pixel_values");
        assert_eq!(
            want.tensors["pixel_values"].shape,
            px.shape().to_vec(),
            "{arch} {name}: tiles"
        );
        let d = max_abs_diff(&px.data, &want_px);
        let sizes = read_i64(&want, "image_sizes");
        assert_eq!(
            (sizes[0] as usize, sizes[1] as usize),
            px.image_size,
            "{arch} {name}: image size"
        );
        let want_ids: Vec<i32> = read_i64(&want, "input_ids")
            .iter()
            .map(|&i| i as i32)
            .collect();
        eprintln!(
            "anyres {arch:15} {name:9} {} tiles, pixels max|diff| {d:.1e}, {} ids ({} image tokens)",
            px.tiles,
            want_ids.len(),
            prompt.ids.iter().filter(|&&i| i == image_token(&cfg)).count()
        );
        // Exact on every shape: `verify::image::resize` orders its two passes as Pillow 13 does.
        assert_eq!(d, 0.0, "{arch} {name}: pixel values differ by {d}");
        assert_eq!(prompt.ids, want_ids, "{arch} {name}: prompt ids");
    }
}

fn image_token(cfg: &serde_json::Value) -> i32 {
    cfg["image_token_index"].as_i64().unwrap() as i32
}

#[test]
fn llava_next_preprocess_and_ids() {
    preprocess_and_ids("llava_next");
}

#[test]
fn llava_onevision_preprocess_and_ids() {
    preprocess_and_ids("llava_onevision");
}

fn save_tiles(px: &AnyResPixels, path: &Path) {
    let bytes: Vec<u8> = px.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, px.shape().to_vec(), &bytes)
            .unwrap();
    let mut m = HashMap::new();
    m.insert("pixel_values".to_string(), view);
    safetensors::serialize_to_file(&m, None, path).unwrap();
}

struct Ours {
    features: Vec<f32>,
    embeds: Vec<f32>,
    logits: Vec<f32>,
}

fn ours(dir: &Path, precision: Precision, prompt: &ImagePrompt) -> Ours {
    let text = TextModel::load(dir, precision).unwrap();
    let vision = Vision::load(dir, precision).unwrap();
    let Vision::AnyRes(v) = &vision else {
        panic!("not an any-res vision path")
    };
    let to_f32 = |a: &Array| a.astype(Dtype::F32).unwrap().to_vec_f32().unwrap();
    let features = to_f32(&v.features(tiles(prompt)).unwrap());
    let input = vision.input(&text, prompt).unwrap();
    let (logits, _) = text.logits_from_input(&prompt.ids, &input, false).unwrap();
    Ours {
        features,
        embeds: to_f32(&input.embeds),
        logits,
    }
}

/// Max |diff| against mlx-vlm in the model's own dtype and in float32; bit-identical is expected
/// (the limits only keep a failure readable).
const NATIVE_TOL: f32 = 2e-2;
const F32_TOL: f32 = 1e-4;

fn forward_matches_mlx_vlm(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let all = images(t.path());
    for (run_name, flags, pictures) in [
        ("plain", &[][..], &all[..]),
        (
            "q4g64",
            &["-q", "--q-bits", "4", "--q-group-size", "64"][..],
            &all[..2],
        ),
    ] {
        let dir = t.path().join(run_name);
        convert_fixture(arch, &dir, flags);
        let cfg = config(&dir);
        for (name, img) in pictures {
            let prompt = Vision::load(&dir, Precision::Native)
                .unwrap()
                .prompt(&dir, &cfg, img, name, TEXT)
                .unwrap();
            let px = tiles(&prompt);
            let pixels = t.path().join(format!("{run_name}-{name}-px.safetensors"));
            save_tiles(px, &pixels);
            let ids: Vec<String> = prompt.ids.iter().map(|i| i.to_string()).collect();
            let size = format!("{},{}", px.image_size.0, px.image_size.1);
            for (precision, upcast, tol) in [
                (Precision::Native, false, NATIVE_TOL),
                (Precision::Float32, true, F32_TOL),
            ] {
                let out = t
                    .path()
                    .join(format!("{run_name}-{name}-{upcast}.safetensors"));
                let mut args: Vec<String> = [
                    "forward",
                    "--model",
                    s(&dir),
                    "--pixels",
                    s(&pixels),
                    "--image-size",
                    &size,
                    "--ids",
                    &ids.join(","),
                    "--out",
                    s(&out),
                ]
                .iter()
                .map(|a| a.to_string())
                .collect();
                if upcast {
                    args.push("--upcast".into());
                }
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                py(&refs);
                let theirs = SafetensorsFile::open(&out).unwrap();
                let o = ours(&dir, precision, &prompt);
                let label = format!("{run_name} {name} {precision:?}");
                for (what, mine, key) in [
                    ("features", &o.features, "image_features"),
                    ("embeds", &o.embeds, "inputs_embeds"),
                    ("logits", &o.logits, "logits"),
                ] {
                    let want = read_f32(&theirs, key);
                    assert_eq!(mine.len(), want.len(), "{arch} {label} {what}: sizes");
                    let d = max_abs_diff(mine, &want);
                    eprintln!("anyres {arch:15} {label:28} {what:8} max|diff| {d:.3e}");
                    assert!(d <= tol, "{arch} {label} {what}: {d:e} > {tol:e}");
                }
            }
        }
    }
}

#[test]
fn llava_next_matches_mlx_vlm() {
    forward_matches_mlx_vlm("llava_next");
}

#[test]
fn llava_onevision_matches_mlx_vlm() {
    forward_matches_mlx_vlm("llava_onevision");
}

/// Float32 logits of the image prompt (the synthetic image) against transformers' float32 forward.
fn against_transformers(arch: &str, tol: f32) {
    vlm_convert::mlx::init().unwrap();
    let golden = SafetensorsFile::open(&root().join(format!(
        "fixtures/golden/reference/{arch}.image.safetensors"
    )))
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(arch, &dir, &[]);
    let cfg = config(&dir);
    let text = TextModel::load(&dir, Precision::Float32).unwrap();
    let vision = Vision::load(&dir, Precision::Float32).unwrap();
    let prompt = vision
        .prompt(&dir, &cfg, &RgbImage::synthetic(), "synthetic", TEXT)
        .unwrap();
    // The golden was made with the PIL image processor, which ours matches exactly.
    if golden.tensors.contains_key("pixel_values") {
        let d = max_abs_diff(&tiles(&prompt).data, &read_f32(&golden, "pixel_values"));
        assert_eq!(d, 0.0, "{arch}: pixel values");
    }
    let want_ids: Vec<i32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    assert_eq!(prompt.ids, want_ids, "{arch}: prompt ids");
    let input = vision.input(&text, &prompt).unwrap();
    let (ours, _) = text.logits_from_input(&prompt.ids, &input, false).unwrap();
    let want = read_f32(&golden, "logits");
    assert_eq!(ours.len(), want.len());
    let vocab = text.vocab_size();
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    };
    let (mut d, mut top1) = (0f32, 0usize);
    for (a, b) in ours.chunks(vocab).zip(want.chunks(vocab)) {
        d = d.max(max_abs_diff(a, b));
        top1 += usize::from(argmax(a) == argmax(b));
    }
    let n = prompt.ids.len();
    eprintln!(
        "anyres {arch:15} vs transformers: {n} tokens, max|diff| {d:.3e}, top-1 {top1}/{n} (tol {tol:.0e})"
    );
    assert!(d <= tol, "{arch}: {d:e} > {tol:e}");
    let want_gen: Vec<i32> = read_i64(&golden, "generated_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    let (_, gen) = text
        .greedy_from_input(&prompt.ids, &input, want_gen.len())
        .unwrap();
    eprintln!("anyres {arch:15} greedy {gen:?}, transformers {want_gen:?}");
    assert_eq!(gen, want_gen, "{arch}: greedy continuation");
}

#[test]
fn llava_next_vs_transformers() {
    against_transformers("llava_next", 1e-4);
}

#[test]
fn llava_onevision_vs_transformers() {
    against_transformers("llava_onevision", 1e-4);
}
