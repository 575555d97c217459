//! A safe binding to MLX (`mlx::core` 0.32.4) for the verify stage: enough of MLX to run a transformer
//! forward pass on a converted model and to check quantization, with results byte-identical to Python
//! MLX on the CPU.
//!
//! It goes through a small C++ shim (`shim/mlx_shim.cpp`, built by `build_support/mlx.rs` against the
//! libmlx that pip installs) rather than mlx-rs, which does not build on Linux (SPEC.md section 6). Keeping
//! every MLX call behind this module means switching to mlx-rs later stays local.
//!
//! - Call [`init`] once before anything else: it selects the CPU on Linux and checks that the libmlx
//!   loaded at run time is the pinned version (the C++ ABI changes between patch releases).
//! - Every operation returns `Result<Array, MlxError>`: MLX reports bad arguments by throwing, and the
//!   shim turns every C++ exception into an [`MlxError::Mlx`] carrying MLX's own message. Nothing here
//!   panics or aborts.
//! - MLX is lazy: operations build a graph; [`Array::eval`] or the readers ([`Array::to_vec`],
//!   [`Array::to_bytes`]) compute it. Errors found only while computing surface there.
//! - Threads: [`Array`] is neither `Send` nor `Sync` (MLX 0.32 streams are per thread); independent
//!   arrays on different threads work.
//!
//! Sizes (shapes given to constructors, [`Array::shape`]) are `usize`; axes and the arguments MLX itself
//! takes as signed (`reshape` with `-1`, slice bounds, negative axes) are `i32`, as in `mlx::core`.

mod ffi;

use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::dtype::DType;

/// The one MLX version this binding is built and tested against.
pub const PINNED_VERSION: &str = "0.32.4";

/// The MLX install prefix the build linked (`include/`, `lib/libmlx`), for diagnostics.
pub const BUILD_PREFIX: &str = env!("VLM_CONVERT_MLX_PREFIX");

/// The MLX version read from that prefix's headers at build time.
pub const BUILD_VERSION: &str = env!("VLM_CONVERT_MLX_VERSION");

/// Errors from the binding. `Mlx` carries the message of the C++ exception MLX threw.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MlxError {
    #[error("MLX {op}: {message}")]
    Mlx { op: &'static str, message: String },
    #[error("{len} elements do not fill shape {shape:?}")]
    ShapeMismatch { len: usize, shape: Vec<usize> },
    #[error("array has dtype {found}, expected {expected} (use astype first)")]
    DtypeMismatch { expected: Dtype, found: Dtype },
    #[error(
        "libmlx {found} is loaded but vlm-convert was built for MLX {expected} (the C++ ABI changes \
         between patch releases); rebuild against MLX {expected} (build prefix: {prefix})"
    )]
    VersionMismatch {
        found: String,
        expected: &'static str,
        prefix: &'static str,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T, E = MlxError> = std::result::Result<T, E>;

/// MLX element types (`mlx::core::Dtype`), with the shim's stable codes as discriminants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Dtype {
    Bool = 0,
    U8 = 1,
    U16 = 2,
    U32 = 3,
    U64 = 4,
    I8 = 5,
    I16 = 6,
    I32 = 7,
    I64 = 8,
    F16 = 9,
    F32 = 10,
    F64 = 11,
    BF16 = 12,
    C64 = 13,
}

impl Dtype {
    const ALL: [Dtype; 14] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::U16,
        Dtype::U32,
        Dtype::U64,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::F16,
        Dtype::F32,
        Dtype::F64,
        Dtype::BF16,
        Dtype::C64,
    ];

    fn from_code(code: c_int) -> Result<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| *d as c_int == code)
            .ok_or_else(|| MlxError::InvalidArgument(format!("unknown MLX dtype code {code}")))
    }

    /// A floating-point type (F16, BF16, F32, F64).
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 | Dtype::C64 => 8,
        }
    }

    /// The safetensors dtype with the same bytes, if there is one (`C64` has none).
    pub fn to_safetensors(self) -> Option<DType> {
        Some(match self {
            Dtype::Bool => DType::Bool,
            Dtype::U8 => DType::U8,
            Dtype::U16 => DType::U16,
            Dtype::U32 => DType::U32,
            Dtype::U64 => DType::U64,
            Dtype::I8 => DType::I8,
            Dtype::I16 => DType::I16,
            Dtype::I32 => DType::I32,
            Dtype::I64 => DType::I64,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::BF16 => DType::BF16,
            Dtype::C64 => return None,
        })
    }

    /// The MLX dtype for a safetensors dtype (`None` for the FP8 types, which MLX stores as `U8`).
    pub fn from_safetensors(d: DType) -> Option<Dtype> {
        Some(match d {
            DType::Bool => Dtype::Bool,
            DType::U8 => Dtype::U8,
            DType::U16 => Dtype::U16,
            DType::U32 => Dtype::U32,
            DType::U64 => Dtype::U64,
            DType::I8 => Dtype::I8,
            DType::I16 => Dtype::I16,
            DType::I32 => Dtype::I32,
            DType::I64 => Dtype::I64,
            DType::F16 => Dtype::F16,
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
            DType::BF16 => Dtype::BF16,
            DType::F8E4M3 | DType::F8E5M2 => return None,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Host element types that can be copied in and out of arrays byte for byte. Sealed: only plain types
/// without padding, whose every bit pattern is valid, implement it (that is what makes the byte views in
/// [`Array::from_slice`] and [`Array::to_vec`] sound).
pub trait Element: sealed::Sealed + Copy + Default + 'static {
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;
        }
    )*};
}
element!(f32 => F32, bf16 => BF16, f16 => F16, u32 => U32, i32 => I32, u8 => U8, i64 => I64);

/// Takes the message the shim stored for this thread's last failure.
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to a NUL-terminated thread-local string, valid until the next
    // failing call on this thread; it is copied immediately.
    unsafe {
        let p = ffi::mlxs_last_error();
        if p.is_null() {
            return "unknown error".into();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn check(rc: c_int, op: &'static str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(MlxError::Mlx {
            op,
            message: last_error(),
        })
    }
}

/// Runs a shim call that produces one array through an out-pointer.
fn make(op: &'static str, f: impl FnOnce(ffi::Out) -> c_int) -> Result<Array> {
    let mut raw: *mut ffi::MlxsArray = ptr::null_mut();
    check(f(&mut raw), op)?;
    Array::from_raw(raw, op)
}

fn opt_ptr(a: Option<&Array>) -> ffi::In {
    a.map_or(ptr::null(), Array::as_ptr)
}

fn to_i32(values: &[usize], what: &str) -> Result<Vec<i32>> {
    values
        .iter()
        .map(|&v| {
            i32::try_from(v).map_err(|_| {
                MlxError::InvalidArgument(format!("{what} {v} does not fit MLX's 32-bit sizes"))
            })
        })
        .collect()
}

/// An MLX array: one reference to a node of MLX's lazy, reference-counted graph.
///
/// Dropping it releases the reference (the shim's `delete`). It is neither `Send` nor `Sync`: MLX 0.32
/// keeps default streams per thread and evaluation mutates nodes shared between arrays without locks, so
/// an array built on one thread must be evaluated and dropped on that thread. Independent arrays on
/// different threads are fine (MLX supports that since 0.31.2). Cloning is explicit ([`Array::try_clone`])
/// because even that can fail (allocation) and this module never panics.
///
/// ```compile_fail,E0277
/// fn needs_send<T: Send>() {}
/// needs_send::<vlm_convert::mlx::Array>();
/// ```
pub struct Array {
    raw: NonNull<ffi::MlxsArray>,
}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim, is owned by this value and is freed exactly once.
        unsafe { ffi::mlxs_array_free(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.dtype(), self.shape()) {
            (Ok(d), Ok(s)) => write!(f, "Array({d}, {s:?})"),
            _ => write!(f, "Array(?)"),
        }
    }
}

impl Array {
    fn from_raw(raw: *mut ffi::MlxsArray, op: &'static str) -> Result<Array> {
        NonNull::new(raw)
            .map(|raw| Array { raw })
            .ok_or(MlxError::Mlx {
                op,
                message: "the shim returned no array".into(),
            })
    }

    fn as_ptr(&self) -> ffi::In {
        self.raw.as_ptr()
    }

    /// Copies `bytes` (row-major, `dtype` elements) into a new array of `shape`.
    pub fn from_bytes(bytes: &[u8], shape: &[usize], dtype: Dtype) -> Result<Array> {
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| MlxError::InvalidArgument(format!("shape {shape:?} overflows")))?;
        if count.checked_mul(dtype.size()) != Some(bytes.len()) {
            return Err(MlxError::ShapeMismatch {
                len: bytes.len() / dtype.size(),
                shape: shape.to_vec(),
            });
        }
        let dims = to_i32(shape, "dimension")?;
        make("array", |out| unsafe {
            // SAFETY: pointers and lengths describe live slices; the shim copies the data.
            ffi::mlxs_array_from_bytes(
                bytes.as_ptr().cast::<c_void>(),
                bytes.len(),
                dims.as_ptr(),
                dims.len(),
                dtype as c_int,
                out,
            )
        })
    }

    /// Copies `data` into a new array of `shape` (its dtype follows `T`: f32, bf16, f16, u32, i32, u8, i64).
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Array> {
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if count != Some(data.len()) {
            return Err(MlxError::ShapeMismatch {
                len: data.len(),
                shape: shape.to_vec(),
            });
        }
        // SAFETY: `Element` types are plain data without padding, so their memory is initialized bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        Array::from_bytes(bytes, shape, T::DTYPE)
    }

    /// A 0-d array holding `value` converted to `dtype`. Use the operand's dtype for constants in
    /// formulas: that is what Python MLX does with a Python float (`x / 2` stays bf16 for a bf16 `x`).
    pub fn scalar(value: f32, dtype: Dtype) -> Result<Array> {
        make("array", |out| unsafe {
            ffi::mlxs_array_scalar(value, dtype as c_int, out)
        })
    }

    /// `[start, start + step, ...)` below `stop`, as `mx.arange`.
    pub fn arange(start: f64, stop: f64, step: f64, dtype: Dtype) -> Result<Array> {
        make("arange", |out| unsafe {
            ffi::mlxs_arange(start, stop, step, dtype as c_int, out)
        })
    }

    /// Another reference to the same graph node (cheap; no data is copied).
    pub fn try_clone(&self) -> Result<Array> {
        make("clone", |out| unsafe {
            ffi::mlxs_array_clone(self.as_ptr(), out)
        })
    }

    pub fn dtype(&self) -> Result<Dtype> {
        let mut code: c_int = -1;
        check(
            unsafe { ffi::mlxs_array_dtype(self.as_ptr(), &mut code) },
            "dtype",
        )?;
        Dtype::from_code(code)
    }

    pub fn ndim(&self) -> Result<usize> {
        let mut n = 0usize;
        check(
            unsafe { ffi::mlxs_array_ndim(self.as_ptr(), &mut n) },
            "ndim",
        )?;
        Ok(n)
    }

    pub fn shape(&self) -> Result<Vec<usize>> {
        let mut dims = vec![0i32; self.ndim()?];
        check(
            unsafe { ffi::mlxs_array_shape(self.as_ptr(), dims.as_mut_ptr(), dims.len()) },
            "shape",
        )?;
        // MLX dimensions are never negative.
        Ok(dims.into_iter().map(|d| d.max(0) as usize).collect())
    }

    /// Number of elements.
    pub fn size(&self) -> Result<usize> {
        let mut n = 0usize;
        check(
            unsafe { ffi::mlxs_array_size(self.as_ptr(), &mut n) },
            "size",
        )?;
        Ok(n)
    }

    /// Computes the array (and whatever of the graph it needs).
    pub fn eval(&self) -> Result<()> {
        eval(&[self])
    }

    /// Evaluates and copies the elements out in row-major order, as raw bytes of [`Array::dtype`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.size()? * self.dtype()?.size();
        let mut out = vec![0u8; n];
        check(
            unsafe { ffi::mlxs_array_read(self.as_ptr(), out.as_mut_ptr().cast::<c_void>(), n) },
            "eval",
        )?;
        Ok(out)
    }

    /// Evaluates and copies the elements out. The dtype must be `T`'s (no silent conversion: call
    /// [`Array::astype`] first).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let found = self.dtype()?;
        if found != T::DTYPE {
            return Err(MlxError::DtypeMismatch {
                expected: T::DTYPE,
                found,
            });
        }
        let mut out = vec![T::default(); self.size()?];
        let nbytes = std::mem::size_of_val(out.as_slice());
        // SAFETY: `out` is a live buffer of exactly `nbytes`, and any bytes are a valid `T` (`Element`).
        check(
            unsafe {
                ffi::mlxs_array_read(self.as_ptr(), out.as_mut_ptr().cast::<c_void>(), nbytes)
            },
            "eval",
        )?;
        Ok(out)
    }

    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_vec()
    }

    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        self.to_vec()
    }

    pub fn to_vec_i32(&self) -> Result<Vec<i32>> {
        self.to_vec()
    }

    pub fn to_vec_bf16(&self) -> Result<Vec<bf16>> {
        self.to_vec()
    }

    pub fn to_vec_f16(&self) -> Result<Vec<f16>> {
        self.to_vec()
    }

    // ---- shape and type ----

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        make("astype", |out| unsafe {
            ffi::mlxs_astype(self.as_ptr(), dtype as c_int, out)
        })
    }

    /// New shape with the same elements; one dimension may be `-1`.
    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        make("reshape", |out| unsafe {
            ffi::mlxs_reshape(self.as_ptr(), shape.as_ptr(), shape.len(), out)
        })
    }

    /// Permutes the axes; an empty `axes` reverses them all.
    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        make("transpose", |out| unsafe {
            ffi::mlxs_transpose(self.as_ptr(), axes.as_ptr(), axes.len(), out)
        })
    }

    /// `a[start[0]:stop[0]:strides[0], ...]`, one entry per axis.
    pub fn slice(&self, start: &[i32], stop: &[i32], strides: &[i32]) -> Result<Array> {
        if start.len() != stop.len() || start.len() != strides.len() {
            return Err(MlxError::InvalidArgument(format!(
                "slice: start, stop and strides have lengths {}, {}, {}",
                start.len(),
                stop.len(),
                strides.len()
            )));
        }
        make("slice", |out| unsafe {
            ffi::mlxs_slice(
                self.as_ptr(),
                start.as_ptr(),
                stop.as_ptr(),
                strides.as_ptr(),
                start.len(),
                out,
            )
        })
    }

    /// Gathers along `axis` at integer `indices` (`mx.take`; an embedding lookup is
    /// `table.take(&ids, 0)`).
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        make("take", |out| unsafe {
            ffi::mlxs_take(self.as_ptr(), indices.as_ptr(), axis, out)
        })
    }

    /// `mx.conv2d` (channels last): `self` is `[N, H, W, C_in]`, `weight` `[C_out, kH, kW, C_in]`
    /// (MLX's layout, what converted checkpoints store); `stride` and `padding` are (height, width).
    pub fn conv2d(&self, weight: &Array, stride: (i32, i32), padding: (i32, i32)) -> Result<Array> {
        make("conv2d", |out| unsafe {
            ffi::mlxs_conv2d(
                self.as_ptr(),
                weight.as_ptr(),
                stride.0,
                stride.1,
                padding.0,
                padding.1,
                out,
            )
        })
    }

    // ---- element-wise ----

    fn unary(&self, op: c_int, name: &'static str) -> Result<Array> {
        make(name, |out| unsafe {
            ffi::mlxs_unary(op, self.as_ptr(), out)
        })
    }

    fn binary(&self, op: c_int, other: &Array, name: &'static str) -> Result<Array> {
        make(name, |out| unsafe {
            ffi::mlxs_binary(op, self.as_ptr(), other.as_ptr(), out)
        })
    }

    pub fn exp(&self) -> Result<Array> {
        self.unary(ffi::MLXS_EXP, "exp")
    }
    pub fn log(&self) -> Result<Array> {
        self.unary(ffi::MLXS_LOG, "log")
    }
    pub fn sqrt(&self) -> Result<Array> {
        self.unary(ffi::MLXS_SQRT, "sqrt")
    }
    pub fn rsqrt(&self) -> Result<Array> {
        self.unary(ffi::MLXS_RSQRT, "rsqrt")
    }
    pub fn tanh(&self) -> Result<Array> {
        self.unary(ffi::MLXS_TANH, "tanh")
    }
    pub fn erf(&self) -> Result<Array> {
        self.unary(ffi::MLXS_ERF, "erf")
    }
    pub fn sigmoid(&self) -> Result<Array> {
        self.unary(ffi::MLXS_SIGMOID, "sigmoid")
    }
    pub fn abs(&self) -> Result<Array> {
        self.unary(ffi::MLXS_ABS, "abs")
    }
    pub fn negative(&self) -> Result<Array> {
        self.unary(ffi::MLXS_NEGATIVE, "negative")
    }
    pub fn square(&self) -> Result<Array> {
        self.unary(ffi::MLXS_SQUARE, "square")
    }

    /// Element-wise with broadcasting and MLX's type promotion (as are the other binary ops).
    pub fn add(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_ADD, other, "add")
    }
    pub fn subtract(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_SUBTRACT, other, "subtract")
    }
    pub fn multiply(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_MULTIPLY, other, "multiply")
    }
    pub fn divide(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_DIVIDE, other, "divide")
    }
    pub fn maximum(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_MAXIMUM, other, "maximum")
    }
    pub fn minimum(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_MINIMUM, other, "minimum")
    }
    pub fn power(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_POWER, other, "power")
    }
    /// Matrix product over the last two axes, batched over the rest (`a @ b`).
    pub fn matmul(&self, other: &Array) -> Result<Array> {
        self.binary(ffi::MLXS_MATMUL, other, "matmul")
    }

    /// Limits to `[lo, hi]`; either bound may be absent.
    pub fn clip(&self, lo: Option<&Array>, hi: Option<&Array>) -> Result<Array> {
        make("clip", |out| unsafe {
            ffi::mlxs_clip(self.as_ptr(), opt_ptr(lo), opt_ptr(hi), out)
        })
    }

    /// A scalar of this array's dtype (see [`Array::scalar`]).
    fn like(&self, value: f32) -> Result<Array> {
        Array::scalar(value, self.dtype()?)
    }

    /// `x * sigmoid(x)`, the graph `mlx.nn.silu` builds.
    pub fn silu(&self) -> Result<Array> {
        self.multiply(&self.sigmoid()?)
    }

    /// Exact GELU, `x * (1 + erf(x / sqrt(2))) / 2`, the graph `mlx.nn.gelu` builds.
    pub fn gelu(&self) -> Result<Array> {
        let t = self
            .divide(&self.like(std::f64::consts::SQRT_2 as f32)?)?
            .erf()?;
        let t = self.like(1.0)?.add(&t)?;
        self.multiply(&t)?.divide(&self.like(2.0)?)
    }

    /// Tanh GELU, `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`, as `mlx.nn.gelu_approx`.
    pub fn gelu_approx(&self) -> Result<Array> {
        let half_x = self.like(0.5)?.multiply(self)?;
        let cube = self.power(&self.like(3.0)?)?;
        let inner = self.add(&self.like(0.044715)?.multiply(&cube)?)?;
        let c = (2.0 / std::f64::consts::PI).sqrt() as f32;
        let t = self.like(c)?.multiply(&inner)?.tanh()?;
        half_x.multiply(&self.like(1.0)?.add(&t)?)
    }

    // ---- reductions ----

    fn reduce(&self, op: c_int, axes: &[i32], keepdims: bool, name: &'static str) -> Result<Array> {
        make(name, |out| unsafe {
            ffi::mlxs_reduce(
                op,
                self.as_ptr(),
                axes.as_ptr(),
                axes.len(),
                keepdims as c_int,
                out,
            )
        })
    }

    /// Sum over `axes` (all axes when empty), as are `mean`, `max`, `min` and `logsumexp`.
    pub fn sum(&self, axes: &[i32], keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_SUM, axes, keepdims, "sum")
    }
    pub fn mean(&self, axes: &[i32], keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_MEAN, axes, keepdims, "mean")
    }
    pub fn max(&self, axes: &[i32], keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_MAX, axes, keepdims, "max")
    }
    pub fn min(&self, axes: &[i32], keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_MIN, axes, keepdims, "min")
    }
    pub fn logsumexp(&self, axes: &[i32], keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_LOGSUMEXP, axes, keepdims, "logsumexp")
    }
    /// Index of the maximum along `axis` (U32).
    pub fn argmax(&self, axis: i32, keepdims: bool) -> Result<Array> {
        self.reduce(ffi::MLXS_ARGMAX, &[axis], keepdims, "argmax")
    }

    /// Softmax over `axes` (`precise` computes in f32 for low-precision inputs, as `mx.softmax`).
    pub fn softmax(&self, axes: &[i32], precise: bool) -> Result<Array> {
        make("softmax", |out| unsafe {
            ffi::mlxs_softmax(
                self.as_ptr(),
                axes.as_ptr(),
                axes.len(),
                precise as c_int,
                out,
            )
        })
    }

    /// `x - max(x) - logsumexp(x - max(x))` over `axes` (the last axis when empty), as
    /// `mlx.nn.log_softmax`.
    pub fn log_softmax(&self, axes: &[i32]) -> Result<Array> {
        make("log_softmax", |out| unsafe {
            ffi::mlxs_log_softmax(self.as_ptr(), axes.as_ptr(), axes.len(), out)
        })
    }
}

/// Evaluates several arrays in one pass (shared parts of their graphs are computed once).
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let ptrs: Vec<ffi::In> = arrays.iter().map(|a| a.as_ptr()).collect();
    check(unsafe { ffi::mlxs_eval(ptrs.as_ptr(), ptrs.len()) }, "eval")
}

/// Joins arrays along `axis`.
pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let ptrs: Vec<ffi::In> = arrays.iter().map(|a| a.as_ptr()).collect();
    make("concatenate", |out| unsafe {
        ffi::mlxs_concatenate(ptrs.as_ptr(), ptrs.len(), axis, out)
    })
}

/// `cond ? x : y` element-wise, with broadcasting (`mx.where`).
#[doc(alias = "where")]
pub fn where_(cond: &Array, x: &Array, y: &Array) -> Result<Array> {
    make("where", |out| unsafe {
        ffi::mlxs_where(cond.as_ptr(), x.as_ptr(), y.as_ptr(), out)
    })
}

// ---- quantization ----

/// MLX quantization modes (`mode=` in `mx.quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    Affine,
    Mxfp4,
    Nvfp4,
    Mxfp8,
}

impl QuantMode {
    fn c_name(self) -> &'static CStr {
        match self {
            QuantMode::Affine => c"affine",
            QuantMode::Mxfp4 => c"mxfp4",
            QuantMode::Nvfp4 => c"nvfp4",
            QuantMode::Mxfp8 => c"mxfp8",
        }
    }
}

/// How a weight is quantized: group size, bits and mode, as passed to `mx.quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub group_size: i32,
    pub bits: i32,
    pub mode: QuantMode,
}

impl QuantSpec {
    pub fn affine(group_size: i32, bits: i32) -> QuantSpec {
        QuantSpec {
            group_size,
            bits,
            mode: QuantMode::Affine,
        }
    }
}

/// The output of [`quantize`]: packed `U32` weight, scales, and biases (affine mode only).
#[derive(Debug)]
pub struct Quantized {
    pub weight: Array,
    pub scales: Array,
    pub biases: Option<Array>,
}

/// `mx.quantize(w, group_size, bits, mode)` along the last axis.
pub fn quantize(w: &Array, spec: QuantSpec) -> Result<Quantized> {
    let (mut qw, mut qs, mut qb) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
    let rc = unsafe {
        ffi::mlxs_quantize(
            w.as_ptr(),
            spec.group_size,
            spec.bits,
            spec.mode.c_name().as_ptr(),
            &mut qw,
            &mut qs,
            &mut qb,
        )
    };
    check(rc, "quantize")?;
    // Take ownership of whatever came back before checking any of it, so nothing leaks.
    let biases = NonNull::new(qb).map(|raw| Array { raw });
    let weight = Array::from_raw(qw, "quantize")?;
    let scales = Array::from_raw(qs, "quantize")?;
    Ok(Quantized {
        weight,
        scales,
        biases,
    })
}

/// `mx.dequantize`; `dtype` `None` gives MLX's default (the scales' dtype).
pub fn dequantize(
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    spec: QuantSpec,
    dtype: Option<Dtype>,
) -> Result<Array> {
    make("dequantize", |out| unsafe {
        ffi::mlxs_dequantize(
            w.as_ptr(),
            scales.as_ptr(),
            opt_ptr(biases),
            spec.group_size,
            spec.bits,
            spec.mode.c_name().as_ptr(),
            dtype.map_or(-1, |d| d as c_int),
            out,
        )
    })
}

/// `mx.quantized_matmul(x, w, scales, biases, transpose, ...)`: `x @ dequantize(w).T` when `transpose`
/// (the Linear-layer layout).
pub fn quantized_matmul(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    transpose: bool,
    spec: QuantSpec,
) -> Result<Array> {
    make("quantized_matmul", |out| unsafe {
        ffi::mlxs_quantized_matmul(
            x.as_ptr(),
            w.as_ptr(),
            scales.as_ptr(),
            opt_ptr(biases),
            transpose as c_int,
            spec.group_size,
            spec.bits,
            spec.mode.c_name().as_ptr(),
            out,
        )
    })
}

/// The fused kernels of `mlx::core::fast` (`mx.fast.*`).
pub mod fast {
    use super::{ffi, make, opt_ptr, Array, Result};
    use std::ffi::c_int;

    /// RMS normalization over the last axis, optionally scaled by `weight`.
    pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
        make("fast::rms_norm", |out| unsafe {
            ffi::mlxs_rms_norm(x.as_ptr(), opt_ptr(weight), eps, out)
        })
    }

    /// Layer normalization over the last axis with optional `weight` and `bias`.
    pub fn layer_norm(
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
    ) -> Result<Array> {
        make("fast::layer_norm", |out| unsafe {
            ffi::mlxs_layer_norm(x.as_ptr(), opt_ptr(weight), opt_ptr(bias), eps, out)
        })
    }

    /// Rotary position embedding of the first `dims` features of `x` (`[B, *, T, D]`), frequencies
    /// `base^(-2i/dims)`, positions `scale * (offset + t)`; `traditional` rotates adjacent pairs.
    pub fn rope(
        x: &Array,
        dims: i32,
        traditional: bool,
        base: f32,
        scale: f32,
        offset: i32,
    ) -> Result<Array> {
        make("fast::rope", |out| unsafe {
            ffi::mlxs_rope(
                x.as_ptr(),
                dims,
                traditional as c_int,
                1,
                base,
                scale,
                offset,
                std::ptr::null(),
                out,
            )
        })
    }

    /// [`rope`] with explicit frequencies (`dims / 2` values, e.g. Llama-3 or YaRN scaled) instead of a base.
    pub fn rope_with_freqs(
        x: &Array,
        dims: i32,
        traditional: bool,
        freqs: &Array,
        scale: f32,
        offset: i32,
    ) -> Result<Array> {
        make("fast::rope", |out| unsafe {
            ffi::mlxs_rope(
                x.as_ptr(),
                dims,
                traditional as c_int,
                0,
                0.0,
                scale,
                offset,
                freqs.as_ptr(),
                out,
            )
        })
    }

    /// The mask of [`scaled_dot_product_attention`].
    #[derive(Debug, Clone, Copy)]
    pub enum Mask<'a> {
        None,
        /// Lower-right aligned causal mask (the last query sees the last key).
        Causal,
        /// A boolean or additive mask broadcastable to `[B, N, T_q, T_kv]`.
        Array(&'a Array),
    }

    /// `softmax(scale * q @ k^T + mask) @ v` for `q: [B, N_q, T_q, D]`, `k, v: [B, N_kv, T_kv, D]`
    /// (grouped-query attention when `N_kv` divides `N_q`; do not pre-tile k and v).
    pub fn scaled_dot_product_attention(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
    ) -> Result<Array> {
        let (kind, arr) = match mask {
            Mask::None => (ffi::MLXS_MASK_NONE, std::ptr::null()),
            Mask::Causal => (ffi::MLXS_MASK_CAUSAL, std::ptr::null()),
            Mask::Array(m) => (ffi::MLXS_MASK_ARRAY, m.as_ptr()),
        };
        make("fast::scaled_dot_product_attention", |out| unsafe {
            ffi::mlxs_sdpa(q.as_ptr(), k.as_ptr(), v.as_ptr(), scale, kind, arr, out)
        })
    }
}

// ---- library ----

/// The version of the libmlx loaded at run time (`mlx::core::version()`).
pub fn runtime_version() -> Result<String> {
    let mut p: *const std::ffi::c_char = ptr::null();
    check(unsafe { ffi::mlxs_version(&mut p) }, "version")?;
    if p.is_null() {
        return Err(MlxError::Mlx {
            op: "version",
            message: "no version string".into(),
        });
    }
    // SAFETY: MLX returns a static NUL-terminated string.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Prepares MLX for use; call before any other function. Selects the CPU device on Linux (see
/// [`use_cpu`]), and fails if the libmlx loaded at run time is not [`PINNED_VERSION`] (e.g. a different
/// one found through `LD_LIBRARY_PATH`). Runs once per process; later calls return the first result.
pub fn init() -> Result<()> {
    static INIT: OnceLock<Result<()>> = OnceLock::new();
    INIT.get_or_init(|| {
        #[cfg(target_os = "linux")]
        use_cpu()?;
        let found = runtime_version()?;
        if found != PINNED_VERSION {
            return Err(MlxError::VersionMismatch {
                found,
                expected: PINNED_VERSION,
                prefix: BUILD_PREFIX,
            });
        }
        Ok(())
    })
    .clone()
}

/// Makes the CPU MLX's default device for the whole process. On Linux [`init`] does this: asking for the
/// GPU without a GPU backend throws. On macOS the GPU is the default; call this to get the CPU kernels,
/// whose results the golden files and the converter's quantizer match (Metal's differ slightly). MLX keeps
/// the default device in an unsynchronized global, so this runs once per process.
pub fn use_cpu() -> Result<()> {
    static CPU: OnceLock<Result<()>> = OnceLock::new();
    CPU.get_or_init(|| {
        check(
            unsafe { ffi::mlxs_set_default_device_cpu() },
            "set_default_device",
        )
    })
    .clone()
}

/// Bytes MLX currently holds for live arrays (`mlx::core::get_active_memory`), excluding its cache.
pub fn active_memory() -> Result<usize> {
    let mut n = 0usize;
    check(unsafe { ffi::mlxs_active_memory(&mut n) }, "active_memory")?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_shape() {
        init().unwrap();
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        assert_eq!(a.shape().unwrap(), vec![2, 3]);
        assert_eq!(a.dtype().unwrap(), Dtype::F32);
        assert_eq!(a.to_vec_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A transposed view reads back in row-major order of the view.
        let t = a.transpose(&[]).unwrap();
        assert_eq!(t.shape().unwrap(), vec![3, 2]);
        assert_eq!(t.to_vec_f32().unwrap(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn shape_and_dtype_checks() {
        assert!(matches!(
            Array::from_slice(&[1.0f32, 2.0, 3.0], &[2, 2]),
            Err(MlxError::ShapeMismatch { len: 3, .. })
        ));
        let a = Array::from_slice(&[1u32, 2], &[2]).unwrap();
        assert!(matches!(
            a.to_vec_f32(),
            Err(MlxError::DtypeMismatch {
                expected: Dtype::F32,
                found: Dtype::U32
            })
        ));
        assert!(matches!(
            Array::from_bytes(&[0u8; 3], &[2], Dtype::BF16),
            Err(MlxError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn dtype_codes_and_safetensors_mapping() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d as c_int).unwrap(), d);
            if let Some(st) = d.to_safetensors() {
                assert_eq!(Dtype::from_safetensors(st), Some(d));
                assert_eq!(st.size(), d.size());
            }
        }
        assert!(Dtype::from_code(99).is_err());
    }

    #[test]
    fn runtime_version_is_pinned_and_matches_build() {
        assert_eq!(BUILD_VERSION, PINNED_VERSION);
        assert_eq!(runtime_version().unwrap(), PINNED_VERSION);
    }

    #[test]
    fn bad_reshape_is_an_error_not_an_abort() {
        let a = Array::from_slice(&[1.0f32; 6], &[6]).unwrap();
        let e = a.reshape(&[4, 2]).unwrap_err();
        match e {
            MlxError::Mlx { op, message } => {
                assert_eq!(op, "reshape");
                assert!(message.contains("reshape"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
