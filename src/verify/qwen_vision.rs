//! [`QwenVision`]: the vision transformer of Qwen2-VL, Qwen2.5-VL and Qwen3-VL in a converted
//! directory (`vision_tower.*`), run over MLX with mlx-vlm's semantics (`mlx_vlm/models/qwen2_vl/
//! vision.py`, `qwen2_5_vl/vision.py`, `qwen3_vl/vision.py`), so that its image features match
//! mlx-vlm's vision tower on the same `pixel_values` and grid.
//!
//! The input is what the Qwen image processor emits: `pixel_values` `[N, C*T*P*P]` (each row one patch,
//! channel-major: `[C, T, P, P]` flattened) and one `(t, h, w)` grid per image, in patches. Patches
//! come in merge-block order (the `merge x merge` patches that become one image token are consecutive),
//! which is why the rotary positions and the Qwen2.5 windows below are built in that order too.
//!
//! The three variants differ in data, not in structure:
//! - Qwen2-VL: LayerNorm blocks, fc1/fc2 MLP with QuickGELU (`gelu_fast_approx`), merger `ln_q` (LayerNorm)
//!   + `mlp.0`/GELU/`mlp.2`.
//! - Qwen2.5-VL: RMSNorm blocks, SwiGLU MLP, window attention (tokens reordered by window, blocks in
//!   `fullatt_block_indexes` attend over the whole image), RMSNorm merger; the reordering is undone
//!   after the merger.
//! - Qwen3-VL: biased patch embedding, a learned `pos_embed` grid bilinearly interpolated to each image,
//!   LayerNorm blocks, tanh-GELU MLP, `merger.norm`/`linear_fc1`/`linear_fc2`, and "deepstack" mergers
//!   (LayerNorm after the 2x2 shuffle) on the outputs of the blocks in `deepstack_visual_indexes`.
//!
//! Precision works as in [`super::TextModel`]: [`Precision::Native`] keeps the stored dtypes (quantized
//! layers through `quantized_matmul`), [`Precision::Float32`] upcasts every parameter and the input.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::mlx::fast::{self, Mask};
use crate::mlx::{self, Array, Dtype};

use super::rope::{inv_freq, mlx_cos, mlx_sin, mrope_image_positions, ImageTokenIds};
use super::text::{Deepstack, EmbedInput, TextModel};
use super::vision::merge_image_features;
use super::weights::{read_config, Embedding, Linear, Store};
use super::{Precision, Result, VerifyError};

/// Which Qwen vision transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QwenVisionKind {
    Qwen2Vl,
    Qwen25Vl,
    Qwen3Vl,
}

impl QwenVisionKind {
    /// From config.json's top-level `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<QwenVisionKind> {
        match model_type {
            "qwen2_vl" => Some(QwenVisionKind::Qwen2Vl),
            "qwen2_5_vl" => Some(QwenVisionKind::Qwen25Vl),
            "qwen3_vl" | "qwen3_vl_moe" => Some(QwenVisionKind::Qwen3Vl),
            _ => None,
        }
    }
}

/// The vision tower's settings (config.json `vision_config`, with mlx-vlm's defaults where a key is
/// absent; sizes are checked against the stored weights).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVisionConfig {
    pub kind: QwenVisionKind,
    /// Width of the transformer (`embed_dim` in Qwen2-VL, `hidden_size` later).
    pub hidden_size: usize,
    pub num_heads: usize,
    pub depth: usize,
    /// Width of the image features (the language model's hidden size).
    pub out_hidden_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// Qwen2.5-VL: the attention window in pixels.
    pub window_size: usize,
    /// Qwen2.5-VL: blocks that attend over the whole image.
    pub fullatt_block_indexes: Vec<usize>,
    /// Qwen3-VL: side of the learned position grid (`sqrt(num_position_embeddings)`).
    pub num_grid_per_side: usize,
    /// Qwen3-VL: blocks whose output feeds a deepstack merger (in this order).
    pub deepstack_visual_indexes: Vec<usize>,
    /// config.json `image_token_id` / `vision_start_token_id` (top level), if present.
    pub image_tokens: Option<ImageTokenIds>,
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch row of `pixel_values`: `C * T * P * P`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Parses config.json (the whole file); `path` names it in errors.
    pub fn from_config(config: &Value, path: &Path) -> Result<QwenVisionConfig> {
        let err = |msg: String| VerifyError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("`model_type` missing".into()))?;
        let kind = QwenVisionKind::from_model_type(model_type).ok_or_else(|| {
            VerifyError::Unsupported(format!("`{model_type}` has no Qwen vision transformer"))
        })?;
        let v = config
            .get("vision_config")
            .and_then(Value::as_object)
            .ok_or_else(|| err("`vision_config` missing".into()))?;
        let int = |keys: &[&str], default: usize| -> Result<usize> {
            for k in keys {
                if let Some(x) = v.get(*k) {
                    return x
                        .as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| err(format!("vision_config.{k} is not a whole number")));
                }
            }
            Ok(default)
        };
        let list = |key: &str, default: &[usize]| -> Result<Vec<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default.to_vec()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| err(format!("vision_config.{key} holds a non-integer")))
                    })
                    .collect(),
                Some(_) => Err(err(format!("vision_config.{key} is not a list"))),
            }
        };
        // mlx-vlm's VisionConfig defaults (models/<arch>/config.py).
        let (hidden_size, out_hidden_size) = match kind {
            QwenVisionKind::Qwen2Vl => (int(&["embed_dim"], 1280)?, int(&["hidden_size"], 1536)?),
            _ => (
                int(&["hidden_size"], 1280)?,
                int(&["out_hidden_size"], 1536)?,
            ),
        };
        let positions = int(&["num_position_embeddings"], 2304)?;
        let side = (positions as f64).sqrt() as usize;
        let cfg = QwenVisionConfig {
            kind,
            hidden_size,
            num_heads: int(&["num_heads"], 16)?,
            depth: int(&["depth"], 32)?,
            out_hidden_size,
            in_channels: int(&["in_channels", "in_chans"], 3)?,
            patch_size: int(&["patch_size"], 14)?,
            temporal_patch_size: int(&["temporal_patch_size"], 2)?,
            spatial_merge_size: int(&["spatial_merge_size"], 2)?,
            window_size: int(&["window_size"], 112)?,
            fullatt_block_indexes: list("fullatt_block_indexes", &[7, 15, 23, 31])?,
            num_grid_per_side: side,
            deepstack_visual_indexes: list("deepstack_visual_indexes", &[])?,
            image_tokens: match (
                config.get("image_token_id").and_then(Value::as_i64),
                config.get("vision_start_token_id").and_then(Value::as_i64),
            ) {
                (Some(i), Some(s)) => Some(ImageTokenIds {
                    image_token_id: i as i32,
                    vision_start_token_id: s as i32,
                }),
                _ => None,
            },
        };
        if cfg.num_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_heads)
            || !cfg.head_dim().is_multiple_of(4)
        {
            return Err(err(format!(
                "vision_config: width {} over {} heads does not give a head size divisible by 4 \
                 (2-D rotary positions need it)",
                cfg.hidden_size, cfg.num_heads
            )));
        }
        if cfg.patch_size == 0 || cfg.temporal_patch_size == 0 || cfg.spatial_merge_size == 0 {
            return Err(err(
                "vision_config: patch_size, temporal_patch_size and spatial_merge_size must be positive"
                    .into(),
            ));
        }
        if kind == QwenVisionKind::Qwen3Vl && side * side != positions {
            return Err(err(format!(
                "vision_config.num_position_embeddings = {positions} is not a square"
            )));
        }
        if kind == QwenVisionKind::Qwen25Vl
            && cfg.window_size < cfg.spatial_merge_size * cfg.patch_size
        {
            return Err(err(format!(
                "vision_config.window_size = {} is smaller than one merged patch ({} pixels)",
                cfg.window_size,
                cfg.spatial_merge_size * cfg.patch_size
            )));
        }
        Ok(cfg)
    }
}

/// Image features of one forward pass, float32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    /// One row per image token (`sum(t * h * w) / merge^2`), in the processor's (and the prompt's) order.
    pub tokens: usize,
    /// `out_hidden_size`.
    pub dim: usize,
    pub data: Vec<f32>,
    /// Qwen3-VL: the deepstack mergers' outputs, each `[tokens, dim]` (empty otherwise).
    pub deepstack: Vec<Vec<f32>>,
}

enum Norm {
    Layer { w: Array, b: Option<Array> },
    Rms { w: Array },
}

/// mlx-vlm builds every norm of these towers with `eps=1e-6`.
const NORM_EPS: f32 = 1e-6;

impl Norm {
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Norm::Layer { w, b } => fast::layer_norm(x, Some(w), b.as_ref(), NORM_EPS)?,
            Norm::Rms { w } => fast::rms_norm(x, Some(w), NORM_EPS)?,
        })
    }
}

#[derive(Clone, Copy)]
enum Act {
    /// `x * sigmoid(1.702 x)`: mlx `gelu_fast_approx` (Qwen2-VL's QuickGELU).
    Quick,
    /// mlx `gelu_approx` (tanh).
    Tanh,
}

enum Mlp {
    Gelu {
        fc1: Linear,
        fc2: Linear,
        act: Act,
    },
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Mlp::Gelu { fc1, fc2, act } => {
                let h = fc1.forward(x)?;
                let h = match act {
                    Act::Quick => {
                        let c = Array::scalar(1.702, h.dtype()?)?;
                        h.multiply(&c.multiply(&h)?.sigmoid()?)?
                    }
                    Act::Tanh => h.gelu_approx()?,
                };
                fc2.forward(&h)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let g = gate.forward(x)?.silu()?;
                down.forward(&g.multiply(&up.forward(x)?)?)
            }
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

/// The patch merger: norm, `merge^2` neighbouring patches concatenated, Linear, GELU, Linear.
struct Merger {
    norm: Norm,
    /// Qwen3-VL deepstack mergers normalise after the concatenation.
    postshuffle: bool,
    fc1: Linear,
    fc2: Linear,
}

impl Merger {
    fn forward(&self, x: &Array, merged_width: usize) -> Result<Array> {
        let w = merged_width as i32;
        let x = if self.postshuffle {
            self.norm.forward(&x.reshape(&[-1, w])?)?
        } else {
            self.norm.forward(x)?.reshape(&[-1, w])?
        };
        let h = self.fc1.forward(&x)?.gelu()?;
        self.fc2.forward(&h)
    }
}

/// The vision transformer of a converted Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory.
///
/// Not `Send`: MLX arrays belong to the thread that made them.
pub struct QwenVision {
    dir: PathBuf,
    precision: Precision,
    cfg: QwenVisionConfig,
    /// The Conv3d kernel as a matrix `[hidden, T*P*P*C]` (MLX layout `[O, T, P, P, C]` flattened).
    patch_w: Array,
    patch_b: Option<Array>,
    pos_embed: Option<Embedding>,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>,
}

impl QwenVision {
    /// Loads `vision_tower.*` of the converted directory `dir`. [`crate::mlx::init`] must have been
    /// called.
    pub fn load(dir: &Path, precision: Precision) -> Result<QwenVision> {
        let config = read_config(dir)?;
        let cfg = QwenVisionConfig::from_config(&config, &dir.join("config.json"))?;
        let store = Store::open(dir, &config, "vision_tower.", precision)?;
        QwenVision::from_store(dir, precision, cfg, &store)
    }

    /// The tower over tensors in a [`Store`] (a converted directory or a reference made from the
    /// source).
    pub(crate) fn from_store(
        dir: &Path,
        precision: Precision,
        cfg: QwenVisionConfig,
        store: &Store,
    ) -> Result<QwenVision> {
        let werr = |msg: String| VerifyError::Weights {
            dir: dir.to_path_buf(),
            msg,
        };
        let p = "vision_tower.";
        let kind = cfg.kind;

        // The Conv3d kernel must be in MLX's channels-last layout [O, T, P, P, C]; a kernel left in
        // PyTorch's [O, C, T, P, P] is a conversion bug, not something to guess around.
        let pw_name = format!("{p}patch_embed.proj.weight");
        let want = [
            cfg.hidden_size,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.patch_size,
            cfg.in_channels,
        ];
        match store.shape(&pw_name) {
            Some(s) if s == want => {}
            Some(s) => {
                return Err(werr(format!(
                    "`{pw_name}` has shape {s:?}, expected {want:?} ([out, T, P, P, C], MLX's \
                     channels-last Conv3d layout) from config.json vision_config"
                )))
            }
            None => return Err(werr(format!("tensor `{pw_name}` is missing"))),
        }
        let patch_w = store
            .float(&pw_name)?
            .reshape(&[cfg.hidden_size as i32, -1])?;
        let patch_b = store.float_opt(&format!("{p}patch_embed.proj.bias"))?;

        let norm = |name: &str| -> Result<Norm> {
            match kind {
                QwenVisionKind::Qwen25Vl => Ok(Norm::Rms {
                    w: store.float(&format!("{name}.weight"))?,
                }),
                _ => Ok(Norm::Layer {
                    w: store.float(&format!("{name}.weight"))?,
                    b: store.float_opt(&format!("{name}.bias"))?,
                }),
            }
        };

        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = format!("{p}blocks.{i}.");
            let mlp = match kind {
                QwenVisionKind::Qwen2Vl => Mlp::Gelu {
                    fc1: store.linear(&format!("{b}mlp.fc1"))?,
                    fc2: store.linear(&format!("{b}mlp.fc2"))?,
                    act: Act::Quick,
                },
                QwenVisionKind::Qwen25Vl => Mlp::SwiGlu {
                    gate: store.linear(&format!("{b}mlp.gate_proj"))?,
                    up: store.linear(&format!("{b}mlp.up_proj"))?,
                    down: store.linear(&format!("{b}mlp.down_proj"))?,
                },
                QwenVisionKind::Qwen3Vl => Mlp::Gelu {
                    fc1: store.linear(&format!("{b}mlp.linear_fc1"))?,
                    fc2: store.linear(&format!("{b}mlp.linear_fc2"))?,
                    act: Act::Tanh,
                },
            };
            let qkv = store.linear(&format!("{b}attn.qkv"))?;
            if qkv.out_features()? != 3 * cfg.hidden_size {
                return Err(werr(format!(
                    "`{b}attn.qkv` has {} outputs, expected 3 x {}",
                    qkv.out_features()?,
                    cfg.hidden_size
                )));
            }
            blocks.push(Block {
                norm1: norm(&format!("{b}norm1"))?,
                norm2: norm(&format!("{b}norm2"))?,
                qkv,
                proj: store.linear(&format!("{b}attn.proj"))?,
                mlp,
            });
        }
        if store.has(&format!("{p}blocks.{}.norm1.weight", cfg.depth)) {
            return Err(werr(format!(
                "more vision blocks are stored than vision_config.depth = {}",
                cfg.depth
            )));
        }

        let merger = match kind {
            QwenVisionKind::Qwen3Vl => Merger {
                norm: norm(&format!("{p}merger.norm"))?,
                postshuffle: false,
                fc1: store.linear(&format!("{p}merger.linear_fc1"))?,
                fc2: store.linear(&format!("{p}merger.linear_fc2"))?,
            },
            _ => Merger {
                norm: norm(&format!("{p}merger.ln_q"))?,
                postshuffle: false,
                fc1: store.linear(&format!("{p}merger.mlp.0"))?,
                fc2: store.linear(&format!("{p}merger.mlp.2"))?,
            },
        };
        if merger.fc2.out_features()? != cfg.out_hidden_size {
            return Err(werr(format!(
                "the merger gives {} features, config.json asks for {}",
                merger.fc2.out_features()?,
                cfg.out_hidden_size
            )));
        }
        let (pos_embed, deepstack) = match kind {
            QwenVisionKind::Qwen3Vl => {
                let mut ds = Vec::new();
                for j in 0..cfg.deepstack_visual_indexes.len() {
                    let m = format!("{p}deepstack_merger_list.{j}.");
                    ds.push(Merger {
                        norm: norm(&format!("{m}norm"))?,
                        postshuffle: true,
                        fc1: store.linear(&format!("{m}linear_fc1"))?,
                        fc2: store.linear(&format!("{m}linear_fc2"))?,
                    });
                }
                (Some(store.embedding(&format!("{p}pos_embed"))?), ds)
            }
            _ => (None, Vec::new()),
        };
        if let Some(&bad) = cfg
            .deepstack_visual_indexes
            .iter()
            .find(|&&i| i >= cfg.depth)
        {
            return Err(VerifyError::Config {
                path: dir.join("config.json"),
                msg: format!(
                    "vision_config.deepstack_visual_indexes names block {bad} of {}",
                    cfg.depth
                ),
            });
        }

        Ok(QwenVision {
            dir: dir.to_path_buf(),
            precision,
            cfg,
            patch_w,
            patch_b,
            pos_embed,
            blocks,
            merger,
            deepstack,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn config(&self) -> &QwenVisionConfig {
        &self.cfg
    }

    /// Image features for `pixel_values` (`[N, C*T*P*P]` row-major, as the processor emits them) and
    /// one `[t, h, w]` grid per image (in patches); `N` must be `sum(t * h * w)`.
    pub fn features(&self, pixel_values: &[f32], grid_thw: &[[usize; 3]]) -> Result<ImageFeatures> {
        let n = self.check_input(pixel_values.len(), grid_thw)?;
        let pv = Array::from_slice(pixel_values, &[n, self.cfg.patch_len()])?;
        let (feats, deep) = self.forward(&pv, grid_thw)?;
        let feats = feats.astype(Dtype::F32)?;
        let deep = deep
            .iter()
            .map(|d| d.astype(Dtype::F32))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut all: Vec<&Array> = vec![&feats];
        all.extend(deep.iter());
        mlx::eval(&all)?;
        Ok(ImageFeatures {
            tokens: n / self.cfg.merge_unit(),
            dim: self.cfg.out_hidden_size,
            data: feats.to_vec_f32()?,
            deepstack: deep
                .iter()
                .map(|d| d.to_vec_f32())
                .collect::<std::result::Result<Vec<_>, _>>()?,
        })
    }

    /// Validates the grid against the input size; returns the number of patches.
    fn check_input(&self, values: usize, grid_thw: &[[usize; 3]]) -> Result<usize> {
        let m = self.cfg.spatial_merge_size;
        if grid_thw.is_empty() {
            return Err(VerifyError::BadInput("no image grid".into()));
        }
        let mut n = 0usize;
        for g in grid_thw {
            if g.contains(&0) || g[1] % m != 0 || g[2] % m != 0 {
                return Err(VerifyError::BadInput(format!(
                    "image grid {g:?}: t, h, w must be positive and h, w multiples of the merge size {m}"
                )));
            }
            n = g[0]
                .checked_mul(g[1])
                .and_then(|x| x.checked_mul(g[2]))
                .and_then(|x| x.checked_add(n))
                .ok_or_else(|| VerifyError::BadInput(format!("image grid {g:?} is too large")))?;
        }
        let k = self.cfg.patch_len();
        if n.checked_mul(k) != Some(values) {
            return Err(VerifyError::BadInput(format!(
                "pixel_values has {values} values; the grids {grid_thw:?} need {n} patches of {k}"
            )));
        }
        Ok(n)
    }

    /// The forward pass on MLX arrays: `pixel_values` `[N, C*T*P*P]` (any float dtype; cast to the
    /// patch embedding's, as mlx-vlm's `get_input_embeddings` does) -> features `[N / merge^2, out]`
    /// and the deepstack features, lazy, in the working dtype.
    pub(crate) fn forward(
        &self,
        pixel_values: &Array,
        grid_thw: &[[usize; 3]],
    ) -> Result<(Array, Vec<Array>)> {
        let cfg = &self.cfg;
        let n = pixel_values.shape()?.first().copied().unwrap_or(0);
        self.check_input(n * cfg.patch_len(), grid_thw)?;
        let dtype = self.patch_w.dtype()?;
        let (c, t, p) = (
            cfg.in_channels as i32,
            cfg.temporal_patch_size as i32,
            cfg.patch_size as i32,
        );
        let ni = n as i32;

        // Conv3d with stride == kernel over one patch each: a matmul of the patch, channels moved last
        // to match the kernel's layout (bit-identical to mx.conv3d here).
        let x = pixel_values
            .astype(dtype)?
            .reshape(&[ni, c, t, p, p])?
            .transpose(&[0, 2, 3, 4, 1])?
            .reshape(&[ni, -1])?;
        let mut h = x.matmul(&self.patch_w.transpose(&[1, 0])?)?;
        if let Some(b) = &self.patch_b {
            h = h.add(b)?;
        }
        if let Some(pe) = &self.pos_embed {
            h = h.add(&self.position_embeddings(pe, grid_thw)?)?;
        }

        // Rotary angles per patch: concat(freqs[row], freqs[col]), head_dim / 2 values.
        let hd = cfg.head_dim();
        let positions = patch_positions(grid_thw, cfg.spatial_merge_size);
        let freqs = inv_freq(hd / 2, 10000.0)?;
        let mut angles: Vec<f32> = Vec::with_capacity(n * hd / 2);
        for [r, col] in &positions {
            angles.extend(freqs.iter().map(|f| *r as f32 * f));
            angles.extend(freqs.iter().map(|f| *col as f32 * f));
        }

        let unit = cfg.merge_unit();
        let full_cu = full_cu_seqlens(grid_thw);
        let mut window: Option<(Vec<usize>, Vec<usize>)> = None;
        if cfg.kind == QwenVisionKind::Qwen25Vl {
            let vws = cfg.window_size / cfg.spatial_merge_size / cfg.patch_size;
            let (index, cu) = window_index(grid_thw, cfg.spatial_merge_size, vws);
            // Reorder the merge units (hidden states and their angles) window by window.
            let idx = Array::from_slice(
                &index.iter().map(|&i| i as i32).collect::<Vec<_>>(),
                &[index.len()],
            )?;
            h = h
                .reshape(&[(n / unit) as i32, unit as i32, -1])?
                .take(&idx, 0)?
                .reshape(&[ni, -1])?;
            let per_unit = unit * hd / 2;
            let mut reordered = Vec::with_capacity(angles.len());
            for &i in &index {
                reordered.extend_from_slice(&angles[i * per_unit..(i + 1) * per_unit]);
            }
            angles = reordered;
            window = Some((index, cu));
        }
        let (cos, sin) = rotary_tables(&angles, n, hd)?;

        let mut deep = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            let cu = match &window {
                Some((_, wcu)) if !cfg.fullatt_block_indexes.contains(&i) => wcu,
                _ => &full_cu,
            };
            h = self.block(blk, &h, cu, &cos, &sin)?;
            if let Some(j) = cfg.deepstack_visual_indexes.iter().position(|&d| d == i) {
                let m = self.deepstack.get(j).ok_or_else(|| {
                    VerifyError::Unsupported(format!("deepstack merger {j} is missing"))
                })?;
                deep.push(m.forward(&h, cfg.hidden_size * unit)?);
            }
        }
        let mut out = self.merger.forward(&h, cfg.hidden_size * unit)?;
        if let Some((index, _)) = &window {
            let mut inverse = vec![0i32; index.len()];
            for (pos, &i) in index.iter().enumerate() {
                inverse[i] = pos as i32;
            }
            let inv = Array::from_slice(&inverse, &[inverse.len()])?;
            out = out.take(&inv, 0)?;
        }
        Ok((out, deep))
    }

    /// The language model's input for an image prompt, as mlx-vlm's Qwen-VL `get_input_embeddings`
    /// builds it: the image features replace the embeddings of the image tokens in order, the
    /// positions are [`mrope_image_positions`], and Qwen3-VL's deepstack features go with them.
    /// `ids` must hold one image token per feature row (the processor's expansion).
    pub fn input(
        &self,
        text: &TextModel,
        ids: &[i32],
        pixel_values: &[f32],
        grid_thw: &[[usize; 3]],
    ) -> Result<EmbedInput> {
        let tokens = self.cfg.image_tokens.ok_or_else(|| VerifyError::Config {
            path: self.dir.join("config.json"),
            msg: "`image_token_id` / `vision_start_token_id` missing".into(),
        })?;
        let n = self.check_input(pixel_values.len(), grid_thw)?;
        let pv = Array::from_slice(pixel_values, &[n, self.cfg.patch_len()])?;
        let (features, deep) = self.forward(&pv, grid_thw)?;
        let fs = features.shape()?;
        let features = features.reshape(&[1, fs[0] as i32, fs[1] as i32])?;
        let embeds = text.embed_tokens(ids)?;
        let dtype = embeds.dtype()?;
        let merged =
            merge_image_features(ids, &embeds, &features, tokens.image_token_id, None, dtype)?;
        let positions = mrope_image_positions(ids, tokens, grid_thw, self.cfg.spatial_merge_size)?;
        let deepstack = (!deep.is_empty()).then(|| Deepstack {
            positions: ids
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == tokens.image_token_id)
                .map(|(i, _)| i)
                .collect(),
            layers: deep,
        });
        Ok(EmbedInput {
            embeds: merged,
            positions: Some(positions),
            deepstack,
        })
    }

    /// Logits `[n, vocab]` (float32, row-major) of an image prompt, as mlx-vlm's forward runs it
    /// (see [`QwenVision::input`]).
    pub fn prompt_logits(
        &self,
        text: &TextModel,
        ids: &[i32],
        pixel_values: &[f32],
        grid_thw: &[[usize; 3]],
    ) -> Result<Vec<f32>> {
        let input = self.input(text, ids, pixel_values, grid_thw)?;
        Ok(text.logits_from_input(ids, &input, false)?.0)
    }

    fn block(
        &self,
        blk: &Block,
        x: &Array,
        cu: &[usize],
        cos: &Array,
        sin: &Array,
    ) -> Result<Array> {
        let a = self.attention(blk, &blk.norm1.forward(x)?, cu, cos, sin)?;
        let h = x.add(&a)?;
        let m = blk.mlp.forward(&blk.norm2.forward(&h)?)?;
        Ok(h.add(&m)?)
    }

    fn attention(
        &self,
        blk: &Block,
        x: &Array,
        cu: &[usize],
        cos: &Array,
        sin: &Array,
    ) -> Result<Array> {
        let cfg = &self.cfg;
        let n = x.shape()?[0] as i32;
        let (nh, hd) = (cfg.num_heads as i32, cfg.head_dim() as i32);
        // [N, 3, H, hd] -> [3, N, H, hd]; q, k, v each [N, H, hd].
        let qkv = blk
            .qkv
            .forward(x)?
            .reshape(&[n, 3, nh, hd])?
            .transpose(&[1, 0, 2, 3])?;
        let part = |i: i32| -> Result<Array> {
            Ok(qkv
                .slice(&[i, 0, 0, 0], &[i + 1, n, nh, hd], &[1, 1, 1, 1])?
                .reshape(&[n, nh, hd])?)
        };
        let q = apply_rotary(&part(0)?, cos, sin)?;
        let k = apply_rotary(&part(1)?, cos, sin)?;
        let v = part(2)?;
        // [1, H, N, hd]
        let perm = [1, 0, 2];
        let q = q.transpose(&perm)?.reshape(&[1, nh, n, hd])?;
        let k = k.transpose(&perm)?.reshape(&[1, nh, n, hd])?;
        let v = v.transpose(&perm)?.reshape(&[1, nh, n, hd])?;
        let scale = (hd as f64).powf(-0.5) as f32;
        let mut outs = Vec::with_capacity(cu.len());
        for w in cu.windows(2) {
            let (lo, hi) = (w[0] as i32, w[1] as i32);
            if hi <= lo {
                continue;
            }
            let seg = |a: &Array| a.slice(&[0, 0, lo, 0], &[1, nh, hi, hd], &[1, 1, 1, 1]);
            let (qs, ks, vs) = (seg(&q)?, seg(&k)?, seg(&v)?);
            let o = if cfg.kind == QwenVisionKind::Qwen3Vl {
                padded_sdpa(&qs, &ks, &vs, scale)?
            } else {
                fast::scaled_dot_product_attention(&qs, &ks, &vs, scale, Mask::None)?
            };
            outs.push(o);
        }
        let refs: Vec<&Array> = outs.iter().collect();
        let o = mlx::concatenate(&refs, 2)?
            .transpose(&[0, 2, 1, 3])?
            .reshape(&[n, nh * hd])?;
        blk.proj.forward(&o)
    }

    /// Qwen3-VL's learned positions, bilinearly interpolated from the `side x side` grid to each
    /// image's `h x w`, repeated over `t`, in merge-block order (mlx-vlm `fast_pos_embed_interpolate`).
    fn position_embeddings(&self, pe: &Embedding, grid_thw: &[[usize; 3]]) -> Result<Array> {
        let cfg = &self.cfg;
        let (idx, weights) = interpolation(grid_thw, cfg.num_grid_per_side);
        let total = idx[0].len();
        let flat_idx: Vec<i32> = idx.iter().flatten().map(|&i| i as i32).collect();
        let rows = pe.lookup(&Array::from_slice(&flat_idx, &[4, total])?)?; // [4, total, D]
        let wdt = rows.dtype()?;
        let flat_w: Vec<f32> = weights.iter().flatten().copied().collect();
        let w = Array::from_slice(&flat_w, &[4, total, 1])?.astype(wdt)?;
        let weighted = rows.multiply(&w)?;
        let corner = |i: i32| -> Result<Array> {
            let d = cfg.hidden_size as i32;
            Ok(weighted
                .slice(&[i, 0, 0], &[i + 1, total as i32, d], &[1, 1, 1])?
                .reshape(&[total as i32, d])?)
        };
        let sum = corner(0)?
            .add(&corner(1)?)?
            .add(&corner(2)?)?
            .add(&corner(3)?)?;
        // Per image: tile over t, then reorder rows to merge-block order.
        let m = cfg.spatial_merge_size;
        let mut order: Vec<i32> = Vec::new();
        let mut base = 0usize;
        for &[t, h, w] in grid_thw {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                order.push((base + (bh * m + ih) * w + bw * m + iw) as i32);
                            }
                        }
                    }
                }
            }
            base += h * w;
        }
        let order = Array::from_slice(&order, &[order.len()])?;
        Ok(sum.take(&order, 0)?)
    }
}

/// `q * cos + rotate_half(q) * sin` with float32 tables (the result promotes to float32, as in
/// mlx-vlm's `apply_rotary_pos_emb_vision`), cast back to `x`'s dtype. `x`: `[N, H, hd]`.
fn apply_rotary(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let s = x.shape()?;
    let (n, nh, hd) = (s[0] as i32, s[1] as i32, s[2] as i32);
    let half = hd / 2;
    let x1 = x.slice(&[0, 0, 0], &[n, nh, half], &[1, 1, 1])?;
    let x2 = x.slice(&[0, 0, half], &[n, nh, hd], &[1, 1, 1])?;
    let rot = mlx::concatenate(&[&x2.negative()?, &x1], -1)?;
    let out = x.multiply(cos)?.add(&rot.multiply(sin)?)?;
    Ok(out.astype(x.dtype()?)?)
}

/// `cos`/`sin` of `concat(angles, angles)` as float32 `[N, 1, head_dim]` (MLX's CPU cos/sin).
fn rotary_tables(angles: &[f32], n: usize, head_dim: usize) -> Result<(Array, Array)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    for row in angles.chunks(half.max(1)) {
        for _ in 0..2 {
            cos.extend(row.iter().map(|&a| mlx_cos(a)));
            sin.extend(row.iter().map(|&a| mlx_sin(a)));
        }
    }
    Ok((
        Array::from_slice(&cos, &[n, 1, head_dim])?,
        Array::from_slice(&sin, &[n, 1, head_dim])?,
    ))
}

/// mlx-vlm's `ensure_fused_sdpa` (Qwen3-VL): the head size is zero-padded to the next size MLX's fused
/// kernel supports (64, 80, 128) and the output cut back.
fn padded_sdpa(q: &Array, k: &Array, v: &Array, scale: f32) -> Result<Array> {
    let s = q.shape()?;
    let d = s[3];
    let target = [64usize, 80, 128]
        .into_iter()
        .find(|&t| d <= t)
        .unwrap_or(d);
    if target == d {
        return Ok(fast::scaled_dot_product_attention(
            q,
            k,
            v,
            scale,
            Mask::None,
        )?);
    }
    let pad = |a: &Array| -> Result<Array> {
        let sh = a.shape()?;
        let zshape = [sh[0], sh[1], sh[2], target - d];
        let zeros = Array::from_slice(&vec![0.0f32; zshape.iter().product()], &zshape)?
            .astype(a.dtype()?)?;
        Ok(mlx::concatenate(&[a, &zeros], 3)?)
    };
    let o = fast::scaled_dot_product_attention(&pad(q)?, &pad(k)?, &pad(v)?, scale, Mask::None)?;
    let so = o.shape()?;
    Ok(o.slice(
        &[0, 0, 0, 0],
        &[so[0] as i32, so[1] as i32, so[2] as i32, d as i32],
        &[1, 1, 1, 1],
    )?)
}

/// The (row, column) of every patch in the processor's order: per image, per frame, merge blocks
/// row-major, and within a block its `merge x merge` patches row-major.
pub fn patch_positions(grid_thw: &[[usize; 3]], merge: usize) -> Vec<[usize; 2]> {
    let mut out = Vec::new();
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            out.push([bh * merge + ih, bw * merge + iw]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Boundaries of full attention: every frame of every image attends within itself.
fn full_cu_seqlens(grid_thw: &[[usize; 3]]) -> Vec<usize> {
    let mut cu = vec![0usize];
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            cu.push(cu[cu.len() - 1] + h * w);
        }
    }
    cu
}

/// Qwen2.5-VL's windows (mlx-vlm `get_window_index`): the merge units of each frame are cut into
/// `vws x vws` windows (the grid padded up to a multiple of `vws`, and by a full window when it is
/// one already, as mlx-vlm pads); returns the merge units in window order and the patch boundaries of
/// the non-empty windows.
pub fn window_index(grid_thw: &[[usize; 3]], merge: usize, vws: usize) -> (Vec<usize>, Vec<usize>) {
    let unit = merge * merge;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut base = 0usize;
    let vws = vws.max(1);
    for &[t, h, w] in grid_thw {
        let (gh, gw) = (h / merge, w / merge);
        let nwh = (gh + vws - gh % vws) / vws;
        let nww = (gw + vws - gw % vws) / vws;
        for f in 0..t {
            for wh in 0..nwh {
                for ww in 0..nww {
                    let mut count = 0;
                    for r in wh * vws..((wh + 1) * vws).min(gh) {
                        for c in ww * vws..((ww + 1) * vws).min(gw) {
                            index.push(base + f * gh * gw + r * gw + c);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        cu.push(cu[cu.len() - 1] + count * unit);
                    }
                }
            }
        }
        base += t * gh * gw;
    }
    (index, cu)
}

/// Qwen3-VL's bilinear interpolation of the `side x side` position grid to each image's `h x w`
/// (mlx-vlm `fast_pos_embed_interpolate`): for the four corners, the table rows and the weights,
/// per patch in row-major order, images concatenated (one frame each; frames repeat it).
/// `linspace` and the weights follow MLX's float32 arithmetic.
fn interpolation(grid_thw: &[[usize; 3]], side: usize) -> ([Vec<usize>; 4], [Vec<f32>; 4]) {
    let mut idx: [Vec<usize>; 4] = Default::default();
    let mut wts: [Vec<f32>; 4] = Default::default();
    let last = side.saturating_sub(1);
    // mx.linspace(0, stop, n): t = i / (n - 1), (1 - t) * 0 + t * stop, in float32.
    let linspace = |n: usize| -> Vec<f32> {
        if n == 1 {
            return vec![0.0];
        }
        (0..n)
            .map(|i| {
                let t = i as f32 / (n - 1) as f32;
                (1.0 - t) * 0.0 + t * last as f32
            })
            .collect()
    };
    for &[_, h, w] in grid_thw {
        let hs = linspace(h);
        let ws = linspace(w);
        for &hv in &hs {
            let hf = hv as usize;
            let hc = (hf + 1).min(last);
            let dh = hv - hf as f32;
            for &wv in &ws {
                let wf = wv as usize;
                let wc = (wf + 1).min(last);
                let dw = wv - wf as f32;
                let corners = [
                    (hf * side + wf, (1.0 - dh) * (1.0 - dw)),
                    (hf * side + wc, (1.0 - dh) * dw),
                    (hc * side + wf, dh * (1.0 - dw)),
                    (hc * side + wc, dh * dw),
                ];
                for (k, (i, wt)) in corners.into_iter().enumerate() {
                    idx[k].push(i);
                    wts[k].push(wt);
                }
            }
        }
    }
    (idx, wts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_merge_blocks() {
        // grid 1 x 2 x 4, merge 2: blocks (0,0) then (0,1); inside each, rows then columns.
        assert_eq!(
            patch_positions(&[[1, 2, 4]], 2),
            [
                [0, 0],
                [0, 1],
                [1, 0],
                [1, 1],
                [0, 2],
                [0, 3],
                [1, 2],
                [1, 3]
            ]
        );
        // frames repeat the same positions
        let p = patch_positions(&[[2, 2, 2]], 2);
        assert_eq!(p[..4], p[4..]);
    }

    #[test]
    fn windows_match_mlx_vlm() {
        // merged grid 3 x 5, windows of 2: padded to 4 x 6 -> 2 x 3 windows.
        let (index, cu) = window_index(&[[1, 6, 10]], 2, 2);
        assert_eq!(index, [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(cu, [0, 16, 32, 40, 48, 56, 60]);
        // A grid that is a multiple of the window gets an empty padding window, which adds nothing.
        let (index, cu) = window_index(&[[1, 4, 4]], 2, 2);
        assert_eq!(index, [0, 1, 2, 3]);
        assert_eq!(cu, [0, 16]);
        // Two images: the second's units come after the first's.
        let (index, cu) = window_index(&[[1, 2, 2], [2, 2, 2]], 2, 4);
        assert_eq!(index, [0, 1, 2]);
        assert_eq!(cu, [0, 4, 8, 12]);
    }

    #[test]
    fn full_attention_is_per_frame() {
        assert_eq!(full_cu_seqlens(&[[1, 4, 8], [2, 2, 2]]), [0, 32, 36, 40]);
    }

    #[test]
    fn interpolation_weights_sum_to_one() {
        let (idx, w) = interpolation(&[[1, 6, 4]], 8);
        for p in 0..24 {
            let s: f32 = (0..4).map(|k| w[k][p]).sum();
            assert!((s - 1.0).abs() < 1e-6, "{p}: {s}");
            assert!((0..4).all(|k| idx[k][p] < 64));
        }
        // corners of the image map to corners of the table
        assert_eq!(idx[0][0], 0);
        assert_eq!(idx[0][23], 63);
        assert_eq!(w[0][23], 1.0);
    }
}
