//! The Hugging Face Hub as a source and a destination: `--hf-path ORG/NAME` and `--upload-repo`.
//!
//! Metadata and small files go through the `hf-hub` crate: the revision's commit
//! (`/api/models/ORG/NAME/revision/REV`), the file tree with each LFS file's sha256
//! (`/api/models/ORG/NAME/tree/REV`), and config/index/tokenizer files downloaded into the standard
//! cache (`HF_HUB_CACHE` or `HF_HOME/hub`, the layout Python's huggingface_hub uses, so files either
//! client downloaded are reused by the other).
//!
//! What hf-hub 1.0 does not do is done here with reqwest, the HTTP client hf-hub is built on
//! (SPEC.md section 8):
//! - weights download resumably: a cut-off transfer leaves `blobs/<sha256>.incomplete`, and the next
//!   attempt (in this run or the next) asks for the rest with an HTTP `Range` request instead of
//!   starting over; every weight file is checked against the tree's `lfs.oid` (sha256) before it
//!   enters the cache;
//! - each shard's safetensors header is fetched first with a `Range` request, so the plan is made
//!   before any weight byte arrives and the conversion of shard N overlaps the download of N+1
//!   (a [`ShardFeed`] hands finished shards to the pipeline);
//! - errors are told apart by the Hub's `X-Error-Code` header (hf-hub reports an unknown repo as a
//!   missing revision and a gated repo as a plain 401);
//! - `HF_HUB_OFFLINE=1` resolves from the cache alone (hf-hub 1.0 ignores it);
//! - uploads speak the Hub's commit API with the plain LFS `basic` transfer: hf-hub 1.0 uploads large
//!   files only through Xet and otherwise inlines them in the commit, which the Hub refuses.
//!
//! The token is sent only in `Authorization` headers: it never appears in a message, a URL or a file.

use crate::error::{Error, Result};
use crate::source::{PendingShard, ShardFeed, Source, INDEX_FILE, SIDECAR_FILES};
use base64::Engine as _;
use hf_hub::{HFClient, HFClientSync, HFError};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RANGE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The public Hub, when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// First bytes asked for when fetching a safetensors header: the whole header of most shards; a
/// larger header costs one more request for the rest.
const HEADER_PROBE_BYTES: u64 = 64 << 10;

/// Attempts per weight file; each one resumes where the previous stopped.
const DOWNLOAD_ATTEMPTS: usize = 5;

/// Read/write buffer for transfers.
const CHUNK: usize = 1 << 20;

/// Files up to this size are sent inline (base64) in the commit; larger ones go through LFS, as the
/// Hub's preupload endpoint asks.
const UPLOAD_SAMPLE_BYTES: usize = 512;

/// Where and how to reach the Hub, from flags and the same environment variables Python's
/// huggingface_hub reads.
#[derive(Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    token: Option<String>,
    /// `HF_HUB_OFFLINE`: resolve from the cache alone.
    pub offline: bool,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubConfig {
    /// `--hf-token` wins over `HF_TOKEN`, then `HF_TOKEN_PATH`, then `$HF_HOME/token` (the file
    /// `huggingface-cli login` writes).
    pub fn from_env(token_flag: Option<&str>) -> HubConfig {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = env("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = token_flag
            .map(str::to_string)
            .or_else(|| env("HF_TOKEN"))
            .or_else(|| {
                let path = env("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_hub::hf_home().join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = env("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
            .unwrap_or(false);
        HubConfig {
            endpoint,
            cache_dir: hf_hub::resolve_cache_dir(),
            token,
            offline,
        }
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }
}

/// Whether `--hf-path` names a Hub repo: not an existing path, and shaped like `ORG/NAME` (the
/// characters the Hub allows in a namespace and a repo name).
pub fn is_repo_id(s: &str) -> bool {
    if Path::new(s).exists() {
        return false;
    }
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    part(org) && part(name)
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Percent-encodes one URL path segment (file names, revisions such as `refs/pr/1`).
fn encode(seg: &str) -> String {
    let mut out = String::new();
    for b in seg.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// A file of the repo's tree.
#[derive(Debug, Clone)]
struct RemoteFile {
    path: String,
    size: u64,
    /// The git object id (the Hub's ETag of a non-LFS file).
    oid: String,
    /// sha256 of an LFS file (`lfs.oid`; also its ETag and cache blob name).
    sha256: Option<String>,
}

impl RemoteFile {
    fn etag(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.oid)
    }
}

/// A Hub client for one run.
pub struct Hub {
    cfg: HubConfig,
    http: Client,
    progress: MultiProgress,
}

/// What `Hub::open_repo` found out before any weight byte was downloaded.
pub struct RemoteCheckpoint<T> {
    pub source: Source,
    /// What the caller's check of config.json returned (the recipe).
    pub checked: T,
    /// The commit the revision resolved to.
    pub commit: String,
    /// The weight downloads still to run; start them once the plan is made.
    pub download: Option<Download>,
}

/// The weight files still to download, in the order the pipeline converts them.
pub struct Download {
    hub: Arc<HubShared>,
    repo: String,
    commit: String,
    files: Vec<(usize, RemoteFile)>,
    feed: Arc<ShardFeed>,
}

/// What the downloader thread needs of the [`Hub`].
struct HubShared {
    cfg: HubConfig,
    http: Client,
    progress: MultiProgress,
}

impl Hub {
    pub fn new(cfg: HubConfig, quiet: bool) -> Result<Hub> {
        let http = Client::builder()
            .user_agent(concat!("vlm-convert/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // Weight files take minutes: no total timeout (reqwest's blocking default is 30 s).
            .timeout(None)
            .build()
            .map_err(|e| Error::Hub {
                repo: String::new(),
                msg: format!("cannot start the HTTP client: {e}"),
            })?;
        let progress = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        Ok(Hub {
            cfg,
            http,
            progress,
        })
    }

    /// The progress bars downloads draw into (the pipeline joins them).
    pub fn progress(&self) -> MultiProgress {
        self.progress.clone()
    }

    fn repo_cache(&self, repo: &str) -> PathBuf {
        repo_cache(&self.cfg.cache_dir, repo)
    }

    fn client(&self) -> Result<HFClientSync> {
        let mut b = HFClient::builder()
            .endpoint(self.cfg.endpoint.clone())
            .cache_dir(self.cfg.cache_dir.clone())
            // Retries of 5xx/connection errors stay; a few quick ones are enough for metadata.
            .retry_max_attempts(3);
        if let Some(t) = &self.cfg.token {
            b = b.token(t.clone());
        }
        let client = b.build().map_err(|e| Error::Hub {
            repo: String::new(),
            msg: format!(
                "cannot set up the Hub client for {}: {e}",
                self.cfg.endpoint
            ),
        })?;
        HFClientSync::from_inner(client).map_err(|e| Error::Hub {
            repo: String::new(),
            msg: format!("cannot start the Hub client: {e}"),
        })
    }

    /// Opens `repo` at `revision` (default `main`) as a [`Source`]: config.json first, checked by
    /// `check` (the recipe choice) before anything else is fetched; then the index, the tokenizer and
    /// processor files and each shard's header. Weight bytes are left to the returned [`Download`].
    /// Offline (`HF_HUB_OFFLINE`), everything comes from the cache.
    pub fn open_repo<T>(
        &self,
        repo: &str,
        revision: Option<&str>,
        copy_remote_code: bool,
        check: impl FnOnce(&Value) -> Result<T>,
    ) -> Result<RemoteCheckpoint<T>> {
        let revision = revision.unwrap_or("main");
        if self.cfg.offline {
            return self.open_cached(repo, revision, check);
        }
        let client = self.client()?;
        let (owner, name) = hf_hub::split_id(repo);
        let handle = client.model(owner, name);

        let info = handle
            .info()
            .revision(revision.to_string())
            .send()
            .map_err(|e| self.hub_error(repo, Some(revision), None, e))?;
        let commit = info.sha.clone().ok_or_else(|| Error::Hub {
            repo: repo.into(),
            msg: format!("the Hub did not say which commit `{revision}` is"),
        })?;
        let tree = self.list_tree(repo, revision, &commit)?;
        let by_path: BTreeMap<&str, &RemoteFile> =
            tree.iter().map(|f| (f.path.as_str(), f)).collect();
        let snapshot = self.repo_cache(repo).join("snapshots").join(&commit);
        if !is_commit_hash(revision) {
            write_ref(&self.repo_cache(repo), revision, &commit)?;
        }

        let fetch_small = |file: &str| -> Result<PathBuf> {
            handle
                .download_file()
                .filename(file.to_string())
                .revision(commit.clone())
                .send()
                .map_err(|e| self.hub_error(repo, Some(revision), Some(file), e))
        };

        // 1. config.json, and the caller's verdict on it, before anything else.
        if !by_path.contains_key("config.json") {
            return Err(Error::Hub {
                repo: repo.into(),
                msg: format!(
                    "no config.json at revision `{revision}`; is it a transformers model repo?"
                ),
            });
        }
        let config_path = fetch_small("config.json")?;
        let config = crate::source::load_config(config_path.parent().unwrap_or(&snapshot))?;
        let checked = check(&config)?;

        // 2. Which weight files: the index's shards, else every top-level *.safetensors.
        let weights: Vec<String> = if by_path.contains_key(INDEX_FILE) {
            fetch_small(INDEX_FILE)?;
            let index = read_weight_map(&snapshot.join(INDEX_FILE))?;
            index.into_iter().collect()
        } else {
            let mut files: Vec<String> = tree
                .iter()
                .map(|f| f.path.clone())
                .filter(|p| !p.contains('/') && p.ends_with(".safetensors"))
                .collect();
            if files.iter().any(|f| !f.starts_with("consolidated")) {
                files.retain(|f| !f.starts_with("consolidated"));
            }
            files
        };
        if weights.is_empty() {
            let pickles: Vec<&str> = tree
                .iter()
                .map(|f| f.path.as_str())
                .filter(|p| {
                    [".bin", ".pt", ".pth", ".ckpt"]
                        .iter()
                        .any(|x| p.ends_with(x))
                })
                .collect();
            if !pickles.is_empty() {
                return Err(Error::PickleOnly {
                    dir: PathBuf::from(format!("{repo}@{revision}")),
                    files: pickles.join(", "),
                });
            }
            return Err(Error::NoWeights(PathBuf::from(format!(
                "{repo}@{revision}"
            ))));
        }
        let mut remote_weights = Vec::new();
        for w in &weights {
            let f = by_path.get(w.as_str()).ok_or_else(|| Error::Index {
                path: PathBuf::from(format!("{repo}@{revision}/{INDEX_FILE}")),
                msg: format!("shard `{w}` is listed but the repo has no such file"),
            })?;
            remote_weights.push((*f).clone());
        }

        // 3. The small files carried over (and the remote code when asked for).
        for name in SIDECAR_FILES {
            if by_path.contains_key(name) {
                fetch_small(name)?;
            }
        }
        if copy_remote_code {
            for f in tree
                .iter()
                .filter(|f| !f.path.contains('/') && f.path.ends_with(".py"))
            {
                fetch_small(&f.path)?;
            }
        }

        // 4. Weight files already in the cache (from an earlier run, or Python) are linked; the
        // others are planned from their header alone.
        let repo_dir = self.repo_cache(repo);
        let mut pending = BTreeMap::new();
        let mut to_fetch = Vec::new();
        for f in &remote_weights {
            let blob = repo_dir.join("blobs").join(f.etag());
            if blob.is_file() {
                link_snapshot(&repo_dir, &commit, &f.path, f.etag())?;
                continue;
            }
            let prefix = self.fetch_header(repo, &commit, f)?;
            pending.insert(
                f.path.clone(),
                PendingShard {
                    prefix,
                    len: f.size,
                },
            );
            to_fetch.push(f.clone());
        }
        let feed = (!pending.is_empty()).then(|| Arc::new(ShardFeed::new(weights.len())));
        let source = Source::open_streaming(&snapshot, &pending, feed.clone())?;
        let download = feed.map(|feed| {
            let index_of = |path: &str| {
                source
                    .shards
                    .iter()
                    .position(|s| s.path.file_name().and_then(|n| n.to_str()) == Some(path))
            };
            let mut files: Vec<(usize, RemoteFile)> = to_fetch
                .into_iter()
                .filter_map(|f| index_of(&f.path).map(|i| (i, f)))
                .collect();
            files.sort_by_key(|(i, _)| *i);
            for (i, s) in source.shards.iter().enumerate() {
                if s.is_attached() {
                    feed.finish(i, Ok(()));
                }
            }
            Download {
                hub: Arc::new(HubShared {
                    cfg: self.cfg.clone(),
                    http: self.http.clone(),
                    progress: self.progress.clone(),
                }),
                repo: repo.to_string(),
                commit: commit.clone(),
                files,
                feed,
            }
        });
        Ok(RemoteCheckpoint {
            source,
            checked,
            commit,
            download,
        })
    }

    /// Every file of the commit with its size and, for LFS files, sha256. Read here rather than
    /// through hf-hub's `list_tree`: hf-hub 1.0 looks for `lfs.sha256`, but the Hub names the
    /// sha256 `lfs.oid`, so hf-hub never sees it. Follows `Link: <...>; rel="next"` paging.
    fn list_tree(&self, repo: &str, revision: &str, commit: &str) -> Result<Vec<RemoteFile>> {
        let mut url = Some(format!(
            "{}/api/models/{repo}/tree/{}?recursive=true",
            self.cfg.endpoint,
            encode(commit)
        ));
        let mut out = Vec::new();
        let bad = |msg: String| Error::Hub {
            repo: repo.into(),
            msg: format!("listing the files of `{revision}`: {msg}"),
        };
        while let Some(u) = url.take() {
            let resp = self
                .http
                .get(&u)
                .headers(auth_headers(&self.cfg))
                .send()
                .map_err(|e| bad(redact(&e.to_string(), &self.cfg)))?;
            let resp = check_status(&self.cfg, repo, None, resp)?;
            url = resp
                .headers()
                .get_all(reqwest::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find(|l| l.contains("rel=\"next\""))
                .and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_string()));
            let entries: Vec<Value> = resp.json().map_err(|e| bad(e.to_string()))?;
            for e in entries {
                if e.get("type").and_then(Value::as_str) != Some("file") {
                    continue;
                }
                let (Some(path), Some(size)) = (
                    e.get("path").and_then(Value::as_str),
                    e.get("size").and_then(Value::as_u64),
                ) else {
                    return Err(bad(format!("a tree entry lacks path or size: {e}")));
                };
                let lfs = e.get("lfs");
                out.push(RemoteFile {
                    path: path.to_string(),
                    size: lfs
                        .and_then(|l| l.get("size"))
                        .and_then(Value::as_u64)
                        .unwrap_or(size),
                    oid: e
                        .get("oid")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    sha256: lfs
                        .and_then(|l| l.get("oid").or_else(|| l.get("sha256")))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                });
            }
        }
        Ok(out)
    }

    /// `HF_HUB_OFFLINE`: the revision's snapshot from the cache, or an error naming what is missing.
    fn open_cached<T>(
        &self,
        repo: &str,
        revision: &str,
        check: impl FnOnce(&Value) -> Result<T>,
    ) -> Result<RemoteCheckpoint<T>> {
        let repo_dir = self.repo_cache(repo);
        let not_cached = |what: String| Error::NotCached {
            what,
            cache: self.cfg.cache_dir.clone(),
        };
        let commit = if is_commit_hash(revision) {
            revision.to_string()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision))
                .map(|s| s.trim().to_string())
                .map_err(|_| not_cached(format!("`{repo}` at revision `{revision}`")))?
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if !snapshot.join("config.json").is_file() {
            return Err(not_cached(format!("`{repo}` at revision `{revision}`")));
        }
        let config = crate::source::load_config(&snapshot)?;
        let checked = check(&config)?;
        let source = Source::open(&snapshot).map_err(|e| match e {
            Error::Index { msg, .. } if msg.contains("is listed but missing") => {
                not_cached(format!("a weight file of `{repo}` ({msg})"))
            }
            Error::NoWeights(_) => not_cached(format!("the weights of `{repo}`")),
            e => e,
        })?;
        Ok(RemoteCheckpoint {
            source,
            checked,
            commit,
            download: None,
        })
    }

    /// The first `8 + header length` bytes of a weight file, by HTTP range requests.
    fn fetch_header(&self, repo: &str, commit: &str, f: &RemoteFile) -> Result<Vec<u8>> {
        let url = resolve_url(&self.cfg.endpoint, repo, commit, &f.path);
        let first = HEADER_PROBE_BYTES.min(f.size);
        let mut buf = range_get(&self.http, &self.cfg, repo, &f.path, &url, 0, first)?;
        if buf.len() >= 8 {
            let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            let want = n.saturating_add(8);
            if want > buf.len() as u64 && want <= f.size && n <= crate::shard::MAX_HEADER_BYTES {
                let rest = range_get(
                    &self.http,
                    &self.cfg,
                    repo,
                    &f.path,
                    &url,
                    buf.len() as u64,
                    want,
                )?;
                buf.extend_from_slice(&rest);
            }
        }
        Ok(buf)
    }

    /// Maps an hf-hub error to ours, by the Hub's `X-Error-Code` first (hf-hub calls an unknown repo
    /// a missing revision, and a gated repo a plain 401).
    fn hub_error(
        &self,
        repo: &str,
        revision: Option<&str>,
        file: Option<&str>,
        e: HFError,
    ) -> Error {
        let ctx = match &e {
            HFError::Http { context }
            | HFError::AuthRequired { context }
            | HFError::Forbidden { context }
            | HFError::Conflict { context }
            | HFError::RateLimited { context, .. } => Some(context.as_ref()),
            HFError::RepoNotFound { context, .. }
            | HFError::RevisionNotFound { context, .. }
            | HFError::EntryNotFound { context, .. } => context.as_deref(),
            _ => None,
        };
        let status = ctx.map(|c| c.status.as_u16());
        let code = ctx.and_then(|c| c.error_code.clone());
        classify(
            &self.cfg,
            repo,
            revision,
            file,
            status,
            code.as_deref(),
            &redact(&e.to_string(), &self.cfg),
        )
    }
}

/// One error message from an HTTP status and the Hub's `X-Error-Code`.
fn classify(
    cfg: &HubConfig,
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    status: Option<u16>,
    code: Option<&str>,
    detail: &str,
) -> Error {
    let login_hint = if cfg.has_token() {
        ""
    } else {
        " (no token was sent: if the repo is private or gated, pass --hf-token or set HF_TOKEN)"
    };
    match (code, status) {
        (Some("GatedRepo"), _) => Error::GatedRepo {
            repo: repo.into(),
            endpoint: cfg.endpoint.clone(),
            hint: if cfg.has_token() {
                " (the token sent has no access yet)"
            } else {
                ""
            },
        },
        (Some("RepoNotFound"), _) | (None, Some(401)) => Error::RepoNotFound {
            repo: repo.into(),
            endpoint: cfg.endpoint.clone(),
            hint: if cfg.has_token() {
                " (or the token has no access to it); check the spelling ORG/NAME"
            } else {
                login_hint
            },
        },
        (Some("RevisionNotFound"), _) => Error::RevisionNotFound {
            repo: repo.into(),
            revision: revision.unwrap_or("main").into(),
        },
        (Some("EntryNotFound"), _) => Error::Hub {
            repo: repo.into(),
            msg: format!(
                "file `{}` is missing at revision `{}`",
                file.unwrap_or("?"),
                revision.unwrap_or("main")
            ),
        },
        (None, Some(404)) if file.is_none() => Error::RepoNotFound {
            repo: repo.into(),
            endpoint: cfg.endpoint.clone(),
            hint: login_hint,
        },
        _ => Error::Hub {
            repo: repo.into(),
            msg: match file {
                Some(f) => format!("downloading {f}: {detail}"),
                None => detail.to_string(),
            },
        },
    }
}

/// Removes the token from a message (defence in depth: no client is expected to echo it).
fn redact(msg: &str, cfg: &HubConfig) -> String {
    match &cfg.token {
        Some(t) if !t.is_empty() => msg.replace(t.as_str(), "<token>"),
        _ => msg.to_string(),
    }
}

fn repo_cache(cache_dir: &Path, repo: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo.replace('/', "--")))
}

fn resolve_url(endpoint: &str, repo: &str, commit: &str, path: &str) -> String {
    format!(
        "{endpoint}/{repo}/resolve/{}/{}",
        encode(commit),
        encode_path(path)
    )
}

fn auth_headers(cfg: &HubConfig) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(t) = &cfg.token {
        if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {t}")) {
            v.set_sensitive(true);
            h.insert(AUTHORIZATION, v);
        }
    }
    h
}

/// Turns a non-success response into an error, by `X-Error-Code`.
fn check_status(
    cfg: &HubConfig,
    repo: &str,
    file: Option<&str>,
    resp: Response,
) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let code = resp
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let message = resp
        .headers()
        .get("x-error-message")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().unwrap_or_default();
    let detail = message.unwrap_or_else(|| body.chars().take(300).collect());
    Err(classify(
        cfg,
        repo,
        None,
        file,
        Some(status.as_u16()),
        code.as_deref(),
        &redact(&format!("HTTP {status}: {detail}"), cfg),
    ))
}

fn net_error(cfg: &HubConfig, repo: &str, file: &str, e: impl std::fmt::Display) -> Error {
    Error::Hub {
        repo: repo.into(),
        msg: redact(&format!("downloading {file}: {e}"), cfg),
    }
}

/// Bytes `[start, end)` of a file.
fn range_get(
    http: &Client,
    cfg: &HubConfig,
    repo: &str,
    file: &str,
    url: &str,
    start: u64,
    end: u64,
) -> Result<Vec<u8>> {
    if end <= start {
        return Ok(Vec::new());
    }
    let resp = http
        .get(url)
        .headers(auth_headers(cfg))
        .header(RANGE, format!("bytes={start}-{}", end - 1))
        .send()
        .map_err(|e| net_error(cfg, repo, file, e))?;
    let resp = check_status(cfg, repo, Some(file), resp)?;
    // A server that ignores Range answers 200 with the whole file: skip to `start` and stop at
    // `end` rather than reading it all.
    let skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
        0
    } else {
        start
    };
    let mut reader = resp.take(skip + (end - start));
    let mut buf = Vec::with_capacity((skip + end - start) as usize);
    reader
        .read_to_end(&mut buf)
        .map_err(|e| net_error(cfg, repo, file, e))?;
    Ok(buf.split_off((skip as usize).min(buf.len())))
}

fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    let p = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&p).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::write(parent, e))?;
    }
    std::fs::write(&p, commit).map_err(|e| Error::write(&p, e))
}

/// `snapshots/<commit>/<path>` -> `../../blobs/<etag>`, the cache layout both clients share.
fn link_snapshot(repo_dir: &Path, commit: &str, path: &str, etag: &str) -> Result<()> {
    let link = repo_dir.join("snapshots").join(commit).join(path);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::write(parent, e))?;
    }
    let depth = path.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::write(&link, e))
}

/// The shard files an index names (the same validation as a local source's index).
fn read_weight_map(path: &Path) -> Result<BTreeSet<String>> {
    Ok(crate::source::read_index(path)?.into_values().collect())
}

impl Download {
    /// Starts downloading on a thread of its own; each finished shard is handed to the pipeline
    /// through the source's feed. `cancel` (Ctrl-C) stops it, leaving `.incomplete` files to resume.
    pub fn start(self, cancel: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for (i, f) in &self.files {
                let res = download_blob(&self.hub, &self.repo, &self.commit, f, &cancel);
                let failed = res.is_err();
                self.feed.finish(*i, res);
                if failed {
                    self.feed.fail_rest(|| Error::Interrupted);
                    return;
                }
            }
        })
    }
}

/// Downloads one weight file into the cache (`blobs/<sha256>`, then the snapshot link), resuming
/// from `<blob>.incomplete` with a `Range` request, and verifying the sha256 before the blob
/// exists. hf-hub 1.0 would restart a cut-off file from zero and trusts the bytes it gets.
fn download_blob(
    hub: &HubShared,
    repo: &str,
    commit: &str,
    f: &RemoteFile,
    cancel: &AtomicBool,
) -> Result<()> {
    let repo_dir = repo_cache(&hub.cfg.cache_dir, repo);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::write(&blobs, e))?;
    let blob = blobs.join(f.etag());
    if !blob.is_file() {
        let incomplete = blobs.join(format!("{}.incomplete", f.etag()));
        let bar = hub.progress.add(ProgressBar::new(f.size));
        bar.set_style(
            ProgressStyle::with_template(
                "downloading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(f.path.clone());
        let res = fetch_resumable(hub, repo, commit, f, &incomplete, &bar, cancel);
        bar.finish_and_clear();
        hub.progress.remove(&bar);
        let actual = res?;
        if let Some(expected) = &f.sha256 {
            if !actual.eq_ignore_ascii_case(expected) {
                let _ = std::fs::remove_file(&incomplete);
                return Err(Error::ChecksumMismatch {
                    file: format!("{repo}/{}", f.path),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        std::fs::rename(&incomplete, &blob).map_err(|e| Error::write(&blob, e))?;
    }
    link_snapshot(&repo_dir, commit, &f.path, f.etag())
}

/// Fills `incomplete` up to `f.size` bytes, resuming after whatever it already holds and after
/// every dropped connection; returns the sha256 of the whole file.
fn fetch_resumable(
    hub: &HubShared,
    repo: &str,
    commit: &str,
    f: &RemoteFile,
    incomplete: &Path,
    bar: &ProgressBar,
    cancel: &AtomicBool,
) -> Result<String> {
    let cfg = &hub.cfg;
    let url = resolve_url(&cfg.endpoint, repo, commit, &f.path);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(incomplete)
        .map_err(|e| Error::write(incomplete, e))?;
    // The bytes already there (an earlier attempt, this run's or a previous one's) count towards
    // the checksum: hash them once, then keep hashing what arrives.
    let mut have = file
        .metadata()
        .map_err(|e| Error::read(incomplete, e))?
        .len();
    if have > f.size {
        file.set_len(0).map_err(|e| Error::write(incomplete, e))?;
        have = 0;
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < have {
        let n = file
            .read(&mut buf[..CHUNK.min((have - done) as usize)])
            .map_err(|e| Error::read(incomplete, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    bar.set_position(have);

    let mut last_err = None;
    for _ in 0..DOWNLOAD_ATTEMPTS {
        if have == f.size {
            break;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let mut req = hub.http.get(&url).headers(auth_headers(cfg));
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
        }
        let resp = match req.send() {
            Ok(r) => r,
            Err(e) => {
                last_err = Some(net_error(cfg, repo, &f.path, e));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if resp.status().is_server_error() {
            last_err = Some(
                check_status(cfg, repo, Some(&f.path), resp)
                    .err()
                    .unwrap_or(Error::Interrupted),
            );
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let mut resp = check_status(cfg, repo, Some(&f.path), resp)?;
        if have > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            // The server sent the whole file instead of the rest: start over.
            file.set_len(0).map_err(|e| Error::write(incomplete, e))?;
            have = 0;
            hasher = Sha256::new();
            bar.set_position(0);
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| Error::write(incomplete, e))?;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    last_err = Some(net_error(cfg, repo, &f.path, e));
                    break;
                }
            };
            let n = n.min((f.size - have) as usize);
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(|e| Error::write(incomplete, e))?;
            hasher.update(&buf[..n]);
            have += n as u64;
            bar.set_position(have);
        }
    }
    file.flush().map_err(|e| Error::write(incomplete, e))?;
    if have != f.size {
        return Err(last_err.unwrap_or_else(|| Error::Hub {
            repo: repo.into(),
            msg: format!(
                "{}: the transfer stopped at {have} of {} bytes; run again to resume it",
                f.path, f.size
            ),
        }));
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Upload

/// Whether an upload to `repo` can be attempted at all (online, with a token).
pub fn check_can_upload(cfg: &HubConfig, repo: &str) -> Result<()> {
    let msg = if cfg.offline {
        "HF_HUB_OFFLINE is set; unset it to upload"
    } else if cfg.token.is_none() {
        "no token: pass --hf-token, set HF_TOKEN or run `huggingface-cli login` (the token needs write access); nothing was converted"
    } else {
        return Ok(());
    };
    Err(Error::Upload {
        repo: repo.into(),
        msg: msg.into(),
    })
}

/// One file of the folder to upload.
struct LocalFile {
    path: String,
    abs: PathBuf,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

impl Hub {
    /// Uploads every file of `dir` (flat, as the pipeline writes it) to the model repo `repo` in one
    /// commit on `main`, creating the repo first if needed. Returns the commit URL the Hub reports.
    ///
    /// The Hub's commit API (what huggingface_hub's `upload_folder` does without Xet):
    /// `POST /api/repos/create`, `POST /api/models/R/preupload/main` (which files go through LFS),
    /// the LFS batch API with the `basic` transfer (`PUT` each object to the href it returns,
    /// then its `verify` action), and `POST /api/models/R/commit/main` as NDJSON: a header, the
    /// small files inline in base64, the LFS files by sha256 and size.
    pub fn upload_folder(
        &self,
        repo: &str,
        dir: &Path,
        private: bool,
        summary: &str,
    ) -> Result<String> {
        let cfg = &self.cfg;
        let up_err = |msg: String| Error::Upload {
            repo: repo.into(),
            msg: redact(&msg, cfg),
        };
        check_can_upload(cfg, repo)?;
        let (org, name) = repo
            .split_once('/')
            .ok_or_else(|| up_err("--upload-repo must be ORG/NAME".into()))?;
        let post = |url: &str, body: &Value| -> Result<Value> {
            let resp = self
                .http
                .post(url)
                .headers(auth_headers(cfg))
                .json(body)
                .send()
                .map_err(|e| up_err(format!("POST {url}: {e}")))?;
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            if !status.is_success() {
                return Err(up_err(format!(
                    "POST {url}: HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                )));
            }
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        };

        // The repo: 409 means it exists already, which is fine.
        let create_url = format!("{}/api/repos/create", cfg.endpoint);
        let resp = self
            .http
            .post(&create_url)
            .headers(auth_headers(cfg))
            .json(&json!({"type": "model", "name": name, "organization": org, "private": private}))
            .send()
            .map_err(|e| up_err(format!("creating the repo: {e}")))?;
        let status = resp.status();
        if !status.is_success() && status != StatusCode::CONFLICT {
            let text = resp.text().unwrap_or_default();
            return Err(up_err(format!(
                "creating the repo: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }

        let files = local_files(dir)?;
        let api = format!("{}/api/models/{org}/{name}", cfg.endpoint);
        let pre = post(
            &format!("{api}/preupload/main"),
            &json!({"files": files.iter().map(|f| json!({
                "path": f.path,
                "size": f.size,
                "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample),
            })).collect::<Vec<_>>()}),
        )?;
        let lfs_paths: BTreeSet<String> = pre
            .get("files")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|f| f.get("uploadMode").and_then(Value::as_str) == Some("lfs"))
                    .filter_map(|f| f.get("path").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let (lfs, regular): (Vec<&LocalFile>, Vec<&LocalFile>) =
            files.iter().partition(|f| lfs_paths.contains(&f.path));

        if !lfs.is_empty() {
            self.lfs_upload(repo, &lfs)?;
        }

        let mut ndjson = Vec::new();
        let mut line = |v: Value| {
            ndjson.extend_from_slice(v.to_string().as_bytes());
            ndjson.push(b'\n');
        };
        line(json!({"key": "header", "value": {"summary": summary, "description": ""}}));
        for f in &regular {
            let bytes = std::fs::read(&f.abs).map_err(|e| Error::read(&f.abs, e))?;
            line(json!({"key": "file", "value": {
                "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
                "path": f.path,
                "encoding": "base64",
            }}));
        }
        for f in &lfs {
            line(json!({"key": "lfsFile", "value": {
                "path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size,
            }}));
        }
        let url = format!("{api}/commit/main");
        let resp = self
            .http
            .post(&url)
            .headers(auth_headers(cfg))
            .header("content-type", "application/x-ndjson")
            .body(ndjson)
            .send()
            .map_err(|e| up_err(format!("committing: {e}")))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            return Err(up_err(format!(
                "committing: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(v.get("commitUrl")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/{repo}", cfg.endpoint)))
    }

    /// The LFS batch API, `basic` transfer: one PUT per object the Hub does not have yet (a
    /// multi-part answer, which the Hub gives for very large objects, PUTs each part to its URL and
    /// completes it with the parts' ETags).
    fn lfs_upload(&self, repo: &str, files: &[&LocalFile]) -> Result<()> {
        let cfg = &self.cfg;
        let up_err = |msg: String| Error::Upload {
            repo: repo.into(),
            msg: redact(&msg, cfg),
        };
        let url = format!("{}/{repo}.git/info/lfs/objects/batch", cfg.endpoint);
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": "main"},
        });
        let resp = self
            .http
            .post(&url)
            .headers(auth_headers(cfg))
            .header("accept", "application/vnd.git-lfs+json")
            .header("content-type", "application/vnd.git-lfs+json")
            .body(body.to_string())
            .send()
            .map_err(|e| up_err(format!("LFS batch: {e}")))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            return Err(up_err(format!(
                "LFS batch: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| up_err(format!("LFS batch: the answer is not JSON: {e}")))?;
        let objects = v
            .get("objects")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let by_oid: BTreeMap<&str, &LocalFile> =
            files.iter().map(|f| (f.sha256.as_str(), *f)).collect();
        let bar = self
            .progress
            .add(ProgressBar::new(files.iter().map(|f| f.size).sum()));
        bar.set_style(
            ProgressStyle::with_template(
                "uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        for obj in &objects {
            let oid = obj.get("oid").and_then(Value::as_str).unwrap_or_default();
            let Some(f) = by_oid.get(oid) else { continue };
            if let Some(err) = obj.get("error") {
                return Err(up_err(format!("LFS refused {}: {err}", f.path)));
            }
            let Some(actions) = obj.get("actions") else {
                // Already stored by the Hub.
                bar.inc(f.size);
                continue;
            };
            let upload = &actions["upload"];
            let href = upload
                .get("href")
                .and_then(Value::as_str)
                .ok_or_else(|| up_err(format!("LFS batch gave no upload href for {}", f.path)))?;
            let header = upload.get("header").and_then(Value::as_object);
            let chunk_size = header.and_then(|h| h.get("chunk_size")).and_then(|c| {
                c.as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .or(c.as_u64())
            });
            match (chunk_size, header) {
                (Some(chunk), Some(h)) if chunk > 0 => {
                    self.multipart_put(repo, f, href, chunk, h)?;
                }
                _ => {
                    let body = std::fs::File::open(&f.abs).map_err(|e| Error::read(&f.abs, e))?;
                    let mut req = self
                        .http
                        .put(href)
                        .body(reqwest::blocking::Body::sized(body, f.size));
                    for (k, v) in header.into_iter().flatten() {
                        if let Some(v) = v.as_str() {
                            req = req.header(k.as_str(), v);
                        }
                    }
                    let resp = req
                        .send()
                        .map_err(|e| up_err(format!("uploading {}: {e}", f.path)))?;
                    if !resp.status().is_success() {
                        return Err(up_err(format!(
                            "uploading {}: HTTP {}",
                            f.path,
                            resp.status()
                        )));
                    }
                }
            }
            bar.inc(f.size);
            if let Some(verify) = actions.get("verify") {
                let href = verify
                    .get("href")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut req = self
                    .http
                    .post(href)
                    .headers(auth_headers(cfg))
                    .json(&json!({"oid": f.sha256, "size": f.size}));
                for (k, v) in verify
                    .get("header")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if let Some(v) = v.as_str() {
                        req = req.header(k.as_str(), v);
                    }
                }
                let resp = req
                    .send()
                    .map_err(|e| up_err(format!("verifying {}: {e}", f.path)))?;
                if !resp.status().is_success() {
                    return Err(up_err(format!(
                        "verifying {}: HTTP {}",
                        f.path,
                        resp.status()
                    )));
                }
            }
        }
        bar.finish_and_clear();
        self.progress.remove(&bar);
        Ok(())
    }

    /// A multi-part LFS upload: the header names one presigned URL per part (`"00001"`, ...).
    fn multipart_put(
        &self,
        repo: &str,
        f: &LocalFile,
        completion: &str,
        chunk: u64,
        header: &serde_json::Map<String, Value>,
    ) -> Result<()> {
        let up_err = |msg: String| Error::Upload {
            repo: repo.into(),
            msg: redact(&msg, &self.cfg),
        };
        let mut parts: Vec<(u32, &str)> = header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, v.as_str()?)))
            .collect();
        parts.sort();
        let mut file = std::fs::File::open(&f.abs).map_err(|e| Error::read(&f.abs, e))?;
        let mut etags = Vec::new();
        for (n, url) in parts {
            let start = (n as u64 - 1) * chunk;
            let len = chunk.min(f.size.saturating_sub(start));
            let mut buf = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| Error::read(&f.abs, e))?;
            let resp = self
                .http
                .put(url)
                .body(buf)
                .send()
                .map_err(|e| up_err(format!("uploading part {n} of {}: {e}", f.path)))?;
            if !resp.status().is_success() {
                return Err(up_err(format!(
                    "uploading part {n} of {}: HTTP {}",
                    f.path,
                    resp.status()
                )));
            }
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            etags.push(json!({"partNumber": n, "etag": etag}));
        }
        let resp = self
            .http
            .post(completion)
            .json(&json!({"oid": f.sha256, "parts": etags}))
            .send()
            .map_err(|e| up_err(format!("completing {}: {e}", f.path)))?;
        if !resp.status().is_success() {
            return Err(up_err(format!(
                "completing {}: HTTP {}",
                f.path,
                resp.status()
            )));
        }
        Ok(())
    }
}

/// The output directory's files, with their sha256 (LFS object ids) and first bytes (the sample the
/// preupload endpoint decides on).
fn local_files(dir: &Path) -> Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::read(dir, e))?;
        let abs = e.path();
        if !abs.is_file() {
            continue;
        }
        let path = e.file_name().to_string_lossy().into_owned();
        let mut file = std::fs::File::open(&abs).map_err(|e| Error::read(&abs, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut sample = Vec::new();
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::read(&abs, e))?;
            if n == 0 {
                break;
            }
            if sample.len() < UPLOAD_SAMPLE_BYTES {
                let take = (UPLOAD_SAMPLE_BYTES - sample.len()).min(n);
                sample.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        out.push(LocalFile {
            path,
            abs,
            size,
            sha256: hex(&hasher.finalize()),
            sample,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("Qwen/Qwen2-VL-2B-Instruct"));
        assert!(is_repo_id("mlx-community/SmolVLM_256M.v1"));
        assert!(!is_repo_id("Qwen"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("./models"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("org/na--me"));
        assert!(!is_repo_id("/abs/path"));
        // An existing local directory is never a repo id.
        assert!(!is_repo_id("src/.."));
    }

    #[test]
    fn urls_encode_segments() {
        assert_eq!(
            resolve_url("http://h", "o/n", "refs/pr/1", "sub dir/a.json"),
            "http://h/o/n/resolve/refs%2Fpr%2F1/sub%20dir/a.json"
        );
    }

    #[test]
    fn token_is_redacted_from_messages() {
        let cfg = HubConfig {
            endpoint: DEFAULT_ENDPOINT.into(),
            cache_dir: PathBuf::from("/c"),
            token: Some("hf_secret".into()),
            offline: false,
        };
        assert_eq!(redact("bad hf_secret here", &cfg), "bad <token> here");
        assert!(!format!("{cfg:?}").contains("hf_secret"));
    }

    #[test]
    fn error_codes_pick_the_message() {
        let cfg = HubConfig {
            endpoint: DEFAULT_ENDPOINT.into(),
            cache_dir: PathBuf::from("/c"),
            token: None,
            offline: false,
        };
        let e = classify(
            &cfg,
            "o/n",
            None,
            Some("config.json"),
            Some(401),
            Some("GatedRepo"),
            "",
        );
        assert!(matches!(e, Error::GatedRepo { .. }), "{e}");
        let e = classify(&cfg, "o/n", Some("main"), None, Some(401), None, "");
        assert!(matches!(e, Error::RepoNotFound { .. }), "{e}");
        assert!(e.to_string().contains("--hf-token"), "{e}");
        let e = classify(
            &cfg,
            "o/n",
            Some("v9"),
            None,
            Some(404),
            Some("RevisionNotFound"),
            "",
        );
        assert!(matches!(e, Error::RevisionNotFound { .. }), "{e}");
    }
}
