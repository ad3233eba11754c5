//! The Hub client against a local server (tests/common/hub_server.rs) that implements exactly
//! the endpoints the client uses, as docs/hub.md records them: downloads into the standard
//! cache, reuse and offline use, resume after a dropped connection, errors (bad token, unknown
//! repo or revision, disk full, corrupt bytes), and publishing with LFS and a model card.

use crate::common;
use crate::common::hub_server;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use flashpack::format::{
    codec_id, segment_part_lens, DType, ExpertSegmentDesc, PackWriter, ProjBits, QuantMode,
    TensorDesc,
};
use flashpack::hub::{Hub, HubConfig, HubError, PublishOptions};
use flashpack::progress::Silent;
use hub_server::{sha256_hex, Drop, HubServer};
use serde_json::{json, Value};

const TOKEN: &str = "hf_test_write";
const READ_TOKEN: &str = "hf_test_read";

fn server() -> HubServer {
    let s = HubServer::start();
    s.add_token(TOKEN, "user", true);
    s.add_token(READ_TOKEN, "reader", false);
    s
}

fn config(s: &HubServer, cache: &Path, token: Option<&str>) -> HubConfig {
    HubConfig {
        endpoint: s.endpoint.clone(),
        token: token.map(str::to_string),
        cache_dir: cache.to_path_buf(),
        offline: false,
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    common::noise(seed, len)
}

/// A sharded checkpoint with files conversion needs and files it does not.
fn sharded_repo(s: &HubServer, repo: &str, private: bool) -> (String, Vec<u8>, Vec<u8>) {
    let shard1 = bytes(1, 300_000);
    let shard2 = bytes(2, 123_457);
    let index = json!({"metadata": {"total_size": 423_457},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                       "b.weight": "model-00002-of-00002.safetensors",
                       "c.weight": "model-00001-of-00002.safetensors"}});
    let commit = s.add_repo(
        repo,
        private,
        &[
            (
                "config.json",
                br#"{"model_type": "qwen3_moe"}"#.to_vec(),
                false,
            ),
            ("tokenizer.json", br#"{"model": {}}"#.to_vec(), false),
            (
                "tokenizer_config.json",
                br#"{"chat_template": "x"}"#.to_vec(),
                false,
            ),
            ("generation_config.json", b"{}".to_vec(), false),
            ("README.md", b"# a model".to_vec(), false),
            ("pytorch_model.bin", bytes(3, 5000), true),
            (
                "model.safetensors.index.json",
                index.to_string().into_bytes(),
                false,
            ),
            ("model-00001-of-00002.safetensors", shard1.clone(), true),
            ("model-00002-of-00002.safetensors", shard2.clone(), true),
        ],
    );
    (commit, shard1, shard2)
}

#[test]
fn downloads_only_what_conversion_needs_into_the_standard_cache() {
    let s = server();
    let (commit, shard1, shard2) = sharded_repo(&s, "org/moe", false);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), Some(TOKEN)));
    let snap = hub.download_checkpoint("org/moe", None, &Silent).unwrap();

    let repo_dir = cache.path().join("models--org--moe");
    assert_eq!(snap.dir, repo_dir.join("snapshots").join(&commit));
    assert_eq!(snap.commit, commit);
    assert!(!snap.from_cache_only);
    assert_eq!(
        snap.files,
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(
        std::fs::read(snap.dir.join("model-00001-of-00002.safetensors")).unwrap(),
        shard1
    );
    assert_eq!(
        std::fs::read(snap.dir.join("model-00002-of-00002.safetensors")).unwrap(),
        shard2
    );
    // huggingface_hub layout: relative links into blobs/ named by the LFS sha256, refs/main.
    let link = std::fs::read_link(snap.dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(link, PathBuf::from("../../blobs").join(sha256_hex(&shard2)));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    assert!(!snap.dir.join("README.md").exists());
    assert!(!snap.dir.join("pytorch_model.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("incomplete") || n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let total: u64 = snap
        .files
        .iter()
        .map(|f| std::fs::metadata(snap.dir.join(f)).unwrap().len())
        .sum();
    assert_eq!(snap.downloaded_bytes, total);

    // The token goes to the Hub, never to the CDN; unneeded files are never requested.
    let log = s.take_log();
    assert!(log
        .iter()
        .filter(|r| r.origin == "hub")
        .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"))));
    let cdn: Vec<_> = log.iter().filter(|r| r.origin == "cdn").collect();
    assert_eq!(cdn.len(), 2);
    assert!(cdn.iter().all(|r| r.authorization.is_none()));
    assert!(!log
        .iter()
        .any(|r| r.path.contains("README.md") || r.path.contains("pytorch_model")));
}

#[test]
fn reuses_the_cache_and_works_offline() {
    let s = server();
    let (commit, ..) = sharded_repo(&s, "org/moe", false);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    hub.download_checkpoint("org/moe", Some("main"), &Silent)
        .unwrap();
    s.take_log();

    // A branch costs one request (to learn its commit); the files are not fetched again.
    let again = hub
        .download_checkpoint("org/moe", Some("main"), &Silent)
        .unwrap();
    let log = s.take_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].path.starts_with("/api/models/org/moe/revision/main"));
    assert_eq!(again.downloaded_bytes, 0);
    assert_eq!(again.reused_files, again.files.len());

    // A commit hash already complete in the cache: no request at all.
    let by_hash = hub
        .download_checkpoint("org/moe", Some(&commit), &Silent)
        .unwrap();
    assert!(by_hash.from_cache_only);
    assert!(s.take_log().is_empty());

    // HF_HUB_OFFLINE: the cache alone, through refs/main.
    let mut offline = config(&s, cache.path(), None);
    offline.offline = true;
    let off = Hub::new(offline.clone());
    let snap = off.download_checkpoint("org/moe", None, &Silent).unwrap();
    assert_eq!(snap.commit, commit);
    assert_eq!(snap.files.len(), 7);
    assert!(s.take_log().is_empty());
    let err = off
        .download_checkpoint("org/other", None, &Silent)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::NotInCache { repo, .. } if repo == "org/other"),
        "{err}"
    );
    assert!(err.to_string().contains("HF_HUB_OFFLINE"));

    // A missing shard makes the offline snapshot incomplete, and says which.
    std::fs::remove_file(snap.dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = off
        .download_checkpoint("org/moe", None, &Silent)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::NotInCache { missing, .. } if missing == &["model-00002-of-00002.safetensors"]),
        "{err}"
    );
    // Online again: only that shard is fetched; its blob is still there, so it is only linked.
    let back = hub.download_checkpoint("org/moe", None, &Silent).unwrap();
    assert_eq!(back.downloaded_bytes, 0);
    assert!(back.dir.join("model-00002-of-00002.safetensors").is_file());
    assert!(s.take_log().iter().all(|r| r.origin == "hub"));

    // The Hub unreachable: a complete cached snapshot is used, with a note.
    let mut down = config(&s, cache.path(), None);
    down.endpoint = "http://127.0.0.1:1".into();
    let snap = Hub::new(down)
        .download_checkpoint("org/moe", None, &Silent)
        .unwrap();
    assert!(snap.from_cache_only);
}

/// Notes a download gives, kept for the test to read.
#[derive(Default)]
struct Notes(std::sync::Mutex<Vec<String>>);

impl flashpack::progress::Progress for Notes {
    fn stage(&self, _: &str, _: Option<u64>, _: &str) {}
    fn advance(&self, _: u64) {}
    fn finish_stage(&self) {}
    fn note(&self, msg: &str) {
        self.0.lock().unwrap().push(msg.to_string());
    }
}

const MTP_SHARDS: [&str; 3] = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
];

/// A DeepSeek-V3-style checkpoint: two layers, then the multi-token-prediction layer 2
/// (`num_nextn_predict_layers: 1`), one tensor of it in the second shard beside layer 1 and
/// the rest in the last shard, alone, as DeepSeek-V3 ships its layer 61. `with_last: false`
/// leaves that shard out of the repo, as a mirror that pruned it would.
fn mtp_repo(s: &HubServer, repo: &str, with_last: bool) -> String {
    let config = json!({"model_type": "deepseek_v3", "num_hidden_layers": 2,
                        "num_nextn_predict_layers": 1});
    let index = json!({"weight_map": {
        "model.embed_tokens.weight": MTP_SHARDS[0],
        "model.layers.0.mlp.gate.weight": MTP_SHARDS[0],
        "model.layers.1.mlp.gate.weight": MTP_SHARDS[1],
        "lm_head.weight": MTP_SHARDS[1],
        "model.layers.2.input_layernorm.weight": MTP_SHARDS[1],
        "model.layers.2.eh_proj.weight": MTP_SHARDS[2],
        "model.layers.2.mlp.experts.0.down_proj.weight": MTP_SHARDS[2]}});
    let mut files = vec![
        ("config.json", config.to_string().into_bytes(), false),
        ("tokenizer.json", br#"{"model": {}}"#.to_vec(), false),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
            false,
        ),
        (MTP_SHARDS[0], bytes(11, 40_000), true),
        (MTP_SHARDS[1], bytes(12, 30_000), true),
    ];
    if with_last {
        files.push((MTP_SHARDS[2], bytes(13, 90_000), true));
    }
    s.add_repo(repo, false, &files)
}

#[test]
fn shards_of_multi_token_prediction_layers_alone_are_never_downloaded() {
    let s = server();
    let commit = mtp_repo(&s, "org/mtp", true);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    let notes = Notes::default();
    let snap = hub.download_checkpoint("org/mtp", None, &notes).unwrap();
    let needed = [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        MTP_SHARDS[0],
        MTP_SHARDS[1],
    ];
    assert_eq!(snap.files, needed);
    assert_eq!(snap.skipped_shards, [MTP_SHARDS[2]]);
    assert!(!snap.dir.join(MTP_SHARDS[2]).exists());
    let total: u64 = needed
        .iter()
        .map(|f| std::fs::metadata(snap.dir.join(f)).unwrap().len())
        .sum();
    assert_eq!(snap.downloaded_bytes, total);
    let log = s.take_log();
    assert!(
        !log.iter().any(|r| r.path.contains(MTP_SHARDS[2])),
        "{log:?}"
    );
    assert_eq!(log.iter().filter(|r| r.origin == "cdn").count(), 2);
    let notes = notes.0.lock().unwrap().clone();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("not downloading 1 shard(s)") && n.contains(MTP_SHARDS[2])),
        "{notes:?}"
    );

    // The snapshot is complete without it: by commit hash no request at all, and offline the
    // cache alone serves it.
    let by_hash = hub
        .download_checkpoint("org/mtp", Some(&commit), &Silent)
        .unwrap();
    assert!(by_hash.from_cache_only);
    assert_eq!(
        (&by_hash.files, &by_hash.skipped_shards),
        (&snap.files, &snap.skipped_shards)
    );
    assert!(s.take_log().is_empty());
    let mut offline = config(&s, cache.path(), None);
    offline.offline = true;
    let off = Hub::new(offline);
    let again = off.download_checkpoint("org/mtp", None, &Silent).unwrap();
    assert!(again.from_cache_only);
    assert_eq!(again.commit, commit);
    assert_eq!(again.files, needed);
    assert!(s.take_log().is_empty());

    // A needed shard is still needed: missing offline, it is named.
    std::fs::remove_file(snap.dir.join(MTP_SHARDS[1])).unwrap();
    let err = off
        .download_checkpoint("org/mtp", None, &Silent)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::NotInCache { missing, .. } if missing == &[MTP_SHARDS[1]]),
        "{err}"
    );

    // A repo without the MTP shard at all (a pruned mirror) downloads the same.
    mtp_repo(&s, "org/mtp-pruned", false);
    let pruned = hub
        .download_checkpoint("org/mtp-pruned", None, &Silent)
        .unwrap();
    assert_eq!(pruned.files, needed);
}

#[test]
fn resumes_a_dropped_download_with_range() {
    let s = server();
    let (_, shard1, _) = sharded_repo(&s, "org/moe", false);
    s.state().drop_download = Drop {
        bytes: 100_000,
        times: 1,
    };
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    let snap = hub.download_checkpoint("org/moe", None, &Silent).unwrap();
    assert_eq!(
        std::fs::read(snap.dir.join("model-00001-of-00002.safetensors")).unwrap(),
        shard1
    );
    let ranges: Vec<_> = s
        .take_log()
        .into_iter()
        .filter(|r| r.origin == "cdn")
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_string()), None]);
}

#[test]
fn an_interrupted_download_keeps_its_partial_file_and_resumes_next_time() {
    let s = server();
    let (commit, shard1, _) = sharded_repo(&s, "org/moe", false);
    s.state().drop_download = Drop {
        bytes: 50_000,
        times: 100,
    };
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    let err = hub
        .download_checkpoint("org/moe", None, &Silent)
        .unwrap_err();
    let HubError::Interrupted {
        file,
        received,
        expected,
        attempts,
        partial,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(file, "model-00001-of-00002.safetensors");
    assert_eq!((*received, *expected, *attempts), (200_000, 300_000, 4));
    assert_eq!(
        partial,
        &cache
            .path()
            .join("models--org--moe/blobs")
            .join(format!("{}.incomplete", sha256_hex(&shard1)))
    );
    assert_eq!(std::fs::metadata(partial).unwrap().len(), 200_000);
    assert!(err
        .to_string()
        .contains("run the same command again to resume"));
    // Nothing half-written in the snapshot folder.
    let snap = cache
        .path()
        .join("models--org--moe/snapshots")
        .join(&commit);
    assert!(!snap.join("model-00001-of-00002.safetensors").exists());
    assert!(snap.join("config.json").is_file());

    s.state().drop_download = Drop::default();
    s.take_log();
    let done = hub.download_checkpoint("org/moe", None, &Silent).unwrap();
    assert_eq!(
        std::fs::read(done.dir.join("model-00001-of-00002.safetensors")).unwrap(),
        shard1
    );
    let first_cdn = s
        .take_log()
        .into_iter()
        .find(|r| r.origin == "cdn")
        .unwrap();
    assert_eq!(first_cdn.range.as_deref(), Some("bytes=200000-"));
    assert!(!partial.exists());
}

#[test]
fn corrupt_bytes_are_refused_and_removed() {
    let s = server();
    let (commit, shard1, _) = sharded_repo(&s, "org/moe", false);
    // The CDN serves other bytes of the same length under the announced sha256.
    s.state()
        .lfs
        .insert(sha256_hex(&shard1), bytes(99, shard1.len()));
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    let err = hub
        .download_checkpoint("org/moe", None, &Silent)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::Integrity { file, expected, .. } if file == "model-00001-of-00002.safetensors" && *expected == sha256_hex(&shard1)),
        "{err}"
    );
    let blobs = cache.path().join("models--org--moe/blobs");
    assert!(!blobs
        .join(format!("{}.incomplete", sha256_hex(&shard1)))
        .exists());
    assert!(!blobs.join(sha256_hex(&shard1)).exists());
    assert!(!cache
        .path()
        .join("models--org--moe/snapshots")
        .join(commit)
        .join("model-00001-of-00002.safetensors")
        .exists());
}

#[test]
fn a_full_disk_is_named_and_leaves_no_snapshot_entry() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: /dev/full is missing");
        return;
    }
    let s = server();
    let (commit, shard1, _) = sharded_repo(&s, "org/moe", false);
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("models--org--moe/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // Every write to the partial file fails with ENOSPC.
    let partial = blobs.join(format!("{}.incomplete", sha256_hex(&shard1)));
    std::os::unix::fs::symlink("/dev/full", &partial).unwrap();
    let hub = Hub::new(config(&s, cache.path(), None));
    let err = hub
        .download_checkpoint("org/moe", None, &Silent)
        .unwrap_err();
    assert!(
        matches!(&err, HubError::DiskFull { path, needed, .. } if path == &partial && *needed == shard1.len() as u64),
        "{err}"
    );
    assert!(err.to_string().contains("no space left"));
    let snap = cache.path().join("models--org--moe/snapshots").join(commit);
    assert!(!snap.join("model-00001-of-00002.safetensors").exists());
    assert!(!blobs.join(sha256_hex(&shard1)).exists());
}

#[test]
fn errors_name_the_repo_and_say_what_to_do() {
    let s = server();
    sharded_repo(&s, "org/moe", false);
    sharded_repo(&s, "org/private", true);
    s.add_repo(
        "org/pt-only",
        false,
        &[
            ("config.json", b"{}".to_vec(), false),
            ("pytorch_model.bin", bytes(5, 100), true),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let dl = |token: Option<&str>, repo: &str, rev: Option<&str>| {
        Hub::new(config(&s, cache.path(), token))
            .download_checkpoint(repo, rev, &Silent)
            .unwrap_err()
    };

    let e = dl(Some("hf_wrong"), "org/moe", None);
    assert!(
        matches!(&e, HubError::Auth { status: 401, repo, .. } if repo == "org/moe"),
        "{e}"
    );
    assert!(e.to_string().contains("token was refused"), "{e}");
    let e = dl(None, "org/private", None);
    assert!(matches!(&e, HubError::Auth { status: 401, .. }), "{e}");
    assert!(
        e.to_string()
            .contains("set HF_TOKEN to a token with read access"),
        "{e}"
    );
    assert!(Hub::new(config(&s, cache.path(), Some(READ_TOKEN)))
        .download_checkpoint("org/private", None, &Silent)
        .is_ok());
    let e = dl(Some(TOKEN), "org/nope", None);
    assert!(
        matches!(&e, HubError::RepoNotFound { repo, .. } if repo == "org/nope"),
        "{e}"
    );
    let e = dl(Some(TOKEN), "org/moe", Some("v9"));
    assert!(
        matches!(&e, HubError::RevisionNotFound { revision, .. } if revision == "v9"),
        "{e}"
    );
    let e = dl(None, "org/pt-only", None);
    assert!(matches!(&e, HubError::NotACheckpoint { .. }), "{e}");
    assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
    let e = dl(None, "not a repo", None);
    assert!(matches!(e, HubError::BadRepoId { .. }));
    let e = dl(None, "org/moe", Some("../x"));
    assert!(matches!(e, HubError::BadRevision { .. }));
    let mut down = config(&s, cache.path(), None);
    down.endpoint = "http://127.0.0.1:1".into();
    let e = Hub::new(down)
        .download_checkpoint("org/never-seen", None, &Silent)
        .unwrap_err();
    assert!(matches!(&e, HubError::Transport { .. }), "{e}");
    assert!(e.to_string().contains("HF_HUB_OFFLINE"));
}

#[test]
fn downloads_the_bundled_checkpoint_byte_for_byte() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&fixture).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let lfs = name.ends_with(".safetensors");
        files.push((
            name.clone(),
            std::fs::read(fixture.join(&name)).unwrap(),
            lfs,
        ));
    }
    let refs: Vec<(&str, Vec<u8>, bool)> = files
        .iter()
        .map(|(n, b, l)| (n.as_str(), b.clone(), *l))
        .collect();
    let s = server();
    s.add_repo("tiny/qwen3moe-tiny", false, &refs);
    let cache = tempfile::tempdir().unwrap();
    let snap = Hub::new(config(&s, cache.path(), None))
        .download_checkpoint("tiny/qwen3moe-tiny", None, &Silent)
        .unwrap();
    assert_eq!(
        snap.files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count(),
        4
    );
    for f in &snap.files {
        assert_eq!(
            std::fs::read(snap.dir.join(f)).unwrap(),
            std::fs::read(fixture.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!snap.dir.join("train_stats.json").exists());

    // `flashpack convert org/model` downloads through the same client and records the repo and
    // the commit it resolved to in the pack's provenance.
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let pack = out_dir.path().join("hub.flashpack");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            "tiny/qwen3moe-tiny",
            "-o",
            pack.to_str().unwrap(),
            "--quiet",
        ])
        .env("HF_ENDPOINT", &s.endpoint)
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = flashpack::format::Pack::open(&pack).unwrap();
    let prov = &p.metadata()["provenance"];
    assert_eq!(prov["source"], "tiny/qwen3moe-tiny");
    assert_eq!(prov["revision"].as_str(), Some(snap.commit.as_str()));
    assert!(p.metadata()["tokenizer"].is_object());
}

#[test]
fn config_follows_the_huggingface_hub_environment() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
    let h = home.path().to_str().unwrap().to_string();
    let vars = |pairs: Vec<(&'static str, String)>| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    let c = HubConfig::from_vars(vars(vec![
        ("HF_HOME", h.clone()),
        ("HF_ENDPOINT", "http://mirror.local/".into()),
    ]));
    assert_eq!(c.endpoint, "http://mirror.local");
    assert_eq!(c.cache_dir, home.path().join("hub"));
    assert_eq!(c.token.as_deref(), Some("hf_from_file"));
    assert!(!c.offline);
    assert!(!format!("{c:?}").contains("hf_from_file"));
    let c = HubConfig::from_vars(vars(vec![
        ("HF_HOME", h.clone()),
        ("HF_HUB_CACHE", "/elsewhere".into()),
        ("HF_TOKEN", "hf_env".into()),
        ("HF_HUB_OFFLINE", "1".into()),
    ]));
    assert_eq!(c.cache_dir, PathBuf::from("/elsewhere"));
    assert_eq!(c.token.as_deref(), Some("hf_env"));
    assert!(c.offline);
    let c = HubConfig::from_vars(vars(vec![("HOME", "/home/u".into())]));
    assert_eq!(c.endpoint, "https://huggingface.co");
    assert_eq!(c.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    let c = HubConfig::from_vars(vars(vec![
        ("XDG_CACHE_HOME", "/xdg".into()),
        ("HF_HUB_OFFLINE", "true".into()),
    ]));
    assert_eq!(c.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    assert!(c.offline);
}

/// A small pack whose metadata the test chooses (provenance, quality).
fn pack_with(dir: &Path, extra: Value) -> PathBuf {
    let path = dir.join("tiny.flashpack");
    let (h, i) = (common::HIDDEN, common::INTER);
    let mut w = PackWriter::create(&path, 4096, h, i).unwrap();
    w.add_tensor(
        TensorDesc {
            name: "model.norm.weight".into(),
            dtype: DType::F32,
            shape: vec![h as u64],
            bits: 0,
            group_size: 0,
            mode: QuantMode::Affine,
            codec: codec_id::RAW,
        },
        &bytes(7, h as usize * 4),
    )
    .unwrap();
    let (wl, al) = segment_part_lens(
        h,
        i,
        ProjBits::uniform(4),
        64,
        DType::BF16,
        QuantMode::Affine,
    )
    .unwrap();
    w.add_expert_segment(
        ExpertSegmentDesc {
            layer: 0,
            expert: 0,
            segment: 0,
            segment_count: 1,
            row_start: 0,
            row_count: i,
            bits: ProjBits::uniform(4),
            group_size: 64,
            scale_dtype: DType::BF16,
            mode: QuantMode::Affine,
            weight_codec: codec_id::RAW,
            aux_codec: codec_id::RAW,
            bias_dtype: None,
        },
        &bytes(8, wl as usize),
        &bytes(9, al as usize),
    )
    .unwrap();
    let mut meta = common::metadata();
    meta["model"] = common::model(1, 1);
    for (k, v) in extra.as_object().unwrap() {
        meta[k] = v.clone();
    }
    w.finish(&meta).unwrap();
    path
}

fn readme_of(lines: &[Value]) -> String {
    let file = lines
        .iter()
        .find(|l| l["key"] == "file" && l["value"]["path"] == "README.md")
        .unwrap();
    let b = base64::engine::general_purpose::STANDARD
        .decode(file["value"]["content"].as_str().unwrap())
        .unwrap();
    String::from_utf8(b).unwrap()
}

#[test]
fn publish_creates_the_repo_uploads_through_lfs_and_commits_a_card() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let pack = common::write_small_pack(dir.path(), 4096);
    let pack_bytes = std::fs::read(&pack).unwrap();
    let oid = sha256_hex(&pack_bytes);
    let hub = Hub::new(config(&s, dir.path(), Some(TOKEN)));
    let opts = PublishOptions {
        pack: pack.clone(),
        repo: "user/small".into(),
        private: true,
        revision: "main".into(),
        message: None,
    };
    let out = hub.publish(&opts, &Silent).unwrap();
    assert!(out.created_repo);
    assert_eq!(out.uploaded_bytes, pack_bytes.len() as u64);
    assert_eq!(out.path_in_repo, "small.flashpack");
    assert_eq!(
        out.commit_url,
        format!("{}/user/small/commit/{}", s.endpoint, out.commit_oid)
    );

    {
        let st = s.state();
        assert!(st.repos["user/small"].private);
        assert_eq!(st.lfs[&oid], pack_bytes);
        let c = st.commits.last().unwrap();
        assert_eq!(
            (c.repo.as_str(), c.revision.as_str()),
            ("user/small", "main")
        );
        assert_eq!(c.lines[0]["key"], "header");
        assert!(c.lines[0]["value"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("Upload small.flashpack with flashpack"));
        assert_eq!(
            c.lines[1],
            json!({"key": "lfsFile", "value": {"path": "small.flashpack", "algo": "sha256", "oid": oid, "size": pack_bytes.len()}})
        );
        let card = readme_of(&c.lines);
        assert_eq!(card, out.card);
        let files = st.files_at("user/small", "main").unwrap();
        assert_eq!(files["small.flashpack"].bytes, pack_bytes);
        assert!(files["small.flashpack"].lfs);
        assert_eq!(files["README.md"].bytes, card.as_bytes());
    }
    assert!(out.card.starts_with("---\nlibrary_name: flashpack\ntags:\n- \"flashpack\"\n- \"moe\"\n- \"mlx\"\n- \"quantized\"\n- \"qwen3_moe\"\npipeline_tag: text-generation\n---\n"), "{}", out.card);
    assert!(
        !out.card.contains("base_model"),
        "source \"test\" is no Hub repo"
    );
    assert!(out.card.contains("| experts | "));
    assert!(out.card.contains("flashpack run small.flashpack --prompt"));
    assert!(out.card.contains(&format!(
        "{}/user/small/resolve/main/small.flashpack",
        s.endpoint
    )));
    assert!(out.card.contains("No quality measurements"));

    // The CDN saw the upload without the token; the upload carried the action's header.
    let log = s.take_log();
    let put = log.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(
        (put.origin, put.authorization.as_deref(), put.status),
        ("cdn", None, 200)
    );
    assert!(log
        .iter()
        .any(|r| r.path.ends_with("/info/lfs/objects/verify") && r.status == 200));

    // Again: the repo exists (409) and the Hub has the bytes: nothing is uploaded.
    let again = hub.publish(&opts, &Silent).unwrap();
    assert!(!again.created_repo);
    assert_eq!(again.uploaded_bytes, 0);
    assert_ne!(again.commit_oid, out.commit_oid);
    assert!(!s.take_log().iter().any(|r| r.method == "PUT"));
}

#[test]
fn publish_multipart_retries_a_dropped_part_and_commits_to_a_new_branch() {
    let s = server();
    s.add_repo(
        "user/multi",
        false,
        &[("README.md", b"old".to_vec(), false)],
    );
    {
        let mut st = s.state();
        st.multipart_chunk = Some(8192);
        st.drop_upload = Drop {
            bytes: 1000,
            times: 1,
        };
    }
    let dir = tempfile::tempdir().unwrap();
    let pack = common::write_small_pack(dir.path(), 4096);
    let pack_bytes = std::fs::read(&pack).unwrap();
    let parts = pack_bytes.len().div_ceil(8192);
    assert!(
        parts >= 3,
        "the pack should span several parts: {}",
        pack_bytes.len()
    );
    let hub = Hub::new(config(&s, dir.path(), Some(TOKEN)));
    let opts = PublishOptions {
        pack,
        repo: "user/multi".into(),
        private: false,
        revision: "dev".into(),
        message: Some("pack it".into()),
    };
    let out = hub.publish(&opts, &Silent).unwrap();
    assert!(!out.created_repo);
    let st = s.state();
    assert_eq!(st.lfs[&sha256_hex(&pack_bytes)], pack_bytes);
    let puts: Vec<_> = st.requests.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), parts + 1, "one part was sent twice");
    assert_eq!(puts[0].path, puts[1].path);
    assert_eq!(puts[0].status, 0);
    assert!(st
        .requests
        .iter()
        .any(|r| r.path.starts_with("/lfs-complete/") && r.status == 200));
    assert_eq!(st.commits.last().unwrap().revision, "dev");
    assert_eq!(
        st.commits.last().unwrap().lines[0]["value"]["summary"],
        "pack it"
    );
    assert_eq!(
        st.files_at("user/multi", "dev").unwrap()["small.flashpack"].bytes,
        pack_bytes
    );
    assert_eq!(
        st.files_at("user/multi", "main").unwrap()["README.md"].bytes,
        b"old"
    );
}

#[test]
fn publish_errors_say_what_to_do_and_commit_nothing() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let pack = common::write_small_pack(dir.path(), 4096);
    let opts = |repo: &str| PublishOptions {
        pack: pack.clone(),
        repo: repo.into(),
        private: false,
        revision: "main".into(),
        message: None,
    };

    let e = Hub::new(config(&s, dir.path(), None))
        .publish(&opts("user/x"), &Silent)
        .unwrap_err();
    assert!(matches!(e, HubError::NoToken { .. }));
    assert!(e.to_string().contains("HF_TOKEN"));
    assert!(s.take_log().is_empty(), "no request without a token");

    let e = Hub::new(config(&s, dir.path(), Some(READ_TOKEN)))
        .publish(&opts("user/x"), &Silent)
        .unwrap_err();
    assert!(matches!(&e, HubError::Auth { status: 403, .. }), "{e}");
    assert!(e.to_string().contains("write access"), "{e}");
    let e = Hub::new(config(&s, dir.path(), Some("hf_wrong")))
        .publish(&opts("user/x"), &Silent)
        .unwrap_err();
    assert!(matches!(&e, HubError::Auth { status: 401, .. }), "{e}");

    let junk = dir.path().join("junk.flashpack");
    std::fs::write(&junk, b"not a pack").unwrap();
    let mut o = opts("user/x");
    o.pack = junk;
    let e = Hub::new(config(&s, dir.path(), Some(TOKEN)))
        .publish(&o, &Silent)
        .unwrap_err();
    assert!(matches!(e, HubError::Pack { .. }), "{e}");

    // The upload keeps failing: no commit is made.
    s.state().drop_upload = Drop {
        bytes: 10,
        times: 100,
    };
    let e = Hub::new(config(&s, dir.path(), Some(TOKEN)))
        .publish(&opts("user/y"), &Silent)
        .unwrap_err();
    assert!(matches!(e, HubError::Transport { .. }), "{e}");
    assert!(s.state().commits.is_empty());
}

#[test]
fn the_card_names_the_base_model_and_quality_when_known() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let pack = pack_with(
        dir.path(),
        json!({
            "provenance": {"source": "/c/hub/models--Qwen--Qwen3-30B-A3B/snapshots/0123456789abcdef0123456789abcdef01234567",
                           "revision": "0123456789abcdef0123456789abcdef01234567", "tool": "flashpack", "tool_version": "0.1.0",
                           "files": [{"name": "model.safetensors", "size": 10, "blake3": "ab"}]},
            "quality": {"perplexity_wikitext2": 7.31, "source_perplexity_wikitext2": 7.02, "top1_agreement": 0.94},
        }),
    );
    let out = Hub::new(config(&s, dir.path(), Some(TOKEN)))
        .publish(
            &PublishOptions {
                pack,
                repo: "user/qwen-fp".into(),
                private: false,
                revision: "main".into(),
                message: None,
            },
            &Silent,
        )
        .unwrap();
    let card = &out.card;
    assert!(
        card.contains("base_model: \"Qwen/Qwen3-30B-A3B\"\n"),
        "{card}"
    );
    assert!(card.contains("| perplexity_wikitext2 | 7.31 |"), "{card}");
    assert!(card.contains("| top1_agreement | 0.94 |"), "{card}");
    assert!(card.contains("| model.safetensors | 10 | `ab` |"), "{card}");
    assert!(card.contains(&format!("converted from [Qwen/Qwen3-30B-A3B]({}/Qwen/Qwen3-30B-A3B) at revision `0123456789abcdef0123456789abcdef01234567`", s.endpoint)), "{card}");
    assert!(!card.contains("No quality measurements"));
}

#[test]
fn cli_publish_uploads_and_reports_the_commit() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let pack = common::write_small_pack(dir.path(), 4096);
    let home = tempfile::tempdir().unwrap();
    let run = |token: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flashpack"));
        c.args([
            "publish",
            pack.to_str().unwrap(),
            "--repo",
            "user/cli",
            "--endpoint",
            &s.endpoint,
        ])
        .env("HF_HOME", home.path())
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT");
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = run(None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HF_TOKEN"));
    let out = run(Some(TOKEN));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oid = s.state().commits.last().unwrap().oid.clone();
    assert!(
        stdout.contains(&format!("{}/user/cli/commit/{oid}", s.endpoint)),
        "{stdout}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(["publish", "x.flashpack"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--repo is required");
}

const KIMI_SHARDS: [&str; 3] = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
];

/// Kimi K2.5's tiny checkpoint (tests/common/fixtures.rs) laid out as its Hub repo would be: the
/// text model in the first shard, the vision tower and projector alone in the second, a
/// multi-token-prediction layer (counted in `text_config`) alone in the third. Returns the
/// single-file source it was cut from, to convert locally for comparison.
fn kimi_repo(s: &HubServer, repo: &str) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let spec = common::fixtures::FixtureSpec::tiny(flashpack::arch::Arch::KimiK25);
    let src = tempfile::tempdir().unwrap();
    spec.write(src.path()).unwrap();
    let single = std::fs::read(src.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&single).unwrap();
    let mut text = Vec::new();
    let mut vision = Vec::new();
    for (name, view) in st.tensors() {
        if name.starts_with("vision_tower.") || name.starts_with("mm_projector.") {
            vision.push((name, view));
        } else {
            text.push((name, view));
        }
    }
    assert!(!vision.is_empty());
    let layers = spec.num_layers;
    let h = spec.hidden_size;
    let mtp_bytes = vec![0u8; h * 2 * h * 2];
    let norm_bytes = vec![0u8; h * 2];
    let mtp = vec![
        (
            format!("language_model.model.layers.{layers}.eh_proj.weight"),
            TensorView::new(safetensors::Dtype::BF16, vec![h, 2 * h], &mtp_bytes).unwrap(),
        ),
        (
            format!("language_model.model.layers.{layers}.enorm.weight"),
            TensorView::new(safetensors::Dtype::BF16, vec![h], &norm_bytes).unwrap(),
        ),
    ];
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    for (shard, tensors) in KIMI_SHARDS.iter().zip([text, vision, mtp]) {
        for (name, _) in &tensors {
            weight_map.insert(name.clone(), json!(shard));
        }
        files.push((*shard, safetensors::serialize(tensors, None).unwrap(), true));
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.path().join("config.json")).unwrap())
            .unwrap();
    config["text_config"]["num_nextn_predict_layers"] = json!(1);
    let index = json!({"weight_map": weight_map}).to_string().into_bytes();
    files.push(("model.safetensors.index.json", index, false));
    files.push(("config.json", config.to_string().into_bytes(), false));
    s.add_repo(repo, false, &files);
    src
}

#[test]
fn shards_of_a_vision_tower_or_mtp_layer_alone_are_never_downloaded() {
    let s = server();
    let src = kimi_repo(&s, "org/kimi");
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let pack = out_dir.path().join("hub.flashpack");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            "org/kimi",
            "-o",
            pack.to_str().unwrap(),
            "--json",
        ])
        .env("HF_ENDPOINT", &s.endpoint)
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let log = s.take_log();
    for skipped in &KIMI_SHARDS[1..] {
        assert!(!log.iter().any(|r| r.path.contains(skipped)), "{log:?}");
    }
    assert!(
        log.iter().any(|r| r.path.contains(KIMI_SHARDS[0])),
        "{log:?}"
    );
    // The loader names them: never opened, their tensors counted as dropped.
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dropped = &report["dropped_mtp"];
    assert_eq!(
        dropped["skipped_shards"],
        json!(KIMI_SHARDS[1..]),
        "{report}"
    );
    assert_eq!(dropped["tensors"], 2, "{report}");
    assert_eq!(dropped["other_tensors"], 2, "{report}");

    // The pack holds what the whole single-file checkpoint converts to.
    let local = out_dir.path().join("local.flashpack");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            src.path().to_str().unwrap(),
            "-o",
            local.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        flashpack::format::Pack::open(&pack).unwrap(),
        flashpack::format::Pack::open(&local).unwrap(),
    );
    assert_eq!(a.tensors(), b.tensors());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert!(a.tensor_stored(x) == b.tensor_stored(y), "{}", x.name);
    }
    assert_eq!(a.experts(), b.experts());
    for (x, y) in a.experts().iter().zip(b.experts()) {
        assert!(a.segment_stored(x) == b.segment_stored(y), "{:?}", x.key());
    }
}
