//! The tuning file's data (core): the kernel strategies and query tiles a plan chooses between,
//! the classes of problems that share a tuned tile, and the per-adapter JSON file that
//! `wgpu-attention tune` ([`crate::tune`], a driver) writes and [`crate::context::GpuContext`]
//! reads. Data only: nothing here plans or measures.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;

/// How the kernel shares K/V between invocations.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// K/V tiles in workgroup memory (FlashAttention-2). No subgroup operations.
    Tiled,
    /// K/V rows in registers, handed round the subgroup with shuffles. Needs SUBGROUP.
    Subgroup,
    /// Neighborhood attention on CPU adapters: each lane owns one position of the inner axes
    /// and the subgroup sweeps the outer axis (x) one key plane at a time, keeping `rows` query
    /// slots (x's kernel size) live, so each loaded key plane serves every query whose window
    /// holds it. Q, K and V are read through textures (bindings 9 to 11, copied from the
    /// buffers in the same command encoder). Needs SUBGROUP.
    Sweep,
}

/// A query tile: invocations per workgroup, query rows per invocation and (Tiled) K/V stages in
/// workgroup memory. Each kernel key has a default from the budgets ([`crate::softmax::kernel_key`]); a family
/// may offer others ([`crate::softmax::tile_candidates`]) for its plan to choose from by problem size and for
/// `wgpu-attention tune` to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tile {
    pub wg: u32,
    pub rows: u32,
    /// K/V tiles in workgroup memory (Tiled: 1, or 2 to load the next while computing this
    /// one, `FlashKey::stages`); 1 for the other strategies.
    #[serde(default = "one_stage")]
    pub stages: u32,
}

fn one_stage() -> u32 {
    1
}

impl Tile {
    /// A one-stage tile.
    pub fn new(wg: u32, rows: u32) -> Self {
        Tile {
            wg,
            rows,
            stages: 1,
        }
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wg{}xr{}", self.wg, self.rows)?;
        if self.stages > 1 {
            write!(f, "s{}", self.stages)?;
        }
        Ok(())
    }
}

/// The `Display` form back: `wg64xr8`, or `wg64xr8s2` for two stages. Whether a plan offers
/// the tile is the plan's check (`FlashOptions::tile`).
impl std::str::FromStr for Tile {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("expected wgWxrR or wgWxrRs2 (e.g. wg64xr8), got '{s}'");
        let rest = s.strip_prefix("wg").ok_or_else(bad)?;
        let (wg, rest) = rest.split_once("xr").ok_or_else(bad)?;
        let (rows, stages) = rest.split_once('s').unwrap_or((rest, "1"));
        let num = |x: &str| x.parse::<u32>().ok().filter(|&v| v > 0).ok_or_else(bad);
        Ok(Tile {
            wg: num(wg)?,
            rows: num(rows)?,
            stages: num(stages)?,
        })
    }
}

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

/// The tuning file of an adapter: `tune-<name>-<hash>.json` in the cache folder `dir`
/// ([`crate::context::cache_dir`]), the hash over the adapter's name, backend, driver and ids
/// (a new driver is a new file).
pub fn file_for(dir: &std::path::Path, info: &wgpu::AdapterInfo) -> PathBuf {
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
    dir.join(format!("tune-{name}-{hash:016x}.json"))
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
