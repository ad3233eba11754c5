//! Codec benchmark: every codec on the same segments in one run, with the numbers that decide
//! whether entropy coding pays (size vs the order-0 bound, decode speed vs memcpy and zstd).
//!
//! In: datasets (named lists of segments of packed codes, with their code width). Out: one row
//! per (dataset, codec) plus a memcpy row, and a Markdown or JSON rendering. Timings are wall
//! clock, best of several rounds; sizes are exact. Nothing here knows about models: `bench.rs`
//! (the `flashpack bench codecs` command) turns checkpoints into datasets. Part of the binary,
//! not the library: only the command measures codecs.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use std::sync::atomic::{AtomicBool, Ordering};

use flashpack::codec::{
    encode, encode_auto, entropy, AutoPolicy, Codec, CodecChoice, CodecError, CodecId, Decoder,
};

/// Segments of bytes that share a code width.
pub struct Dataset {
    pub name: String,
    /// Width of the packed codes (2, 4, 8), or 16 for scale/bias bytes.
    pub bits: u8,
    pub segments: Vec<Vec<u8>>,
}

impl Dataset {
    /// Cut one buffer into segments of `segment_bytes` (the last may be shorter).
    pub fn from_bytes(
        name: impl Into<String>,
        bits: u8,
        data: &[u8],
        segment_bytes: usize,
    ) -> Self {
        Self {
            name: name.into(),
            bits,
            segments: data
                .chunks(segment_bytes.max(1))
                .map(<[u8]>::to_vec)
                .collect(),
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.segments.iter().map(Vec::len).sum()
    }
}

/// Measurement settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Threads for the "all threads" decode column (segments decoded in parallel).
    pub threads: usize,
    /// Rounds per timing; the best is kept.
    pub rounds: usize,
    /// Minimum wall time of one round; short inputs are repeated until it is reached.
    pub min_round: Duration,
    pub codecs: Vec<CodecChoice>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            threads: rayon::current_num_threads(),
            rounds: 5,
            min_round: Duration::from_millis(30),
            codecs: default_codecs(),
        }
    }
}

/// raw, huffman, lz4, zstd at levels 1, 3, 9 and 19, and auto.
pub fn default_codecs() -> Vec<CodecChoice> {
    let mut v = vec![
        CodecChoice::Fixed(Codec::Raw),
        CodecChoice::Fixed(Codec::Huffman),
        CodecChoice::Fixed(Codec::Lz4),
    ];
    for level in [1, 3, 9, 19] {
        v.push(CodecChoice::Fixed(Codec::Zstd { level }));
    }
    v.push(CodecChoice::Auto(AutoPolicy::default()));
    v
}

/// One line of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub dataset: String,
    pub codec: String,
    pub bits: u8,
    pub segments: usize,
    pub input_bytes: usize,
    pub stored_bytes: usize,
    /// Stored bits per code (per value for 16-bit data).
    pub bits_per_code: f64,
    /// Order-0 entropy of the codes per code, computed per segment (each segment its own model).
    pub entropy_bits_per_code: f64,
    /// `stored / entropy bound - 1`, in percent (table overhead included).
    pub over_entropy_pct: f64,
    pub ratio: f64,
    /// Segments stored with each codec id (auto and fallbacks to raw show here).
    pub stored_as: Vec<(String, usize)>,
    pub encode_mb_s: f64,
    /// Decoded bytes per second of the decoding thread's CPU time (wall time where the
    /// platform has no per-thread clock).
    pub decode_mb_s_1t: f64,
    pub decode_mb_s_all: f64,
    pub threads: usize,
    /// Single-thread decode speed over single-thread memcpy of the same output.
    pub vs_memcpy: f64,
}

struct Encoded {
    ids: Vec<CodecId>,
    stored: Vec<Vec<u8>>,
}

fn encode_all(choice: CodecChoice, bits: u8, segs: &[Vec<u8>]) -> Result<Encoded, CodecError> {
    let mut ids = Vec::with_capacity(segs.len());
    let mut stored = Vec::with_capacity(segs.len());
    let mut scratch = Vec::new();
    for s in segs {
        let mut out = Vec::new();
        let id = match choice {
            CodecChoice::Fixed(c) => encode(c, bits, s, &mut out),
            CodecChoice::Auto(p) => encode_auto(bits, s, &mut out, &p, &mut scratch),
        }?;
        ids.push(id);
        stored.push(out);
    }
    Ok(Encoded { ids, stored })
}

/// Wall-clock seconds per call of `f`, over one round of at least `min_round`.
fn time_round(min_round: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut reps = 0u32;
    while reps == 0 || start.elapsed() < min_round {
        f();
        reps += 1;
    }
    start.elapsed().as_secs_f64() / reps as f64
}

/// CPU seconds of the calling thread, or None where the platform has no per-thread clock.
fn thread_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9);
        }
    }
    None
}

/// Like `time_round`, but counts the thread's CPU time: time the scheduler gave to other
/// processes is not charged to `f`, so single-thread speeds stay comparable on a loaded machine.
fn cpu_time_round(min_round: Duration, mut f: impl FnMut()) -> f64 {
    let Some(cpu0) = thread_cpu_seconds() else {
        return time_round(min_round, f);
    };
    let start = Instant::now();
    let mut reps = 0u32;
    while reps == 0 || start.elapsed() < min_round {
        f();
        reps += 1;
    }
    let cpu = thread_cpu_seconds().unwrap_or(cpu0) - cpu0;
    cpu.max(1e-9) / reps as f64
}

fn label(choice: &CodecChoice) -> String {
    match choice {
        CodecChoice::Fixed(c) => c.label(),
        CodecChoice::Auto(_) => "auto".to_string(),
    }
}

/// One timed contestant: memcpy (`enc == None`) or a codec's stored segments.
struct Contestant {
    label: String,
    enc: Option<Encoded>,
    encode_mb_s: f64,
    best_1t: f64,
    best_all: f64,
}

/// Run every codec of `opts` on every dataset; rows in (dataset, codec) order, memcpy first.
///
/// Every codec's output is decoded and compared with its input before it is timed; a codec
/// that does not round-trip is an error, not a row. Timing rounds are interleaved (each round
/// times every contestant once, then the next round starts), so load from other processes
/// hits all contestants alike; each keeps its best round. Single-thread speeds divide by the
/// thread's CPU time (where the platform has a per-thread clock), all-thread speeds by wall time.
pub fn bench_codecs(
    datasets: &[Dataset],
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>, CodecError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| CodecError::Backend {
            codec: "rayon",
            message: e.to_string(),
        })?;
    let mut rows = Vec::new();
    for ds in datasets {
        let input: usize = ds.total_bytes();
        let codes = input as f64 * 8.0 / ds.bits as f64;
        let per_value = |b: f64| b / codes;
        let entropy_bits: f64 = ds
            .segments
            .iter()
            .map(|s| {
                if ds.bits <= 8 {
                    entropy::code_entropy_bits(ds.bits, s)
                } else {
                    entropy::byte_entropy_bits(s)
                }
            })
            .sum();
        let mut dsts: Vec<Vec<u8>> = ds.segments.iter().map(|s| vec![0u8; s.len()]).collect();

        let mut contestants = vec![Contestant {
            label: "memcpy".to_string(),
            enc: None,
            encode_mb_s: f64::NAN,
            best_1t: f64::MAX,
            best_all: f64::MAX,
        }];
        let mut dec = Decoder::new();
        for choice in &opts.codecs {
            let start = Instant::now();
            let enc = encode_all(*choice, ds.bits, &ds.segments)?;
            let encode_mb_s = input as f64 / start.elapsed().as_secs_f64() / 1e6;
            for (i, ((id, st), (d, s))) in enc
                .ids
                .iter()
                .zip(&enc.stored)
                .zip(dsts.iter_mut().zip(&ds.segments))
                .enumerate()
            {
                dec.decode_into(*id, st, d)?;
                if d != s {
                    return Err(CodecError::RoundTrip {
                        codec: label(choice),
                        segment: i,
                    });
                }
            }
            contestants.push(Contestant {
                label: label(choice),
                enc: Some(enc),
                encode_mb_s,
                best_1t: f64::MAX,
                best_all: f64::MAX,
            });
        }

        // Decoding was just checked on these exact bytes; a failure while timing would be a
        // nondeterministic decoder, reported rather than hidden.
        let failed = AtomicBool::new(false);
        for _ in 0..opts.rounds.max(1) {
            for c in contestants.iter_mut() {
                let t1 = cpu_time_round(opts.min_round, || {
                    match &c.enc {
                        None => {
                            for (d, s) in dsts.iter_mut().zip(&ds.segments) {
                                d.copy_from_slice(s);
                            }
                        }
                        Some(enc) => {
                            for ((id, st), d) in
                                enc.ids.iter().zip(&enc.stored).zip(dsts.iter_mut())
                            {
                                if dec.decode_into(*id, st, d).is_err() {
                                    failed.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    std::hint::black_box(&dsts);
                });
                let tall = pool.install(|| {
                    time_round(opts.min_round, || {
                        match &c.enc {
                            None => dsts
                                .par_iter_mut()
                                .zip(&ds.segments)
                                .for_each(|(d, s)| d.copy_from_slice(s)),
                            Some(enc) => dsts
                                .par_iter_mut()
                                .zip(enc.ids.par_iter().zip(&enc.stored))
                                .for_each_init(Decoder::new, |dec, (d, (id, st))| {
                                    if dec.decode_into(*id, st, d).is_err() {
                                        failed.store(true, Ordering::Relaxed);
                                    }
                                }),
                        }
                        std::hint::black_box(&dsts);
                    })
                });
                c.best_1t = c.best_1t.min(t1);
                c.best_all = c.best_all.min(tall);
            }
        }
        if failed.load(Ordering::Relaxed) {
            return Err(CodecError::RoundTrip {
                codec: "(while timing)".to_string(),
                segment: usize::MAX,
            });
        }

        let mb_s = |secs: f64| input as f64 / secs / 1e6;
        let memcpy_1t = mb_s(contestants[0].best_1t);
        for c in &contestants {
            let (stored, stored_as) = match &c.enc {
                None => (input, Vec::new()),
                Some(enc) => {
                    let stored: usize = enc.stored.iter().map(Vec::len).sum();
                    let mut stored_as: Vec<(String, usize)> = Vec::new();
                    for id in CodecId::ALL {
                        let n = enc.ids.iter().filter(|&&i| i == id).count();
                        if n > 0 {
                            stored_as.push((id.name().to_string(), n));
                        }
                    }
                    (stored, stored_as)
                }
            };
            rows.push(BenchRow {
                dataset: ds.name.clone(),
                codec: c.label.clone(),
                bits: ds.bits,
                segments: ds.segments.len(),
                input_bytes: input,
                stored_bytes: stored,
                bits_per_code: per_value(stored as f64 * 8.0),
                entropy_bits_per_code: per_value(entropy_bits),
                over_entropy_pct: (stored as f64 * 8.0 / entropy_bits - 1.0) * 100.0,
                ratio: input as f64 / stored as f64,
                stored_as,
                encode_mb_s: c.encode_mb_s,
                decode_mb_s_1t: mb_s(c.best_1t),
                decode_mb_s_all: mb_s(c.best_all),
                threads: opts.threads,
                vs_memcpy: mb_s(c.best_1t) / memcpy_1t,
            });
        }
    }
    Ok(rows)
}

/// A Markdown table of `rows`.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::new();
    s.push_str(
        "| dataset | codec | bits/code | H0 bits/code | vs H0 | ratio | stored as | encode MB/s | decode MB/s 1T (CPU time) | decode MB/s all (wall) | x memcpy 1T |\n",
    );
    s.push_str("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|\n");
    for r in rows {
        let stored_as = if r.stored_as.is_empty() {
            "-".to_string()
        } else {
            r.stored_as
                .iter()
                .map(|(n, c)| format!("{n}:{c}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let enc = if r.encode_mb_s.is_nan() {
            "-".to_string()
        } else {
            format!("{:.0}", r.encode_mb_s)
        };
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:+.2}% | {:.3} | {} | {} | {:.0} | {:.0} ({}T) | {:.2} |\n",
            r.dataset,
            r.codec,
            r.bits_per_code,
            r.entropy_bits_per_code,
            r.over_entropy_pct,
            r.ratio,
            stored_as,
            enc,
            r.decode_mb_s_1t,
            r.decode_mb_s_all,
            r.threads,
            r.vs_memcpy
        ));
    }
    s
}
