// The only C++ in flashpack: a thin extern "C" layer over MLX's C++ API (MLX 0.32.4).
//
// In: opaque `fp_array` handles (each owns one `mlx::core::array`, itself a ref-counted graph
// node). Out: status codes and new handles. Invariant: every entry point catches all C++
// exceptions (MLX reports bad shapes and dtypes by throwing), stores the message in a
// thread-local string and returns 1, so unwinding never reaches Rust.
#include "shim.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "mlx/compile_impl.h"
#include "mlx/mlx.h"

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace mx = mlx::core;

struct fp_array {
  mx::array a;
};

namespace {

thread_local std::string last_error;

template <typename F>
int guard(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception from MLX";
  }
  return 1;
}

fp_array* wrap(mx::array a) { return new fp_array{std::move(a)}; }

// How long a wait for the device polls before it sleeps, in microseconds. MLX's CUDA events
// are made with `cudaEventBlockingSync`: a waiting thread sleeps and wakes some tens of
// microseconds after the event, and a streamed decode waits for the device once per sparse
// layer (its routing). Polling the array's event first (`is_available`) wakes at once.
// `FLASHPACK_SPIN_US` sets it; off (0: sleep at once) by default, as measured on the H100
// (decision 0030: about 24 us saved a wait, within noise per token), and never
// where the default device is the CPU, whose backend's kernels need the core a polling
// thread would take.
long spin_us() {
  static const long us = [] {
    if (mx::default_device() != mx::Device::gpu) return 0L;
    const char* v = std::getenv("FLASHPACK_SPIN_US");
    return v ? std::max(0L, std::atol(v)) : 0L;
  }();
  return us;
}

// Waits for arrays already scheduled (or evaluated), polling first (see `spin_us`).
void wait_all(const std::vector<mx::array>& v) {
  const long limit = spin_us();
  if (limit > 0) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(limit);
    for (const auto& x : v) {
      while (!x.is_available() && std::chrono::steady_clock::now() < until) {
      }
    }
  }
  for (auto x : v) x.wait();
}

// `mx::eval`, with the wait of `wait_all`.
void eval_and_wait(std::vector<mx::array> v) {
  mx::async_eval(v);
  wait_all(v);
}

mx::Dtype to_dtype(int code) {
  switch (code) {
    case FP_BOOL: return mx::bool_;
    case FP_U8: return mx::uint8;
    case FP_U16: return mx::uint16;
    case FP_U32: return mx::uint32;
    case FP_U64: return mx::uint64;
    case FP_I8: return mx::int8;
    case FP_I16: return mx::int16;
    case FP_I32: return mx::int32;
    case FP_I64: return mx::int64;
    case FP_F16: return mx::float16;
    case FP_F32: return mx::float32;
    case FP_F64: return mx::float64;
    case FP_BF16: return mx::bfloat16;
    case FP_C64: return mx::complex64;
  }
  throw std::invalid_argument("flashpack shim: unknown dtype code " + std::to_string(code));
}

int from_dtype(mx::Dtype d) {
  switch (d.val()) {
    case mx::Dtype::Val::bool_: return FP_BOOL;
    case mx::Dtype::Val::uint8: return FP_U8;
    case mx::Dtype::Val::uint16: return FP_U16;
    case mx::Dtype::Val::uint32: return FP_U32;
    case mx::Dtype::Val::uint64: return FP_U64;
    case mx::Dtype::Val::int8: return FP_I8;
    case mx::Dtype::Val::int16: return FP_I16;
    case mx::Dtype::Val::int32: return FP_I32;
    case mx::Dtype::Val::int64: return FP_I64;
    case mx::Dtype::Val::float16: return FP_F16;
    case mx::Dtype::Val::float32: return FP_F32;
    case mx::Dtype::Val::float64: return FP_F64;
    case mx::Dtype::Val::bfloat16: return FP_BF16;
    case mx::Dtype::Val::complex64: return FP_C64;
  }
  return -1;
}

mx::Shape to_shape(const int32_t* s, size_t n) { return mx::Shape(s, s + n); }

std::optional<mx::array> opt(const fp_array* a) {
  if (a == nullptr) return std::nullopt;
  return a->a;
}

}  // namespace

extern "C" {

const char* fp_last_error(void) { return last_error.c_str(); }

const char* fp_version(void) { return mx::version(); }

size_t fp_set_cache_limit(size_t limit) { return mx::set_cache_limit(limit); }

int fp_set_wired_limit(size_t limit, size_t* previous) {
  return guard([&] { *previous = mx::set_wired_limit(limit); });
}

size_t fp_active_memory(void) { return mx::get_active_memory(); }

size_t fp_peak_memory(void) { return mx::get_peak_memory(); }

int fp_synchronize(void) {
  return guard([&] { mx::synchronize(); });
}

void fp_clear_cache(void) { mx::clear_cache(); }

void fp_free(fp_array* a) { delete a; }

int fp_clone(const fp_array* a, fp_array** out) {
  return guard([&] { *out = wrap(a->a); });
}

int fp_from_data(const void* data, const int32_t* shape, size_t ndim, int dtype,
                 fp_array** out) {
  return guard([&] {
    mx::Dtype dt = to_dtype(dtype);
    mx::Shape sh = to_shape(shape, ndim);
    size_t n = 1;
    for (auto d : sh) n *= static_cast<size_t>(d);
    // Copy into MLX-owned memory so the caller's slice may be dropped right away.
    auto buf = mx::allocator::malloc(n * dt.size());
    if (n > 0) std::memcpy(buf.buffer().raw_ptr(), data, n * dt.size());
    *out = wrap(mx::array(std::move(buf), std::move(sh), dt));
  });
}

int fp_scalar(double value, int dtype, fp_array** out) {
  return guard([&] { *out = wrap(mx::array(value, to_dtype(dtype))); });
}

int fp_zeros(const int32_t* shape, size_t ndim, int dtype, fp_array** out) {
  return guard([&] { *out = wrap(mx::zeros(to_shape(shape, ndim), to_dtype(dtype))); });
}

int fp_host_buffer(const int32_t* shape, size_t ndim, int dtype, fp_array** out) {
  return guard([&] {
    mx::Dtype dt = to_dtype(dtype);
    mx::Shape sh = to_shape(shape, ndim);
    size_t n = 1;
    for (auto d : sh) n *= static_cast<size_t>(d);
    // A fresh, row-contiguous, already-available buffer that nothing else references: unlike
    // mx::zeros (a broadcast scalar) every element has its own bytes.
    auto buf = mx::allocator::malloc(n * dt.size());
    if (n > 0) std::memset(buf.buffer().raw_ptr(), 0, n * dt.size());
    *out = wrap(mx::array(std::move(buf), std::move(sh), dt));
  });
}

int fp_data_ptr(fp_array* a, void** ptr, size_t* nbytes) {
  return guard([&] {
    a->a.eval();
    if (!a->a.flags().row_contiguous || a->a.data_size() != a->a.size()) {
      throw std::invalid_argument(
          "data_ptr needs a row-contiguous array that owns its elements (make it with "
          "Array::host_buffer)");
    }
    *ptr = a->a.data<void>();
    *nbytes = a->a.nbytes();
  });
}

int fp_ndim(const fp_array* a, size_t* out) {
  return guard([&] { *out = a->a.ndim(); });
}

int fp_shape(const fp_array* a, int32_t* out, size_t cap) {
  return guard([&] {
    const auto& s = a->a.shape();
    if (s.size() > cap) throw std::invalid_argument("shape buffer too small");
    for (size_t i = 0; i < s.size(); ++i) out[i] = s[i];
  });
}

int fp_dtype(const fp_array* a, int* out) {
  return guard([&] { *out = from_dtype(a->a.dtype()); });
}

int fp_read(fp_array* a, void* out, size_t nbytes) {
  return guard([&] {
    mx::array& x = a->a;
    if (x.nbytes() != nbytes) {
      throw std::invalid_argument("read: buffer has " + std::to_string(nbytes) +
                                  " bytes, array has " + std::to_string(x.nbytes()));
    }
    // Waits for this array alone: an array already scheduled (async_eval) is waited on through
    // its own event. An op made here (a contiguous copy) would instead be queued behind all the
    // work scheduled since, and on a GPU the read would wait for that too (the next decode step,
    // the next layer).
    // FLASHPACK_READ_COPY=1: the old way, through a contiguous copy (A/B runs).
    static const bool copy = std::getenv("FLASHPACK_READ_COPY") != nullptr;
    if (copy) {
      mx::array c = mx::contiguous(x);
      c.eval();
      if (nbytes > 0) std::memcpy(out, c.data<void>(), nbytes);
      return;
    }
    eval_and_wait({x});
    if (nbytes == 0) return;
    const char* base = x.data<char>();
    if (x.flags().row_contiguous) {
      std::memcpy(out, base, nbytes);
      return;
    }
    // A view (transpose, slice, broadcast): gathered on the host in row-major order.
    const auto& shape = x.shape();
    const auto& strides = x.strides();
    const size_t item = x.itemsize(), n = x.size(), dims = shape.size();
    std::vector<int64_t> idx(dims, 0);
    char* dst = static_cast<char*>(out);
    for (size_t i = 0; i < n; ++i) {
      int64_t at = 0;
      for (size_t d = 0; d < dims; ++d) at += idx[d] * static_cast<int64_t>(strides[d]);
      std::memcpy(dst + i * item, base + at * static_cast<int64_t>(item), item);
      for (size_t d = dims; d-- > 0;) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
  });
}

int fp_async_eval(fp_array* const* arrays, size_t n) {
  return guard([&] {
    std::vector<mx::array> v;
    v.reserve(n);
    for (size_t i = 0; i < n; ++i) v.push_back(arrays[i]->a);
    mx::async_eval(std::move(v));
  });
}

int fp_eval(fp_array* const* arrays, size_t n) {
  return guard([&] {
    std::vector<mx::array> v;
    v.reserve(n);
    for (size_t i = 0; i < n; ++i) v.push_back(arrays[i]->a);
    eval_and_wait(std::move(v));
  });
}

int fp_binary(int op, const fp_array* a, const fp_array* b, fp_array** out) {
  return guard([&] {
    const auto &x = a->a, &y = b->a;
    switch (op) {
      case FP_ADD: *out = wrap(mx::add(x, y)); return;
      case FP_SUB: *out = wrap(mx::subtract(x, y)); return;
      case FP_MUL: *out = wrap(mx::multiply(x, y)); return;
      case FP_DIV: *out = wrap(mx::divide(x, y)); return;
      case FP_FLOOR_DIV: *out = wrap(mx::floor_divide(x, y)); return;
      case FP_MAXIMUM: *out = wrap(mx::maximum(x, y)); return;
      case FP_LOGADDEXP: *out = wrap(mx::logaddexp(x, y)); return;
      case FP_MINIMUM: *out = wrap(mx::minimum(x, y)); return;
      case FP_POWER: *out = wrap(mx::power(x, y)); return;
      case FP_GREATER: *out = wrap(mx::greater(x, y)); return;
      case FP_GREATER_EQUAL: *out = wrap(mx::greater_equal(x, y)); return;
      case FP_LESS: *out = wrap(mx::less(x, y)); return;
    }
    throw std::invalid_argument("unknown binary op " + std::to_string(op));
  });
}

int fp_unary(int op, const fp_array* a, fp_array** out) {
  return guard([&] {
    const auto& x = a->a;
    switch (op) {
      case FP_EXP: *out = wrap(mx::exp(x)); return;
      case FP_SIGMOID: *out = wrap(mx::sigmoid(x)); return;
      case FP_NEG: *out = wrap(mx::negative(x)); return;
      case FP_SQRT: *out = wrap(mx::sqrt(x)); return;
      case FP_LOG: *out = wrap(mx::log(x)); return;
      case FP_ABS: *out = wrap(mx::abs(x)); return;
      case FP_CEIL: *out = wrap(mx::ceil(x)); return;
      case FP_LOG2: *out = wrap(mx::log2(x)); return;
      case FP_SIGN: *out = wrap(mx::sign(x)); return;
      case FP_TO_FP8: *out = wrap(mx::to_fp8(x)); return;
      case FP_FROM_FP8_F32: *out = wrap(mx::from_fp8(x, mx::float32)); return;
      case FP_TANH: *out = wrap(mx::tanh(x)); return;
      case FP_RSQRT: *out = wrap(mx::rsqrt(x)); return;
    }
    throw std::invalid_argument("unknown unary op " + std::to_string(op));
  });
}

int fp_matmul(const fp_array* a, const fp_array* b, fp_array** out) {
  return guard([&] { *out = wrap(mx::matmul(a->a, b->a)); });
}

int fp_addmm(const fp_array* c, const fp_array* a, const fp_array* b, fp_array** out) {
  return guard([&] { *out = wrap(mx::addmm(c->a, a->a, b->a)); });
}

int fp_where(const fp_array* cond, const fp_array* x, const fp_array* y, fp_array** out) {
  return guard([&] { *out = wrap(mx::where(cond->a, x->a, y->a)); });
}

int fp_contiguous(const fp_array* a, fp_array** out) {
  return guard([&] { *out = wrap(mx::contiguous(a->a)); });
}

int fp_astype(const fp_array* a, int dtype, fp_array** out) {
  return guard([&] { *out = wrap(mx::astype(a->a, to_dtype(dtype))); });
}

int fp_reshape(const fp_array* a, const int32_t* shape, size_t ndim, fp_array** out) {
  return guard([&] { *out = wrap(mx::reshape(a->a, to_shape(shape, ndim))); });
}

int fp_transpose(const fp_array* a, const int32_t* axes, size_t n, fp_array** out) {
  return guard([&] { *out = wrap(mx::transpose(a->a, std::vector<int>(axes, axes + n))); });
}

int fp_concatenate(const fp_array* const* arrays, size_t n, int axis, fp_array** out) {
  return guard([&] {
    std::vector<mx::array> v;
    v.reserve(n);
    for (size_t i = 0; i < n; ++i) v.push_back(arrays[i]->a);
    *out = wrap(mx::concatenate(std::move(v), axis));
  });
}

int fp_slice(const fp_array* a, const int32_t* start, const int32_t* stop, size_t n,
             fp_array** out) {
  return guard([&] { *out = wrap(mx::slice(a->a, to_shape(start, n), to_shape(stop, n))); });
}

int fp_slice_update(const fp_array* src, const fp_array* update, const int32_t* start,
                    const int32_t* stop, size_t n, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::slice_update(src->a, update->a, to_shape(start, n), to_shape(stop, n)));
  });
}

int fp_sum(const fp_array* a, int axis, int keepdims, fp_array** out) {
  return guard([&] { *out = wrap(mx::sum(a->a, axis, keepdims != 0)); });
}

int fp_max(const fp_array* a, int axis, int keepdims, fp_array** out) {
  return guard([&] { *out = wrap(mx::max(a->a, axis, keepdims != 0)); });
}

int fp_mean(const fp_array* a, int axis, int keepdims, fp_array** out) {
  return guard([&] { *out = wrap(mx::mean(a->a, axis, keepdims != 0)); });
}

int fp_gather_mm(const fp_array* a, const fp_array* b, const fp_array* lhs_indices,
                 const fp_array* rhs_indices, int sorted_indices, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::gather_mm(a->a, b->a, opt(lhs_indices), opt(rhs_indices),
                              sorted_indices != 0));
  });
}

int fp_softmax(const fp_array* a, int axis, int precise, fp_array** out) {
  return guard([&] { *out = wrap(mx::softmax(a->a, axis, precise != 0)); });
}

int fp_argpartition(const fp_array* a, int kth, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::argpartition(a->a, kth, axis)); });
}

int fp_argmax(const fp_array* a, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::argmax(a->a, axis)); });
}

int fp_argsort(const fp_array* a, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::argsort(a->a, axis)); });
}

int fp_take(const fp_array* a, const fp_array* indices, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::take(a->a, indices->a, axis)); });
}

int fp_take_along_axis(const fp_array* a, const fp_array* indices, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::take_along_axis(a->a, indices->a, axis)); });
}

int fp_put_along_axis(const fp_array* a, const fp_array* indices, const fp_array* values, int axis,
                      fp_array** out) {
  return guard([&] { *out = wrap(mx::put_along_axis(a->a, indices->a, values->a, axis)); });
}

int fp_topk(const fp_array* a, int k, int axis, fp_array** out) {
  return guard([&] { *out = wrap(mx::topk(a->a, k, axis)); });
}

int fp_quantize(const fp_array* w, int group_size, int bits, fp_array** wq, fp_array** scales,
                fp_array** biases) {
  return guard([&] {
    auto r = mx::quantize(w->a, group_size, bits, "affine");
    if (r.size() != 3) throw std::runtime_error("affine quantize did not return 3 arrays");
    *wq = wrap(r[0]);
    *scales = wrap(r[1]);
    *biases = wrap(r[2]);
  });
}

int fp_dequantize(const fp_array* w, const fp_array* scales, const fp_array* biases,
                  int group_size, int bits, const char* mode, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::dequantize(w->a, scales->a, opt(biases), group_size, bits, mode));
  });
}

int fp_quantized_matmul(const fp_array* x, const fp_array* w, const fp_array* scales,
                        const fp_array* biases, int transpose, int group_size, int bits,
                        const char* mode, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::quantized_matmul(x->a, w->a, scales->a, opt(biases), transpose != 0,
                                     group_size, bits, mode));
  });
}

int fp_gather_qmm(const fp_array* x, const fp_array* w, const fp_array* scales,
                  const fp_array* biases, const fp_array* lhs_indices,
                  const fp_array* rhs_indices, int transpose, int group_size, int bits,
                  const char* mode, int sorted_indices, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::gather_qmm(x->a, w->a, scales->a, opt(biases), opt(lhs_indices),
                               opt(rhs_indices), transpose != 0, group_size, bits, mode,
                               std::nullopt, sorted_indices != 0));
  });
}

int fp_conv1d(const fp_array* x, const fp_array* w, int stride, int padding, int dilation,
              int groups, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::conv1d(x->a, w->a, stride, padding, dilation, groups));
  });
}

int fp_rms_norm(const fp_array* x, const fp_array* weight, float eps, fp_array** out) {
  return guard([&] { *out = wrap(mx::fast::rms_norm(x->a, opt(weight), eps)); });
}

int fp_layer_norm(const fp_array* x, const fp_array* weight, const fp_array* bias, float eps,
                  fp_array** out) {
  return guard([&] { *out = wrap(mx::fast::layer_norm(x->a, opt(weight), opt(bias), eps)); });
}

int fp_rope_freqs(const fp_array* x, int dims, int traditional, float scale, int offset,
                  const fp_array* freqs, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::fast::rope(x->a, dims, traditional != 0, std::nullopt, scale, offset,
                               freqs->a));
  });
}

int fp_rope(const fp_array* x, int dims, int traditional, float base, float scale, int offset,
            fp_array** out) {
  return guard([&] {
    *out = wrap(mx::fast::rope(x->a, dims, traditional != 0, base, scale, offset));
  });
}

int fp_sdpa(const fp_array* q, const fp_array* k, const fp_array* v, float scale,
            const char* mask_mode, const fp_array* mask, const fp_array* sinks, fp_array** out) {
  return guard([&] {
    std::string mode = mask_mode == nullptr ? "" : mask_mode;
    std::optional<mx::array> m;
    if (mask != nullptr) m = mask->a;
    std::optional<mx::array> s;
    if (sinks != nullptr) s = sinks->a;
    *out = wrap(mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, mode, m, s));
  });
}

int fp_default_device_is_gpu(void) {
  return mx::default_device() == mx::Device::gpu ? 1 : 0;
}

int fp_compiled_call(uintptr_t fun_id, const uint64_t* constants, size_t n_const, fp_traced_fn f,
                     void* ctx, fp_array* const* inputs, size_t n_in, fp_array** outputs,
                     size_t max_out, size_t* n_out) {
  return guard([&] {
    std::vector<mx::array> in;
    in.reserve(n_in);
    for (size_t i = 0; i < n_in; ++i) in.push_back(inputs[i]->a);
    // Traced on a cache miss only; a fresh lambda each call, so `ctx` is always this call's.
    auto traced = [f, ctx, max_out](const std::vector<mx::array>& xs) {
      std::vector<fp_array*> handles;
      handles.reserve(xs.size());
      for (const auto& x : xs) handles.push_back(wrap(x));
      std::vector<fp_array*> outs(max_out, nullptr);
      size_t n = 0;
      int rc = f(ctx, handles.data(), handles.size(), outs.data(), max_out, &n);
      for (auto* h : handles) delete h;
      std::vector<mx::array> r;
      for (size_t i = 0; i < max_out; ++i) {
        if (outs[i] != nullptr) {
          if (i < n) r.push_back(outs[i]->a);
          delete outs[i];
        }
      }
      if (rc != 0) throw std::runtime_error("compiled function: " + last_error);
      return r;
    };
    std::vector<uint64_t> c(constants, constants + n_const);
    auto compiled = mx::detail::compile(traced, fun_id, false, std::move(c));
    auto r = compiled(in);
    if (r.size() > max_out) throw std::runtime_error("compiled function: too many outputs");
    for (size_t i = 0; i < r.size(); ++i) outputs[i] = wrap(r[i]);
    *n_out = r.size();
  });
}

int fp_load_safetensors(const char* path, void* ctx, fp_visit visit) {
  return guard([&] {
    auto loaded = mx::load_safetensors(std::string(path));
    // Hand tensors over in name order so callers see a deterministic sequence.
    std::vector<std::pair<std::string, mx::array>> items(loaded.first.begin(),
                                                         loaded.first.end());
    std::sort(items.begin(), items.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    for (auto& [name, arr] : items) visit(ctx, name.c_str(), wrap(std::move(arr)));
  });
}

}  // extern "C"

// ---- Unified-memory placement hints (MLX's CUDA backend) ----
//
// On CUDA, MLX's host-allocated arrays (the expert slot pools) are managed memory. When the host
// writes a slot whose pages sit on the GPU, and the GPU then reads it, each page moves on a page
// fault, one at a time. These hints move a slot's pages in bulk instead: to the host before it
// is written, to the GPU after. They go through the CUDA driver API, which libmlx has loaded
// when (and only when) it runs on CUDA; elsewhere (CPU backend, Metal) they do nothing. They
// never change results: managed memory stays coherent wherever its pages are.
namespace {

#if defined(__linux__)
struct CudaDriver {
  bool ok = false;
  void* ctx = nullptr;
  int (*ctx_set_current)(void*) = nullptr;
  int (*prefetch)(unsigned long long, size_t, int, void*) = nullptr;
  int (*stream_sync)(void*) = nullptr;
  int (*stream_create)(void**, unsigned) = nullptr;
  int (*copy_htod)(unsigned long long, const void*, size_t, void*) = nullptr;
  int (*host_register)(void*, size_t, unsigned) = nullptr;
};

const CudaDriver& cuda_driver() {
  static CudaDriver d = [] {
    CudaDriver d;
    if (std::getenv("FLASHPACK_NO_GPU_HINTS")) return d;
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!h) return d;
    auto retain = reinterpret_cast<int (*)(void**, int)>(dlsym(h, "cuDevicePrimaryCtxRetain"));
    d.ctx_set_current = reinterpret_cast<int (*)(void*)>(dlsym(h, "cuCtxSetCurrent"));
    // The original (CUDA 8) entry point: device ordinal, or -1 for the host.
    d.prefetch = reinterpret_cast<int (*)(unsigned long long, size_t, int, void*)>(
        dlsym(h, "cuMemPrefetchAsync"));
    d.stream_sync = reinterpret_cast<int (*)(void*)>(dlsym(h, "cuStreamSynchronize"));
    d.stream_create = reinterpret_cast<int (*)(void**, unsigned)>(dlsym(h, "cuStreamCreate"));
    d.copy_htod = reinterpret_cast<int (*)(unsigned long long, const void*, size_t, void*)>(
        dlsym(h, "cuMemcpyHtoDAsync_v2"));
    d.host_register =
        reinterpret_cast<int (*)(void*, size_t, unsigned)>(dlsym(h, "cuMemHostRegister_v2"));
    if (!retain || !d.ctx_set_current || !d.prefetch || !d.stream_sync || !d.stream_create ||
        !d.copy_htod)
      return d;
    if (retain(&d.ctx, 0) != 0) return d;
    d.ok = true;
    return d;
  }();
  return d;
}

// This thread's copy stream: made current on the primary context, non-blocking (flag 1), so
// copies and migrations issued here neither wait for MLX's compute streams nor hold them up
// (the legacy default stream would serialize with both). Null when it cannot be made.
void* thread_stream(const CudaDriver& d) {
  thread_local bool ready = false;
  thread_local void* stream = nullptr;
  if (!ready) {
    ready = true;
    if (d.ctx_set_current(d.ctx) != 0) return nullptr;
    if (d.stream_create(&stream, 1) != 0) stream = nullptr;
  }
  return stream;
}
#endif

}  // namespace

int fp_upload(void* const* dsts, const void* const* srcs, const size_t* lens, size_t n) {
#if defined(__linux__)
  const CudaDriver& d = cuda_driver();
  if (!d.ok || std::getenv("FLASHPACK_NO_UPLOAD")) return 0;
  void* s = thread_stream(d);
  if (!s) {
    last_error = "no CUDA copy stream on this thread (cuCtxSetCurrent or cuStreamCreate failed)";
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    if (lens[i] == 0) continue;
    int rc = d.copy_htod(reinterpret_cast<unsigned long long>(dsts[i]), srcs[i], lens[i], s);
    if (rc != 0) {
      d.stream_sync(s);
      last_error = "cuMemcpyHtoDAsync returned CUresult " + std::to_string(rc);
      return -1;
    }
  }
  int rc = d.stream_sync(s);
  if (rc != 0) {
    last_error = "cuStreamSynchronize after the copies returned CUresult " + std::to_string(rc);
    return -1;
  }
  return 1;
#else
  (void)dsts;
  (void)srcs;
  (void)lens;
  (void)n;
  return 0;
#endif
}

int fp_pin_host(void* p, size_t len) {
#if defined(__linux__)
  const CudaDriver& d = cuda_driver();
  if (!d.ok || !d.host_register || len == 0) return 0;
  if (!thread_stream(d)) return -1;
  return d.host_register(p, len, 0) == 0 ? 1 : -1;
#else
  (void)p;
  (void)len;
  return 0;
#endif
}

int fp_upload_available() {
#if defined(__linux__)
  const CudaDriver& d = cuda_driver();
  return d.ok && !std::getenv("FLASHPACK_NO_UPLOAD") ? 1 : 0;
#else
  return 0;
#endif
}

int fp_unified_prefetch(const void* const* ptrs, const size_t* lens, size_t n, int to_gpu) {
#if defined(__linux__)
  const CudaDriver& d = cuda_driver();
  if (!d.ok) return 0;
  void* s = thread_stream(d);
  if (!s) return -1;
  for (size_t i = 0; i < n; ++i) {
    if (lens[i] == 0) continue;
    if (d.prefetch(reinterpret_cast<unsigned long long>(ptrs[i]), lens[i], to_gpu ? 0 : -1, s) !=
        0) {
      return -1;
    }
  }
  return d.stream_sync(s) == 0 ? 1 : -1;
#else
  (void)ptrs;
  (void)lens;
  (void)n;
  (void)to_gpu;
  return 0;
#endif
}

// ---- distributed (issue 32, docs/decisions/0034-pipeline-ranks.md) ----

#include <iostream>
#include <optional>
#include <thread>

#include "mlx/distributed/distributed.h"
#include "mlx/distributed/ops.h"

namespace {

// The process's group, set once by fp_dist_init. The ring backend's send/recv and collectives
// run on the CPU stream whatever the default device is (they dispatch on its command encoder).
std::optional<mx::distributed::Group> dist_group;

mx::distributed::Group& group() {
  if (!dist_group) throw std::runtime_error("distributed: fp_dist_init was not called");
  return *dist_group;
}

int terminate_grace_ms = 0;

[[noreturn]] void on_terminate() {
  std::string what = "unknown exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(terminate_grace_ms));
  std::cerr << "error: the pipeline's connection failed inside MLX: " << what << std::endl;
  std::_Exit(1);
}

}  // namespace

int fp_dist_is_available(const char* backend) {
  try {
    return mx::distributed::is_available(backend) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int fp_dist_init(const char* backend, int* rank, int* size) {
  return guard([&] {
    auto g = mx::distributed::init(true, backend);
    *rank = g.rank();
    *size = g.size();
    dist_group = g;
  });
}

int fp_dist_send(const fp_array* x, int dst, fp_array** out) {
  return guard([&] { *out = wrap(mx::distributed::send(x->a, dst, group(), mx::Device::cpu)); });
}

int fp_dist_recv(const int32_t* shape, size_t ndim, int dtype, int src, fp_array** out) {
  return guard([&] {
    *out = wrap(mx::distributed::recv(to_shape(shape, ndim), to_dtype(dtype), src, group(),
                                      mx::Device::cpu));
  });
}

int fp_dist_all_sum(const fp_array* x, fp_array** out) {
  return guard([&] { *out = wrap(mx::distributed::all_sum(x->a, group(), mx::Device::cpu)); });
}

int fp_dist_all_gather(const fp_array* x, fp_array** out) {
  return guard([&] { *out = wrap(mx::distributed::all_gather(x->a, group(), mx::Device::cpu)); });
}

int fp_depends(const fp_array* x, const fp_array* dep, fp_array** out) {
  return guard([&] { *out = wrap(mx::depends({x->a}, {dep->a})[0]); });
}

void fp_dist_terminate_handler(int grace_ms) {
  terminate_grace_ms = grace_ms;
  std::set_terminate(on_terminate);
}
