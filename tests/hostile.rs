//! Hostile input: damaged and malicious packs give their own typed error, never a panic
//! (formats/flashpack-v1.md §8).

use crate::common::*;
use flashpack::format::{Damage, Pack, PackError, SectionKind};
use flashpack::mapped::Bytes;

fn pack_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::read(write_small_pack(dir.path(), 4096)).unwrap()
}

fn open(bytes: &[u8]) -> Result<Pack, PackError> {
    Pack::from_bytes(Bytes::from_vec(bytes.to_vec()))
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn section(b: &[u8], kind: SectionKind) -> (usize, usize) {
    let at = section_entry_at(b, kind);
    let off = u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(b[at + 16..at + 24].try_into().unwrap()) as usize;
    (off, len)
}

#[test]
fn rejects_truncation_at_every_section_boundary() {
    let b = pack_bytes();
    let mut cuts = vec![
        0,
        1,
        63,
        64,
        100,
        64 + 5 * 64,
        64 + 5 * 64 + 31,
        4095,
        4096,
        b.len() - 1,
    ];
    for kind in SectionKind::ALL {
        let (off, len) = section(&b, kind);
        cuts.extend([off, off + 1, off + len.saturating_sub(1), off + len]);
    }
    for cut in cuts.into_iter().filter(|&c| c < b.len()) {
        let err = open(&b[..cut])
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} opened"));
        let expected = match cut {
            0..64 => matches!(err, PackError::NotAPack { .. }),
            _ => matches!(err, PackError::Truncated { .. }),
        };
        assert!(expected, "cut at {cut}: {err}");
    }
}

#[test]
fn rejects_trailing_data() {
    let mut b = pack_bytes();
    b.push(0);
    assert!(matches!(
        open(&b),
        Err(PackError::TrailingData { extra: 1, .. })
    ));
}

#[test]
fn rejects_bad_magic() {
    let mut b = pack_bytes();
    b[0] = b'F';
    assert!(matches!(open(&b), Err(PackError::NotAPack { .. })));
}

#[test]
fn rejects_newer_major() {
    let mut b = pack_bytes();
    b[8] = 2;
    let err = open(&b).err().unwrap();
    assert!(
        matches!(err, PackError::UnsupportedVersion { found_major: 2, .. }),
        "{err}"
    );
}

#[test]
fn accepts_newer_minor() {
    let mut b = pack_bytes();
    b[10] = 7;
    resign(&mut b);
    assert!(open(&b).is_ok());
}

#[test]
fn rejects_unknown_required_flag() {
    let mut b = pack_bytes();
    b[16 + 7] |= 0x80; // bit 63
    let err = open(&b).err().unwrap();
    assert!(
        matches!(err, PackError::UnknownRequiredFeatures { unknown } if unknown == 1 << 63),
        "{err}"
    );
}

#[test]
fn ignores_unknown_optional_flag() {
    let mut b = pack_bytes();
    b[24 + 7] |= 0x80;
    resign(&mut b);
    assert!(open(&b).is_ok());
}

#[test]
fn rejects_undeclared_feature() {
    let mut b = pack_bytes();
    b[16] &= !(1 << 4); // VERTICAL_SEGMENTS, used by the small pack
    resign(&mut b);
    assert!(matches!(open(&b), Err(PackError::UndeclaredFeature { .. })));
}

#[test]
fn rejects_bad_page_size() {
    let mut b = pack_bytes();
    b[32..36].copy_from_slice(&3000u32.to_le_bytes());
    assert!(matches!(
        open(&b),
        Err(PackError::BadHeader {
            field: "page_size",
            ..
        })
    ));
}

#[test]
fn bit_flips_in_header_are_caught() {
    let b = pack_bytes();
    for byte in 0..64 + 5 * 64 + 32 {
        for bit in [0, 3, 7] {
            let mut d = b.clone();
            d[byte] ^= 1 << bit;
            let err = open(&d)
                .err()
                .unwrap_or_else(|| panic!("flip at {byte}.{bit} opened"));
            let ok = match byte {
                0..8 => matches!(err, PackError::NotAPack { .. }),
                8..10 => matches!(err, PackError::UnsupportedVersion { .. }),
                _ => !matches!(
                    err,
                    PackError::NotAPack { .. } | PackError::UnsupportedVersion { .. }
                ),
            };
            assert!(ok, "flip at {byte}.{bit}: {err}");
            if (40..64).contains(&byte) || byte >= 64 {
                // fields only the checksum can vouch for
                assert!(
                    matches!(err, PackError::HeaderChecksum { .. }),
                    "flip at {byte}.{bit}: {err}"
                );
            }
        }
    }
}

#[test]
fn bit_flips_in_directories_and_metadata_are_caught() {
    let b = pack_bytes();
    for (kind, name) in [
        (SectionKind::TensorDir, "TENSOR_DIR"),
        (SectionKind::ExpertDir, "EXPERT_DIR"),
        (SectionKind::Metadata, "METADATA"),
    ] {
        let (off, len) = section(&b, kind);
        for at in [off, off + len / 2, off + len - 1] {
            let mut d = b.clone();
            d[at] ^= 0x10;
            let err = open(&d).err().unwrap();
            assert!(
                matches!(err, PackError::SectionChecksum { section, .. } if section == name),
                "{name} at {at}: {err}"
            );
        }
    }
}

#[test]
fn bit_flips_in_payload_are_named_by_verify() {
    let b = pack_bytes();
    let pack = open(&b).unwrap();
    let seg = pack.expert_segments(1, 1)[1].clone();
    let tensor = pack.tensor("model.norm.weight").unwrap().clone();
    drop(pack);
    let mut d = b.clone();
    d[seg.offset as usize + 5] ^= 1;
    d[tensor.offset as usize] ^= 0x40;
    let pad = (seg.offset + seg.stored_len) as usize + 1; // zero padding after the last segment
    d[pad] = 0xAA;
    let pack = open(&d).expect("payload damage is found by verify, not open");
    assert!(matches!(
        pack.check_segment(&seg),
        Err(PackError::SegmentChecksum {
            layer: 1,
            expert: 1,
            segment: 1
        })
    ));
    let report = pack.verify();
    assert_eq!(report.damages.len(), 3, "{:?}", report.damages);
    assert!(report.damages.iter().any(|d| matches!(
        d,
        Damage::Payload(PackError::SegmentChecksum {
            layer: 1,
            expert: 1,
            segment: 1
        })
    )));
    assert!(report.damages.iter().any(|d| matches!(d, Damage::Payload(PackError::TensorChecksum { name }) if name == "model.norm.weight")));
    assert!(report
        .damages
        .iter()
        .any(|d| matches!(d, Damage::Padding { offset, .. } if *offset == pad as u64)));
}

/// Offset of expert entry `i` inside the file.
fn expert_entry(b: &[u8], i: usize) -> usize {
    section(b, SectionKind::ExpertDir).0 + 16 + 112 * i
}

fn tensor_entry(b: &[u8], i: usize) -> usize {
    section(b, SectionKind::TensorDir).0 + 16 + 112 * i
}

#[test]
fn rejects_segment_offset_past_end() {
    let mut b = pack_bytes();
    let at = expert_entry(&b, 2);
    put_u64(&mut b, at + 32, 1 << 40);
    resign(&mut b);
    let err = open(&b).err().unwrap();
    assert!(
        matches!(
            err,
            PackError::EntryOutOfBounds {
                section: "EXPERT_DIR",
                index: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_tensor_offset_past_end() {
    let mut b = pack_bytes();
    let at = tensor_entry(&b, 1);
    let len = b.len() as u64;
    put_u64(&mut b, at + 48, len - 4);
    resign(&mut b);
    let err = open(&b).err().unwrap();
    assert!(
        matches!(
            err,
            PackError::EntryOutOfBounds {
                section: "TENSOR_DIR",
                index: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_overflowing_lengths() {
    let mut b = pack_bytes();
    let at = expert_entry(&b, 0);
    put_u64(&mut b, at + 40, u64::MAX - 8); // stored_len
    put_u64(&mut b, at + 56, 0); // weights_stored_len (codec raw would object first)
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::BadEntry {
            section: "EXPERT_DIR",
            index: 0,
            ..
        })
    ));

    let mut b = pack_bytes();
    let at = tensor_entry(&b, 0);
    b[at + 10] = 2; // zstd, so stored_len may differ from decoded_len
    b[16] |= 1 << 1; // and declare CODEC_ZSTD
    put_u64(&mut b, at + 56, u64::MAX);
    resign(&mut b);
    let err = open(&b).err().unwrap();
    assert!(
        matches!(
            err,
            PackError::EntryOutOfBounds {
                section: "TENSOR_DIR",
                index: 0,
                ..
            }
        ),
        "{err}"
    );

    let mut b = pack_bytes();
    let at = section_entry_at(&b, SectionKind::Metadata);
    put_u64(&mut b, at + 16, u64::MAX);
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::SectionOutOfBounds {
            section: "METADATA",
            ..
        })
    ));
}

#[test]
fn rejects_huge_decoded_len() {
    let mut b = pack_bytes();
    let at = section_entry_at(&b, SectionKind::Metadata);
    put_u64(&mut b, at + 24, u64::MAX);
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::SectionTooLarge {
            section: "METADATA",
            ..
        })
    ));
    let mut b = pack_bytes();
    put_u64(&mut b, at + 24, 5);
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::Decompress {
            section: "METADATA",
            ..
        })
    ));
}

#[test]
fn rejects_misaligned_segment() {
    let mut b = pack_bytes();
    let at = expert_entry(&b, 1);
    let off = u64::from_le_bytes(b[at + 32..at + 40].try_into().unwrap());
    put_u64(&mut b, at + 32, off + 16);
    resign(&mut b);
    assert!(matches!(open(&b), Err(PackError::Misaligned { .. })));
}

#[test]
fn rejects_overlapping_and_missing_sections() {
    let mut b = pack_bytes();
    let (dir_off, _) = section(&b, SectionKind::TensorDir);
    let at = section_entry_at(&b, SectionKind::ExpertDir);
    put_u64(&mut b, at + 8, dir_off as u64);
    resign(&mut b);
    assert!(matches!(open(&b), Err(PackError::SectionOverlap { .. })));

    let mut b = pack_bytes();
    let at = section_entry_at(&b, SectionKind::ExpertDir);
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::MissingSection {
            section: "EXPERT_DIR"
        })
    ));

    let mut b = pack_bytes();
    b[at..at + 4].copy_from_slice(&(SectionKind::TensorDir as u32).to_le_bytes());
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::DuplicateSection {
            section: "TENSOR_DIR"
        })
    ));
}

#[test]
fn rejects_bad_entry_fields() {
    let cases: [(usize, usize, u8, &str); 6] = [
        (12, 0, 7, "bits"),
        (13, 0, 9, "weight_codec"),
        (15, 0, 3, "scale_dtype"),
        (16, 0, 48, "group_size"),
        (0, 1, 1, "key"), // layer 1 before layer 0's expert 1: out of order
        (8, 2, 0, "key"), // segment 1 -> 0 duplicates the previous key
    ];
    for (field_at, index, value, field) in cases {
        let mut b = pack_bytes();
        let at = expert_entry(&b, index);
        b[at + field_at] = value;
        resign(&mut b);
        let err = open(&b).err().unwrap();
        assert!(
            matches!(&err, PackError::BadEntry { section: "EXPERT_DIR", field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
    let mut b = pack_bytes();
    let at = tensor_entry(&b, 0);
    b[at + 8] = 42; // dtype
    resign(&mut b);
    assert!(matches!(
        open(&b),
        Err(PackError::BadEntry {
            section: "TENSOR_DIR",
            field: "dtype",
            ..
        })
    ));
}

#[test]
fn rejects_metadata_without_required_keys() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.flashpack");
    let w = flashpack::format::PackWriter::create(&dest, 4096, 128, 128).unwrap();
    let err = w
        .finish(&serde_json::json!({"format": "flashpack"}))
        .err()
        .unwrap();
    assert!(matches!(err, PackError::Writer { .. }), "{err}");
    assert!(!dest.exists());
}

/// Bounded randomized corruption: random bit flips, overwrites and truncations, with and
/// without re-signed checksums. Nothing may panic; whatever opens must verify without panic.
#[test]
fn random_corruption_never_panics() {
    let b = pack_bytes();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut r = std::iter::from_fn(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Some(state)
    });
    let mut opened = 0;
    for _ in 0..1500 {
        let mut d = b.clone();
        let hot_end = section(&b, SectionKind::Metadata).0 + 64;
        for _ in 0..1 + r.next().unwrap() % 4 {
            let pos = match r.next().unwrap() % 3 {
                0 => (r.next().unwrap() % 512) as usize,
                1 => {
                    section(&b, SectionKind::TensorDir).0
                        + (r.next().unwrap() as usize
                            % (hot_end - section(&b, SectionKind::TensorDir).0))
                }
                _ => (r.next().unwrap() % d.len() as u64) as usize,
            };
            let pos = pos % d.len();
            match r.next().unwrap() % 3 {
                0 => d[pos] ^= 1 << (r.next().unwrap() % 8),
                1 => {
                    let v = r.next().unwrap().to_le_bytes();
                    let end = (pos + 8).min(d.len());
                    d[pos..end].copy_from_slice(&v[..end - pos]);
                }
                _ => d.truncate(pos.max(1)),
            }
        }
        if r.next().unwrap() % 2 == 0 && d.len() > 64 + 5 * 64 + 32 {
            resign(&mut d);
        }
        if let Ok(p) = open(&d) {
            opened += 1;
            let _ = p.verify();
            for e in p.experts() {
                let _ = p.segment_stored(e);
            }
        }
    }
    assert!(
        opened < 1500,
        "corruption must be detected at least sometimes"
    );
}

// ---------------------------------------------------------------------------------------------
// Run time: checksums are checked by default (issue 14). Damaged payload bytes end a run with
// an error naming the tensor or the (layer, expert, segment) and suggesting `flashpack verify`,
// never with different text, and never with a signal.

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// No part of the message repeats the part before it ("x: x").
fn assert_no_repeat(msg: &str) {
    let parts: Vec<&str> = msg.trim().split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "repeated in {msg}");
    }
}

/// Seeded random bit flips inside the stored bytes of dense tensors and expert segments (never
/// in padding, which no checksum covers), each in a fresh copy of the pack: `run` with default
/// options must fail with exit code 1 every time, naming what it found.
#[test]
fn run_time_corruption_is_always_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pack(dir.path());
    let good = std::fs::read(&path).unwrap();
    let pack = Pack::open(&path).unwrap();
    let tensors = pack.tensors().to_vec();
    let experts = pack.experts().to_vec();
    drop(pack);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let bad = dir.path().join("bad.flashpack");
    for i in 0..10 {
        let (offset, len, names) = if i % 2 == 0 {
            let t = &tensors[next() as usize % tensors.len()];
            (t.offset, t.stored_len, format!("tensor {}", t.name))
        } else {
            let e = &experts[next() as usize % experts.len()];
            let names = format!(
                "layer {}, expert {}, segment {}",
                e.layer, e.expert, e.segment
            );
            (e.offset, e.stored_len, names)
        };
        let at = (offset + next() % len) as usize;
        let mut d = good.clone();
        d[at] ^= 1 << (next() % 8);
        std::fs::write(&bad, &d).unwrap();
        let out = flashpack_cli(
            &[
                "run",
                bad.to_str().unwrap(),
                "--prompt",
                "The history of",
                "--max-tokens",
                "3",
            ],
            &[],
        );
        let err = stderr_of(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "flip {i} at {at} ({names}) was not caught: {:?} {err}",
            out.status
        );
        assert!(err.contains(&names), "flip {i}: {err}");
        assert!(err.contains("checksum does not match"), "flip {i}: {err}");
        assert!(err.contains("flashpack verify"), "flip {i}: {err}");
    }
}

/// A zeroed page at the start of a Huffman segment: by default the checksum names it; with
/// `--no-verify` the decode error names it, suggests `flashpack verify`, and says the codec's
/// reason once. A zeroed dense tensor is named the same way.
#[test]
fn a_zeroed_page_names_the_segment_with_and_without_verification() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pack_huffman(dir.path());
    let good = std::fs::read(&path).unwrap();
    let pack = Pack::open(&path).unwrap();
    let seg = pack
        .experts()
        .iter()
        .find(|e| e.weight_codec == flashpack::format::codec_id::HUFFMAN && e.layer == 0)
        .expect("the tiny pack codes experts with Huffman")
        .clone();
    let tensor = pack
        .tensors()
        .iter()
        .find(|t| t.codec == flashpack::format::codec_id::HUFFMAN)
        .expect("the tiny pack codes dense tensors with Huffman")
        .clone();
    drop(pack);
    let bad = dir.path().join("zeroed.flashpack");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            bad.to_str().unwrap(),
            "--prompt",
            "The history of",
            "--max-tokens",
            "2",
        ];
        args.extend(extra);
        flashpack_cli(&args, &[])
    };

    let mut d = good.clone();
    let at = seg.offset as usize;
    d[at..at + 4096.min(seg.stored_len as usize)].fill(0);
    std::fs::write(&bad, &d).unwrap();
    let names = format!(
        "expert segment (layer {}, expert {}, segment {})",
        seg.layer, seg.expert, seg.segment
    );
    let out = run(&[]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&names) && err.contains("checksum does not match"),
        "{err}"
    );
    assert!(err.contains("flashpack verify"), "{err}");
    assert_no_repeat(&err);
    let out = run(&["--no-verify"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&names) && err.contains("does not decode"),
        "{err}"
    );
    assert!(err.contains("flashpack verify"), "{err}");
    assert_eq!(err.matches("bad header field").count(), 1, "{err}");
    assert_no_repeat(&err);
    // `--verify`, from scripts written when checking was opt-in, still works (and is the default).
    let out = run(&["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(run(&["--verify", "--no-verify"]).status.code(), Some(2));

    let mut d = good.clone();
    let at = tensor.offset as usize;
    d[at..at + 4096.min(tensor.stored_len as usize)].fill(0);
    std::fs::write(&bad, &d).unwrap();
    let out = run(&["--no-verify"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let names = format!("tensor {} of", tensor.name);
    assert!(
        err.contains(&names) && err.contains("does not decode"),
        "{err}"
    );
    assert!(err.contains("flashpack verify"), "{err}");
    assert_no_repeat(&err);
}

// ---------------------------------------------------------------------------------------------
// Behaviour users do not expect: budgets need a unit or a percentage (issue 14).

#[test]
fn budgets_need_a_unit_and_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pack(dir.path());
    let p = path.to_str().unwrap();
    let base = ["run", p, "--prompt", "The history of", "--max-tokens", "2"];
    let with = |extra: &[&str]| flashpack_cli(&[&base[..], extra].concat(), &[]);
    // A bare number once meant "all of RAM" (1) or "two bytes" (2): now a usage error showing
    // the accepted forms, for both options.
    for (opt, value) in [
        ("--mem-budget", "1"),
        ("--mem-budget", "2"),
        ("--mem-budget", "0.5"),
        ("--expert-budget", "1"),
        ("--mem-budget", "plenty"),
    ] {
        let out = with(&[opt, value]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{opt} {value}: {err}");
        assert!(
            err.contains("8GiB") && err.contains("50%"),
            "{opt} {value}: {err}"
        );
    }
    // More than the machine has: it runs, with a warning.
    let out = with(&["--mem-budget", "1000TB"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("warning: --mem-budget 1000TB"), "{err}");
    assert!(err.contains("more than this machine's memory"), "{err}");
    // Units in any case, and percentages.
    for ok in [
        ["--mem-budget", "50%"],
        ["--expert-budget", "64MiB"],
        ["--expert-budget", "64mb"],
    ] {
        let out = with(&ok);
        assert_eq!(out.status.code(), Some(0), "{ok:?}: {}", stderr_of(&out));
    }
    // Too few experts for top-k: the message blames --expert-budget, not --mem-budget, and
    // gives the expert size and top-k.
    let out = with(&["--expert-budget", "100KB"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--expert-budget 100KB gives the expert cache"),
        "{err}"
    );
    assert!(!err.contains("--mem-budget"), "{err}");
    assert!(err.contains("each: hidden 256 x expert width"), "{err}");
    assert!(err.contains("num_experts_per_tok"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Metadata that breaks the format's rules (issue 14, item 9; formats/flashpack-v1.md §4.4):
// refused at open with `BadMetadata` naming the key, its value and the rule, so inspect, verify
// and run all stop before they size anything from it.

/// The small pack (2 layers of 2 experts, hidden and expert rows 128, vocabulary 16) with its
/// metadata edited and re-signed.
/// A merge map is declared by flag MERGED_EXPERTS, so the flag is set when the edit adds one.
fn with_metadata(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut b = pack_bytes();
    let mut merges = false;
    edit_metadata(&mut b, |m| {
        edit(m);
        merges = m.get("merge_map").is_some();
    });
    if merges {
        b[16] |= flashpack::format::required::MERGED_EXPERTS as u8;
        resign(&mut b);
    }
    b
}

/// Opens `bytes` expecting `BadMetadata` on `key`; returns the message.
fn refused_on(bytes: &[u8], key: &str) -> String {
    let err = open(bytes).err().expect("the pack must be refused");
    let msg = err.to_string();
    match &err {
        PackError::BadMetadata { key: k, .. } => assert_eq!(k, key, "{msg}"),
        _ => panic!("expected BadMetadata on {key}, got {msg}"),
    }
    msg
}

#[test]
fn the_edited_small_pack_opens() {
    // The helper itself keeps a valid pack valid.
    let b = with_metadata(|_| {});
    assert!(open(&b).is_ok());
    let b = with_metadata(|m| m["merge_map"] = serde_json::json!([[0, 0], [1, 1]]));
    let p = open(&b).unwrap();
    assert_eq!(p.meta().stored_expert(0, 1), 0);
}

#[test]
fn rejects_merge_map_ids_past_the_experts() {
    for id in [2u64, 1000, u32::MAX as u64] {
        let b = with_metadata(|m| m["merge_map"] = serde_json::json!([[0, 1], [0, id]]));
        let msg = refused_on(&b, "merge_map[1][1]");
        assert!(
            msg.contains(&id.to_string()) && msg.contains("below 2"),
            "{msg}"
        );
    }
    // Past u32: a type error naming the key.
    let b = with_metadata(|m| m["merge_map"] = serde_json::json!([[0, 1], [0, 1u64 << 40]]));
    refused_on(&b, "merge_map");
}

#[test]
fn rejects_merge_map_rows_of_the_wrong_length() {
    for (map, key) in [
        (serde_json::json!([[0], [0, 1]]), "merge_map[0]"),
        (serde_json::json!([[0, 1], []]), "merge_map[1]"),
        (serde_json::json!([[0, 1, 1], [0, 1]]), "merge_map[0]"),
        (serde_json::json!([[0, 1]]), "merge_map"),
        (serde_json::json!([]), "merge_map"),
        (serde_json::json!([[0, 1], [0, 1], [0, 1]]), "merge_map"),
    ] {
        let b = with_metadata(|m| m["merge_map"] = map.clone());
        let msg = refused_on(&b, key);
        assert!(
            msg.contains("one id per expert") || msg.contains("one row per layer"),
            "{msg}"
        );
    }
}

#[test]
fn rejects_model_dimensions_the_directories_contradict() {
    for (field, value, key) in [
        ("hidden_size", 1u64 << 30, "model.hidden_size"),
        (
            "moe_intermediate_size",
            1 << 30,
            "model.moe_intermediate_size",
        ),
        ("num_hidden_layers", 1 << 30, "model.num_hidden_layers"),
        ("num_hidden_layers", 1, "model.num_hidden_layers"),
        ("num_experts", 1 << 30, "model.num_experts"),
        ("num_experts", 1, "model.num_experts"),
        ("vocab_size", 1_000_000_000_000, "model.vocab_size"),
        ("head_dim", 0, "model.head_dim"),
    ] {
        let b = with_metadata(|m| m["model"][field] = value.into());
        let msg = refused_on(&b, key);
        assert!(msg.contains(&value.to_string()), "{field}: {msg}");
    }
}

/// Kimi-K3's latent MoE: the expert directory's `hidden_size` is the latent's (§4.4 rule 3), so
/// a latent the directory contradicts is refused by name, and one it matches opens.
#[test]
fn rejects_a_latent_moe_width_the_directory_contradicts() {
    let b = with_metadata(|m| {
        m["model"]["latent_moe"] = serde_json::json!({"hidden_size": 1u64 << 30})
    });
    let msg = refused_on(&b, "model.latent_moe.hidden_size");
    assert!(msg.contains(&(1u64 << 30).to_string()), "{msg}");
    let b = with_metadata(|m| {
        let h = m["model"]["hidden_size"].clone();
        m["model"]["latent_moe"] = serde_json::json!({"hidden_size": h, "norm": true});
    });
    let p = open(&b).unwrap();
    assert!(p.meta().model.latent_moe.is_some_and(|l| l.norm));
}

#[test]
fn rejects_an_expert_directory_layer_past_the_model() {
    // The last stored expert (layer 1, expert 1: entries 4 and 5) moved to layer 0xFFFFFFF0;
    // the directory stays sorted and tiled, so only the model record can say it is wrong.
    let mut b = pack_bytes();
    for i in [4, 5] {
        let at = expert_entry(&b, i);
        b[at..at + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    }
    resign(&mut b);
    let msg = refused_on(&b, "model.num_hidden_layers");
    assert!(msg.contains("4294967280"), "{msg}");
    // And the directory's own dimensions at 2^30.
    let mut b = pack_bytes();
    let dir = section(&b, SectionKind::ExpertDir).0;
    b[dir + 8..dir + 12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    resign(&mut b);
    assert!(open(&b).is_err());
}

#[test]
fn rejects_top_k_outside_the_experts() {
    for k in [0u64, 3, 1000] {
        let b = with_metadata(|m| m["model"]["num_experts_per_tok"] = k.into());
        let msg = refused_on(&b, "model");
        assert!(
            msg.contains("num_experts_per_tok") && msg.contains("1..=2"),
            "{msg}"
        );
    }
}

#[test]
fn rejects_norm_and_rope_numbers_that_give_nan() {
    for (field, value, key) in [
        (
            "rms_norm_eps",
            serde_json::json!(-1.0),
            "model.rms_norm_eps",
        ),
        ("rms_norm_eps", serde_json::json!(0.0), "model.rms_norm_eps"),
    ] {
        let b = with_metadata(|m| m["model"][field] = value.clone());
        refused_on(&b, key);
    }
    let b = with_metadata(|m| m["model"]["rope"]["theta"] = 0.0.into());
    refused_on(&b, "model.rope_theta");
}

#[test]
fn rejects_metadata_keys_of_the_wrong_type() {
    for (key, value) in [
        ("chat_template", serde_json::json!(5)),
        ("tokenizer", serde_json::json!("not a tokenizer")),
        ("quantization", serde_json::json!({"group_size": 64})),
        ("architecture", serde_json::json!("mixtral")),
    ] {
        let b = with_metadata(|m| m[key] = value.clone());
        refused_on(&b, key);
    }
    let b = with_metadata(|m| m["quantization"]["expert_bits"] = 7.into());
    refused_on(&b, "quantization.expert_bits");
}

#[test]
fn bad_metadata_fails_inspect_verify_and_run_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.flashpack");
    std::fs::write(
        &path,
        with_metadata(|m| m["merge_map"] = serde_json::json!([[0, 1], [0, 7]])),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["inspect", p],
        vec!["verify", p],
        vec!["run", p, "--prompt", "hi", "--max-tokens", "1"],
    ] {
        let out = flashpack_cli(&args, &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("merge_map[1][1] = 7"), "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// A config.json that contradicts its tensors (issue 14, item 5): `convert` fails before it sizes
// anything from the config, naming the field, its value and what the tensors hold.

/// A folder with the tiny fixture's files linked in and its config.json edited by `edit`.
fn tiny_with_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap();
        if name != "config.json" {
            std::os::unix::fs::symlink(&f, dir.join(name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

#[test]
fn convert_refuses_a_config_that_contradicts_its_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], serde_json::Value, &[&str])] = &[
        (
            &["num_hidden_layers"],
            serde_json::json!(1_000_000_000u64),
            &["num_hidden_layers = 1000000000", "6 layers"],
        ),
        (
            &["num_hidden_layers"],
            serde_json::json!(1_000_000_000_000u64),
            // Past MLX's 32-bit shapes: refused by name before the tensors are compared.
            &["\"num_hidden_layers\" is 1000000000000", "i32::MAX"],
        ),
        (
            &["num_hidden_layers"],
            serde_json::json!(4),
            &["num_hidden_layers = 4", "6 layers"],
        ),
        (
            &["num_local_experts", "num_experts"],
            serde_json::json!(16),
            &["num_experts = 16", "holds 32 experts"],
        ),
        (
            &["num_local_experts", "num_experts"],
            serde_json::json!(64),
            &["num_experts = 64", "holds 32 experts"],
        ),
        (
            &["vocab_size"],
            serde_json::json!(1_000_000_000_000u64),
            &["\"vocab_size\" is 1000000000000", "i32::MAX"],
        ),
        (
            &["vocab_size"],
            serde_json::json!(1_000_000u64),
            &[
                "vocab_size = 1000000",
                "model.embed_tokens.weight has shape [8192, 256]",
            ],
        ),
        (
            &["head_dim"],
            serde_json::json!(0),
            &["\"head_dim\" is 0", "at least 1"],
        ),
        (
            &["head_dim"],
            serde_json::json!(32),
            &[
                "num_attention_heads x head_dim = 4 x 32",
                "q_proj.weight has shape [256, 256]",
            ],
        ),
        (
            &["rms_norm_eps"],
            serde_json::json!(-1.0),
            &["\"rms_norm_eps\" is -1", "positive finite"],
        ),
        (
            &["rope_theta"],
            serde_json::json!(0.0),
            &["\"rope_theta\" is 0", "positive finite"],
        ),
    ];
    for (i, (keys, value, expect)) in cases.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        tiny_with_config(&src, |cfg| {
            for k in keys.iter() {
                cfg[*k] = value.clone();
            }
            if keys == &["rope_theta"] {
                cfg["rope_parameters"]["rope_theta"] = value.clone();
            }
        });
        let err = convert_refused(&src, &format!("{keys:?} = {value}"));
        for e in expect.iter() {
            assert!(err.contains(e), "{keys:?} = {value}: wants {e:?} in {err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a source lacks or holds wrongly (issue 14, item 8): no tokenizer.json converts with a
// warning and gives a pack that refuses text prompts; a tokenizer.json link that leads nowhere
// is an error; NaN or infinite weights are refused, naming the tensor and the element.

fn convert_cli(src: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    flashpack_cli(
        &[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    )
}

#[test]
fn a_source_without_tokenizer_converts_with_a_warning_and_refuses_text() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tiny_with_config(&src, |_| {});
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    let pack = tmp.path().join("p.flashpack");
    let out = convert_cli(&src, &pack);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning:") && err.contains("has no tokenizer.json"),
        "even with --quiet: {err}"
    );
    let out = flashpack_cli(
        &[
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        &[],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no tokenizer") && err.contains("text prompts"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_link_that_leads_nowhere_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, target) in [("dangling", "missing.json"), ("loop", "tokenizer.json")] {
        let src = tmp.path().join(case);
        tiny_with_config(&src, |_| {});
        std::fs::remove_file(src.join("tokenizer.json")).unwrap();
        std::os::unix::fs::symlink(target, src.join("tokenizer.json")).unwrap();
        let pack = tmp.path().join(format!("{case}.flashpack"));
        let out = convert_cli(&src, &pack);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{case}: {err}");
        assert!(
            err.contains("tokenizer.json") && err.contains("link that leads nowhere"),
            "{case}: {err}"
        );
        assert!(!pack.exists());
    }
}

/// Overwrites element `index` of `tensor` (bf16) in the folder's shard with the bf16 `bits`;
/// the shard is copied first, so the fixture stays as it is.
fn poke_bf16(dir: &std::path::Path, tensor: &str, index: usize, bits: u16) {
    let map: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = dir.join(map["weight_map"][tensor].as_str().unwrap());
    let mut b = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    let t = flashpack::convert::load::safetensors::parse(&shard, &b)
        .unwrap()
        .into_iter()
        .find(|t| t.name == tensor)
        .unwrap();
    assert_eq!(t.dtype, flashpack::convert::tensor::Dtype::Bf16);
    let at = t.range.start + 2 * index;
    b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    std::fs::write(&shard, b).unwrap();
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "model.norm.weight",
            7,
            0x7FC0u16,
            "model.norm.weight",
            "element 7",
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            256 * 3 + 5,
            0x7F80,
            "model.layers.0.self_attn.q_proj.weight",
            "row 3, column 5",
        ),
        (
            "model.layers.2.mlp.experts.9.down_proj.weight",
            128 + 1,
            0xFF80,
            "layer 2 expert 9 down_proj",
            "row 1, column 1",
        ),
    ];
    for (i, (tensor, index, bits, names, at)) in cases.into_iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        tiny_with_config(&src, |_| {});
        poke_bf16(&src, tensor, index, bits);
        let pack = tmp.path().join(format!("p{i}.flashpack"));
        let out = convert_cli(&src, &pack);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{tensor}: {err}");
        assert!(
            err.contains(names) && err.contains(at) && err.contains("non-finite"),
            "{tensor}: {err}"
        );
        assert!(!pack.exists());
    }
}

// ---------------------------------------------------------------------------------------------
// Sources that are not there (issue 14): a name that is not a local folder is tried as a Hub id
// only when it has that form, and the error says both; a link loop is local, never a Hub id.

#[test]
fn a_missing_source_says_there_is_no_local_folder_and_names_the_hub_id() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("models")).unwrap();
    // models/loop -> loop: a link loop whose name has the form of a Hub id.
    std::os::unix::fs::symlink("loop", tmp.path().join("models/loop")).unwrap();
    let convert = |src: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args(["convert", src, "-o", "out.flashpack"])
            .current_dir(tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", tmp.path().join("hf"))
            .output()
            .unwrap()
    };
    let out = convert("models/mixtral-typo");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no local folder models/mixtral-typo")
            && err.contains("Hub repository models/mixtral-typo"),
        "{err}"
    );
    let out = convert("models/loop");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("models/loop is a link that leads nowhere"),
        "{err}"
    );
    assert!(!err.contains("Hub"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Convert errors have real kinds (issue 14, messages): an option out of range is a usage error
// (exit 2) naming the option and its value; a side file that is not JSON names the file and
// keeps the parser's reason as its cause; a tokenizer that does not load names the file and says
// what to do, with the tokenizer's own reason once.

#[test]
fn convert_errors_name_their_kind_and_keep_their_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tiny_with_config(&src, |_| {});
    let pack = tmp.path().join("p.flashpack");
    let p = pack.to_str().unwrap();
    let s = src.to_str().unwrap();
    for (args, option) in [
        (vec!["--cold-bits", "2"], "--cold-bits 2"),
        (vec!["--merge-threshold", "3"], "--merge-threshold 3"),
        (
            vec!["--cold-bits", "2", "--cold-fraction", "1.5"],
            "--cold-fraction 1.5",
        ),
        (vec!["--merge-ratio", "1"], "--merge-ratio 1"),
    ] {
        let mut all = vec!["convert", s, "-o", p, "--quiet"];
        all.extend(args);
        let out = flashpack_cli(&all, &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{option}: {err}");
        assert!(err.contains(option), "{option}: {err}");
        assert!(!pack.exists(), "{option}: no pack is written");
    }
    // A side JSON file that does not parse.
    std::fs::remove_file(src.join("tokenizer_config.json")).unwrap();
    std::fs::write(src.join("tokenizer_config.json"), "{not json").unwrap();
    let out = convert_cli(&src, &pack);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tokenizer_config.json is not valid JSON") && err.contains("line 1"),
        "{err}"
    );
    assert_no_repeat(&err);
    // A tokenizer.json that does not load.
    std::fs::remove_file(src.join("tokenizer_config.json")).unwrap();
    std::os::unix::fs::symlink(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/qwen3moe-tiny/tokenizer_config.json"),
        src.join("tokenizer_config.json"),
    )
    .unwrap();
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    std::fs::write(src.join("tokenizer.json"), r#"{"model": 5}"#).unwrap();
    let out = convert_cli(&src, &pack);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not a tokenizer that can be loaded") && err.contains("replace it"),
        "{err}"
    );
    assert_no_repeat(&err);
    assert!(!pack.exists());
}

// ---------------------------------------------------------------------------------------------
// Nothing silently wrong (issue 33, items 1-4 and 12's `model_type`): NaN logits are an error on
// every path; `convert` refuses a config that contradicts the tensors (one rule for every
// architecture: the runtime's own loader run over the planned tensors), tensors the config
// never reads, and features the runtime lacks, naming what is wrong, before any expert is
// written; a config field set to an extreme either converts to a pack with finite logits or is
// refused by name.

/// A tiny checkpoint of `arch` in `dir` with its config.json edited by `edit`.
fn arch_fixture(
    dir: &std::path::Path,
    arch: flashpack::arch::Arch,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let spec = fixtures::FixtureSpec::tiny(arch);
    spec.write(dir).unwrap();
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// `flashpack convert src` through the CLI: asserts exit 1 and no output file, and returns the
/// error text.
fn convert_refused(src: &std::path::Path, what: &str) -> String {
    let out_path = src.with_extension("flashpack");
    let out = flashpack_cli(
        &[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(!out_path.exists(), "{what}: a pack was written");
    err
}

/// Dense weights with one tensor's values replaced by NaN.
struct NanTensor<'a> {
    inner: &'a dyn flashpack::model::Weights,
    name: &'static str,
}

impl flashpack::model::Weights for NanTensor<'_> {
    fn get(&self, name: &str) -> Option<flashpack::mlx::Array> {
        let a = self.inner.get(name)?;
        if name != self.name {
            return Some(a);
        }
        let nan = flashpack::mlx::Array::scalar(f64::NAN, a.dtype()).unwrap();
        Some(a.mul(&nan).unwrap())
    }
    fn quantization(&self, module: &str) -> Option<flashpack::model::Quant> {
        self.inner.quantization(module)
    }
}

#[test]
fn nan_logits_are_an_error_greedy_and_sampled() {
    use flashpack::model::Model;
    use flashpack::run::experts::{ExpertCache, StoreOptions};
    use flashpack::run::generate::{generate, GenerateError, GenerateOptions};
    use flashpack::run::sample::{SampleError, SamplerOptions};
    use flashpack::run::stream::StreamingExperts;
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_pack(dir.path());
    let (pack, cfg, weights) = flashpack::run::open::open(&path, true).unwrap();
    let nan = NanTensor {
        inner: &weights,
        name: "model.norm.weight",
    };
    let model = Model::load(&cfg, &nan).unwrap();
    for temperature in [0.0, 0.7] {
        for host_sampling in [false, true] {
            let cache = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
            let mut store = StreamingExperts::new(&pack, cache, cfg.num_experts, false);
            let opts = GenerateOptions {
                max_tokens: 4,
                sampler: SamplerOptions {
                    temperature,
                    ..SamplerOptions::default()
                },
                prefill_chunk: 64,
                eos: Vec::new(),
                host_sampling,
            };
            let mut got = 0;
            let r = generate(&model, &mut store, &[1, 2, 3], &opts, |_| {
                got += 1;
                true
            });
            let what = format!("temperature {temperature}, host sampling {host_sampling}");
            match r {
                Err(GenerateError::NanLogits { position: 0 })
                | Err(GenerateError::Sample(SampleError::NotANumber { .. })) => {}
                other => panic!("{what}: wants a NaN error, got {other:?}"),
            }
            assert_eq!(got, 0, "{what}: no token is given out of NaN logits");
            assert!(r.unwrap_err().to_string().contains("NaN"));
        }
    }
}

#[test]
fn convert_refuses_configs_that_contradict_the_tensors_of_new_architectures() {
    use flashpack::arch::Arch;
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(Arch, &str, serde_json::Value)] = &[
        (Arch::Qwen3Next, "full_attention_interval", 1.into()),
        (Arch::Qwen3Next, "full_attention_interval", 3.into()),
        (Arch::Qwen3Next, "linear_conv_kernel_dim", 3.into()),
        (Arch::Qwen3Next, "linear_num_key_heads", 1.into()),
        (Arch::Qwen3Next, "linear_num_value_heads", 2.into()),
        (Arch::Qwen3Next, "linear_value_head_dim", 16.into()),
        (
            Arch::Qwen3Next,
            "shared_expert_intermediate_size",
            64.into(),
        ),
        (Arch::Qwen35Moe, "full_attention_interval", 1.into()),
        (Arch::Qwen35Moe, "linear_num_value_heads", 2.into()),
        (
            Arch::Qwen35Moe,
            "shared_expert_intermediate_size",
            256.into(),
        ),
        (Arch::DeepseekV3, "q_lora_rank", 64.into()),
        (Arch::DeepseekV3, "n_shared_experts", 2.into()),
        (Arch::Glm4Moe, "n_shared_experts", 2.into()),
    ];
    for (i, (arch, field, value)) in cases.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        arch_fixture(&src, *arch, |c| {
            let target = match c.get_mut("text_config") {
                Some(t) => t,
                None => c,
            };
            target[*field] = value.clone();
        });
        let err = convert_refused(&src, &format!("{arch:?} {field} = {value}"));
        assert!(
            err.contains("does not describe") || err.contains(field),
            "{arch:?} {field} = {value}: {err}"
        );
    }
}

#[test]
fn convert_refuses_tensors_the_config_never_reads() {
    use flashpack::arch::Arch;
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(Arch, &str, Option<serde_json::Value>, &str)] = &[
        (
            Arch::DeepseekV3,
            "n_shared_experts",
            Some(0.into()),
            "shared_experts",
        ),
        (Arch::DeepseekV3, "n_shared_experts", None, "shared_experts"),
        (Arch::Glm4Moe, "use_qk_norm", Some(false.into()), "norm"),
        (
            Arch::Qwen3Next,
            "shared_expert_intermediate_size",
            Some(0.into()),
            "shared_expert",
        ),
    ];
    for (i, (arch, field, value, tensor)) in cases.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        arch_fixture(&src, *arch, |c| match value {
            Some(v) => c[*field] = v.clone(),
            None => {
                c.as_object_mut().unwrap().remove(*field);
            }
        });
        let what = format!("{arch:?} {field} = {value:?}");
        let err = convert_refused(&src, &what);
        assert!(
            err.contains("never") && err.contains(tensor),
            "{what}: wants the unread tensor named: {err}"
        );
    }
}

#[test]
fn convert_refuses_what_the_runtime_cannot_run() {
    use flashpack::arch::Arch;
    let tmp = tempfile::tempdir().unwrap();
    let rope = |t: &str, extra: serde_json::Value| {
        let mut r = serde_json::json!({"rope_type": t, "type": t});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    // (edit, words the error must hold)
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let set = |k: &'static str, v: serde_json::Value| -> Edit {
        Box::new(move |c: &mut serde_json::Value| {
            c[k] = v.clone();
            if k == "rope_scaling" {
                let mut p = v.clone();
                p["rope_theta"] = c["rope_theta"].clone();
                c["rope_parameters"] = p;
            }
        })
    };
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            set(
                "rope_scaling",
                rope("dynamic", serde_json::json!({"factor": 2.0})),
            ),
            &["rope_type", "dynamic"],
        ),
        (
            set(
                "rope_scaling",
                rope(
                    "llama3",
                    serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                ),
            ),
            &["rope_type", "llama3"],
        ),
        (
            set(
                "rope_scaling",
                rope("yarn", serde_json::json!({"factor": 0.0})),
            ),
            &["yarn", "factor"],
        ),
        (
            set(
                "rope_scaling",
                rope(
                    "yarn",
                    serde_json::json!({"factor": 4.0, "mscale": 1e39, "mscale_all_dim": 0.0}),
                ),
            ),
            &["yarn", "mscale"],
        ),
        (
            set(
                "rope_scaling",
                rope("linear", serde_json::json!({"factor": -2.0})),
            ),
            &["linear", "factor"],
        ),
        (
            set("max_position_embeddings", 0.into()),
            &["max_position_embeddings", "at least 1"],
        ),
        // The two configs of the issue's NaN repro: finite as f64, not as f32.
        (
            Box::new(|c: &mut serde_json::Value| {
                c["rope_theta"] = 1e39.into();
                c["rope_parameters"]["rope_theta"] = 1e39.into();
            }),
            &["rope_theta", "f32"],
        ),
        (
            set("model_type", 5.into()),
            &["model_type", "is 5", "a string"],
        ),
    ];
    for (i, (edit, expect)) in cases.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        arch_fixture(&src, Arch::Qwen3Moe, |c| edit(c));
        let err = convert_refused(&src, &format!("case {i}"));
        for e in expect.iter() {
            assert!(err.contains(e), "case {i}: wants {e:?} in {err}");
        }
    }
    let src = tmp.path().join("deepseek");
    arch_fixture(&src, Arch::DeepseekV3, |c| {
        c["routed_scaling_factor"] = 1e308.into()
    });
    let err = convert_refused(&src, "routed_scaling_factor 1e308");
    assert!(err.contains("routed_scaling_factor"), "{err}");
}

/// Converts `src` with the library's defaults; the pack's logits for a short prompt, or the
/// conversion's error text.
fn convert_and_logits(src: &std::path::Path, out: &std::path::Path) -> Result<Vec<f32>, String> {
    use flashpack::run::experts::{ExpertCache, StoreOptions};
    let ck = flashpack::convert::load::Checkpoint::open(src).map_err(|e| e.to_string())?;
    flashpack::convert::convert_checkpoint(
        &ck,
        out,
        &flashpack::convert::ConvertOptions::default(),
        &flashpack::progress::Silent,
        std::time::Instant::now(),
    )
    .map_err(|e| e.to_string())?;
    let (pack, cfg, weights) = flashpack::run::open::open(out, true).unwrap();
    let model = flashpack::model::Model::load(&cfg, &weights)
        .unwrap_or_else(|e| panic!("convert accepted a config the runtime refuses: {e}"));
    let mut cache = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    cache.warm_all(&pack).unwrap();
    let mut store =
        flashpack::run::stream::StreamingExperts::new(&pack, cache, cfg.num_experts, false);
    let mut kv = model.new_cache();
    Ok(model
        .forward_ids(&[1, 5, 9, 2], &mut kv, &mut store)
        .unwrap()
        .to_vec_f32()
        .unwrap())
}

#[test]
fn extreme_config_values_give_finite_logits_or_are_refused_by_name() {
    use flashpack::arch::Arch;
    let seed: u64 = std::env::var("FLASHPACK_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("extreme-config seed {seed} (FLASHPACK_HOSTILE_SEED={seed} repeats it)");
    let extremes: Vec<serde_json::Value> = vec![
        0.into(),
        (-1).into(),
        1e39.into(),
        "NaN".into(),
        u64::MAX.into(),
        1e-50.into(),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = seed | 1;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let archs = [
        Arch::Qwen3Moe,
        Arch::DeepseekV3,
        Arch::Glm4Moe,
        Arch::Qwen3Next,
        Arch::GptOss,
        Arch::Mixtral,
    ];
    let mut refused = 0;
    let mut ran = 0;
    for (a, arch) in archs.iter().enumerate() {
        let spec = fixtures::FixtureSpec::tiny(*arch);
        let cfg = spec.config();
        let numeric: Vec<String> = cfg
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_number())
            .map(|(k, _)| k.clone())
            .collect();
        // Six seeded pairs per architecture; FLASHPACK_HOSTILE_ALL=1 tries every pair.
        let pairs: Vec<(usize, usize)> = if std::env::var_os("FLASHPACK_HOSTILE_ALL").is_some() {
            (0..numeric.len())
                .flat_map(|f| (0..extremes.len()).map(move |v| (f, v)))
                .collect()
        } else {
            (0..6)
                .map(|_| (next(numeric.len()), next(extremes.len())))
                .collect()
        };
        for (case, &(f, v)) in pairs.iter().enumerate() {
            let field = numeric[f].clone();
            let value = extremes[v].clone();
            let src = tmp.path().join(format!("src{a}-{case}"));
            arch_fixture(&src, *arch, |c| {
                c[field.as_str()] = value.clone();
                if field == "rope_theta" && c.get("rope_parameters").is_some() {
                    c["rope_parameters"]["rope_theta"] = value.clone();
                }
            });
            let what = format!("seed {seed}: {arch:?} {field} = {value}");
            match convert_and_logits(&src, &src.with_extension("flashpack")) {
                Ok(logits) => {
                    ran += 1;
                    assert!(
                        logits.iter().all(|x| x.is_finite()),
                        "{what}: converted, but the logits are not finite"
                    );
                }
                Err(e) => {
                    refused += 1;
                    assert!(
                        e.contains(field.as_str()),
                        "{what}: refused without naming the field: {e}"
                    );
                }
            }
        }
    }
    println!("{ran} converted with finite logits, {refused} refused by name");
}

/// The number in "at least N tokens" of a prompt-too-long error.
fn at_least(err: &str) -> usize {
    let (_, rest) = err
        .split_once("at least ")
        .unwrap_or_else(|| panic!("no \"at least\" in {err}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Item 8: a prompt far past the context is refused while it is counted, piece by piece, not
/// after the whole text was tokenized: the count it reports stops near the limit (2,048 for the
/// bundled model) instead of reaching the millions of tokens the text holds. (docs/benchmarks.md
/// gives the peak memory.)
#[test]
fn item8_long_prompts_are_refused_while_they_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack(dir.path());
    let words = dir.path().join("words.txt");
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < 24 << 20 {
        text.push_str(["history ", "of ", "the ", "world\n", "and "][(i % 5) as usize]);
        i += 1;
    }
    std::fs::write(&words, &text).unwrap();
    let nul = dir.path().join("nul.txt");
    std::fs::write(&nul, vec![0u8; 20 << 20]).unwrap();
    let pack_s = pack.to_str().unwrap();
    for (file, extra) in [(&words, None), (&nul, Some("64MiB"))] {
        let mut args = vec![
            "run",
            pack_s,
            "--prompt-file",
            file.to_str().unwrap(),
            "--raw",
        ];
        if let Some(b) = extra {
            args.extend(["--mem-budget", b]);
        }
        let out = flashpack_cli(&args, &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{file:?}: {err}");
        assert!(err.contains("shorten the prompt"), "{file:?}: {err}");
        let n = at_least(&err);
        assert!(
            (2048..2048 + 64 * 1024).contains(&n),
            "{file:?}: counting went on to {n} tokens past the limit of 2048: {err}"
        );
    }
    // The server, with its own limit.
    let server = crate::common::http::Server::start(
        &pack,
        &["--max-prompt-tokens", "100", "--max-body-bytes", "4000000"],
    );
    for (path, body) in [
        (
            "/v1/completions",
            serde_json::json!({"prompt": text[..1 << 20].to_string(), "max_tokens": 1}),
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"messages": [{"role": "user", "content": text[..1 << 20].to_string()}],
                "max_tokens": 1}),
        ),
    ] {
        let r = crate::common::http::post(server.addr, path, &body);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(at_least(&msg) < 100 + 64 * 1024, "{path}: {msg}");
    }
}

/// Item 12: `run --json` gives no read rate where no read was timed (all experts resident:
/// they are read at load), instead of the bytes over a clamped 0 ms (9.7e9 GB/s).
#[test]
fn item12_run_json_has_no_read_rate_without_timed_reads() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack(dir.path());
    for budget in [None, Some("40MiB")] {
        let mut args = vec![
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            "The history of",
            "--max-tokens",
            "4",
            "--json",
        ];
        if let Some(b) = budget {
            args.extend(["--mem-budget", b]);
        }
        let out = flashpack_cli(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        let report: serde_json::Value =
            serde_json::from_str(stderr_of(&out).lines().last().unwrap()).unwrap();
        let ms = report["expert_cache"]["read_decode_ms"].as_f64().unwrap();
        let bytes = report["expert_cache"]["bytes_read"].as_f64().unwrap();
        let rate = &report["derived"]["read_decode_gb_per_s"];
        if ms == 0.0 {
            assert!(rate.is_null(), "{budget:?}: {rate} GB/s over 0 ms");
        } else {
            let r = rate.as_f64().unwrap();
            assert!((r - bytes / 1e6 / ms).abs() <= 1e-9 * r, "{budget:?}: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server and chat (issue 33, items 5-12: server and chat): a prefill stops when its caller
// goes (a closed connection, Ctrl-C), logprobs carry each token's own bytes, a bad line does not
// end a chat, the default server refuses what a web page could send it, a half-closed request is
// answered, and options and errors say what they mean.

mod server_and_chat {
    use crate::chat::chat;
    use crate::common::http::{self, post, request, Server};
    use crate::engine::greedy;

    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use flashpack::progress::Progress;
    use flashpack::run::budget::Budget;
    use flashpack::run::engine::{Engine, EngineOptions};
    use flashpack::run::open;
    use serde_json::{json, Value};

    /// Counts the prefill's chunks, and raises `cancel` once `after` of them are done.
    struct CancelAfter<'a> {
        chunks: AtomicU64,
        after: u64,
        cancel: &'a AtomicBool,
    }

    impl Progress for CancelAfter<'_> {
        fn stage(&self, _: &str, _: Option<u64>, _: &str) {}
        fn advance(&self, _: u64) {
            if self.chunks.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
                self.cancel.store(true, Ordering::SeqCst);
            }
        }
        fn finish_stage(&self) {}
        fn warn(&self, _: &str) {}
    }

    /// A prompt of some 240 tokens: three prefill chunks under an 18 MB budget for 512
    /// positions.
    fn long_prompt() -> String {
        "The history of the Roman empire, from the founding of the city to its fall. ".repeat(12)
    }

    #[test]
    fn item6_a_cancelled_prefill_stops_between_chunks_and_the_next_request_runs() {
        let path = http::tiny_pack("hostile-33-engine");
        let (pack, cfg, weights) = open::open(path, true).unwrap();
        let opts = EngineOptions {
            mem_budget: Some(Budget::parse("18MB").unwrap()),
            positions: 512,
            ..EngineOptions::default()
        };
        let mut engine =
            Engine::new(&pack, &cfg, &weights, &opts, &flashpack::progress::Silent).unwrap();
        let prompt = engine.encode(&long_prompt()).unwrap();
        // Uncancelled: how many progress steps (chunks, then the last token) the prefill takes.
        let never = AtomicBool::new(false);
        let whole = CancelAfter {
            chunks: AtomicU64::new(0),
            after: u64::MAX,
            cancel: &never,
        };
        let full = engine
            .generate_until(&prompt, &greedy(4), &whole, &|| false, |_| true)
            .unwrap();
        let steps = whole.chunks.load(Ordering::SeqCst);
        assert!(
            steps >= 3,
            "the prompt must span several chunks: {steps} steps"
        );
        assert_eq!(full.generation.tokens.len(), 4);
        // The caller goes after the first chunk: no further chunk runs, nothing is generated.
        engine.reset();
        let cancel = AtomicBool::new(false);
        let watch = CancelAfter {
            chunks: AtomicU64::new(0),
            after: 1,
            cancel: &cancel,
        };
        let mut tokens = 0;
        let g = engine
            .generate_until(
                &prompt,
                &greedy(4),
                &watch,
                &|| cancel.load(Ordering::SeqCst),
                |_| {
                    tokens += 1;
                    true
                },
            )
            .unwrap();
        assert_eq!(
            watch.chunks.load(Ordering::SeqCst),
            1,
            "chunks after the cancel ran"
        );
        assert_eq!(tokens, 0);
        assert!(g.generation.tokens.is_empty());
        assert_eq!(g.generation.stats.stop_reason, "stopped");
        // The text level reports it as cancelled.
        let c = engine
            .complete_until(
                &prompt,
                &greedy(4),
                &flashpack::progress::Silent,
                &|| true,
                |_| panic!("no text after a cancelled prefill"),
            )
            .unwrap();
        assert_eq!(c.finish, flashpack::run::engine::Finish::Cancelled);
        assert_eq!(c.completion_tokens, 0);
        // The engine is free and whole: the next request gives the uncancelled answer.
        let again = engine.generate(&prompt, &greedy(4), &flashpack::progress::Silent, |_| true);
        assert_eq!(again.unwrap().generation.tokens, full.generation.tokens);
    }

    fn json_line(line: &str) -> Option<Value> {
        line.starts_with('{')
            .then(|| serde_json::from_str(line).ok())
            .flatten()
    }

    #[test]
    fn item7_ctrl_c_during_the_prefill_of_chat_stops_it_before_the_first_token() {
        let mut child = chat(&[
            "--mem-budget",
            "18MB",
            "--max-context",
            "512",
            "--max-tokens",
            "8",
        ]);
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", long_prompt()).unwrap();
        stdin.flush().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut next = || {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "chat ended");
            line
        };
        // The first prefill chunk is done: the prefill is under way.
        let first = loop {
            if let Some(v) = json_line(&next()) {
                break v;
            }
        };
        let total = first["of"].as_u64().unwrap();
        assert!(first["prefill_tokens"].as_u64().unwrap() < total, "{first}");
        // SAFETY: sends SIGINT to the child this test started, by its id.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let mut last_done = 0;
        let turn = loop {
            let v = json_line(&next()).unwrap_or(Value::Null);
            if let Some(done) = v["prefill_tokens"].as_u64() {
                last_done = done;
            } else if v["finish"].is_string() {
                break v;
            }
        };
        assert_eq!(turn["finish"], "cancelled", "{turn}");
        assert_eq!(turn["completion_tokens"], 0, "{turn}");
        assert!(
            last_done < total,
            "the prefill ran to its end: {last_done} of {total}"
        );
        // Still running: the next turn is answered.
        stdin.write_all(b"And then?\n/exit\n").unwrap();
        drop(stdin);
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{rest}");
        let turns: Vec<Value> = rest
            .lines()
            .filter_map(json_line)
            .filter(|v| v["finish"].is_string())
            .collect();
        assert_eq!(turns.len(), 1, "{rest}");
        assert_ne!(turns[0]["finish"], "cancelled", "{rest}");
    }

    #[test]
    fn item9_a_line_of_invalid_utf8_in_chat_is_reported_and_the_next_line_is_answered() {
        let mut child = chat(&["--max-tokens", "3"]);
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Tell me about Rome.\nbad \xff\xfe line\nAnd Greece?\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("line 2 is not valid UTF-8") && stderr.contains("skipped"),
            "{stderr}"
        );
        let turns = stderr
            .lines()
            .filter_map(json_line)
            .filter(|v| v["finish"].is_string())
            .count();
        assert_eq!(turns, 2, "{stderr}");
    }

    #[test]
    fn item12_chat_max_context_0_is_a_usage_error() {
        let out = chat(&["--max-context", "0"]).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--max-context") && stderr.contains("at least 1"),
            "{stderr}"
        );
    }

    fn serve_pack() -> &'static std::path::Path {
        http::tiny_pack("hostile-33-serve")
    }

    fn serve_cli(args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .arg("serve")
            .arg(serve_pack())
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    #[test]
    fn item10_a_web_page_cannot_make_the_keyless_local_server_generate() {
        let server = Server::start(serve_pack(), &[]);
        let body = br#"{"prompt": "The", "max_tokens": 1}"#;
        let raw = |headers: &str| {
            let req = format!(
                "POST /v1/completions HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let mut bytes = req.into_bytes();
            bytes.extend_from_slice(body);
            http::send_raw(server.addr, &bytes).unwrap()
        };
        let host = format!("Host: {}\r\n", server.addr);
        let json = "Content-Type: application/json\r\n";
        // What a page can send with no CORS preflight: text/plain, or no type at all.
        for ct in [
            "Content-Type: text/plain\r\n",
            "",
            "Content-Type: application/x-www-form-urlencoded\r\n",
        ] {
            let r = raw(&format!("{host}{ct}"));
            assert_eq!(r.status, 415, "{ct:?}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
        }
        // DNS rebinding: the page's own name in Host.
        let port = server.addr.port();
        for evil in ["evil.example", "evil.example:80", "127.0.0.1.evil.example"] {
            let r = raw(&format!("Host: {evil}\r\n{json}"));
            assert_eq!(r.status, 403, "{evil}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "host_not_allowed");
        }
        for good in [
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            "[::1]".into(),
            "LOCALHOST".into(),
        ] {
            let r = raw(&format!("Host: {good}\r\n{json}"));
            assert_eq!(r.status, 200, "{good}: {}", r.text());
        }
        // A cross-origin page, even with JSON.
        for origin in [
            "http://evil.example",
            "null",
            "http://localhost.evil.example",
        ] {
            let r = raw(&format!("{host}{json}Origin: {origin}\r\n"));
            assert_eq!(r.status, 403, "{origin}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "origin_not_allowed");
        }
        let r = raw(&format!("{host}{json}Origin: http://localhost:3000\r\n"));
        assert_eq!(r.status, 200, "{}", r.text());
        // With a key, the key decides: a cross-origin request with it is served.
        let keyed = Server::start(serve_pack(), &["--api-key", "k"]);
        let r = request(
            keyed.addr,
            "POST",
            "/v1/completions",
            &[
                ("Origin", "http://evil.example"),
                ("Authorization", "Bearer k"),
            ],
            body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    #[test]
    fn item10_a_non_loopback_host_without_a_key_warns() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .arg("serve")
            .arg(serve_pack())
            .args(["--port", "0", "--host", "0.0.0.0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("http://") {
            assert!(err.read_line(&mut seen).unwrap() > 0, "{seen}");
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            seen.contains("warning: --host 0.0.0.0 without --api-key"),
            "{seen}"
        );
    }

    #[test]
    fn item11_a_client_that_half_closes_after_its_request_gets_the_answer() {
        let server = Server::start(serve_pack(), &[]);
        for stream in [false, true] {
            let body =
                json!({"prompt": "The", "max_tokens": 3, "temperature": 0, "stream": stream})
                    .to_string();
            let mut s = std::net::TcpStream::connect(server.addr).unwrap();
            write!(
                s,
                "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                server.addr,
                body.len()
            )
            .unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut all = String::new();
            s.read_to_string(&mut all).unwrap();
            assert!(all.starts_with("HTTP/1.1 200"), "stream {stream}: {all:?}");
            assert!(
                all.contains("completion_tokens") || all.contains("[DONE]"),
                "{all:?}"
            );
        }
    }

    #[test]
    fn item12_api_keys_that_no_request_could_send_are_refused_at_start() {
        for (key, why) in [
            ("", "empty key"),
            (" k ", "spaces around it"),
            ("clé", "printable ASCII"),
        ] {
            let out = serve_cli(&["--api-key", key]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{key:?}: {err}");
            assert!(
                err.contains("--api-key") && err.contains(why),
                "{key:?}: {err}"
            );
        }
    }

    #[test]
    fn item12_the_bearer_scheme_is_case_insensitive() {
        let server = Server::start(serve_pack(), &["--api-key", "s3cret"]);
        for auth in ["bearer s3cret", "BEARER s3cret", "Bearer s3cret"] {
            let r = request(
                server.addr,
                "GET",
                "/v1/models",
                &[("Authorization", auth)],
                b"",
            );
            assert_eq!(r.status, 200, "{auth}: {}", r.text());
        }
        let r = request(
            server.addr,
            "GET",
            "/v1/models",
            &[("Authorization", "Basic s3cret")],
            b"",
        );
        assert_eq!(r.status, 401);
    }

    #[test]
    fn item12_errors_say_what_a_field_should_be_and_which_field_is_too_long() {
        let server = Server::start(serve_pack(), &["--max-prompt-tokens", "5"]);
        for (path, body, field) in [
            (
                "/v1/completions",
                json!({"prompt": {"a": 1}}),
                "`prompt` as a string",
            ),
            (
                "/v1/completions",
                json!({"prompt": "x", "stop": 5}),
                "`stop` as a string",
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": 5}]}),
                "`content` as a string",
            ),
        ] {
            let r = post(server.addr, path, &body);
            assert_eq!(r.status, 400, "{body}: {}", r.text());
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.contains(field), "{body}: {msg}");
            assert!(
                !msg.contains("enum") && !msg.contains("Field"),
                "{body}: {msg}"
            );
        }
        let r = post(
            server.addr,
            "/v1/completions",
            &json!({"prompt": "word ".repeat(20)}),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["param"], "prompt");
        let chat = json!({"messages": [{"role": "user", "content": "word ".repeat(20)}]});
        let r = post(server.addr, "/v1/chat/completions", &chat);
        assert_eq!(r.json()["error"]["param"], "messages");
        // Refusals are the client's: /health counts them apart from server failures.
        let h = server.health();
        assert_eq!(h["failed"], 0, "{h}");
        assert_eq!(h["rejected"], 2, "{h}");
    }

    #[test]
    fn item12_a_server_error_does_not_show_where_the_pack_lies() {
        let tmp = tempfile::tempdir().unwrap();
        let pack = tmp.path().join("p.flashpack");
        std::fs::copy(serve_pack(), &pack).unwrap();
        // Experts are read on demand under a budget; the pack then loses its tail.
        let server = Server::start(&pack, &["--mem-budget", "18MB", "--max-context", "512"]);
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        let r = post(
            server.addr,
            "/v1/completions",
            &json!({"prompt": "The history of Rome and Greece and", "max_tokens": 5}),
        );
        assert_eq!(r.status, 500, "{}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        let dir = tmp.path().to_str().unwrap();
        assert!(msg.contains("p.flashpack") && !msg.contains(dir), "{msg}");
        assert_eq!(server.health()["failed"], 1);
    }

    #[test]
    fn item12_a_model_id_with_a_slash_is_found() {
        let server = Server::start(serve_pack(), &["--model-name", "org/tiny-moe"]);
        let r = request(server.addr, "GET", "/v1/models/org/tiny-moe", &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["id"], "org/tiny-moe");
        let r = request(server.addr, "GET", "/v1/models/org/other", &[], b"");
        assert_eq!(r.status, 404, "{}", r.text());
    }
}
