//! A small hand-written SVG bar chart of a bench sweep (GFLOP/s per case and kernel).

use wgpu_attention::bench::BenchRow;

/// Grouped bars: one group per case, one bar per kernel, GFLOP/s on a linear axis.
pub fn bar_chart(title: &str, rows: &[BenchRow]) -> String {
    let mut cases: Vec<&str> = Vec::new();
    let mut kernels: Vec<&str> = Vec::new();
    for r in rows {
        if !cases.contains(&r.case.name.as_str()) {
            cases.push(&r.case.name);
        }
        if !kernels.contains(&r.kernel.as_str()) {
            kernels.push(&r.kernel);
        }
    }
    let colors = [
        "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
    ];
    let max = rows.iter().map(|r| r.gflops).fold(1e-9, f64::max) * 1.1;
    let (left, top, plot_h, bar_w) = (70.0, 40.0, 300.0, 22.0);
    let group_w = bar_w * kernels.len() as f64 + 30.0;
    let width = left + group_w * cases.len() as f64 + 160.0;
    let height = top + plot_h + 90.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for t in 0..=4 {
        let v = max * t as f64 / 4.0;
        let y = top + plot_h - plot_h * t as f64 / 4.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            width - 150.0,
            left - 6.0,
            y + 4.0
        );
    }
    s += &format!(
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\">GFLOP/s</text>\n",
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    for (ci, case) in cases.iter().enumerate() {
        let x0 = left + 15.0 + group_w * ci as f64;
        for (ki, kernel) in kernels.iter().enumerate() {
            if let Some(r) = rows
                .iter()
                .find(|r| r.case.name == *case && r.kernel == *kernel)
            {
                let h = plot_h * r.gflops / max;
                s += &format!(
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{}\" height=\"{h:.1}\" fill=\"{}\">\
                     <title>{} {}: {:.2} GFLOP/s, {:.2} ms</title></rect>\n",
                    x0 + bar_w * ki as f64,
                    top + plot_h - h,
                    bar_w - 2.0,
                    colors[ki % colors.len()],
                    escape(case),
                    escape(kernel),
                    r.gflops,
                    r.gpu_ms
                );
            }
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" transform=\"rotate(30 {:.1} {:.1})\">{}</text>\n",
            x0,
            top + plot_h + 16.0,
            x0,
            top + plot_h + 16.0,
            escape(case)
        );
    }
    for (ki, kernel) in kernels.iter().enumerate() {
        let y = top + 16.0 * ki as f64;
        let x = width - 140.0;
        s += &format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>\n",
            colors[ki % colors.len()],
            x + 16.0,
            y + 10.0,
            escape(kernel)
        );
    }
    s += "</svg>\n";
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Local attention against dense: one bar per configuration, the measured speed-up as a
/// percentage of the ideal one (dense pairs / pairs seen), with the 70% target drawn.
pub fn efficiency_chart(title: &str, points: &[(String, f64)]) -> String {
    let (left, top, plot_h, bar_w, gap) = (60.0, 40.0, 260.0, 34.0, 26.0);
    // room for the rotated labels on the right, and for the title
    let width = (left + (bar_w + gap) * points.len() as f64 + 110.0)
        .max(left + 7.0 * title.chars().count() as f64);
    let height = top + plot_h + 110.0;
    let y_of = |pct: f64| top + plot_h - plot_h * pct.clamp(0.0, 120.0) / 120.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for pct in [0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0] {
        let y = y_of(pct);
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{pct:.0}%</text>\n",
            width - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    let y70 = y_of(70.0);
    s += &format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{y70:.1}\" y2=\"{y70:.1}\" stroke=\"#e15759\" \
         stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#e15759\">target 70%</text>\n",
        width - 20.0,
        width - 90.0,
        y70 - 4.0
    );
    for (i, (label, eff)) in points.iter().enumerate() {
        let x = left + gap / 2.0 + (bar_w + gap) * i as f64;
        let pct = 100.0 * eff;
        let y = y_of(pct);
        s += &format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w}\" height=\"{:.1}\" fill=\"#4e79a7\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{pct:.0}%</text>\
             <text transform=\"translate({:.1},{:.1}) rotate(35)\">{}</text>\n",
            top + plot_h - y,
            x + bar_w / 2.0,
            y - 4.0,
            x + 4.0,
            top + plot_h + 14.0,
            escape(label)
        );
    }
    s += "</svg>\n";
    s
}
