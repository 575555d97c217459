//! Per-module quantization choices: which [`QuantSpec`] each quantizable module gets, or why it stays
//! float. The plan asks [`QuantRules::choose`] once per candidate module (a module the recipe's
//! `[quantize]` policy allows); the answer is the last word of these layers, lowest precedence first:
//!
//! 1. the top-level settings (`--q-bits`, `--q-group-size`, `--q-mode`, or the `--quant-config` file's);
//! 2. the recipe's own defaults (`[[quantize.override]]`, e.g. MoE router gates at 8 bits);
//! 3. the mixed-precision predicate (`--quant-predicate mixed_3_6`, SPEC.md section 5);
//! 4. the `--quant-config` file's `[[override]]` and `no_quant` rules;
//! 5. the command line's `--quant-override` and `--no-quant`.
//!
//! Within one layer the last matching rule wins, and a "keep float" rule wins over a quantize rule.
//! Recipe patterns are anchored (like every recipe pattern); user patterns are searched anywhere in the
//! MLX module path (Python's `re.search`), so `lm_head` matches `language_model.lm_head`.

use crate::error::{Error, Result};
use crate::quant::{QuantMode, QuantSpec};
use regex::Regex;
use serde::Deserialize;
use std::path::Path;

/// mlx-vlm's mixed-precision recipes, `mixed_{lo}_{hi}`.
pub const MIXED_RECIPES: [(&str, u32, u32); 7] = [
    ("mixed_2_6", 2, 6),
    ("mixed_3_4", 3, 4),
    ("mixed_3_5", 3, 5),
    ("mixed_3_6", 3, 6),
    ("mixed_3_8", 3, 8),
    ("mixed_4_6", 4, 6),
    ("mixed_4_8", 4, 8),
];

/// The group size every mixed recipe uses.
const MIXED_GROUP: usize = 64;

/// A mixed-precision recipe: `hi` bits for the sensitive modules, `lo` for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mixed {
    pub name: String,
    pub lo: u32,
    pub hi: u32,
}

impl Mixed {
    pub fn parse(name: &str) -> Result<Mixed> {
        MIXED_RECIPES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(n, lo, hi)| Mixed {
                name: n.to_string(),
                lo,
                hi,
            })
            .ok_or_else(|| {
                Error::Usage(format!(
                    "unknown quantization predicate `{name}`: use one of {}",
                    MIXED_RECIPES.map(|r| r.0).join(", ")
                ))
            })
    }

    /// The bits for the module at `path` in a language model of `layers` layers (SPEC.md section 5):
    /// `v_proj` and `down_proj` get `hi` in layers `i < L/8`, `i >= 7L/8` or `(i - L/8) % 3 == 2`
    /// (integer division, Python's non-negative modulo); `lm_head` and `embed_tokens` get `hi`;
    /// everything else `lo`. The layer index is the number after `layers.` in the path, whatever
    /// prefix the recipe gives the language model (mlx-vlm reads it at the position where the first
    /// `down_proj` of the whole model has its digits, which is a vision block's on Qwen2.5-VL).
    pub fn bits(&self, path: &str, layers: usize) -> u32 {
        let index = layer_index(path).unwrap_or(0) as i64;
        let l = layers as i64;
        let more = index < l / 8 || index >= 7 * l / 8 || (index - l / 8).rem_euclid(3) == 2;
        let down = path.contains("down_proj") || path.contains("feed_forward.w2");
        if more && (path.contains("v_proj") || down) {
            return self.hi;
        }
        if path.contains("lm_head") || path.contains("embed_tokens") {
            return self.hi;
        }
        self.lo
    }

    pub fn spec(&self, path: &str, layers: usize) -> QuantSpec {
        QuantSpec {
            bits: self.bits(path, layers),
            group_size: MIXED_GROUP,
            mode: QuantMode::Affine,
        }
    }
}

/// The decoder layer a module path belongs to: the digits after the first `layers.` segment.
pub fn layer_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// What a rule does to the modules it matches.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Quantize(QuantSpec),
    Float,
}

/// One override rule.
#[derive(Debug, Clone)]
pub struct Override {
    pub pattern: Regex,
    pub action: Action,
    /// How the user wrote it (`--no-quant 'lm_head'`, `quant.toml [[override]] 'gate'`...), for the
    /// reasons and warnings.
    pub origin: String,
}

impl Override {
    fn matches(&self, module: &str) -> bool {
        self.pattern.is_match(module)
    }
}

/// Which layer a choice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Default,
    Recipe,
    Predicate,
    File,
    CommandLine,
}

/// The answer for one module.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// `None`: keep float.
    pub spec: Option<QuantSpec>,
    pub level: Level,
    /// The rule that decided (its origin), when not the default.
    pub rule: Option<String>,
}

/// Unvalidated quantization settings of one rule: `BITS[:GROUP[:MODE]]`, or a bare mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecText {
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    pub mode: Option<QuantMode>,
}

impl SpecText {
    /// Parses `8`, `8:32`, `4:32:mxfp4` or `mxfp4`.
    pub fn parse(s: &str) -> std::result::Result<SpecText, String> {
        let mut it = s.split(':');
        let first = it.next().unwrap_or_default().trim();
        if let Ok(mode) = QuantMode::parse(first) {
            if it.next().is_some() {
                return Err(format!("`{s}`: a bare mode takes no bits or group size"));
            }
            return Ok(SpecText {
                mode: Some(mode),
                ..Default::default()
            });
        }
        let bits = first
            .parse()
            .map_err(|_| format!("`{first}` is not a number of bits (or a mode)"))?;
        let group_size = match it.next() {
            None | Some("") => None,
            Some(g) => Some(
                g.trim()
                    .parse()
                    .map_err(|_| format!("`{g}` is not a group size"))?,
            ),
        };
        let mode = match it.next() {
            None | Some("") => None,
            Some(m) => Some(QuantMode::parse(m.trim()).map_err(|e| e.to_string())?),
        };
        if let Some(extra) = it.next() {
            return Err(format!(
                "unexpected `:{extra}`; the form is BITS[:GROUP[:MODE]]"
            ));
        }
        Ok(SpecText {
            bits: Some(bits),
            group_size,
            mode,
        })
    }

    /// The spec, filling gaps: the mode defaults to affine (or the bare mode), bits and group size to
    /// the mode's defaults - except that an affine rule without a group size takes the top-level
    /// group size when the top level is affine too.
    pub fn resolve(&self, top: QuantSpec) -> std::result::Result<QuantSpec, String> {
        let mode = self.mode.unwrap_or(QuantMode::Affine);
        let (db, dg) = mode.defaults();
        let group = self.group_size.unwrap_or(
            if mode == QuantMode::Affine && top.mode == QuantMode::Affine {
                top.group_size
            } else {
                dg
            },
        );
        QuantSpec::with_mode(mode, self.bits.unwrap_or(db), group).map_err(|e| e.to_string())
    }
}

/// All the rules of one conversion.
#[derive(Debug, Clone)]
pub struct QuantRules {
    pub default: QuantSpec,
    pub recipe: Vec<Override>,
    pub predicate: Option<Mixed>,
    pub file: Vec<Override>,
    pub cli: Vec<Override>,
}

impl QuantRules {
    pub fn uniform(default: QuantSpec) -> QuantRules {
        QuantRules {
            default,
            recipe: Vec::new(),
            predicate: None,
            file: Vec::new(),
            cli: Vec::new(),
        }
    }

    /// Whether modules other than the defaults' may appear (config.json then needs entries).
    pub fn is_uniform(&self) -> bool {
        self.recipe.is_empty()
            && self.predicate.is_none()
            && self.file.is_empty()
            && self.cli.is_empty()
    }

    /// The choice for the module at MLX path `module` in a language model of `layers` layers.
    pub fn choose(&self, module: &str, layers: usize) -> Choice {
        let mut c = Choice {
            spec: Some(self.default),
            level: Level::Default,
            rule: None,
        };
        apply(&mut c, &self.recipe, module, Level::Recipe);
        if let Some(p) = &self.predicate {
            c = Choice {
                spec: Some(p.spec(module, layers)),
                level: Level::Predicate,
                rule: Some(format!("--quant-predicate {}", p.name)),
            };
        }
        apply(&mut c, &self.file, module, Level::File);
        apply(&mut c, &self.cli, module, Level::CommandLine);
        c
    }

    /// The user's rules (file and command line), for reporting the ones that matched no module.
    /// (A recipe's defaults are generic and may not apply to every checkpoint.)
    pub fn user_overrides(&self) -> impl Iterator<Item = &Override> {
        self.file.iter().chain(&self.cli)
    }
}

/// Applies one layer: the last matching quantize rule, unless a float rule matches.
fn apply(c: &mut Choice, rules: &[Override], module: &str, level: Level) {
    let hit = rules
        .iter()
        .rev()
        .find(|r| r.action == Action::Float && r.matches(module))
        .or_else(|| rules.iter().rev().find(|r| r.matches(module)));
    if let Some(r) = hit {
        *c = Choice {
            spec: match r.action {
                Action::Quantize(s) => Some(s),
                Action::Float => None,
            },
            level,
            rule: Some(r.origin.clone()),
        };
    }
}

/// A user pattern (searched, not anchored).
pub fn user_regex(pat: &str, origin: &str) -> Result<Regex> {
    Regex::new(pat)
        .map_err(|e| Error::Usage(format!("{origin}: `{pat}` is not a valid regex: {e}")))
}

/// `--quant-override 'REGEX=BITS[:GROUP[:MODE]]'`.
pub fn parse_override_flag(text: &str, top: QuantSpec) -> Result<Override> {
    let origin = format!("--quant-override '{text}'");
    let (pat, spec) = text.rsplit_once('=').ok_or_else(|| {
        Error::Usage(format!(
            "{origin}: expected REGEX=BITS[:GROUP[:MODE]], e.g. 'lm_head=8' or 'mlp\\.gate$=8:32'"
        ))
    })?;
    let spec = SpecText::parse(spec)
        .and_then(|s| s.resolve(top))
        .map_err(|e| Error::Usage(format!("{origin}: {e}")))?;
    Ok(Override {
        pattern: user_regex(pat, &origin)?,
        action: Action::Quantize(spec),
        origin,
    })
}

/// `--no-quant 'REGEX'`.
pub fn parse_no_quant_flag(pat: &str) -> Result<Override> {
    let origin = format!("--no-quant '{pat}'");
    Ok(Override {
        pattern: user_regex(pat, &origin)?,
        action: Action::Float,
        origin,
    })
}

/// One `[[override]]` entry of a `--quant-config` file or `[[quantize.override]]` of a recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideEntry {
    /// Regex over MLX module paths.
    pub modules: String,
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    pub mode: Option<String>,
    /// Keep these modules float instead (`float = true`).
    #[serde(default)]
    pub float: bool,
}

impl OverrideEntry {
    /// Builds the rule; `anchored` for recipes. Errors are plain messages for the caller to wrap.
    pub fn to_override(
        &self,
        top: QuantSpec,
        anchored: bool,
        origin: &str,
    ) -> std::result::Result<Override, String> {
        let pat = if anchored {
            format!("^(?:{})$", self.modules)
        } else {
            self.modules.clone()
        };
        let pattern = Regex::new(&pat)
            .map_err(|e| format!("`{}` is not a valid regex: {e}", self.modules))?;
        let origin = format!("{origin} '{}'", self.modules);
        let action = if self.float {
            if self.bits.is_some() || self.group_size.is_some() || self.mode.is_some() {
                return Err(format!(
                    "override `{}`: `float = true` takes no bits, group_size or mode",
                    self.modules
                ));
            }
            Action::Float
        } else {
            let text = SpecText {
                bits: self.bits,
                group_size: self.group_size,
                mode: match &self.mode {
                    Some(m) => Some(QuantMode::parse(m).map_err(|e| e.to_string())?),
                    None => None,
                },
            };
            if text == SpecText::default() {
                return Err(format!(
                    "override `{}` needs bits (and optionally group_size, mode), a mode, or float = true",
                    self.modules
                ));
            }
            Action::Quantize(
                text.resolve(top)
                    .map_err(|e| format!("override `{}`: {e}", self.modules))?,
            )
        };
        Ok(Override {
            pattern,
            action,
            origin,
        })
    }
}

/// A `--quant-config` TOML file (format in README.md, "Quantization rules").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfigFile {
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    pub mode: Option<String>,
    pub predicate: Option<String>,
    #[serde(default)]
    pub no_quant: Vec<String>,
    #[serde(default, rename = "override")]
    pub overrides: Vec<OverrideEntry>,
}

impl QuantConfigFile {
    pub fn read(path: &Path) -> Result<QuantConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        toml::from_str(&text)
            .map_err(|e| Error::Usage(format!("--quant-config {}: {e}", path.display())))
    }

    /// The file's rules, in order (overrides, then the no-quant patterns).
    pub fn rules(&self, path: &Path, top: QuantSpec) -> Result<Vec<Override>> {
        let origin = path.display().to_string();
        let mut v = Vec::new();
        for o in &self.overrides {
            v.push(
                o.to_override(top, false, &origin)
                    .map_err(|e| Error::Usage(format!("--quant-config {origin}: {e}")))?,
            );
        }
        for p in &self.no_quant {
            let o = format!("{origin} no_quant '{p}'");
            v.push(Override {
                pattern: user_regex(p, &o)?,
                action: Action::Float,
                origin: o,
            });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine(bits: u32, g: usize) -> QuantSpec {
        QuantSpec::new(bits, g).unwrap()
    }

    #[test]
    fn layer_index_follows_the_layers_segment() {
        assert_eq!(
            layer_index("language_model.model.layers.12.mlp.down_proj"),
            Some(12)
        );
        assert_eq!(
            layer_index("language_model.layers.3.self_attn.v_proj"),
            Some(3)
        );
        assert_eq!(layer_index("language_model.lm_head"), None);
    }

    #[test]
    fn mixed_rule_matches_mlx_vlm_on_36_layers() {
        // L = 36: L/8 = 4, 7L/8 = 31; more bits for i < 4, i >= 31, and i = 6, 9, 12, ..., 30.
        let m = Mixed::parse("mixed_3_6").unwrap();
        let hi: Vec<usize> = (0..36)
            .filter(|i| {
                m.bits(
                    &format!("language_model.model.layers.{i}.mlp.down_proj"),
                    36,
                ) == 6
            })
            .collect();
        let mut want: Vec<usize> = (0..4).chain(31..36).collect();
        want.extend((6..31).step_by(3));
        want.sort();
        assert_eq!(hi, want);
        assert_eq!(m.bits("language_model.model.layers.6.mlp.up_proj", 36), 3);
        assert_eq!(
            m.bits("language_model.model.layers.6.self_attn.v_proj", 36),
            6
        );
        assert_eq!(m.bits("language_model.lm_head", 36), 6);
        assert_eq!(m.bits("language_model.model.embed_tokens", 36), 6);
        // Two layers: L/8 = 0, 7L/8 = 1: only layer 1 is "more".
        assert_eq!(m.bits("x.layers.0.mlp.down_proj", 2), 3);
        assert_eq!(m.bits("x.layers.1.mlp.down_proj", 2), 6);
        assert!(Mixed::parse("mixed_9_9").is_err());
    }

    #[test]
    fn spec_text_forms() {
        let top = affine(4, 64);
        let r = |s: &str| SpecText::parse(s).and_then(|t| t.resolve(top));
        assert_eq!(r("8").unwrap(), affine(8, 64));
        assert_eq!(r("8:32").unwrap(), affine(8, 32));
        assert_eq!(r("4:32:mxfp4").unwrap().mode, QuantMode::Mxfp4);
        assert_eq!(r("nvfp4").unwrap().group_size, 16);
        assert!(r("7").is_err());
        assert!(r("4:64:mxfp4").is_err());
        assert!(r("x").is_err());
        assert!(r("4:32:affine:9").is_err());
        // Top level mxfp4: an affine rule without a group size takes affine's default 64.
        let fp = QuantSpec::for_mode(QuantMode::Mxfp4, None, None).unwrap();
        assert_eq!(
            SpecText::parse("8").unwrap().resolve(fp).unwrap(),
            affine(8, 64)
        );
    }

    #[test]
    fn precedence_recipe_predicate_file_cli() {
        let top = affine(4, 64);
        let rule = |pat: &str, action: Action, origin: &str| Override {
            pattern: Regex::new(pat).unwrap(),
            action,
            origin: origin.into(),
        };
        let mut r = QuantRules::uniform(top);
        r.recipe
            .push(rule("gate", Action::Quantize(affine(8, 64)), "recipe"));
        let gate = "language_model.model.layers.0.mlp.gate_proj";
        assert_eq!(r.choose(gate, 2).spec, Some(affine(8, 64)));
        assert_eq!(r.choose(gate, 2).level, Level::Recipe);
        r.predicate = Some(Mixed::parse("mixed_3_6").unwrap());
        assert_eq!(r.choose(gate, 2).spec, Some(affine(3, 64)));
        r.file
            .push(rule("gate", Action::Quantize(affine(5, 32)), "file"));
        assert_eq!(r.choose(gate, 2).spec, Some(affine(5, 32)));
        r.cli
            .push(rule("gate", Action::Quantize(affine(2, 32)), "cli q"));
        r.cli.push(rule("layers\\.0\\.", Action::Float, "cli f"));
        r.cli
            .push(rule("gate", Action::Quantize(affine(6, 32)), "cli q2"));
        // Float wins within a level even when a later quantize rule matches.
        let c = r.choose(gate, 2);
        assert_eq!((c.spec, c.level), (None, Level::CommandLine));
        assert_eq!(c.rule.as_deref(), Some("cli f"));
        let up = "language_model.model.layers.1.mlp.gate_proj";
        assert_eq!(r.choose(up, 2).spec, Some(affine(6, 32)));
    }

    #[test]
    fn flags_parse_with_named_errors() {
        let top = affine(4, 64);
        let o = parse_override_flag("lm_head=8", top).unwrap();
        assert!(o.pattern.is_match("language_model.lm_head"));
        assert_eq!(o.action, Action::Quantize(affine(8, 64)));
        let e = parse_override_flag("lm_head", top).unwrap_err().to_string();
        assert!(e.contains("REGEX=BITS"), "{e}");
        let e = parse_override_flag("(=8", top).unwrap_err().to_string();
        assert!(e.contains("not a valid regex"), "{e}");
        let e = parse_override_flag("x=4:16", top).unwrap_err().to_string();
        assert!(e.contains("group size"), "{e}");
        assert_eq!(parse_no_quant_flag("embed").unwrap().action, Action::Float);
    }

    #[test]
    fn config_file_parses() {
        let f: QuantConfigFile = toml::from_str(
            r#"
bits = 4
predicate = "mixed_3_6"
no_quant = ['lm_head']
[[override]]
modules = 'mlp\.gate$'
bits = 8
[[override]]
modules = 'v_proj'
mode = "mxfp8"
"#,
        )
        .unwrap();
        let rules = f.rules(Path::new("q.toml"), affine(4, 64)).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].action, Action::Quantize(affine(8, 64)));
        assert!(matches!(rules[1].action, Action::Quantize(s) if s.mode == QuantMode::Mxfp8));
        assert_eq!(rules[2].action, Action::Float);
        let bad: QuantConfigFile = toml::from_str("[[override]]\nmodules = 'x'\n").unwrap();
        assert!(bad.rules(Path::new("q.toml"), affine(4, 64)).is_err());
        assert!(toml::from_str::<QuantConfigFile>("bitz = 3").is_err());
    }
}
