//! The split-KV decode kernel (flash-decoding): one workgroup per (key split, KV head and row
//! chunk, batch) scores a tile of 64 keys against the query rows of every query head that
//! shares the KV head (GQA: each K/V element is read once per chunk of up to 8 rows, not once
//! per head), runs the online softmax and writes a partial O (f32) and its LSE; the merge
//! kernel (src/softmax/merge.rs) combines the splits.
//!
//! A workgroup's keys are the visible keys of its rows, in order: the sinks below the window,
//! then the span `[lo, hi)` that the causal bound and the window leave; the splits cut that
//! list into equal runs of whole tiles. Within a tile, invocation `t` scores key `t` against
//! every row (phase A: the rows' scores go to workgroup memory), invocation `r` turns row `r`'s
//! scores into weights and rescale factors (the online softmax), then invocation `c` reads
//! value column `c` (a vec4) of each key once and weighs it into every row's accumulator
//! (phase B: each V element is read once per workgroup). Every loop that runs per tile has at
//! most 64 iterations, and the host caps the tiles per split ([`DecodeKey::tiles_per_split_max`]: lavapipe stops loops silently after
//! ~65535 iterations per invocation).

use crate::dtype::DType;
use crate::pipeline::{declare_bindings, BindingDecl, Kernel, UniformLayout};
use crate::wgsl::Wgsl;

use super::quant::KvFormat;

/// Keys per tile, and invocations per workgroup.
pub const TILE: u32 = 64;
/// Loop iterations one invocation may run: lavapipe stops a loop silently past ~65535 per
/// invocation, counted over all its loops together (measured: 469 tiles of 145 iterations
/// each lost keys, 361 did not).
pub const LOOP_BUDGET: u32 = 60000;
/// Head-dim capacities of the specializations (D and Dv up to 256).
pub const DIM_BUCKETS: [u32; 4] = [32, 64, 128, 256];
/// Query rows per workgroup, powers of two up to 8: a group with more rows takes several
/// workgroups (each reads its K/V once). The rows are unrolled, and SwiftShader did not finish
/// compiling a 16-row kernel in 40 s under 8 GB of memory.
pub const ROW_CHOICES: [u32; 4] = [1, 2, 4, 8];
/// Workgroup memory the kernel may declare (the WebGPU default limit).
pub const WORKGROUP_BUDGET: u32 = 16384;

/// `flags` bits of [`DecodeParams`].
pub mod flags {
    pub const CAUSAL: u32 = 1;
    pub const LENS: u32 = 2;
    pub const PAGED: u32 = 4;
    pub const ALIBI: u32 = 8;
    pub const BIAS: u32 = 16;
    pub const SOFTCAP: u32 = 32;
    pub const WIN_LEFT: u32 = 64;
    pub const WIN_RIGHT: u32 = 128;
}

/// One decode specialization: everything else is a uniform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeKey {
    /// Of q (f32 or f16).
    pub dtype: DType,
    pub kv: KvFormat,
    /// Capacity of D and of Dv (one of [`DIM_BUCKETS`]).
    pub d: u32,
    pub dv: u32,
    /// Query rows per workgroup (one of [`ROW_CHOICES`]).
    pub rows: u32,
}

/// The decode kernel's uniform block (`struct Params` in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DecodeParams {
    pub lq: u32,
    pub hq: u32,
    pub hkv: u32,
    pub d: u32,
    pub dv: u32,
    pub lk: u32,
    pub splits: u32,
    pub rows: u32,
    pub page_size: u32,
    pub max_blocks: u32,
    pub num_pages: u32,
    pub flags: u32,
    pub q_off: u32,
    pub q_sb: u32,
    pub q_sl: u32,
    pub q_sh: u32,
    /// Float caches: element offset and strides of `[page|batch, slot|token, head]`;
    /// quantized: byte offset, then bytes per row of `D` (the strides follow from it).
    pub k_off: u32,
    pub k_s0: u32,
    pub k_s1: u32,
    pub k_s2: u32,
    pub v_off: u32,
    pub v_s0: u32,
    pub v_s1: u32,
    pub v_s2: u32,
    pub b_off: u32,
    pub b_sb: u32,
    pub b_sh: u32,
    pub b_sl: u32,
    pub scale: f32,
    pub softcap: f32,
    pub win_left: u32,
    pub win_right: u32,
    pub sinks: u32,
    /// Where the ALiBi slopes start in `aux` (after the per-batch lengths).
    pub slopes_at: u32,
    /// Keys per split, a multiple of the tile, the same for every sequence (work balanced by
    /// key count: a long sequence gets more splits); 0: each sequence's keys in `splits`
    /// equal runs.
    pub per_split: u32,
    pub _pad1: u32,
}

impl DecodeKey {
    /// Tiles one split may take: per tile the key loop, the D/4 steps of the scores and the
    /// three 64-step loops of the softmax step and phase B.
    pub fn tiles_per_split_max(&self) -> u32 {
        LOOP_BUDGET / (self.d / 4 + 3 * TILE + 1)
    }
    fn needs_f16(&self) -> bool {
        self.dtype == DType::F16 || self.kv == KvFormat::F16
    }
    fn kv_elem(&self) -> &'static str {
        match self.kv {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            _ => "u32",
        }
    }
}

/// Every decode specialization the host can plan.
pub fn all_keys() -> Vec<DecodeKey> {
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for kv in [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0, KvFormat::Q4_0] {
            for d in DIM_BUCKETS {
                for dv in DIM_BUCKETS {
                    for rows in ROW_CHOICES {
                        let key = DecodeKey {
                            dtype,
                            kv,
                            d,
                            dv,
                            rows,
                        };
                        if key.workgroup_bytes() <= WORKGROUP_BUDGET {
                            keys.push(key);
                        }
                    }
                }
            }
        }
    }
    keys
}

impl Kernel for DecodeKey {
    fn label(&self) -> String {
        format!(
            "decode_{}_kv{}_d{}_dv{}_r{}",
            self.dtype, self.kv, self.d, self.dv, self.rows
        )
    }

    fn source(&self) -> String {
        generate(self)
    }

    fn bindings(&self) -> Vec<BindingDecl> {
        let e = self.dtype.wgsl();
        let kv = self.kv_elem();
        vec![
            BindingDecl::uniform("p", "Params"),
            BindingDecl::read("q", e, "[B, Lq, Hq, D]"),
            BindingDecl::read("k", kv, "[pages|B, page|Lk, Hkv, D] (ggml blocks: bytes)"),
            BindingDecl::read("v", kv, "[pages|B, page|Lk, Hkv, Dv]"),
            BindingDecl::read("table", "i32", "block table [B, max_blocks]"),
            BindingDecl::read(
                "aux",
                "u32",
                "kv lengths [B], then ALiBi slopes [Hq] (f32 bits)",
            ),
            BindingDecl::read("bias", "f32", "[B|1, Hq|1, Lq, Lk]"),
            BindingDecl::read_write("o_part", "f32", "[B, Hq, Lq, splits, Dv]"),
            BindingDecl::read_write("lse_part", "f32", "[B, Hq, Lq, splits]"),
        ]
    }

    fn workgroup_bytes(&self) -> u32 {
        // the query rows (vec4s), the tile's scores, the tile's value row starts, the rows'
        // rescale factors
        self.rows * self.d * 4 + self.rows * TILE * 4 + TILE * 4 + self.rows * 4
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        use naga::valid::Capabilities as C;
        let mut caps = C::empty();
        if self.needs_f16() {
            caps |= C::SHADER_FLOAT16;
        }
        if self.kv.is_quantized() {
            // unpack2x16float (the blocks' f16 scales): core WGSL
            caps |= C::SHADER_FLOAT16_IN_FLOAT32;
        }
        caps
    }

    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![crate::uniform_layout!(DecodeParams, "Params";
            lq, hq, hkv, d, dv, lk, splits, rows, page_size, max_blocks, num_pages, flags,
            q_off, q_sb, q_sl, q_sh, k_off, k_s0, k_s1, k_s2, v_off, v_s0, v_s1, v_s2,
            b_off, b_sb, b_sh, b_sl, scale, softcap, win_left, win_right, sinks, slopes_at,
            per_split, _pad1)]
    }
}

const PARAMS: &str = "struct Params {
    lq: u32, hq: u32, hkv: u32, d: u32, dv: u32, lk: u32, splits: u32, rows: u32,
    page_size: u32, max_blocks: u32, num_pages: u32, flags: u32,
    q_off: u32, q_sb: u32, q_sl: u32, q_sh: u32,
    k_off: u32, k_s0: u32, k_s1: u32, k_s2: u32,
    v_off: u32, v_s0: u32, v_s1: u32, v_s2: u32,
    b_off: u32, b_sb: u32, b_sh: u32, b_sl: u32,
    scale: f32, softcap: f32, win_left: u32, win_right: u32, sinks: u32, slopes_at: u32,
    per_split: u32, pad1: u32,
}
";

/// Reads 4 bytes starting at any byte offset of a `u32` buffer (ggml's blocks are 34 and 18
/// bytes: their values do not start on words).
fn bytes4_fn(buf: &str) -> String {
    format!(
        "fn {buf}_bytes4(o: u32) -> u32 {{
    let i = o >> 2u;
    let sh = (o & 3u) * 8u;
    let w0 = {buf}[i];
    let w1 = {buf}[min(i + 1u, arrayLength(&{buf}) - 1u)];
    return select((w0 >> sh) | (w1 << ((32u - sh) & 31u)), w0, sh == 0u);
}}
"
    )
}

/// `ld_{buf}(row, d)`: values `d..d+4` of a cache row (`row`: the row's first element, or its
/// first byte for the block formats) as f32.
fn loader(w: &mut Wgsl, key: &DecodeKey, buf: &str) {
    match key.kv {
        KvFormat::F32 | KvFormat::F16 => w.raw(&format!(
            "fn ld_{buf}(row: u32, d: u32) -> vec4<f32> {{
    let i = row + d;
    return vec4<f32>(f32({buf}[i]), f32({buf}[i + 1u]), f32({buf}[i + 2u]), f32({buf}[i + 3u]));
}}
"
        )),
        KvFormat::Q8_0 => {
            w.raw(&bytes4_fn(buf));
            w.raw(&format!(
                "fn ld_{buf}(row: u32, d: u32) -> vec4<f32> {{
    let blk = row + (d / 32u) * 34u;
    let s = unpack2x16float({buf}_bytes4(blk) & 0xffffu).x;
    let q = {buf}_bytes4(blk + 2u + d % 32u);
    let iq = vec4<i32>(bitcast<i32>(q << 24u), bitcast<i32>(q << 16u), bitcast<i32>(q << 8u), bitcast<i32>(q)) >> vec4<u32>(24u);
    return vec4<f32>(iq) * s;
}}
"
            ));
        }
        KvFormat::Q4_0 => {
            w.raw(&bytes4_fn(buf));
            w.raw(&format!(
                "fn ld_{buf}(row: u32, d: u32) -> vec4<f32> {{
    let blk = row + (d / 32u) * 18u;
    let s = unpack2x16float({buf}_bytes4(blk) & 0xffffu).x;
    let c = d % 32u;
    let q = {buf}_bytes4(blk + 2u + c % 16u) >> select(0u, 4u, c >= 16u);
    let n = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u);
    return (vec4<f32>(n) - 8.0) * s;
}}
"
            ));
        }
    }
}

/// Module scope: the row addressing of a logical key (through the block table when paged).
const ROWS: &str = "const MASKED: f32 = -1.0e30; // finite: inf - inf is 0 on llvmpipe

// -inf from a runtime value: WGSL forbids a constant expression that evaluates to infinity.
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// tanh that stays finite for any |x|.
fn tanh_safe(x: f32) -> f32 {
    let e = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - e) / (1.0 + e);
}

// The (page, slot) of logical key j of batch b: its cache row; false past the table.
fn cache_slot(b: u32, j: u32) -> vec2<u32> {
    if ((p.flags & PAGED) == 0u) {
        return vec2<u32>(b, j);
    }
    let e = table[b * p.max_blocks + min(j / p.page_size, p.max_blocks - 1u)];
    let page = u32(clamp(e, 0, i32(p.num_pages) - 1));
    return vec2<u32>(page, j % p.page_size);
}

// Whether row (query qi of batch b) sees key j: FlashAttention's bottom-right alignment.
fn visible(qi: u32, j: u32, kvlen: u32) -> bool {
    if (j >= kvlen) {
        return false;
    }
    let diag = i32(qi) + i32(kvlen) - i32(p.lq);
    let jj = i32(j);
    if ((p.flags & CAUSAL) != 0u && jj > diag) {
        return false;
    }
    let in_left = (p.flags & WIN_LEFT) == 0u || jj >= diag - i32(p.win_left);
    let in_right = (p.flags & WIN_RIGHT) == 0u || jj <= diag + i32(p.win_right);
    return (in_left && in_right) || j < p.sinks;
}
";

fn generate(key: &DecodeKey) -> String {
    let mut w = Wgsl::new(&format!(
        "Generated by wgpu-attention (src/decode/shader.rs): split-KV decode, q {}, KV {},\n\
         D <= {}, Dv <= {}, {} query rows per workgroup.",
        key.dtype, key.kv, key.d, key.dv, key.rows
    ));
    if key.needs_f16() {
        w.line("enable f16;");
    }
    w.raw(PARAMS);
    w.raw(&declare_bindings(&key.bindings()));
    for (name, value) in [
        ("RB", key.rows),
        ("T", TILE),
        ("DQ4", key.d / 4),
        ("DV4", key.dv / 4),
    ] {
        w.line(&format!("const {name}: u32 = {value}u;"));
    }
    for (name, value) in [
        ("CAUSAL", flags::CAUSAL),
        ("LENS", flags::LENS),
        ("PAGED", flags::PAGED),
        ("ALIBI", flags::ALIBI),
        ("BIAS", flags::BIAS),
        ("SOFTCAP", flags::SOFTCAP),
        ("WIN_LEFT", flags::WIN_LEFT),
        ("WIN_RIGHT", flags::WIN_RIGHT),
    ] {
        w.line(&format!("const {name}: u32 = {value}u;"));
    }
    w.line("var<workgroup> qs: array<vec4<f32>, RB * DQ4>;");
    w.line("var<workgroup> sc: array<f32, RB * T>;");
    w.line("var<workgroup> vrow: array<u32, T>;");
    w.line("var<workgroup> rescale: array<f32, RB>;");
    loader(&mut w, key, "k");
    loader(&mut w, key, "v");
    w.raw(ROWS);
    w.raw(&row_fn(key, "k"));
    w.raw(&row_fn(key, "v"));
    main_fn(&mut w, key);
    w.finish()
}

/// `row_{buf}(slot, h)`: where a cache row starts (elements, or bytes for the block formats).
fn row_fn(key: &DecodeKey, buf: &str) -> String {
    let start = if key.kv.is_quantized() {
        // p.{buf}_s0 holds the bytes of one row of D values
        format!("p.{buf}_off + ((s.x * p.page_size + s.y) * p.hkv + h) * p.{buf}_s0")
    } else {
        format!("p.{buf}_off + s.x * p.{buf}_s0 + s.y * p.{buf}_s1 + h * p.{buf}_s2")
    };
    format!("fn row_{buf}(s: vec2<u32>, h: u32) -> u32 {{\n    return {start};\n}}\n")
}

fn main_fn(w: &mut Wgsl, key: &DecodeKey) {
    let rb = key.rows;
    w.raw(
        "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let split = wid.x;
    let hk = wid.y % p.hkv;
    let r0 = (wid.y / p.hkv) * RB;
    let b = wid.z;
    let nrep = p.hq / p.hkv;
    var kvlen = p.lk;
    if ((p.flags & LENS) != 0u) {
        kvlen = aux[b];
    }
    // this workgroup's query rows (row r: query head hk * nrep + r / lq, query r % lq), scaled
    for (var i = lid; i < RB * DQ4; i += T) {
        let r = r0 + i / DQ4;
        let c = i % DQ4;
        let rr = min(r, p.rows - 1u);
        let base = p.q_off + b * p.q_sb + (rr % p.lq) * p.q_sl + (hk * nrep + rr / p.lq) * p.q_sh + min(c * 4u, p.d - 4u);
        let x = vec4<f32>(f32(q[base]), f32(q[base + 1u]), f32(q[base + 2u]), f32(q[base + 3u]));
        qs[i] = select(vec4<f32>(0.0), x * p.scale, r < p.rows && c * 4u < p.d);
    }
    // the visible keys of these rows: sinks [0, nsink), then the span [lo, hi)
    let r_last = min(r0 + RB, p.rows) - 1u;
    var q_first = r0 % p.lq;
    var q_last = r_last % p.lq;
    if (r_last - r0 + 1u >= p.lq || q_last < q_first) {
        q_first = 0u;
        q_last = p.lq - 1u;
    }
    let d_first = i32(q_first) + i32(kvlen) - i32(p.lq);
    let d_last = i32(q_last) + i32(kvlen) - i32(p.lq);
    var hi = i32(kvlen);
    if ((p.flags & CAUSAL) != 0u) {
        hi = min(hi, d_last + 1);
    }
    if ((p.flags & WIN_RIGHT) != 0u) {
        hi = min(hi, d_last + i32(p.win_right) + 1);
    }
    var lo = 0;
    if ((p.flags & WIN_LEFT) != 0u) {
        lo = clamp(d_first - i32(p.win_left), 0, max(hi, 0));
    }
    hi = max(hi, lo);
    let nsink = u32(min(i32(min(p.sinks, kvlen)), lo));
    let total = nsink + u32(hi - lo);
    // this split's run of the list, in whole tiles: the same number of keys for every
    // sequence (p.per_split), or this sequence's keys in p.splits runs
    var per = ((total + p.splits - 1u) / p.splits + T - 1u) / T * T;
    if (p.per_split > 0u) {
        per = p.per_split;
    }
    let u_start = min(split * per, total);
    let u_end = min(u_start + per, total);
    // row lid's softmax state (invocations lid < RB)
    var m = MASKED;
    var l = 0.0;
",
    );
    w.indent_in();
    // invocation lid owns value column lid (a vec4) of every row: acc{r}
    for r in 0..rb {
        w.line(&format!("var acc{r} = vec4<f32>(0.0);"));
    }
    w.line("let col = min(lid, p.dv / 4u - 1u) * 4u;");
    w.line("workgroupBarrier();");
    w.open("for (var u0 = u_start; u0 < u_end; u0 += T) {");
    w.line("// phase A: invocation lid scores key u0 + lid against every row");
    w.line("let u = min(u0 + lid, u_end - 1u);");
    w.line("let j = select(u32(lo) + u - nsink, u, u < nsink);");
    w.line("let slot = cache_slot(b, j);");
    w.line("let krow = row_k(slot, hk);");
    w.line("vrow[lid] = row_v(slot, hk);");
    for r in 0..rb {
        w.line(&format!("var s{r} = 0.0;"));
    }
    w.open("for (var d = 0u; d < p.d; d += 4u) {");
    w.line("let kv = ld_k(krow, d);");
    w.line("let c = d / 4u;");
    for r in 0..rb {
        w.line(&format!("s{r} += dot(qs[{r}u * DQ4 + c], kv);"));
    }
    w.close();
    for r in 0..rb {
        w.line(&format!(
            "sc[{r}u * T + lid] = score({r}u + r0, j, s{r}, kvlen, b, hk, u0 + lid < u_end);"
        ));
    }
    w.line("workgroupBarrier();");
    w.line("// the softmax step: invocation r < RB turns row r's scores into weights in place");
    w.open("if (lid < RB) {");
    w.line("var mt = MASKED;");
    w.open("for (var t = 0u; t < T; t++) {");
    w.line("mt = max(mt, sc[lid * T + t]);");
    w.close();
    w.line("let mn = max(m, mt);");
    w.line("var sum = 0.0;");
    w.open("for (var t = 0u; t < T; t++) {");
    w.line("let st = sc[lid * T + t];");
    w.line("let pt = select(0.0, exp(st - mn), st > MASKED);");
    w.line("sc[lid * T + t] = pt;");
    w.line("sum += pt;");
    w.close();
    w.line("let alpha = exp(m - mn);");
    w.line("rescale[lid] = alpha;");
    w.line("l = l * alpha + sum;");
    w.line("m = mn;");
    w.close();
    w.line("workgroupBarrier();");
    w.line("// phase B: each value vec4 read once, weighed into every row");
    for r in 0..rb {
        w.line(&format!("acc{r} *= rescale[{r}u];"));
    }
    w.open("for (var t = 0u; t < T; t++) {");
    w.line("let vv = ld_v(vrow[t], col);");
    for r in 0..rb {
        w.line(&format!("acc{r} += sc[{r}u * T + t] * vv;"));
    }
    w.close();
    w.line("workgroupBarrier();");
    w.close();
    w.line("// the partial O (normalized) and LSE of this split: l = 0 where no key was visible");
    w.open("if (lid < RB) {");
    w.line("rescale[lid] = l;");
    w.line("let g = ((b * p.hq + hk * nrep + min(r0 + lid, p.rows - 1u) / p.lq) * p.lq + (min(r0 + lid, p.rows - 1u) % p.lq)) * p.splits + split;");
    w.open("if (r0 + lid < p.rows) {");
    w.line("lse_part[g] = select(neg_inf(), m + log(l), l > 0.0);");
    w.close();
    w.close();
    w.line("workgroupBarrier();");
    w.open("if (lid < p.dv / 4u) {");
    for r in 0..rb {
        w.open(&format!("if (r0 + {r}u < p.rows) {{"));
        w.line(&format!("let row = r0 + {r}u;"));
        w.line(
            "let g = ((b * p.hq + hk * nrep + row / p.lq) * p.lq + row % p.lq) * p.splits + split;",
        );
        w.line(&format!("let lr = rescale[{r}u];"));
        w.line(&format!(
            "let x = acc{r} * select(0.0, 1.0 / lr, lr > 0.0);"
        ));
        w.line("let o = g * p.dv + col;");
        w.line("o_part[o] = x.x;");
        w.line("o_part[o + 1u] = x.y;");
        w.line("o_part[o + 2u] = x.z;");
        w.line("o_part[o + 3u] = x.w;");
        w.close();
    }
    w.close();
    w.close();
    w.raw(SCORE);
}

/// The modified score of a (row, key) pair, or `MASKED` (finite, so no infinity meets another;
/// phase B gives a masked score the weight 0).
const SCORE: &str = "
fn score(row: u32, j: u32, dot_qk: f32, kvlen: u32, b: u32, hk: u32, in_run: bool) -> f32 {
    let r = min(row, p.rows - 1u);
    let qi = r % p.lq;
    let qh = hk * (p.hq / p.hkv) + r / p.lq;
    var s = dot_qk;
    if ((p.flags & SOFTCAP) != 0u) {
        s = p.softcap * tanh_safe(s / p.softcap);
    }
    let diag = i32(qi) + i32(kvlen) - i32(p.lq);
    if ((p.flags & ALIBI) != 0u) {
        s -= bitcast<f32>(aux[p.slopes_at + qh]) * f32(abs(diag - i32(j)));
    }
    if ((p.flags & BIAS) != 0u) {
        s += bias[p.b_off + b * p.b_sb + qh * p.b_sh + qi * p.b_sl + j];
    }
    let keep = in_run && row < p.rows && visible(qi, j, kvlen) && s > MASKED;
    return select(MASKED, s, keep);
}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decode_merge_and_append_kernel_validates() {
        let mut n = 0;
        for k in all_keys() {
            assert!(k.workgroup_bytes() <= WORKGROUP_BUDGET, "{k:?}");
            // one value vec4 per invocation
            assert!(k.dv / 4 <= TILE, "{k:?}");
            n += 1;
        }
        for k in super::super::all_kernels() {
            crate::pipeline::validate_wgsl(&k.label(), &k.source(), k.capabilities())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(n > 100, "{n} decode keys");
    }
}
