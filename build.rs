//! Build script: embeds every `recipes/*.toml` into the binary (so adding an architecture means adding
//! a file) and, with the `mlx` feature, builds the C++ shim over libmlx (`build_support/mlx.rs`).

#[cfg(feature = "mlx")]
#[path = "build_support/mlx.rs"]
mod mlx;

use std::fmt::Write;
use std::path::Path;

fn main() {
    embed_recipes();
    #[cfg(feature = "mlx")]
    mlx::build();
}

fn embed_recipes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("recipes/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    names.sort();
    let mut src = String::from("/// Built-in recipes: (file stem, TOML text).\npub static EMBEDDED_RECIPES: &[(&str, &str)] = &[\n");
    for p in &names {
        println!("cargo:rerun-if-changed={}", p.display());
        let stem = p.file_stem().unwrap().to_string_lossy();
        writeln!(
            src,
            "    ({stem:?}, include_str!({:?})),",
            p.display().to_string()
        )
        .unwrap();
    }
    src.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded_recipes.rs");
    std::fs::write(out, src).unwrap();
}
