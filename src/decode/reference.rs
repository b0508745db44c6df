//! The decode family's f64 reference: the cache's pages gathered on the host into one
//! `[B, Lk, Hkv, D]` sequence per batch (dequantized with the kernels' formulas), then the
//! engine's dense reference with the same options.

use super::DecodeOptions;
use crate::error::{AttnError, Result};
use crate::softmax::reference::{attention_plain_f16, attention_reference, RefInputs, RefOutput};
use crate::softmax::{AttnShape, FlashOptions};

/// A cache on the host: its values (dequantized), its shape `[pages|B, page_size|Lk, Hkv, D]`.
pub struct HostCache<'a> {
    pub values: &'a [f32],
    pub shape: [usize; 4],
}

/// The host side of a decode call: q `[B, Lq, Hq, D]`, the caches, the block table
/// `[B, max_blocks]` where paged, the bias `[bb, bh, Lq, Lk]` where given.
pub struct DecodeInputs<'a> {
    pub q: &'a [f32],
    pub q_shape: [usize; 4],
    pub k: HostCache<'a>,
    pub v: HostCache<'a>,
    pub block_table: Option<(&'a [i32], usize)>,
    pub bias: Option<(&'a [f32], [usize; 2])>,
}

/// The dense options a decode call means.
pub fn flash_options(opts: &DecodeOptions) -> FlashOptions {
    FlashOptions::default()
        .causal(opts.causal)
        .scale(opts.scale)
        .softcap(opts.softcap)
        .alibi_slopes(opts.alibi_slopes.clone())
        .kv_lens(opts.cache_seqlens.clone())
        .window(opts.window)
        .sinks(opts.sinks)
        .return_lse(true)
}

/// Logical keys `[B, Lk, Hkv, D]` of a cache: page `block_table[b, j / P]` (clamped to the
/// pages there are, as the kernel does), row `j % P`; or the cache itself when not paged.
pub fn gather(c: &HostCache, batch: usize, table: Option<(&[i32], usize)>) -> Result<Vec<f32>> {
    let [n0, n1, h, d] = c.shape;
    let row = h * d;
    if c.values.len() != n0 * n1 * row {
        return Err(AttnError::shape(
            "host cache",
            format!("{} values for {:?}", n0 * n1 * row, c.shape),
            c.values.len(),
        ));
    }
    let Some((t, mb)) = table else {
        return Ok(c.values.to_vec());
    };
    if t.len() != batch * mb {
        return Err(AttnError::shape(
            "block_table",
            format!("{batch} x {mb} entries"),
            t.len(),
        ));
    }
    let lk = mb * n1;
    let mut out = Vec::with_capacity(batch * lk * row);
    for b in 0..batch {
        for j in 0..lk {
            let page = t[b * mb + j / n1].clamp(0, n0 as i32 - 1) as usize;
            let start = (page * n1 + j % n1) * row;
            out.extend_from_slice(&c.values[start..start + row]);
        }
    }
    Ok(out)
}

/// The reference output of a decode call: O `[B, Lq, Hq, Dv]`, LSE `[B, Hq, Lq]`; with
/// `plain_f16` the output of the same maths in f16 steps too (the error yardstick of f16 q).
pub fn decode_reference(
    inp: &DecodeInputs,
    opts: &DecodeOptions,
    plain_f16: bool,
) -> Result<(RefOutput, Option<Vec<f64>>)> {
    let [b, lq, hq, d] = inp.q_shape;
    let k = gather(&inp.k, b, inp.block_table)?;
    let v = gather(&inp.v, b, inp.block_table)?;
    let lk = match inp.block_table {
        Some((_, mb)) => mb * inp.k.shape[1],
        None => inp.k.shape[1],
    };
    let shape = AttnShape {
        batch: b,
        lq,
        lk,
        hq,
        hkv: inp.k.shape[2],
        d,
        dv: inp.v.shape[3],
    };
    let r = RefInputs {
        shape,
        q: inp.q,
        k: &k,
        v: &v,
        bias: inp.bias,
    };
    let fo = flash_options(opts);
    let out = attention_reference(&r, &fo)?;
    let plain = if plain_f16 {
        Some(attention_plain_f16(&r, &fo)?)
    } else {
        None
    };
    Ok((out, plain))
}
