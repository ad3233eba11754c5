//! Describe stage of `flashpack plan`: an opened pack, or a checkpoint with the conversion
//! options, -> what the runtime will hold and read ([`Facts`]).
//!
//! In: a [`Pack`] opened on its header-only copy (its directories and metadata), or a
//! [`PackSizes`] (convert's own sizing of a conversion, `convert::size`) with the checkpoint's
//! config. Out: [`Facts`]: the dense tensors (for the compute probe) and their resident bytes,
//! every stored expert with its pool (one per precision, as the expert cache makes them), the
//! bytes one resident expert takes and one miss reads, and the routing profile when the pack
//! carries one. Pure: no I/O, no MLX.
//! Invariant: a pack's numbers are its directory's (the decoded bytes the runtime allocates, the
//! whole pages a miss reads); a checkpoint's are those convert writes with `--codec raw`.

use std::collections::BTreeMap;

use crate::arch::ModelConfig;
use crate::convert::size::PackSizes;
use crate::format::{Pack, ProjBits, QuantMode};
use crate::mlx::Dtype;
use crate::model::Quant;

/// One dense tensor as the runtime holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseShape {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Its module's quantization, for a `.weight` of codes.
    pub quant: Option<Quant>,
}

/// One precision of expert: a slot pool of the expert cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub bits: ProjBits,
    pub group_size: u32,
    pub mode: QuantMode,
    /// The type of its scales and biases.
    pub scale_dtype: Dtype,
    /// Stored experts of this precision (all layers).
    pub stored: u32,
    /// Bytes one resident expert takes in the cache.
    pub resident_bytes: u64,
    /// Bytes a miss reads (whole pages).
    pub read_bytes: u64,
}

/// What the runtime will hold and read for one pack.
#[derive(Clone, Debug)]
pub struct Facts {
    pub cfg: ModelConfig,
    pub dense: Vec<DenseShape>,
    /// Bytes of the dense tensors, resident whatever the budget.
    pub dense_bytes: u64,
    pub pools: Vec<Pool>,
    /// Stored experts: (layer, expert) -> pool.
    pub experts: BTreeMap<(usize, usize), usize>,
    /// Per sparse layer, each router expert's share of the layer's routing mass, from the
    /// pack's profile; `None` without one.
    pub profile: Option<BTreeMap<usize, Vec<f64>>>,
    /// Router expert -> stored expert, for a pack with merged experts.
    pub merge_map: Option<Vec<Vec<u32>>>,
    /// The profile's routing trace (`plan::replay`); `None` without one.
    pub trace: Option<crate::format::RoutingTrace>,
    pub file_bytes: u64,
}

impl Facts {
    /// Bytes of every stored expert resident (the whole of a percentage `--expert-budget`,
    /// as `ExpertCache::all_resident_bytes` counts it).
    pub fn all_experts_bytes(&self) -> u64 {
        self.pools
            .iter()
            .map(|p| p.stored as u64 * p.resident_bytes)
            .sum()
    }

    /// The stored expert router expert `e` of `layer` reads.
    pub fn stored(&self, layer: usize, e: usize) -> usize {
        self.merge_map
            .as_ref()
            .and_then(|m| m.get(layer))
            .and_then(|l| l.get(e))
            .map_or(e, |&s| s as usize)
    }

    /// The pool with the most experts (the probe's precision).
    pub fn main_pool(&self) -> Option<&Pool> {
        self.pools.iter().max_by_key(|p| p.stored)
    }
}

fn mlx_dtype(d: crate::format::DType) -> Dtype {
    crate::run::open::mlx_dtype(d)
}

/// Shares of each layer's routing mass, from a profile's raw masses.
fn shares(mass: Vec<Option<Vec<f64>>>) -> Option<BTreeMap<usize, Vec<f64>>> {
    let out: BTreeMap<usize, Vec<f64>> = mass
        .into_iter()
        .enumerate()
        .filter_map(|(l, m)| {
            let m = m?;
            let total: f64 = m.iter().sum();
            (total > 0.0).then(|| (l, m.iter().map(|x| x / total).collect()))
        })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// The facts of a pack, from its directories and metadata.
pub fn of_pack(pack: &Pack) -> Facts {
    let meta = pack.meta();
    let mut dense = Vec::new();
    let mut quant = BTreeMap::new();
    for t in pack.tensors() {
        if t.bits > 0 {
            if let Some(module) = t.name.strip_suffix(".weight") {
                quant.insert(
                    module.to_string(),
                    Quant {
                        group_size: t.group_size as i32,
                        bits: t.bits as i32,
                        mode: t.mode,
                    },
                );
            }
        }
    }
    for t in pack.tensors() {
        dense.push(DenseShape {
            name: t.name.clone(),
            dtype: mlx_dtype(t.dtype),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            quant: t
                .name
                .strip_suffix(".weight")
                .and_then(|m| quant.get(m).copied()),
        });
    }
    let page = pack.page_size() as u64;
    // One pool per precision, as `ExpertCache::new` groups them (its split of a pool between
    // layers, for MLX's 2^31-element arrays, moves at most a slot per pool).
    // (bits, group, mode, scale type, bias type); `Dtype` is not ordered: its code stands in.
    type Key = (ProjBits, u32, QuantMode, u8, Option<u8>);
    let mut dtypes: BTreeMap<Key, Dtype> = BTreeMap::new();
    let mut by_key: BTreeMap<Key, (u32, u64, u64)> = BTreeMap::new();
    let mut of_expert: BTreeMap<(usize, usize), Key> = BTreeMap::new();
    let mut sums: BTreeMap<(u32, u32), (u64, u64)> = BTreeMap::new();
    for e in pack.experts() {
        let s = sums.entry((e.layer, e.expert)).or_default();
        s.0 += e.decoded_len;
        s.1 += e.stored_len.div_ceil(page) * page;
        if e.segment == 0 {
            let key = (
                e.bits,
                e.group_size,
                e.mode,
                e.scale_dtype as u8,
                e.bias_dtype.map(|d| d as u8),
            );
            dtypes.insert(key, mlx_dtype(e.scale_dtype));
            of_expert.insert((e.layer as usize, e.expert as usize), key);
        }
    }
    for (&(l, e), key) in &of_expert {
        let (resident, read) = sums[&(l as u32, e as u32)];
        let p = by_key.entry(*key).or_default();
        p.0 += 1;
        p.1 = p.1.max(resident);
        p.2 += read;
    }
    let keys: Vec<Key> = by_key.keys().copied().collect();
    // A miss reads its expert's own pages: coded experts differ in length, so a pool's read
    // size is their mean. Slots are all of one size (decoded).
    let pools = by_key
        .iter()
        .map(|(k, &(stored, resident_bytes, read))| Pool {
            bits: k.0,
            group_size: k.1,
            mode: k.2,
            scale_dtype: dtypes[k],
            stored,
            resident_bytes,
            read_bytes: read / stored.max(1) as u64,
        })
        .collect();
    let experts = of_expert
        .iter()
        .map(|(&le, k)| (le, keys.iter().position(|x| x == k).unwrap_or(0)))
        .collect();
    Facts {
        cfg: meta.model.clone(),
        dense,
        dense_bytes: pack.tensors().iter().map(|t| t.decoded_len).sum(),
        pools,
        experts,
        profile: shares(meta.profile_mass()),
        merge_map: meta.merge_map.clone(),
        trace: meta.profile_trace(),
        file_bytes: pack.header().file_size,
    }
}

/// The facts of the pack a conversion would write (`sizes`, convert's own sizing) of a
/// checkpoint with config `cfg`. A checkpoint carries no profile.
pub fn of_conversion(cfg: &ModelConfig, sizes: &PackSizes) -> Facts {
    let mut quant = BTreeMap::new();
    for t in &sizes.dense {
        if t.bits > 0 {
            if let Some(module) = t.name.strip_suffix(".weight") {
                quant.insert(
                    module.to_string(),
                    Quant {
                        group_size: t.group_size as i32,
                        bits: t.bits as i32,
                        mode: t.mode,
                    },
                );
            }
        }
    }
    let dense = sizes
        .dense
        .iter()
        .map(|t| DenseShape {
            name: t.name.clone(),
            dtype: convert_dtype(t.dtype),
            shape: t.shape.clone(),
            quant: t
                .name
                .strip_suffix(".weight")
                .and_then(|m| quant.get(m).copied()),
        })
        .collect();
    // (bits, group, mode, scale type, resident bytes, read bytes).
    type Key = (ProjBits, usize, QuantMode, u8, u64, u64);
    let key = |e: &crate::convert::size::ExpertSize| -> Key {
        (
            e.bits,
            e.group_size,
            e.mode,
            e.scale_dtype as u8,
            e.decoded,
            e.read,
        )
    };
    let dtypes: BTreeMap<Key, Dtype> = sizes
        .experts
        .iter()
        .map(|e| (key(e), mlx_dtype(e.scale_dtype)))
        .collect();
    let mut by_key: BTreeMap<Key, u32> = BTreeMap::new();
    for e in &sizes.experts {
        *by_key.entry(key(e)).or_default() += 1;
    }
    let keys: Vec<Key> = by_key.keys().copied().collect();
    let pools = by_key
        .iter()
        .map(|(k, &stored)| Pool {
            bits: k.0,
            group_size: k.1 as u32,
            mode: k.2,
            scale_dtype: dtypes[k],
            stored,
            resident_bytes: k.4,
            read_bytes: k.5,
        })
        .collect();
    let experts = sizes
        .experts
        .iter()
        .map(|e| {
            let k = key(e);
            (
                (e.layer, e.expert),
                keys.iter().position(|x| *x == k).unwrap_or(0),
            )
        })
        .collect();
    Facts {
        cfg: cfg.clone(),
        dense,
        dense_bytes: sizes.dense_bytes(),
        pools,
        experts,
        profile: None,
        merge_map: None,
        trace: None,
        file_bytes: sizes.file_size,
    }
}

fn convert_dtype(d: crate::convert::tensor::Dtype) -> Dtype {
    use crate::convert::tensor::Dtype as D;
    match d {
        D::F32 => Dtype::F32,
        D::F16 => Dtype::F16,
        D::Bf16 => Dtype::BF16,
        D::U32 => Dtype::U32,
        D::I32 => Dtype::I32,
        _ => Dtype::U8,
    }
}
