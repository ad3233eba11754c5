//! The generation engine on the bundled tiny model: prefix reuse computes only new tokens and
//! changes no token, in every store (all resident, streaming through a small cache); stop
//! strings, logprobs and cancellation at the text level.

use crate::common::http;

use flashpack::progress::Silent;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineOptions, Finish, Request};
use flashpack::run::open;
use flashpack::run::sample::SamplerOptions;
use flashpack::run::template::Message;

pub(crate) fn greedy(max_tokens: usize) -> Request {
    Request {
        max_tokens,
        sampler: SamplerOptions::default(),
        logprobs: None,
        stop: Vec::new(),
    }
}

fn options(budget: Option<&str>) -> EngineOptions {
    EngineOptions {
        mem_budget: budget.map(|b| Budget::parse(b).unwrap()),
        positions: 512,
        ..EngineOptions::default()
    }
}

fn tokens(engine: &mut Engine<'_>, prompt: &[u32], req: &Request) -> (Vec<u32>, usize) {
    let g = engine.generate(prompt, req, &Silent, |_| true).unwrap();
    (g.generation.tokens, g.generation.cached_tokens)
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_cold_tokens() {
    let path = http::tiny_pack("engine-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    for budget in [None, Some("20MB")] {
        let mut warm = Engine::new(&pack, &cfg, &weights, &options(budget), &Silent).unwrap();
        let mut cold = Engine::new(&pack, &cfg, &weights, &options(budget), &Silent).unwrap();
        let first = warm.encode("The history of the Roman empire").unwrap();
        let (answer, cached) = tokens(&mut warm, &first, &greedy(12));
        assert_eq!(cached, 0);
        // The cache holds the prompt and every answer token but the last (never fed back).
        assert_eq!(warm.cached_ids().len(), first.len() + answer.len() - 1);
        // An agent's next turn: everything so far, then more.
        let mut next = first.clone();
        next.extend(&answer);
        next.extend(warm.encode(" and the fall of the west").unwrap());
        assert_eq!(warm.shared_prefix(&next), first.len() + answer.len() - 1);
        let (reused, cached) = tokens(&mut warm, &next, &greedy(12));
        assert_eq!(cached, first.len() + answer.len() - 1, "{budget:?}");
        let (fresh, cached) = tokens(&mut cold, &next, &greedy(12));
        assert_eq!(cached, 0);
        assert_eq!(
            reused, fresh,
            "prefix reuse changed the tokens ({budget:?})"
        );

        // A prompt that diverges earlier keeps only the shared part.
        let other = warm.encode("The history of Greece").unwrap();
        let shared = first.iter().zip(&other).take_while(|(a, b)| a == b).count();
        let (a, cached) = tokens(&mut warm, &other, &greedy(6));
        assert_eq!(cached, shared);
        cold.reset();
        let (b, cached) = tokens(&mut cold, &other, &greedy(6));
        assert_eq!(cached, 0);
        assert_eq!(a, b);
        // The same prompt twice reuses all but its last token; sampled tokens are the same too.
        let sampled = Request {
            sampler: SamplerOptions {
                temperature: 0.8,
                seed: 3,
                ..SamplerOptions::default()
            },
            ..greedy(6)
        };
        let (s1, _) = tokens(&mut warm, &other, &sampled);
        let (s2, cached) = tokens(&mut warm, &other, &sampled);
        assert_eq!(cached, other.len() - 1);
        assert_eq!(s1, s2);
    }
}

#[test]
fn completions_stop_at_stop_strings_report_logprobs_and_can_be_cancelled() {
    let path = http::tiny_pack("engine-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let mut engine = Engine::new(&pack, &cfg, &weights, &options(None), &Silent).unwrap();
    let prompt = engine.encode("The history of").unwrap();
    let full = engine.complete(&prompt, &greedy(20), |_| true).unwrap();
    assert_eq!(full.finish, Finish::Length);
    assert_eq!(full.completion_tokens, 20);
    // Stop at the third word of the greedy text.
    let word = full.text.split(' ').nth(3).unwrap();
    let stop = format!(" {word}");
    let cut = full.text.find(&stop).unwrap();
    let mut pieces = String::new();
    let stopped = engine
        .complete(
            &prompt,
            &Request {
                stop: vec![stop.clone()],
                ..greedy(20)
            },
            |p| {
                pieces.push_str(&p.text);
                true
            },
        )
        .unwrap();
    assert_eq!(stopped.finish, Finish::Stop);
    assert_eq!(stopped.text, full.text[..cut]);
    assert_eq!(pieces, stopped.text, "streamed pieces are the text");
    // Logprobs: one per token, the greedy token the most likely.
    let lp = engine
        .complete(
            &prompt,
            &Request {
                logprobs: Some(4),
                ..greedy(5)
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(lp.logprobs.len(), 5);
    assert_eq!(
        lp.text,
        full.text[..lp.text.len()],
        "same greedy text with logprobs"
    );
    for t in &lp.logprobs {
        assert_eq!(t.top.len(), 4);
        assert_eq!(t.top[0].0, t.token);
        assert!(t.logprob <= 0.0 && (t.top[0].1 - t.logprob).abs() < 1e-6);
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    // The callback stops generation at once.
    let mut seen = 0;
    let c = engine
        .complete(&prompt, &greedy(20), |_| {
            seen += 1;
            seen < 2
        })
        .unwrap();
    assert_eq!(c.finish, Finish::Cancelled);
    assert!(c.completion_tokens < 20, "{}", c.completion_tokens);
}

#[test]
fn chat_turns_through_the_template_reuse_the_previous_turn() {
    let path = http::tiny_pack("engine-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let mut engine = Engine::new(&pack, &cfg, &weights, &options(None), &Silent).unwrap();
    let stops = engine.template().stops();
    let mut messages = vec![
        Message::new("system", "A history lesson."),
        Message::new("user", "Tell me about Rome."),
    ];
    let ids = engine.encode_chat(&messages).unwrap();
    let req = Request {
        stop: stops,
        ..greedy(16)
    };
    let first = engine.complete(&ids, &req, |_| true).unwrap();
    messages.push(Message::new("assistant", &first.text));
    messages.push(Message::new("user", "And Greece?"));
    let ids2 = engine.encode_chat(&messages).unwrap();
    let second = engine.complete(&ids2, &req, |_| true).unwrap();
    assert!(
        second.cached_tokens >= ids.len(),
        "{} cached of {} (first prompt {})",
        second.cached_tokens,
        ids2.len(),
        ids.len()
    );
}

/// Issue 25: prefetch reads only what it should. Under every expert budget, streaming with
/// prefetch gives the tokens of streaming without it, loads at most 1.05x the experts the run
/// needed (demand misses plus prefetched experts the router then picked), and stays off when
/// the pools cannot hold a token's working set plus one more layer's.
#[test]
fn prefetch_reads_at_most_five_percent_more_than_needed_and_changes_no_token() {
    let path = http::tiny_pack("engine-prefetch");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let prompt_text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";
    let mut prefetched_somewhere = false;
    for share in ["50%", "25%", "12%"] {
        let run = |prefetch: bool| {
            let opts = EngineOptions {
                expert_budget: Some(Budget::parse(share).unwrap()),
                prefetch,
                positions: 512,
                ..EngineOptions::default()
            };
            let mut engine = Engine::new(&pack, &cfg, &weights, &opts, &Silent).unwrap();
            let prompt = engine.encode(prompt_text).unwrap();
            let (out, _) = tokens(&mut engine, &prompt, &greedy(96));
            (out, engine.cache_stats(), engine.stream_stats().clone())
        };
        let (with, c, s) = run(true);
        let (without, c0, _) = run(false);
        assert_eq!(with, without, "prefetch changed the tokens at {share}");
        let misses: u64 = c.misses_per_layer.values().sum();
        let needed = misses + c.prefetch_used;
        assert!(
            c.experts_loaded as f64 <= 1.05 * needed as f64,
            "{share}: {} loads for {needed} needed ({} prefetched, {} of them used)",
            c.experts_loaded,
            c.prefetch_loaded,
            c.prefetch_used
        );
        assert_eq!(c0.prefetch_loaded, 0);
        assert!(s.predicted > 0, "{share}: predictions are scored");
        if s.prefetch_no_room {
            assert_eq!(c.prefetch_loaded, 0, "{share}: no room, no prefetch");
        }
        prefetched_somewhere |= c.prefetch_loaded > 0;
    }
    assert!(
        prefetched_somewhere,
        "the trained model's heaviest guesses are right often enough to open the gate somewhere"
    );
}

/// Issue 25, target 6: a long prompt under a budget reads its first sparse layer's experts
/// while the device computes up to that layer's routing, so the routing finds them resident;
/// the later layers read ahead only the experts their guess names for many of the prompt's
/// entries. Tokens are those of the run without prefetch. Up to the first token, layer 0
/// misses at most the experts of the last prompt position (which runs alone, after the chunk
/// has moved on), where without reading ahead it misses every expert the chunk used there.
#[test]
fn a_long_prompt_reads_its_first_layer_before_routing_it_and_changes_no_token() {
    let path = http::tiny_pack("engine-prompt-reads");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    // Enough positions for a chunk (4 or more routed entries per expert on average).
    let prompt_text =
        "The river runs past the old mill, and the miller counts the sacks. ".repeat(12);
    let run = |prefetch: bool, n: usize| {
        let opts = EngineOptions {
            expert_budget: Some(Budget::parse("50%").unwrap()),
            prefetch,
            positions: 512,
            ..EngineOptions::default()
        };
        let mut engine = Engine::new(&pack, &cfg, &weights, &opts, &Silent).unwrap();
        let prompt = engine.encode(&prompt_text).unwrap();
        assert!(
            prompt.len() * cfg.num_experts_per_tok >= 4 * cfg.num_experts,
            "{} tokens are no chunk",
            prompt.len()
        );
        let (out, _) = tokens(&mut engine, &prompt, &greedy(n));
        (out, engine.cache_stats())
    };
    assert_eq!(
        run(true, 8).0,
        run(false, 8).0,
        "reading ahead changed the tokens"
    );
    let ((_, c), (_, c0)) = (run(true, 1), run(false, 1));
    let first =
        |c: &flashpack::run::experts::StoreStats| c.misses_per_layer.get(&0).copied().unwrap_or(0);
    let k = cfg.num_experts_per_tok as u64;
    assert!(
        first(&c0) > k,
        "without reading ahead layer 0 misses {}",
        first(&c0)
    );
    assert!(
        first(&c) <= k,
        "layer 0 missed {} experts after {} were read before its routing",
        first(&c),
        c.prefetch_loaded
    );
    assert!(c.prefetch_used > 0 && c.prefetch_loaded >= c.prefetch_used);
}

/// Several cached prompts (issue 27, item 4): two conversations that alternate each go on from
/// their own KV cache, with the tokens a cold engine gives; without the store, each switch
/// computes the other conversation again; a store too small for two keeps the most recent.
#[test]
fn alternating_conversations_each_reuse_their_own_prefix() {
    let path = http::tiny_pack("engine-tests");
    let (pack, cfg, weights) = open::open(path, true).unwrap();
    let with = |store: u64, expert_budget: Option<&str>| EngineOptions {
        prompt_cache_bytes: store,
        expert_budget: expert_budget.map(|b| Budget::parse(b).unwrap()),
        ..options(None)
    };
    let system = "You are a careful assistant who answers in plain words. ";
    let starts = [
        format!("{system}Tell me about the history of the Roman empire"),
        format!("{system}Tell me how rivers shape valleys over time"),
    ];
    for expert_budget in [None, Some("50%")] {
        let opts = with(64 << 20, expert_budget);
        let mut warm = Engine::new(&pack, &cfg, &weights, &opts, &Silent).unwrap();
        let mut cold =
            Engine::new(&pack, &cfg, &weights, &with(0, expert_budget), &Silent).unwrap();
        let mut talks: Vec<Vec<u32>> = starts.iter().map(|s| warm.encode(s).unwrap()).collect();
        for round in 0..3 {
            for (i, talk) in talks.iter_mut().enumerate() {
                // The conversation so far (the new question not counted).
                let history = talk.len();
                if round > 0 {
                    talk.extend(warm.encode(" And then what happened next?").unwrap());
                }
                let (answer, cached) = tokens(&mut warm, talk, &greedy(8));
                if round > 0 {
                    // All of it but the last answer token (never fed back).
                    assert!(
                        cached * 10 >= history * 9,
                        "conversation {i}, round {round}: {cached} of {history} cached ({expert_budget:?})"
                    );
                }
                cold.reset();
                let (fresh, _) = tokens(&mut cold, talk, &greedy(8));
                assert_eq!(
                    answer, fresh,
                    "conversation {i}, round {round} ({expert_budget:?})"
                );
                talk.extend(&answer);
            }
        }
        // Both conversations were kept: one held, the other in the store.
        assert_eq!(warm.kept_prompts().0, 1);
        assert!(warm.kept_prompts().1 > 0);
    }

    // Without the store, a switch keeps only the shared system prompt.
    let mut one = Engine::new(&pack, &cfg, &weights, &with(0, None), &Silent).unwrap();
    let a = one.encode(&starts[0]).unwrap();
    let b = one.encode(&starts[1]).unwrap();
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    tokens(&mut one, &a, &greedy(4));
    tokens(&mut one, &b, &greedy(4));
    let (_, cached) = tokens(&mut one, &a, &greedy(4));
    assert_eq!(cached, shared);
    assert_eq!(one.kept_prompts(), (0, 0));

    // A store that holds one conversation keeps the most recently left one.
    let mut warm = Engine::new(&pack, &cfg, &weights, &with(64 << 20, None), &Silent).unwrap();
    tokens(&mut warm, &a, &greedy(4));
    let one_bytes = warm.kept_prompts().1;
    assert_eq!(one_bytes, 0);
    tokens(&mut warm, &b, &greedy(4));
    let (_, bytes_one) = warm.kept_prompts();
    let mut small = Engine::new(
        &pack,
        &cfg,
        &weights,
        &with(bytes_one + bytes_one / 2, None),
        &Silent,
    )
    .unwrap();
    let c = small
        .encode("An entirely different question about the tides")
        .unwrap();
    tokens(&mut small, &a, &greedy(4));
    tokens(&mut small, &b, &greedy(4)); // a kept
    tokens(&mut small, &c, &greedy(4)); // b kept, a dropped
    assert_eq!(small.kept_prompts().0, 1);
    let (_, cached) = tokens(&mut small, &b, &greedy(4));
    assert_eq!(cached, b.len() - 1, "the most recent conversation was kept");
    let (_, cached) = tokens(&mut small, &a, &greedy(4));
    assert_eq!(cached, shared, "the least recent one was dropped");
}
