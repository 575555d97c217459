//! Throughput of the conversion's CPU kernels, in isolation from I/O: the affine quantizer (per
//! instruction-set level, 1 thread and 2), the non-finite scan and sha256.
//!
//!     cargo bench --bench throughput            # or: cargo run --release --bench throughput
//!
//! Input: 64 MiB of seeded random bf16 rows of 1536 (Qwen2-VL-2B's hidden size), the data of a real
//! conversion in miniature. Prints GB/s of input per kernel (median of 5). The whole-conversion
//! benchmark, against mlx-vlm and the `cp -r` floor, is `scripts/bench`.

use std::time::Instant;

use vlm_convert::dtype::{first_nonfinite, DType};
use vlm_convert::quant::isa::Isa;
use vlm_convert::quant::{quantize_isa, quantized_sizes, QuantSpec};

const K: usize = 1536;
/// About 64 MB of whole rows; `cargo test --all-targets` runs this file too (without `--bench`), and
/// then a few rows only check that it works.
fn rows() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        21_000
    } else {
        64
    }
}

fn data() -> Vec<u8> {
    // SplitMix64 -> a normal-ish bf16 (sum of uniforms), like trained weights.
    let mut s = 0x5EED_u64;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let bytes = rows() * K * 2;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        let r = next();
        let u = |x: u64| (x & 0xFFFF) as f32 / 65536.0 - 0.5;
        let v = (u(r) + u(r >> 16) + u(r >> 32) + u(r >> 48)) * 0.04;
        out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
    out
}

fn median_gbps(bytes: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults on the outputs)
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    bytes as f64 / t[2] / 1e9
}

fn main() {
    let src = data();
    let rows = src.len() / (K * 2);
    println!("input: {:.1} MB bf16, rows of {K}", src.len() as f64 / 1e6);
    for bits in [4u32, 8] {
        let spec = QuantSpec::new(bits, 64).expect("valid spec");
        let (wb, sb, bb) = quantized_sizes(rows, K, spec, DType::BF16);
        let (mut w, mut s, mut b) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
        for isa in Isa::supported() {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let g = pool.install(|| {
                    median_gbps(src.len(), || {
                        quantize_isa(isa, &src, DType::BF16, K, spec, &mut w, &mut s, &mut b)
                            .expect("quantize");
                    })
                });
                println!("quantize {bits}-bit g64  {isa:?}  {threads} thread(s): {g:6.2} GB/s");
            }
        }
    }
    let g = median_gbps(src.len(), || {
        assert!(first_nonfinite(&src, DType::BF16).is_none());
    });
    println!("non-finite scan (bf16):            {g:6.2} GB/s");
    let g = median_gbps(src.len(), || {
        use sha2::Digest;
        std::hint::black_box(sha2::Sha256::digest(&src));
    });
    println!("sha256 (sha2):                     {g:6.2} GB/s");
}
