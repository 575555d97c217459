//! The library's error type. Every variant names the file, tensor or config key at fault and says what
//! to do; `exit_code` maps each kind to the documented process exit code.

use std::path::PathBuf;

/// Process exit codes (documented in `--help`).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Verification ran and failed its thresholds.
    pub const VERIFY_FAILED: i32 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: i32 = 2;
    /// The input checkpoint is missing, malformed or inconsistent.
    pub const BAD_INPUT: i32 = 3;
    /// The architecture or recipe is not supported, or a recipe does not cover the checkpoint.
    pub const UNSUPPORTED: i32 = 4;
    /// Writing the output failed (disk full, permissions, output exists).
    pub const OUTPUT: i32 = 5;
    /// Interrupted by SIGINT/SIGTERM; nothing was left behind.
    pub const INTERRUPTED: i32 = 130;
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}{hint}", hint = write_hint(source))]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0} does not exist: pass a local Hugging Face checkpoint directory (with config.json and *.safetensors)")]
    SourceNotFound(PathBuf),

    #[error("{0}: no config.json in this directory; is it a Hugging Face checkpoint?")]
    ConfigMissing(PathBuf),

    #[error("{path}: {msg}")]
    ConfigInvalid { path: PathBuf, msg: String },

    #[error("{dir}: only PyTorch pickle weights ({files}); vlm-convert never loads pickle files (they can run code). Convert them to safetensors first, or use a repo revision that has *.safetensors")]
    PickleOnly { dir: PathBuf, files: String },

    #[error(
        "{0}: no weights found (no *.safetensors files, or they and the index hold no tensors)"
    )]
    NoWeights(PathBuf),

    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: invalid index: {msg}")]
    Index { path: PathBuf, msg: String },

    #[error("{path}: `{entry}` points outside the model directory; refusing to read it")]
    PathEscape { path: PathBuf, entry: String },

    #[error("tensor `{tensor}` is stored twice: in {first} and in {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    #[error("unsupported architecture `{model_type}` (config.json model_type); supported: {supported}. Pass --recipe FILE to describe a new one")]
    UnknownArchitecture {
        model_type: String,
        supported: String,
    },

    #[error("recipe {recipe}: {msg}")]
    Recipe { recipe: String, msg: String },

    #[error("recipe {recipe} has no rule for {count} tensor(s) of this checkpoint: {list}. Nothing was converted; extend the recipe (--recipe FILE) or report the checkpoint")]
    UnmatchedTensors {
        recipe: String,
        count: usize,
        list: String,
    },

    #[error("{0}")]
    Plan(String),

    #[error("config.json does not describe these weights ({count} disagreement(s), found before reading any tensor data):\n{list}\nUse the config.json that belongs to these weights (re-download the checkpoint), or correct the key named above; nothing was written")]
    ShapeMismatch { count: usize, list: String },

    #[error("{0} already exists; pass --force to replace it, or choose another --mlx-path")]
    OutputExists(PathBuf),

    #[error("the output {output} is inside the input directory {input}; choose an --mlx-path outside it")]
    OutputInsideInput { output: PathBuf, input: PathBuf },

    #[error("{0}")]
    Usage(String),

    #[error("(de)quantizing `{tensor}`: {source}")]
    Quant {
        tensor: String,
        #[source]
        source: crate::quant::QuantError,
    },

    #[error("tensor `{tensor}` ({file}) has a {what} at element {index}{cast}; a model with NaN/Inf weights computes garbage. Pass --allow-nonfinite to convert it anyway")]
    NonFinite {
        tensor: String,
        file: PathBuf,
        index: usize,
        what: &'static str,
        cast: String,
    },

    #[error("interrupted; the partial output was removed")]
    Interrupted,

    /// The verify stage could not run the converted model: the conversion is broken.
    #[error("verification failed: {0}")]
    VerificationFailed(String),

    /// The verify stage is not available (built without MLX, or a model feature it cannot run yet).
    #[error("{0}")]
    VerifyUnavailable(String),

    #[error("{path}: invalid reference logits file: {msg}")]
    Reference { path: PathBuf, msg: String },

    #[error("Hub repo `{repo}` not found at {endpoint}{hint}")]
    RepoNotFound {
        repo: String,
        endpoint: String,
        hint: &'static str,
    },

    #[error("Hub repo `{repo}` is gated: accept its conditions on its page ({endpoint}/{repo}) while logged in, then pass a token with access (--hf-token, HF_TOKEN or `huggingface-cli login`){hint}")]
    GatedRepo {
        repo: String,
        endpoint: String,
        hint: &'static str,
    },

    #[error("Hub repo `{repo}` has no revision `{revision}`: pass an existing branch, tag or commit to --revision")]
    RevisionNotFound { repo: String, revision: String },

    #[error("HF_HUB_OFFLINE is set and {what} is not in the cache {cache}: run once with network access (or unset HF_HUB_OFFLINE)")]
    NotCached { what: String, cache: PathBuf },

    #[error("Hub repo `{repo}`: {msg}")]
    Hub { repo: String, msg: String },

    #[error("{file}: sha256 {actual} does not match the Hub's {expected}; the download is corrupt and was deleted. Run again to download it anew")]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },

    #[error("uploading to `{repo}`: {msg}")]
    Upload { repo: String, msg: String },
}

impl Error {
    pub fn read(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Read {
            path: path.into(),
            source,
        }
    }

    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Write {
            path: path.into(),
            source,
        }
    }

    /// The documented process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::UnknownArchitecture { .. }
            | Error::Recipe { .. }
            | Error::UnmatchedTensors { .. } => exit::UNSUPPORTED,
            Error::OutputExists(_) | Error::OutputInsideInput { .. } => exit::OUTPUT,
            Error::Interrupted => exit::INTERRUPTED,
            Error::VerificationFailed(_) => exit::VERIFY_FAILED,
            Error::VerifyUnavailable(_) => exit::UNSUPPORTED,
            Error::Write { .. } | Error::Upload { .. } => exit::OUTPUT,
            _ => exit::BAD_INPUT,
        }
    }
}

fn write_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            " (the disk is full: free space or choose another --mlx-path; the partial output was removed)"
        }
        Some(libc::EFBIG) => " (file size limit reached; try a smaller --max-shard-size)",
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            " (no permission to write there: choose another --mlx-path)"
        }
        _ => "",
    }
}
