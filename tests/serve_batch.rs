//! Continuous batching (issue 27, item 6; decision 0009's update): several sequences decoded
//! at once give each the tokens it gets alone, on every architecture that batches, all
//! resident and streaming; `serve` with its default options answers concurrent requests as it
//! answers them one by one.

use std::path::Path;

use serde_json::json;

use crate::common::http::{self, post, Server};
use crate::kv_bits::golden_pack;
use flashpack::arch::Arch;
use flashpack::progress::Silent;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineLane, EngineOptions, Request};
use flashpack::run::open;
use flashpack::run::sample::SamplerOptions;

fn request(max_tokens: usize, temperature: f32) -> Request {
    Request {
        max_tokens,
        sampler: SamplerOptions {
            temperature,
            seed: 7,
            ..SamplerOptions::default()
        },
        logprobs: None,
        stop: Vec::new(),
    }
}

/// Runs `jobs` (prompt, request, the step at which it joins) as lanes of one engine; each
/// job's generated ids.
fn batched(engine: &mut Engine<'_>, jobs: &[(Vec<u32>, Request, usize)]) -> Vec<Vec<u32>> {
    let mut out: Vec<Option<Vec<u32>>> = vec![None; jobs.len()];
    let mut running: Vec<(usize, EngineLane)> = Vec::new();
    let mut step = 0;
    while out.iter().any(Option::is_none) {
        for (j, (prompt, req, at)) in jobs.iter().enumerate() {
            if *at == step {
                let lane = engine
                    .start_lane(prompt, req, &Silent, &|| false)
                    .unwrap()
                    .unwrap();
                running.push((j, lane));
            }
        }
        if !running.is_empty() {
            let mut lanes: Vec<&mut EngineLane> = running.iter_mut().map(|(_, l)| l).collect();
            engine
                .step_lanes(&mut lanes, &Silent, &mut |_, _| true)
                .unwrap();
        }
        let mut i = 0;
        while i < running.len() {
            if running[i].1.done() {
                let (j, lane) = running.remove(i);
                let c = engine.end_lane(lane, &mut |_| true).unwrap();
                out[j] = Some(c.tokens);
            } else {
                i += 1;
            }
        }
        step += 1;
        assert!(step < 1000, "the lanes never ended");
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn alone(engine: &mut Engine<'_>, prompt: &[u32], req: &Request) -> Vec<u32> {
    engine.reset();
    engine
        .generate(prompt, req, &Silent, |_| true)
        .unwrap()
        .generation
        .tokens
}

fn check(pack: &Path, what: &str) -> bool {
    let (opened, cfg, weights) = open::open(pack, true).unwrap();
    let mut batched_ran = false;
    for expert_budget in [None, Some("50%")] {
        let opts = EngineOptions {
            expert_budget: expert_budget.map(|b| Budget::parse(b).unwrap()),
            positions: 256,
            sequences: 4,
            ..EngineOptions::default()
        };
        let mut engine = Engine::new(&opened, &cfg, &weights, &opts, &Silent).unwrap();
        if !engine.batches() {
            return false;
        }
        let encode = |t: &str| engine.encode(t).unwrap();
        // Different lengths and ends, one sampled lane, and lanes joining mid-stream.
        let jobs = vec![
            (encode("The history of"), request(9, 0.0), 0),
            (encode("Once upon a time, there"), request(5, 0.0), 0),
            (encode("A"), request(11, 0.0), 2),
            (encode("In the beginning"), request(7, 0.9), 3),
        ];
        let together = batched(&mut engine, &jobs);
        for (j, (prompt, req, _)) in jobs.iter().enumerate() {
            let single = alone(&mut engine, prompt, req);
            assert_eq!(
                together[j], single,
                "{what}, expert budget {expert_budget:?}: job {j} batched against alone"
            );
            assert_eq!(together[j].len(), req.max_tokens, "{what}: job {j}");
        }
        batched_ran = true;
    }
    batched_ran
}

#[test]
fn lanes_give_each_sequence_its_own_tokens_on_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = http::tiny_pack("serve-batch");
    assert!(check(tiny, "the bundled model"));
    let mut unbatched = Vec::new();
    for &arch in Arch::ALL {
        let pack = golden_pack(arch, dir.path());
        if !check(&pack, &arch.to_string()) {
            unbatched.push(arch.model_type());
        }
    }
    // Their layers pass several hidden states (hyper-connections, attention residuals).
    assert_eq!(unbatched, ["deepseek_v41", "kimi_k3"]);
}

/// `serve` with its default options: requests sent together (staggered, of different lengths)
/// get the texts they get one by one, and `/health` shows them decoded together.
#[test]
fn serve_answers_concurrent_requests_as_it_answers_them_one_by_one() {
    let pack = http::tiny_pack("serve-batch");
    let server = Server::start(pack, &[]);
    assert_eq!(server.health()["decode_concurrency"], 4);
    let bodies: Vec<serde_json::Value> = [
        ("The history of", 20),
        ("Once upon a time", 12),
        ("In the beginning the", 28),
        ("A recipe for bread", 16),
        ("The king said", 8),
    ]
    .iter()
    .map(|(p, n)| json!({"model": "serve-batch", "prompt": p, "max_tokens": n, "temperature": 0}))
    .collect();
    let text = |r: &http::Response| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let one_by_one: Vec<String> = bodies
        .iter()
        .map(|b| text(&post(server.addr, "/v1/completions", b)))
        .collect();
    let addr = server.addr;
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| {
                s.spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(40 * i as u64));
                    post(addr, "/v1/completions", b)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| text(&h.join().unwrap()))
            .collect()
    });
    assert_eq!(together, one_by_one);
    let health = server.health();
    assert_eq!(health["running"], 0, "{health}");
    assert_eq!(health["completed"], 10, "{health}");
}
