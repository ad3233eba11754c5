//! A source checkpoint as a runnable model: the full-precision reference of `flashpack eval` and
//! the model the profile stage of convert runs its calibration text through.
//!
//! In: an opened [`Checkpoint`] (Hugging Face floats, or an mlx-lm folder's codes). Out: a
//! [`Weights`] with every dense tensor (floats widened to f32, so the reference computes in
//! f32; MLX codes kept as they are) and an [`ExpertStore`] that builds one layer's experts when
//! the router first asks for it. Float experts are quantized by MLX at 8 bits, group 32 (the
//! runtime's expert kernel `gather_qmm` takes only quantized experts; 8-bit codes put every
//! weight within half a step of 1/255 of its group's range, far below the 2..4-bit error that
//! eval measures). MLX codes of the source are used unchanged.
//! Invariant: [`SourceExperts`] holds at most `keep` layers' experts (plus the one the lazy
//! graph still references), so with `keep = 1` memory is the dense weights, about two layers of
//! 8-bit experts and the activations, whatever the number of layers.

use std::collections::{BTreeMap, VecDeque};

use crate::convert::load::{Checkpoint, LoadError, TensorData};
use crate::convert::quantize::ProjSource;
use crate::convert::tensor::{Dtype as SrcDtype, FloatDtype};
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};
use crate::run::compute::{
    ComputeError, ExpertPool, ExpertStore, LayerExperts, PoolRoute, Quant, Weights,
};

/// Bits and group size of float experts in the reference.
pub const REFERENCE_EXPERT_BITS: i32 = 8;
pub const REFERENCE_EXPERT_GROUP: i32 = 32;

fn load_err(e: LoadError) -> ComputeError {
    ComputeError::Unsupported {
        what: format!("reading the source checkpoint: {e}"),
    }
}

fn float_dtype(d: FloatDtype) -> Dtype {
    match d {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::Bf16 => Dtype::BF16,
    }
}

/// Dense tensors of a checkpoint as MLX arrays, by the names the checkpoint uses (which are
/// mlx-lm's for every supported architecture's dense tensors).
pub struct SourceWeights {
    tensors: BTreeMap<String, Array>,
    quant: BTreeMap<String, Quant>,
}

impl SourceWeights {
    pub fn load(ck: &Checkpoint) -> Result<SourceWeights, ComputeError> {
        let mut tensors = BTreeMap::new();
        let mut quant = BTreeMap::new();
        for t in ck.dense_tensors().map_err(load_err)? {
            match t.data {
                TensorData::Float {
                    dtype,
                    shape,
                    bytes,
                } => {
                    let a =
                        Array::from_bytes(bytes, shape, float_dtype(dtype))?.astype(Dtype::F32)?;
                    a.eval()?;
                    ck.release(bytes);
                    tensors.insert(t.name.clone(), a);
                }
                TensorData::Quantized(q) => {
                    let module = t.name.trim_end_matches(".weight").to_string();
                    let p = q.params;
                    let sd = float_dtype(q.scale_dtype);
                    let groups = q.cols / p.group_size;
                    let words = q.cols * p.bits as usize / 32;
                    tensors.insert(
                        t.name.clone(),
                        Array::from_bytes(q.codes, &[q.rows, words], Dtype::U32)?,
                    );
                    tensors.insert(
                        format!("{module}.scales"),
                        Array::from_bytes(q.scales, &[q.rows, groups], sd)?,
                    );
                    tensors.insert(
                        format!("{module}.biases"),
                        Array::from_bytes(q.biases, &[q.rows, groups], sd)?,
                    );
                    quant.insert(
                        module,
                        Quant {
                            group_size: p.group_size as i32,
                            bits: p.bits as i32,
                        },
                    );
                }
                TensorData::Other {
                    dtype,
                    shape,
                    bytes,
                } => {
                    let d = match dtype {
                        SrcDtype::U32 => Dtype::U32,
                        SrcDtype::I32 => Dtype::I32,
                        SrcDtype::U8 => Dtype::U8,
                        // Not something the forward pass reads.
                        _ => continue,
                    };
                    tensors.insert(t.name.clone(), Array::from_bytes(bytes, shape, d)?);
                }
            }
        }
        Ok(SourceWeights { tensors, quant })
    }
}

impl Weights for SourceWeights {
    fn get(&self, name: &str) -> Option<Array> {
        self.tensors.get(name).cloned()
    }

    fn quantization(&self, module: &str) -> Option<Quant> {
        self.quant.get(module).copied()
    }
}

/// The experts of a checkpoint, built one layer at a time on first use.
pub struct SourceExperts<'c> {
    ck: &'c Checkpoint,
    keep: usize,
    layers: BTreeMap<usize, LayerExperts>,
    order: VecDeque<usize>,
    /// Layers built so far (a layer evicted and needed again counts again).
    pub layers_built: usize,
}

impl<'c> SourceExperts<'c> {
    /// `keep`: how many layers stay built (1 for profiling; `usize::MAX` to keep them all).
    pub fn new(ck: &'c Checkpoint, keep: usize) -> SourceExperts<'c> {
        SourceExperts {
            ck,
            keep: keep.max(1),
            layers: BTreeMap::new(),
            order: VecDeque::new(),
            layers_built: 0,
        }
    }

    fn build(&self, layer: usize) -> Result<LayerExperts, ComputeError> {
        let c = &self.ck.config;
        let n = c.num_experts;
        let mut stacks: Vec<Vec<QuantizedMatrix>> = (0..3).map(|_| Vec::with_capacity(n)).collect();
        for e in 0..n {
            let x = self.ck.expert(layer, e).map_err(load_err)?;
            for (p, src) in [x.gate, x.up, x.down].into_iter().enumerate() {
                let m = match src {
                    ProjSource::Float(m) => {
                        let mut v = vec![0f32; m.rows * m.cols];
                        for (r, row) in v.chunks_exact_mut(m.cols).enumerate() {
                            m.row_f32(r, row);
                        }
                        self.ck.release(m.bytes());
                        let a = Array::from_slice(&v, &[1, m.rows, m.cols])?;
                        mlx::quantize(&a, REFERENCE_EXPERT_GROUP, REFERENCE_EXPERT_BITS)?
                    }
                    ProjSource::Quantized(q) => {
                        let sd = float_dtype(q.scale_dtype);
                        let groups = q.cols / q.params.group_size;
                        let words = q.cols * q.params.bits as usize / 32;
                        QuantizedMatrix {
                            weight: Array::from_bytes(q.codes, &[1, q.rows, words], Dtype::U32)?,
                            scales: Array::from_bytes(q.scales, &[1, q.rows, groups], sd)?,
                            biases: Some(Array::from_bytes(q.biases, &[1, q.rows, groups], sd)?),
                            group_size: q.params.group_size as i32,
                            bits: q.params.bits as i32,
                        }
                    }
                };
                stacks[p].push(m);
            }
        }
        let mut stacked = Vec::with_capacity(3);
        for (p, parts) in stacks.into_iter().enumerate() {
            let (g, b) = (parts[0].group_size, parts[0].bits);
            if let Some(other) = parts.iter().find(|m| m.group_size != g || m.bits != b) {
                return Err(ComputeError::Unsupported {
                    what: format!(
                        "layer {layer} projection {p}: experts quantized with different bits \
                         or group sizes ({b}/{g} and {}/{}) in the source",
                        other.bits, other.group_size
                    ),
                });
            }
            let cat = |f: &dyn Fn(&QuantizedMatrix) -> Array| -> Result<Array, ComputeError> {
                let arrays: Vec<Array> = parts.iter().map(f).collect();
                let refs: Vec<&Array> = arrays.iter().collect();
                Ok(mlx::concatenate(&refs, 0)?)
            };
            let weight = cat(&|m| m.weight.clone())?;
            let scales = cat(&|m| m.scales.clone())?;
            let biases = cat(&|m| m.biases.clone().expect("affine has biases"))?;
            mlx::eval(&[&weight, &scales, &biases])?;
            stacked.push(QuantizedMatrix {
                weight,
                scales,
                biases: Some(biases),
                group_size: g,
                bits: b,
            });
        }
        let down = stacked.pop().expect("three");
        let up = stacked.pop().expect("three");
        let gate = stacked.pop().expect("three");
        let pool = ExpertPool { gate, up, down };
        pool.check(
            &format!("layer {layer} experts"),
            n,
            c.hidden_size,
            c.moe_intermediate_size,
        )?;
        Ok(LayerExperts::resident(pool))
    }
}

impl ExpertStore for SourceExperts<'_> {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        if !self.layers.contains_key(&layer) {
            while self.order.len() >= self.keep {
                if let Some(old) = self.order.pop_front() {
                    self.layers.remove(&old);
                }
            }
            let built = self.build(layer)?;
            self.layers.insert(layer, built);
            self.order.push_back(layer);
            self.layers_built += 1;
        }
        self.layers
            .get(&layer)
            .ok_or(ComputeError::NoExperts { layer })?
            .route(indices)
    }
}
