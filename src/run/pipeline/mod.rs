//! One model across several processes: pipeline parallelism on MLX's distributed ring backend
//! (issue 32, docs/decisions/0034-pipeline-ranks.md).
//!
//! In: a hostfile in mlx's JSON form, this process's rank, an open pack and this rank's memory
//! budget. Out: a [`Pipeline`]: the ring formed, the packs checked equal on every rank, this
//! rank's contiguous range of layers (split by the ranks' budgets), a watchdog that ends the
//! process naming a rank that dies, and the stage's two ends: rank 0's [`link::Downstream`]
//! (the model's forward pass sends its last layer's output on and gets the logits back) and
//! the other ranks' loop ([`link::serve_stage`]).
//! Invariant: every rank runs the same command line; rank 0 alone tokenizes, samples and
//! prints; every message between ranks goes through MLX's `send`/`recv` to a ring neighbour.
//!
//! Files: this one (hostfile, the split, set-up), `link.rs` (the messages of a forward pass),
//! `watch.rs` (the heartbeat side channel and the deadline on set-up).

mod link;
mod watch;

pub use link::{serve_stage, Link, LinkReport, StageReport};
pub use watch::Watch;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::arch::ModelConfig;
use crate::format::Pack;
use crate::mlx::{self, Array};
use crate::run::experts::ExpertCache;

/// Why a pipeline could not form or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("hostfile {}: {source}", .path.display())]
    HostfileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "hostfile {}: {what}; write it as mlx.launch does, [[\"ip:port\"], [\"ip:port\"]] (one list \
         of addresses per rank), or as mlx.distributed_config does, [{{\"ssh\": \"host\", \"ips\": [\"ip\"]}}, ...]",
        .path.display()
    )]
    Hostfile { path: PathBuf, what: String },
    #[error("rank {rank} is out of range: the hostfile names {size} ranks (0 to {})", .size - 1)]
    RankOutOfRange { rank: usize, size: usize },
    #[error("MLX was built without the ring backend: it cannot run a pipeline")]
    NoRing,
    #[error("forming the ring of {size} ranks as rank {rank}: {source}")]
    Init {
        rank: usize,
        size: usize,
        #[source]
        source: mlx::Error,
    },
    #[error(
        "rank {rank} has another pack (blake3 {theirs}) than rank 0 ({ours}): every rank must run \
         the same .flashpack file"
    )]
    PackMismatch {
        rank: usize,
        ours: String,
        theirs: String,
    },
    #[error("the model has {layers} layers, fewer than the {ranks} ranks: use fewer ranks")]
    TooManyRanks { layers: usize, ranks: usize },
    #[error("a pipeline message: {0}")]
    Mlx(#[from] mlx::Error),
    #[error("a pipeline message: {0}")]
    Protocol(String),
    #[error(transparent)]
    Compute(#[from] crate::model::ComputeError),
    #[error("the side channel: {0}")]
    Io(#[from] std::io::Error),
}

/// A hostfile: per rank, the ring addresses it listens on (mlx's `MLX_HOSTFILE` form).
#[derive(Debug, Clone, PartialEq)]
pub struct Hostfile {
    pub ranks: Vec<Vec<SocketAddr>>,
}

/// mlx.launch's default first port (`--starting-port`), for a hostfile that lists hosts only.
pub const STARTING_PORT: u16 = 32323;

impl Hostfile {
    pub fn read(path: &Path) -> Result<Hostfile, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::HostfileRead {
            path: path.to_path_buf(),
            source,
        })?;
        Hostfile::parse(&text).map_err(|what| PipelineError::Hostfile {
            path: path.to_path_buf(),
            what,
        })
    }

    /// The ring backend's own form (`[["ip:port", ...], ...]`, what `mlx.launch` writes into
    /// `MLX_HOSTFILE`), or mlx's host list (`[{"ssh": ..., "ips": [...]}, ...]`, optionally as
    /// `{"hosts": [...]}`, what `mlx.distributed_config` writes), whose ports are given as
    /// `mlx.launch` gives them: from [`STARTING_PORT`], one more per rank and address.
    pub fn parse(text: &str) -> Result<Hostfile, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let hosts = match &v {
            serde_json::Value::Object(o) => o
                .get("hosts")
                .ok_or("an object without \"hosts\"")?
                .as_array()
                .ok_or("\"hosts\" is not a list")?,
            serde_json::Value::Array(a) => a,
            _ => return Err("neither a list nor an object".into()),
        };
        if hosts.len() < 2 {
            return Err(format!(
                "{} rank(s); a pipeline needs at least 2",
                hosts.len()
            ));
        }
        let mut port = STARTING_PORT as u32;
        let mut ranks = Vec::new();
        for (rank, h) in hosts.iter().enumerate() {
            let addrs = match h {
                serde_json::Value::Array(list) => list
                    .iter()
                    .map(|a| {
                        let s = a
                            .as_str()
                            .ok_or(format!("rank {rank}: an address that is not a string"))?;
                        s.parse::<SocketAddr>()
                            .map_err(|_| format!("rank {rank}: {s:?} is not ip:port"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                serde_json::Value::Object(o) => {
                    let ips = o
                        .get("ips")
                        .and_then(|i| i.as_array())
                        .filter(|i| !i.is_empty())
                        .ok_or(format!(
                            "rank {rank}: no \"ips\" (the ring backend needs IP addresses)"
                        ))?;
                    ips.iter()
                        .map(|ip| {
                            let s = ip
                                .as_str()
                                .ok_or(format!("rank {rank}: an ip that is not a string"))?;
                            let ip: std::net::IpAddr = s
                                .parse()
                                .map_err(|_| format!("rank {rank}: {s:?} is not an IP address"))?;
                            let p = u16::try_from(port).map_err(|_| "too many ports")?;
                            port += 1;
                            Ok(SocketAddr::new(ip, p))
                        })
                        .collect::<Result<Vec<_>, String>>()?
                }
                _ => return Err(format!("rank {rank}: neither a list nor an object")),
            };
            if addrs.is_empty() {
                return Err(format!("rank {rank} has no address"));
            }
            ranks.push(addrs);
        }
        let n = ranks[0].len();
        if let Some(r) = ranks.iter().position(|a| a.len() != n) {
            return Err(format!(
                "rank {r} has {} addresses and rank 0 {n}: the ring backend needs as many on each",
                ranks[r].len()
            ));
        }
        Ok(Hostfile { ranks })
    }

    /// The ring backend's form, for `MLX_HOSTFILE`.
    pub fn ring_json(&self) -> String {
        let ranks: Vec<Vec<String>> = self
            .ranks
            .iter()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .collect();
        serde_json::to_string(&ranks).unwrap_or_default()
    }

    /// The side channel's address (the heartbeat, `watch.rs`): rank 0's first IP, on the port
    /// after the highest port of the hostfile (`FLASHPACK_CONTROL_PORT` sets another).
    pub fn control_addr(&self) -> SocketAddr {
        let port = crate::env::number::<u16>("FLASHPACK_CONTROL_PORT").unwrap_or_else(|| {
            let max = self.ranks.iter().flatten().map(|a| a.port()).max();
            max.unwrap_or(STARTING_PORT).saturating_add(1)
        });
        SocketAddr::new(self.ranks[0][0].ip(), port)
    }
}

/// Splits layers of `costs` bytes each into `weights.len()` contiguous ranges, each rank's
/// bytes in proportion to its weight (its memory budget): rank `r`'s range ends where the
/// running total comes nearest to its share of the whole. Every rank gets at least one layer.
pub fn split_layers(costs: &[u64], weights: &[u64]) -> Result<Vec<Range<usize>>, PipelineError> {
    let (n, ranks) = (costs.len(), weights.len());
    if ranks == 0 || n < ranks {
        return Err(PipelineError::TooManyRanks { layers: n, ranks });
    }
    let total: f64 = costs.iter().map(|&c| c as f64).sum();
    let wsum: f64 = weights.iter().map(|&w| w.max(1) as f64).sum();
    let mut prefix = vec![0f64; n + 1];
    for (i, &c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c as f64;
    }
    let mut out = Vec::with_capacity(ranks);
    let (mut start, mut wacc) = (0usize, 0f64);
    for (r, &w) in weights.iter().enumerate() {
        wacc += w.max(1) as f64;
        let end = if r + 1 == ranks {
            n
        } else {
            let target = total * wacc / wsum;
            // Leave a layer for each rank after this one, take at least one.
            let (lo, hi) = (start + 1, n - (ranks - r - 1));
            (lo..=hi)
                .min_by(|&a, &b| {
                    (prefix[a] - target)
                        .abs()
                        .total_cmp(&(prefix[b] - target).abs())
                })
                .unwrap_or(lo)
        };
        out.push(start..end);
        start = end;
    }
    Ok(out)
}

/// The bytes each layer holds in `pack`: its dense tensors and its experts as resident slots.
pub fn layer_costs(pack: &Pack, cfg: &ModelConfig) -> Vec<u64> {
    let n = cfg.num_hidden_layers;
    let mut costs = vec![0u64; n];
    for t in pack.tensors() {
        if let Some(l) = layer_of(&t.name).filter(|&l| l < n) {
            costs[l] += t.decoded_len;
        }
    }
    for (l, c) in costs.iter_mut().enumerate() {
        *c += ExpertCache::resident_bytes_of(pack, Some(l as u32..l as u32 + 1));
    }
    costs
}

/// The layer a tensor name belongs to (`model.layers.<l>.`).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Whether the stage of `layers` (of `n`) needs tensor `name`: its layers' tensors, the
/// embedding where it starts the model (or ends it with tied embeddings), everything else
/// (final norm, LM head) where it ends the model.
pub fn stage_tensor(name: &str, layers: &Range<usize>, n: usize, tied: bool) -> bool {
    match layer_of(name) {
        Some(l) => layers.contains(&l),
        None if name.starts_with("model.embed_tokens.") => {
            layers.start == 0 || (layers.end == n && tied)
        }
        None => layers.end == n,
    }
}

/// The byte ranges of `pack` the stage of `layers` reads, with their checksums: the tensors
/// [`stage_tensor`] keeps and its layers' expert segments (what a rank downloads from the Hub,
/// `hub::RemotePack::fetch`). The header, directories and metadata are read at open, apart.
pub fn stage_pieces(
    pack: &Pack,
    layers: &Range<usize>,
    cfg: &ModelConfig,
) -> Vec<crate::format::Piece> {
    let n = cfg.num_hidden_layers;
    pack.pieces_where(
        |name| stage_tensor(name, layers, n, cfg.tie_word_embeddings),
        |l| layers.contains(&(l as usize)),
    )
}

/// The pack's identity every rank compares: the blake3 of its header, which covers the section
/// table and so the checksums of every directory, tensor and segment.
pub fn pack_hash(pack: &Pack) -> [u8; 32] {
    *blake3::hash(&pack.header().encode()).as_bytes()
}

/// What each rank tells the others at start (one `all_gather`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    hash: [u8; 32],
    /// The rank's memory, in MiB: its `--mem-budget`, else its RAM.
    budget_mib: u32,
    /// The sequence length rank 0 plans for (the KV cache's size on every rank).
    positions: u32,
}

const HELLO_WORDS: usize = 10;

impl Hello {
    fn words(&self) -> [i32; HELLO_WORDS] {
        let mut w = [0i32; HELLO_WORDS];
        for (i, c) in self.hash.chunks(4).enumerate() {
            w[i] = i32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
        w[8] = self.budget_mib as i32;
        w[9] = self.positions as i32;
        w
    }

    fn of(w: &[i32]) -> Hello {
        let mut hash = [0u8; 32];
        for (i, x) in w[..8].iter().enumerate() {
            hash[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
        Hello {
            hash,
            budget_mib: w[8] as u32,
            positions: w[9] as u32,
        }
    }
}

/// A formed pipeline, as this rank sees it.
pub struct Pipeline {
    pub rank: usize,
    pub size: usize,
    /// This rank's layers.
    pub layers: Range<usize>,
    /// Every rank's layers, in rank order.
    pub split: Vec<Range<usize>>,
    /// The sequence length rank 0 plans for.
    pub positions: usize,
    pub hostfile: Hostfile,
    watch: Watch,
    /// Rank 0's time in the stages after it, shared with its [`Link`]s.
    downstream: std::sync::Arc<std::sync::Mutex<LinkReport>>,
}

/// How to join a pipeline.
pub struct JoinOptions<'a> {
    pub hostfile: &'a Path,
    pub rank: usize,
    /// This rank's memory for the split (bytes).
    pub budget: u64,
    /// Rank 0's planned sequence length (ignored on the others).
    pub positions: usize,
    /// How long the ranks may take to find each other.
    pub connect_timeout: Duration,
}

impl Pipeline {
    /// Forms the ring as rank `opts.rank` of the hostfile's ranks, starts the watchdog, checks
    /// that every rank opened the same pack, and splits the model's layers by the ranks'
    /// budgets. Ends the process (exit 1, naming the ranks it waited for) when the ring does
    /// not form within `connect_timeout`.
    pub fn join(
        opts: &JoinOptions,
        pack: &Pack,
        cfg: &ModelConfig,
    ) -> Result<Pipeline, PipelineError> {
        let (hostfile, watch) = form_ring(opts.hostfile, opts.rank, opts.connect_timeout)?;
        let size = hostfile.ranks.len();
        let fail = |e: PipelineError| {
            watch.disarm();
            e
        };
        let hello = Hello {
            hash: pack_hash(pack),
            budget_mib: (opts.budget >> 20).clamp(1, i32::MAX as u64) as u32,
            positions: opts.positions.min(i32::MAX as usize) as u32,
        };
        let all = gather_hellos(&hello, size).map_err(fail)?;
        watch.formed();
        for (r, h) in all.iter().enumerate().skip(1) {
            if h.hash != all[0].hash {
                return Err(fail(PipelineError::PackMismatch {
                    rank: r,
                    ours: blake3::Hash::from(all[0].hash).to_hex().to_string(),
                    theirs: blake3::Hash::from(h.hash).to_hex().to_string(),
                }));
            }
        }
        let weights: Vec<u64> = all.iter().map(|h| h.budget_mib as u64).collect();
        let split = split_layers(&layer_costs(pack, cfg), &weights).map_err(fail)?;
        Ok(Pipeline {
            rank: opts.rank,
            size,
            layers: split[opts.rank].clone(),
            split,
            positions: all[0].positions as usize,
            hostfile,
            watch,
            downstream: Default::default(),
        })
    }

    /// Rank 0: its passes down the pipeline so far, and the time each took from its first
    /// message sent to its reply received.
    pub fn downstream_report(&self) -> LinkReport {
        self.downstream
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Whether this rank ends the pipeline (applies the head).
    pub fn is_last(&self) -> bool {
        self.rank + 1 == self.size
    }

    /// Rank 0's link to the stages after it.
    pub fn link(&self) -> Link {
        Link::new(self.size, self.downstream.clone())
    }

    /// Ends the run on every rank: rank 0 tells the next stage to stop (it tells the one after
    /// it), and the watchdog stops watching.
    pub fn finish(&self) -> Result<(), PipelineError> {
        self.watch.disarm();
        if self.rank == 0 {
            link::send_stop(1)?;
        }
        self.watch.done();
        Ok(())
    }

    /// Stops the watchdog (before this process exits with an error of its own).
    pub fn disarm(&self) {
        self.watch.disarm();
    }
}

/// Reads the hostfile, starts the watchdog and forms MLX's ring as rank `rank`.
pub fn form_ring(
    path: &Path,
    rank: usize,
    connect_timeout: Duration,
) -> Result<(Hostfile, Watch), PipelineError> {
    let hostfile = Hostfile::read(path)?;
    let size = hostfile.ranks.len();
    if rank >= size {
        return Err(PipelineError::RankOutOfRange { rank, size });
    }
    if !mlx::dist::is_available("ring") {
        return Err(PipelineError::NoRing);
    }
    let watch = Watch::start(&hostfile, rank, connect_timeout)?;
    let fail = |e: PipelineError| {
        watch.disarm();
        e
    };
    // The ring backend reads its configuration from the environment (ring.cpp `init`).
    let ring =
        std::env::temp_dir().join(format!("flashpack-ring-{}-{rank}.json", std::process::id()));
    std::fs::write(&ring, hostfile.ring_json()).map_err(|e| fail(e.into()))?;
    std::env::set_var("MLX_HOSTFILE", &ring);
    std::env::set_var("MLX_RANK", rank.to_string());
    mlx::dist::exit_on_backend_failure(3000);
    let group = mlx::dist::init("ring");
    let _ = std::fs::remove_file(&ring);
    let group = group.map_err(|source| fail(PipelineError::Init { rank, size, source }))?;
    if group.size != size || group.rank != rank {
        return Err(fail(PipelineError::Protocol(format!(
            "MLX formed rank {} of {}, the hostfile says rank {rank} of {size}",
            group.rank, group.size
        ))));
    }
    Ok((hostfile, watch))
}

/// One row of [`ping_pong`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PingPong {
    pub bytes: usize,
    /// Median round trip (rank 0 -> rank 1 -> rank 0), microseconds.
    pub round_trip_us: f64,
    /// One-way bytes per second at that size: `bytes / (round_trip / 2)`.
    pub gb_per_s: f64,
}

/// The ring's ping-pong between ranks 0 and 1 through MLX's `send`/`recv` (each message a
/// header-free f32 array evaluated alone, as a pipeline hop sends it): rank 0 returns the
/// median round trip of `reps` per size; rank 1 echoes and returns nothing.
pub fn ping_pong(
    rank: usize,
    sizes: &[usize],
    reps: usize,
) -> Result<Vec<PingPong>, PipelineError> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        let n = (bytes / 4).max(1);
        let x = Array::zeros(&[n], mlx::Dtype::F32)?;
        x.eval()?;
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps + 2 {
            let t = std::time::Instant::now();
            if rank == 0 {
                mlx::dist::send(&x, 1)?.eval()?;
                mlx::dist::recv(&[n], mlx::Dtype::F32, 1)?.eval()?;
            } else if rank == 1 {
                let y = mlx::dist::recv(&[n], mlx::Dtype::F32, 0)?;
                mlx::dist::send(&y, 0)?.eval()?;
            }
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let rt = times.get(times.len() / 2).copied().unwrap_or(0.0);
        rows.push(PingPong {
            bytes: n * 4,
            round_trip_us: rt * 1e6,
            gb_per_s: (n * 4) as f64 / (rt / 2.0).max(1e-12) / 1e9,
        });
    }
    Ok(rows)
}

fn gather_hellos(hello: &Hello, size: usize) -> Result<Vec<Hello>, PipelineError> {
    let mine = Array::from_slice(&hello.words(), &[1, HELLO_WORDS])?;
    let all = mlx::dist::all_gather(&mine)?;
    let words = all.to_vec::<i32>()?;
    if words.len() != size * HELLO_WORDS {
        return Err(PipelineError::Protocol(format!(
            "all_gather gave {} words for {size} ranks",
            words.len()
        )));
    }
    Ok(words.chunks(HELLO_WORDS).map(Hello::of).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_budgets_split_equal_layers() {
        let s = split_layers(&[10; 6], &[1, 1]).unwrap();
        assert_eq!(s, vec![0..3, 3..6]);
        let s = split_layers(&[10; 6], &[1, 1, 1]).unwrap();
        assert_eq!(s, vec![0..2, 2..4, 4..6]);
    }

    #[test]
    fn budgets_weigh_the_split() {
        // Rank 1 has three times rank 0's memory: a quarter of the bytes on rank 0.
        let s = split_layers(&[10; 8], &[1, 3]).unwrap();
        assert_eq!(s, vec![0..2, 2..8]);
        // A heavy first layer counts by its bytes, not as one layer.
        let s = split_layers(&[50, 10, 10, 10, 10, 10], &[1, 1]).unwrap();
        assert_eq!(s, vec![0..1, 1..6]);
    }

    #[test]
    fn every_rank_gets_a_layer() {
        let s = split_layers(&[100, 1, 1], &[1000, 1, 1]).unwrap();
        assert_eq!(s, vec![0..1, 1..2, 2..3]);
        assert!(matches!(
            split_layers(&[1, 1], &[1, 1, 1]),
            Err(PipelineError::TooManyRanks {
                layers: 2,
                ranks: 3
            })
        ));
    }

    #[test]
    fn hostfile_forms() {
        let h = Hostfile::parse(r#"[["127.0.0.1:5000"], ["127.0.0.1:5001"]]"#).unwrap();
        assert_eq!(h.ranks.len(), 2);
        assert_eq!(h.control_addr().port(), 5002);
        let h = Hostfile::parse(
            r#"{"backend": "ring", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}"#,
        )
        .unwrap();
        assert_eq!(h.ring_json(), r#"[["10.0.0.1:32323"],["10.0.0.2:32324"]]"#);
        for bad in [
            "",
            "{}",
            "[]",
            r#"[["127.0.0.1:5000"]]"#,
            r#"[["localhost"], ["x"]]"#,
            r#"[{"ssh": "a"}, {"ssh": "b"}]"#,
            r#"[["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:3"]]"#,
        ] {
            assert!(Hostfile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stage_tensors() {
        let n = 4;
        assert!(stage_tensor(
            "model.layers.1.mlp.gate.weight",
            &(0..2),
            n,
            false
        ));
        assert!(!stage_tensor(
            "model.layers.2.mlp.gate.weight",
            &(0..2),
            n,
            false
        ));
        assert!(stage_tensor("model.embed_tokens.weight", &(0..2), n, false));
        assert!(!stage_tensor(
            "model.embed_tokens.weight",
            &(2..4),
            n,
            false
        ));
        assert!(stage_tensor("model.embed_tokens.weight", &(2..4), n, true));
        assert!(stage_tensor("model.norm.weight", &(2..4), n, false));
        assert!(!stage_tensor("lm_head.weight", &(0..2), n, false));
    }
}
