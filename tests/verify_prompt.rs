//! Image prompts built by `vlm_convert::verify::Vision::prompt` (the image processor for the feature
//! count, and `PromptBuilder`: chat template through
//! minijinja, tokenizer through the `tokenizers` crate, image placeholder expanded to the vision
//! model's feature count) against the input ids of the fixture's transformers processor
//! (`tests/py/processor_ids.py`, live in the CI venv), for every fixture whose vision path we support.
#![cfg(feature = "mlx")]

mod common;
use common::*;

use vlm_convert::verify::image::RgbImage;
use vlm_convert::verify::{Precision, Vision};

fn processor_ids(arch: &str, text: &str) -> Vec<i32> {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/processor_ids.py"))
        .args(["--model", s(&fixture(arch)), "--text", text])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "processor_ids.py {arch}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let line = String::from_utf8_lossy(&res.stdout);
    serde_json::from_str(line.lines().last().unwrap_or_default()).expect("a JSON list of ids")
}

fn matches_processor(arch: &str) {
    vlm_convert::mlx::init().unwrap();
    let dir = fixture(arch);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    // The feature count comes from our vision model of the converted layout; the source fixture's
    // tower has the same sizes, so convert it.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let (code, _, err) = run(&["--hf-path", s(&dir), "--mlx-path", s(&out), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let vision = Vision::load(&out, Precision::Native).unwrap();
    // processor_ids.py's image: black, 96 x 72 (its size sets Qwen-VL's token count).
    let black = RgbImage::new(96, 72, vec![0; 96 * 72 * 3]).unwrap();
    for text in [
        "Describe the image.",
        "What is in the top right corner? Answer briefly.",
    ] {
        let ours = vision
            .prompt(&out, &config, &black, "black", text)
            .unwrap()
            .ids;
        let want = processor_ids(arch, text);
        eprintln!("verify-prompt {arch:10} {} ids", ours.len());
        assert_eq!(
            ours, want,
            "{arch} {text:?}: ids differ from the processor's"
        );
    }
}

#[test]
fn llava() {
    matches_processor("llava");
}

#[test]
fn paligemma() {
    matches_processor("paligemma");
}

#[test]
fn gemma3() {
    matches_processor("gemma3");
}

#[test]
fn qwen2_vl() {
    matches_processor("qwen2_vl");
}

#[test]
fn qwen2_5_vl() {
    matches_processor("qwen2_5_vl");
}

#[test]
fn qwen3_vl() {
    matches_processor("qwen3_vl");
}
