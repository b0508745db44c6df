//! The neighborhood module's unit tests (host-side: axes, specs, plans; the GPU suites are in tests/).

use super::*;

fn axis(n: usize, kernel: usize, dilation: usize, stride: usize, causal: bool) -> NaAxis {
    NaAxis {
        n,
        kernel,
        dilation,
        stride,
        causal,
    }
}

fn windows(a: NaAxis) -> Vec<(usize, usize)> {
    (0..a.n).map(|x| a.window(x)).collect()
}

#[test]
fn hand_worked_windows() {
    // n = 9, k = 3: shifted at both borders, centred elsewhere
    let w = windows(axis(9, 3, 1, 1, false));
    assert_eq!(w[0], (0, 3));
    assert_eq!(w[1], (0, 3));
    assert_eq!(w[4], (3, 6));
    assert_eq!(w[8], (6, 9));
    // even kernel 4: 2 left, 1 right of the query
    let w = windows(axis(9, 4, 1, 1, false));
    assert_eq!(w[4], (2, 6));
    assert_eq!(w[8], (5, 9));
    assert_eq!(w[0], (0, 4));
    // causal: the k keys ending at the query
    let w = windows(axis(9, 3, 1, 1, true));
    assert_eq!(w[0], (0, 1));
    assert_eq!(w[1], (0, 2));
    assert_eq!(w[4], (2, 5));
    // dilation 2 on n = 9: groups 0 2 4 6 8 (5 long) and 1 3 5 7 (4 long)
    let a = axis(9, 3, 2, 1, false);
    assert_eq!(a.window(4), (1, 4)); // group coords 1..4 = positions 2 4 6
    assert!(a.sees(4, 2) && a.sees(4, 6) && !a.sees(4, 3) && !a.sees(4, 8));
    assert_eq!(a.window(7), (1, 4)); // odd group, x/d = 3 at the right border: 3 5 7
    assert!(a.sees(7, 3) && a.sees(7, 5) && !a.sees(7, 1));
    // stride 3, k = 3: queries 3 4 5 share the window of leader 4
    let w = windows(axis(9, 3, 1, 3, false));
    assert_eq!((w[3], w[4], w[5]), ((3, 6), (3, 6), (3, 6)));
    assert_eq!(w[0], (0, 3));
    // causal stride 3: leader is the last of the group; end is the query itself
    let w = windows(axis(9, 3, 1, 3, true));
    assert_eq!((w[3], w[4], w[5]), ((3, 4), (3, 5), (3, 6)));
    // kernel = axis: everybody sees everything
    assert!(windows(axis(5, 5, 1, 1, false))
        .iter()
        .all(|&w| w == (0, 5)));
    // 1x1 kernel: itself only
    assert!(windows(axis(5, 1, 1, 1, false))
        .iter()
        .enumerate()
        .all(|(x, &w)| w == (x, x + 1)));
}

#[test]
fn non_causal_windows_always_hold_kernel_size_keys() {
    for n in 1..20 {
        for d in 1..=n {
            for k in 1..=n / d {
                for s in 1..=k {
                    let a = axis(n, k, d, s, false);
                    for x in 0..n {
                        let (st, e) = a.window(x);
                        assert_eq!(e - st, k, "{a:?} x={x}");
                        assert!(e <= a.group_len(x % d), "{a:?} x={x}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_parameters_are_typed_errors() {
    let bad = [
        (vec![7], vec![5], vec![1], vec![1]),  // kernel > axis
        (vec![3], vec![5], vec![2], vec![1]),  // kernel * dilation > axis
        (vec![3], vec![9], vec![1], vec![4]),  // stride > kernel
        (vec![0], vec![9], vec![1], vec![1]),  // zero kernel
        (vec![3], vec![9], vec![0], vec![1]),  // zero dilation
        (vec![3], vec![9], vec![1], vec![0]),  // zero stride
        (vec![3, 3], vec![9], vec![], vec![]), // two kernels, one axis
    ];
    for (k, n, d, s) in bad {
        let o = NeighborhoodOptions {
            kernel_size: k,
            dilation: d,
            stride: s,
            ..Default::default()
        };
        assert!(
            matches!(o.axes(&n), Err(AttnError::Invalid { .. })),
            "{o:?} on {n:?}"
        );
    }
}
