//! What the forward pass needs to know about an architecture, as data: [`TextConfig`] (sizes and
//! constants, resolved from config.json the way mlx-vlm's config classes resolve them, defaults
//! included) and [`ArchSpec`] (switches: norm style, activation, rope, embedding scale, windows,
//! soft-capping). Both are derived from config.json's `model_type`s and fields, the recipe, and which
//! tensors are stored; nothing here is specific to one checkpoint.

use std::path::Path;

use serde_json::{Map, Value};

use super::rope::MropeStyle;
use super::{Result, VerifyError};
use crate::recipe::Recipe;

/// Sizes and constants of the language model, as mlx-vlm resolves them (its config dataclasses'
/// defaults apply when config.json omits a field).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Top-level `model_type` (the recipe's architecture, e.g. `llava`).
    pub model_type: String,
    /// The language model's `model_type` (e.g. `llama`, `qwen2`, `gemma3_text`).
    pub text_model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
}

/// The MLP's gate activation (`down(act(gate(x)) * up(x))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    /// `x * sigmoid(x)` (Llama, Mistral, Qwen).
    Silu,
    /// Tanh approximation, `mlx.nn.gelu_approx` (Gemma's `gelu_pytorch_tanh`).
    GeluApprox,
    /// Exact erf GELU (`hidden_activation = "gelu"`).
    Gelu,
}

/// How the token embeddings are scaled before the first layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedScale {
    None,
    /// `h * sqrt(hidden_size)`, the constant in the embeddings' dtype (Gemma 1/2 in mlx-vlm's
    /// PaliGemma).
    SqrtHidden,
    /// `h * sqrt(hidden_size)`, the constant rounded to bfloat16 first, whatever the embeddings' dtype
    /// (Gemma 3).
    SqrtHiddenBf16,
}

/// Rotary position embedding style.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// `mx.fast.rope` over the whole head (`nn.RoPE`), per-layer base and scale in [`LayerSpec`].
    Fast { traditional: bool },
    /// Qwen's multimodal rope: cos/sin of (temporal, height, width) positions, each frequency taking
    /// its position from the axis `mrope_section` assigns it (`style`), applied with rotate-half in the
    /// model's dtype. A text prompt has all three positions equal, which is ordinary rope.
    Mrope {
        section: Vec<usize>,
        style: MropeStyle,
        base: f32,
    },
}

/// Per-layer attention settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    /// Rope base (theta) of this layer ([`RopeKind::Fast`] only).
    pub rope_base: f32,
    /// Rope position scale (`1 / factor` for linear scaling).
    pub rope_scale: f32,
    /// Sliding-window size, if the layer attends locally.
    pub sliding_window: Option<usize>,
}

/// The switches that tell the architectures apart.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSpec {
    /// Short family name for messages (`llama`, `qwen2_vl`, `qwen3_vl`, `gemma`, `gemma2`, `gemma3`).
    pub family: &'static str,
    /// RMSNorm scales by `1 + w` (Gemma) instead of `w`.
    pub norm_plus_one: bool,
    /// Gemma 2/3: `post_attention_layernorm` normalizes the attention output before the residual, and
    /// the MLP is wrapped in `pre_feedforward_layernorm` / `post_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// RMSNorm of queries and keys per head (`q_norm`/`k_norm`; Qwen 3, Gemma 3): from the weights.
    pub qk_norm: bool,
    /// q/k/v projections have biases (Qwen 2): from the weights.
    pub attn_bias: bool,
    pub act: ActKind,
    pub embed_scale: EmbedScale,
    pub rope: RopeKind,
    /// Softmax scale of the attention (`head_dim^-0.5` or `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f32,
    /// Causal mask over the prompt; `false` = the whole prompt attends bidirectionally (PaliGemma's
    /// prefix-LM: mlx-vlm runs a text prompt as one prefix).
    pub causal: bool,
    /// Attention computed explicitly in float32 with `mx.softmax(precise=True)` (mlx-vlm's Gemma 2 path,
    /// needed for logit soft-capping) instead of the fused kernel.
    pub eager_attention: bool,
    pub attn_logit_softcap: Option<f32>,
    pub final_logit_softcap: Option<f32>,
    /// Gemma 3's float16 overflow guard: residual sums computed in float32 and clipped to the f16 range.
    pub clip_f16_residual: bool,
    /// Idefics3: input embeddings cast to the final norm's dtype.
    pub embeds_to_norm_dtype: bool,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
}

/// What differs between mlx-vlm's config classes and model wrappers of the top-level architectures
/// (keyed by the top-level `model_type`): where the text fields are read, the dataclass defaults for
/// fields config.json may omit, and a few wrapper behaviours.
struct Defaults {
    /// Read the text fields from the top level (the recipe's `flatten_text_config`: Qwen2-VL,
    /// Qwen2.5-VL); else from `text_config`.
    top_level: bool,
    /// Fill fields missing from `text_config` from the top level (mlx-vlm's PaliGemma config).
    fill_from_top_level: bool,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    num_attention_heads: Option<u64>,
    /// The attention reads config.json `head_dim` (else `hidden_size / heads`, whatever the field says).
    /// Gemma 2/3 and Qwen3 always read it.
    reads_head_dim: bool,
    /// `use_bidirectional_attention` when config.json does not say (PaliGemma: true, the prompt is a
    /// prefix).
    bidirectional_default: bool,
    /// Input embeddings are cast to the final norm's dtype (Idefics3's text model).
    embeds_to_norm_dtype: bool,
}

fn defaults(model_type: &str, flatten_text_config: bool) -> Defaults {
    let d = |rms, theta, heads| Defaults {
        top_level: flatten_text_config,
        fill_from_top_level: false,
        rms_norm_eps: rms,
        rope_theta: theta,
        num_attention_heads: heads,
        reads_head_dim: false,
        bidirectional_default: false,
        embeds_to_norm_dtype: false,
    };
    match model_type {
        "llava" => d(Some(1e-6), Some(10000.0), Some(32)),
        "llava_next" => d(Some(1e-5), Some(1_000_000.0), Some(32)),
        "llava_onevision" => d(Some(1e-6), Some(1_000_000.0), Some(14)),
        "idefics3" | "smolvlm" => Defaults {
            embeds_to_norm_dtype: true,
            ..d(None, Some(1_000_000.0), None)
        },
        "mistral3" => Defaults {
            reads_head_dim: true,
            ..d(None, None, None)
        },
        "qwen2_vl" | "qwen2_5_vl" => d(None, Some(1_000_000.0), None),
        "qwen3_vl" => d(None, None, None),
        "paligemma" => Defaults {
            fill_from_top_level: true,
            bidirectional_default: true,
            ..d(Some(1e-6), Some(10000.0), Some(16))
        },
        "gemma3" => d(Some(1e-6), None, Some(8)),
        _ => Defaults {
            reads_head_dim: true,
            ..d(None, None, None)
        },
    }
}

/// Field lookup in the text model's config (with mlx-vlm's fallbacks).
struct Fields<'a> {
    text: &'a Map<String, Value>,
    top: &'a Map<String, Value>,
    fill: bool,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        match self.text.get(key) {
            Some(v) if !v.is_null() => Some(v),
            _ if self.fill => self.top.get(key).filter(|v| !v.is_null()),
            _ => None,
        }
    }

    fn err(&self, msg: String) -> VerifyError {
        VerifyError::Config {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` is {v}, expected a number"))),
        }
    }

    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64> {
        self.f64(key)?.or(default).ok_or_else(|| {
            self.err(format!(
                "`{key}` is missing from the text model's config and mlx-vlm has no default for it"
            ))
        })
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` is {v}, expected a whole number"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` is {v}, expected true or false"))),
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    fn obj(&self, key: &str) -> Option<&Map<String, Value>> {
        self.get(key).and_then(Value::as_object)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2Vl,
    Qwen3Vl,
    Gemma,
    Gemma2,
    Gemma3,
}

impl Family {
    fn of(text_model_type: &str) -> Option<Family> {
        Some(match text_model_type {
            "llama" | "mistral" | "qwen2" => Family::Llama,
            "qwen2_vl" | "qwen2_5_vl" => Family::Qwen2Vl,
            "qwen3_vl" | "qwen3_vl_text" => Family::Qwen3Vl,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2Vl => "qwen2_vl",
            Family::Qwen3Vl => "qwen3_vl",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }
}

/// What the stored weights say about the language model (sizes are read from shapes; the config must
/// agree, as mlx-vlm's strict loading requires).
#[derive(Debug, Clone)]
pub(crate) struct WeightFacts {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Output features of layer 0's q/k projections and of its gate projection.
    pub q_out: usize,
    pub k_out: usize,
    pub intermediate: usize,
    pub qk_norm: bool,
    pub attn_bias: bool,
}

/// The `rope_scaling` position scale for `nn.RoPE`: `1 / factor` for linear scaling, 1 for none/default.
fn rope_position_scale(f: &Fields<'_>, scaling: Option<&Map<String, Value>>) -> Result<f32> {
    let Some(s) = scaling else { return Ok(1.0) };
    let kind = s
        .get("type")
        .or_else(|| s.get("rope_type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" | "mrope" => Ok(1.0),
        "linear" => {
            let factor = s.get("factor").and_then(Value::as_f64).ok_or_else(|| {
                f.err("`rope_scaling` of type linear has no numeric `factor`".into())
            })?;
            Ok((1.0 / factor) as f32)
        }
        other => Err(VerifyError::Unsupported(format!(
            "rope_scaling type `{other}` (only default and linear are implemented)"
        ))),
    }
}

/// Resolves the text model's config and switches from config.json (already parsed), the recipe and
/// the facts read from the weights.
pub(crate) fn resolve(
    config: &Value,
    recipe: &Recipe,
    facts: &WeightFacts,
    path: &Path,
) -> Result<(TextConfig, ArchSpec)> {
    let empty = Map::new();
    let top = config.as_object().unwrap_or(&empty);
    let model_type = top
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or(&recipe.name)
        .to_string();
    let defs = defaults(&model_type, recipe.config.flatten_text_config);
    let text = if defs.top_level {
        top
    } else {
        top.get("text_config")
            .and_then(Value::as_object)
            .unwrap_or(&empty)
    };
    let f = Fields {
        text,
        top,
        fill: defs.fill_from_top_level,
        path,
    };
    let text_model_type = f
        .str("model_type")
        .map(str::to_string)
        .or_else(|| defs.top_level.then(|| model_type.clone()))
        .ok_or_else(|| f.err("the text model's `model_type` is missing".into()))?;
    let family = Family::of(&text_model_type).ok_or_else(|| {
        VerifyError::Unsupported(format!(
            "language model type `{text_model_type}` (of `{model_type}`); supported: llama, mistral, \
             qwen2, qwen2_vl, qwen2_5_vl, qwen3_vl_text, gemma, gemma2, gemma3_text"
        ))
    })?;

    // Sizes: the weights decide; config.json must agree where it says something.
    let check = |key: &str, stored: usize| -> Result<usize> {
        match f.usize(key)? {
            Some(v) if v != stored => Err(f.err(format!(
                "`{key}` is {v} but the stored weights say {stored}"
            ))),
            _ => Ok(stored),
        }
    };
    let hidden_size = check("hidden_size", facts.hidden_size)?;
    let num_hidden_layers = check("num_hidden_layers", facts.num_layers)?;
    let intermediate_size = check("intermediate_size", facts.intermediate)?;
    let vocab_size = facts.vocab_size;
    let num_attention_heads = match f.usize("num_attention_heads")? {
        Some(n) => n,
        None => defs
            .num_attention_heads
            .map(|n| n as usize)
            .ok_or_else(|| {
                f.err("`num_attention_heads` is missing from the text model's config".into())
            })?,
    };
    if num_attention_heads == 0 {
        return Err(f.err("`num_attention_heads` is 0".into()));
    }
    let default_head_dim = match family {
        Family::Gemma2 | Family::Gemma3 => 256,
        _ => hidden_size / num_attention_heads,
    };
    let reads_head_dim =
        defs.reads_head_dim || matches!(family, Family::Gemma2 | Family::Gemma3 | Family::Qwen3Vl);
    let head_dim = if reads_head_dim {
        f.usize("head_dim")?.unwrap_or(default_head_dim)
    } else {
        default_head_dim
    };
    if head_dim == 0 || num_attention_heads * head_dim != facts.q_out {
        return Err(f.err(format!(
            "{num_attention_heads} heads of size {head_dim} do not match the stored q_proj \
             ({} output features)",
            facts.q_out
        )));
    }
    if !facts.k_out.is_multiple_of(head_dim) {
        return Err(f.err(format!(
            "the stored k_proj has {} output features, not a multiple of head_dim {head_dim}",
            facts.k_out
        )));
    }
    let num_key_value_heads = facts.k_out / head_dim;
    if let Some(n) = f.usize("num_key_value_heads")? {
        if n != num_key_value_heads {
            return Err(f.err(format!(
                "`num_key_value_heads` is {n} but the stored k_proj holds {num_key_value_heads} heads"
            )));
        }
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(f.err(format!(
            "{num_attention_heads} query heads are not a multiple of {num_key_value_heads} key/value heads"
        )));
    }
    let rms_norm_eps = f.f64_or("rms_norm_eps", defs.rms_norm_eps)? as f32;
    let traditional = f.bool_or("rope_traditional", false)?;
    let n = num_hidden_layers;

    let uniform = |base: f32, scale: f32| {
        vec![
            LayerSpec {
                rope_base: base,
                rope_scale: scale,
                sliding_window: None,
            };
            n
        ]
    };
    let head_scale = (head_dim as f64).powf(-0.5) as f32;
    let mut spec = ArchSpec {
        family: family.name(),
        norm_plus_one: family.is_gemma(),
        sandwich_norms: matches!(family, Family::Gemma2 | Family::Gemma3),
        qk_norm: facts.qk_norm,
        attn_bias: facts.attn_bias,
        act: if family.is_gemma() {
            ActKind::GeluApprox
        } else {
            ActKind::Silu
        },
        embed_scale: EmbedScale::None,
        rope: RopeKind::Fast { traditional },
        attn_scale: head_scale,
        causal: true,
        eager_attention: false,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        clip_f16_residual: false,
        embeds_to_norm_dtype: defs.embeds_to_norm_dtype,
        layers: Vec::new(),
    };

    match family {
        Family::Llama => {
            let theta = f.f64_or("rope_theta", defs.rope_theta)? as f32;
            let scale = rope_position_scale(&f, f.obj("rope_scaling"))?;
            spec.layers = uniform(theta, scale);
        }
        Family::Qwen2Vl | Family::Qwen3Vl => {
            let theta = f.f64_or("rope_theta", defs.rope_theta)? as f32;
            let section = f
                .obj("rope_parameters")
                .and_then(|p| p.get("mrope_section"))
                .or_else(|| f.obj("rope_scaling").and_then(|s| s.get("mrope_section")))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_u64().map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .unwrap_or_else(|| Some(vec![24, 20, 20]))
                .ok_or_else(|| f.err("`mrope_section` must be a list of whole numbers".into()))?;
            if section.len() != 3 {
                return Err(f.err(format!(
                    "`mrope_section` {section:?} must have 3 entries (temporal, height, width)"
                )));
            }
            spec.rope = RopeKind::Mrope {
                section,
                style: if family == Family::Qwen3Vl {
                    MropeStyle::Interleaved
                } else {
                    MropeStyle::Chunked
                },
                base: theta,
            };
            spec.layers = uniform(theta, 1.0);
        }
        Family::Gemma | Family::Gemma2 => {
            let theta = f.f64_or("rope_theta", defs.rope_theta)? as f32;
            spec.layers = uniform(theta, 1.0);
            spec.embed_scale = EmbedScale::SqrtHidden;
            let act = f
                .str("hidden_activation")
                .or_else(|| f.str("hidden_act"))
                .unwrap_or("gelu_pytorch_tanh");
            spec.act = match act {
                "gelu" => ActKind::Gelu,
                "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "tanh" => ActKind::GeluApprox,
                other => {
                    return Err(VerifyError::Unsupported(format!(
                        "Gemma activation `{other}`"
                    )))
                }
            };
            spec.causal = !f.bool_or("use_bidirectional_attention", defs.bidirectional_default)?;
            if family == Family::Gemma2 {
                let scalar = f.f64_or("query_pre_attn_scalar", Some(256.0))?;
                spec.attn_scale = (1.0 / scalar.sqrt()) as f32;
                spec.eager_attention = true;
                spec.attn_logit_softcap = f.f64("attn_logit_softcapping")?.map(|v| v as f32);
                spec.final_logit_softcap = f.f64("final_logit_softcapping")?.map(|v| v as f32);
            }
        }
        Family::Gemma3 => {
            spec.embed_scale = EmbedScale::SqrtHiddenBf16;
            spec.clip_f16_residual = true;
            let scalar = f.f64_or("query_pre_attn_scalar", Some(256.0))?;
            spec.attn_scale = scalar.powf(-0.5) as f32;
            // mlx-vlm's Gemma 3 reads `rope_global_base_freq` (default 1e6), not `rope_theta`.
            let global = f.f64_or("rope_global_base_freq", Some(1_000_000.0))? as f32;
            let local = f.f64_or("rope_local_base_freq", Some(10_000.0))? as f32;
            let global_scale = rope_position_scale(&f, f.obj("rope_scaling"))?;
            let window = f.usize("sliding_window")?.unwrap_or(1024);
            let pattern = f.usize("sliding_window_pattern")?.unwrap_or(6);
            if pattern == 0 {
                return Err(f.err("`sliding_window_pattern` is 0".into()));
            }
            spec.layers = (0..n)
                .map(|i| {
                    if (i + 1) % pattern != 0 {
                        LayerSpec {
                            rope_base: local,
                            rope_scale: 1.0,
                            sliding_window: Some(window),
                        }
                    } else {
                        LayerSpec {
                            rope_base: global,
                            rope_scale: global_scale,
                            sliding_window: None,
                        }
                    }
                })
                .collect();
        }
    }

    let cfg = TextConfig {
        model_type,
        text_model_type,
        hidden_size,
        num_hidden_layers,
        intermediate_size,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
    };
    Ok((cfg, spec))
}
