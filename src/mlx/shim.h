// flashpack's C surface over MLX's C++ API (see src/mlx/mod.rs for the safe side).
//
// In: opaque array handles made by these functions. Out: a status (0 = ok, 1 = error) and new
// handles through out-pointers. Invariant: no C++ exception ever crosses this boundary; on error
// the message is kept per thread and read with fp_last_error(). Every handle returned must be
// released with fp_free exactly once. Optional inputs are NULL pointers.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fp_array fp_array;

// Dtype codes shared with src/mlx/mod.rs (`Dtype`).
enum {
  FP_BOOL = 0, FP_U8 = 1, FP_U16 = 2, FP_U32 = 3, FP_U64 = 4, FP_I8 = 5, FP_I16 = 6, FP_I32 = 7,
  FP_I64 = 8, FP_F16 = 9, FP_F32 = 10, FP_F64 = 11, FP_BF16 = 12, FP_C64 = 13
};

// Element-wise op codes (`BinaryOp` / `UnaryOp` in mod.rs).
enum {
  FP_ADD = 0, FP_SUB = 1, FP_MUL = 2, FP_DIV = 3, FP_FLOOR_DIV = 4, FP_MAXIMUM = 5,
  FP_LOGADDEXP = 6, FP_MINIMUM = 7, FP_POWER = 8, FP_GREATER = 9, FP_GREATER_EQUAL = 10,
  FP_LESS = 11
};
enum {
  FP_EXP = 0, FP_SIGMOID = 1, FP_NEG = 2, FP_SQRT = 3, FP_LOG = 4, FP_ABS = 5, FP_CEIL = 6,
  FP_LOG2 = 7, FP_SIGN = 8, FP_TO_FP8 = 9, FP_FROM_FP8_F32 = 10, FP_TANH = 11, FP_RSQRT = 12
};

const char* fp_last_error(void);
const char* fp_version(void);
size_t fp_set_cache_limit(size_t limit);
int fp_set_wired_limit(size_t limit, size_t* previous);
size_t fp_active_memory(void);
int fp_unified_prefetch(const void* const* ptrs, const size_t* lens, size_t n, int to_gpu);
int fp_upload(void* const* dsts, const void* const* srcs, const size_t* lens, size_t n);
int fp_pin_host(void* p, size_t len);
int fp_upload_available(void);
size_t fp_peak_memory(void);
// mx::synchronize(): waits for everything scheduled on the default stream (async_eval).
int fp_synchronize(void);
// mx::clear_cache(): returns MLX's cached (freed) buffers to the system.
void fp_clear_cache(void);
void fp_free(fp_array* a);
int fp_clone(const fp_array* a, fp_array** out);

int fp_from_data(const void* data, const int32_t* shape, size_t ndim, int dtype, fp_array** out);
int fp_scalar(double value, int dtype, fp_array** out);
int fp_zeros(const int32_t* shape, size_t ndim, int dtype, fp_array** out);
int fp_host_buffer(const int32_t* shape, size_t ndim, int dtype, fp_array** out);
int fp_data_ptr(fp_array* a, void** ptr, size_t* nbytes);

int fp_ndim(const fp_array* a, size_t* out);
int fp_shape(const fp_array* a, int32_t* out, size_t cap);
int fp_dtype(const fp_array* a, int* out);
int fp_read(fp_array* a, void* out, size_t nbytes);
int fp_async_eval(fp_array* const* arrays, size_t n);
int fp_eval(fp_array* const* arrays, size_t n);

int fp_binary(int op, const fp_array* a, const fp_array* b, fp_array** out);
int fp_unary(int op, const fp_array* a, fp_array** out);
int fp_matmul(const fp_array* a, const fp_array* b, fp_array** out);
// c + a @ b (mlx.nn.Linear with a bias).
int fp_addmm(const fp_array* c, const fp_array* a, const fp_array* b, fp_array** out);
int fp_where(const fp_array* cond, const fp_array* x, const fp_array* y, fp_array** out);
int fp_contiguous(const fp_array* a, fp_array** out);
int fp_astype(const fp_array* a, int dtype, fp_array** out);
int fp_reshape(const fp_array* a, const int32_t* shape, size_t ndim, fp_array** out);
int fp_transpose(const fp_array* a, const int32_t* axes, size_t n, fp_array** out);
int fp_concatenate(const fp_array* const* arrays, size_t n, int axis, fp_array** out);
int fp_slice(const fp_array* a, const int32_t* start, const int32_t* stop, size_t n,
             fp_array** out);
int fp_slice_update(const fp_array* src, const fp_array* update, const int32_t* start,
                    const int32_t* stop, size_t n, fp_array** out);
int fp_sum(const fp_array* a, int axis, int keepdims, fp_array** out);
int fp_max(const fp_array* a, int axis, int keepdims, fp_array** out);
int fp_mean(const fp_array* a, int axis, int keepdims, fp_array** out);
int fp_gather_mm(const fp_array* a, const fp_array* b, const fp_array* lhs_indices,
                 const fp_array* rhs_indices, int sorted_indices, fp_array** out);
int fp_softmax(const fp_array* a, int axis, int precise, fp_array** out);
int fp_argpartition(const fp_array* a, int kth, int axis, fp_array** out);
int fp_argmax(const fp_array* a, int axis, fp_array** out);
int fp_argsort(const fp_array* a, int axis, fp_array** out);
int fp_take(const fp_array* a, const fp_array* indices, int axis, fp_array** out);
int fp_take_along_axis(const fp_array* a, const fp_array* indices, int axis, fp_array** out);
int fp_put_along_axis(const fp_array* a, const fp_array* indices, const fp_array* values, int axis,
                      fp_array** out);
int fp_topk(const fp_array* a, int k, int axis, fp_array** out);

int fp_quantize(const fp_array* w, int group_size, int bits, fp_array** wq, fp_array** scales,
                fp_array** biases);
// `mode` is MLX's quantization mode name: "affine", "mxfp4" or "mxfp8".
int fp_dequantize(const fp_array* w, const fp_array* scales, const fp_array* biases,
                  int group_size, int bits, const char* mode, fp_array** out);
int fp_quantized_matmul(const fp_array* x, const fp_array* w, const fp_array* scales,
                        const fp_array* biases, int transpose, int group_size, int bits,
                        const char* mode, fp_array** out);
int fp_gather_qmm(const fp_array* x, const fp_array* w, const fp_array* scales,
                  const fp_array* biases, const fp_array* lhs_indices,
                  const fp_array* rhs_indices, int transpose, int group_size, int bits,
                  const char* mode, int sorted_indices, fp_array** out);

// mx.conv1d(x [N, L, C_in], w [C_out, K, C_in / groups], stride, padding, dilation, groups).
int fp_conv1d(const fp_array* x, const fp_array* w, int stride, int padding, int dilation,
              int groups, fp_array** out);

int fp_rms_norm(const fp_array* x, const fp_array* weight, float eps, fp_array** out);
// mx.fast.layer_norm (nn.LayerNorm): weight and bias may be NULL.
int fp_layer_norm(const fp_array* x, const fp_array* weight, const fp_array* bias, float eps,
                  fp_array** out);
// mx.fast.rope with explicit frequencies (base unused), as YaRN gives them.
int fp_rope_freqs(const fp_array* x, int dims, int traditional, float scale, int offset,
                  const fp_array* freqs, fp_array** out);
int fp_rope(const fp_array* x, int dims, int traditional, float base, float scale, int offset,
            fp_array** out);
// mask_mode: "" (none) or "causal"; mask may be NULL. sinks (one logit per query head, which
// joins each softmax without a value) may be NULL.
int fp_sdpa(const fp_array* q, const fp_array* k, const fp_array* v, float scale,
            const char* mask_mode, const fp_array* mask, const fp_array* sinks, fp_array** out);

// Whether MLX's default device is a GPU (Metal or CUDA).
int fp_default_device_is_gpu(void);

// A function for MLX to trace and compile: reads the `n_in` input handles (borrowed for the
// call), writes up to `max_out` new output handles (the caller takes them) and their count,
// returns 0, or 1 with the shim's last error set.
typedef int (*fp_traced_fn)(void* ctx, fp_array* const* inputs, size_t n_in, fp_array** outputs,
                            size_t max_out, size_t* n_out);
// mx.compile: runs `f` on `inputs` as one compiled function, cached under (`fun_id`,
// `constants`, the inputs' shapes and types); `f` is traced only on a cache miss.
int fp_compiled_call(uintptr_t fun_id, const uint64_t* constants, size_t n_const, fp_traced_fn f,
                     void* ctx, fp_array* const* inputs, size_t n_in, fp_array** outputs,
                     size_t max_out, size_t* n_out);

// Calls `visit(ctx, name, handle)` once per tensor; the visitor owns each handle.
typedef void (*fp_visit)(void* ctx, const char* name, fp_array* a);
int fp_load_safetensors(const char* path, void* ctx, fp_visit visit);

// MLX's distributed module (mlx::core::distributed) on one process-wide group: `init` starts
// the named backend ("ring": MLX_HOSTFILE and MLX_RANK from the environment, as mlx.launch
// sets them) and keeps the group; the ops below run on it. Each op returns a lazy array, as
// MLX's own do: a send's array must be evaluated for the bytes to go.
int fp_dist_init(const char* backend, int* rank, int* size);
int fp_dist_is_available(const char* backend);
int fp_dist_send(const fp_array* x, int dst, fp_array** out);
int fp_dist_recv(const int32_t* shape, size_t ndim, int dtype, int src, fp_array** out);
int fp_dist_all_sum(const fp_array* x, fp_array** out);
int fp_dist_all_gather(const fp_array* x, fp_array** out);
// A copy of `x` that is computed only after `dep` (mx::depends).
int fp_depends(const fp_array* x, const fp_array* dep, fp_array** out);
// Prints MLX's exception and ends the process (exit 1) after `grace_ms`, instead of
// std::terminate's abort, when an exception escapes one of MLX's own threads (the ring
// backend throws "connection to a peer was lost" there). The grace lets a watchdog name the
// peer first.
void fp_dist_terminate_handler(int grace_ms);

#ifdef __cplusplus
}
#endif
