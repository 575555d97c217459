//! The verify stage: run the converted model itself, in Rust over the MLX binding ([`crate::mlx`]).
//!
//! [`TextModel`] is the language model of a converted MLX directory (config.json + safetensors, read
//! through [`crate::shard`]), for every architecture the recipes support. It follows mlx-vlm's own model
//! code (`mlx_vlm/models/<arch>/language.py`), which is the reference semantics: the same operations in
//! the same dtypes, so that its logits match mlx-vlm's on the CPU (bit for bit on most fixtures).
//!
//! - What differs between architectures is data, not code: [`ArchSpec`] is a small set of switches
//!   (norm style, activation, rope style, embedding scale, sliding windows, soft-capping, ...) derived
//!   from config.json's `model_type`s and fields, plus per-architecture defaults mlx-vlm's config classes
//!   apply ([`TextConfig`]). One forward pass serves every architecture.
//! - Quantized layers (a module is quantized iff `<path>.scales` is stored) run `quantized_matmul` on the
//!   stored weight/scales/biases with the settings of config.json `quantization` (per-module entries
//!   honoured); float layers use a plain matmul.
//! - [`Precision::Float32`] upcasts everything, dequantizing quantized weights in float32, exactly as
//!   `fixtures/mlx_forward.py --upcast` does (SPEC.md section 7: the structural check runs in float32).
//!
//! ```no_run
//! use vlm_convert::verify::{Precision, TextModel};
//! vlm_convert::mlx::init()?;
//! let model = TextModel::load("out/Qwen2-VL-2B-Instruct-4bit".as_ref(), Precision::Native)?;
//! let logits = model.logits(&[1, 2, 3])?; // [3, vocab], row-major
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod against;
pub mod anyres;
mod config;
mod idefics;
pub mod image;
pub mod metrics;
mod multimodal;
mod pixtral;
pub mod prompt;
mod qwen_image;
mod qwen_vision;
pub mod reference;
mod report;
mod rope;
mod text;
pub mod vision;
mod weights;

use std::path::PathBuf;

pub use against::TensorCheck;
pub use config::{ActKind, ArchSpec, EmbedScale, LayerSpec, RopeKind, TextConfig};
pub use idefics::{
    image_prompt_string, IdeficsImageProcessor, IdeficsPixels, IdeficsResize, IdeficsTokens,
    IdeficsVision,
};
pub use multimodal::{ImagePrompt, Pixels, Vision, DEFAULT_IMAGE_TEXT, IMAGE_ARCHS};
pub use pixtral::{
    pixtral_target_size, PixtralConfig, PixtralImageProcessor, PixtralPixels, PixtralVision,
};
pub use qwen_image::{patchify, smart_resize, QwenImageProcessor, QwenPixels};
pub use qwen_vision::{ImageFeatures, QwenVision, QwenVisionConfig, QwenVisionKind};
pub use reference::{RefImage, RefPrompt, Reference};
pub use report::{
    builtin_prompts, verify, ImageChoice, LevelReport, PromptReport, Report, ThresholdOverrides,
    Thresholds, VerifyOptions,
};
pub use rope::{
    mrope_angles, mrope_delta, mrope_image_positions, mrope_text_positions, ImageTokenIds,
    MropeStyle,
};
pub use text::{Deepstack, EmbedInput, HiddenState, TextModel};
pub use vision::{merge_image_features, VisionArch, VisionModel};

use crate::mlx::MlxError;

/// The precision the forward pass runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Weights as stored (bf16/f16/f32, quantized layers through `quantized_matmul`), like mlx-vlm's
    /// default forward.
    #[default]
    Native,
    /// Every floating parameter upcast to float32; quantized weights dequantized in float32 (scales and
    /// biases upcast first: MLX's dequantize computes `q * s + b` in the scales' dtype).
    Float32,
}

/// Errors of the verify stage.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the converted directory (files, safetensors headers).
    #[error(transparent)]
    Input(#[from] crate::Error),
    /// An MLX operation failed.
    #[error(transparent)]
    Mlx(#[from] MlxError),
    /// config.json is missing a field, has a wrong value, or disagrees with the stored weights.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A tensor the model needs is missing or has the wrong shape/dtype.
    #[error("{dir}: {msg}")]
    Weights { dir: PathBuf, msg: String },
    /// The architecture (or one of its options) is not covered by the verify forward yet.
    #[error("unsupported for verification: {0}")]
    Unsupported(String),
    /// Bad arguments to the forward pass (empty prompt, token id out of range, ...).
    #[error("{0}")]
    BadInput(String),
    /// The converted model cannot be loaded or run: the conversion is broken (verification fails).
    #[error("the converted model in {dir} cannot run: {msg}")]
    Broken { dir: PathBuf, msg: String },
    /// A reference logits file that is not valid.
    #[error("{path}: {msg}")]
    Reference { path: PathBuf, msg: String },
}

pub type Result<T, E = VerifyError> = std::result::Result<T, E>;
