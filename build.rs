//! Build script: find MLX (pinned to one release), compile the C++ shim against it, link it.
//!
//! In: the environment (`MLX_DIR`, `FLASHPACK_PYTHON`). Out: `libfpshim.a`, link flags for
//! `libmlx`, and an rpath so `target/*/flashpack` and test binaries run outside cargo.
//! Invariant: the MLX found has exactly version `MLX_VERSION`; a different one is never linked
//! silently (docs/decisions/0001-mlx-binding.md says why and how MLX is found).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The one MLX release flashpack is built and tested against.
const MLX_VERSION: (u32, u32, u32) = (0, 32, 4);

fn main() {
    println!("cargo:rerun-if-changed=src/mlx/shim.cpp");
    println!("cargo:rerun-if-changed=src/mlx/shim.h");
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-env-changed=FLASHPACK_PYTHON");

    let mlx = find_mlx();
    let include = mlx.join("include");
    let lib = mlx.join("lib");

    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("src/mlx/shim.cpp")
        .include(&include)
        .include("src/mlx")
        // MLX's headers trip a few warnings we cannot fix from here.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .compile("fpshim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        // dlopen, for the CUDA driver hints in shim.cpp (part of libc from glibc 2.34 on).
        println!("cargo:rustc-link-lib=dylib=dl");
    }
    // The wheel's libmlx finds its own BLAS through its rpath (`$ORIGIN/../../mlx_cpu.libs`);
    // we only need to point at libmlx itself.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=FLASHPACK_MLX_DIR={}", mlx.display());
}

/// `MLX_DIR`, else the Python `mlx` package, else a pinned wheel installed into `OUT_DIR`.
fn find_mlx() -> PathBuf {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let dir = PathBuf::from(dir);
        if let Err(why) = check_layout(&dir) {
            panic!("MLX_DIR={}: {why}", dir.display());
        }
        if let Err(why) = check_version(&dir) {
            panic!("MLX_DIR={}: {why}", dir.display());
        }
        return dir;
    }

    let python = env::var("FLASHPACK_PYTHON").unwrap_or_else(|_| "python3".to_string());
    match python_mlx(&python) {
        Ok(dir) => match check_layout(&dir).and_then(|()| check_version(&dir)) {
            Ok(()) => return dir,
            Err(why) => println!(
                "cargo:warning=flashpack: Python mlx at {} not usable ({why}); \
                 installing the pinned wheel instead",
                dir.display()
            ),
        },
        Err(why) => println!(
            "cargo:warning=flashpack: no usable Python mlx via `{python}` ({why}); \
             installing the pinned wheel instead"
        ),
    }

    let dir = pip_install(&python);
    if let Err(why) = check_layout(&dir).and_then(|()| check_version(&dir)) {
        panic!("pinned MLX wheel in {}: {why}", dir.display());
    }
    dir
}

/// The folder of the Python `mlx` package. `mlx` is a namespace package (no `__init__.py`, so
/// no `__file__`): take the first entry of `__path__` that holds the C++ library.
fn python_mlx(python: &str) -> Result<PathBuf, String> {
    let out = Command::new(python)
        .args(["-c", "import mlx; print('\\n'.join(mlx.__path__))"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err
            .lines()
            .last()
            .unwrap_or("import mlx failed")
            .to_string());
    }
    let text = String::from_utf8(out.stdout).map_err(|e| e.to_string())?;
    let dirs: Vec<PathBuf> = text.lines().map(|l| PathBuf::from(l.trim())).collect();
    let first = dirs.first().cloned().ok_or("mlx.__path__ is empty")?;
    Ok(dirs
        .into_iter()
        .find(|d| check_layout(d).is_ok())
        .unwrap_or(first))
}

/// `pip install --target OUT_DIR/mlx-wheel` of the wheel that carries libmlx and its headers.
/// Only the backend wheel is needed: the `mlx` wheel itself holds just the Python extension.
fn pip_install(python: &str) -> PathBuf {
    let (major, minor, patch) = MLX_VERSION;
    let wheel = if cfg!(target_os = "macos") {
        "mlx-metal"
    } else {
        "mlx-cpu"
    };
    let spec = format!("{wheel}=={major}.{minor}.{patch}");
    let target = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("mlx-wheel");
    let dir = target.join("mlx");
    if check_layout(&dir).is_ok() && check_version(&dir).is_ok() {
        return dir;
    }
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&target)
        .arg(&spec)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{python} -m pip` to install {spec} ({e}). Install MLX yourself \
                 (`pip install \"mlx[cpu]=={major}.{minor}.{patch}\"`) or set MLX_DIR to a \
                 folder with include/ and lib/"
            )
        });
    if !status.success() {
        panic!(
            "`{python} -m pip install --target {} {spec}` failed ({status}). Set MLX_DIR to an \
             MLX {major}.{minor}.{patch} install (a folder with include/ and lib/), or install \
             `mlx[cpu]=={major}.{minor}.{patch}` into the Python named by FLASHPACK_PYTHON",
            target.display()
        );
    }
    dir
}

fn check_layout(dir: &Path) -> Result<(), String> {
    if !dir.join("include/mlx/mlx.h").is_file() {
        return Err(
            "no include/mlx/mlx.h (on Linux, `pip install mlx` alone has no \
                    library; install `mlx[cpu]`)"
                .to_string(),
        );
    }
    let lib = dir.join("lib");
    let found = ["libmlx.so", "libmlx.dylib"]
        .iter()
        .any(|name| lib.join(name).is_file());
    if !found {
        return Err(format!("no libmlx.so or libmlx.dylib in {}", lib.display()));
    }
    Ok(())
}

fn check_version(dir: &Path) -> Result<(), String> {
    let path = dir.join("include/mlx/version.h");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let field = |name: &str| -> Result<u32, String> {
        text.lines()
            .find_map(|line| {
                let rest = line.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse().ok()
            })
            .ok_or_else(|| format!("no {name} in {}", path.display()))
    };
    let found = (
        field("MLX_VERSION_MAJOR")?,
        field("MLX_VERSION_MINOR")?,
        field("MLX_VERSION_PATCH")?,
    );
    if found != MLX_VERSION {
        return Err(format!(
            "MLX {}.{}.{} found, flashpack needs exactly {}.{}.{}",
            found.0, found.1, found.2, MLX_VERSION.0, MLX_VERSION.1, MLX_VERSION.2
        ));
    }
    Ok(())
}
