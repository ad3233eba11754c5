//! Shared test helpers: small packs built with the real writer, and re-signing of edited bytes;
//! the other helpers are submodules.
#![allow(dead_code)]

pub mod fixtures;
pub mod http;
pub mod hub_server;
pub mod mlx_lm;
pub mod python;

use std::path::{Path, PathBuf};

use flashpack::format::{
    codec_id, segment_part_lens, DType, ExpertSegmentDesc, Header, PackWriter, ProjBits, QuantMode,
    SectionKind, TensorDesc, HEADER_SIZE, SECTION_ENTRY_SIZE,
};
use serde_json::json;

/// Every file under `dir`, at any depth.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `flashpack chat PACK --stats --max-tokens 3 --temperature 0 EXTRA...` over two turns ("Hi",
/// then "Bye", then `/exit`): each turn's stats line as JSON, and the whole stderr. The chat must
/// succeed.
pub fn chat_two_turns(pack: &Path, extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "chat",
            pack.to_str().unwrap(),
            "--stats",
            "--max-tokens",
            "3",
        ])
        .args(["--temperature", "0"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi\nBye\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", pack.display());
    let turns = stderr
        .lines()
        .filter(|l| l.starts_with('{') && !l.contains("prefill_tokens"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (turns, stderr)
}

pub const HIDDEN: u32 = 128;
pub const INTER: u32 = 128;

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A normalized qwen3_moe model record (metadata key `model`) of `layers` sparse layers of
/// `experts` experts, `HIDDEN` wide with experts of `INTER` rows and a 16-token vocabulary:
/// the shapes of the packs these helpers write.
pub fn model(layers: usize, experts: usize) -> serde_json::Value {
    let config = json!({
        "model_type": "qwen3_moe", "hidden_size": HIDDEN, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 16,
        "intermediate_size": INTER, "moe_intermediate_size": INTER, "num_experts": experts,
        "num_experts_per_tok": 1,
    });
    let cfg = flashpack::arch::ModelConfig::from_json(&config).unwrap();
    serde_json::to_value(cfg).unwrap()
}

/// Metadata for the pack [`write_small_pack`] writes (2 layers of 2 experts).
pub fn metadata() -> serde_json::Value {
    json!({
        "format": "flashpack",
        "architecture": "qwen3_moe",
        "config": {"model_type": "qwen3_moe"},
        "model": model(2, 2),
        "quantization": {"group_size": 64, "expert_bits": 4, "dense_bits": 16, "mode": "affine"},
        "provenance": {"source": "test", "tool": "flashpack"},
        "tokenizer": null,
    })
}

/// Writes a pack with 2 dense tensors and 2 layers x 2 experts, the second expert of each
/// layer split into 2 segments. Returns its path.
pub fn write_small_pack(dir: &Path, page_size: u32) -> PathBuf {
    write_small_pack_with_bits(dir, page_size, |_, _| ProjBits::uniform(4))
}

/// [`write_small_pack`] with the bits of each (layer, expert) from `bits`.
pub fn write_small_pack_with_bits(
    dir: &Path,
    page_size: u32,
    bits: impl Fn(u32, u32) -> ProjBits,
) -> PathBuf {
    write_small_pack_full(dir, page_size, bits, None)
}

/// [`write_small_pack`] whose experts carry projection biases of type `bias` (formats/flashpack-v1.md
/// §6.4), the metadata saying so (`model.expert_bias`).
pub fn write_small_pack_with_biases(dir: &Path, bias: DType) -> PathBuf {
    write_small_pack_full(dir, 4096, |_, _| ProjBits::uniform(4), Some(bias))
}

fn write_small_pack_full(
    dir: &Path,
    page_size: u32,
    bits: impl Fn(u32, u32) -> ProjBits,
    bias: Option<DType>,
) -> PathBuf {
    let path = dir.join("small.flashpack");
    let mut w = PackWriter::create(&path, page_size, HIDDEN, INTER).unwrap();
    w.add_tensor(
        TensorDesc {
            name: "model.embed_tokens.weight".into(),
            dtype: DType::BF16,
            shape: vec![16, HIDDEN as u64],
            bits: 0,
            group_size: 0,
            mode: QuantMode::Affine,
            codec: codec_id::RAW,
        },
        &noise(1, 16 * HIDDEN as usize * 2),
    )
    .unwrap();
    w.add_tensor(
        TensorDesc {
            name: "model.norm.weight".into(),
            dtype: DType::F32,
            shape: vec![HIDDEN as u64],
            bits: 0,
            group_size: 0,
            mode: QuantMode::Affine,
            codec: codec_id::RAW,
        },
        &noise(2, HIDDEN as usize * 4),
    )
    .unwrap();
    for layer in 0..2u32 {
        for expert in 0..2u32 {
            let segments: u16 = if expert == 1 { 2 } else { 1 };
            let rows = INTER / segments as u32;
            for segment in 0..segments {
                let b = bits(layer, expert);
                let (wl, al) =
                    segment_part_lens(HIDDEN, rows, b, 64, DType::BF16, QuantMode::Affine).unwrap();
                let bl =
                    flashpack::format::expert_bias_len(HIDDEN, rows, segment == 0, bias).unwrap();
                let seed = (layer * 100 + expert * 10 + segment as u32) as u64;
                w.add_expert_segment(
                    ExpertSegmentDesc {
                        layer,
                        expert,
                        segment,
                        segment_count: segments,
                        row_start: rows * segment as u32,
                        row_count: rows,
                        bits: b,
                        group_size: 64,
                        scale_dtype: DType::BF16,
                        mode: QuantMode::Affine,
                        weight_codec: codec_id::RAW,
                        aux_codec: codec_id::RAW,
                        bias_dtype: bias,
                    },
                    &noise(seed, wl as usize),
                    &noise(seed + 1000, (al + bl) as usize),
                )
                .unwrap();
            }
        }
    }
    let mut meta = metadata();
    if bias.is_some() {
        meta["model"]["expert_bias"] = true.into();
    }
    w.finish(&meta).unwrap();
    path
}

/// Recomputes the checksums of the hashed sections and of the header after a test edited
/// bytes on purpose, so that the reader's deeper checks are reached.
pub fn resign(bytes: &mut [u8]) {
    let Some(header) = Header::decode_unchecked(bytes) else {
        return; // too damaged to re-sign
    };
    for (i, s) in header.sections.iter().enumerate() {
        let hashed = SectionKind::from_code(s.kind).is_some_and(|k| k.hashed());
        if !hashed {
            continue;
        }
        let start = s.offset as usize;
        let Some(end) = s.offset.checked_add(s.stored_len).map(|e| e as usize) else {
            continue;
        };
        if end > bytes.len() {
            continue;
        }
        let h = blake3::hash(&bytes[start..end]);
        let at = HEADER_SIZE + i * SECTION_ENTRY_SIZE + 32;
        bytes[at..at + 32].copy_from_slice(h.as_bytes());
    }
    let n = header.sections.len();
    let hashed = Header::hashed_len(n);
    if hashed + 32 > bytes.len() {
        return;
    }
    let h = blake3::hash(&bytes[..hashed]);
    bytes[hashed..hashed + 32].copy_from_slice(h.as_bytes());
}

/// Rewrites the metadata section of a pack the reference writer wrote (METADATA is its last
/// section) with `edit` applied to its JSON, and re-signs it: how tests craft packs whose
/// metadata breaks the format's rules while every checksum holds.
pub fn edit_metadata(bytes: &mut Vec<u8>, edit: impl FnOnce(&mut serde_json::Value)) {
    let at = section_entry_at(bytes, SectionKind::Metadata);
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (offset, len) = (
        u64_at(bytes, at + 8) as usize,
        u64_at(bytes, at + 16) as usize,
    );
    assert_eq!(
        offset + len,
        bytes.len(),
        "METADATA must be the last section"
    );
    let json = zstd::bulk::decompress(&bytes[offset..], 1 << 30).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut v);
    let json = serde_json::to_vec(&v).unwrap();
    let stored = zstd::bulk::compress(&json, 3).unwrap();
    bytes.truncate(offset);
    bytes.extend_from_slice(&stored);
    bytes[at + 16..at + 24].copy_from_slice(&(stored.len() as u64).to_le_bytes());
    bytes[at + 24..at + 32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    let file_size = bytes.len() as u64;
    bytes[40..48].copy_from_slice(&file_size.to_le_bytes());
    resign(bytes);
}

/// Offset of the section table entry of `kind`.
pub fn section_entry_at(bytes: &[u8], kind: SectionKind) -> usize {
    let header = Header::decode_unchecked(bytes).unwrap();
    let i = header
        .sections
        .iter()
        .position(|s| s.kind == kind as u32)
        .unwrap();
    HEADER_SIZE + i * SECTION_ENTRY_SIZE
}

/// The bundled trained model (fixtures/qwen3moe-tiny) converted with default options, as
/// `flashpack convert` writes it: a small pack that `flashpack run` can run. Returns its path.
/// [`tiny_pack`] with every part Huffman-coded (`--codec huffman`), for tests of that codec's
/// damage paths (`auto` stores the tiny model's experts raw).
pub fn tiny_pack_huffman(dir: &Path) -> PathBuf {
    let opts = flashpack::convert::ConvertOptions {
        codec: flashpack::codec::CodecChoice::Fixed(flashpack::codec::Codec::Huffman),
        ..flashpack::convert::ConvertOptions::default()
    };
    tiny_pack_with(&dir.join("tiny-huffman.flashpack"), &opts)
}

pub fn tiny_pack(dir: &Path) -> PathBuf {
    tiny_pack_with(
        &dir.join("tiny.flashpack"),
        &flashpack::convert::ConvertOptions::default(),
    )
}

/// The bundled tiny model converted with `opts` to `out`.
fn tiny_pack_with(out: &Path, opts: &flashpack::convert::ConvertOptions) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    let ck = flashpack::convert::load::Checkpoint::open(&src).unwrap();
    flashpack::convert::convert_checkpoint(
        &ck,
        out,
        opts,
        &flashpack::progress::Silent,
        std::time::Instant::now(),
    )
    .unwrap();
    out.to_path_buf()
}

/// Runs the `flashpack` binary with `args` (and `envs`).
pub fn flashpack_cli(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

/// The calibration and evaluation texts of the `every_stage` tests, cut to their first 1,200
/// characters and written into `dir`: those tests profile and evaluate tiny models on the CPU,
/// where whole files cost tens of seconds of MLX's bf16 quantized matmuls and check nothing
/// more. Returns (calibration, evaluation).
pub fn short_texts(dir: &Path) -> (PathBuf, PathBuf) {
    texts_of(dir, 1200)
}

/// [`short_texts`] cut to their first `chars` characters.
pub fn texts_of(dir: &Path, chars: usize) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let head = |from: &str, to: &str| {
        let t = std::fs::read_to_string(root.join(from)).unwrap();
        let cut = t.char_indices().nth(chars).map_or(t.len(), |(i, _)| i);
        let path = dir.join(to);
        std::fs::write(&path, &t[..cut]).unwrap();
        path
    };
    (
        head("fixtures/calibration/prose.txt", "calibration.txt"),
        head("fixtures/eval/prose.txt", "eval.txt"),
    )
}
