//! The pipeline key (every text specialization of every kernel) and the one pipeline cache.

use std::sync::Arc;

use crate::baseline::BaselineKey;
use crate::context::GpuContext;
use crate::error::{AttnError, Result};
use crate::flash::shader::{flash_source, FlashKey, Strategy};
use crate::tensor::DType;

/// A hashable key naming one compiled kernel. Shapes are never part of it: they are uniforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PipelineKey {
    Flash(FlashKey),
    Baseline(BaselineKey),
}

/// One binding of a kernel's bind group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    Read,
    ReadWrite,
    Texture,
}

impl PipelineKey {
    /// The bind group layout, binding `i` at index `i`. Explicit (not derived from the shader)
    /// so that a specialization that leaves an optional binding unused binds the same way.
    pub fn bindings(&self) -> &'static [Binding] {
        use Binding::*;
        match self {
            PipelineKey::Flash(k) if k.strategy == Strategy::Sweep => &[
                Uniform, Read, Read, Read, ReadWrite, ReadWrite, Read, Read, Read, Texture,
                Texture, Texture,
            ],
            PipelineKey::Flash(_) => &[
                Uniform, Read, Read, Read, ReadWrite, ReadWrite, Read, Read, Read,
            ],
            PipelineKey::Baseline(BaselineKey::NaiveAttention { .. }) => {
                &[Uniform, Read, Read, Read, ReadWrite]
            }
            PipelineKey::Baseline(BaselineKey::Matmul) => &[Uniform, Read, Read, ReadWrite],
        }
    }

    pub fn label(&self) -> String {
        match self {
            PipelineKey::Flash(k) => k.label(),
            PipelineKey::Baseline(k) => k.label(),
        }
    }

    /// The generated WGSL.
    pub fn source(&self) -> String {
        match self {
            PipelineKey::Flash(k) => flash_source(k),
            PipelineKey::Baseline(k) => k.source(),
        }
    }

    /// The naga capabilities this specialization needs (and nothing more).
    pub fn capabilities(&self) -> naga::valid::Capabilities {
        use naga::valid::Capabilities as C;
        let (dtype, subgroup) = match self {
            PipelineKey::Flash(k) => (k.dtype, k.strategy != Strategy::Tiled),
            PipelineKey::Baseline(_) => (DType::F32, false),
        };
        let mut caps = C::empty();
        if dtype == DType::F16 {
            caps |= C::SHADER_FLOAT16;
        }
        if subgroup {
            caps |= C::SUBGROUP;
        }
        caps
    }

    /// Workgroup memory the kernel declares, in bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        match self {
            PipelineKey::Flash(k) => k.workgroup_bytes(),
            PipelineKey::Baseline(k) => k.workgroup_bytes(),
        }
    }
}

/// Every kernel the host can build, on any adapter: what `cargo test` validates with naga and
/// translates to SPIR-V, MSL and HLSL.
pub fn all_keys() -> Vec<PipelineKey> {
    let mut keys: Vec<PipelineKey> = crate::flash::all_flash_keys()
        .into_iter()
        .map(PipelineKey::Flash)
        .collect();
    for d in crate::flash::HEAD_DIM_BUCKETS {
        for dv in crate::flash::HEAD_DIM_BUCKETS {
            keys.push(PipelineKey::Baseline(BaselineKey::NaiveAttention {
                d4: d / 4,
                dv4: dv / 4,
            }));
        }
    }
    keys.push(PipelineKey::Baseline(BaselineKey::Matmul));
    keys
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

impl GpuContext {
    /// Returns the pipeline for `key`, building (and validating) it on first use.
    pub(crate) fn pipeline(&self, key: PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        let lock = || {
            self.pipelines
                .lock()
                .map_err(|_| AttnError::Gpu("pipeline cache poisoned by an earlier panic".into()))
        };
        if let Some(p) = lock()?.get(&key) {
            return Ok(p.clone());
        }
        // Built without holding the lock: driver compiles take seconds on CPU adapters and two
        // threads may build different kernels at once (a rare duplicate build is harmless).
        let wg_bytes = key.workgroup_bytes() as u64;
        let wg_limit = self.limits.max_compute_workgroup_storage_size as u64;
        if wg_bytes > wg_limit {
            // llvmpipe does not refuse an oversized declaration: check it here.
            return Err(AttnError::Limit {
                what: format!("workgroup memory of {}", key.label()),
                needed: wg_bytes,
                limit: wg_limit,
            });
        }
        let label = key.label();
        let source = key.source();
        validate_wgsl(&label, &source, key.capabilities())?;
        #[cfg(not(target_arch = "wasm32"))]
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = key
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Binding::Texture => wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    _ => wgpu::BindingType::Buffer {
                        ty: match b {
                            Binding::Uniform => wgpu::BufferBindingType::Uniform,
                            Binding::ReadWrite => {
                                wgpu::BufferBindingType::Storage { read_only: false }
                            }
                            _ => wgpu::BufferBindingType::Storage { read_only: true },
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
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
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(AttnError::Shader {
                name: label,
                message: err.to_string(),
            });
        }
        let pipeline = Arc::new(pipeline);
        Ok(lock()?.entry(key).or_insert(pipeline).clone())
    }
}
