//! The `run` subcommand's sparse flags (FlexAttention in WGSL): a dense block mask from .npy,
//! `mask_mod`/`score_mod` snippets from .wgsl files, their aux buffers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wgpu_attention::sparse::attention::{Normalizer, SparseOptions};
use wgpu_attention::sparse::snippet::{Snippet, SnippetKind};
use wgpu_attention::sparse::{BlockLayout, BlockMask};
use wgpu_attention::{AttnShape, FlashOptions};

use super::{npy, Failure};

type Result<T> = std::result::Result<T, Failure>;

/// The sparse flags of `run`, as given.
pub struct SparseArgs<'a> {
    pub block_mask: Option<&'a Path>,
    pub block_size: Option<&'a str>,
    pub mask_mod: Option<&'a Path>,
    pub score_mod: Option<&'a Path>,
    pub aux: &'a [PathBuf],
    pub normalizer: Option<&'a str>,
}

impl SparseArgs<'_> {
    /// Whether any sparse flag is set (the call then goes the sparse path).
    pub fn any(&self) -> bool {
        self.block_mask.is_some()
            || self.block_size.is_some()
            || self.mask_mod.is_some()
            || self.score_mod.is_some()
            || !self.aux.is_empty()
            || self.normalizer.is_some()
    }
}

/// `softmax`, `sigmoid` or `sigmoid:BIAS`.
fn parse_normalizer(s: &str) -> Result<Normalizer> {
    let bad = || {
        Failure::Input(format!(
            "--normalizer: expected softmax, sigmoid or sigmoid:BIAS (a finite number), got {s:?}"
        ))
    };
    match s.trim().split_once(':') {
        None if s.trim() == "softmax" => Ok(Normalizer::Softmax),
        None if s.trim() == "sigmoid" => Ok(Normalizer::Sigmoid { bias: None }),
        Some(("sigmoid", b)) => match b.trim().parse::<f32>() {
            Ok(x) if x.is_finite() => Ok(Normalizer::Sigmoid { bias: Some(x) }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn parse_block_size(s: &str) -> Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let nums: Option<Vec<usize>> = parts.iter().map(|p| p.parse().ok()).collect();
    match nums.as_deref() {
        Some([b]) => Ok((*b, *b)),
        Some([q, k]) => Ok((*q, *k)),
        _ => Err(Failure::Input(format!(
            "--block-size: expected BQ,BK (multiples of 16 from 16 to 256), got {s:?}"
        ))),
    }
}

fn read_snippet(
    path: &Path,
    kind: SnippetKind,
    aux: &[wgpu_attention::sparse::snippet::Aux],
) -> Result<Snippet> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
    Snippet::new(kind, &src, aux).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

/// The sparse options of a call of shape `s`, its dense options in `flash`.
pub fn options(a: &SparseArgs, s: &AttnShape, flash: FlashOptions) -> Result<SparseOptions> {
    let aux = a
        .aux
        .iter()
        .map(|p| npy::read_aux(p))
        .collect::<Result<Vec<_>>>()?;
    let block_size = a.block_size.map(parse_block_size).transpose()?;
    let normalizer = a
        .normalizer
        .map(parse_normalizer)
        .transpose()?
        .unwrap_or_default();
    let mask_mod = a
        .mask_mod
        .map(|p| read_snippet(p, SnippetKind::MaskMod, &aux))
        .transpose()?;
    let score_mod = a
        .score_mod
        .map(|p| read_snippet(p, SnippetKind::ScoreMod, &aux))
        .transpose()?;
    let block_mask = match a.block_mask {
        Some(p) => {
            let (bq, bk) = block_size.unwrap_or((128, 128));
            let (shape, data) = npy::read_bools(p)?;
            let (nq, nk) = (s.lq.div_ceil(bq.max(1)), s.lk.div_ceil(bk.max(1)));
            let ok = shape.len() == 4
                && (shape[0] == 1 || shape[0] == s.batch)
                && (shape[1] == 1 || shape[1] == s.hq)
                && shape[2] == nq
                && shape[3] == nk;
            if !ok {
                return Err(Failure::Input(format!(
                    "{}: expected a bool or uint8 block mask [{}|1, {}|1, {nq}, {nk}] (blocks of {bq}x{bk}), got {shape:?}",
                    p.display(),
                    s.batch,
                    s.hq
                )));
            }
            let layout = BlockLayout {
                batch: shape[0],
                heads: shape[1],
                lq: s.lq,
                lk: s.lk,
                q_block: bq,
                kv_block: bk,
            };
            Some(Arc::new(BlockMask::from_dense(&data, layout)?))
        }
        None => None,
    };
    Ok(SparseOptions {
        flash,
        block_mask,
        mask_mod,
        score_mod,
        aux,
        block_size,
        normalizer,
    })
}
