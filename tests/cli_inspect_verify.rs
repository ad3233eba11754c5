//! `flashpack inspect` and `flashpack verify` from the outside: output, exit codes, damage names.

use std::process::Command;

use crate::common::*;

fn flashpack(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_json_reports_sizes_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 16384);
    let out = flashpack(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "qwen3_moe");
    assert_eq!(v["page_size"], 16384);
    assert_eq!(v["segments"], 6);
    assert_eq!(v["experts_per_layer"]["0"], 2);
    // raw 4-bit codes with bf16 group-64 scales and biases: 4 + 2*16/64 = 4.5 bits per weight
    assert_eq!(v["experts"]["bits_per_weight"], 4.5);
    assert_eq!(
        v["expert_bits"]["4-bit"]["weights"],
        2 * (128 + 128) * 3 * 128
    );
    assert_eq!(v["required_features"][0], "VERTICAL_SEGMENTS");
    let text = flashpack(&["inspect", path.to_str().unwrap()]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("bits/weight"));
}

#[test]
fn verify_passes_then_names_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 4096);
    let out = flashpack(&["verify", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pack = flashpack::format::Pack::open(&path).unwrap();
    let seg = pack.expert_segments(0, 1)[0].clone();
    drop(pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[seg.offset as usize + 7] ^= 4;
    std::fs::write(&path, &bytes).unwrap();
    let out = flashpack(&["verify", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layer 0, expert 1, segment 0"), "{err}");
}

#[test]
fn errors_and_usage_have_their_exit_codes() {
    let out = flashpack(&["inspect", "/nonexistent/model.flashpack"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.flashpack"));
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.flashpack");
    std::fs::write(&junk, b"this is not a pack at all, just some words of text").unwrap();
    let out = flashpack(&["verify", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a .flashpack file"));
    let out = flashpack(&["inspect", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_codecs_recodes_a_packs_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 4096);
    let out = flashpack(&[
        "bench",
        "codecs",
        path.to_str().unwrap(),
        "--rounds",
        "1",
        "--codecs",
        "huffman,raw",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["codec"] == "huffman" && r["dataset"].as_str().unwrap().contains("4-bit")),
        "{rows:?}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `flashpack inspect P | head`: the reader is gone before flashpack writes. The process
    // ends on SIGPIPE like other Unix tools, not with a panic about a failed print.
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 16384);
    for args in [vec!["inspect"], vec!["inspect", "--json"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args(&args)
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert!(
                out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
                "{args:?}: {:?}",
                out.status
            );
        }
    }
}

#[test]
fn an_error_names_its_cause_once() {
    for cmd in [
        vec!["inspect", "/nonexistent/x.flashpack"],
        vec!["verify", "/nonexistent/x.flashpack"],
        vec!["run", "/nonexistent/x.flashpack", "--prompt", "x"],
    ] {
        let out = flashpack(&cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{cmd:?}: {err}"
        );
    }
}

#[test]
fn inspect_escapes_control_characters_from_the_metadata() {
    // The provenance records the source folder's name; a crafted one must not reach the
    // terminal as an escape sequence or a forged line.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("evil\u{1b}[2J\nsource        forged");
    std::fs::create_dir(&src).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    let pack = dir.path().join("p.flashpack");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&pack)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = flashpack(&["inspect", pack.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        !out.stdout.contains(&0x1b),
        "an escape byte reached the output"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("source  ")).count(),
        1,
        "{text}"
    );
    assert!(text.contains("\\u{1b}[2J\\nsource"), "{text}");
}

/// `bench serve --batch-only` (what `scripts/bench_gpu.sh batch` runs on the GPU, issue 27 item
/// 6): one row per batch size, batch 1 always first as the reference, and no other section.
#[test]
fn bench_serve_times_the_batch_sizes_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack(dir.path());
    let p = pack.to_str().unwrap();
    let args = [
        "bench",
        "serve",
        p,
        "--batch-only",
        "--batch-sizes",
        "3",
        "--reps",
        "1",
        "--json",
    ];
    let out = flashpack(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["batch"].as_array().unwrap();
    let sizes: Vec<u64> = rows
        .iter()
        .map(|r| r["sequences"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1, 3], "{report}");
    assert_eq!(rows[0]["throughput_vs_1"].as_f64(), Some(1.0), "{report}");
    for r in rows {
        let ms = r["step_ms"].as_f64().unwrap();
        let tps = r["tokens_per_s"].as_f64().unwrap();
        let b = r["sequences"].as_f64().unwrap();
        assert!(ms > 0.0, "{report}");
        assert!((tps - b * 1e3 / ms).abs() < 1e-6 * tps, "{report}");
    }
    assert!(report.get("prefix_reuse").is_none(), "{report}");
    let out = flashpack(&["bench", "serve", p, "--batch-only", "--batch-sizes", "0"]);
    assert_eq!(out.status.code(), Some(2));
}
