//! Tensor shapes against config.json, checked at plan time (before any tensor byte is read).
//!
//! A recipe declares, as data, groups of shape rules (`[[shapes]]`, see `recipes/README.md`): each
//! group names the config sections its bare keys are read from, optional defaults for absent keys, the
//! tensor-name pattern that carries a layer index and the config key counting those layers, and a list
//! of (MLX tensor-name regex, one expression per axis). [`Expr`] is the tiny integer language of those
//! axes (`num_attention_heads * head_dim`). [`ShapeRules::check`] evaluates every rule against the
//! normalized config.json and collects every disagreement into one [`Error::ShapeMismatch`], so a
//! config.json that does not describe its weights fails in milliseconds instead of after the slow part
//! (or, worse, converts into a model that loads and computes garbage).
//!
//! A dimension whose config keys are absent (and have no default) is not checked: Hub configs often
//! leave out values equal to transformers' per-model defaults, which only the model class knows.

use crate::error::{Error, Result};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest expression text accepted (recipes are small; this bounds parser work on hostile input).
const MAX_EXPR_LEN: usize = 256;
/// Nesting limit for parentheses and for defaults that refer to other defaults.
const MAX_DEPTH: usize = 16;
/// Mismatches listed in full in one error; the rest are counted.
const MAX_LISTED: usize = 8;

/// An integer expression over config.json keys: `+ - * /` (floor division, as transformers'
/// `hidden_size // num_attention_heads`), parentheses, whole numbers and keys (`hidden_size`, or a
/// dotted path from the top level such as `vision_config.hidden_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Num(u64),
    Key(String),
    Bin(Box<Expr>, Op, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Num(n) => write!(f, "{n}"),
            Expr::Key(k) => write!(f, "{k}"),
            Expr::Bin(a, op, b) => {
                let sym = match op {
                    Op::Add => "+",
                    Op::Sub => "-",
                    Op::Mul => "*",
                    Op::Div => "/",
                };
                // Parentheses only where precedence needs them, so the text reads back the same.
                let left = if a.precedence() < op.precedence() {
                    format!("({a})")
                } else {
                    a.to_string()
                };
                let right = if b.precedence() < op.precedence()
                    || (b.precedence() == op.precedence() && matches!(op, Op::Sub | Op::Div))
                {
                    format!("({b})")
                } else {
                    b.to_string()
                };
                write!(f, "{left} {sym} {right}")
            }
        }
    }
}

impl Op {
    fn precedence(self) -> u8 {
        match self {
            Op::Add | Op::Sub => 1,
            Op::Mul | Op::Div => 2,
        }
    }
}

impl Expr {
    fn precedence(&self) -> u8 {
        match self {
            Expr::Bin(_, op, _) => op.precedence(),
            _ => 3,
        }
    }

    /// Parses an axis expression; the error says what is wrong where.
    pub fn parse(text: &str) -> std::result::Result<Expr, String> {
        if text.len() > MAX_EXPR_LEN {
            return Err(format!(
                "expression is longer than {MAX_EXPR_LEN} characters"
            ));
        }
        let tokens = tokenize(text)?;
        let mut p = Parser { tokens, pos: 0 };
        let e = p.sum(0)?;
        match p.tokens.get(p.pos) {
            None => Ok(e),
            Some(t) => Err(format!("unexpected `{t}` in `{text}`")),
        }
    }

    fn keys(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Num(_) => {}
            Expr::Key(k) => {
                out.insert(k.clone());
            }
            Expr::Bin(a, _, b) => {
                a.keys(out);
                b.keys(out);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Num(u64),
    Key(String),
    Sym(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Num(n) => write!(f, "{n}"),
            Token::Key(k) => write!(f, "{k}"),
            Token::Sym(c) => write!(f, "{c}"),
        }
    }
}

fn tokenize(text: &str) -> std::result::Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            let n = s
                .parse()
                .map_err(|_| format!("number `{s}` is too large"))?;
            out.push(Token::Num(n));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            let k: String = chars[start..i].iter().collect();
            if k.ends_with('.') || k.contains("..") {
                return Err(format!("`{k}` is not a config key"));
            }
            out.push(Token::Key(k));
        } else if "+-*/()".contains(c) {
            out.push(Token::Sym(c));
            i += 1;
        } else {
            return Err(format!(
                "unexpected character `{c}` in `{text}` (use config keys, whole numbers, + - * / and parentheses)"
            ));
        }
    }
    if out.is_empty() {
        return Err("empty expression".into());
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn sum(&mut self, depth: usize) -> std::result::Result<Expr, String> {
        let mut e = self.product(depth)?;
        while let Some(Token::Sym(c @ ('+' | '-'))) = self.tokens.get(self.pos).cloned() {
            self.pos += 1;
            let op = if c == '+' { Op::Add } else { Op::Sub };
            e = Expr::Bin(Box::new(e), op, Box::new(self.product(depth)?));
        }
        Ok(e)
    }

    fn product(&mut self, depth: usize) -> std::result::Result<Expr, String> {
        let mut e = self.atom(depth)?;
        while let Some(Token::Sym(c @ ('*' | '/'))) = self.tokens.get(self.pos).cloned() {
            self.pos += 1;
            let op = if c == '*' { Op::Mul } else { Op::Div };
            e = Expr::Bin(Box::new(e), op, Box::new(self.atom(depth)?));
        }
        Ok(e)
    }

    fn atom(&mut self, depth: usize) -> std::result::Result<Expr, String> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        match t {
            Some(Token::Num(n)) => Ok(Expr::Num(n)),
            Some(Token::Key(k)) => Ok(Expr::Key(k)),
            Some(Token::Sym('(')) => {
                if depth >= MAX_DEPTH {
                    return Err("parentheses nested too deeply".into());
                }
                let e = self.sum(depth + 1)?;
                match self.tokens.get(self.pos) {
                    Some(Token::Sym(')')) => {
                        self.pos += 1;
                        Ok(e)
                    }
                    _ => Err("`(` without a matching `)`".into()),
                }
            }
            Some(t) => Err(format!("expected a key or a number, found `{t}`")),
            None => Err("the expression ends too early".into()),
        }
    }
}

// ---- recipe data -------------------------------------------------------------------------------

/// One `[[shapes]]` group of a recipe, as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeGroupFile {
    /// Config sections bare keys are read from, in order; `""` is the top level.
    pub sections: Vec<String>,
    /// Expressions for keys that config.json may leave out (transformers' defaults for this model).
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
    pub layers: Option<LayersFile>,
    #[serde(default)]
    pub tensors: Vec<TensorShapeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayersFile {
    /// MLX tensor-name regex whose first group is the layer index.
    pub tensor: String,
    /// Expression for the number of layers (e.g. `num_hidden_layers`).
    pub count: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShapeFile {
    /// MLX tensor-name regex (whole name).
    pub tensor: String,
    /// One expression per axis of the MLX-layout shape.
    pub dims: Vec<toml::Value>,
}

/// A parsed `[[shapes]]` group.
#[derive(Debug, Clone)]
pub struct ShapeGroup {
    pub sections: Vec<String>,
    pub defaults: BTreeMap<String, Expr>,
    pub layers: Option<(Regex, Expr)>,
    pub tensors: Vec<(Regex, Vec<Expr>)>,
}

/// Every shape group of a recipe.
#[derive(Debug, Clone, Default)]
pub struct ShapeRules {
    pub groups: Vec<ShapeGroup>,
}

/// An axis given in TOML as a string expression or a bare whole number.
fn expr_value(v: &toml::Value) -> std::result::Result<Expr, String> {
    match v {
        toml::Value::String(s) => Expr::parse(s),
        toml::Value::Integer(n) if *n >= 0 => Ok(Expr::Num(*n as u64)),
        other => Err(format!(
            "`{other}` is neither an expression string nor a whole number"
        )),
    }
}

impl ShapeRules {
    /// Builds the rules from the file's groups; `anchored` compiles a whole-name regex (the recipe's
    /// own helper, so every pattern error reads the same).
    pub fn from_file(
        groups: &[ShapeGroupFile],
        anchored: impl Fn(&str, &str) -> Result<Regex>,
        err: impl Fn(String) -> Error,
    ) -> Result<ShapeRules> {
        let mut out = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let ctx = |what: &str, e: String| err(format!("shapes[{gi}] {what}: {e}"));
            if g.sections.is_empty() {
                return Err(ctx(
                    "sections",
                    "name at least one config section (\"\" is the top level)".into(),
                ));
            }
            let mut defaults = BTreeMap::new();
            for (k, v) in &g.defaults {
                defaults.insert(
                    k.clone(),
                    expr_value(v).map_err(|e| ctx(&format!("default `{k}`"), e))?,
                );
            }
            let layers = match &g.layers {
                None => None,
                Some(l) => {
                    let re = anchored("shapes.layers", &l.tensor)?;
                    if re.captures_len() < 2 {
                        return Err(ctx(
                            "layers",
                            format!(
                                "pattern `{}` needs a group capturing the layer index",
                                l.tensor
                            ),
                        ));
                    }
                    Some((
                        re,
                        Expr::parse(&l.count).map_err(|e| ctx("layers.count", e))?,
                    ))
                }
            };
            let mut tensors = Vec::new();
            for t in &g.tensors {
                let dims = t
                    .dims
                    .iter()
                    .map(expr_value)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| ctx(&format!("tensor `{}`", t.tensor), e))?;
                if dims.is_empty() {
                    return Err(ctx(
                        &format!("tensor `{}`", t.tensor),
                        "dims is empty".into(),
                    ));
                }
                tensors.push((anchored("shapes.tensors", &t.tensor)?, dims));
            }
            out.push(ShapeGroup {
                sections: g.sections.clone(),
                defaults,
                layers,
                tensors,
            });
        }
        Ok(ShapeRules { groups: out })
    }

    /// Checks every tensor (source name, MLX name, MLX-layout shape) against `config` (normalized).
    pub fn check(&self, tensors: &[(&str, &str, Vec<usize>)], config: &Value) -> Result<()> {
        let mut problems = Vec::new();
        for g in &self.groups {
            let scope = Scope::new(config, g);
            for (source, name, shape) in tensors {
                // The first rule of the group whose pattern matches decides, like name rules.
                let Some((_, dims)) = g.tensors.iter().find(|(re, _)| re.is_match(name)) else {
                    continue;
                };
                let label = tensor_label(source, name);
                if dims.len() != shape.len() {
                    problems.push(format!(
                        "{label} has shape {shape:?} ({} axes) but the recipe expects {} axes [{}]",
                        shape.len(),
                        dims.len(),
                        dims.iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    continue;
                }
                // One line per tensor: the expected shape (`_` where config.json is silent) and
                // the config values it came from.
                let mut wrong = false;
                let mut expected = Vec::with_capacity(dims.len());
                for (d, &got) in dims.iter().zip(shape) {
                    match scope.eval(d, 0)? {
                        Some(want) => {
                            wrong |= want != got as u64;
                            expected.push(want.to_string());
                        }
                        None => expected.push("_".into()),
                    }
                }
                if wrong {
                    let exprs: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                    problems.push(format!(
                        "{label} has shape {shape:?}, but config.json implies [{}] = [{}]{}",
                        expected.join(", "),
                        exprs.join(", "),
                        scope.explain(dims)
                    ));
                }
            }
            if let Some((re, count_expr)) = &g.layers {
                let Some(count) = scope.eval(count_expr, 0)? else {
                    continue;
                };
                let mut seen: BTreeSet<u64> = BTreeSet::new();
                let mut beyond: Option<String> = None;
                for (source, name, _) in tensors {
                    let Some(idx) = re
                        .captures(name)
                        .and_then(|c| c.get(1))
                        .and_then(|m| m.as_str().parse::<u64>().ok())
                    else {
                        continue;
                    };
                    if idx >= count && beyond.is_none() {
                        beyond = Some(tensor_label(source, name));
                    }
                    seen.insert(idx);
                }
                let pattern = re
                    .as_str()
                    .trim_start_matches("^(?:")
                    .trim_end_matches(")$");
                let counted = std::slice::from_ref(count_expr);
                if let Some(example) = beyond {
                    let extra: BTreeSet<u64> = seen.range(count..).copied().collect();
                    problems.push(format!(
                        "config.json says {count_expr} = {count}{}, but the checkpoint has tensors for layer(s) {} (e.g. {example}; pattern `{pattern}`)",
                        scope.explain(counted),
                        format_ranges(&ranges_of(&extra)),
                    ));
                }
                // Gaps between the layers present, never enumerated one by one: a hostile count
                // (say 1e18) must not allocate.
                let mut gaps: Vec<(u64, u64)> = Vec::new();
                let mut next = 0u64;
                for &i in seen.range(..count) {
                    if i > next {
                        gaps.push((next, i - 1));
                    }
                    next = i + 1;
                }
                if next < count {
                    gaps.push((next, count - 1));
                }
                if !gaps.is_empty() {
                    problems.push(format!(
                        "config.json says {count_expr} = {count}{}, but the checkpoint has no tensors for layer(s) {} (pattern `{pattern}`)",
                        scope.explain(counted),
                        format_ranges(&gaps),
                    ));
                }
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let count = problems.len();
        let mut list: Vec<String> = problems
            .into_iter()
            .take(MAX_LISTED)
            .map(|p| format!("  - {p}"))
            .collect();
        if count > MAX_LISTED {
            list.push(format!("  - and {} more", count - MAX_LISTED));
        }
        Err(Error::ShapeMismatch {
            count,
            list: list.join("\n"),
        })
    }
}

fn tensor_label(source: &str, name: &str) -> String {
    if source == name {
        format!("tensor `{source}`")
    } else {
        format!("tensor `{source}` (MLX `{name}`)")
    }
}

/// `[2, 3, 4, 7]` -> `[(2, 4), (7, 7)]`.
fn ranges_of(v: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in v {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// `[(2, 4), (7, 7)]` -> `2..4, 7`; long lists are cut short.
fn format_ranges(r: &[(u64, u64)]) -> String {
    const SHOWN: usize = 10;
    let mut parts: Vec<String> = r
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect();
    if r.len() > SHOWN {
        parts.push(format!("and {} more ranges", r.len() - SHOWN));
    }
    parts.join(", ")
}

/// Where a group's keys are looked up.
struct Scope<'a> {
    config: &'a Value,
    group: &'a ShapeGroup,
    /// Defaults already evaluated (`None`: not computable, or part of a cycle). Each default is
    /// evaluated once, so defaults that refer to each other cannot make the work explode.
    resolved: RefCell<BTreeMap<String, Option<u64>>>,
}

impl<'a> Scope<'a> {
    fn new(config: &'a Value, group: &'a ShapeGroup) -> Self {
        Scope {
            config,
            group,
            resolved: RefCell::new(BTreeMap::new()),
        }
    }
}

/// A config value found for a key, and the dotted path it came from (for messages).
enum Lookup {
    Found(String, u64),
    Default,
    Absent,
}

impl Scope<'_> {
    fn lookup(&self, key: &str) -> Result<Lookup> {
        let paths: Vec<String> = if key.contains('.') {
            vec![key.to_string()]
        } else {
            self.group
                .sections
                .iter()
                .map(|s| {
                    if s.is_empty() {
                        key.to_string()
                    } else {
                        format!("{s}.{key}")
                    }
                })
                .collect()
        };
        for p in paths {
            let mut cur = Some(self.config);
            for part in p.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            match cur {
                None | Some(Value::Null) => continue,
                Some(Value::Number(n)) => {
                    // A fractional value (say `mlp_ratio = 2.5`) cannot size an axis by itself and
                    // only the model class knows how it rounds: that dimension is not checked.
                    let whole = n.as_u64().or_else(|| {
                        n.as_f64()
                            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                            .map(|f| f as u64)
                    });
                    return Ok(whole.map_or(Lookup::Absent, |w| Lookup::Found(p, w)));
                }
                Some(v) => {
                    return Err(Error::ConfigInvalid {
                        path: "config.json".into(),
                        msg: format!(
                        "`{p}` is {v}, not a number; fix it (tensor shapes are checked against it)"
                    ),
                    })
                }
            }
        }
        if !key.contains('.') && self.group.defaults.contains_key(key) {
            return Ok(Lookup::Default);
        }
        Ok(Lookup::Absent)
    }

    /// The value of `e`, or `None` when a key it needs is absent (the dimension is then not checked).
    fn eval(&self, e: &Expr, depth: usize) -> Result<Option<u64>> {
        Ok(match e {
            Expr::Num(n) => Some(*n),
            Expr::Key(k) => match self.lookup(k)? {
                Lookup::Found(_, n) => Some(n),
                Lookup::Default => {
                    if let Some(v) = self.resolved.borrow().get(k) {
                        return Ok(*v);
                    }
                    // Marked first, so a cycle finds `None` instead of recursing.
                    self.resolved.borrow_mut().insert(k.clone(), None);
                    let v = if depth < MAX_DEPTH {
                        self.eval(&self.group.defaults[k.as_str()], depth + 1)?
                    } else {
                        None
                    };
                    self.resolved.borrow_mut().insert(k.clone(), v);
                    v
                }
                Lookup::Absent => None,
            },
            Expr::Bin(a, op, b) => {
                let (Some(x), Some(y)) = (self.eval(a, depth)?, self.eval(b, depth)?) else {
                    return Ok(None);
                };
                // Overflow or a zero divisor: the config is nonsense, and not this check's to judge.
                match op {
                    Op::Add => x.checked_add(y),
                    Op::Sub => x.checked_sub(y),
                    Op::Mul => x.checked_mul(y),
                    Op::Div => x.checked_div(y),
                }
            }
        })
    }

    /// Where the keys of `exprs` came from, defaults' own keys included: ` (head_dim absent, default
    /// hidden_size / num_attention_heads = 32, text_config.hidden_size = 128, ...)`.
    fn explain(&self, exprs: &[Expr]) -> String {
        let mut keys = BTreeSet::new();
        for e in exprs {
            e.keys(&mut keys);
        }
        // Follow defaults to the keys they are computed from (bounded: defaults may refer to each other).
        for _ in 0..MAX_DEPTH {
            let mut more = BTreeSet::new();
            for k in &keys {
                if let Ok(Lookup::Default) = self.lookup(k) {
                    self.group.defaults[k.as_str()].keys(&mut more);
                }
            }
            let before = keys.len();
            keys.extend(more);
            if keys.len() == before {
                break;
            }
        }
        let mut parts = Vec::new();
        for k in keys {
            match self.lookup(&k) {
                Ok(Lookup::Found(path, n)) => parts.push(format!("{path} = {n}")),
                Ok(Lookup::Default) => {
                    let d = &self.group.defaults[k.as_str()];
                    let v = self
                        .eval(&Expr::Key(k.clone()), 0)
                        .ok()
                        .flatten()
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "?".into());
                    parts.push(format!("{k} absent, default {d} = {v}"));
                }
                _ => {}
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(toml_text: &str) -> ShapeRules {
        #[derive(Deserialize)]
        struct F {
            shapes: Vec<ShapeGroupFile>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        ShapeRules::from_file(
            &f.shapes,
            |_, p| Ok(Regex::new(&format!("^(?:{p})$")).unwrap()),
            Error::Plan,
        )
        .unwrap()
    }

    #[test]
    fn expressions_parse_print_and_evaluate() {
        let e = Expr::parse("num_key_value_heads * head_dim").unwrap();
        assert_eq!(e.to_string(), "num_key_value_heads * head_dim");
        let e = Expr::parse("(a + 2) * b / 4 - 1").unwrap();
        assert_eq!(e.to_string(), "(a + 2) * b / 4 - 1");
        assert_eq!(
            Expr::parse("a - (b - c)").unwrap().to_string(),
            "a - (b - c)"
        );
        for bad in [
            "",
            "a *",
            "(a",
            "a b",
            "a $ b",
            "a..b",
            "a.",
            "99999999999999999999999",
        ] {
            assert!(Expr::parse(bad).is_err(), "{bad}");
        }
        assert!(Expr::parse(&"(".repeat(40)).is_err());
        let r = rules(
            "[[shapes]]\nsections = ['text_config', '']\ndefaults = { head_dim = 'hidden_size / num_attention_heads' }\ntensors = [{ tensor = 'q', dims = ['num_attention_heads * head_dim', 'hidden_size'] }]",
        );
        let cfg = json!({"text_config": {"hidden_size": 128, "num_attention_heads": 4}});
        let s = Scope::new(&cfg, &r.groups[0]);
        assert_eq!(
            s.eval(&Expr::parse("head_dim").unwrap(), 0).unwrap(),
            Some(32)
        );
        assert_eq!(
            s.eval(&Expr::parse("missing * 2").unwrap(), 0).unwrap(),
            None
        );
        assert_eq!(
            s.eval(&Expr::parse("hidden_size / 0").unwrap(), 0).unwrap(),
            None
        );
        assert_eq!(
            s.eval(&Expr::parse("text_config.hidden_size - 1").unwrap(), 0)
                .unwrap(),
            Some(127)
        );
    }

    #[test]
    fn mismatches_name_tensor_shape_key_and_value() {
        let r = rules(
            r#"
[[shapes]]
sections = ["text_config", ""]
defaults = { head_dim = "hidden_size / num_attention_heads" }
layers = { tensor = 'lm\.layers\.(\d+)\..+', count = "num_hidden_layers" }
tensors = [
  { tensor = 'lm\.embed\.weight', dims = ["vocab_size", "hidden_size"] },
  { tensor = 'lm\.layers\.\d+\.q\.weight', dims = ["num_attention_heads * head_dim", "hidden_size"] },
]
"#,
        );
        let t = |s: &'static str, shape: &[usize]| (s, s, shape.to_vec());
        let good = vec![
            t("lm.embed.weight", &[300, 64]),
            t("lm.layers.0.q.weight", &[64, 64]),
            t("lm.layers.1.q.weight", &[64, 64]),
        ];
        let cfg = json!({"vocab_size": 300, "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}});
        r.check(&good, &cfg).unwrap();
        // Absent keys are not checked.
        r.check(&good, &json!({})).unwrap();

        let mut bad = cfg.clone();
        bad["text_config"]["hidden_size"] = 128.into();
        let e = r.check(&good, &bad).unwrap_err().to_string();
        assert!(e.contains("tensor `lm.embed.weight` has shape [300, 64], but config.json implies [300, 128] = [vocab_size, hidden_size] (text_config.hidden_size = 128, vocab_size = 300)"), "{e}");
        assert!(e.contains("implies [128, 128] = [num_attention_heads * head_dim, hidden_size] (head_dim absent, default hidden_size / num_attention_heads = 32"), "{e}");

        let mut bad = cfg.clone();
        bad["text_config"]["num_hidden_layers"] = 1.into();
        let e = r.check(&good, &bad).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers = 1 (text_config.num_hidden_layers = 1), but the checkpoint has tensors for layer(s) 1 (e.g. tensor `lm.layers.1.q.weight`"), "{e}");
        bad["text_config"]["num_hidden_layers"] = 5.into();
        let e = r.check(&good, &bad).unwrap_err().to_string();
        assert!(e.contains("no tensors for layer(s) 2..4"), "{e}");

        let mut bad = cfg.clone();
        bad["vocab_size"] = 300.5.into();
        r.check(&good, &bad).unwrap();
        bad["vocab_size"] = 300.0.into();
        r.check(&good, &bad).unwrap();
        bad["vocab_size"] = "many".into();
        let e = r.check(&good, &bad).unwrap_err().to_string();
        assert!(e.contains("`vocab_size` is \"many\""), "{e}");
    }

    #[test]
    fn ranges_compress() {
        let set: BTreeSet<u64> = [2, 3, 4, 7, 9, 10].into_iter().collect();
        assert_eq!(format_ranges(&ranges_of(&set)), "2..4, 7, 9..10");
        let many: Vec<(u64, u64)> = (0..12).map(|i| (i * 2, i * 2)).collect();
        assert!(format_ranges(&many).ends_with("18, and 2 more ranges"));
    }

    #[test]
    fn defaults_referring_to_each_other_are_evaluated_once() {
        // 40 defaults, each the sum of 40 copies of the next: naive evaluation would take 40^40 steps.
        let mut defaults = Vec::new();
        for i in 0..40 {
            let next = format!("d{}", i + 1);
            defaults.push(format!("d{i} = '{}'", vec![next.as_str(); 40].join(" + ")));
        }
        defaults.push("d40 = 'd0'".into());
        let r = rules(&format!(
            "[[shapes]]\nsections = ['']\ndefaults = {{ {} }}\ntensors = [{{ tensor = 'x', dims = ['d0'] }}]",
            defaults.join(", ")
        ));
        let t = std::time::Instant::now();
        r.check(&[("x", "x", vec![3])], &json!({})).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_huge_layer_count_is_reported_without_enumerating_it() {
        let r = rules(
            "[[shapes]]\nsections = ['']\nlayers = { tensor = 'l\\.(\\d+)\\..+', count = 'n' }",
        );
        let t = vec![("l.0.w", "l.0.w", vec![1]), ("l.2.w", "l.2.w", vec![1])];
        let e = r
            .check(&t, &json!({"n": u64::MAX}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("layer(s) 1, 3..{}", u64::MAX - 1)),
            "{e}"
        );
    }
}
