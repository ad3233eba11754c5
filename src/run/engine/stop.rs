//! The token ids that end generation, gathered from the config, the generation_config and the
//! chat template.

use crate::arch::ModelConfig;
use crate::format::Pack;

/// The ids that end generation: the config's `eos_token_id`, the pack's generation_config's
/// (gpt-oss adds `<|call|>` and `<|endoftext|>` there to `<|return|>`), and for a harmony
/// template the tokens that end an assistant's turn (`<|return|>`, `<|call|>`), which a pack
/// converted from an older generation_config may lack. Sorted, without repeats.
pub fn stop_ids(
    pack: &Pack,
    cfg: &ModelConfig,
    tokenizer: &tokenizers::Tokenizer,
    harmony: bool,
) -> Vec<u32> {
    let turn_ends: Vec<u32> = if harmony {
        ["<|return|>", "<|call|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect()
    } else {
        Vec::new()
    };
    gather_stop_ids(
        &cfg.eos_token_ids,
        pack.metadata().get("generation_config"),
        &turn_ends,
    )
}

/// [`stop_ids`] from its sources: the config's ids, a generation_config (its `eos_token_id`, a
/// number or a list), and more ids.
fn gather_stop_ids(
    config: &[u32],
    generation: Option<&serde_json::Value>,
    more: &[u32],
) -> Vec<u32> {
    let mut ids = config.to_vec();
    if let Some(v) = generation.and_then(|g| g.get("eos_token_id")) {
        let one = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
        match v.as_array() {
            Some(a) => ids.extend(a.iter().filter_map(one)),
            None => ids.extend(one(v)),
        }
    }
    ids.extend_from_slice(more);
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    /// gpt-oss: config.json names `<|return|>`, its generation_config adds `<|call|>` and
    /// `<|endoftext|>`; an older generation_config without `<|call|>` still stops there under a
    /// harmony template; a single id is a number.
    #[test]
    fn stop_ids_gather_config_generation_config_and_turn_ends() {
        let g = serde_json::json!({"eos_token_id": [200002, 199999, 200012]});
        assert_eq!(
            super::gather_stop_ids(&[200002], Some(&g), &[]),
            [199999, 200002, 200012]
        );
        let old = serde_json::json!({"eos_token_id": [200002, 199999]});
        assert_eq!(
            super::gather_stop_ids(&[200002], Some(&old), &[200002, 200012]),
            [199999, 200002, 200012]
        );
        let one = serde_json::json!({"eos_token_id": 7});
        assert_eq!(super::gather_stop_ids(&[2], Some(&one), &[]), [2, 7]);
        assert_eq!(super::gather_stop_ids(&[2], None, &[]), [2]);
    }
}
