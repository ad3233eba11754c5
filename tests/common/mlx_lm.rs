//! Shared helpers of the tests that compare architectures against a live mlx-lm
//! (tests/deepseek_glm.rs, tests/qwen_hybrid.rs): run mlx-lm and flashpack, and check a pack's
//! logits against mlx-lm's for a prefill plus cached decode steps, resident or streaming.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use flashpack::mlx::{self, Array};
use flashpack::model::{ExpertStore, Model};
use flashpack::run::experts::{ExpertCache, PolicyKind, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::{resident_store, StreamingExperts};

/// One bf16 step of the largest logit (the golden tests' tolerance).
pub const LOGIT_TOL_REL: f32 = 1.0 / 256.0;

/// Whether mlx-lm is there to compare against (a CI run without it fails: `python_imports`).
pub fn python_has_mlx_lm() -> bool {
    super::python::python_imports("mlx_lm", "the mlx-lm checks")
}

pub fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `flashpack ARGS`, which must succeed; its output.
pub fn flashpack_out(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flashpack {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn flashpack(args: &[&str]) {
    flashpack_out(args);
}

/// `flashpack convert SRC -o PACK` with every quality stage (profiling on `calib`, the coldest
/// half of the experts at 2 bits, merging at 0.1) and `--json`: some experts end at 2 bits and
/// some at 4, the profile is in the metadata, and `flashpack verify` passes. Returns the report
/// and the pack.
pub fn convert_every_stage(
    src: &Path,
    pack: &Path,
    calib: &Path,
    name: &str,
) -> (serde_json::Value, flashpack::format::Pack) {
    let out = flashpack_out(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--cold-bits",
        "2",
        "--cold-fraction",
        "0.5",
        "--merge-threshold",
        "0.1",
        "--calibration",
        calib.to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = flashpack::format::Pack::open(pack).unwrap();
    let bits: Vec<u8> = p.experts().iter().map(|e| e.bits.max()).collect();
    assert!(
        bits.contains(&2) && bits.contains(&4),
        "{name}: {bits:?} {report}"
    );
    assert!(p.metadata()["profile"].is_object(), "{name}: no profile");
    flashpack(&["verify", pack.to_str().unwrap()]);
    (report, p)
}

/// `mlx_lm convert -q` at 4 bits, group 64, of `src` into `dst`.
pub fn mlx_lm_convert_q4(src: &Path, dst: &Path) {
    run_ok(
        Command::new("python3")
            .args(["-m", "mlx_lm", "convert", "--hf-path"])
            .arg(src)
            .arg("--mlx-path")
            .arg(dst)
            .args(["-q", "--q-bits", "4", "--q-group-size", "64"]),
        "mlx_lm convert",
    );
}

/// mlx-lm's 4-bit conversion (group 64) of `src` into `dst` with the modules whose path ends
/// with one of `keep` left in bf16: the reference for a Hugging Face source, whose routers (and
/// other such one-row gates) flashpack's dense policy keeps in full precision where mlx-lm's own
/// recipe stores them at 8 bits.
pub fn mlx_lm_convert_q4_keeping(src: &Path, dst: &Path, keep: &[&str]) {
    let keep = keep
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    run_ok(
        Command::new("python3").args([
            "-c",
            &format!(
                "from mlx_lm import convert\nkeep = ({keep},)\n\
                 convert({src:?}, mlx_path={dst:?}, quantize=True, q_group_size=64, q_bits=4, \
                 quant_predicate=lambda p, m: not p.endswith(keep))\n",
                src = src.display().to_string(),
                dst = dst.display().to_string(),
            ),
        ]),
        "mlx-lm convert with bf16 routers",
    );
}

/// Token ids as a Python list's items: `1, 2, 3`.
fn list(ids: &[u32]) -> String {
    ids.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// mlx-lm's logits on `mlx_dir`: `prompt` in one call, then each `decode` token through the
/// cache, saved as `mlx_dir/logits.safetensors` (`prefill` [L, V], `decode` [S, V], f32).
pub fn mlx_lm_logits(mlx_dir: &Path, prompt: &[u32], decode: &[u32]) {
    let script = format!(
        "import mlx.core as mx\nfrom mlx_lm import load\nfrom mlx_lm.models.cache import make_prompt_cache\n\
         m, _ = load({dir:?})\nc = make_prompt_cache(m)\n\
         p = m(mx.array([[{prompt}]]), cache=c)[0].astype(mx.float32)\nsteps = []\n\
         for t in [{decode}]:\n    steps.append(m(mx.array([[t]]), cache=c)[0, -1].astype(mx.float32))\n\
         mx.save_safetensors({out:?}, {{'prefill': p, 'decode': mx.stack(steps)}})\n",
        dir = mlx_dir.display().to_string(),
        prompt = list(prompt),
        decode = list(decode),
        out = mlx_dir.join("logits.safetensors").display().to_string(),
    );
    run_ok(
        Command::new("python3").args(["-c", &script]),
        "mlx-lm logits",
    );
}

/// [`mlx_lm_logits`], plus mlx-lm's logits along generation's path: all but the last prompt
/// token in calls of `chunk` tokens, then the last alone (`chunked_last` [1, V]), then each
/// `decode` token (`chunked_decode` [S, V]). [`check`] compares a chunked pass against these
/// when they are there: a lone last token takes MLA's absorbed path and, under sparse
/// attention, a gather of the chosen positions, which round otherwise than the one-call prefill.
pub fn mlx_lm_logits_chunked(mlx_dir: &Path, prompt: &[u32], decode: &[u32], chunk: usize) {
    // One Python process for both passes: mlx-lm's start-up is most of the cost.
    let script = format!(
        "import mlx.core as mx\nfrom mlx_lm import load\nfrom mlx_lm.models.cache import make_prompt_cache\n\
         m, _ = load({dir:?})\np = [{prompt}]\nd = [{decode}]\n\
         def steps(c):\n    return mx.stack([m(mx.array([[t]]), cache=c)[0, -1].astype(mx.float32) for t in d])\n\
         c = make_prompt_cache(m)\ng = {{'prefill': m(mx.array([p]), cache=c)[0].astype(mx.float32)}}\n\
         g['decode'] = steps(c)\nc = make_prompt_cache(m)\n\
         for i in range(0, len(p) - 1, {chunk}):\n    mx.eval(m(mx.array([p[i:min(i + {chunk}, len(p) - 1)]]), cache=c))\n\
         g['chunked_last'] = m(mx.array([p[-1:]]), cache=c)[0].astype(mx.float32)\n\
         g['chunked_decode'] = steps(c)\nmx.save_safetensors({out:?}, g)\n",
        dir = mlx_dir.display().to_string(),
        prompt = list(prompt),
        decode = list(decode),
        out = mlx_dir.join("logits.safetensors").display().to_string(),
    );
    run_ok(
        Command::new("python3").args(["-c", &script]),
        "mlx-lm chunked logits",
    );
}

/// The largest |got - want| and the largest |want|.
pub fn max_diff(got: &Array, want: &Array) -> (f32, f32) {
    let (a, b) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (d, b.iter().fold(0f32, |m, y| m.max(y.abs())))
}

/// [`check`] with every expert resident, then streaming through `slots` expert slots (fewer
/// than a layer's experts): the larger of the two max |diff|s.
pub fn check_resident_and_streaming(
    pack: &Path,
    mlx_dir: &Path,
    slots: u64,
    case: (&[u32], &[u32], Option<usize>),
    what: &str,
) -> f32 {
    [None, Some(slots)]
        .into_iter()
        .map(|budget| {
            check(
                pack,
                mlx_dir,
                budget,
                case,
                &format!("{what} {budget:?} slots"),
            )
        })
        .fold(0f32, f32::max)
}

/// Row `r` of a 2-D array.
fn row(a: &Array, r: usize) -> Array {
    let v = a.dim(-1).unwrap() as i32;
    a.slice(&[r as i32, 0], &[r as i32 + 1, v]).unwrap()
}

/// The pack's logits equal mlx-lm's (`mlx_lm_logits` of the same `prompt` and `decode`) for the
/// prompt and each decode step, the prompt in one call and, with `chunk`, then in chunks of that
/// many tokens (generation's path: every position but the last only fills the cache, the last
/// runs alone); `budget`: a cache of this many expert slots (streaming), or every expert
/// resident. MLA passes no `chunk`: a lone last token takes its absorbed path, which rounds
/// differently in bf16 from the one-call prefill it is compared with (mlx-lm's own chunked and
/// one-call logits differ the same way), while the decode steps check that path.
pub fn check(
    pack: &Path,
    mlx_dir: &Path,
    budget: Option<u64>,
    (prompt, decode, chunk): (&[u32], &[u32], Option<usize>),
    what: &str,
) -> f32 {
    let (pack, cfg, weights) = open::open(pack, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let g = mlx::load_safetensors(&mlx_dir.join("logits.safetensors")).unwrap();
    let slot = {
        let e = &pack.experts()[0];
        e.decoded_len / e.row_count as u64 * pack.intermediate_size() as u64
    };
    let opts = StoreOptions {
        budget_bytes: budget.map(|n| n * slot),
        policy: PolicyKind::Lru,
        verify: true,
        ..StoreOptions::default()
    };
    let mut cache = ExpertCache::new(&pack, &opts).unwrap();
    let mut streaming;
    let mut resident;
    let store: &mut dyn ExpertStore = match budget {
        None => {
            cache.warm_all(&pack).unwrap();
            resident = resident_store(&cache, &cfg.sparse_layers(), cfg.num_experts)
                .unwrap()
                .unwrap();
            &mut resident
        }
        Some(_) => {
            streaming = StreamingExperts::new(&pack, cache, cfg.num_experts, true);
            &mut streaming
        }
    };
    let n = prompt.len();
    let mut worst = 0f32;
    let passes: &[bool] = if chunk.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for &chunked in passes {
        let mut kv = model.new_cache();
        let (got, want) = if chunked {
            for c in prompt[..n - 1].chunks(chunk.unwrap_or(n)) {
                model.prefill_ids(c, &mut kv, store).unwrap();
            }
            assert_eq!(
                kv.offset(),
                n - 1,
                "{what}: the cache counts the prefilled positions"
            );
            let last = model
                .forward_last_ids(&prompt[n - 1..], &mut kv, store)
                .unwrap();
            let want = match g.get("chunked_last") {
                Some(l) => l.clone(),
                None => row(&g["prefill"], n - 1),
            };
            (last, want)
        } else {
            let all = model.forward_ids(prompt, &mut kv, store).unwrap();
            (all, g["prefill"].clone())
        };
        let (d, s) = max_diff(&got, &want);
        assert!(
            d <= LOGIT_TOL_REL * s,
            "{what} prefill (chunked: {chunked}): {d} at scale {s}"
        );
        worst = worst.max(d);
        for (step, &t) in decode.iter().enumerate() {
            let logits = model.forward_ids(&[t], &mut kv, store).unwrap();
            let steps = match g.get("chunked_decode") {
                Some(c) if chunked => c,
                _ => &g["decode"],
            };
            let (d, s) = max_diff(&logits, &row(steps, step));
            assert!(
                d <= LOGIT_TOL_REL * s,
                "{what} decode {step} (chunked: {chunked}): {d} at scale {s}"
            );
            worst = worst.max(d);
        }
        assert_eq!(kv.offset(), n + decode.len());
    }
    eprintln!("{what}: max |logit diff| {worst}");
    worst
}

/// `flashpack run ... --json` (ARGS include `run` and `--json`), which must succeed: its report,
/// the last line of stderr (stdout is the text).
pub fn run_report(args: &[&str]) -> serde_json::Value {
    let out = flashpack_out(args);
    let err = String::from_utf8_lossy(&out.stderr);
    serde_json::from_str(err.lines().last().unwrap_or("")).unwrap()
}

/// `flashpack eval PACK --text TEXT --reference SRC --window 64 --json`: the KL and top-1
/// agreement against the reference (NaN when absent), and the whole report.
/// `flashpack run PACK --prompt PROMPT --max-tokens 8 --json` under an ample memory budget and
/// under `--expert-budget BUDGET`: both give 8 tokens, the same (streaming changes nothing), and
/// the budgeted run streams (fewer slots than `stored` experts, more loads than slots). Returns
/// the budgeted run's report.
pub fn streaming_keeps_the_tokens(
    pack: &str,
    prompt: &str,
    budget: &str,
    stored: u64,
    name: &str,
) -> serde_json::Value {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            pack,
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        run_report(&args)
    };
    let ample = run(&["--mem-budget", "1GiB"]);
    let j = run(&["--expert-budget", budget]);
    assert_eq!(
        j["token_ids"].as_array().map(Vec::len),
        Some(8),
        "{name}: {j}"
    );
    assert_eq!(
        j["token_ids"], ample["token_ids"],
        "{name}: streaming changes nothing"
    );
    let c = &j["expert_cache"];
    let n = |k: &str| c[k].as_u64().unwrap();
    assert!(n("slots") < stored, "{name}: {stored} experts, {c}");
    assert!(n("experts_loaded") > n("slots"), "{name}: {c}");
    j
}

pub fn eval_against(pack: &str, text: &Path, src: &str) -> (f64, f64, serde_json::Value) {
    let out = flashpack_out(&[
        "eval",
        pack,
        "--text",
        text.to_str().unwrap(),
        "--reference",
        src,
        "--window",
        "64",
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| e["reference"][k].as_f64().unwrap_or(f64::NAN);
    (get("kl_mean"), get("top1_agreement"), e)
}

/// Greedy tokens through the default CLI (`flashpack run P`, after `flashpack convert SRC -o P`
/// of the bf16 folder) equal mlx-lm's on `mlx_dir` on 3 prompts, along generation's path (all
/// but the last prompt token in one call, then the last alone, then one token at a time).
pub fn greedy_tokens_equal_mlx_lms(pack: &Path, mlx_dir: &Path, what: &str) {
    let prompts = [
        "The history of",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
    ];
    let script = format!(
        r#"import json, mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
m, tok = load({dir:?})
ids = []
for text in {prompts:?}:
    c = make_prompt_cache(m)
    p = tok.encode(text, add_special_tokens=False)
    mx.eval(m(mx.array([p[:-1]]), cache=c))
    x = m(mx.array([p[-1:]]), cache=c)
    out = []
    for _ in range(8):
        t = int(mx.argmax(x[0, -1]).item())
        out.append(t)
        x = m(mx.array([[t]]), cache=c)
    ids.append(out)
print(json.dumps(ids))
"#,
        dir = mlx_dir.display().to_string(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (prompt, want) in prompts.iter().zip(want) {
        let r = run_report(&[
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            prompt,
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--json",
        ]);
        assert_eq!(r["token_ids"], want, "{what} {prompt:?}");
    }
}
