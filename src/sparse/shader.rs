//! The sparse family's [`Geometry`]: query rows are rows of the sequence (as dense attention's),
//! keys the blocks of a block list. A workgroup (Tiled) or a subgroup (Subgroup) owns a *row
//! tile* of `tile_rows` queries; its key passes are the key blocks listed for that tile (the
//! union of the lists of the query blocks it covers: one list when the tile sits inside one
//! query block, which the plan arranges), each clipped to the causal/window range. Per block
//! each row reads its own state (skipped, partial, full) from a 2-bit table, so a union list
//! is never wrong, only slower. Scores go through dense attention's `modify()` with two hooks:
//! the user's `score_mod` after the built-in modifications, and the block state (and the
//! user's `mask_mod` on partial blocks) ANDed with the built-in masks.
//!
//! A geometry is a `'static` unit of the key; a snippet's geometry is made once per distinct
//! (mask_mod, score_mod, aux types) and kept for the life of the process ([`geometry`]), as
//! its pipeline is.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::pipeline::{BindingDecl, UniformLayout};
use crate::softmax::sequence::{modify_fn_with, seq_prologue, ModifyHooks, SEQ_WGSL};
use crate::softmax::shader::{FlashKey, Geo, Geometry, Strategy};
use crate::sparse::snippet::{Snippet, AUX_NAMES};
use crate::wgsl::Wgsl;

/// Block states in the kernel's table (2 bits each, 16 to a u32).
pub const SKIPPED: u32 = 0;
pub const PARTIAL: u32 = 1;
pub const FULL: u32 = 2;

/// The sparse family's uniform block, mirrored by `SparseParams` in WGSL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SparseParams {
    pub q_block: u32,
    pub kv_block: u32,
    /// Query and key blocks.
    pub nq: u32,
    pub nk: u32,
    /// Query rows per row tile (a power of two), and row tiles per (batch, head).
    pub tile_rows: u32,
    pub tiles: u32,
    /// Strides of the list headers over batch and head (0 broadcasts).
    pub list_b: u32,
    pub list_h: u32,
    /// Strides of the state table over batch and head, in blocks (0 broadcasts).
    pub state_b: u32,
    pub state_h: u32,
    /// Where the state table starts in `sp_tab`, in words.
    pub state_base: u32,
    /// Sigmoid attention's bias, in log2 units (`b * log2(e)`); unused by softmax kernels.
    pub sig_bias: f32,
}

const SPARSE_WGSL: &str = "struct SparseParams {
    q_block: u32, kv_block: u32, nq: u32, nk: u32,
    tile_rows: u32, tiles: u32, list_b: u32, list_h: u32,
    state_b: u32, state_h: u32, state_base: u32, sig_bias: f32,
}

// The state of key block kblk for query row i: 0 skipped, 1 partial, 2 full.
fn blk_state(b: u32, h: u32, i: u32, kblk: u32) -> u32 {
    let qi = min(i / sp.q_block, sp.nq - 1u);
    let e = b * sp.state_b + h * sp.state_h + qi * sp.nk + kblk;
    return (sp_tab[sp.state_base + (e >> 4u)] >> ((e & 15u) * 2u)) & 3u;
}
";

/// Block-sparse attention, with the user's snippets (if any) compiled in.
pub struct BlockSparse {
    suffix: &'static str,
    mask_mod: Option<Snippet>,
    score_mod: Option<Snippet>,
    aux: Vec<&'static str>,
    sigmoid: bool,
}

/// The geometry for these snippets and normalizer (made once per distinct content, then
/// shared).
pub fn geometry(
    mask_mod: Option<&Snippet>,
    score_mod: Option<&Snippet>,
    aux: &[&'static str],
    sigmoid: bool,
) -> Geo {
    let mut suffix = "_sparse".to_string();
    if let Some(m) = mask_mod {
        suffix += &format!("_m{}", m.hash());
    }
    if let Some(s) = score_mod {
        suffix += &format!("_s{}", s.hash());
    }
    if !aux.is_empty() {
        suffix += &format!("_a{}", aux.join(""));
    }
    if sigmoid {
        suffix += "_sigmoid";
    }
    static REGISTRY: OnceLock<Mutex<HashMap<String, &'static BlockSparse>>> = OnceLock::new();
    let reg = REGISTRY.get_or_init(Default::default);
    // a poisoned lock only means another thread panicked while inserting: the map is intact
    let mut map = reg.lock().unwrap_or_else(|e| e.into_inner());
    let geo = *map.entry(suffix.clone()).or_insert_with(|| {
        Box::leak(Box::new(BlockSparse {
            suffix: Box::leak(suffix.into_boxed_str()),
            mask_mod: mask_mod.cloned(),
            score_mod: score_mod.cloned(),
            aux: aux.to_vec(),
            sigmoid,
        }))
    });
    Geo(geo)
}

impl Geometry for BlockSparse {
    fn suffix(&self) -> &'static str {
        self.suffix
    }
    fn source_file(&self) -> &'static str {
        "src/sparse/shader.rs"
    }
    fn bindings(&self) -> Vec<BindingDecl> {
        let mut b = vec![
            BindingDecl::uniform("sp", "SparseParams"),
            BindingDecl::read(
                "sp_tab",
                "u32",
                "per row tile (start, count), its key blocks; at sp.state_base the [B|1, Hq|1, nQ, nK] block states (2 bits)",
            ),
        ];
        for (ty, name) in self.aux.iter().zip(AUX_NAMES) {
            b.push(BindingDecl::read(name, *ty, "the snippets' aux buffer"));
        }
        b
    }
    fn uniforms(&self) -> Vec<UniformLayout> {
        vec![
            crate::uniform_layout!(SparseParams, "SparseParams"; q_block, kv_block, nq, nk,
            tile_rows, tiles, list_b, list_h, state_b, state_h, state_base, sig_bias),
        ]
    }
    fn helpers(&self, w: &mut Wgsl, key: &FlashKey) {
        w.raw(SEQ_WGSL);
        w.raw(SPARSE_WGSL);
        for s in [&self.mask_mod, &self.score_mod].into_iter().flatten() {
            w.line(&format!("// the user's {}", s.kind.name()));
            w.raw(&s.source);
        }
        let score = match self.score_mod {
            Some(_) => "    s = score_mod(s, b, h, i, j);\n",
            None => "",
        };
        let mask = match self.mask_mod {
            // evaluated on every pair (branch-free), counted on partial blocks only
            Some(_) => " & ((st == 2u) | ((st == 1u) & mask_mod(b, h, i, j)))",
            None => " & (st != 0u)",
        };
        modify_fn_with(
            w,
            key.mods,
            &ModifyHooks {
                params: ", st: u32",
                score,
                mask,
            },
        );
    }
    /// Dense attention's prologue (rows, lengths, causal/window key bounds), then the row
    /// tile's list: Tiled workgroups own one tile each; a subgroup finds its tile from its
    /// first row and walks every block of its range if its rows straddle two tiles.
    fn prologue(&self, w: &mut Wgsl, key: &FlashKey) {
        seq_prologue(w, key);
        match key.strategy {
            Strategy::Tiled => {
                w.line("let tile = wid.x;");
                w.line("let straddles = false;");
            }
            Strategy::Subgroup | Strategy::Sweep => {
                w.line("let tile = u32(max(first, 0)) / sp.tile_rows;");
                w.line("let straddles = u32(max(last, first)) / sp.tile_rows != tile;");
            }
        }
        w.line("let list = b * sp.list_b + h * sp.list_h + min(tile, sp.tiles - 1u);");
        w.line("let list_start = sp_tab[2u * list];");
        w.line("let n_pass = select(sp_tab[2u * list + 1u], sp.nk, straddles);");
    }
    /// One pass per listed key block, clipped to the key range the causal and window bounds
    /// leave (sinks left of the window still count); the rows' block states.
    fn open_passes(&self, w: &mut Wgsl, key: &FlashKey) {
        w.open("for (var bi = 0u; bi < n_pass; bi++) {");
        w.line("let kblk = select(sp_tab[list_start + bi], bi, straddles);");
        w.line("let blo = kblk * sp.kv_block;");
        w.line("let pass_lo = select(max(blo, kv_lo), blo, blo < p.sinks);");
        w.line("let pass_hi = max(min(min(blo + sp.kv_block, kv_hi), p.kv_end), pass_lo);");
        w.line("range_lo = pass_lo;");
        w.line("range_hi = pass_hi;");
        for r in 0..key.rows {
            w.line(&format!("let bs{r} = blk_state(b, h, tok{r}, kblk);"));
        }
    }
    fn sigmoid_bias(&self) -> Option<&'static str> {
        self.sigmoid.then_some("sp.sig_bias")
    }
    fn lane_key(&self, w: &mut Wgsl) {
        w.line("let kj = key_row(kb + lane);");
    }
    /// Dense attention's causal/window bounds of the invocation's rows, and at least one of
    /// them seeing the block.
    fn tile_guard(&self, key: &FlashKey) -> Option<String> {
        (key.strategy == Strategy::Tiled).then(|| {
            let states = (0..key.rows)
                .map(|r| format!("bs{r}"))
                .collect::<Vec<_>>()
                .join(" | ");
            format!(
                "(i32(kb) < inv_hi) & ((i32(kb) + {} > inv_lo) | (kb < p.sinks)) & (({states}) != 0u)",
                key.block
            )
        })
    }
    fn group_keys(&self, _w: &mut Wgsl, _key: &FlashKey) {}
    fn score(&self, _key: &FlashKey, r: u32, u: u32) -> String {
        format!("modify(s{r}_{u}, b, h, tok{r}, kb + g + {u}u, qlen, kvlen, bs{r})")
    }
}
