//! A lone miss of a Huffman-coded expert, decoded while it is read.
//!
//! Read whole and then decoded, such a miss costs the read plus the decode plus the copy into
//! its slot (2.3x a plain read of its bytes on two cores, docs/benchmarks.md). Its streams are
//! independent and laid out one after the other, so read front to back the decoder could only
//! start once the last stream began to arrive. Here the segment is read in small parts taken in
//! the order the lock-step decoder consumes them (every stream's first part, then every
//! stream's second, ...). The streams are decoded in two groups ([`DECODE_GROUPS`]), each in
//! lock step: whichever read thread brings a part in advances each group it can take as far as
//! its streams' arrived bytes allow, then queues the copies of what it decoded into the slot,
//! which the read threads that find the groups busy do. Each part is hashed as it arrives (a
//! BLAKE3 subtree, `run::part_hash`). What is left after the last read is the decode of one row
//! of parts (both groups at once), the checks, and the small scales part.
//! docs/decisions/0024-huffman-miss-pipeline.md has the measurements; on by default on machines
//! of 4 cores or more (`run::read::huffman_part_bytes`).
//!
//! Nothing here is usable before the checks pass: on a checksum or decode failure the load
//! fails and its slot is freed unused (`ExpertCache::prepare_stored_ids`, `join_prefetch`),
//! as for raw experts copied part by part.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::{
    decode_error, finish_segment, sized, step_done, whole_expert_pieces, ExpertError, LoadCtx,
    Piece, Scratch, SLOT_ARRAYS,
};
use crate::codec::huffman::{HuffmanDecoder, Progressive, DEFAULT_STREAMS, MAX_STREAMS};
use crate::codec::{CodecError, CodecId, Decoder};
use crate::format::ExpertEntry;
use crate::mlx;
use crate::run::part_hash::PartHash;
use crate::run::read::{Arriving, SegmentReader};

/// Reads in flight for one Huffman-coded lone miss.
const LANES: usize = 4;

/// CUDA: decoded bytes are copied to the slot in batches of at least this many (each copy is a
/// call into the driver); on the host they are copied after every advance.
const UPLOAD_BATCH: usize = 512 << 10;

/// The decoded weights buffer, shared by the decoder (which writes each stream past what it
/// has decoded) and the threads copying decoded bytes into the slot (which read only what is
/// decoded): [`HuffmanDecoder::advance`]'s contract keeps the two apart.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: see the type's text: writers and readers touch disjoint bytes, ordered by the locks
// that hand decoded ranges from the decoder to the copies.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The buffer's address (a method, so closures capture the `Sync` whole, not the field).
    fn at(&self) -> *mut u8 {
        self.ptr
    }
}

/// One group of the segment's streams, decoded in lock step by whichever read thread holds it
/// ([`DECODE_GROUPS`] of them, so two threads decode at once).
struct Group {
    prog: Progressive,
    /// Decoded bytes of each of its streams already handed to the copies.
    queued: [usize; MAX_STREAMS],
}

/// Stream groups a lone Huffman miss is decoded in, each on the thread that holds it: one lock
/// step decodes about as fast as the disk reads (1.8 ms against 1.85 ms for 2.65 MB on the H100
/// host, decision 0024), so with one group any slack ends the load after the read. Two groups
/// of the 7 streams (4 and 3) decode at about 2.5 GB/s together. Machines of fewer than 4
/// cores keep one: the reads, hashes and copies need the other core. `FLASHPACK_DECODE_GROUPS`
/// sets it (measurements).
pub const DECODE_GROUPS: usize = 2;

fn decode_groups() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        if let Some(n) = crate::env::number::<usize>("FLASHPACK_DECODE_GROUPS") {
            return n.max(1);
        }
        if crate::env::cores() >= 4 {
            DECODE_GROUPS
        } else {
            1
        }
    })
}

/// Whether the decode started (the header parsed), and the decoder that then serves every
/// group (its table built by `start`), or why not.
enum Setup {
    /// Not yet: the header has not all arrived. Holds the decoder to start.
    Waiting(HuffmanDecoder),
    /// The header did not parse (the segment is decoded whole at the end, which reports why),
    /// or another decode's table would be needed: no progressive decode.
    Failed(HuffmanDecoder),
    Started,
}

/// Copies of decoded weights into the slot (whole experts only), queued by the decoder and
/// done by whichever read thread is free, so the decoder only decodes.
struct SlotCopies<'a> {
    pieces: Vec<Piece>,
    dst: &'a [(usize, usize); SLOT_ARRAYS],
    /// MLX on CUDA: the slot is device memory, written by `mlx::upload` in batches.
    upload: bool,
    /// (slot address, decoded-buffer address, bytes) not yet done.
    queue: Mutex<Vec<(usize, usize, usize)>>,
    /// `mlx::upload` has no device copies here: the slot is written at the end instead.
    off: AtomicBool,
    err: Mutex<Option<ExpertError>>,
}

impl SlotCopies<'_> {
    /// Does the queued copies (all of them, whatever their size, with `all`).
    fn drain(&self, all: bool) {
        let copies = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let bytes: usize = q.iter().map(|c| c.2).sum();
            let batch = if self.upload && !all { UPLOAD_BATCH } else { 1 };
            if bytes < batch || self.off.load(Ordering::Relaxed) {
                return;
            }
            std::mem::take(&mut *q)
        };
        let t = Instant::now();
        if self.upload {
            // SAFETY: the sources are decoded bytes of this load's buffer, never written again
            // (they were queued after the decoder finished them); the destinations lie inside
            // this job's slot (one job per slot), which no pending evaluation reads.
            match unsafe { mlx::upload(&copies) } {
                Ok(true) => {}
                Ok(false) => self.off.store(true, Ordering::Relaxed),
                Err(err) => {
                    *self.err.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.into());
                    self.off.store(true, Ordering::Relaxed);
                }
            }
        } else {
            for &(to, from, len) in &copies {
                // SAFETY: as above; on the host the slot's arrays are plain memory, and each
                // piece lies inside its array (whole_expert_pieces matches the slot's layout).
                unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
            }
        }
        step_done(3, t);
    }
}

/// The end of the run of arrived bytes that holds `pos` (`pos` itself when it has not
/// arrived), at most `wlen`.
fn arrived_to(runs: &[(usize, usize)], wlen: usize, pos: usize) -> usize {
    let mut at = pos;
    while let Some(&(_, b)) = runs.iter().find(|&&(a, b)| a <= at && at < b) {
        at = b;
    }
    at.min(wlen)
}

impl Group {
    /// Advances this group's streams over the arrived runs `runs` of `seg`, then queues the
    /// copies of what it decoded.
    fn advance(
        &mut self,
        huff: &HuffmanDecoder,
        seg: Arriving,
        (wlen, weights): (usize, Out),
        runs: &[(usize, usize)],
        slot: Option<&SlotCopies>,
    ) {
        let t = Instant::now();
        let to = |pos: usize| arrived_to(runs, wlen, pos);
        // SAFETY: `seg` points at the segment's first byte, and `to` reports only arrived
        // bytes, which the reader never writes again; the buffer is `decoded_len()` long, this
        // group writes only its own streams past what they decoded, and the copies read only
        // what is already decoded.
        let done = unsafe { huff.advance(&mut self.prog, seg.ptr(), &to, weights.ptr) };
        step_done(2, t);
        self.queue(Some(done), weights, slot);
    }

    /// Queues the copies of this group's newly decoded bytes into the slot, `done` of each
    /// stream (`None`: all of them, the decode being finished).
    fn queue(&mut self, done: Option<usize>, weights: Out, slot: Option<&SlotCopies>) {
        let Some(slot) = slot else {
            return;
        };
        let (q, n) = (self.prog.quota(), weights.len);
        let base = weights.ptr as usize;
        let mut copies = Vec::new();
        for s in self.prog.stream_range() {
            let (lo, hi) = ((s * q).min(n), ((s + 1) * q).min(n));
            let upto = done.map_or(hi, |d| (lo + d).min(hi));
            let from = lo + self.queued[s];
            if upto <= from {
                continue;
            }
            for p in &slot.pieces {
                let (a, b) = (from.max(p.at), upto.min(p.at + p.len));
                if a < b {
                    copies.push((slot.dst[p.arr].0 + (a - p.at), base + a, b - a));
                }
            }
            self.queued[s] = upto - lo;
        }
        slot.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(copies);
    }
}

/// The read order's key of the part at `from..to` of a segment whose weights are its first
/// `wlen` bytes: the fraction of its stream where the lock-step decoder first needs it, in
/// 1/1024ths, with streams estimated as equal (the header is not read yet). A part holding a
/// stream's start is needed at once, and so are the scales after the weights: they are decoded
/// while the weights are still arriving.
fn read_key(from: usize, to: usize, wlen: usize) -> u64 {
    if from >= wlen {
        return 0;
    }
    let streams = DEFAULT_STREAMS;
    // The header: stream count, symbol count, 256 4-bit lengths, decoded length, stream sizes.
    let head = 2 + 128 + 4 + 4 * streams;
    if from < head {
        return 0;
    }
    let per = ((wlen - head) / streams).max(1);
    let stream = |at: usize| ((at - head) / per).min(streams - 1);
    let (first, last) = (stream(from), stream(to.min(wlen).max(from + 1) - 1));
    if last > first {
        return 0;
    }
    ((from - head - first * per) * 1024 / per) as u64
}

/// What decoding the scales part gave.
type Decoded = Result<usize, CodecError>;

/// Loads one Huffman-coded segment read in decoder order (see the module's text).
pub(super) fn load(
    scratch: &mut Scratch,
    reader: &SegmentReader,
    e: &ExpertEntry,
    ctx: LoadCtx,
    dst: &[(usize, usize); SLOT_ARRAYS],
    aux_codec: CodecId,
) -> Result<(), ExpertError> {
    let (len, wlen) = (e.stored_len as usize, e.weights_stored_len as usize);
    let whole = e.row_start == 0 && e.row_count as usize == ctx.inter;
    let pin = ctx.upload && whole;
    let (decoder, stored, weights, aux) = scratch;
    sized(stored, len + 3 * 4096, pin);
    sized(weights, e.weights_decoded_len as usize, pin);
    if aux_codec != CodecId::Raw {
        sized(aux, e.aux_decoded_len() as usize, pin);
    }
    let part = reader.huffman_part();
    let hash = if ctx.verify {
        PartHash::new(len, part)
    } else {
        None
    };
    // Parts off the subtree grid (a segment not aligned in the file): hashed whole at the end.
    let hash_whole = AtomicBool::new(ctx.verify && hash.is_none());
    let runs = Mutex::new(Vec::<(usize, usize)>::new());
    let reported = AtomicU64::new(0);
    let slot = whole.then(|| SlotCopies {
        pieces: whole_expert_pieces(e, ctx.hidden, ctx.inter)
            .into_iter()
            .filter(|p| !p.aux)
            .collect(),
        dst,
        upload: ctx.upload,
        queue: Mutex::new(Vec::new()),
        off: AtomicBool::new(false),
        err: Mutex::new(None),
    });
    let slot = slot.as_ref();
    let out = Out {
        ptr: weights.as_mut_ptr(),
        len: weights.len(),
    };
    // The decoder moves out of the scratch while the read runs: once started, every group reads
    // its table at once. It goes back at the end.
    let setup = Mutex::new(Setup::Waiting(std::mem::take(decoder.huffman())));
    let table: OnceLock<HuffmanDecoder> = OnceLock::new();
    let groups: OnceLock<Vec<Mutex<Group>>> = OnceLock::new();
    let key = |from: usize, to: usize| read_key(from, to, wlen);
    // The scales part (small) is decoded by the read thread that completes it, on a decoder
    // of its own, while the weights are still arriving.
    let aux_len = len - wlen;
    let aux_arrived = AtomicUsize::new(0);
    let aux_state: Mutex<(&mut [u8], Option<Decoded>)> = Mutex::new((&mut aux[..], None));
    let snapshot = || runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Starts the decode once the header has arrived: the table, then the stream groups.
    let try_start = |seg: Arriving| {
        let Ok(mut st) = setup.try_lock() else {
            return; // another thread is starting it
        };
        let Setup::Waiting(huff) = &mut *st else {
            return;
        };
        let head = arrived_to(&snapshot(), wlen, 0);
        if head == 0 {
            return;
        }
        // SAFETY: `0..head` has arrived.
        match huff.start(unsafe { seg.range(0, head) }, wlen) {
            Ok(p) if p.decoded_len() == out.len => {
                let split = p
                    .split(decode_groups())
                    .into_iter()
                    .map(|prog| {
                        Mutex::new(Group {
                            prog,
                            queued: [0; MAX_STREAMS],
                        })
                    })
                    .collect();
                let _ = groups.set(split);
                let huff = std::mem::take(huff);
                let _ = table.set(huff);
                *st = Setup::Started;
            }
            // The header may need more than the first run when that run is short.
            Err(CodecError::Truncated { .. }) if head < wlen => {}
            _ => {
                let huff = std::mem::take(huff);
                *st = Setup::Failed(huff);
            }
        }
    };
    let arrived = |from: usize, to: usize, seg: Arriving| {
        let in_aux = to.saturating_sub(from.max(wlen));
        if aux_codec != CodecId::Raw && in_aux > 0 {
            let before = aux_arrived.fetch_add(in_aux, Ordering::SeqCst);
            if before < aux_len && before + in_aux >= aux_len {
                let t = Instant::now();
                let mut a = aux_state.lock().unwrap_or_else(|p| p.into_inner());
                // SAFETY: every byte of `wlen..len` has arrived (each part is reported once
                // before the read ends).
                let src = unsafe { seg.range(wlen, len) };
                let (out, result) = &mut *a;
                *result = Some(Decoder::new().decode_into(aux_codec, src, out));
                step_done(2, t);
            }
        }
        if let Some(h) = &hash {
            let t = Instant::now();
            // SAFETY: `from..to` has just arrived.
            if !h.add(from, to, unsafe { seg.range(from, to) }) {
                hash_whole.store(true, Ordering::Relaxed);
            }
            step_done(1, t);
        }
        runs.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((from, to));
        reported.fetch_add(1, Ordering::SeqCst);
        if table.get().is_none() {
            try_start(seg);
        }
        let (Some(huff), Some(groups)) = (table.get(), groups.get()) else {
            return;
        };
        // Each group: whoever holds it takes this part too, as it looks again after letting
        // go. A thread that finds every group taken does the copies they queued instead.
        let n = groups.len();
        let first = (from / part.max(1)) % n;
        for g in (0..n).map(|i| (first + i) % n) {
            loop {
                let Ok(mut d) = groups[g].try_lock() else {
                    break;
                };
                let seen = reported.load(Ordering::SeqCst);
                d.advance(huff, seg, (wlen, out), &snapshot(), slot);
                drop(d);
                if reported.load(Ordering::SeqCst) == seen {
                    break;
                }
            }
        }
        if let Some(slot) = slot {
            slot.drain(false);
        }
    };
    let t = Instant::now();
    let read = reader.read_parts_ordered(e, stored, part, LANES, &key, &arrived);
    step_done(0, t);
    // The decoder goes back to the scratch whatever happened.
    let groups = groups.into_inner();
    let (huff, started) = match (table.into_inner(), setup.into_inner()) {
        (Some(h), _) => (h, true),
        (None, Ok(Setup::Waiting(h) | Setup::Failed(h))) => (h, false),
        (None, _) => (HuffmanDecoder::new(), false),
    };
    *decoder.huffman() = huff;
    let range = read?;
    let stored = &stored[range];
    if ctx.verify {
        let t = Instant::now();
        let digest = if hash_whole.load(Ordering::Relaxed) {
            Some(blake3::hash(stored))
        } else {
            hash.as_ref().and_then(PartHash::finalize)
        };
        step_done(1, t);
        if digest.as_ref().map(|h| h.as_bytes()) != Some(&e.blake3) {
            return Err(ExpertError::Checksum {
                path: reader.path().to_path_buf(),
                layer: e.layer,
                expert: e.expert,
                segment: e.segment,
            });
        }
    }
    let (ws, auxs) = stored.split_at(wlen);
    let t = Instant::now();
    let huff = decoder.huffman();
    let mut groups: Vec<Group> = groups
        .filter(|_| started)
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let decoded = if groups.is_empty() {
        // Never started (a damaged header): decoded whole, which says what is wrong, and
        // copied to the slot by `finish_segment`.
        // SAFETY: the read is over, so no copy runs beside this: the buffer is this thread's.
        let whole_out = unsafe { std::slice::from_raw_parts_mut(out.ptr, out.len) };
        huff.decode_into_parallel(ws, whole_out).map(|_| ())
    } else {
        // Each group's tail on its own thread, as their decodes ran.
        let huff: &HuffmanDecoder = huff;
        let finish = |g: &Group| {
            // SAFETY: the read is over, so no copy runs beside this; each group writes only its
            // own streams' outputs of the `out.len` bytes at `out.ptr`.
            unsafe { huff.finish_streams(g.prog.clone(), ws, out.at()) }
        };
        let results: Vec<Result<(), CodecError>> = match groups.as_slice() {
            [a, b] => {
                let (x, y) = rayon::join(|| finish(a), || finish(b));
                vec![x, y]
            }
            gs => gs.iter().map(finish).collect(),
        };
        results.into_iter().collect()
    };
    decoded.map_err(|source| decode_error(reader, e, source))?;
    step_done(2, t);
    // The rest of the weights into the slot: what the last advances and the finishes decoded.
    for g in &mut groups {
        g.queue(None, out, slot);
    }
    let mut in_slot = !groups.is_empty();
    if let Some(slot) = slot {
        slot.drain(true);
        if let Some(err) = slot.err.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(err);
        }
        in_slot &= !slot.off.load(Ordering::Relaxed);
    } else {
        in_slot = false;
    }
    let weights: &[u8] = weights;
    let (aux_out, aux_result) = aux_state.into_inner().unwrap_or_else(|p| p.into_inner());
    let aux: &[u8] = if aux_codec == CodecId::Raw {
        auxs
    } else {
        // Decoded during the read, unless the read was reported again after a fallback (the
        // count then passed the length in one step) or never completed it.
        let result = match aux_result {
            Some(r) => r,
            None => {
                let t = Instant::now();
                let r = decoder.decode_into(aux_codec, auxs, aux_out);
                step_done(2, t);
                r
            }
        };
        result.map_err(|source| decode_error(reader, e, source))?;
        aux_out
    };
    let sent = |p: &Piece| in_slot && !p.aux;
    finish_segment(reader, e, ctx, weights, aux, dst, Some(&sent))
}

#[cfg(test)]
mod tests {
    use super::read_key;

    #[test]
    fn parts_are_read_in_the_order_the_streams_need_them() {
        // A 7-stream weights part of 7 x 100 KiB after its header, in 16 KiB parts.
        let head: usize = 2 + 128 + 4 + 4 * 7;
        let wlen = head + 7 * 100 * 1024;
        let part = 16 * 1024;
        let keys: Vec<u64> = (0..wlen.div_ceil(part))
            .map(|p| read_key(p * part, ((p + 1) * part).min(wlen), wlen))
            .collect();
        // Parts holding a stream's start come first; then each stream's parts by depth.
        assert_eq!(keys[0], 0);
        let per = (wlen - head) / 7;
        for s in 1..7 {
            let p = (head + s * per) / part;
            assert_eq!(keys[p], 0, "the part holding stream {s}'s start");
        }
        let deep = (head + per - part) / part; // the last whole part of stream 0
        assert!(keys[deep] > 800 && keys[deep] < 1024, "{}", keys[deep]);
        let mid = (head + 3 * per + per / 2) / part; // the middle of stream 3
        assert!(keys[mid] > 300 && keys[mid] < 600, "{}", keys[mid]);
        // The scales after the weights come first too (decoded while the weights arrive).
        assert_eq!(read_key(wlen, wlen + 4096, wlen), 0);
    }
}
