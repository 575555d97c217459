//! Image prompts end to end: [`Vision`] is the vision path of a converted directory (or of a reference
//! built from the source), whatever the architecture, and turns an image and a text into an
//! [`ImagePrompt`] (the processor's token ids and pixels) and then into the language model's input
//! ([`EmbedInput`]: token embeddings with the image features merged in, plus M-RoPE positions and
//! Qwen3-VL's deepstack features where the model has them).
//!
//! Verify runs every model it compares (the conversion as stored, the conversion in float32, the
//! source's float and structural references) on the same [`ImagePrompt`], prepared once from the
//! converted directory's processor, tokenizer and chat template.
//!
//! Per architecture:
//! - LLaVA, PaliGemma, Gemma 3: a fixed-size image through CLIP/SigLIP and the projector
//!   ([`VisionModel`]);
//! - LLaVA-NeXT, LLaVA-OneVision: any-res tiles through CLIP/SigLIP, packed features
//!   ([`AnyResVision`]);
//! - Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic resolution, the patch-merging vision transformer
//!   ([`QwenVision`]), M-RoPE image positions, and Qwen3-VL's deepstack features.
//!
//! Architectures not listed in [`IMAGE_ARCHS`] are verified on text prompts only, and say so.

use std::path::Path;

use serde_json::Value;

use super::anyres::{AnyResKind, AnyResPixels, AnyResProcessor, AnyResVision};
use super::image::{ImageProcessor, PixelValues, RgbImage};
use super::prompt::PromptBuilder;
use super::qwen_image::QwenImageProcessor;
use super::qwen_vision::{QwenVision, QwenVisionConfig, QwenVisionKind};
use super::text::{EmbedInput, TextModel};
use super::vision::VisionModel;
use super::weights::Store;
use super::{Precision, Result, VerifyError};

/// Top-level `model_type`s whose image path is implemented.
pub const IMAGE_ARCHS: &[&str] = &[
    "llava",
    "paligemma",
    "gemma3",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_next",
    "llava_onevision",
];

/// The text of the image prompt when none is given.
pub const DEFAULT_IMAGE_TEXT: &str = "Describe the image.";

/// Tensor-name roots of the vision side of a converted directory.
pub(crate) const VISION_ROOTS: &[&str] =
    &["vision_tower.", "multi_modal_projector.", "image_newline"];

/// The pixels of one image prompt, as the architecture's processor produces them.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// One image at the tower's fixed size, `[1, 3, H, W]` (CLIP/SigLIP).
    Fixed(PixelValues),
    /// Qwen-VL: flattened patches `[N, C*T*P*P]` and each image's `[t, h, w]` grid (in patches).
    Patches {
        data: Vec<f32>,
        grid_thw: Vec<[usize; 3]>,
    },
    /// LLaVA-NeXT / LLaVA-OneVision: the base image and the any-res tiles.
    Tiles(AnyResPixels),
}

/// An image prompt: the token ids (image placeholder expanded) and the pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePrompt {
    /// What the image is (a file path, or the built-in synthetic image).
    pub image: String,
    /// The user text.
    pub text: String,
    pub ids: Vec<i32>,
    pub pixels: Pixels,
}

/// The vision path of one model.
///
/// Not `Send` (MLX arrays).
pub enum Vision {
    /// CLIP/SigLIP tower + projector (LLaVA, PaliGemma, Gemma 3).
    Fixed(VisionModel),
    /// Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision transformer.
    Qwen(QwenVision),
    /// LLaVA-NeXT / LLaVA-OneVision: tiles through CLIP/SigLIP, packed features.
    AnyRes(AnyResVision),
}

fn model_type(config: &Value) -> &str {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| crate::Error::read(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| VerifyError::Config {
        path,
        msg: format!("invalid JSON: {e}"),
    })
}

impl Vision {
    /// Whether `config` (a config.json) names an architecture with an image path.
    pub fn supports(config: &Value) -> bool {
        IMAGE_ARCHS.contains(&model_type(config))
    }

    /// Loads the vision side of the converted directory `dir`. [`crate::mlx::init`] must have been
    /// called.
    pub fn load(dir: &Path, precision: Precision) -> Result<Vision> {
        let config = read_config(dir)?;
        let store = Store::open_roots(dir, &config, VISION_ROOTS, precision)?;
        Vision::from_store(dir, &config, &store)
    }

    /// The vision side over tensors in a [`Store`]; `config` is the config.json to follow.
    pub(crate) fn from_store(dir: &Path, config: &Value, store: &Store) -> Result<Vision> {
        let mt = model_type(config);
        if !IMAGE_ARCHS.contains(&mt) {
            return Err(VerifyError::Unsupported(format!(
                "image prompts for `{mt}` (they support {})",
                IMAGE_ARCHS.join(", ")
            )));
        }
        if AnyResKind::from_model_type(mt).is_some() {
            return Ok(Vision::AnyRes(AnyResVision::from_store(
                dir, config, store,
            )?));
        }
        if QwenVisionKind::from_model_type(mt).is_some() {
            let cfg = QwenVisionConfig::from_config(config, &dir.join("config.json"))?;
            return Ok(Vision::Qwen(QwenVision::from_store(
                dir,
                store.precision,
                cfg,
                store,
            )?));
        }
        Ok(Vision::Fixed(VisionModel::from_store(dir, config, store)?))
    }

    /// The image prompt for `image` and `text`, built with the processor, tokenizer and chat template
    /// files in `files` (a converted directory or the source checkpoint); `config` is its config.json.
    /// `label` names the image in reports.
    pub fn prompt(
        &self,
        files: &Path,
        config: &Value,
        image: &RgbImage,
        label: &str,
        text: &str,
    ) -> Result<ImagePrompt> {
        let builder = PromptBuilder::from_dir(files, config)?;
        let (ids, pixels) = match self {
            Vision::Fixed(v) => {
                let px = ImageProcessor::from_dir(files)?.preprocess(image)?;
                (
                    builder.image_prompt(text, v.tokens_per_image())?,
                    Pixels::Fixed(px),
                )
            }
            Vision::AnyRes(v) => {
                let px = AnyResProcessor::from_dir(files)?.preprocess(image)?;
                (
                    builder.image_prompt(text, v.image_tokens(px.image_size)?)?,
                    Pixels::Tiles(px),
                )
            }
            Vision::Qwen(_) => {
                let proc = QwenImageProcessor::from_dir(files)?;
                let px = proc.preprocess(image)?;
                (
                    builder.image_prompt(text, proc.image_tokens(px.grid_thw))?,
                    Pixels::Patches {
                        data: px.data,
                        grid_thw: vec![px.grid_thw],
                    },
                )
            }
        };
        Ok(ImagePrompt {
            image: label.to_string(),
            text: text.to_string(),
            ids,
            pixels,
        })
    }

    /// The language model's input for `prompt`: its token embeddings from `text` with the image
    /// features at the image tokens, as mlx-vlm's `get_input_embeddings` builds it.
    pub fn input(&self, text: &TextModel, prompt: &ImagePrompt) -> Result<EmbedInput> {
        let ids = &prompt.ids;
        match (self, &prompt.pixels) {
            (Vision::Fixed(v), Pixels::Fixed(px)) => {
                let embeds = text.embed_tokens(ids)?;
                let f = v.features(px, embeds.dtype()?)?;
                Ok(EmbedInput {
                    embeds: v.merge(ids, &embeds, &f)?,
                    positions: None,
                    deepstack: None,
                })
            }
            (Vision::Qwen(v), Pixels::Patches { data, grid_thw }) => {
                v.input(text, ids, data, grid_thw)
            }
            (Vision::AnyRes(v), Pixels::Tiles(px)) => v.input(text, ids, px),
            _ => Err(VerifyError::BadInput(
                "the image prompt was prepared for another architecture".into(),
            )),
        }
    }
}
