//! The GPU context: an adapter's device and queue, what it offers, and the pipeline cache.
//!
//! Open one with [`GpuContext::new`] (default adapter) or wrap a device you already own with
//! [`GpuContext::from_device`]: every kernel then runs on your buffers, zero-copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{AttnError, Result};

/// What the device can do, as far as the kernels care.
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Smallest and largest subgroup size the adapter reports (0 when unknown).
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    /// A CPU adapter (lavapipe, SwiftShader, WARP): workgroup memory gains nothing there.
    pub cpu: bool,
    /// Mesa llvmpipe/lavapipe silently stops any loop after 65535 iterations per invocation
    /// (counted over all its runs): plans must stay under this where it is `Some`.
    pub loop_limit: Option<u64>,
}

/// A device, its queue, its limits and features, and the cache of built pipelines.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub caps: Capabilities,
    /// Built pipelines by kernel label.
    pub(crate) pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// wgpu's persistent pipeline cache, where the backend offers one (see [`GpuContext::cache_description`]).
    pub(crate) pipeline_cache: Option<wgpu::PipelineCache>,
    pub(crate) pipeline_cache_file: Option<std::path::PathBuf>,
    /// Stand-ins for optional bindings: one read-only, one read-write (a buffer may not be both
    /// in one dispatch).
    pub(crate) dummy: wgpu::Buffer,
    pub(crate) dummy_rw: wgpu::Buffer,
    /// Device errors nobody caught in an error scope (the browser build reports pipeline errors
    /// this way, asynchronously): [`GpuContext::finished`] returns the first.
    pub(crate) uncaptured: Arc<Mutex<Vec<String>>>,
    /// Tiles `wgpu-attention tune` measured on this adapter ([`crate::tune`]); plans read it.
    pub(crate) tuning: Mutex<Option<crate::tuning::Tuning>>,
    /// The tuning file of this adapter, and why it could not be used where it could not.
    pub tuning_file: Option<std::path::PathBuf>,
    pub tuning_problem: Option<String>,
}

/// Environment variable: a case-insensitive substring of the adapter name to pick
/// (`WGPU_BACKEND=vulkan` picks the backend, as in wgpu).
pub const ADAPTER_ENV: &str = "WGPU_ATTENTION_ADAPTER";

/// The backends the default context looks at: Vulkan, Metal, DX12 and the browser's WebGPU
/// (`WGPU_BACKEND` overrides). Not OpenGL: the kernels need compute shaders with storage
/// buffers that GL adapters rarely offer, and probing EGL on a headless machine prints errors
/// (`XDG_RUNTIME_DIR is invalid or not set`) for a backend that would not be used.
pub fn instance_backends() -> wgpu::Backends {
    wgpu::Backends::PRIMARY.with_env()
}

/// The folder of the persistent pipeline cache: `WGPU_ATTENTION_CACHE_DIR` (empty: none), else
/// `$XDG_CACHE_HOME/wgpu-attention`, else `$HOME/.cache/wgpu-attention`.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(v) = std::env::var_os("WGPU_ATTENTION_CACHE_DIR") {
        return (!v.is_empty()).then(|| v.into());
    }
    var("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| var("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .map(|d| d.join("wgpu-attention"))
}

/// A `wgpu` instance over [`instance_backends`].
pub fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = instance_backends();
    wgpu::Instance::new(desc)
}

impl GpuContext {
    /// Opens the default adapter (or the one named by `WGPU_ATTENTION_ADAPTER`), asking for
    /// SHADER_F16, SUBGROUP and TIMESTAMP_QUERY where offered and for the adapter's own limits.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Async form of [`GpuContext::new`] (the only one usable in a browser).
    pub async fn new_async() -> Result<Self> {
        let instance = instance();
        let wanted = std::env::var(ADAPTER_ENV).ok().filter(|s| !s.is_empty());
        let adapter = match wanted {
            Some(name) => {
                let all = instance.enumerate_adapters(instance_backends()).await;
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter()
                    .find(|a| {
                        a.get_info()
                            .name
                            .to_lowercase()
                            .contains(&name.to_lowercase())
                    })
                    .ok_or_else(|| {
                        AttnError::NoAdapter(format!(
                            "{ADAPTER_ENV}={name} matches none of {names:?}"
                        ))
                    })?
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    // we want the adapter's real limits, not a bucketed subset
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| {
                    AttnError::NoAdapter(format!(
                        "{e} (install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers`)"
                    ))
                })?,
        };
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::PIPELINE_CACHE;
        let features = adapter.features() & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-attention"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| AttnError::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        #[allow(unused_mut)]
        let mut ctx = Self::from_device(device, queue, info);
        #[cfg(not(target_arch = "wasm32"))]
        {
            ctx.open_pipeline_cache();
            ctx.load_tuning();
        }
        // Natively every pipeline is checked with an error scope when it is built; a browser
        // cannot wait for a scope there, so its errors are collected here instead of only going
        // to the console.
        #[cfg(target_arch = "wasm32")]
        {
            let log = ctx.uncaptured.clone();
            ctx.device
                .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                    if let Ok(mut l) = log.lock() {
                        l.push(e.to_string());
                    }
                }));
        }
        Ok(ctx)
    }

    /// Wraps a device the caller already owns. Features and limits are read from the device.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: wgpu::AdapterInfo,
    ) -> Self {
        let features = device.features();
        let limits = device.limits();
        let driver = format!("{} {}", adapter_info.driver, adapter_info.name).to_lowercase();
        let cpu = adapter_info.device_type == wgpu::DeviceType::Cpu;
        let caps = Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroup_min: adapter_info.subgroup_min_size,
            subgroup_max: adapter_info.subgroup_max_size,
            cpu,
            loop_limit: if driver.contains("llvmpipe") || driver.contains("lavapipe") {
                Some(65_535)
            } else {
                None
            },
        };
        let dummy_buffer = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let dummy = dummy_buffer("wgpu-attention unused read binding");
        let dummy_rw = dummy_buffer("wgpu-attention unused write binding");
        GpuContext {
            device,
            queue,
            adapter_info,
            limits,
            caps,
            pipelines: Mutex::new(HashMap::new()),
            pipeline_cache: None,
            pipeline_cache_file: None,
            dummy,
            dummy_rw,
            uncaptured: Arc::new(Mutex::new(Vec::new())),
            tuning: Mutex::new(None),
            tuning_file: None,
            tuning_problem: None,
        }
    }

    /// Opens wgpu's persistent pipeline cache where the device offers one (PIPELINE_CACHE:
    /// Vulkan drivers), in a file under [`cache_dir`] named for the adapter. Drivers with their
    /// own disk cache (Mesa's) gain nothing from it; where neither exists, a slower compile of
    /// a faster kernel is paid once per machine instead of once per process.
    #[cfg(not(target_arch = "wasm32"))]
    fn open_pipeline_cache(&mut self) {
        if !self
            .device
            .features()
            .contains(wgpu::Features::PIPELINE_CACHE)
        {
            return;
        }
        let (Some(dir), Some(key)) = (
            cache_dir(),
            wgpu::util::pipeline_cache_key(&self.adapter_info),
        ) else {
            return;
        };
        let file = dir.join(format!("{key}.bin"));
        let data = std::fs::read(&file).ok();
        // SAFETY: the data was written by `save_pipeline_cache` from `PipelineCache::get_data`
        // of an adapter with the same cache key (the file name); `fallback` makes wgpu start an
        // empty cache when the driver rejects it (another driver version, a damaged file).
        let cache = unsafe {
            self.device
                .create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                    label: Some("wgpu-attention pipeline cache"),
                    data: data.as_deref(),
                    fallback: true,
                })
        };
        self.pipeline_cache = Some(cache);
        self.pipeline_cache_file = Some(file);
    }

    /// Writes the pipeline cache back to its file (after a new pipeline). A cache is only an
    /// optimization: a folder that cannot be written leaves it in memory.
    pub(crate) fn save_pipeline_cache(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let (Some(cache), Some(file)) = (&self.pipeline_cache, &self.pipeline_cache_file) {
            if let (Some(data), Some(dir)) = (cache.get_data(), file.parent()) {
                let tmp = file.with_extension(format!("tmp{}", std::process::id()));
                let _ = std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(&tmp, data))
                    .and_then(|_| std::fs::rename(&tmp, file));
            }
        }
    }

    /// Reads this adapter's tuning file ([`crate::tuning::file_for`]) where there is one, so that
    /// plans use its tiles. [`GpuContext::new`] does this; a context from
    /// [`GpuContext::from_device`] starts untuned until it is called. A file that cannot be used
    /// is ignored and its reason kept in `tuning_problem` (`info` prints it).
    pub fn load_tuning(&mut self) {
        self.tuning_file = cache_dir().map(|d| crate::tuning::file_for(&d, &self.adapter_info));
        self.tuning_problem = None;
        let loaded = match &self.tuning_file {
            Some(f) => crate::tuning::load(f).unwrap_or_else(|e| {
                self.tuning_problem = Some(e);
                None
            }),
            None => None,
        };
        self.set_tuning(loaded);
    }

    /// Which persistent cache compiled pipelines go to, in words (`info` prints it).
    pub fn cache_description(&self) -> String {
        match &self.pipeline_cache_file {
            Some(f) => format!("wgpu PipelineCache at {} (delete it to clear)", f.display()),
            None if self.adapter_info.driver.to_lowercase().contains("mesa")
                || self
                    .adapter_info
                    .driver_info
                    .to_lowercase()
                    .contains("mesa") =>
            {
                "the driver's own: Mesa's disk shader cache (~/.cache/mesa_shader_cache; \
                 MESA_SHADER_CACHE_DISABLE=true turns it off)"
                    .into()
            }
            None => "none beyond the driver's (the device offers no PIPELINE_CACHE)".into(),
        }
    }

    /// One line naming the adapter and backend.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.adapter_info.name,
            self.adapter_info.backend,
            self.adapter_info.device_type,
            self.adapter_info.driver,
            self.adapter_info.driver_info
        )
    }

    /// Records work with `record` into a new encoder and submits it, inside error scopes
    /// (see [`GpuContext::scoped`]): a validation error anywhere becomes [`AttnError::Gpu`].
    pub fn submit<T>(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<T>,
    ) -> Result<T> {
        self.scoped(|| {
            let mut enc = self.device.create_command_encoder(&Default::default());
            let out = record(&mut enc)?;
            self.queue.submit([enc.finish()]);
            Ok(out)
        })
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes, so that a device
    /// error it causes comes back as [`AttnError::Gpu`] instead of reaching the device's
    /// uncaptured-error handler (wgpu's default one panics). In a browser a scope cannot be
    /// waited for: errors arrive asynchronously and [`GpuContext::finished`] reports them.
    pub fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let scopes = [
                wgpu::ErrorFilter::Validation,
                wgpu::ErrorFilter::OutOfMemory,
                wgpu::ErrorFilter::Internal,
            ]
            .map(|filter| self.device.push_error_scope(filter));
            let out = f();
            let mut first = None;
            // scopes pop innermost first
            for scope in scopes.into_iter().rev() {
                if let Some(e) = pollster::block_on(scope.pop()) {
                    first.get_or_insert(e.to_string());
                }
            }
            match (out, first) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(e)) => Err(AttnError::Gpu(e)),
                (Ok(v), None) => Ok(v),
            }
        }
        #[cfg(target_arch = "wasm32")]
        f()
    }

    /// Blocks until all submitted work is done (a no-op in a browser: await [`Self::finished`]).
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| AttnError::Gpu(e.to_string()))
    }

    /// Resolves once all work submitted so far has finished, natively (by polling) and in a
    /// browser (by the queue's callback, without blocking the page).
    pub async fn finished(&self) -> Result<()> {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.wait()?;
        rx.await
            .map_err(|_| AttnError::Gpu("the queue dropped its work-done callback".into()))?;
        self.device_errors()
    }

    /// The first device error that no error scope caught since the last call, if any.
    pub fn device_errors(&self) -> Result<()> {
        let mut log = self
            .uncaptured
            .lock()
            .map_err(|_| AttnError::Gpu("error log poisoned by an earlier panic".into()))?;
        let first = log.drain(..).next();
        match first {
            Some(first) => Err(AttnError::Gpu(first)),
            None => Ok(()),
        }
    }

    /// Fails with a typed error when `bytes` exceeds the storage binding or buffer size limits.
    pub(crate) fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if bytes > limit {
            return Err(AttnError::Limit {
                what: format!("{what} binding ({bytes} bytes)"),
                needed: bytes,
                limit,
            });
        }
        Ok(())
    }
}

impl GpuContext {
    /// The tuned tile of a class, where `tune` measured one on this adapter.
    pub fn tuned(&self, class: &crate::tuning::ShapeClass) -> Option<crate::tuning::Tile> {
        let t = self.tuning.lock().ok()?;
        t.as_ref()?.classes.get(&class.name()).map(|e| e.tile)
    }

    /// Replaces the tuning in use (what `tune` measured, or `None` to forget it); the file is
    /// the caller's to write.
    pub fn set_tuning(&self, t: Option<crate::tuning::Tuning>) {
        if let Ok(mut cur) = self.tuning.lock() {
            *cur = t;
        }
    }

    /// The tuning in use.
    pub fn tuning(&self) -> Option<crate::tuning::Tuning> {
        self.tuning.lock().ok().and_then(|t| t.clone())
    }
}
