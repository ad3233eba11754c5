use super::*;
use serde_json::json;

fn qwen3_5x() -> Value {
    // The bundled trained model's config minus its legacy keys: transformers 5.x dialect.
    json!({
        "model_type": "qwen3_moe", "hidden_size": 256, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192,
        "intermediate_size": 512, "moe_intermediate_size": 128, "num_local_experts": 32,
        "num_experts_per_tok": 4, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 2048, "tie_word_embeddings": false, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "bos_token_id": 0, "eos_token_id": 0
    })
}

fn qwen3_legacy() -> Value {
    let mut v = qwen3_5x();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("num_local_experts");
    o.insert("num_experts".into(), json!(32));
    o.insert("rope_theta".into(), json!(10000.0));
    o.insert("rope_scaling".into(), Value::Null);
    v
}

#[test]
fn qwen3_both_dialects_agree() {
    let a = ModelConfig::from_json(&qwen3_5x()).unwrap();
    let b = ModelConfig::from_json(&qwen3_legacy()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.arch, Arch::Qwen3Moe);
    assert_eq!(
        (
            a.num_experts,
            a.num_experts_per_tok,
            a.moe_intermediate_size
        ),
        (32, 4, 128)
    );
    assert_eq!(a.rope.theta, 10000.0);
    assert_eq!(a.rope.rope_type, "default");
    assert_eq!(a.rope.scaling, None);
    assert_eq!(a.qk_norm, QkNorm::PerHead);
    assert_eq!(a.bos_token_id, Some(0));
    assert_eq!(a.eos_token_ids, vec![0]);
    assert_eq!(a.sparse_layers(), vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn bundled_model_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny/config.json");
    let c = ModelConfig::from_file(&path).unwrap();
    assert_eq!(c, ModelConfig::from_json(&qwen3_5x()).unwrap());
}

#[test]
fn five_x_rope_parameters_win_and_keep_scaling() {
    let mut v = qwen3_5x();
    v["rope_theta"] = json!(1.0); // a stale legacy key must not override rope_parameters
    v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "yarn", "factor": 4.0,
               "original_max_position_embeddings": 4096});
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.rope.theta, 500000.0);
    assert_eq!(c.rope.rope_type, "yarn");
    assert_eq!(
        c.rope.scaling,
        Some(json!({"factor": 4.0, "original_max_position_embeddings": 4096}))
    );
}

#[test]
fn legacy_rope_scaling_is_read() {
    let mut v = qwen3_legacy();
    v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.rope.rope_type, "linear");
    assert_eq!(c.rope.scaling, Some(json!({"factor": 2.0})));
}

fn mixtral(five_x: bool) -> Value {
    let mut v = json!({
        "model_type": "mixtral", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "rope_traditional": false
    });
    if five_x {
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
    } else {
        v["rope_theta"] = json!(1e6);
    }
    v
}

#[test]
fn mixtral_both_dialects() {
    let a = ModelConfig::from_json(&mixtral(true)).unwrap();
    let b = ModelConfig::from_json(&mixtral(false)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.arch, Arch::Mixtral);
    assert_eq!(a.head_dim, 32); // hidden / heads when head_dim is absent
    assert_eq!(a.moe_intermediate_size, 256);
    assert!(a.norm_topk_prob);
    assert_eq!(a.qk_norm, QkNorm::None);
    assert_eq!(a.rope.theta, 1e6);
}

#[test]
fn mixtral_default_theta_when_absent() {
    let mut v = mixtral(false);
    v.as_object_mut().unwrap().remove("rope_theta");
    assert_eq!(ModelConfig::from_json(&v).unwrap().rope.theta, 1_000_000.0);
}

fn olmoe(five_x: bool) -> Value {
    let mut v = json!({
        "model_type": "olmoe", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 512, "intermediate_size": 64,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false,
        "clip_qkv": null, "eos_token_id": [50279, 1]
    });
    if five_x {
        v["rope_parameters"] = json!({"rope_theta": 10000.0, "rope_type": "default"});
    } else {
        v["rope_theta"] = json!(10000.0);
    }
    v
}

#[test]
fn olmoe_both_dialects() {
    let a = ModelConfig::from_json(&olmoe(true)).unwrap();
    assert_eq!(a, ModelConfig::from_json(&olmoe(false)).unwrap());
    assert_eq!(a.qk_norm, QkNorm::FullWidth);
    assert_eq!(a.num_key_value_heads, 4); // defaults to the head count
    assert_eq!(a.moe_intermediate_size, 64);
    assert_eq!(a.eos_token_ids, vec![50279, 1]);
    assert_eq!(a.bos_token_id, None);
    assert_eq!(a.clip_qkv, None);
}

fn qwen2(five_x: bool) -> Value {
    let mut v = json!({
        "model_type": "qwen2_moe", "hidden_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
        "intermediate_size": 256, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
        "decoder_sparse_step": 2, "mlp_only_layers": [3]
    });
    if five_x {
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
    } else {
        v["rope_theta"] = json!(1e6);
    }
    v
}

#[test]
fn qwen2_both_dialects_and_sparse_layers() {
    let a = ModelConfig::from_json(&qwen2(true)).unwrap();
    assert_eq!(a, ModelConfig::from_json(&qwen2(false)).unwrap());
    assert_eq!(
        a.shared_expert,
        Some(SharedExpert {
            intermediate_size: 128,
            gated: true
        })
    );
    assert!(a.attention_bias);
    // (L + 1) % 2 == 0 -> layers 1 and 3; 3 is mlp-only.
    assert_eq!(a.sparse_layers(), vec![1]);
}

#[test]
fn config_round_trips_through_serde() {
    let c = ModelConfig::from_json(&qwen2(true)).unwrap();
    let s = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
    assert!(s.contains("\"arch\":\"qwen2_moe\""));
}

#[test]
fn rejects_unsupported_model_type_naming_the_list() {
    let mut v = qwen3_5x();
    v["model_type"] = json!("llama4");
    let err = ModelConfig::from_json(&v).unwrap_err();
    assert!(matches!(&err, ArchError::Unsupported { model_type, .. } if model_type == "llama4"));
    let msg = err.to_string();
    let all: Vec<&str> = Arch::ALL.iter().map(|a| a.model_type()).collect();
    assert!(msg.contains(&all.join(", ")), "{msg}");
}

#[test]
fn rejects_missing_expert_count() {
    let mut v = qwen3_5x();
    v.as_object_mut().unwrap().remove("num_local_experts");
    let err = ModelConfig::from_json(&v).unwrap_err();
    assert!(
        matches!(
            err,
            ArchError::MissingField {
                field: "num_local_experts",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_wrong_field_type() {
    let mut v = qwen3_5x();
    v["hidden_size"] = json!("256");
    let err = ModelConfig::from_json(&v).unwrap_err();
    assert!(
        matches!(
            err,
            ArchError::BadField {
                field: "hidden_size",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_top_k_above_expert_count() {
    let mut v = qwen3_5x();
    v["num_experts_per_tok"] = json!(33);
    assert!(matches!(
        ModelConfig::from_json(&v).unwrap_err(),
        ArchError::Inconsistent { .. }
    ));
}

#[test]
fn classifies_qwen3_names() {
    let a = Arch::Qwen3Moe;
    assert_eq!(
        a.classify("model.layers.3.mlp.experts.17.down_proj.weight"),
        TensorRole::Expert {
            layer: 3,
            expert: 17,
            proj: Proj::Down,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.classify("model.layers.0.mlp.gate.weight"),
        TensorRole::Router { layer: 0 }
    );
    assert_eq!(
        a.classify("model.layers.2.mlp.experts.gate_up_proj"),
        TensorRole::FusedGateUp { layer: 2 }
    );
    assert_eq!(
        a.classify("model.layers.2.mlp.experts.down_proj"),
        TensorRole::FusedDown { layer: 2 }
    );
    assert_eq!(
        a.classify("model.layers.5.mlp.switch_mlp.up_proj.scales"),
        TensorRole::Stacked {
            layer: 5,
            proj: Proj::Up,
            part: Part::Scales
        }
    );
    assert_eq!(
        a.classify("model.layers.0.self_attn.q_norm.weight"),
        TensorRole::KeepFull
    );
    assert_eq!(
        a.classify("model.layers.0.input_layernorm.weight"),
        TensorRole::KeepFull
    );
    assert_eq!(a.classify("model.norm.weight"), TensorRole::KeepFull);
    assert_eq!(
        a.classify("model.layers.0.self_attn.q_proj.weight"),
        TensorRole::Dense
    );
    assert_eq!(a.classify("model.embed_tokens.weight"), TensorRole::Dense);
    assert_eq!(a.classify("lm_head.weight"), TensorRole::Dense);
    // Dense MLP of an mlp-only layer: quantized by policy, not an expert.
    assert_eq!(
        a.classify("model.layers.1.mlp.gate_proj.weight"),
        TensorRole::Dense
    );
    assert_eq!(
        a.names().expert(3, 17, Proj::Down, Part::Weight),
        "model.layers.3.mlp.experts.17.down_proj.weight"
    );
    assert_eq!(a.names().router(4), "model.layers.4.mlp.gate.weight");
}

#[test]
fn classifies_mixtral_names_on_disk_and_in_memory() {
    let a = Arch::Mixtral;
    assert_eq!(
        a.classify("model.layers.1.block_sparse_moe.experts.7.w3.weight"),
        TensorRole::Expert {
            layer: 1,
            expert: 7,
            proj: Proj::Up,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.classify("model.layers.1.block_sparse_moe.experts.7.w2.weight"),
        TensorRole::Expert {
            layer: 1,
            expert: 7,
            proj: Proj::Down,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.classify("model.layers.1.block_sparse_moe.gate.weight"),
        TensorRole::Router { layer: 1 }
    );
    assert_eq!(
        a.classify("model.layers.1.mlp.gate.weight"),
        TensorRole::Router { layer: 1 }
    );
    assert_eq!(
        a.classify("model.layers.1.mlp.experts.gate_up_proj"),
        TensorRole::FusedGateUp { layer: 1 }
    );
    assert_eq!(
        a.classify("model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"),
        TensorRole::Stacked {
            layer: 0,
            proj: Proj::Gate,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.names().expert(0, 2, Proj::Gate, Part::Weight),
        "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    );
    assert_eq!(
        a.names().stacked(0, Proj::Down, Part::Biases),
        "model.layers.0.block_sparse_moe.switch_mlp.down_proj.biases"
    );
}

#[test]
fn classifies_qwen2_shared_expert() {
    let a = Arch::Qwen2Moe;
    assert_eq!(
        a.classify("model.layers.0.mlp.shared_expert_gate.weight"),
        TensorRole::KeepFull
    );
    assert_eq!(
        a.classify("model.layers.0.mlp.shared_expert.up_proj.weight"),
        TensorRole::Dense
    );
    assert_eq!(
        a.classify("model.layers.0.self_attn.q_proj.bias"),
        TensorRole::KeepFull
    );
}

#[test]
fn mlx_quantized_dense_parts_are_dense_not_biases() {
    // `.biases` is the affine offset of a quantized layer, not a linear bias.
    let a = Arch::Olmoe;
    assert_eq!(
        a.classify("model.layers.0.self_attn.q_proj.biases"),
        TensorRole::Dense
    );
    assert_eq!(
        a.classify("model.layers.0.self_attn.q_proj.bias"),
        TensorRole::KeepFull
    );
}

/// What every architecture must provide: a `model_type` that finds it again, links to the
/// upstream modelling code it mirrors, and tensor names that classify as their own roles.
#[test]
fn every_architecture_names_itself_and_its_tensors() {
    for &arch in Arch::ALL {
        assert_eq!(Arch::from_model_type(arch.model_type()).unwrap(), arch);
        let up = arch.upstream();
        assert!(
            up.iter().any(|u| u.contains("mlx-lm")) && up.iter().all(|u| u.starts_with("https://")),
            "{arch}: {up:?}"
        );
        let names = arch.names();
        assert_eq!(
            arch.classify(&names.router(3)),
            TensorRole::Router { layer: 3 },
            "{arch}"
        );
        for proj in Proj::ALL {
            assert_eq!(
                arch.classify(&names.expert(2, 5, proj, Part::Weight)),
                TensorRole::Expert {
                    layer: 2,
                    expert: 5,
                    proj,
                    part: Part::Weight
                },
                "{arch}"
            );
            assert_eq!(
                arch.classify(&names.stacked(1, proj, Part::Scales)),
                TensorRole::Stacked {
                    layer: 1,
                    proj,
                    part: Part::Scales
                },
                "{arch}"
            );
        }
    }
}

/// The router record is written only when it differs from plain softmax routing, so packs of
/// the existing architectures keep their exact metadata; a set one round-trips and is checked.
#[test]
fn router_record_is_optional_and_validated() {
    let cfg = ModelConfig::from_json(&qwen3_5x()).unwrap();
    let v = serde_json::to_value(&cfg).unwrap();
    assert!(v.get("router").is_none(), "{v}");
    let mut grouped = cfg.clone();
    grouped.router = RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
    };
    grouped.validate().unwrap();
    let back: ModelConfig =
        serde_json::from_value(serde_json::to_value(&grouped).unwrap()).unwrap();
    assert_eq!(back, grouped);
    let broken = |f: &dyn Fn(&mut RouterConfig)| {
        let mut c = grouped.clone();
        f(&mut c.router);
        c.validate().unwrap_err()
    };
    // 32 experts: 5 groups do not divide them, 16 groups of 2 do, 32 groups of 1 cannot be scored.
    assert!(matches!(
        broken(&|r| r.n_group = 5),
        ArchError::Inconsistent { .. }
    ));
    assert!(matches!(
        broken(&|r| r.n_group = 32),
        ArchError::Inconsistent { .. }
    ));
    assert!(matches!(
        broken(&|r| r.topk_group = 5),
        ArchError::Inconsistent { .. }
    ));
    // top-4 out of one group of 8 experts is fine; out of 1 group of 2 (n_group 16) it is not.
    assert!(matches!(
        broken(&|r| {
            r.n_group = 16;
            r.topk_group = 1
        }),
        ArchError::Inconsistent { .. }
    ));
    assert!(matches!(
        broken(&|r| r.routed_scaling_factor = 0.0),
        ArchError::BadField {
            field: "routed_scaling_factor",
            ..
        }
    ));
}

/// The dense/MoE layout, one knob at a time and together (`ModelConfig::is_sparse_layer`).
#[test]
fn layer_layout_follows_each_knob() {
    let base = || {
        let mut c = ModelConfig::from_json(&qwen3_5x()).unwrap();
        c.num_hidden_layers = 8;
        c
    };
    let all: Vec<usize> = (0..8).collect();
    assert_eq!(base().sparse_layers(), all);

    // decoder_sparse_step: (L + 1) % step == 0
    let mut c = base();
    c.decoder_sparse_step = 3;
    assert_eq!(c.sparse_layers(), vec![2, 5]);

    // mlp_only_layers: listed layers are dense
    let mut c = base();
    c.mlp_only_layers = vec![0, 4, 7];
    assert_eq!(c.sparse_layers(), vec![1, 2, 3, 5, 6]);

    // first_k_dense_replace: the first k layers are dense (DeepSeek-V3: 3, GLM-4.5: 1)
    let mut c = base();
    c.first_k_dense_replace = 3;
    assert_eq!(c.sparse_layers(), vec![3, 4, 5, 6, 7]);

    // moe_layer_freq: L % freq == 0
    let mut c = base();
    c.moe_layer_freq = 2;
    assert_eq!(c.sparse_layers(), vec![0, 2, 4, 6]);

    // together: L >= 1, L % 2 == 0, (L + 1) % 1 == 0, not 6
    let mut c = base();
    c.first_k_dense_replace = 1;
    c.moe_layer_freq = 2;
    c.mlp_only_layers = vec![6];
    assert_eq!(c.sparse_layers(), vec![2, 4]);

    // no experts: every layer dense
    let mut c = base();
    c.num_experts = 0;
    assert!(c.sparse_layers().is_empty());

    // the new knobs stay out of a pack's metadata at their defaults, and round-trip when set
    let c = base();
    let v = serde_json::to_value(&c).unwrap();
    assert!(v.get("first_k_dense_replace").is_none() && v.get("moe_layer_freq").is_none());
    let mut d = base();
    d.first_k_dense_replace = 2;
    d.moe_layer_freq = 3;
    let back: ModelConfig = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    d.moe_layer_freq = 0;
    assert!(matches!(
        d.validate(),
        Err(ArchError::BadField {
            field: "moe_layer_freq",
            ..
        })
    ));
}

/// DeepSeek-V3's published config.json (huggingface.co/deepseek-ai/DeepSeek-V3), as shipped.
fn deepseek_v3_published() -> Value {
    serde_json::from_str(
        r#"{
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
        "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "seq_aux": true, "tie_word_embeddings": false, "topk_group": 4,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": true,
        "v_head_dim": 128, "vocab_size": 129280
    }"#,
    )
    .unwrap()
}

/// GLM-4.5's published config.json (huggingface.co/zai-org/GLM-4.5).
fn glm45_published() -> Value {
    serde_json::from_str(
        r#"{
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": true,
        "attention_dropout": 0.0, "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 5120, "partial_rotary_factor": 0.5, "initializer_range": 0.02,
        "intermediate_size": 12288, "max_position_embeddings": 131072, "model_type": "glm4_moe",
        "moe_intermediate_size": 1536, "norm_topk_prob": true, "num_attention_heads": 96,
        "n_group": 1, "topk_group": 1, "n_routed_experts": 160, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "num_hidden_layers": 92, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": null, "rope_theta": 1000000, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
        "use_qk_norm": true, "vocab_size": 151552
    }"#,
    )
    .unwrap()
}

/// The published configs parse into what their modelling code builds, and the KV cache is
/// counted as each caches it: DeepSeek-V3's MLA latent (512 + 64 values per layer, 70 KB per
/// token in bf16, docs/memory.md) and GLM-4.5's 8 KV heads (377 KB per token).
#[test]
fn published_deepseek_v3_kimi_k2_and_glm45_configs_parse() {
    let ds = ModelConfig::from_json(&deepseek_v3_published()).unwrap();
    assert_eq!(ds.arch, Arch::DeepseekV3);
    let m = ds.mla.as_ref().unwrap();
    assert_eq!(
        (
            m.q_lora_rank,
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
        (Some(1536), 512, 64, 128)
    );
    assert_eq!((ds.head_dim, ds.rope_dims()), (192, 64));
    assert!(ds.rope.traditional && ds.rope.rope_type == "yarn");
    assert_eq!(ds.num_experts, 256);
    assert_eq!(
        (ds.router.scoring, ds.router.selection_bias),
        (Scoring::Sigmoid, true)
    );
    assert_eq!((ds.router.n_group, ds.router.topk_group), (8, 4));
    assert_eq!(ds.router.routed_scaling_factor, 2.5);
    assert_eq!(ds.shared_expert.as_ref().unwrap().intermediate_size, 2048);
    assert_eq!(ds.sparse_layers().len(), 58);
    assert!(!ds.is_sparse_layer(2) && ds.is_sparse_layer(3));
    assert_eq!(ds.kv_values_per_token() * 2, 61 * 576 * 2);

    // Kimi K2 is the same network under another model_type.
    let mut kimi = deepseek_v3_published();
    kimi["model_type"] = json!("kimi_k2");
    kimi["n_routed_experts"] = json!(384);
    kimi["num_attention_heads"] = json!(64);
    kimi["n_group"] = json!(1);
    kimi["topk_group"] = json!(1);
    kimi["first_k_dense_replace"] = json!(1);
    let k = ModelConfig::from_json(&kimi).unwrap();
    assert_eq!(k.arch, Arch::DeepseekV3);
    assert_eq!(
        (k.num_experts, k.router.n_group, k.sparse_layers().len()),
        (384, 1, 60)
    );
    // The latent does not grow with the heads.
    assert_eq!(k.kv_values_per_token(), ds.kv_values_per_token());

    let glm = ModelConfig::from_json(&glm45_published()).unwrap();
    assert_eq!(glm.arch, Arch::Glm4Moe);
    assert!(glm.mla.is_none());
    assert_eq!((glm.head_dim, glm.rope_dims()), (128, 64));
    assert_eq!(glm.qk_norm, QkNorm::PerHead);
    assert!(glm.attention_bias);
    assert_eq!(
        (glm.router.scoring, glm.router.n_group),
        (Scoring::Sigmoid, 1)
    );
    assert_eq!(glm.sparse_layers().len(), 89);
    assert_eq!(glm.kv_values_per_token() * 2, 92 * 2 * 8 * 128 * 2);
    assert_eq!(glm.eos_token_ids, vec![151329, 151336, 151338]);
}

/// What DeepSeek-V3's router needs is refused by name when a config asks for something else,
/// and MLA's widths are required.
#[test]
fn deepseek_v3_refuses_other_routers_and_missing_mla_widths() {
    for (key, value, field) in [
        ("topk_method", json!("greedy"), "topk_method"),
        ("scoring_func", json!("softmax"), "scoring_func"),
    ] {
        let mut c = deepseek_v3_published();
        c[key] = value;
        let e = ModelConfig::from_json(&c).unwrap_err();
        assert!(
            matches!(&e, ArchError::BadField { field: f, .. } if *f == field),
            "{e}"
        );
    }
    for key in ["q_lora_rank", "kv_lora_rank", "qk_rope_head_dim"] {
        let mut c = deepseek_v3_published();
        c.as_object_mut().unwrap().remove(key);
        let e = ModelConfig::from_json(&c).unwrap_err();
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
    // null q_lora_rank: a plain q_proj.
    let mut c = deepseek_v3_published();
    c["q_lora_rank"] = Value::Null;
    let cfg = ModelConfig::from_json(&c).unwrap();
    assert_eq!(cfg.mla.unwrap().q_lora_rank, None);
    // A partial rotary factor that rotates an odd count is refused.
    let mut g = glm45_published();
    g["partial_rotary_factor"] = json!(0.01);
    let e = ModelConfig::from_json(&g).unwrap_err();
    assert!(e.to_string().contains("RoPE would rotate"), "{e}");
}

/// Qwen3-Next-80B-A3B's published config.json.
fn qwen3_next_published() -> Value {
    json!({
        "architectures": ["Qwen3NextForCausalLM"], "attention_bias": false,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
        "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 5120, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mlp_only_layers": [],
        "model_type": "qwen3_next", "moe_intermediate_size": 512, "norm_topk_prob": true,
        "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10,
        "num_hidden_layers": 48, "num_key_value_heads": 2, "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 10000000,
        "shared_expert_intermediate_size": 512, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 151936
    })
}

/// gpt-oss-20b's published config.json (its MXFP4 `quantization_config` left out).
fn gpt_oss_20b_published() -> Value {
    let types: Vec<&str> = (0..24)
        .map(|l| ["sliding_attention", "full_attention"][l % 2])
        .collect();
    json!({
        "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": types, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": false, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": false, "use_cache": true,
        "vocab_size": 201088
    })
}

/// gpt-oss's KV cache: the 12 full-attention layers grow with the context, the 12 sliding ones
/// hold at most a window (128) plus one prefill chunk less one position, and no more than the
/// sequence itself.
#[test]
fn gpt_oss_sliding_layers_hold_a_window_of_the_kv_cache() {
    let c = ModelConfig::from_json(&gpt_oss_20b_published()).unwrap();
    // Keys and values of 8 KV heads of 64 per layer.
    let layer = 2 * 8 * 64;
    assert_eq!(c.kv_values_per_token(), 12 * layer);
    assert_eq!(c.window_kv_values(100_000, 2048), 12 * layer * (127 + 2048));
    assert_eq!(c.window_kv_values(100_000, 1), 12 * layer * 128);
    assert_eq!(c.window_kv_values(50, 2048), 12 * layer * 50);
    assert_eq!(
        c.kv_values(4096, 512),
        12 * layer * 4096 + 12 * layer * (127 + 512)
    );
    // 24 KiB per token in bf16, against 48 KiB if every layer kept every position.
    assert_eq!(c.kv_values_per_token() * 2, 24_576);
    assert_eq!(c.recurrent_state_bytes(), 0);
    // Without sliding windows nothing changes.
    let q = ModelConfig::from_json(&qwen3_5x()).unwrap();
    assert_eq!(q.window_kv_values(1000, 2048), 0);
    assert_eq!(q.kv_values(1000, 2048), q.kv_values_per_token() * 1000);
}

/// Qwen3-Next: three of every four layers linear, a KV cache only in the fourth, the linear
/// layers' fixed state counted apart; Qwen3.5's multimodal and text-only configs give the same
/// model.
#[test]
fn qwen3_next_and_qwen3_5_moe_configs_parse() {
    let c = ModelConfig::from_json(&qwen3_next_published()).unwrap();
    assert_eq!(c.arch, Arch::Qwen3Next);
    let la = c.linear_attention.clone().unwrap();
    assert_eq!(
        (
            la.full_attention_interval,
            la.num_key_heads,
            la.num_value_heads
        ),
        (4, 16, 32)
    );
    assert_eq!(la.projections, DeltaProjections::Qkvz);
    assert!(c.attn_output_gate);
    assert_eq!((c.head_dim, c.rope_dims()), (256, 64));
    assert!((0..3).all(|l| c.is_linear_layer(l)) && !c.is_linear_layer(3));
    assert_eq!(c.full_attention_layers(), 12);
    // 12 layers x keys and values of 2 KV heads of 256 x 2 bytes.
    assert_eq!(c.kv_values_per_token() * 2, 12 * 2 * 2 * 256 * 2);
    // 36 layers x (3 conv inputs of 8,192 channels in bf16 + 32 x 128 x 128 f32).
    assert_eq!(
        c.recurrent_state_bytes(),
        36 * (3 * 8192 * 2 + 32 * 128 * 128 * 4)
    );
    let s = c.shared_expert.as_ref().unwrap();
    assert_eq!((s.intermediate_size, s.gated), (512, true));
    assert_eq!(c.sparse_layers().len(), 48);
    // The pack record round-trips, and a record without the new fields reads as before.
    let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);

    // Qwen3.5: the text model's fields under text_config (multimodal) or at the top level.
    let mut text = qwen3_next_published();
    let t = text.as_object_mut().unwrap();
    for k in [
        "rope_theta",
        "partial_rotary_factor",
        "decoder_sparse_step",
        "intermediate_size",
    ] {
        t.remove(k);
    }
    t.insert("model_type".into(), json!("qwen3_5_moe_text"));
    t.insert(
        "rope_parameters".into(),
        json!({"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
               "mrope_section": [11, 11, 10], "mrope_interleaved": true}),
    );
    let multimodal = json!({
        "model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": text, "vision_config": {"depth": 27}, "tie_word_embeddings": false
    });
    let m = ModelConfig::from_json(&multimodal).unwrap();
    let mut flat = text.clone();
    flat["model_type"] = json!("qwen3_5_moe");
    let f = ModelConfig::from_json(&flat).unwrap();
    assert_eq!(m, f);
    assert_eq!(m.arch, Arch::Qwen35Moe);
    assert_eq!(
        m.linear_attention.as_ref().unwrap().projections,
        DeltaProjections::Split
    );
    assert_eq!((m.rope.theta, m.rope_dims()), (10_000_000.0, 64));
    assert_eq!(
        m.intermediate_size, 512,
        "dense width unused: every layer is sparse"
    );
    assert_eq!(m.eos_token_ids, vec![151645]);
    assert_eq!(m.kv_values_per_token(), c.kv_values_per_token());
}

/// Linear-attention widths that cannot work are refused by name.
#[test]
fn qwen3_next_refuses_bad_linear_attention_widths() {
    for (key, value, field) in [
        ("linear_conv_kernel_dim", json!(1), "linear_conv_kernel_dim"),
        ("linear_num_key_heads", json!(0), "linear_num_key_heads"),
        (
            "full_attention_interval",
            json!(0),
            "full_attention_interval",
        ),
    ] {
        let mut c = qwen3_next_published();
        c[key] = value;
        let e = ModelConfig::from_json(&c).unwrap_err();
        assert!(
            matches!(&e, ArchError::BadField { field: f, .. } if *f == field),
            "{key}: {e}"
        );
    }
    let mut c = qwen3_next_published();
    c["linear_num_value_heads"] = json!(24);
    c["linear_num_key_heads"] = json!(16);
    let e = ModelConfig::from_json(&c).unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    let mut c = qwen3_next_published();
    c.as_object_mut().unwrap().remove("linear_key_head_dim");
    let e = ModelConfig::from_json(&c).unwrap_err();
    assert!(
        matches!(
            e,
            ArchError::MissingField {
                field: "linear_key_head_dim",
                ..
            }
        ),
        "{e}"
    );
}

/// A pack names its architecture as serde's `snake_case` of the old enum wrote it: pinned, so
/// that packs written before the table still load and new packs read the same.
#[test]
fn arch_serializes_as_before_the_table() {
    let written = [
        (Arch::Qwen3Moe, "qwen3_moe"),
        (Arch::Mixtral, "mixtral"),
        (Arch::Olmoe, "olmoe"),
        (Arch::Qwen2Moe, "qwen2_moe"),
        (Arch::DeepseekV3, "deepseek_v3"),
        (Arch::Glm4Moe, "glm4_moe"),
        (Arch::Qwen3Next, "qwen3_next"),
        (Arch::Qwen35Moe, "qwen3_5_moe"),
        (Arch::GptOss, "gpt_oss"),
        (Arch::KimiK25, "kimi_k25"),
        (Arch::DeepseekV32, "deepseek_v32"),
        (Arch::GlmMoeDsa, "glm_moe_dsa"),
        (Arch::Minimax, "minimax"),
        (Arch::Gemma4Text, "gemma4_text"),
        (Arch::DeepseekV41, "deepseek_v41"),
        (Arch::KimiK3, "kimi_k3"),
    ];
    assert_eq!(Arch::ALL.len(), written.len());
    for (arch, name) in written {
        assert_eq!(serde_json::to_value(arch).unwrap(), json!(name));
        assert_eq!(serde_json::from_value::<Arch>(json!(name)).unwrap(), arch);
    }
    // An alias finds the architecture in a config.json, never in a pack.
    assert_eq!(Arch::from_model_type("kimi_k2").unwrap(), Arch::DeepseekV3);
    let err = serde_json::from_value::<Arch>(json!("kimi_k2")).unwrap_err();
    assert!(err.to_string().contains("unknown variant"), "{err}");
}

/// Every table entry writes its own name and parser (the default's refuse), and names are
/// unique across entries and aliases.
#[test]
fn every_table_entry_is_its_own() {
    let mut seen = std::collections::BTreeSet::new();
    for &arch in Arch::ALL {
        let def = arch.def();
        assert!(!def.model_type.is_empty(), "{arch:?}");
        assert!(!def.expert_layouts.is_empty(), "{arch}");
        for name in std::iter::once(&def.model_type).chain(def.aliases) {
            assert!(seen.insert(*name), "{name} twice");
        }
        assert!(
            def.parse as usize != ArchDef::DEFAULT.parse as usize,
            "{arch}"
        );
    }
}

/// The router each architecture runs, as the model files spelled it before the table
/// (`RouterSpec::from_config` with their overrides): order, scoring and renormalisation.
#[test]
fn router_specs_are_the_model_files_of_before() {
    use TopKOrder::{FirstOfNegated, LastOf};
    let expect = [
        (Arch::Qwen3Moe, LastOf, None, true),
        (
            Arch::Mixtral,
            FirstOfNegated,
            Some(Scoring::SoftmaxOfChosen),
            true,
        ),
        (Arch::Olmoe, FirstOfNegated, None, true),
        (Arch::Qwen2Moe, FirstOfNegated, None, true),
        (Arch::DeepseekV3, FirstOfNegated, None, false),
        (Arch::Glm4Moe, FirstOfNegated, None, false),
        (Arch::Qwen3Next, LastOf, None, true),
        (Arch::Qwen35Moe, LastOf, None, true),
        (Arch::GptOss, LastOf, Some(Scoring::SoftmaxOfChosen), true),
    ];
    for (arch, order, scoring, top1) in expect {
        let r = arch.def().router;
        assert_eq!(
            (r.order, r.scoring, r.renormalize_top1),
            (order, scoring, top1),
            "{arch}"
        );
    }
    let mut cfg = ModelConfig::from_json(&qwen3_5x()).unwrap();
    for (arch, k, norm, renormalize) in [
        (Arch::Qwen3Moe, 1, true, true),
        (Arch::DeepseekV3, 1, true, false),
        (Arch::DeepseekV3, 2, true, true),
        (Arch::Mixtral, 2, true, false),
        (Arch::Olmoe, 2, false, false),
    ] {
        cfg.arch = arch;
        cfg.num_experts_per_tok = k;
        cfg.norm_topk_prob = norm;
        assert_eq!(
            RouterSpec::of(&cfg).renormalize,
            renormalize,
            "{arch} k={k}"
        );
    }
}

/// Qwen3-Next as transformers 5 writes it: `layer_types` and `full_attention_interval: null`.
/// `layer_types` is the truth: a periodic pattern becomes its interval (2 here, not the
/// default 4), one that no interval describes becomes a list (interval 0, which binaries
/// without the list refuse), it wins over an interval that disagrees, and the config survives
/// a pack's round trip.
#[test]
fn qwen3_next_layer_types_say_which_layers_are_full_attention() {
    let with = |types: &[&str], interval: Value| {
        let mut v = qwen3_next_published();
        v["num_hidden_layers"] = json!(types.len());
        v["layer_types"] = json!(types);
        v["full_attention_interval"] = interval;
        ModelConfig::from_json(&v)
    };
    let (lin, full) = ("linear_attention", "full_attention");
    let linear = |c: &ModelConfig| {
        (0..c.num_hidden_layers)
            .map(|l| c.is_linear_layer(l))
            .collect::<Vec<_>>()
    };

    let c = with(&[lin, full, lin, full, lin, full], Value::Null).unwrap();
    let la = c.linear_attention.clone().unwrap();
    assert_eq!(
        (la.full_attention_interval, la.full_attention_layers.clone()),
        (2, None)
    );
    assert_eq!(linear(&c), [true, false, true, false, true, false]);
    assert_eq!(c.full_attention_layers(), 3);

    // No interval fits: the list, interval 0; it also wins over a given interval of 4.
    for interval in [Value::Null, json!(4)] {
        let c = with(&[full, lin, lin, full, lin], interval).unwrap();
        let la = c.linear_attention.clone().unwrap();
        assert_eq!(la.full_attention_interval, 0);
        assert_eq!(la.full_attention_layers, Some(vec![0, 3]));
        assert_eq!(linear(&c), [false, true, true, false, true]);
        let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        back.validate().unwrap();
    }
    // The published pattern (every 4th) as layer_types alone gives the published config.
    let every4: Vec<&str> = (0..48)
        .map(|l| if l % 4 == 3 { full } else { lin })
        .collect();
    let c = with(&every4, Value::Null).unwrap();
    assert_eq!(c, ModelConfig::from_json(&qwen3_next_published()).unwrap());

    // A type qwen3_next does not have, or too few entries: clear errors naming the field.
    let e = with(&[lin, "sliding_attention"], Value::Null)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer_types") && e.contains("sliding_attention"),
        "{e}"
    );
    let mut v = qwen3_next_published();
    v["layer_types"] = json!([lin, full]);
    let e = ModelConfig::from_json(&v).unwrap_err().to_string();
    assert!(e.contains("layer_types lists 2 layers"), "{e}");
}

/// An architecture that does not read `layer_types` must find in it only the attention it
/// runs: a sliding-window layer in a Qwen3-MoE config is refused (it would run full
/// attention there), while all-full `layer_types` (what transformers writes without sliding
/// windows) is accepted.
#[test]
fn layer_types_an_architecture_cannot_run_are_refused() {
    let mut v = qwen3_5x();
    let n = v["num_hidden_layers"].as_u64().unwrap() as usize;
    v["layer_types"] = json!(vec!["full_attention"; n]);
    ModelConfig::from_json(&v).unwrap();
    let mut types = vec!["full_attention"; n];
    types[2] = "sliding_attention";
    v["layer_types"] = json!(types);
    let e = ModelConfig::from_json(&v).unwrap_err().to_string();
    assert!(
        e.contains("layer 2") && e.contains("sliding_attention") && e.contains("qwen3_moe"),
        "{e}"
    );
    // gpt-oss reads them: its published alternation parses, and a linear layer does not.
    let mut g = gpt_oss_20b_published();
    ModelConfig::from_json(&g).unwrap();
    g["layer_types"][5] = json!("linear_attention");
    let e = ModelConfig::from_json(&g).unwrap_err().to_string();
    assert!(
        e.contains("layer_types") && e.contains("linear_attention"),
        "{e}"
    );
}

/// MiniMax-M2's published config.json (its FP8 `quantization_config` left out): `minimax_m2`
/// is read as `minimax`; every layer sparse with 1,536-wide experts; q/k norms over the full
/// width; 64 of each head's 128 values rotated; the sigmoid router with a selection bias, run on
/// an f32 copy of its input and casting its weights back.
#[test]
fn minimax_m2_config_parses() {
    let v = json!({
        "architectures": ["MiniMaxM2ForCausalLM"], "attn_type_list": vec![1; 62],
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536,
        "max_position_embeddings": 196608, "model_type": "minimax_m2",
        "num_attention_heads": 48, "num_experts_per_tok": 8, "num_hidden_layers": 62,
        "num_key_value_heads": 8, "num_local_experts": 256, "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64,
        "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": false,
        "use_qk_norm": true, "use_routing_bias": true, "vocab_size": 200064
    });
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.arch, Arch::Minimax);
    assert_eq!(c.arch.model_type(), "minimax");
    assert_eq!((c.num_experts, c.num_experts_per_tok), (256, 8));
    assert_eq!(c.moe_intermediate_size, 1536);
    assert!((0..62).all(|l| c.is_sparse_layer(l)));
    assert_eq!(c.qk_norm, QkNorm::FullWidth);
    assert_eq!(c.rope_dims(), 64);
    assert_eq!(c.rope.theta, 5_000_000.0);
    let s = RouterSpec::of(&c);
    assert_eq!(
        (
            s.scoring,
            s.selection_bias,
            s.renormalize,
            s.f32_input,
            s.weights_in_input_dtype
        ),
        (Scoring::Sigmoid, true, true, true, true)
    );
    // 62 layers x keys and values of 8 heads of 128, in bf16: 248 KiB per token.
    assert_eq!(c.kv_values_per_token() * 2, 62 * 2 * 8 * 128 * 2);
    // Without q/k norms; a rotary width past the head is refused by name.
    let mut w = v.clone();
    w["use_qk_norm"] = json!(false);
    assert_eq!(ModelConfig::from_json(&w).unwrap().qk_norm, QkNorm::None);
    w["rotary_dim"] = json!(256);
    let e = ModelConfig::from_json(&w).unwrap_err().to_string();
    assert!(e.contains("rotary_dim"), "{e}");
}

/// A Gemma 4 MoE config of gemma-4-26b-a4b's shape, as transformers' `Gemma4Config` writes it
/// (the text model under `text_config`, `model_type` `gemma4`): read as `gemma4_text`; every
/// layer sparse (128 experts of 704, top-8, beside a dense MLP of 2112); sliding layers of 8 KV
/// heads of 256 with a window of 1024, every sixth layer full attention with 2 KV heads of 512
/// whose values are their keys, a quarter of each half-head pair rotated (proportional RoPE,
/// theta 1e6); the router with its own norm and per-expert scale, softmax of the chosen logits
/// (not precise), the last k of `argpartition`; the KV cache counted per layer kind.
#[test]
fn gemma4_config_parses() {
    let types: Vec<&str> = (0..30)
        .map(|l| {
            if (l + 1) % 6 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let text = json!({
        "model_type": "gemma4_text", "attention_k_eq_v": true, "enable_moe_block": true,
        "final_logit_softcapping": 30.0, "global_head_dim": 512, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2816,
        "hidden_size_per_layer_input": 0, "intermediate_size": 2112, "layer_types": types,
        "max_position_embeddings": 262144, "moe_intermediate_size": 704,
        "num_attention_heads": 16, "num_experts": 128, "num_global_key_value_heads": 2,
        "num_hidden_layers": 30, "num_key_value_heads": 8, "num_kv_shared_layers": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
        },
        "sliding_window": 1024, "tie_word_embeddings": true, "top_k_experts": 8,
        "use_double_wide_mlp": false, "vocab_size": 262144, "bos_token_id": 2,
        "eos_token_id": 1
    });
    let v = json!({
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
        "text_config": text, "vision_config": {"model_type": "gemma4_vision"},
        "eos_token_id": [1, 106], "tie_word_embeddings": true
    });
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.arch, Arch::Gemma4Text);
    // Without a top-level vocab_size mlx-lm's wrapper takes 262144, the model's anyway.
    assert_eq!(c.vocab_size, 262_144);
    assert_eq!((c.num_experts, c.num_experts_per_tok), (128, 8));
    assert_eq!((c.moe_intermediate_size, c.intermediate_size), (704, 2112));
    assert!((0..30).all(|l| c.is_sparse_layer(l)));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.qk_norm, QkNorm::PerHead);
    let w = c.sliding_window.clone().unwrap();
    assert_eq!(w.size, 1024);
    assert_eq!(w.layers.len(), 25);
    assert_eq!(c.window_of(5), None);
    assert_eq!(c.window_of(4), Some(1024));
    let g = c.gemma4.clone().unwrap();
    assert_eq!(
        (g.global_head_dim, g.global_kv_heads, g.k_eq_v),
        (512, 2, true)
    );
    assert_eq!(g.global_rope.rope_type, "proportional");
    assert_eq!(g.global_rope.theta, 1_000_000.0);
    assert_eq!(g.global_rotary_factor(), 0.25);
    assert_eq!(g.final_logit_softcapping, Some(30.0));
    assert_eq!(
        (c.rope.rope_type.as_str(), c.rope.theta),
        ("default", 10_000.0)
    );
    // The text model's end of sequence and the wrapper's end of turn.
    assert_eq!(c.eos_token_ids, vec![1, 106]);
    let s = RouterSpec::of(&c);
    assert_eq!(
        (
            s.scoring,
            s.order,
            s.renormalize,
            s.input_norm,
            s.per_expert_scale,
            s.precise_softmax
        ),
        (
            Scoring::SoftmaxOfChosen,
            TopKOrder::LastOf,
            false,
            Some(1e-6),
            true,
            false
        )
    );
    // 5 full-attention layers x keys and values of 2 heads of 512 per token; 25 sliding layers
    // x keys and values of 8 heads of 256 over at most the window.
    assert_eq!(c.kv_values_per_token(), 5 * 2 * 2 * 512);
    assert_eq!(c.window_kv_values(100_000, 1), 25 * 2 * 8 * 256 * 1024);
    assert_eq!(c.window_kv_values(10, 2048), 25 * 2 * 8 * 256 * 10);
    // The text model alone reads the same.
    let alone = ModelConfig::from_json(&v["text_config"]).unwrap();
    assert_eq!(alone.gemma4, c.gemma4);
    assert_eq!(alone.eos_token_ids, vec![1]);
    assert_eq!(alone.sliding_window, c.sliding_window);
    // Dense Gemma 4, per-layer inputs and shared KV layers are refused by name.
    for (key, value, named) in [
        ("enable_moe_block", json!(false), "enable_moe_block"),
        (
            "hidden_size_per_layer_input",
            json!(256),
            "hidden_size_per_layer_input",
        ),
        ("num_kv_shared_layers", json!(20), "num_kv_shared_layers"),
    ] {
        let mut t = v.clone();
        t["text_config"][key] = value;
        let e = ModelConfig::from_json(&t).unwrap_err().to_string();
        assert!(e.contains(named), "{key}: {e}");
    }
    // transformers 5.x's spelling of the full layers' widths: `per_layer_config`, the truth
    // where it is there; a sliding layer in it, or full layers of two widths, are refused.
    let mut t = v.clone();
    let o = t["text_config"].as_object_mut().unwrap();
    o.insert("global_head_dim".into(), json!(null));
    o.insert("num_global_key_value_heads".into(), json!(null));
    let per_layer: serde_json::Map<String, serde_json::Value> = (0..30)
        .filter(|l| (l + 1) % 6 == 0)
        .map(|l| {
            (
                l.to_string(),
                json!({"head_dim": 512, "num_key_value_heads": 2}),
            )
        })
        .collect();
    o.insert("per_layer_config".into(), json!(per_layer));
    assert_eq!(ModelConfig::from_json(&t).unwrap().gemma4, c.gemma4);
    let mut u = t.clone();
    u["text_config"]["per_layer_config"]["0"] = json!({"head_dim": 512});
    let e = ModelConfig::from_json(&u).unwrap_err().to_string();
    assert!(e.contains("per_layer_config lists layer 0"), "{e}");
    let mut u = t.clone();
    u["text_config"]["per_layer_config"]["11"] = json!({"head_dim": 256});
    let e = ModelConfig::from_json(&u).unwrap_err().to_string();
    assert!(e.contains("different widths"), "{e}");
    // Without layer_types: mlx-lm's pattern, four sliding layers then one full.
    let mut t = v.clone();
    t["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("layer_types");
    let c = ModelConfig::from_json(&t).unwrap();
    assert_eq!(c.sliding_window.unwrap().layers.len(), 24);
}

/// Gemma 4's names in a pack: the text model of the multimodal checkpoints and of mlx-lm's
/// folders under `model.*`, the vision and audio towers dropped, each layer's router and
/// experts under its `moe` block, where the shared blocks classify them.
#[test]
fn gemma4_names_move_under_the_moe_block() {
    let a = Arch::Gemma4Text;
    let name = |n: &str| a.text_model_name(n).map(|c| c.into_owned());
    for (source, pack) in [
        (
            "model.language_model.layers.3.experts.gate_up_proj",
            Some("model.layers.3.moe.experts.gate_up_proj"),
        ),
        (
            "model.layers.3.experts.down_proj",
            Some("model.layers.3.moe.experts.down_proj"),
        ),
        (
            "model.language_model.layers.3.router.proj.weight",
            Some("model.layers.3.moe.router.weight"),
        ),
        (
            "language_model.model.layers.3.router.proj",
            Some("model.layers.3.moe.router"),
        ),
        (
            "language_model.model.layers.3.router.proj.scales",
            Some("model.layers.3.moe.router.scales"),
        ),
        (
            "model.language_model.layers.3.router.per_expert_scale",
            Some("model.layers.3.moe.router.per_expert_scale"),
        ),
        (
            "language_model.model.layers.3.experts.switch_glu.up_proj.weight",
            Some("model.layers.3.moe.switch_glu.up_proj.weight"),
        ),
        (
            "model.language_model.layers.3.mlp.gate_proj.weight",
            Some("model.layers.3.mlp.gate_proj.weight"),
        ),
        (
            "model.language_model.embed_tokens.weight",
            Some("model.embed_tokens.weight"),
        ),
        ("model.vision_tower.encoder.layers.0.mlp.w", None),
        ("model.embed_vision.embedding_projection.weight", None),
        ("model.audio_tower.layers.0.w", None),
        (
            "model.language_model.layers.0.self_attn.rotary_emb.inv_freq",
            None,
        ),
    ] {
        assert_eq!(name(source).as_deref(), pack, "{source}");
    }
    assert_eq!(
        a.classify("model.layers.3.moe.experts.gate_up_proj"),
        TensorRole::FusedGateUp { layer: 3 }
    );
    assert_eq!(
        a.classify("model.layers.3.moe.router.weight"),
        TensorRole::Router { layer: 3 }
    );
    assert_eq!(
        a.classify("model.layers.3.moe.switch_glu.down_proj.scales"),
        TensorRole::Stacked {
            layer: 3,
            proj: Proj::Down,
            part: Part::Scales
        }
    );
    assert_eq!(
        a.classify("model.layers.3.pre_feedforward_layernorm_2.weight"),
        TensorRole::KeepFull
    );
}
/// DeepSeek-V4.1's config (mlx-lm's `ModelArgs` fields; what a field leaves out is mlx-lm's
/// default): one shared key/value head of `head_dim`, every layer sparse with one shared expert
/// as wide as a routed one, the `sqrtsoftplus` router with a selection bias on an f32 input,
/// hyper-connections and the compressed attention's layers; `deepseek_v41_text` and a
/// `text_config` read the same; the candidate blocks' source layer (none for -1, a layer past the
/// model, or no blocks); engram layers, another router temperature or
/// scoring, and a KV source without a ratio are refused by name.
#[test]
fn deepseek_v41_config_parses() {
    let v = json!({
        "model_type": "deepseek_v41", "vocab_size": 129280, "hidden_size": 4096,
        "num_hidden_layers": 4, "num_attention_heads": 64, "head_dim": 512,
        "q_lora_rank": 1024, "qk_rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 6,
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rms_norm_eps": 1e-6,
        "sliding_window": 128, "compress_ratios": [0, 4, 128, 4],
        "kv_source_layer_ids": [1, 2, 3], "index_source_layer_ids": [1, 3],
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4
    });
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.arch, Arch::DeepseekV41);
    assert_eq!((c.num_key_value_heads, c.head_dim), (1, 512));
    assert_eq!(c.moe_intermediate_size, 2048);
    assert!((0..4).all(|l| c.is_sparse_layer(l)));
    assert_eq!(
        c.shared_expert.as_ref().map(|s| s.intermediate_size),
        Some(2048)
    );
    assert_eq!(c.f32_swiglu_limit, Some(10.0));
    assert_eq!(c.rope_dims(), 64);
    assert!(c.rope.traditional);
    let s = RouterSpec::of(&c);
    assert_eq!(
        (
            s.scoring,
            s.selection_bias,
            s.renormalize,
            s.f32_input,
            s.scaling
        ),
        (Scoring::SqrtSoftplus, true, true, true, Some(1.5))
    );
    let h = c.hyper_connections.as_ref().unwrap();
    assert_eq!((h.mult, h.sinkhorn_iters, h.eps), (4, 20, 1e-6));
    let a = c.compressed_attention.as_ref().unwrap();
    assert_eq!((a.ratio(0), a.ratio(2), a.ratio(9)), (0, 128, 0));
    assert!(a.is_kv_source(2) && !a.is_index_source(2) && a.is_index_source(3));
    assert_eq!((a.o_groups, a.o_lora_rank, a.index_topk), (8, 1024, 512));
    // The windows are bounded; what grows is layer 1's (ratio 4, with index keys), layer 2's
    // (ratio 128) and layer 3's (ratio 4, with index keys) latents.
    let grown = c.kv_values(1 << 20, 2048) - c.kv_values(1 << 19, 2048);
    let per = (1u64 << 19) / 4 * (512 + 128) * 2 + (1u64 << 19) / 128 * 512;
    assert_eq!(grown, per);
    // The same model under its text alias and inside a text_config.
    let mut t = v.clone();
    t["model_type"] = json!("deepseek_v41_text");
    assert_eq!(ModelConfig::from_json(&t).unwrap(), c);
    let wrapped = json!({"model_type": "deepseek_v41", "text_config": v.clone()});
    assert_eq!(ModelConfig::from_json(&wrapped).unwrap(), c);
    // Candidate blocks: mlx-lm's block size by default; off for -1, past the layers, or 0 blocks.
    assert_eq!(a.candidates, None);
    let mut w = v.clone();
    w["candidate_source_layer_id"] = json!(1);
    w["candidate_topk_blocks"] = json!(16);
    let b = ModelConfig::from_json(&w)
        .unwrap()
        .compressed_attention
        .unwrap()
        .candidates;
    assert_eq!(
        b,
        Some(CandidateBlocks {
            source_layer: 1,
            topk_blocks: 16,
            block_size: 8
        })
    );
    for (id, blocks) in [(-1, 16), (9, 16), (1, 0)] {
        w["candidate_source_layer_id"] = json!(id);
        w["candidate_topk_blocks"] = json!(blocks);
        let c = ModelConfig::from_json(&w).unwrap();
        assert_eq!(
            c.compressed_attention.unwrap().candidates,
            None,
            "{id} {blocks}"
        );
    }
    // Refusals, by field.
    for (field, value) in [
        ("engram_layer_ids", json!([2])),
        ("gate_temp", json!(0.5)),
        ("scoring_func", json!("softmax")),
        ("o_groups", json!(3)),
    ] {
        let mut w = v.clone();
        w[field] = value;
        let e = ModelConfig::from_json(&w).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let mut w = v.clone();
    w["kv_source_layer_ids"] = json!([0]);
    let e = ModelConfig::from_json(&w).unwrap_err().to_string();
    assert!(e.contains("kv_source_layer_ids"), "{e}");
    // Upstream names become mlx-lm's; what is not the text model is left out.
    let a = Arch::DeepseekV41;
    for (from, to) in [
        ("embed.weight", Some("model.embed_tokens.weight")),
        ("head.weight", Some("lm_head.weight")),
        (
            "layers.3.attn.wq_a.weight",
            Some("model.layers.3.self_attn.q_a_proj.weight"),
        ),
        (
            "layers.3.attn.compressor.norm.weight",
            Some("model.layers.3.self_attn.compressor.kv_norm.weight"),
        ),
        (
            "layers.3.attn.indexer.wk.weight",
            Some("model.layers.3.self_attn.indexer.k_proj.weight"),
        ),
        (
            "layers.3.attn.attn_sink",
            Some("model.layers.3.self_attn.sinks"),
        ),
        ("layers.3.hc_attn_fn", Some("model.layers.3.attn_hc.fn")),
        (
            "layers.3.ffn.gate.bias",
            Some("model.layers.3.mlp.gate.e_score_correction_bias"),
        ),
        (
            "layers.3.ffn.experts.7.w2.weight",
            Some("model.layers.3.mlp.experts.7.w2.weight"),
        ),
        (
            "layers.3.ffn.shared_experts.w3.weight",
            Some("model.layers.3.mlp.shared_experts.up_proj.weight"),
        ),
        (
            "model.layers.3.mlp.gate.weight",
            Some("model.layers.3.mlp.gate.weight"),
        ),
        // Modules of an mlx-lm folder's per-module quantization.
        ("lm_head", Some("lm_head")),
        (
            "model.layers.3.self_attn.o_a_proj",
            Some("model.layers.3.self_attn.o_a_proj"),
        ),
        ("layers.3.ffn.gate.bias_vl", None),
        ("vision.blocks.0.weight", None),
    ] {
        assert_eq!(a.text_model_name(from).as_deref(), to, "{from}");
    }
    assert_eq!(
        a.classify("model.layers.3.mlp.experts.7.w2.weight"),
        TensorRole::Expert {
            layer: 3,
            expert: 7,
            proj: Proj::Down,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.classify("model.layers.3.mlp.experts.switch_mlp.up_proj.scales"),
        TensorRole::Stacked {
            layer: 3,
            proj: Proj::Up,
            part: Part::Scales
        }
    );
    assert_eq!(
        a.classify("model.layers.3.mlp.gate.weight"),
        TensorRole::Router { layer: 3 }
    );
}

/// A Kimi-K3 text config with mlx-lm's `TextArgs` fields (its defaults where a field is left
/// out), 6 layers of which 1-based `kda_layers` [1, 2, 4, 5] are Kimi Delta Attention.
fn kimi_k3_text() -> Value {
    json!({
        "model_type": "kimi_k3", "vocab_size": 163840, "hidden_size": 7168,
        "num_hidden_layers": 6, "num_attention_heads": 64, "num_key_value_heads": 64,
        "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "hidden_act": "situ", "activation_situ_beta": 2.0, "activation_situ_linear_beta": 8.0,
        "attn_res_block_size": 3,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": true,
        "mla_use_output_gate": true,
        "num_experts": 384, "num_experts_per_token": 8, "num_shared_experts": 1,
        "moe_router_activation_func": "sigmoid", "moe_renormalize": true,
        "routed_scaling_factor": 2.827, "first_k_dense_replace": 1,
        "use_grouped_topk": true, "num_expert_group": 8, "topk_group": 4,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096},
        "linear_attn_config": {
            "kda_layers": [1, 2, 4, 5], "num_heads": 64, "head_dim": 128,
            "short_conv_kernel_size": 4, "gate_lower_bound": -5.0
        },
        "eos_token_id": 163586
    })
}

/// Kimi-K3's config, flat or under `text_config` (token ids at the top level): KDA on the
/// 1-based `kda_layers` (the others MLA without RoPE, gated), SiTU with both betas, attention
/// residuals, the sigmoid router in groups with its bias and scale, one shared expert as wide
/// as a routed one, the first layer dense; mlx-lm's defaults (`rms_norm_eps` 1e-5, beta 1 also
/// for a beta of 0, `moe_renormalize`); RoPE fields change nothing; the pack's record round-trips.
/// The latent MoE's width and norm (the experts' width is then the latent's). Another
/// activation or router, RoPE on MLA, a latent of 0, KDA layers out of range and a missing
/// `linear_attn_config` are refused by name.
#[test]
fn kimi_k3_config_parses() {
    let c = ModelConfig::from_json(&kimi_k3_text()).unwrap();
    assert_eq!(c.arch, Arch::KimiK3);
    assert_eq!((c.num_key_value_heads, c.head_dim), (64, 192));
    let m = c.mla.as_ref().unwrap();
    assert_eq!(
        (m.q_lora_rank, m.kv_lora_rank, m.no_rope, m.output_gate),
        (Some(1536), 512, true, true)
    );
    let linear: Vec<usize> = (0..6).filter(|&l| c.is_linear_layer(l)).collect();
    assert_eq!(linear, [0, 1, 3, 4]);
    let la = c.linear_attention.as_ref().unwrap();
    assert_eq!(la.projections, DeltaProjections::Kda);
    assert_eq!(
        (
            la.num_key_heads,
            la.num_value_heads,
            la.key_head_dim,
            la.value_head_dim
        ),
        (64, 64, 128, 128)
    );
    assert_eq!(
        (la.conv_kernel_dim, la.gate_lower_bound, la.full_rank_gate),
        (4, Some(-5.0), false)
    );
    // Every third layer is MLA: an interval.
    assert_eq!(
        (la.full_attention_interval, &la.full_attention_layers),
        (3, &None)
    );
    assert_eq!(
        c.situ,
        Some(Situ {
            beta: 2.0,
            linear_beta: Some(8.0)
        })
    );
    assert_eq!(c.attn_res_block_size, Some(3));
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!((c.num_experts, c.num_experts_per_tok), (384, 8));
    assert_eq!(c.router.scoring, Scoring::Sigmoid);
    assert!(c.router.selection_bias && c.norm_topk_prob);
    assert_eq!(
        (
            c.router.n_group,
            c.router.topk_group,
            c.router.routed_scaling_factor
        ),
        (8, 4, 2.827)
    );
    assert_eq!(
        c.shared_expert,
        Some(SharedExpert {
            intermediate_size: 2048,
            gated: false
        })
    );
    assert_eq!(c.sparse_layers(), [1, 2, 3, 4, 5]);
    assert_eq!(c.rope.rope_type, "default");
    assert_eq!(c.rope.scaling, None);
    assert_eq!(c.eos_token_ids, [163586]);
    // MLA's latent and key per token on the 2 MLA layers; KDA's state on the other 4.
    assert_eq!(c.kv_values_per_token(), 2 * (512 + 64));
    assert_eq!(
        c.recurrent_state_bytes(),
        4 * (3 * 3 * 64 * 128 * 2 + 64 * 128 * 128 * 4)
    );
    // 2 blocks of 3 layers: two starting states of 7168 per position of a call.
    assert_eq!(c.attn_res_values_per_token(), 2 * 7168);
    let back: ModelConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(back, c);

    // The multimodal wrapper: the text model under text_config, ids at the top level.
    let mut text = kimi_k3_text();
    text.as_object_mut().unwrap().remove("eos_token_id");
    let wrapped = json!({
        "model_type": "kimi_k3", "text_config": text, "vision_config": {"hidden_size": 8},
        "eos_token_id": 163586
    });
    assert_eq!(ModelConfig::from_json(&wrapped).unwrap(), c);

    // mlx-lm's defaults: beta `or 1.0`, no linear beta, renormalised, one group, no residual
    // blocks, a low-rank KDA gate.
    let mut v = kimi_k3_text();
    let o = v.as_object_mut().unwrap();
    for k in [
        "activation_situ_linear_beta",
        "attn_res_block_size",
        "moe_renormalize",
        "num_expert_group",
        "topk_group",
        "rms_norm_eps",
    ] {
        o.remove(k);
    }
    o.insert("activation_situ_beta".into(), json!(0.0));
    o.insert(
        "linear_attn_config".into(),
        json!({"kda_layers": [1, 2, 3, 4, 5, 6], "num_heads": 8, "head_dim": 128,
               "short_conv_kernel_size": 4, "use_full_rank_gate": true}),
    );
    let d = ModelConfig::from_json(&v).unwrap();
    assert_eq!(
        d.situ,
        Some(Situ {
            beta: 1.0,
            linear_beta: None
        })
    );
    assert_eq!(d.attn_res_block_size, None);
    assert!(d.norm_topk_prob);
    assert_eq!((d.router.n_group, d.router.topk_group), (1, 1));
    let la = d.linear_attention.as_ref().unwrap();
    assert_eq!((la.gate_lower_bound, la.full_rank_gate), (None, true));
    // Every layer KDA: no MLA layer, no KV cache.
    assert_eq!(d.full_attention_layers(), 0);
    assert_eq!(d.kv_values_per_token(), 0);
    assert_eq!((d.latent_moe, d.expert_hidden_size()), (None, 7168));
    // The latent MoE: experts on 2048 values, their sum normed only with latent_moe_use_norm.
    let mut l = kimi_k3_text();
    l["routed_expert_hidden_size"] = json!(2048);
    let c = ModelConfig::from_json(&l).unwrap();
    assert_eq!(
        (c.latent_moe, c.expert_hidden_size()),
        (
            Some(LatentMoe {
                hidden_size: 2048,
                norm: false
            }),
            2048
        )
    );
    l["latent_moe_use_norm"] = json!(true);
    let c = ModelConfig::from_json(&l).unwrap();
    assert!(c.latent_moe.unwrap().norm);
    let back: ModelConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    // No KDA layer at all: plain MLA.
    v["linear_attn_config"]["kda_layers"] = json!([]);
    assert!(ModelConfig::from_json(&v)
        .unwrap()
        .linear_attention
        .is_none());

    let refused = |key: &str, value: Value| {
        let mut v = kimi_k3_text();
        v[key] = value;
        ModelConfig::from_json(&v).unwrap_err().to_string()
    };
    for (key, value, says) in [
        ("hidden_act", json!("silu"), "hidden_act"),
        (
            "moe_router_activation_func",
            json!("softmax"),
            "moe_router_activation_func",
        ),
        ("mla_use_nope", json!(false), "mla_use_nope"),
        (
            "routed_expert_hidden_size",
            json!(0),
            "routed_expert_hidden_size",
        ),
        (
            "activation_situ_linear_beta",
            json!(-1.0),
            "activation_situ_linear_beta",
        ),
        ("attn_res_block_size", json!(0), "attn_res_block_size"),
        ("linear_attn_config", Value::Null, "linear_attn_config"),
        (
            "linear_attn_config",
            json!({"kda_layers": [0], "num_heads": 8, "head_dim": 128, "short_conv_kernel_size": 4}),
            "kda_layers",
        ),
        (
            "linear_attn_config",
            json!({"kda_layers": [7], "num_heads": 8, "head_dim": 128, "short_conv_kernel_size": 4}),
            "kda_layers",
        ),
        (
            "linear_attn_config",
            json!({"kda_layers": [1], "num_heads": 8, "head_dim": 128}),
            "short_conv_kernel_size",
        ),
    ] {
        let e = refused(key, value);
        assert!(e.contains(says), "{key}: {e}");
    }
}

/// Kimi-K3's names as mlx-lm's `sanitize` gives them: the multimodal prefix and the vision
/// tower, `block_sparse_moe` -> `mlp`, the selection bias under the gate wherever upstream or
/// mlx-lm put it, the residual modules' `proj_weight` / `norm_weight`; the experts'
/// `w1`/`w3`/`w2`, mlx-lm's `switch_mlp`, the router, and the residual projections kept in
/// floats wherever they are.
#[test]
fn kimi_k3_names_are_mlx_lms() {
    let a = Arch::KimiK3;
    for (from, to) in [
        (
            "language_model.model.layers.3.block_sparse_moe.experts.7.w2.weight",
            Some("model.layers.3.mlp.experts.7.w2.weight"),
        ),
        (
            "model.layers.3.block_sparse_moe.gate.e_score_correction_bias",
            Some("model.layers.3.mlp.gate.e_score_correction_bias"),
        ),
        (
            "model.layers.3.block_sparse_moe.e_score_correction_bias",
            Some("model.layers.3.mlp.gate.e_score_correction_bias"),
        ),
        (
            "language_model.model.layers.3.mlp.e_score_correction_bias",
            Some("model.layers.3.mlp.gate.e_score_correction_bias"),
        ),
        (
            "model.layers.3.block_sparse_moe.shared_experts.up_proj.weight",
            Some("model.layers.3.mlp.shared_experts.up_proj.weight"),
        ),
        (
            "language_model.model.layers.0.self_attention_res.proj_weight",
            Some("model.layers.0.self_attention_res_proj.weight"),
        ),
        (
            "model.layers.0.mlp_res.norm_weight",
            Some("model.layers.0.mlp_res_norm.weight"),
        ),
        (
            "language_model.model.output_attn_res.proj_weight",
            Some("model.output_attn_res_proj.weight"),
        ),
        (
            "language_model.model.layers.0.self_attention_res_proj.weight",
            Some("model.layers.0.self_attention_res_proj.weight"),
        ),
        (
            "model.layers.0.self_attn.q_conv1d.weight",
            Some("model.layers.0.self_attn.q_conv1d.weight"),
        ),
        ("language_model.lm_head.weight", Some("lm_head.weight")),
        ("vision_tower.patch_embed.proj.weight", None),
        ("mm_projector.proj.0.weight", None),
    ] {
        assert_eq!(a.text_model_name(from).as_deref(), to, "{from}");
    }
    assert_eq!(
        a.classify("model.layers.3.mlp.experts.7.w3.weight"),
        TensorRole::Expert {
            layer: 3,
            expert: 7,
            proj: Proj::Up,
            part: Part::Weight
        }
    );
    assert_eq!(
        a.classify("model.layers.3.mlp.switch_mlp.gate_proj.biases"),
        TensorRole::Stacked {
            layer: 3,
            proj: Proj::Gate,
            part: Part::Biases
        }
    );
    assert_eq!(
        a.classify("model.layers.3.mlp.gate.weight"),
        TensorRole::Router { layer: 3 }
    );
    for keep in [
        "model.layers.3.self_attention_res_proj.weight",
        "model.layers.3.mlp_res_proj.weight",
        "model.output_attn_res_proj.weight",
        "model.layers.3.mlp_res_norm.weight",
        "model.layers.3.self_attn.o_norm.weight",
    ] {
        assert_eq!(a.classify(keep), TensorRole::KeepFull, "{keep}");
    }
    for dense in [
        "model.layers.3.self_attn.qkv_proj.weight",
        "model.layers.3.self_attn.g_proj.weight",
        "model.layers.3.mlp.shared_experts.gate_proj.weight",
    ] {
        assert_eq!(a.classify(dense), TensorRole::Dense, "{dense}");
    }
    // Another architecture's module of that name is not kept.
    assert_eq!(
        Arch::Qwen3Moe.classify("model.layers.3.mlp_res_proj.weight"),
        TensorRole::Dense
    );
    // _group_expert_select: renormalised only above top-1, weights in the input's type.
    let r = a.def().router;
    assert_eq!(
        (
            r.order,
            r.scoring,
            r.renormalize_top1,
            r.weights_in_input_dtype
        ),
        (
            TopKOrder::FirstOfNegated,
            Some(Scoring::Sigmoid),
            false,
            true
        )
    );
}

/// `--kv-bits` (kv.rs): the layers of a plain KV cache are quantized, at group 64, and their
/// bytes per token are the codes plus a bf16 scale and bias per 64 values; windows, linear
/// states and MLA's latent stay as they are, and the budget's total moves by exactly the saving.
#[test]
fn kv_bits_quantize_plain_kv_layers_and_count_their_bytes() {
    assert_eq!(KvBits::new(3), None);
    assert_eq!(KvBits::new(8), Some(KvBits::EIGHT));
    assert_eq!(kv_group_for(128), Some(64));
    assert_eq!(kv_group_for(32), Some(32));
    assert_eq!(kv_group_for(48), None);

    // The bundled model: 6 layers, 2 KV heads of 64.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny/config.json");
    let tiny = ModelConfig::from_file(&path).unwrap();
    assert_eq!(tiny.kv_bytes_per_token(None), 6 * 2 * 2 * 64 * 2);
    // (8 + 2 * 16 / 64) / 16 = 0.53 of bf16; (4 + 0.5) / 16 = 0.28.
    assert_eq!(
        tiny.kv_bytes_per_token(Some(KvBits::EIGHT)),
        6 * 2 * 2 * (64 + 4)
    );
    assert_eq!(
        tiny.kv_bytes_per_token(Some(KvBits::FOUR)),
        6 * 2 * 2 * (32 + 4)
    );
    assert_eq!(tiny.kv_quantized_layers(), (0..6).collect::<Vec<_>>());
    assert!(tiny.kv_kept().is_empty());
    let saved = 6 * 2 * 2 * (128 - 68);
    assert_eq!(
        tiny.kv_bytes(4096, 512, Some(KvBits::EIGHT)),
        tiny.kv_values(4096, 512) * 2 - saved * 4096
    );

    // gpt-oss: the 12 full-attention layers (8 KV heads of 64) are quantized, the 12 sliding
    // windows stay bf16 and bounded.
    let g = ModelConfig::from_json(&gpt_oss_20b_published()).unwrap();
    assert_eq!(g.kv_quantized_layers().len(), 12);
    assert_eq!(g.kv_kept(), vec![KvKept::SlidingWindow]);
    assert_eq!(
        g.kv_bytes_per_token(Some(KvBits::EIGHT)),
        12 * 2 * 8 * (64 + 4)
    );
    assert_eq!(
        g.kv_bytes(4096, 512, Some(KvBits::EIGHT)),
        12 * 2 * 8 * (64 + 4) * 4096 + g.window_kv_values(4096, 512) * 2
    );

    // Qwen3-Next: the full-attention layers' heads of 256, groups of 64; linear states kept.
    let n = ModelConfig::from_json(&qwen3_next_published()).unwrap();
    assert_eq!(n.kv_quantized_layers().len(), 12);
    assert_eq!(n.kv_kept(), vec![KvKept::LinearState]);
    assert_eq!(n.kv_group(3), Ok(64));
    assert_eq!(n.kv_group(0), Err(KvKept::LinearState));

    // DeepSeek-V3: MLA's latent is not per-head keys and values: nothing changes.
    let ds = ModelConfig::from_json(&deepseek_v3_published()).unwrap();
    assert!(ds.kv_quantized_layers().is_empty());
    assert_eq!(ds.kv_kept(), vec![KvKept::Latent]);
    assert_eq!(
        ds.kv_bytes_per_token(Some(KvBits::FOUR)),
        ds.kv_bytes_per_token(None)
    );
    assert_eq!(
        ds.kv_bytes(4096, 512, Some(KvBits::FOUR)),
        ds.kv_values(4096, 512) * 2
    );
}
