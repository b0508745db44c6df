//! The tune driver: measures which tile ([`Tile`]) ran fastest on this adapter for a class of problems,
//! measured by `wgpu-attention tune` and kept in a JSON file per adapter under
//! [`crate::context::cache_dir`]. Plans read it through [`GpuContext::tuned`] and fall back to
//! their heuristics where a class has no entry. Deleting the file (or `tune --reset`) forgets it.

use std::collections::BTreeMap;

use crate::context::GpuContext;
use crate::tensor::DType;
use crate::tuning::Tile;
pub use crate::tuning::{file_for, load, Entry, ShapeClass, Tuning, LONG_FROM};

/// What `tune` measures: every class of these dtypes, head dims, mask (full, causal) and
/// length (short, long), at B = 1 with `heads` heads.
#[derive(Clone, Debug)]
pub struct TunePlan {
    /// The strategies to tune: the plan's own pick (`Auto`) and any forced one (a CPU adapter's
    /// Tiled kernel is what a browser on it runs).
    pub strategies: Vec<crate::flash::StrategyChoice>,
    pub dtypes: Vec<DType>,
    pub dims: Vec<usize>,
    /// The short and the long query length (Lq = Lk).
    pub lengths: [usize; 2],
    pub heads: usize,
    /// Interleaved rounds for the finalists (after one round of every candidate).
    pub rounds: usize,
    /// Finalists besides the untuned plan's tile.
    pub keep: usize,
}

impl TunePlan {
    /// The classes most models use: f32 (and f16 where the adapter has it), D = 64 and 128,
    /// L = 1024 and 4096 with 8 heads. CPU adapters (slow) take L = 2048 as their long length,
    /// and `quick` only f32 at D = 64 (a few minutes on lavapipe or SwiftShader).
    pub fn for_adapter(ctx: &GpuContext, quick: bool) -> TunePlan {
        let mut dtypes = vec![DType::F32];
        if ctx.caps.f16 && !quick {
            dtypes.push(DType::F16);
        }
        TunePlan {
            strategies: vec![crate::flash::StrategyChoice::Auto],
            dtypes,
            dims: if quick { vec![64] } else { vec![64, 128] },
            lengths: [1024, if ctx.caps.cpu { LONG_FROM } else { 4096 }],
            heads: 8,
            rounds: if quick { 3 } else { 5 },
            keep: 3,
        }
    }
}

/// Measures the tile candidates of every class of `plan` with GPU timestamps (one round of
/// all, then the `keep` fastest and the untuned plan's tile for `rounds` interleaved rounds),
/// and returns the winners, the medians with them. Reports progress through `log`. The
/// context's tuning is ignored while measuring (so "default" is the heuristic) and left as it
/// was.
pub fn tune(
    ctx: &GpuContext,
    plan: &TunePlan,
    mut log: impl FnMut(String),
) -> crate::Result<Tuning> {
    use crate::flash::{tile_choices, AttnShape, FlashOptions};
    let saved = ctx.tuning();
    ctx.set_tuning(None);
    let result = (|| {
        let mut out = Tuning {
            adapter: ctx.describe(),
            version: env!("CARGO_PKG_VERSION").into(),
            classes: BTreeMap::new(),
        };
        for &strategy in &plan.strategies {
            for &dtype in &plan.dtypes {
                for &d in &plan.dims {
                    for masked in [false, true] {
                        for &l in &plan.lengths {
                            let shape = AttnShape {
                                batch: 1,
                                lq: l,
                                lk: l,
                                hq: plan.heads,
                                hkv: plan.heads,
                                d,
                                dv: d,
                            };
                            let opts = FlashOptions {
                                causal: masked,
                                strategy,
                                ..Default::default()
                            };
                            let default = crate::flash::plan(ctx, &shape, dtype, &opts)?.key;
                            let class =
                                ShapeClass::new(default.strategy, dtype, default.d4 * 4, masked, l);
                            let tiles = tile_choices(ctx, &shape, dtype, &opts)?;
                            let entry = tune_class(
                                ctx,
                                plan,
                                (&shape, dtype, &opts),
                                &tiles,
                                default.tile(),
                                &mut log,
                            )?;
                            log(format!(
                                "{}: {} {:.2} ms, untuned {} {:.2} ms ({:.2}x)",
                                class.name(),
                                entry.tile,
                                entry.best_ms,
                                entry.default_tile,
                                entry.default_ms,
                                entry.default_ms / entry.best_ms
                            ));
                            out.classes.insert(class.name(), entry);
                        }
                    }
                }
            }
        }
        Ok(out)
    })();
    ctx.set_tuning(saved);
    result
}

/// One class: `problem` is the shape, dtype and options measured; `default` the untuned
/// plan's tile.
fn tune_class(
    ctx: &GpuContext,
    plan: &TunePlan,
    problem: (&crate::flash::AttnShape, DType, &crate::flash::FlashOptions),
    tiles: &[Tile],
    default: Tile,
    log: &mut impl FnMut(String),
) -> crate::Result<Entry> {
    use crate::timing::time_interleaved;
    let (shape, dtype, opts) = problem;
    let inputs = Inputs::new(ctx, shape, dtype)?;
    let pass = |t: Tile| inputs.pass(ctx, opts, t);
    // one round of every candidate (after its compile) picks the finalists
    let mut first: Vec<(Tile, f64)> = Vec::new();
    for &t in tiles {
        let mut r = [pass(t)];
        let timing = time_interleaved(ctx, 1, 1, &mut r)?;
        first.push((t, timing[0].1.median_ms));
    }
    first.sort_by(|a, b| a.1.total_cmp(&b.1));
    log(format!(
        "  {} candidates, first round: {}",
        tiles.len(),
        first
            .iter()
            .map(|(t, ms)| format!("{t} {ms:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut finalists: Vec<Tile> = first.iter().take(plan.keep).map(|x| x.0).collect();
    if !finalists.contains(&default) {
        finalists.push(default);
    }
    let mut records: Vec<_> = finalists.iter().map(|&t| pass(t)).collect();
    let timings = time_interleaved(ctx, 0, plan.rounds, &mut records)?;
    let medians: Vec<f64> = timings.iter().map(|t| t.1.median_ms).collect();
    let best = (0..finalists.len())
        .min_by(|&a, &b| medians[a].total_cmp(&medians[b]))
        .unwrap_or(0);
    let di = finalists.iter().position(|&t| t == default).unwrap_or(0);
    let key = crate::flash::plan(
        ctx,
        shape,
        dtype,
        &crate::flash::FlashOptions {
            tile: Some(finalists[best]),
            ..opts.clone()
        },
    )?
    .key;
    Ok(Entry {
        tile: finalists[best],
        kernel: key.label(),
        default_tile: default,
        default_ms: medians[di],
        best_ms: medians[best],
        shape: [
            shape.batch,
            shape.lq,
            shape.lk,
            shape.hq,
            shape.hkv,
            shape.d,
        ],
    })
}

/// Random inputs of one class on the device.
struct Inputs {
    q: crate::Tensor,
    k: crate::Tensor,
    v: crate::Tensor,
    out: crate::Tensor,
}

impl Inputs {
    fn new(ctx: &GpuContext, s: &crate::flash::AttnShape, dtype: DType) -> crate::Result<Self> {
        let dims = [s.batch, s.lq, s.hq, s.d];
        let make = |seed| {
            let x = crate::timing::pseudo_random(dims.iter().product(), seed);
            match dtype {
                DType::F16 => {
                    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
                    crate::Tensor::from_f16(ctx, &h, &dims)
                }
                // an integer dtype is refused by the attention call's checks
                _ => crate::Tensor::from_f32(ctx, &x, &dims),
            }
        };
        Ok(Inputs {
            q: make(1)?,
            k: make(2)?,
            v: make(3)?,
            out: crate::Tensor::filled(ctx, &dims, dtype, 0.0)?,
        })
    }

    fn pass<'a>(
        &'a self,
        ctx: &'a GpuContext,
        opts: &crate::flash::FlashOptions,
        tile: Tile,
    ) -> crate::timing::Record<'a> {
        let opts = crate::flash::FlashOptions {
            tile: Some(tile),
            ..opts.clone()
        };
        Box::new(move |enc, ts| {
            let (q, k, v, o) = (&self.q, &self.k, &self.v, &self.out);
            crate::encode_flash_attention(ctx, enc, q, k, v, o, None, &opts, ts)?;
            Ok(tile.to_string())
        })
    }
}
