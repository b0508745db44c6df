//! The wgpu-attention kernels in a web page: a thin wasm-bindgen layer over [`case`] (which is
//! plain Rust and also runs natively) and the fixed self-test list that `?selftest` runs.
//!
//! JS side (web/main.js): `const attn = await open(); JSON.parse(attn.adapter());
//! JSON.parse(await attn.run(JSON.stringify(config))); JSON.parse(await attn.selftest())`.

mod backward_case;
pub mod case;
pub mod config;
pub mod decode_case;
pub mod linear_case;
pub mod sparse_case;

use case::{Config, Variant};
use serde::Serialize;
use wgpu_attention::GpuContext;

/// The adapter and what the kernels can use on it, for the page's header.
#[derive(Serialize)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    /// `Cpu` for a fallback (software) adapter; plans size their tiles by it.
    pub device_type: String,
    pub vendor: String,
    pub driver: String,
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub max_workgroup_storage: u32,
    pub max_storage_binding: u64,
}

pub fn adapter_report(ctx: &GpuContext) -> AdapterReport {
    let i = &ctx.adapter_info;
    AdapterReport {
        name: i.name.clone(),
        backend: format!("{:?}", i.backend),
        device_type: format!("{:?}", i.device_type),
        vendor: format!("{:#x}", i.vendor),
        driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        f16: ctx.caps.f16,
        subgroups: ctx.caps.subgroups,
        timestamps: ctx.caps.timestamps,
        max_workgroup_storage: ctx.limits.max_compute_workgroup_storage_size,
        max_storage_binding: ctx.limits.max_storage_buffer_binding_size,
    }
}

/// The self-test: every variant in f32 on awkward shapes (L = 1 and 113, Lq != Lk, D = 40 and
/// 96, GQA, bottom-right causal, windows with sinks, a random block mask, 1D/2D/3D
/// neighborhoods with dilation, stride and causal axes).
pub fn selftest_cases() -> Vec<Config> {
    let mut cases = softmax_cases();
    cases.extend(neighborhood_cases());
    cases.extend(linear_cases());
    cases.extend([
        decode_case("decode paged f32, 3 steps, GQA 4/2", "f32", true),
        decode_case("decode paged q8_0, 3 steps, GQA 4/2", "q8_0", false),
    ]);
    cases
}

/// A dense, window or sparse case of one head dim.
fn seq(
    name: &str,
    variant: Variant,
    lq: usize,
    lk: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Config {
    Config {
        name: name.into(),
        variant,
        lq,
        lk,
        heads,
        kv_heads,
        d,
        repeats: 1,
        ..Default::default()
    }
}

/// The self-test's dense, window and sparse cases.
fn softmax_cases() -> Vec<Config> {
    vec![
        seq("dense L=113 D=40", Variant::Dense, 113, 113, 2, 2, 40),
        Config {
            causal: true,
            batch: 2,
            ..seq(
                "dense causal Lq=37 Lk=113 GQA 4/2 D=64",
                Variant::Dense,
                37,
                113,
                4,
                2,
                64,
            )
        },
        seq(
            "dense Lq=1 Lk=1000 MQA D=96",
            Variant::Dense,
            1,
            1000,
            4,
            1,
            96,
        ),
        Config {
            window: [16, 8],
            sinks: 4,
            ..seq(
                "window (16, 8) + 4 sinks L=200",
                Variant::Window,
                200,
                200,
                2,
                2,
                64,
            )
        },
        Config {
            causal: true,
            window: [31, -1],
            ..seq(
                "window causal left 31 Lq=150 Lk=300",
                Variant::Window,
                150,
                300,
                2,
                2,
                40,
            )
        },
        Config {
            causal: true,
            block: [16, 32],
            density: 0.5,
            ..seq(
                "sparse causal half the blocks of 16x32 Lq=113 Lk=200 GQA 4/2",
                Variant::Sparse,
                113,
                200,
                4,
                2,
                64,
            )
        },
        // the routing kernels (selection by tree reduction, block table) through Tint
        Config {
            causal: true,
            block: [32, 32],
            topk: 7,
            ..seq(
                "sparse top-k routed on the device (k = every block) causal Lq=150 Lk=200",
                Variant::Sparse,
                150,
                200,
                2,
                1,
                64,
            )
        },
    ]
}

/// A neighborhood case: 2 heads, D = 32.
fn na(name: &str, grid: &[usize], kernel: &[usize]) -> Config {
    Config {
        name: name.into(),
        variant: Variant::Neighborhood,
        heads: 2,
        kv_heads: 2,
        d: 32,
        grid: grid.to_vec(),
        kernel: kernel.to_vec(),
        repeats: 1,
        ..Default::default()
    }
}

/// The self-test's 1D/2D/3D neighborhood cases.
fn neighborhood_cases() -> Vec<Config> {
    vec![
        Config {
            dilation: vec![2],
            ..na("neighborhood 1D 97 kernel 7 dilation 2", &[97], &[7])
        },
        Config {
            dilation: vec![2, 1],
            grid_causal: vec![false, true],
            query: 60,
            ..na(
                "neighborhood 2D 13x11 kernel 5x3 dilation 2x1 causal y",
                &[13, 11],
                &[5, 3],
            )
        },
        Config {
            stride: vec![1, 2, 1],
            ..na(
                "neighborhood 3D 6x5x7 kernel 3 stride 1,2,1",
                &[6, 5, 7],
                &[3, 3, 3],
            )
        },
    ]
}

/// The self-test's linear cases: each rule and feature map, in chunks and recurrent.
fn linear_cases() -> Vec<Config> {
    vec![
        lin(
            "linear elu+1 normalized T=113 K=32",
            "linear",
            "elu1",
            113,
            2,
            2,
            32,
        ),
        lin(
            "gated DeltaNet T=200 H=2 HV=4 K=64",
            "gated-delta",
            "identity",
            200,
            2,
            4,
            64,
        ),
        lin("GLA T=65 K=16", "gla", "identity", 65, 1, 1, 16),
        Config {
            mode: "chunk".into(),
            ..lin(
                "retention chunks T=100 K=40 V=40",
                "retention",
                "identity",
                100,
                2,
                2,
                40,
            )
        },
        lin("Based (Taylor) T=64 K=16", "linear", "taylor", 64, 2, 2, 16),
        // Auto runs the gated DeltaNet case above recurrent on a CPU adapter (the page's
        // SwiftShader is a fallback adapter) and in chunks elsewhere, and Based in chunks from
        // T = 16: the other kernel of each rule named here
        Config {
            mode: "recurrent".into(),
            ..lin(
                "DeltaNet recurrent T=50 K=40",
                "delta",
                "identity",
                50,
                1,
                2,
                40,
            )
        },
        Config {
            mode: "recurrent".into(),
            ..lin("Based recurrent T=20 K=8", "linear", "taylor", 20, 1, 1, 8)
        },
        Config {
            mode: "chunk".into(),
            ..lin(
                "DeltaNet chunks T=70 K=96",
                "delta",
                "identity",
                70,
                1,
                1,
                96,
            )
        },
    ]
}

/// The decode self-test case: a paged cache (pages of 16), 40 tokens per sequence, three steps
/// of a token each, GQA 4/2.
fn decode_case(name: &str, kv_format: &str, causal: bool) -> Config {
    Config {
        name: name.into(),
        variant: Variant::Decode,
        batch: 2,
        heads: 4,
        kv_heads: 2,
        d: 64,
        lq: 3,
        lk: 40,
        causal,
        page_size: 16,
        kv_format: kv_format.into(),
        repeats: 1,
        ..Default::default()
    }
}

/// A linear-attention self-test case.
fn lin(name: &str, rule: &str, map: &str, t: usize, h: usize, hv: usize, d: usize) -> Config {
    Config {
        name: name.into(),
        variant: Variant::Linear,
        rule: rule.into(),
        feature_map: map.into(),
        lq: t,
        lk: t,
        heads: h,
        kv_heads: h,
        value_heads: hv,
        d,
        query: t / 2,
        repeats: 1,
        ..Default::default()
    }
}

/// The self-test's machine-readable result.
#[derive(Serialize)]
pub struct SelftestReport {
    pub adapter: AdapterReport,
    pub passed: bool,
    pub cases: Vec<SelftestCase>,
}

#[derive(Serialize)]
pub struct SelftestCase {
    pub name: String,
    pub passed: bool,
    pub kernel: String,
    pub max_abs: Option<f64>,
    pub tolerance_abs: Option<f64>,
    pub gpu_ms: Option<f64>,
    /// The error (a run that failed) or the check's first problem.
    pub problem: Option<String>,
}

/// The sparse family's GPU piece in the page: `create_block_mask` of the shipped causal WGSL
/// `mask_mod` (Tint compiles the snippet inside the block-count kernel) against the host
/// builder's block mask.
async fn sparse_block_mask_case(ctx: &GpuContext) -> SelftestCase {
    use wgpu_attention::sparse::snippet::{create_block_mask_async, Aux, Snippet, SnippetKind};
    use wgpu_attention::sparse::{masks, snippet::EXAMPLES, BlockLayout, BlockMask};
    let (lq, lk) = (113, 200);
    let layout = BlockLayout {
        batch: 1,
        heads: 1,
        lq,
        lk,
        q_block: 16,
        kv_block: 32,
    };
    let aux = [Aux::I32(vec![lk as i32 - lq as i32])];
    let run = async {
        let snippet = Snippet::new(SnippetKind::MaskMod, EXAMPLES[0].1, &aux)?;
        let gpu = create_block_mask_async(ctx, &snippet, &aux, layout).await?;
        let host = BlockMask::from_mask_mod(&masks::causal(lq, lk), layout)?;
        Ok::<_, wgpu_attention::AttnError>((gpu == host, snippet.hash()))
    };
    let (passed, kernel, problem) = match run.await {
        Ok((true, h)) => (true, format!("sparse_block_count_{h}"), None),
        Ok((false, h)) => (
            false,
            format!("sparse_block_count_{h}"),
            Some("the GPU's block mask differs from the host builder's".to_string()),
        ),
        Err(e) => (false, String::new(), Some(e.to_string())),
    };
    SelftestCase {
        name: "sparse: create_block_mask, WGSL causal mask_mod, 113 x 200 in 16 x 32".into(),
        passed,
        kernel,
        max_abs: None,
        tolerance_abs: None,
        gpu_ms: None,
        problem,
    }
}

/// Runs every self-test case; a case that errors counts as failed and the rest still run.
pub async fn selftest(ctx: &GpuContext) -> SelftestReport {
    let mut cases = vec![];
    for cfg in selftest_cases() {
        cases.push(match case::run_case(ctx, &cfg).await {
            Ok(r) => SelftestCase {
                name: cfg.name,
                passed: r.check.passed,
                kernel: r.kernel,
                max_abs: Some(r.check.max_abs),
                tolerance_abs: Some(r.check.tolerance_abs),
                gpu_ms: r.gpu_ms,
                problem: r.check.problem,
            },
            Err(e) => SelftestCase {
                name: cfg.name,
                passed: false,
                kernel: String::new(),
                max_abs: None,
                tolerance_abs: None,
                gpu_ms: None,
                problem: Some(e.to_string()),
            },
        });
    }
    cases.push(sparse_block_mask_case(ctx).await);
    cases.push(backward_case::backward_case(ctx).await);
    SelftestReport {
        adapter: adapter_report(ctx),
        passed: !cases.is_empty() && cases.iter().all(|c| c.passed),
        cases,
    }
}

#[cfg(target_arch = "wasm32")]
mod bindings {
    use std::rc::Rc;

    use wasm_bindgen::prelude::*;
    use wasm_bindgen_futures::future_to_promise;
    use wgpu_attention::GpuContext;

    fn js_err(e: impl std::fmt::Display) -> JsValue {
        JsValue::from_str(&e.to_string())
    }

    fn json(v: &impl serde::Serialize) -> Result<JsValue, JsValue> {
        serde_json::to_string(v).map(JsValue::from).map_err(js_err)
    }

    /// An open WebGPU device with the library's pipeline cache.
    #[wasm_bindgen]
    pub struct Attention {
        ctx: Rc<GpuContext>,
    }

    /// Opens the browser's WebGPU adapter; rejects with the reason where there is none.
    #[wasm_bindgen]
    pub async fn open() -> Result<Attention, JsValue> {
        let ctx = GpuContext::new_async().await.map_err(js_err)?;
        Ok(Attention { ctx: Rc::new(ctx) })
    }

    #[wasm_bindgen]
    impl Attention {
        /// The adapter and its features, as JSON.
        pub fn adapter(&self) -> Result<JsValue, JsValue> {
            json(&super::adapter_report(&self.ctx))
        }

        /// Runs one case (JSON [`crate::case::Config`]); resolves to the JSON report.
        pub fn run(&self, config: String) -> js_sys::Promise {
            let ctx = self.ctx.clone();
            future_to_promise(async move {
                let cfg: crate::case::Config = serde_json::from_str(&config).map_err(js_err)?;
                let report = crate::case::run_case(&ctx, &cfg).await.map_err(js_err)?;
                json(&report)
            })
        }

        /// Uploads one case (JSON [`crate::case::Config`]) for repeated runs; resolves to a
        /// [`PreparedCase`]. The peer benchmark uses it.
        pub fn prepare(&self, config: String) -> js_sys::Promise {
            let ctx = self.ctx.clone();
            future_to_promise(async move {
                let cfg: crate::case::Config = serde_json::from_str(&config).map_err(js_err)?;
                let prep = crate::case::Prepared::new(&ctx, &cfg).map_err(js_err)?;
                Ok(PreparedCase {
                    ctx,
                    prep: Rc::new(prep),
                }
                .into())
            })
        }

        /// A block mask from a WGSL `mask_mod` (JSON [`crate::sparse_case::MaskConfig`]);
        /// resolves to the JSON [`crate::sparse_case::MaskReport`], rejects with naga's error.
        pub fn block_mask(&self, config: String) -> js_sys::Promise {
            let ctx = self.ctx.clone();
            future_to_promise(async move {
                let cfg: crate::sparse_case::MaskConfig =
                    serde_json::from_str(&config).map_err(js_err)?;
                let r = crate::sparse_case::block_mask(&ctx, &cfg)
                    .await
                    .map_err(js_err)?;
                json(&r)
            })
        }

        /// Runs the self-test list; resolves to the JSON [`crate::SelftestReport`].
        pub fn selftest(&self) -> js_sys::Promise {
            let ctx = self.ctx.clone();
            future_to_promise(async move { json(&super::selftest(&ctx).await) })
        }
    }

    /// A case on the device ([`crate::case::Prepared`]), for timing it round by round.
    #[wasm_bindgen]
    pub struct PreparedCase {
        ctx: Rc<GpuContext>,
        prep: Rc<crate::case::Prepared>,
    }

    #[wasm_bindgen]
    impl PreparedCase {
        /// One call; resolves when the device has finished it (time it with the page's clock).
        pub fn submit(&self) -> js_sys::Promise {
            let (ctx, prep) = (self.ctx.clone(), self.prep.clone());
            future_to_promise(async move {
                prep.submit(&ctx).await.map_err(js_err)?;
                Ok(JsValue::UNDEFINED)
            })
        }

        /// GPU time of `repeats` calls after `warmup`; resolves to JSON `{kernel, timing}`.
        pub fn gpu_time(&self, warmup: usize, repeats: usize) -> js_sys::Promise {
            let (ctx, prep) = (self.ctx.clone(), self.prep.clone());
            future_to_promise(async move {
                let (kernel, timing) =
                    prep.gpu_time(&ctx, warmup, repeats).await.map_err(js_err)?;
                json(&serde_json::json!({ "kernel": kernel, "timing": timing }))
            })
        }

        /// Input `i` (0 = q, 1 = k, 2 = v) as a `[B, L, H, D]` Float32Array.
        pub fn input(&self, i: usize) -> Result<js_sys::Float32Array, JsValue> {
            let data = self
                .prep
                .inputs()
                .get(i)
                .copied()
                .ok_or_else(|| js_err(format!("input index must be 0, 1 or 2, got {i}")))?;
            Ok(js_sys::Float32Array::from(data))
        }

        /// The output, read back; resolves to a Float32Array.
        pub fn output(&self) -> js_sys::Promise {
            let (ctx, prep) = (self.ctx.clone(), self.prep.clone());
            future_to_promise(async move {
                let out = prep.output(&ctx).await.map_err(js_err)?;
                Ok(js_sys::Float32Array::from(&out[..]).into())
            })
        }
    }
}

#[cfg(test)]
mod tests;
