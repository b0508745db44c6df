//! The backward kernels of dense attention (FlashAttention-2's backward, three passes and
//! dBias's):
//!
//! - `Stats`: one invocation per query row writes `(LSE, Delta = dO . O)` of the row.
//! - `DkDv`: a workgroup owns 64 keys of one KV head; invocation `lid` owns key `j` with its K
//!   and V rows and its dK, dV accumulators in registers. It walks the query rows that can see
//!   the workgroup's keys, in tiles of `TQ` rows of Q and dO through workgroup memory, for every
//!   query head of the KV head's group (GQA: the group's heads add into one dK, dV, in order), and
//!   recomputes `P = exp(s - LSE)` from the forward's LSE: nothing of size L x L is stored.
//! - `Dq`: a workgroup owns 64 query rows of one head; invocation `lid` owns row `i`, walks the
//!   visible keys in tiles of `TK` rows of K and V and accumulates dQ.
//! - `DBias` (with a bias whose gradient is asked for): the `Dq` walk, one invocation per row
//!   of dBias, summing dS over the batches and heads the bias broadcasts over.
//!
//! Each gradient element is written by exactly one invocation, summing in a fixed order: the
//! results are the same bit for bit from run to run (no atomics). Scores and sums are f32 for
//! f16 storage too.

use crate::dtype::DType;
use crate::pipeline::{BindingDecl, Kernel, UniformLayout};

/// Invocations per workgroup (keys of `DkDv`, query rows of `Dq` and `Stats`).
pub const WG: u32 = 64;
/// Workgroup memory a tile may take (the WebGPU default limit).
pub const TILE_BYTES: u32 = 16384;
/// The largest D and Dv the backward kernels are built for.
pub const MAX_DIM: u32 = 256;
/// Head-dim capacities (multiples of 4; D and Dv each pick the smallest that holds them).
pub const DIM_BUCKETS: [u32; 7] = [16, 32, 48, 64, 96, 128, 256];

/// Which pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Stats,
    DkDv,
    Dq,
    /// dBias `[bb, bh, Lq, Lk]`: one invocation per row of it, summing dS over the batches and
    /// heads the bias broadcasts over, in order (with a bias only).
    DBias,
}

/// One backward specialization; every size and option else is a uniform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardKey {
    pub pass: Pass,
    /// Of q, k, v, O, dO and the gradients.
    pub dtype: DType,
    /// Capacities of D and Dv (one of [`DIM_BUCKETS`] each).
    pub d: u32,
    pub dv: u32,
    /// Whether the kernel reads an additive bias (declared only then: a stage has few storage
    /// buffers).
    pub bias: bool,
}

impl BackwardKey {
    /// Rows of the tile a `DkDv` (query rows, with their LSE and Delta) or `Dq` (keys)
    /// workgroup shares: the largest power of two up to 32 that fits [`TILE_BYTES`].
    pub fn tile_rows(&self) -> u32 {
        let row = (self.d + self.dv) * 4 + if self.pass == Pass::DkDv { 8 } else { 0 };
        let mut t = 32;
        while t > 1 && t * row > TILE_BYTES {
            t /= 2;
        }
        t
    }

    /// Loop iterations of one invocation per tile: its share of the tile's loads, then the
    /// tile's rows.
    pub fn trips_per_tile(&self) -> u64 {
        let t = self.tile_rows();
        ((t * (self.d + self.dv) / 4).div_ceil(WG) + t) as u64
    }
}

/// The uniform block of the backward kernels (`struct Params` in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BackwardParams {
    pub batch: u32,
    pub hq: u32,
    pub hkv: u32,
    pub lq: u32,
    pub lk: u32,
    pub d: u32,
    pub dv: u32,
    pub flags: u32,
    /// offset, batch, sequence and head strides (elements) of each tensor
    pub q: [u32; 4],
    pub k: [u32; 4],
    pub v: [u32; 4],
    pub o: [u32; 4],
    pub dout: [u32; 4],
    pub dq: [u32; 4],
    pub dk: [u32; 4],
    pub dvv: [u32; 4],
    /// offset, batch, head and query strides (0 on a broadcast axis)
    pub bias: [u32; 4],
    /// offset, batch, head and query strides of the forward's LSE
    pub lse: [u32; 4],
    /// dBias: offset, its batches (1 or B), its heads (1 or Hq), 0
    pub dbias: [u32; 4],
    pub scale: f32,
    pub softcap: f32,
    pub win_left: i32,
    pub win_right: i32,
    pub sinks: u32,
    /// Where the ALiBi slopes start in `aux` (after the per-batch lengths).
    pub slopes_at: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

pub(super) const PARAMS: &str = "struct Params {
    batch: u32, hq: u32, hkv: u32, lq: u32,
    lk: u32, d: u32, dv: u32, flags: u32,
    q: vec4<u32>, k: vec4<u32>, v: vec4<u32>, o: vec4<u32>,
    dout: vec4<u32>, dq: vec4<u32>, dk: vec4<u32>, dvv: vec4<u32>,
    bias: vec4<u32>,
    lse: vec4<u32>,
    dbias: vec4<u32>,
    scale: f32, softcap: f32, win_left: i32, win_right: i32,
    sinks: u32, slopes_at: u32, pad0: u32, pad1: u32,
}
";

/// Every backward specialization the host can build.
pub fn all_keys() -> Vec<BackwardKey> {
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for d in DIM_BUCKETS {
            for dv in DIM_BUCKETS {
                keys.push(BackwardKey {
                    pass: Pass::Stats,
                    dtype,
                    d,
                    dv,
                    bias: false,
                });
                keys.push(BackwardKey {
                    pass: Pass::DBias,
                    dtype,
                    d,
                    dv,
                    bias: true,
                });
                for pass in [Pass::DkDv, Pass::Dq] {
                    for bias in [false, true] {
                        keys.push(BackwardKey {
                            pass,
                            dtype,
                            d,
                            dv,
                            bias,
                        });
                    }
                }
            }
        }
    }
    keys
}

/// The bucket that holds `n` values (`None` past [`MAX_DIM`]).
pub fn dim_bucket(n: usize) -> Option<u32> {
    DIM_BUCKETS.into_iter().find(|&b| b as usize >= n)
}

impl Kernel for BackwardKey {
    fn label(&self) -> String {
        let pass = match self.pass {
            Pass::Stats => "stats",
            Pass::DkDv => "dkdv",
            Pass::Dq => "dq",
            Pass::DBias => "dbias",
        };
        let bias = if self.bias { "_bias" } else { "" };
        format!(
            "flash_bwd_{pass}_{}_d{}_dv{}{bias}",
            self.dtype, self.d, self.dv
        )
    }

    fn source(&self) -> String {
        super::generate::generate(self)
    }

    fn bindings(&self) -> Vec<BindingDecl> {
        let e = self.dtype.wgsl();
        let mut b = vec![BindingDecl::uniform("p", "Params")];
        match self.pass {
            Pass::Stats => {
                b.push(BindingDecl::read("o", e, "the forward's O [B, Lq, Hq, Dv]"));
                b.push(BindingDecl::read("dout", e, "[B, Lq, Hq, Dv]"));
                b.push(BindingDecl::read(
                    "lse",
                    "f32",
                    "the forward's LSE [B, Hq, Lq]",
                ));
                b.push(BindingDecl::read_write(
                    "stats",
                    "vec2<f32>",
                    "(LSE, Delta) [B, Hq, Lq]",
                ));
                return b;
            }
            Pass::DkDv | Pass::Dq | Pass::DBias => {}
        }
        b.push(BindingDecl::read("q", e, "[B, Lq, Hq, D]"));
        b.push(BindingDecl::read("k", e, "[B, Lk, Hkv, D]"));
        b.push(BindingDecl::read("v", e, "[B, Lk, Hkv, Dv]"));
        b.push(BindingDecl::read("dout", e, "[B, Lq, Hq, Dv]"));
        b.push(BindingDecl::read(
            "stats",
            "vec2<f32>",
            "(LSE, Delta) [B, Hq, Lq]",
        ));
        b.push(BindingDecl::read(
            "aux",
            "u32",
            "q lengths [B], kv lengths [B], ALiBi slopes [Hq] (f32 bits)",
        ));
        if self.bias {
            b.push(BindingDecl::read("bias", "f32", "[B|1, Hq|1, Lq, Lk]"));
        }
        match self.pass {
            Pass::DkDv => {
                b.push(BindingDecl::read_write("dk", e, "[B, Lk, Hkv, D]"));
                b.push(BindingDecl::read_write("dvv", e, "[B, Lk, Hkv, Dv]"));
            }
            Pass::DBias => b.push(BindingDecl::read_write("dbias", "f32", "[bb, bh, Lq, Lk]")),
            _ => b.push(BindingDecl::read_write("dq", e, "[B, Lq, Hq, D]")),
        }
        b
    }

    fn workgroup_bytes(&self) -> u32 {
        match self.pass {
            Pass::Stats => 0,
            // the tile's rows (vec4s) and, for DkDv, the rows' (LSE, Delta)
            Pass::DkDv => self.tile_rows() * ((self.d + self.dv) * 4 + 8),
            Pass::Dq | Pass::DBias => self.tile_rows() * (self.d + self.dv) * 4,
        }
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        match self.dtype {
            DType::F16 => naga::valid::Capabilities::SHADER_FLOAT16,
            _ => naga::valid::Capabilities::empty(),
        }
    }

    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![crate::uniform_layout!(BackwardParams, "Params";
            batch, hq, hkv, lq, lk, d, dv, flags, q, k, v, o, dout, dq, dk, dvv, bias, lse,
            dbias, scale, softcap, win_left, win_right, sinks, slopes_at, _pad0, _pad1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every backward specialization validates (naga) and fits the WebGPU default workgroup
    /// memory; the tile's loops stay short.
    #[test]
    fn every_backward_kernel_validates_and_fits() {
        let keys = all_keys();
        for k in &keys {
            assert!(k.workgroup_bytes() <= TILE_BYTES, "{k:?}");
            assert!(k.tile_rows() >= 4, "{k:?}");
            crate::pipeline::validate_wgsl(&k.label(), &k.source(), k.capabilities())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(keys.len(), 2 * 7 * 7 * 6);
    }
}
