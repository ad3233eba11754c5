//! Raw declarations of `src/mlx/shim.h`. Nothing outside `crate::mlx` touches these.

use std::ffi::{c_char, c_int, c_void};

#[repr(C)]
pub struct FpArray {
    _private: [u8; 0],
}

pub type Visit = unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char, a: *mut FpArray);

extern "C" {
    pub fn fp_last_error() -> *const c_char;
    pub fn fp_version() -> *const c_char;
    pub fn fp_set_cache_limit(limit: usize) -> usize;
    pub fn fp_set_wired_limit(limit: usize, previous: *mut usize) -> c_int;
    pub fn fp_active_memory() -> usize;
    pub fn fp_unified_prefetch(
        ptrs: *const *const c_void,
        lens: *const usize,
        n: usize,
        to_gpu: c_int,
    ) -> c_int;
    pub fn fp_upload(
        dsts: *const *mut c_void,
        srcs: *const *const c_void,
        lens: *const usize,
        n: usize,
    ) -> c_int;
    pub fn fp_pin_host(p: *mut c_void, len: usize) -> c_int;
    pub fn fp_upload_available() -> c_int;
    pub fn fp_peak_memory() -> usize;
    pub fn fp_synchronize() -> c_int;
    pub fn fp_clear_cache();
    pub fn fp_free(a: *mut FpArray);
    pub fn fp_clone(a: *const FpArray, out: *mut *mut FpArray) -> c_int;

    pub fn fp_from_data(
        data: *const c_void,
        shape: *const i32,
        ndim: usize,
        dtype: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_scalar(value: f64, dtype: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_zeros(shape: *const i32, ndim: usize, dtype: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_host_buffer(
        shape: *const i32,
        ndim: usize,
        dtype: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_data_ptr(a: *mut FpArray, ptr: *mut *mut c_void, nbytes: *mut usize) -> c_int;

    pub fn fp_ndim(a: *const FpArray, out: *mut usize) -> c_int;
    pub fn fp_shape(a: *const FpArray, out: *mut i32, cap: usize) -> c_int;
    pub fn fp_dtype(a: *const FpArray, out: *mut c_int) -> c_int;
    pub fn fp_read(a: *mut FpArray, out: *mut c_void, nbytes: usize) -> c_int;
    pub fn fp_async_eval(arrays: *const *mut FpArray, n: usize) -> c_int;
    pub fn fp_eval(arrays: *const *mut FpArray, n: usize) -> c_int;

    pub fn fp_binary(
        op: c_int,
        a: *const FpArray,
        b: *const FpArray,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_unary(op: c_int, a: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_matmul(a: *const FpArray, b: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_addmm(
        c: *const FpArray,
        a: *const FpArray,
        b: *const FpArray,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_where(
        cond: *const FpArray,
        x: *const FpArray,
        y: *const FpArray,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_astype(a: *const FpArray, dtype: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_reshape(
        a: *const FpArray,
        shape: *const i32,
        ndim: usize,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_transpose(
        a: *const FpArray,
        axes: *const i32,
        n: usize,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_concatenate(
        arrays: *const *const FpArray,
        n: usize,
        axis: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_slice(
        a: *const FpArray,
        start: *const i32,
        stop: *const i32,
        n: usize,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_slice_update(
        src: *const FpArray,
        update: *const FpArray,
        start: *const i32,
        stop: *const i32,
        n: usize,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_sum(a: *const FpArray, axis: c_int, keepdims: c_int, out: *mut *mut FpArray)
        -> c_int;
    pub fn fp_max(a: *const FpArray, axis: c_int, keepdims: c_int, out: *mut *mut FpArray)
        -> c_int;
    pub fn fp_mean(
        a: *const FpArray,
        axis: c_int,
        keepdims: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_gather_mm(
        a: *const FpArray,
        b: *const FpArray,
        lhs_indices: *const FpArray,
        rhs_indices: *const FpArray,
        sorted_indices: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_softmax(
        a: *const FpArray,
        axis: c_int,
        precise: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_argpartition(
        a: *const FpArray,
        kth: c_int,
        axis: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_argmax(a: *const FpArray, axis: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_argsort(a: *const FpArray, axis: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_take(
        a: *const FpArray,
        indices: *const FpArray,
        axis: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_take_along_axis(
        a: *const FpArray,
        indices: *const FpArray,
        axis: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_put_along_axis(
        a: *const FpArray,
        indices: *const FpArray,
        values: *const FpArray,
        axis: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_topk(a: *const FpArray, k: c_int, axis: c_int, out: *mut *mut FpArray) -> c_int;

    pub fn fp_quantize(
        w: *const FpArray,
        group_size: c_int,
        bits: c_int,
        wq: *mut *mut FpArray,
        scales: *mut *mut FpArray,
        biases: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_dequantize(
        w: *const FpArray,
        scales: *const FpArray,
        biases: *const FpArray,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        out: *mut *mut FpArray,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn fp_quantized_matmul(
        x: *const FpArray,
        w: *const FpArray,
        scales: *const FpArray,
        biases: *const FpArray,
        transpose: c_int,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        out: *mut *mut FpArray,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn fp_gather_qmm(
        x: *const FpArray,
        w: *const FpArray,
        scales: *const FpArray,
        biases: *const FpArray,
        lhs_indices: *const FpArray,
        rhs_indices: *const FpArray,
        transpose: c_int,
        group_size: c_int,
        bits: c_int,
        mode: *const c_char,
        sorted_indices: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;

    pub fn fp_contiguous(a: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_conv1d(
        x: *const FpArray,
        w: *const FpArray,
        stride: c_int,
        padding: c_int,
        dilation: c_int,
        groups: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_rms_norm(
        x: *const FpArray,
        weight: *const FpArray,
        eps: f32,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_layer_norm(
        x: *const FpArray,
        weight: *const FpArray,
        bias: *const FpArray,
        eps: f32,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_rope_freqs(
        x: *const FpArray,
        dims: c_int,
        traditional: c_int,
        scale: f32,
        offset: c_int,
        freqs: *const FpArray,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_rope(
        x: *const FpArray,
        dims: c_int,
        traditional: c_int,
        base: f32,
        scale: f32,
        offset: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_sdpa(
        q: *const FpArray,
        k: *const FpArray,
        v: *const FpArray,
        scale: f32,
        mask_mode: *const c_char,
        mask: *const FpArray,
        sinks: *const FpArray,
        out: *mut *mut FpArray,
    ) -> c_int;

    pub fn fp_load_safetensors(path: *const c_char, ctx: *mut c_void, visit: Visit) -> c_int;

    pub fn fp_default_device_is_gpu() -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn fp_compiled_call(
        fun_id: usize,
        constants: *const u64,
        n_const: usize,
        f: TracedFn,
        ctx: *mut c_void,
        inputs: *const *mut FpArray,
        n_in: usize,
        outputs: *mut *mut FpArray,
        max_out: usize,
        n_out: *mut usize,
    ) -> c_int;
    pub fn fp_dist_init(backend: *const c_char, rank: *mut c_int, size: *mut c_int) -> c_int;
    pub fn fp_dist_is_available(backend: *const c_char) -> c_int;
    pub fn fp_dist_send(x: *const FpArray, dst: c_int, out: *mut *mut FpArray) -> c_int;
    pub fn fp_dist_recv(
        shape: *const i32,
        ndim: usize,
        dtype: c_int,
        src: c_int,
        out: *mut *mut FpArray,
    ) -> c_int;
    pub fn fp_dist_all_sum(x: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_dist_all_gather(x: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_depends(x: *const FpArray, dep: *const FpArray, out: *mut *mut FpArray) -> c_int;
    pub fn fp_dist_terminate_handler(grace_ms: c_int);
}

/// `fp_traced_fn`: see shim.h.
pub type TracedFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    inputs: *const *mut FpArray,
    n_in: usize,
    outputs: *mut *mut FpArray,
    max_out: usize,
    n_out: *mut usize,
) -> c_int;
