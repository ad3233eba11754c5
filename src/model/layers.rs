//! The dense building blocks: linear layers (quantized or plain), embeddings, RMSNorm and the
//! SwiGLU MLP, as mlx.nn and mlx-lm compute them.
//!
//! In: tensors from [`Weights`] with their expected logical shapes. Out: layers whose `forward`
//! builds lazy MLX graphs. Invariant: shapes are checked at load time, so a mismatched checkpoint
//! fails with the tensor's name instead of deep inside a forward pass.

use super::weights::Weights;
use super::ComputeError;
use crate::arch::Situ;
use crate::mlx::{self, fast, Array, Dtype, QuantizedMatrix};

type Result<T> = std::result::Result<T, ComputeError>;

/// A weight matrix `[out, in]`, plain or MLX affine-quantized.
#[derive(Debug, Clone)]
pub enum Matrix {
    Plain(Array),
    Quantized(QuantizedMatrix),
}

pub(super) fn require(w: &dyn Weights, name: &str) -> Result<Array> {
    w.get(name).ok_or_else(|| ComputeError::MissingTensor {
        name: name.to_string(),
    })
}

pub(super) fn check_shape(name: &str, a: &Array, expected: &[usize]) -> Result<()> {
    let found = a.shape();
    if found != expected {
        return Err(ComputeError::BadShape {
            name: name.to_string(),
            found,
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Shapes of a quantized `[.., out, in]` stack: codes `[.., out, in*bits/32]`, scales and biases
/// `[.., out, in/group]`.
pub(super) fn check_quantized(
    module: &str,
    m: &QuantizedMatrix,
    lead: &[usize],
    out_dim: usize,
    in_dim: usize,
) -> Result<()> {
    let (group_size, bits) = (m.group_size, m.bits);
    let bad = || ComputeError::BadQuantization {
        module: module.to_string(),
        group_size,
        bits,
        in_dim,
    };
    let (g, b) = (
        usize::try_from(group_size).map_err(|_| bad())?,
        usize::try_from(bits).map_err(|_| bad())?,
    );
    if g == 0 || b == 0 || in_dim % g != 0 || (in_dim * b) % 32 != 0 {
        return Err(bad());
    }
    let with = |last: usize| [lead, &[out_dim, last]].concat();
    check_shape(
        &format!("{module}.weight"),
        &m.weight,
        &with(in_dim * b / 32),
    )?;
    check_shape(&format!("{module}.scales"), &m.scales, &with(in_dim / g))?;
    if let Some(biases) = &m.biases {
        check_shape(&format!("{module}.biases"), biases, &with(in_dim / g))?;
    }
    if m.weight.dtype() != Dtype::U32 {
        return Err(ComputeError::BadDtype {
            name: format!("{module}.weight"),
            found: m.weight.dtype(),
            expected: Dtype::U32,
        });
    }
    Ok(())
}

/// `<module>.weight` (+ `.scales`/`.biases` when quantized) with logical shape `lead + [out, in]`.
pub(super) fn load_matrix(
    w: &dyn Weights,
    module: &str,
    lead: &[usize],
    out_dim: usize,
    in_dim: usize,
) -> Result<Matrix> {
    let weight = require(w, &format!("{module}.weight"))?;
    let Some(scales) = w.get(&format!("{module}.scales")) else {
        check_shape(
            &format!("{module}.weight"),
            &weight,
            &[lead, &[out_dim, in_dim]].concat(),
        )?;
        return Ok(Matrix::Plain(weight));
    };
    let q = w
        .quantization(module)
        .ok_or_else(|| ComputeError::MissingQuantization {
            module: module.to_string(),
        })?;
    let m = QuantizedMatrix {
        weight,
        scales,
        biases: w.get(&format!("{module}.biases")),
        group_size: q.group_size,
        bits: q.bits,
        mode: q.mode,
    };
    check_quantized(module, &m, lead, out_dim, in_dim)?;
    Ok(Matrix::Quantized(m))
}

/// `y = x W^T (+ b)`: mlx.nn.QuantizedLinear or mlx.nn.Linear.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array>,
}

impl Linear {
    /// Loads `<module>` mapping `in_dim` to `out_dim` features; a `<module>.bias` is used when
    /// present (which modules carry one is the checkpoint's business, e.g. Qwen2-MoE's q/k/v).
    pub fn load(w: &dyn Weights, module: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        let weight = load_matrix(w, module, &[], out_dim, in_dim)?;
        let bias_name = format!("{module}.bias");
        let bias = w.get(&bias_name);
        if let Some(b) = &bias {
            check_shape(&bias_name, b, &[out_dim])?;
        }
        Ok(Linear { weight, bias })
    }

    /// The same layer with its outputs reordered: output `i` is this layer's output `rows[i]`
    /// (rows of the weight, its scales and biases, and the bias, taken and evaluated once). Each
    /// output is computed from its own row alone, so the values do not change.
    pub fn permute_rows(&self, rows: &[u32]) -> Result<Linear> {
        let idx = Array::from_slice(rows, &[rows.len()])?;
        let take = |a: &Array| -> Result<Array> { Ok(a.take(&idx, 0)?) };
        let weight = match &self.weight {
            Matrix::Plain(w) => Matrix::Plain(take(w)?),
            Matrix::Quantized(q) => Matrix::Quantized(QuantizedMatrix {
                weight: take(&q.weight)?,
                scales: take(&q.scales)?,
                biases: q.biases.as_ref().map(take).transpose()?,
                ..q.clone()
            }),
        };
        let bias = self.bias.as_ref().map(take).transpose()?;
        let mut made: Vec<&Array> = match &weight {
            Matrix::Plain(w) => vec![w],
            Matrix::Quantized(q) => [Some(&q.weight), Some(&q.scales), q.biases.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
        };
        made.extend(bias.as_ref());
        mlx::eval(&made)?;
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match (&self.weight, &self.bias) {
            // mlx/nn/layers/quantized.py QuantizedLinear.__call__: quantized_matmul, then + bias.
            (Matrix::Quantized(q), bias) => {
                let y = mlx::quantized_matmul(x, q, true)?;
                match bias {
                    Some(b) => y.add(b)?,
                    None => y,
                }
            }
            // mlx/nn/layers/linear.py Linear.__call__: addmm(bias, x, W.T) or x @ W.T.
            (Matrix::Plain(wt), Some(b)) => b.addmm(x, &wt.transpose(&[1, 0])?)?,
            (Matrix::Plain(wt), None) => x.matmul(&wt.transpose(&[1, 0])?)?,
        })
    }
}

/// Token embeddings `[vocab, hidden]` (mlx.nn.Embedding / QuantizedEmbedding).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub table: Matrix,
}

impl Embedding {
    pub fn load(w: &dyn Weights, module: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding {
            table: load_matrix(w, module, &[], vocab, hidden)?,
        })
    }

    /// Rows for `ids` (any shape) -> `ids.shape + [hidden]`.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        Ok(match &self.table {
            Matrix::Plain(t) => t.take(ids, 0)?,
            // QuantizedEmbedding.__call__: dequantize(weight[x], scales[x], biases[x]).
            Matrix::Quantized(q) => {
                let rows = QuantizedMatrix {
                    weight: q.weight.take(ids, 0)?,
                    scales: q.scales.take(ids, 0)?,
                    biases: q.biases.as_ref().map(|b| b.take(ids, 0)).transpose()?,
                    group_size: q.group_size,
                    bits: q.bits,
                    mode: q.mode,
                };
                mlx::dequantize(&rows)?
            }
        })
    }

    /// Tied output head: `x @ table^T` (QuantizedEmbedding.as_linear / Embedding.as_linear).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Ok(match &self.table {
            Matrix::Plain(t) => x.matmul(&t.transpose(&[1, 0])?)?,
            Matrix::Quantized(q) => mlx::quantized_matmul(x, q, true)?,
        })
    }
}

/// `mx.fast.rms_norm(x, weight, eps)` over the last axis.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(w: &dyn Weights, module: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let name = format!("{module}.weight");
        let weight = require(w, &name)?;
        check_shape(&name, &weight, &[dim])?;
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Whether hot elementwise chains (the router's steps, the experts' activations) run through
/// [`mlx::compiled`], which fuses each chain into one kernel: where kernel launches cost (a
/// GPU) unless `FLASHPACK_COMPILE=0`, and anywhere with `FLASHPACK_COMPILE=1`. mlx-lm compiles
/// the same functions (`group_expert_select`, `swiglu`, gpt-oss's `swiglu`). Decided once per
/// process.
pub(super) fn compiling() -> bool {
    static COMPILE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COMPILE.get_or_init(|| match std::env::var("FLASHPACK_COMPILE").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => mlx::default_device_is_gpu(),
    })
}

/// `f(a, b)` of two arrays to one: through [`fused`] when [`compiling`], else op by op.
pub(super) fn elementwise2(
    id: &'static mlx::CompileId,
    constants: &[u64],
    a: &Array,
    b: &Array,
    f: &dyn Fn(&Array, &Array) -> std::result::Result<Array, mlx::Error>,
) -> Result<Array> {
    if compiling() {
        fused(id, constants, a, b, f)
    } else {
        Ok(f(a, b)?)
    }
}

/// `f(a, b)` through [`mlx::compiled`] under `id`: traced once per shapes, types and
/// `constants` (everything else that shapes `f`'s graph), then replayed as fused kernels.
pub(super) fn fused(
    id: &'static mlx::CompileId,
    constants: &[u64],
    a: &Array,
    b: &Array,
    f: &dyn Fn(&Array, &Array) -> std::result::Result<Array, mlx::Error>,
) -> Result<Array> {
    let traced = |xs: &[Array]| -> std::result::Result<Vec<Array>, mlx::Error> {
        Ok(vec![f(&xs[0], &xs[1])?])
    };
    mlx::compiled(id, constants, &[a, b], 1, &traced)?
        .into_iter()
        .next()
        .ok_or_else(|| ComputeError::Unsupported {
            what: "a compiled activation returned no array".into(),
        })
}

/// `silu(gate) * x`, as mlx-lm's `swiglu(gate, x)` (models/activations.py) spells it, with
/// mlx.nn.silu being `x * sigmoid(x)`; one fused kernel where [`compiling`], as mlx-lm's
/// `@mx.compile`d `swiglu`.
pub fn swiglu(gate: &Array, x: &Array) -> Result<Array> {
    elementwise2(&SWIGLU, &[], gate, x, &swiglu_ops)
}

/// [`swiglu`]'s compile id.
pub(super) static SWIGLU: mlx::CompileId = mlx::CompileId::new();

/// [`swiglu`] op by op.
pub(super) fn swiglu_ops(gate: &Array, x: &Array) -> std::result::Result<Array, mlx::Error> {
    gate.silu()?.mul(x)
}

/// `gelu_approx(gate) * x` (mlx-lm gemma4_text.py's `geglu`), with mlx.nn.gelu_approx spelt
/// out: `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`, each Python float a
/// scalar of the input's type; one fused kernel where [`compiling`], as both are
/// `@mx.compile`d.
pub fn geglu(gate: &Array, x: &Array) -> Result<Array> {
    elementwise2(&GEGLU, &[], gate, x, &geglu_ops)
}

/// [`geglu`]'s compile id.
pub(super) static GEGLU: mlx::CompileId = mlx::CompileId::new();

/// [`geglu`] op by op.
pub(super) fn geglu_ops(gate: &Array, x: &Array) -> std::result::Result<Array, mlx::Error> {
    let s = |v: f64| Array::scalar(v, gate.dtype());
    let inner = gate.add(&s(0.044715)?.mul(&gate.power(&s(3.0)?)?)?)?;
    let t = s((2.0 / std::f64::consts::PI).sqrt())?
        .mul(&inner)?
        .tanh()?;
    let gelu = s(0.5)?.mul(gate)?.mul(&s(1.0)?.add(&t)?)?;
    gelu.mul(x)
}

/// Kimi-K3's SiTU (mlx-lm kimi_k3.py `_situ(x, gate, beta, linear_beta)`, `@mx.compile`d
/// shapeless) of the up projection `up` and the gate `gate`: in f32,
/// `beta * tanh(gate / beta) * sigmoid(gate)` times `up` (or, with `linear_beta`,
/// `linear_beta * tanh(up / linear_beta)`), cast back to `up`'s type; each Python float a
/// scalar of f32. One fused kernel where [`compiling`].
pub fn situ(gate: &Array, up: &Array, s: Situ) -> Result<Array> {
    situ_as(gate, up, s, compiling())
}

/// [`situ`], fused through one compiled function (`fuse`) or op by op.
pub(super) fn situ_as(gate: &Array, up: &Array, s: Situ, fuse: bool) -> Result<Array> {
    if !fuse {
        return Ok(situ_ops(gate, up, s)?);
    }
    // Traced once per beta and linear beta (constants of mlx-lm's compiled function).
    static SITU: mlx::CompileId = mlx::CompileId::new();
    let constants = [
        s.beta.to_bits(),
        s.linear_beta.map_or(0, |b| b.to_bits()),
        s.linear_beta.is_some() as u64,
    ];
    fused(&SITU, &constants, gate, up, &|g, u| situ_ops(g, u, s))
}

/// [`situ`] op by op.
pub(super) fn situ_ops(
    gate: &Array,
    up: &Array,
    s: Situ,
) -> std::result::Result<Array, mlx::Error> {
    let dtype = up.dtype();
    let f = |v: f64| Array::scalar(v, Dtype::F32);
    // gate = gate.astype(mx.float32); x = x.astype(mx.float32)
    let g = gate.astype(Dtype::F32)?;
    let mut x = up.astype(Dtype::F32)?;
    // a = beta * mx.tanh(gate / beta) * mx.sigmoid(gate)
    let beta = f(s.beta)?;
    let a = beta.mul(&g.div(&beta)?.tanh()?)?.mul(&g.sigmoid()?)?;
    if let Some(lb) = s.linear_beta {
        // x = linear_beta * mx.tanh(x / linear_beta)
        let lb = f(lb)?;
        x = lb.mul(&x.div(&lb)?.tanh()?)?;
    }
    // return (a * x).astype(dtype)
    a.mul(&x)?.astype(dtype)
}

/// How a gated MLP combines its gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GateAct {
    /// `silu(gate) * up`.
    #[default]
    Swiglu,
    /// `gelu_approx(gate) * up` (Gemma 4).
    Geglu,
    /// Kimi-K3's [`situ`].
    Situ(Situ),
}

/// A dense gated MLP: `down(swiglu(gate(x), up(x)))` (the `MLP` class of mlx-lm's
/// qwen3_moe.py / qwen2_moe.py; also Qwen2-MoE's shared expert), or with GeGLU (Gemma 4).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: GateAct,
}

impl Mlp {
    pub fn load(w: &dyn Weights, module: &str, hidden: usize, width: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate: Linear::load(w, &format!("{module}.gate_proj"), width, hidden)?,
            up: Linear::load(w, &format!("{module}.up_proj"), width, hidden)?,
            down: Linear::load(w, &format!("{module}.down_proj"), hidden, width)?,
            act: GateAct::Swiglu,
        })
    }

    /// The same MLP with activation `act`.
    pub fn with_act(self, act: GateAct) -> Mlp {
        Mlp { act, ..self }
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        // return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        // (gemma4_text.py: self.down_proj(geglu(self.gate_proj(x), self.up_proj(x))))
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        // (kimi_k3.py: self.down_proj(_situ(self.up_proj(x), self.gate_proj(x), ...)))
        let h = match self.act {
            GateAct::Swiglu => swiglu(&g, &u)?,
            GateAct::Geglu => geglu(&g, &u)?,
            GateAct::Situ(s) => situ(&g, &u, s)?,
        };
        self.down.forward(&h)
    }
}
