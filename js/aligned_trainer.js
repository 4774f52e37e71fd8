// ComfyUI Aligned Trainer: frontend extension.
// - live loss chart + status line on Train Steps nodes (websocket event "aligned_trainer.loss")
// - A/B viewer (side by side, or a slider) on A/B Compare nodes
// - te_spec viewer on Load Aligned Text Encoders nodes
// Text that comes from datasets, captions or specs is always inserted with textContent, never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "AlignedTrainer_";
const state = (window.alignedTrainer = window.alignedTrainer || { charts: {}, lossPoints: 0, abShown: 0, specShown: 0 });

function el(tag, style = {}, text = null) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  if (text !== null) e.textContent = text;
  return e;
}

function ema(values, s) {
  const out = [];
  let acc = 0;
  values.forEach((v, i) => {
    acc = s * acc + (1 - s) * v;
    out.push(acc / (1 - Math.pow(s, i + 1)));
  });
  return out;
}

function localMinima(values, w = 5) {
  const idx = [];
  for (let i = 0; i < values.length; i++) {
    const seg = values.slice(Math.max(0, i - w), Math.min(values.length, i + w + 1));
    if (values[i] === Math.min(...seg) && (i === 0 || values[i - 1] > values[i]) && values.length > 2) idx.push(i);
  }
  return idx;
}

class LossChart {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.root = el("div", { display: "flex", flexDirection: "column", gap: "2px", width: "100%" });
    this.status = el("div", { font: "11px monospace", color: "#ccc", whiteSpace: "nowrap", overflow: "hidden" }, "waiting for training…");
    this.canvas = el("canvas", { width: "100%", height: "140px", background: "#1c1c20", borderRadius: "4px" });
    this.canvas.width = 360;
    this.canvas.height = 140;
    this.canvas.dataset.alignedTrainerChart = String(node.id);
    this.root.append(this.status, this.canvas);
  }

  add(p) {
    this.points.push(p);
    state.lossPoints += 1;
    const eta = p.eta != null ? `${Math.round(p.eta)}s` : "?";
    const its = p.its != null ? p.its.toFixed(2) : "?";
    const lr = p.lr != null ? Number(p.lr).toExponential(2) : "?";
    const val = p.val_loss != null ? ` | val ${Number(p.val_loss).toFixed(4)}` : "";
    this.status.textContent = `step ${p.step} | loss ${Number(p.loss).toFixed(4)}${val} | lr ${lr} | ${its} it/s | ETA ${eta}`;
    this.draw();
  }

  draw() {
    const c = this.canvas, g = c.getContext("2d");
    const W = c.width, H = c.height, L = 34, T = 8, B = 14, R = 6;
    g.clearRect(0, 0, W, H);
    if (!this.points.length) return;
    const steps = this.points.map((p) => p.step), loss = this.points.map((p) => Number(p.loss));
    const smooth = ema(loss, 0.9);
    const val = this.points.filter((p) => p.val_loss != null).map((p) => [p.step, Number(p.val_loss)]);
    const ys = loss.concat(val.map((v) => v[1]));
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (hi - lo < 1e-12) hi = lo + 1e-6;
    const s0 = Math.min(...steps), s1 = Math.max(...steps), span = Math.max(1, s1 - s0);
    const X = (s) => L + ((s - s0) / span) * (W - L - R), Y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    g.strokeStyle = "#555"; g.strokeRect(L, T, W - L - R, H - T - B);
    g.fillStyle = "#999"; g.font = "9px sans-serif";
    g.fillText(hi.toPrecision(3), 2, T + 8); g.fillText(lo.toPrecision(3), 2, H - B);
    g.fillText(String(s0), L, H - 2); g.fillText(String(s1), W - R - 24, H - 2);
    const line = (xs, vs, color, width) => {
      g.strokeStyle = color; g.lineWidth = width; g.beginPath();
      xs.forEach((s, i) => (i ? g.lineTo(X(s), Y(vs[i])) : g.moveTo(X(s), Y(vs[i]))));
      g.stroke();
    };
    line(steps, loss, "#5aaaff", 1);
    line(steps, smooth, "#ffc83c", 2);
    if (val.length) line(val.map((v) => v[0]), val.map((v) => v[1]), "#78dc78", 2);
    g.strokeStyle = "#ff5a5a";
    for (const i of localMinima(smooth)) {
      g.beginPath(); g.arc(X(steps[i]), Y(smooth[i]), 3, 0, 2 * Math.PI); g.stroke();
    }
  }
}

function viewUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder || "", type: img.type || "temp" });
  return api.apiURL(`/view?${q.toString()}`);
}

function abViewer(node, a, b, labels) {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%" });
  const mode = el("select", { font: "11px sans-serif" });
  for (const m of ["side by side", "slider"]) mode.append(el("option", {}, m));
  const body = el("div", { width: "100%" });
  root.append(mode, body);
  const render = () => {
    body.replaceChildren();
    for (let i = 0; i < Math.min(a.length, b.length); i++) {
      if (mode.value === "slider") {
        const box = el("div", { position: "relative", width: "100%", overflow: "hidden" });
        const ib = el("img", { width: "100%", display: "block" });
        ib.src = viewUrl(b[i]);
        const clip = el("div", { position: "absolute", left: 0, top: 0, bottom: 0, width: "50%", overflow: "hidden" });
        const ia = el("img", { display: "block" });
        ia.src = viewUrl(a[i]);
        ia.onload = () => (ia.style.width = box.clientWidth + "px");
        clip.append(ia);
        const range = el("input", { width: "100%" });
        range.type = "range"; range.min = 0; range.max = 100; range.value = 50;
        range.oninput = () => (clip.style.width = range.value + "%");
        box.append(ib, clip);
        body.append(box, range);
      } else {
        const row = el("div", { display: "flex", gap: "4px" });
        [[a[i], labels[0]], [b[i], labels[1]]].forEach(([img, label]) => {
          const col = el("figure", { margin: 0, flex: 1 });
          const im = el("img", { width: "100%", display: "block" });
          im.src = viewUrl(img);
          im.dataset.abSide = label;
          col.append(im, el("figcaption", { font: "10px sans-serif", color: "#ccc" }, label));
          row.append(col);
        });
        body.append(row);
      }
    }
  };
  mode.onchange = render;
  render();
  return root;
}

function setWidget(node, name, element) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) {
    existing.element.replaceChildren(element);
    return existing;
  }
  const holder = el("div", { width: "100%" });
  holder.append(element);
  return node.addDOMWidget(name, "aligned_trainer", holder, { serialize: false, hideOnZoom: false });
}

app.registerExtension({
  name: "AlignedTrainer.UI",
  async setup() {
    api.addEventListener("aligned_trainer.loss", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      let chart = state.charts[node.id];
      // a chart belongs to one node object: a newly loaded graph reuses node ids
      if (!chart || chart.node !== node) {
        chart = state.charts[node.id] = new LossChart(node);
        setWidget(node, "loss_chart", chart.root);
      } else if (chart.points.length && detail.step <= chart.points[chart.points.length - 1].step) {
        chart.points = []; // the node was queued again: a new run from its input state
      }
      chart.add(detail);
      node.setDirtyCanvas(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    if (!name.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    if (name === PREFIX + "ABCompare") {
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const a = message?.a_images || [], b = message?.b_images || [];
        const labels = message?.ab_labels || ["A", "B"];
        if (a.length && b.length) {
          setWidget(this, "ab_viewer", abViewer(this, a, b, labels));
          state.abShown += 1;
        }
      };
    }
    if (name === PREFIX + "LoadAlignedTextEncoders") {
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = (message?.text || []).join("\n");
        let title = "te_spec";
        try { const s = JSON.parse(text); title = `te_spec: ${s.id} — ${s.name}`; } catch (e) { /* plain text */ }
        const details = el("details", { font: "10px monospace", color: "#ccc", maxHeight: "220px", overflow: "auto" });
        details.append(el("summary", {}, title), el("pre", { whiteSpace: "pre-wrap", margin: 0 }, text));
        setWidget(this, "te_spec_viewer", details);
        state.specShown += 1;
      };
    }
  },
});
