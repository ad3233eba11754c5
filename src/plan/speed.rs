//! Speed stage of `flashpack plan`: a budget's reads and the machine's measured rates ->
//! predicted decode and prefill tokens per second.
//!
//! In: a [`Row`] (misses and bytes per token and per prompt chunk) and [`Rates`] (the compute
//! probe's seconds per token, the disk's miss cost). Out: [`Speed`]. Pure.
//! The model, serial (no overlap of reads with compute is assumed, so prefetch can only make
//! the run faster than predicted):
//! - every expert resident (no budget): `decode = resident seconds per token`;
//! - under a budget: `streamed seconds per token` (the host learns each sparse layer's routing
//!   before its experts are read) plus, per sparse layer with misses, one miss's latency and
//!   the rest of the layer's misses at the disk's rate: `latency x layers with a miss +
//!   misses x read bytes / bytes per second`;
//! - prefill: the probe's seconds per chunk plus the chunk's misses the same way.

use super::budgets::Row;

/// What a miss costs on the pack's disk: `latency + bytes / bytes_per_s` for the first miss
/// of a layer, `bytes / bytes_per_s` for each further one (they are read in parallel).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    pub latency_s: f64,
    pub bytes_per_s: f64,
}

/// What the compute probe measured (seconds).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Compute {
    /// One decoded token, every expert resident (device-side routing).
    pub decode_s: f64,
    /// One decoded token through a streaming store (routing read on the host per sparse
    /// layer), every expert it asks for already resident.
    pub streamed_decode_s: f64,
    /// One prompt chunk of `chunk_tokens` tokens, every expert resident, and streamed.
    pub prefill_s: f64,
    pub streamed_prefill_s: f64,
    pub chunk_tokens: usize,
}

/// The machine's rates.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Rates {
    pub disk: Disk,
    pub compute: Compute,
}

/// Predicted speeds of one budget.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Speed {
    pub decode_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    /// Of a decoded token's seconds, those waiting for reads.
    pub decode_read_s: f64,
}

/// Seconds the reads of `layers` layers with misses, `bytes` in all, take.
fn read_s(disk: &Disk, layers: f64, bytes: f64) -> f64 {
    layers * disk.latency_s + bytes / disk.bytes_per_s.max(1.0)
}

/// The predicted speeds of `row` at `rates`.
pub fn predict(row: &Row, rates: &Rates) -> Speed {
    let c = &rates.compute;
    let streaming = row.expert_budget_bytes.is_some();
    let (decode_c, prefill_c) = if streaming {
        (c.streamed_decode_s, c.streamed_prefill_s)
    } else {
        (c.decode_s, c.prefill_s)
    };
    let decode_read = if streaming {
        read_s(
            &rates.disk,
            row.layers_missing_per_token,
            row.bytes_read_per_token,
        )
    } else {
        0.0
    };
    // The row counts a chunk's reads for the chunk the probe timed (`Compute::chunk_tokens`).
    let prefill_read = if streaming {
        read_s(
            &rates.disk,
            row.layers_missing_per_chunk,
            row.bytes_read_per_chunk,
        )
    } else {
        0.0
    };
    Speed {
        decode_tokens_per_s: 1.0 / (decode_c + decode_read).max(1e-9),
        prefill_tokens_per_s: c.chunk_tokens as f64 / (prefill_c + prefill_read).max(1e-9),
        decode_read_s: decode_read,
    }
}
