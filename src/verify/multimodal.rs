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
//!   ([`QwenVision`]), M-RoPE image positions, and Qwen3-VL's deepstack features;
//! - Mistral 3: the image at its own patch-multiple size through the Pixtral encoder, the patch
//!   merger and the projector ([`PixtralVision`]), `[IMG]` rows separated by `[IMG_BREAK]`.
//! - Idefics3, SmolVLM: the image split into tiles plus a global image, each through the vision
//!   transformer, then the pixel-shuffle connector ([`IdeficsVision`]).
//!
//! Architectures not listed in [`IMAGE_ARCHS`] are verified on text prompts only, and say so.

use std::path::Path;

use serde_json::Value;

use super::anyres::{AnyResKind, AnyResPixels, AnyResProcessor, AnyResVision};
use super::idefics::{
    image_prompt_string, IdeficsImageProcessor, IdeficsPixels, IdeficsTokens, IdeficsVision,
};
use super::image::{ImageProcessor, PixelValues, RgbImage};
use super::pixtral::{PixtralImageProcessor, PixtralVision};
use super::prompt::PromptBuilder;
use super::qwen_image::QwenImageProcessor;
use super::qwen_vision::{QwenVision, QwenVisionConfig, QwenVisionKind};
use super::text::{EmbedInput, TextModel};
use super::vision::VisionModel;
use super::weights::{read_config, Store};
use super::{Precision, Result, VerifyError};

/// Top-level `model_type`s whose image path is implemented.
pub const IMAGE_ARCHS: &[&str] = &[
    "llava",
    "paligemma",
    "gemma3",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "mistral3",
    "idefics3",
    "smolvlm",
    "llava_next",
    "llava_onevision",
];

/// The text of the image prompt when none is given.
pub const DEFAULT_IMAGE_TEXT: &str = "Describe the image.";

/// Tensor-name roots of the vision side of a converted directory.
pub(crate) const VISION_ROOTS: &[&str] = &[
    "vision_tower.",
    "multi_modal_projector.",
    "image_newline",
    "vision_model.",
    "connector.",
];

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
    /// Mistral 3 (Pixtral): one image at its own size, `[1, 3, H, W]`, sides multiples of
    /// `patch_size * spatial_merge_size` (`(H, W)` is its `image_sizes` entry).
    Pixtral(PixelValues),
    /// Idefics3 / SmolVLM: the image's tiles and their grid.
    Tiles(IdeficsPixels),
    /// LLaVA-NeXT / LLaVA-OneVision: the base image and the any-res tiles.
    AnyRes(AnyResPixels),
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
    /// Mistral 3: Pixtral encoder, patch merger and projector.
    Pixtral(PixtralVision),
    /// Idefics3 / SmolVLM vision transformer and connector.
    Idefics(IdeficsVision),
    /// LLaVA-NeXT / LLaVA-OneVision: tiles through CLIP/SigLIP, packed features.
    AnyRes(AnyResVision),
}

fn model_type(config: &Value) -> &str {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
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
        if mt == "mistral3" {
            return Ok(Vision::Pixtral(PixtralVision::from_store(
                dir, config, store,
            )?));
        }
        if matches!(mt, "idefics3" | "smolvlm") {
            return Ok(Vision::Idefics(IdeficsVision::from_store(
                dir, config, store,
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
                    Pixels::AnyRes(px),
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
            Vision::Pixtral(_) => {
                let proc = PixtralImageProcessor::from_dir(files, config)?;
                let px = proc.preprocess(image)?;
                let (rows, cols) = proc.token_grid(&px);
                (
                    builder.image_grid_prompt(text, rows, cols)?,
                    Pixels::Pixtral(px),
                )
            }
            Vision::Idefics(v) => {
                let proc = IdeficsImageProcessor::from_dir(files)?;
                let px = proc.preprocess(image)?;
                let per_tile = v.tokens_per_tile(px.height, px.width);
                if per_tile != proc.image_seq_len {
                    return Err(VerifyError::Config {
                        path: files.join("processor_config.json"),
                        msg: format!(
                            "`image_seq_len` is {} but the model gives {per_tile} features per                              {}x{} tile (vision patch_size and scale_factor in config.json)",
                            proc.image_seq_len, px.width, px.height
                        ),
                    });
                }
                let tokens = IdeficsTokens::from_dir(files, builder.image_token().to_string())?;
                let expansion = image_prompt_string(&tokens, px.rows, px.cols, per_tile);
                (
                    builder.image_prompt_expanded(text, &expansion)?,
                    Pixels::Tiles(px),
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

    /// Whether the image enters as tiles whose layout the pixel values alone do not give (any-res,
    /// Idefics3 splitting).
    pub fn tiled(&self) -> bool {
        matches!(self, Vision::AnyRes(_) | Vision::Idefics(_))
    }

    /// [`Pixels`] for this architecture from a processor's `pixel_values` (`shape` as stored) and,
    /// for Qwen-VL, its `image_grid_thw`: what a reference file made by transformers holds.
    pub fn pixels(
        &self,
        data: &[f32],
        shape: &[usize],
        grid_thw: Option<&[[usize; 3]]>,
    ) -> Result<Pixels> {
        let bad =
            |msg: String| VerifyError::BadInput(format!("pixel_values of shape {shape:?}: {msg}"));
        let one_image = || match *shape {
            [1, 3, height, width] => Ok(PixelValues {
                height,
                width,
                data: data.to_vec(),
            }),
            _ => Err(bad("expected [1, 3, height, width] (one image)".into())),
        };
        match self {
            Vision::Fixed(_) => Ok(Pixels::Fixed(one_image()?)),
            Vision::Pixtral(_) => Ok(Pixels::Pixtral(one_image()?)),
            // Tiles: the layout (Idefics3's rows x columns, any-res's original image size) is not
            // in `pixel_values`; such references are read with the image itself (`--image`).
            Vision::Idefics(_) | Vision::AnyRes(_) => Err(bad(
                "tiled pixels do not say how the image was tiled; pass the reference's image with --image"
                    .into(),
            )),
            Vision::Qwen(v) => {
                let grid =
                    grid_thw.ok_or_else(|| bad("Qwen-VL pixels need `image_grid_thw`".into()))?;
                let k = v.config().patch_len();
                let patches = grid
                    .iter()
                    .map(|g| g[0].saturating_mul(g[1]).saturating_mul(g[2]))
                    .fold(0, usize::saturating_add);
                if shape != [patches, k] {
                    return Err(bad(format!(
                        "expected [{patches}, {k}] for the grids {grid:?}"
                    )));
                }
                Ok(Pixels::Patches {
                    data: data.to_vec(),
                    grid_thw: grid.to_vec(),
                })
            }
        }
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
            (Vision::Pixtral(v), Pixels::Pixtral(px)) => v.input(text, ids, px),
            (Vision::Idefics(v), Pixels::Tiles(px)) => v.input(text, ids, px),
            (Vision::AnyRes(v), Pixels::AnyRes(px)) => v.input(text, ids, px),
            _ => Err(VerifyError::BadInput(
                "the image prompt was prepared for another architecture".into(),
            )),
        }
    }
}
