// ComfyUI Aligned Trainer: frontend extension.
// - a training panel on Train Steps nodes: one status line, overall progress, a loss chart with a legend and
//   the latest preview beside it (websocket events "aligned_trainer.loss" and "aligned_trainer.preview")
// - a dataset picker on Dataset nodes: choose or upload a folder, preview strip and counts before training
// - missing inputs speak up before anything runs: a graph with pack nodes is checked by ComfyUI's own
//   validation (/aligned_trainer/validate) before it is queued, so a missing model stops the whole run
// - execution errors of pack nodes are titled with the node's display name
// - A/B viewer (side by side, or a slider) on A/B Compare nodes
// - te_spec viewer on Load Aligned Text Encoders nodes
// Text that comes from datasets, captions or specs is always inserted with textContent, never as HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "AlignedTrainer_";
const state = (window.alignedTrainer = window.alignedTrainer ||
  { charts: {}, lossPoints: 0, previews: 0, abShown: 0, specShown: 0, blocked: [], overall: [], datasets: 0 });
const COLORS = { loss: "#5aaaff", smooth: "#ffc83c", val: "#78dc78", min: "#ff5a5a" };
const PANEL_H = 270, PANEL_W = 340, PICKER_H = 150; // fits the shipped workflows' columns (360 px apart)

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

class TrainPanel {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.overall = 0;
    this.root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: PANEL_H + "px",
                            boxSizing: "border-box", overflow: "hidden" });
    this.status = el("div", { font: "11px monospace", color: "#ccc", whiteSpace: "normal", overflowWrap: "anywhere",
                              lineHeight: "14px", minHeight: "28px" }, "waiting for training…");
    this.status.dataset.alignedTrainerStatus = String(node.id);
    const track = el("div", { height: "4px", background: "#333", borderRadius: "2px", flex: "0 0 auto" });
    this.bar = el("div", { height: "100%", width: "0%", background: "#4caf7a", borderRadius: "2px" });
    this.bar.dataset.alignedTrainerOverall = "0";
    track.append(this.bar);
    const row = el("div", { display: "flex", gap: "6px", flex: "1 1 auto", minHeight: 0 });
    const left = el("div", { display: "flex", flexDirection: "column", flex: "3 1 0", minWidth: 0, minHeight: 0, gap: "2px" });
    this.canvas = el("canvas", { display: "block", width: "100%", flex: "1 1 auto", minHeight: 0,
                                 background: "#1c1c20", borderRadius: "4px" });
    this.canvas.width = 360;
    this.canvas.height = 160;
    this.canvas.dataset.alignedTrainerChart = String(node.id);
    this.legend = el("div", { display: "flex", flexWrap: "wrap", gap: "2px 10px", font: "10px sans-serif", color: "#bbb",
                              flex: "0 0 auto" });
    this.legend.dataset.alignedTrainerLegend = String(node.id);
    for (const [key, label] of [["loss", "loss"], ["smooth", "smoothed"], ["val", "validation"], ["min", "local min"]]) {
      const item = el("span", { display: "inline-flex", alignItems: "center", gap: "3px" });
      item.append(el("span", { display: "inline-block", width: "10px", height: key === "min" ? "8px" : "3px",
                               background: key === "min" ? "transparent" : COLORS[key],
                               border: key === "min" ? `1px solid ${COLORS.min}` : "none",
                               borderRadius: key === "min" ? "50%" : "0" }), el("span", {}, label));
      this.legend.append(item);
    }
    left.append(this.canvas, this.legend);
    const right = el("figure", { display: "flex", flexDirection: "column", flex: "2 1 0", minWidth: 0, minHeight: 0,
                                 margin: 0, alignItems: "center", justifyContent: "center", background: "#141417",
                                 borderRadius: "4px" });
    this.preview = el("img", { maxWidth: "100%", maxHeight: "100%", minHeight: 0, objectFit: "contain", display: "none",
                               flex: "1 1 auto" });
    this.preview.dataset.alignedTrainerPreview = String(node.id);
    this.caption = el("figcaption", { font: "10px sans-serif", color: "#999", flex: "0 0 auto" }, "no preview yet");
    right.append(this.preview, this.caption);
    row.append(left, right);
    this.root.append(this.status, track, row);
  }

  reset() {
    this.points = [];
    this.overall = 0;
  }

  add(p) {
    this.points.push(p);
    state.lossPoints += 1;
    const eta = p.eta != null ? fmtTime(p.eta) : "?";
    const its = p.its ? Number(p.its).toFixed(2) : "?";
    const lr = p.lr != null ? Number(p.lr).toExponential(2) : "?";
    const val = p.val_loss != null ? ` · val ${Number(p.val_loss).toFixed(4)}` : "";
    const of = p.total != null ? `/${(p.step - (p.done ?? 0)) + p.total}` : "";
    this.overall = Math.max(this.overall, Number(p.overall ?? 0));
    const pct = Math.round(this.overall * 100);
    this.status.textContent = `step ${p.step}${of} · ${pct}% · loss ${Number(p.loss).toFixed(4)}${val} · lr ${lr} · ` +
      `${its} it/s · ETA ${eta}`;
    this.bar.style.width = `${(this.overall * 100).toFixed(1)}%`;
    this.bar.dataset.alignedTrainerOverall = String(this.overall);
    state.overall.push(this.overall);
    this.draw();
  }

  showPreview(detail) {
    if (!detail.image) return;
    this.preview.src = viewUrl(detail.image) + `&step=${detail.step}`;
    this.preview.style.display = "block";
    this.caption.textContent = `preview at step ${detail.step}`;
    state.previews += 1;
  }

  draw() {
    const c = this.canvas, g = c.getContext("2d");
    const box = c.getBoundingClientRect(), scale = this.node.graph?.list_of_graphcanvas?.[0]?.ds?.scale || 1;
    if (box.width > 20 && box.height > 20) {
      c.width = Math.round(box.width / scale);
      c.height = Math.round(box.height / scale);
    }
    const W = c.width, H = c.height, L = 40, T = 8, B = 14, R = 8;
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
    g.strokeStyle = "#555"; g.lineWidth = 1; g.strokeRect(L, T, W - L - R, H - T - B);
    g.fillStyle = "#999"; g.font = "9px sans-serif";
    g.textAlign = "right"; g.fillText(hi.toPrecision(3), L - 3, T + 8); g.fillText(lo.toPrecision(3), L - 3, H - B);
    g.textAlign = "left"; g.fillText(String(s0), L, H - 2);
    g.textAlign = "right"; g.fillText(String(s1), W - R, H - 2); g.textAlign = "left";
    const line = (xs, vs, color, width) => {
      g.strokeStyle = color; g.lineWidth = width; g.beginPath();
      xs.forEach((s, i) => (i ? g.lineTo(X(s), Y(vs[i])) : g.moveTo(X(s), Y(vs[i]))));
      g.stroke();
    };
    line(steps, loss, COLORS.loss, 1);
    line(steps, smooth, COLORS.smooth, 2);
    if (val.length) {
      line(val.map((v) => v[0]), val.map((v) => v[1]), COLORS.val, 2);
      g.fillStyle = COLORS.val; // a dot per validation pass: one pass is a point, not yet a line
      for (const [s, v] of val) { g.beginPath(); g.arc(X(s), Y(v), 2.5, 0, 2 * Math.PI); g.fill(); }
    }
    g.strokeStyle = COLORS.min; g.lineWidth = 1;
    for (const i of localMinima(smooth)) {
      g.beginPath(); g.arc(X(steps[i]), Y(smooth[i]), 3, 0, 2 * Math.PI); g.stroke();
    }
  }
}

function fmtTime(s) {
  s = Math.max(0, Math.round(s));
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`
    : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
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

function setWidget(node, name, element, height = null) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) {
    existing.element.replaceChildren(element);
    return existing;
  }
  const holder = el("div", { width: "100%" });
  holder.append(element);
  const opts = { serialize: false, hideOnZoom: false };
  if (height) Object.assign(opts, { getMinHeight: () => height, getMaxHeight: () => height });
  return node.addDOMWidget(name, "aligned_trainer", holder, opts);
}

// Make a node big enough for its widgets (a loaded workflow brings its own, smaller, size).
function fitNode(node, minWidth) {
  const want = node.computeSize();
  const w = Math.max(node.size[0], minWidth, want[0]), h = Math.max(node.size[1], want[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
  node.setDirtyCanvas(true, true);
}

function trainPanel(node) {
  let panel = state.charts[node.id];
  if (!panel || panel.node !== node) {
    panel = state.charts[node.id] = new TrainPanel(node);
    setWidget(node, "loss_chart", panel.root, PANEL_H);
    fitNode(node, PANEL_W);
  }
  return panel;
}

// ---- dataset picker --------------------------------------------------------------------------------------
const IMAGE_RE = /\.(png|jpe?g|webp|bmp|tiff?)$/i, CAPTION_RE = /\.(txt|caption)$/i;

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

class DatasetPicker {
  constructor(node) {
    this.node = node;
    this.root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: PICKER_H + "px",
                            boxSizing: "border-box", overflow: "hidden", font: "11px sans-serif", color: "#ccc" });
    const row = el("div", { display: "flex", gap: "4px", alignItems: "center" });
    this.select = el("select", { flex: "1 1 auto", minWidth: 0, font: "11px sans-serif" });
    this.select.dataset.alignedTrainerFolders = "";
    this.select.title = "Folders in ComfyUI's input folder";
    this.select.onchange = () => this.choose(this.select.value);
    this.file = el("input", { display: "none" });
    this.file.type = "file";
    this.file.multiple = true;
    this.file.webkitdirectory = true;
    this.file.dataset.alignedTrainerUpload = "";
    this.file.onchange = () => this.upload([...this.file.files]);
    const up = el("button", { font: "11px sans-serif", cursor: "pointer" }, "Upload folder…");
    up.title = "Upload a folder of images and .txt captions into ComfyUI's input folder";
    up.onclick = () => this.file.click();
    const again = el("button", { font: "11px sans-serif", cursor: "pointer" }, "↻");
    again.title = "Read the folder again";
    again.onclick = () => this.refresh();
    row.append(this.select, up, again, this.file);
    this.summary = el("div", { whiteSpace: "normal", overflowWrap: "anywhere", minHeight: "14px" }, "");
    this.summary.dataset.alignedTrainerDatasetSummary = "";
    this.strip = el("div", { display: "flex", gap: "3px", overflowX: "auto", overflowY: "hidden", flex: "1 1 auto",
                             minHeight: 0 });
    this.strip.dataset.alignedTrainerStrip = "";
    this.root.append(row, this.summary, this.strip);
  }

  async listFolders() {
    try {
      const r = await api.fetchApi("/aligned_trainer/datasets");
      const { folders } = await r.json();
      const cur = widgetValue(this.node, "folder") || "";
      const names = folders.includes(cur) || !cur ? folders : [cur, ...folders];
      this.select.replaceChildren(...names.map((n) => el("option", {}, n)));
      this.select.value = cur;
    } catch (e) { /* the server is gone: nothing to list */ }
  }

  choose(name) {
    const w = this.node.widgets?.find((w) => w.name === "folder");
    if (w) { w.value = name; w.callback?.(name); }
    this.refresh();
  }

  async upload(files) {
    const keep = files.filter((f) => IMAGE_RE.test(f.name) || CAPTION_RE.test(f.name));
    if (!keep.length) { this.summary.textContent = "no images or captions in the chosen folder"; return; }
    const rel = (f) => (f.webkitRelativePath || f.name).split("/");
    const top = rel(keep[0]).length > 1 ? rel(keep[0])[0] : (widgetValue(this.node, "folder") || "uploaded_dataset");
    const name = top.replace(/[^\w.\- ]/g, "_").replace(/^\.+/, "") || "uploaded_dataset";
    let done = 0;
    for (const f of keep) {
      const parts = rel(f);
      const sub = [name, ...parts.slice(parts.length > 1 ? 1 : 0, -1)].join("/");
      const body = new FormData();
      body.append("image", f, parts[parts.length - 1]);
      body.append("type", "input");
      body.append("subfolder", sub);
      body.append("overwrite", "true");
      const r = await api.fetchApi("/upload/image", { method: "POST", body });
      if (r.status !== 200) { this.summary.textContent = `upload of ${f.name} failed (HTTP ${r.status})`; return; }
      done += 1;
      this.summary.textContent = `uploading ${done}/${keep.length}…`;
    }
    await this.listFolders();
    this.choose(name);
  }

  async refresh() {
    const folder = (widgetValue(this.node, "folder") || "").trim();
    await this.listFolders();
    this.strip.replaceChildren();
    if (!folder) { this.summary.textContent = "choose or upload a dataset folder"; return; }
    const q = new URLSearchParams({ folder });
    for (const k of ["resolution", "min_side", "max_side", "bucket_step"]) {
      const v = widgetValue(this.node, k);
      if (v != null) q.set(k, String(v));
    }
    let d;
    try {
      const r = await api.fetchApi(`/aligned_trainer/dataset?${q.toString()}`);
      d = await r.json();
    } catch (e) { this.summary.textContent = "could not read the folder (is the server running?)"; return; }
    if (d.error) { this.summary.textContent = d.error; this.summary.style.color = "#f88"; return; }
    this.summary.style.color = "#ccc";
    const buckets = Object.entries(d.buckets).map(([b, n]) => `${b}×${n}`).join(", ");
    this.summary.textContent = `${d.images} images · ${d.captions} captions` +
      (d.images > d.captions ? ` (${d.images - d.captions} without)` : "") + ` · buckets ${buckets || "none"}`;
    for (const it of d.shown) {
      const parts = it.file.split("/");
      const img = el("img", { height: "100%", maxHeight: "96px", objectFit: "cover", borderRadius: "3px", flex: "0 0 auto" });
      img.src = api.apiURL(`/view?${new URLSearchParams({ filename: parts[parts.length - 1],
        subfolder: [folder, ...parts.slice(0, -1)].join("/"), type: "input" }).toString()}`);
      img.title = `${it.file} (${it.size.join("×")} → ${it.bucket})\n${it.caption || "(no caption)"}`;
      img.dataset.alignedTrainerThumb = it.file;
      this.strip.append(img);
    }
    state.datasets += 1;
  }
}

// ---- missing inputs speak up before anything runs ------------------------------------------------------
function describeErrors(v) {
  const lines = [];
  for (const [id, ne] of Object.entries(v.node_errors || {})) {
    const node = app.graph.getNodeById(Number(id));
    const title = node?.title || ne.class_type;
    for (const e of ne.errors || []) {
      const x = e.extra_info || {};
      if (e.type === "value_not_in_list" && x.input_name) {
        const m = (node?.properties?.models || []).find((m) => m.name === x.received_value);
        const where = m ? `models/${m.directory}` : "the server's list";
        lines.push(`${title}: ${x.input_name} "${x.received_value}" is not installed (not in ${where}). ` +
          (m ? `Download it from ${m.url} into models/${m.directory}, or pick an installed file.` : "Pick an installed file."));
      } else {
        lines.push(`${title}: ${e.message}${e.details ? ` (${e.details})` : ""}`);
      }
    }
  }
  if (!lines.length && v.error) lines.push(v.error.message + (v.error.details ? `: ${v.error.details}` : ""));
  return "Nothing was run. " + lines.join("\n");
}

const queuePrompt = api.queuePrompt.bind(api);
api.queuePrompt = async function (number, data, options) {
  const prompt = data?.output || {};
  if (Object.values(prompt).some((n) => String(n?.class_type || "").startsWith(PREFIX))) {
    let v = null;
    try {
      const r = await api.fetchApi("/aligned_trainer/validate", { method: "POST", headers: { "Content-Type": "application/json" },
                                                                  body: JSON.stringify({ prompt }) });
      if (r.status === 200) v = await r.json();
    } catch (e) { v = null; /* no check possible: let ComfyUI decide */ }
    if (v && !v.ok) {
      const msg = describeErrors(v);
      state.blocked.push(msg);
      throw new Error(msg);
    }
  }
  return queuePrompt(number, data, options);
};

// Execution errors of pack nodes carry the node's display name (this listener is registered when the
// extension loads, before the frontend's own listener that opens the error dialog).
api.addEventListener("execution_error", ({ detail }) => {
  const t = detail?.node_type;
  if (typeof t !== "string" || !t.startsWith(PREFIX)) return;
  const title = window.LiteGraph?.registered_node_types?.[t]?.title;
  if (title) detail.node_type = title;
});

app.registerExtension({
  name: "AlignedTrainer.UI",
  async setup() {
    api.addEventListener("aligned_trainer.loss", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      const panel = trainPanel(node);
      const last = panel.points[panel.points.length - 1];
      if (last && detail.step <= last.step) panel.reset(); // the node was queued again: a new run from its input
      panel.add(detail);
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("aligned_trainer.preview", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      trainPanel(node).showPreview(detail);
      node.setDirtyCanvas(true, false);
    });
  },
  nodeCreated(node) {
    if (node.comfyClass === PREFIX + "TrainSteps") trainPanel(node);
    if (node.comfyClass === PREFIX + "Dataset") {
      const picker = new DatasetPicker(node);
      node.alignedTrainerPicker = picker;
      setWidget(node, "dataset_picker", picker.root, PICKER_H);
      fitNode(node, 0);
      const w = node.widgets?.find((w) => w.name === "folder");
      if (w) {
        const cb = w.callback;
        let timer = null;
        w.callback = function () {
          const r = cb?.apply(this, arguments);
          clearTimeout(timer);
          timer = setTimeout(() => picker.refresh(), 300);
          return r;
        };
      }
      setTimeout(() => picker.refresh(), 0);
    }
  },
  loadedGraphNode(node) {
    if (node.comfyClass === PREFIX + "TrainSteps") fitNode(node, PANEL_W);
    if (node.comfyClass === PREFIX + "Dataset") {
      fitNode(node, 0);
      node.alignedTrainerPicker?.refresh();
    }
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
