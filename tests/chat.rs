//! `flashpack chat` through piped standard input: turns stream to stdout, the KV cache carries
//! over between turns (cached tokens in `--stats`), `/reset` starts over, `/exit` quits, and
//! Ctrl-C (SIGINT) stops the answer being written, not the program.

use crate::common::http;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use serde_json::Value;

/// `flashpack chat` on the tiny pack, with `--stats` and `args` (hostile.rs uses it too).
pub(crate) fn chat(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("chat")
        .arg(http::tiny_pack("chat-tests"))
        .args(["--stats"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stats(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|l| l.starts_with('{') && !l.contains("prefill_tokens"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn turns_reuse_the_kv_cache_reset_starts_over_and_exit_quits() {
    let mut child = chat(&["--max-tokens", "8", "--system", "A history lesson."]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Tell me about Rome.\nAnd Greece?\n/nonsense\n/reset\nTell me about Rome.\n/exit\nnot read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let turns = stats(&stderr);
    assert_eq!(turns.len(), 3, "{stderr}");
    // The second turn starts with the first turn and its answer, which the cache holds.
    let first_prompt = turns[0]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(turns[0]["cached_tokens"], 0);
    assert!(
        turns[1]["cached_tokens"].as_u64().unwrap() >= first_prompt,
        "{stderr}"
    );
    // After /reset: the same first turn, computed again, the same greedy answer.
    assert_eq!(turns[2]["cached_tokens"], 0);
    assert_eq!(turns[2]["prompt_tokens"], first_prompt);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(answers.len() >= 3, "{stdout:?}");
    assert_eq!(answers.first(), answers.last(), "{stdout:?}");
    assert!(stderr.contains("unknown command /nonsense"), "{stderr}");
    assert!(stderr.contains("(new conversation)"), "{stderr}");
}

#[test]
fn ctrl_c_stops_the_answer_and_the_next_turn_is_answered() {
    // 60 tokens take seconds on the tiny model; the signal goes right after the first byte.
    let mut child = chat(&["--max-tokens", "60"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a long story.\n").unwrap();
    stdin.flush().unwrap();
    // Wait for the answer to start, then interrupt it.
    let mut stdout = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).unwrap();
    // SAFETY: sends SIGINT to the child this test started, by its id.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    while !first.starts_with('{') || first.contains("prefill_tokens") {
        first.clear();
        assert!(stderr.read_line(&mut first).unwrap() > 0, "chat ended");
    }
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["finish"], "cancelled", "{first}");
    assert!(first["completion_tokens"].as_u64().unwrap() < 60, "{first}");
    // Still running: the next turn is answered, then /exit ends it normally.
    stdin.write_all(b"And then?\n/exit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {rest}");
    let turns = stats(&rest);
    assert_eq!(turns.len(), 1, "{rest}");
    assert!(turns[0]["cached_tokens"].as_u64().unwrap() > 0, "{rest}");
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    assert!(!out.is_empty());
}
