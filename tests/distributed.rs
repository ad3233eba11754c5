//! Pipeline ranks on MLX's ring backend over loopback (issue 32, decision 0034): two and three
//! processes on one pack give exactly the single process's greedy tokens (resident and
//! streaming, prompts prefilled in several chunks, then decode), on the bundled model and on
//! golden packs of several architectures; a killed rank ends the others with its name; bad
//! hostfiles, ranks and mismatched packs are refused. Ports are chosen free at test time.
//! Wall-clock limits here are hang guards only.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub(crate) fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flashpack")
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Generous: a 2-core CI machine runs three ranks of a model at once.
const HANG_GUARD: Duration = Duration::from_secs(240);

/// The bundled model's pack, converted once per test binary.
pub(crate) fn tiny_pack() -> &'static Path {
    static PACK: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = PACK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny.flashpack");
        convert(&fixture("qwen3moe-tiny"), &out, &[]);
        (dir, out)
    });
    p
}

fn convert(src: &Path, out: &Path, extra: &[&str]) {
    let o = Command::new(bin())
        .arg("convert")
        .arg(src)
        .arg("-o")
        .arg(out)
        .arg("--quiet")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "convert {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A golden checkpoint (fixtures/golden, no tokenizer) with a word-level tokenizer of its 256
/// ids (`t0` .. `t255`), converted at its own bits.
fn golden_pack(name: &str, dir: &Path) -> PathBuf {
    let src = dir.join(name);
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("golden/{name}/{f}")), src.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(src.join("tokenizer.json"), tok.to_string()).unwrap();
    let out = dir.join(format!("{name}.flashpack"));
    let bits = if name.ends_with("-q2") { "2" } else { "4" };
    convert(
        &src,
        &out,
        &[
            "--expert-bits",
            bits,
            "--dense-bits",
            bits,
            "--codec",
            "raw",
        ],
    );
    out
}

/// `n` ports free now on 127.0.0.1.
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub(crate) struct Ranks {
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// Starts `n` ranks of `flashpack run PACK ARGS` on loopback.
fn launch(pack: &Path, n: usize, args: &[&str], env: &[(&str, &str)]) -> Ranks {
    launch_each(pack, n, args, env, &|_| Vec::new())
}

/// [`launch`], with `each(rank)`'s variables set on that rank alone (its own Hub cache).
pub(crate) fn launch_each(
    pack: &Path,
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
    each: &dyn Fn(usize) -> Vec<(String, String)>,
) -> Ranks {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(n + 1);
    let hosts: Vec<Vec<String>> = ports[..n]
        .iter()
        .map(|p| vec![format!("127.0.0.1:{p}")])
        .collect();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, serde_json::to_string(&hosts).unwrap()).unwrap();
    let children = (0..n)
        .map(|rank| {
            Command::new(bin())
                .arg("run")
                .arg(pack)
                .args(args)
                .arg("--hostfile")
                .arg(&hostfile)
                .args(["--rank", &rank.to_string()])
                .env("FLASHPACK_CONTROL_PORT", ports[n].to_string())
                .envs(env.iter().copied())
                .envs(each(rank))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    Ranks {
        children,
        _dir: dir,
    }
}

/// Waits for every rank (killing all past the hang guard) and returns their outputs.
pub(crate) fn wait_all(mut r: Ranks) -> Vec<Output> {
    let start = Instant::now();
    loop {
        let done = r
            .children
            .iter_mut()
            .all(|c| c.try_wait().unwrap().is_some());
        if done {
            break;
        }
        if start.elapsed() > HANG_GUARD {
            for c in &mut r.children {
                let _ = c.kill();
            }
            let outs: Vec<String> = r
                .children
                .into_iter()
                .map(|c| {
                    let o = c.wait_with_output().unwrap();
                    String::from_utf8_lossy(&o.stderr).into_owned()
                })
                .collect();
            panic!("ranks hung: {outs:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    r.children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The generated ids from `run --json`'s stats line.
pub(crate) fn token_ids(stderr: &str) -> Vec<u64> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with('{') && l.contains("token_ids"))
        .unwrap_or_else(|| panic!("no --json line in {stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

pub(crate) fn single(pack: &Path, args: &[&str], env: &[(&str, &str)]) -> (String, Vec<u64>) {
    let o = Command::new(bin())
        .arg("run")
        .arg(pack)
        .args(args)
        .arg("--json")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "single process: {err}");
    (text(&o.stdout), token_ids(&err))
}

/// `n` ranks give the single process's text and ids; every rank exits 0.
fn same_as_single(pack: &Path, n: usize, args: &[&str], env: &[(&str, &str)]) {
    let (want_text, want_ids) = single(pack, args, env);
    assert!(!want_ids.is_empty());
    let mut ranked = args.to_vec();
    ranked.push("--json");
    let outs = wait_all(launch(pack, n, &ranked, env));
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} of {n} failed: {}",
            text(&o.stderr)
        );
        assert!(
            text(&o.stderr).contains(&format!("rank {r}: layers")),
            "{}",
            text(&o.stderr)
        );
    }
    let err0 = text(&outs[0].stderr);
    assert!(err0.contains(&format!("pipeline: {n} ranks")), "{err0}");
    assert_eq!(token_ids(&err0), want_ids, "{n} ranks: {err0}");
    assert_eq!(text(&outs[0].stdout), want_text);
    for o in &outs[1..] {
        assert!(o.stdout.is_empty(), "only rank 0 prints the answer");
    }
}

pub(crate) const PROMPT: &str =
    "The history of the world is a long story of people, places and the things they made";

#[test]
fn two_ranks_resident_match_one_process() {
    let args = ["--prompt", PROMPT, "--max-tokens", "24", "--raw"];
    // Five-token prefill chunks: the prompt goes through the pipeline in several.
    same_as_single(tiny_pack(), 2, &args, &[("FLASHPACK_PREFILL_CHUNK", "5")]);
}

/// Sampling at a temperature: the last rank samples with rank 0's draws, so the tokens are the
/// single process's for the same seed, top-p and top-k (bundled model, and a model whose
/// layers pass more than a hidden state, on three ranks).
#[test]
fn sampled_tokens_on_the_last_rank_match_one_process() {
    let args = [
        "--prompt",
        PROMPT,
        "--max-tokens",
        "24",
        "--raw",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "11",
    ];
    same_as_single(tiny_pack(), 2, &args, &[]);
    let dir = tempfile::tempdir().unwrap();
    let pack = golden_pack("kimi_k3-q4", dir.path());
    let args = [
        "--prompt",
        "t3 t1 t4 t1 t5 t9 t2 t6",
        "--max-tokens",
        "8",
        "--temperature",
        "1.5",
        "--seed",
        "3",
    ];
    same_as_single(&pack, 3, &args, &[]);
}

#[test]
fn three_ranks_streaming_match_one_process() {
    let args = [
        "--prompt",
        PROMPT,
        "--max-tokens",
        "16",
        "--expert-budget",
        "40%",
    ];
    same_as_single(tiny_pack(), 3, &args, &[("FLASHPACK_PREFILL_CHUNK", "4")]);
}

/// Every architecture's golden pack, by name (the quantized-source goldens of each type).
fn golden_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture("golden"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-q4") && n != "qwen3moe-tiny-q4")
        .collect();
    names.sort();
    assert!(names.len() >= 16, "golden packs: {names:?}");
    names
}

/// A golden's layer count (its text model's, for the multimodal ones).
fn golden_layers(name: &str) -> usize {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("golden/{name}/config.json"))).unwrap(),
    )
    .unwrap();
    let t = c.get("text_config").unwrap_or(&c);
    t["num_hidden_layers"].as_u64().unwrap() as usize
}

/// Every architecture's golden pack (their attention, caches, routing and what their layers
/// pass on differ: DeepSeek-V4.1's hyper-connection streams and shared latents, Kimi-K3's
/// attention residuals' blocks), two ranks, prompt in chunks then decode, every expert
/// resident and streaming through a small expert budget.
#[test]
fn golden_architectures_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "t1 t7 t42 t9 t200 t13 t77 t5 t64 t31 t2 t99";
    let env = [("FLASHPACK_PREFILL_CHUNK", "3")];
    for name in golden_names() {
        let pack = golden_pack(&name, dir.path());
        let args = ["--prompt", prompt, "--max-tokens", "8", "--raw"];
        same_as_single(&pack, 2, &args, &env);
        let streaming = [&args[..], &["--expert-budget", "50%"]].concat();
        same_as_single(&pack, 2, &streaming, &env);
    }
}

/// Three ranks on every golden of three layers or more (every rank holds at least one): each
/// layer boundary of the smallest is a stage boundary, including those that carry more than a
/// hidden state; one of them streaming.
#[test]
fn golden_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = golden_names()
        .into_iter()
        .filter(|n| golden_layers(n) >= 3)
        .collect();
    for n in [
        "deepseek_v3-q4",
        "deepseek_v41-q4",
        "kimi_k3-q4",
        "qwen3_next-q4",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} not among {names:?}");
    }
    let env = [("FLASHPACK_PREFILL_CHUNK", "3")];
    for (i, name) in names.iter().enumerate() {
        let pack = golden_pack(name, dir.path());
        let mut args = vec!["--prompt", "t3 t1 t4 t1 t5 t9 t2 t6", "--max-tokens", "6"];
        if i % 2 == 1 {
            args.extend(["--expert-budget", "50%"]);
        }
        same_as_single(&pack, 3, &args, &env);
    }
}

#[test]
fn a_killed_rank_ends_the_others_with_its_name() {
    // A generation long enough to be killed in the middle of.
    let args = ["--prompt", PROMPT, "--max-tokens", "1900", "--raw"];
    let mut ranks = launch(tiny_pack(), 3, &args, &[]);
    // Wait for the answer to start: rank 0 prints tokens as they come.
    let mut out0 = ranks.children[0].stdout.take().unwrap();
    let mut first = [0u8; 8];
    let started = Instant::now();
    let _ = out0.read(&mut first);
    assert!(started.elapsed() < HANG_GUARD);
    // Keep draining rank 0's answer so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out0.read_to_end(&mut sink);
    });
    ranks.children[1].kill().unwrap();
    let killed = Instant::now();
    let mut outs = Vec::new();
    for (r, c) in ranks.children.iter_mut().enumerate() {
        if r == 1 {
            let _ = c.wait();
            continue;
        }
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                let mut err = String::new();
                c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                outs.push((r, status, err, killed.elapsed()));
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "rank {r} still runs a minute after rank 1 was killed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (r, status, err, after) in outs {
        assert!(!status.success(), "rank {r} exited 0: {err}");
        assert!(
            err.contains("rank 1"),
            "rank {r} does not name rank 1: {err}"
        );
        // The issue's bound; the watchdog sees a closed connection at once.
        assert!(
            after < Duration::from_secs(10),
            "rank {r} took {after:?}: {err}"
        );
    }
}

fn run_fails(args: &[&str]) -> Output {
    let o = Command::new(bin()).arg("run").args(args).output().unwrap();
    assert!(!o.status.success());
    assert!(!text(&o.stderr).contains("panicked"), "{}", text(&o.stderr));
    o
}

#[test]
fn bad_hostfiles_and_ranks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack().to_str().unwrap().to_string();
    let missing = dir.path().join("missing.json");
    let o = run_fails(&[
        &pack,
        "--prompt",
        "x",
        "--hostfile",
        missing.to_str().unwrap(),
        "--rank",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("missing.json"),
        "{}",
        text(&o.stderr)
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[["not an address"], ["127.0.0.1:1"]]"#).unwrap();
    let o = run_fails(&[
        &pack,
        "--prompt",
        "x",
        "--hostfile",
        bad.to_str().unwrap(),
        "--rank",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("is not ip:port"),
        "{}",
        text(&o.stderr)
    );
    let good = dir.path().join("hosts.json");
    std::fs::write(&good, r#"[["127.0.0.1:1"], ["127.0.0.1:2"]]"#).unwrap();
    let o = run_fails(&[
        &pack,
        "--prompt",
        "x",
        "--hostfile",
        good.to_str().unwrap(),
        "--rank",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("rank 2 is out of range"),
        "{}",
        text(&o.stderr)
    );
    let o = run_fails(&[&pack, "--prompt", "x", "--rank", "0"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--rank without --hostfile is a usage error"
    );
    // A rank that never comes: the other gives up naming it.
    let o = run_fails(&[
        &pack,
        "--prompt",
        "x",
        "--hostfile",
        good.to_str().unwrap(),
        "--rank",
        "1",
        "--connect-timeout",
        "2",
    ]);
    assert!(text(&o.stderr).contains("rank 0"), "{}", text(&o.stderr));
}

#[test]
fn mismatched_packs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.flashpack");
    convert(&fixture("qwen3moe-tiny"), &other, &["--codec", "raw"]);
    let ports = free_ports(3);
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(
        &hostfile,
        format!(
            r#"[["127.0.0.1:{}"], ["127.0.0.1:{}"]]"#,
            ports[0], ports[1]
        ),
    )
    .unwrap();
    let children = [tiny_pack(), other.as_path()]
        .iter()
        .enumerate()
        .map(|(rank, pack)| {
            Command::new(bin())
                .arg("run")
                .arg(pack)
                .args(["--prompt", "x", "--max-tokens", "2"])
                .arg("--hostfile")
                .arg(&hostfile)
                .args(["--rank", &rank.to_string()])
                .env("FLASHPACK_CONTROL_PORT", ports[2].to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs = wait_all(Ranks {
        children,
        _dir: tempfile::tempdir().unwrap(),
    });
    for (r, o) in outs.iter().enumerate() {
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {err}");
        assert!(err.contains("another pack"), "rank {r}: {err}");
    }
}

/// `serve` across two ranks: rank 0 listens, answers an OpenAI request with the text a
/// single-process server gives, twice (each request starts from an empty cache on every rank);
/// stopped (SIGTERM), it tells rank 1, and both exit 0.
#[test]
fn serve_on_two_ranks_answers_as_one_process() {
    serve_two_ranks(tiny_pack().to_str().unwrap(), &[]);
}

/// `serve PACK` on two ranks (each with environment `env`; `pack` a path or a Hub id) answers
/// an OpenAI completion twice as one process on the bundled pack does, and both ranks exit 0
/// on SIGTERM to rank 0. Rank 0's stderr is returned.
pub(crate) fn serve_two_ranks(pack: &str, env: &[(String, String)]) -> String {
    use crate::common::http::{post, Server};
    use std::io::{BufRead, BufReader};
    let body = serde_json::json!({"model": "tiny", "prompt": "The history of", "max_tokens": 12,
        "temperature": 0});
    let single = Server::start(tiny_pack(), &[]);
    let r = post(single.addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = r.json()["choices"][0]["text"].clone();
    drop(single);

    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let hosts: Vec<Vec<String>> = ports[..2]
        .iter()
        .map(|p| vec![format!("127.0.0.1:{p}")])
        .collect();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, serde_json::to_string(&hosts).unwrap()).unwrap();
    let mut ranks: Vec<Child> = (0..2)
        .map(|rank| {
            Command::new(bin())
                .args([
                    "serve",
                    pack,
                    "--model-name",
                    "tiny",
                    "--port",
                    "0",
                    "--hostfile",
                ])
                .arg(&hostfile)
                .args(["--rank", &rank.to_string()])
                .env("FLASHPACK_CONTROL_PORT", ports[2].to_string())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut err = BufReader::new(ranks[0].stderr.take().unwrap());
    let mut seen = String::new();
    let addr: std::net::SocketAddr = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            for c in &mut ranks {
                let _ = c.kill();
            }
            panic!("rank 0 exited before listening: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    assert!(seen.contains("pipeline: 2 ranks"), "{seen}");
    for _ in 0..2 {
        let r = post(addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], expected);
    }
    // SAFETY: a signal to a child this test started and has not reaped.
    unsafe {
        libc::kill(ranks[0].id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while !ranks.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
        if start.elapsed() > HANG_GUARD {
            for c in &mut ranks {
                let _ = c.kill();
            }
            panic!("the ranks did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    for (rank, c) in ranks.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "rank {rank}: {stderr}{rest}");
    }
    seen + &rest
}
