//! Embedding: wrap a `wgpu::Device` and `Queue` you already own and run the kernel on your own
//! buffer, recording into your own command encoder (zero-copy).
//! `cargo run --release --example own_device`

use wgpu_attention::{encode_flash_attention, DType, FlashOptions, GpuContext, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default()))?;
    let ctx = GpuContext::from_device(device, queue, adapter.get_info());

    // "Your" buffer: Q, K and V packed one after another, [1, 16, 2, 32] each.
    let n = 16 * 2 * 32;
    let host: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.1).cos()).collect();
    let buffer = wgpu::util::DeviceExt::create_buffer_init(
        &ctx.device,
        &wgpu::util::BufferInitDescriptor {
            label: Some("my qkv"),
            contents: bytemuck::cast_slice(&host),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        },
    );
    let shape = vec![1, 16, 2, 32];
    let strides = vec![n, 64, 32, 1];
    let q = Tensor::from_buffer(buffer, shape.clone(), strides.clone(), 0, DType::F32)?;
    let k = q.with_layout(shape.clone(), strides.clone(), n)?;
    let v = q.with_layout(shape.clone(), strides, 2 * n)?;
    let out = Tensor::filled(&ctx, &shape, DType::F32, 0.0)?;

    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let plan = encode_flash_attention(
        &ctx,
        &mut encoder,
        &q,
        &k,
        &v,
        &out,
        None,
        &FlashOptions::default(),
        None,
    )?;
    ctx.queue.submit([encoder.finish()]);
    println!("ran {} on {}", plan.key.label(), ctx.describe());
    println!("O[..4] = {:?}", &out.to_vec_f32(&ctx)?[..4]);
    Ok(())
}
