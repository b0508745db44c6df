//! `wgpu-attention info`: adapters, backend, features, limits, the plans the kernels pick and
//! the tuning file.

use wgpu_attention::*;

use super::CliResult;

pub fn info() -> CliResult<()> {
    let instance = wgpu_attention::context::instance();
    let adapters = pollster::block_on(
        instance.enumerate_adapters(wgpu_attention::context::instance_backends()),
    );
    println!("adapters:");
    for a in &adapters {
        let i = a.get_info();
        println!(
            "  {} ({:?}, {:?}, {})",
            i.name, i.backend, i.device_type, i.driver
        );
    }
    let ctx = GpuContext::new()?;
    let c = &ctx.caps;
    println!("using: {}", ctx.describe());
    println!(
        "features: SHADER_F16 {}, SUBGROUP {} (sizes {}..={}), TIMESTAMP_QUERY {}",
        yes(c.f16),
        yes(c.subgroups),
        c.subgroup_min,
        c.subgroup_max,
        yes(c.timestamps)
    );
    let l = &ctx.limits;
    println!(
        "limits: workgroup memory {} B, invocations/workgroup {}, storage binding {} MiB, \
         buffer {} MiB, workgroups/dim {}",
        l.max_compute_workgroup_storage_size,
        l.max_compute_invocations_per_workgroup,
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20,
        l.max_compute_workgroups_per_dimension
    );
    println!("pipeline cache: {}", ctx.cache_description());
    print_tuning(&ctx);
    if let Some(n) = c.loop_limit {
        println!("driver quirk: loops stop after {n} iterations per invocation (plans stay under)");
    }
    print_flash_plans(&ctx);
    print_linear_plans(&ctx);
    Ok(())
}

pub fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The tuning file and its classes, or why there is none or it is not used.
fn print_tuning(ctx: &GpuContext) {
    match (&ctx.tuning_file, ctx.tuning(), &ctx.tuning_problem) {
        (None, _, _) => println!("tuning: none (no cache folder)"),
        (Some(f), _, Some(problem)) => println!("tuning: {} not used: {problem}", f.display()),
        (Some(f), None, None) => println!(
            "tuning: none yet (`wgpu-attention tune` writes {})",
            f.display()
        ),
        (Some(f), Some(t), None) => {
            println!(
                "tuning: {} ({} classes; delete it or `tune --reset`)",
                f.display(),
                t.classes.len()
            );
            for (class, e) in &t.classes {
                println!(
                    "  {class}: {} ({:.2}x the untuned {})",
                    e.tile,
                    e.default_ms / e.best_ms,
                    e.default_tile
                );
            }
        }
    }
}

/// The dense plans the kernels pick for a few head dims and dtypes.
fn print_flash_plans(ctx: &GpuContext) {
    println!("plans (B=1, H=8, L=2048):");
    for (d, dtype) in [
        (64, DType::F32),
        (128, DType::F32),
        (64, DType::F16),
        (512, DType::F32),
    ] {
        let s = AttnShape {
            batch: 1,
            lq: 2048,
            lk: 2048,
            hq: 8,
            hkv: 8,
            d,
            dv: d,
        };
        match flash::plan(ctx, &s, dtype, &FlashOptions::default()) {
            Ok(p) => println!("  D={d} {dtype}: {} grid {:?}", p.key.label(), p.grid),
            Err(e) => println!("  D={d} {dtype}: not available ({e})"),
        }
    }
}

/// The linear plans for a few lengths and rules.
fn print_linear_plans(ctx: &GpuContext) {
    println!("linear attention plans (B=1, H=HV=8, K=V=64, f32, mode auto):");
    for (t, rule) in [
        (1, Rule::SimpleGla),
        (4096, Rule::SimpleGla),
        (4096, Rule::Gla),
        (4096, Rule::GatedDelta),
    ] {
        let s = linear::LinearShape {
            batch: 1,
            t,
            h: 8,
            hv: 8,
            k: 64,
            v: 64,
        };
        // the plan checks the options' shapes only: gates and beta as placeholders
        let per_head = vec![1, t, 8];
        let g_shape = if rule == Rule::Gla {
            vec![1, t, 8, 64]
        } else {
            per_head.clone()
        };
        let plan = Tensor::filled(ctx, &g_shape, DType::F32, -0.1).and_then(|g| {
            let beta = rule
                .delta()
                .then(|| Tensor::filled(ctx, &per_head, DType::F32, 0.5))
                .transpose()?;
            let opts = LinearOptions::default().rule(rule).g(Some(g)).beta(beta);
            linear::plan(ctx, &s, DType::F32, &opts)
        });
        match plan {
            Ok(p) => println!("  T={t} {}: {}", rule.name(), p.label()),
            Err(e) => println!("  T={t} {}: not available ({e})", rule.name()),
        }
    }
}
