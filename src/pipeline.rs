//! The host layer's kernel interface and the one pipeline cache. It knows no family: a family
//! hands it a [`Kernel`] (a key that can say its label, WGSL, bindings, workgroup memory and
//! the naga capabilities it needs), and the cache builds, validates and keeps the pipeline.

use std::fmt;
use std::sync::Arc;

use crate::context::GpuContext;
use crate::error::{AttnError, Result};

/// What one binding of bind group 0 is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindingKind {
    /// `var<uniform>` of the named struct type.
    Uniform(&'static str),
    /// `var<storage, read>` array of the element type (`f32`, `vec4<f32>`, ...).
    Read(String),
    /// `var<storage, read_write>` array of the element type.
    ReadWrite(String),
    /// `texture_2d<f32>`, read with `textureLoad` (not filterable).
    Texture,
}

/// One binding, declared once: the host builds the bind group layout from it and the generator
/// emits the WGSL declaration from it ([`declare_bindings`]), so the two cannot drift apart.
/// Binding `i` of a kernel is the `i`-th of its list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingDecl {
    pub name: &'static str,
    pub kind: BindingKind,
    /// Shape or meaning, written after the declaration (`[B, Lq, Hq, D]`).
    pub comment: &'static str,
}

impl BindingDecl {
    pub fn uniform(name: &'static str, ty: &'static str) -> Self {
        BindingDecl {
            name,
            kind: BindingKind::Uniform(ty),
            comment: "",
        }
    }
    pub fn read(name: &'static str, elem: impl Into<String>, comment: &'static str) -> Self {
        BindingDecl {
            name,
            kind: BindingKind::Read(elem.into()),
            comment,
        }
    }
    pub fn read_write(name: &'static str, elem: impl Into<String>, comment: &'static str) -> Self {
        BindingDecl {
            name,
            kind: BindingKind::ReadWrite(elem.into()),
            comment,
        }
    }
    pub fn texture(name: &'static str, comment: &'static str) -> Self {
        BindingDecl {
            name,
            kind: BindingKind::Texture,
            comment,
        }
    }
}

/// The WGSL declarations of `bindings`, group 0, binding `i` for the `i`-th entry.
pub fn declare_bindings(bindings: &[BindingDecl]) -> String {
    let mut out = String::new();
    for (i, b) in bindings.iter().enumerate() {
        let decl = match &b.kind {
            BindingKind::Uniform(ty) => format!("var<uniform> {}: {ty};", b.name),
            BindingKind::Read(e) => format!("var<storage, read> {}: array<{e}>;", b.name),
            BindingKind::ReadWrite(e) => {
                format!("var<storage, read_write> {}: array<{e}>;", b.name)
            }
            BindingKind::Texture => format!("var {}: texture_2d<f32>;", b.name),
        };
        let line = format!("@group(0) @binding({i}) {decl}");
        if b.comment.is_empty() {
            out.push_str(&line);
        } else {
            out.push_str(&format!("{line:<72} // {}", b.comment));
        }
        out.push('\n');
    }
    out
}

/// The layout of a `#[repr(C)]` uniform struct in Rust: the WGSL struct it mirrors, its size
/// and each field's byte offset. `tests/naga.rs` checks it against naga's layout of the WGSL
/// struct, for every kernel. Build it with [`uniform_layout!`](crate::uniform_layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniformLayout {
    pub wgsl_struct: &'static str,
    pub size: usize,
    /// Field names (a leading `_` is ignored when matching) and byte offsets, in order.
    pub fields: Vec<(&'static str, usize)>,
}

/// `uniform_layout!(RustType, "WgslStruct"; field, field, ...)`: the [`UniformLayout`] of a
/// `#[repr(C)]` struct, offsets from `std::mem::offset_of!`.
#[macro_export]
macro_rules! uniform_layout {
    ($ty:ty, $wgsl:literal; $($field:ident),* $(,)?) => {
        $crate::pipeline::UniformLayout {
            wgsl_struct: $wgsl,
            size: ::std::mem::size_of::<$ty>(),
            fields: vec![$((stringify!($field), ::std::mem::offset_of!($ty, $field))),*],
        }
    };
}

/// A kernel specialization, as a family describes it to the host layer. The label names every
/// text specialization (it is the cache key); shapes are never part of it: they are uniforms.
pub trait Kernel: fmt::Debug + Send + Sync {
    /// Unique among all kernels of all families, e.g. `flash_tiled_f32_d64_dv64_r4_b32_u4_wg64`.
    fn label(&self) -> String;
    /// The generated WGSL, entry point `main`.
    fn source(&self) -> String;
    /// Bind group 0, in binding order.
    fn bindings(&self) -> Vec<BindingDecl>;
    /// Workgroup memory the kernel declares, in bytes (checked against the adapter's limit:
    /// llvmpipe does not refuse an oversized declaration).
    fn workgroup_bytes(&self) -> u32;
    /// The naga capabilities this specialization needs, and nothing more.
    fn capabilities(&self) -> naga::valid::Capabilities;
    /// The Rust side of the kernel's uniform structs, checked against the WGSL by a test.
    fn uniforms(&self) -> Vec<UniformLayout>;
}

/// Runs a one-off kernel and submits it: `params` bound as the uniform at binding 0, then
/// `resources` at bindings 1, 2, .. in the order the kernel declares them, one dispatch of
/// `grid` (the small helper kernels: block counts, snippet evaluation, pooling; their grids
/// come from [`dispatch_grid`]).
pub(crate) fn run_once(
    ctx: &GpuContext,
    key: &dyn Kernel,
    params: &[u8],
    resources: Vec<wgpu::BindingResource>,
    grid: [u32; 3],
) -> Result<()> {
    ctx.submit(|enc| encode_once(ctx, enc, key, params, resources, grid))
}

/// [`run_once`] recorded into `enc` (one compute pass), submitted by the caller.
pub(crate) fn encode_once(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    key: &dyn Kernel,
    params: &[u8],
    resources: Vec<wgpu::BindingResource>,
    grid: [u32; 3],
) -> Result<()> {
    use wgpu::util::DeviceExt;
    let pipeline = ctx.pipeline(key)?;
    let pbuf = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("kernel params"),
            contents: params,
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let entries: Vec<wgpu::BindGroupEntry> = (0u32..)
        .zip(std::iter::once(pbuf.as_entire_binding()).chain(resources))
        .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
        .collect();
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("one-off kernel"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("one-off kernel"),
        timestamp_writes: None,
    });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bg, &[]);
    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    Ok(())
}

/// A helper kernel's grid, each axis named for the error when it exceeds the adapter's
/// workgroups per dispatch dimension.
pub(crate) fn dispatch_grid(ctx: &GpuContext, grid: [(&str, usize); 3]) -> Result<[u32; 3]> {
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    let mut dims = [0u32; 3];
    for (d, (what, n)) in dims.iter_mut().zip(grid) {
        *d = u32::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| AttnError::Limit {
                what: format!("{what} (workgroups per dispatch dimension)"),
                needed: n as u64,
                limit: u64::from(max),
            })?;
    }
    Ok(dims)
}

/// A run of `items` invocations in workgroups of `wg`, folded into rows of at most the
/// adapter's workgroups per dispatch dimension: the grid and the workgroups per row (a kernel
/// indexes `gid.y * row * wg + gid.x`). `what` names the items for the error past `max^2`
/// workgroups.
pub(crate) fn folded_grid(
    ctx: &GpuContext,
    what: &str,
    items: usize,
    wg: u32,
) -> Result<([u32; 3], u32)> {
    let max = ctx.limits.max_compute_workgroups_per_dimension as usize;
    let groups = items.div_ceil(wg as usize).max(1);
    let row = groups.min(max);
    let rows = groups.div_ceil(row);
    if rows > max {
        return Err(AttnError::Limit {
            what: what.into(),
            needed: items as u64,
            limit: (max * max * wg as usize) as u64,
        });
    }
    Ok(([row as u32, rows as u32, 1], row as u32))
}

/// Parses and validates WGSL with naga; the error names the shader and the line.
pub fn validate_wgsl(
    name: &str,
    source: &str,
    caps: naga::valid::Capabilities,
) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| AttnError::Shader {
        name: name.to_string(),
        message: e.emit_to_string(source),
    })?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| AttnError::Shader {
            name: name.to_string(),
            message: e.emit_to_string(source),
        })?;
    Ok((module, info))
}

fn layout_entry(i: usize, b: &BindingDecl) -> wgpu::BindGroupLayoutEntry {
    let buffer = |ty| wgpu::BindingType::Buffer {
        ty,
        has_dynamic_offset: false,
        min_binding_size: None,
    };
    wgpu::BindGroupLayoutEntry {
        binding: i as u32,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: match b.kind {
            BindingKind::Texture => wgpu::BindingType::Texture {
                sample_type: wgpu::TextureSampleType::Float { filterable: false },
                view_dimension: wgpu::TextureViewDimension::D2,
                multisampled: false,
            },
            BindingKind::Uniform(_) => buffer(wgpu::BufferBindingType::Uniform),
            BindingKind::Read(_) => buffer(wgpu::BufferBindingType::Storage { read_only: true }),
            BindingKind::ReadWrite(_) => {
                buffer(wgpu::BufferBindingType::Storage { read_only: false })
            }
        },
        count: None,
    }
}

impl GpuContext {
    /// The kernel's workgroup memory and storage buffers are within the adapter's limits
    /// (lavapipe does not refuse workgroup memory over its limit: it would run wrong).
    fn check_kernel_limits(
        &self,
        kernel: &dyn Kernel,
        label: &str,
        bindings: &[BindingDecl],
    ) -> Result<()> {
        let storage = bindings
            .iter()
            .filter(|b| matches!(b.kind, BindingKind::Read(_) | BindingKind::ReadWrite(_)))
            .count() as u64;
        for (what, needed, limit) in [
            (
                "workgroup memory",
                u64::from(kernel.workgroup_bytes()),
                self.limits.max_compute_workgroup_storage_size,
            ),
            (
                "storage buffers",
                storage,
                self.limits.max_storage_buffers_per_shader_stage,
            ),
        ] {
            if needed > u64::from(limit) {
                return Err(AttnError::Limit {
                    what: format!("{what} of {label}"),
                    needed,
                    limit: u64::from(limit),
                });
            }
        }
        Ok(())
    }

    /// Returns the pipeline for `kernel`, building (and validating) it on first use.
    pub fn pipeline(&self, kernel: &dyn Kernel) -> Result<Arc<wgpu::ComputePipeline>> {
        let label = kernel.label();
        let lock = || {
            self.pipelines
                .lock()
                .map_err(|_| AttnError::Gpu("pipeline cache poisoned by an earlier panic".into()))
        };
        if let Some(p) = lock()?.get(&label) {
            return Ok(p.clone());
        }
        // Built without holding the lock: driver compiles take seconds on CPU adapters and two
        // threads may build different kernels at once (a rare duplicate build is harmless).
        let bindings = kernel.bindings();
        self.check_kernel_limits(kernel, &label, &bindings)?;
        let source = kernel.source();
        let source_len = source.len();
        validate_wgsl(&label, &source, kernel.capabilities())?;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| layout_entry(i, b))
            .collect();
        let started = compile_log().map(|path| (path, std::time::Instant::now()));
        let pipeline = self
            .scoped(|| {
                let module = self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(&label),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    });
                let bgl = self
                    .device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&label),
                        entries: &entries,
                    });
                let layout = self
                    .device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(&label),
                        bind_group_layouts: &[Some(&bgl)],
                        immediate_size: 0,
                    });
                Ok(self
                    .device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(&label),
                        layout: Some(&layout),
                        module: &module,
                        entry_point: Some("main"),
                        compilation_options: Default::default(),
                        cache: self.pipeline_cache.as_ref(),
                    }))
            })
            .map_err(|e| AttnError::Shader {
                name: label.clone(),
                message: e.to_string(),
            })?;
        if let Some((path, t0)) = started {
            log_compile(&path, &label, source_len, t0.elapsed());
        }
        self.save_pipeline_cache();
        let pipeline = Arc::new(pipeline);
        Ok(lock()?.entry(label).or_insert(pipeline).clone())
    }
}

/// `WGPU_ATTENTION_COMPILE_LOG=FILE` appends one line per pipeline built: the kernel's label,
/// the milliseconds wgpu and the driver took to create it, the WGSL length and the process's
/// arguments (under nextest, the test's name): which tests build which kernels. (Lavapipe
/// runs LLVM at a kernel's first dispatch, not here: its compile time is in the dispatch.)
fn log_compile(path: &std::path::Path, label: &str, source_len: usize, took: std::time::Duration) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let line = format!(
        "{label}\t{}\t{source_len}\t{}\n",
        took.as_millis(),
        args.join(" ")
    );
    use std::io::Write;
    // a diagnostic: a log that cannot be written must not fail the call
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Where `WGPU_ATTENTION_COMPILE_LOG` asks the compile log to go. Never on wasm32: the
/// browser has no environment, and `Instant` panics on wasm32-unknown-unknown.
fn compile_log() -> Option<std::path::PathBuf> {
    if cfg!(target_arch = "wasm32") {
        return None;
    }
    std::env::var_os("WGPU_ATTENTION_COMPILE_LOG")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
}
