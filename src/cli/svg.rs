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
