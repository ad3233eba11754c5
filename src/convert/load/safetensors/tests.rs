//! Hand-made headers: each fault the loader must refuse, by exact variant.

use super::*;
use crate::arch::ArchError;
use std::path::Path;

/// A file with header `json` (as written, not re-serialized) and `data_len` data bytes.
fn file(json: &str, data_len: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

fn err(json: &str, data_len: usize) -> LoadError {
    parse(Path::new("x.safetensors"), &file(json, data_len)).unwrap_err()
}

#[test]
fn parses_what_the_writer_writes() {
    let tensors = vec![
        ("b".to_string(), Dtype::Bf16, vec![2, 3]),
        ("a".to_string(), Dtype::U32, vec![4]),
    ];
    let mut bytes = serialize_header(&tensors).unwrap();
    assert_eq!(bytes.len() % 8, 0);
    let start = bytes.len();
    bytes.resize(start + 12 + 16, 7);
    let got = parse(Path::new("x"), &bytes).unwrap();
    assert_eq!(got[0].name, "a");
    assert_eq!(got[0].range, start + 12..start + 28);
    assert_eq!(
        (got[1].dtype, &got[1].shape[..]),
        (Dtype::Bf16, &[2, 3][..])
    );
    assert_eq!(got[1].range, start..start + 12);
}

#[test]
fn metadata_is_skipped() {
    let json =
        r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let got = parse(Path::new("x"), &file(json, 8)).unwrap();
    assert_eq!(got.len(), 1);
}

#[test]
fn rejects_a_name_twice_over_the_same_bytes() {
    // The crate alone accepts this file (it keeps the second entry); a first-wins reader
    // would see F32 [2] where we see BF16 [4].
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#;
    assert!(matches!(err(json, 8), LoadError::DuplicateName { tensor, .. } if tensor == "a"));
}

#[test]
fn rejects_a_name_twice_over_other_bytes() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#;
    assert!(matches!(err(json, 16), LoadError::DuplicateName { tensor, .. } if tensor == "a"));
}

#[test]
fn rejects_overlapping_tensors() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let e = err(json, 12);
    assert!(
        matches!(&e, LoadError::TensorsOverlap { first, second, begin: 4, end: 8, .. }
            if first == "a" && second == "b"),
        "{e}"
    );
}

#[test]
fn rejects_bytes_that_belong_to_no_tensor() {
    let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    let e = err(gap, 12);
    assert!(
        matches!(&e, LoadError::BadHeader { detail, .. } if detail.contains("4..8")),
        "{e}"
    );
    let trailing = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let e = err(trailing, 6);
    assert!(
        matches!(&e, LoadError::BadHeader { detail, .. } if detail.contains("2 bytes after")),
        "{e}"
    );
}

#[test]
fn rejects_a_tensor_past_the_end() {
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let e = err(json, 10);
    assert!(
        matches!(&e, LoadError::TensorOutOfBounds { tensor, end: 16, data_len: 10, .. } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn rejects_a_size_that_disagrees_with_the_shape() {
    let json = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let e = err(json, 8);
    assert!(
        matches!(&e, LoadError::SizeMismatch { tensor, expected: 12, found: 8, .. } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn names_the_tensor_of_a_malformed_entry() {
    let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w.q":{"dtype":"Q4","shape":[1],"data_offsets":[4,5]}}"#;
    let e = err(json, 5);
    assert!(
        matches!(&e, LoadError::BadHeader { detail, .. } if detail.contains("\"w.q\"")),
        "{e}"
    );
    let json = r#"{"w.k":{"dtype":"F32","data_offsets":[0,4]}}"#;
    let e = err(json, 4);
    assert!(
        matches!(&e, LoadError::BadHeader { detail, .. } if detail.contains("\"w.k\"")),
        "{e}"
    );
}

#[test]
fn rejects_a_dtype_flashpack_does_not_read() {
    let json = r#"{"a":{"dtype":"F8_E4M3FNUZ","shape":[4],"data_offsets":[0,4]}}"#;
    let e = err(json, 4);
    assert!(
        matches!(&e, LoadError::UnsupportedDtype { tensor, dtype, .. } if tensor == "a" && dtype == "F8_E4M3FNUZ"),
        "{e}"
    );
}

#[test]
fn rejects_short_and_cut_headers() {
    let e = parse(Path::new("x"), &[1, 2, 3]).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::Truncated {
                needed: 8,
                file_len: 3,
                ..
            }
        ),
        "{e}"
    );
    let mut b = file(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    b.truncate(20);
    let e = parse(Path::new("x"), &b).unwrap_err();
    assert!(
        matches!(e, LoadError::Truncated { file_len: 20, .. }),
        "{e}"
    );
    let mut b = file("{}", 0);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = parse(Path::new("x"), &b).unwrap_err();
    assert!(matches!(e, LoadError::BadHeader { .. }), "{e}");
}

#[test]
fn reads_the_shard_index() {
    let text = r#"{"metadata": {"total_size": 8}, "weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
    let index = ShardIndex::parse(text).unwrap();
    assert_eq!(index.shards(), ["m-1.safetensors", "m-2.safetensors"]);
    assert!(ShardIndex::parse(r#"{"weight_map": {"a": 3}}"#).is_err());
    assert!(ShardIndex::parse(r#"{"metadata": {}}"#).is_err());
}

#[test]
fn mtp_layers_come_from_num_nextn_predict_layers() {
    let mtp = |cfg: serde_json::Value| MtpLayers::from_config(&cfg);
    let none = MtpLayers::default();
    for cfg in [
        serde_json::json!({"num_hidden_layers": 61}),
        serde_json::json!({"num_hidden_layers": 61, "num_nextn_predict_layers": null}),
        serde_json::json!({"num_hidden_layers": 61, "num_nextn_predict_layers": 0}),
        // Nothing to drop: the layer count is not needed (the architecture checks it).
        serde_json::json!({"num_nextn_predict_layers": 0}),
    ] {
        assert_eq!(mtp(cfg.clone()).unwrap(), none, "{cfg}");
    }
    let dsv3 =
        mtp(serde_json::json!({"num_hidden_layers": 61, "num_nextn_predict_layers": 1})).unwrap();
    assert_eq!(dsv3.layers, 61..62);
    assert!(dsv3.holds("model.layers.61.eh_proj.weight"));
    assert!(dsv3.holds("model.layers.61.mlp.experts.255.down_proj.weight_scale_inv"));
    for kept in [
        "model.layers.60.mlp.gate.weight",
        "model.layers.62.input_layernorm.weight",
        "model.layers.610.input_layernorm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ] {
        assert!(!dsv3.holds(kept), "{kept}");
    }
    assert_eq!(
        mtp(serde_json::json!({"num_hidden_layers": 4, "num_nextn_predict_layers": 2}))
            .unwrap()
            .layers,
        4..6
    );
    for bad in [
        serde_json::json!("1"),
        serde_json::json!(-1),
        serde_json::json!(1.5),
        serde_json::json!(true),
    ] {
        let e = mtp(serde_json::json!({"num_hidden_layers": 2, "num_nextn_predict_layers": bad}))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ArchError::BadField {
                    field: "num_nextn_predict_layers",
                    ..
                }
            ),
            "{bad}: {e}"
        );
    }
    let e = mtp(serde_json::json!({"num_nextn_predict_layers": 1})).unwrap_err();
    assert!(matches!(e, ArchError::Inconsistent { .. }), "{e}");
    assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    let e = mtp(serde_json::json!({"num_hidden_layers": u64::MAX, "num_nextn_predict_layers": 1}))
        .unwrap_err();
    assert!(matches!(e, ArchError::Inconsistent { .. }), "{e}");
}

#[test]
fn shard_plan_skips_only_shards_of_mtp_tensors_alone() {
    let text = r#"{"weight_map": {
        "model.embed_tokens.weight": "m-1.safetensors",
        "model.layers.0.mlp.gate.weight": "m-1.safetensors",
        "model.layers.1.mlp.gate.weight": "m-2.safetensors",
        "model.layers.2.mlp.gate.weight": "m-2.safetensors",
        "model.layers.2.enorm.weight": "m-3.safetensors",
        "model.layers.2.eh_proj.weight": "m-3.safetensors",
        "model.layers.3.hnorm.weight": "m-4.safetensors",
        "lm_head.weight": "m-5.safetensors"}}"#;
    let index = ShardIndex::parse(text).unwrap();
    let mtp = TensorFilter {
        mtp: MtpLayers { layers: 2..4 },
        arch: None,
    };
    assert_eq!(
        index.plan(&mtp),
        ShardPlan {
            // m-2 holds layer 1 too: needed, its layer-2 tensor dropped when it is indexed.
            needed: vec!["m-1.safetensors", "m-2.safetensors", "m-5.safetensors"],
            skipped: vec!["m-3.safetensors", "m-4.safetensors"],
            skipped_mtp_tensors: 3,
            skipped_other_tensors: 0,
        }
    );
    let all = index.plan(&TensorFilter::default());
    assert_eq!(all.needed, index.shards());
    assert!(all.skipped.is_empty() && all.skipped_mtp_tensors == 0);
}

/// Gemma 4's multimodal checkpoints: a shard of vision and audio towers alone is never opened
/// (nor downloaded); a shard holding the text model beside a tower is read and the tower
/// dropped from it.
#[test]
fn shard_plan_skips_gemma4_vision_and_audio_shards() {
    let text = r#"{"weight_map": {
        "model.language_model.embed_tokens.weight": "m-1.safetensors",
        "model.language_model.layers.0.experts.gate_up_proj": "m-1.safetensors",
        "model.embed_vision.embedding_projection.weight": "m-1.safetensors",
        "model.language_model.layers.0.router.proj.weight": "m-2.safetensors",
        "model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight": "m-3.safetensors",
        "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": "m-3.safetensors",
        "model.embed_audio.embedding_projection.weight": "m-3.safetensors"}}"#;
    let index = ShardIndex::parse(text).unwrap();
    let filter = TensorFilter {
        mtp: MtpLayers::default(),
        arch: Some(crate::arch::Arch::Gemma4Text),
    };
    assert_eq!(
        index.plan(&filter),
        ShardPlan {
            needed: vec!["m-1.safetensors", "m-2.safetensors"],
            skipped: vec!["m-3.safetensors"],
            skipped_mtp_tensors: 0,
            skipped_other_tensors: 3,
        }
    );
}

/// DeepSeek-V4.1's upstream layout: a shard of `mtp.*` tensors alone, and one of its vision
/// modules alone, are skipped (the Hub download never fetches them); the text model's shards,
/// under upstream names, are needed.
#[test]
fn deepseek_v41_shard_plan_skips_its_mtp_and_vision_shards() {
    let text = r#"{"weight_map": {
        "embed.weight": "m-1.safetensors",
        "layers.0.attn.wq_a.weight": "m-1.safetensors",
        "layers.0.hc_attn_fn": "m-1.safetensors",
        "layers.0.ffn.experts.3.w1.weight": "m-2.safetensors",
        "head.weight": "m-2.safetensors",
        "mtp.0.e_proj.weight": "m-3.safetensors",
        "mtp.0.ffn.experts.0.w1.weight": "m-3.safetensors",
        "vision.blocks.0.weight": "m-4.safetensors",
        "aligner.proj.weight": "m-4.safetensors"}}"#;
    let index = ShardIndex::parse(text).unwrap();
    let config = serde_json::json!({
        "model_type": "deepseek_v41", "num_hidden_layers": 1, "num_nextn_predict_layers": 1
    });
    let filter = TensorFilter::from_config(&config).unwrap();
    assert_eq!(
        index.plan(&filter),
        ShardPlan {
            needed: vec!["m-1.safetensors", "m-2.safetensors"],
            skipped: vec!["m-3.safetensors", "m-4.safetensors"],
            skipped_mtp_tensors: 2,
            skipped_other_tensors: 2,
        }
    );
}

/// Kimi-K3's multimodal layout: a shard of the vision tower and projector alone, and one of the
/// multi-token-prediction module (`language_model.model.mtp.*`, which mlx-lm's `sanitize`
/// drops) alone, are skipped; the text model's shards are needed, a vision tensor beside them
/// dropped as its shard is read.
#[test]
fn kimi_k3_shard_plan_skips_its_vision_and_mtp_shards() {
    let text = r#"{"weight_map": {
        "language_model.model.embed_tokens.weight": "m-1.safetensors",
        "language_model.model.layers.0.self_attn.q_conv1d.weight": "m-1.safetensors",
        "mm_projector.proj.0.weight": "m-1.safetensors",
        "language_model.model.layers.1.block_sparse_moe.experts.0.w1.weight": "m-2.safetensors",
        "language_model.model.output_attn_res.proj_weight": "m-2.safetensors",
        "language_model.model.mtp.0.e_proj.weight": "m-3.safetensors",
        "language_model.model.mtp.0.block_sparse_moe.experts.0.w1.weight": "m-3.safetensors",
        "vision_tower.encoder.blocks.0.wqkv.weight": "m-4.safetensors",
        "vision_tower.patch_embed.proj.weight": "m-4.safetensors"}}"#;
    let index = ShardIndex::parse(text).unwrap();
    let config = serde_json::json!({
        "model_type": "kimi_k3", "text_config": {"num_hidden_layers": 2}
    });
    let filter = TensorFilter::from_config(&config).unwrap();
    assert_eq!(
        index.plan(&filter),
        ShardPlan {
            needed: vec!["m-1.safetensors", "m-2.safetensors"],
            skipped: vec!["m-3.safetensors", "m-4.safetensors"],
            skipped_mtp_tensors: 2,
            skipped_other_tensors: 2,
        }
    );
}
