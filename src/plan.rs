//! The plan: before any heavy work, every output tensor's source, layout change, dtype, quantization,
//! shard and byte offset. Built from tensor descriptions only (no tensor bytes), so `--dry-run` is
//! instant and every mapping error surfaces before the slow part.

use crate::config::{ConfigView, ModuleQuant, QuantConfig};
use crate::dequant::Packed;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{self, QuantMode, QuantSpec};
use crate::quant_rules::QuantRules;
use crate::recipe::{Action, Layout, Recipe, TiedHead};
use crate::shard::{layout_shard, ShardHeader, TensorLayout};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// mlx-vlm only rebuilds a module as quantized at load time when its weight has a multiple of 64
/// elements (`get_class_predicate`), so a module failing this must stay float to load.
const LOADER_SIZE_MULTIPLE: usize = 64;

/// A source tensor as the plan sees it.
#[derive(Debug, Clone)]
pub struct SourceDesc {
    pub name: String,
    /// For a packed (MLX-quantized) weight: the float dtype and shape it dequantizes to.
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The tensor is an MLX-quantized weight, dequantized on read.
    pub packed: Option<Packed>,
}

impl SourceDesc {
    /// A tensor as stored in the source (not packed).
    pub fn stored(name: &str, t: &crate::source::SourceTensor) -> SourceDesc {
        SourceDesc {
            name: name.to_string(),
            dtype: t.info.dtype,
            shape: t.info.shape.clone(),
            packed: None,
        }
    }
}

/// Conversion settings that shape the plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// `--dtype`; `None` means the checkpoint's own dtype from config.json.
    pub dtype: Option<DType>,
    /// Quantize, with these per-module rules.
    pub quant: Option<QuantRules>,
    pub max_shard_size: u64,
    /// The source was written by MLX: its layouts are already MLX's, so no layout change applies.
    pub source_is_mlx: bool,
}

/// What an output tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The (cast, re-laid-out) tensor itself.
    Tensor,
    /// Packed quantized levels.
    Weight,
    Scales,
    Biases,
}

/// Where one output tensor lands.
#[derive(Debug, Clone, Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub role: Role,
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub nbytes: usize,
    pub shard: usize,
    /// Absolute byte offset in the shard file.
    pub offset: usize,
}

fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// One source tensor's journey: read, change layout, cast, quantize, write 1 or 3 outputs.
#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    pub source: String,
    #[serde(serialize_with = "ser_dtype")]
    pub source_dtype: DType,
    pub source_shape: Vec<usize>,
    /// MLX name of the (first) output.
    pub name: String,
    #[serde(serialize_with = "ser_layout")]
    pub layout: Option<Layout>,
    /// Element type after the cast (for quantized tensors: the scales' type).
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    #[serde(serialize_with = "ser_quant")]
    pub quant: Option<QuantSpec>,
    /// `[tensor]`, or `[weight, scales, biases]` when quantized (`[scales, biases]` for a head whose
    /// packed weight the loader takes from the embedding; no biases in the fp modes).
    pub outputs: Vec<OutputTensor>,
    /// The source is an MLX-quantized weight (`source_dtype`/`source_shape` describe the float
    /// tensor it dequantizes to).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_packed")]
    pub packed: Option<Packed>,
}

fn ser_packed<S: serde::Serializer>(
    p: &Option<Packed>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_str(&format!("dequantize {}", p.spec.label())),
        None => s.serialize_none(),
    }
}

fn ser_layout<S: serde::Serializer>(
    l: &Option<Layout>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match l {
        Some(l) => s.serialize_str(&l.name()),
        None => s.serialize_none(),
    }
}

fn ser_quant<S: serde::Serializer>(
    q: &Option<QuantSpec>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match q {
        Some(q) => s.serialize_str(&q.label()),
        None => s.serialize_none(),
    }
}

impl TensorPlan {
    /// Elements in the last axis (after the layout change): the quantization row length.
    pub fn row_len(&self) -> usize {
        self.out_shape().last().copied().unwrap_or(1)
    }

    /// Shape after the layout change (before quantization packs it).
    pub fn out_shape(&self) -> Vec<usize> {
        match &self.layout {
            Some(l) => l.perm().iter().map(|&i| self.source_shape[i]).collect(),
            None => self.source_shape.clone(),
        }
    }

    pub fn numel(&self) -> usize {
        self.source_shape.iter().product()
    }

    /// Bytes read from the source: the packed weight for a quantized source (its scales and biases
    /// are small and not counted).
    pub fn source_bytes(&self) -> usize {
        match &self.packed {
            Some(p) => self.numel() * p.spec.bits as usize / 8,
            None => self.numel() * self.source_dtype.size(),
        }
    }

    /// Bytes of one source row (the last axis).
    pub fn source_row_bytes(&self) -> usize {
        let k = self.source_shape.last().copied().unwrap_or(1);
        match &self.packed {
            Some(p) => k * p.spec.bits as usize / 8,
            None => k * self.source_dtype.size(),
        }
    }
}

/// An output shard: file name and header.
pub struct ShardPlan {
    pub file_name: String,
    pub tensors: Vec<TensorLayout>,
    pub header: ShardHeader,
}

/// A module (a matrix weight) left float in a quantized conversion, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Unquantized {
    pub module: String,
    pub reason: String,
}

/// Effective bits per weight (see [`Plan::bits_per_weight`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BitsPerWeight {
    pub overall: f64,
    pub language: Option<f64>,
    /// Everything outside `language_model.`: the vision tower and projector.
    pub vision: Option<f64>,
}

/// A source tensor left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    pub tensor: String,
    pub reason: String,
}

pub struct Plan {
    pub recipe: String,
    pub tensors: Vec<TensorPlan>,
    pub shards: Vec<ShardPlan>,
    pub dropped: Vec<Dropped>,
    pub unquantized: Vec<Unquantized>,
    pub quant: Option<QuantConfig>,
    /// The float type floats are written in (`None`: each tensor keeps its own).
    pub dtype: Option<DType>,
    /// Sum of output tensor bytes.
    pub total_size: usize,
    /// Logical parameters (elements before quantization).
    pub total_parameters: usize,
    /// Settings the plan resolved that config.json must carry (dotted key, value).
    pub config_updates: Vec<(String, serde_json::Value)>,
    /// Things the user should know (e.g. an override that matched no module).
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn build(
        sources: &[SourceDesc],
        config: &serde_json::Value,
        recipe: &Recipe,
        opts: &PlanOptions,
    ) -> Result<Plan> {
        let view = ConfigView(config);
        // An MLX directory's tensors are already in the dtype chosen when it was made; its config may
        // still name the original one (mlx-vlm keeps nested `torch_dtype`s), so only --dtype casts it.
        let target_dtype = opts.dtype.or_else(|| {
            if opts.source_is_mlx {
                None
            } else {
                view.dtype()
            }
        });

        // 1. Names: every source tensor must meet a rule.
        let mut unmatched = Vec::new();
        let mut dropped = Vec::new();
        let mut renamed: Vec<(&SourceDesc, String)> = Vec::new();
        let mut seen: HashMap<String, &str> = HashMap::new();
        for s in sources {
            match recipe.map_name(&s.name) {
                None => unmatched.push(s.name.clone()),
                Some(Action::Drop(reason)) => dropped.push(Dropped {
                    tensor: s.name.clone(),
                    reason,
                }),
                Some(Action::Rename(to)) => {
                    if let Some(prev) = seen.insert(to.clone(), &s.name) {
                        return Err(Error::Recipe {
                            recipe: recipe.origin.clone(),
                            msg: format!(
                                "source tensors `{prev}` and `{}` both map to `{to}`; the checkpoint mixes two layouts or the recipe is ambiguous",
                                s.name
                            ),
                        });
                    }
                    renamed.push((s, to));
                }
            }
        }
        if !unmatched.is_empty() {
            let count = unmatched.len();
            let mut list: Vec<String> = unmatched
                .iter()
                .take(20)
                .map(|n| format!("`{n}`"))
                .collect();
            if count > 20 {
                list.push(format!("and {} more", count - 20));
            }
            return Err(Error::UnmatchedTensors {
                recipe: recipe.origin.clone(),
                count,
                list: list.join(", "),
            });
        }

        // 2. The output head. The tie flag may sit in several places (and transformers 4 and 5 read
        // different ones); a checkpoint without a head but with an explicit `true` anywhere is tied.
        let mut config_updates = Vec::new();
        let mut alias_head: Option<String> = None;
        if let Some(h) = &recipe.head {
            let flags = view.tie_flags(h.config_key.as_deref());
            let has_head = renamed.iter().any(|(_, n)| *n == h.head);
            let embed = renamed
                .iter()
                .find(|(_, n)| *n == h.embedding)
                .map(|(s, _)| *s);
            let mut tied = flags.first().copied().unwrap_or(h.tie_default);
            if !tied && !has_head && embed.is_some() && flags.contains(&true) {
                tied = true;
            }
            if let Some(key) = &h.config_key {
                config_updates.push((key.clone(), serde_json::Value::Bool(tied)));
            }
            match (tied, has_head, h.when_tied) {
                (true, true, TiedHead::Drop) => renamed.retain(|(s, n)| {
                    if *n == h.head {
                        dropped.push(Dropped {
                            tensor: s.name.clone(),
                            reason:
                                "tie_word_embeddings is true: the MLX model reuses the embedding"
                                    .into(),
                        });
                        false
                    } else {
                        true
                    }
                }),
                (true, false, TiedHead::Copy) => {
                    if let Some(e) = embed {
                        renamed.push((e, h.head.clone()));
                    }
                }
                (true, _, TiedHead::Alias) => {
                    renamed.retain(|(s, n)| {
                        if *n == h.head {
                            dropped.push(Dropped {
                                tensor: s.name.clone(),
                                reason: "tied head: the MLX loader fills it from the embedding"
                                    .into(),
                            });
                            false
                        } else {
                            true
                        }
                    });
                    if let Some(e) = embed {
                        if opts.quant.is_some() {
                            alias_head = Some(h.head.clone());
                            renamed.push((e, h.head.clone()));
                        }
                    }
                }
                (true, false, TiedHead::Keep) | (false, false, _) if embed.is_some() => {
                    return Err(Error::Plan(format!(
                        "the checkpoint has no output head (`{}` after renaming) and the MLX model needs one (tie_word_embeddings is {tied}); the checkpoint is incomplete",
                        h.head
                    )));
                }
                _ => {}
            }
        }

        // 3. Per tensor: layout, dtype, quantization.
        let layers = match &opts.quant {
            Some(rules) if rules.predicate.is_some() => view
                .text_field("num_hidden_layers")
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::Plan(
                        "--quant-predicate needs the language model's layer count, but config.json has no `num_hidden_layers` (top level or text_config)".into(),
                    )
                })?,
            _ => 0,
        };
        renamed.sort_by(|a, b| a.1.cmp(&b.1));
        let mut tensors = Vec::with_capacity(renamed.len());
        let mut unquantized = Vec::new();
        let mut candidates = Vec::new();
        let mut total_parameters = 0usize;
        for (s, name) in renamed {
            let layout = if opts.source_is_mlx {
                None
            } else {
                recipe.layout_for(&name).cloned()
            };
            if let Some(l) = &layout {
                if l.perm().len() != s.shape.len() {
                    return Err(Error::Plan(format!(
                        "tensor `{}` has shape {:?} but the recipe's {} layout change expects {} axes",
                        s.name,
                        s.shape,
                        l.name(),
                        l.perm().len()
                    )));
                }
            }
            if matches!(s.dtype, DType::F8E4M3 | DType::F8E5M2 | DType::F64) {
                return Err(Error::Plan(format!(
                    "tensor `{}` is {}: FP8/F64 checkpoints are not supported yet (convert to bf16 with transformers first)",
                    s.name, s.dtype
                )));
            }
            let dtype = match target_dtype {
                Some(t) if s.dtype.is_float() => t,
                _ => s.dtype,
            };
            let mut tp = TensorPlan {
                source: s.name.clone(),
                source_dtype: s.dtype,
                source_shape: s.shape.clone(),
                name: name.clone(),
                layout,
                dtype,
                quant: None,
                outputs: Vec::new(),
                packed: s.packed.clone(),
            };
            total_parameters += tp.numel();
            if let (Some(rules), Some(module)) = (&opts.quant, name.strip_suffix(".weight")) {
                // Vectors (norms, biases) are never Linear/Embedding weights: not candidates.
                if tp.source_shape.len() >= 2 {
                    let keep = |reason: String| Unquantized {
                        module: module.to_string(),
                        reason,
                    };
                    if tp.layout.is_some() {
                        unquantized.push(keep(
                            "convolution weight (layout change): never quantized".into(),
                        ));
                    } else if !recipe.quantize.allows(module) {
                        unquantized.push(keep(format!(
                            "recipe {}'s [quantize] policy keeps it float, as mlx-vlm does (vision towers, projectors, ...)",
                            recipe.name
                        )));
                    } else {
                        candidates.push(module.to_string());
                        let choice = rules.choose(module, layers);
                        match choice.spec {
                            None => unquantized.push(keep(format!(
                                "kept float by {}",
                                choice.rule.as_deref().unwrap_or("a rule")
                            ))),
                            Some(spec) => match quantizable(&tp, spec) {
                                Ok(()) => tp.quant = Some(spec),
                                Err(reason) => unquantized.push(keep(reason)),
                            },
                        }
                    }
                }
            }
            tp.outputs = outputs_for(&tp, false);
            tensors.push(tp);
        }
        // Shapes against config.json, in MLX names and MLX layout: a config that does not describe
        // these weights fails here, before any tensor byte is read.
        let described: Vec<(&str, &str, Vec<usize>)> = tensors
            .iter()
            .map(|t| (t.source.as_str(), t.name.as_str(), t.out_shape()))
            .collect();
        recipe.shapes.check(&described, config)?;

        // The aliased head mirrors the embedding's quantization, or is not written at all.
        if let (Some(head), Some(h)) = (&alias_head, &recipe.head) {
            let embed_quant = tensors
                .iter()
                .find(|t| t.name == h.embedding)
                .and_then(|t| t.quant);
            if let Some(pos) = tensors.iter().position(|t| &t.name == head) {
                // Not a parameter of its own: it shares the embedding's.
                total_parameters -= tensors[pos].numel();
                match embed_quant {
                    None => {
                        tensors.remove(pos);
                    }
                    Some(q) => {
                        let t = &mut tensors[pos];
                        t.quant = Some(q);
                        t.outputs = outputs_for(t, true);
                    }
                }
            }
            unquantized.retain(|u| format!("{}.weight", u.module) != *head);
        }
        let mut warnings = Vec::new();
        if let Some(rules) = &opts.quant {
            for o in rules.user_overrides() {
                if !candidates.iter().any(|m| o.pattern.is_match(m)) {
                    warnings.push(format!(
                        "{} matches no quantizable module (module paths look like `{}`)",
                        o.origin,
                        candidates.first().map(String::as_str).unwrap_or("-")
                    ));
                }
            }
        }

        // 4. Shards: greedy in name order under the size cap, as mlx-vlm's make_shards does.
        let mut all: Vec<(usize, usize)> = Vec::new(); // (tensor index, output index)
        for (i, t) in tensors.iter().enumerate() {
            for j in 0..t.outputs.len() {
                all.push((i, j));
            }
        }
        all.sort_by(|a, b| {
            tensors[a.0].outputs[a.1]
                .name
                .cmp(&tensors[b.0].outputs[b.1].name)
        });
        let mut groups: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
        let mut cur = 0u64;
        for &(i, j) in &all {
            let n = tensors[i].outputs[j].nbytes as u64;
            if cur + n > opts.max_shard_size && !groups.last().expect("non-empty").is_empty() {
                groups.push(Vec::new());
                cur = 0;
            }
            groups.last_mut().expect("non-empty").push((i, j));
            cur += n;
        }
        let count = groups.len();
        let meta = BTreeMap::from([("format".to_string(), "mlx".to_string())]);
        let mut shards = Vec::with_capacity(count);
        for (si, g) in groups.into_iter().enumerate() {
            let file_name = if count == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, count)
            };
            let layouts: Vec<TensorLayout> = g
                .iter()
                .map(|&(i, j)| {
                    let o = &tensors[i].outputs[j];
                    TensorLayout {
                        name: o.name.clone(),
                        dtype: o.dtype,
                        shape: o.shape.clone(),
                    }
                })
                .collect();
            let header = layout_shard(&layouts, &meta);
            for &(i, j) in &g {
                let o = &mut tensors[i].outputs[j];
                o.shard = si;
                o.offset = header.offsets[&o.name];
            }
            shards.push(ShardPlan {
                file_name,
                tensors: layouts,
                header,
            });
        }
        let total_size = tensors
            .iter()
            .flat_map(|t| t.outputs.iter())
            .map(|o| o.nbytes)
            .sum();
        let quant = opts.quant.as_ref().map(|rules| QuantConfig {
            group_size: rules.default.group_size,
            bits: rules.default.bits,
            mode: rules.default.mode.as_str().into(),
            per_module: per_module_entries(&tensors, rules),
        });
        Ok(Plan {
            recipe: recipe.name.clone(),
            tensors,
            shards,
            dropped,
            unquantized,
            quant,
            dtype: target_dtype,
            total_size,
            total_parameters,
            config_updates,
            warnings,
        })
    }

    /// Effective bits per weight: every output byte (packed weights, scales, biases, float tensors)
    /// times 8 over the logical parameters, overall and for the language model (MLX paths under
    /// `language_model.`) vs the rest (vision tower, projector). `None` for a part without parameters.
    pub fn bits_per_weight(&self) -> BitsPerWeight {
        let (mut lang, mut other) = ((0usize, 0usize), (0usize, 0usize));
        for t in &self.tensors {
            let bytes: usize = t.outputs.iter().map(|o| o.nbytes).sum();
            // A head that borrows the embedding's packed weight has no parameters of its own.
            let borrowed = t.quant.is_some() && !t.outputs.iter().any(|o| o.role == Role::Weight);
            let params = if borrowed { 0 } else { t.numel() };
            let part = if t.name.starts_with("language_model.") {
                &mut lang
            } else {
                &mut other
            };
            part.0 += bytes;
            part.1 += params;
        }
        let bpw = |(b, p): (usize, usize)| (p > 0).then(|| b as f64 * 8.0 / p as f64);
        BitsPerWeight {
            overall: bpw((lang.0 + other.0, lang.1 + other.1)).unwrap_or(0.0),
            language: bpw(lang),
            vision: bpw(other),
        }
    }

    pub fn quantized_count(&self) -> usize {
        self.tensors.iter().filter(|t| t.quant.is_some()).count()
    }

    pub fn source_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.source_bytes()).sum()
    }
}

/// config.json's per-module entries: under a mixed predicate one for every quantized module, as
/// mlx-vlm writes them (`group_size` and `bits`, plus `mode` only where a rule made it non-affine);
/// otherwise one (with `mode`) for each module whose settings differ from the top level.
fn per_module_entries(tensors: &[TensorPlan], rules: &QuantRules) -> Vec<ModuleQuant> {
    let all = rules.predicate.is_some();
    tensors
        .iter()
        .filter_map(|t| {
            let q = t.quant?;
            if !all && q == rules.default {
                return None;
            }
            Some(ModuleQuant {
                path: t.name.strip_suffix(".weight")?.to_string(),
                group_size: q.group_size,
                bits: q.bits,
                mode: (!all || q.mode != QuantMode::Affine).then(|| q.mode.as_str().to_string()),
            })
        })
        .collect()
}

/// The output tensors of a plan entry; `alias` leaves out the packed weight (the loader takes the
/// embedding's).
fn outputs_for(t: &TensorPlan, alias: bool) -> Vec<OutputTensor> {
    let shape = t.out_shape();
    let Some(spec) = t.quant else {
        return vec![out(&t.name, Role::Tensor, t.dtype, shape)];
    };
    let k = *shape.last().expect("quantized tensors have >= 2 axes");
    let lead = &shape[..shape.len() - 1];
    let module = t
        .name
        .strip_suffix(".weight")
        .expect("only .weight tensors quantize");
    let with_last = |last: usize| {
        let mut v = lead.to_vec();
        v.push(last);
        v
    };
    let groups = k / spec.group_size;
    let sdtype = quant::scales_dtype(spec, t.dtype);
    let mut v = vec![
        out(
            &t.name,
            Role::Weight,
            DType::U32,
            with_last(k * spec.bits as usize / 32),
        ),
        out(
            &format!("{module}.scales"),
            Role::Scales,
            sdtype,
            with_last(groups),
        ),
    ];
    if spec.mode.has_biases() {
        v.push(out(
            &format!("{module}.biases"),
            Role::Biases,
            t.dtype,
            with_last(groups),
        ));
    }
    if alias {
        v.remove(0);
    }
    v
}

fn out(name: &str, role: Role, dtype: DType, shape: Vec<usize>) -> OutputTensor {
    let nbytes = shape.iter().product::<usize>() * dtype.size();
    OutputTensor {
        name: name.to_string(),
        role,
        dtype,
        shape,
        nbytes,
        shard: 0,
        offset: 0,
    }
}

/// Why a weight the policy allows cannot be quantized, if it cannot.
fn quantizable(t: &TensorPlan, spec: QuantSpec) -> std::result::Result<(), String> {
    let shape = t.out_shape();
    if shape.len() < 2 {
        return Err(format!(
            "{}-D weight (only matrices and stacked matrices quantize)",
            shape.len()
        ));
    }
    if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!("{} weights are not quantized", t.dtype));
    }
    let k = *shape.last().expect("len >= 2");
    if !k.is_multiple_of(spec.group_size) {
        return Err(format!(
            "last dimension {k} is not a multiple of the group size {} ({})",
            spec.group_size,
            spec.label()
        ));
    }
    if !t.numel().is_multiple_of(LOADER_SIZE_MULTIPLE) {
        return Err(format!(
            "{} elements is not a multiple of {LOADER_SIZE_MULTIPLE}: mlx-vlm would load it unquantized",
            t.numel()
        ));
    }
    debug_assert_eq!(
        quant::quantized_sizes(1, k, spec, t.dtype).0,
        k * spec.bits as usize / 8
    );
    Ok(())
}
