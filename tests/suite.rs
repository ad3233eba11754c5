//! The integration tests, one binary: every file of tests/ is a module here, so the library,
//! MLX, tokenizers and axum are linked once, not once per file, and the test harness runs the
//! files' tests side by side (docs/decisions/0015-one-test-binary.md). Cargo.toml sets
//! `autotests = false`; `every_test_file_is_a_module` fails when a new file is not added below.
//!
//! Live tests compare against Python's MLX, mlx-lm and the openai client: without them they
//! are skipped with a note, unless `FLASHPACK_CI=1` (.ci/run), where that is a failure
//! (`common::python`).

mod common;

// The format, hostile input, codecs.
mod codec_roundtrip;
mod format_spec;
mod hostile;

// The library's layering (docs/architecture.md).
mod layers;

// The command line and the Hub.
mod chat;
mod chat_templates;
mod cli_convert;
mod cli_inspect_verify;
mod compressed_tensors;
mod hub;
mod plan;
mod serve;
mod serve_agents;
mod serve_batch;

// The runtime and quality on the bundled model.
mod engine;
mod expert_store;
mod kv_bits;
mod pressure;
mod quality;
mod run_pack;
mod run_paths;

// Architectures against a live mlx-lm.
mod deepseek_glm;
mod deepseek_v41;
mod distributed;
mod distributed_hub;
mod gemma4;
mod gpt_oss;
mod gpt_oss_attention;
mod kimi_dsa;
mod kimi_k3;
mod minimax;
mod mlx_sources;
mod qwen_hybrid;

/// A test file that is not a module above would never be compiled nor run.
#[test]
fn every_test_file_is_a_module() {
    let here = include_str!("suite.rs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some(module) = name.strip_suffix(".rs") else {
            continue;
        };
        if module != "suite" && !here.contains(&format!("\nmod {module};\n")) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "tests/{missing:?} not in tests/suite.rs: add `mod NAME;` there"
    );
}
