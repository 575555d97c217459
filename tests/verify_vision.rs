//! Our vision forward (`vlm_convert::verify::VisionModel`: tower + projector, merged into the token
//! embeddings, then the language model from those embeddings) against mlx-vlm's on the same
//! directory and the same pixel values (`tests/py/mlx_vlm_image.py`, live in the CI venv), for each
//! fixture whose vision path we support: the checkpoint's dtype and 4-bit g64 conversions, each in
//! native precision and in float32 (`--upcast`).
//!
//! Compared: the image features, the merged input embeddings, and the logits of every position.
//! Each comparison prints `verify-vision <arch> <run> <what> max|diff| ...` (`--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use vlm_convert::mlx::Array;
use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::{ImageProcessor, PixelValues, RgbImage};
use vlm_convert::verify::{Precision, TextModel, VisionModel};

/// Max |diff| against mlx-vlm in the model's own dtype (bf16 roundings may be ordered differently,
/// e.g. in the average pool) and in float32.
const NATIVE_TOL: f32 = 2e-2;
const F32_TOL: f32 = 1e-4;

fn save_pixels(px: &PixelValues, path: &Path) {
    let bytes: Vec<u8> = px.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, px.shape().to_vec(), &bytes)
            .unwrap();
    let mut m = HashMap::new();
    m.insert("pixel_values".to_string(), view);
    safetensors::serialize_to_file(&m, None, path).unwrap();
}

/// A prompt around the image: a few text tokens, the image placeholder repeated once per feature,
/// more text.
/// PaliGemma's processor puts the image first (then bos and the text).
fn prompt(arch: &str, image_token: i32, tokens: usize) -> Vec<i32> {
    let image = std::iter::repeat_n(image_token, tokens);
    if arch == "paligemma" {
        let mut ids: Vec<i32> = image.collect();
        ids.extend([2, 40, 41, 42, 50, 51, 52, 10]);
        return ids;
    }
    let mut ids = vec![2, 40, 41, 42];
    ids.extend(image);
    ids.extend([50, 51, 52, 10]);
    ids
}

struct Ours {
    features: Vec<f32>,
    embeds: Vec<f32>,
    logits: Vec<f32>,
}

fn ours(dir: &Path, precision: Precision, px: &PixelValues, ids: &[i32]) -> Ours {
    let text = TextModel::load(dir, precision).unwrap();
    let vision = VisionModel::load(dir, precision).unwrap();
    let tok = text.embed_tokens(ids).unwrap();
    let f = vision.features(px, tok.dtype().unwrap()).unwrap();
    let merged = vision.merge(ids, &tok, &f).unwrap();
    let to_f32 = |a: &Array| {
        a.astype(vlm_convert::mlx::Dtype::F32)
            .unwrap()
            .to_vec_f32()
            .unwrap()
    };
    Ours {
        features: to_f32(&f),
        embeds: to_f32(&merged),
        logits: text.logits_from_embeds(ids, &merged, None).unwrap(),
    }
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

fn vision_matches(arch: &str) {
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
        let proc = ImageProcessor::from_dir(&dir).unwrap();
        let px = proc.preprocess(&RgbImage::synthetic()).unwrap();
        let pixels = t.path().join(format!("{run_name}-px.safetensors"));
        save_pixels(&px, &pixels);
        let vision = VisionModel::load(&dir, Precision::Native).unwrap();
        let ids = prompt(arch, vision.image_token_id(), vision.tokens_per_image());
        drop(vision);
        for (precision, upcast, tol) in [
            (Precision::Native, false, NATIVE_TOL),
            (Precision::Float32, true, F32_TOL),
        ] {
            let theirs = mlx_vlm(
                &dir,
                &pixels,
                &ids,
                upcast,
                &t.path().join(format!("{run_name}-{upcast}.safetensors")),
            );
            let o = ours(&dir, precision, &px, &ids);
            let label = format!("{run_name} {precision:?}");
            for (what, mine, name) in [
                ("features", &o.features, "image_features"),
                ("embeds", &o.embeds, "inputs_embeds"),
                ("logits", &o.logits, "logits"),
            ] {
                let d = max_abs_diff(mine, &read_f32(&theirs, name));
                eprintln!(
                    "verify-vision {arch:10} {label:18} {what:9} max|diff| {d:.3e} (tol {tol:.0e})"
                );
                if d > tol {
                    let want = read_f32(&theirs, name);
                    let bad = mine
                        .iter()
                        .zip(&want)
                        .position(|(a, b)| (a - b).abs() > tol);
                    panic!(
                        "{arch} {label} {what}: {d:e} > {tol:e}; first at flat index {bad:?} of {}: ours {:?} mlx-vlm {:?}",
                        want.len(),
                        &mine[..4],
                        &want[..4]
                    );
                }
            }
        }
    }
}

#[test]
fn llava() {
    vision_matches("llava");
}

#[test]
fn paligemma() {
    vision_matches("paligemma");
}

#[test]
fn gemma3() {
    vision_matches("gemma3");
}

#[test]
fn unsupported_vision_paths_say_so() {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture("qwen2_vl", &dir, &[]);
    let e = VisionModel::load(&dir, Precision::Native).err().unwrap();
    assert!(
        matches!(e, vlm_convert::verify::VerifyError::Unsupported(_)),
        "{e}"
    );
}
