//! Memory pressure on the bundled tiny model (issue 31, item 3): a scripted pressure source
//! drives the expert cache down to its floor and back up in the middle of a generation, and
//! the tokens are the unpressured run's, through the library (a streaming engine, and an
//! all-resident one that streams while shrunk), `run --json` (the report follows the script;
//! MLX's memory follows the budget) and `serve` (`/health` shows the pressure; an idle server
//! gives memory back). A resize with a prefetch in flight keeps every resident expert's bytes;
//! the floor holds, and is said once. The policy's own tests are in `src/run/pressure/`.

use std::path::Path;
use std::sync::Mutex;

use crate::common::http::{self, post, Server};
use crate::engine::greedy;

use flashpack::mlx::Dtype;
use flashpack::progress::Progress;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineOptions};
use flashpack::run::experts::{ExpertCache, PolicyKind, StoreOptions};
use flashpack::run::open;
use flashpack::run::pressure::{Policy, PressureStatus, PressureWatch, Sample, ScriptedSource};
use serde_json::{json, Value};

const PROMPT: &str = "The history of the Roman empire";
const TOKENS: usize = 32;

/// Warnings kept for the test to read.
#[derive(Default)]
struct Warned(Mutex<Vec<String>>);

impl Progress for Warned {
    fn stage(&self, _name: &str, _total: Option<u64>, _unit: &str) {}
    fn advance(&self, _n: u64) {}
    fn finish_stage(&self) {}
    fn warn(&self, msg: &str) {
        self.0.lock().unwrap().push(msg.to_string());
    }
}

/// A pressure script for a cache of `max` bytes, one reading per forward pass, on a machine of
/// `10 * max` bytes (so its marks, 5% and 10% of it, are half the cache and the whole, and the
/// middle of the band three quarters): plenty (the prompt's passes and a token: at the max,
/// nothing to grow), short by half the cache (shrink to about half), inside the band (nothing
/// changes), short by three tenths (shrink to about a fifth), nothing available (to the floor,
/// with a warning, and stay there), then plenty again (three calm readings, then back to the
/// max).
fn down_and_up(max: u64) -> String {
    let total = 10 * max;
    let (low, high) = Policy::default().marks(total);
    let mid = low + (high - low) / 2;
    assert!(mid - max / 2 < low && mid - (max / 2 - max / 5) < low);
    [
        format!("total={total}B available={high}B repeat=3"),
        format!("available={}B", mid - max / 2),
        format!("available={}B repeat=3", low + (high - low) / 4),
        format!("available={}B", mid - (max / 2 - max / 5)),
        "available=0 repeat=4".to_string(),
        format!("available={total}B"),
    ]
    .join("\n")
}

/// The budgets the script's resizes went through, in order: down, down, to the floor, back
/// to the max.
fn check_down_and_up(p: &PressureStatus) {
    let to: Vec<u64> = p.changes.iter().map(|c| c.to_bytes).collect();
    assert_eq!(
        (p.shrinks, p.grows, to.len()),
        (3, 1, 4),
        "three shrinks then one growth: {p:#?}"
    );
    assert!(to[0] < p.max_expert_budget_bytes && to[0] > to[1] && to[1] > to[2]);
    assert_eq!(to[2], p.floor_bytes, "the third shrink stops at the floor");
    assert!(
        p.changes[2].wanted_bytes < p.floor_bytes,
        "it wanted less than the floor"
    );
    assert_eq!(to[3], p.max_expert_budget_bytes, "grown back to the budget");
    assert_eq!(p.expert_budget_bytes, p.max_expert_budget_bytes);
    assert!(p.changes[0].evicted > 0);
    assert_eq!(p.floor_warnings, 1, "said once in the episode");
    assert!(!p.pressure && !p.at_floor);
    // The readings that asked: the 4th (half), 8th (a fifth), 9th (nothing left), 15th
    // (plenty, after three calm ones).
    let at: Vec<u64> = p.changes.iter().map(|c| c.reading).collect();
    assert_eq!(at, vec![4, 8, 9, 15]);
}

fn options(expert_budget: Option<&str>) -> EngineOptions {
    EngineOptions {
        expert_budget: expert_budget.map(|b| Budget::parse(b).unwrap()),
        positions: 512,
        ..EngineOptions::default()
    }
}

/// Through the library: a streaming engine (half the experts) and an all-resident one (which
/// streams while shrunk and gets its device-routed store back once every expert is resident
/// again) give the unpressured engine's tokens while the script takes their cache to the floor
/// and back; prefetches are in flight while it shrinks.
#[test]
fn a_scripted_drop_takes_the_cache_to_its_floor_and_back_with_the_same_tokens() {
    let path = http::tiny_pack("pressure-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    for budget in [Some("50%"), None] {
        let mut calm =
            Engine::new(&pack, &cfg, &weights, &options(budget), &Warned::default()).unwrap();
        let prompt = calm.encode(PROMPT).unwrap();
        let expected = calm
            .generate(&prompt, &greedy(TOKENS), &Warned::default(), |_| true)
            .unwrap()
            .generation
            .tokens;
        assert_eq!(expected.len(), TOKENS);

        let mut engine =
            Engine::new(&pack, &cfg, &weights, &options(budget), &Warned::default()).unwrap();
        assert_eq!(engine.streaming(), budget.is_some());
        let max = engine.cache_stats().resident_bytes;
        let script = ScriptedSource::parse(&down_and_up(max), Path::new("test")).unwrap();
        engine.watch_pressure(Some(PressureWatch::new(
            Box::new(script),
            Policy::default(),
        )));
        let warned = Warned::default();
        let got = engine
            .generate(&prompt, &greedy(TOKENS), &warned, |_| true)
            .unwrap()
            .generation
            .tokens;
        assert_eq!(got, expected, "pressure changed the tokens ({budget:?})");
        let p = engine.pressure_status().unwrap();
        assert_eq!(p.source, "script");
        check_down_and_up(&p);
        let warnings = warned.0.lock().unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("at its floor") && warnings[0].contains("0.0 MB available"),
            "{}",
            warnings[0]
        );
        // The pools really have the sizes reported.
        let cache = engine.cache_stats();
        assert_eq!(cache.resident_bytes, p.expert_budget_bytes);
        // All resident again: the device-routed store is back.
        assert_eq!(engine.streaming(), budget.is_some());
        // The next answer, with the cache back at its budget, is the calm engine's too.
        let again = engine
            .generate(&prompt, &greedy(8), &warned, |_| true)
            .unwrap()
            .generation
            .tokens;
        assert_eq!(again, expected[..8]);
    }
}

/// A resize with a prefetch in flight joins it first; after a shrink, and after growing back
/// to every expert, each expert the cache calls resident holds, in every array of its pool, the
/// bytes an all-resident cache holds for it.
#[test]
fn a_resize_joins_a_prefetch_in_flight_and_every_resident_expert_keeps_its_bytes() {
    let path = http::tiny_pack("pressure-tests");
    let (pack, _, _) = open::open(path, true).unwrap();
    let all = ExpertCache::all_resident_bytes(&pack);
    let mut reference = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    reference.warm_all(&pack).unwrap();
    let mut cache = ExpertCache::new(
        &pack,
        &StoreOptions {
            budget_bytes: Some(all),
            policy: PolicyKind::Lru,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for layer in 0..6 {
        let wanted: Vec<u32> = (0..12).map(|e| (e * 5 + layer) % 32).collect();
        cache.prepare(&pack, layer, &wanted).unwrap();
    }
    let in_flight: Vec<u32> = (16..32).collect();
    cache.prefetch(&pack, 3, &in_flight).unwrap();
    let shrunk = cache.resize(all / 4, 4).unwrap();
    assert!(
        shrunk.to_bytes < shrunk.from_bytes && shrunk.evicted > 0,
        "{shrunk:?}"
    );
    assert_same_bytes(&cache, &reference);
    assert!(!cache.is_whole());
    let grown = cache.resize(all, 4).unwrap();
    assert_eq!(grown.to_bytes, all);
    cache.warm_all(&pack).unwrap();
    assert!(
        cache.is_whole(),
        "every expert at the slot warming gives it"
    );
    assert_same_bytes(&cache, &reference);
}

/// Every resident expert of `cache` has `reference`'s bytes in each array of its pool.
fn assert_same_bytes(cache: &ExpertCache, reference: &ExpertCache) {
    let rows = |c: &ExpertCache, pool: usize, slot: u32| -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for m in c.matrices(pool) {
            for a in [Some(m.weight), Some(m.scales), m.biases]
                .into_iter()
                .flatten()
            {
                let v: Vec<f32> = match a.dtype() {
                    Dtype::U32 => a
                        .to_vec::<u32>()
                        .unwrap()
                        .iter()
                        .map(|&w| f32::from_bits(w))
                        .collect(),
                    _ => a.astype(Dtype::F32).unwrap().to_vec_f32().unwrap(),
                };
                let per = v.len() / a.dim(0).unwrap();
                out.push(v[slot as usize * per..(slot as usize + 1) * per].to_vec());
            }
        }
        out
    };
    let mut resident = 0;
    for layer in 0..6 {
        for e in 0..32 {
            let Some((pool, slot)) = cache.resident_slot(layer, e) else {
                continue;
            };
            let (rp, rs) = reference.resident_slot(layer, e).unwrap();
            let (a, b) = (rows(cache, pool, slot), rows(reference, rp, rs));
            assert!(
                a.iter()
                    .zip(&b)
                    .all(|(x, y)| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())),
                "layer {layer} expert {e}: slot {slot} differs"
            );
            resident += 1;
        }
    }
    assert!(resident > 0);
}

/// A cache at its floor under readings that want less says so once and generates on, with the
/// calm engine's tokens, answer after answer.
#[test]
fn the_floor_holds_under_lasting_pressure_and_is_said_once() {
    let path = http::tiny_pack("pressure-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let mut calm = Engine::new(
        &pack,
        &cfg,
        &weights,
        &options(Some("25%")),
        &Warned::default(),
    )
    .unwrap();
    let prompt = calm.encode(PROMPT).unwrap();
    let expected = calm
        .generate(&prompt, &greedy(16), &Warned::default(), |_| true)
        .unwrap()
        .generation
        .tokens;
    let mut engine = Engine::new(
        &pack,
        &cfg,
        &weights,
        &options(Some("25%")),
        &Warned::default(),
    )
    .unwrap();
    let script = ScriptedSource::parse("total=1GiB available=0", Path::new("test")).unwrap();
    engine.watch_pressure(Some(PressureWatch::new(
        Box::new(script),
        Policy::default(),
    )));
    let warned = Warned::default();
    for _ in 0..2 {
        let got = engine
            .generate(&prompt, &greedy(16), &warned, |_| true)
            .unwrap()
            .generation
            .tokens;
        assert_eq!(got, expected);
    }
    let p = engine.pressure_status().unwrap();
    assert_eq!((p.shrinks, p.grows), (1, 0), "{p:#?}");
    assert_eq!(p.expert_budget_bytes, p.floor_bytes);
    assert!(p.at_floor && p.pressure);
    assert_eq!(p.floor_warnings, 1);
    assert_eq!(warned.0.lock().unwrap().len(), 1);
    // The floor is one token's experts of one layer: the tiny model routes to 4.
    let cache = engine.cache_stats();
    assert_eq!((cache.slots, cache.resident_bytes), (4, p.floor_bytes));
}

/// `flashpack run --json` under `FLASHPACK_PRESSURE_SCRIPT`: the same text as a calm run, a
/// report whose resizes follow the script, MLX's active memory falling and rising with the
/// budget, the floor said on stderr; a bad script is an error naming its line.
#[test]
fn run_reports_the_pressure_and_memory_follows_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let pack = http::tiny_pack("pressure-tests");
    let pack = pack.to_str().unwrap();
    let tokens = TOKENS.to_string();
    let args = [
        "run",
        pack,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &tokens,
        "--expert-budget",
        "75%",
        "--json",
    ];
    let script = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let report = |out: &std::process::Output| -> Value {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        serde_json::from_str(err.lines().last().unwrap()).unwrap()
    };
    // A calm script: nothing changes, and the report gives the bounds.
    let calm = crate::common::flashpack_cli(
        &args,
        &[(
            "FLASHPACK_PRESSURE_SCRIPT",
            &script("calm.txt", "total=1TiB available=1TiB"),
        )],
    );
    let calm_report = report(&calm);
    let p = &calm_report["pressure"];
    assert_eq!(p["source"], "script");
    assert_eq!(
        (p["shrinks"].as_u64(), p["grows"].as_u64()),
        (Some(0), Some(0))
    );
    let max = p["max_expert_budget_bytes"].as_u64().unwrap();
    assert_eq!(p["expert_budget_bytes"].as_u64(), Some(max));

    let out = crate::common::flashpack_cli(
        &args,
        &[(
            "FLASHPACK_PRESSURE_SCRIPT",
            &script("down-up.txt", &down_and_up(max)),
        )],
    );
    let r = report(&out);
    assert_eq!(out.stdout, calm.stdout, "pressure changed the text");
    assert_eq!(r["token_ids"], calm_report["token_ids"]);
    let status: PressureStatus = status_of(&r["pressure"]);
    check_down_and_up(&status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("at its floor").count(),
        1,
        "the floor said once: {stderr}"
    );
    // MLX's allocator follows the budget: each resize moves its active bytes the same way, by
    // at least half the bytes the budget moved (its own process: nothing else allocates).
    let changes = r["pressure"]["changes"].as_array().unwrap();
    let mlx: Vec<i64> = changes
        .iter()
        .map(|c| c["after"]["mlx_active_bytes"].as_i64().unwrap())
        .collect();
    let to: Vec<i64> = changes
        .iter()
        .map(|c| c["to_bytes"].as_i64().unwrap())
        .collect();
    for (i, c) in changes.iter().enumerate() {
        let before = c["before"]["mlx_active_bytes"].as_i64().unwrap();
        let (dm, db) = (mlx[i] - before, to[i] - c["from_bytes"].as_i64().unwrap());
        assert!(
            dm.signum() == db.signum() && dm.abs() >= db.abs() / 2,
            "resize {i}: budget {db:+}, MLX {dm:+} ({changes:#?})"
        );
    }
    assert!(changes
        .iter()
        .all(|c| c["after"]["rss_bytes"].as_u64().is_some()));

    // FLASHPACK_PRESSURE=0: no watch, no `pressure` in the report.
    let off = crate::common::flashpack_cli(&args, &[("FLASHPACK_PRESSURE", "0")]);
    assert_eq!(report(&off)["pressure"], Value::Null);
    assert_eq!(off.stdout, calm.stdout);

    let bad = crate::common::flashpack_cli(
        &args,
        &[(
            "FLASHPACK_PRESSURE_SCRIPT",
            &script("bad.txt", "total=1GiB\nfree=3"),
        )],
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("bad.txt, line 2") && err.contains("free"),
        "{err}"
    );
}

/// The fields of a report's `pressure` that `check_down_and_up` reads.
fn status_of(v: &Value) -> PressureStatus {
    let n = |k: &str| v[k].as_u64().unwrap();
    PressureStatus {
        source: "script",
        expert_budget_bytes: n("expert_budget_bytes"),
        max_expert_budget_bytes: n("max_expert_budget_bytes"),
        floor_bytes: n("floor_bytes"),
        readings: n("readings"),
        pressure: v["pressure"].as_bool().unwrap(),
        shrinks: n("shrinks"),
        grows: n("grows"),
        at_floor: v["at_floor"].as_bool().unwrap(),
        floor_warnings: n("floor_warnings"),
        changes: v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| flashpack::run::pressure::Change {
                reading: c["reading"].as_u64().unwrap(),
                from_bytes: c["from_bytes"].as_u64().unwrap(),
                to_bytes: c["to_bytes"].as_u64().unwrap(),
                wanted_bytes: c["wanted_bytes"].as_u64().unwrap(),
                evicted: c["evicted"].as_u64().unwrap() as usize,
                before: Sample::default(),
                after: Sample::default(),
                ms: c["ms"].as_f64().unwrap(),
            })
            .collect(),
        ..PressureStatus::default()
    }
}

/// `serve` under lasting pressure: idle, it gives its cache back to the floor (it looks once a
/// second while it waits), `/health` shows the reading, the budget and the counts, and its
/// answers are a calm server's.
#[test]
fn serve_shows_the_pressure_on_health_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let pack = http::tiny_pack("pressure-tests");
    let calm_script = dir.path().join("calm.txt");
    std::fs::write(&calm_script, "total=1TiB available=1TiB").unwrap();
    let body = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0});
    let calm = Server::start_with_env(
        pack,
        &[],
        &[("FLASHPACK_PRESSURE_SCRIPT", calm_script.to_str().unwrap())],
    );
    let h = calm.health();
    let max = h["memory_pressure"]["max_expert_budget_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(h["memory_pressure"]["pressure"], false);
    let r = post(calm.addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let calm_text = r.json()["choices"][0]["text"].clone();
    drop(calm);

    let short = dir.path().join("short.txt");
    std::fs::write(
        &short,
        format!("total={}B available={}B\navailable=0", 4 * max, 4 * max),
    )
    .unwrap();
    let server = Server::start_with_env(
        pack,
        &[],
        &[("FLASHPACK_PRESSURE_SCRIPT", short.to_str().unwrap())],
    );
    // The verdict (`at_floor`) is posted when the reading is taken, the new size once the
    // resize is done: wait for both.
    let h = wait_health(&server, |h| {
        let p = &h["memory_pressure"];
        p["at_floor"] == true && p["expert_budget_bytes"] == p["floor_bytes"]
    });
    let p = &h["memory_pressure"];
    assert_eq!(p["pressure"], true);
    assert_eq!(p["reading"]["available_bytes"], 0);
    assert_eq!(p["reading"]["total_bytes"], 4 * max);
    assert!(p["shrinks"].as_u64().unwrap() >= 1);
    assert_eq!(p["grows"], 0);
    assert_eq!(p["expert_budget_bytes"], p["floor_bytes"]);
    assert!(p["floor_bytes"].as_u64().unwrap() < max);
    assert_eq!(p["floor_warnings"], 1);
    assert_eq!(p["last_change"]["to_bytes"], p["floor_bytes"]);
    assert!(p.get("changes").is_none(), "/health leaves the list out");
    let r = post(server.addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["text"], calm_text);
}

/// Waits until `/health` satisfies `done` (bounded by a count, not a clock).
fn wait_health(server: &Server, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..6000 {
        let h = server.health();
        if done(&h) {
            return h;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the server never reached the state: {}", server.health());
}
