//! The neighborhood family's WGSL: its [`Geometry`] for the shared generator (queries are tiles
//! of a 3-axis grid, keys the union box of their windows flattened, the mask NATTEN's window per
//! axis) and the Sweep kernel, a body of its own for CPU adapters. Its uniform block `np`
//! ([`NaParams`]) is bound after the shared bindings: dense calls neither declare nor upload it.

use crate::pipeline::{BindingDecl, UniformLayout};
use crate::softmax::shader::{group_body, store_row, FlashKey, Geo, Geometry, Strategy};
use crate::wgsl::Wgsl;

/// The neighborhood geometry (see [`Geometry`]).
pub struct Neighborhood;

/// The one instance neighborhood keys point to.
pub static NEIGHBORHOOD: Neighborhood = Neighborhood;

impl Neighborhood {
    /// As a key's geometry.
    pub fn geo() -> Geo {
        Geo(&NEIGHBORHOOD)
    }
}

/// The neighborhood uniform block, mirrored field for field by `NaParams` in WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NaParams {
    /// Axis lengths, and workgroup tiles per dilation group.
    pub n: [u32; 4],
    /// Kernel size, dilation and stride per axis (4th lane unused).
    pub kernel: [u32; 4],
    pub dil: [u32; 4],
    pub stride: [u32; 4],
    /// Query sub-box of one subgroup per axis, and its size.
    pub sub: [u32; 4],
    /// Sub-boxes per workgroup tile per axis, and their count.
    pub wgrid: [u32; 4],
    /// Workgroup tiles per dilation group per axis.
    pub tiles: [u32; 4],
    /// Bit `a`: axis `a` is causal.
    pub causal: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

const NA_PARAMS_WGSL: &str = "struct NaParams {
    n: vec4<u32>,      // axis lengths, tiles per dilation group
    kernel: vec4<u32>,
    dil: vec4<u32>,
    stride: vec4<u32>,
    sub: vec4<u32>,    // query box of one subgroup (x, y, z, size)
    wgrid: vec4<u32>,  // boxes per workgroup tile (x, y, z, count)
    tiles: vec4<u32>,  // workgroup tiles per dilation group (x, y, z)
    causal: u32,       // bit a: axis a is causal
    pad0: u32, pad1: u32, pad2: u32,
}
";

impl Geometry for Neighborhood {
    fn suffix(&self) -> &'static str {
        "_na"
    }
    fn source_file(&self) -> &'static str {
        "src/neighborhood/shader.rs"
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        vec![BindingDecl::uniform("np", "NaParams")]
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(NaParams, "NaParams"; n, kernel, dil, stride, sub, wgrid,
            tiles, causal, _pad0, _pad1, _pad2),
        ]
    }
    fn helpers(&self, w: &mut Wgsl, _key: &FlashKey) {
        w.raw(NA_PARAMS_WGSL);
        w.raw(NA_WGSL);
        w.raw(NA_GRID_WGSL);
    }
    fn own_body(&self, w: &mut Wgsl, key: &FlashKey) -> bool {
        if key.strategy != Strategy::Sweep {
            return false;
        }
        sweep_kernel(w, key);
        true
    }
    fn prologue(&self, w: &mut Wgsl, key: &FlashKey) {
        na_prologue(w, key, key.rows);
    }
    /// One pass over the key box `[lo, hi)` flattened (z fastest), so a block of keys may span
    /// lines of the innermost axis and no block is padded at the end of a line (a 20 x 20 box is
    /// 50 blocks of 8, not 20 lines of 3). Each key's coordinates are checked against each row's
    /// window on every axis.
    fn open_passes(&self, w: &mut Wgsl, _key: &FlashKey) {
        w.line("na_lo = lo;");
        w.line("let span = vec3<u32>(max(hi - lo, vec3<i32>(0)));");
        w.line("na_span = span;");
        w.open("{");
        w.line("let pass_lo = 0u;");
        w.line("let pass_hi = span.x * span.y * span.z;");
        w.line("range_lo = pass_lo;");
        w.line("range_hi = pass_hi;");
    }
    fn lane_key(&self, w: &mut Wgsl) {
        w.line("let kc = key_at(kb + lane);");
        w.line("let kj = na_token(na_gc, vec3<u32>(kc));");
    }
    fn group_keys(&self, w: &mut Wgsl, key: &FlashKey) {
        for u in 0..key.group {
            w.line(&match key.strategy {
                Strategy::Tiled => format!("let kc{u} = key_at(kb + g + {u}u);"),
                _ => format!("let kc{u} = subgroupShuffle(kc, g + {u}u);"),
            });
            w.line(&format!("let kin{u} = kb + g + {u}u < pass_hi;"));
        }
    }
    fn score(&self, _key: &FlashKey, r: u32, u: u32) -> String {
        format!("na_mask(s{r}_{u}, ok{r} & kin{u} & all(kc{u} >= ws{r}) & all(kc{u} < we{r}))")
    }
}

/// Neighborhood kernels: NATTEN's window on one axis, in dilation-group coordinates, and the keys
/// of the flattened key box (`key_at`, `key_row`). Definitions: `src/neighborhood/mod.rs`.
const NA_WGSL: &str = "
var<private> na_gc: vec3<u32>;   // dilation group of this workgroup
var<private> na_lo: vec3<i32>;   // first key of the key box, group coordinates
var<private> na_span: vec3<u32>; // size of the key box

// Group coordinates of key j of the key box, flattened with z fastest (j past the end reads the
// last key: callers mask it out by index).
fn key_at(j: u32) -> vec3<i32> {
    let jj = min(j, max(na_span.x * na_span.y * na_span.z, 1u) - 1u);
    let r = jj / na_span.z;
    return na_lo + vec3<i32>(vec3<u32>(r / na_span.y, r % na_span.y, jj % na_span.z));
}

fn key_row(j: u32) -> u32 { return na_token(na_gc, vec3<u32>(key_at(j))); }

// positions x < n with x % d == g
fn na_len(n: u32, d: u32, g: u32) -> u32 { return (n - g + d - 1u) / d; }

// First key of query x's window on an axis of (group) length n: the window of the stride
// group's leader, shifted inside the axis (non-causal) or ending at the leader (causal).
fn na_start(x: i32, n: i32, k: i32, s: i32, causal: bool) -> i32 {
    let left = k / 2;
    let right = k / 2 + k % 2 - 1;
    let lead = min((x / s) * s + s / 2, n - 1);
    let shifted = select(max(lead - left, 0), n - k, lead + right >= n);
    let lead_c = min((x / s) * s + s - 1, n - 1);
    return select(shifted, max(lead_c - left - right, 0), causal);
}

// One past the last key: k keys on, or up to the query itself when causal.
fn na_end(x: i32, start: i32, n: i32, k: i32, causal: bool) -> i32 {
    return select(start + k, min(x + 1, n), causal);
}

fn na_mask(raw: f32, vis: bool) -> f32 {
    let t = raw * LOG2E;
    return select(MASKED, select(t, MASKED, t <= MASKED), vis);
}
";

/// Grid helpers of neighborhood kernels (axis order x, y, z; z innermost in memory).
const NA_GRID_WGSL: &str = "
fn na_split(i: u32, box: vec3<u32>) -> vec3<u32> {
    return vec3<u32>(i / (box.y * box.z), (i / box.z) % box.y, i % box.z);
}

// token index of group coordinates x in dilation group g
fn na_token(g: vec3<u32>, x: vec3<u32>) -> u32 {
    let pos = g + np.dil.xyz * x;
    return (pos.x * np.n.y + pos.y) * np.n.z + pos.z;
}

fn na_causal(a: u32) -> bool { return ((np.causal >> a) & 1u) != 0u; }

fn na_starts(x: vec3<i32>, n: vec3<i32>) -> vec3<i32> {
    let k = vec3<i32>(np.kernel.xyz);
    let s = vec3<i32>(np.stride.xyz);
    return vec3<i32>(na_start(x.x, n.x, k.x, s.x, na_causal(0u)),
                     na_start(x.y, n.y, k.y, s.y, na_causal(1u)),
                     na_start(x.z, n.z, k.z, s.z, na_causal(2u)));
}

fn na_ends(x: vec3<i32>, start: vec3<i32>, n: vec3<i32>) -> vec3<i32> {
    let k = vec3<i32>(np.kernel.xyz);
    return vec3<i32>(na_end(x.x, start.x, n.x, k.x, na_causal(0u)),
                     na_end(x.y, start.y, n.y, k.y, na_causal(1u)),
                     na_end(x.z, start.z, n.z, k.z, na_causal(2u)));
}
";

/// Neighborhood kernels: the workgroup owns one tile of one dilation group (every coordinate
/// below is in group coordinates); each row knows its window `[ws, we)` per axis, and the key
/// box `[lo, hi)` is the union of the windows of the subgroup's rows (Subgroup) or of the
/// workgroup's tile (Tiled): keys outside it are never loaded.
fn na_prologue(w: &mut Wgsl, key: &FlashKey, r_n: u32) {
    w.raw(
        "    let b = wid.z;
    let h = wid.y;
    let hk = h / (p.hq / p.hkv);            // GQA: query head h reads kv head h / (Hq / Hkv)
    let gc = na_split(wid.x / np.n.w, np.dil.xyz); // dilation group of this workgroup
    let ng = vec3<u32>(na_len(np.n.x, np.dil.x, gc.x), na_len(np.n.y, np.dil.y, gc.y),
                       na_len(np.n.z, np.dil.z, gc.z));
    let ngi = vec3<i32>(ng);
    na_gc = gc;
    let tile = np.sub.xyz * np.wgrid.xyz;
    let origin = na_split(wid.x % np.n.w, np.tiles.xyz) * tile;
    let k_head = p.k.x + b * p.k.y + hk * p.k.w;
    let v_head = p.v.x + b * p.v.y + hk * p.v.w;",
    );
    for r in 0..r_n {
        w.line(&format!("let loc{r} = lid * {r_n}u + {r}u;"));
        w.line(&format!(
            "let x{r} = origin + np.sub.xyz * na_split(loc{r} / np.sub.w, np.wgrid.xyz) + na_split(loc{r} % np.sub.w, np.sub.xyz);"
        ));
        w.line(&format!(
            "let ok{r} = (loc{r} / np.sub.w < np.wgrid.w) & all(x{r} < ng);"
        ));
        w.line(&format!(
            "let xc{r} = vec3<i32>(min(x{r}, ng - vec3<u32>(1u)));"
        ));
        w.line(&format!("let tok{r} = na_token(gc, vec3<u32>(xc{r}));"));
        w.line(&format!("let ws{r} = na_starts(xc{r}, ngi);"));
        w.line(&format!("let we{r} = na_ends(xc{r}, ws{r}, ngi);"));
    }
    match key.strategy {
        Strategy::Subgroup | Strategy::Sweep => {
            w.line("var lo_l = vec3<i32>(1 << 30);");
            w.line("var hi_l = vec3<i32>(0);");
            for r in 0..r_n {
                w.line(&format!("lo_l = select(lo_l, min(lo_l, ws{r}), ok{r});"));
                w.line(&format!("hi_l = select(hi_l, max(hi_l, we{r}), ok{r});"));
            }
            w.line("// keys this subgroup can see (uniform over the subgroup)");
            w.line("let lo = subgroupMin(lo_l);");
            w.line("let hi = subgroupMax(hi_l);");
        }
        Strategy::Tiled => {
            // windows are monotone in the query coordinate: the tile's corners bound them
            w.line("// keys this workgroup's tile can see (uniform over the workgroup)");
            w.line("let last = vec3<i32>(min(origin + tile, ng)) - 1;");
            w.line("let lo = na_starts(vec3<i32>(origin), ngi);");
            w.line(
                "let hi = select(na_ends(last, na_starts(last, ngi), ngi), vec3<i32>(0), origin >= ng);",
            );
        }
    }
}

/// The Sweep kernel (neighborhood attention on CPU adapters), see [`Strategy::Sweep`].
///
/// Each lane owns one position (y, z) of the inner axes; the subgroup walks the key planes
/// `x' = 0 .. n_x` of its dilation group and streams each plane's union box (y, z) once. Slot `r`
/// holds query `x = x' + before - (S - 1) + r`: a query enters the newest slot `before` planes
/// ahead of its own and leaves slot 0 `after` planes past it, so along x it sees the planes
/// `[x - before, x + after]` clipped to the axis. That is NATTEN's window for every query but
/// those at x's borders, whose non-causal window is shifted inside the axis: after the sweep,
/// `pins` pinned slots finish them (the top ones continue from where their slot stopped, the
/// bottom ones compute the planes they missed and merge with their slot's state). Along y and z
/// the mask is per lane, as in the Subgroup kernel.
fn sweep_kernel(w: &mut Wgsl, key: &FlashKey) {
    let (s_n, p_n, d4, dv4, u_n) = (key.rows, key.pins, key.d4, key.dv4, key.group);
    na_prologue(w, key, 1);
    w.raw(
        "    let nx = ngi.x;
    let kx = i32(np.kernel.x);
    let causal_x = na_causal(0u);
    let before = select(kx / 2, kx - 1, causal_x); // planes a query's slot opens ahead of it
    let after = kx - 1 - before;                  // and stays open past it
    let top = select(before, 0, causal_x);        // queries x < top: window shifted up the axis
    let bottom = select(after, 0, causal_x);      // queries x >= nx - bottom: shifted down
    let span = vec3<u32>(1u, vec2<u32>(max(hi.yz - lo.yz, vec2<i32>(0))));
    na_span = span;
    let nbox = span.y * span.z;                   // keys of one plane's union box
    let lane_yz = vec2<u32>(xc0.yz);",
    );
    let load_q = |w: &mut Wgsl, name: &str, x: &str| {
        w.open("{");
        w.line(&format!(
            "let t = na_token(gc, vec3<u32>(u32(clamp({x}, 0, nx - 1)), lane_yz));"
        ));
        w.line("let qb = p.q.x + b * p.q.y + t * p.q.z + h * p.q.w;");
        for i in 0..d4 {
            w.line(&format!("{name}[{i}] = ld_q(qb, {}u) * p.scale;", i * 4));
        }
        w.close();
    };
    let write = |w: &mut Wgsl, pre: &str, r: u32, x: &str, cond: &str| {
        w.open(&format!("if ({cond}) {{"));
        w.line(&format!(
            "let row = na_token(gc, vec3<u32>(u32({x}), lane_yz));"
        ));
        let state = |v: &str| format!("{pre}{v}{r}");
        store_row(w, dv4, &state("m"), &state("l"), &state("acc"), false);
        w.close();
    };
    // One plane (x = xs): its union box in blocks of one key per lane, shuffled round.
    let plane = |w: &mut Wgsl, rows: u32, pre: &str, live: bool| {
        w.line("na_lo = vec3<i32>(xs, lo.y, lo.z);");
        w.open("for (var kb = 0u; kb < nbox; kb += sg_size) {");
        w.line("let kc = key_at(kb + lane);");
        w.line("let kj = na_token(na_gc, vec3<u32>(kc));");
        for i in 0..d4 {
            w.line(&format!("kr[{i}] = ld_k(k_head + kj * p.k.z, {}u);", i * 4));
        }
        for i in 0..dv4 {
            w.line(&format!("vr[{i}] = ld_v(v_head + kj * p.v.z, {}u);", i * 4));
        }
        w.line("let gend = min(sg_size, nbox - kb);");
        w.open(&format!("for (var g = 0u; g < gend; g += {u_n}u) {{"));
        let keys = |w: &mut Wgsl| {
            for u in 0..u_n {
                w.line(&format!("let kc{u} = subgroupShuffle(kc, g + {u}u);"));
                w.line(&format!(
                    "let vis{u} = ok0 & (kb + g + {u}u < nbox) & all(kc{u}.yz >= ws0.yz) & all(kc{u}.yz < we0.yz);"
                ));
            }
        };
        let score = |r: u32, u: u32| {
            let live = if live {
                format!(" & live{r}")
            } else {
                String::new()
            };
            format!("na_mask(s{r}_{u}, vis{u}{live})")
        };
        group_body(w, key, rows, pre, &keys, &score, |x, u, i| {
            format!("subgroupShuffle({x}[{i}], g + {u}u)")
        });
        w.close();
        w.close();
    };

    for r in 0..s_n {
        w.line(&format!(
            "var q{r}: array<vec4<f32>, {d4}>; var acc{r}: array<vec4<f32>, {dv4}>; var m{r} = MASKED; var l{r} = 0.0;"
        ));
    }
    w.line(&format!(
        "// before plane 0, slot r holds query before - {s_n} + r (it shifts down first)"
    ));
    for r in 1..s_n {
        load_q(w, &format!("q{r}"), &format!("before - {s_n} + {r}"));
    }
    for j in 0..p_n {
        w.line(&format!(
            "var zq{j}: array<vec4<f32>, {d4}>; var zacc{j}: array<vec4<f32>, {dv4}>; var zm{j} = MASKED; var zl{j} = 0.0;"
        ));
    }
    w.line(&format!("var kr: array<vec4<f32>, {d4}>;"));
    w.line(&format!("var vr: array<vec4<f32>, {dv4}>;"));

    w.open("for (var xs = 0; xs < nx; xs++) {");
    w.line("let xr = xs - 1 - after; // the query leaving slot 0: its last plane was xs - 1");
    // Pin j takes a state (q, acc, m, l as expressions of the element index) where `cond`.
    let pin = |w: &mut Wgsl,
               j: u32,
               q: &dyn Fn(u32) -> String,
               acc: &str,
               m: &str,
               l: &str,
               cond: &str| {
        for i in 0..d4 {
            w.line(&format!(
                "zq{j}[{i}] = select(zq{j}[{i}], {}, {cond});",
                q(i)
            ));
        }
        for i in 0..dv4 {
            let a = acc.replace("{i}", &i.to_string());
            w.line(&format!(
                "zacc{j}[{i}] = select(zacc{j}[{i}], {a}, {cond});"
            ));
        }
        w.line(&format!("zm{j} = select(zm{j}, {m}, {cond});"));
        w.line(&format!("zl{j} = select(zl{j}, {l}, {cond});"));
    };
    for j in 0..p_n {
        w.line(&format!(
            "let hit{j} = xr == {j}; // a top border query continues in a pin"
        ));
        let hit = format!("hit{j}");
        pin(w, j, &|i| format!("q0[{i}]"), "acc0[{i}]", "m0", "l0", &hit);
    }
    write(w, "", 0, "xr", "ok0 & (xr >= top)");
    for r in 0..s_n - 1 {
        let n = r + 1;
        w.line(&format!(
            "q{r} = q{n}; acc{r} = acc{n}; m{r} = m{n}; l{r} = l{n};"
        ));
    }
    let last = s_n - 1;
    load_q(w, &format!("q{last}"), "xs + before");
    w.line(&format!(
        "acc{last} = array<vec4<f32>, {dv4}>(); m{last} = MASKED; l{last} = 0.0;"
    ));
    plane(w, s_n, "", false);
    w.close();
    write(w, "", 0, "nx - 1 - after", "ok0");

    if p_n > 0 {
        w.line("// border queries: the top ones continue, the bottom ones start fresh");
        w.open("for (var ph = 0; ph < 2; ph++) {");
        w.line("let bot = ph == 1;");
        w.line("let count = select(top, bottom, bot);");
        for j in 0..p_n {
            w.line(&format!("let xz{j} = select({j}, nx - bottom + {j}, bot);"));
            w.open("{");
            w.line(&format!("var fresh: array<vec4<f32>, {d4}>;"));
            load_q(w, "fresh", &format!("xz{j}"));
            let fresh = |i: u32| format!("fresh[{i}]");
            pin(w, j, &fresh, "vec4<f32>(0.0)", "MASKED", "0.0", "bot");
            w.close();
        }
        w.open("for (var t = 0; t < count; t++) {");
        w.line("let xs = select(after + 1 + t, nx - kx + t, bot);");
        for j in 0..p_n {
            w.line(&format!(
                "let live{j} = select(t >= {j}, t <= {j}, bot) & ({j} < count);"
            ));
        }
        plane(w, p_n, "z", true);
        w.close();
        w.line("// a bottom query's other planes are in slot j + 1: merge the two states");
        for j in 0..p_n {
            let n = j + 1;
            w.line(&format!("let mm{j} = max(zm{j}, m{n});"));
            w.line(&format!("let ca{j} = exp2(zm{j} - mm{j});"));
            w.line(&format!("let cb{j} = exp2(m{n} - mm{j});"));
            w.line(&format!(
                "zl{j} = select(zl{j}, zl{j} * ca{j} + l{n} * cb{j}, bot);"
            ));
            for i in 0..dv4 {
                w.line(&format!(
                    "zacc{j}[{i}] = select(zacc{j}[{i}], zacc{j}[{i}] * ca{j} + acc{n}[{i}] * cb{j}, bot);"
                ));
            }
            w.line(&format!("zm{j} = select(zm{j}, mm{j}, bot);"));
            write(
                w,
                "z",
                j,
                &format!("xz{j}"),
                &format!("ok0 & ({j} < count)"),
            );
        }
        w.close();
    }
}
