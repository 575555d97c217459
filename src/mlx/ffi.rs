//! Raw declarations of the C shim (`shim/mlx_shim.h`); the safe layer is the parent module.
//! Every function returns 0 on success, 1 on failure with the message in `mlxs_last_error()`.

use std::ffi::{c_char, c_int, c_void};

/// Opaque handle to a heap-allocated `mlx::core::array`.
#[repr(C)]
pub struct MlxsArray {
    _private: [u8; 0],
}

pub const MLXS_EXP: c_int = 0;
pub const MLXS_LOG: c_int = 1;
pub const MLXS_SQRT: c_int = 2;
pub const MLXS_RSQRT: c_int = 3;
pub const MLXS_TANH: c_int = 4;
pub const MLXS_ERF: c_int = 5;
pub const MLXS_SIGMOID: c_int = 6;
pub const MLXS_ABS: c_int = 7;
pub const MLXS_NEGATIVE: c_int = 8;
pub const MLXS_SQUARE: c_int = 9;

pub const MLXS_ADD: c_int = 0;
pub const MLXS_SUBTRACT: c_int = 1;
pub const MLXS_MULTIPLY: c_int = 2;
pub const MLXS_DIVIDE: c_int = 3;
pub const MLXS_MAXIMUM: c_int = 4;
pub const MLXS_MINIMUM: c_int = 5;
pub const MLXS_POWER: c_int = 6;
pub const MLXS_MATMUL: c_int = 7;

pub const MLXS_SUM: c_int = 0;
pub const MLXS_MEAN: c_int = 1;
pub const MLXS_MAX: c_int = 2;
pub const MLXS_MIN: c_int = 3;
pub const MLXS_LOGSUMEXP: c_int = 4;
pub const MLXS_ARGMAX: c_int = 5;

pub const MLXS_MASK_NONE: c_int = 0;
pub const MLXS_MASK_CAUSAL: c_int = 1;
pub const MLXS_MASK_ARRAY: c_int = 2;

pub type Out = *mut *mut MlxsArray;
pub type In = *const MlxsArray;

extern "C" {
    pub fn mlxs_last_error() -> *const c_char;

    pub fn mlxs_version(out: *mut *const c_char) -> c_int;
    pub fn mlxs_set_default_device_cpu() -> c_int;
    pub fn mlxs_active_memory(out: *mut usize) -> c_int;

    pub fn mlxs_array_free(a: *mut MlxsArray);
    pub fn mlxs_array_clone(a: In, out: Out) -> c_int;

    pub fn mlxs_array_from_bytes(
        data: *const c_void,
        nbytes: usize,
        shape: *const i32,
        ndim: usize,
        dtype: c_int,
        out: Out,
    ) -> c_int;
    pub fn mlxs_array_scalar(value: f32, dtype: c_int, out: Out) -> c_int;
    pub fn mlxs_arange(start: f64, stop: f64, step: f64, dtype: c_int, out: Out) -> c_int;

    pub fn mlxs_array_dtype(a: In, out: *mut c_int) -> c_int;
    pub fn mlxs_array_ndim(a: In, out: *mut usize) -> c_int;
    pub fn mlxs_array_shape(a: In, out: *mut i32, cap: usize) -> c_int;
    pub fn mlxs_array_size(a: In, out: *mut usize) -> c_int;

    pub fn mlxs_eval(arrays: *const In, n: usize) -> c_int;
    pub fn mlxs_array_read(a: In, dst: *mut c_void, nbytes: usize) -> c_int;

    pub fn mlxs_astype(a: In, dtype: c_int, out: Out) -> c_int;
    pub fn mlxs_reshape(a: In, shape: *const i32, ndim: usize, out: Out) -> c_int;
    pub fn mlxs_transpose(a: In, axes: *const i32, n: usize, out: Out) -> c_int;
    pub fn mlxs_slice(
        a: In,
        start: *const i32,
        stop: *const i32,
        strides: *const i32,
        n: usize,
        out: Out,
    ) -> c_int;
    pub fn mlxs_concatenate(arrays: *const In, n: usize, axis: c_int, out: Out) -> c_int;
    pub fn mlxs_take(a: In, indices: In, axis: c_int, out: Out) -> c_int;
    pub fn mlxs_conv2d(
        input: In,
        weight: In,
        stride_h: c_int,
        stride_w: c_int,
        pad_h: c_int,
        pad_w: c_int,
        out: Out,
    ) -> c_int;

    pub fn mlxs_unary(op: c_int, a: In, out: Out) -> c_int;
    pub fn mlxs_binary(op: c_int, a: In, b: In, out: Out) -> c_int;
    pub fn mlxs_where(cond: In, x: In, y: In, out: Out) -> c_int;
    pub fn mlxs_clip(a: In, lo: In, hi: In, out: Out) -> c_int;
    pub fn mlxs_reduce(
        op: c_int,
        a: In,
        axes: *const i32,
        n: usize,
        keepdims: c_int,
        out: Out,
    ) -> c_int;
    pub fn mlxs_softmax(a: In, axes: *const i32, n: usize, precise: c_int, out: Out) -> c_int;
    pub fn mlxs_log_softmax(a: In, axes: *const i32, n: usize, out: Out) -> c_int;

    pub fn mlxs_quantize(
        w: In,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        out_w: Out,
        out_scales: Out,
        out_biases: Out,
    ) -> c_int;
    pub fn mlxs_dequantize(
        w: In,
        scales: In,
        biases: In,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        dtype: c_int,
        out: Out,
    ) -> c_int;
    pub fn mlxs_quantized_matmul(
        x: In,
        w: In,
        scales: In,
        biases: In,
        transpose: c_int,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        out: Out,
    ) -> c_int;

    pub fn mlxs_rms_norm(x: In, weight: In, eps: f32, out: Out) -> c_int;
    pub fn mlxs_layer_norm(x: In, weight: In, bias: In, eps: f32, out: Out) -> c_int;
    pub fn mlxs_rope(
        x: In,
        dims: c_int,
        traditional: c_int,
        has_base: c_int,
        base: f32,
        scale: f32,
        offset: c_int,
        freqs: In,
        out: Out,
    ) -> c_int;
    pub fn mlxs_sdpa(
        q: In,
        k: In,
        v: In,
        scale: f32,
        mask_kind: c_int,
        mask: In,
        out: Out,
    ) -> c_int;
}
