//! vlm-convert: Hugging Face vision-language checkpoints to MLX models.
//!
//! Data flows one way through modules named after the pipeline stages:
//! [`source`] (find and validate the checkpoint) -> [`recipe`] (the architecture's mapping rules, data
//! files in `recipes/`) -> [`plan`] (every output tensor decided before heavy work) -> [`pipeline`]
//! (rayon: read, transform, [`quant`]ize, write through [`shard`]) -> output directory with
//! [`config`] rewritten and a [`provenance`] file. [`shapes`] holds the recipes' shape rules the plan
//! checks against config.json. [`dtype`] and [`error`] are shared leaves; [`cli`] is the command line;
//! [`check`] validates any MLX directory. [`hub`] fetches a source from the Hugging Face Hub (feeding
//! shards to the pipeline as they arrive) and uploads the output.

pub mod check;
pub mod cli;
pub mod config;
pub mod dequant;
pub mod dtype;
pub mod error;
pub mod hub;
#[cfg(feature = "mlx")]
pub mod mlx;
pub mod pipeline;
pub mod plan;
pub mod provenance;
pub mod quant;
pub mod quant_rules;
pub mod recipe;
pub mod shapes;
pub mod shard;
pub mod source;
#[cfg(feature = "mlx")]
pub mod verify;

pub use error::{Error, Result};
