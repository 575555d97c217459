//! Planted vision bugs in a converted directory are seen by an image prompt and not by text prompts:
//! our float32 forward (vision tower + projector + language model) of the tampered directory against
//! the good one, on the built-in synthetic image with an image prompt built from the checkpoint's own
//! template and tokenizer, and on the built-in text prompts.
//!
//! - two vision layers swapped (every tensor of layers 0 and 1);
//! - the patch embedding's bytes in PyTorch order under MLX's shape (a reshape where a transpose was
//!   needed), and the weight left in PyTorch's shape (refused when loading, naming the layout);
//! - LLaVA: the projector's two linear layers swapped (refused: their shapes do not chain).
//!
//! Prints `vision-bug <arch> <bug> image max|diff| ... text max|diff| ...` (`--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::path::Path;

use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::{ImageProcessor, RgbImage};
use vlm_convert::verify::prompt::PromptBuilder;
use vlm_convert::verify::{builtin_prompts, Precision, TextModel, VerifyError, VisionModel};

const PATCH: &str = "vision_tower.vision_model.embeddings.patch_embedding.weight";

/// Float32 logits of the image prompt and of the built-in text prompts.
fn logits(dir: &Path) -> Result<(Vec<f32>, Vec<Vec<f32>>), VerifyError> {
    let config = read_json(&dir.join("config.json"));
    let text = TextModel::load(dir, Precision::Float32)?;
    let vision = VisionModel::load(dir, Precision::Float32)?;
    let px = ImageProcessor::from_dir(dir)?.preprocess(&RgbImage::synthetic())?;
    let ids = PromptBuilder::from_dir(dir, &config)?
        .image_prompt("Describe the image.", vision.tokens_per_image())?;
    let tok = text.embed_tokens(&ids)?;
    let f = vision.features(&px, tok.dtype()?)?;
    let image = text.logits_from_embeds(&ids, &vision.merge(&ids, &tok, &f)?, None)?;
    let texts = builtin_prompts(text.vocab_size(), &config)
        .iter()
        .map(|p| text.logits(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((image, texts))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Rewrites the converted tensors through `f(name, shape, bytes) -> (new name, shape, bytes)`.
fn rewrite(dir: &Path, f: impl Fn(&str, &[usize], &[u8]) -> (String, Vec<usize>, Vec<u8>)) {
    let p = dir.join("model.safetensors");
    let file = SafetensorsFile::open(&p).unwrap();
    let mut items = Vec::new();
    for (name, info) in &file.tensors {
        let (n, shape, bytes) = f(name, &info.shape, file.data(info));
        let mut info = info.clone();
        info.shape = shape;
        items.push((n, info, bytes));
    }
    write_safetensors(&p, &file.metadata, &items);
}

/// `[O, H, W, C]` bytes permuted to `[O, C, H, W]` (PyTorch's order).
fn ohwi_to_oihw(shape: &[usize], bytes: &[u8]) -> Vec<u8> {
    let (o, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
    let es = bytes.len() / (o * h * w * c);
    let mut out = vec![0u8; bytes.len()];
    for a in 0..o {
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    let src = (((a * h + y) * w + x) * c + k) * es;
                    let dst = (((a * c + k) * h + y) * w + x) * es;
                    out[dst..dst + es].copy_from_slice(&bytes[src..src + es]);
                }
            }
        }
    }
    out
}

fn plant(arch: &str, good: &Path, tmp: &Path, bug: &str) -> std::path::PathBuf {
    let dir = tmp.join(bug);
    copy_dir(good, &dir);
    match bug {
        "vision-layers-swapped" => rename_tensors(&dir, |n| {
            let l = "vision_tower.vision_model.encoder.layers.";
            Some(if let Some(r) = n.strip_prefix(&format!("{l}0.")) {
                format!("{l}1.{r}")
            } else if let Some(r) = n.strip_prefix(&format!("{l}1.")) {
                format!("{l}0.{r}")
            } else {
                n.to_string()
            })
        }),
        "patch-embedding-reshaped" => rewrite(&dir, |n, s, b| {
            let bytes = if n == PATCH {
                ohwi_to_oihw(s, b)
            } else {
                b.to_vec()
            };
            (n.to_string(), s.to_vec(), bytes)
        }),
        "patch-embedding-pytorch-layout" => rewrite(&dir, |n, s, b| {
            if n == PATCH {
                (
                    n.to_string(),
                    vec![s[0], s[3], s[1], s[2]],
                    ohwi_to_oihw(s, b),
                )
            } else {
                (n.to_string(), s.to_vec(), b.to_vec())
            }
        }),
        "projector-swapped" => rename_tensors(&dir, |n| {
            Some(
                if let Some(r) = n.strip_prefix("multi_modal_projector.linear_1.") {
                    format!("multi_modal_projector.linear_2.{r}")
                } else if let Some(r) = n.strip_prefix("multi_modal_projector.linear_2.") {
                    format!("multi_modal_projector.linear_1.{r}")
                } else {
                    n.to_string()
                },
            )
        }),
        other => panic!("{arch}: unknown bug {other}"),
    }
    dir
}

fn bugs_are_seen(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good");
    let (code, _, err) = run(&[
        "--hf-path",
        s(&fixture(arch)),
        "--mlx-path",
        s(&good),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    let (image, texts) = logits(&good).unwrap();
    let mut bugs = vec![
        "vision-layers-swapped",
        "patch-embedding-reshaped",
        "patch-embedding-pytorch-layout",
    ];
    if arch == "llava" {
        bugs.push("projector-swapped");
    }
    for bug in bugs {
        let dir = plant(arch, &good, t.path(), bug);
        match logits(&dir) {
            Ok((bad_image, bad_texts)) => {
                let d_image = max_diff(&image, &bad_image);
                let d_text = texts
                    .iter()
                    .zip(&bad_texts)
                    .map(|(a, b)| max_diff(a, b))
                    .fold(0f32, f32::max);
                eprintln!(
                    "vision-bug {arch:10} {bug:31} image max|diff| {d_image:.3e}, text max|diff| {d_text:.3e}"
                );
                // The structure level's limit (README "Verify"): 1e-3.
                assert!(
                    d_image > 1e-2,
                    "{arch} {bug}: the image prompt does not see it"
                );
                assert_eq!(d_text, 0.0, "{arch} {bug}: the text prompts changed");
            }
            Err(e) => {
                eprintln!("vision-bug {arch:10} {bug:31} refused: {e}");
                assert!(
                    bug == "patch-embedding-pytorch-layout" || bug == "projector-swapped",
                    "{arch} {bug}: {e}"
                );
                if bug == "patch-embedding-pytorch-layout" {
                    assert!(e.to_string().contains("layout"), "{e}");
                }
                // The language model alone still loads and runs: text-only verification is unaffected.
                TextModel::load(&dir, Precision::Float32).unwrap();
            }
        }
    }
}

#[test]
fn llava() {
    bugs_are_seen("llava");
}

#[test]
fn paligemma() {
    bugs_are_seen("paligemma");
}

#[test]
fn gemma3() {
    bugs_are_seen("gemma3");
}
