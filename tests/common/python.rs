//! Whether python3 imports a module that a live test compares against (`mlx.core`, `mlx_lm`,
//! `openai`). Without it a live test returns early with a note, except under CI
//! (`FLASHPACK_CI=1`, set by .ci/run, which installs them): there the missing module fails the
//! test, so a CI that lost it cannot pass unnoticed.

use std::process::Command;

/// True when `python3 -c "import MODULE"` succeeds. False otherwise, after a note naming what
/// `skipped` leaves out; panics instead when `FLASHPACK_CI=1`.
pub fn python_imports(module: &str, skipped: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("FLASHPACK_CI").is_none_or(|v| v != "1"),
            "FLASHPACK_CI=1 but python3 cannot import {module}, so {skipped} would be skipped; \
             install what .ci/run installs"
        );
        eprintln!("note: python3 cannot import {module}; {skipped} skipped");
    }
    ok
}
