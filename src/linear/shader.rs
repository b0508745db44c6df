//! The recurrent linear-attention kernel: one workgroup per (sequence, value head, slice of V
//! columns), one invocation per state column. Invocation j keeps column j of the state
//! (F rows) in registers, as vec4s, and walks the tokens in blocks of `tb`: the block's query
//! and key features (and gates) are loaded cooperatively into workgroup memory, then every
//! invocation applies the block's tokens to its column in order. Loops over the feature rows
//! are unrolled (lavapipe counts every loop iteration of an invocation against its limit), so
//! only the token loop runs per token.

use super::{FeatureMap, Rule, MAX_TAYLOR_K};
use crate::pipeline::{BindingDecl, Kernel, UniformLayout};
use crate::tensor::DType;
use crate::wgsl::Wgsl;

pub use super::recurrent::generate;

/// How the state decays per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decay {
    None,
    /// One factor per token and head (`exp(g)`).
    Scalar,
    /// One factor per state row (`exp(g_i)`, GLA).
    Vector,
}

impl Decay {
    /// The label's part: none, `_gs` or `_gv`.
    pub fn suffix(self) -> &'static str {
        match self {
            Decay::None => "",
            Decay::Scalar => "_gs",
            Decay::Vector => "_gv",
        }
    }
}

/// Runtime flags of [`LinearParams::flags`].
pub mod flags {
    /// Packed sequences: token ranges from `cu_seqlens`.
    pub const VARLEN: u32 = 1;
    /// Start from `initial_state`.
    pub const INIT: u32 = 2;
    /// Start from the state buffer (a later piece).
    pub const RESUME: u32 = 4;
    /// Apply the tokens to the state.
    pub const UPDATE: u32 = 8;
    /// Write O.
    pub const OUTPUT: u32 = 16;
    /// Write the state at the end.
    pub const WRITE_STATE: u32 = 32;
    /// Chunk kernels: the output reads one state for every chunk (global attention).
    pub const GLOBAL: u32 = 64;
    /// Chunk kernels: the state pass writes the state before every chunk.
    pub const CHUNKS: u32 = 128;

    pub(crate) fn wgsl() -> String {
        [
            ("VARLEN", VARLEN),
            ("INIT", INIT),
            ("RESUME", RESUME),
            ("UPDATE", UPDATE),
            ("OUTPUT", OUTPUT),
            ("WRITE_STATE", WRITE_STATE),
            ("GLOBAL", GLOBAL),
            ("CHUNKS", CHUNKS),
        ]
        .iter()
        .map(|(n, v)| format!("const F_{n}: u32 = {v}u;\n"))
        .collect()
    }
}

/// The kernel's uniform block (`struct LinParams` in the WGSL; `tests/naga.rs` checks the
/// layout). Strides are `[offset, batch, token, head]` in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LinearParams {
    pub n_seq: u32,
    pub t: u32,
    pub h: u32,
    pub hv: u32,
    pub dk: u32,
    pub dv: u32,
    pub f: u32,
    pub vs: u32,
    pub flags: u32,
    pub t_from: u32,
    pub t_to: u32,
    pub group: u32,
    pub scale: f32,
    pub eps: f32,
    pub feat_scale: f32,
    pub g_si: u32,
    pub q_st: [u32; 4],
    pub k_st: [u32; 4],
    pub v_st: [u32; 4],
    pub o_st: [u32; 4],
    pub g_st: [u32; 4],
    pub beta_st: [u32; 4],
    /// `[initial_state offset, state offset, chunk states offset, 0]`
    pub state: [u32; 4],
    /// Chunk kernels: `[first chunk, end chunk, chunk states stride per (sequence, head),
    /// per chunk]` (the piece's chunk states are `[N, HV, P, F, Vs]`).
    pub chunk: [u32; 4],
}

pub(super) const PARAMS_WGSL: &str = "struct LinParams {
    n_seq: u32, t: u32, h: u32, hv: u32,
    dk: u32, dv: u32, f: u32, vs: u32,
    flags: u32, t_from: u32, t_to: u32, group: u32,
    scale: f32, eps: f32, feat_scale: f32, g_si: u32,
    q_st: vec4<u32>, k_st: vec4<u32>, v_st: vec4<u32>, o_st: vec4<u32>,
    g_st: vec4<u32>, beta_st: vec4<u32>, state: vec4<u32>, chunk: vec4<u32>,
}
";

/// K buckets: the state rows a specialization unrolls (K is padded with zeros up to it).
pub const K_BUCKETS: [u32; 5] = [16, 32, 64, 128, 256];

/// Workgroup memory a key may use for its token block (under WebGPU's 16 KiB default).
const BLOCK_BYTES: u32 = 12 * 1024;

/// One specialization of the recurrent kernel. Shapes are uniforms; these are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearKey {
    pub dtype: DType,
    /// K bucket (raw q/k values per token).
    pub kb: u32,
    pub map: FeatureMap,
    pub decay: Decay,
    pub delta: bool,
    pub l2norm: bool,
    pub normalize: bool,
    /// Tokens per block.
    pub tb: u32,
    /// Invocations (state columns) per workgroup.
    pub wg: u32,
}

impl LinearKey {
    pub fn new(
        dtype: DType,
        k: usize,
        rule: Rule,
        map: FeatureMap,
        normalize: bool,
        l2norm: bool,
    ) -> Self {
        let kb = K_BUCKETS
            .iter()
            .copied()
            .find(|&b| b as usize >= k)
            .unwrap_or(K_BUCKETS[K_BUCKETS.len() - 1]);
        let kb = if map == FeatureMap::Taylor {
            MAX_TAYLOR_K as u32
        } else {
            kb
        };
        let mut key = LinearKey {
            dtype,
            kb,
            map,
            decay: rule.decay(),
            delta: rule.delta(),
            l2norm,
            normalize: normalize || map == FeatureMap::Taylor,
            tb: 1,
            wg: 64,
        };
        let per_token = key.token_bytes();
        key.tb = (1..=4)
            .map(|p| 1u32 << p)
            .rev()
            .find(|&tb| tb * per_token <= BLOCK_BYTES)
            .unwrap_or(1);
        key
    }

    /// The state rows, padded to vec4s: K, or `1 + K + K^2` for the Taylor map.
    pub fn fb(&self) -> u32 {
        let f = match self.map {
            FeatureMap::Taylor => 1 + self.kb + self.kb * self.kb,
            _ => self.kb,
        };
        f.div_ceil(4) * 4
    }

    fn token_bytes(&self) -> u32 {
        let fb = self.fb();
        let vec = if self.decay == Decay::Vector { fb } else { 0 };
        let raw = if self.map == FeatureMap::Taylor {
            2 * self.kb
        } else {
            0
        };
        4 * (2 * fb + vec + raw) + 16
    }

    /// Every key any call can plan.
    pub fn all() -> Vec<LinearKey> {
        let mut out = Vec::new();
        for dtype in [DType::F32, DType::F16] {
            for &kb in &K_BUCKETS {
                let k = kb as usize;
                for rule in Rule::ALL {
                    let maps: &[FeatureMap] = if rule == Rule::Linear {
                        &FeatureMap::ALL
                    } else {
                        &[FeatureMap::Identity]
                    };
                    for &map in maps {
                        if map == FeatureMap::Taylor && k > MAX_TAYLOR_K {
                            continue;
                        }
                        for normalize in [false, true] {
                            if normalize && rule != Rule::Linear {
                                continue;
                            }
                            for l2 in [false, true] {
                                if l2 && !rule.delta() {
                                    continue;
                                }
                                let key = LinearKey::new(dtype, k, rule, map, normalize, l2);
                                if !out.contains(&key) {
                                    out.push(key);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl Kernel for LinearKey {
    fn label(&self) -> String {
        let decay = self.decay.suffix();
        format!(
            "linear_rec_{}_k{}_{}{decay}{}{}{}_t{}_wg{}",
            self.dtype,
            self.kb,
            self.map.name(),
            if self.delta { "_delta" } else { "" },
            if self.l2norm { "_l2" } else { "" },
            if self.normalize { "_norm" } else { "" },
            self.tb,
            self.wg
        )
    }

    fn source(&self) -> String {
        generate(self)
    }

    fn bindings(&self) -> Vec<BindingDecl> {
        let e = self.dtype.wgsl();
        vec![
            BindingDecl::uniform("p", "LinParams"),
            BindingDecl::read("q", e, "[B, T, H, K]"),
            BindingDecl::read("k", e, "[B, T, H, K]"),
            BindingDecl::read("v", e, "[B, T, HV, V]"),
            BindingDecl::read("g", "f32", "gates (natural log)"),
            BindingDecl::read("beta", "f32", "[B, T, HV]"),
            BindingDecl::read("s_in", "f32", "initial state [N, HV, F, Vs]"),
            BindingDecl::read("cu", "u32", "cu_seqlens"),
            BindingDecl::read_write("o", e, "[B, T, HV, V]"),
            BindingDecl::read_write("s_out", "f32", "state [N, HV, F, Vs]"),
        ]
    }

    fn workgroup_bytes(&self) -> u32 {
        self.tb * self.token_bytes()
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        if self.dtype == DType::F16 {
            naga::valid::Capabilities::SHADER_FLOAT16
        } else {
            naga::valid::Capabilities::empty()
        }
    }

    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(LinearParams, "LinParams"; n_seq, t, h, hv, dk, dv, f,
            vs, flags, t_from, t_to, group, scale, eps, feat_scale, g_si, q_st, k_st, v_st,
            o_st, g_st, beta_st, state, chunk),
        ]
    }
}

/// `ld_q`/`ld_k`/`ld_v`/`ld_g`/`ld_beta` for the named bindings (a zero where not `ok`, and no
/// load in control flow: lavapipe loops over the lanes there), and `expm1` when asked.
pub(super) fn emit_loaders(w: &mut Wgsl, names: &[&str], expm1: bool) {
    for (name, st) in [("q", "q_st"), ("k", "k_st"), ("v", "v_st")] {
        if !names.contains(&name) {
            continue;
        }
        w.raw(&format!(
            "fn ld_{name}(b: u32, t: u32, h: u32, i: u32, ok: bool) -> f32 {{
    let idx = p.{st}.x + b * p.{st}.y + t * p.{st}.z + h * p.{st}.w + i;
    return select(0.0, f32({name}[select(0u, idx, ok)]), ok);
}}
"
        ));
    }
    if names.contains(&"g") {
        w.raw(
            "fn ld_g(b: u32, t: u32, h: u32, i: u32, ok: bool) -> f32 {
    let idx = p.g_st.x + b * p.g_st.y + t * p.g_st.z + h * p.g_st.w + i * p.g_si;
    return select(0.0, g[select(0u, idx, ok)], ok);
}
",
        );
    }
    if names.contains(&"beta") {
        w.raw(
            "fn ld_beta(b: u32, t: u32, h: u32, ok: bool) -> f32 {
    let idx = p.beta_st.x + b * p.beta_st.y + t * p.beta_st.z + h * p.beta_st.w;
    return select(0.0, beta[select(0u, idx, ok)], ok);
}
",
        );
    }
    // The decay enters as `S += S (exp(g) - 1) + ...`: a factor exp(g) near 1 rounded to f32
    // (error up to 6e-8) compounds over the ~1/|g| tokens it keeps (RetNet's slowest head,
    // 1 - 2^-12, over 4096), while exp(g) - 1 keeps f32's relative precision
    if expm1 {
        w.raw(
            "fn expm1(x: vec4<f32>) -> vec4<f32> {
    let series = x * (1.0 + x * (0.5 + x * (0.16666667 + x * (0.041666668 + x * (0.008333334 + x * 0.0013888889)))));
    return select(exp(x) - 1.0, series, abs(x) < vec4<f32>(0.1));
}
",
        );
    }
}

/// `phi(x)` of the elementwise feature maps (none for identity and Taylor).
pub(super) fn emit_phi(w: &mut Wgsl, map: FeatureMap) {
    let phi = match map {
        FeatureMap::Identity | FeatureMap::Taylor => None,
        FeatureMap::Elu1 => Some("select(exp(x), x + 1.0, x > vec4<f32>(0.0))"),
        FeatureMap::Relu => Some("max(x, vec4<f32>(0.0))"),
    };
    if let Some(phi) = phi {
        w.raw(&format!(
            "fn phi(x: vec4<f32>) -> vec4<f32> {{ return {phi}; }}\n"
        ));
    }
}

/// The sequence's batch index, first token and length (`b`, `t0`, `len`), from `n`.
pub(super) fn emit_sequence(w: &mut Wgsl) {
    w.line("var b = n;");
    w.line("var t0 = 0u;");
    w.line("var len = p.t;");
    w.open("if (p.flags & F_VARLEN) != 0u {");
    w.line("b = 0u;");
    w.line("t0 = cu[n];");
    w.line("len = cu[n + 1u] - t0;");
    w.close();
}
