//! safetensors headers: parsed and checked against the file length.
//!
//! In: the bytes of one `.safetensors` file (mapped). Out: its tensors (name, dtype, shape,
//! absolute byte range). Invariant: every returned range lies inside the file and holds exactly
//! `product(shape) * dtype.size()` bytes; all arithmetic on header numbers is checked.
//! Format: 8-byte little-endian header length N, N bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data;
//! offsets are relative to byte `8 + N`.

use super::LoadError;
use crate::convert::tensor::Dtype;
use serde_json::Value;
use std::ops::Range;
use std::path::Path;

/// Headers larger than this are refused: real ones are a few MB at most, and a corrupt length
/// must not make us parse gigabytes as JSON.
const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

/// Parses and checks the header of `bytes` (the whole file; `path` is for messages).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<TensorInfo>, LoadError> {
    let p = || path.display().to_string();
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(LoadError::Truncated {
            path: p(),
            needed: 8,
            file_len,
        });
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().unwrap_or([0; 8]));
    if header_len > MAX_HEADER {
        return Err(LoadError::BadHeader {
            path: p(),
            detail: format!("header length {header_len} exceeds the {MAX_HEADER}-byte limit"),
        });
    }
    let data_start = 8 + header_len; // header_len <= MAX_HEADER: no overflow
    if data_start > file_len {
        return Err(LoadError::Truncated {
            path: p(),
            needed: data_start,
            file_len,
        });
    }
    let data_len = file_len - data_start;
    let json: Value = serde_json::from_slice(&bytes[8..data_start as usize]).map_err(|e| {
        LoadError::BadHeader {
            path: p(),
            detail: format!("header is not valid JSON: {e}"),
        }
    })?;
    let obj = json.as_object().ok_or_else(|| LoadError::BadHeader {
        path: p(),
        detail: "header is not a JSON object".into(),
    })?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |detail: String| LoadError::BadHeader {
            path: p(),
            detail: format!("tensor {name:?}: {detail}"),
        };
        let dtype_s = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype".into()))?;
        let dtype = Dtype::from_safetensors(dtype_s)
            .ok_or_else(|| bad(format!("unknown dtype {dtype_s:?}")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|n| usize::try_from(n).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape is not a list of sizes".into()))?;
        let offs = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
        let (begin, end) = offs;
        if begin > end || end > data_len {
            return Err(LoadError::TensorOutOfBounds {
                path: p(),
                tensor: name.clone(),
                begin,
                end,
                data_len,
            });
        }
        let want = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if end - begin != want {
            return Err(LoadError::SizeMismatch {
                path: p(),
                tensor: name.clone(),
                dtype,
                shape,
                expected: want,
                found: end - begin,
            });
        }
        // data_start + end <= file_len, which came from a usize slice length.
        let range = (data_start + begin) as usize..(data_start + end) as usize;
        out.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            range,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Builds the bytes of a safetensors file (fixtures, golden files, tests). Tensors are written
/// in the given order; the header is padded with spaces to 8 bytes as the reference writer does.
pub fn serialize_header(tensors: &[(String, Dtype, Vec<usize>)]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let n: u64 = shape.iter().map(|&d| d as u64).product::<u64>() * dtype.size() as u64;
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": shape,
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(map)).unwrap_or_default();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}
