//! Build support for the MLX binding (`src/mlx/`): find MLX 0.32.4, compile the C++ shim (`shim/`)
//! against its headers, link its `libmlx`, and embed an rpath to it.
//!
//! Where MLX comes from, first match wins:
//! 1. `MLX_DIR`: a prefix holding `include/mlx/*.h` and `lib/libmlx.{so,dylib}`.
//! 2. A Python that imports `mlx.core` (`VLM_CONVERT_PYTHON`, then `python3`): the pip wheel's package
//!    directory is such a prefix.
//! 3. Otherwise the pinned wheel is installed once, by pip, into `<target dir>/mlx-wheel/<version>/`
//!    (so a machine with only Rust and Python 3 can `cargo build`).
//!
//! The version is pinned exactly because `libmlx` has no versioned SONAME and its C++ ABI changes between
//! patch releases: a mismatch fails here, with the fix spelled out, instead of at load time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The one MLX version the shim is written and tested against (also checked at run time).
const PINNED: &str = "0.32.4";

pub fn build() {
    for var in ["MLX_DIR", "VLM_CONVERT_PYTHON"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let shim = manifest.join("shim");
    for f in ["mlx_shim.cpp", "mlx_shim.h"] {
        println!("cargo:rerun-if-changed={}", shim.join(f).display());
    }

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" && target_os != "macos" {
        fail(&format!(
            "the MLX binding supports Linux and macOS, not {target_os:?}; build with --no-default-features \
             to leave it out (the converter works without it)"
        ));
    }

    let (prefix, source) = locate(&target_os).unwrap_or_else(|e| fail(&e));
    let version = header_version(&prefix).unwrap_or_else(|e| fail(&e));
    if version != PINNED {
        let req = wheel_requirement(&target_os);
        let fix = match &source {
            Source::MlxDir => format!(
                "point MLX_DIR at an MLX {PINNED} prefix (the mlx/ directory that `pip install \"{req}\"` \
                 creates), or unset it"
            ),
            Source::Python(py) => format!(
                "run `{py} -m pip install \"{req}\"`, or set VLM_CONVERT_PYTHON to a Python with mlx {PINNED} \
                 (or to one without mlx: then the build installs its own copy), or set MLX_DIR to an MLX \
                 {PINNED} prefix"
            ),
            Source::Installed => "delete that directory so the build reinstalls it".to_string(),
        };
        fail(&format!(
            "found MLX {version} at {} ({}), but vlm-convert needs exactly MLX {PINNED}: the C++ ABI of \
             libmlx changes between patch releases.\nFix: {fix}; or build with --no-default-features to \
             leave the MLX binding out.",
            prefix.display(),
            source.describe(),
        ));
    }
    // A reinstall in place (pip upgrade in the same venv) must rebuild and recheck.
    println!(
        "cargo:rerun-if-changed={}",
        prefix.join("include/mlx/version.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        lib_file(&prefix, &target_os).display()
    );

    let stdlib = if target_os == "macos" {
        "c++"
    } else {
        "stdc++"
    };
    cc::Build::new()
        .cpp(true)
        .file(shim.join("mlx_shim.cpp"))
        .include(&shim)
        .flag("-std=c++20")
        .flag("-isystem")
        .flag(
            prefix
                .join("include")
                .to_str()
                .expect("MLX prefix is valid UTF-8"),
        )
        .cpp_link_stdlib(Some(stdlib))
        .compile("vlm_convert_mlx_shim");

    let lib = prefix.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    // This crate is the final crate, so the rpath reaches the binary and every test executable.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!(
        "cargo:rustc-env=VLM_CONVERT_MLX_PREFIX={}",
        prefix.display()
    );
    println!("cargo:rustc-env=VLM_CONVERT_MLX_VERSION={version}");
}

/// Prints the message where cargo shows it and fails the build (no panic backtrace noise).
fn fail(msg: &str) -> ! {
    eprintln!("error: vlm-convert MLX binding: {msg}");
    std::process::exit(1);
}

fn wheel_requirement(target_os: &str) -> String {
    if target_os == "macos" {
        format!("mlx=={PINNED}")
    } else {
        format!("mlx[cpu]=={PINNED}")
    }
}

fn lib_file(prefix: &Path, target_os: &str) -> PathBuf {
    let name = if target_os == "macos" {
        "libmlx.dylib"
    } else {
        "libmlx.so"
    };
    prefix.join("lib").join(name)
}

/// Ok if `prefix` has the headers and the library; otherwise says what is missing.
fn check_layout(prefix: &Path, target_os: &str) -> Result<(), String> {
    let header = prefix.join("include/mlx/mlx.h");
    let lib = lib_file(prefix, target_os);
    for p in [&header, &lib] {
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    Ok(())
}

fn nonempty_env(var: &str) -> Option<String> {
    env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Where the MLX in use came from (for messages).
enum Source {
    MlxDir,
    Python(String),
    Installed,
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::MlxDir => "from MLX_DIR".to_string(),
            Source::Python(py) => format!("imported by {py}"),
            Source::Installed => "installed by this build".to_string(),
        }
    }
}

fn locate(target_os: &str) -> Result<(PathBuf, Source), String> {
    if let Some(dir) = nonempty_env("MLX_DIR") {
        let prefix = PathBuf::from(&dir);
        check_layout(&prefix, target_os)
            .map_err(|e| format!("MLX_DIR={dir} is not an MLX install prefix: {e}"))?;
        return Ok((canonical(prefix), Source::MlxDir));
    }

    let mut pythons = Vec::new();
    if let Some(py) = nonempty_env("VLM_CONVERT_PYTHON") {
        pythons.push(py);
    }
    pythons.push("python3".to_string());

    let mut notes = Vec::new();
    let mut runnable = None;
    for py in &pythons {
        match python_mlx_prefix(py) {
            Ok(Some(prefix)) => {
                check_layout(&prefix, target_os).map_err(|e| {
                    format!(
                        "{py} imports mlx from {}, but that install has no C++ SDK ({e}); on Linux install \
                         \"mlx[cpu]=={PINNED}\" (the mlx-cpu wheel carries the headers and libmlx)",
                        prefix.display()
                    )
                })?;
                return Ok((canonical(prefix), Source::Python(py.clone())));
            }
            Ok(None) => {
                notes.push(format!("{py} has no mlx"));
                runnable.get_or_insert(py.clone());
            }
            Err(e) => notes.push(e),
        }
    }

    let Some(py) = runnable else {
        return Err(format!(
            "no MLX found and no Python to install it with ({}). Set MLX_DIR to an MLX {PINNED} prefix, \
             or VLM_CONVERT_PYTHON to a Python with mlx {PINNED}, or build with --no-default-features.",
            notes.join("; ")
        ));
    };
    let prefix = install_wheel(&py, target_os, &notes.join("; "))?;
    Ok((prefix, Source::Installed))
}

/// `Ok(Some(prefix))` if `py` imports `mlx.core`, `Ok(None)` if it runs but has no mlx, `Err` if it
/// does not run at all.
fn python_mlx_prefix(py: &str) -> Result<Option<PathBuf>, String> {
    let out = Command::new(py)
        .args([
            "-c",
            "import os, mlx.core; print(os.path.dirname(mlx.core.__file__))",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {py}: {e}"))?;
    if !out.status.success() {
        // Distinguish "no mlx" from "not a working Python".
        let runs = Command::new(py)
            .args(["-c", "import sys"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        return if runs {
            Ok(None)
        } else {
            Err(format!("{py} does not run"))
        };
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(Some(PathBuf::from(dir)))
}

/// Installs the pinned wheel with `py -m pip install --target`, once per target directory. The install
/// goes to a private temporary directory renamed into place when complete, so concurrent builds and
/// interrupted installs never see a half-written copy.
fn install_wheel(py: &str, target_os: &str, why: &str) -> Result<PathBuf, String> {
    let root = wheel_root().join(PINNED);
    let prefix = root.join("mlx");
    if check_layout(&prefix, target_os).is_ok() {
        return Ok(canonical(prefix));
    }
    let parent = root.parent().unwrap();
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(".{PINNED}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);

    let req = wheel_requirement(target_os);
    println!(
        "cargo:warning=no MLX found ({why}); installing \"{req}\" into {} (once)",
        root.display()
    );
    let status = Command::new(py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(["--only-binary=:all:", "--target"])
        .arg(&tmp)
        .arg(&req)
        .stdin(Stdio::null())
        // pip's progress goes to cargo's captured output; its errors reach the user through stderr.
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {py} -m pip: {e}"))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(format!(
            "no MLX found, and `{py} -m pip install --target {} \"{req}\"` failed ({status}; pip's own \
             message is above). Install pip, or set MLX_DIR / VLM_CONVERT_PYTHON to an MLX {PINNED} \
             install, or build with --no-default-features.",
            tmp.display()
        ));
    }
    check_layout(&tmp.join("mlx"), target_os)
        .map_err(|e| format!("pip installed \"{req}\" but the result has no C++ SDK: {e}"))?;
    if fs::rename(&tmp, &root).is_err() {
        // Another build finished first: use its copy if it is complete.
        let _ = fs::remove_dir_all(&tmp);
        check_layout(&prefix, target_os)
            .map_err(|e| format!("cannot move the MLX install into {}: {e}", root.display()))?;
    }
    Ok(canonical(prefix))
}

/// `<target dir>/mlx-wheel`: shared by every profile, so the wheel is downloaded once. The target
/// directory is the ancestor of OUT_DIR holding cargo's `CACHEDIR.TAG`; OUT_DIR itself otherwise.
fn wheel_root() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    out.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(|d| d.join("mlx-wheel"))
        .unwrap_or_else(|| out.join("mlx-wheel"))
}

fn canonical(p: PathBuf) -> PathBuf {
    fs::canonicalize(&p).unwrap_or(p)
}

/// "major.minor.patch" from `include/mlx/version.h` (the headers we compile against are what counts).
fn header_version(prefix: &Path) -> Result<String, String> {
    let path = prefix.join("include/mlx/version.h");
    let text =
        fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let get = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("#define "))
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name))
                    .then(|| it.next().map(str::to_string))
                    .flatten()
            })
            .ok_or_else(|| format!("{} does not define {name}", path.display()))
    };
    Ok(format!(
        "{}.{}.{}",
        get("MLX_VERSION_MAJOR")?,
        get("MLX_VERSION_MINOR")?,
        get("MLX_VERSION_PATCH")?
    ))
}
