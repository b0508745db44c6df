mod common;
use common::*;
use wgpu_attention::*;

#[test]
fn smoke_both_strategies() {
    for s in [Strategy::Tiled, Strategy::Subgroup] {
        let c = Case::new(1, 113, 203, 4, 2, 40, 40)
            .strategy(s)
            .with(|o| o.causal = true);
        let e = run(&c);
        eprintln!("{s:?}: {e:?}");
        check(&c);
    }
}
