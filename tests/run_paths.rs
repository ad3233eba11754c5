//! The runtime's fast paths give exactly what its reference paths give, on the bundled trained
//! model (CPU backend, so bit for bit):
//! - all experts resident: the device-routed store (`stream::resident_store`, what `run` uses
//!   with no budget) against the host-routed streaming store, on uniform, mixed-precision
//!   (4-bit hot / 2-bit cold: several pools) and merged packs;
//! - a prefill chunk that routes to more experts than the cache holds (loaded group by group)
//!   against all-resident;
//! - pipelined greedy decoding (device argmax, `async_eval`) against the host sampler;
//! - `O_DIRECT` segment reads against the memory map, and a truncated pack;
//! - the prefetch gate closes on a model whose routing it cannot predict;
//! - `make_fixture`'s skewed routing is skewed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::fixtures::FixtureSpec;
use flashpack::convert::{convert_checkpoint, load::Checkpoint, ConvertOptions};
use flashpack::format::Pack;
use flashpack::model::{ExpertStore, Model};
use flashpack::progress::Silent;
use flashpack::run::experts::{ExpertCache, PolicyKind, StoreOptions};
use flashpack::run::generate::{generate, GenerateOptions};
use flashpack::run::open;
use flashpack::run::read::{IoMode, SegmentReader};
use flashpack::run::stream::{resident_store, StreamingExperts};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn convert(src: &Path, out: &Path, opts: ConvertOptions) {
    let ck = Checkpoint::open(src).unwrap();
    convert_checkpoint(&ck, out, &opts, &Silent, Instant::now()).unwrap();
}

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 279, 1156, 13, 632, 531, 1327,
    11, 475, 340, 373, 407, 1479, 13, 198, 4299, 2163,
];

/// Logits of `PROMPT`, prefilled in one call, then 4 single-token steps, through `store`.
fn logits(model: &Model, store: &mut dyn ExpertStore) -> Vec<f32> {
    let mut kv = model.new_cache();
    let mut all = model
        .forward_ids(PROMPT, &mut kv, store)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    for t in [11u32, 279, 1879, 13] {
        all.extend(
            model
                .forward_ids(&[t], &mut kv, store)
                .unwrap()
                .to_vec_f32()
                .unwrap(),
        );
    }
    all
}

fn cache(pack: &Pack, budget_slots: Option<u64>) -> ExpertCache {
    let slot_bytes = ExpertCache::all_resident_bytes(pack) / pack.experts().len().max(1) as u64;
    let opts = StoreOptions {
        budget_bytes: budget_slots.map(|n| n * slot_bytes),
        policy: PolicyKind::Lru,
        verify: true,
        ..StoreOptions::default()
    };
    let mut c = ExpertCache::new(pack, &opts).unwrap();
    if budget_slots.is_none() {
        c.warm_all(pack).unwrap();
    }
    c
}

fn differing(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn device_routed_resident_store_matches_host_routing_on_uniform_mixed_and_merged_packs() {
    let dir = tempfile::tempdir().unwrap();
    let variants = [
        ("uniform", ConvertOptions::default(), 1),
        (
            "mixed",
            ConvertOptions {
                cold_bits: Some(2),
                cold_fraction: Some(0.5),
                ..ConvertOptions::default()
            },
            2,
        ),
        (
            "merged",
            ConvertOptions {
                merge_threshold: Some(0.5),
                ..ConvertOptions::default()
            },
            1,
        ),
    ];
    for (name, opts, pools) in variants {
        let out = dir.path().join(format!("{name}.flashpack"));
        convert(&fixture("qwen3moe-tiny"), &out, opts);
        let (pack, cfg, weights) = open::open(&out, true).unwrap();
        let model = Model::load(&cfg, &weights).unwrap();
        let mut host = StreamingExperts::new(&pack, cache(&pack, None), cfg.num_experts, false);
        let want = logits(&model, &mut host);
        let c = cache(&pack, None);
        assert_eq!(c.pool_count(), pools, "{name}: pools");
        let mut device = resident_store(&c, &cfg.sparse_layers(), cfg.num_experts)
            .unwrap()
            .expect("every expert is resident");
        assert_eq!(differing(&logits(&model, &mut device), &want), 0, "{name}");
    }
}

/// MLX's CUDA `gather_qmm` addresses a pool's experts with 32-bit element offsets, so the store
/// splits pools between layers (decision 0020). Forced here with a small cap: one layer per pool,
/// then each layer cut into two pools; resident (device tables) and under a budget, uniform and
/// mixed-precision packs, the logits stay those of one pool.
#[test]
fn pools_split_between_layers_change_no_logit() {
    let dir = tempfile::tempdir().unwrap();
    let mixed = ConvertOptions {
        cold_bits: Some(2),
        cold_fraction: Some(0.5),
        ..ConvertOptions::default()
    };
    for (name, opts) in [("uniform", ConvertOptions::default()), ("mixed", mixed)] {
        let out = dir.path().join(format!("{name}.flashpack"));
        convert(&fixture("qwen3moe-tiny"), &out, opts);
        let (pack, cfg, weights) = open::open(&out, true).unwrap();
        let model = Model::load(&cfg, &weights).unwrap();
        let one = cache(&pack, None);
        let shapes = one.pool_count();
        let mut device = resident_store(&one, &cfg.sparse_layers(), cfg.num_experts)
            .unwrap()
            .expect("every expert is resident");
        let want = logits(&model, &mut device);
        let per_expert = (cfg.hidden_size * cfg.moe_intermediate_size) as u64;
        let layers = cfg.sparse_layers().len();
        let stored = pack.experts().iter().filter(|e| e.segment == 0).count() as u64;
        // 40 slots a pool: one layer (32 experts) each; 20: each layer in two pools of 16;
        // 100: three layers share a pool.
        for (cap, pools_per_layer) in [(40u64, 1.0), (20, 2.0), (100, 1.0 / 3.0)] {
            let split = |budget: Option<u64>| {
                let slot = ExpertCache::all_resident_bytes(&pack) / stored;
                let opts = StoreOptions {
                    budget_bytes: budget.map(|n| n * slot),
                    policy: PolicyKind::Lru,
                    max_pool_elements: cap * per_expert,
                    ..StoreOptions::default()
                };
                let mut c = ExpertCache::new(&pack, &opts).unwrap();
                if budget.is_none() {
                    c.warm_all(&pack).unwrap();
                }
                c
            };
            let c = split(None);
            if name == "uniform" {
                let want_pools = (layers as f64 * pools_per_layer).ceil() as usize;
                assert_eq!(c.pool_count(), want_pools, "{name} cap {cap}");
            } else if cap < 100 {
                assert!(c.pool_count() > shapes, "{name}: {} pools", c.pool_count());
            }
            let mut device = resident_store(&c, &cfg.sparse_layers(), cfg.num_experts)
                .unwrap()
                .expect("every expert is resident");
            // A uniform layer alone in its pool, or in one run of a shared pool, is routed by
            // expert id on a view of its rows: no slot table on the device.
            let tables = device.layers.values().filter(|l| l.uses_table()).count();
            if name == "uniform" && pools_per_layer <= 1.0 {
                assert_eq!(tables, 0, "{name} cap {cap}: layers with a slot table");
            } else if name == "uniform" {
                assert_eq!(
                    tables, layers,
                    "{name} cap {cap}: split layers need their table"
                );
            }
            assert_eq!(
                differing(&logits(&model, &mut device), &want),
                0,
                "{name} cap {cap}"
            );
            // Half the experts: each pool gets half its slots.
            let half = stored / 2;
            let mut streaming =
                StreamingExperts::new(&pack, split(Some(half)), cfg.num_experts, true);
            assert_eq!(
                differing(&logits(&model, &mut streaming), &want),
                0,
                "{name} cap {cap}, half the experts"
            );
            assert!(streaming.cache_stats().experts_loaded > 0);
        }
    }
}

#[test]
fn a_prefill_chunk_larger_than_the_cache_loads_experts_in_groups_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.flashpack");
    convert(&fixture("qwen3moe-tiny"), &out, ConvertOptions::default());
    let (pack, cfg, weights) = open::open(&out, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut resident = StreamingExperts::new(&pack, cache(&pack, None), cfg.num_experts, false);
    let want = logits(&model, &mut resident);
    // 8 slots for 192 experts: a 28-token prompt routes to far more than 8 per layer.
    let mut small = StreamingExperts::new(&pack, cache(&pack, Some(8)), cfg.num_experts, true);
    assert_eq!(small.min_slots(), 8);
    assert_eq!(differing(&logits(&model, &mut small), &want), 0);
    let stats = small.cache_stats();
    let loads_in_prefill: u64 = stats.misses_per_layer.values().sum();
    // Each expert is read at most once per layer for the prompt, plus the 4 decode steps.
    assert!(
        loads_in_prefill <= 6 * 32 + 4 * 6 * 8,
        "{loads_in_prefill} loads: {stats:?}"
    );
    assert!(
        small.stats.routes > 6 * 5,
        "grouped routes: {:?}",
        small.stats
    );
}

#[test]
fn pipelined_greedy_decoding_picks_the_host_samplers_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.flashpack");
    convert(&fixture("qwen3moe-tiny"), &out, ConvertOptions::default());
    let (pack, cfg, weights) = open::open(&out, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let run = |host_sampling: bool, budget: Option<u64>| {
        let c = cache(&pack, budget);
        let mut streaming = StreamingExperts::new(&pack, c, cfg.num_experts, budget.is_some());
        let mut device = if budget.is_none() {
            resident_store(streaming.cache(), &cfg.sparse_layers(), cfg.num_experts).unwrap()
        } else {
            None
        };
        let store: &mut dyn ExpertStore = match device.as_mut() {
            Some(d) => d,
            None => &mut streaming,
        };
        let opts = GenerateOptions {
            max_tokens: 20,
            sampler: Default::default(),
            prefill_chunk: 2048,
            eos: vec![],
            host_sampling,
        };
        let mut streamed = Vec::new();
        let (ids, stats) = generate(&model, store, PROMPT, &opts, |t| {
            streamed.push(t);
            true
        })
        .unwrap();
        assert_eq!(ids, streamed);
        assert_eq!(stats.generated_tokens, 20);
        assert_eq!(stats.stop_reason, "max_tokens");
        ids
    };
    let want = run(true, None);
    assert_eq!(run(false, None), want, "pipelined, resident");
    assert_eq!(
        run(false, Some(40)),
        want,
        "pipelined, streamed through 40 slots"
    );

    // A callback that stops early, and an EOS token, end the pipelined loop where they should.
    let c = cache(&pack, None);
    let mut device = resident_store(&c, &cfg.sparse_layers(), cfg.num_experts)
        .unwrap()
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 20,
        sampler: Default::default(),
        prefill_chunk: 2048,
        eos: vec![want[5]],
        host_sampling: false,
    };
    let (ids, stats) = generate(&model, &mut device, PROMPT, &opts, |_| true).unwrap();
    let first_eos = want.iter().position(|&t| t == want[5]).unwrap();
    assert_eq!(ids, want[..first_eos]);
    assert_eq!(stats.stop_reason, "eos");
    let opts = GenerateOptions {
        eos: vec![],
        ..opts
    };
    let mut n = 0;
    let (ids, stats) = generate(&model, &mut device, PROMPT, &opts, |_| {
        n += 1;
        n < 3
    })
    .unwrap();
    assert_eq!(ids, want[..3]);
    assert_eq!(stats.stop_reason, "stopped");
}

#[test]
fn direct_reads_match_the_map_and_a_truncated_pack_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.flashpack");
    convert(
        &fixture("qwen3moe-tiny"),
        &out,
        ConvertOptions {
            page_size: 4096,
            segments: 2,
            ..ConvertOptions::default()
        },
    );
    let pack = Pack::open(&out).unwrap();
    let direct = SegmentReader::new(&pack, IoMode::Pread, 4).unwrap();
    let mapped = SegmentReader::new(&pack, IoMode::Mmap, 4).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for e in pack.experts() {
        let x = direct.read_into(e, &mut a).unwrap().to_vec();
        let y = mapped.read_into(e, &mut b).unwrap();
        assert_eq!(
            x, y,
            "layer {} expert {} segment {}",
            e.layer, e.expert, e.segment
        );
        assert_eq!(blake3::hash(&x).as_bytes(), &e.blake3);
    }
    // Cut the file inside the last segment: its read fails with an error naming the range.
    let last = pack
        .experts()
        .iter()
        .max_by_key(|e| e.offset)
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.set_len(last.offset + last.stored_len / 2).unwrap();
    let err = direct.read_into(&last, &mut a).unwrap_err().to_string();
    assert!(err.contains(&format!("offset {}", last.offset)), "{err}");
}

/// A small Qwen3-MoE with `routing_skew`, converted; returns the pack's path.
fn skewed_pack(dir: &Path, skew: f32) -> PathBuf {
    let src = dir.join(format!("src-{skew}"));
    FixtureSpec {
        hidden_size: 256,
        num_layers: 3,
        num_experts: 32,
        top_k: 4,
        moe_intermediate_size: 128,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 8192,
        tokenizer_from: Some(fixture("qwen3moe-tiny")),
        routing_skew: skew,
        ..FixtureSpec::tiny(flashpack::arch::Arch::Qwen3Moe)
    }
    .write(&src)
    .unwrap();
    let out = dir.join(format!("skew-{skew}.flashpack"));
    convert(&src, &out, ConvertOptions::default());
    out
}

/// Greedy tokens through a quarter of the experts, prefetch on; returns (hit rate, store).
fn hit_rate_at_a_quarter(path: &Path) -> (f64, u64, u64, u64) {
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let c = cache(&pack, Some((cfg.num_experts * 3 / 4) as u64));
    let mut s = StreamingExperts::new(&pack, c, cfg.num_experts, true);
    let opts = GenerateOptions {
        max_tokens: 48,
        sampler: Default::default(),
        prefill_chunk: 1,
        eos: vec![],
        host_sampling: false,
    };
    generate(&model, &mut s, &PROMPT[..8], &opts, |_| true).unwrap();
    let st = s.cache_stats();
    let hits: u64 = st.hits_per_layer.values().sum();
    let misses: u64 = st.misses_per_layer.values().sum();
    (
        hits as f64 / (hits + misses) as f64,
        s.stats.prefetch_gated,
        st.prefetch_issued,
        s.stats.guesses_skipped,
    )
}

#[test]
fn skewed_fixture_routing_is_skewed_and_the_prefetch_gate_closes_on_uniform_routing() {
    let dir = tempfile::tempdir().unwrap();
    let (uniform, gated, issued, skipped) = hit_rate_at_a_quarter(&skewed_pack(dir.path(), 0.0));
    let (skewed, _, _, _) = hit_rate_at_a_quarter(&skewed_pack(dir.path(), 0.3));
    assert!(
        skewed > uniform + 0.15,
        "skewed {skewed:.3} vs uniform {uniform:.3}"
    );
    // Random routers are hard to predict: the gate keeps prefetch mostly off.
    assert!(
        gated > 0 && issued < gated,
        "gated {gated}, issued {issued}"
    );
    // A shut gate evaluates only the probes: most guesses are dropped unevaluated.
    assert!(
        skipped > 0 && skipped <= gated,
        "skipped {skipped}, gated {gated}"
    );
}

/// A pack truncated while a run has it mapped: a mapped read of a segment past the new end is an
/// error naming the pack, where touching the map would have raised SIGBUS and killed the
/// process with no message (issue 14).
#[test]
fn a_mapped_read_of_a_pack_that_shrank_is_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.flashpack");
    convert(&fixture("qwen3moe-tiny"), &out, ConvertOptions::default());
    let pack = Pack::open(&out).unwrap();
    let opts = StoreOptions {
        budget_bytes: Some(ExpertCache::all_resident_bytes(&pack) / 4),
        io: IoMode::Mmap,
        ..StoreOptions::default()
    };
    let mut store = ExpertCache::new(&pack, &opts).unwrap();
    store.prepare(&pack, 0, &[0, 1]).unwrap();
    // Cut the file in the middle of the expert data: the last layer's experts are gone.
    let last = pack.experts().last().unwrap().clone();
    let cut = pack.experts()[pack.experts().len() / 2].offset;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let err = store
        .prepare(&pack, last.layer, &[last.expert])
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            flashpack::run::experts::ExpertError::Read(flashpack::run::read::ReadError::Shrunk { file_len, .. })
                if file_len == cut
        ),
        "{msg}"
    );
    assert!(
        msg.contains("shrank") && msg.contains("trained.flashpack"),
        "{msg}"
    );
    // The same through the reader alone.
    let mapped = SegmentReader::new(&pack, IoMode::Mmap, 1).unwrap();
    let err = mapped.read_into(&last, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("shrank"), "{err}");
}

/// The prompt's progress is reported once per evaluated prefill chunk, then for the last token.
#[test]
fn prefill_reports_progress_per_chunk() {
    use flashpack::progress::Progress;
    use std::sync::Mutex;
    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);
    impl Progress for Record {
        fn stage(&self, name: &str, total: Option<u64>, unit: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{name} {total:?} {unit}"));
        }
        fn advance(&self, n: u64) {
            self.0.lock().unwrap().push(format!("+{n}"));
        }
        fn finish_stage(&self) {
            self.0.lock().unwrap().push("done".into());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.flashpack");
    convert(&fixture("qwen3moe-tiny"), &out, ConvertOptions::default());
    let (pack, cfg, weights) = open::open(&out, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut store = StreamingExperts::new(&pack, cache(&pack, None), cfg.num_experts, false);
    let opts = GenerateOptions {
        max_tokens: 2,
        sampler: Default::default(),
        prefill_chunk: 8,
        eos: vec![],
        host_sampling: false,
    };
    let record = Record::default();
    flashpack::run::generate::generate_reporting(
        &model,
        &mut store,
        PROMPT,
        &opts,
        &record,
        |_| true,
    )
    .unwrap();
    // 28 tokens: 27 prefilled in chunks of 8, then the last with the first token's logits.
    assert_eq!(
        record.0.into_inner().unwrap(),
        [
            "prompt Some(28) tokens",
            "+8",
            "+8",
            "+8",
            "+3",
            "+1",
            "done"
        ]
    );
}

/// Decode that runs ahead of the routing checks (`StreamingExperts::run_ahead`,
/// `FLASHPACK_AHEAD=1`: each layer is scheduled with the slots the store last gave its experts,
/// and a layer whose experts were not all there is routed again with every layer after it)
/// gives the usual path's logits bit for bit, on every kind of layer cache: plain KV
/// (qwen3_moe), MLA with a dense first layer and shared experts (deepseek_v3), sliding windows
/// with sinks (gpt_oss), linear attention (qwen3_next), MLA with the sparse attention's
/// indexer keys (deepseek_v32), Gemma 4's sandwich layers (a sliding and a full layer, the
/// layer scalar on the residual, gemma4_text), and Kimi-K3's attention residuals over KDA and
/// MLA layers (the blocks a layer routed again had when it was scheduled, kimi_k3). All experts
/// resident, half of them,
/// and a few slots more than one token's experts, where most layers are routed again.
#[test]
fn running_ahead_changes_no_logit() {
    let dir = tempfile::tempdir().unwrap();
    for src in [
        "qwen3moe-tiny",
        "golden/deepseek_v3-q4",
        "golden/gpt_oss-q4",
        "golden/qwen3_next-q4",
        "golden/deepseek_v32-q4",
        "golden/gemma4_text-q4",
        "golden/kimi_k3-q4",
    ] {
        let out = dir
            .path()
            .join(format!("{}.flashpack", src.replace('/', "-")));
        convert(&fixture(src), &out, ConvertOptions::default());
        let (pack, cfg, weights) = open::open(&out, true).unwrap();
        let model = Model::load(&cfg, &weights).unwrap();
        let vocab = cfg.vocab_size as u32;
        let prompt: Vec<u32> = PROMPT.iter().map(|t| t % vocab).collect();
        let steps: Vec<u32> = [11u32, 279, 1879, 13, 7, 100]
            .iter()
            .map(|t| t % vocab)
            .collect();
        let run = |store: &mut dyn ExpertStore| {
            let mut kv = model.new_cache();
            let mut all = model
                .forward_ids(&prompt, &mut kv, store)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            for &t in &steps {
                let l = model.forward_ids(&[t], &mut kv, store).unwrap();
                all.extend(l.to_vec_f32().unwrap());
            }
            all
        };
        let mut usual = StreamingExperts::new(&pack, cache(&pack, None), cfg.num_experts, false);
        let want = run(&mut usual);
        let stored = pack.experts().iter().filter(|e| e.segment == 0).count() as u64;
        let k = cfg.num_experts_per_tok as u64;
        for budget in [None, Some(stored / 2), Some(k + 2)] {
            let mut ahead =
                StreamingExperts::new(&pack, cache(&pack, budget), cfg.num_experts, false)
                    .run_ahead(true);
            assert_eq!(differing(&run(&mut ahead), &want), 0, "{src} {budget:?}");
            let s = &ahead.stats;
            assert!(
                s.ahead_confirmed + s.ahead_redone > 0,
                "{src}: not run ahead"
            );
            if budget.is_none() {
                // Every expert resident: only a layer's first use is routed again.
                assert!(s.ahead_confirmed > s.ahead_redone, "{src}: {s:?}");
            }
            if budget == Some(k + 2) {
                assert!(
                    s.ahead_redone > 0,
                    "{src}: nothing routed again at {budget:?}"
                );
            }
        }
    }
}

/// The same through the CLI (the engine's store wrapper must pass running ahead on): greedy text
/// under 25% and 12% budgets with `FLASHPACK_AHEAD=1` equals the resident run's, and the report
/// counts layers that stood and layers routed again.
#[test]
fn running_ahead_through_the_cli_keeps_the_resident_text() {
    let dir = tempfile::tempdir().unwrap();
    let pack = crate::common::tiny_pack(dir.path());
    let pack = pack.to_str().unwrap();
    let args = |budget: Option<&'static str>| {
        let mut a = vec![
            "run",
            pack,
            "--prompt",
            "The history of the city",
            "--max-tokens",
            "12",
            "--json",
        ];
        if let Some(b) = budget {
            a.extend(["--expert-budget", b]);
        }
        a
    };
    let resident = crate::common::flashpack_cli(&args(None), &[]);
    assert!(resident.status.success());
    for budget in ["25%", "12%"] {
        let out = crate::common::flashpack_cli(&args(Some(budget)), &[("FLASHPACK_AHEAD", "1")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, resident.stdout, "{budget}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report: serde_json::Value =
            serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
        let stood = report["stream"]["ahead_confirmed"].as_u64().unwrap();
        let redone = report["stream"]["ahead_redone"].as_u64().unwrap();
        assert!(
            stood > 0 && redone > 0,
            "{budget}: {stood} stood, {redone} redone"
        );
    }
}

/// `FLASHPACK_TRACE=FILE` writes one CSV line per routed layer of a streamed run, with the
/// header its readers (scripts/trace_stream.py) expect; a path that cannot be written is said on
/// stderr and the run goes on untraced, with the same text.
#[test]
fn the_per_layer_trace_is_written_or_its_failure_said() {
    let dir = tempfile::tempdir().unwrap();
    let pack = crate::common::tiny_pack(dir.path());
    let trace = dir.path().join("trace.csv");
    let args = [
        "run",
        pack.to_str().unwrap(),
        "--prompt",
        "The history of",
        "--max-tokens",
        "4",
        "--expert-budget",
        "25%",
    ];
    let traced =
        crate::common::flashpack_cli(&args, &[("FLASHPACK_TRACE", trace.to_str().unwrap())]);
    assert!(traced.status.success());
    let csv = std::fs::read_to_string(&trace).unwrap();
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("layer,entries,host_us,eval_us,misses,"));
    let rows: Vec<&str> = lines.collect();
    assert!(!rows.is_empty(), "no routed layer traced");
    assert!(rows.iter().all(|r| r.split(',').count() == 13), "{csv}");

    let bad = dir.path().join("no-such-dir").join("trace.csv");
    let untraced =
        crate::common::flashpack_cli(&args, &[("FLASHPACK_TRACE", bad.to_str().unwrap())]);
    let err = String::from_utf8_lossy(&untraced.stderr);
    assert!(untraced.status.success(), "{err}");
    assert!(
        err.contains("FLASHPACK_TRACE") && err.contains("without the trace"),
        "{err}"
    );
    assert_eq!(untraced.stdout, traced.stdout, "the trace changes no token");
}
