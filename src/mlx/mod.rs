//! Safe Rust over MLX (the one C++ file is `shim.cpp`; decision record:
//! docs/decisions/0001-mlx-binding.md).
//!
//! In: Rust slices, shapes and handles. Out: [`Array`]s, lazy MLX graph nodes that compute when
//! evaluated ([`Array::eval`], [`eval`], or any read). Invariant: every MLX failure (a C++
//! exception inside the shim) comes back as [`Error::Mlx`] with MLX's message; nothing here
//! panics on bad shapes or dtypes.
//!
//! Shapes are `usize` on the Rust side and checked to fit MLX's `i32` dimensions; axes are `i32`
//! so negative axes count from the end as in MLX.
//!
//! # The FFI contract
//!
//! Every `unsafe` block in this module calls `shim.cpp` (declared in `ffi.rs`, documented in
//! `shim.h`) and relies on what the shim guarantees and what this module guarantees in turn; a
//! block's `// SAFETY:` line names only what it adds.
//!
//! The shim:
//! - reads pointer arguments (handles, shapes, data, C strings) only during the call and keeps
//!   none of them afterwards: MLX copies whatever it needs (`fp_from_data` copies its bytes);
//! - never lets a C++ exception cross: a failure returns a non-zero status and leaves its message
//!   in a per-thread buffer that `fp_last_error` returns, NUL-terminated and valid until this
//!   thread's next shim call ([`check`] copies it at once);
//! - writes out-parameters (`out` handles, sizes, dtype codes) only on success, and each handle
//!   it returns is new and owned by the caller, to be released with `fp_free` exactly once;
//! - writes at most the capacity it is given into caller buffers (`fp_shape`, `fp_read`);
//! - treats NULL as "absent" for optional inputs (see `opt_ptr`).
//!
//! This module:
//! - passes only live handles: an [`Array`] owns a non-null handle from the shim until `Drop`
//!   frees it, and `&self` / `&Array` borrows keep it alive for the call;
//! - passes slices with their true lengths, and shapes already checked to fit `i32` (`dims`);
//! - takes ownership of returned handles at once (`make`, `Array::from_raw`, which refuses NULL);
//! - never uses one `Array` from two threads at once (`Array` is `Send`, not `Sync`).

mod ffi;

pub use crate::quant_mode::QuantMode;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::{self, NonNull};

/// Errors from the MLX binding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// MLX rejected an operation (bad shape, dtype, or argument) or failed while computing.
    #[error("MLX {op} failed: {message}")]
    Mlx { op: &'static str, message: String },
    /// A slice's length does not match the element count of the shape given with it.
    #[error("{len} elements given for shape {shape:?}, which holds {expected}")]
    LengthMismatch {
        len: usize,
        shape: Vec<usize>,
        expected: usize,
    },
    /// A typed read or write asked for another dtype than the array has.
    #[error("array has dtype {found:?}, the caller asked for {expected:?}: convert with astype")]
    DtypeMismatch { expected: Dtype, found: Dtype },
    /// A dimension or element count beyond MLX's 32-bit shape limit.
    #[error("dimension {dim} exceeds MLX's limit of {max}", max = i32::MAX)]
    DimTooLarge { dim: usize },
    /// A path with an interior NUL byte cannot be passed to MLX.
    #[error("path {path:?} contains a NUL byte")]
    BadPath { path: String },
    /// MLX returned a dtype this binding does not know (a newer MLX than the pinned one).
    #[error("MLX returned unknown dtype code {code}; rebuild against the pinned MLX")]
    UnknownDtype { code: i32 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Element types, numbered as in `shim.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dtype {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    BF16,
    C64,
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

    /// The code `shim.h` gives this dtype (the wire form of a pipeline's arrays too).
    pub fn code(self) -> c_int {
        Self::ALL.iter().position(|&d| d == self).unwrap_or(0) as c_int
    }

    /// The dtype of a `shim.h` code.
    pub fn from_code(code: c_int) -> Result<Dtype> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or(Error::UnknownDtype { code })
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
}

mod sealed {
    pub trait Sealed {}
}

/// Rust types whose bytes MLX can take as array elements.
pub trait Element: Copy + Default + sealed::Sealed {
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: Dtype = Dtype::$d; }
    )*};
}
element!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32,
    i64 => I64, f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16);

/// The version string of the linked MLX (build.rs pins it).
pub fn version() -> &'static str {
    // SAFETY: MLX returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::fp_version()) }
        .to_str()
        .unwrap_or("unknown")
}

/// `mx.set_cache_limit`: at most `bytes` of freed buffers stay in MLX's cache for reuse (0
/// turns the cache off); returns the previous limit. MLX's default is its memory limit, so on a
/// long run the cache can hold as much as the largest working set ever seen.
pub fn set_cache_limit(bytes: usize) -> usize {
    // SAFETY: plain call into MLX; no pointers cross.
    unsafe { ffi::fp_set_cache_limit(bytes) }
}

/// Asks Metal to keep up to `bytes` of MLX's buffers wired (resident, never paged out), as
/// mlx-lm's `mx.set_wired_limit` does; returns the previous limit. Metal refuses a limit above
/// the device's recommended working set (an error); other backends ignore it.
pub fn set_wired_limit(bytes: usize) -> Result<usize> {
    let mut previous = 0usize;
    // SAFETY: `previous` outlives the call; the shim writes it only on success.
    check("set_wired_limit", unsafe {
        ffi::fp_set_wired_limit(bytes, &mut previous)
    })?;
    Ok(previous)
}

/// Bytes MLX's allocator holds for live arrays now (`mx.get_active_memory`).
pub fn active_memory() -> usize {
    // SAFETY: plain call into MLX; no pointers cross.
    unsafe { ffi::fp_active_memory() }
}

/// The most bytes MLX's allocator held for live arrays at once (`mx.get_peak_memory`).
pub fn peak_memory() -> usize {
    // SAFETY: plain call into MLX; no pointers cross.
    unsafe { ffi::fp_peak_memory() }
}

/// `mx.synchronize()`: waits until everything scheduled on the default stream (an
/// `async_eval` in flight) has run. The expert cache calls it before it replaces slot pools
/// that a scheduled step may still read (a resize under memory pressure), never per token.
pub fn synchronize() -> Result<()> {
    // SAFETY: plain call into MLX; no pointers cross.
    check("synchronize", unsafe { ffi::fp_synchronize() })
}

/// `mx.clear_cache()`: gives the buffers MLX keeps for reuse back to the system (Metal and CUDA
/// keep freed buffers; the CPU backend frees at once, so this does nothing there).
pub fn clear_cache() {
    // SAFETY: plain call into MLX; no pointers cross.
    unsafe { ffi::fp_clear_cache() }
}

/// Moves the pages of these ranges of MLX host-allocated arrays (addresses and lengths from
/// [`Array::data_mut`]) in bulk: to the GPU (`to_gpu`) or to the host. Only MLX's CUDA backend
/// keeps such arrays in managed memory that pages between the two; there a host write into
/// pages on the GPU, or a GPU read of pages on the host, otherwise moves them one page fault at
/// a time. Elsewhere (CPU, Metal's unified memory) it does nothing and returns `false`. A hint:
/// results are the same either way. Set `FLASHPACK_NO_GPU_HINTS` to turn it off.
pub fn unified_prefetch(ranges: &[(usize, usize)], to_gpu: bool) -> bool {
    let ptrs: Vec<*const c_void> = ranges.iter().map(|&(p, _)| p as *const c_void).collect();
    let lens: Vec<usize> = ranges.iter().map(|&(_, n)| n).collect();
    // SAFETY: the shim only passes the addresses to the CUDA driver as a migration hint; it
    // neither reads nor writes through them.
    unsafe {
        ffi::fp_unified_prefetch(ptrs.as_ptr(), lens.as_ptr(), ptrs.len(), to_gpu as c_int) == 1
    }
}

/// Whether [`upload`] copies through the GPU (MLX on CUDA, where the slot pools are managed
/// memory). Elsewhere a slot is plain host-visible memory, written in place.
pub fn upload_available() -> bool {
    // SAFETY: no arguments; the shim only looks up the CUDA driver.
    unsafe { ffi::fp_upload_available() == 1 }
}

/// Copies each `(dst, src, len)` from host memory into device-visible memory (a slot of a pool)
/// with the CUDA driver, on this thread's own non-blocking stream, and waits for the copies.
/// Returns `false` (copying nothing) where no CUDA driver serves, so the caller writes the bytes
/// itself.
///
/// # Safety
/// Each `src` must be readable and each `dst` writable for `len` bytes for the whole call, the
/// ranges must not overlap, and no evaluation may read a `dst` range during the call (the slot
/// invariants of `run::experts`).
pub unsafe fn upload(ranges: &[(usize, usize, usize)]) -> Result<bool> {
    let dsts: Vec<*mut c_void> = ranges.iter().map(|&(d, _, _)| d as *mut c_void).collect();
    let srcs: Vec<*const c_void> = ranges.iter().map(|&(_, s, _)| s as *const c_void).collect();
    let lens: Vec<usize> = ranges.iter().map(|&(_, _, n)| n).collect();
    match ffi::fp_upload(dsts.as_ptr(), srcs.as_ptr(), lens.as_ptr(), ranges.len()) {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::Mlx {
            op: "upload",
            message: format!(
                "the CUDA driver refused a host-to-device copy into an expert slot ({}); \
                 FLASHPACK_NO_UPLOAD=1 writes slots from the host instead",
                // SAFETY: the shim keeps a valid NUL-terminated message per thread.
                CStr::from_ptr(ffi::fp_last_error()).to_string_lossy()
            ),
        }),
    }
}

/// Page-locks `len` bytes at `p` for faster [`upload`]s (CUDA only; `false` where not done).
///
/// # Safety
/// `p..p+len` must be one live allocation that outlives every upload from it; it is never
/// unlocked, so it must not be freed while the process keeps using CUDA.
pub unsafe fn pin_host(p: *mut u8, len: usize) -> bool {
    ffi::fp_pin_host(p.cast(), len) == 1
}

/// Turn a shim status into a Result, fetching the thread-local message on failure.
fn check(op: &'static str, status: c_int) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the shim keeps a valid NUL-terminated message per thread until the next call.
    let message = unsafe { CStr::from_ptr(ffi::fp_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Mlx { op, message })
}

/// Call a shim function that produces one array.
fn make(op: &'static str, f: impl FnOnce(*mut *mut ffi::FpArray) -> c_int) -> Result<Array> {
    let mut out = ptr::null_mut();
    check(op, f(&mut out))?;
    Array::from_raw(op, out)
}

fn dims(shape: &[usize]) -> Result<Vec<i32>> {
    shape
        .iter()
        .map(|&d| i32::try_from(d).map_err(|_| Error::DimTooLarge { dim: d }))
        .collect()
}

fn element_count(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |n, &d| {
        n.checked_mul(d).ok_or(Error::DimTooLarge { dim: d })
    })
}

fn opt_ptr(a: Option<&Array>) -> *const ffi::FpArray {
    a.map_or(ptr::null(), |a| a.raw())
}

/// An owned handle to one MLX array (a node of MLX's lazy graph). Dropping it releases the
/// handle; the data lives on while other arrays still depend on it.
pub struct Array {
    raw: NonNull<ffi::FpArray>,
}

// SAFETY: the handle owns an `mlx::core::array`, a `shared_ptr` to its node; moving that to
// another thread is sound (the count is atomic). It is not `Sync`: evaluating mutates the node
// without a lock, so two threads must not use one array at once.
unsafe impl Send for Array {}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is released exactly once, here.
        unsafe { ffi::fp_free(self.raw.as_ptr()) }
    }
}

impl Clone for Array {
    /// Another handle to the same node (no copy of the data).
    fn clone(&self) -> Self {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("clone", |out| unsafe { ffi::fp_clone(self.raw(), out) })
            .expect("copying an MLX handle only fails when out of memory")
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Array")
            .field("shape", &self.shape())
            .field("dtype", &self.dtype())
            .finish()
    }
}

/// Arrays made through the shim so far (op outputs and constants), process-wide.
static ARRAYS_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many arrays this process has made through the shim: the host's graph building, counted
/// (each op output and constant is one; a step's count is what the host built for it).
pub fn arrays_made() -> u64 {
    ARRAYS_MADE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Array {
    fn from_raw(op: &'static str, raw: *mut ffi::FpArray) -> Result<Array> {
        ARRAYS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        NonNull::new(raw)
            .map(|raw| Array { raw })
            .ok_or(Error::Mlx {
                op,
                message: "shim returned no array".to_string(),
            })
    }

    /// Gives the handle away (to the shim, which then owns it).
    fn into_raw(self) -> *mut ffi::FpArray {
        let raw = self.raw.as_ptr();
        std::mem::forget(self);
        raw
    }

    fn raw(&self) -> *const ffi::FpArray {
        self.raw.as_ptr()
    }

    /// Copy `data` (row-major) into a new array of `shape`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Array> {
        let expected = element_count(shape)?;
        if data.len() != expected {
            return Err(Error::LengthMismatch {
                len: data.len(),
                shape: shape.to_vec(),
                expected,
            });
        }
        let dims = dims(shape)?;
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("from_slice", |out| unsafe {
            ffi::fp_from_data(
                data.as_ptr().cast::<c_void>(),
                dims.as_ptr(),
                dims.len(),
                T::DTYPE.code(),
                out,
            )
        })
    }

    /// Copy little-endian `bytes` holding `shape` elements of `dtype` into a new array (any
    /// alignment: the shim copies).
    pub fn from_bytes(bytes: &[u8], shape: &[usize], dtype: Dtype) -> Result<Array> {
        let expected = element_count(shape)?;
        if bytes.len() != expected * dtype.size() {
            return Err(Error::LengthMismatch {
                len: bytes.len() / dtype.size().max(1),
                shape: shape.to_vec(),
                expected,
            });
        }
        let dims = dims(shape)?;
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("from_bytes", |out| unsafe {
            ffi::fp_from_data(
                bytes.as_ptr().cast::<c_void>(),
                dims.as_ptr(),
                dims.len(),
                dtype.code(),
                out,
            )
        })
    }

    /// A 0-d array holding `value` converted to `dtype`.
    pub fn scalar(value: f64, dtype: Dtype) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("scalar", |out| unsafe {
            ffi::fp_scalar(value, dtype.code(), out)
        })
    }

    /// Zeros of `shape` (lazy; MLX may store one element broadcast, so never write into it).
    pub fn zeros(shape: &[usize], dtype: Dtype) -> Result<Array> {
        let dims = dims(shape)?;
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("zeros", |out| unsafe {
            ffi::fp_zeros(dims.as_ptr(), dims.len(), dtype.code(), out)
        })
    }

    /// A zero-filled, row-contiguous array with its own host memory, ready for [`Self::data_mut`].
    /// This is the expert cache's slot pool: Rust writes experts into it between evaluations.
    pub fn host_buffer(shape: &[usize], dtype: Dtype) -> Result<Array> {
        element_count(shape)?;
        let dims = dims(shape)?;
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("host_buffer", |out| unsafe {
            ffi::fp_host_buffer(dims.as_ptr(), dims.len(), dtype.code(), out)
        })
    }

    /// The array's bytes, writable in place.
    ///
    /// Works on arrays made by [`Self::host_buffer`] (any evaluated array that is row-contiguous
    /// and owns its elements is accepted; others are an error).
    ///
    /// # Safety
    /// MLX does not know about these writes. The caller must make sure that:
    /// - no evaluation that reads this array runs while the slice is being written (an eval on
    ///   another thread, or an `async_eval` in flight);
    /// - every array computed from this one that must see the *old* bytes has been evaluated
    ///   before writing; lazy (unevaluated) arrays built on this one will read the *new* bytes
    ///   when they are evaluated later;
    /// - no other handle to the same data (a [`Clone`], a reshape or slice view) is used to
    ///   read while writing.
    ///
    /// MLX never reuses ("donates") this buffer for an op's output while this handle is alive,
    /// because donation needs the input to have no other owner.
    pub unsafe fn data_mut(&mut self) -> Result<&mut [u8]> {
        let mut p = ptr::null_mut();
        let mut n = 0usize;
        check(
            "data_mut",
            ffi::fp_data_ptr(self.raw.as_ptr(), &mut p, &mut n),
        )?;
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: the shim checked the array is evaluated, row-contiguous and owns `n` bytes at
        // `p`; `&mut self` keeps this handle (and so the buffer) alive and unaliased in Rust for
        // the slice's lifetime. The caller upholds the MLX-side rules above.
        Ok(std::slice::from_raw_parts_mut(p.cast::<u8>(), n))
    }

    pub fn ndim(&self) -> usize {
        let mut n = 0usize;
        // fp_ndim cannot fail on a valid handle.
        // SAFETY: FFI contract (module docs); `n` is ours and outlives the call.
        let _ = unsafe { ffi::fp_ndim(self.raw(), &mut n) };
        n
    }

    pub fn shape(&self) -> Vec<usize> {
        let mut dims = vec![0i32; self.ndim()];
        // SAFETY: FFI contract (module docs); `dims` holds `dims.len()` writable slots, the shim writes at most that many.
        let _ = unsafe { ffi::fp_shape(self.raw(), dims.as_mut_ptr(), dims.len()) };
        dims.into_iter().map(|d| d.max(0) as usize).collect()
    }

    /// Size of axis `axis` (negative counts from the end), or `None` when out of range.
    pub fn dim(&self, axis: i32) -> Option<usize> {
        let shape = self.shape();
        let n = shape.len() as i64;
        let i = if axis < 0 {
            n + axis as i64
        } else {
            axis as i64
        };
        usize::try_from(i).ok().and_then(|i| shape.get(i).copied())
    }

    pub fn size(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn dtype(&self) -> Dtype {
        let mut code = 0;
        // SAFETY: FFI contract (module docs); `code` is ours and outlives the call.
        let _ = unsafe { ffi::fp_dtype(self.raw(), &mut code) };
        Dtype::from_code(code).unwrap_or(Dtype::Bool)
    }

    /// Compute this array now.
    pub fn eval(&self) -> Result<()> {
        eval(&[self])
    }

    /// Evaluate and copy out the elements in row-major order; `T` must match the dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let found = self.dtype();
        if found != T::DTYPE {
            return Err(Error::DtypeMismatch {
                expected: T::DTYPE,
                found,
            });
        }
        let mut v = vec![T::default(); self.size()];
        let nbytes = std::mem::size_of_val(v.as_slice());
        // SAFETY: FFI contract (module docs); `v` holds exactly `nbytes` writable bytes, the shim writes at most that many.
        check("read", unsafe {
            ffi::fp_read(self.raw.as_ptr(), v.as_mut_ptr().cast::<c_void>(), nbytes)
        })?;
        Ok(v)
    }

    /// Evaluate, convert to f32 and copy out in row-major order.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.astype(Dtype::F32)?.to_vec::<f32>()
    }

    fn binary(&self, op: c_int, name: &'static str, other: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make(name, |out| unsafe {
            ffi::fp_binary(op, self.raw(), other.raw(), out)
        })
    }

    fn unary(&self, op: c_int, name: &'static str) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make(name, |out| unsafe { ffi::fp_unary(op, self.raw(), out) })
    }

    /// Element-wise with broadcasting, as in MLX (and NumPy).
    pub fn add(&self, other: &Array) -> Result<Array> {
        self.binary(0, "add", other)
    }
    pub fn sub(&self, other: &Array) -> Result<Array> {
        self.binary(1, "subtract", other)
    }
    pub fn mul(&self, other: &Array) -> Result<Array> {
        self.binary(2, "multiply", other)
    }
    pub fn div(&self, other: &Array) -> Result<Array> {
        self.binary(3, "divide", other)
    }
    pub fn floor_div(&self, other: &Array) -> Result<Array> {
        self.binary(4, "floor_divide", other)
    }
    pub fn maximum(&self, other: &Array) -> Result<Array> {
        self.binary(5, "maximum", other)
    }
    pub fn minimum(&self, other: &Array) -> Result<Array> {
        self.binary(7, "minimum", other)
    }
    /// `log(exp(a) + exp(b))`, as `mx.logaddexp` (mlx.nn.softplus is `logaddexp(x, 0)`).
    pub fn logaddexp(&self, other: &Array) -> Result<Array> {
        self.binary(6, "logaddexp", other)
    }
    /// `mx.power(self, other)`.
    pub fn power(&self, other: &Array) -> Result<Array> {
        self.binary(8, "power", other)
    }
    /// `self > other` (bool).
    pub fn greater(&self, other: &Array) -> Result<Array> {
        self.binary(9, "greater", other)
    }
    /// `self >= other` (bool).
    pub fn greater_equal(&self, other: &Array) -> Result<Array> {
        self.binary(10, "greater_equal", other)
    }
    /// `self < other` (bool).
    pub fn less(&self, other: &Array) -> Result<Array> {
        self.binary(11, "less", other)
    }
    pub fn exp(&self) -> Result<Array> {
        self.unary(0, "exp")
    }
    pub fn abs(&self) -> Result<Array> {
        self.unary(5, "abs")
    }
    pub fn ceil(&self) -> Result<Array> {
        self.unary(6, "ceil")
    }
    pub fn log2(&self) -> Result<Array> {
        self.unary(7, "log2")
    }
    pub fn sign(&self) -> Result<Array> {
        self.unary(8, "sign")
    }
    /// `mx.to_fp8`: float values rounded to FP8 E4M3 codes (u8).
    pub fn to_fp8(&self) -> Result<Array> {
        self.unary(9, "to_fp8")
    }
    /// `mx.from_fp8(self, mx.float32)`: FP8 E4M3 codes (u8) as f32 values.
    pub fn from_fp8_f32(&self) -> Result<Array> {
        self.unary(10, "from_fp8")
    }
    pub fn sigmoid(&self) -> Result<Array> {
        self.unary(1, "sigmoid")
    }
    pub fn neg(&self) -> Result<Array> {
        self.unary(2, "negative")
    }
    pub fn sqrt(&self) -> Result<Array> {
        self.unary(3, "sqrt")
    }
    pub fn log(&self) -> Result<Array> {
        self.unary(4, "log")
    }
    pub fn tanh(&self) -> Result<Array> {
        self.unary(11, "tanh")
    }
    /// `mx.rsqrt(self)`: `1 / sqrt(x)`, one op (not `sqrt` then a division).
    pub fn rsqrt(&self) -> Result<Array> {
        self.unary(12, "rsqrt")
    }
    /// `x * sigmoid(x)`, spelled as mlx.nn.silu spells it.
    pub fn silu(&self) -> Result<Array> {
        self.mul(&self.sigmoid()?)
    }

    pub fn matmul(&self, other: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("matmul", |out| unsafe {
            ffi::fp_matmul(self.raw(), other.raw(), out)
        })
    }

    /// `self + a @ b` in one op (what mlx.nn.Linear computes when it has a bias).
    pub fn addmm(&self, a: &Array, b: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("addmm", |out| unsafe {
            ffi::fp_addmm(self.raw(), a.raw(), b.raw(), out)
        })
    }

    /// `cond ? x : y` element-wise with broadcasting; `self` is the condition.
    pub fn select(&self, x: &Array, y: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("where", |out| unsafe {
            ffi::fp_where(self.raw(), x.raw(), y.raw(), out)
        })
    }

    /// A row-major copy when this is a view (`mx.contiguous`): a slice that should not keep its
    /// whole source buffer alive.
    pub fn contiguous(&self) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("contiguous", |out| unsafe {
            ffi::fp_contiguous(self.raw(), out)
        })
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("astype", |out| unsafe {
            ffi::fp_astype(self.raw(), dtype.code(), out)
        })
    }

    /// New shape with the same elements; one entry may be -1 (inferred).
    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("reshape", |out| unsafe {
            ffi::fp_reshape(self.raw(), shape.as_ptr(), shape.len(), out)
        })
    }

    /// Permute axes (`axes[i]` is the input axis that becomes output axis `i`).
    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("transpose", |out| unsafe {
            ffi::fp_transpose(self.raw(), axes.as_ptr(), axes.len(), out)
        })
    }

    /// Insert a size-1 axis at `axis`.
    pub fn expand_dims(&self, axis: i32) -> Result<Array> {
        let mut shape: Vec<i32> = dims(&self.shape())?;
        let n = shape.len() as i32 + 1;
        let at = if axis < 0 { axis + n } else { axis };
        if !(0..n).contains(&at) {
            return Err(Error::Mlx {
                op: "expand_dims",
                message: format!("axis {axis} out of range for {} dims", n - 1),
            });
        }
        shape.insert(at as usize, 1);
        self.reshape(&shape)
    }

    /// `a[start[0]..stop[0], start[1]..stop[1], ...]` with unit strides, one range per axis.
    pub fn slice(&self, start: &[i32], stop: &[i32]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(Error::Mlx {
                op: "slice",
                message: format!("{} starts but {} stops", start.len(), stop.len()),
            });
        }
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("slice", |out| unsafe {
            ffi::fp_slice(self.raw(), start.as_ptr(), stop.as_ptr(), start.len(), out)
        })
    }

    /// A copy of `self` with `self[start..stop] = update`.
    pub fn slice_update(&self, update: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(Error::Mlx {
                op: "slice_update",
                message: format!("{} starts but {} stops", start.len(), stop.len()),
            });
        }
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("slice_update", |out| unsafe {
            ffi::fp_slice_update(
                self.raw(),
                update.raw(),
                start.as_ptr(),
                stop.as_ptr(),
                start.len(),
                out,
            )
        })
    }

    pub fn sum(&self, axis: i32, keepdims: bool) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("sum", |out| unsafe {
            ffi::fp_sum(self.raw(), axis, keepdims as c_int, out)
        })
    }

    /// `mx.max(self, axis, keepdims)`.
    pub fn max(&self, axis: i32, keepdims: bool) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("max", |out| unsafe {
            ffi::fp_max(self.raw(), axis, keepdims as c_int, out)
        })
    }

    /// `mx.mean(self, axis, keepdims)`, as MLX computes it (its own op, so the same rounding).
    pub fn mean(&self, axis: i32, keepdims: bool) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("mean", |out| unsafe {
            ffi::fp_mean(self.raw(), axis, keepdims as c_int, out)
        })
    }

    /// Softmax along `axis`; `precise` computes in f32 for half-precision inputs.
    pub fn softmax(&self, axis: i32, precise: bool) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("softmax", |out| unsafe {
            ffi::fp_softmax(self.raw(), axis, precise as c_int, out)
        })
    }

    /// Indices that partition along `axis` so position `kth` holds its sorted element.
    pub fn argpartition(&self, kth: i32, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("argpartition", |out| unsafe {
            ffi::fp_argpartition(self.raw(), kth, axis, out)
        })
    }

    /// Index of the largest element along `axis` (the first one on ties), as u32.
    pub fn argmax(&self, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("argmax", |out| unsafe {
            ffi::fp_argmax(self.raw(), axis, out)
        })
    }

    pub fn argsort(&self, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("argsort", |out| unsafe {
            ffi::fp_argsort(self.raw(), axis, out)
        })
    }

    /// Rows of `self` along `axis` at `indices` (an embedding lookup with axis 0).
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("take", |out| unsafe {
            ffi::fp_take(self.raw(), indices.raw(), axis, out)
        })
    }

    pub fn take_along_axis(&self, indices: &Array, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("take_along_axis", |out| unsafe {
            ffi::fp_take_along_axis(self.raw(), indices.raw(), axis, out)
        })
    }

    /// `mx.put_along_axis`: a copy of `self` with `values` (broadcast to `indices`) written at
    /// `indices` along `axis`.
    pub fn put_along_axis(&self, indices: &Array, values: &Array, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("put_along_axis", |out| unsafe {
            ffi::fp_put_along_axis(self.raw(), indices.raw(), values.raw(), axis, out)
        })
    }

    /// `mx.topk`: the `k` largest values along `axis`, in no particular order.
    pub fn topk(&self, k: i32, axis: i32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("topk", |out| unsafe {
            ffi::fp_topk(self.raw(), k, axis, out)
        })
    }
}

/// Evaluate several arrays in one graph walk (shared inputs computed once).
/// `mx.async_eval`: schedule the evaluation of `arrays` and return at once. Reading one of
/// them (or evaluating anything that depends on them) waits for it. The expert pools' rule
/// still holds: no host write into an array that a scheduled evaluation may read.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let raws: Vec<*mut ffi::FpArray> = arrays.iter().map(|a| a.raw.as_ptr()).collect();
    // SAFETY: FFI contract (module docs); `raws` are live handles borrowed for the call.
    check("async_eval", unsafe {
        ffi::fp_async_eval(raws.as_ptr(), raws.len())
    })
}

pub fn eval(arrays: &[&Array]) -> Result<()> {
    let raws: Vec<*mut ffi::FpArray> = arrays.iter().map(|a| a.raw.as_ptr()).collect();
    // SAFETY: FFI contract (module docs); `raws` are live handles borrowed for the call.
    check("eval", unsafe { ffi::fp_eval(raws.as_ptr(), raws.len()) })
}

/// `mx.conv1d(x, w, stride, padding, dilation, groups)`: `x` `[N, L, C_in]` (channels last),
/// `w` `[C_out, K, C_in / groups]`; mlx.nn.Conv1d without a bias.
pub fn conv1d(
    x: &Array,
    w: &Array,
    stride: i32,
    padding: i32,
    dilation: i32,
    groups: i32,
) -> Result<Array> {
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("conv1d", |out| unsafe {
        ffi::fp_conv1d(x.raw(), w.raw(), stride, padding, dilation, groups, out)
    })
}

pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let raws: Vec<*const ffi::FpArray> = arrays.iter().map(|a| a.raw()).collect();
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("concatenate", |out| unsafe {
        ffi::fp_concatenate(raws.as_ptr(), raws.len(), axis, out)
    })
}

/// An MLX-quantized matrix (or stack of matrices): per group of `group_size` values along the
/// last axis, `w ~= scales * q + biases` (affine), `q` packed `32 / bits` to a `u32`; or
/// mxfp4/mxfp8 float codes times a power-of-two u8 scale, without biases.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// `u32`, `[..., out, in * bits / 32]`.
    pub weight: Array,
    /// `[..., out, in / group_size]`.
    pub scales: Array,
    /// `[..., out, in / group_size]`; absent only for modes without biases.
    pub biases: Option<Array>,
    pub group_size: i32,
    pub bits: i32,
    pub mode: QuantMode,
}

/// MLX's name of `mode`, as a C string for the shim.
fn mode_name(mode: QuantMode) -> &'static CStr {
    match mode {
        QuantMode::Affine => c"affine",
        QuantMode::Mxfp4 => c"mxfp4",
        QuantMode::Mxfp8 => c"mxfp8",
        QuantMode::Nvfp4 => c"nvfp4",
    }
}

impl QuantizedMatrix {
    /// Number of input features (unpacked last-axis width).
    pub fn input_dims(&self) -> Option<usize> {
        let groups = self.scales.dim(-1)?;
        groups.checked_mul(usize::try_from(self.group_size).ok()?)
    }
}

/// `mx.quantize(w, group_size, bits)` in affine mode.
pub fn quantize(w: &Array, group_size: i32, bits: i32) -> Result<QuantizedMatrix> {
    let (mut q, mut s, mut b) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
    // SAFETY: FFI contract (module docs); the three out-params are written only on success.
    check("quantize", unsafe {
        ffi::fp_quantize(w.raw(), group_size, bits, &mut q, &mut s, &mut b)
    })?;
    Ok(QuantizedMatrix {
        weight: Array::from_raw("quantize", q)?,
        scales: Array::from_raw("quantize", s)?,
        biases: Some(Array::from_raw("quantize", b)?),
        group_size,
        bits,
        mode: QuantMode::Affine,
    })
}

/// `mx.dequantize`: back to the dtype of the scales.
pub fn dequantize(m: &QuantizedMatrix) -> Result<Array> {
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("dequantize", |out| unsafe {
        ffi::fp_dequantize(
            m.weight.raw(),
            m.scales.raw(),
            opt_ptr(m.biases.as_ref()),
            m.group_size,
            m.bits,
            mode_name(m.mode).as_ptr(),
            out,
        )
    })
}

/// `x @ W.T` (`transpose`) or `x @ W` with a quantized `W`, as `mx.quantized_matmul`.
pub fn quantized_matmul(x: &Array, w: &QuantizedMatrix, transpose: bool) -> Result<Array> {
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("quantized_matmul", |out| unsafe {
        ffi::fp_quantized_matmul(
            x.raw(),
            w.weight.raw(),
            w.scales.raw(),
            opt_ptr(w.biases.as_ref()),
            transpose as c_int,
            w.group_size,
            w.bits,
            mode_name(w.mode).as_ptr(),
            out,
        )
    })
}

/// `mx.gather_qmm`: batched quantized matmul where batch `i` multiplies `x[lhs_indices[i]]` by
/// matrix `w[rhs_indices[i]]` of a stack `[E, out, in*bits/32]`. `sorted_indices` promises that
/// `rhs_indices` is sorted (MLX then walks each matrix once).
pub fn gather_qmm(
    x: &Array,
    w: &QuantizedMatrix,
    lhs_indices: Option<&Array>,
    rhs_indices: Option<&Array>,
    transpose: bool,
    sorted_indices: bool,
) -> Result<Array> {
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("gather_qmm", |out| unsafe {
        ffi::fp_gather_qmm(
            x.raw(),
            w.weight.raw(),
            w.scales.raw(),
            opt_ptr(w.biases.as_ref()),
            opt_ptr(lhs_indices),
            opt_ptr(rhs_indices),
            transpose as c_int,
            w.group_size,
            w.bits,
            mode_name(w.mode).as_ptr(),
            sorted_indices as c_int,
            out,
        )
    })
}

/// `mx.gather_mm(a, b, lhs_indices, rhs_indices, sorted_indices)`: plain (unquantized)
/// matrices picked per batch entry (mlx.nn's `SwitchLinear`).
pub fn gather_mm(
    a: &Array,
    b: &Array,
    lhs_indices: Option<&Array>,
    rhs_indices: Option<&Array>,
    sorted_indices: bool,
) -> Result<Array> {
    // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
    make("gather_mm", |out| unsafe {
        ffi::fp_gather_mm(
            a.raw(),
            b.raw(),
            opt_ptr(lhs_indices),
            opt_ptr(rhs_indices),
            sorted_indices as c_int,
            out,
        )
    })
}

/// MLX's distributed module (`mlx::core::distributed`) on one group per process: [`dist::init`]
/// starts a backend (the ring backend reads `MLX_HOSTFILE` and `MLX_RANK`, as `mlx.launch`
/// sets them) and every op after it runs on that group. Ops are lazy like every other: a
/// [`dist::send`]'s array must be evaluated for its bytes to leave. The ring backend sends only
/// to a rank's two neighbours in the ring, and a receive waits for its bytes with no timeout:
/// callers keep their own watchdog (`run::pipeline`).
pub mod dist {
    use super::*;

    /// The process's place in the group.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Group {
        pub rank: usize,
        pub size: usize,
    }

    /// Whether this libmlx was built with `backend` ("ring", "jaccl", "mpi", "nccl", "any").
    pub fn is_available(backend: &str) -> bool {
        let Ok(name) = CString::new(backend) else {
            return false;
        };
        // SAFETY: `name` is a NUL-terminated string borrowed for the call.
        unsafe { ffi::fp_dist_is_available(name.as_ptr()) == 1 }
    }

    /// Starts `backend` strictly (MLX throws, and this returns the message, when its
    /// configuration is missing or a peer cannot be reached). Blocks until every rank of the
    /// ring has connected: the ring backend accepts its left neighbour with no timeout.
    pub fn init(backend: &str) -> Result<Group> {
        let name = CString::new(backend).map_err(|_| Error::Mlx {
            op: "distributed init",
            message: "backend name with a NUL byte".into(),
        })?;
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: `name` borrowed for the call; `rank` and `size` written on success.
        check("distributed init", unsafe {
            ffi::fp_dist_init(name.as_ptr(), &mut rank, &mut size)
        })?;
        Ok(Group {
            rank: rank as usize,
            size: size as usize,
        })
    }

    /// Sends `x` to rank `dst` (a ring neighbour); evaluate the result to send.
    pub fn send(x: &Array, dst: usize) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("send", |out| unsafe {
            ffi::fp_dist_send(x.raw(), dst as c_int, out)
        })
    }

    /// Receives an array of `shape` and `dtype` from rank `src` (a ring neighbour).
    pub fn recv(shape: &[usize], dtype: Dtype, src: usize) -> Result<Array> {
        let dims = dims(shape)?;
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("recv", |out| unsafe {
            ffi::fp_dist_recv(dims.as_ptr(), dims.len(), dtype.code(), src as c_int, out)
        })
    }

    /// The element-wise sum of `x` over every rank.
    pub fn all_sum(x: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("all_sum", |out| unsafe {
            ffi::fp_dist_all_sum(x.raw(), out)
        })
    }

    /// Every rank's `x`, concatenated along the first axis in rank order.
    pub fn all_gather(x: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("all_gather", |out| unsafe {
            ffi::fp_dist_all_gather(x.raw(), out)
        })
    }

    /// `x`, computed only after `dep` (`mx.depends`).
    pub fn depends(x: &Array, dep: &Array) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("depends", |out| unsafe {
            ffi::fp_depends(x.raw(), dep.raw(), out)
        })
    }

    /// An exception that escapes one of MLX's threads (the ring backend's "connection to a
    /// peer was lost") then ends the process with exit status 1 and the message after
    /// `grace_ms`, instead of aborting, leaving a watchdog time to name the peer first.
    pub fn exit_on_backend_failure(grace_ms: u32) {
        // SAFETY: installs a process-wide terminate handler; no pointers cross.
        unsafe { ffi::fp_dist_terminate_handler(grace_ms.min(i32::MAX as u32) as c_int) }
    }
}

/// MLX's fused kernels (`mx.fast`).
pub mod fast {
    use super::*;

    /// `x / sqrt(mean(x^2) + eps) * weight` over the last axis.
    pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("rms_norm", |out| unsafe {
            ffi::fp_rms_norm(x.raw(), opt_ptr(weight), eps, out)
        })
    }

    /// `(x - mean(x)) / sqrt(var(x) + eps) * weight + bias` over the last axis (`nn.LayerNorm`).
    pub fn layer_norm(
        x: &Array,
        weight: Option<&Array>,
        bias: Option<&Array>,
        eps: f32,
    ) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("layer_norm", |out| unsafe {
            ffi::fp_layer_norm(x.raw(), opt_ptr(weight), opt_ptr(bias), eps, out)
        })
    }

    /// Rotary position embedding over the first `dims` features of the last axis, positions
    /// starting at `offset`. `traditional` rotates adjacent pairs; otherwise the two halves.
    pub fn rope(
        x: &Array,
        dims: i32,
        traditional: bool,
        base: f32,
        scale: f32,
        offset: i32,
    ) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("rope", |out| unsafe {
            ffi::fp_rope(
                x.raw(),
                dims,
                traditional as c_int,
                base,
                scale,
                offset,
                out,
            )
        })
    }

    /// `mx.fast.rope(x, dims, traditional, base=None, scale, offset, freqs)`: rotary embedding
    /// with one frequency per rotated pair given explicitly (YaRN's).
    pub fn rope_freqs(
        x: &Array,
        dims: i32,
        traditional: bool,
        scale: f32,
        offset: i32,
        freqs: &Array,
    ) -> Result<Array> {
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("rope_freqs", |out| unsafe {
            ffi::fp_rope_freqs(
                x.raw(),
                dims,
                traditional as c_int,
                scale,
                offset,
                freqs.raw(),
                out,
            )
        })
    }

    /// What the attention may look at.
    #[derive(Debug, Clone, Copy)]
    pub enum Mask<'a> {
        None,
        /// Query `i` of `L` sees keys up to `K - L + i` (queries are the last `L` positions).
        Causal,
        /// Boolean (keep) or additive mask broadcastable to `[B, heads, L, K]`.
        Array(&'a Array),
    }

    /// `softmax(q k^T * scale + mask) v` with `q` `[B, Hq, L, D]`, `k`/`v` `[B, Hkv, K, D]`;
    /// grouped-query attention when `Hq` is a multiple of `Hkv`.
    pub fn scaled_dot_product_attention(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
    ) -> Result<Array> {
        scaled_dot_product_attention_sinks(q, k, v, scale, mask, None)
    }

    /// [`scaled_dot_product_attention`] with attention sinks (`mx.fast.scaled_dot_product_attention(
    /// ..., sinks=)`): `sinks` `[Hq]` adds one logit per query head to each softmax, a logit
    /// with no value, so it only takes weight away from the keys (gpt-oss).
    pub fn scaled_dot_product_attention_sinks(
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: Mask<'_>,
        sinks: Option<&Array>,
    ) -> Result<Array> {
        let (mode, arr): (&CStr, *const ffi::FpArray) = match mask {
            Mask::None => (c"", ptr::null()),
            Mask::Causal => (c"causal", ptr::null()),
            Mask::Array(a) => (c"array", a.raw()),
        };
        // SAFETY: FFI contract (module docs); inputs borrowed for the call, `out` set on success.
        make("scaled_dot_product_attention", |out| unsafe {
            ffi::fp_sdpa(
                q.raw(),
                k.raw(),
                v.raw(),
                scale,
                mode.as_ptr(),
                arr,
                opt_ptr(sinks),
                out,
            )
        })
    }
}

/// Whether MLX's default device is a GPU (Metal or CUDA), where kernel launches cost enough for
/// [`compiled`] to pay.
pub fn default_device_is_gpu() -> bool {
    // SAFETY: no arguments; reads MLX's default device.
    unsafe { ffi::fp_default_device_is_gpu() != 0 }
}

/// Names one function for [`compiled`]: a `static` of this type (its address is the id MLX
/// caches the compiled graph under, as mlx's Python binding uses a function's id).
pub struct CompileId(#[allow(dead_code)] u8);

impl CompileId {
    pub const fn new() -> CompileId {
        CompileId(0)
    }
}

impl Default for CompileId {
    fn default() -> Self {
        CompileId::new()
    }
}

/// A function of arrays to compile, as [`compiled`] takes it.
pub type ArrayFn<'a> = dyn Fn(&[Array]) -> Result<Vec<Array>> + 'a;

/// `mx.compile(f)(*inputs)`: MLX traces `f` once per (`id`, `constants`, input shapes and
/// types) and afterwards replays the traced graph, with its elementwise ops fused into single
/// kernels. `f` must read arrays only from its arguments (any other array would be baked in
/// as a constant of the first trace) and everything else that shapes its graph must be in
/// `constants`. At most `max_out` outputs.
pub fn compiled(
    id: &'static CompileId,
    constants: &[u64],
    inputs: &[&Array],
    max_out: usize,
    f: &ArrayFn<'_>,
) -> Result<Vec<Array>> {
    struct Ctx<'a, 'b> {
        f: &'a ArrayFn<'b>,
        err: Option<Error>,
    }
    unsafe extern "C" fn trampoline(
        ctx: *mut c_void,
        inputs: *const *mut ffi::FpArray,
        n_in: usize,
        outputs: *mut *mut ffi::FpArray,
        max_out: usize,
        n_out: *mut usize,
    ) -> c_int {
        // SAFETY: `ctx` is the `Ctx` below, alive and exclusively ours for the whole call.
        let ctx = unsafe { &mut *ctx.cast::<Ctx<'_, '_>>() };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let xs = (0..n_in)
                .map(|i| {
                    let mut out = ptr::null_mut();
                    // SAFETY: the shim hands `n_in` valid handles, borrowed for this call.
                    check("compiled input", unsafe {
                        ffi::fp_clone(*inputs.add(i), &mut out)
                    })?;
                    Array::from_raw("compiled input", out)
                })
                .collect::<Result<Vec<_>>>()?;
            (ctx.f)(&xs)
        }));
        let err = match run {
            Ok(Ok(outs)) if outs.len() <= max_out => {
                // SAFETY: `n_out` and `max_out` output slots are the shim's, valid for the call.
                unsafe { *n_out = outs.len() };
                for (i, a) in outs.into_iter().enumerate() {
                    // SAFETY: as above: slot `i < outs.len() <= max_out` of the shim's output array.
                    unsafe { *outputs.add(i) = a.into_raw() };
                }
                return 0;
            }
            Ok(Ok(outs)) => Error::Mlx {
                op: "compiled",
                message: format!("{} outputs, at most {max_out} allowed", outs.len()),
            },
            Ok(Err(e)) => e,
            Err(_) => Error::Mlx {
                op: "compiled",
                message: "the compiled function panicked".into(),
            },
        };
        ctx.err = Some(err);
        1
    }
    let mut ctx = Ctx { f, err: None };
    let raw_in: Vec<*mut ffi::FpArray> = inputs.iter().map(|a| a.raw() as *mut _).collect();
    let mut raw_out: Vec<*mut ffi::FpArray> = vec![ptr::null_mut(); max_out];
    let mut n_out = 0usize;
    // SAFETY: every pointer is valid for the call; the shim only reads the inputs and writes
    // at most `max_out` new handles, which we own afterwards.
    let status = unsafe {
        ffi::fp_compiled_call(
            id as *const CompileId as usize,
            constants.as_ptr(),
            constants.len(),
            trampoline,
            (&mut ctx as *mut Ctx<'_, '_>).cast(),
            raw_in.as_ptr(),
            raw_in.len(),
            raw_out.as_mut_ptr(),
            max_out,
            &mut n_out,
        )
    };
    if status != 0 {
        return Err(match ctx.err.take() {
            Some(e) => e,
            None => check("compiled", status).err().unwrap_or(Error::Mlx {
                op: "compiled",
                message: "failed".into(),
            }),
        });
    }
    raw_out
        .into_iter()
        .take(n_out)
        .map(|p| Array::from_raw("compiled", p))
        .collect()
}

/// Load every tensor of a `.safetensors` file with MLX's own loader (lazy: bytes are read when
/// an array is first evaluated).
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, Array>> {
    let text = path.to_string_lossy().into_owned();
    let c_path = CString::new(text.clone()).map_err(|_| Error::BadPath { path: text })?;
    let mut map: BTreeMap<String, Array> = BTreeMap::new();

    unsafe extern "C" fn visit(ctx: *mut c_void, name: *const c_char, a: *mut ffi::FpArray) {
        // SAFETY: `ctx` is the `map` below, alive and exclusively borrowed for the whole call;
        // `name` is a valid C string for the duration of this callback.
        let map = unsafe { &mut *ctx.cast::<BTreeMap<String, Array>>() };
        // SAFETY: `name` is a valid C string for the duration of this callback (see above).
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        if let Some(raw) = NonNull::new(a) {
            map.insert(name, Array { raw });
        }
    }

    // SAFETY: FFI contract (module docs); `map` outlives the call and `visit` treats `ctx` as it.
    check("load_safetensors", unsafe {
        ffi::fp_load_safetensors(
            c_path.as_ptr(),
            (&mut map as *mut BTreeMap<String, Array>).cast::<c_void>(),
            visit,
        )
    })?;
    Ok(map)
}

#[cfg(test)]
mod tests;
