//! Picking the next token from logits: greedy at temperature 0, else temperature, top-k and
//! top-p (nucleus) filtering and a draw from a seeded generator.
//!
//! In: one row of logits (f32, one per vocabulary entry) and [`SamplerOptions`]. Out: a token id.
//! Invariant: same options (seed included) and same logits -> same tokens; no randomness is
//! drawn at temperature 0. Filtering order is the common one (as in transformers and mlx-lm):
//! top-k, then temperature, then top-p over the tempered distribution. [`pick`] is the same
//! choice given the draw, for a pipeline's last rank sampling with rank 0's draws
//! ([`SampleSpec`]).

pub use crate::model::SampleSpec;

/// Errors from sampling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SampleError {
    #[error("no logits to sample from")]
    Empty,
    #[error("logit {index} is NaN; the forward pass produced invalid values")]
    NotANumber { index: usize },
    #[error("temperature {value} is invalid: use 0 for greedy or a positive finite value")]
    BadTemperature { value: f32 },
    #[error("top_p {value} is invalid: use a value in (0, 1] (1 disables it)")]
    BadTopP { value: f32 },
}

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    /// 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// A seeded sampler; owns its random state so successive calls continue one stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    opts: SamplerOptions,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(opts: SamplerOptions) -> Result<Sampler, SampleError> {
        let t = opts.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SampleError::BadTemperature { value: t });
        }
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            return Err(SampleError::BadTopP { value: opts.top_p });
        }
        Ok(Sampler {
            opts,
            rng: SplitMix64(opts.seed),
        })
    }

    pub fn options(&self) -> &SamplerOptions {
        &self.opts
    }

    /// The next token for `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
        let u = self.draw();
        pick(logits, &self.opts, u)
    }

    /// The next step's uniform draw in [0, 1) (none at temperature 0): what [`Sampler::sample`]
    /// draws, for a [`pick`] made elsewhere (a pipeline's last rank).
    pub fn draw(&mut self) -> f64 {
        if self.opts.temperature == 0.0 {
            return 0.0;
        }
        self.rng.next_f64()
    }

    /// The next step's [`SampleSpec`] (this sampler's options and its next draw).
    pub fn next_spec(&mut self) -> SampleSpec {
        let u = self.draw();
        SampleSpec {
            temperature: self.opts.temperature.to_bits(),
            top_p: self.opts.top_p.to_bits(),
            top_k: self.opts.top_k.min(u32::MAX as usize) as u32,
            u: u.to_bits(),
        }
    }
}

/// The options a [`SampleSpec`] carries (the seed is spent: its draw is in the spec).
pub fn spec_options(spec: &SampleSpec) -> SamplerOptions {
    SamplerOptions {
        temperature: f32::from_bits(spec.temperature),
        top_p: f32::from_bits(spec.top_p),
        top_k: spec.top_k as usize,
        seed: 0,
    }
}

/// The token for `logits` under `opts` with the uniform draw `u` in [0, 1): the whole of
/// [`Sampler::sample`] but its random state, so another process given `u` picks the same id.
pub fn pick(logits: &[f32], opts: &SamplerOptions, u: f64) -> Result<u32, SampleError> {
    if logits.is_empty() {
        return Err(SampleError::Empty);
    }
    if let Some(index) = logits.iter().position(|x| x.is_nan()) {
        return Err(SampleError::NotANumber { index });
    }
    if opts.temperature == 0.0 {
        return Ok(argmax(logits));
    }
    // Candidates sorted by logit, descending; ties by id so the order is deterministic.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    // Softmax of logits / T over the candidates, in f64, shifted by the max for stability.
    let inv_t = 1.0 / opts.temperature as f64;
    let max = logits[order[0] as usize] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        // Keep the prefix whose mass first reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= opts.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = u * total;
    for (&id, &p) in order.iter().zip(&probs) {
        if r < p {
            return Ok(id);
        }
        r -= p;
    }
    // Rounding can leave r a hair above the last bucket.
    Ok(*order.last().unwrap_or(&0))
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough to draw tokens.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(SamplerOptions {
            temperature,
            top_p,
            top_k,
            seed,
        })
        .unwrap()
    }

    /// Frequencies of each token over `n` draws.
    fn freqs(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    // Binomial standard deviation at n = 20000 is at most 0.5 / sqrt(20000) = 0.0035; allow
    // ~4.3 sigma so a correct sampler fails with probability < 1e-4 per check (and the seed is
    // fixed, so the outcome is reproducible anyway).
    const N: usize = 20_000;
    const FREQ_TOL: f64 = 0.015;

    fn ln(p: &[f64]) -> Vec<f32> {
        p.iter().map(|x| x.ln() as f32).collect()
    }

    #[test]
    fn greedy_takes_the_argmax_and_the_lowest_id_on_ties() {
        let mut s = sampler(0.0, 1.0, 0, 7);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(s.sample(&[-5.0]).unwrap(), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), 1);
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let p = [0.5, 0.3, 0.2];
        let f = freqs(&mut sampler(1.0, 1.0, 0, 1), &ln(&p), N);
        for (a, b) in f.iter().zip(p) {
            assert!((a - b).abs() < FREQ_TOL, "{f:?}");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let p = [0.5f64, 0.3, 0.2];
        // T = 0.5 squares the probabilities (renormalized); T = 2 takes square roots.
        for (t, pow) in [(0.5f32, 2.0f64), (2.0, 0.5)] {
            let q: Vec<f64> = p.iter().map(|x| x.powf(pow)).collect();
            let z: f64 = q.iter().sum();
            let f = freqs(&mut sampler(t, 1.0, 0, 2), &ln(&p), N);
            for (a, b) in f.iter().zip(&q) {
                assert!((a - b / z).abs() < FREQ_TOL, "T={t}: {f:?}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let p = [0.5, 0.3, 0.15, 0.05];
        let logits = ln(&p);
        // top-k 2 keeps {0, 1}: 0.5/0.8 and 0.3/0.8.
        let f = freqs(&mut sampler(1.0, 1.0, 2, 3), &logits, N);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 0.625).abs() < FREQ_TOL, "{f:?}");
        // top-p 0.75: 0.5 < 0.75 <= 0.8, so the same two tokens.
        let f = freqs(&mut sampler(1.0, 0.75, 0, 4), &logits, N);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 0.625).abs() < FREQ_TOL, "{f:?}");
        // top-p 0.9 keeps three: 0.5 + 0.3 + 0.15 = 0.95 >= 0.9.
        let f = freqs(&mut sampler(1.0, 0.9, 0, 5), &logits, N);
        assert_eq!(f[3], 0.0);
        assert!((f[2] - 0.15 / 0.95).abs() < FREQ_TOL, "{f:?}");
        // A tiny top-p or top-k 1 is greedy at any temperature.
        assert_eq!(sampler(5.0, 1e-6, 0, 6).sample(&logits).unwrap(), 0);
        assert_eq!(sampler(5.0, 1.0, 1, 6).sample(&logits).unwrap(), 0);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits = vec![0.0f32; 1000];
        let draw = |seed| {
            let mut s = sampler(1.0, 1.0, 0, seed);
            (0..32)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn rejects_bad_input() {
        let bad = |t, p| {
            Sampler::new(SamplerOptions {
                temperature: t,
                top_p: p,
                ..Default::default()
            })
        };
        assert!(matches!(
            bad(-1.0, 1.0),
            Err(SampleError::BadTemperature { .. })
        ));
        assert!(matches!(
            bad(f32::NAN, 1.0),
            Err(SampleError::BadTemperature { .. })
        ));
        assert!(matches!(bad(1.0, 0.0), Err(SampleError::BadTopP { .. })));
        assert!(matches!(bad(1.0, 1.5), Err(SampleError::BadTopP { .. })));
        let mut s = sampler(1.0, 1.0, 0, 0);
        assert_eq!(s.sample(&[]), Err(SampleError::Empty));
        assert_eq!(
            s.sample(&[0.0, f32::NAN]),
            Err(SampleError::NotANumber { index: 1 })
        );
    }
}
