//! The kernel registry (a driver): every kernel the host can build, on any adapter, of every
//! family, for `tests/naga.rs` to validate with naga and translate to SPIR-V, MSL and HLSL.
//! A new family adds its list to [`all_kernels`]; nothing below the drivers lists families.

use std::collections::BTreeSet;

use crate::pipeline::Kernel;

/// Every specialization of every family (about 6700).
pub fn all_kernels() -> Vec<Box<dyn Kernel>> {
    let mut all: Vec<Box<dyn Kernel>> = Vec::new();
    all.extend(crate::flash::all_kernels());
    all.extend(crate::flash::backward::all_kernels());
    all.extend(crate::neighborhood::plan::all_kernels());
    all.extend(crate::linear::all_kernels());
    all.extend(crate::sparse::snippet::example_kernels());
    all.extend(crate::sparse::attention::all_kernels());
    all.extend(crate::sparse::routing::all_kernels());
    all.extend(crate::decode::all_kernels());
    all.extend(
        crate::softmax::merge::all_keys()
            .into_iter()
            .map(|k| Box::new(k) as Box<dyn Kernel>),
    );
    all.extend(crate::baseline::all_kernels());
    all
}

/// What a label says about a specialization: its kind (the label with every number taken
/// out, so `flash_Tiled_f32_d64_.._mods_na2` and `flash_Tiled_f16_d128_.._mods_na2` are one
/// kind, `.._s2` or `.._l8` another) and each of its `_`-separated parts within its family
/// (the label's first part), e.g. `(flash, d96)`, `(flash, Subgroup)`, `(linear, gdelta)`.
pub fn features(label: &str) -> Vec<String> {
    let family = label.split('_').next().unwrap_or("");
    let kind: String = label.chars().filter(|c| !c.is_ascii_digit()).collect();
    std::iter::once(format!("kind {kind}"))
        .chain(label.split('_').map(|part| format!("{family} {part}")))
        .collect()
}

/// A representative subset of `keys`: every kind of kernel of every family, and every value
/// of every specialization axis within a family (dtype, head-dim bucket, rows, key group,
/// workgroup size, lanes, stages, geometry, rule, feature map, ...), each at least once. Picked
/// greedily, each time the kernel that covers the most parts not covered yet (ties: the
/// earlier), so a few hundred kernels stand for all of them. What the default naga test checks;
/// `WGPU_ATTENTION_EXHAUSTIVE=1` checks all.
pub fn representatives(keys: Vec<Box<dyn Kernel>>) -> Vec<Box<dyn Kernel>> {
    let feats: Vec<Vec<String>> = keys.iter().map(|k| features(&k.label())).collect();
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    let mut chosen = vec![false; keys.len()];
    loop {
        let gain = |f: &Vec<String>| f.iter().filter(|x| !covered.contains(x.as_str())).count();
        let best = feats
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen[*i])
            .map(|(i, f)| (gain(f), i))
            .filter(|(g, _)| *g > 0)
            .min_by_key(|&(g, i)| (std::cmp::Reverse(g), i));
        let Some((_, i)) = best else { break };
        chosen[i] = true;
        covered.extend(feats[i].iter().map(String::as_str));
    }
    keys.into_iter()
        .zip(chosen)
        .filter_map(|(k, c)| c.then_some(k))
        .collect()
}
