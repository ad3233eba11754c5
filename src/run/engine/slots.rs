//! The message when the expert cache holds fewer experts than one token routes to.

use crate::run::experts::PoolSize;
use crate::units::{self, Style};

/// Where the expert cache's size came from, for the message when it holds too few experts.
pub(super) enum BudgetCause {
    /// `--mem-budget TEXT`, of which the dense weights, KV cache and activations took this much.
    Mem { text: String, dense_and_margin: u64 },
    /// `--expert-budget TEXT`.
    Expert { text: String },
    /// No budget: every stored expert has a slot.
    None,
}

/// The message when the smallest slot pool holds fewer experts than one token routes to: it
/// names the option that sized the cache (or, without one, the pack's own numbers), the size of
/// one expert and where it comes from, top-k, and the least budget that would do.
pub(super) fn too_few_slots(
    cause: &BudgetCause,
    expert_budget: Option<u64>,
    pools: &[PoolSize],
    top_k: usize,
    (hidden, inter): (u32, u32),
) -> String {
    let Some(p) = pools
        .iter()
        .min_by_key(|p| p.slots as i64 - top_k.min(p.stored as usize) as i64)
    else {
        return format!(
            "the pack stores no experts, but the model config routes each token to {top_k} (num_experts_per_tok); the pack is damaged or was written by a broken tool: re-convert it"
        );
    };
    // A pool gets the budget's share of its bytes (ExpertCache::new), so `top_k` slots in every
    // pool need this many bytes in all.
    let total: u64 = pools.iter().map(|q| q.stored as u64 * q.slot_bytes).sum();
    let need = pools
        .iter()
        .map(|q| (top_k.min(q.stored as usize) as u64 * total).div_ceil(q.stored.max(1) as u64))
        .max()
        .unwrap_or(0);
    let room = format!(
        "room for {} of its {}-bit experts ({} each: hidden {hidden} x expert width {inter}, from the pack's expert directory), fewer than the {top_k} one token uses (num_experts_per_tok in the model config)",
        p.slots,
        p.bits,
        units::bytes(p.slot_bytes, Style::RUN)
    );
    let eb = units::bytes(expert_budget.unwrap_or(0), Style::RUN);
    match cause {
        BudgetCause::Expert { text } => format!(
            "--expert-budget {text} gives the expert cache {eb}: {room}; raise --expert-budget to at least {}",
            units::bytes(need, Style::RUN)
        ),
        BudgetCause::Mem {
            text,
            dense_and_margin,
        } => format!(
            "--mem-budget {text} leaves {eb} for experts after {} of dense weights, KV cache and activations: {room}; raise --mem-budget to at least {}",
            units::bytes(*dense_and_margin, Style::RUN),
            units::bytes(dense_and_margin + need, Style::RUN)
        ),
        BudgetCause::None => format!(
            "the model config routes each token to {top_k} experts (num_experts_per_tok), but the pack stores only {} {}-bit experts; its config and expert directory disagree: re-convert it",
            p.stored, p.bits
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: PoolSize = PoolSize {
        bits: crate::format::ProjBits::uniform(4),
        slots: 3,
        stored: 192,
        slot_bytes: 50_000,
    };

    #[test]
    fn too_few_slots_names_the_option_that_sized_the_cache() {
        let msg = too_few_slots(
            &BudgetCause::Expert { text: "1MB".into() },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(msg.starts_with("--expert-budget 1MB gives"), "{msg}");
        assert!(!msg.contains("--mem-budget"), "{msg}");
        assert!(
            msg.contains(
                "room for 3 of its 4-bit experts (0.1 MB each: hidden 256 x expert width 128"
            ),
            "{msg}"
        );
        assert!(msg.contains("fewer than the 8 one token uses"), "{msg}");
        // 8 slots of 192 experts' share: 8 * 192 * 50 kB / 192.
        assert!(
            msg.ends_with("raise --expert-budget to at least 0.4 MB"),
            "{msg}"
        );

        let msg = too_few_slots(
            &BudgetCause::Mem {
                text: "40MB".into(),
                dense_and_margin: 39_850_000,
            },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(
            msg.starts_with("--mem-budget 40MB leaves 0.1 MB for experts after 39.9 MB"),
            "{msg}"
        );
        assert!(
            msg.ends_with("raise --mem-budget to at least 40.2 MB"),
            "{msg}"
        );

        // No budget: every stored expert has a slot, so only a config whose top-k exceeds the
        // stored experts gets here, and the message says so instead of blaming a budget.
        let all = PoolSize {
            slots: 4,
            stored: 4,
            ..POOL
        };
        let msg = too_few_slots(&BudgetCause::None, None, &[all], 8, (256, 128));
        assert!(!msg.contains("budget"), "{msg}");
        assert!(
            msg.contains("routes each token to 8 experts") && msg.contains("stores only 4"),
            "{msg}"
        );
    }
}
