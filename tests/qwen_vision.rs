//! Our Qwen vision transformer (`vlm_convert::verify::QwenVision`) against mlx-vlm's vision tower, for
//! Qwen2-VL, Qwen2.5-VL and Qwen3-VL: each fixture is converted by the real binary (bf16, and 4-bit
//! g64, whose vision tower stays float), then `tests/py/qwen_vision.py` builds pixel values with the
//! checkpoint's own transformers image processor (one small image; two larger images that give
//! several Qwen2.5-VL windows and fractional Qwen3-VL position interpolation; a random two-frame
//! grid) and runs mlx-vlm's tower on them, natively and upcast to float32. Our features must match.
//!
//! Each comparison prints `qwen-vision <arch> <conversion> <run> case<i> max|diff| ...`
//! (run with `--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::path::Path;

use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::{Precision, QwenVision, VerifyError};

/// Max |diff| against mlx-vlm in the stored dtype (bf16). Measured on the Linux CPU: 0.
const NATIVE_TOL: f32 = 1e-2;
/// Max |diff| in float32. Measured: 0.
const F32_TOL: f32 = 1e-4;

fn read_grid(file: &SafetensorsFile, name: &str) -> Vec<[usize; 3]> {
    let info = file.tensors.get(name).expect("grid_thw");
    let v: Vec<usize> = file
        .data(info)
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
}

/// Runs tests/py/qwen_vision.py on `dir`; returns the cases file.
fn mlx_vlm_cases(dir: &Path, out: &Path) -> SafetensorsFile {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/qwen_vision.py"))
        .args(["--model", s(dir), "--out", s(out)])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "qwen_vision.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    SafetensorsFile::open(out).unwrap()
}

/// Compares every case of `dir` in both precisions; returns the largest difference seen.
fn compare_dir(arch: &str, conversion: &str, dir: &Path, tmp: &Path) -> f32 {
    let cases = mlx_vlm_cases(dir, &tmp.join(format!("{conversion}.cases.safetensors")));
    let mut worst = 0.0f32;
    for (precision, suffix, tol) in [
        (Precision::Native, "", NATIVE_TOL),
        (Precision::Float32, ".f32", F32_TOL),
    ] {
        let model = QwenVision::load(dir, precision).unwrap();
        let mut i = 0;
        while cases.tensors.contains_key(&format!("case{i}.pixel_values")) {
            let pv = read_f32(&cases, &format!("case{i}.pixel_values"));
            let grid = read_grid(&cases, &format!("case{i}.grid_thw"));
            let ours = model.features(&pv, &grid).unwrap();
            let want = read_f32(&cases, &format!("case{i}.features{suffix}"));
            let merge = model.config().spatial_merge_size;
            let tokens: usize =
                grid.iter().map(|g| g[0] * g[1] * g[2]).sum::<usize>() / (merge * merge);
            assert_eq!(ours.tokens, tokens);
            assert_eq!(ours.data.len(), tokens * ours.dim);
            let run = if suffix.is_empty() {
                "native"
            } else {
                "float32"
            };
            let d = max_abs_diff(&ours.data, &want);
            eprintln!(
                "qwen-vision {arch:11} {conversion:5} {run:8} case{i} grid {grid:?} max|diff| {d:.3e} \
                 (tol {tol:.0e}, max|feature| {:.3e})",
                want.iter().fold(0.0f32, |m, x| m.max(x.abs()))
            );
            assert!(
                d <= tol,
                "{arch} {conversion} {run} case{i}: features differ from mlx-vlm's by {d:e}"
            );
            worst = worst.max(d);
            let mut j = 0;
            while cases
                .tensors
                .contains_key(&format!("case{i}.deepstack.{j}{suffix}"))
            {
                let want = read_f32(&cases, &format!("case{i}.deepstack.{j}{suffix}"));
                let d = max_abs_diff(&ours.deepstack[j], &want);
                eprintln!(
                    "qwen-vision {arch:11} {conversion:5} {run:8} case{i} deepstack.{j} max|diff| {d:.3e}"
                );
                assert!(
                    d <= tol,
                    "{arch} {conversion} {run} case{i} deepstack {j}: {d:e}"
                );
                worst = worst.max(d);
                j += 1;
            }
            assert_eq!(ours.deepstack.len(), j, "{arch}: deepstack outputs");
            i += 1;
        }
        assert_eq!(i, 3, "{arch}: cases in the file");
    }
    worst
}

fn tower_matches(arch: &str) {
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    let plain = t.path().join("bf16");
    convert_fixture(arch, &plain, &[]);
    compare_dir(arch, "bf16", &plain, t.path());
    let q4 = t.path().join("q4");
    convert_fixture(arch, &q4, &["-q", "--q-bits", "4", "--q-group-size", "64"]);
    compare_dir(arch, "q4", &q4, t.path());
}

#[test]
fn qwen2_vl() {
    tower_matches("qwen2_vl");
}

#[test]
fn qwen2_5_vl() {
    tower_matches("qwen2_5_vl");
}

#[test]
fn qwen3_vl() {
    tower_matches("qwen3_vl");
}

/// Bad inputs are errors, and a patch embedding left in PyTorch's layout is refused by name.
#[test]
fn bad_inputs_and_pytorch_layout() {
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    convert_fixture("qwen2_vl", &out, &[]);
    let m = QwenVision::load(&out, Precision::Native).unwrap();
    let k = m.config().patch_len();
    // grid not a multiple of the merge size
    let r = m.features(&vec![0.0; 3 * k], &[[1, 1, 3]]);
    assert!(matches!(r, Err(VerifyError::BadInput(_))), "{r:?}");
    // pixel count disagrees with the grid
    let r = m.features(&vec![0.0; 3 * k], &[[1, 2, 2]]);
    assert!(matches!(r, Err(VerifyError::BadInput(_))), "{r:?}");
    assert!(matches!(
        m.features(&[], &[]),
        Err(VerifyError::BadInput(_))
    ));

    // Store the Conv3d kernel as PyTorch has it ([O, C, T, P, P]): same bytes, other shape.
    let file = out.join("model.safetensors");
    let st = SafetensorsFile::open(&file).unwrap();
    let items: Vec<_> = st
        .tensors
        .iter()
        .map(|(name, info)| {
            let mut info = info.clone();
            if name == "vision_tower.patch_embed.proj.weight" {
                let s = info.shape.clone();
                info.shape = vec![s[0], s[4], s[1], s[2], s[3]];
            }
            (name.clone(), info, st.data(&st.tensors[name]).to_vec())
        })
        .collect();
    let metadata = st.metadata.clone();
    drop(st);
    write_safetensors(&file, &metadata, &items);
    let err = QwenVision::load(&out, Precision::Native)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("channels-last"),
        "unexpected error: {err}"
    );
}

/// The comparison can fail: planted vision bugs (two vision blocks swapped, the merger's two layers
/// swapped; SPEC.md section 7: invisible on a text prompt) move the features far beyond the tolerance,
/// while the text prompt's logits stay identical.
#[test]
fn planted_vision_bugs_are_seen() {
    use vlm_convert::verify::TextModel;
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good");
    convert_fixture("qwen2_5_vl", &good, &[]);
    let cases = mlx_vlm_cases(&good, &t.path().join("cases.safetensors"));
    let pv = read_f32(&cases, "case1.pixel_values");
    let grid = read_grid(&cases, "case1.grid_thw");
    let want = read_f32(&cases, "case1.features.f32");
    let ids = [5, 17, 42, 100, 33, 8, 61, 7];
    let text_good = TextModel::load(&good, Precision::Float32)
        .unwrap()
        .logits(&ids)
        .unwrap();
    let swap = |a: &'static str, b: &'static str| {
        move |n: &str| -> Option<String> {
            Some(if let Some(rest) = n.strip_prefix(a) {
                format!("{b}{rest}")
            } else if let Some(rest) = n.strip_prefix(b) {
                format!("{a}{rest}")
            } else {
                n.to_string()
            })
        }
    };
    for (bug, a, b) in [
        (
            "vision blocks 0 and 1 swapped",
            "vision_tower.blocks.0.",
            "vision_tower.blocks.1.",
        ),
        (
            "merger layers swapped",
            "vision_tower.merger.mlp.0.",
            "vision_tower.merger.mlp.2.",
        ),
    ] {
        let dir = t.path().join(bug.replace(' ', "-"));
        copy_dir(&good, &dir);
        rename_tensors(&dir, swap(a, b));
        let m = QwenVision::load(&dir, Precision::Float32).unwrap();
        let d = max_abs_diff(&m.features(&pv, &grid).unwrap().data, &want);
        let text = TextModel::load(&dir, Precision::Float32)
            .unwrap()
            .logits(&ids)
            .unwrap();
        let text_d = max_abs_diff(&text, &text_good);
        eprintln!(
            "qwen-vision qwen2_5_vl planted bug ({bug}): image features max|diff| {d:.3e}, text logits \
             max|diff| {text_d:.3e}"
        );
        assert!(d > 100.0 * F32_TOL, "{bug} went unseen ({d:e})");
        assert_eq!(text_d, 0.0, "{bug}: the text prompt should not see it");
    }
}

/// M-RoPE positions of prompts holding images: ours against mlx-vlm's `get_rope_index` (Qwen2-VL,
/// Qwen2.5-VL, Qwen3-VL) on several layouts, token ids of the qwen2_vl fixture.
#[test]
fn mrope_positions_match_mlx_vlm() {
    use vlm_convert::verify::{mrope_delta, mrope_image_positions, ImageTokenIds};
    vlm_convert::mlx::init().expect("mlx::init");
    let (start, image, end) = (294, 297, 295);
    let tokens = ImageTokenIds {
        image_token_id: image,
        vision_start_token_id: start,
    };
    let merge = 2;
    // (text before, [(grid, text after)]) -> ids
    let block = |g: [usize; 3]| -> Vec<i32> {
        let mut v = vec![start];
        v.extend(std::iter::repeat_n(
            image,
            g[0] * g[1] * g[2] / (merge * merge),
        ));
        v.push(end);
        v
    };
    let layouts: Vec<(Vec<i32>, Vec<[usize; 3]>)> = vec![
        // text, image, text
        (
            [vec![10, 11, 12], block([1, 4, 8]), vec![13, 14]].concat(),
            vec![[1, 4, 8]],
        ),
        // two images of different sizes with text between, none after
        (
            [
                vec![10],
                block([1, 16, 24]),
                vec![20, 21, 22],
                block([1, 12, 8]),
            ]
            .concat(),
            vec![[1, 16, 24], [1, 12, 8]],
        ),
        // an image first, then two back to back, then text
        (
            [
                block([1, 2, 2]),
                block([1, 6, 4]),
                block([1, 4, 10]),
                vec![30, 31],
            ]
            .concat(),
            vec![[1, 2, 2], [1, 6, 4], [1, 4, 10]],
        ),
        // a two-frame grid
        (
            [vec![10, 11], block([2, 4, 6]), vec![12]].concat(),
            vec![[2, 4, 6]],
        ),
        // text only
        (vec![10, 11, 12, 13], vec![]),
    ];
    let req = serde_json::json!({
        "cases": layouts.iter().map(|(ids, grids)| serde_json::json!({"ids": ids, "grids": grids})).collect::<Vec<_>>(),
        "merge": merge,
        "image_token_id": image,
        "video_token_id": 298,
        "vision_start_token_id": start,
    });
    let mut child = std::process::Command::new(python())
        .arg(root().join("tests/py/mrope_index.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(req.to_string().as_bytes()).unwrap();
    }
    let res = child.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "mrope_index.py: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let want: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    for arch in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] {
        for (i, (ids, grids)) in layouts.iter().enumerate() {
            let ours = mrope_image_positions(ids, tokens, grids, merge).unwrap();
            let w = &want[arch][i]["positions"];
            let theirs: Vec<[i64; 3]> = (0..ids.len())
                .map(|j| {
                    let at = |axis: usize| w[axis][j].as_i64().unwrap();
                    [at(0), at(1), at(2)]
                })
                .collect();
            assert_eq!(ours, theirs, "{arch} layout {i}");
            assert_eq!(
                mrope_delta(&ours),
                want[arch][i]["delta"].as_i64().unwrap(),
                "{arch} layout {i}: rope delta"
            );
        }
        eprintln!(
            "qwen-vision mrope {arch}: {} layouts identical to mlx-vlm's get_rope_index",
            layouts.len()
        );
    }
}

/// A deterministic test image of `w x h`: gradients, a checkerboard and pseudo-random noise, so that
/// every resampling tap matters.
fn pattern(w: usize, h: usize, seed: u32) -> vlm_convert::verify::image::RgbImage {
    let mut state = seed.wrapping_mul(747_796_405).wrapping_add(1);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (state >> 24) as usize;
            let check = if (x / 7 + y / 5) % 2 == 0 { 60 } else { 0 };
            data.push(((x * 255 / w.max(2)) + check) as u8);
            data.push(((y * 255 / h.max(2)) / 2 + noise / 2) as u8);
            data.push(((x + 2 * y) * 3 % 256) as u8);
        }
    }
    vlm_convert::verify::image::RgbImage::new(w, h, data).unwrap()
}

/// Qwen's preprocessing (smart_resize, Pillow's bicubic resize, rescale, normalize, temporal repeat,
/// patch order) against transformers' processor on PNG files, for each Qwen fixture's processor
/// config, at the checkpoint's pixel budget and a larger one.
#[test]
fn preprocessing_matches_transformers() {
    use vlm_convert::verify::image::RgbImage;
    use vlm_convert::verify::QwenImageProcessor;
    let t = tempfile::tempdir().unwrap();
    let images: Vec<RgbImage> = vec![
        RgbImage::synthetic(),
        pattern(12, 10, 1),   // grows to min_pixels
        pattern(300, 200, 2), // shrinks to max_pixels
        pattern(500, 20, 3),  // a long strip
        pattern(57, 43, 4),   // odd sides
    ];
    let mut files = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let f = t.path().join(format!("img{i}.png"));
        img.save_png(&f).unwrap();
        files.push(f);
    }
    for arch in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] {
        for max_pixels in [None, Some(160 * 160)] {
            let out = t.path().join(format!("{arch}-{max_pixels:?}.safetensors"));
            let mut cmd = std::process::Command::new(python());
            cmd.arg(root().join("tests/py/qwen_processor.py")).args([
                "--model",
                s(&fixture(arch)),
                "--out",
                s(&out),
            ]);
            if let Some(m) = max_pixels {
                cmd.args(["--max-pixels", &m.to_string()]);
            }
            let res = cmd.args(files.iter().map(|f| s(f))).output().unwrap();
            assert!(
                res.status.success(),
                "qwen_processor.py: {}",
                String::from_utf8_lossy(&res.stderr)
            );
            let want = SafetensorsFile::open(&out).unwrap();
            let mut p = QwenImageProcessor::from_dir(&fixture(arch)).unwrap();
            if let Some(m) = max_pixels {
                p.max_pixels = m;
            }
            let mut worst = 0.0f32;
            for (i, img) in images.iter().enumerate() {
                let ours = p.preprocess(img).unwrap();
                let grid = read_grid(&want, &format!("image{i}.grid_thw"));
                assert_eq!(vec![ours.grid_thw], grid, "{arch} image {i}");
                let d = max_abs_diff(
                    &ours.data,
                    &read_f32(&want, &format!("image{i}.pixel_values")),
                );
                worst = worst.max(d);
            }
            let (all, grids) = p.preprocess_all(&images).unwrap();
            assert_eq!(grids, read_grid(&want, "all.grid_thw"));
            worst = worst.max(max_abs_diff(&all, &read_f32(&want, "all.pixel_values")));
            eprintln!(
                "qwen-vision preprocess {arch:11} max_pixels {:>7}: grids {grids:?} max|diff| {worst:.3e}",
                p.max_pixels
            );
            assert!(worst <= 1e-6, "{arch}: pixel values differ by {worst:e}");
        }
    }
}

/// Writes the inputs of an image prompt for tests/py/qwen_image_forward.py.
fn write_prompt_inputs(path: &Path, ids: &[i32], pv: &[f32], grids: &[[usize; 3]], k: usize) {
    use vlm_convert::dtype::DType;
    use vlm_convert::shard::TensorInfo;
    let le_i32 = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let info = |dtype: DType, shape: Vec<usize>| -> TensorInfo {
        let end = shape.iter().product::<usize>() * 4;
        TensorInfo {
            dtype,
            shape,
            begin: 0,
            end,
        }
    };
    let grid_flat: Vec<i32> = grids.iter().flatten().map(|&x| x as i32).collect();
    let items = vec![
        (
            "input_ids".to_string(),
            info(DType::I32, vec![ids.len()]),
            le_i32(ids),
        ),
        (
            "pixel_values".to_string(),
            info(DType::F32, vec![pv.len() / k, k]),
            pv.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        (
            "grid_thw".to_string(),
            info(DType::I32, vec![grids.len(), 3]),
            le_i32(&grid_flat),
        ),
    ];
    write_safetensors(path, &Default::default(), &items);
}

/// The whole image prompt of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: our preprocessing of two images, our vision
/// tower, the features merged at the `<|image_pad|>` tokens, our M-RoPE positions and our language
/// model, against mlx-vlm's forward (`get_input_embeddings` + language model) on the same ids and
/// pixel values, bf16 and 4-bit conversions, native and float32.
fn image_prompt_matches(arch: &str) {
    use vlm_convert::verify::image::RgbImage;
    use vlm_convert::verify::{QwenImageProcessor, TextModel};
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    let proc = QwenImageProcessor::from_dir(&fixture(arch)).unwrap();
    let images = [RgbImage::synthetic(), pattern(30, 70, 4)];
    let (pv, grids) = proc.preprocess_all(&images).unwrap();
    let cfg = read_json(&fixture(arch).join("config.json"));
    let id = |k: &str| cfg[k].as_i64().unwrap() as i32;
    let (start, image, end) = (
        id("vision_start_token_id"),
        id("image_token_id"),
        id("vision_end_token_id"),
    );
    let mut ids = vec![5, 17, 42];
    for g in &grids {
        ids.push(start);
        ids.extend(std::iter::repeat_n(image, proc.image_tokens(*g)));
        ids.push(end);
        ids.extend([61, 7]);
    }
    ids.extend([100, 33, 8]);
    let inputs = t.path().join("inputs.safetensors");
    let k = pv.len() / grids.iter().map(|g| g[0] * g[1] * g[2]).sum::<usize>();
    write_prompt_inputs(&inputs, &ids, &pv, &grids, k);

    for (conversion, flags) in [
        ("bf16", &[][..]),
        ("q4", &["-q", "--q-bits", "4", "--q-group-size", "64"][..]),
    ] {
        let dir = t.path().join(conversion);
        convert_fixture(arch, &dir, flags);
        for (precision, upcast, tol) in [
            (Precision::Native, false, NATIVE_TOL),
            (Precision::Float32, true, F32_TOL),
        ] {
            let out = t.path().join(format!("{conversion}-{upcast}.safetensors"));
            let mut cmd = std::process::Command::new(python());
            cmd.arg(root().join("tests/py/qwen_image_forward.py"))
                .args(["--model", s(&dir), "--inputs", s(&inputs), "--out", s(&out)]);
            if upcast {
                cmd.arg("--upcast");
            }
            let res = cmd.output().unwrap();
            assert!(
                res.status.success(),
                "qwen_image_forward.py: {}",
                String::from_utf8_lossy(&res.stderr)
            );
            let want = SafetensorsFile::open(&out).unwrap();
            let vision = QwenVision::load(&dir, precision).unwrap();
            let text = TextModel::load(&dir, precision).unwrap();
            let ours = vision.prompt_logits(&text, &ids, &pv, &grids).unwrap();
            let theirs = read_f32(&want, "logits");
            let d = max_abs_diff(&ours, &theirs);
            // The image must matter: the same ids with the image tokens' text embeddings differ.
            let text_only = text
                .logits_at(
                    &ids,
                    Some(
                        &vlm_convert::verify::mrope_image_positions(
                            &ids,
                            vision.config().image_tokens.unwrap(),
                            &grids,
                            2,
                        )
                        .unwrap(),
                    ),
                )
                .unwrap();
            let image_effect = max_abs_diff(&text_only, &theirs);
            let run = if upcast { "float32" } else { "native" };
            eprintln!(
                "qwen-vision image-prompt {arch:11} {conversion:5} {run:8} {} tokens, grids {grids:?}: \
                 max|logits diff| {d:.3e} (tol {tol:.0e}; without the image features {image_effect:.3e})",
                ids.len()
            );
            assert!(
                d <= tol,
                "{arch} {conversion} {run}: logits differ by {d:e}"
            );
            assert!(
                image_effect > 100.0 * tol,
                "{arch}: the image changed nothing"
            );
        }
    }
}

#[test]
fn qwen2_vl_image_prompt() {
    image_prompt_matches("qwen2_vl");
}

#[test]
fn qwen2_5_vl_image_prompt() {
    image_prompt_matches("qwen2_5_vl");
}

/// Qwen3-VL adds its deepstack features to the image tokens' hidden states after the first decoder
/// layers ([`vlm_convert::verify::Deepstack`]).
#[test]
fn qwen3_vl_image_prompt() {
    image_prompt_matches("qwen3_vl");
}

/// The image of fixtures/qwen_vision_reference.py `pattern`: an integer formula over (x, y).
fn formula_image(w: usize, h: usize) -> vlm_convert::verify::image::RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.push(((x * 7 + y * 13) % 256) as u8);
            data.push(((x * y + 3 * x) % 256) as u8);
            data.push((((x ^ y) * 5) % 256) as u8);
        }
    }
    vlm_convert::verify::image::RgbImage::new(w, h, data).unwrap()
}

/// Our preprocessing and vision tower against transformers' own (float32, torch; golden made by
/// fixtures/qwen_vision_reference.py) on the bf16 conversion: an independent check of the semantics
/// mlx-vlm and we share. Float32 must agree closely; the bf16 forward is reported.
#[test]
fn vision_features_match_transformers() {
    use vlm_convert::verify::QwenImageProcessor;
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    for arch in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] {
        let golden = SafetensorsFile::open(
            &root().join(format!("fixtures/golden/qwen_vision/{arch}.safetensors")),
        )
        .unwrap();
        let dir = t.path().join(arch);
        convert_fixture(arch, &dir, &[]);
        for (precision, tol) in [(Precision::Float32, 1e-4f32), (Precision::Native, 0.25)] {
            let model = QwenVision::load(&dir, precision).unwrap();
            for (i, (w, h)) in [(60usize, 44usize), (180, 120)].into_iter().enumerate() {
                let mut proc = QwenImageProcessor::from_dir(&dir).unwrap();
                let max = read_grid_i32(&golden, &format!("image{i}.max_pixels"))[0];
                if max > 0 {
                    proc.max_pixels = max as usize;
                }
                let px = proc.preprocess(&formula_image(w, h)).unwrap();
                let grid = read_grid(&golden, &format!("image{i}.grid_thw"));
                assert_eq!(vec![px.grid_thw], grid, "{arch} image {i}");
                let ours = model.features(&px.data, &grid).unwrap();
                let want = read_f32(&golden, &format!("image{i}.features"));
                let mut d = max_abs_diff(&ours.data, &want);
                for (j, ds) in ours.deepstack.iter().enumerate() {
                    let wd = read_f32(&golden, &format!("image{i}.deepstack.{j}"));
                    d = d.max(max_abs_diff(ds, &wd));
                }
                let run = match precision {
                    Precision::Float32 => "float32",
                    Precision::Native => "bf16",
                };
                eprintln!(
                    "qwen-vision vs transformers f32 {arch:11} {run:7} image{i} grid {grid:?} max|diff| {d:.3e} (tol {tol:.0e})"
                );
                assert!(d <= tol, "{arch} {run} image {i}: {d:e} from transformers");
            }
        }
    }
}

fn read_grid_i32(file: &SafetensorsFile, name: &str) -> Vec<i32> {
    let info = file.tensors.get(name).expect(name);
    file.data(info)
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A resize that grows the width and shrinks the height (56x40 -> 64x32 here, which smart_resize
/// picks for a 56x40 image): Pillow 13 runs the vertical pass first in that case (measured:
/// horizontal-first differed by up to 12 levels on about 1200 of 6144 values), and so does
/// `verify::image::resize`.
#[test]
fn mixed_direction_resize_matches_transformers() {
    use vlm_convert::verify::QwenImageProcessor;
    let t = tempfile::tempdir().unwrap();
    let img = formula_image(56, 40);
    let f = t.path().join("img.png");
    img.save_png(&f).unwrap();
    let out = t.path().join("want.safetensors");
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/qwen_processor.py"))
        .args(["--model", s(&fixture("qwen2_vl")), "--out", s(&out), s(&f)])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let want = SafetensorsFile::open(&out).unwrap();
    let ours = QwenImageProcessor::from_dir(&fixture("qwen2_vl"))
        .unwrap()
        .preprocess(&img)
        .unwrap();
    let d = max_abs_diff(&ours.data, &read_f32(&want, "image0.pixel_values"));
    assert!(d <= 1e-6, "pixel values differ by {d:e}");
}
