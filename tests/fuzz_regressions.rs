//! Fuzzing regressions: replays every saved input under `fuzz/regressions/<target>/` (crashes the
//! fuzzers found, see scripts/fuzz) and the seed corpora under `fuzz/seeds/<target>/` through the same
//! entry points the fuzz targets use (`fuzz/entry.rs`), plus handcrafted hostile inputs for each
//! parser. The contract: no input panics; the hostile ones are also refused with an error.

#[path = "../fuzz/entry.rs"]
mod entry;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vlm_convert::recipe::Recipe;
use vlm_convert::shard::{parse_header, MAX_HEADER_BYTES};
use vlm_convert::source::{Source, INDEX_FILE};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `fuzz/regressions/<target>` and `fuzz/seeds/<target>`.
fn saved_inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for kind in ["regressions", "seeds"] {
        let dir = root().join("fuzz").join(kind).join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs `f` on every saved input of `target`; fails listing every input that panicked.
fn replay(target: &str, f: impl Fn(&[u8])) {
    let inputs = saved_inputs(target);
    assert!(!inputs.is_empty(), "no saved inputs for {target}");
    let panicked: Vec<String> = inputs
        .iter()
        .filter(|p| {
            let data = std::fs::read(p).unwrap();
            catch_unwind(AssertUnwindSafe(|| f(&data))).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(panicked.is_empty(), "{target}: panicked on {panicked:?}");
}

#[test]
fn replay_safetensors_header() {
    replay("safetensors_header", entry::safetensors_header);
}

#[test]
fn replay_recipe() {
    replay("recipe", entry::recipe);
}

#[test]
fn replay_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = entry::IndexDir::create(tmp.path());
    replay("index", |d| dir.run(d));
}

// ---- safetensors header -------------------------------------------------------------------------

/// A safetensors buffer: header length, header bytes as given, `data` zero bytes.
fn st(header: &[u8], data: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.resize(b.len() + data, 0);
    b
}

fn header_err(buf: &[u8], why: &str) {
    entry::safetensors_header(buf);
    assert!(parse_header(buf).is_err(), "accepted {why}");
}

#[test]
fn hostile_safetensors_headers() {
    header_err(b"", "an empty file");
    header_err(&[0u8; 7], "7 bytes");
    header_err(&u64::MAX.to_le_bytes(), "a u64::MAX header length");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    header_err(&b, "a u64::MAX header length with bytes after it");
    let mut b = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    header_err(&b, "a header over the limit");
    let mut b = MAX_HEADER_BYTES.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    header_err(&b, "a header length at the limit, past the end");
    let mut b = 100u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}      ");
    header_err(&b, "a header length past the end");
    header_err(&st(b"\xff\xfe{\"a\"}", 0), "non-UTF-8 JSON");
    header_err(&st(b"{\"\xff\":{}}", 0), "a non-UTF-8 key");
    header_err(&st(b"[]", 0), "a header that is not an object");
    header_err(&st(b"", 0), "an empty header");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    header_err(&st(deep.as_bytes(), 0), "deeply nested JSON");
    let deep = format!(
        "{{\"__metadata__\":{}1{}}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    header_err(&st(deep.as_bytes(), 0), "deeply nested metadata");
    header_err(
        &st(br#"{"__metadata__":{"format":1}}"#, 0),
        "non-string metadata",
    );
    for (entry, why) in [
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551616]}"#,
            "offsets past u64",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}"#,
            "offsets near usize::MAX",
        ),
        (
            r#"{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}"#,
            "an empty tensor at usize::MAX",
        ),
        (
            r#"{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}"#,
            "a shape product overflowing usize",
        ),
        (
            r#"{"dtype":"F64","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}"#,
            "a partial shape product overflowing before a zero",
        ),
        (
            r#"{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}"#,
            "a negative dimension",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}"#,
            "a negative offset",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[0.5,1.5]}"#,
            "fractional offsets",
        ),
        (
            r#"{"dtype":"U8","shape":[1e300],"data_offsets":[0,1]}"#,
            "a float dimension",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[1,0]}"#,
            "reversed offsets",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}"#,
            "three offsets",
        ),
        (
            r#"{"dtype":"U4","shape":[1],"data_offsets":[0,1]}"#,
            "an unknown dtype",
        ),
        (
            r#"{"dtype":"U8","shape":1,"data_offsets":[0,1]}"#,
            "a scalar shape",
        ),
        (r#"[0,1]"#, "an entry that is not an object"),
    ] {
        let h = format!(r#"{{"t":{entry}}}"#);
        header_err(&st(h.as_bytes(), 1), why);
    }
    header_err(
        &st(
            br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
            3,
        ),
        "overlapping tensors",
    );
    header_err(
        &st(
            br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            1,
        ),
        "a tensor past the end of the data",
    );
    header_err(
        &st(
            br#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            3,
        ),
        "trailing bytes",
    );
    // Sanity: the helpers build files the parser accepts.
    let ok = st(
        br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
        2,
    );
    assert!(parse_header(&ok).is_ok());
    entry::safetensors_header(&ok);
}

// ---- recipes ------------------------------------------------------------------------------------

const RECIPE_HEAD: &str = "name = 't'\ndescription = 'd'\nmodel_types = ['t']\n";

fn recipe_with_rule(from: &str) -> String {
    format!("{RECIPE_HEAD}[[tensors]]\nfrom = '''{from}'''\nto = 'x.$1'\n[quantize]\nmodules = ['.*']\n")
}

/// Parses (and applies, through the fuzz entry point) within a generous time bound.
fn recipe_quick(text: &str, expect_ok: bool, why: &str) {
    let t = Instant::now();
    entry::recipe(text.as_bytes());
    let parsed = Recipe::parse(text, "hostile.toml");
    assert_eq!(parsed.is_ok(), expect_ok, "{why}: {:?}", parsed.err());
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{why}: took {:?}",
        t.elapsed()
    );
}

#[test]
fn hostile_recipes() {
    recipe_quick("", false, "an empty recipe");
    recipe_quick("\u{0}\u{7}", false, "control bytes");
    entry::recipe(b"name = '\xff\xfe'\n");
    // Catastrophic-backtracking patterns: the regex crate matches in linear time.
    for pat in ["(a*)*b", "(a+)+$", "(a|a)*c", "(x+x+)+y", "(.*)*\\.weight"] {
        let text = recipe_with_rule(pat);
        recipe_quick(&text, true, pat);
        let r = Recipe::parse(&text, "hostile.toml").unwrap();
        let t = Instant::now();
        let long = "a".repeat(100_000);
        let _ = r.map_name(&long);
        let _ = r.quantize.allows(&long);
        assert!(t.elapsed() < Duration::from_secs(60), "{pat}: slow match");
    }
    // Patterns whose compiled program explodes: refused by the regex size limit, not built.
    recipe_quick(
        &recipe_with_rule("((a{1000}){1000}){1000}"),
        false,
        "an exploding repetition",
    );
    recipe_quick(
        &recipe_with_rule("\\w{1000}\\w{1000}\\w{1000}"),
        false,
        "a huge unicode class repetition",
    );
    recipe_quick(
        &recipe_with_rule(&"(".repeat(10_000)),
        false,
        "10k open groups",
    );
    recipe_quick(
        &recipe_with_rule(&format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000))),
        false,
        "10k nested groups",
    );
    // A rename template naming groups that do not exist expands to nothing, without panicking.
    let r = Recipe::parse(
        &format!("{RECIPE_HEAD}[[tensors]]\nfrom = '(.+)'\nto = '$9${{nope}}$$${{'\n[quantize]\nmodules = []\n"),
        "t",
    )
    .unwrap();
    let _ = r.map_name("model.x");
    // Deeply nested TOML.
    let deep = format!("a = {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    recipe_quick(&deep, false, "deeply nested arrays");
    let deep = format!("a = {}1{}\n", "{b = ".repeat(100_000), "}".repeat(100_000));
    recipe_quick(&deep, false, "deeply nested inline tables");
    let dotted = format!("{} = 1\n", vec!["a"; 100_000].join("."));
    recipe_quick(&dotted, false, "a 100k-part dotted key");
    // Layout permutations: huge, out of range, duplicated.
    for perm in ["[18446744073709551615]", "[0, 0]", "[1]", "[-1]", "[]"] {
        let text = format!(
            "{RECIPE_HEAD}[[layout]]\ntensor = 'x'\nop = 'transpose'\nperm = {perm}\n[quantize]\nmodules = []\n"
        );
        entry::recipe(text.as_bytes());
    }
    // 1 MB recipes: one long string, and thousands of rules.
    let big = format!(
        "name = 't'\ndescription = '{}'\nmodel_types = ['t']\n[quantize]\nmodules = []\n",
        "d".repeat(1 << 20)
    );
    recipe_quick(&big, true, "a 1 MB description");
    let mut many = String::from(RECIPE_HEAD);
    while many.len() < 1 << 20 {
        many.push_str("[[tensors]]\nfrom = 'model\\.layers\\.(\\d+)\\.w'\ndrop = 'r'\n");
    }
    many.push_str("[quantize]\nmodules = []\n");
    recipe_quick(&many, true, "a 1 MB recipe of rules");
    let junk: String = (0..1 << 20)
        .map(|i| ['[', '{', '"', '\'', '='][i % 5])
        .collect();
    recipe_quick(&junk, false, "1 MB of brackets and quotes");
    // Shape rules: expressions that overflow, divide by zero or refer to themselves evaluate to
    // "not checked" (the entry point runs them against an awkward config); malformed ones are refused.
    let shapes = |group: &str| {
        format!("{RECIPE_HEAD}[quantize]\nmodules = []\n[[shapes]]\nsections = ['text_config', '']\n{group}\n")
    };
    for (group, ok, why) in [
        ("tensors = [{ tensor = '.*', dims = ['18446744073709551615 * 18446744073709551615'] }]", true, "an overflowing product"),
        ("tensors = [{ tensor = '.*', dims = ['hidden_size / num_attention_heads', '0 - 1'] }]", true, "a zero divisor and a negative"),
        ("defaults = { head_dim = 'head_dim + 1', a = 'b', b = 'a' }\ntensors = [{ tensor = '.*', dims = ['head_dim', 'a'] }]", true, "self-referential defaults"),
        ("layers = { tensor = '(.*)', count = 'vocab_size' }", true, "a layer count near u64::MAX"),
        ("layers = { tensor = '.*', count = 'n' }", false, "a layer pattern without a group"),
        ("tensors = [{ tensor = '.*', dims = [] }]", false, "no dims"),
        ("tensors = [{ tensor = '.*', dims = [true] }]", false, "a boolean dim"),
        ("tensors = [{ tensor = '.*', dims = [-3] }]", false, "a negative literal"),
        ("tensors = [{ tensor = '.*', dims = ['a +'] }]", false, "a dangling operator"),
        ("tensors = [{ tensor = '(', dims = ['a'] }]", false, "a bad regex"),
    ] {
        recipe_quick(&shapes(group), ok, why);
    }
    let deep = format!("{}a{}", "(".repeat(5_000), ")".repeat(5_000));
    recipe_quick(
        &shapes(&format!(
            "tensors = [{{ tensor = '.*', dims = ['{deep}'] }}]"
        )),
        false,
        "5k nested parentheses",
    );
    recipe_quick(
        &format!("{RECIPE_HEAD}[quantize]\nmodules = []\n[[shapes]]\nsections = []\n"),
        false,
        "a group reading no config section",
    );
}

// ---- index --------------------------------------------------------------------------------------

#[test]
fn hostile_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = entry::IndexDir::create(tmp.path());
    let open = |index: &[u8]| -> bool {
        dir.run(index);
        std::fs::write(dir.dir.join(INDEX_FILE), index).unwrap();
        Source::open(&dir.dir).is_ok()
    };
    let good = br#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#;
    assert!(open(good), "the valid tiny index must open");
    let entry_named = |f: &str| {
        format!(
            r#"{{"weight_map":{{"a":{},"b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}}}"#,
            serde_json::Value::String(f.into())
        )
    };
    for (index, why) in [
        (String::new(), "an empty index"),
        ("\u{0}".into(), "a NUL byte"),
        ("[]".into(), "an array"),
        ("{}".into(), "no weight_map"),
        (r#"{"weight_map":[]}"#.into(), "a weight_map array"),
        (r#"{"weight_map":{"a":1}}"#.into(), "a numeric entry"),
        (
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            "deeply nested JSON",
        ),
        (entry_named("../../../../etc/passwd"), "a path escape"),
        (entry_named("/etc/passwd"), "an absolute path"),
        (entry_named(""), "an empty file name"),
        (entry_named("."), "the directory itself"),
        (entry_named("config.json"), "a file that is not a shard"),
        (entry_named(INDEX_FILE), "the index itself"),
        (
            entry_named("model.safetensors\u{0}"),
            "a NUL in a file name",
        ),
        (entry_named(&"x".repeat(100_000)), "a 100 kB file name"),
        (entry_named("missing.safetensors"), "a missing shard"),
        (
            entry_named("model-00002-of-00002.safetensors"),
            "the wrong shard",
        ),
    ] {
        assert!(!open(index.as_bytes()), "accepted {why}");
    }
    assert!(
        !open(b"{\"weight_map\":{\"\xff\":\"a\"}}"),
        "accepted non-UTF-8"
    );
    // An empty weight_map opens as a checkpoint with no shards and no tensors (not an error here;
    // later stages decide): only the no-panic contract is checked.
    open(br#"{"weight_map":{}}"#);
    let mut huge = String::from(r#"{"weight_map":{"#);
    for i in 0..50_000 {
        huge.push_str(&format!(r#""t{i}":"model-00001-of-00002.safetensors","#));
    }
    huge.push_str(r#""a":"model-00001-of-00002.safetensors"}}"#);
    assert!(!open(huge.as_bytes()), "accepted entries the shards lack");
    assert!(Path::new(&dir.dir).join("config.json").is_file());
}
