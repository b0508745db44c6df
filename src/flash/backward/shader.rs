//! The backward kernels of dense attention (FlashAttention-2's backward, three passes):
//!
//! - `Stats`: one invocation per query row writes `(LSE, Delta = dO . O)` of the row.
//! - `DkDv`: a workgroup owns 64 keys of one KV head; invocation `lid` owns key `j` with its K
//!   and V rows and its dK, dV accumulators in registers. It walks the query rows that can see
//!   the workgroup's keys, in tiles of `TQ` rows of Q and dO through workgroup memory, for every
//!   query head of the KV head's group (GQA: the group's heads add into one dK, dV, in order), and
//!   recomputes `P = exp(s - LSE)` from the forward's LSE: nothing of size L x L is stored.
//! - `Dq`: a workgroup owns 64 query rows of one head; invocation `lid` owns row `i`, walks the
//!   visible keys in tiles of `TK` rows of K and V and accumulates dQ.
//!
//! Each gradient element is written by exactly one invocation, summing in a fixed order: the
//! results are the same bit for bit from run to run (no atomics). Scores and sums are f32 for
//! f16 storage too.

use crate::dtype::DType;
use crate::pipeline::{declare_bindings, BindingDecl, Kernel, UniformLayout};
use crate::softmax::shader::flags;
use crate::wgsl::Wgsl;

/// Invocations per workgroup (keys of `DkDv`, query rows of `Dq` and `Stats`).
pub const WG: u32 = 64;
/// Workgroup memory a tile may take (the WebGPU default limit).
pub const TILE_BYTES: u32 = 16384;
/// The largest D and Dv the backward kernels are built for.
pub const MAX_DIM: u32 = 256;
/// Head-dim capacities (multiples of 4; D and Dv each pick the smallest that holds them).
pub const DIM_BUCKETS: [u32; 7] = [16, 32, 48, 64, 96, 128, 256];

/// Which of the three passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Stats,
    DkDv,
    Dq,
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

/// The uniform block of the three kernels (`struct Params` in the WGSL).
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

const PARAMS: &str = "struct Params {
    batch: u32, hq: u32, hkv: u32, lq: u32,
    lk: u32, d: u32, dv: u32, flags: u32,
    q: vec4<u32>, k: vec4<u32>, v: vec4<u32>, o: vec4<u32>,
    dout: vec4<u32>, dq: vec4<u32>, dk: vec4<u32>, dvv: vec4<u32>,
    bias: vec4<u32>,
    lse: vec4<u32>,
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
        };
        let bias = if self.bias { "_bias" } else { "" };
        format!(
            "flash_bwd_{pass}_{}_d{}_dv{}{bias}",
            self.dtype, self.d, self.dv
        )
    }

    fn source(&self) -> String {
        generate(self)
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
            Pass::DkDv | Pass::Dq => {}
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
        if self.pass == Pass::DkDv {
            b.push(BindingDecl::read_write("dk", e, "[B, Lk, Hkv, D]"));
            b.push(BindingDecl::read_write("dvv", e, "[B, Lk, Hkv, Dv]"));
        } else {
            b.push(BindingDecl::read_write("dq", e, "[B, Lq, Hq, D]"));
        }
        b
    }

    fn workgroup_bytes(&self) -> u32 {
        match self.pass {
            Pass::Stats => 0,
            // the tile's rows (vec4s) and, for DkDv, the rows' (LSE, Delta)
            Pass::DkDv => self.tile_rows() * ((self.d + self.dv) * 4 + 8),
            Pass::Dq => self.tile_rows() * (self.d + self.dv) * 4,
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
            scale, softcap, win_left, win_right, sinks, slopes_at, _pad0, _pad1)]
    }
}

/// Helpers every pass shares: -inf, a finite tanh, the lengths, visibility (FlashAttention's
/// bottom-right alignment, per sequence), and the vec4 loaders with elements past the head dim
/// read as 0.
const COMMON: &str = "
const MASKED: f32 = -1.0e30; // finite: inf - inf is 0 on llvmpipe

fn has(f: u32) -> bool { return (p.flags & f) != 0u; }

fn tanh_safe(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - e) / (1.0 + e);
}
";

const LENS: &str = "
fn q_len(b: u32) -> u32 { return select(p.lq, aux[b], has(F_QLENS)); }
fn kv_len(b: u32) -> u32 { return select(p.lk, aux[p.batch + b], has(F_KVLENS)); }

// Whether query i sees key j in a sequence of qlen queries and kvlen keys.
fn visible(i: u32, j: u32, qlen: u32, kvlen: u32) -> bool {
    if (i >= qlen || j >= kvlen) {
        return false;
    }
    let diag = i32(i) + i32(kvlen) - i32(qlen);
    let jj = i32(j);
    if (has(F_CAUSAL) && jj > diag) {
        return false;
    }
    let in_left = !has(F_WLEFT) || jj >= diag - p.win_left;
    let in_right = !has(F_WRIGHT) || jj <= diag + p.win_right;
    return (in_left && in_right) || j < p.sinks;
}
";

/// `ld_{name}(base, c)`: elements `c..c+4` of a row starting at `base`, 0 past `dim`.
fn loader(w: &mut Wgsl, name: &str, dim: &str) {
    w.raw(&format!(
        "fn ld_{name}(base: u32, c: u32) -> vec4<f32> {{
    return vec4<f32>(
        select(0.0, f32({name}[base + c]), c < {dim}),
        select(0.0, f32({name}[base + c + 1u]), c + 1u < {dim}),
        select(0.0, f32({name}[base + c + 2u]), c + 2u < {dim}),
        select(0.0, f32({name}[base + c + 3u]), c + 3u < {dim}));
}}"
    ));
}

/// `st_{name}(base, c, x)`: stores the elements of `x` below `dim`.
fn storer(w: &mut Wgsl, name: &str, dim: &str, t: &str) {
    w.raw(&format!(
        "fn st_{name}(base: u32, c: u32, x: vec4<f32>) {{
    if (c < {dim}) {{ {name}[base + c] = {t}(x.x); }}
    if (c + 1u < {dim}) {{ {name}[base + c + 1u] = {t}(x.y); }}
    if (c + 2u < {dim}) {{ {name}[base + c + 2u] = {t}(x.z); }}
    if (c + 3u < {dim}) {{ {name}[base + c + 3u] = {t}(x.w); }}
}}"
    ));
}

/// `modify(dot_qk, b, h, i, j, qlen, kvlen)`: the score after scale, softcap, ALiBi and bias,
/// and its derivative by `dot_qk`.
fn modify_fn(w: &mut Wgsl, key: &BackwardKey) {
    w.open(
        "fn modify(qk: f32, b: u32, h: u32, i: u32, j: u32, qlen: u32, kvlen: u32) -> vec2<f32> {",
    );
    w.line("var x = qk * p.scale;");
    w.line("var slope = p.scale;");
    w.open("if (has(F_SOFTCAP)) {");
    w.line("let t = tanh_safe(x / p.softcap);");
    w.line("x = p.softcap * t;");
    w.line("slope = p.scale * (1.0 - t * t);");
    w.close();
    w.open("if (has(F_ALIBI)) {");
    w.line("let dist = abs(i32(i) + i32(kvlen) - i32(qlen) - i32(j));");
    w.line("x -= bitcast<f32>(aux[p.slopes_at + h]) * f32(dist);");
    w.close();
    if key.bias {
        w.open("if (has(F_BIAS)) {");
        w.line("x += bias[p.bias.x + b * p.bias.y + h * p.bias.z + i * p.bias.w + j];");
        w.close();
    }
    w.line("return vec2<f32>(x, slope);");
    w.close();
}

fn header(key: &BackwardKey) -> Wgsl {
    let mut w = Wgsl::new(&format!(
        "Generated by wgpu-attention (src/flash/backward/shader.rs): the {:?} pass of dense\n\
         attention's backward, {}, D <= {}, Dv <= {}{}.",
        key.pass,
        key.dtype,
        key.d,
        key.dv,
        if key.bias { ", with a bias" } else { "" }
    ));
    if key.dtype == DType::F16 {
        w.line("enable f16;");
    }
    w.raw(PARAMS);
    w.raw(&declare_bindings(&key.bindings()));
    for (name, value) in flags::ALL {
        w.line(&format!("const {name}: u32 = {value}u;"));
    }
    for (name, value) in [
        ("WG", WG),
        ("D4", key.d / 4),
        ("DV4", key.dv / 4),
        ("TR", key.tile_rows()),
    ] {
        w.line(&format!("const {name}: u32 = {value}u;"));
    }
    w.raw(COMMON);
    w
}

fn generate(key: &BackwardKey) -> String {
    let mut w = header(key);
    let t = key.dtype.wgsl();
    match key.pass {
        Pass::Stats => {
            loader(&mut w, "o", "p.dv");
            loader(&mut w, "dout", "p.dv");
            stats_main(&mut w, key);
        }
        Pass::DkDv => {
            w.raw(LENS);
            for (n, dim) in [("q", "p.d"), ("k", "p.d"), ("v", "p.dv"), ("dout", "p.dv")] {
                loader(&mut w, n, dim);
            }
            storer(&mut w, "dk", "p.d", t);
            storer(&mut w, "dvv", "p.dv", t);
            modify_fn(&mut w, key);
            dkdv_main(&mut w, key);
        }
        Pass::Dq => {
            w.raw(LENS);
            for (n, dim) in [("q", "p.d"), ("k", "p.d"), ("v", "p.dv"), ("dout", "p.dv")] {
                loader(&mut w, n, dim);
            }
            storer(&mut w, "dq", "p.d", t);
            modify_fn(&mut w, key);
            dq_main(&mut w, key);
        }
    }
    w.finish()
}

fn stats_main(w: &mut Wgsl, key: &BackwardKey) {
    w.raw(
        "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x * WG + lid;
    let h = wid.y;
    let b = wid.z;
    if (i >= p.lq) {
        return;
    }
    let ob = p.o.x + b * p.o.y + i * p.o.z + h * p.o.w;
    let db = p.dout.x + b * p.dout.y + i * p.dout.z + h * p.dout.w;
    var delta = 0.0;",
    );
    w.indent_in();
    for c in 0..key.dv / 4 {
        w.line(&format!(
            "delta += dot(ld_o(ob, {o}u), ld_dout(db, {o}u));",
            o = c * 4
        ));
    }
    w.line("let l = lse[p.lse.x + b * p.lse.y + h * p.lse.z + i * p.lse.w];");
    w.line("// a row that saw no key (LSE = -inf) gets the finite sentinel: P = 0 for it");
    w.line("stats[(b * p.hq + h) * p.lq + i] = vec2<f32>(select(MASKED, l, l > MASKED), delta);");
    w.close();
}

/// The terms of one visible (query, key) pair, `s` holding the row's (LSE, Delta): the score
/// `qk` and its modified value and slope `sm`, the weight `pr = P`, `dp = dO . V` and
/// `gs = dS * ds/d(q.k)`; `qk_term(c)` and `dp_term(c)` are the vec4 products of part `c`.
fn pair_terms(
    w: &mut Wgsl,
    (d4, dv4): (u32, u32),
    qk_term: impl Fn(u32) -> String,
    dp_term: impl Fn(u32) -> String,
) {
    w.line("var qk = 0.0;");
    for c in 0..d4 {
        w.line(&format!("qk += {};", qk_term(c)));
    }
    w.line("let sm = modify(qk, b, h, i, j, qlen, kvlen);");
    w.line("let pr = exp(sm.x - s.x);");
    w.line("var dp = 0.0;");
    for c in 0..dv4 {
        w.line(&format!("dp += {};", dp_term(c)));
    }
    w.line("let gs = pr * (dp - s.y) * sm.y;");
}

/// The DkDv pass (see the module's description).
fn dkdv_main(w: &mut Wgsl, key: &BackwardKey) {
    let (d4, dv4) = (key.d / 4, key.dv / 4);
    w.line("var<workgroup> qt: array<vec4<f32>, TR * D4>;");
    w.line("var<workgroup> dot_: array<vec4<f32>, TR * DV4>;");
    w.line("var<workgroup> st: array<vec2<f32>, TR>;");
    w.raw(
        "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hk = wid.y;
    let b = wid.z;
    let j0 = wid.x * WG;
    let j = j0 + lid;
    let qlen = q_len(b);
    let kvlen = kv_len(b);
    let off = i32(kvlen) - i32(qlen);
    // the query rows that can see a key of this workgroup (the same for all its invocations)
    var i_lo = 0;
    var i_hi = i32(qlen);
    if (has(F_CAUSAL)) {
        i_lo = max(i_lo, i32(j0) - off);
    }
    if (j0 >= p.sinks) {
        if (has(F_WRIGHT)) {
            i_lo = max(i_lo, i32(j0) - off - p.win_right);
        }
        if (has(F_WLEFT)) {
            i_hi = min(i_hi, i32(j0 + WG - 1u) - off + p.win_left + 1);
        }
    }
    let lo = u32(max(i_lo, 0));
    let hi = u32(max(i_hi, i32(lo)));
    let jr = min(j, p.lk - 1u);
    let kb = p.k.x + b * p.k.y + jr * p.k.z + hk * p.k.w;
    let vb = p.v.x + b * p.v.y + jr * p.v.z + hk * p.v.w;
    let group = p.hq / p.hkv;",
    );
    w.indent_in();
    for c in 0..d4 {
        w.line(&format!("let k{c} = ld_k(kb, {}u);", c * 4));
        w.line(&format!("var dk{c} = vec4<f32>(0.0);"));
    }
    for c in 0..dv4 {
        w.line(&format!("let v{c} = ld_v(vb, {}u);", c * 4));
        w.line(&format!("var dv{c} = vec4<f32>(0.0);"));
    }
    w.open("for (var g = 0u; g < group; g++) {");
    w.line("let h = hk * group + g;");
    w.open("for (var t = lo; t < hi; t += TR) {");
    w.line("// the tile: TR rows of Q and dO of head h, and their (LSE, Delta)");
    w.open("for (var e = lid; e < TR * (D4 + DV4); e += WG) {");
    w.line("let r = e / (D4 + DV4);");
    w.line("let c = e % (D4 + DV4);");
    w.line("let i = min(t + r, p.lq - 1u);");
    w.open("if (c < D4) {");
    w.line("qt[r * D4 + c] = ld_q(p.q.x + b * p.q.y + i * p.q.z + h * p.q.w, c * 4u);");
    w.close();
    w.open("else {");
    w.line("let cv = c - D4;");
    w.line(
        "dot_[r * DV4 + cv] = ld_dout(p.dout.x + b * p.dout.y + i * p.dout.z + h * p.dout.w, cv * 4u);",
    );
    w.close();
    w.close();
    w.open("if (lid < TR) {");
    w.line("st[lid] = stats[(b * p.hq + h) * p.lq + min(t + lid, p.lq - 1u)];");
    w.close();
    w.line("workgroupBarrier();");
    w.open("for (var r = 0u; r < TR; r++) {");
    w.line("let i = t + r;");
    w.line("let s = st[r];");
    w.open("if (i < hi && s.x > MASKED && visible(i, j, qlen, kvlen)) {");
    pair_terms(
        w,
        (d4, dv4),
        |c| format!("dot(qt[r * D4 + {c}u], k{c})"),
        |c| format!("dot(dot_[r * DV4 + {c}u], v{c})"),
    );
    for c in 0..dv4 {
        w.line(&format!("dv{c} += pr * dot_[r * DV4 + {c}u];"));
    }
    for c in 0..d4 {
        w.line(&format!("dk{c} += gs * qt[r * D4 + {c}u];"));
    }
    w.close();
    w.close();
    w.line("workgroupBarrier();");
    w.close();
    w.close();
    w.open("if (j < p.lk) {");
    w.line("let dkb = p.dk.x + b * p.dk.y + j * p.dk.z + hk * p.dk.w;");
    w.line("let dvb = p.dvv.x + b * p.dvv.y + j * p.dvv.z + hk * p.dvv.w;");
    for c in 0..d4 {
        w.line(&format!("st_dk(dkb, {}u, dk{c});", c * 4));
    }
    for c in 0..dv4 {
        w.line(&format!("st_dvv(dvb, {}u, dv{c});", c * 4));
    }
    w.close();
    w.close();
}

/// The Dq pass (see the module's description).
fn dq_main(w: &mut Wgsl, key: &BackwardKey) {
    let (d4, dv4) = (key.d / 4, key.dv / 4);
    w.line("var<workgroup> kt: array<vec4<f32>, TR * D4>;");
    w.line("var<workgroup> vt: array<vec4<f32>, TR * DV4>;");
    w.raw(
        "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let hk = h / (p.hq / p.hkv);
    let i0 = wid.x * WG;
    let i = i0 + lid;
    let qlen = q_len(b);
    let kvlen = kv_len(b);
    let off = i32(kvlen) - i32(qlen);
    // the keys a row of this workgroup can see (the same for all its invocations)
    let i_last = i32(min(i0 + WG, qlen)) - 1;
    var j_lo = 0;
    var j_hi = select(i32(kvlen), 0, i_last < i32(i0));
    if (has(F_CAUSAL)) {
        j_hi = min(j_hi, i_last + off + 1);
    }
    if (has(F_WRIGHT)) {
        j_hi = min(j_hi, max(i_last + off + p.win_right + 1, i32(min(p.sinks, kvlen))));
    }
    if (has(F_WLEFT) && p.sinks == 0u) {
        j_lo = max(0, i32(i0) + off - p.win_left);
    }
    let lo = u32(max(j_lo, 0));
    let hi = u32(max(j_hi, i32(lo)));
    let ir = min(i, p.lq - 1u);
    let qb = p.q.x + b * p.q.y + ir * p.q.z + h * p.q.w;
    let db = p.dout.x + b * p.dout.y + ir * p.dout.z + h * p.dout.w;
    let s = stats[(b * p.hq + h) * p.lq + ir];",
    );
    w.indent_in();
    for c in 0..d4 {
        w.line(&format!("let q{c} = ld_q(qb, {}u);", c * 4));
        w.line(&format!("var dq{c} = vec4<f32>(0.0);"));
    }
    for c in 0..dv4 {
        w.line(&format!("let do{c} = ld_dout(db, {}u);", c * 4));
    }
    w.open("for (var t = lo; t < hi; t += TR) {");
    w.line("// the tile: TR rows of K and V");
    w.open("for (var e = lid; e < TR * (D4 + DV4); e += WG) {");
    w.line("let r = e / (D4 + DV4);");
    w.line("let c = e % (D4 + DV4);");
    w.line("let jj = min(t + r, p.lk - 1u);");
    w.open("if (c < D4) {");
    w.line("kt[r * D4 + c] = ld_k(p.k.x + b * p.k.y + jj * p.k.z + hk * p.k.w, c * 4u);");
    w.close();
    w.open("else {");
    w.line("let cv = c - D4;");
    w.line("vt[r * DV4 + cv] = ld_v(p.v.x + b * p.v.y + jj * p.v.z + hk * p.v.w, cv * 4u);");
    w.close();
    w.close();
    w.line("workgroupBarrier();");
    w.open("for (var r = 0u; r < TR; r++) {");
    w.line("let j = t + r;");
    w.open("if (j < hi && s.x > MASKED && visible(i, j, qlen, kvlen)) {");
    pair_terms(
        w,
        (d4, dv4),
        |c| format!("dot(q{c}, kt[r * D4 + {c}u])"),
        |c| format!("dot(do{c}, vt[r * DV4 + {c}u])"),
    );
    for c in 0..d4 {
        w.line(&format!("dq{c} += gs * kt[r * D4 + {c}u];"));
    }
    w.close();
    w.close();
    w.line("workgroupBarrier();");
    w.close();
    w.open("if (i < p.lq) {");
    w.line("let dqb = p.dq.x + b * p.dq.y + i * p.dq.z + h * p.dq.w;");
    for c in 0..d4 {
        w.line(&format!("st_dq(dqb, {}u, dq{c});", c * 4));
    }
    w.close();
    w.close();
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
        assert_eq!(keys.len(), 2 * 7 * 7 * 5);
    }
}
