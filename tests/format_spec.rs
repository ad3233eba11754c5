//! The spec and the code agree: a pack written by `PackWriter` is checked byte by byte against
//! the offsets of formats/flashpack-v1.md, and read back by `Pack`.

use crate::common::{self, *};
use flashpack::format::{required, Pack, PackError, ProjBits, QuantMode, SectionKind, MAGIC};
use flashpack::mapped::Bytes;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// (kind, flags, offset, stored_len, decoded_len, blake3) of each section, read by the spec's §3 offsets.
fn sections(b: &[u8]) -> Vec<(u32, u32, u64, u64, u64, [u8; 32])> {
    let n = u32_at(b, 36) as usize;
    (0..n)
        .map(|i| {
            let e = 64 + 64 * i;
            (
                u32_at(b, e),
                u32_at(b, e + 4),
                u64_at(b, e + 8),
                u64_at(b, e + 16),
                u64_at(b, e + 24),
                b[e + 32..e + 64].try_into().unwrap(),
            )
        })
        .collect()
}

#[test]
fn bytes_follow_the_spec_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 16384);
    let b = std::fs::read(&path).unwrap();
    // §2.1 fixed header
    assert_eq!(&b[0..8], &MAGIC);
    assert_eq!(&b[0..8], b"\x89FPACK\r\n");
    assert_eq!(u16_at(&b, 8), 1);
    assert_eq!(u16_at(&b, 10), flashpack::format::MINOR_VERSION);
    assert_eq!(u32_at(&b, 12), 64);
    assert_eq!(
        u64_at(&b, 16),
        required::VERTICAL_SEGMENTS,
        "expert 1 has two segments"
    );
    assert_eq!(u32_at(&b, 32), 16384);
    assert_eq!(u32_at(&b, 36), 5);
    assert_eq!(u64_at(&b, 40), b.len() as u64);
    assert!(b[48..64].iter().all(|&x| x == 0));
    // §2.3 header checksum right after the table
    let hashed = 64 + 64 * 5;
    assert_eq!(
        &b[hashed..hashed + 32],
        blake3::hash(&b[..hashed]).as_bytes()
    );
    assert!(
        b[hashed + 32..16384].iter().all(|&x| x == 0),
        "header region padding is zero"
    );

    let secs = sections(&b);
    let find = |k: SectionKind| *secs.iter().find(|s| s.0 == k as u32).unwrap();
    // §3.1 data sections: page-aligned, zero checksum, not compressed
    for k in [SectionKind::DenseData, SectionKind::ExpertData] {
        let s = find(k);
        assert_eq!(s.2 % 16384, 0);
        assert_eq!((s.1, s.3), (0, s.4));
        assert_eq!(s.5, [0; 32]);
    }
    // hashed sections carry blake3 of their stored bytes; metadata is zstd
    for k in [
        SectionKind::Metadata,
        SectionKind::TensorDir,
        SectionKind::ExpertDir,
    ] {
        let s = find(k);
        assert_eq!(
            &s.5,
            blake3::hash(&b[s.2 as usize..(s.2 + s.3) as usize]).as_bytes()
        );
    }
    let meta = find(SectionKind::Metadata);
    assert_eq!(meta.1, 1);
    let json = zstd::decode_all(&b[meta.2 as usize..(meta.2 + meta.3) as usize]).unwrap();
    assert_eq!(json.len() as u64, meta.4);
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["format"], "flashpack");

    // §5 tensor directory
    let td = find(SectionKind::TensorDir);
    let t = &b[td.2 as usize..(td.2 + td.3) as usize];
    let (count, entry_size, strings_len) = (
        u32_at(t, 0) as usize,
        u32_at(t, 4) as usize,
        u64_at(t, 8) as usize,
    );
    assert_eq!((count, entry_size), (2, 112));
    assert_eq!(t.len(), 16 + count * entry_size + strings_len);
    let strings = &t[16 + count * entry_size..];
    let e0 = &t[16..16 + 112];
    let name = &strings[u32_at(e0, 0) as usize..][..u32_at(e0, 4) as usize];
    assert_eq!(name, b"model.embed_tokens.weight");
    assert_eq!(
        (e0[8], e0[9], e0[10], e0[11]),
        (2, 0, 0, 2),
        "bf16, plain, raw, 2-D"
    );
    assert_eq!(
        (u64_at(e0, 16), u64_at(e0, 24), u64_at(e0, 32)),
        (16, HIDDEN as u64, 0)
    );
    let (off, stored, decoded) = (u64_at(e0, 48), u64_at(e0, 56), u64_at(e0, 64));
    assert_eq!(off, find(SectionKind::DenseData).2);
    assert_eq!((stored, decoded), (16 * 128 * 2, 16 * 128 * 2));
    assert_eq!(
        &e0[72..104],
        blake3::hash(&b[off as usize..(off + stored) as usize]).as_bytes()
    );
    assert_eq!(
        &b[off as usize..(off + stored) as usize],
        &noise(1, stored as usize)[..]
    );

    // §6.1 expert directory: 2 layers x (1 + 2 segments)
    let ed = find(SectionKind::ExpertDir);
    let x = &b[ed.2 as usize..(ed.2 + ed.3) as usize];
    assert_eq!(
        (u32_at(x, 0), u32_at(x, 4), u32_at(x, 8), u32_at(x, 12)),
        (6, 112, HIDDEN, INTER)
    );
    let data = find(SectionKind::ExpertData);
    for i in 0..6 {
        let e = &x[16 + 112 * i..][..112];
        let (layer, expert, seg, nseg) = (u32_at(e, 0), u32_at(e, 4), u16_at(e, 8), u16_at(e, 10));
        assert_eq!(
            (layer, expert),
            ((i / 3) as u32, if i % 3 == 0 { 0 } else { 1 })
        );
        assert_eq!(nseg, if expert == 0 { 1 } else { 2 });
        assert_eq!(
            (e[12], e[13], e[14], e[15], u32_at(e, 16)),
            (4, 0, 0, 2, 64)
        );
        let rows = u32_at(e, 24);
        assert_eq!(u32_at(e, 20), seg as u32 * rows);
        let (off, stored, decoded, wst, wdec) = (
            u64_at(e, 32),
            u64_at(e, 40),
            u64_at(e, 48),
            u64_at(e, 56),
            u64_at(e, 64),
        );
        assert_eq!(off % 16384, 0, "segments start on pages");
        assert!(off >= data.2 && off + stored <= data.2 + data.3);
        assert_eq!(wdec, 3 * rows as u64 * HIDDEN as u64 * 4 / 8);
        assert_eq!(decoded - wdec, 6 * rows as u64 * (HIDDEN as u64 / 64) * 2);
        assert_eq!((stored, wst), (decoded, wdec), "raw parts");
        assert_eq!(
            &e[72..104],
            blake3::hash(&b[off as usize..(off + stored) as usize]).as_bytes()
        );
    }
}

#[test]
fn reader_returns_what_the_writer_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 4096);
    let pack = Pack::open(&path).unwrap();
    assert_eq!(pack.page_size(), 4096);
    assert_eq!(pack.tensors().len(), 2);
    let norm = pack.tensor("model.norm.weight").unwrap();
    assert_eq!(pack.tensor_stored(norm), &noise(2, HIDDEN as usize * 4)[..]);
    assert!(pack.tensor("missing").is_none());
    let segs = pack.expert_segments(1, 1);
    assert_eq!(segs.len(), 2);
    let seed = 100 + 10 + 1;
    let stored = pack.segment_stored(&segs[1]);
    let wl = segs[1].weights_stored_len as usize;
    assert_eq!(&stored[..wl], &noise(seed, wl)[..]);
    assert_eq!(&stored[wl..], &noise(seed + 1000, stored.len() - wl)[..]);
    assert!(pack.expert_segments(5, 0).is_empty());
    assert!(pack.verify().is_ok());
    // The same reader works over a buffer.
    let buf = Pack::from_bytes(Bytes::from_vec(std::fs::read(&path).unwrap())).unwrap();
    assert_eq!(buf.experts(), pack.experts());
}

#[test]
fn same_input_gives_identical_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = std::fs::read(write_small_pack(a.path(), 16384)).unwrap();
    let pb = std::fs::read(write_small_pack(b.path(), 16384)).unwrap();
    assert_eq!(blake3::hash(&pa), blake3::hash(&pb));
}

#[test]
fn unfinished_write_leaves_destination_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.flashpack");
    std::fs::write(&dest, b"previous pack").unwrap();
    {
        let mut w = flashpack::format::PackWriter::create(&dest, 16384, HIDDEN, INTER).unwrap();
        w.add_tensor(
            flashpack::format::TensorDesc {
                name: "a".into(),
                dtype: flashpack::format::DType::F32,
                shape: vec![4],
                bits: 0,
                group_size: 0,
                mode: QuantMode::Affine,
                codec: 0,
            },
            &[0; 16],
        )
        .unwrap();
        // dropped without finish(): an interrupted conversion
    }
    assert_eq!(std::fs::read(&dest).unwrap(), b"previous pack");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left behind: {names:?}");
}

#[test]
fn writer_refuses_unsorted_input_and_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.flashpack");
    let mut w = flashpack::format::PackWriter::create(&dest, 16384, HIDDEN, INTER).unwrap();
    let desc = |name: &str| flashpack::format::TensorDesc {
        name: name.into(),
        dtype: flashpack::format::DType::F32,
        shape: vec![1],
        bits: 0,
        group_size: 0,
        mode: QuantMode::Affine,
        codec: 0,
    };
    w.add_tensor(desc("b"), &[0; 4]).unwrap();
    assert!(matches!(
        w.add_tensor(desc("a"), &[0; 4]),
        Err(PackError::Writer { .. })
    ));
    let seg = flashpack::format::ExpertSegmentDesc {
        layer: 0,
        expert: 0,
        segment: 0,
        segment_count: 1,
        row_start: 0,
        row_count: 100, // not a multiple of the group size
        bits: ProjBits::uniform(4),
        group_size: 64,
        scale_dtype: flashpack::format::DType::BF16,
        mode: QuantMode::Affine,
        weight_codec: 0,
        aux_codec: 0,
        bias_dtype: None,
    };
    assert!(matches!(
        w.add_expert_segment(seg, &[], &[]),
        Err(PackError::Writer { .. })
    ));
    drop(w);
    assert!(!dest.exists());
}

#[test]
fn missing_destination_folder_is_a_clear_error() {
    let err = flashpack::format::PackWriter::create(
        std::path::Path::new("/nonexistent-dir/x.flashpack"),
        16384,
        128,
        128,
    )
    .err()
    .unwrap();
    assert!(matches!(err, PackError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent-dir"));
}

/// §6.1 (format 1.1): an expert whose projections have different bits stores them at offset
/// 104, `bits` holds the largest, and the pack declares `PROJECTION_BITS`; uniform experts keep
/// the 1.0 bytes (zeros). A reader refuses inconsistent values and undeclared use.
#[test]
fn projection_bits_round_trip_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let split = ProjBits([2, 2, 6]);
    let path = write_small_pack_with_bits(dir.path(), 4096, |layer, expert| {
        if (layer, expert) == (1, 1) {
            split
        } else {
            ProjBits::uniform(4)
        }
    });
    let pack = Pack::open(&path).unwrap();
    for e in pack.experts() {
        let want = if (e.layer, e.expert) == (1, 1) {
            split
        } else {
            ProjBits::uniform(4)
        };
        assert_eq!(e.bits, want, "{:?}", e.key());
        // rows * hidden * (2 + 2 + 6) / 8 for the split expert.
        assert_eq!(
            e.weights_decoded_len,
            e.row_count as u64 * HIDDEN as u64 * want.sum() / 8
        );
    }
    let b = std::fs::read(&path).unwrap();
    assert_eq!(
        u64_at(&b, 16) & required::PROJECTION_BITS,
        required::PROJECTION_BITS
    );
    let entry = |i: usize| expert_entry_at(&b, i);
    // Entries: (0,0,0) (0,1,0) (0,1,1) (1,0,0) (1,1,0) (1,1,1).
    assert_eq!(b[entry(0) + 12], 4);
    assert_eq!(&b[entry(0) + 104..entry(0) + 112], &[0u8; 8]);
    assert_eq!(b[entry(4) + 12], 6);
    assert_eq!(
        &b[entry(4) + 104..entry(4) + 112],
        &[2, 2, 6, 0, 0, 0, 0, 0]
    );

    let edit = |at: usize, bytes: &[u8]| opened_with(&b, at, bytes);
    for (bytes, field) in [
        (&[6u8, 6, 6][..], "projection_bits"), // all equal: must be written as zeros
        (&[2, 2, 7][..], "projection_bits"),   // not a valid width
        (&[2, 2, 5][..], "projection_bits"),   // largest differs from `bits`
        (&[2, 2, 6, 0, 0, 1][..], "reserved"), // reserved byte
        (&[2, 2, 6, 9][..], "mode"),           // unknown mode
        (&[2, 2, 6, 1][..], "mode"),           // mxfp4 needs uniform 4 bits and u8 scales
    ] {
        let err = edit(entry(4) + 104, bytes).err().unwrap();
        assert!(
            matches!(&err, PackError::BadEntry { field: f, .. } if *f == field),
            "{bytes:?}: {err}"
        );
    }
    // A uniform entry given projection bits that change its size no longer matches its lengths.
    assert!(edit(entry(0) + 104, &[2, 2, 4]).is_err());
    // Undeclared use.
    let mut c = b.clone();
    c[16] &= !(required::PROJECTION_BITS as u8);
    resign(&mut c);
    assert!(matches!(
        Pack::from_bytes(flashpack::mapped::Bytes::from_vec(c)),
        Err(PackError::UndeclaredFeature { .. })
    ));
}

/// §6.4 (format 1.2): experts with projection biases set bit 0 of `flags` and the biases' dtype at
/// offset 108, end their AUX part with the gate and up biases of their rows (and, in segment 0,
/// the down bias), and the pack declares `EXPERT_BIASES`. A reader refuses other flag bits, a
/// non-float or stray dtype, sizes that leave the biases out, undeclared use, and metadata whose
/// `model.expert_bias` disagrees with the directory.
#[test]
fn expert_biases_round_trip_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_small_pack_with_biases(dir.path(), flashpack::format::DType::BF16);
    let pack = Pack::open(&path).unwrap();
    assert_eq!(pack.header().minor, flashpack::format::MINOR_VERSION);
    for e in pack.experts() {
        assert_eq!(e.bias_dtype, Some(flashpack::format::DType::BF16));
        let down = if e.segment == 0 { HIDDEN as u64 } else { 0 };
        // scales + quantization biases (6 * R * H / 64 bf16), then 2R + (H) bf16 biases.
        assert_eq!(
            e.aux_decoded_len(),
            6 * e.row_count as u64 * (HIDDEN as u64 / 64) * 2 + (2 * e.row_count as u64 + down) * 2
        );
    }
    assert!(pack.meta().model.expert_bias);
    let b = std::fs::read(&path).unwrap();
    assert_eq!(
        u64_at(&b, 16) & required::EXPERT_BIASES,
        required::EXPERT_BIASES
    );
    let entry = |i: usize| expert_entry_at(&b, i);
    assert_eq!(&b[entry(0) + 28..entry(0) + 32], &[1, 0, 0, 0]);
    assert_eq!(b[entry(0) + 108], 2, "bf16");
    let edit = |at: usize, bytes: &[u8]| opened_with(&b, at, bytes);
    for (at, bytes, field) in [
        (28, &[3u8][..], "flags"),     // an unknown flag bit
        (108, &[5][..], "bias_dtype"), // u8 biases
        (108, &[9][..], "bias_dtype"), // no such dtype
        (108, &[0, 1][..], "reserved"),
    ] {
        let err = edit(entry(0) + at, bytes).err().unwrap();
        assert!(
            matches!(&err, PackError::BadEntry { field: f, .. } if *f == field),
            "{at} {bytes:?}: {err}"
        );
    }
    // Biases switched off: the AUX length no longer adds up.
    let err = edit(entry(0) + 28, &[0]).err().unwrap();
    assert!(
        matches!(&err, PackError::BadEntry { field, .. } if *field == "bias_dtype" || *field == "decoded_len"),
        "{err}"
    );
    // f32 biases in the same bytes: twice as long, so the sizes disagree.
    assert!(edit(entry(0) + 108, &[0]).is_err());
    // Undeclared use.
    let mut c = b.clone();
    c[17] &= !((required::EXPERT_BIASES >> 8) as u8);
    resign(&mut c);
    assert!(matches!(
        Pack::from_bytes(flashpack::mapped::Bytes::from_vec(c)),
        Err(PackError::UndeclaredFeature { .. })
    ));
    // The metadata must agree with the directory.
    let mut c = b.clone();
    common::edit_metadata(&mut c, |m| m["model"]["expert_bias"] = false.into());
    let err = Pack::from_bytes(flashpack::mapped::Bytes::from_vec(c))
        .err()
        .unwrap();
    assert!(err.to_string().contains("expert_bias"), "{err}");
}

/// Offset in the file of expert directory entry `i` (§6.1; the directory is stored raw).
fn expert_entry_at(b: &[u8], i: usize) -> usize {
    let dir_at = sections(b)
        .iter()
        .find(|s| s.0 == SectionKind::ExpertDir as u32)
        .unwrap()
        .2 as usize;
    dir_at + 16 + 112 * i
}

/// `Pack::from_bytes` of `b` with `bytes` written at `at`, re-signed so the reader's field
/// checks are reached.
fn opened_with(b: &[u8], at: usize, bytes: &[u8]) -> Result<Pack, PackError> {
    let mut c = b.to_vec();
    c[at..at + bytes.len()].copy_from_slice(bytes);
    resign(&mut c);
    Pack::from_bytes(flashpack::mapped::Bytes::from_vec(c))
}

#[test]
fn pieces_check_their_bytes_and_cover_every_byte_but_padding() {
    use flashpack::format::{open_pieces, Check, Header};
    let dir = tempfile::tempdir().unwrap();
    let path = write_small_pack(dir.path(), 4096);
    let bytes = std::fs::read(&path).unwrap();
    let pack = Pack::open(&path).unwrap();
    let header = Header::decode(&bytes).unwrap();
    let mut pieces = open_pieces(&header).unwrap();
    assert_eq!(pieces[0].check, Check::Header);
    assert_eq!(pieces.len(), 4, "header, metadata and the two directories");
    pieces.extend(pack.pieces_where(|_| true, |_| true));
    assert_eq!(
        pieces.len(),
        4 + pack.tensors().len() + pack.experts().len()
    );
    pieces.sort_by_key(|p| p.range.start);
    let mut covered = vec![false; bytes.len()];
    for (a, b) in pieces.iter().zip(pieces.iter().skip(1)) {
        assert!(
            a.range.end <= b.range.start,
            "{} overlaps {}",
            a.what,
            b.what
        );
    }
    for p in &pieces {
        let (s, e) = (p.range.start as usize, p.range.end as usize);
        assert!(p.checks(&bytes[s..e]), "{}", p.what);
        let mut bad = bytes[s..e].to_vec();
        bad[(e - s) / 2] ^= 1;
        assert!(!p.checks(&bad), "{} passes with a flipped byte", p.what);
        covered[s..e].iter_mut().for_each(|c| *c = true);
    }
    // What no piece holds is padding: zeros.
    assert!(bytes.iter().zip(&covered).all(|(&b, &c)| c || b == 0));
    // A layer's filter keeps its segments alone, and the named tensors.
    let one = pack.pieces_where(|n| n == "model.norm.weight", |l| l == 1);
    let segments = pack.experts().iter().filter(|e| e.layer == 1).count();
    assert_eq!(one.len(), 1 + segments);
    assert!(one.iter().any(|p| p.what == "tensor model.norm.weight"));
}
