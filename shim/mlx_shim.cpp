// The C ABI declared in mlx_shim.h, over mlx::core 0.32.4. Every entry point runs its body inside
// `guard`, which turns any C++ exception into return code 1 plus a thread-local message: an exception
// unwinding into Rust would abort the process.

#include "mlx_shim.h"

#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/mlx.h"

namespace mx = mlx::core;

struct mlxs_array {
  mx::array a;
};

namespace {

thread_local std::string last_error;

template <class F>
int guard(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    try {
      last_error = e.what();
    } catch (...) {
      // Could not even copy the message (out of memory): keep whatever was there.
    }
  } catch (...) {
    try {
      last_error = "unknown C++ exception";
    } catch (...) {
    }
  }
  return 1;
}

const mx::array& get(const mlxs_array* h) {
  if (h == nullptr) {
    throw std::invalid_argument("[mlx shim] null array handle");
  }
  return h->a;
}

std::optional<mx::array> opt(const mlxs_array* h) {
  if (h == nullptr) {
    return std::nullopt;
  }
  return h->a;
}

void put(mlxs_array** out, mx::array a) {
  if (out == nullptr) {
    throw std::invalid_argument("[mlx shim] null output pointer");
  }
  *out = new mlxs_array{std::move(a)};
}

mx::Dtype to_dtype(int code) {
  switch (code) {
    case MLXS_BOOL: return mx::bool_;
    case MLXS_U8: return mx::uint8;
    case MLXS_U16: return mx::uint16;
    case MLXS_U32: return mx::uint32;
    case MLXS_U64: return mx::uint64;
    case MLXS_I8: return mx::int8;
    case MLXS_I16: return mx::int16;
    case MLXS_I32: return mx::int32;
    case MLXS_I64: return mx::int64;
    case MLXS_F16: return mx::float16;
    case MLXS_F32: return mx::float32;
    case MLXS_F64: return mx::float64;
    case MLXS_BF16: return mx::bfloat16;
    case MLXS_C64: return mx::complex64;
  }
  throw std::invalid_argument("[mlx shim] unknown dtype code " + std::to_string(code));
}

int from_dtype(mx::Dtype d) {
  switch (d.val()) {
    case mx::Dtype::Val::bool_: return MLXS_BOOL;
    case mx::Dtype::Val::uint8: return MLXS_U8;
    case mx::Dtype::Val::uint16: return MLXS_U16;
    case mx::Dtype::Val::uint32: return MLXS_U32;
    case mx::Dtype::Val::uint64: return MLXS_U64;
    case mx::Dtype::Val::int8: return MLXS_I8;
    case mx::Dtype::Val::int16: return MLXS_I16;
    case mx::Dtype::Val::int32: return MLXS_I32;
    case mx::Dtype::Val::int64: return MLXS_I64;
    case mx::Dtype::Val::float16: return MLXS_F16;
    case mx::Dtype::Val::float32: return MLXS_F32;
    case mx::Dtype::Val::float64: return MLXS_F64;
    case mx::Dtype::Val::bfloat16: return MLXS_BF16;
    case mx::Dtype::Val::complex64: return MLXS_C64;
  }
  throw std::invalid_argument("[mlx shim] dtype without a shim code");
}

mx::Shape to_shape(const int32_t* p, size_t n) {
  if (n > 0 && p == nullptr) {
    throw std::invalid_argument("[mlx shim] null shape pointer");
  }
  return mx::Shape(p, p + n);
}

std::vector<int> to_axes(const int32_t* p, size_t n) {
  if (n > 0 && p == nullptr) {
    throw std::invalid_argument("[mlx shim] null axes pointer");
  }
  return std::vector<int>(p, p + n);
}

std::optional<int> opt_int(int v) {
  return v > 0 ? std::optional<int>(v) : std::nullopt;
}

std::string mode_of(const char* mode) {
  return mode == nullptr ? std::string("affine") : std::string(mode);
}

}  // namespace

extern "C" {

const char* mlxs_last_error(void) {
  return last_error.c_str();
}

int mlxs_version(const char** out) {
  return guard([&] { *out = mx::version(); });
}

int mlxs_set_default_device_cpu(void) {
  return guard([&] { mx::set_default_device(mx::Device(mx::Device::cpu)); });
}

int mlxs_active_memory(size_t* out) {
  return guard([&] { *out = mx::get_active_memory(); });
}

void mlxs_array_free(mlxs_array* a) {
  try {
    delete a;
  } catch (...) {
    // Destructors do not throw in practice; never let one reach Rust.
  }
}

int mlxs_array_clone(const mlxs_array* a, mlxs_array** out) {
  return guard([&] { put(out, get(a)); });
}

int mlxs_array_from_bytes(const void* data, size_t nbytes, const int32_t* shape, size_t ndim, int dtype,
                          mlxs_array** out) {
  return guard([&] {
    mx::Dtype dt = to_dtype(dtype);
    mx::Shape sh = to_shape(shape, ndim);
    size_t count = 1;
    for (auto d : sh) {
      if (d < 0) {
        throw std::invalid_argument("[mlx shim] negative dimension in shape");
      }
      count *= static_cast<size_t>(d);
    }
    if (count * dt.size() != nbytes) {
      throw std::invalid_argument("[mlx shim] byte length " + std::to_string(nbytes) + " does not match shape (" +
                                  std::to_string(count) + " elements of " + std::to_string(dt.size()) + " bytes)");
    }
    if (nbytes > 0 && data == nullptr) {
      throw std::invalid_argument("[mlx shim] null data pointer");
    }
    // Copy into MLX's own allocation (the caller's buffer may be unaligned and may not outlive the array).
    auto buf = mx::allocator::malloc(nbytes);
    if (nbytes > 0) {
      std::memcpy(buf.buffer().raw_ptr(), data, nbytes);
    }
    put(out, mx::array(std::move(buf), std::move(sh), dt));
  });
}

int mlxs_array_scalar(float value, int dtype, mlxs_array** out) {
  return guard([&] { put(out, mx::array(value, to_dtype(dtype))); });
}

int mlxs_arange(double start, double stop, double step, int dtype, mlxs_array** out) {
  return guard([&] { put(out, mx::arange(start, stop, step, to_dtype(dtype))); });
}

int mlxs_array_dtype(const mlxs_array* a, int* out) {
  return guard([&] { *out = from_dtype(get(a).dtype()); });
}

int mlxs_array_ndim(const mlxs_array* a, size_t* out) {
  return guard([&] { *out = get(a).ndim(); });
}

int mlxs_array_shape(const mlxs_array* a, int32_t* out, size_t cap) {
  return guard([&] {
    const auto& sh = get(a).shape();
    if (cap < sh.size()) {
      throw std::invalid_argument("[mlx shim] shape buffer too small");
    }
    for (size_t i = 0; i < sh.size(); i++) {
      out[i] = sh[i];
    }
  });
}

int mlxs_array_size(const mlxs_array* a, size_t* out) {
  return guard([&] { *out = get(a).size(); });
}

int mlxs_eval(const mlxs_array* const* arrays, size_t n) {
  return guard([&] {
    std::vector<mx::array> v;
    v.reserve(n);
    for (size_t i = 0; i < n; i++) {
      v.push_back(get(arrays[i]));
    }
    mx::eval(std::move(v));
  });
}

int mlxs_array_read(const mlxs_array* a, void* dst, size_t nbytes) {
  return guard([&] {
    mx::array x = get(a);
    if (x.nbytes() != nbytes) {
      throw std::invalid_argument("[mlx shim] read of " + std::to_string(nbytes) + " bytes from an array of " +
                                  std::to_string(x.nbytes()));
    }
    x.eval();
    // Views (transposes, slices, broadcasts) are strided: copy them into row-major order first.
    if (!x.flags().row_contiguous) {
      x = mx::contiguous(x);
      x.eval();
    }
    if (nbytes > 0) {
      std::memcpy(dst, x.data<char>(), nbytes);
    }
  });
}

int mlxs_astype(const mlxs_array* a, int dtype, mlxs_array** out) {
  return guard([&] { put(out, mx::astype(get(a), to_dtype(dtype))); });
}

int mlxs_reshape(const mlxs_array* a, const int32_t* shape, size_t ndim, mlxs_array** out) {
  return guard([&] { put(out, mx::reshape(get(a), to_shape(shape, ndim))); });
}

int mlxs_transpose(const mlxs_array* a, const int32_t* axes, size_t n, mlxs_array** out) {
  return guard([&] {
    if (n == 0) {
      put(out, mx::transpose(get(a)));
    } else {
      put(out, mx::transpose(get(a), to_axes(axes, n)));
    }
  });
}

int mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop, const int32_t* strides, size_t n,
               mlxs_array** out) {
  return guard(
      [&] { put(out, mx::slice(get(a), to_shape(start, n), to_shape(stop, n), to_shape(strides, n))); });
}

int mlxs_concatenate(const mlxs_array* const* arrays, size_t n, int axis, mlxs_array** out) {
  return guard([&] {
    std::vector<mx::array> v;
    v.reserve(n);
    for (size_t i = 0; i < n; i++) {
      v.push_back(get(arrays[i]));
    }
    put(out, mx::concatenate(std::move(v), axis));
  });
}

int mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis, mlxs_array** out) {
  return guard([&] { put(out, mx::take(get(a), get(indices), axis)); });
}

int mlxs_conv2d(const mlxs_array* input, const mlxs_array* weight, int stride_h, int stride_w, int pad_h, int pad_w,
                mlxs_array** out) {
  return guard([&] {
    put(out, mx::conv2d(get(input), get(weight), {stride_h, stride_w}, {pad_h, pad_w}));
  });
}

int mlxs_unary(int op, const mlxs_array* a, mlxs_array** out) {
  return guard([&] {
    const auto& x = get(a);
    switch (op) {
      case MLXS_EXP: return put(out, mx::exp(x));
      case MLXS_LOG: return put(out, mx::log(x));
      case MLXS_SQRT: return put(out, mx::sqrt(x));
      case MLXS_RSQRT: return put(out, mx::rsqrt(x));
      case MLXS_TANH: return put(out, mx::tanh(x));
      case MLXS_ERF: return put(out, mx::erf(x));
      case MLXS_SIGMOID: return put(out, mx::sigmoid(x));
      case MLXS_ABS: return put(out, mx::abs(x));
      case MLXS_NEGATIVE: return put(out, mx::negative(x));
      case MLXS_SQUARE: return put(out, mx::square(x));
    }
    throw std::invalid_argument("[mlx shim] unknown unary op " + std::to_string(op));
  });
}

int mlxs_binary(int op, const mlxs_array* a, const mlxs_array* b, mlxs_array** out) {
  return guard([&] {
    const auto& x = get(a);
    const auto& y = get(b);
    switch (op) {
      case MLXS_ADD: return put(out, mx::add(x, y));
      case MLXS_SUBTRACT: return put(out, mx::subtract(x, y));
      case MLXS_MULTIPLY: return put(out, mx::multiply(x, y));
      case MLXS_DIVIDE: return put(out, mx::divide(x, y));
      case MLXS_MAXIMUM: return put(out, mx::maximum(x, y));
      case MLXS_MINIMUM: return put(out, mx::minimum(x, y));
      case MLXS_POWER: return put(out, mx::power(x, y));
      case MLXS_MATMUL: return put(out, mx::matmul(x, y));
    }
    throw std::invalid_argument("[mlx shim] unknown binary op " + std::to_string(op));
  });
}

int mlxs_where(const mlxs_array* cond, const mlxs_array* x, const mlxs_array* y, mlxs_array** out) {
  return guard([&] { put(out, mx::where(get(cond), get(x), get(y))); });
}

int mlxs_clip(const mlxs_array* a, const mlxs_array* lo, const mlxs_array* hi, mlxs_array** out) {
  return guard([&] { put(out, mx::clip(get(a), opt(lo), opt(hi))); });
}

int mlxs_reduce(int op, const mlxs_array* a, const int32_t* axes, size_t n, int keepdims, mlxs_array** out) {
  return guard([&] {
    const auto& x = get(a);
    bool kd = keepdims != 0;
    if (op == MLXS_ARGMAX) {
      if (n == 0) {
        return put(out, mx::argmax(x, kd));
      }
      if (n != 1) {
        throw std::invalid_argument("[mlx shim] argmax takes exactly one axis");
      }
      return put(out, mx::argmax(x, axes[0], kd));
    }
    if (n == 0) {
      // No axes: reduce over all of them (Python's axis=None).
      switch (op) {
        case MLXS_SUM: return put(out, mx::sum(x, kd));
        case MLXS_MEAN: return put(out, mx::mean(x, kd));
        case MLXS_MAX: return put(out, mx::max(x, kd));
        case MLXS_MIN: return put(out, mx::min(x, kd));
        case MLXS_LOGSUMEXP: return put(out, mx::logsumexp(x, kd));
      }
    } else {
      auto ax = to_axes(axes, n);
      switch (op) {
        case MLXS_SUM: return put(out, mx::sum(x, ax, kd));
        case MLXS_MEAN: return put(out, mx::mean(x, ax, kd));
        case MLXS_MAX: return put(out, mx::max(x, ax, kd));
        case MLXS_MIN: return put(out, mx::min(x, ax, kd));
        case MLXS_LOGSUMEXP: return put(out, mx::logsumexp(x, ax, kd));
      }
    }
    throw std::invalid_argument("[mlx shim] unknown reduction " + std::to_string(op));
  });
}

int mlxs_softmax(const mlxs_array* a, const int32_t* axes, size_t n, int precise, mlxs_array** out) {
  return guard([&] {
    if (n == 0) {
      put(out, mx::softmax(get(a), precise != 0));
    } else {
      put(out, mx::softmax(get(a), to_axes(axes, n), precise != 0));
    }
  });
}

int mlxs_log_softmax(const mlxs_array* a, const int32_t* axes, size_t n, mlxs_array** out) {
  return guard([&] {
    const auto& x = get(a);
    auto ax = to_axes(axes, n);
    if (ax.empty()) {
      ax.push_back(-1);
    }
    // Shift by the max first, as mlx.nn.log_softmax does (keeps the normalizer exact for large logits).
    auto shifted = mx::subtract(x, mx::max(x, ax, true));
    put(out, mx::subtract(shifted, mx::logsumexp(shifted, ax, true)));
  });
}

int mlxs_quantize(const mlxs_array* w, int group_size, int bits, const char* mode, mlxs_array** out_w,
                  mlxs_array** out_scales, mlxs_array** out_biases) {
  return guard([&] {
    auto r = mx::quantize(get(w), opt_int(group_size), opt_int(bits), mode_of(mode));
    if (r.size() < 2 || r.size() > 3) {
      throw std::runtime_error("[mlx shim] quantize returned " + std::to_string(r.size()) + " arrays");
    }
    if (out_w == nullptr || out_scales == nullptr || out_biases == nullptr) {
      throw std::invalid_argument("[mlx shim] null output pointer");
    }
    // Allocate all handles before publishing any, so a failure leaks nothing.
    auto hw = std::make_unique<mlxs_array>(mlxs_array{r[0]});
    auto hs = std::make_unique<mlxs_array>(mlxs_array{r[1]});
    std::unique_ptr<mlxs_array> hb;
    if (r.size() == 3) {
      hb = std::make_unique<mlxs_array>(mlxs_array{r[2]});
    }
    *out_w = hw.release();
    *out_scales = hs.release();
    *out_biases = hb.release();
  });
}

int mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales, const mlxs_array* biases, int group_size,
                    int bits, const char* mode, int dtype, mlxs_array** out) {
  return guard([&] {
    std::optional<mx::Dtype> dt;
    if (dtype >= 0) {
      dt = to_dtype(dtype);
    }
    put(out, mx::dequantize(get(w), get(scales), opt(biases), opt_int(group_size), opt_int(bits), mode_of(mode),
                            std::nullopt, dt));
  });
}

int mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w, const mlxs_array* scales,
                          const mlxs_array* biases, int transpose, int group_size, int bits, const char* mode,
                          mlxs_array** out) {
  return guard([&] {
    put(out, mx::quantized_matmul(get(x), get(w), get(scales), opt(biases), transpose != 0, opt_int(group_size),
                                  opt_int(bits), mode_of(mode)));
  });
}

int mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight, float eps, mlxs_array** out) {
  return guard([&] { put(out, mx::fast::rms_norm(get(x), opt(weight), eps)); });
}

int mlxs_layer_norm(const mlxs_array* x, const mlxs_array* weight, const mlxs_array* bias, float eps,
                    mlxs_array** out) {
  return guard([&] { put(out, mx::fast::layer_norm(get(x), opt(weight), opt(bias), eps)); });
}

int mlxs_rope(const mlxs_array* x, int dims, int traditional, int has_base, float base, float scale, int offset,
              const mlxs_array* freqs, mlxs_array** out) {
  return guard([&] {
    std::optional<float> b;
    if (has_base != 0) {
      b = base;
    }
    put(out, mx::fast::rope(get(x), dims, traditional != 0, b, scale, offset, opt(freqs)));
  });
}

int mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, int mask_kind,
              const mlxs_array* mask, mlxs_array** out) {
  return guard([&] {
    // The same calls the Python binding makes for mask=None, mask="causal" and mask=<array>.
    switch (mask_kind) {
      case MLXS_MASK_NONE:
        return put(out, mx::fast::scaled_dot_product_attention(get(q), get(k), get(v), scale, "", {}));
      case MLXS_MASK_CAUSAL:
        return put(out, mx::fast::scaled_dot_product_attention(get(q), get(k), get(v), scale, "causal", {}));
      case MLXS_MASK_ARRAY:
        return put(out, mx::fast::scaled_dot_product_attention(get(q), get(k), get(v), scale, "", get(mask)));
    }
    throw std::invalid_argument("[mlx shim] unknown mask kind " + std::to_string(mask_kind));
  });
}

}  // extern "C"
