//! Idefics3 and SmolVLM image prompts (`vlm_convert::verify::Vision` over `IdeficsVision`), for both
//! fixtures:
//! - preprocessing and prompt ids against transformers' processor with its PIL image backend
//!   (`tests/py/idefics_processor.py`, live in the CI venv): the synthetic image, a tall one and, with
//!   `do_image_splitting` off, the single global tile; pixel values must be equal (max |diff| 0);
//! - our forward against mlx-vlm's on the same converted directory and pixels
//!   (`tests/py/mlx_vlm_image.py`): the checkpoint's dtype and 4-bit g64, each native and float32;
//!   image features, merged embeddings and the logits of every position;
//! - our float32 forward against transformers' float32 logits and greedy tokens
//!   (`fixtures/golden/reference/<arch>.image.safetensors`, made by `tests/py/idefics_reference.py`).
//!
//! Prints `vision-idefics <arch> ...` lines (`--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use vlm_convert::mlx::{Array, Dtype};
use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::{resize, Resample, RgbImage};
use vlm_convert::verify::{
    IdeficsPixels, ImagePrompt, Pixels, Precision, TextModel, Vision, DEFAULT_IMAGE_TEXT,
};

/// Float32 logits against transformers (the golden test): MLX's float32 kernels against PyTorch's.
const REFERENCE_TOL: f32 = 1e-4;

fn read_i64(file: &SafetensorsFile, name: &str) -> Vec<i64> {
    file.data(&file.tensors[name])
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn tiles(prompt: &ImagePrompt) -> &IdeficsPixels {
    match &prompt.pixels {
        Pixels::Tiles(px) => px,
        other => panic!("not tiles: {other:?}"),
    }
}

/// The prompt of `dir` (a converted directory) for `image` and `text`.
fn our_prompt(dir: &Path, image: &RgbImage, text: &str) -> ImagePrompt {
    let vision = Vision::load(dir, Precision::Native).unwrap();
    vision
        .prompt(dir, &config(dir), image, "test image", text)
        .unwrap()
}

/// transformers' processor on `image` (a file) and `text`: ids and the stored pixel values.
fn processor(dir: &Path, image: &Path, text: &str, out: &Path) -> (Vec<i32>, SafetensorsFile) {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/idefics_processor.py"))
        .args(["--model", s(dir), "--image", s(image), "--text", text])
        .args(["--out", s(out)])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "idefics_processor.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    let f = SafetensorsFile::open(out).unwrap();
    let ids = read_i64(&f, "input_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    (ids, f)
}

fn preprocess_and_prompt(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(arch, &dir, &[]);
    // The same model with the image processor's splitting off: one global tile.
    let single = t.path().join("single");
    copy_dir(&dir, &single);
    let pre = single.join("preprocessor_config.json");
    let mut v = read_json(&pre);
    v["do_image_splitting"] = false.into();
    std::fs::write(&pre, serde_json::to_vec_pretty(&v).unwrap()).unwrap();

    let synthetic = RgbImage::synthetic();
    let tall = resize(&synthetic, 30, 70, Resample::Bicubic).unwrap();
    let mut cases = Vec::new();
    for (name, img) in [("synthetic", &synthetic), ("tall", &tall)] {
        let path = t.path().join(format!("{name}.png"));
        img.save_png(&path).unwrap();
        cases.push((name, &dir, path.clone(), img));
        if name == "synthetic" {
            cases.push(("unsplit", &single, path, img));
        }
    }
    for (name, model, path, img) in cases {
        for text in [
            DEFAULT_IMAGE_TEXT,
            "What is in the top right corner? Answer briefly.",
        ] {
            let ours = our_prompt(model, img, text);
            let out = t.path().join(format!("{name}.safetensors"));
            let (want_ids, want) = processor(model, &path, text, &out);
            let px = tiles(&ours);
            let want_px = read_f32(&want, "pixel_values");
            let shape = &want.tensors["pixel_values"].shape;
            assert_eq!(
                shape[1..],
                px.shape(),
                "{arch} {name}: tiles (rows {} cols {})",
                px.rows,
                px.cols
            );
            let d = max_abs_diff(&px.data, &want_px);
            eprintln!(
                "vision-idefics {arch:8} {name:9} {} tiles ({}x{} + global) pixel max|diff| {d:e}, {} ids",
                px.tiles,
                px.rows,
                px.cols,
                ours.ids.len()
            );
            assert_eq!(d, 0.0, "{arch} {name}: pixel values");
            assert_eq!(ours.ids, want_ids, "{arch} {name} {text:?}: prompt ids");
        }
    }
}

fn save_pixels(px: &IdeficsPixels, path: &Path) {
    let bytes: Vec<u8> = px.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let [n, c, h, w] = px.shape();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, n, c, h, w], &bytes)
            .unwrap();
    let mut m = HashMap::new();
    m.insert("pixel_values".to_string(), view);
    safetensors::serialize_to_file(&m, None, path).unwrap();
}

fn to_f32(a: &Array) -> Vec<f32> {
    a.astype(Dtype::F32).unwrap().to_vec_f32().unwrap()
}

fn mlx_vlm(dir: &Path, pixels: &Path, ids: &[i32], upcast: bool, out: &Path) -> SafetensorsFile {
    let ids_s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut cmd = std::process::Command::new(python());
    cmd.arg(root().join("tests/py/mlx_vlm_image.py"))
        .args(["--model", s(dir), "--pixels", s(pixels)])
        .args(["--ids", &ids_s.join(","), "--out", s(out)]);
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
    SafetensorsFile::open(out).unwrap()
}

fn matches_mlx_vlm(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    for (run_name, flags) in [
        ("plain", &[][..]),
        (
            "q4g64",
            &["-q", "--q-bits", "4", "--q-group-size", "64"][..],
        ),
    ] {
        let dir = t.path().join(run_name);
        convert_fixture(arch, &dir, flags);
        let prompt = our_prompt(&dir, &RgbImage::synthetic(), DEFAULT_IMAGE_TEXT);
        let px = tiles(&prompt);
        let pixels = t.path().join(format!("{run_name}-px.safetensors"));
        save_pixels(px, &pixels);
        for precision in [Precision::Native, Precision::Float32] {
            let upcast = precision == Precision::Float32;
            let theirs = mlx_vlm(
                &dir,
                &pixels,
                &prompt.ids,
                upcast,
                &t.path().join(format!("{run_name}-{upcast}.safetensors")),
            );
            let text = TextModel::load(&dir, precision).unwrap();
            let vision = Vision::load(&dir, precision).unwrap();
            let Vision::Idefics(v) = &vision else {
                panic!("{arch}: not the Idefics vision path")
            };
            let features = to_f32(&v.features(px).unwrap());
            let input = vision.input(&text, &prompt).unwrap();
            let embeds = to_f32(&input.embeds);
            let (logits, _) = text.logits_from_input(&prompt.ids, &input, false).unwrap();
            for (what, mine, name) in [
                ("features", &features, "image_features"),
                ("embeds", &embeds, "inputs_embeds"),
                ("logits", &logits, "logits"),
            ] {
                let want = read_f32(&theirs, name);
                assert_eq!(mine.len(), want.len(), "{arch} {run_name} {what}");
                let d = max_abs_diff(mine, &want);
                eprintln!(
                    "vision-idefics {arch:8} {run_name:5} {precision:?} {what:8} max|diff| {d:.3e} ({} tokens)",
                    prompt.ids.len()
                );
                assert_eq!(d, 0.0, "{arch} {run_name} {precision:?} {what}");
            }
        }
    }
}

fn matches_transformers(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let golden = SafetensorsFile::open(&root().join(format!(
        "fixtures/golden/reference/{arch}.image.safetensors"
    )))
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture(arch, &dir, &[]);
    // The golden's pixels are those of transformers' PIL processor, which preprocess_and_prompt
    // shows equal to ours: the image is decoded from the same PNG.
    let image = RgbImage::open(&root().join("fixtures/images/synthetic.png")).unwrap();
    let prompt = our_prompt(&dir, &image, DEFAULT_IMAGE_TEXT);
    let want_ids: Vec<i32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    assert_eq!(prompt.ids, want_ids, "{arch}: prompt ids");

    let text = TextModel::load(&dir, Precision::Float32).unwrap();
    let vision = Vision::load(&dir, Precision::Float32).unwrap();
    let input = vision.input(&text, &prompt).unwrap();
    let (ours, _) = text.logits_from_input(&prompt.ids, &input, false).unwrap();
    let want = read_f32(&golden, "logits");
    assert_eq!(ours.len(), want.len());
    let vocab = text.vocab_size();
    let argmax = |r: &[f32]| vlm_convert::verify::metrics::argmax(r);
    let mut top1 = 0;
    for (a, b) in ours.chunks(vocab).zip(want.chunks(vocab)) {
        top1 += usize::from(argmax(a) == argmax(b));
    }
    let d = max_abs_diff(&ours, &want);
    let n = prompt.ids.len();
    let want_gen: Vec<i32> = read_i64(&golden, "generated_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    let (_, gen) = text
        .greedy_from_input(&prompt.ids, &input, want_gen.len())
        .unwrap();
    eprintln!(
        "vision-idefics {arch:8} vs transformers: {n} tokens, max|diff| {d:.3e}, top-1 {top1}/{n}, \
         greedy {gen:?} (transformers {want_gen:?})"
    );
    assert!(d <= REFERENCE_TOL, "{arch}: {d:e} > {REFERENCE_TOL:e}");
    assert_eq!(gen, want_gen, "{arch}: greedy continuation");
}

#[test]
fn idefics3_preprocess_and_prompt() {
    preprocess_and_prompt("idefics3");
}

#[test]
fn smolvlm_preprocess_and_prompt() {
    preprocess_and_prompt("smolvlm");
}

#[test]
fn idefics3_matches_mlx_vlm() {
    matches_mlx_vlm("idefics3");
}

#[test]
fn smolvlm_matches_mlx_vlm() {
    matches_mlx_vlm("smolvlm");
}

#[test]
fn idefics3_matches_transformers() {
    matches_transformers("idefics3");
}

#[test]
fn smolvlm_matches_transformers() {
    matches_transformers("smolvlm");
}

/// The source as transformers 5 saves it (fixtures' `variants/transformers5.json`: nested configs,
/// `idefics3_vision`): the references built from it run the image prompt too, and the conversion
/// passes at both levels with its structure exact.
fn transformers5_source_verifies(arch: &str) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    materialize(arch, Some("transformers5"), &src);
    let out = t.path().join("out");
    let (code, stdout, err) = run(&[
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--json",
        "--verify",
        "--new-tokens",
        "2",
    ]);
    assert_eq!(code, 0, "{arch}: {err}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rep = &v["verify"];
    assert_eq!(rep["passed"], true, "{arch}: {rep}");
    for level in ["structure", "quality"] {
        let last = rep[level]["prompts"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(
            last["image"], "synthetic test image",
            "{arch} {level}: {rep}"
        );
        if level == "structure" {
            assert_eq!(last["max_abs_diff"], 0.0, "{arch}: {rep}");
        }
    }
    eprintln!("vision-idefics {arch:8} transformers-5 source: verify passed with the image prompt");
}

#[test]
fn idefics3_transformers5_source_verifies() {
    transformers5_source_verifies("idefics3");
}

#[test]
fn smolvlm_transformers5_source_verifies() {
    transformers5_source_verifies("smolvlm");
}
