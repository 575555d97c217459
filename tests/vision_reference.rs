//! Image-prompt logits of our float32 forward (the conversion of the fixture at its own dtype, run
//! with `Precision::Float32`) against transformers' float32 forward of the source checkpoint, from
//! the committed `fixtures/golden/reference/<arch>.image.safetensors` (made by
//! `scripts/reference_logits.py --image fixtures/images/synthetic.png --new-tokens 4` in the reference
//! venv). The same file checks our prompt ids and pixel values against the processor's.
//!
//! Prints `vision-reference <arch> max|diff| ...` (`--nocapture`). The limits are per architecture,
//! because our forward follows mlx-vlm, which departs from transformers on purpose or not:
//! - LLaVA: none known; float32 rounding only.
//! - PaliGemma: none known on the fixture.
//! - Gemma 3: mlx-vlm divides the image features by `sqrt(hidden_size)` taken from config.json's top
//!   level (absent on Gemma 3 checkpoints, so its default 2048) before the language model multiplies
//!   every embedding by `sqrt(text hidden_size)`, where transformers inserts them unscaled; and its
//!   image tokens attend causally where transformers lets them see the whole image. Both change the
//!   logits at every position after the image: recorded, not bounded tightly. (Checked by hand:
//!   mlx-vlm's float32 forward with both changed matches transformers to 5.7e-4, top-1 285/285.)
#![cfg(feature = "mlx")]

mod common;
use common::*;

use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::image::RgbImage;
use vlm_convert::verify::{Pixels, Precision, TextModel, Vision};

fn read_i64(file: &SafetensorsFile, name: &str) -> Vec<i64> {
    file.data(&file.tensors[name])
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn against_transformers(arch: &str, tol: f32) {
    vlm_convert::mlx::init().unwrap();
    let golden = SafetensorsFile::open(&root().join(format!(
        "fixtures/golden/reference/{arch}.image.safetensors"
    )))
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    let (code, _, err) = run(&[
        "--hf-path",
        s(&fixture(arch)),
        "--mlx-path",
        s(&dir),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();

    let text = TextModel::load(&dir, Precision::Float32).unwrap();
    let vision = Vision::load(&dir, Precision::Float32).unwrap();
    let mut prompt = vision
        .prompt(
            &dir,
            &config,
            &RgbImage::synthetic(),
            "synthetic",
            "Describe the image.",
        )
        .unwrap();
    let want_ids: Vec<i32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    assert_eq!(prompt.ids, want_ids, "{arch}: prompt ids");

    // The reference venv has torch, so transformers runs its torchvision image processor there (the
    // CI venv, without torch, the PIL one that tests/image_preprocess.rs and tests/qwen_vision.rs
    // match exactly): the two resize differently (one level of 255 on some pixels). The logits below
    // are computed from the reference's own pixel values, so they compare the two forwards on the
    // same input.
    // Goldens of tiled processors hold no pixel values (size): they were made with the PIL
    // processor, whose pixels ours equal (tests/vision_anyres.rs, tests/vision_idefics.rs).
    if golden.tensors.contains_key("pixel_values") {
        let want_px = read_f32(&golden, "pixel_values");
        let ours_px = match &mut prompt.pixels {
            Pixels::Fixed(px) | Pixels::Pixtral(px) => &mut px.data,
            Pixels::AnyRes(px) => &mut px.data,
            Pixels::Tiles(px) => &mut px.data,
            Pixels::Patches { data, grid_thw } => {
                let g: Vec<usize> = read_i64(&golden, "image_grid_thw")
                    .iter()
                    .map(|&x| x as usize)
                    .collect();
                assert_eq!(grid_thw.concat(), g, "{arch}: image grid");
                data
            }
        };
        assert_eq!(ours_px.len(), want_px.len());
        let d_px = max_abs_diff(ours_px, &want_px);
        eprintln!("vision-reference {arch:10} pixel values max|diff| {d_px:.3e}");
        assert!(d_px <= 0.031, "{arch}: pixel values differ by {d_px}");
        *ours_px = want_px;
    }

    let input = vision.input(&text, &prompt).unwrap();
    let ids = &prompt.ids;
    let (ours, _) = text.logits_from_input(ids, &input, false).unwrap();
    let want = read_f32(&golden, "logits");
    assert_eq!(ours.len(), want.len());
    let vocab = text.vocab_size();
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    };
    // Positions before the first image token do not see the image: there only the text forwards
    // differ (Gemma 3's bf16-rounded embedding scale, README "Verify": 6e-4).
    let image_token = config
        .get("image_token_index")
        .or_else(|| config.get("image_token_id"))
        .and_then(serde_json::Value::as_i64)
        .unwrap() as i32;
    let first_image = ids.iter().position(|&t| t == image_token).unwrap_or(0);
    let (mut d, mut d_text, mut top1) = (0f32, 0f32, 0usize);
    for (row, (a, b)) in ours.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let m = max_abs_diff(a, b);
        d = d.max(m);
        if row < first_image {
            d_text = d_text.max(m);
        }
        top1 += usize::from(argmax(a) == argmax(b));
    }
    let n = ids.len();
    eprintln!(
        "vision-reference {arch:10} {n} tokens: max|diff| {d:.3e} (before the image {d_text:.3e}), \
         top-1 agreement {top1}/{n} (tol {tol:.0e})"
    );
    assert!(d <= tol, "{arch}: {d:e} > {tol:e}");
    assert!(
        d_text <= 2e-3,
        "{arch}: text positions differ by {d_text:e}"
    );

    // Greedy continuation from the merged embeddings (causal models over the KV cache, with M-RoPE
    // decode positions for Qwen-VL; PaliGemma, a prefix LM, re-runs the whole sequence per token)
    // against transformers' own greedy tokens. Gemma 3's logits depart after the image (see above),
    // so its tokens may too.
    let want_gen: Vec<i32> = read_i64(&golden, "generated_ids")
        .iter()
        .map(|&i| i as i32)
        .collect();
    let (first, gen) = text.greedy_from_input(ids, &input, want_gen.len()).unwrap();
    assert!(
        max_abs_diff(&first, &ours) <= 1e-5,
        "{arch}: greedy's prompt logits"
    );
    eprintln!("vision-reference {arch:10} greedy {gen:?}, transformers {want_gen:?}");
    if arch != "gemma3" {
        assert_eq!(gen, want_gen, "{arch}: greedy continuation");
    }
}

#[test]
fn llava() {
    against_transformers("llava", 1e-4);
}

#[test]
fn paligemma() {
    against_transformers("paligemma", 1e-4);
}

#[test]
fn gemma3() {
    against_transformers("gemma3", 10.0);
}

#[test]
fn qwen2_vl() {
    against_transformers("qwen2_vl", 1e-4);
}

#[test]
fn qwen2_5_vl() {
    against_transformers("qwen2_5_vl", 1e-4);
}

#[test]
fn qwen3_vl() {
    against_transformers("qwen3_vl", 1e-4);
}

#[test]
fn mistral3() {
    against_transformers("mistral3", 1e-4);
}

#[test]
fn llava_next() {
    against_transformers("llava_next", 1e-4);
}

#[test]
fn llava_onevision() {
    against_transformers("llava_onevision", 1e-4);
}

#[test]
fn idefics3() {
    against_transformers("idefics3", 1e-4);
}

#[test]
fn smolvlm() {
    against_transformers("smolvlm", 1e-4);
}
