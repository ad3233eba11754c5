//! Memory budgets: `--mem-budget` / `--expert-budget` as written (`8GiB`, `8GB`, `8G`, `512MiB`,
//! `50%`), and the plan that divides one among the engine's parts.
//!
//! In: the budgets, the machine's RAM and the model's needs in bytes ([`Needs`]). Out: a [`Plan`]
//! (the expert cache's budget, the prefill chunk, what is set aside for the KV cache and
//! activations), or a [`BudgetError`] naming the option that is too small. [`plan`] does no I/O.
//!
//! A size always carries its unit or a percent sign: a bare number was once read as a fraction
//! of RAM up to 1 and as bytes above it, so `1` meant all of RAM and `2` meant two bytes. Now it is
//! refused, with the accepted forms in the message.

use crate::arch::{KvBits, ModelConfig};

/// A budget as written: bytes, or a percentage of a whole the caller knows (RAM for
/// `--mem-budget`, all experts resident for `--expert-budget`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    Bytes(u64),
    Percent(f64),
}

impl Size {
    /// Bytes, with percentages taken of `whole`.
    pub fn resolve(self, whole: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => (whole as f64 * p / 100.0) as u64,
        }
    }
}

/// A `--mem-budget` / `--expert-budget` value: as written (for messages) and parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub text: String,
    pub size: Size,
}

impl Budget {
    /// For clap: a bare number or an unknown unit is an error that lists the accepted forms.
    pub fn parse(text: &str) -> Result<Budget, String> {
        Ok(Budget {
            text: text.trim().to_string(),
            size: parse_size(text)?,
        })
    }
}

/// The forms [`parse_size`] accepts, for messages.
pub const SIZE_FORMS: &str =
    "8GiB, 8GB, 8G (= 8GiB), 512MiB, 512MB, 512M, or a percentage such as 50%; \
units K, M, G, T, with B for powers of 1000 and iB for powers of 1024, any case";

/// Parses a size with a unit (`8GiB`, `8GB`, `8g`, `1.5T`, `4096B`) or a percentage (`50%`, of
/// a whole chosen by the caller). Single letters are binary (`8G` = `8GiB`), as in `free -g`,
/// Docker and the JVM; `GB` is decimal. A bare number is refused: its unit is ambiguous.
pub fn parse_size(text: &str) -> Result<Size, String> {
    let t = text.trim();
    let bad = |why: &str| format!("bad size {text:?}: {why}; use {SIZE_FORMS}");
    if let Some(p) = t.strip_suffix('%') {
        let f: f64 = p.trim().parse().map_err(|_| bad("not a number before %"))?;
        if !(f > 0.0 && f <= 100.0) {
            return Err(bad("a percentage is above 0 and at most 100"));
        }
        return Ok(Size::Percent(f));
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| bad("not a number followed by a unit"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(bad("a size is above 0"));
    }
    const KI: f64 = 1024.0;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(bad("a bare number has no unit")),
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => KI,
        "m" | "mib" => KI * KI,
        "g" | "gib" => KI * KI * KI,
        "t" | "tib" => KI * KI * KI * KI,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = n * mult;
    if bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(bad("out of range"));
    }
    Ok(Size::Bytes(bytes as u64))
}

/// Most prompt tokens per forward call (mlx-lm's `prefill_step_size`).
pub const PREFILL_STEP: usize = 2048;

/// The positions the KV cache is sized for: `positions` within the model's context.
pub fn planned_positions(cfg: &ModelConfig, positions: usize) -> u64 {
    cfg.max_position_embeddings
        .unwrap_or(usize::MAX)
        .min(positions) as u64
}

/// One prompt token's activations in a prefill chunk, an f32 upper bound: the residual stream,
/// the k routed rows in and out of the experts and their hidden width. Under attention
/// residuals (Kimi-K3) also every block's starting state, which a mix reads as an f32 copy and
/// weighs into a product of the same size.
pub fn activation_bytes_per_token(cfg: &ModelConfig) -> u64 {
    4 * (cfg.hidden_size * (2 * cfg.num_experts_per_tok + 8)
        + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size.max(1)) as u64
        + 4 * 3 * cfg.attn_res_values_per_token()
}

/// The LM head's logits for one position, f32.
pub fn logits_bytes(cfg: &ModelConfig) -> u64 {
    (cfg.hidden_size * cfg.vocab_size * 4) as u64
}

/// What [`Needs::kv`] answers for a prefill chunk of `chunk` tokens: keys and values of every KV
/// head, or MLA's latent and rotary key (`ModelConfig`), for `positions` positions, as codes
/// where `kv_bits` quantizes them; a sliding-window layer's at most a window and one chunk
/// (gpt-oss); the fixed-size state of linear-attention layers (Qwen3-Next, Qwen3.5); and the
/// other conversations' KV caches (`prompt_cache` bytes, several cached prompts) on top.
pub fn kv_bytes_for_chunk(
    cfg: &ModelConfig,
    positions: u64,
    kv_bits: Option<KvBits>,
    prompt_cache: u64,
    chunk: u64,
) -> u64 {
    cfg.kv_bytes(positions, chunk, kv_bits) + cfg.recurrent_state_bytes() + prompt_cache
}

/// Slots of each expert pool under an expert budget of `budget` bytes (`None`: every stored
/// expert). `pools` holds each pool's stored experts and the bytes one resident expert takes;
/// each pool gets the budget's share of its bytes, whole slots, at most its experts. The one
/// rule the expert cache sizes its pools by and `flashpack plan` predicts with.
pub fn pool_slots(budget: Option<u64>, pools: &[(u32, u64)]) -> Vec<u32> {
    let total: u64 = pools.iter().map(|&(n, b)| n as u64 * b).sum();
    pools
        .iter()
        .map(|&(count, slot_bytes)| match budget {
            None => count,
            Some(budget) => {
                let share =
                    budget as f64 * (count as u64 * slot_bytes) as f64 / total.max(1) as f64;
                ((share / slot_bytes.max(1) as f64) as u32).min(count)
            }
        })
        .collect()
}

/// Bytes held back beside the KV cache, logits and prefill activations.
const SLACK: u64 = 2 << 20;

/// What a plan is made from: the machine's RAM and the model's memory needs in bytes.
pub struct Needs<'a> {
    /// Physical RAM, the whole of a percentage `--mem-budget`.
    pub ram: u64,
    /// The dense weights, resident whatever the budget.
    pub dense: u64,
    /// Every stored expert resident, the whole of a percentage `--expert-budget`.
    pub all_experts: u64,
    /// One prompt token's activations in a prefill chunk (an f32 upper bound).
    pub per_token: u64,
    /// The LM head's logits.
    pub logits: u64,
    /// The KV cache (and any recurrent state) for a prefill chunk of this many tokens: a
    /// sliding-window layer keeps a window and one chunk.
    pub kv: &'a dyn Fn(u64) -> u64,
}

/// How the memory is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `--mem-budget` in bytes.
    pub mem: Option<u64>,
    /// The expert cache's bytes; `None`: every expert resident.
    pub experts: Option<u64>,
    /// Most prompt tokens per forward call.
    pub prefill_chunk: usize,
    /// KV cache, logits and one prefill chunk's activations, set aside under a budget.
    pub margin: u64,
}

/// Why a budget cannot be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    #[error(
        "--mem-budget {text} is too small: the dense weights alone need {:.1} MB (plus {:.1} MB for the KV cache and activations); raise the budget",
        *.dense as f64 / 1e6,
        *.margin as f64 / 1e6
    )]
    TooSmall {
        text: String,
        dense: u64,
        margin: u64,
    },
}

/// Divides `--mem-budget` (`mem`) or takes `--expert-budget` (`expert`, used only without
/// `mem`). Under `mem` the dense weights stay resident, the KV cache, the logits and one prefill
/// chunk's activations are set aside, and the experts get the rest; a prefill chunk is up to
/// [`PREFILL_STEP`] tokens whose activations stay within a tenth of the budget. With neither
/// budget every expert is resident.
pub fn plan(
    mem: Option<&Budget>,
    expert: Option<&Budget>,
    needs: &Needs,
) -> Result<Plan, BudgetError> {
    let mem_bytes = mem.map(|b| b.size.resolve(needs.ram));
    let prefill_chunk = match mem_bytes {
        None => PREFILL_STEP,
        Some(b) => ((b / 10 / needs.per_token.max(1)) as usize).clamp(16, PREFILL_STEP),
    };
    let margin = (needs.kv)(prefill_chunk as u64)
        + needs.logits
        + prefill_chunk as u64 * needs.per_token
        + SLACK;
    let experts = match (mem, mem_bytes, expert) {
        (Some(text), Some(b), _) => {
            let Some(rest) = b.checked_sub(needs.dense + margin) else {
                return Err(BudgetError::TooSmall {
                    text: text.text.clone(),
                    dense: needs.dense,
                    margin,
                });
            };
            Some(rest)
        }
        (_, _, Some(eb)) => Some(eb.size.resolve(needs.all_experts)),
        _ => None,
    };
    Ok(Plan {
        mem: mem_bytes,
        experts,
        prefill_chunk,
        margin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_need_a_unit_or_a_percent_sign() {
        let gib = 1u64 << 30;
        assert_eq!(parse_size("8GiB"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8gib"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8G"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8GB"), Ok(Size::Bytes(8_000_000_000)));
        assert_eq!(parse_size("4gb"), Ok(Size::Bytes(4_000_000_000)));
        assert_eq!(parse_size("512 MiB"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse_size("512m"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse_size("512MB"), Ok(Size::Bytes(512_000_000)));
        assert_eq!(parse_size("1.5K"), Ok(Size::Bytes(1536)));
        assert_eq!(parse_size("2T"), Ok(Size::Bytes(2 << 40)));
        assert_eq!(parse_size("4096B"), Ok(Size::Bytes(4096)));
        assert_eq!(parse_size("50%"), Ok(Size::Percent(50.0)));
        assert_eq!(parse_size("50%").unwrap().resolve(16 * gib), 8 * gib);
        assert_eq!(parse_size("8GiB").unwrap().resolve(1), 8 * gib);
        // The old forms: a bare number meant a fraction of RAM up to 1 and bytes above it.
        for bare in ["1", "2", "0.5", "1000"] {
            let err = parse_size(bare).unwrap_err();
            assert!(
                err.contains("no unit") && err.contains("8GiB") && err.contains("50%"),
                "{err}"
            );
        }
        for bad in [
            "lots", "-3GB", "0GB", "150%", "0%", "8XB", "GB", "1e30TB", "0.1B",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    const GB: u64 = 1_000_000_000;

    /// 1 GB of dense weights, 8 GB of experts, 1 kB of activations per prompt token, 100 MB of
    /// logits, and a KV cache of 4 GB plus 1 MB per chunk token.
    fn needs(kv: &dyn Fn(u64) -> u64) -> Needs<'_> {
        Needs {
            ram: 64 * GB,
            dense: GB,
            all_experts: 8 * GB,
            per_token: 1000,
            logits: 100_000_000,
            kv,
        }
    }

    fn kv(chunk: u64) -> u64 {
        4 * GB + chunk * 1_000_000
    }

    fn budget(text: &str) -> Budget {
        Budget::parse(text).unwrap()
    }

    #[test]
    fn no_budget_keeps_every_expert_resident() {
        let p = plan(None, None, &needs(&kv)).unwrap();
        assert_eq!(p.mem, None);
        assert_eq!(p.experts, None);
        assert_eq!(p.prefill_chunk, PREFILL_STEP);
        let chunk = PREFILL_STEP as u64;
        assert_eq!(p.margin, kv(chunk) + 100_000_000 + chunk * 1000 + SLACK);
    }

    #[test]
    fn a_mem_budget_gives_the_experts_what_the_rest_leaves() {
        let p = plan(Some(&budget("10GB")), None, &needs(&kv)).unwrap();
        assert_eq!(p.mem, Some(10 * GB));
        // A tenth of the budget covers far more than 2,048 tokens' activations.
        assert_eq!(p.prefill_chunk, PREFILL_STEP);
        assert_eq!(p.experts, Some(10 * GB - GB - p.margin));
        // A percentage is of RAM; --expert-budget is ignored under --mem-budget.
        let p = plan(Some(&budget("25%")), Some(&budget("1GB")), &needs(&kv)).unwrap();
        assert_eq!(p.mem, Some(16 * GB));
        assert_eq!(p.experts, Some(16 * GB - GB - p.margin));
    }

    #[test]
    fn a_small_mem_budget_shrinks_the_prefill_chunk() {
        let none = |_: u64| 0;
        let mut n = needs(&none);
        n.dense = 0;
        n.logits = 0;
        n.per_token = 10_000;
        // A tenth of 100 MB is 1,000 tokens' activations.
        let p = plan(Some(&budget("100MB")), None, &n).unwrap();
        assert_eq!(p.prefill_chunk, 1000);
        assert_eq!(p.margin, 1000 * 10_000 + SLACK);
        assert_eq!(p.experts, Some(100_000_000 - p.margin));
        // Never below 16 tokens.
        n.per_token = 1_000_000;
        let p = plan(Some(&budget("100MB")), None, &n).unwrap();
        assert_eq!(p.prefill_chunk, 16);
    }

    #[test]
    fn a_mem_budget_below_dense_and_margin_names_the_option_and_the_needs() {
        let err = plan(Some(&budget("5GB")), None, &needs(&kv)).unwrap_err();
        let BudgetError::TooSmall {
            ref text,
            dense,
            margin,
        } = err;
        assert_eq!((text.as_str(), dense), ("5GB", GB));
        assert!(margin > 4 * GB, "{margin}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "--mem-budget 5GB is too small: the dense weights alone need 1000.0 MB (plus "
            ),
            "{msg}"
        );
        assert!(
            msg.ends_with("for the KV cache and activations); raise the budget"),
            "{msg}"
        );
    }

    #[test]
    fn pools_share_the_expert_budget_by_their_bytes() {
        // No budget: every stored expert. A budget: each pool its share of the bytes, whole
        // slots, never more than it stores.
        let pools = [(100, 1000), (50, 4000)];
        assert_eq!(pool_slots(None, &pools), [100, 50]);
        // 300 kB of 300 kB stored: all; of the half, half of each.
        assert_eq!(pool_slots(Some(300_000), &pools), [100, 50]);
        assert_eq!(pool_slots(Some(150_000), &pools), [50, 25]);
        assert_eq!(pool_slots(Some(10_000_000), &pools), [100, 50]);
        // A share under one slot rounds down to none.
        assert_eq!(pool_slots(Some(2_000), &pools), [0, 0]);
        assert_eq!(pool_slots(Some(1), &[]), Vec::<u32>::new());
    }

    #[test]
    fn an_expert_budget_is_bytes_or_a_share_of_all_experts() {
        let p = plan(None, Some(&budget("2GB")), &needs(&kv)).unwrap();
        assert_eq!(p.experts, Some(2 * GB));
        assert_eq!(p.mem, None);
        assert_eq!(p.prefill_chunk, PREFILL_STEP);
        let p = plan(None, Some(&budget("25%")), &needs(&kv)).unwrap();
        assert_eq!(p.experts, Some(2 * GB));
        // More than every expert: taken as written.
        let p = plan(None, Some(&budget("20GB")), &needs(&kv)).unwrap();
        assert_eq!(p.experts, Some(20 * GB));
    }
}
