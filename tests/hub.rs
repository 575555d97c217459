//! `--hf-path ORG/NAME` and `--upload-repo` against a Hub-compatible HTTP server written here
//! (std::net, one thread per connection, 127.0.0.1 on a free port), pointed to by `HF_ENDPOINT`
//! with a temporary `HF_HOME`.
//!
//! The server serves fixture repos from directories and implements what the clients use
//! (SPEC.md section 8): `GET /api/models/R/revision/REV` (commit sha), `GET /api/models/R/tree/REV`
//! (sizes, LFS sha256), `HEAD`/`GET /R/resolve/REV/PATH` (ETag, X-Repo-Commit, If-None-Match; LFS
//! files answer 302 to a `/cdn/...` URL with X-Linked-Etag/X-Linked-Size), byte `Range` requests
//! (206 + Content-Range), the error codes (401 RepoNotFound anonymously / 404 with a token,
//! 404 RevisionNotFound, 404 EntryNotFound, 401 GatedRepo), and the upload side: `POST
//! /api/repos/create`, `POST /api/models/R/preupload/main`, the LFS batch API (basic transfer,
//! `PUT` + verify), `POST /api/models/R/commit/main` (NDJSON). Faults it can inject per file: a
//! connection dropped halfway through the body (once), a corrupted byte, a slow body.
//! Not reproduced: Xet, multi-part LFS uploads, `Link` paging of the tree, signed CDN URLs on
//! another host, rate limits.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "hf_TestSecretToken0123456789abcdef";
const FIX: &str = "qwen2_vl";

// ------------------------------------------------------------------------------------------------
// The server

#[derive(Clone)]
struct ServedFile {
    bytes: Arc<Vec<u8>>,
    sha256: String,
    lfs: bool,
}

impl ServedFile {
    /// Git object id stand-in for non-LFS files (the real Hub uses the git blob sha1).
    fn oid(&self) -> String {
        self.sha256[..40].to_string()
    }
    fn etag(&self) -> String {
        if self.lfs {
            self.sha256.clone()
        } else {
            self.oid()
        }
    }
}

struct Commit {
    sha: String,
    files: BTreeMap<String, ServedFile>,
}

struct Repo {
    commits: Vec<Commit>,
    /// Branch or tag -> commit sha.
    refs: BTreeMap<String, String>,
    gated: bool,
}

#[derive(Default)]
struct Faults {
    /// Files whose next body is cut off halfway (then served normally).
    drop_once: BTreeSet<String>,
    /// Files served with one byte flipped.
    corrupt: BTreeSet<String>,
    /// Files whose body starts only after this delay.
    slow: BTreeMap<String, Duration>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Logged {
    method: String,
    path: String,
    range: Option<String>,
    authorized: bool,
    /// Every header line, to check what the client sent.
    raw_headers: String,
}

/// What an upload left on the server.
#[derive(Default, Debug)]
struct Uploads {
    created: Vec<Value>,
    lfs_objects: BTreeMap<String, Vec<u8>>,
    /// The last commit: path -> bytes.
    committed: BTreeMap<String, Vec<u8>>,
    lfs_paths: BTreeSet<String>,
    commit_summary: String,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    faults: Faults,
    log: Vec<Logged>,
    uploads: Uploads,
}

struct Server {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = Arc::clone(&state);
        let base = url.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = Arc::clone(&st);
                let base = base.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st, &base);
                });
            }
        });
        Server { url, state }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a repo whose commits are `dirs` (oldest first, each with a made-up sha); `main` is the
    /// newest.
    fn add_repo(&self, id: &str, dirs: &[&Path], gated: bool) -> Vec<String> {
        let mut commits = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let sha = hex(&Sha256::digest(format!("{id}@{i}").as_bytes()))[..40].to_string();
            commits.push(Commit {
                sha,
                files: read_repo_dir(d),
            });
        }
        let shas: Vec<String> = commits.iter().map(|c| c.sha.clone()).collect();
        let mut refs = BTreeMap::new();
        refs.insert("main".to_string(), shas.last().unwrap().clone());
        self.st().repos.insert(
            id.to_string(),
            Repo {
                commits,
                refs,
                gated,
            },
        );
        shas
    }

    fn add_ref(&self, id: &str, name: &str, sha: &str) {
        self.st()
            .repos
            .get_mut(id)
            .unwrap()
            .refs
            .insert(name.into(), sha.into());
    }

    fn log(&self) -> Vec<Logged> {
        self.st().log.clone()
    }

    /// Requests that fetched bytes of a weight file (not the header range).
    fn weight_body_requests(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| {
                l.method == "GET"
                    && l.path.starts_with("/cdn/")
                    && l.path.ends_with(".safetensors")
                    && !l
                        .range
                        .as_deref()
                        .is_some_and(|r| r.starts_with("bytes=0-"))
            })
            .collect()
    }
}

fn read_repo_dir(dir: &Path) -> BTreeMap<String, ServedFile> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let lfs = name.ends_with(".safetensors") || name.ends_with(".bin");
        out.insert(
            name,
            ServedFile {
                sha256: hex(&Sha256::digest(&bytes)),
                bytes: Arc::new(bytes),
                lfs,
            },
        );
    }
    out
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: BTreeMap<String, String>,
    raw_headers: String,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    let mut raw_headers = String::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        raw_headers.push_str(&h);
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Request {
        method,
        path: percent_decode(&path),
        query,
        headers,
        raw_headers,
        body,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Write only this many body bytes, then drop the connection.
    cut_at: Option<usize>,
    delay: Option<Duration>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
            delay: None,
        }
    }
    fn json(status: u16, v: &Value) -> Reply {
        let mut r = Reply::new(status);
        r.body = serde_json::to_vec(v).unwrap();
        r.header("Content-Type", "application/json");
        r
    }
    fn error(status: u16, code: &str) -> Reply {
        let mut r = Reply::json(status, &json!({"error": code}));
        r.header("X-Error-Code", code);
        r
    }
    fn header(&mut self, k: &str, v: &str) -> &mut Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn handle(conn: TcpStream, st: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let Some(req) = read_request(&mut reader) else {
        return Ok(());
    };
    let authorized =
        req.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {TOKEN}"));
    st.lock().unwrap().log.push(Logged {
        method: req.method.clone(),
        path: req.path.clone(),
        range: req.headers.get("range").cloned(),
        authorized,
        raw_headers: req.raw_headers.clone(),
    });
    let reply = route(&req, authorized, st, base);
    let head = req.method == "HEAD";
    let reason = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        304 => "Not Modified",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !reply.headers.iter().any(|(k, _)| k == "Content-Length") {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    conn.write_all(out.as_bytes())?;
    if !head {
        if let Some(d) = reply.delay {
            std::thread::sleep(d);
        }
        match reply.cut_at {
            Some(n) => {
                conn.write_all(&reply.body[..n])?;
                conn.flush()?;
                // Drop the connection mid-body: the client sees an incomplete message.
                conn.shutdown(Shutdown::Both)?;
                return Ok(());
            }
            None => conn.write_all(&reply.body)?,
        }
    }
    conn.flush()?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

/// `(org/name, rest)` from `/api/models/org/name/<rest>`.
fn split_api(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/models/")?;
    let mut it = rest.splitn(3, '/');
    let org = it.next()?;
    let name = it.next()?;
    Some((format!("{org}/{name}"), it.next().unwrap_or("").to_string()))
}

fn route(req: &Request, authorized: bool, st: &Mutex<State>, base: &str) -> Reply {
    let mut s = st.lock().unwrap();
    let p = req.path.as_str();

    // --- upload side
    if req.method == "POST" && p == "/api/repos/create" {
        if !authorized {
            return Reply::error(401, "Unauthorized");
        }
        let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        s.uploads.created.push(v);
        return Reply::json(200, &json!({"url": format!("{base}/x")}));
    }
    if req.method == "PUT" && p.starts_with("/lfs-upload/") {
        let oid = p.trim_start_matches("/lfs-upload/").to_string();
        if hex(&Sha256::digest(&req.body)) != oid {
            return Reply::error(400, "BadOid");
        }
        s.uploads.lfs_objects.insert(oid, req.body.clone());
        return Reply::new(200);
    }
    if req.method == "POST" && p.starts_with("/lfs-verify/") {
        let oid = p.trim_start_matches("/lfs-verify/");
        return Reply::new(if s.uploads.lfs_objects.contains_key(oid) {
            200
        } else {
            404
        });
    }
    if req.method == "POST" && p.ends_with(".git/info/lfs/objects/batch") {
        if !authorized {
            return Reply::error(401, "Unauthorized");
        }
        let v: Value = serde_json::from_slice(&req.body).unwrap();
        assert!(v["transfers"].as_array().unwrap().contains(&json!("basic")));
        let objects: Vec<Value> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap();
                json!({"oid": oid, "size": o["size"], "actions": {
                    "upload": {"href": format!("{base}/lfs-upload/{oid}"), "header": {}},
                    "verify": {"href": format!("{base}/lfs-verify/{oid}")},
                }})
            })
            .collect();
        let mut r = Reply::json(200, &json!({"transfer": "basic", "objects": objects}));
        r.headers[0].1 = "application/vnd.git-lfs+json".into();
        return r;
    }
    if let Some((repo, rest)) = split_api(p) {
        if req.method == "POST" && rest == "preupload/main" {
            if !authorized {
                return Reply::error(401, "Unauthorized");
            }
            let v: Value = serde_json::from_slice(&req.body).unwrap();
            let files: Vec<Value> = v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap();
                    let lfs = path.ends_with(".safetensors") || f["size"].as_u64().unwrap() > 10_000_000;
                    json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false})
                })
                .collect();
            return Reply::json(200, &json!({"files": files}));
        }
        if req.method == "POST" && rest == "commit/main" {
            if !authorized {
                return Reply::error(401, "Unauthorized");
            }
            let mut committed = BTreeMap::new();
            let mut lfs_paths = BTreeSet::new();
            let mut summary = String::new();
            for line in req.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: Value = serde_json::from_slice(line).unwrap();
                let val = &v["value"];
                match v["key"].as_str().unwrap() {
                    "header" => summary = val["summary"].as_str().unwrap_or("").to_string(),
                    "file" => {
                        assert_eq!(val["encoding"], "base64");
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(val["content"].as_str().unwrap())
                            .unwrap();
                        committed.insert(val["path"].as_str().unwrap().to_string(), bytes);
                    }
                    "lfsFile" => {
                        let oid = val["oid"].as_str().unwrap();
                        let Some(bytes) = s.uploads.lfs_objects.get(oid) else {
                            return Reply::error(400, "LfsObjectMissing");
                        };
                        assert_eq!(val["size"].as_u64().unwrap(), bytes.len() as u64);
                        let path = val["path"].as_str().unwrap().to_string();
                        lfs_paths.insert(path.clone());
                        committed.insert(path, bytes.clone());
                    }
                    k => panic!("unknown commit line {k}"),
                }
            }
            s.uploads.committed = committed;
            s.uploads.lfs_paths = lfs_paths;
            s.uploads.commit_summary = summary;
            return Reply::json(
                200,
                &json!({"commitUrl": format!("{base}/{repo}/commit/abc"), "commitOid": "abc"}),
            );
        }
    }

    // --- download side
    if let Some((repo_id, rest)) = split_api(p) {
        let Some(repo) = s.repos.get(&repo_id) else {
            // The real Hub answers an anonymous request for a missing repo with 401.
            return Reply::error(if authorized { 404 } else { 401 }, "RepoNotFound");
        };
        let (kind, rev) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
        let Some(commit) = resolve(repo, rev) else {
            return Reply::error(404, "RevisionNotFound");
        };
        return match kind {
            "revision" => Reply::json(
                200,
                &json!({
                    "id": repo_id, "sha": commit.sha, "private": false, "gated": repo.gated,
                    "siblings": commit.files.keys().map(|k| json!({"rfilename": k})).collect::<Vec<_>>(),
                }),
            ),
            "tree" => {
                assert!(req.query.contains("recursive=true"), "{}", req.query);
                let entries: Vec<Value> = commit
                    .files
                    .iter()
                    .map(|(path, f)| {
                        let mut e = json!({"type": "file", "oid": f.oid(), "size": f.bytes.len(), "path": path});
                        if f.lfs {
                            e["lfs"] = json!({"oid": f.sha256, "size": f.bytes.len(), "pointerSize": 134});
                        }
                        e
                    })
                    .collect();
                Reply::json(200, &Value::Array(entries))
            }
            _ => Reply::error(404, "NotFound"),
        };
    }
    if let Some(rest) = p.strip_prefix("/cdn/") {
        // /cdn/<org>/<name>/<commit>/<file>
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let repo_id = format!("{}/{}", parts[0], parts[1]);
        let file = parts[3].to_string();
        let f = s.repos[&repo_id]
            .commits
            .iter()
            .find(|c| c.sha == parts[2])
            .unwrap()
            .files[&file]
            .clone();
        let mut body = f.bytes.as_ref().clone();
        if s.faults.corrupt.contains(&file) {
            let mid = body.len() / 2;
            body[mid] ^= 0xff;
        }
        let total = body.len();
        let mut r = Reply::new(200);
        if let Some(range) = req.headers.get("range") {
            let spec = range.trim_start_matches("bytes=");
            let (a, b) = spec.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().unwrap().min(total - 1)
            };
            if start >= total {
                return Reply::new(416);
            }
            body = body[start..=end].to_vec();
            r.status = 206;
            r.header("Content-Range", &format!("bytes {start}-{end}/{total}"));
        }
        r.header("ETag", &format!("\"{}\"", f.etag()));
        r.header("Accept-Ranges", "bytes");
        // Faults hit the weight transfer, not the header probe (a range from byte 0).
        let probe = req
            .headers
            .get("range")
            .is_some_and(|r| r.starts_with("bytes=0-"));
        if !probe && s.faults.drop_once.remove(&file) {
            r.cut_at = Some(body.len() / 2);
        }
        if !probe {
            r.delay = s.faults.slow.get(&file).copied();
        }
        r.body = body;
        return r;
    }
    // /<org>/<name>/resolve/<rev>/<file>
    let parts: Vec<&str> = p.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" && (req.method == "GET" || req.method == "HEAD") {
        let repo_id = format!("{}/{}", parts[0], parts[1]);
        let Some(repo) = s.repos.get(&repo_id) else {
            return Reply::error(if authorized { 404 } else { 401 }, "RepoNotFound");
        };
        if repo.gated && !authorized {
            return Reply::error(401, "GatedRepo");
        }
        let Some(commit) = resolve(repo, parts[3]) else {
            return Reply::error(404, "RevisionNotFound");
        };
        let Some(f) = commit.files.get(parts[4]) else {
            return Reply::error(404, "EntryNotFound");
        };
        let etag = format!("\"{}\"", f.etag());
        let mut r = Reply::new(200);
        r.header("X-Repo-Commit", &commit.sha);
        r.header("ETag", &etag);
        if f.lfs {
            r.status = 302;
            r.header("X-Linked-Etag", &etag);
            r.header("X-Linked-Size", &f.bytes.len().to_string());
            r.header(
                "Location",
                &format!("{base}/cdn/{repo_id}/{}/{}", commit.sha, parts[4]),
            );
            return r;
        }
        if req.headers.get("if-none-match") == Some(&etag) {
            r.status = 304;
            return r;
        }
        r.body = f.bytes.as_ref().clone();
        return r;
    }
    Reply::error(404, "NotFound")
}

fn resolve<'a>(repo: &'a Repo, rev: &str) -> Option<&'a Commit> {
    let sha = repo.refs.get(rev).map(String::as_str).unwrap_or(rev);
    repo.commits.iter().find(|c| c.sha == sha)
}

// ------------------------------------------------------------------------------------------------
// Helpers

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    hf_home: PathBuf,
}

impl Env {
    fn new() -> Env {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let hf_home = dir.join("hf_home");
        std::fs::create_dir_all(&hf_home).unwrap();
        Env {
            _tmp: t,
            dir,
            hf_home,
        }
    }

    /// Runs the binary against `server` with a private HF_HOME (no token unless `token`).
    fn run(
        &self,
        endpoint: &str,
        token: bool,
        extra_env: &[(&str, &str)],
        args: &[&str],
    ) -> (i32, String, String) {
        let mut c = bin();
        c.current_dir(&self.dir)
            .env("HF_HOME", &self.hf_home)
            .env("HF_ENDPOINT", endpoint)
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_OFFLINE")
            .args(args);
        if token {
            c.env("HF_TOKEN", TOKEN);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let (code, so, se) = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        for text in [&so, &se] {
            assert!(
                !text.contains(TOKEN),
                "the token leaked into the output:\n{text}"
            );
        }
        (code, so, se)
    }

    fn cache(&self, repo: &str) -> PathBuf {
        self.hf_home
            .join("hub")
            .join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// Every file under `dir` holds no trace of the token.
fn assert_no_token_under(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            assert_no_token_under(&p);
        } else if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                "the token is in {}",
                p.display()
            );
        }
    }
}

/// The fixture split into `n` shards with an index (as transformers writes big checkpoints).
fn sharded_fixture(name: &str, n: usize, dest: &Path) {
    copy_dir(&fixture(name), dest);
    let single = dest.join("model.safetensors");
    let f = vlm_convert::shard::SafetensorsFile::open(&single).unwrap();
    let names: Vec<&String> = f.tensors.keys().collect();
    let mut weight_map = serde_json::Map::new();
    for k in 0..n {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let items: Vec<_> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == k)
            .map(|(_, t)| {
                let info = f.tensors[*t].clone();
                weight_map.insert((*t).clone(), file.clone().into());
                ((*t).clone(), info.clone(), f.data(&info).to_vec())
            })
            .collect();
        write_safetensors(&dest.join(&file), &f.metadata, &items);
    }
    drop(f);
    std::fs::remove_file(&single).unwrap();
    std::fs::write(
        dest.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
}

/// The local conversion of `dir` (the reference every Hub conversion must equal).
fn local_reference(env: &Env, dir: &Path) -> PathBuf {
    let out = env.dir.join("reference");
    let (code, _, stderr) = run(&["--hf-path", s(dir), "--mlx-path", s(&out), "-q", "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    out
}

fn same_output(a: &Path, b: &Path) {
    assert_eq!(tensor_digests(a), tensor_digests(b));
    assert_eq!(
        read_json(&a.join("config.json")),
        read_json(&b.join("config.json"))
    );
    let files = |d: &Path| -> Vec<String> {
        listing(d)
            .into_iter()
            .filter(|f| f != "README.md")
            .collect()
    };
    assert_eq!(files(a), files(b));
}

// ------------------------------------------------------------------------------------------------
// Tests

#[test]
fn downloads_into_the_standard_cache_and_converts() {
    let srv = Server::start();
    let env = Env::new();
    let shas = srv.add_repo("test-org/tiny-qwen", &[&fixture(FIX)], false);
    let out = env.dir.join("out");
    let (code, stdout, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/tiny-qwen",
            "--mlx-path",
            s(&out),
            "-q",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["source_repo"], "test-org/tiny-qwen");
    same_output(&out, &local_reference(&env, &fixture(FIX)));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: test-org/tiny-qwen"), "{card}");

    // Python's layout: refs/main, snapshots/<commit>/<file> -> ../../blobs/<etag>.
    let cache = env.cache("test-org/tiny-qwen");
    assert_eq!(
        std::fs::read_to_string(cache.join("refs/main"))
            .unwrap()
            .trim(),
        shas[0]
    );
    let link = cache
        .join("snapshots")
        .join(&shas[0])
        .join("model.safetensors");
    let sha = hex(&Sha256::digest(
        std::fs::read(fixture(FIX).join("model.safetensors")).unwrap(),
    ));
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        PathBuf::from("../../blobs").join(&sha)
    );
    assert!(cache
        .join("snapshots")
        .join(&shas[0])
        .join("tokenizer.json")
        .is_file());
    // Only what a conversion needs: no variants, nothing outside the sidecar list.
    assert_eq!(srv.weight_body_requests().len(), 1);

    // A second run finds the weights in the cache: no weight bytes move again.
    let before = srv.weight_body_requests().len();
    let out2 = env.dir.join("out2");
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/tiny-qwen",
            "--mlx-path",
            s(&out2),
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(srv.weight_body_requests().len(), before);
    same_output(&out, &out2);
}

#[test]
fn a_pinned_revision_converts_that_commit() {
    let srv = Server::start();
    let env = Env::new();
    let sharded = env.dir.join("sharded");
    sharded_fixture(FIX, 2, &sharded);
    // v1 (older) is the sharded checkpoint, main the single file.
    let shas = srv.add_repo("test-org/pinned", &[&sharded, &fixture(FIX)], false);
    srv.add_ref("test-org/pinned", "v1", &shas[0]);
    let reference = local_reference(&env, &fixture(FIX));

    for rev in ["v1", shas[0].as_str()] {
        let out = env.dir.join(format!("out-{}", &rev[..2]));
        let (code, _, stderr) = env.run(
            &srv.url,
            false,
            &[],
            &[
                "--hf-path",
                "test-org/pinned",
                "--revision",
                rev,
                "--mlx-path",
                s(&out),
                "-q",
                "--quiet",
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        same_output(&out, &reference);
    }
    let log = srv.log();
    assert!(log.iter().any(|l| l.path.contains(&format!(
        "/resolve/{}/model-00002-of-00002.safetensors",
        shas[0]
    ))));
    assert!(
        !log.iter().any(|l| l.path.ends_with("/model.safetensors")),
        "main's file was fetched"
    );
    let cache = env.cache("test-org/pinned");
    assert_eq!(
        std::fs::read_to_string(cache.join("refs/v1"))
            .unwrap()
            .trim(),
        shas[0]
    );

    // A revision that does not exist: exit 3, named, nothing downloaded.
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/pinned",
            "--revision",
            "v9",
            "--mlx-path",
            s(&env.dir.join("x")),
            "-q",
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("no revision `v9`"), "{stderr}");
    assert!(!env.dir.join("x").exists());
}

#[test]
fn a_gated_repo_needs_a_token_and_fails_before_any_weight() {
    let srv = Server::start();
    let env = Env::new();
    srv.add_repo("gated-org/tiny", &[&fixture(FIX)], true);
    let out = env.dir.join("out");
    let args = [
        "--hf-path",
        "gated-org/tiny",
        "--mlx-path",
        s(&out),
        "-q",
        "--quiet",
    ];
    let (code, _, stderr) = env.run(&srv.url, false, &[], &args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("is gated"), "{stderr}");
    assert!(stderr.contains("--hf-token"), "{stderr}");
    assert!(srv.weight_body_requests().is_empty());
    assert!(!srv.log().iter().any(|l| l.path.ends_with(".safetensors")));
    assert!(!out.exists());

    // The token from the standard token file ($HF_HOME/token) opens it.
    std::fs::write(env.hf_home.join("token"), format!("{TOKEN}\n")).unwrap();
    let (code, _, stderr) = env.run(&srv.url, false, &[], &args);
    assert_eq!(code, 0, "{stderr}");
    std::fs::remove_file(env.hf_home.join("token")).unwrap();
    // ... and so does --hf-token, which the model card records redacted.
    let out2 = env.dir.join("out2");
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "gated-org/tiny",
            "--hf-token",
            TOKEN,
            "--mlx-path",
            s(&out2),
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let card = std::fs::read_to_string(out2.join("README.md")).unwrap();
    assert!(card.contains("--hf-token <token>"), "{card}");
    // The refused request was anonymous; the token went along once there was one.
    let config_gets: Vec<bool> = srv
        .log()
        .iter()
        .filter(|l| l.path.ends_with("/config.json"))
        .map(|l| l.authorized)
        .collect();
    assert_eq!(config_gets.first(), Some(&false));
    assert!(config_gets[1..].iter().all(|a| *a), "{config_gets:?}");
    assert_no_token_under(&env.dir);
}

#[test]
fn an_unknown_repo_is_reported_with_what_to_do() {
    let srv = Server::start();
    let env = Env::new();
    let args = ["--hf-path", "nobody/nothing", "--mlx-path", "out", "-q"];
    // Anonymous: the Hub answers 401 RepoNotFound (it does not tell private from missing).
    let (code, _, stderr) = env.run(&srv.url, false, &[], &args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("`nobody/nothing` not found"), "{stderr}");
    assert!(stderr.contains("--hf-token"), "{stderr}");
    // With a token: 404 RepoNotFound.
    let (code, _, stderr) = env.run(&srv.url, true, &[], &args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("`nobody/nothing` not found"), "{stderr}");
    assert!(stderr.contains("check the spelling"), "{stderr}");
}

#[test]
fn unsupported_architecture_and_pickle_only_fail_before_any_weight() {
    let srv = Server::start();
    let env = Env::new();
    let bert = env.dir.join("bert");
    copy_dir(&fixture(FIX), &bert);
    let mut cfg = read_json(&bert.join("config.json"));
    cfg["model_type"] = "bert".into();
    std::fs::write(bert.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    srv.add_repo("o/bert", &[&bert], false);
    let (code, _, stderr) = env.run(&srv.url, false, &[], &["--hf-path", "o/bert", "-q"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("unsupported architecture `bert`"),
        "{stderr}"
    );
    assert!(!srv.log().iter().any(|l| l.path.ends_with(".safetensors")));

    let pickle = env.dir.join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(fixture(FIX).join("config.json"), pickle.join("config.json")).unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), vec![0u8; 10_000]).unwrap();
    srv.add_repo("o/pickle", &[&pickle], false);
    let (code, _, stderr) = env.run(&srv.url, false, &[], &["--hf-path", "o/pickle", "-q"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("pytorch_model.bin") && stderr.contains("pickle"),
        "{stderr}"
    );
    assert!(!srv.log().iter().any(|l| l.path.ends_with(".bin")));
}

#[test]
fn offline_resolves_from_a_prefilled_cache_alone() {
    let srv = Server::start();
    let env = Env::new();
    srv.add_repo("test-org/offline", &[&fixture(FIX)], false);
    // No cache yet: offline fails, saying what is missing.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let args = [
        "--hf-path",
        "test-org/offline",
        "--mlx-path",
        "out",
        "-q",
        "--quiet",
    ];
    let (code, _, stderr) = env.run(&dead, false, &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("not in the cache"),
        "{stderr}"
    );

    // Fill the cache online, then convert with the network gone.
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &["--hf-path", "test-org/offline", "--dry-run", "-q"],
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/offline",
            "--mlx-path",
            "first",
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let n = srv.log().len();
    let (code, _, stderr) = env.run(&dead, false, &[("HF_HUB_OFFLINE", "1")], &args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(srv.log().len(), n);
    same_output(&env.dir.join("out"), &local_reference(&env, &fixture(FIX)));
}

#[test]
fn a_cache_written_by_python_is_reused() {
    // huggingface_hub's layout, written by hand: refs/main, blobs named by etag, relative links.
    let env = Env::new();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let cache = env.cache("py-org/tiny");
    let snap = cache.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("blobs")).unwrap();
    std::fs::create_dir_all(cache.join("refs")).unwrap();
    std::fs::write(cache.join("refs/main"), commit).unwrap();
    for (name, f) in read_repo_dir(&fixture(FIX)) {
        std::fs::write(cache.join("blobs").join(f.etag()), f.bytes.as_ref()).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{}", f.etag()), snap.join(&name)).unwrap();
    }
    let (code, _, stderr) = env.run(
        "http://127.0.0.1:9",
        false,
        &[("HF_HUB_OFFLINE", "1")],
        &[
            "--hf-path",
            "py-org/tiny",
            "--mlx-path",
            "out",
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    same_output(&env.dir.join("out"), &local_reference(&env, &fixture(FIX)));
}

#[test]
fn a_cut_off_download_resumes_where_it_stopped() {
    let srv = Server::start();
    let env = Env::new();
    srv.add_repo("test-org/flaky", &[&fixture(FIX)], false);
    srv.st().faults.drop_once.insert("model.safetensors".into());
    let size = std::fs::metadata(fixture(FIX).join("model.safetensors"))
        .unwrap()
        .len();
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/flaky",
            "--mlx-path",
            "out",
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    same_output(&env.dir.join("out"), &local_reference(&env, &fixture(FIX)));
    let bodies = srv.weight_body_requests();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[0].range, None);
    let resumed_at: u64 = bodies[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("second request is not a resume: {:?}", bodies[1]));
    assert!(
        resumed_at > 0 && resumed_at < size,
        "{resumed_at} of {size}"
    );

    // Across runs too: a `.incomplete` left by an earlier run (or by Python) is continued.
    let env2 = Env::new();
    let bytes = std::fs::read(fixture(FIX).join("model.safetensors")).unwrap();
    let sha = hex(&Sha256::digest(&bytes));
    let blobs = env2.cache("test-org/flaky").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = bytes.len() / 3;
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &bytes[..half]).unwrap();
    let n = srv.weight_body_requests().len();
    let (code, _, stderr) = env2.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/flaky",
            "--mlx-path",
            "out",
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let bodies = srv.weight_body_requests();
    assert_eq!(bodies.len(), n + 1);
    assert_eq!(
        bodies[n].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());
    assert_eq!(std::fs::read(blobs.join(&sha)).unwrap(), bytes);
}

#[test]
fn a_corrupted_download_is_rejected() {
    let srv = Server::start();
    let env = Env::new();
    srv.add_repo("test-org/corrupt", &[&fixture(FIX)], false);
    srv.st().faults.corrupt.insert("model.safetensors".into());
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/corrupt",
            "--mlx-path",
            "out",
            "-q",
            "--quiet",
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("does not match the Hub's"), "{stderr}");
    assert!(!env.dir.join("out").exists());
    let blobs = env.cache("test-org/corrupt").join("blobs");
    let left: Vec<String> = listing(&blobs)
        .into_iter()
        .filter(|b| {
            let p = blobs.join(b);
            std::fs::metadata(&p).unwrap().len() > 100_000
        })
        .collect();
    assert!(
        left.is_empty(),
        "a corrupt weight file stayed in the cache: {left:?}"
    );
}

#[test]
fn download_and_conversion_overlap() {
    let srv = Server::start();
    let env = Env::new();
    let sharded = env.dir.join("sharded");
    sharded_fixture(FIX, 3, &sharded);
    srv.add_repo("test-org/slow", &[&sharded], false);
    // Shards 2 and 3 arrive slowly; converting a shard of this size takes milliseconds.
    for k in [2, 3] {
        srv.st().faults.slow.insert(
            format!("model-0000{k}-of-00003.safetensors"),
            Duration::from_millis(1500),
        );
    }
    let (code, stdout, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            "test-org/slow",
            "--mlx-path",
            "out",
            "-q",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    same_output(&env.dir.join("out"), &local_reference(&env, &fixture(FIX)));
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let events = v["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {v}"));
    let at = |event: &str, shard: u64| -> f64 {
        events
            .iter()
            .find(|e| e["event"] == event && e["shard"] == shard)
            .unwrap_or_else(|| panic!("no {event} for shard {shard}: {events:?}"))["t"]
            .as_f64()
            .unwrap()
    };
    for k in 0..2 {
        // Shard k was converted while shard k+1 was still downloading.
        assert!(at("converted", k) < at("downloaded", k + 1), "{events:?}");
        assert!(at("downloaded", k) <= at("convert_start", k), "{events:?}");
    }
    assert!(at("downloaded", 2) <= at("convert_start", 2), "{events:?}");
}

#[test]
fn upload_commits_exactly_the_output() {
    let srv = Server::start();
    let env = Env::new();
    let out = env.dir.join("Tiny-4bit");
    let (code, stdout, stderr) = env.run(
        &srv.url,
        true,
        &[],
        &[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&out),
            "-q",
            "--json",
            "--upload-repo",
            "test-org/Tiny-4bit",
            "--private",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        v["uploaded"]
            .as_str()
            .unwrap()
            .contains("test-org/Tiny-4bit"),
        "{v}"
    );
    let st = srv.st();
    let up = &st.uploads;
    assert_eq!(up.created.len(), 1);
    assert_eq!(up.created[0]["name"], "Tiny-4bit");
    assert_eq!(up.created[0]["organization"], "test-org");
    assert_eq!(up.created[0]["private"], true);
    let local: BTreeMap<String, Vec<u8>> = listing(&out)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(out.join(&f)).unwrap();
            (f, b)
        })
        .collect();
    assert_eq!(up.committed, local);
    assert_eq!(
        up.lfs_paths,
        BTreeSet::from(["model.safetensors".to_string()])
    );
    let card = String::from_utf8(local["README.md"].clone()).unwrap();
    assert!(card.contains("base_model: "), "{card}");
    assert!(card.contains("vlm-convert"), "{card}");
    assert!(card.contains("--upload-repo test-org/Tiny-4bit"), "{card}");
    assert!(
        card.contains("python -m mlx_vlm.generate --model test-org/Tiny-4bit"),
        "{card}"
    );
    // The token went only into Authorization headers, only to the server's API.
    for l in &st.log {
        let in_auth = l
            .raw_headers
            .lines()
            .filter(|h| h.contains(TOKEN))
            .all(|h| h.to_ascii_lowercase().starts_with("authorization:"));
        assert!(in_auth, "{l:?}");
    }
    drop(st);
    assert_no_token_under(&env.dir);

    // Without a token the upload is refused before anything is sent.
    let n = srv.log().len();
    let (code, _, stderr) = env.run(
        &srv.url,
        false,
        &[],
        &[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            "o2",
            "-q",
            "--quiet",
            "--upload-repo",
            "test-org/x",
        ],
    );
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("no token"), "{stderr}");
    assert_eq!(srv.log().len(), n);
    assert!(
        !env.dir.join("o2").exists(),
        "converted although the upload could not happen"
    );
}

/// `--verify` on a Hub source checks against the downloaded snapshot, and runs before the upload:
/// a conversion that fails verification is never published.
#[cfg(feature = "mlx")]
#[test]
fn verify_runs_on_the_downloaded_source_before_any_upload() {
    let srv = Server::start();
    let env = Env::new();
    srv.add_repo("test-org/tiny-qwen", &[&fixture(FIX)], false);
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--hf-path",
            "test-org/tiny-qwen",
            "--mlx-path",
            s(out),
            "-q",
            "--json",
            "--verify",
            "--new-tokens",
            "2",
            "--upload-repo",
            "test-org/tiny-qwen-4bit",
        ];
        args.extend_from_slice(extra);
        env.run(&srv.url, true, &[], &args)
    };
    // An impossible top-1 threshold: verification fails, nothing is uploaded, exit 1.
    let (code, stdout, stderr) = run(&env.dir.join("fail"), &["--min-top1", "1.5"]);
    assert_eq!(code, 1, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verify"]["passed"], false);
    assert_eq!(v["verify"]["structure"]["passed"], true, "{v}");
    assert!(v["uploaded"].is_null(), "{v}");
    assert!(stderr.contains("not uploaded"), "{stderr}");
    assert!(srv.st().uploads.committed.is_empty());
    // Default thresholds: it passes against the snapshot, then uploads.
    let (code, stdout, stderr) = run(&env.dir.join("ok"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verify"]["passed"], true, "{v}");
    assert!(v["uploaded"].is_string(), "{v}");
    assert!(!srv.st().uploads.committed.is_empty());
}
