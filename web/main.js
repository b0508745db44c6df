// The page: plain JS over the wasm module that web/build.sh writes to web/pkg.
import init, { open } from "./pkg/wgpu_attention_web.js";

const $ = (id) => document.getElementById(id);
const selftest = new URLSearchParams(location.search).has("selftest");

function show(el, html) { el.innerHTML = html; el.hidden = false; }
function esc(s) { return String(s).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c]); }
function badge(on, name) { return `<span class="badge ${on ? "on" : "off"}">${name}</span>`; }
function list(s) { return s.trim() === "" ? [] : s.split(",").map((x) => Number(x.trim())); }

function fail(where, e) {
  const msg = `${where}: ${e && e.message ? e.message : e}`;
  if (selftest) {
    $("selftest-box").hidden = false;
    $("selftest-summary").innerHTML = `<span class="fail">FAIL</span> ${esc(msg)}`;
    $("selftest").textContent = JSON.stringify({ passed: false, error: msg });
    $("selftest").dataset.state = "done";
  }
  return msg;
}

async function main() {
  if (!("gpu" in navigator)) {
    const msg = "This browser has no WebGPU (navigator.gpu is missing), so the kernels cannot run here. " +
      "Use a browser with WebGPU enabled (Chrome/Edge 113+, Safari 26+, Firefox 141+ on Windows), over https or localhost.";
    show($("nowebgpu"), esc(msg));
    $("adapter").hidden = true;
    fail("WebGPU", msg);
    return;
  }
  await init();
  let attn;
  try {
    attn = await open();
  } catch (e) {
    const msg = fail("no WebGPU adapter", e);
    show($("nowebgpu"), esc(msg));
    $("adapter").hidden = true;
    return;
  }
  const a = JSON.parse(attn.adapter());
  $("adapter").innerHTML =
    `<b>Adapter:</b> ${esc(a.name || "(name hidden by the browser)")} &middot; ${esc(a.backend)} ` +
    `&middot; vendor ${esc(a.vendor)} ${esc(a.driver)}<br>` +
    `${badge(a.f16, "shader-f16")}${badge(a.subgroups, "subgroups")}${badge(a.timestamps, "timestamp-query")}` +
    ` workgroup memory ${a.max_workgroup_storage} B, storage binding ${(a.max_storage_binding / 2 ** 20).toFixed(0)} MiB`;
  $("f16opt").disabled = !a.f16;
  if (selftest) return runSelftest(attn);
  $("interactive").hidden = false;
  const form = $("form");
  const sync = () => {
    const v = form.variant.value;
    for (const el of form.querySelectorAll("[data-for]")) {
      const f = el.dataset.for;
      el.hidden = !(f === "seq" ? v !== "neighborhood" : f === "window" ? v === "window" :
        f === "linear" ? v === "linear" : f === "sparse" ? v === "sparse" :
        f === "decode" ? v === "decode" : v === "neighborhood");
    }
  };
  form.variant.addEventListener("change", sync);
  sync();
  $("run").addEventListener("click", () => runOnce(attn, form));
  $("mask-run").addEventListener("click", () => blockMask(attn));
}

// The sparse panel: the page's WGSL mask_mod as a block mask, or naga's error.
async function blockMask(attn) {
  const status = $("mask-status");
  status.dataset.state = "running";
  status.textContent = "Evaluating the mask_mod on the GPU...";
  const n = (id) => Number($(id).value);
  const cfg = {
    source: $("mask-src").value, lq: n("mask-lq"), lk: n("mask-lk"),
    q_block: n("mask-bq"), kv_block: n("mask-bk"), aux0: list($("mask-aux").value),
  };
  try {
    const r = JSON.parse(await attn.block_mask(JSON.stringify(cfg)));
    const full = r.full.reduce((a, x) => a + x.length, 0);
    drawBlocks(r);
    status.dataset.state = "done";
    status.textContent = `${r.nq} x ${r.nk} blocks: ${full} full, ${r.visited - full} partial, ` +
      `${r.nq * r.nk - r.visited} skipped (kernel ${r.kernel}).`;
  } catch (e) {
    status.dataset.state = "error";
    status.innerHTML = `<span class="fail">Refused:</span> <pre>${esc(e && e.message ? e.message : e)}</pre>`;
  }
}

function drawBlocks(r) {
  const cv = $("mask-map");
  const g = cv.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, cv.width, cv.height);
  const cw = cv.width / r.nk, ch = cv.height / r.nq;
  for (let i = 0; i < r.nq; i++) {
    for (const [blocks, color] of [[r.full[i], "#1f4e8c"], [r.partial[i], "#9cc3f0"]]) {
      g.fillStyle = color;
      for (const j of blocks) g.fillRect(j * cw, i * ch, Math.max(cw, 1), Math.max(ch, 1));
    }
  }
}

function config(form) {
  const n = (name) => Number(form[name].value);
  return {
    variant: form.variant.value, dtype: form.dtype.value,
    batch: n("batch"), heads: n("heads"), kv_heads: n("kv_heads"), d: n("d"),
    lq: n("lq"), lk: n("lk"), causal: form.causal.checked,
    window: [n("left"), n("right")], sinks: n("sinks"),
    grid: list(form.grid.value), kernel: list(form.kernel.value), dilation: list(form.dilation.value),
    stride: list(form.stride.value), grid_causal: list(form.grid_causal.value).map((x) => x !== 0),
    rule: form.rule.value, feature_map: form.feature_map.value, value_heads: n("value_heads"),
    mode: form.mode.value, block: list(form.block.value), density: n("density"),
    kv_format: form.kv_format.value, page_size: n("page_size"),
    query: n("query"), repeats: n("repeats"), seed: Math.floor(Math.random() * 1e9),
  };
}

async function runOnce(attn, form) {
  const status = $("status");
  status.dataset.state = "running";
  status.textContent = "Running (the first run of a kernel compiles it)...";
  $("run").disabled = true;
  try {
    const r = JSON.parse(await attn.run(JSON.stringify(config(form))));
    drawReport(r);
    status.dataset.state = "done";
    status.textContent = "Done.";
  } catch (e) {
    status.dataset.state = "error";
    status.innerHTML = `<span class="fail">Error:</span> ${esc(e && e.message ? e.message : e)}`;
  } finally {
    $("run").disabled = false;
  }
}

function drawReport(r) {
  const c = r.check;
  const [b, lq, lk, hq, hkv, d] = r.shape;
  const time = r.gpu_ms == null ? "n/a (no timestamp-query)" :
    `${r.gpu_ms.toFixed(3)} ms (median of ${r.samples_ms.length}, GPU timestamps)`;
  const rows = [
    ["kernel", esc(r.kernel)],
    ["shape", `B=${b} Lq=${lq} Lk=${lk} Hq=${hq} Hkv=${hkv} D=${d} ${r.dtype}`],
    ["GPU time", time],
    ["GFLOP/s", r.gflops == null ? "n/a" : r.gflops.toFixed(2)],
    ["visible pairs", `${r.visible_pairs} of ${lq * lk} per head (${(100 * r.visible_pairs / (lq * lk)).toFixed(1)}%)`],
    ["max |error| vs f64", `${c.max_abs.toExponential(2)} (tolerance ${c.tolerance_abs.toExponential(2)}, ` +
      `${c.max_rel.toExponential(2)} of max|ref|; LSE rel ${c.lse_max_rel.toExponential(2)})`],
    ["check", c.passed ? '<span class="pass">PASS</span>' : `<span class="fail">FAIL</span> ${esc(c.problem || "")}`],
  ];
  $("numbers").innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("");
  $("result").hidden = false;
  const p = r.pattern;
  heat($("pattern"), p.cells.map((x) => x / 255), p.rows, p.cols, false);
  $("pattern-cap").textContent = `Which keys each query sees: ${lq} queries (rows) x ${lk} keys (columns)` +
    (p.rows < lq || p.cols < lk ? `, pooled to ${p.rows} x ${p.cols} cells (shade = share visible).` : ".");
  const w = r.weights;
  const g = w.grid;
  const max = Math.max(...w.values);
  const vals = w.values.map((x) => x / (max || 1));
  let cap = `Attention weights of query ${w.query} (batch 0, head 0), brightest = ${max.toPrecision(3)}`;
  if (g.length === 2) {
    heat($("weights"), vals, g[0], g[1], true, w.query);
    cap += `, on the ${g[0]} x ${g[1]} grid (the query is outlined).`;
  } else if (g.length === 3) {
    // the X slices side by side: each a Y x Z image
    const [X, Y, Z] = g, out = new Array(Y * X * Z).fill(0);
    for (let x = 0; x < X; x++) for (let y = 0; y < Y; y++) for (let z = 0; z < Z; z++)
      out[y * X * Z + x * Z + z] = vals[(x * Y + y) * Z + z];
    heat($("weights"), out, Y, X * Z, true);
    cap += `: the ${X} slices along X side by side, each ${Y} x ${Z}.`;
  } else {
    const cols = Math.ceil(Math.sqrt(lk));
    const rowsN = Math.ceil(lk / cols);
    heat($("weights"), vals.concat(new Array(rowsN * cols - lk).fill(0)), rowsN, cols, true, w.query);
    cap += `, keys laid out row by row, ${cols} per row.`;
  }
  $("weights-cap").textContent = cap;
}

// Draws rows x cols values in [0, 1] as a heat map filling the canvas; `mark` outlines one cell.
function heat(canvas, values, rows, cols, magma, mark) {
  const ctx = canvas.getContext("2d");
  const size = 384, cw = size / cols, ch = size / rows;
  ctx.clearRect(0, 0, size, size);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = Math.min(1, Math.max(0, values[r * cols + c]));
      ctx.fillStyle = magma ? ramp(Math.sqrt(v)) : `rgb(${255 - 200 * v},${255 - 160 * v},${255 - 60 * v})`;
      ctx.fillRect(c * cw, r * ch, Math.ceil(cw), Math.ceil(ch));
    }
  }
  if (mark != null && mark < rows * cols) {
    ctx.strokeStyle = "#00e0ff";
    ctx.lineWidth = 2;
    ctx.strokeRect((mark % cols) * cw, Math.floor(mark / cols) * ch, cw, ch);
  }
}

// Dark blue -> purple -> orange -> pale yellow.
function ramp(t) {
  const stops = [[13, 8, 60], [110, 30, 130], [220, 80, 70], [252, 200, 60], [252, 252, 190]];
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

async function runSelftest(attn) {
  $("selftest-box").hidden = false;
  let r;
  try {
    r = JSON.parse(await attn.selftest());
  } catch (e) {
    fail("self-test", e);
    return;
  }
  $("selftest-table").innerHTML = "<tr><th>case</th><th>kernel</th><th>max |err|</th><th>tolerance</th><th>GPU ms</th><th></th></tr>" +
    r.cases.map((c) => `<tr><td>${esc(c.name)}</td><td>${esc(c.kernel)}</td>` +
      `<td>${c.max_abs == null ? "" : c.max_abs.toExponential(2)}</td>` +
      `<td>${c.tolerance_abs == null ? "" : c.tolerance_abs.toExponential(2)}</td>` +
      `<td>${c.gpu_ms == null ? "" : c.gpu_ms.toFixed(3)}</td>` +
      `<td>${c.passed ? '<span class="pass">PASS</span>' : `<span class="fail">FAIL</span> ${esc(c.problem || "")}`}</td></tr>`).join("");
  const n = r.cases.filter((c) => c.passed).length;
  $("selftest-summary").innerHTML = r.passed ? `<span class="pass">PASS</span> ${n}/${r.cases.length} cases` :
    `<span class="fail">FAIL</span> ${n}/${r.cases.length} cases`;
  $("selftest").textContent = JSON.stringify(r);
  $("selftest").dataset.state = "done";
}

main().catch((e) => {
  const msg = fail("page", e);
  show($("nowebgpu"), esc(msg));
});
