//! Huffman decoder: one segment in, exactly `dst.len()` bytes out, or a typed error.
//!
//! Invariant: never reads outside `src`, never writes outside `dst`, never panics, whatever the
//! input. The fast loop uses unchecked loads and stores; before it runs, the number of
//! iterations is bounded so that every access is in bounds for any input (each refill advances
//! at most 7 bytes, because every table entry of a validated complete code has a length of 1 to
//! 11). The last symbols of each stream go through a checked reader. The streams are decoded in
//! lock step so their table lookups (the latency chain of a Huffman decoder) overlap.
//!
//! Bit reader ("marker" refill): a window of 64 bits is loaded from the stream with its top bit
//! forced to 1; consuming bits shifts the window right, so the marker drifts down and
//! `leading_zeros` of the window is exactly the number of bits consumed from it. A refill
//! advances by the whole bytes consumed and reloads, leaving at least 56 fresh bits: enough for
//! five codes of at most 11 bits. No per-symbol bit counter is kept.

use super::{
    parse_header, parse_header_of, stream_quota, Header, MAX_CODE_LEN, MAX_STREAMS, SYMBOLS,
};
use crate::codec::CodecError;

const TABLE_BITS: u32 = MAX_CODE_LEN as u32;
const TABLE_SIZE: usize = 1 << TABLE_BITS;
const TABLE_MASK: u64 = TABLE_SIZE as u64 - 1;
const MARK: u64 = 1 << 63;
/// Codes decoded per stream between refills: 7 leftover bits + 5 * 11 <= 63 bits of window.
const SYMS_PER_REFILL: usize = 5;
/// Most bytes a refill can advance: at most 62 bits were consumed since the last one.
const MAX_ADVANCE: usize = 7;

/// A reusable Huffman decoder: holds the lookup table so decoding allocates nothing.
pub struct HuffmanDecoder {
    /// Entry for every 11-bit window: code length in the low byte, symbol in the high byte.
    /// The length sits in the low bits so it can be the shift count as loaded (x86 `shrx`
    /// and ARM `lsr` use only the low 6 bits of the count register).
    table: Box<[u16; TABLE_SIZE]>,
}

impl Default for HuffmanDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HuffmanDecoder {
    pub fn new() -> Self {
        Self {
            table: Box::new([0; TABLE_SIZE]),
        }
    }

    /// Decode one Huffman segment into `dst`, which must have exactly the segment's decoded length.
    pub fn decode_into(&mut self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        let h = parse_header(src)?;
        if h.decoded_len != dst.len() {
            return Err(CodecError::LengthMismatch {
                expected: dst.len(),
                got: h.decoded_len,
            });
        }
        build_table(&h.lens, &mut self.table);
        let t = &*self.table;
        match h.streams {
            1 => decode_streams::<1>(t, src, &h, dst)?,
            2 => decode_streams::<2>(t, src, &h, dst)?,
            4 => decode_streams::<4>(t, src, &h, dst)?,
            5 => decode_streams::<5>(t, src, &h, dst)?,
            6 => decode_streams::<6>(t, src, &h, dst)?,
            7 => decode_streams::<7>(t, src, &h, dst)?,
            8 => decode_streams::<8>(t, src, &h, dst)?,
            16 => decode_streams::<16>(t, src, &h, dst)?,
            _ => decode_any(t, src, &h, dst)?,
        }
        Ok(dst.len())
    }
}

impl HuffmanDecoder {
    /// [`Self::decode_into`] with the segment's streams decoded side by side on the rayon pool,
    /// one task per stream, when the pool has a thread for each stream and the segment is large
    /// enough to pay for the tasks; otherwise the single-thread lock-step decode. Same bytes out.
    /// Streams are independent (formats/codecs-v1.md §2.5), so a lone expert that missed the
    /// cache is decoded on as many cores as it has streams instead of one. The machine must
    /// have a core for each stream too (an I/O pool may have more threads than cores).
    pub fn decode_into_parallel(
        &mut self,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, CodecError> {
        use rayon::prelude::*;
        let h = parse_header(src)?;
        let lanes = rayon::current_num_threads().min(cores()).min(h.streams);
        if h.streams < 2 || dst.len() < PARALLEL_MIN_BYTES || lanes < h.streams {
            return self.decode_into(src, dst);
        }
        if h.decoded_len != dst.len() {
            return Err(CodecError::LengthMismatch {
                expected: dst.len(),
                got: h.decoded_len,
            });
        }
        build_table(&h.lens, &mut self.table);
        let t = &*self.table;
        let starts = stream_starts(&h);
        let q = stream_quota(dst.len(), h.streams).max(1);
        let mut chunks = dst.chunks_mut(q);
        let work: Vec<(usize, &mut [u8])> = (0..h.streams)
            .map(|s| (s, chunks.next().unwrap_or(&mut [])))
            .collect();
        work.into_par_iter()
            .try_for_each(|(s, out)| decode_alone(t, src, starts[s], h.stream_lens[s], out, s))?;
        Ok(dst.len())
    }
}

/// A segment decoded while its bytes are still arriving (a lone cache miss read in parts,
/// out of order): the streams advance in lock step as far as every stream's arrived bytes
/// allow ([`HuffmanDecoder::advance`]), and [`HuffmanDecoder::finish`] decodes the rest once
/// the whole segment is there. Same bytes out as [`HuffmanDecoder::decode_into`], and the
/// same errors: a damaged stream is found by `finish`, and nothing decoded before it is
/// usable until `finish` returned `Ok`.
#[derive(Clone)]
pub struct Progressive {
    h: Header,
    starts: [usize; MAX_STREAMS + 1],
    rs: [Reader; MAX_STREAMS],
    /// The streams this decode covers: `lo..hi` (all of them unless [`Progressive::split`]).
    lo: usize,
    hi: usize,
    /// Symbols decoded so far by each of its streams (lock step).
    done: usize,
    total: usize,
}

impl Progressive {
    /// Bytes the segment decodes to.
    pub fn decoded_len(&self) -> usize {
        self.h.decoded_len
    }

    /// Streams of the segment.
    pub fn streams(&self) -> usize {
        self.h.streams
    }

    /// Where stream `s` starts in the segment (`s == streams()`: where the last one ends).
    pub fn stream_start(&self, s: usize) -> usize {
        self.starts[s]
    }

    /// The streams this decode covers.
    pub fn stream_range(&self) -> std::ops::Range<usize> {
        self.lo..self.hi
    }

    /// Splits the decode into `groups` decodes of consecutive streams (as equal as can be; at
    /// most one per stream), each advanced and finished on its own, by different threads at
    /// once if wanted: they write disjoint parts of the output. Their outputs together are the
    /// whole decode's.
    pub fn split(self, groups: usize) -> Vec<Progressive> {
        let n = self.hi - self.lo;
        let groups = groups.clamp(1, n.max(1));
        (0..groups)
            .map(|g| Progressive {
                lo: self.lo + g * n / groups,
                hi: self.lo + (g + 1) * n / groups,
                ..self.clone()
            })
            .collect()
    }

    /// Symbols each of its streams has decoded so far: stream `s`'s output is
    /// `dst[s * q..s * q + done]` with `q = ceil(decoded_len / streams)` (clipped at its end).
    pub fn done(&self) -> usize {
        self.done
    }

    /// Output bytes each stream produces (the last one may produce fewer).
    pub fn quota(&self) -> usize {
        stream_quota(self.h.decoded_len, self.h.streams).max(1)
    }
}

impl HuffmanDecoder {
    /// Starts a progressive decode of a segment of `total` bytes from its first bytes `head`,
    /// which must hold its header (a few hundred bytes at most). Builds this decoder's table, so
    /// the same decoder must advance and finish it, with no other segment in between.
    pub fn start(&mut self, head: &[u8], total: usize) -> Result<Progressive, CodecError> {
        let h = parse_header_of(head, total)?;
        build_table(&h.lens, &mut self.table);
        let starts = stream_starts(&h);
        let rs = std::array::from_fn(|s| Reader::new(starts[s]));
        let hi = h.streams;
        Ok(Progressive {
            h,
            starts,
            rs,
            lo: 0,
            hi,
            done: 0,
            total,
        })
    }

    /// Decodes in lock step as far as the arrived bytes allow: `arrived_to(pos)` is the end of
    /// the run of arrived bytes that holds `pos` (`pos` itself when it has not arrived), at most
    /// the segment's length. Writes stream outputs into the decoded buffer at `dst`, only past
    /// what each stream had decoded before the call: the decoded part of each stream
    /// (`dst[s * q..s * q + done]`) is never written again, so other threads may read it while
    /// this runs. Returns the symbols each stream has decoded so far ([`Progressive::done`]).
    /// Groups of more than 8 streams do nothing here; `finish` decodes them.
    ///
    /// # Safety
    /// `src` points at the segment's first byte; every byte `arrived_to` reports as arrived is
    /// readable there and is no longer written. `dst` points at `decoded_len()` writable bytes,
    /// of which nothing past each stream's decoded part is read or written by anyone else
    /// during the call.
    pub unsafe fn advance(
        &self,
        p: &mut Progressive,
        src: *const u8,
        arrived_to: &dyn Fn(usize) -> usize,
        dst: *mut u8,
    ) -> usize {
        let t = &*self.table;
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match p.hi - p.lo {
                1 => lock_step::<1>(t, src, p, arrived_to, dst),
                2 => lock_step::<2>(t, src, p, arrived_to, dst),
                3 => lock_step::<3>(t, src, p, arrived_to, dst),
                4 => lock_step::<4>(t, src, p, arrived_to, dst),
                5 => lock_step::<5>(t, src, p, arrived_to, dst),
                6 => lock_step::<6>(t, src, p, arrived_to, dst),
                7 => lock_step::<7>(t, src, p, arrived_to, dst),
                8 => lock_step::<8>(t, src, p, arrived_to, dst),
                _ => {}
            }
        }
        p.done
    }

    /// Finishes a progressive decode once the whole segment `src` has arrived: the lock step
    /// to its end, then each stream's last symbols on the checked reader, and the check that
    /// every stream ends where its stored length says.
    pub fn finish(&self, p: Progressive, src: &[u8], dst: &mut [u8]) -> Result<(), CodecError> {
        if dst.len() != p.h.decoded_len {
            return Err(CodecError::LengthMismatch {
                expected: dst.len(),
                got: p.h.decoded_len,
            });
        }
        // SAFETY: `dst` is this call's own and `decoded_len()` long (checked above).
        unsafe { self.finish_streams(p, src, dst.as_mut_ptr()) }
    }

    /// [`Self::finish`] of a decode's own streams only (one of [`Progressive::split`]'s), into
    /// the whole decoded buffer at `dst`: writes only those streams' outputs, so the other
    /// groups may be finished at the same time on other threads.
    ///
    /// # Safety
    /// `dst` points at `decoded_len()` writable bytes, of which nobody else reads or writes
    /// this decode's streams' outputs during the call.
    pub unsafe fn finish_streams(
        &self,
        mut p: Progressive,
        src: &[u8],
        dst: *mut u8,
    ) -> Result<(), CodecError> {
        if src.len() != p.total {
            return Err(CodecError::Truncated {
                needed: p.total,
                available: src.len(),
            });
        }
        let len = src.len();
        // SAFETY: the whole segment is `src`, all of it readable; `dst` as this function's
        // contract says.
        unsafe { self.advance(&mut p, src.as_ptr(), &|_| len, dst) };
        let t = &*self.table;
        let (q, n) = (p.quota(), p.h.decoded_len);
        for s in p.lo..p.hi {
            let (lo, hi) = ((s * q).min(n), ((s + 1) * q).min(n));
            // SAFETY: stream `s`'s output, inside the `n` bytes at `dst`, this call's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.add(lo), hi - lo) };
            let done = p.done.min(out.len());
            finish_stream(
                t,
                src,
                p.rs[s],
                out,
                done,
                (p.starts[s], p.h.stream_lens[s], s),
            )?;
        }
        Ok(())
    }
}

/// [`HuffmanDecoder::advance`] for `N` streams.
///
/// # Safety
/// As `advance`.
unsafe fn lock_step<const N: usize>(
    table: &[u16; TABLE_SIZE],
    src: *const u8,
    p: &mut Progressive,
    arrived_to: &dyn Fn(usize) -> usize,
    dst: *mut u8,
) {
    let (q, n, first) = (p.quota(), p.h.decoded_len, p.lo);
    // Each stream's output past what it has decoded: the only bytes this call writes.
    let start = p.done;
    let mut outs: [&mut [u8]; N] = std::array::from_fn(|i| {
        let s = first + i;
        let (lo, hi) = ((s * q).min(n), ((s + 1) * q).min(n));
        let from = (lo + start).min(hi);
        // SAFETY: `from..hi` lies inside the `n` bytes at `dst` (the caller's contract), the
        // streams' ranges are disjoint, and nobody else touches a stream's undecoded part.
        unsafe { std::slice::from_raw_parts_mut(dst.add(from), hi - from) }
    });
    let shortest = outs.iter().map(|o| o.len()).min().unwrap_or(0);
    let mut rs: [Reader; N] = std::array::from_fn(|i| p.rs[first + i]);
    let mut i = 0;
    loop {
        let by_out = (shortest - i) / SYMS_PER_REFILL;
        // A stream may read into the next one's bytes (its last refill), so the bound is the
        // arrived run from its position, whatever stream those bytes belong to.
        let by_in = rs
            .iter()
            .map(|r| {
                let to = arrived_to(r.pos).min(p.total);
                to.saturating_sub(r.pos + 8) / MAX_ADVANCE
            })
            .min()
            .unwrap_or(0);
        let k = by_out.min(by_in);
        if k == 0 {
            break;
        }
        // SAFETY: k <= by_in gives every stream pos + 8 + k * MAX_ADVANCE <= the end of the
        // arrived run it reads (the caller's contract), and k <= by_out keeps every write
        // inside the shortest output.
        i = unsafe { fast_loop(table, src, &mut rs, &mut outs, i, k) };
    }
    p.done = start + i;
    p.rs[first..first + N].copy_from_slice(&rs);
}

/// Below this many decoded bytes a segment is decoded on one thread.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// One stream on its own: the fast loop while its input allows, then the checked reader.
fn decode_alone(
    table: &[u16; TABLE_SIZE],
    src: &[u8],
    start: usize,
    stored: usize,
    out: &mut [u8],
    stream: usize,
) -> Result<(), CodecError> {
    finish_stream(
        table,
        src,
        Reader::new(start),
        out,
        0,
        (start, stored, stream),
    )
}

/// Decodes `out[done..]` of one stream whose reader `r` has produced `out[..done]`: the fast
/// loop while the stream's input allows, then the checked reader; then checks the stream ends
/// where its stored length says. `(start, stored, stream)` locate the stream for that check.
fn finish_stream(
    table: &[u16; TABLE_SIZE],
    src: &[u8],
    r: Reader,
    out: &mut [u8],
    mut done: usize,
    (start, stored, stream): (usize, usize, usize),
) -> Result<(), CodecError> {
    let mut one = [r];
    let mut outs = [out];
    loop {
        let by_out = (outs[0].len() - done) / SYMS_PER_REFILL;
        let by_in = src.len().saturating_sub(one[0].pos + 8) / MAX_ADVANCE;
        let k = by_out.min(by_in);
        if k == 0 {
            break;
        }
        // SAFETY: k <= by_in keeps every refill load inside `src`, and done + 5k <= the
        // output's length keeps every store inside it (as in `decode_streams`).
        done = unsafe { fast_loop(table, src.as_ptr(), &mut one, &mut outs, done, k) };
    }
    let r = &mut one[0];
    for o in outs[0][done..].iter_mut() {
        r.refill_tail(src);
        *o = r.symbol(table);
    }
    check_end(r, start, stored, stream)
}

/// Fill the table from validated (complete, <= 11 bits) lengths: a code `c` of length `l`
/// (bit-reversed, first bit lowest) owns every index whose low `l` bits equal `c`.
fn build_table(lens: &[u8; SYMBOLS], table: &mut [u16; TABLE_SIZE]) {
    let codes = super::canonical_codes_reversed(lens);
    for s in 0..SYMBOLS {
        let l = lens[s] as usize;
        if l == 0 {
            continue;
        }
        let entry = l as u16 | (s as u16) << 8;
        let mut i = codes[s] as usize;
        while i < TABLE_SIZE {
            table[i] = entry;
            i += 1 << l;
        }
    }
}

/// One stream's reader state: the window and the byte offset (in the segment) it was loaded from.
#[derive(Clone, Copy)]
struct Reader {
    buf: u64,
    pos: usize,
}

impl Reader {
    fn new(start: usize) -> Self {
        // A window that has consumed nothing: the first refill loads at `start`.
        Self {
            buf: MARK,
            pos: start,
        }
    }

    /// Bits consumed from the current window.
    #[inline(always)]
    fn consumed(&self) -> u32 {
        self.buf.leading_zeros()
    }

    /// Refill from a position known to have 8 readable bytes.
    ///
    /// # Safety
    /// `src` points at the segment's first byte, and the 8 bytes at `self.pos + MAX_ADVANCE`
    /// are readable (inside the segment, and arrived where it is still being read): the fast
    /// loop's iteration bound guarantees it.
    #[inline(always)]
    unsafe fn refill_fast(&mut self, src: *const u8) {
        let c = self.consumed();
        self.pos += (c >> 3) as usize;
        // SAFETY: c <= 62 bits were consumed since the last refill, so pos advanced by at most
        // MAX_ADVANCE bytes, and the caller guarantees 8 readable bytes from there.
        let w = unsafe { src.add(self.pos).cast::<u64>().read_unaligned() };
        self.buf = (u64::from_le(w) | MARK) >> (c & 7);
    }

    /// Refill anywhere: bytes past the end of the segment read as zero.
    #[inline(always)]
    fn refill_tail(&mut self, src: &[u8]) {
        let c = self.consumed();
        self.pos = self.pos.saturating_add((c >> 3) as usize);
        let mut b = [0u8; 8];
        if self.pos < src.len() {
            let avail = (src.len() - self.pos).min(8);
            b[..avail].copy_from_slice(&src[self.pos..self.pos + avail]);
        }
        self.buf = (u64::from_le_bytes(b) | MARK) >> (c & 7);
    }

    #[inline(always)]
    fn symbol(&mut self, table: &[u16; TABLE_SIZE]) -> u8 {
        let e = table[(self.buf & TABLE_MASK) as usize];
        self.buf >>= e & 63;
        (e >> 8) as u8
    }

    /// Total bits consumed since the stream's `start`.
    fn total_consumed(&self, start: usize) -> usize {
        (self.pos - start) * 8 + self.consumed() as usize
    }
}

/// Stream byte ranges inside the segment.
fn stream_starts(h: &Header) -> [usize; super::MAX_STREAMS + 1] {
    let mut starts = [0usize; super::MAX_STREAMS + 1];
    starts[0] = h.data_start;
    for s in 0..h.streams {
        // Cannot overflow: parse_header checked that the sum ends inside the segment.
        starts[s + 1] = starts[s] + h.stream_lens[s];
    }
    starts
}

/// A stream must end exactly where its stored length says: no bit read past it, no whole
/// byte left unread.
fn check_end(r: &Reader, start: usize, stored: usize, stream: usize) -> Result<(), CodecError> {
    let bits = r.total_consumed(start);
    if bits.div_ceil(8) != stored {
        return Err(CodecError::StreamLength {
            stream,
            consumed_bits: bits,
            stored_bytes: stored,
        });
    }
    Ok(())
}

fn decode_streams<const N: usize>(
    table: &[u16; TABLE_SIZE],
    src: &[u8],
    h: &Header,
    dst: &mut [u8],
) -> Result<(), CodecError> {
    let starts = stream_starts(h);
    let q = stream_quota(dst.len(), N).max(1);
    let mut outs: [&mut [u8]; N] = std::array::from_fn(|_| &mut [][..]);
    for (o, chunk) in outs.iter_mut().zip(dst.chunks_mut(q)) {
        *o = chunk;
    }
    let mut rs: [Reader; N] = std::array::from_fn(|s| Reader::new(starts[s]));
    let shortest = outs.iter().map(|o| o.len()).min().unwrap_or(0);

    let mut i = 0;
    loop {
        // Iterations that keep every refill load inside `src` and every write inside the
        // shortest output: a refill advances at most MAX_ADVANCE bytes and then reads 8.
        let by_out = (shortest - i) / SYMS_PER_REFILL;
        let by_in = rs
            .iter()
            .map(|r| src.len().saturating_sub(r.pos + 8) / MAX_ADVANCE)
            .min()
            .unwrap_or(0);
        let k = by_out.min(by_in);
        if k == 0 {
            break;
        }
        // SAFETY: k <= by_in gives every stream pos + 8 + k * MAX_ADVANCE <= src.len().
        i = unsafe { fast_loop(table, src.as_ptr(), &mut rs, &mut outs, i, k) };
    }
    // The lock step stops when the most constrained stream (the last one, which ends at the
    // segment's end) nears the end of its input; the others finish alone, still on the fast
    // loop where their input allows, then on the checked reader.
    for s in 0..N {
        let done = i.min(outs[s].len());
        finish_stream(
            table,
            src,
            rs[s],
            &mut *outs[s],
            done,
            (starts[s], h.stream_lens[s], s),
        )?;
    }
    Ok(())
}

/// `k` iterations of: refill every stream, then decode SYMS_PER_REFILL symbols from each into
/// `outs[s][i..]`. Symbols are decoded in symbol-major order (symbol j of every stream, then
/// symbol j + 1): the streams' dependency chains then sit side by side in the instruction
/// stream, so the scheduler always has independent work (stream-major order measured slower).
///
/// # Safety
/// Each of the `k` iterations must find 8 readable bytes at every stream's refill position:
/// `rs[s].pos + 8 + k * MAX_ADVANCE <= src.len()` for every stream, and every output must have
/// room: `i + k * SYMS_PER_REFILL <= outs[s].len()` (see `decode_streams`).
#[inline(always)]
unsafe fn fast_loop_body<const N: usize>(
    table: &[u16; TABLE_SIZE],
    src: *const u8,
    rs: &mut [Reader; N],
    outs: &mut [&mut [u8]; N],
    mut i: usize,
    k: usize,
) -> usize {
    let ptrs: [*mut u8; N] = std::array::from_fn(|s| outs[s].as_mut_ptr());
    let mut local = *rs;
    for _ in 0..k {
        for r in local.iter_mut() {
            // SAFETY: the caller's bound covers this iteration's refill (see above).
            unsafe { r.refill_fast(src) };
        }
        // Written out five times (SYMS_PER_REFILL) rather than as a loop: the compiler does
        // not fully unroll a 5 x 8 nest, and a rolled loop keeps the streams' state in memory.
        let mut round = |j: usize| {
            for s in 0..N {
                let b = local[s].symbol(table);
                // SAFETY: i + j < i + SYMS_PER_REFILL <= outs[s].len() by the caller's bound,
                // and the N outputs are disjoint slices.
                unsafe { *ptrs[s].add(i + j) = b };
            }
        };
        round(0);
        round(1);
        round(2);
        round(3);
        round(4);
        const _: () = assert!(SYMS_PER_REFILL == 5);
        i += SYMS_PER_REFILL;
    }
    *rs = local;
    i
}

/// With BMI2 and LZCNT, variable shifts take any register (`shrx`) and `leading_zeros` is one
/// instruction: the same loop, compiled for CPUs that have them.
///
/// # Safety
/// As `fast_loop_body`, and the CPU must have BMI1, BMI2 and LZCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi1,bmi2,lzcnt")]
unsafe fn fast_loop_bmi2<const N: usize>(
    table: &[u16; TABLE_SIZE],
    src: *const u8,
    rs: &mut [Reader; N],
    outs: &mut [&mut [u8]; N],
    i: usize,
    k: usize,
) -> usize {
    // SAFETY: forwarded from this function's contract.
    unsafe { fast_loop_body(table, src, rs, outs, i, k) }
}

/// # Safety
/// As `fast_loop_body`.
unsafe fn fast_loop<const N: usize>(
    table: &[u16; TABLE_SIZE],
    src: *const u8,
    rs: &mut [Reader; N],
    outs: &mut [&mut [u8]; N],
    i: usize,
    k: usize,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("bmi2") && std::is_x86_feature_detected!("lzcnt") {
            // SAFETY: the CPU has every feature the function is compiled for (checked just
            // above); the bound is forwarded from this function's contract.
            return unsafe { fast_loop_bmi2(table, src, rs, outs, i, k) };
        }
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { fast_loop_body(table, src, rs, outs, i, k) }
}

/// Any stream count: each stream decoded on its own with the tail reader (slower, same result).
fn decode_any(
    table: &[u16; TABLE_SIZE],
    src: &[u8],
    h: &Header,
    dst: &mut [u8],
) -> Result<(), CodecError> {
    let starts = stream_starts(h);
    let q = stream_quota(dst.len(), h.streams).max(1);
    let mut chunks = dst.chunks_mut(q);
    for (s, (&start, &stored)) in starts
        .iter()
        .zip(&h.stream_lens)
        .take(h.streams)
        .enumerate()
    {
        let mut r = Reader::new(start);
        for o in chunks.next().unwrap_or(&mut []).iter_mut() {
            r.refill_tail(src);
            *o = r.symbol(table);
        }
        check_end(&r, start, stored, s)?;
    }
    Ok(())
}

use crate::env::cores;
