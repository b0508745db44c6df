//! The smallest use: open the default adapter, run causal GQA attention, read O back.
//! `cargo run --release --example basic`

use wgpu_attention::{flash_attention, FlashOptions, GpuContext, Result, Tensor};

fn main() -> Result<()> {
    let ctx = GpuContext::new()?;
    println!("{}", ctx.describe());
    let (b, l, hq, hkv, d) = (1, 300, 8, 2, 64);
    let data = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let q = Tensor::from_f32(&ctx, &data(b * l * hq * d, 0.37), &[b, l, hq, d])?;
    let k = Tensor::from_f32(&ctx, &data(b * l * hkv * d, 0.11), &[b, l, hkv, d])?;
    let v = Tensor::from_f32(&ctx, &data(b * l * hkv * d, 0.53), &[b, l, hkv, d])?;
    let opts = FlashOptions::default().causal(true).return_lse(true);
    let res = flash_attention(&ctx, &q, &k, &v, &opts)?;
    let o = res.out.to_vec_f32(&ctx)?;
    println!("O[0, 0, 0, ..4] = {:?}", &o[..4]);
    Ok(())
}
