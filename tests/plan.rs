//! `flashpack plan` (issue 31, decision 0032): on the bundled checkpoint folder, on a converted
//! pack and on a Hub id through the local Hub server; the table and the JSON; that only headers
//! are read (the ranges read are checked against each file's header region, and the Hub server
//! counts the bytes it sent per file); that plan and run agree on what a budget holds; bad input.
//! The machine's rates are always given (`FLASHPACK_PLAN_RATES`, `GivenRates`), except in the one
//! test of the measuring path, which asserts nothing about the numbers: no test depends on this
//! machine's disk or compute speed, and none asserts on time.

use crate::common;
use crate::common::hub_server::{sha256_hex, HubServer};
use crate::common::walk;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use flashpack::format::{Header, Pack, SectionKind};
use flashpack::hub::{Hub, HubConfig};
use flashpack::plan::read::{checkpoint_shadow, pack_shadow, Files, LocalFiles};
use flashpack::plan::speed::{Compute, Disk};
use flashpack::plan::{plan, GivenRates, PlanError, PlanOptions};
use flashpack::progress::Silent;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineOptions};
use flashpack::run::experts::ExpertCache;
use serde_json::Value;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")
}

const SHARDS: [&str; 4] = [
    "model-00001-of-00004.safetensors",
    "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors",
];

/// Rates that make every prediction a function of the source alone: 10 ms per token
/// resident, 12 ms streamed, 200 ms per 64-token prompt, a miss 100 us then 1 GB/s.
fn rates() -> GivenRates {
    GivenRates {
        disk: Some(Disk {
            latency_s: 1e-4,
            bytes_per_s: 1e9,
        }),
        compute: Some(Compute {
            decode_s: 0.010,
            streamed_decode_s: 0.012,
            prefill_s: 0.2,
            streamed_prefill_s: 0.25,
            chunk_tokens: 64,
        }),
    }
}

const RATES_ENV: &str = r#"{"disk": {"latency_s": 1e-4, "bytes_per_s": 1e9},
 "compute": {"decode_s": 0.010, "streamed_decode_s": 0.012, "prefill_s": 0.2,
             "streamed_prefill_s": 0.25, "chunk_tokens": 64}}"#;

fn options(source: &str) -> PlanOptions {
    PlanOptions {
        source: source.to_string(),
        ram: Some(64 << 30),
        context: 4096,
        mac: false,
        remeasure: false,
        disk_speed: None,
        rates: Some(rates()),
    }
}

/// A Hub client that never reaches a network (plans of local sources make no request).
fn no_hub(cache: &Path) -> Hub {
    Hub::new(HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
    })
}

/// `8 + n`: the bytes of a safetensors file that hold its header (its length, then the JSON).
fn header_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// [`Files`] that records every range asked for (the test's own counting reader).
struct Recorded {
    inner: LocalFiles,
    reads: RefCell<Vec<(String, Range<u64>)>>,
}

impl Files for Recorded {
    fn list(&self) -> Result<Vec<String>, PlanError> {
        self.inner.list()
    }
    fn len(&self, file: &str) -> Result<u64, PlanError> {
        self.inner.len(file)
    }
    fn read(&self, file: &str, range: Range<u64>) -> Result<Vec<u8>, PlanError> {
        self.reads
            .borrow_mut()
            .push((file.to_string(), range.clone()));
        self.inner.read(file, range)
    }
}

#[test]
fn a_checkpoint_is_read_only_in_its_config_index_and_headers() {
    let files = Recorded {
        inner: LocalFiles { root: tiny() },
        reads: RefCell::new(Vec::new()),
    };
    let shadow = checkpoint_shadow(&files).unwrap();
    let reads = files.reads.into_inner();
    let mut per_file: BTreeMap<String, u64> = BTreeMap::new();
    for (file, r) in &reads {
        let path = tiny().join(file);
        // Every range lies in the file's header region (JSON files are all header).
        let limit = if file.ends_with(".safetensors") {
            header_len(&path)
        } else {
            std::fs::metadata(&path).unwrap().len()
        };
        assert!(r.end <= limit, "{file}: read {r:?}, header ends at {limit}");
        *per_file.entry(file.clone()).or_default() += r.end - r.start;
    }
    let mut want: BTreeMap<String, u64> = SHARDS
        .iter()
        .map(|s| (s.to_string(), header_len(&tiny().join(s))))
        .collect();
    for f in ["config.json", "model.safetensors.index.json"] {
        want.insert(f.into(), std::fs::metadata(tiny().join(f)).unwrap().len());
    }
    assert_eq!(per_file, want);
    // The shadow has each shard's length, and holds nothing past its header (a hole).
    for s in SHARDS {
        let real = tiny().join(s);
        let copy = std::fs::read(shadow.dir().join(s)).unwrap();
        assert_eq!(copy.len() as u64, std::fs::metadata(&real).unwrap().len());
        let h = header_len(&real) as usize;
        assert_eq!(copy[..h], std::fs::read(&real).unwrap()[..h]);
        assert!(copy[h..].iter().all(|&b| b == 0), "{s}");
    }
}

#[test]
fn plans_the_bundled_checkpoint_folder() {
    let cache = tempfile::tempdir().unwrap();
    let report = plan(&options(tiny().to_str().unwrap()), &no_hub(cache.path())).unwrap();
    assert_eq!(report.kind, "checkpoint");
    assert_eq!(report.model.architecture, "qwen3_moe");
    assert_eq!(
        (
            report.model.layers,
            report.model.experts,
            report.model.experts_per_token
        ),
        (6, 32, 4)
    );
    // What plan read: the config, the index and each shard's header, nothing else.
    let mut want: BTreeMap<String, u64> = SHARDS
        .iter()
        .map(|s| (s.to_string(), header_len(&tiny().join(s))))
        .collect();
    for f in ["config.json", "model.safetensors.index.json"] {
        want.insert(f.into(), std::fs::metadata(tiny().join(f)).unwrap().len());
    }
    assert_eq!(report.read.files, want);
    let faithful = &report.options[0];
    assert_eq!(faithful.name, "faithful 4-bit");
    assert_eq!(faithful.convert.as_deref(), Some(""));
    assert_eq!(faithful.experts, 6 * 32);
    let labels: Vec<&str> = faithful
        .budgets
        .iter()
        .map(|b| b.row.label.as_str())
        .collect();
    assert_eq!(labels, ["100%", "50%", "25%", "12%"]);
    // No profile: uniform routing, so the hit rate is the share resident.
    for b in &faithful.budgets[1..] {
        let share = b.row.resident_experts as f64 / b.row.stored_experts as f64;
        assert!((b.row.hit_rate - share).abs() < 1e-9, "{}", b.row.label);
        assert!(b.decode_tokens_per_s.unwrap() > 0.0);
    }
    // Every expert fits 64 GB: the faithful pack, no budget.
    assert_eq!(
        report.recommendation.command,
        format!(
            "flashpack convert {} -o qwen3moe-tiny.flashpack && flashpack chat \
             qwen3moe-tiny.flashpack --max-context 4096",
            tiny().display()
        )
    );
    assert!(report.wired_limit.is_none());
}

#[test]
fn a_folder_and_its_conversion_plan_the_same_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let pack = common::tiny_pack(dir.path());
    let hub = no_hub(cache.path());
    let from_folder = plan(&options(tiny().to_str().unwrap()), &hub).unwrap();
    let from_pack = plan(&options(pack.to_str().unwrap()), &hub).unwrap();
    let (f, p) = (&from_folder.options[0], &from_pack.options[0]);
    assert_eq!(p.name, "this pack");
    assert_eq!(p.convert, None);
    // Convert's own planning, from the headers, is what convert wrote.
    assert_eq!(f.dense_bytes, p.dense_bytes);
    assert_eq!(f.expert_bytes, p.expert_bytes);
    assert_eq!(f.experts, p.experts);
    let real = std::fs::metadata(&pack).unwrap().len();
    assert_eq!(p.pack_bytes, real);
    // The folder's estimate: raw parts (an upper bound) and a guessed metadata size.
    let off = (f.pack_bytes as f64 - real as f64).abs() / real as f64;
    assert!(off < 0.03, "estimated {} for {real}", f.pack_bytes);
    for (a, b) in f.budgets.iter().zip(&p.budgets) {
        assert_eq!(
            a.row.resident_experts, b.row.resident_experts,
            "{}",
            a.row.label
        );
        assert_eq!(a.row.memory_bytes, b.row.memory_bytes, "{}", a.row.label);
    }
}

#[test]
fn a_pack_is_read_only_in_its_header_directories_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let pack = common::tiny_pack(dir.path());
    let files = Recorded {
        inner: LocalFiles {
            root: dir.path().to_path_buf(),
        },
        reads: RefCell::new(Vec::new()),
    };
    let shadow = pack_shadow(&files, "tiny.flashpack").unwrap();
    let bytes = std::fs::read(&pack).unwrap();
    let header = Header::decode(&bytes).unwrap();
    let allowed: Vec<Range<u64>> = std::iter::once(0..header.region_len())
        .chain(
            header
                .sections
                .iter()
                .filter(|s| {
                    matches!(
                        s.known_kind(),
                        Some(
                            SectionKind::TensorDir | SectionKind::ExpertDir | SectionKind::Metadata
                        )
                    )
                })
                .map(|s| s.offset..s.offset + s.stored_len),
        )
        .collect();
    let (dense, experts) = {
        let p = Pack::open(&pack).unwrap();
        (
            p.section_range(SectionKind::DenseData),
            p.section_range(SectionKind::ExpertData),
        )
    };
    let reads = files.reads.into_inner();
    let mut total = 0;
    for (_, r) in &reads {
        // Past the header region nothing is read but whole directories and the metadata.
        if r.start > 0 {
            assert!(allowed.contains(r), "read {r:?}");
        }
        for weights in [&dense, &experts] {
            assert!(
                r.end <= weights.start || r.start >= weights.end,
                "{r:?} in {weights:?}"
            );
        }
        total += r.end - r.start;
    }
    assert!(
        total < bytes.len() as u64 / 10,
        "{total} of {}",
        bytes.len()
    );
    // The copy opens as the pack it stands for.
    let Some(copy) = (match &shadow.kind {
        flashpack::plan::read::ShadowKind::Pack(p) => Some(p.clone()),
        _ => None,
    }) else {
        panic!("not a pack shadow")
    };
    let (a, b) = (Pack::open(&copy).unwrap(), Pack::open(&pack).unwrap());
    assert_eq!(a.experts(), b.experts());
    assert_eq!(a.tensors(), b.tensors());
}

#[test]
fn plan_and_run_agree_on_what_a_budget_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let path = common::tiny_pack(dir.path());
    let mut opts = options(path.to_str().unwrap());
    // 50 MiB usable: the last row is `--mem-budget 50MiB`.
    opts.ram = Some((2 << 30) + (50 << 20));
    opts.context = 256;
    let report = plan(&opts, &no_hub(cache.path())).unwrap();
    let (pack, cfg, weights) = flashpack::run::open::open(&path, false).unwrap();
    let o = &report.options[0];
    assert_eq!(o.expert_bytes, ExpertCache::all_resident_bytes(&pack));
    assert_eq!(o.dense_bytes, weights.bytes);
    assert_eq!(o.budgets.last().unwrap().row.label, "fits");
    for b in &o.budgets[1..] {
        // The engine `run` builds with the row's option.
        let (option, value) = b.row.flag.split_once(' ').unwrap();
        let budget = Budget::parse(value).unwrap();
        let mut eo = EngineOptions {
            positions: 256,
            ..EngineOptions::default()
        };
        match option {
            "--mem-budget" => eo.mem_budget = Some(budget),
            _ => eo.expert_budget = Some(budget),
        }
        let engine = Engine::new(&pack, &cfg, &weights, &eo, &Silent).unwrap();
        let sizes = engine.sizes();
        assert_eq!(
            sizes.expert_budget_bytes, b.row.expert_budget_bytes,
            "{}",
            b.row.label
        );
        let stats = engine.cache_stats();
        assert_eq!(
            stats.slots as u64, b.row.resident_experts,
            "{}",
            b.row.label
        );
        assert_eq!(
            sizes.dense_bytes + stats.resident_bytes + sizes.margin_bytes,
            b.row.memory_bytes,
            "{}",
            b.row.label
        );
    }
}

#[test]
fn a_machine_that_holds_part_of_the_experts_gets_a_mem_budget() {
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(tiny().to_str().unwrap());
    // 2 GiB are left to the system: 20 MiB usable, short of the 100% row's needs.
    opts.ram = Some((2 << 30) + (20 << 20));
    opts.context = 256;
    let report = plan(&opts, &no_hub(cache.path())).unwrap();
    assert_eq!(report.machine.usable_bytes, 20 << 20);
    let o = &report.options[0];
    let all = o.budgets.iter().find(|b| b.row.label == "100%").unwrap();
    assert!(!all.row.fits);
    let fits = o.budgets.iter().find(|b| b.row.label == "fits").unwrap();
    assert_eq!(fits.row.flag, "--mem-budget 20MiB");
    assert!(fits.row.fits && fits.row.memory_bytes <= 20 << 20);
    assert!(fits.row.resident_experts < 192);
    assert!(
        report.recommendation.command.contains("--mem-budget 20MiB"),
        "{}",
        report.recommendation.command
    );
    // Mixes are listed, sized by convert's planning.
    let mix = report.options.iter().find(|o| {
        o.convert
            .as_deref()
            .is_some_and(|c| c.starts_with("--target-size"))
    });
    let mix = mix.expect("a mix");
    assert!(mix.cold_experts > 0 && mix.cold_bits == Some(2));
    assert!(mix.pack_bytes < o.pack_bytes);
}

#[test]
fn a_mac_gets_the_wired_limit_its_budget_needs() {
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(tiny().to_str().unwrap());
    opts.mac = true;
    let report = plan(&opts, &no_hub(cache.path())).unwrap();
    let w = report.wired_limit.as_ref().unwrap();
    let o = &report.options[0];
    let row = o.budgets.iter().find(|b| b.row.label == "100%").unwrap();
    assert_eq!(w.megabytes, row.row.memory_bytes.div_ceil(1 << 20));
    // 77 MB of 64 GB: Metal's default allows it, nothing to raise.
    assert!(w.command.is_empty(), "{}", w.command);
    assert!(w.why.contains("nothing to set"), "{}", w.why);
}

/// The tiny checkpoint's files as a Hub repository (weights and tokenizer as LFS files).
fn tiny_repo(s: &HubServer, repo: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        files.insert(name.clone(), std::fs::read(tiny().join(&name)).unwrap());
    }
    let list: Vec<(&str, Vec<u8>, bool)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone(), n.ends_with(".safetensors")))
        .collect();
    s.add_repo(repo, false, &list);
    files
}

#[test]
fn plans_a_hub_checkpoint_from_ranges_of_its_files() {
    let s = HubServer::start();
    let files = tiny_repo(&s, "org/tiny");
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(HubConfig {
        endpoint: s.endpoint.clone(),
        token: None,
        cache_dir: cache.path().to_path_buf(),
        offline: false,
    });
    let report = plan(&options("org/tiny"), &hub).unwrap();
    assert_eq!(report.kind, "checkpoint");
    assert!(report.commit.is_some());
    // What the server sent: each shard's header and no more, the config and index whole.
    let served = s.state().served.clone();
    for shard in SHARDS {
        let oid = sha256_hex(&files[shard]);
        let sent = served.get(&format!("/lfs/{oid}")).copied().unwrap_or(0);
        assert_eq!(sent, header_len(&tiny().join(shard)), "{shard}");
    }
    let sent_total: u64 = served.values().sum();
    let weights: u64 = SHARDS.iter().map(|s| files[*s].len() as u64).sum();
    assert!(sent_total < weights / 20, "{sent_total} of {weights}");
    // Nothing went into the Hub cache.
    let cached: Vec<_> = walk(cache.path());
    assert!(cached.is_empty(), "{cached:?}");
    // The same numbers as the folder.
    let folder = plan(&options(tiny().to_str().unwrap()), &hub).unwrap();
    assert_eq!(report.options[0].dense_bytes, folder.options[0].dense_bytes);
    assert_eq!(
        report.options[0].expert_bytes,
        folder.options[0].expert_bytes
    );
    assert_eq!(report.read.files, folder.read.files);
}

/// `flashpack plan ARGS` with the given rates and a private cache folder.
fn cli(args: &[&str], cache: &Path, extra: &[(&str, &str)]) -> std::process::Output {
    let mut envs = vec![
        ("FLASHPACK_PLAN_RATES", RATES_ENV),
        ("XDG_CACHE_HOME", cache.to_str().unwrap()),
        ("HF_HOME", cache.to_str().unwrap()),
    ];
    envs.extend_from_slice(extra);
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    common::flashpack_cli(&all, &envs)
}

#[test]
fn the_cli_prints_the_options_the_budgets_and_one_command() {
    let cache = tempfile::tempdir().unwrap();
    let out = cli(&[tiny().to_str().unwrap()], cache.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("qwen3_moe, 6 layers (6 sparse), 32 experts, 4 per token"));
    assert!(lines[1].starts_with("read: ") && lines[1].contains("no weights"));
    assert!(text.contains(
        "| option | convert options | pack | cold experts | quality cost | all resident needs | best here | decode tok/s |"
    ));
    assert!(text.contains(
        "| experts | run option | resident | memory | fits | hit rate | read per token | decode tok/s | prefill tok/s |"
    ));
    for label in [
        "| 100% | (none) |",
        "| 50% | `--expert-budget 50%` |",
        "| 12% |",
    ] {
        assert!(text.contains(label), "{label}\n{text}");
    }
    let rec = lines
        .iter()
        .position(|l| l.starts_with("recommended"))
        .unwrap();
    assert!(
        lines[rec + 1].trim().starts_with("flashpack convert "),
        "{text}"
    );
    assert!(!text.contains("iogpu") || cfg!(target_os = "macos"));
    let mac = cli(&[tiny().to_str().unwrap(), "--mac"], cache.path(), &[]);
    assert!(String::from_utf8_lossy(&mac.stdout).contains("on a Mac: the run keeps"));
}

#[test]
fn the_json_is_one_stable_object() {
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let out = cli(&[tiny().to_str().unwrap(), "--json"], cache.path(), &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let v = run();
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        [
            "commit",
            "kind",
            "machine",
            "model",
            "options",
            "rates",
            "read",
            "recommendation",
            "source",
            "wired_limit"
        ]
    );
    for k in [
        "architecture",
        "layers",
        "sparse_layers",
        "experts",
        "experts_per_token",
    ] {
        assert!(v["model"][k].is_string() || v["model"][k].is_u64(), "{k}");
    }
    for k in ["ram_bytes", "usable_bytes", "context"] {
        assert!(v["machine"][k].is_u64(), "{k}");
    }
    assert!(v["read"]["files"].is_object() && v["read"]["total_bytes"].is_u64());
    assert_eq!(v["rates"]["disk_origin"], "given");
    assert_eq!(v["rates"]["compute"]["decode_s"], 0.010);
    let o = &v["options"][0];
    for k in [
        "name",
        "pack_bytes",
        "dense_bytes",
        "expert_bytes",
        "experts",
        "quality",
    ] {
        assert!(!o[k].is_null(), "{k}");
    }
    for b in o["budgets"].as_array().unwrap() {
        for k in [
            "label",
            "flag",
            "resident_experts",
            "stored_experts",
            "memory_bytes",
            "fits",
            "hit_rate",
            "hit_model",
            "misses_per_token",
            "bytes_read_per_token",
            "decode_tokens_per_s",
            "prefill_tokens_per_s",
        ] {
            assert!(b.get(k).is_some(), "{k}");
        }
    }
    assert!(v["recommendation"]["command"].is_string());
    // The same source, options and rates give the same object.
    assert_eq!(run(), v);
}

#[test]
fn the_cli_plans_a_hub_id_and_a_pack() {
    let s = HubServer::start();
    tiny_repo(&s, "org/tiny");
    let cache = tempfile::tempdir().unwrap();
    let out = cli(
        &["org/tiny", "--json"],
        cache.path(),
        &[("HF_ENDPOINT", s.endpoint.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "checkpoint");
    assert!(v["recommendation"]["command"]
        .as_str()
        .unwrap()
        .starts_with("flashpack convert org/tiny -o tiny.flashpack"));
    let dir = tempfile::tempdir().unwrap();
    let pack = common::tiny_pack(dir.path());
    let out = cli(&[pack.to_str().unwrap(), "--json"], cache.path(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "pack");
    assert_eq!(v["options"].as_array().unwrap().len(), 1);
    // A pack published on the Hub (`flashpack publish`): its header region, directories and
    // metadata are fetched by range, not the pack.
    let bytes = std::fs::read(&pack).unwrap();
    s.add_repo(
        "org/tiny-pack",
        false,
        &[
            ("README.md", b"# a pack".to_vec(), false),
            ("tiny.flashpack", bytes.clone(), true),
        ],
    );
    let out = cli(
        &["org/tiny-pack", "--json"],
        cache.path(),
        &[("HF_ENDPOINT", s.endpoint.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "pack");
    assert_eq!(
        v["recommendation"]["command"],
        "flashpack chat tiny.flashpack --max-context 4096"
    );
    let sent = s.state().served[&format!("/lfs/{}", sha256_hex(&bytes))];
    assert_eq!(sent, v["read"]["total_bytes"].as_u64().unwrap());
    assert!(sent < bytes.len() as u64 / 10, "{sent} of {}", bytes.len());
}

#[test]
fn the_default_path_measures_this_machine_once_per_disk() {
    // No rates given: the probe and the disk are measured (the numbers are not checked, only
    // that they are there), and the disk's are cached for the next plan on that disk.
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let pack = common::tiny_pack(dir.path());
    let go = || {
        let out = common::flashpack_cli(
            &["plan", pack.to_str().unwrap(), "--json"],
            &[("XDG_CACHE_HOME", cache.path().to_str().unwrap())],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let first = go();
    assert_eq!(first["rates"]["disk_origin"], "measured");
    assert_eq!(first["rates"]["compute_origin"], "measured");
    for k in ["latency_s", "bytes_per_s"] {
        assert!(first["rates"]["disk"][k].as_f64().unwrap() >= 0.0, "{k}");
    }
    assert!(first["rates"]["compute"]["decode_s"].as_f64().unwrap() > 0.0);
    assert!(cache.path().join("flashpack/disks.json").is_file());
    // The scratch file is gone.
    let left: Vec<_> = walk(dir.path());
    assert_eq!(left, std::slice::from_ref(&pack));
    assert_eq!(go()["rates"]["disk_origin"], "cached");
}

#[test]
fn bad_input_is_named_and_exits_1() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fail = |args: &[&str]| {
        let out = cli(args, cache.path(), &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A missing folder.
    let missing = dir.path().join("nowhere");
    let e = fail(&[missing.to_str().unwrap()]);
    assert!(e.contains("does not exist") && e.contains("nowhere"), "{e}");
    // A dense model.
    let dense = dir.path().join("dense");
    std::fs::create_dir(&dense).unwrap();
    std::fs::write(dense.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    std::fs::write(dense.join("model.safetensors"), b"\x02\0\0\0\0\0\0\0{}").unwrap();
    let e = fail(&[dense.to_str().unwrap()]);
    assert!(e.contains("llama"), "{e}");
    // A MoE architecture configured without experts, or with only dense layers.
    let tiny_cfg: Value =
        serde_json::from_slice(&std::fs::read(tiny().join("config.json")).unwrap()).unwrap();
    let folder = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut cfg = tiny_cfg.clone();
        edit(&mut cfg);
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        std::fs::write(d.join("model.safetensors"), b"\x02\0\0\0\0\0\0\0{}").unwrap();
        d
    };
    let none = folder("no-experts", &|c| {
        c["num_experts"] = 0.into();
        c["num_local_experts"] = 0.into();
    });
    let e = fail(&[none.to_str().unwrap()]);
    assert!(e.contains("num_local_experts") && e.contains("is 0"), "{e}");
    let dense_only = folder("dense-layers", &|c| {
        c["mlp_only_layers"] = serde_json::json!([0, 1, 2, 3, 4, 5]);
    });
    let e = fail(&[dense_only.to_str().unwrap()]);
    assert!(
        e.contains("qwen3_moe is not a Mixture-of-Experts model") && e.contains("0 sparse layers"),
        "{e}"
    );
    // RAM smaller than the dense weights.
    let e = fail(&[tiny().to_str().unwrap(), "--ram", "1MB"]);
    assert!(
        e.contains("the dense weights") && e.contains("does not fit") && e.contains("--ram"),
        "{e}"
    );
    // A file that is not a pack.
    let e = fail(&[tiny().join("README.md").to_str().unwrap()]);
    assert!(e.contains("is not a pack"), "{e}");
    // A folder without weights.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let e = fail(&[empty.to_str().unwrap()]);
    assert!(e.contains("neither model.safetensors nor"), "{e}");
    // Rates that do not parse.
    let out = cli(
        &[tiny().to_str().unwrap()],
        cache.path(),
        &[("FLASHPACK_PLAN_RATES", "{\"disk\": 3}")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FLASHPACK_PLAN_RATES"));
}

#[test]
fn usage_errors_exit_2() {
    let cache = tempfile::tempdir().unwrap();
    for args in [
        vec!["plan"],
        vec!["plan", "x", "--ram", "50%"],
        vec!["plan", "x", "--ram", "64"],
        vec!["plan", "x", "--context", "0"],
        vec!["plan", "x", "--disk-speed", "fast"],
    ] {
        let out =
            common::flashpack_cli(&args, &[("XDG_CACHE_HOME", cache.path().to_str().unwrap())]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
