//! Tuned plans: which tile ([`Tile`]) ran fastest on this adapter for a class of problems,
//! measured by `wgpu-attention tune` and kept in a JSON file per adapter under
//! [`crate::context::cache_dir`]. Plans read it through [`GpuContext::tuned`] and fall back to
//! their heuristics where a class has no entry. Deleting the file (or `tune --reset`) forgets it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::context::GpuContext;
use crate::softmax::shader::Strategy;
use crate::softmax::Tile;
use crate::tensor::DType;

/// Query lengths from here on are "long" (a class of their own: more workgroups per head).
pub const LONG_FROM: usize = 2048;

/// A class of problems that share a tuned tile: the strategy, dtype and head-dim bucket of the
/// kernel, whether a causal or window mask bounds the keys, and short or long queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeClass {
    pub strategy: Strategy,
    pub dtype: DType,
    pub d_bucket: u32,
    pub masked: bool,
    pub long: bool,
}

impl ShapeClass {
    /// The class of a query length `lq`.
    pub fn new(strategy: Strategy, dtype: DType, d_bucket: u32, masked: bool, lq: usize) -> Self {
        ShapeClass {
            strategy,
            dtype,
            d_bucket,
            masked,
            long: lq >= LONG_FROM,
        }
    }

    /// The class as the file spells it, e.g. `tiled-f32-d64-causal-short`.
    pub fn name(&self) -> String {
        format!(
            "{:?}-{}-d{}-{}-{}",
            self.strategy,
            self.dtype,
            self.d_bucket,
            if self.masked { "causal" } else { "full" },
            if self.long { "long" } else { "short" }
        )
        .to_lowercase()
    }
}

/// One measured class: the winner, the default's and the winner's median GPU time, and the
/// shape it was measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub tile: Tile,
    pub kernel: String,
    pub default_tile: Tile,
    pub default_ms: f64,
    pub best_ms: f64,
    /// `[B, Lq, Lk, Hq, Hkv, D]`.
    pub shape: [usize; 6],
}

/// The tuning file's contents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    /// The adapter it was measured on, in words.
    pub adapter: String,
    /// The crate version that measured it (kernels change between versions).
    pub version: String,
    pub classes: BTreeMap<String, Entry>,
}

/// The tuning file of an adapter: `tune-<name>-<hash>.json` under the cache folder, the hash
/// over the adapter's name, backend, driver and ids (a new driver is a new file).
pub fn file_for(info: &wgpu::AdapterInfo) -> Option<PathBuf> {
    let id = format!(
        "{}|{:?}|{}|{}|{}|{}",
        info.name, info.backend, info.driver, info.driver_info, info.vendor, info.device
    );
    // FNV-1a: stable across Rust versions, unlike DefaultHasher
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let name: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    crate::context::cache_dir().map(|d| d.join(format!("tune-{name}-{hash:016x}.json")))
}

/// Reads a tuning file: `Ok(None)` where there is none, an error string where it cannot be used
/// (unreadable, not this format, another crate version).
pub fn load(path: &std::path::Path) -> std::result::Result<Option<Tuning>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let t: Tuning = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if t.version != env!("CARGO_PKG_VERSION") {
        return Err(format!(
            "{}: measured by version {}, this is {} (run `wgpu-attention tune` again)",
            path.display(),
            t.version,
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(Some(t))
}

impl GpuContext {
    /// The tuned tile of a class, where `tune` measured one on this adapter.
    pub fn tuned(&self, class: &ShapeClass) -> Option<Tile> {
        let t = self.tuning.lock().ok()?;
        t.as_ref()?.classes.get(&class.name()).map(|e| e.tile)
    }

    /// Replaces the tuning in use (what `tune` measured, or `None` to forget it); the file is
    /// the caller's to write.
    pub fn set_tuning(&self, t: Option<Tuning>) {
        if let Ok(mut cur) = self.tuning.lock() {
            *cur = t;
        }
    }

    /// The tuning in use.
    pub fn tuning(&self) -> Option<Tuning> {
        self.tuning.lock().ok().and_then(|t| t.clone())
    }
}

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
    use crate::bench::time_interleaved;
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
            let x = crate::bench::pseudo_random(dims.iter().product(), seed);
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
    ) -> crate::bench::Record<'a> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_other_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("wgpu-attention-tune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.json");
        assert_eq!(load(&f), Ok(None));
        let mut t = Tuning {
            adapter: "x".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            classes: BTreeMap::new(),
        };
        let class = ShapeClass::new(Strategy::Tiled, DType::F16, 64, true, 4096);
        assert_eq!(class.name(), "tiled-f16-d64-causal-long");
        t.classes.insert(
            class.name(),
            Entry {
                tile: Tile::new(32, 2),
                kernel: "k".into(),
                default_tile: Tile::new(64, 4),
                default_ms: 2.0,
                best_ms: 1.5,
                shape: [1, 4096, 4096, 8, 8, 64],
            },
        );
        std::fs::write(&f, serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(load(&f), Ok(Some(t.clone())));
        t.version = "0.0.0-old".into();
        std::fs::write(&f, serde_json::to_string(&t).unwrap()).unwrap();
        assert!(load(&f).unwrap_err().contains("0.0.0-old"));
        std::fs::write(&f, "{not json").unwrap();
        assert!(load(&f).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
