/* A small C ABI over mlx::core (MLX 0.32.4), for the Rust binding in src/mlx/.
 *
 * Conventions (every function follows them, so the Rust side can be mechanical):
 * - Functions return 0 on success and 1 on failure. On failure the message of the C++ exception MLX threw
 *   (MLX reports bad arguments by throwing) is kept per thread and read with mlxs_last_error(); no
 *   exception ever crosses this boundary.
 * - Arrays are opaque heap handles (a copy of an mlx::core::array, i.e. one reference to a refcounted
 *   graph node). Each handle returned through an `out` pointer is owned by the caller and must be
 *   released with mlxs_array_free exactly once. Input handles are borrowed.
 * - Nullable inputs (optional arrays) are marked "may be NULL".
 * - Dtypes use the MLXS_* codes below (stable, independent of MLX's internal enum order).
 * - group_size / bits <= 0 and mode NULL mean "MLX's default".
 * - Shapes and axes are int32_t, as in mlx::core::Shape.
 */
#ifndef VLM_CONVERT_MLX_SHIM_H
#define VLM_CONVERT_MLX_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlxs_array mlxs_array;

enum {
  MLXS_BOOL = 0,
  MLXS_U8 = 1,
  MLXS_U16 = 2,
  MLXS_U32 = 3,
  MLXS_U64 = 4,
  MLXS_I8 = 5,
  MLXS_I16 = 6,
  MLXS_I32 = 7,
  MLXS_I64 = 8,
  MLXS_F16 = 9,
  MLXS_F32 = 10,
  MLXS_F64 = 11,
  MLXS_BF16 = 12,
  MLXS_C64 = 13,
};

enum {
  MLXS_EXP = 0,
  MLXS_LOG = 1,
  MLXS_SQRT = 2,
  MLXS_RSQRT = 3,
  MLXS_TANH = 4,
  MLXS_ERF = 5,
  MLXS_SIGMOID = 6,
  MLXS_ABS = 7,
  MLXS_NEGATIVE = 8,
  MLXS_SQUARE = 9,
};

enum {
  MLXS_ADD = 0,
  MLXS_SUBTRACT = 1,
  MLXS_MULTIPLY = 2,
  MLXS_DIVIDE = 3,
  MLXS_MAXIMUM = 4,
  MLXS_MINIMUM = 5,
  MLXS_POWER = 6,
  MLXS_MATMUL = 7,
};

/* Reductions over `axes`; MLXS_ARGMAX takes exactly one axis. */
enum {
  MLXS_SUM = 0,
  MLXS_MEAN = 1,
  MLXS_MAX = 2,
  MLXS_MIN = 3,
  MLXS_LOGSUMEXP = 4,
  MLXS_ARGMAX = 5,
};

/* Attention masks for mlxs_sdpa. */
enum {
  MLXS_MASK_NONE = 0,
  MLXS_MASK_CAUSAL = 1,
  MLXS_MASK_ARRAY = 2,
};

/* The message of the last failure on this thread (valid until the next failing call on this thread). */
const char* mlxs_last_error(void);

/* Library-level. */
int mlxs_version(const char** out); /* static string, e.g. "0.32.4" */
int mlxs_set_default_device_cpu(void);
int mlxs_active_memory(size_t* out);

/* Handles. */
void mlxs_array_free(mlxs_array* a); /* NULL is a no-op */
int mlxs_array_clone(const mlxs_array* a, mlxs_array** out);

/* Construction (data is copied; nbytes must equal product(shape) * itemsize(dtype)). */
int mlxs_array_from_bytes(const void* data, size_t nbytes, const int32_t* shape, size_t ndim, int dtype,
                          mlxs_array** out);
int mlxs_array_scalar(float value, int dtype, mlxs_array** out);
int mlxs_arange(double start, double stop, double step, int dtype, mlxs_array** out);

/* Queries (no evaluation). */
int mlxs_array_dtype(const mlxs_array* a, int* out);
int mlxs_array_ndim(const mlxs_array* a, size_t* out);
int mlxs_array_shape(const mlxs_array* a, int32_t* out, size_t cap); /* cap >= ndim */
int mlxs_array_size(const mlxs_array* a, size_t* out);

/* Evaluation and read-back (evaluates, makes row-contiguous, copies exactly nbytes). */
int mlxs_eval(const mlxs_array* const* arrays, size_t n);
int mlxs_array_read(const mlxs_array* a, void* dst, size_t nbytes);

/* Shape and type. n == 0 axes in transpose reverses all axes. */
int mlxs_astype(const mlxs_array* a, int dtype, mlxs_array** out);
int mlxs_reshape(const mlxs_array* a, const int32_t* shape, size_t ndim, mlxs_array** out);
int mlxs_transpose(const mlxs_array* a, const int32_t* axes, size_t n, mlxs_array** out);
int mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop, const int32_t* strides, size_t n,
               mlxs_array** out);
int mlxs_concatenate(const mlxs_array* const* arrays, size_t n, int axis, mlxs_array** out);
int mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis, mlxs_array** out);
/* 2-D convolution, channels last: input [N, H, W, C_in], weight [C_out, kH, kW, C_in] (MLX layout). */
int mlxs_conv2d(const mlxs_array* input, const mlxs_array* weight, int stride_h, int stride_w, int pad_h, int pad_w,
                mlxs_array** out);

/* Element-wise and reductions. */
int mlxs_unary(int op, const mlxs_array* a, mlxs_array** out);
int mlxs_binary(int op, const mlxs_array* a, const mlxs_array* b, mlxs_array** out);
int mlxs_where(const mlxs_array* cond, const mlxs_array* x, const mlxs_array* y, mlxs_array** out);
int mlxs_clip(const mlxs_array* a, const mlxs_array* lo /* may be NULL */, const mlxs_array* hi /* may be NULL */,
              mlxs_array** out);
int mlxs_reduce(int op, const mlxs_array* a, const int32_t* axes, size_t n, int keepdims, mlxs_array** out);
int mlxs_softmax(const mlxs_array* a, const int32_t* axes, size_t n, int precise, mlxs_array** out);
/* x - max(x) - logsumexp(x - max(x)), as mlx.nn.log_softmax computes it. */
int mlxs_log_softmax(const mlxs_array* a, const int32_t* axes, size_t n, mlxs_array** out);

/* Quantization. out_biases receives NULL for modes without biases. dtype < 0: MLX's default. */
int mlxs_quantize(const mlxs_array* w, int group_size, int bits, const char* mode, mlxs_array** out_w,
                  mlxs_array** out_scales, mlxs_array** out_biases);
int mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales, const mlxs_array* biases /* may be NULL */,
                    int group_size, int bits, const char* mode, int dtype, mlxs_array** out);
int mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w, const mlxs_array* scales,
                          const mlxs_array* biases /* may be NULL */, int transpose, int group_size, int bits,
                          const char* mode, mlxs_array** out);

/* mlx::core::fast. */
int mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight /* may be NULL */, float eps, mlxs_array** out);
int mlxs_layer_norm(const mlxs_array* x, const mlxs_array* weight /* may be NULL */,
                    const mlxs_array* bias /* may be NULL */, float eps, mlxs_array** out);
/* has_base == 0 means base is unused (then freqs must be given). */
int mlxs_rope(const mlxs_array* x, int dims, int traditional, int has_base, float base, float scale, int offset,
              const mlxs_array* freqs /* may be NULL */, mlxs_array** out);
int mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, int mask_kind,
              const mlxs_array* mask /* MLXS_MASK_ARRAY only */, mlxs_array** out);

#ifdef __cplusplus
}
#endif

#endif
