//! safetensors files: headers read with Hugging Face's `safetensors` crate, plus the checks it
//! does not make. The shard index (`model.safetensors.index.json`) and the one rule that leaves
//! out multi-token-prediction layers ([`MtpLayers`]) and the shards that hold nothing else
//! ([`ShardIndex::plan`]) live in `crate::checkpoint`, shared with the Hub download; they are
//! re-exported here.
//!
//! In: the bytes of one `.safetensors` file (mapped). Out: its tensors (name, dtype, shape,
//! absolute byte range). Invariant: the file passed `SafeTensors::read_metadata` (header length
//! and UTF-8 JSON; offsets that tile the data section exactly, so no gap, no overlap and no byte
//! past the end; each tensor exactly `shape x dtype` bytes), and in addition no tensor name
//! appears twice in the header (the crate keeps the last entry, other readers the first) and
//! every dtype is one flashpack reads. Only the header is parsed; the data stays mapped.
//! When the crate refuses a file, its entries are read again one by one to name the tensor at
//! fault and say what is wrong with it (the crate's own errors often name neither).

use super::LoadError;
use crate::convert::tensor::Dtype;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensorError, SafeTensors};
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::Path;

/// The little-endian u64 header length that starts every safetensors file.
const LEN_BYTES: usize = 8;

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

/// Parses and checks the header of `bytes` (the whole file; `path` is for messages). Tensors
/// come back sorted by name.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<TensorInfo>, LoadError> {
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| explain(path, bytes, e))?;
    let data_start = LEN_BYTES + n;
    // Names only: the crate has checked everything else.
    entries::<IgnoredAny>(path, &bytes[LEN_BYTES..data_start])?;
    let mut out = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let dtype = dtype_of(path, &name, info.dtype)?;
            let (begin, end) = info.data_offsets;
            // read_metadata checked data_start + end <= bytes.len().
            Ok(TensorInfo {
                range: data_start + begin..data_start + end,
                shape: info.shape.clone(),
                name,
                dtype,
            })
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Our dtype for the crate's, or an error naming the tensor (F4, F6, F8_E8M0, C64, ... are
/// valid safetensors that no supported checkpoint uses).
fn dtype_of(path: &Path, tensor: &str, d: StDtype) -> Result<Dtype, LoadError> {
    Dtype::from_safetensors(&d.to_string()).ok_or_else(|| LoadError::UnsupportedDtype {
        path: path.display().to_string(),
        tensor: tensor.to_string(),
        dtype: d.to_string(),
    })
}

/// The header's tensor entries in file order (`__metadata__` left out), each read as `V`; a
/// name given twice is [`LoadError::DuplicateName`], a malformed entry names its tensor.
fn entries<V: DeserializeOwned>(path: &Path, header: &[u8]) -> Result<Vec<(String, V)>, LoadError> {
    struct Entries<V>(PhantomData<V>);
    impl<'de, V: DeserializeOwned> Visitor<'de> for Entries<V> {
        /// The entries, and the first name seen twice.
        type Value = (Vec<(String, V)>, Option<String>);
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of tensors")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            let (mut out, mut dup) = (Vec::new(), None);
            while let Some(name) = map.next_key::<String>()? {
                if name == "__metadata__" || dup.is_some() {
                    map.next_value::<IgnoredAny>()?;
                } else if !seen.insert(name.clone()) {
                    map.next_value::<IgnoredAny>()?;
                    dup = Some(name);
                } else {
                    let v = map
                        .next_value::<V>()
                        .map_err(|e| serde::de::Error::custom(format!("tensor {name:?}: {e}")))?;
                    out.push((name, v));
                }
            }
            Ok((out, dup))
        }
    }
    let bad = |e: serde_json::Error| LoadError::BadHeader {
        path: path.display().to_string(),
        detail: format!("header is not a valid safetensors header: {e}"),
    };
    let mut de = serde_json::Deserializer::from_slice(header);
    let (out, dup) =
        serde::Deserializer::deserialize_map(&mut de, Entries(PhantomData)).map_err(bad)?;
    de.end().map_err(bad)?;
    match dup {
        Some(tensor) => Err(LoadError::DuplicateName {
            path: path.display().to_string(),
            tensor,
        }),
        None => Ok(out),
    }
}

/// The error to report for a file `read_metadata` refused with `err`: ours where we can name
/// the tensor and the numbers, else the crate's message.
fn explain(path: &Path, bytes: &[u8], err: SafeTensorError) -> LoadError {
    let p = || path.display().to_string();
    let file_len = bytes.len() as u64;
    let bad = |detail: String| LoadError::BadHeader { path: p(), detail };
    let n = bytes
        .get(..LEN_BYTES)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    match err {
        SafeTensorError::HeaderTooSmall => {
            return LoadError::Truncated {
                path: p(),
                needed: LEN_BYTES as u64,
                file_len,
            }
        }
        SafeTensorError::HeaderTooLarge => {
            return bad(format!(
                "header length {n} exceeds the format's limit (100 MB): the file is corrupt"
            ))
        }
        SafeTensorError::InvalidHeaderLength => {
            return LoadError::Truncated {
                path: p(),
                needed: n.saturating_add(LEN_BYTES as u64),
                file_len,
            }
        }
        SafeTensorError::InvalidHeader(e) => return bad(format!("header is not UTF-8: {e}")),
        _ => {}
    }
    // The crate got past the length checks, so the header lies inside the file.
    let header_end = LEN_BYTES + n as usize;
    let Some(header) = bytes.get(LEN_BYTES..header_end) else {
        return bad(err.to_string());
    };
    let data_len = file_len - header_end as u64;
    match entries::<safetensors::tensor::TensorInfo>(path, header) {
        Err(e) => e,
        Ok(entries) => {
            layout_error(path, &entries, data_len).unwrap_or_else(|| bad(err.to_string()))
        }
    }
}

/// The first fault of the entries' offsets, sizes and dtypes, in the order a reader meets
/// them: each entry against the data section, then the entries in offset order against each
/// other (every byte of the data section belongs to exactly one tensor).
fn layout_error(
    path: &Path,
    entries: &[(String, safetensors::tensor::TensorInfo)],
    data_len: u64,
) -> Option<LoadError> {
    let p = || path.display().to_string();
    for (name, info) in entries {
        let dtype = match dtype_of(path, name, info.dtype) {
            Ok(d) => d,
            Err(e) => return Some(e),
        };
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if begin > end || end > data_len {
            return Some(LoadError::TensorOutOfBounds {
                path: p(),
                tensor: name.clone(),
                begin,
                end,
                data_len,
            });
        }
        let want = info
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        let Some(want) = want else {
            return Some(LoadError::BadHeader {
                path: p(),
                detail: format!("tensor {name:?}: shape {:?} overflows", info.shape),
            });
        };
        if end - begin != want {
            return Some(LoadError::SizeMismatch {
                path: p(),
                tensor: name.clone(),
                dtype,
                shape: info.shape.clone(),
                expected: want,
                found: end - begin,
            });
        }
    }
    let mut by_offset: Vec<&(String, _)> = entries.iter().collect();
    by_offset.sort_by_key(|(_, info)| info.data_offsets);
    let mut covered = 0u64;
    let mut last: Option<&str> = None;
    for (name, info) in by_offset {
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if begin < covered {
            return Some(LoadError::TensorsOverlap {
                path: p(),
                first: last.unwrap_or_default().to_string(),
                second: name.clone(),
                begin,
                end: end.min(covered),
            });
        }
        if begin > covered {
            return Some(LoadError::BadHeader {
                path: p(),
                detail: format!(
                    "bytes {covered}..{begin} of the data section (before tensor {name:?}) \
                     belong to no tensor"
                ),
            });
        }
        covered = end;
        last = Some(name);
    }
    (covered < data_len).then(|| LoadError::BadHeader {
        path: p(),
        detail: format!(
            "the data section has {} bytes after its last tensor that belong to no tensor",
            data_len - covered
        ),
    })
}

/// The header of a safetensors file holding `tensors` back to back in this order (fixtures,
/// golden files, tests): the 8-byte length, then the JSON of the crate's `Metadata`, padded with
/// spaces to a multiple of 8 bytes as the crate's writer pads it.
///
/// Only the header comes from the crate: its writers (`serialize`, `serialize_to_file`) reorder
/// the tensors (by dtype, then name) and do not fsync, while fixtures keep their own order (the
/// shards are filled greedily in it) and stream gigabytes one tensor at a time.
pub fn serialize_header(tensors: &[(String, Dtype, Vec<usize>)]) -> std::io::Result<Vec<u8>> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<usize>() * dtype.size();
        let info = safetensors::tensor::TensorInfo {
            dtype: crate_dtype(*dtype),
            shape: shape.clone(),
            data_offsets: (offset, offset + n),
        };
        infos.push((name.clone(), info));
        offset += n;
    }
    let meta = Metadata::new(None, infos).map_err(std::io::Error::other)?;
    let mut h = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
    h.resize(h.len().next_multiple_of(LEN_BYTES), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    Ok(out)
}

/// The crate's dtype for ours (ours is a subset).
fn crate_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::Bool => StDtype::BOOL,
        Dtype::U8 => StDtype::U8,
        Dtype::I8 => StDtype::I8,
        Dtype::F8E4M3 => StDtype::F8_E4M3,
        Dtype::F8E5M2 => StDtype::F8_E5M2,
        Dtype::F8E8M0 => StDtype::F8_E8M0,
        Dtype::I16 => StDtype::I16,
        Dtype::U16 => StDtype::U16,
        Dtype::F16 => StDtype::F16,
        Dtype::Bf16 => StDtype::BF16,
        Dtype::I32 => StDtype::I32,
        Dtype::U32 => StDtype::U32,
        Dtype::F32 => StDtype::F32,
        Dtype::F64 => StDtype::F64,
        Dtype::I64 => StDtype::I64,
        Dtype::U64 => StDtype::U64,
    }
}

// The shard index and the MTP rule live with the checkpoint files, neutral ground shared with
// the Hub download.
pub use crate::checkpoint::{layer_of, Dropped, MtpLayers, ShardIndex, ShardPlan, TensorFilter};

#[cfg(test)]
mod tests;
