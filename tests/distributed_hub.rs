//! Pipeline ranks from the Hub (issue 32, decision 0034): `flashpack run org/name --hostfile H
//! --rank N` reads the pack's header and directories by HTTP ranges, joins the pipeline, then
//! downloads only its layers' byte ranges into a sparse copy in the Hub cache. Against the
//! local Hub (tests/common/hub_server.rs): two ranks give the single process's tokens on the
//! local pack, each receiving well under the pack's size; a second run (offline) downloads
//! nothing; one process downloads the whole pack; a damaged range, a repo without a pack, with
//! two packs, or no repo at all are refused with exit 1.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::hub_server::HubServer;
use crate::common::walk;
use crate::distributed::{
    bin, launch_each, serve_two_ranks, single, text, tiny_pack, token_ids, wait_all, PROMPT,
};

const ARGS: [&str; 5] = ["--prompt", PROMPT, "--max-tokens", "16", "--raw"];

/// The Hub's variables for a process using `cache`.
fn hub_env(s: &HubServer, cache: &Path, offline: bool) -> Vec<(String, String)> {
    vec![
        ("HF_ENDPOINT".into(), s.endpoint.clone()),
        ("HF_HUB_CACHE".into(), cache.display().to_string()),
        ("HF_TOKEN".into(), String::new()),
        (
            "HF_HUB_OFFLINE".into(),
            if offline { "1" } else { "0" }.into(),
        ),
    ]
}

fn serve_pack(bytes: Vec<u8>) -> HubServer {
    let s = HubServer::start();
    s.add_repo(
        "org/tiny",
        false,
        &[
            ("tiny.flashpack", bytes, true),
            ("README.md", b"# tiny\n".to_vec(), false),
        ],
    );
    s
}

/// `received X of Y bytes` from a rank's stderr.
fn received(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains(": received "))
        .unwrap_or_else(|| panic!("no download line in {stderr}"));
    let rest = line.split(": received ").nth(1).unwrap();
    let words: Vec<&str> = rest.split_whitespace().collect();
    (words[0].parse().unwrap(), words[2].parse().unwrap())
}

/// Bytes the server sent of the pack's body (ranges and whole downloads).
fn served(s: &HubServer) -> u64 {
    let st = s.state();
    st.served
        .iter()
        .filter(|(p, _)| p.starts_with("/lfs/"))
        .map(|(_, n)| n)
        .sum()
}

fn ranks_from_hub(s: &HubServer, caches: &[tempfile::TempDir], offline: bool) -> Vec<Output> {
    let mut args = ARGS.to_vec();
    args.push("--json");
    let env_of = |r: usize| hub_env(s, caches[r].path(), offline);
    wait_all(launch_each(Path::new("org/tiny"), 2, &args, &[], &env_of))
}

#[test]
fn two_ranks_download_only_their_ranges_from_the_hub() {
    let pack = std::fs::read(tiny_pack()).unwrap();
    let size = pack.len() as u64;
    let s = serve_pack(pack);
    let (want_text, want_ids) = single(tiny_pack(), &ARGS, &[]);
    let caches = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];

    let outs = ranks_from_hub(&s, &caches, false);
    let mut total = 0;
    for (r, o) in outs.iter().enumerate() {
        let err = text(&o.stderr);
        assert!(o.status.success(), "rank {r}: {err}");
        let (got, of) = received(&err);
        assert_eq!(of, size, "{err}");
        // Each rank serves half the layers: well under the whole file.
        assert!(
            got * 10 < size * 8,
            "rank {r} received {got} of {size}: {err}"
        );
        assert!(got > 0);
        eprintln!("rank {r} received {got} of {size} bytes");
        total += got;
    }
    assert_eq!(served(&s), total, "the server sent what the ranks counted");
    let err0 = text(&outs[0].stderr);
    assert_eq!(token_ids(&err0), want_ids, "{err0}");
    assert_eq!(text(&outs[0].stdout), want_text);
    // The copies are sparse files of the pack's size, beside their records.
    for c in &caches {
        let sparse = walk(c.path())
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "flashpack"))
            .expect("a sparse copy");
        assert_eq!(std::fs::metadata(&sparse).unwrap().len(), size);
        assert!(sparse.with_extension("flashpack.ranges").is_file());
    }

    // Again, offline: nothing is requested, the same tokens come out.
    s.take_log();
    let outs = ranks_from_hub(&s, &caches, true);
    for (r, o) in outs.iter().enumerate() {
        let err = text(&o.stderr);
        assert!(o.status.success(), "offline rank {r}: {err}");
        assert_eq!(received(&err).0, 0, "{err}");
    }
    assert_eq!(token_ids(&text(&outs[0].stderr)), want_ids);
    assert!(s.take_log().is_empty(), "an offline run made requests");

    // Online again, with everything cached: only the revision and the size are asked for.
    let outs = ranks_from_hub(&s, &caches, false);
    for o in &outs {
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(received(&text(&o.stderr)).0, 0);
    }
    assert!(s.take_log().iter().all(|l| !l.path.starts_with("/lfs/")));
}

fn run_hub(s: &HubServer, cache: &Path, id: &str, offline: bool) -> Output {
    Command::new(bin())
        .arg("run")
        .arg(id)
        .args(ARGS)
        .arg("--json")
        .envs(hub_env(s, cache, offline))
        .output()
        .unwrap()
}

#[test]
fn one_process_runs_a_hub_pack_downloaded_whole() {
    let pack = std::fs::read(tiny_pack()).unwrap();
    let size = pack.len() as u64;
    let s = serve_pack(pack);
    let (want_text, want_ids) = single(tiny_pack(), &ARGS, &[]);
    let cache = tempfile::tempdir().unwrap();
    for offline in [false, true] {
        let o = run_hub(&s, cache.path(), "org/tiny", offline);
        let err = text(&o.stderr);
        assert!(o.status.success(), "offline {offline}: {err}");
        assert_eq!(token_ids(&err), want_ids);
        assert_eq!(text(&o.stdout), want_text);
    }
    assert_eq!(served(&s), size, "downloaded once, whole");
    // The Hub unreachable: the cached pack runs, with a note.
    let mut env = hub_env(&s, cache.path(), false);
    env[0].1 = "http://127.0.0.1:1".into();
    let o = Command::new(bin())
        .arg("run")
        .arg("org/tiny")
        .args(ARGS)
        .arg("--json")
        .envs(env)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(token_ids(&err), want_ids);
    let snap = cache.path().join("models--org--tiny/snapshots");
    assert!(walk(&snap).iter().any(|p| p.ends_with("tiny.flashpack")));
}

#[test]
fn a_damaged_range_is_named() {
    let mut pack = std::fs::read(tiny_pack()).unwrap();
    // A byte of the last expert segment (the last layer's, rank 1's): its checksum fails.
    let p = flashpack::format::Pack::open(tiny_pack()).unwrap();
    let last = p.experts().last().unwrap().clone();
    pack[(last.offset + last.stored_len / 2) as usize] ^= 0x40;
    let s = serve_pack(pack);
    let caches = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let outs = ranks_from_hub(&s, &caches, false);
    let err1 = text(&outs[1].stderr);
    assert_eq!(outs[1].status.code(), Some(1), "{err1}");
    let want = format!(
        "expert segment (layer {}, expert {}, segment {}) of org/tiny:tiny.flashpack, as \
         downloaded, does not match its checksum",
        last.layer, last.expert, last.segment
    );
    assert!(err1.contains(&want), "{err1}");
    assert_eq!(outs[0].status.code(), Some(1), "{}", text(&outs[0].stderr));
}

#[test]
fn hub_ids_without_one_pack_are_refused() {
    let s = HubServer::start();
    s.add_repo(
        "org/nopack",
        false,
        &[("config.json", b"{}".to_vec(), false)],
    );
    let bytes = std::fs::read(tiny_pack()).unwrap();
    s.add_repo(
        "org/two",
        false,
        &[
            ("a.flashpack", bytes.clone(), true),
            ("b.flashpack", bytes, true),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let cases = [
        (
            "org/nopack",
            "org/nopack@main holds no .flashpack file (its files: config.json)",
        ),
        // The Hub answers 401 for a missing repo when no token is sent (docs/hub.md).
        (
            "org/missing",
            "for org/missing: no token was sent and the repo is private, gated or missing",
        ),
        (
            "org/two",
            "holds several packs (a.flashpack, b.flashpack); name one as org/two@main:FILE",
        ),
        (
            "org/two:c.flashpack",
            "org/two@main has no file c.flashpack",
        ),
        ("not/a/repo", "not/a/repo"),
    ];
    for (id, want) in cases {
        let o = run_hub(&s, cache.path(), id, false);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{id}: {err}");
        assert!(err.contains(want), "{id}: {err}");
    }
    // A named one of several runs.
    let o = run_hub(&s, cache.path(), "org/two:b.flashpack", false);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn two_ranks_on_one_machine_share_one_cache() {
    let pack = std::fs::read(tiny_pack()).unwrap();
    let size = pack.len() as u64;
    let s = serve_pack(pack);
    let (_, want_ids) = single(tiny_pack(), &ARGS, &[]);
    let cache = tempfile::tempdir().unwrap();
    let mut args = ARGS.to_vec();
    args.push("--json");
    let env_of = |_| hub_env(&s, cache.path(), false);
    let outs = wait_all(launch_each(Path::new("org/tiny"), 2, &args, &[], &env_of));
    let mut total = 0;
    for o in &outs {
        let err = text(&o.stderr);
        assert!(o.status.success(), "{err}");
        total += received(&err).0;
    }
    // The header and directories came once, under the copy's lock: no byte twice.
    assert!(total <= size, "{total} of {size}");
    assert_eq!(token_ids(&text(&outs[0].stderr)), want_ids);
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    use crate::common::hub_server::Drop as Cut;
    use flashpack::hub::{Fetched, Hub, HubConfig, PackAt, PackRef};

    let bytes = std::fs::read(tiny_pack()).unwrap();
    let s = serve_pack(bytes.clone());
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(HubConfig {
        endpoint: s.endpoint.clone(),
        token: None,
        cache_dir: cache.path().to_path_buf(),
        offline: false,
    });
    let r = PackRef::parse("org/tiny").unwrap();
    let open = || match hub.pack_ranges(&r).unwrap() {
        PackAt::Ranges(remote) => remote,
        PackAt::Whole(p) => panic!("a whole pack at {}", p.display()),
    };
    let mut remote = open();
    // The copy opens as a pack at once: header, directories and metadata are in.
    let pack = flashpack::format::Pack::open(remote.path()).unwrap();
    let all = pack.pieces_where(|_| true, |_| true);
    let half = &all[..all.len() / 2];
    assert_eq!(remote.fetch(half).unwrap().pieces, half.len());
    drop(remote);

    // Cut off there; the next process asks only for the rest, and a transfer that breaks
    // once is asked again.
    s.state().drop_download = Cut {
        bytes: 100,
        times: 1,
    };
    let mut remote = open();
    let got = remote.fetch(&all).unwrap();
    assert_eq!(got.pieces, all.len() - half.len());
    // Every piece, the header and the sections are in; the rest is zero padding: the copy is
    // the pack, byte for byte.
    assert_eq!(std::fs::read(remote.path()).unwrap(), bytes);
    assert_eq!(remote.fetch(&all).unwrap(), Fetched::default());
}

/// `serve org/tiny --hostfile H --rank N`: each rank reads its own ranges from the Hub, and the
/// pipeline answers as one process on the local pack.
#[test]
fn serve_on_two_ranks_from_the_hub() {
    let s = serve_pack(std::fs::read(tiny_pack()).unwrap());
    let cache = tempfile::tempdir().unwrap();
    let env = hub_env(&s, cache.path(), false);
    let rank0 = serve_two_ranks("org/tiny", &env);
    let (got, size) = received(&rank0);
    assert!(
        got > 0 && got < size,
        "rank 0 received {got} of {size}: {rank0}"
    );
}
