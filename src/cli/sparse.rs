//! The `run` subcommand's sparse flags (FlexAttention in WGSL): a dense block mask from .npy,
//! `mask_mod`/`score_mod` snippets from .wgsl files, their aux buffers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wgpu_attention::sparse::attention::{Normalizer, SparseOptions};
use wgpu_attention::sparse::routing::{encode_route, route_blocks, TopK};
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
    pub topk: Option<usize>,
    pub local_blocks: usize,
    pub sink_blocks: usize,
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
            || self.topk.is_some()
            || self.local_blocks + self.sink_blocks > 0
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
    let topk = match a.topk {
        Some(k) => {
            let block = match block_size {
                None => 128,
                Some((q, kv)) if q == kv => q,
                Some((q, kv)) => {
                    return Err(Failure::Input(format!(
                        "--topk-blocks: routing needs one block size for queries and keys (--block-size N,N), got {q},{kv}"
                    )))
                }
            };
            Some(TopK {
                k,
                block,
                local: a.local_blocks,
                sinks: a.sink_blocks,
            })
        }
        None if a.local_blocks + a.sink_blocks > 0 => {
            return Err(Failure::Input(
                "--local-blocks and --sink-blocks go with --topk-blocks K".into(),
            ))
        }
        None => None,
    };
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
    Ok(SparseOptions::default()
        .flash(flash)
        .block_mask(block_mask)
        .mask_mod(mask_mod)
        .score_mod(score_mod)
        .aux(aux)
        .block_size(block_size)
        .normalizer(normalizer)
        .topk(topk))
}

/// `bench --sparse-sweep L`: block-sparse attention over random block masks at 5, 10, 25 and
/// 50% density (blocks of 128 x 128, one mask per head) against dense attention, causal
/// attention through the shipped causal `mask_mod` against the built-in flag, and attention
/// over content-routed top-k blocks (k = 8 of L / 128, routed once from the same q and k) at
/// B = 1, `heads` heads, D = 64, f32; all interleaved in one run. The routing itself is timed
/// apart, by the wall clock: on the host (GPU block means, their readback, the host's
/// selection) and on the device (pooling, selection and block table, no readback). Prints the
/// table and writes `sparse.json` under `out_dir`.
pub fn sweep(
    ctx: &wgpu_attention::GpuContext,
    l: usize,
    heads: usize,
    strategy: wgpu_attention::StrategyChoice,
    rounds: usize,
    out_dir: &Path,
) -> Result<()> {
    use wgpu_attention::bench;
    use wgpu_attention::sparse::snippet::{Aux, EXAMPLES};
    let block = 128;
    let mut dense = bench::registry(true)[0].clone();
    (dense.lq, dense.lk, dense.hq, dense.hkv) = (l, l, heads, heads);
    dense.name = format!("L{l}-H{heads}-D64");
    let mut causal = dense.clone();
    causal.causal = true;
    let layout = BlockLayout {
        batch: 1,
        heads,
        lq: l,
        lk: l,
        q_block: block,
        kv_block: block,
    };
    let (nq, nk) = layout.blocks();
    let masks = random_masks(layout, &[0.05, 0.10, 0.25, 0.50])?;
    let causal_mod = Snippet::new(
        SnippetKind::MaskMod,
        EXAMPLES[0].1,
        &[Aux::I32(vec![0])], // Lk - Lq: bottom-right aligned, as the built-in flag
    )?;
    let mut records = vec![bench::flash_pass(ctx, &dense, strategy)?];
    let base = SparseOptions::default().flash(FlashOptions::default().strategy(strategy));
    for (_, _, m) in &masks {
        let opts = base.clone().block_mask(Some(m.clone()));
        records.push(bench::sparse_pass(ctx, &dense, opts)?);
    }
    records.push(bench::flash_pass(ctx, &causal, strategy)?);
    let mut via_mod = dense.clone();
    via_mod.causal = false;
    records.push(bench::sparse_pass(
        ctx,
        &via_mod,
        base.clone()
            .mask_mod(Some(causal_mod))
            .aux(vec![Aux::I32(vec![0])])
            .block_size(Some((block, block))),
    )?);
    // top-k: k = 8 key blocks per query block, routed from the case's own q and k
    let topk = TopK {
        k: 8,
        block,
        local: 0,
        sinks: 0,
    };
    let [q, k, _, _] = bench::case_tensors(ctx, &dense.shape())?;
    let fo = FlashOptions::default();
    let wall = |f: &mut dyn FnMut() -> wgpu_attention::Result<()>| wall_ms(rounds, f);
    let route_ms = wall(&mut || route_blocks(ctx, &q, &k, &fo, &topk).map(|_| ()))?;
    // the same routing on the device (selection and block table, no readback), submitted and
    // waited for, for rows of 64 queries
    let device_ms = wall(&mut || {
        ctx.submit(|enc| encode_route(ctx, enc, &q, &k, &fo, &topk, 64).map(|_| ()))?;
        ctx.wait()
    })?;
    let routed = Arc::new(route_blocks(ctx, &q, &k, &fo, &topk)?.mask);
    let topk_share = routed.visited_blocks() as f64 / (heads * nq * nk) as f64;
    records.push(bench::sparse_pass(
        ctx,
        &dense,
        base.clone().block_mask(Some(routed)),
    )?);
    let t = bench::time_interleaved(ctx, bench::WARMUP, rounds, &mut records)?;
    let topk_run = TopkRun {
        k: topk.k,
        nk,
        share: topk_share,
        route_ms,
        device_ms,
    };
    let names = (dense.name.as_str(), block, rounds);
    report_sweep(ctx, names, &masks, &t, &topk_run, out_dir)
}

/// Random block masks at each density (one per head), with the share of blocks each visits.
fn random_masks(layout: BlockLayout, densities: &[f64]) -> Result<Vec<(f64, f64, Arc<BlockMask>)>> {
    let (nq, nk) = layout.blocks();
    let cells = layout.heads * nq * nk;
    let mut masks = Vec::new();
    for (i, &d) in densities.iter().enumerate() {
        let r = wgpu_attention::bench::pseudo_random(cells, 100 + i as u64);
        let on: Vec<bool> = r.iter().map(|x| (x + 1.0) * 0.5 < d as f32).collect();
        let m = BlockMask::from_dense(&on, layout)?;
        let share = m.visited_blocks() as f64 / cells as f64;
        masks.push((d, share, Arc::new(m)));
    }
    Ok(masks)
}

/// Wall-clock milliseconds of `f` over `rounds` after one warm-up (the pipelines), sorted.
fn wall_ms(rounds: usize, f: &mut dyn FnMut() -> wgpu_attention::Result<()>) -> Result<Vec<f64>> {
    f()?;
    let mut ms = Vec::new();
    for _ in 0..rounds.max(1) {
        let t0 = std::time::Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// The top-k part of the sweep: k of `nk` blocks, the share visited, the routing's wall times.
struct TopkRun {
    k: usize,
    nk: usize,
    share: f64,
    route_ms: Vec<f64>,
    device_ms: Vec<f64>,
}

/// Prints the sweep's table and writes `sparse.json`: `t` holds dense, the masks in order,
/// causal built-in, causal through `mask_mod`, top-k.
fn report_sweep(
    ctx: &wgpu_attention::GpuContext,
    (case, block, rounds): (&str, usize, usize),
    masks: &[(f64, f64, Arc<BlockMask>)],
    t: &[(String, wgpu_attention::bench::Timing)],
    topk: &TopkRun,
    out_dir: &Path,
) -> Result<()> {
    use wgpu_attention::bench;
    let dense_t = &t[0].1;
    let span = |x: &bench::Timing| format!("{:.1}-{:.1}", x.min_ms, x.max_ms);
    println!(
        "{} blocks of {block}x{block}, {rounds} interleaved rounds (medians; ratios are medians of per-round ratios)",
        case
    );
    println!(
        "{:<28} {:>8} {:>10} {:>14} {:>9} {:>9} {:>9}",
        "kernel", "density", "ms", "(min-max)", "speed-up", "ideal", "of ideal"
    );
    println!(
        "{:<28} {:>8} {:>10.1} {:>14} {:>9} {:>9} {:>9}",
        format!("dense {}", t[0].0),
        "1.000",
        dense_t.median_ms,
        span(dense_t),
        "1.00",
        "1.00",
        "-"
    );
    let mut rows = Vec::new();
    for ((d, share, _), (label, x)) in masks.iter().zip(&t[1..]) {
        let up = bench::median_paired(dense_t, x, |a, b| a / b);
        println!(
            "{:<28} {share:>8.3} {:>10.1} {:>14} {up:>9.2} {:>9.2} {:>8.0}%",
            format!("{label} {:.0}%", d * 100.0),
            x.median_ms,
            span(x),
            1.0 / share,
            100.0 * up * share
        );
        rows.push(serde_json::json!({
            "density": d, "visited": share, "kernel": label, "timing": x,
            "speedup": up, "ideal": 1.0 / share, "share_of_ideal": up * share,
        }));
    }
    let n = masks.len() + 1;
    let (builtin, via) = (&t[n].1, &t[n + 1].1);
    let ratio = bench::median_paired(via, builtin, |a, b| a / b);
    println!(
        "causal: built-in flag ({}) {:.1} ms ({}), mask_mod ({}) {:.1} ms ({}): mask_mod / built-in {ratio:.2}",
        t[n].0,
        builtin.median_ms,
        span(builtin),
        t[n + 1].0,
        via.median_ms,
        span(via)
    );
    let tk = &t[n + 2].1;
    let tk_up = bench::median_paired(dense_t, tk, |a, b| a / b);
    let route_med = topk.route_ms[topk.route_ms.len() / 2];
    println!(
        "top-k {} of {} blocks ({}): visited {:.3}, {:.1} ms ({}), {tk_up:.2}x dense (ideal {:.2}, {:.0}% of it); routing (wall clock: pooling, readback, host selection) {route_med:.1} ms ({:.1}-{:.1})",
        topk.k,
        topk.nk,
        t[n + 2].0,
        topk.share,
        tk.median_ms,
        span(tk),
        1.0 / topk.share,
        100.0 * tk_up * topk.share,
        topk.route_ms[0],
        topk.route_ms[topk.route_ms.len() - 1],
    );
    println!(
        "routing on the device (pooling, selection and block table, submitted and waited for; wall clock): {:.1} ms ({:.1}-{:.1})",
        topk.device_ms[topk.device_ms.len() / 2],
        topk.device_ms[0],
        topk.device_ms[topk.device_ms.len() - 1],
    );
    let io = |e: std::io::Error| Failure::Input(format!("{}: {e}", out_dir.display()));
    std::fs::create_dir_all(out_dir).map_err(io)?;
    let json = serde_json::json!({
        "adapter": ctx.describe(), "case": case, "block": block, "rounds": rounds,
        "dense": dense_t, "rows": rows,
        "causal": { "builtin": builtin, "mask_mod": via, "ratio": ratio },
        "topk": { "k": topk.k, "blocks": topk.nk, "visited": topk.share, "timing": tk,
                  "speedup": tk_up, "routing_wall_ms": topk.route_ms,
                  "device_routing_wall_ms": topk.device_ms },
    });
    std::fs::write(out_dir.join("sparse.json"), json.to_string()).map_err(io)?;
    println!("wrote {}/sparse.json", out_dir.display());
    Ok(())
}
