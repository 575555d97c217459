//! The command line: clap definitions (flag names follow `mlx_vlm.convert`), turning flags into the
//! library's options, and printing human or `--json` output. Errors leave here as [`Error`]s; `main`
//! maps them to the documented exit codes.

use crate::config::normalize;
use crate::dtype::{DType, FloatType};
use crate::error::{exit, Error, Result};
use crate::pipeline::{check_output_path, plan_json, pretty, write_output, OutputSpec};
use crate::plan::{Plan, PlanOptions, SourceDesc};
use crate::quant::QuantSpec;
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
    /// Validate an MLX model directory (ours or anyone's): files, index, headers, quantized shapes.
    Check {
        /// The MLX model directory.
        dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Default)]
pub struct ConvertArgs {
    /// The source checkpoint: a local Hugging Face model directory (or a snapshot in the HF cache).
    #[arg(long = "hf-path", visible_alias = "model", value_name = "PATH")]
    pub hf_path: Option<PathBuf>,
    /// Output directory [default: <model>-<4bit|8bit|bf16|...> in the current directory].
    #[arg(long = "mlx-path", value_name = "DIR")]
    pub mlx_path: Option<PathBuf>,
    /// Quantize (affine; 4 bits, group size 64 unless --q-bits / --q-group-size say otherwise).
    #[arg(short = 'q', long)]
    pub quantize: bool,
    /// Bits per weight: 2, 3, 4, 5, 6 or 8 (implies --quantize).
    #[arg(long = "q-bits", value_name = "N")]
    pub q_bits: Option<u32>,
    /// Quantization group size: 32, 64 or 128 (implies --quantize).
    #[arg(long = "q-group-size", value_name = "N")]
    pub q_group_size: Option<usize>,
    /// Quantization mode (only affine for now).
    #[arg(long = "q-mode", value_name = "MODE", default_value = "affine")]
    pub q_mode: String,
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
    /// Do not hash the input files for provenance.json (sizes are still recorded). Inputs in a
    /// Hugging Face cache are named by their hash and are recorded either way.
    #[arg(long = "no-input-hash")]
    pub no_input_hash: bool,
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
        None => convert(&cli.convert),
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

fn quant_spec(a: &ConvertArgs) -> Result<Option<QuantSpec>> {
    if a.q_mode != "affine" {
        return Err(Error::Usage(format!(
            "--q-mode {}: only `affine` is supported so far",
            a.q_mode
        )));
    }
    if !(a.quantize || a.q_bits.is_some() || a.q_group_size.is_some()) {
        return Ok(None);
    }
    QuantSpec::new(a.q_bits.unwrap_or(4), a.q_group_size.unwrap_or(64))
        .map(Some)
        .map_err(|e| Error::Usage(e.to_string()))
}

/// `Qwen2-VL-2B-Instruct-4bit`, `...-bf16`: how mlx-community names its uploads.
pub fn default_output_name(model: &str, quant: Option<QuantSpec>, dtype: Option<DType>) -> String {
    let suffix = match (quant, dtype) {
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
    let quant = quant_spec(a)?;

    // Architecture first: an unsupported model fails before any weight file is opened.
    let raw_config = source::load_config(hf_path)?;
    let recipe = match &a.recipe {
        Some(p) => Recipe::from_file(p)?,
        None => Recipe::for_config(&raw_config)?,
    };
    let source = Source::open(hf_path)?;
    if source.tensors.keys().any(|n| n.ends_with(".scales")) {
        return Err(Error::Usage(format!(
            "{} is already quantized (it has `*.scales` tensors); converting a quantized MLX model again is not supported yet",
            hf_path.display()
        )));
    }
    let config = normalize(&source.config, &recipe.config);
    let descs: Vec<SourceDesc> = source
        .tensors
        .iter()
        .map(|(name, t)| SourceDesc {
            name: name.clone(),
            dtype: t.info.dtype,
            shape: t.info.shape.clone(),
        })
        .collect();
    let opts = PlanOptions {
        dtype: a.dtype.map(|d| d.dtype()),
        quant,
        max_shard_size: a.max_shard_size,
        source_is_mlx: source.is_mlx(),
    };
    let plan = Plan::build(&descs, &config, &recipe, &opts)?;

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
        None => PathBuf::from(default_output_name(
            &source.display_name(),
            quant,
            plan.dtype,
        )),
    };
    check_output_path(&source, &out, a.force)?;
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&cancel))
            .map_err(|e| Error::read("signal handler", e))?;
    }
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
        "hash_inputs": !a.no_input_hash,
    });
    let spec = OutputSpec {
        path: &out,
        force: a.force,
        config: &config,
        base_model: &base_model,
        command: &command,
        quiet: a.quiet || a.json,
        allow_nonfinite: a.allow_nonfinite,
        copy_remote_code: a.copy_remote_code,
        cancel,
        settings,
        argv: crate::provenance::redact_argv(&argv()),
        hash_inputs: !a.no_input_hash,
    };
    let stats = write_output(&source, &plan, &spec)?;
    let secs = started.elapsed().as_secs_f64();
    let bpw = stats_bits_per_weight(&plan);
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
            "bits_per_weight": bpw,
            "seconds": secs,
            "files": stats.files,
            "unquantized": plan.unquantized,
            "dropped": plan.dropped,
        });
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
        eprintln!(
            "  read {}, wrote {}, {:.2} bits per weight, recipe {}",
            human_bytes(stats.bytes_read as u64),
            human_bytes(stats.bytes_written as u64),
            bpw,
            plan.recipe
        );
        for u in &plan.unquantized {
            eprintln!("  kept float: {} ({})", u.module, u.reason);
        }
    }
    Ok(exit::OK)
}

fn stats_bits_per_weight(plan: &Plan) -> f64 {
    if plan.total_parameters == 0 {
        return 0.0;
    }
    plan.total_size as f64 * 8.0 / plan.total_parameters as f64
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

fn command_line() -> String {
    let mut parts = vec!["vlm-convert".to_string()];
    for a in std::env::args().skip(1) {
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
}
