//! Model card: the README.md `flashpack publish` uploads next to a pack.
//!
//! In: an opened pack's [`PackReport`] and metadata, the repo id, the pack's file name in the
//! repo, the endpoint and revision (for the download commands). Out: Markdown with the YAML
//! front matter the Hub reads (`library_name`, `base_model`, `tags`, `pipeline_tag`), the
//! conversion report, quality numbers when the metadata has them (key `quality`), and how to
//! download and run the pack.
//! Invariant: deterministic (same pack, same card) and every number comes from the pack.

use std::fmt::Write;

use serde_json::Value;

use super::RepoId;
use crate::inspect::{KindStats, PackReport};
use crate::units::{self, Style};

/// The Hub repo a pack was converted from, when its provenance says so: an explicit
/// `base_model` key; a source path inside a hub cache (`.../models--org--name/snapshots/..`);
/// or a source that is a repo id *and* a recorded revision (a bare `org/name` with no
/// revision may as well be a local folder, so it is not claimed).
pub fn base_model_of(provenance: &Value) -> Option<String> {
    if let Some(b) = provenance.get("base_model").and_then(Value::as_str) {
        return RepoId::parse(b).ok().map(|r| r.to_string());
    }
    let source = provenance.get("source").and_then(Value::as_str)?;
    for part in source.split(['/', '\\']) {
        if let Some(rest) = part.strip_prefix("models--") {
            if let Some((org, name)) = rest.split_once("--") {
                if let Ok(r) = RepoId::parse(&format!("{org}/{name}")) {
                    return Some(r.to_string());
                }
            }
        }
    }
    let has_revision = provenance
        .get("revision")
        .and_then(Value::as_str)
        .is_some_and(|r| !r.is_empty());
    if has_revision && !source.starts_with(['/', '.', '~']) {
        return RepoId::parse(source).ok().map(|r| r.to_string());
    }
    None
}

/// A value for a Markdown table cell: strings bare, the rest as compact JSON, `|` escaped.
fn cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    s.replace('|', "\\|").replace('\n', " ")
}

/// A YAML scalar: a JSON string is valid YAML and needs no further escaping rules.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn kind_row(out: &mut String, name: &str, k: &KindStats) {
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {:.3} |",
        units::bytes(k.bytes, Style::PACK),
        k.weights,
        k.bits_per_weight
    );
}

/// The README.md for `repo` holding the pack `pack_file` at `revision`.
pub fn model_card(
    report: &PackReport,
    metadata: &Value,
    repo: &str,
    pack_file: &str,
    endpoint: &str,
    revision: &str,
) -> String {
    let prov = &report.provenance;
    let base = base_model_of(prov);
    let arch = report.architecture.as_str();
    let mut out = String::new();

    // Front matter.
    out.push_str("---\nlibrary_name: flashpack\n");
    if let Some(b) = &base {
        let _ = writeln!(out, "base_model: {}", yaml_str(b));
    }
    out.push_str("tags:\n");
    let mut tags = vec!["flashpack", "moe", "mlx", "quantized"];
    if !arch.is_empty() && arch != "?" && !tags.contains(&arch) {
        tags.push(arch);
    }
    for t in tags {
        let _ = writeln!(out, "- {}", yaml_str(t));
    }
    out.push_str("pipeline_tag: text-generation\n---\n\n");

    // Title and summary.
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let _ = writeln!(out, "# {name}\n");
    let tool = prov["tool_version"].as_str().unwrap_or("?");
    let _ = write!(
        out,
        "A `{arch}` Mixture-of-Experts model packed by flashpack {tool}: MLX affine-quantized \
         experts in page-aligned, checksummed segments, streamed from disk on demand so the \
         model runs in less memory than its size. Overall {:.2} bits per weight",
        report.overall.bits_per_weight
    );
    match &base {
        Some(b) => {
            let _ = write!(out, "; converted from [{b}]({endpoint}/{b})");
            if let Some(r) = prov["revision"].as_str() {
                let _ = write!(out, " at revision `{r}`");
            }
            out.push_str(".\n\n");
        }
        None => out.push_str(".\n\n"),
    }

    // Conversion report.
    out.push_str("## Conversion report\n\n| | |\n|---|---|\n");
    let _ = writeln!(
        out,
        "| file | `{pack_file}`, {} (flashpack format {}) |",
        units::bytes(report.file_bytes, Style::PACK),
        report.format_version
    );
    let _ = writeln!(
        out,
        "| layers | {} (hidden size {}, expert rows {}) |",
        report.layers, report.hidden_size, report.intermediate_size
    );
    let counts: Vec<u32> = report.experts_per_layer.values().copied().collect();
    if let (Some(min), Some(max)) = (counts.iter().min(), counts.iter().max()) {
        let experts = if min == max {
            min.to_string()
        } else {
            format!("{min} to {max}")
        };
        let _ = writeln!(
            out,
            "| experts stored per layer | {experts} ({} expert segment(s) in all) |",
            report.segments
        );
    }
    let q = &report.quantization;
    let _ = writeln!(
        out,
        "| quantization | {} mode, group size {}, experts {}-bit, dense {}-bit |",
        cell(&q["mode"]),
        cell(&q["group_size"]),
        cell(&q["expert_bits"]),
        cell(&q["dense_bits"])
    );
    let _ = writeln!(
        out,
        "| bits per weight | {:.3} overall, experts {:.3}, dense {:.3} |",
        report.overall.bits_per_weight,
        report.experts.bits_per_weight,
        report.dense.bits_per_weight
    );
    let _ = writeln!(
        out,
        "| page size, padding | {} B, {} ({:.2}%) |",
        report.page_size,
        units::bytes(report.padding_bytes, Style::PACK),
        report.padding_fraction * 100.0
    );
    let list = |f: &[&str]| {
        if f.is_empty() {
            "none".to_string()
        } else {
            f.join(", ")
        }
    };
    let _ = writeln!(
        out,
        "| format features | required: {}; optional: {} |\n",
        list(&report.required_features),
        list(&report.optional_features)
    );

    out.push_str("### Sizes\n\n| part | stored | weights | bits/weight |\n|---|---:|---:|---:|\n");
    kind_row(&mut out, "dense", &report.dense);
    kind_row(&mut out, "experts", &report.experts);
    for (bits, k) in &report.expert_bits {
        kind_row(&mut out, &format!("experts, {bits}"), k);
    }
    kind_row(&mut out, "overall", &report.overall);

    out.push_str("\n### Codecs\n\n| part: codec | parts | stored |\n|---|---:|---:|\n");
    for (codec, (n, bytes)) in &report.codecs {
        let _ = writeln!(
            out,
            "| {codec} | {n} | {} |",
            units::bytes(*bytes, Style::PACK)
        );
    }

    out.push_str("\n### Provenance\n\n");
    let _ = writeln!(out, "- source: `{}`", cell(&prov["source"]));
    let _ = writeln!(out, "- revision: `{}`", cell(&prov["revision"]));
    let _ = writeln!(
        out,
        "- tool: {} {}",
        prov["tool"].as_str().unwrap_or("?"),
        tool
    );
    if let Some(o) = prov.get("options").filter(|o| !o.is_null()) {
        let _ = writeln!(out, "- options: `{}`", cell(o));
    }
    if let Some(files) = prov["files"].as_array().filter(|f| !f.is_empty()) {
        out.push_str("\n| source file | bytes | blake3 |\n|---|---:|---|\n");
        for f in files {
            let _ = writeln!(
                out,
                "| {} | {} | `{}` |",
                cell(&f["name"]),
                cell(&f["size"]),
                cell(&f["blake3"])
            );
        }
    }

    // Quality.
    out.push_str("\n## Quality\n\n");
    match metadata.get("quality") {
        Some(Value::Object(m)) if !m.is_empty() => {
            out.push_str("| measure | value |\n|---|---|\n");
            for (k, v) in m {
                let _ = writeln!(out, "| {} | {} |", k.replace('|', "\\|"), cell(v));
            }
        }
        Some(v) if !v.is_null() => {
            let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
            let _ = writeln!(out, "```json\n{pretty}\n```");
        }
        _ => out.push_str(
            "No quality measurements were recorded in this pack. Compare it with the source \
             model on your own prompts before relying on it.\n",
        ),
    }

    // How to run.
    let _ = write!(
        out,
        "\n## How to run\n\nDownload the pack (one file):\n\n```sh\n\
         huggingface-cli download {repo} {pack_file} --revision {revision} --local-dir .\n\
         # or\n\
         curl -L -o {pack_file} {endpoint}/{repo}/resolve/{revision}/{pack_file}\n```\n\n\
         Then run it with flashpack (experts stream from disk; the rest stays in \
         memory):\n\n```sh\n\
         flashpack verify {pack_file}\n\
         flashpack run {pack_file} --prompt \"Explain mixture-of-experts models in one paragraph.\"\n\
         flashpack inspect {pack_file}\n```\n"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base_model_from_provenance() {
        let p = json!({"source": "/h/.cache/huggingface/hub/models--Qwen--Qwen3-30B-A3B/snapshots/abc"});
        assert_eq!(base_model_of(&p).as_deref(), Some("Qwen/Qwen3-30B-A3B"));
        let p = json!({"source": "allenai/OLMoE-1B-7B-0924", "revision": "0123"});
        assert_eq!(
            base_model_of(&p).as_deref(),
            Some("allenai/OLMoE-1B-7B-0924")
        );
        // A bare org/name without a revision may be a local folder: not claimed.
        assert_eq!(
            base_model_of(&json!({"source": "fixtures/qwen3moe-tiny"})),
            None
        );
        assert_eq!(base_model_of(&json!({"source": "test"})), None);
        let p = json!({"source": "x", "base_model": "mistralai/Mixtral-8x7B-v0.1"});
        assert_eq!(
            base_model_of(&p).as_deref(),
            Some("mistralai/Mixtral-8x7B-v0.1")
        );
    }

    #[test]
    fn yaml_strings_are_quoted() {
        assert_eq!(yaml_str("a: b"), "\"a: b\"");
        assert_eq!(cell(&json!("a|b")), "a\\|b");
    }
}
