//! Recipes: one TOML file per architecture (`recipes/*.toml`, embedded in the binary) that says how a
//! Hugging Face checkpoint's tensors become MLX tensors. A recipe is data: ordered name rules (rename or
//! drop), layout transforms, the tied-head policy, the quantization policy and config.json spelling
//! rules. Only the generic operations those rules name live in code (see [`Layout`]).
//!
//! See `recipes/README.md` for the file format.

use crate::error::{Error, Result};
use crate::quant::QuantSpec;
use crate::quant_rules::{Override, OverrideEntry};
use crate::shapes::{ShapeGroupFile, ShapeRules};
use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/embedded_recipes.rs"));

/// A tensor layout change from PyTorch's to MLX's convention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Conv1d weight O,I,K -> O,K,I.
    Conv1d,
    /// Conv2d weight O,I,H,W -> O,H,W,I.
    Conv2d,
    /// Conv3d weight O,I,T,H,W -> O,T,H,W,I.
    Conv3d,
    /// Any axis permutation.
    Transpose(Vec<usize>),
}

impl Layout {
    /// The permutation this layout applies.
    pub fn perm(&self) -> Vec<usize> {
        match self {
            Layout::Conv1d => vec![0, 2, 1],
            Layout::Conv2d => vec![0, 2, 3, 1],
            Layout::Conv3d => vec![0, 2, 3, 4, 1],
            Layout::Transpose(p) => p.clone(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Layout::Conv1d => "conv1d".into(),
            Layout::Conv2d => "conv2d".into(),
            Layout::Conv3d => "conv3d".into(),
            Layout::Transpose(p) => format!("transpose{p:?}"),
        }
    }
}

/// What a name rule does with the tensors it matches.
#[derive(Debug, Clone)]
pub enum Action {
    /// Rename to this template (`$1`, `${name}` refer to the pattern's groups).
    Rename(String),
    /// Leave the tensor out, for this reason.
    Drop(String),
}

#[derive(Debug, Clone)]
pub struct NameRule {
    pub pattern: Regex,
    pub action: Action,
}

#[derive(Debug, Clone)]
pub struct LayoutRule {
    pub pattern: Regex,
    pub layout: Layout,
}

/// How the output head relates to the token embedding.
#[derive(Debug, Clone)]
pub struct HeadRule {
    /// MLX name of the head weight.
    pub head: String,
    /// MLX name of the embedding it is tied to.
    pub embedding: String,
    /// `tie_word_embeddings` when config.json does not say.
    pub tie_default: bool,
    /// What the MLX class needs when the head is tied.
    pub when_tied: TiedHead,
    /// Dotted config key where the MLX loader reads the tie flag (e.g. `text_config.tie_word_embeddings`);
    /// the resolved flag is written there.
    pub config_key: Option<String>,
}

/// The MLX model class's view of a tied head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TiedHead {
    /// The class has no head when tied (it reuses the embedding): drop a stored head.
    Drop,
    /// The class always has a head: keep a stored one (none stored is an error).
    Keep,
    /// The class always has a head: keep a stored one, else write a copy of the embedding.
    Copy,
    /// The loader itself fills the head's weight from the embedding (Gemma 3 in mlx-vlm): write no
    /// head, except, when quantized, its `scales`/`biases` so the loader builds a quantized head.
    Alias,
}

/// Which modules may be quantized, and the recipe's default per-module settings.
#[derive(Debug, Clone)]
pub struct QuantPolicy {
    pub modules: Vec<Regex>,
    pub exclude: Vec<Regex>,
    /// `[[quantize.override]]`: defaults for some modules (anchored patterns), resolved against the
    /// run's top-level settings by [`crate::quant_rules`]; every user rule beats them.
    pub overrides: Vec<OverrideEntry>,
}

impl QuantPolicy {
    /// Whether the module at MLX path `module` (without `.weight`) may be quantized.
    pub fn allows(&self, module: &str) -> bool {
        self.modules.iter().any(|r| r.is_match(module))
            && !self.exclude.iter().any(|r| r.is_match(module))
    }
}

/// config.json rules: how to bring either spelling to the one mlx-vlm reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRules {
    /// Hub checkpoints of this model keep the text fields at the top level: lift `text_config` there.
    #[serde(default)]
    pub flatten_text_config: bool,
    /// Values to rewrite: `{ key = "vision_config.model_type", from = "qwen2_vl_vision", to = "qwen2_vl" }`.
    #[serde(default)]
    pub replace: Vec<ConfigReplace>,
    /// Keys set when absent (dotted paths), as the Hub spelling has them.
    #[serde(default)]
    pub defaults: toml::Table,
    /// `rope_scaling.type` to write when `rope_parameters` carries more than a theta (e.g. "mrope").
    #[serde(default)]
    pub rope_scaling_type: Option<String>,
    /// Derive `sliding_window_pattern` from transformers 5's `layer_types` (Gemma 2/3).
    #[serde(default)]
    pub sliding_window_pattern_from_layer_types: bool,
    /// Text model types whose MLX class reads `rope_parameters` itself (e.g. `ministral3`): keep it.
    #[serde(default)]
    pub keep_rope_parameters_for: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigReplace {
    pub key: String,
    pub from: toml::Value,
    pub to: toml::Value,
}

#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub model_types: Vec<String>,
    pub architectures: Vec<String>,
    pub rules: Vec<NameRule>,
    pub layouts: Vec<LayoutRule>,
    pub head: Option<HeadRule>,
    pub quantize: QuantPolicy,
    pub config: ConfigRules,
    /// Expected tensor shapes in terms of config.json, checked at plan time.
    pub shapes: ShapeRules,
    /// Where the recipe came from: `builtin:NAME` or a file path.
    pub origin: String,
    /// sha256 of the recipe's text (hex), for provenance.
    pub sha256: String,
}

// ---- file format -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: String,
    description: String,
    model_types: Vec<String>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    tensors: Vec<RuleFile>,
    #[serde(default)]
    layout: Vec<LayoutFile>,
    head: Option<HeadFile>,
    quantize: QuantFile,
    #[serde(default)]
    config: ConfigRules,
    #[serde(default)]
    shapes: Vec<ShapeGroupFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    from: String,
    to: Option<String>,
    drop: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    tensor: String,
    op: String,
    perm: Option<Vec<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadFile {
    tensor: String,
    embedding: String,
    #[serde(default)]
    tie_default: bool,
    when_tied: String,
    config_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantFile {
    modules: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default, rename = "override")]
    overrides: Vec<OverrideEntry>,
}

fn anchored(recipe: &str, what: &str, pat: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pat})$")).map_err(|e| Error::Recipe {
        recipe: recipe.to_string(),
        msg: format!("{what} pattern `{pat}` is not a valid regex: {e}"),
    })
}

impl Recipe {
    /// Parses a recipe from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Recipe> {
        let err = |msg: String| Error::Recipe {
            recipe: origin.to_string(),
            msg,
        };
        let f: RecipeFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if f.model_types.is_empty() {
            return Err(err(
                "`model_types` must name at least one config.json model_type".into(),
            ));
        }
        let mut rules = Vec::new();
        for r in &f.tensors {
            let action = match (&r.to, &r.drop) {
                (Some(to), None) => Action::Rename(to.clone()),
                (None, Some(why)) => Action::Drop(why.clone()),
                _ => {
                    return Err(err(format!(
                        "tensor rule `{}` needs exactly one of `to` (rename) or `drop` (reason)",
                        r.from
                    )))
                }
            };
            rules.push(NameRule {
                pattern: anchored(origin, "tensor rule", &r.from)?,
                action,
            });
        }
        let mut layouts = Vec::new();
        for l in &f.layout {
            let layout = match (l.op.as_str(), &l.perm) {
                ("conv1d", None) => Layout::Conv1d,
                ("conv2d", None) => Layout::Conv2d,
                ("conv3d", None) => Layout::Conv3d,
                ("transpose", Some(p)) => {
                    let mut sorted = p.clone();
                    sorted.sort_unstable();
                    if sorted != (0..p.len()).collect::<Vec<_>>() {
                        return Err(err(format!(
                            "layout `{}`: perm {p:?} is not a permutation",
                            l.tensor
                        )));
                    }
                    Layout::Transpose(p.clone())
                }
                (op, _) => {
                    return Err(err(format!(
                    "layout `{}`: op `{op}` must be conv1d, conv2d, conv3d, or transpose with perm",
                    l.tensor
                )))
                }
            };
            layouts.push(LayoutRule {
                pattern: anchored(origin, "layout", &l.tensor)?,
                layout,
            });
        }
        let head = match f.head {
            None => None,
            Some(h) => Some(HeadRule {
                head: h.tensor,
                embedding: h.embedding,
                tie_default: h.tie_default,
                when_tied: match h.when_tied.as_str() {
                    "drop" => TiedHead::Drop,
                    "keep" => TiedHead::Keep,
                    "copy" => TiedHead::Copy,
                    "alias" => TiedHead::Alias,
                    other => {
                        return Err(err(format!(
                            "head.when_tied is `{other}`; use \"drop\", \"keep\", \"copy\" or \"alias\""
                        )))
                    }
                },
                config_key: h.config_key,
            }),
        };
        let quantize = QuantPolicy {
            modules: f
                .quantize
                .modules
                .iter()
                .map(|p| anchored(origin, "quantize.modules", p))
                .collect::<Result<_>>()?,
            exclude: f
                .quantize
                .exclude
                .iter()
                .map(|p| anchored(origin, "quantize.exclude", p))
                .collect::<Result<_>>()?,
            overrides: f.quantize.overrides,
        };
        // Check the overrides now (against a plain 4-bit top level) so a bad one names the recipe
        // before any weight is read.
        let probe = QuantSpec::new(4, 64).expect("valid");
        for o in &quantize.overrides {
            o.to_override(probe, true, "recipe")
                .map_err(|e| err(format!("quantize.override: {e}")))?;
        }
        let shapes = ShapeRules::from_file(&f.shapes, |what, p| anchored(origin, what, p), err)?;
        Ok(Recipe {
            name: f.name,
            description: f.description,
            model_types: f.model_types,
            architectures: f.architectures,
            rules,
            layouts,
            head,
            quantize,
            config: f.config,
            shapes,
            origin: origin.to_string(),
            sha256: crate::provenance::hex(&Sha256::digest(text.as_bytes())),
        })
    }

    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        Recipe::parse(&text, &path.display().to_string())
    }

    /// Every built-in recipe, in name order.
    pub fn builtin() -> Vec<Recipe> {
        let mut v: Vec<Recipe> = EMBEDDED_RECIPES
            .iter()
            .map(|(name, text)| {
                Recipe::parse(text, &format!("builtin:{name}"))
                    .unwrap_or_else(|e| panic!("built-in recipe {name} is invalid: {e}"))
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The built-in recipe for a config.json, chosen by `model_type`, then `architectures`.
    pub fn for_config(config: &serde_json::Value) -> Result<Recipe> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        let all = Recipe::builtin();
        let by_type: Vec<&Recipe> = all
            .iter()
            .filter(|r| r.model_types.iter().any(|t| t == model_type))
            .collect();
        let pick = match by_type.len() {
            0 => None,
            1 => Some(by_type[0]),
            // Several recipes share a model_type: the architectures list decides.
            _ => by_type
                .iter()
                .find(|r| r.architectures.iter().any(|a| archs.contains(&a.as_str())))
                .or(by_type.first())
                .copied(),
        };
        pick.cloned().ok_or_else(|| Error::UnknownArchitecture {
            model_type: model_type.to_string(),
            supported: all
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The first name rule matching `name`: the MLX name, or why it is dropped.
    pub fn map_name(&self, name: &str) -> Option<Action> {
        self.rules.iter().find_map(|r| {
            let caps = r.pattern.captures(name)?;
            Some(match &r.action {
                Action::Rename(to) => {
                    let mut out = String::new();
                    caps.expand(to, &mut out);
                    Action::Rename(out)
                }
                Action::Drop(why) => Action::Drop(why.clone()),
            })
        })
    }

    /// The recipe's `[[quantize.override]]` rules resolved against the run's top-level settings.
    pub fn quant_overrides(&self, top: QuantSpec) -> Result<Vec<Override>> {
        let origin = format!("recipe {}", self.name);
        self.quantize
            .overrides
            .iter()
            .map(|o| {
                o.to_override(top, true, &origin)
                    .map_err(|e| Error::Recipe {
                        recipe: self.origin.clone(),
                        msg: format!("quantize.override: {e}"),
                    })
            })
            .collect()
    }

    /// The layout change for an MLX tensor name, if any.
    pub fn layout_for(&self, mlx_name: &str) -> Option<&Layout> {
        self.layouts
            .iter()
            .find(|l| l.pattern.is_match(mlx_name))
            .map(|l| &l.layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_recipe_parses() {
        let all = Recipe::builtin();
        assert!(!all.is_empty());
        let mut names: Vec<_> = all.iter().map(|r| r.name.clone()).collect();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate recipe names");
    }

    #[test]
    fn rules_apply_in_order_with_captures() {
        let r = Recipe::parse(
            r#"
name = "t"
description = "test"
model_types = ["t"]
[[tensors]]
from = '.*\.inv_freq'
drop = "recomputed"
[[tensors]]
from = 'model\.(.+)'
to = 'language_model.model.$1'
[[layout]]
tensor = 'vision\.patch\.weight'
op = "conv2d"
[quantize]
modules = ['language_model\..+']
exclude = ['.*\.gate']
"#,
            "test",
        )
        .unwrap();
        assert!(matches!(
            r.map_name("model.rotary.inv_freq"),
            Some(Action::Drop(_))
        ));
        match r.map_name("model.layers.0.q.weight") {
            Some(Action::Rename(n)) => assert_eq!(n, "language_model.model.layers.0.q.weight"),
            other => panic!("{other:?}"),
        }
        assert!(r.map_name("xmodel.a").is_none(), "patterns are anchored");
        assert_eq!(r.layout_for("vision.patch.weight"), Some(&Layout::Conv2d));
        assert!(r.quantize.allows("language_model.model.layers.0.q"));
        assert!(!r.quantize.allows("language_model.model.layers.0.gate"));
        assert!(!r.quantize.allows("vision.patch"));
    }

    #[test]
    fn bad_recipes_are_named_errors() {
        let e = Recipe::parse("name = 1", "x.toml").unwrap_err().to_string();
        assert!(e.contains("x.toml"), "{e}");
        let e = Recipe::parse(
            "name='t'\ndescription='d'\nmodel_types=['t']\n[[tensors]]\nfrom='('\nto='x'\n[quantize]\nmodules=[]",
            "y.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a valid regex"), "{e}");
    }
}
