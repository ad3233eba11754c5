//! `flashpack convert` from the outside: a pack appears, the JSON report, exit codes, and no
//! file left behind on bad input.

use std::path::Path;
use std::process::Command;

use crate::common::fixtures::FixtureSpec;
use flashpack::arch::Arch;
use flashpack::format::Pack;

fn flashpack(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn converts_and_reports_json() {
    let src = tempfile::tempdir().unwrap();
    FixtureSpec::tiny(Arch::Mixtral).write(src.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let o = flashpack(&[
        "convert",
        s(src.path()),
        "-o",
        s(&dest),
        "--json",
        "--codec",
        "huffman",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "mixtral");
    assert_eq!(v["pack_bytes"], std::fs::metadata(&dest).unwrap().len());
    assert_eq!(v["pack"]["segments"], 16);
    let bpw = v["pack"]["experts"]["bits_per_weight"].as_f64().unwrap();
    // 4-bit codes + bf16 scale and bias per 64 weights = 4.5 bits before Huffman.
    assert!(bpw > 3.0 && bpw <= 4.5, "{bpw}");
    assert!(Pack::open(&dest).unwrap().verify().is_ok());
    // The human report names the sizes and bits per weight.
    let dest2 = out.path().join("m2.flashpack");
    let o = flashpack(&[
        "convert",
        s(src.path()),
        "-o",
        s(&dest2),
        "--quiet",
        "--dense-bits",
        "8",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("bits/weight") && text.contains("source"),
        "{text}"
    );
}

#[test]
fn bad_input_exits_1_with_a_message_and_leaves_no_file() {
    let src = tempfile::tempdir().unwrap();
    FixtureSpec::tiny(Arch::Qwen3Moe).write(src.path()).unwrap();
    let cfg = src.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("qwen3_moe", "llama4");
    std::fs::write(&cfg, text).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("m.flashpack");
    let o = flashpack(&["convert", s(src.path()), "-o", s(&dest)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("llama4") && err.contains("qwen3_moe, mixtral"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    // Inconsistent quality options are refused up front, as usage errors.
    let o = flashpack(&["convert", s(src.path()), "-o", s(&dest), "--cold-bits", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cold-fraction"));
    let o = flashpack(&[
        "convert",
        s(src.path()),
        "-o",
        s(&dest),
        "--codec",
        "brotli",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--codec brotli"));
    assert!(!dest.exists());
}

#[test]
fn destinations_that_would_lose_data_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of the bundled model, so that nothing of the fixture can be harmed.
    let src = dir.path().join("tiny");
    std::fs::create_dir(&src).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    let shard = src.join("model-00004-of-00004.safetensors");
    let before = std::fs::read(&shard).unwrap();
    let link = dir.path().join("link.flashpack");
    std::os::unix::fs::symlink(&shard, &link).unwrap();
    let fifo = dir.path().join("fifo.flashpack");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let newdir = format!("{}/newdir/", dir.path().display());
    let missing = dir.path().join("no/such/folder/m.flashpack");
    for (dest, says) in [
        (s(&shard).to_string(), "a file of the source"),
        (
            s(&src.join("config.json")).to_string(),
            "a file of the source",
        ),
        (s(&link).to_string(), "a file of the source"),
        (s(&fifo).to_string(), "not a regular file"),
        ("/dev/null".to_string(), "not a regular file"),
        (newdir, "ends with a slash"),
        (s(&missing).to_string(), "does not exist"),
    ] {
        let out = flashpack(&["convert", s(&src), "-o", &dest, "--quiet"]);
        assert_eq!(out.status.code(), Some(1), "{dest}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{dest}: {err}");
    }
    assert_eq!(
        std::fs::read(&shard).unwrap(),
        before,
        "the source shard changed"
    );
    assert!(std::fs::read_link(&link).is_ok(), "the link was replaced");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".flashpack-tmp-")
        })
        .collect();
    assert!(leftovers.is_empty());

    // A new pack inside the source folder is fine, and gets the umask's permissions.
    // SAFETY: umask only sets this process's file mode mask (inherited by the child).
    let old = unsafe { libc::umask(0o022) };
    let inside = src.join("packed.flashpack");
    let out = flashpack(&["convert", s(&src), "-o", s(&inside), "--quiet"]);
    unsafe { libc::umask(old) };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&inside).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".flashpack-tmp-"))
        .collect()
}

#[test]
fn an_interrupted_convert_leaves_no_temp_file_and_stale_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the conversion is still writing when the signal comes.
    let src = dir.path().join("src");
    FixtureSpec {
        hidden_size: 512,
        num_layers: 4,
        num_experts: 32,
        top_k: 4,
        moe_intermediate_size: 512,
        ..FixtureSpec::tiny(Arch::Qwen3Moe)
    }
    .write(&src)
    .unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let dest = out_dir.join("m.flashpack");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args(["convert", s(&src), "-o", s(&dest), "--quiet"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the temporary pack to appear, then interrupt.
        let started = std::time::Instant::now();
        while temp_files(&out_dir).is_empty() && started.elapsed().as_secs() < 60 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(sig) {
            assert!(
                temp_files(&out_dir).is_empty(),
                "{sig}: {:?}",
                temp_files(&out_dir)
            );
            assert!(!dest.exists());
        } else {
            // It finished before the signal: nothing to clean up either way.
            assert!(status.success());
            std::fs::remove_file(&dest).unwrap();
        }
    }

    // A temporary file of a process that is gone (as after kill -9) is removed, and said so.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = out_dir.join(format!(".flashpack-tmp-{pid}-abc123"));
    std::fs::write(&stale, b"partial pack").unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(["convert", s(&tiny), "-o", s(&dest)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("removed {}", stale.display())),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(temp_files(&out_dir).is_empty());
}

#[test]
fn an_invalid_tokenizer_fails_the_convert_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(src.join("tokenizer.json"), r#"{"model":5}"#).unwrap();
    let dest = dir.path().join("m.flashpack");
    let out = flashpack(&["convert", s(&src), "-o", s(&dest), "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokenizer.json is not a tokenizer"), "{err}");
    assert!(!dest.exists());
}
