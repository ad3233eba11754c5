//! A source checkpoint as a runnable model: the full-precision reference of `flashpack eval` and
//! the model the profile stage of convert runs its calibration text through.
//!
//! In: an opened [`Checkpoint`] (Hugging Face floats, or an mlx-lm folder's codes). Out: a
//! [`Weights`] with the dense tensors (all, or those a filter keeps, e.g. one layer's; floats
//! widened to f32, so the reference computes in f32; MLX codes kept as they are), the token
//! embedding of each window ([`embed_windows`]), and two [`ExpertStore`]s:
//! - [`SourceExperts`] (eval's reference) builds one layer's experts when the router first asks
//!   for it. Float experts are quantized by MLX at 8 bits, group 32 (the runtime's expert kernel
//!   `gather_qmm` takes only quantized experts; 8-bit codes put every weight within half a step
//!   of 1/255 of its group's range, far below the 2..4-bit error that eval measures). MLX codes
//!   of the source are used unchanged. It holds at most `keep` layers' experts (plus the one the
//!   lazy graph still references).
//! - [`StreamedExperts`] (the profile's) computes the routed experts itself, one expert at a
//!   time in f32 (MLX codes dequantized by MLX), releasing the source pages it read: memory is one
//!   expert's weights plus the activations.

use std::collections::{BTreeMap, VecDeque};

use crate::convert::load::{Checkpoint, LoadError, TensorData};
use crate::convert::quantize::ProjSource;
use crate::convert::tensor::{Dtype as SrcDtype, FloatDtype};
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};
use crate::model::{
    ComputeError, ExpertAct, ExpertBias, ExpertPool, ExpertStore, LayerExperts, PoolRoute, Quant,
    Routing, Weights,
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
        Self::load_where(ck, &|_| true)
    }

    /// Only the dense tensors whose names `keep` accepts (one layer's, say).
    pub fn load_where(
        ck: &Checkpoint,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<SourceWeights, ComputeError> {
        let mut tensors = BTreeMap::new();
        let mut quant = BTreeMap::new();
        // Float bytes widened so far: released once each and all again at the end (reading
        // one tensor maps its neighbours' pages back in; see StreamedExperts::mix).
        let mut read: Vec<&[u8]> = Vec::new();
        for t in ck.dense_tensors().map_err(load_err)? {
            if !keep(&t.name) {
                continue;
            }
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
                    read.push(bytes);
                    tensors.insert(t.name.clone(), a);
                }
                TensorData::Fp8(m) => {
                    let a = Array::from_slice(&ProjSource::Float(m).to_f32(), &[m.rows, m.cols])?;
                    a.eval()?;
                    for b in ProjSource::Float(m).source_bytes() {
                        ck.release(b);
                        read.push(b);
                    }
                    tensors.insert(t.name.clone(), a);
                }
                TensorData::Derived(ref d) => {
                    let a = Array::from_slice(&d.values(), &d.shape())?;
                    a.eval()?;
                    tensors.insert(t.name.clone(), a);
                }
                TensorData::Quantized(q) => {
                    let module = t.name.trim_end_matches(".weight").to_string();
                    let m = mlx_codes(&q, &[])?;
                    tensors.insert(t.name.clone(), m.weight);
                    tensors.insert(format!("{module}.scales"), m.scales);
                    if let Some(b) = m.biases {
                        tensors.insert(format!("{module}.biases"), b);
                    }
                    quant.insert(
                        module,
                        Quant {
                            group_size: m.group_size,
                            bits: m.bits,
                            mode: m.mode,
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
        read.iter().for_each(|b| ck.release(b));
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

/// An MLX source's codes of one projection as MLX arrays, shaped `[lead.., rows, ..]`.
fn mlx_codes(
    q: &crate::convert::quantize::QuantizedView<'_>,
    lead: &[usize],
) -> Result<QuantizedMatrix, ComputeError> {
    let groups = q.cols / q.params.group_size;
    let words = q.cols * q.params.bits as usize / 32;
    let shape = |last: usize| [lead, &[q.rows, last]].concat();
    // mxfp4/mxfp8/nvfp4: u8 (E8M0 or E4M3) scales and no biases.
    let (sd, biases) = if q.params.has_biases() {
        let sd = float_dtype(q.scale_dtype);
        (sd, Some(Array::from_bytes(q.biases, &shape(groups), sd)?))
    } else {
        (Dtype::U8, None)
    };
    Ok(QuantizedMatrix {
        weight: Array::from_bytes(q.codes, &shape(words), Dtype::U32)?,
        scales: Array::from_bytes(q.scales, &shape(groups), sd)?,
        biases,
        group_size: q.params.group_size as i32,
        bits: q.params.bits as i32,
        mode: q.params.mode,
    })
}

/// A quantized source's codes as MLX arrays ([`mlx_codes`]); interleaved rows are copied out
/// first. A float source has no codes: an error.
fn source_codes(src: ProjSource<'_>, lead: &[usize]) -> Result<QuantizedMatrix, ComputeError> {
    match src {
        ProjSource::Quantized(q) => mlx_codes(&q, lead),
        ProjSource::Interleaved { .. } => {
            let own = src.own().ok_or_else(|| ComputeError::Unsupported {
                what: "interleaved rows".into(),
            })?;
            mlx_codes(&own.view(), lead)
        }
        ProjSource::Float(_) => Err(ComputeError::Unsupported {
            what: "codes of a float projection".into(),
        }),
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
        let mut biases: [Vec<Array>; 3] = Default::default();
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
                    _ => source_codes(src, &[1])?,
                };
                stacks[p].push(m);
            }
            if let Some(b) = &x.bias {
                let one = |v: crate::convert::quantize::BiasVector<'_>| {
                    Array::from_bytes(&v.bytes_of(0..v.len), &[1, v.len], float_dtype(v.dtype))
                };
                biases[0].push(one(b.gate)?);
                biases[1].push(one(b.up)?);
                biases[2].push(one(b.down)?);
            }
        }
        let mut stacked = Vec::with_capacity(3);
        for (p, parts) in stacks.into_iter().enumerate() {
            let (g, b, mode) = (parts[0].group_size, parts[0].bits, parts[0].mode);
            if let Some(other) = parts
                .iter()
                .find(|m| m.group_size != g || m.bits != b || m.mode != mode)
            {
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
            let biases = if mode.has_biases() {
                Some(cat(&|m| m.biases.clone().expect("affine has biases"))?)
            } else {
                None
            };
            let mut all = vec![&weight, &scales];
            all.extend(biases.as_ref());
            mlx::eval(&all)?;
            stacked.push(QuantizedMatrix {
                weight,
                scales,
                biases,
                group_size: g,
                bits: b,
                mode,
            });
        }
        let down = stacked.pop().expect("three");
        let up = stacked.pop().expect("three");
        let gate = stacked.pop().expect("three");
        let bias = if biases[0].len() == n && n > 0 {
            let cat = |v: &Vec<Array>| -> Result<Array, ComputeError> {
                let refs: Vec<&Array> = v.iter().collect();
                Ok(mlx::concatenate(&refs, 0)?)
            };
            let [g, u, d] = &biases;
            Some(ExpertBias {
                gate: cat(g)?,
                up: cat(u)?,
                down: cat(d)?,
            })
        } else {
            None
        };
        let pool = ExpertPool {
            gate,
            up,
            down,
            bias,
            act: ExpertAct::of(c),
        };
        pool.check(
            &format!("layer {layer} experts"),
            n,
            c.expert_hidden_size(),
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

/// The source's token embedding of each window of ids, as f32 `[1, len, H]` arrays. Float
/// embeddings are read row by row from the mapped shards (never the whole table); an
/// MLX-quantized one is looked up by MLX from its codes.
pub fn embed_windows(ck: &Checkpoint, windows: &[&[u32]]) -> Result<Vec<Array>, ComputeError> {
    let name = "model.embed_tokens.weight";
    let h = ck.config.hidden_size;
    let dense = ck.dense_tensors().map_err(load_err)?;
    let t = dense
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| ComputeError::MissingTensor { name: name.into() })?;
    match t.data {
        TensorData::Float {
            dtype,
            shape,
            bytes,
        } => {
            let rows = shape.first().copied().unwrap_or(0);
            let m = crate::convert::tensor::MatrixView::new(dtype, rows, h, bytes).ok_or_else(
                || ComputeError::BadShape {
                    name: name.into(),
                    found: shape.to_vec(),
                    expected: vec![ck.config.vocab_size, h],
                },
            )?;
            let out = windows
                .iter()
                .map(|ids| {
                    let mut v = vec![0f32; ids.len() * h];
                    for (row, &id) in v.chunks_exact_mut(h).zip(ids.iter()) {
                        if id as usize >= rows {
                            return Err(ComputeError::TokenOutOfRange { id, vocab: rows });
                        }
                        m.row_f32(id as usize, row);
                    }
                    Ok(Array::from_slice(&v, &[1, ids.len(), h])?)
                })
                .collect();
            ck.release(bytes);
            out
        }
        _ => {
            let w = SourceWeights::load_where(ck, &|n| n.starts_with("model.embed_tokens."))?;
            let e =
                crate::model::Embedding::load(&w, "model.embed_tokens", ck.config.vocab_size, h)?;
            windows
                .iter()
                .map(|ids| {
                    let x = e
                        .forward(&Array::from_slice(ids, &[1, ids.len()])?)?
                        .astype(Dtype::F32)?;
                    x.eval()?;
                    Ok(x)
                })
                .collect()
        }
    }
}

/// The experts of a checkpoint computed one expert at a time in f32, straight from the source:
/// [`ExpertStore::mix`] gathers each routed expert's tokens, widens that expert's three
/// projections to f32 (or dequantizes an MLX source's codes), applies it and adds the
/// weighted result. Memory is one expert's f32 weights plus the activations, whatever the size
/// of a layer; each expert is read once per call, so a caller passes all its tokens at once.
pub struct StreamedExperts<'c> {
    ck: &'c Checkpoint,
    act: ExpertAct,
}

impl<'c> StreamedExperts<'c> {
    pub fn new(ck: &'c Checkpoint) -> StreamedExperts<'c> {
        StreamedExperts {
            ck,
            act: ExpertAct::of(&ck.config),
        }
    }

    /// One projection as f32 `[out, in]` (MLX codes dequantized by MLX); the source bytes it
    /// read go to `read`.
    fn f32_matrix(src: ProjSource<'c>, read: &mut Vec<&'c [u8]>) -> Result<Array, ComputeError> {
        read.extend(src.source_bytes());
        Ok(match src {
            ProjSource::Float(_) => Array::from_slice(&src.to_f32(), &src.shape())?,
            _ => mlx::dequantize(&source_codes(src, &[])?)?.astype(Dtype::F32)?,
        })
    }
}

/// An expert's biases as f32 arrays (gate, up, down), for the f32 reference.
fn f32_biases(b: &crate::convert::quantize::ExpertBiases<'_>) -> Result<[Array; 3], ComputeError> {
    let one = |v: crate::convert::quantize::BiasVector<'_>| -> Result<Array, ComputeError> {
        Ok(Array::from_slice(&v.to_f32(), &[v.len])?)
    };
    Ok([one(b.gate)?, one(b.up)?, one(b.down)?])
}

impl<'c> ExpertStore for StreamedExperts<'c> {
    fn route(
        &mut self,
        layer: usize,
        _indices: &Array,
    ) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        // Everything goes through `mix`; there are no pools to hand out.
        Err(ComputeError::NoExperts { layer })
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
    ) -> Result<Option<Array>, ComputeError> {
        let shape = x.shape();
        let h = *shape.last().unwrap_or(&0);
        let xf = x.astype(Dtype::F32)?.reshape(&[-1, h as i32])?;
        mlx::eval(&[&xf, &routing.indices, &routing.scores])?;
        let ids = routing.indices.to_vec::<u32>()?;
        let scores = routing.scores.to_vec_f32()?;
        let k = routing.indices.dim(-1).unwrap_or(1).max(1);
        let n = self.ck.config.num_experts;
        let mut rows: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n];
        for (i, (&e, &s)) in ids.iter().zip(&scores).enumerate() {
            let slot = rows
                .get_mut(e as usize)
                .ok_or_else(|| ComputeError::BadPlacement {
                    expert: e as usize,
                    what: format!("layer {layer}, which has {n} experts"),
                })?;
            slot.0.push((i / k) as u32);
            slot.1.push(s);
        }
        let tokens = ids.len() / k;
        let mut out = vec![0f32; tokens * h];
        // Source bytes read for this layer. They are released after each expert and all again
        // at the end: the kernel maps a fault's neighbouring pages too ("fault-around"), so
        // reading one tensor maps part of the tensors beside it back in.
        let mut read: Vec<&'c [u8]> = Vec::new();
        let ck = self.ck;
        let release = |read: &[&[u8]]| read.iter().for_each(|b| ck.release(b));
        for (e, (at, weights)) in rows.iter().enumerate() {
            if at.is_empty() {
                continue;
            }
            let p = self.ck.expert(layer, e).map_err(load_err)?;
            let start = read.len();
            let gate = Self::f32_matrix(p.gate, &mut read)?;
            let up = Self::f32_matrix(p.up, &mut read)?;
            let down = Self::f32_matrix(p.down, &mut read)?;
            release(&read[start..]);
            let xe = xf.take(&Array::from_slice(at, &[at.len()])?, 0)?;
            let t = [1, 0];
            let bias = p.bias.as_ref().map(f32_biases).transpose()?;
            let lin = |x: &Array, w: &Array, b: Option<&Array>| -> Result<Array, ComputeError> {
                let y = x.matmul(&w.transpose(&t)?)?;
                Ok(match b {
                    Some(b) => y.add(b)?,
                    None => y,
                })
            };
            let b = |i: usize| bias.as_ref().map(|b| &b[i]);
            // down(act(gate(x), up(x))), scaled by each entry's routing weight
            let y = lin(
                &self
                    .act
                    .apply(&lin(&xe, &gate, b(0))?, &lin(&xe, &up, b(1))?)?,
                &down,
                b(2),
            )?
            .mul(&Array::from_slice(weights, &[weights.len(), 1])?)?;
            let y = y.to_vec_f32()?;
            for (&row, part) in at.iter().zip(y.chunks_exact(h)) {
                let acc = &mut out[row as usize * h..][..h];
                for (a, b) in acc.iter_mut().zip(part) {
                    *a += b;
                }
            }
        }
        release(&read);
        let mut back: Vec<usize> = shape.clone();
        if let Some(last) = back.last_mut() {
            *last = h;
        }
        Ok(Some(Array::from_slice(&out, &back)?))
    }
}
