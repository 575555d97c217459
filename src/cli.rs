//! The command line: clap definitions (flag names follow `mlx_vlm.convert`), turning flags into the
//! library's options, and printing human or `--json` output. Errors leave here as [`Error`]s; `main`
//! maps them to the documented exit codes.

use crate::config::normalize;
use crate::dequant;
use crate::dtype::{DType, FloatType};
use crate::error::{exit, Error, Result};
use crate::hub;
use crate::pipeline::{check_output_path, plan_json, pretty, write_output, OutputSpec};
use crate::plan::{Plan, PlanOptions, SourceDesc};
use crate::quant::{QuantMode, QuantSpec};
use crate::quant_rules::{self, Mixed, QuantConfigFile, QuantRules};
use crate::recipe::Recipe;
use crate::source::{self, Source};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    verification failed
  2    bad command line
  3    bad input checkpoint (missing/corrupt files, inconsistent index or config); `check` found problems
  4    unsupported architecture, or the recipe does not cover the checkpoint
  5    cannot write the output (exists without --force, inside the input, disk full, permissions)
  130  interrupted (SIGINT/SIGTERM); the partial output was removed";

#[derive(Parser, Debug)]
#[command(
    name = "vlm-convert",
    version,
    about = "Convert Hugging Face vision-language checkpoints to MLX, quantize them bit-exactly, verify the result",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub convert: ConvertArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the built-in recipes (supported architectures).
    Recipes {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run a converted model and compare it with reference logits or the original weights
    /// (structure level in float32, quality level as mlx-vlm runs it); PASS exits 0, FAIL exits 1.
    Verify(Box<VerifyArgs>),
    /// Validate an MLX model directory (ours or anyone's): files, index, headers, quantized shapes.
    Check {
        /// The MLX model directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Pass/fail limits of the verify stage (defaults per bit width; see `vlm-convert verify --help`).
#[derive(Args, Debug, Default, Clone)]
pub struct ThresholdArgs {
    /// Structure level: largest |logit diff| allowed (float32 on both sides) [default: 1e-3].
    #[arg(long = "max-structure-diff", value_name = "X")]
    pub max_structure_diff: Option<f32>,
    /// Quality level: largest mean KL(reference || converted) per prompt, nats [default: per bits].
    #[arg(long = "max-kl", value_name = "X")]
    pub max_kl: Option<f64>,
    /// Quality level: smallest top-1 agreement, 0..1 [default: per bits].
    #[arg(long = "min-top1", value_name = "X")]
    pub min_top1: Option<f64>,
    /// Quality level: smallest top-5 overlap, 0..1 [default: per bits].
    #[arg(long = "min-top5", value_name = "X")]
    pub min_top5: Option<f64>,
    /// Greedy tokens generated per prompt (reported side by side with the reference's).
    #[arg(long = "new-tokens", value_name = "N", default_value_t = 8)]
    pub new_tokens: usize,
    /// The image prompt's image (PNG/JPEG) [default: a built-in synthetic test image, for every
    /// architecture with an image path].
    #[arg(long, value_name = "FILE", conflicts_with = "no_image")]
    pub image: Option<PathBuf>,
    /// The image prompt's text [default: "Describe the image."].
    #[arg(long = "prompt", value_name = "TEXT", conflicts_with = "no_image")]
    pub prompt: Option<String>,
    /// Text prompts only: skip the image prompt.
    #[arg(long = "no-image")]
    pub no_image: bool,
}

#[derive(Args, Debug)]
#[command(after_help = VERIFY_HELP)]
pub struct VerifyArgs {
    /// The converted MLX model directory.
    #[arg(long = "mlx-path", value_name = "DIR")]
    pub mlx_path: PathBuf,
    /// Reference logits (safetensors, from scripts/reference_logits.py or --save-reference).
    #[arg(long, value_name = "FILE", required_unless_present = "against")]
    pub reference: Option<PathBuf>,
    /// The original checkpoint: compute the reference with our own forward pass on its weights
    /// (enables the structure level).
    #[arg(long, value_name = "SRC")]
    pub against: Option<PathBuf>,
    /// Recipe file for --against (default: the built-in one for its config.json).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// A prompt as comma-separated token ids (repeatable) [default: 3 built-in prompts].
    #[arg(long = "prompt-ids", value_name = "IDS")]
    pub prompt_ids: Vec<String>,
    /// With --against: also write the float reference to FILE, for later --reference runs.
    #[arg(long = "save-reference", value_name = "FILE", requires = "against")]
    pub save_reference: Option<PathBuf>,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print only the verdict line.
    #[arg(long)]
    pub quiet: bool,
}

const VERIFY_HELP: &str = "\
Levels:
  structure  (--against) the conversion in float32 vs the source weights through the same cast and
             MLX quantize-dequantize; independent of bit width; names differing tensors, config
             settings and the first divergent layer
  quality    the conversion as mlx-vlm runs it vs a float32 reference: max |diff|, mean KL, top-1,
             top-5, greedy continuations
Prompts: 3 built-in text prompts (or --prompt-ids / the reference file's), plus one image prompt
  (--image, default a synthetic test image; --prompt TEXT) through the vision tower and projector for
  llava, paligemma, gemma3, qwen2_vl, qwen2_5_vl, qwen3_vl; other architectures are checked on text
  prompts and the report says so
Exit codes: 0 PASS, 1 FAIL (or the converted model cannot run), 2 usage, 3 bad reference/source,
  4 built without MLX or an architecture the forward does not cover";

#[derive(Args, Debug, Default)]
pub struct ConvertArgs {
    /// The source checkpoint: a local Hugging Face model directory (or a snapshot in the HF cache),
    /// or a Hub repo id ORG/NAME (anything that is not an existing path), downloaded into the
    /// Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_ENDPOINT for a mirror; HF_HUB_OFFLINE=1 uses
    /// the cache alone).
    #[arg(
        long = "hf-path",
        visible_alias = "model",
        value_name = "PATH|ORG/NAME"
    )]
    pub hf_path: Option<PathBuf>,
    /// Hub revision (branch, tag or commit) of a repo id --hf-path [default: main].
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Hub token [default: HF_TOKEN, else the token file huggingface-cli login writes]. Never
    /// printed or written.
    #[arg(long = "hf-token", value_name = "TOKEN")]
    pub hf_token: Option<String>,
    /// Upload the output to this Hub model repo (created if needed) in one commit.
    #[arg(long = "upload-repo", value_name = "ORG/NAME")]
    pub upload_repo: Option<String>,
    /// Create the --upload-repo repo private.
    #[arg(long, requires = "upload_repo")]
    pub private: bool,
    /// Output directory [default: <model>-<4bit|8bit|bf16|...> in the current directory].
    #[arg(long = "mlx-path", value_name = "DIR")]
    pub mlx_path: Option<PathBuf>,
    /// Quantize (affine 4 bits, group size 64 unless --q-bits / --q-group-size / --q-mode say otherwise).
    #[arg(short = 'q', long)]
    pub quantize: bool,
    /// Bits per weight: 2, 3, 4, 5, 6 or 8 for affine; mxfp4/nvfp4 take 4, mxfp8 8 (implies --quantize).
    #[arg(long = "q-bits", value_name = "N")]
    pub q_bits: Option<u32>,
    /// Quantization group size: 32, 64 or 128 for affine; mxfp4/mxfp8 take 32, nvfp4 16 (implies --quantize).
    #[arg(long = "q-group-size", value_name = "N")]
    pub q_group_size: Option<usize>,
    /// Quantization mode: affine, mxfp4, nvfp4 or mxfp8 [default: affine] (implies --quantize).
    #[arg(long = "q-mode", value_name = "MODE")]
    pub q_mode: Option<String>,
    /// Mixed-precision recipe for the language model: mixed_2_6, mixed_3_4, mixed_3_5, mixed_3_6,
    /// mixed_3_8, mixed_4_6 or mixed_4_8 (affine, group size 64; implies --quantize).
    #[arg(long = "quant-predicate", value_name = "NAME")]
    pub quant_predicate: Option<String>,
    /// Quantize modules whose MLX path matches REGEX with these settings, e.g. 'lm_head=8' or
    /// 'mlp\.gate=8:32' or 'v_proj=mxfp8'. Repeatable; beats the predicate and --quant-config
    /// (implies --quantize).
    #[arg(long = "quant-override", value_name = "REGEX=BITS[:GROUP[:MODE]]")]
    pub quant_override: Vec<String>,
    /// Keep modules whose MLX path matches REGEX float, e.g. 'lm_head' or 'embed_tokens'. Repeatable;
    /// beats every other rule.
    #[arg(long = "no-quant", value_name = "REGEX")]
    pub no_quant: Vec<String>,
    /// Quantization rules from a TOML file (format in README.md; implies --quantize).
    #[arg(long = "quant-config", value_name = "FILE")]
    pub quant_config: Option<PathBuf>,
    /// Dequantize an MLX-quantized model back to float (the scales' dtype, bf16 for the fp modes, or
    /// --dtype), byte-identical to mx.dequantize. To re-quantize, pass -q etc. instead.
    #[arg(short = 'd', long)]
    pub dequantize: bool,
    /// Float type of the output (applied before quantization) [default: the checkpoint's own].
    #[arg(long, value_name = "float16|bfloat16|float32")]
    pub dtype: Option<FloatType>,
    /// Largest output shard, e.g. 5GB, 500MB, 2GiB or a byte count.
    #[arg(long = "max-shard-size", value_name = "SIZE", default_value = "5GiB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Use this recipe file instead of the built-in one chosen from config.json.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Print the plan (every output tensor) and write nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Print a machine-readable JSON summary (or plan, with --dry-run) on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars or human summary.
    #[arg(long)]
    pub quiet: bool,
    /// Replace an existing --mlx-path.
    #[arg(long)]
    pub force: bool,
    /// Convert even if weights hold NaN or infinity (refused by default).
    #[arg(long = "allow-nonfinite")]
    pub allow_nonfinite: bool,
    /// Also copy the repo's *.py files (custom model code) to the output. vlm-convert never runs them.
    #[arg(long = "copy-remote-code")]
    pub copy_remote_code: bool,
    /// After converting, verify the output against the source weights (`vlm-convert verify
    /// --against`); a FAIL exits 1 and keeps the output for inspection.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
    /// Do not hash the input files for provenance.json (sizes are still recorded). Inputs in a
    /// Hugging Face cache are named by their hash and are recorded either way.
    #[arg(long = "no-input-hash")]
    pub no_input_hash: bool,
    /// Record sizes only in provenance.json: no sha256 of the inputs or of the outputs. Saves one
    /// hashing pass over the output (and one over the inputs), about a second per GB of CPU time;
    /// `check` then verifies the files' sizes, not their contents.
    #[arg(long = "no-hash")]
    pub no_hash: bool,
}

/// Parses `5GB`, `500MB`, `2GiB`, `1024` (bytes).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown size unit `{u}` in `{s}`")),
    };
    let v = n * mult;
    if v.is_nan() || v < 1.0 {
        return Err(format!("shard size `{s}` must be at least one byte"));
    }
    Ok(v as u64)
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Some(Command::Recipes { json }) => list_recipes(json),
        Some(Command::Check { dir, json }) => {
            let r = crate::check::check_dir(&dir)?;
            if json {
                println!(
                    "{}",
                    pretty(&serde_json::to_value(&r).expect("report serializes"))
                );
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                let pv = &r.provenance;
                match pv.status {
                    "absent" => println!("provenance: no provenance file (not verified)"),
                    "verified" => println!(
                        "provenance: {} file(s) match {} (source {}{})",
                        pv.verified_files,
                        crate::provenance::FILE,
                        pv.source.as_deref().unwrap_or("?"),
                        pv.revision
                            .as_deref()
                            .map(|r| format!(" at {r}"))
                            .unwrap_or_default()
                    ),
                    _ => println!(
                        "provenance: FAILED ({} problem(s) above)",
                        pv.problems.len()
                    ),
                }
                println!(
                    "{}: {} file(s), {} tensors, {} quantized modules, {} problem(s)",
                    dir.display(),
                    r.files,
                    r.tensors,
                    r.quantized_modules,
                    r.problems.len()
                );
            }
            Ok(if r.ok() { exit::OK } else { exit::BAD_INPUT })
        }
        Some(Command::Verify(v)) => {
            check_image_arg(&v.thresholds)?;
            verify_command(&v)
        }
        None => {
            if cli.convert.verify {
                check_image_arg(&cli.convert.thresholds)?;
            }
            convert(&cli.convert)
        }
    }
}

/// `--image` must name a readable file: said before any work, not after a conversion.
fn check_image_arg(t: &ThresholdArgs) -> Result<()> {
    match &t.image {
        Some(p) if !p.is_file() => Err(Error::Usage(format!(
            "--image {}: no such file (pass a PNG or JPEG image)",
            p.display()
        ))),
        _ => Ok(()),
    }
}

fn parse_prompt_ids(list: &[String]) -> Result<Vec<Vec<i32>>> {
    list.iter()
        .map(|s| {
            let ids: std::result::Result<Vec<i32>, _> = s
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse::<i32>())
                .collect();
            match ids {
                Ok(v) if !v.is_empty() => Ok(v),
                _ => Err(Error::Usage(format!(
                    "--prompt-ids `{s}`: expected comma-separated token ids, e.g. 1,2,3"
                ))),
            }
        })
        .collect()
}

#[cfg(feature = "mlx")]
fn verify_error(e: crate::verify::VerifyError) -> Error {
    use crate::verify::VerifyError as V;
    match e {
        V::Input(e) => e,
        V::Broken { .. } | V::Mlx(_) => Error::VerificationFailed(e.to_string()),
        V::Config { path, msg } => Error::ConfigInvalid { path, msg },
        V::Weights { dir, msg } => Error::Plan(format!("{}: {msg}", dir.display())),
        V::Unsupported(m) => Error::VerifyUnavailable(format!("unsupported for verification: {m}")),
        V::BadInput(m) => Error::Usage(m),
        V::Reference { path, msg } => Error::Reference { path, msg },
    }
}

/// Runs the verify stage with `opts` plus the threshold flags; `Ok(report)` whatever the verdict.
#[cfg(feature = "mlx")]
fn run_verify(
    mut opts: crate::verify::VerifyOptions,
    t: &ThresholdArgs,
) -> Result<crate::verify::Report> {
    opts.new_tokens = t.new_tokens;
    opts.image = match (&t.image, t.no_image) {
        (_, true) => crate::verify::ImageChoice::Off,
        (Some(p), false) => crate::verify::ImageChoice::File(p.clone()),
        (None, false) => crate::verify::ImageChoice::Synthetic,
    };
    opts.image_text = t.prompt.clone();
    opts.overrides = crate::verify::ThresholdOverrides {
        max_structure_diff: t.max_structure_diff,
        max_mean_kl: t.max_kl,
        min_top1: t.min_top1,
        min_top5: t.min_top5,
    };
    crate::verify::verify(&opts).map_err(verify_error)
}

#[cfg(not(feature = "mlx"))]
fn no_mlx() -> Error {
    Error::VerifyUnavailable(
        "this vlm-convert was built without MLX (--no-default-features); rebuild with the default `mlx` feature to verify".into(),
    )
}

fn verify_command(v: &VerifyArgs) -> Result<i32> {
    let prompts = parse_prompt_ids(&v.prompt_ids)?;
    let recipe = v.recipe.as_deref().map(Recipe::from_file).transpose()?;
    #[cfg(feature = "mlx")]
    {
        let report = run_verify(
            crate::verify::VerifyOptions {
                mlx_path: v.mlx_path.clone(),
                reference: v.reference.clone(),
                against: v.against.clone(),
                recipe,
                prompts,
                save_reference: v.save_reference.clone(),
                progress: !(v.quiet || v.json),
                ..Default::default()
            },
            &v.thresholds,
        )?;
        if v.json {
            println!(
                "{}",
                pretty(&serde_json::to_value(&report).expect("report serializes"))
            );
        } else if v.quiet {
            println!("{}", report.render().lines().last().unwrap_or_default());
        } else {
            print!("{}", report.render());
        }
        Ok(if report.passed {
            exit::OK
        } else {
            exit::VERIFY_FAILED
        })
    }
    #[cfg(not(feature = "mlx"))]
    {
        let _ = (prompts, recipe);
        Err(no_mlx())
    }
}

fn list_recipes(as_json: bool) -> Result<i32> {
    let all = Recipe::builtin();
    if as_json {
        let v: Vec<_> = all
            .iter()
            .map(|r| {
                json!({"name": r.name, "description": r.description, "model_types": r.model_types, "architectures": r.architectures})
            })
            .collect();
        println!("{}", pretty(&serde_json::Value::Array(v)));
    } else {
        for r in &all {
            println!(
                "{:<18} {:<40} {}",
                r.name,
                r.model_types.join(","),
                r.description
            );
        }
    }
    Ok(exit::OK)
}

/// The quantization settings of the command line (and `--quant-config`), before the recipe adds its
/// defaults: `None` when not quantizing. Every problem is a usage error (exit 2).
fn quant_rules(a: &ConvertArgs) -> Result<Option<QuantRules>> {
    let file = match &a.quant_config {
        Some(p) => Some(QuantConfigFile::read(p)?),
        None => None,
    };
    let f = file.clone().unwrap_or_default();
    let mode_name = a.q_mode.clone().or(f.mode.clone());
    let bits = a.q_bits.or(f.bits);
    let group = a.q_group_size.or(f.group_size);
    let predicate = a.quant_predicate.clone().or(f.predicate.clone());
    let wanted = a.quantize
        || bits.is_some()
        || group.is_some()
        || mode_name.is_some()
        || predicate.is_some()
        || !a.quant_override.is_empty()
        || file.is_some();
    if !wanted {
        if !a.no_quant.is_empty() {
            return Err(Error::Usage(
                "--no-quant only applies when quantizing: add -q (or --q-bits, --q-mode, ...)"
                    .into(),
            ));
        }
        return Ok(None);
    }
    let mode = match &mode_name {
        Some(m) => QuantMode::parse(m).map_err(|e| Error::Usage(format!("--q-mode: {e}")))?,
        None => QuantMode::Affine,
    };
    let default = QuantSpec::for_mode(mode, bits, group).map_err(|e| {
        Error::Usage(format!(
            "{e} (--q-mode {mode} takes its own bits and group size; omit --q-bits / --q-group-size)"
        ))
    })?;
    let mut rules = QuantRules::uniform(default);
    if let Some(p) = &predicate {
        if mode != QuantMode::Affine {
            return Err(Error::Usage(format!(
                "--quant-predicate {p} is an affine recipe (group size 64); it cannot be combined with --q-mode {mode}"
            )));
        }
        rules.predicate = Some(Mixed::parse(p)?);
    }
    if let (Some(f), Some(p)) = (&file, &a.quant_config) {
        rules.file = f.rules(p, default)?;
    }
    for o in &a.quant_override {
        rules
            .cli
            .push(quant_rules::parse_override_flag(o, default)?);
    }
    for p in &a.no_quant {
        rules.cli.push(quant_rules::parse_no_quant_flag(p)?);
    }
    Ok(Some(rules))
}

/// `Qwen2-VL-2B-Instruct-4bit`, `...-bf16`: how mlx-community names its uploads.
pub fn default_output_name(model: &str, quant: Option<QuantSpec>, dtype: Option<DType>) -> String {
    let suffix = match (quant, dtype) {
        (Some(q), _) if q.mode != QuantMode::Affine => q.mode.as_str().to_string(),
        (Some(q), _) if q.group_size != 64 => format!("{}bit-g{}", q.bits, q.group_size),
        (Some(q), _) => format!("{}bit", q.bits),
        (None, Some(DType::F16)) => "fp16".into(),
        (None, Some(DType::F32)) => "fp32".into(),
        (None, _) => "bf16".into(),
    };
    format!("{model}-{suffix}")
}

fn convert(a: &ConvertArgs) -> Result<i32> {
    let started = Instant::now();
    let Some(hf_path) = &a.hf_path else {
        return Err(Error::Usage(
            "--hf-path is required (the checkpoint directory to convert); see --help".into(),
        ));
    };
    let mut quant = quant_rules(a)?;

    if a.revision.is_some() && !is_hub_path(hf_path) {
        return Err(Error::Usage(format!(
            "--revision applies to a Hub repo id, but {} is a local path",
            hf_path.display()
        )));
    }
    if let Some(r) = &a.upload_repo {
        if !hub::is_repo_id(r) {
            return Err(Error::Usage(format!(
                "--upload-repo {r}: expected a Hub repo id ORG/NAME"
            )));
        }
    }
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&cancel))
            .map_err(|e| Error::read("signal handler", e))?;
    }
    let quiet = a.quiet || a.json;
    let choose_recipe = |config: &serde_json::Value| match &a.recipe {
        Some(p) => Recipe::from_file(p),
        None => Recipe::for_config(config),
    };

    // Architecture first: an unsupported model fails before any weight file is opened (or, for a
    // Hub repo, downloaded).
    let mut hub_client = None;
    let mut download = None;
    let (source, recipe) = if is_hub_path(hf_path) {
        let repo = hf_path.to_string_lossy().into_owned();
        let h = hub::Hub::new(hub::HubConfig::from_env(a.hf_token.as_deref()), quiet)?;
        let remote = h.open_repo(
            &repo,
            a.revision.as_deref(),
            a.copy_remote_code,
            choose_recipe,
        )?;
        download = remote.download;
        hub_client = Some(h);
        (remote.source, remote.checked)
    } else {
        let raw_config = source::load_config(hf_path)?;
        let recipe = choose_recipe(&raw_config)?;
        (Source::open(hf_path)?, recipe)
    };
    if let Some(rules) = &mut quant {
        rules.recipe = recipe.quant_overrides(rules.default)?;
    }
    let dtype = a.dtype.map(|d| d.dtype());
    let (packed, headless) = if source.tensors.keys().any(|n| n.ends_with(".scales")) {
        if !source.is_mlx() {
            return Err(Error::ConfigInvalid {
                path: hf_path.join("config.json"),
                msg: "the checkpoint has `*.scales` tensors but is not an MLX checkpoint (safetensors metadata format != mlx); only MLX-quantized models can be dequantized".into(),
            });
        }
        dequant::find_packed(&source, dtype)?
    } else {
        Default::default()
    };
    if a.dequantize && quant.is_some() {
        return Err(Error::Usage(
            "choose either --dequantize or quantization flags: re-quantizing an MLX model needs only the quantization flags (it is dequantized first)".into(),
        ));
    }
    if a.dequantize && packed.is_empty() {
        return Err(Error::Usage(format!(
            "--dequantize: {} is not quantized (no `*.scales` tensors)",
            hf_path.display()
        )));
    }
    if !packed.is_empty() && !a.dequantize && quant.is_none() {
        return Err(Error::Usage(format!(
            "{} is already quantized ({} modules): pass -d/--dequantize to get float weights, or quantization flags (-q, --q-bits, ...) to re-quantize it",
            hf_path.display(),
            packed.len()
        )));
    }
    if !packed.is_empty() && quant.is_some() {
        eprintln!(
            "warning: {} is already quantized; re-quantizing dequantizes it first, so every weight is rounded twice. Quantizing the original float checkpoint gives a more accurate model.",
            hf_path.display()
        );
    }
    // A head stored as scales/biases only borrows the embedding's packed weight (Gemma 3's tied
    // head); the recipe's head rule decides it again, so only that module may come without a weight.
    let head_module = recipe
        .head
        .as_ref()
        .and_then(|h| h.head.strip_suffix(".weight"));
    if let Some(n) = headless.iter().find(|n| {
        let m = n.rsplit_once('.').map(|(m, _)| m);
        m != head_module
    }) {
        return Err(Error::Tensor {
            path: hf_path.to_path_buf(),
            tensor: n.clone(),
            msg: "quantized module without a `weight`: cannot dequantize it".into(),
        });
    }
    let config = normalize(&source.config, &recipe.config);
    let descs: Vec<SourceDesc> = source
        .tensors
        .iter()
        .filter(|(name, _)| !headless.contains(name))
        .filter(|(name, _)| {
            !packed.values().any(|p| {
                p.packed.scales == **name || p.packed.biases.as_deref() == Some(name.as_str())
            })
        })
        .map(|(name, t)| match packed.get(name) {
            Some(u) => SourceDesc {
                name: name.clone(),
                dtype: u.dtype,
                shape: u.shape.clone(),
                packed: Some(u.packed.clone()),
            },
            None => SourceDesc::stored(name, t),
        })
        .collect();
    let opts = PlanOptions {
        dtype,
        quant: quant.clone(),
        max_shard_size: a.max_shard_size,
        source_is_mlx: source.is_mlx(),
    };
    let plan = Plan::build(&descs, &config, &recipe, &opts)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }

    if a.dry_run {
        if a.json {
            println!("{}", pretty(&plan_json(&plan)));
        } else {
            print_plan(&plan);
        }
        return Ok(exit::OK);
    }

    let out = match &a.mlx_path {
        Some(p) => p.clone(),
        None => PathBuf::from(match quant.as_ref().and_then(|q| q.predicate.as_ref()) {
            Some(p) => format!("{}-{}", source.display_name(), p.name),
            None => default_output_name(
                &source.display_name(),
                quant.as_ref().map(|q| q.default),
                plan.dtype,
            ),
        }),
    };
    check_output_path(&source, &out, a.force)?;
    if let Some(repo) = &a.upload_repo {
        // Refuse before converting what could not be uploaded.
        let cfg = hub::HubConfig::from_env(a.hf_token.as_deref());
        hub::check_can_upload(&cfg, repo)?;
        if hub_client.is_none() {
            hub_client = Some(hub::Hub::new(cfg, quiet)?);
        }
    }
    // The plan holds: start the weight downloads; the pipeline converts each shard as it arrives.
    let downloader = download.map(|d| d.start(Arc::clone(&cancel)));
    let base_model = source.repo_id().unwrap_or_else(|| source.display_name());
    let command = command_line();
    // What decided the output, for provenance.json: resolved values, not the flags' spellings (the
    // argv beside them keeps those).
    let settings = json!({
        "recipe": {"name": recipe.name, "origin": recipe.origin, "sha256": recipe.sha256},
        "dtype": plan.dtype.map(DType::torch_name),
        "quantization": plan.quant.as_ref().map(|q| q.to_json()),
        "max_shard_size": a.max_shard_size,
        "allow_nonfinite": a.allow_nonfinite,
        "copy_remote_code": a.copy_remote_code,
        "hash_inputs": !(a.no_input_hash || a.no_hash),
        "hash_outputs": !a.no_hash,
    });
    let spec = OutputSpec {
        path: &out,
        force: a.force,
        config: &config,
        base_model: &base_model,
        command: &command,
        quiet,
        allow_nonfinite: a.allow_nonfinite,
        copy_remote_code: a.copy_remote_code,
        cancel,
        model_ref: a.upload_repo.as_deref(),
        progress: hub_client.as_ref().map(hub::Hub::progress),
        settings,
        argv: crate::provenance::redact_argv(&argv()),
        hash_inputs: !(a.no_input_hash || a.no_hash),
        hash_outputs: !a.no_hash,
    };
    let stats = write_output(&source, &plan, &spec)?;
    if let Some(t) = downloader {
        // Every shard was converted, so the downloader has finished; a panic there is a bug.
        let _ = t.join();
    }
    // Verify before anything is uploaded: a conversion that fails is never published.
    #[cfg(feature = "mlx")]
    let verified = if a.verify {
        let r = run_verify(
            crate::verify::VerifyOptions {
                mlx_path: out.clone(),
                // The local copy (a Hub source is a snapshot in the cache by now).
                against: Some(source.dir.clone()),
                recipe: Some(recipe.clone()),
                progress: !quiet,
                ..Default::default()
            },
            &a.thresholds,
        )?;
        Some(r)
    } else {
        None
    };
    #[cfg(feature = "mlx")]
    let verify_failed = verified.as_ref().is_some_and(|r| !r.passed);
    #[cfg(not(feature = "mlx"))]
    let verify_failed = {
        if a.verify {
            return Err(no_mlx());
        }
        false
    };
    let uploaded = match (&a.upload_repo, &hub_client) {
        (Some(repo), Some(_)) if verify_failed => {
            eprintln!("not uploaded to {repo}: verification failed");
            None
        }
        (Some(repo), Some(h)) => {
            let url = h.upload_folder(
                repo,
                &out,
                a.private,
                &format!(
                    "Upload {} converted with vlm-convert",
                    source.display_name()
                ),
            )?;
            if !quiet {
                eprintln!("uploaded to {url}");
            }
            Some(url)
        }
        _ => None,
    };
    let secs = started.elapsed().as_secs_f64();
    let bpw = plan.bits_per_weight();
    if a.json {
        let v = json!({
            "output": out,
            "recipe": plan.recipe,
            "dtype": plan.dtype.map(DType::torch_name),
            "quantization": plan.quant.as_ref().map(|q| q.to_json()),
            "tensors": plan.tensors.len(),
            "quantized": plan.quantized_count(),
            "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written,
            "total_parameters": plan.total_parameters,
            "bits_per_weight": bpw.overall,
            "bits_per_weight_by_part": {"language": bpw.language, "vision": bpw.vision},
            "seconds": secs,
            "files": stats.files,
            "unquantized": plan.unquantized,
            "dropped": plan.dropped,
            "warnings": plan.warnings,
            "source_repo": source.repo_id(),
            "uploaded": uploaded,
            "events": source.feed.as_ref().map(|f| f.events()),
        });
        #[cfg(feature = "mlx")]
        let v = {
            let mut v = v;
            if let Some(r) = &verified {
                v["verify"] = serde_json::to_value(r).expect("report serializes");
            }
            v
        };
        println!("{}", pretty(&v));
    } else if !a.quiet {
        eprintln!(
            "wrote {} ({} tensors, {} quantized, {} shard(s)) in {:.2}s",
            out.display(),
            plan.tensors.len(),
            plan.quantized_count(),
            plan.shards.len(),
            secs
        );
        let part = |v: Option<f64>| v.map_or("-".to_string(), |b| format!("{b:.2}"));
        eprintln!(
            "  read {}, wrote {}, {:.2} bits per weight (language {}, vision {}), recipe {}",
            human_bytes(stats.bytes_read as u64),
            human_bytes(stats.bytes_written as u64),
            bpw.overall,
            part(bpw.language),
            part(bpw.vision),
            plan.recipe
        );
        for line in kept_float_lines(&plan) {
            eprintln!("  {line}");
        }
    }
    #[cfg(feature = "mlx")]
    if let Some(r) = verified {
        if !a.json {
            if a.quiet {
                eprintln!("{}", r.render().lines().last().unwrap_or_default());
            } else {
                eprint!("{}", r.render());
            }
        }
        if !r.passed {
            return Ok(exit::VERIFY_FAILED);
        }
    }
    Ok(exit::OK)
}

/// The modules left float, one line each, except that reasons shared by more than 3 modules (a
/// vision tower) are one line with a count and examples.
fn kept_float_lines(plan: &Plan) -> Vec<String> {
    let mut by_reason: Vec<(&str, Vec<&str>)> = Vec::new();
    for u in &plan.unquantized {
        match by_reason.iter_mut().find(|(r, _)| *r == u.reason) {
            Some((_, v)) => v.push(&u.module),
            None => by_reason.push((&u.reason, vec![&u.module])),
        }
    }
    let mut out = Vec::new();
    for (reason, modules) in by_reason {
        if modules.len() <= 3 {
            out.extend(
                modules
                    .iter()
                    .map(|m| format!("kept float: {m} ({reason})")),
            );
        } else {
            out.push(format!(
                "kept float: {} modules ({reason}), e.g. {}, {} (--dry-run lists them)",
                modules.len(),
                modules[0],
                modules[1]
            ));
        }
    }
    out
}

/// A Hub repo id rather than a local directory.
fn is_hub_path(p: &std::path::Path) -> bool {
    p.to_str().is_some_and(hub::is_repo_id)
}

/// The command line, with the program named by its file name (where it is installed is not part of
/// what it did).
fn argv() -> Vec<String> {
    let mut v: Vec<String> = std::env::args().collect();
    if let Some(first) = v.first_mut() {
        if let Some(name) = std::path::Path::new(first.as_str()).file_name() {
            *first = name.to_string_lossy().into_owned();
        }
    }
    v
}

/// The command as typed, for the model card, with the token's value replaced.
fn command_line() -> String {
    redacted_command(std::env::args().skip(1))
}

fn redacted_command(args: impl Iterator<Item = String>) -> String {
    /// Stands for the token; left unquoted so the card reads `--hf-token <token>`.
    const HIDDEN: &str = "<token>";
    let mut parts = vec!["vlm-convert".to_string()];
    let mut hide_next = false;
    for a in args {
        if hide_next {
            parts.push(HIDDEN.into());
            hide_next = false;
            continue;
        }
        if a.starts_with("--hf-token=") {
            parts.push(format!("--hf-token={HIDDEN}"));
            continue;
        }
        hide_next = a == "--hf-token";
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
        {
            parts.push(a);
        } else {
            parts.push(format!("'{}'", a.replace('\'', "'\\''")));
        }
    }
    parts.join(" ")
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_plan(plan: &Plan) {
    println!(
        "{:<64} {:<20} {:<5} {:<10} {:<8} {:>5} {:>10}  source",
        "tensor", "shape", "dtype", "quant", "layout", "shard", "bytes"
    );
    for t in &plan.tensors {
        for o in &t.outputs {
            println!(
                "{:<64} {:<20} {:<5} {:<10} {:<8} {:>5} {:>10}  {}",
                o.name,
                format!("{:?}", o.shape),
                o.dtype.as_str(),
                t.quant
                    .map(|q| format!("b{}g{}", q.bits, q.group_size))
                    .unwrap_or_else(|| "-".into()),
                t.layout
                    .as_ref()
                    .map(|l| l.name())
                    .unwrap_or_else(|| "-".into()),
                o.shard + 1,
                o.nbytes,
                t.source
            );
        }
    }
    for d in &plan.dropped {
        println!("dropped {}: {}", d.tensor, d.reason);
    }
    for u in &plan.unquantized {
        println!("kept float {}: {}", u.module, u.reason);
    }
    println!(
        "{} tensors ({} quantized) in {} shard(s), {} total, recipe {}",
        plan.tensors.len(),
        plan.quantized_count(),
        plan.shards.len(),
        human_bytes(plan.total_size as u64),
        plan.recipe
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn output_names_follow_mlx_community() {
        let q4 = QuantSpec::new(4, 64).unwrap();
        assert_eq!(
            default_output_name("M", Some(q4), Some(DType::BF16)),
            "M-4bit"
        );
        let q8 = QuantSpec::new(8, 32).unwrap();
        assert_eq!(default_output_name("M", Some(q8), None), "M-8bit-g32");
        assert_eq!(default_output_name("M", None, Some(DType::BF16)), "M-bf16");
        assert_eq!(default_output_name("M", None, Some(DType::F16)), "M-fp16");
    }

    #[test]
    fn the_token_never_reaches_the_recorded_command() {
        let args = [
            "--hf-path",
            "o/n",
            "--hf-token",
            "hf_abc",
            "--hf-token=hf_def",
            "-q",
        ];
        let c = redacted_command(args.iter().map(|s| s.to_string()));
        assert!(!c.contains("hf_abc") && !c.contains("hf_def"), "{c}");
        assert!(c.contains("--hf-token <token>"), "{c}");
    }
}
