"""First contact in the real frontend (issue #18), Debian's Chromium via Playwright on the family server:

- each family template, loaded with its model absent, shows the missing-models dialog naming the file, and
  queueing it shows an error and runs nothing (no new /history entry);
- the demo's training panel: the chart lies inside its node, the preview is beside it and not covered, one
  status line, a legend, overall progress that only grows; screenshots at step 1, mid-run and at the end;
- a dataset folder uploaded through the Dataset node's picker shows its images and counts before training;
- template thumbnails are served; the console shows no warning or error caused by the pack.
Screenshots: .work/artifacts/browser/ui_*.png."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support.factories.dataset import make_dataset
from support.paths import REPO
from support.tiny_workflows import FAMILIES
from support.workflow import load
from test_browser import ARTIFACTS, _close_dialogs, open_frontend

pytestmark = [pytest.mark.server, pytest.mark.browser]
PACK_MARKERS = ("aligned_trainer", "alignedtrainer", "aligned-trainer")


@pytest.fixture(scope="module")
def ui(family_server, tmp_path_factory):
    console, missing = [], []

    def listen(pg):
        pg.on("console", lambda m: console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        pg.on("response", lambda r: r.status == 404 and missing.append(r.url))

    with open_frontend(family_server, tmp_path_factory.mktemp("chromium-profile-ui"), 2000, listen) as pg:
        pg.console, pg.missing = console, missing
        yield pg


def _dialog_texts(pg) -> list[str]:
    return pg.evaluate("() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent)"
                       ".map(d => d.innerText)")


def _shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"ui_{name}.png"))
    print(f"screenshot: {ARTIFACTS / f'ui_{name}.png'}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_missing_model_speaks_up_before_anything_runs(ui, family_server, name):
    wf = load(REPO / "workflows" / f"{name}.json")
    files = [m["name"] for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])]
    assert files, f"{name} declares no models"
    ui.evaluate("wf => window.app.loadGraphData(wf)", wf)
    ui.wait_for_function("f => [...document.querySelectorAll('.p-dialog')].some(d => d.innerText.includes(f))",
                         arg=files[0], timeout=30_000)
    text = "\n".join(_dialog_texts(ui))
    for f in files:
        assert f in text, f"the missing-models dialog does not name {f}: {text[:500]}"
    _shot(ui, f"missing_{name}")
    _close_dialogs(ui)
    before = len(family_server.get("/history"))
    blocked = ui.evaluate("() => window.alignedTrainer.blocked.length")
    ui.evaluate("() => window.app.queuePrompt(0, 1)")
    ui.wait_for_function("n => window.alignedTrainer.blocked.length > n", arg=blocked, timeout=30_000)
    ui.wait_for_function("() => [...document.querySelectorAll('.p-dialog')].some(d => d.innerText.includes("
                         "'Nothing was run'))", timeout=30_000)
    msg = ui.evaluate("() => window.alignedTrainer.blocked.at(-1)")
    _shot(ui, f"blocked_{name}")
    assert files[0] in msg and "is not installed" in msg, msg
    time.sleep(2)
    queue = family_server.get("/queue")
    assert len(family_server.get("/history")) == before, "a graph with a missing model ran (partly)"
    assert not queue["queue_running"] and not queue["queue_pending"], queue
    _close_dialogs(ui)


LAYOUT_JS = """id => {
  const node = window.app.graph.getNodeById(id), ds = window.app.canvas.ds;
  const cr = window.app.canvas.canvas.getBoundingClientRect(), T = window.LiteGraph.NODE_TITLE_HEIGHT;
  const toScreen = (x, y) => [(x + ds.offset[0]) * ds.scale + cr.left, (y + ds.offset[1]) * ds.scale + cr.top];
  const [nx0, ny0] = toScreen(node.pos[0], node.pos[1] - T), [nx1, ny1] = toScreen(node.pos[0] + node.size[0],
                                                                                  node.pos[1] + node.size[1]);
  const rect = (e) => { if (!e) return null; const r = e.getBoundingClientRect();
                        return {x0: r.left, y0: r.top, x1: r.right, y1: r.bottom, w: r.width, h: r.height}; };
  const w = (node.widgets || []).find(w => w.name === 'loss_chart');
  const root = w && w.element;
  const chart = root && root.querySelector('canvas[data-aligned-trainer-chart]');
  const img = root && root.querySelector('img[data-aligned-trainer-preview]');
  const status = root ? root.querySelectorAll('[data-aligned-trainer-status]').length : 0;
  const legend = root && root.querySelector('[data-aligned-trainer-legend]');
  let previewOnTop = null;
  if (img && img.style.display !== 'none' && img.complete && img.naturalWidth > 0) {
    const r = img.getBoundingClientRect();
    const pts = [[0.5, 0.5], [0.2, 0.2], [0.8, 0.8]].map(([a, b]) =>
      document.elementFromPoint(r.left + a * r.width, r.top + b * r.height));
    previewOnTop = pts.every(e => e === img);
  }
  return {node: {x0: nx0, y0: ny0, x1: nx1, y1: ny1}, chart: rect(chart), preview: rect(img), previewOnTop,
          status, statusText: root && root.querySelector('[data-aligned-trainer-status]').textContent,
          textWidgets: (node.widgets || []).filter(w => String(w.name).startsWith('$$')).map(w => w.name),
          legend: legend ? legend.innerText : '', chartPixels: chart ? (() => {
            const d = chart.getContext('2d').getImageData(0, 0, chart.width, chart.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })() : 0};
}"""


def _inside(inner, outer, tol=1.5) -> bool:
    return (inner["x0"] >= outer["x0"] - tol and inner["y0"] >= outer["y0"] - tol and inner["x1"] <= outer["x1"] + tol
            and inner["y1"] <= outer["y1"] + tol)


def _overlap(a, b) -> bool:
    return a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]


def _check_layout(lay: dict, where: str) -> None:
    assert lay["chart"] and _inside(lay["chart"], lay["node"]), f"{where}: the chart leaves its node: {lay}"
    assert lay["status"] == 1 and not lay["textWidgets"], f"{where}: not exactly one status line: {lay}"
    for label in ("loss", "smoothed", "validation", "local min"):
        assert label in lay["legend"], f"{where}: legend lacks {label!r}: {lay['legend']!r}"
    if lay["previewOnTop"] is not None:
        assert lay["previewOnTop"], f"{where}: something covers the preview: {lay}"
        assert not _overlap(lay["preview"], lay["chart"]), f"{where}: chart and preview overlap: {lay}"
        assert _inside(lay["preview"], lay["node"]), f"{where}: the preview leaves its node: {lay}"


def test_training_view_during_the_demo(ui, family_server):
    wf = load(REPO / "workflows" / "demo_train_tiny.json")
    ui.evaluate("wf => window.app.loadGraphData(wf)", wf)
    _close_dialogs(ui)
    ts = next(n for n in wf["nodes"] if n["type"] == "AlignedTrainer_TrainSteps")
    # fewer steps than shipped (this 2-core machine is shared): 6 steps, validation every 2, previews at 3 and 6
    total = 6
    ui.evaluate("""([id, plan, total]) => { const g = window.app.graph;
        const set = (n, k, v) => { n.widgets.find(w => w.name === k).value = v; };
        const ts = g.getNodeById(id); set(ts, 'steps', total); set(ts, 'val_every', 2); set(ts, 'checkpoint_every', 3);
        set(g.getNodeById(plan), 'every_n', 3);
        for (const n of g._nodes) if (n.type === 'AlignedTrainer_Optimizer') set(n, 'total_steps', total); }""",
                [ts["id"], next(n["id"] for n in wf["nodes"] if n["type"] == "AlignedTrainer_PreviewPlan"), total])
    ui.evaluate("id => { const n = window.app.graph.getNodeById(id); window.app.canvas.centerOnNode(n); }", ts["id"])
    ui.evaluate("() => { window.alignedTrainer.overall = []; }")
    before = len(family_server.get("/history"))
    ui.evaluate("() => window.app.queuePrompt(0, 1)")
    seen, shots, overlay = [], set(), []
    deadline = time.time() + 1200
    while time.time() < deadline:
        st = ui.evaluate("() => ({n: window.alignedTrainer.overall.length, o: window.alignedTrainer.overall.at(-1),"
                         " body: document.body.innerText})")
        overlay += [line for line in st["body"].splitlines() if "AlignedTrainer_" in line]
        if st["n"]:
            seen.append(st["o"])
            lay = ui.evaluate(LAYOUT_JS, ts["id"])
            step = int(lay["statusText"].split()[1].split("/")[0])
            if "step1" not in shots:
                _check_layout(lay, "step 1")
                _shot(ui, "train_step1")
                shots.add("step1")
            elif "mid" not in shots and total // 2 <= step < total and (lay["previewOnTop"] or step == total - 1):
                _check_layout(lay, "mid-run")
                _shot(ui, "train_mid")
                shots.add("mid")
        hist = family_server.get("/history")
        if len(hist) > before:
            entry = list(hist.values())[-1]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                break
        time.sleep(0.5)  # each sample costs the shared CPUs a layout pass and a chart read
    else:
        raise TimeoutError("the demo queued from the browser did not finish in 20 minutes")
    assert entry["status"]["status_str"] == "success", entry["status"]
    ui.wait_for_timeout(1000)
    lay = ui.evaluate(LAYOUT_JS, ts["id"])
    assert lay["previewOnTop"], f"no preview shown beside the chart at the end: {lay}"
    _check_layout(lay, "end")
    _shot(ui, "train_end")
    assert {"step1", "mid"} <= shots, f"screenshots taken: {shots}"
    overall = ui.evaluate("() => window.alignedTrainer.overall")
    assert len(overall) >= total and overall[-1] == 1.0, overall
    assert all(b >= a for a, b in zip(overall, overall[1:])), f"overall progress went back: {overall}"
    assert len(set(seen)) >= 3, f"overall progress sampled only as {sorted(set(seen))}"
    assert not overlay, f"node ids shown in the UI while running: {sorted(set(overlay))[:5]}"
    assert lay["chartPixels"] > 500


def test_dataset_picker_uploads_and_previews(ui, family_server, tmp_path):
    src = tmp_path / "picked_set"
    make_dataset(src, n=3, sizes=((64, 64), (96, 64), (64, 96)))  # writes src/1_ohwx/img_00N.png + .txt
    wf = load(REPO / "workflows" / "train_lora_sd15.json")
    ui.evaluate("wf => window.app.loadGraphData(wf)", wf)
    _close_dialogs(ui)
    ds = next(n for n in wf["nodes"] if n["type"] == "AlignedTrainer_Dataset")
    ui.evaluate("id => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id))", ds["id"])
    done = ui.evaluate("() => window.alignedTrainer.datasets")
    ui.locator("input[data-aligned-trainer-upload]").first.set_input_files(str(src))
    ui.wait_for_function("""n => window.alignedTrainer.datasets > n && [...document.querySelectorAll(
        'img[data-aligned-trainer-thumb]')].filter(i => i.complete && i.naturalWidth > 0).length === 3""",
                         arg=done, timeout=60_000)
    summary = ui.locator("[data-aligned-trainer-dataset-summary]").first.inner_text()
    # buckets for the node's own settings (train_lora_sd15: resolution 512): square, landscape, portrait
    assert "3 images · 3 captions · buckets " in summary and summary.count("×1") == 3, summary
    folder = ui.evaluate("id => window.app.graph.getNodeById(id).widgets.find(w => w.name === 'folder').value",
                         ds["id"])
    assert folder == "picked_set"
    assert sorted(p.name for p in (family_server.input_dir / "picked_set" / "1_ohwx").iterdir()) == sorted(
        p.name for p in (src / "1_ohwx").iterdir())
    _shot(ui, "dataset_picker")
    # the route stays inside the input folder
    for bad in ("../", "/etc", "a/../../x"):
        url = f"{family_server.url}/aligned_trainer/dataset?" + urllib.parse.urlencode({"folder": bad})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=30)
        err = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and ("'..'" in err or "absolute" in err), err


def test_thumbnails_served_and_console_clean(ui, family_server):
    packs = family_server.get("/workflow_templates")
    pack = next(k for k, v in packs.items() if "demo_train_tiny" in v)
    for name in packs[pack]:
        with urllib.request.urlopen(f"{family_server.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 5000
    ui.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    ui.wait_for_timeout(2000)
    _shot(ui, "templates")
    _close_dialogs(ui)
    bad = [u for u in ui.missing if "/workflow_templates/" in u]
    assert not bad, f"template thumbnails missing: {bad}"
    # The frontend asks the public node registry (api.comfy.org/comfy-nodes/<type>/node) which pack each
    # non-core node type belongs to; ComfyUI's Content-Security-Policy blocks that offline, for any custom node
    # pack. That lookup is the frontend's, not this pack's code, so it is listed apart and not held against us.
    registry = [m for m in ui.console if "api.comfy.org/comfy-nodes/" in m[1]]
    # The missing-model tests above queue graphs whose models are absent on purpose: the pack refuses them
    # ("Nothing was run. ...", recorded in window.alignedTrainer.blocked) and the frontend's error dialog shows
    # that refusal, logging it as the error it displays. Those deliberate refusals are the feature under test
    # there, not a fault; any other warning or error that mentions the pack fails this test.
    blocked = ui.evaluate("() => window.alignedTrainer.blocked")
    refusals = [m for m in ui.console if m[0] == "error" and any(b and b in m[1] for b in blocked)]
    ours = [m for m in ui.console if m[0] in ("warning", "error") and m not in registry and m not in refusals
            and any(k in (m[1] + m[2]).lower() for k in PACK_MARKERS)]
    print(f"console: {len(ui.console)} messages, {len(registry)} blocked registry lookups by the frontend, "
          f"{len(refusals)} deliberate refusals")
    assert not ours, f"console warnings/errors from the pack: {ours[:10]}"
