//! The router block against a straightforward host reference in f32: sigmoid scoring, selection
//! bias, group-limited top-k, renormalisation and scaling, on seeded random logits whose
//! decisions have no near-ties (a sample with one is redrawn), so that a one-ulp difference
//! between MLX's and the host's `exp` cannot flip a choice.

use super::*;

/// Weights agree with the host to a few f32 ulps of a value up to `routed_scaling_factor`
/// (MLX's vectorised exp/sigmoid and the host's differ by an ulp or so).
const MAX_WEIGHT_DIFF: f32 = 1e-5;
/// Every decision the reference makes (the k-th vs the next choice score, the last kept vs the
/// first dropped group) is separated by at least this, far above the weights' rounding.
const MIN_MARGIN: f32 = 1e-3;

/// SplitMix64: seeded values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn spec(scoring: Scoring, top_k: usize) -> RouterSpec {
    RouterSpec {
        scoring,
        order: TopKOrder::FirstOfNegated,
        top_k,
        renormalize: false,
        selection_bias: false,
        groups: None,
        scaling: None,
        f32_input: false,
        weights_in_input_dtype: false,
        input_norm: None,
        per_expert_scale: false,
        precise_softmax: true,
    }
}

/// One token's routing by the module header's steps, written out plainly. Returns the chosen
/// `(expert, weight)` sorted by expert, and the smallest margin of any decision.
fn reference(logits: &[f32], bias: Option<&[f32]>, s: &RouterSpec) -> (Vec<(u32, f32)>, f32) {
    let e = logits.len();
    let scores: Vec<f32> = match s.scoring {
        Scoring::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        _ => {
            let m = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
            let ex: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
            let sum: f32 = ex.iter().sum();
            ex.iter().map(|x| x / sum).collect()
        }
    };
    let mut choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    let mut margin = f32::MAX;
    let desc = |v: &mut Vec<(usize, f32)>| v.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(g) = s.groups {
        let size = e / g.n_group;
        let mut groups: Vec<(usize, f32)> = (0..g.n_group)
            .map(|i| {
                let mut v: Vec<f32> = choice[i * size..(i + 1) * size].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (i, v[0] + v[1])
            })
            .collect();
        desc(&mut groups);
        if g.topk_group < g.n_group {
            margin = margin.min(groups[g.topk_group - 1].1 - groups[g.topk_group].1);
        }
        for &(i, _) in &groups[g.topk_group..] {
            choice[i * size..(i + 1) * size].fill(0.0);
        }
    }
    let mut order: Vec<(usize, f32)> = choice.iter().copied().enumerate().collect();
    desc(&mut order);
    let k = s.top_k;
    if k < e {
        margin = margin.min(order[k - 1].1 - order[k].1);
    }
    let mut chosen: Vec<(u32, f32)> = order[..k]
        .iter()
        .map(|&(i, _)| (i as u32, scores[i]))
        .collect();
    if s.renormalize {
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    }
    if let Some(f) = s.scaling {
        chosen.iter_mut().for_each(|c| c.1 *= f as f32);
    }
    chosen.sort_by_key(|c| c.0);
    (chosen, margin)
}

/// Route `tokens` tokens of `e` experts through MLX (shaped `[2, tokens/2, e]`, so leading axes
/// are exercised) and through the reference; redraw until the sample has no near-tie.
fn check(s: RouterSpec, e: usize, with_bias: bool, seed: u64) {
    let tokens = 6;
    let mut rng = Rng(seed);
    for _attempt in 0..100 {
        let logits: Vec<f32> = (0..tokens * e).map(|_| 3.0 * rng.next()).collect();
        let bias: Vec<f32> = (0..e).map(|_| 0.3 * rng.next()).collect();
        let bias = with_bias.then_some(&bias[..]);
        let want: Vec<_> = logits.chunks(e).map(|t| reference(t, bias, &s)).collect();
        if want.iter().any(|(_, m)| *m < MIN_MARGIN) {
            continue;
        }
        let x = Array::from_slice(&logits, &[2, tokens / 2, e]).unwrap();
        let b = bias.map(|b| Array::from_slice(b, &[e]).unwrap());
        let r = route_logits(&x, b.as_ref(), &s).unwrap();
        assert_eq!(r.indices.shape(), vec![2, tokens / 2, s.top_k]);
        let ids = r.indices.to_vec::<u32>().unwrap();
        let ws = r.scores.to_vec_f32().unwrap();
        for (t, (want, _)) in want.iter().enumerate() {
            let mut got: Vec<(u32, f32)> = (0..s.top_k)
                .map(|j| (ids[t * s.top_k + j], ws[t * s.top_k + j]))
                .collect();
            got.sort_by_key(|c| c.0);
            let got_ids: Vec<u32> = got.iter().map(|c| c.0).collect();
            let want_ids: Vec<u32> = want.iter().map(|c| c.0).collect();
            assert_eq!(got_ids, want_ids, "token {t}: {s:?}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g.1 - w.1).abs() <= MAX_WEIGHT_DIFF,
                    "token {t} expert {}: {} vs {} ({s:?})",
                    g.0,
                    g.1,
                    w.1
                );
            }
        }
        return;
    }
    panic!("no tie-free sample in 100 draws: {s:?}");
}

#[test]
fn sigmoid_with_bias_groups_renorm_and_scaling_matches_the_reference() {
    // DeepSeek-V3's shape in small: 16 experts in 4 groups, 2 groups kept, top-4.
    let s = RouterSpec {
        renormalize: true,
        selection_bias: true,
        groups: Some(ExpertGroups {
            n_group: 4,
            topk_group: 2,
        }),
        scaling: Some(2.5),
        ..spec(Scoring::Sigmoid, 4)
    };
    for seed in 0..8 {
        check(s, 16, true, seed);
    }
}

#[test]
fn each_router_step_alone_matches_the_reference() {
    let groups = Some(ExpertGroups {
        n_group: 8,
        topk_group: 3,
    });
    let cases = [
        // sigmoid alone, then with each option
        (spec(Scoring::Sigmoid, 2), false),
        (spec(Scoring::Sigmoid, 2), true),
        (
            RouterSpec {
                groups,
                ..spec(Scoring::Sigmoid, 6)
            },
            false,
        ),
        (
            RouterSpec {
                renormalize: true,
                ..spec(Scoring::Sigmoid, 3)
            },
            false,
        ),
        (
            RouterSpec {
                scaling: Some(1.8),
                ..spec(Scoring::Sigmoid, 3)
            },
            true,
        ),
        // softmax routers (the existing architectures) and softmax with the new options
        (spec(Scoring::Softmax, 2), false),
        (
            RouterSpec {
                renormalize: true,
                order: TopKOrder::LastOf,
                ..spec(Scoring::Softmax, 4)
            },
            false,
        ),
        (
            RouterSpec {
                groups,
                scaling: Some(16.0),
                ..spec(Scoring::Softmax, 4)
            },
            true,
        ),
    ];
    for (i, (s, bias)) in cases.into_iter().enumerate() {
        let s = RouterSpec {
            selection_bias: bias,
            ..s
        };
        check(s, 32, bias, 100 + i as u64);
    }
}

#[test]
fn the_bias_chooses_but_does_not_weigh() {
    // Expert 3 scores lowest but its bias lifts it into the top 2; its weight is its own score.
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let bias = [0.0f32, 0.0, 0.0, 2.0];
    let s = RouterSpec {
        selection_bias: true,
        ..spec(Scoring::Sigmoid, 2)
    };
    let r = route_logits(
        &Array::from_slice(&logits, &[1, 4]).unwrap(),
        Some(&Array::from_slice(&bias, &[4]).unwrap()),
        &s,
    )
    .unwrap();
    let mut got: Vec<(u32, f32)> = r
        .indices
        .to_vec::<u32>()
        .unwrap()
        .into_iter()
        .zip(r.scores.to_vec_f32().unwrap())
        .collect();
    got.sort_by_key(|c| c.0);
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    assert_eq!(got[0].0, 0);
    assert_eq!(got[1].0, 3);
    assert!(
        (got[1].1 - sigmoid(-1.0)).abs() <= MAX_WEIGHT_DIFF,
        "{got:?}"
    );
}

#[test]
fn softmax_of_the_chosen_is_softmax_renormalized() {
    // Mixtral's spelling and the renormalised softmax pick the same experts with the same
    // weights up to rounding.
    let mut rng = Rng(7);
    let logits: Vec<f32> = (0..5 * 8).map(|_| 2.0 * rng.next()).collect();
    let x = Array::from_slice(&logits, &[5, 8]).unwrap();
    let a = route_logits(&x, None, &spec(Scoring::SoftmaxOfChosen, 2)).unwrap();
    let renorm = RouterSpec {
        renormalize: true,
        ..spec(Scoring::Softmax, 2)
    };
    let b = route_logits(&x, None, &renorm).unwrap();
    assert_eq!(
        a.indices.to_vec::<u32>().unwrap(),
        b.indices.to_vec::<u32>().unwrap()
    );
    for (x, y) in a
        .scores
        .to_vec_f32()
        .unwrap()
        .iter()
        .zip(b.scores.to_vec_f32().unwrap())
    {
        assert!((x - y).abs() <= MAX_WEIGHT_DIFF, "{x} vs {y}");
    }
}

/// The compiled sigmoid router (what a GPU runs, `mx.compile` as mlx-lm compiles its
/// `group_expert_select`) gives the same experts and weights as the op-by-op one, for each
/// spec: the compile cache keys on every knob, so one spec never replays another's graph.
#[test]
fn compiled_sigmoid_router_equals_the_op_by_op_one() {
    let mut rng = Rng(7);
    let (tokens, experts) = (5usize, 16usize);
    let logits: Vec<f32> = (0..tokens * experts).map(|_| 4.0 * rng.next()).collect();
    let bias: Vec<f32> = (0..experts).map(|_| 0.1 * rng.next()).collect();
    let logits = Array::from_slice(&logits, &[tokens, experts])
        .unwrap()
        .astype(Dtype::BF16)
        .unwrap();
    let bias = Array::from_slice(&bias, &[experts]).unwrap();
    let specs = [
        RouterSpec {
            renormalize: true,
            selection_bias: true,
            groups: Some(ExpertGroups {
                n_group: 4,
                topk_group: 2,
            }),
            scaling: Some(2.5),
            ..spec(Scoring::Sigmoid, 3)
        },
        RouterSpec {
            renormalize: true,
            selection_bias: true,
            scaling: Some(1.5),
            ..spec(Scoring::Sigmoid, 4)
        },
        spec(Scoring::Sigmoid, 2),
    ];
    for s in &specs {
        // Twice: the second call replays the cached graph.
        for _ in 0..2 {
            let b = s.selection_bias.then_some(&bias);
            let a = route_steps(&logits, b, s).unwrap();
            let c = route_compiled(&logits, b, s).unwrap();
            assert_eq!(
                a.indices.to_vec::<u32>().unwrap(),
                c.indices.to_vec::<u32>().unwrap(),
                "{s:?}"
            );
            assert_eq!(
                a.scores.to_vec_f32().unwrap(),
                c.scores.to_vec_f32().unwrap(),
                "{s:?}"
            );
        }
    }
}
