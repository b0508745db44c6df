//! Neighborhood attention (NATTEN semantics) over 1, 2 or 3 spatial axes.
//!
//! Inputs are heads-last, as NATTEN lays them out: Q, K `[B, X, H, D]`, `[B, X, Y, H, D]` or
//! `[B, X, Y, Z, H, D]`, V the same with `Dv`; O is `[B, X, (Y, (Z,)) Hq, Dv]` and LSE
//! `[B, X, (Y, (Z,)) Hq]` (f32, natural log). GQA/MQA as in flash attention.
//!
//! # Which keys a query sees
//!
//! The mask is a product over axes: query `x` sees key `y` iff it does on every axis. On one
//! axis of length `n` with `kernel_size k`, `dilation d`, `stride s` and `causal c`:
//!
//! 1. **Dilation** splits the axis into `d` interleaved groups (`x % d`); a query only sees keys
//!    of its own group, and the window below lives in group coordinates `x / d`, on a group of
//!    length `n_g = ceil((n - g) / d)`.
//! 2. **Stride** makes queries share windows: the `s` queries `s*t .. s*t + s` of a stride group
//!    all use the window of one *leader*: `s*t + s/2` (non-causal) or `s*t + s - 1` (causal),
//!    clamped to `n_g - 1`.
//! 3. **Non-causal**: the window is `k` keys with `k/2` on the left and `k/2` (odd `k`) or
//!    `k/2 - 1` (even `k`) on the right of the leader, *shifted* to stay inside the axis, so every
//!    query sees exactly `k` keys. **Causal**: the `k` keys ending at the leader (fewer near the
//!    start), and never a key after the query itself.
//!
//! ```text
//!  n = 9, k = 3:          key  0 1 2 3 4 5 6 7 8
//!  query 0 (left border)       # # # . . . . . .   shifted right: still 3 keys
//!  query 4                     . . . # # # . . .
//!  query 8 (right border)      . . . . . . # # #   shifted left
//!  causal, query 4             . . # # # . . . .   the 3 keys ending at the query
//!  dilation 2, query 4         . . # . # . # . .   group of even positions: 0 2 4 6 8
//!  stride 3, queries 3 4 5     . . . # # # . . .   all use the window of leader 4
//! ```
//!
//! `k * d <= n` on every axis and `1 <= s <= k`. NATTEN itself requires `k >= 2`; `k = 1` is
//! accepted here (each query sees its leader only).

mod extra;
pub mod plan;
pub mod reference;
pub mod shader;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::softmax::call::{encode_with, Call};
use crate::softmax::{AttentionOutput, FlashOptions, StrategyChoice};
use crate::tensor::{DType, Tensor};
pub use plan::NeighborhoodPlan;

/// One spatial axis, checked: the definition above, with the axis length. Made by
/// [`NaAxis::new`] or [`NeighborhoodOptions::axes`], which refuse what the window maths cannot
/// take (its fields are private, so an axis is always valid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NaAxis {
    n: usize,
    kernel: usize,
    dilation: usize,
    stride: usize,
    causal: bool,
}

impl NaAxis {
    /// An axis of length `n` (>= 1) with kernel size `kernel` (>= 1), `dilation` (>= 1,
    /// `kernel * dilation <= n`) and `stride` (1..=kernel), causal or not.
    pub fn new(
        n: usize,
        kernel: usize,
        dilation: usize,
        stride: usize,
        causal: bool,
    ) -> Result<Self> {
        let err = |what: &str, expected: String, got: String| {
            Err(AttnError::invalid(what, expected, got))
        };
        if n == 0 {
            return err("size", ">= 1".into(), n.to_string());
        }
        if kernel == 0 {
            return err("kernel_size", ">= 1".into(), kernel.to_string());
        }
        if dilation == 0 {
            return err("dilation", ">= 1".into(), dilation.to_string());
        }
        if stride == 0 || stride > kernel {
            return err(
                "stride",
                format!("1..={kernel} (at most the kernel size)"),
                stride.to_string(),
            );
        }
        if kernel.saturating_mul(dilation) > n {
            return err(
                "kernel_size * dilation",
                format!("<= the axis size {n}"),
                format!(
                    "{kernel} * {dilation} = {}",
                    kernel.saturating_mul(dilation)
                ),
            );
        }
        Ok(NaAxis {
            n,
            kernel,
            dilation,
            stride,
            causal,
        })
    }

    /// The axis length.
    pub fn n(&self) -> usize {
        self.n
    }
    /// The kernel (window) size.
    pub fn kernel(&self) -> usize {
        self.kernel
    }
    /// The dilation.
    pub fn dilation(&self) -> usize {
        self.dilation
    }
    /// The stride.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Whether the axis is causal.
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// An axis that does nothing (length 1): pads 1D and 2D problems to three axes.
    pub const UNIT: NaAxis = NaAxis {
        n: 1,
        kernel: 1,
        dilation: 1,
        stride: 1,
        causal: false,
    };

    /// Length of dilation group `g`.
    pub fn group_len(&self, g: usize) -> usize {
        (self.n - g).div_ceil(self.dilation)
    }

    /// Keys `[start, end)` of the query at `x`, in its dilation group's coordinates (key `y` is
    /// seen iff `y % d == x % d` and `start <= y / d < end`).
    pub fn window(&self, x: usize) -> (usize, usize) {
        let (d, k, s) = (self.dilation, self.kernel, self.stride);
        let n = self.group_len(x % d);
        let xi = x / d;
        let (left, right) = (k / 2, k / 2 + k % 2 - 1);
        if self.causal {
            let leader = ((xi / s) * s + s - 1).min(n - 1);
            (leader.saturating_sub(left + right), (xi + 1).min(n))
        } else {
            let leader = ((xi / s) * s + s / 2).min(n - 1);
            let start = if leader + right >= n {
                n - k
            } else {
                leader.saturating_sub(left)
            };
            (start, start + k)
        }
    }

    /// Whether the query at `x` sees the key at `y` on this axis.
    pub fn sees(&self, x: usize, y: usize) -> bool {
        let d = self.dilation;
        let (start, end) = self.window(x);
        x % d == y % d && (start..end).contains(&(y / d))
    }

    /// Visible (query, key) pairs on this axis: the product over axes counts a problem's pairs.
    pub fn pairs(&self) -> u64 {
        (0..self.n)
            .map(|x| {
                let (s, e) = self.window(x);
                (e - s) as u64
            })
            .sum()
    }
}

/// Options of [`neighborhood_attention`]. Per-axis lists have one entry per spatial axis; an
/// empty `dilation`, `stride` or `causal` means 1, 1, false on every axis.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct NeighborhoodOptions {
    pub kernel_size: Vec<usize>,
    pub dilation: Vec<usize>,
    pub stride: Vec<usize>,
    /// Causal per axis (NATTEN's `is_causal`): a query sees only keys at or before it there.
    pub causal: Vec<bool>,
    /// Softmax scale; `None` is `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Also return the log-sum-exp `[B, X, (Y, (Z,)) Hq]`.
    pub return_lse: bool,
    pub strategy: StrategyChoice,
    /// NATTEN's `additional_keys`: `[B, S_add, Hkv, D]` tokens every query attends to besides
    /// its neighborhood, never masked (causal axes included), merged through the LSE.
    pub additional_keys: Option<Tensor>,
    /// NATTEN's `additional_values`: `[B, S_add, Hkv, Dv]`, with `additional_keys`.
    pub additional_values: Option<Tensor>,
}

crate::setters!(NeighborhoodOptions {
    kernel_size: Vec<usize>,
    dilation: Vec<usize>,
    stride: Vec<usize>,
    causal: Vec<bool>,
    scale: Option<f32>,
    return_lse: bool,
    strategy: StrategyChoice,
    additional_keys: Option<Tensor>,
    additional_values: Option<Tensor>,
});

impl NeighborhoodOptions {
    /// Kernel sizes, one per spatial axis; dilation 1, stride 1, not causal.
    pub fn new(kernel_size: &[usize]) -> Self {
        NeighborhoodOptions {
            kernel_size: kernel_size.to_vec(),
            ..Default::default()
        }
    }

    /// Checks the options against the spatial shape and returns the axes.
    pub fn axes(&self, spatial: &[usize]) -> Result<Vec<NaAxis>> {
        let rank = spatial.len();
        if !(1..=3).contains(&rank) {
            return Err(AttnError::invalid(
                "neighborhood axes",
                "1, 2 or 3 spatial axes",
                rank,
            ));
        }
        let per_axis = |v: &[usize], what: &str, default: usize| -> Result<Vec<usize>> {
            match v.len() {
                0 => Ok(vec![default; rank]),
                l if l == rank => Ok(v.to_vec()),
                l => Err(AttnError::invalid(
                    what,
                    format!("{rank} values (one per spatial axis of {spatial:?})"),
                    format!("{l} values {v:?}"),
                )),
            }
        };
        if self.kernel_size.len() != rank {
            return Err(AttnError::invalid(
                "kernel_size",
                format!("{rank} values (one per spatial axis of {spatial:?})"),
                format!("{:?}", self.kernel_size),
            ));
        }
        let dil = per_axis(&self.dilation, "dilation", 1)?;
        let stride = per_axis(&self.stride, "stride", 1)?;
        let causal = match self.causal.len() {
            0 => vec![false; rank],
            l if l == rank => self.causal.clone(),
            l => {
                return Err(AttnError::invalid(
                    "causal",
                    format!("{rank} values (one per spatial axis)"),
                    format!("{l} values"),
                ))
            }
        };
        (0..rank)
            .map(|a| {
                let (n, k, d, s) = (spatial[a], self.kernel_size[a], dil[a], stride[a]);
                NaAxis::new(n, k, d, s, causal[a]).map_err(|e| match e {
                    AttnError::Invalid {
                        what,
                        expected,
                        actual,
                    } => AttnError::Invalid {
                        what: format!("{what} on axis {a}"),
                        expected,
                        actual,
                    },
                    e => e,
                })
            })
            .collect()
    }
}

/// A neighborhood problem as the flash kernel sees it: three axes (unit axes pad 1D and 2D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NaSpec {
    axes: [NaAxis; 3],
}

impl NaSpec {
    /// One, two or three axes (leading unit axes pad the rest); more or none is a typed error.
    pub fn new(axes: &[NaAxis]) -> Result<Self> {
        if !(1..=3).contains(&axes.len()) {
            return Err(AttnError::invalid(
                "neighborhood axes",
                "1, 2 or 3 spatial axes",
                axes.len(),
            ));
        }
        let mut all = [NaAxis::UNIT; 3];
        all[3 - axes.len()..].copy_from_slice(axes);
        let tokens = all.iter().try_fold(1usize, |t, a| t.checked_mul(a.n));
        if tokens.is_none_or(|t| t > u32::MAX as usize) {
            return Err(AttnError::Limit {
                what: "neighborhood tokens (the product of the axis sizes)".into(),
                needed: all
                    .iter()
                    .map(|a| a.n as u64)
                    .fold(1u64, u64::saturating_mul),
                limit: u32::MAX as u64,
            });
        }
        Ok(NaSpec { axes: all })
    }

    /// The three axes (leading unit axes pad 1D and 2D problems).
    pub fn axes(&self) -> &[NaAxis; 3] {
        &self.axes
    }

    /// Whether query token `i` sees key token `j` (row-major flattened spatial indices).
    pub fn sees(&self, i: usize, j: usize) -> bool {
        let [a0, a1, a2] = &self.axes;
        let split = |t: usize| (t / (a1.n * a2.n), (t / a2.n) % a1.n, t % a2.n);
        let (x0, x1, x2) = split(i);
        let (y0, y1, y2) = split(j);
        a0.sees(x0, y0) && a1.sees(x1, y1) && a2.sees(x2, y2)
    }

    /// Tokens: the product of the axis lengths.
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.n).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Visible (query, key) pairs per batch and head.
    pub fn pairs(&self) -> u64 {
        self.axes.iter().map(NaAxis::pairs).product()
    }
}

/// Reads `[B, *spatial, H, D]` into (spatial shape, flattened `[B, L, H, D]` view).
fn flatten(t: &Tensor, what: &str) -> Result<(Vec<usize>, Tensor)> {
    let sh = t.shape();
    let st = t.strides();
    if !(4..=6).contains(&sh.len()) {
        return Err(AttnError::shape(
            what,
            "rank 4, 5 or 6: [B, X, (Y, (Z,)) H, D]",
            sh,
        ));
    }
    let r = sh.len();
    let spatial = sh[1..r - 2].to_vec();
    for a in 1..r - 3 {
        if st[a] != st[a + 1] * sh[a + 1] {
            return Err(AttnError::invalid(
                format!("{what} strides"),
                "spatial axes contiguous with each other (stride[a] = stride[a+1] * size[a+1])",
                format!("shape {sh:?} strides {st:?}"),
            ));
        }
    }
    let l = spatial.iter().product();
    let flat = t.with_layout(
        vec![sh[0], l, sh[r - 2], sh[r - 1]],
        vec![st[0], st[r - 3], st[r - 2], 1],
        t.offset(),
    )?;
    Ok((spatial, flat))
}

struct Flat {
    spec: NaSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spatial: Vec<usize>,
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, opts: &NeighborhoodOptions) -> Result<Flat> {
    let (spatial, qf) = flatten(q, "q")?;
    let (sk, kf) = flatten(k, "k")?;
    let (sv, vf) = flatten(v, "v")?;
    if sk != spatial || sv != spatial {
        return Err(AttnError::shape(
            "k/v",
            format!("spatial shape {spatial:?} (that of q)"),
            (sk, sv),
        ));
    }
    let axes = opts.axes(&spatial)?;
    Ok(Flat {
        spec: NaSpec::new(&axes)?,
        q: qf,
        k: kf,
        v: vf,
        spatial,
    })
}

fn flash_opts(opts: &NeighborhoodOptions) -> FlashOptions {
    FlashOptions {
        scale: opts.scale,
        strategy: opts.strategy,
        ..Default::default()
    }
}

/// Output tensors in the heads-last layout, and their flattened views.
fn outputs_like(
    ctx: &GpuContext,
    f: &Flat,
    dtype: DType,
    lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let [b, _, hq, _] = <[usize; 4]>::try_from(f.q.shape()).map_err(|_| {
        AttnError::shape("q", "a flattened [B, L, H, D] view", f.q.shape().to_vec())
    })?;
    let dv = f.v.shape()[3];
    let mut oshape = vec![b];
    oshape.extend(&f.spatial);
    oshape.extend([hq, dv]);
    let out = Tensor::filled(ctx, &oshape, dtype, 0.0)?;
    let lse = if lse {
        oshape.pop();
        Some(Tensor::filled(ctx, &oshape, DType::F32, 0.0)?)
    } else {
        None
    };
    Ok((out, lse))
}

/// Flattens an LSE `[B, *spatial, H]` tensor to `[B, L, H]`.
fn flatten_lse(t: &Tensor, spatial: &[usize]) -> Result<Tensor> {
    let sh = t.shape();
    let n = sh.len();
    if n != spatial.len() + 2 || sh[1..n - 1] != *spatial {
        return Err(AttnError::shape(
            "lse",
            format!("[B, {spatial:?}, Hq] f32"),
            sh,
        ));
    }
    let l = spatial.iter().product();
    if !t.is_contiguous() {
        return Err(AttnError::invalid(
            "lse",
            "a contiguous tensor",
            format!("strides {:?}", t.strides()),
        ));
    }
    t.with_layout(
        vec![sh[0], l, sh[n - 1]],
        vec![l * sh[n - 1], sh[n - 1], 1],
        0,
    )
}

/// Records neighborhood attention into `encoder`; `out` is `[B, *spatial, Hq, Dv]` and `lse`
/// `[B, *spatial, Hq]` f32. See the module docs for the semantics.
#[allow(clippy::too_many_arguments)]
pub fn encode_neighborhood_attention(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &NeighborhoodOptions,
    timestamps: Option<(&wgpu::QuerySet, u32)>,
) -> Result<NeighborhoodPlan> {
    let f = check(q, k, v, opts)?;
    let (_, of) = flatten(out, "out")?;
    let lf = lse.map(|l| flatten_lse(l, &f.spatial)).transpose()?;
    if let Some((xk, xv)) = extra::check(&f, opts)? {
        let x = (&xk, &xv);
        return extra::encode(ctx, encoder, &f, x, &of, lf.as_ref(), opts, timestamps);
    }
    let fo = flash_opts(opts);
    let call = Call {
        q: &f.q,
        k: &f.k,
        v: &f.v,
        out: &of,
        lse: lf.as_ref(),
        opts: &fo,
    };
    encode_with(ctx, encoder, &call, &plan::NaLayout(&f.spec), timestamps)
}

/// Runs neighborhood attention into caller-provided outputs and submits the work.
pub fn neighborhood_attention_into(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    opts: &NeighborhoodOptions,
) -> Result<NeighborhoodPlan> {
    ctx.submit(|enc| encode_neighborhood_attention(ctx, enc, q, k, v, out, lse, opts, None))
}

/// Neighborhood attention: returns O `[B, *spatial, Hq, Dv]` and, with `opts.return_lse`, LSE
/// `[B, *spatial, Hq]`.
pub fn neighborhood_attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &NeighborhoodOptions,
) -> Result<AttentionOutput> {
    let f = check(q, k, v, opts)?;
    let (out, lse) = outputs_like(ctx, &f, q.dtype(), opts.return_lse)?;
    neighborhood_attention_into(ctx, q, k, v, &out, lse.as_ref(), opts)?;
    Ok(AttentionOutput { out, lse })
}

#[cfg(test)]
mod tests;
