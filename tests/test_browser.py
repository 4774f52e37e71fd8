"""The real ComfyUI frontend in Debian's Chromium (Playwright): load every shipped workflow, queue it from the
frontend, wait for it to finish, see the live loss chart draw, the A/B viewer show both images and the token-heatmap
and slider-sweep grids show on their nodes (train_slider's LoRA metadata and grid size checked too).

The A/B and alignment-report workflows run as shipped (they name the generated tiny SD1.5 and demo dataset);
the demo runs from the browser in test_browser_ui.py (training view). The family workflows (train_lora_sd15/_sdxl/_sd35/_flux1) name real model files; after loading
one, the test makes in the frontend's graph the changes ``support.tiny_workflows`` documents (loaders pointed
at tiny models, or replaced by test-only loaders with the same outputs and links; sizes and step counts
shrunk), then queues that graph; ``support.workflow_checks`` checks the run (the LoRA maps completely in ComfyUI's
stock loader, grids, plots, animated video previews, each family's own checks). The text-encoder swap workflows
(train_te_swap_sd15, train_te_swap_sdxl) are shrunk and queued the same way (``TE_SWAP``) and each run checked by
``check_te_swap_run`` (measured spreads, saved UNet differences and projection, sample through Apply Text Encoder
Swap with the stock KSampler, Train Steps' previews; SDXL's projected pooled vector): the only runs of those
workflows in the suite. Screenshots of each graph are saved as test artifacts in
.work/artifacts/browser/ (paths printed)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from support.paths import REPO
from support.tiny_workflows import FAMILIES, TE_SWAP, TE_SWAP_STEPS, shrink_for, steps_for
from support.workflow import load, validate
from support.workflow_checks import check_family_run, check_te_swap_run

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AS_SHIPPED = {"demo_train_tiny", "ab_aligned_vs_unaligned", "te_alignment_report", "ab_training_aligned_vs_unaligned",
              "dataset_tools", "token_heatmaps", "train_slider"}
# Run to completion through the server's API with stronger checks (test_workflows.py, test_workflows_families.py);
# here the frontend loads them and turns them into a prompt of known nodes, without training them again (suite time).
# The demo runs from the browser in test_browser_ui.py's training-view test, which checks its chart, previews,
# loss events and A/B images; here it is loaded and turned into a prompt like the others.
# The family workflows (FAMILIES) and the text-encoder swap workflow (TE_SWAP) are shrunk in the frontend's graph,
# queued from it, and their runs checked by support.workflow_checks (LoRA maps in the stock loader, grids, plots,
# animated previews, family checks; the swap's spreads, saved UNet and projection files, sample and previews).
RUN_THROUGH_API = {"ab_training_aligned_vs_unaligned", "demo_train_tiny"}
ARTIFACTS = REPO / ".work" / "artifacts" / "browser"

pytestmark = [pytest.mark.server, pytest.mark.browser]


@contextlib.contextmanager
def open_frontend(server, profile: Path, settle_ms: int = 3000, listen=None, pack: bool = True):
    """The real frontend of ``server`` in headless Chromium (fresh profile), loaded with this pack's extension
    (``pack=False``: a server started without the pack) and with first-visit dialogs closed; ``listen(page)``
    attaches listeners before the page loads."""
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}; scripts/setup.py installs it (python3 scripts/test.py)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), args=FLAGS,
                                                        headless=True, viewport={"width": 1600, "height": 1000})
        try:
            yield open_page(browser, server, settle_ms, listen, pack)
        finally:
            browser.close()


def open_page(browser, server, settle_ms: int = 3000, listen=None, pack: bool = True):
    """A new page of the Chromium context ``browser`` on ``server``'s frontend (see open_frontend)."""
    # a returning user: the frontend opens the templates dialog over the canvas on a first visit otherwise
    server.post("/settings/Comfy.TutorialCompleted", True)
    server.post("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 1)  # screenshots keep node text when zoomed out
    pg = browser.new_page()
    if listen is not None:
        listen(pg)
    pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
    ready = "window.app && window.app.graph" + (" && window.alignedTrainer" if pack else "")
    pg.wait_for_function(ready, timeout=120_000)
    pg.wait_for_timeout(settle_ms)
    _close_dialogs(pg)
    return pg


@pytest.fixture(scope="module")
def page(family_server, tmp_path_factory):
    with open_frontend(family_server, tmp_path_factory.mktemp("chromium-profile")) as pg:
        yield pg


def _close_dialogs(pg) -> None:
    """Close what the frontend pops up over the canvas (the templates dialog on a first visit, the missing-models
    dialog of a family template, toasts): Escape, then the close button where Escape was not enough."""
    visible = "() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent).length"
    for _ in range(4):
        if not pg.evaluate(visible):
            break
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(400)
        if not pg.evaluate(visible):
            break
        close = pg.locator(".p-dialog-close-button:visible")
        if close.count():
            try:
                close.first.click(timeout=2000)
            except Exception:  # detached while it closed
                pass
            pg.wait_for_timeout(300)


# In the frontend's graph: replace or re-point the loaders and shrink sizes (support.tiny_workflows), by widget
# name; a replaced loader gets the old one's position and output links (same slot order and types).
TINY_GRAPH_JS = """({loaders, shrink}) => {
  const g = window.app.graph, LG = window.LiteGraph;
  const link = (id) => (g.links.get ? g.links.get(id) : g.links[id]);
  const setw = (node, k, v) => {
    const w = (node.widgets || []).find((w) => w.name === k);
    if (!w) throw new Error(`${node.type} has no widget ${k}`);
    w.value = v;
  };
  const replaced = [];
  for (const old of [...g._nodes]) {
    const sub = loaders[old.type];
    let node = old;
    if (sub && sub[0]) {
      node = LG.createNode(sub[0]);
      if (!node) throw new Error(`no node type ${sub[0]} in the frontend`);
      node.pos = [...old.pos];
      g.add(node);
      old.outputs.forEach((out, i) => {
        for (const id of [...(out.links || [])]) {
          const l = link(id);
          node.connect(i, g.getNodeById(l.target_id), l.target_slot);
        }
      });
      g.remove(old);
      replaced.push(`${old.type} -> ${node.type}`);
    }
    if (sub) for (const [k, v] of Object.entries(sub[1])) setw(node, k, v);
    for (const [k, v] of Object.entries(shrink[old.type] || {})) setw(node, k, v);
  }
  g.setDirtyCanvas(true, true);
  return {nodes: g._nodes.length, replaced};
}"""


def _wait_done(server, before: int, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get("/history")
        if len(hist) > before:
            entry = list(hist.values())[-1]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return entry
        time.sleep(0.5)
    raise TimeoutError("the workflow queued from the browser did not finish")


def _plays_animated_preview(page, entry, wf) -> None:
    """A video family's Sample Preview node shows its run's animated WebP (the file workflow_checks counted the
    frames of) as an animated image, loaded in the page."""
    (sp,) = [n["id"] for n in wf["nodes"] if n["type"] == "AlignedTrainer_SamplePreview"]
    (out,) = entry["outputs"][str(sp)]["images"]
    page.wait_for_function("""id => { const n = window.app.graph.getNodeById(id);
        return n.imgs && n.imgs.length === 1 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
                           arg=sp, timeout=30_000)
    shown = page.evaluate("""id => { const n = window.app.graph.getNodeById(id);
        return {src: n.imgs[0].src, animated: n.animatedImages === true}; }""", sp)
    assert shown["animated"] and f"filename={out['filename']}&" in shown["src"], (shown, out)


def _shows_its_grid(page, server, entry, node_id) -> None:
    """The images shown on node ``node_id`` are the grid images it returned in this run (same natural sizes as
    the files its preview wrote), not an earlier run's or a placeholder."""
    from PIL import Image

    sizes = []
    for i in entry["outputs"][str(node_id)]["images"]:
        root = server.output_dir if i.get("type") == "output" else server.temp_dir  # (ComfyUI adds temp/ under it)
        (f,) = [f for f in root.rglob(i["filename"]) if f.parent.name == (i.get("subfolder") or f.parent.name)]
        with Image.open(f) as im:
            sizes.append(list(im.size))
    shown = page.evaluate("id => window.app.graph.getNodeById(id).imgs.map(i => [i.naturalWidth, i.naturalHeight])",
                          node_id)
    assert shown == sizes and sizes, (node_id, shown, sizes)


def _check_slider_run(page, server, entry, wf) -> None:
    """workflows/train_slider.json queued from the frontend: Save LoRA's file records the slider's prompts, the
    aligned spec and the 4 steps; the sweep grid (-2 ... +2: five 64 px columns beside the label column) is saved,
    and the Slider Sweep node shows an image of that size."""
    import json

    from PIL import Image
    from safetensors import safe_open

    from support import demo

    with safe_open(str(server.model_folders["loras"] / "slider_smile.safetensors"), framework="pt") as f:
        meta = f.metadata()
    rec = json.loads(meta["aligned_trainer.slider"])
    assert (rec["positive"], rec["negative"]) == ("a photo of a smiling person, happy",
                                                  "a photo of a frowning person, sad")
    assert json.loads(meta["aligned_trainer.te_spec"])["id"] == "sd15" and meta["aligned_trainer.steps"] == "4"
    (grid,) = [f for f in demo.output_files(entry, server.output_dir) if f.parent.name == "slider"]
    with Image.open(grid) as im:
        size = im.size
    assert size[0] == 110 + 5 * 64, size
    (sweep,) = [n["id"] for n in wf["nodes"] if n["type"] == "AlignedTrainer_SliderSweep"]
    shown = page.evaluate("id => window.app.graph.getNodeById(id).imgs.map(i => [i.naturalWidth, i.naturalHeight])",
                          sweep)
    assert shown == [list(size)], (shown, size)


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_frontend_loads_and_runs_workflow(page, family_server, path, request):
    server = family_server
    wf = load(path)
    page.evaluate("wf => window.app.loadGraphData(wf)", wf)
    n_nodes = page.evaluate("() => window.app.graph._nodes.length")
    assert n_nodes == len(wf["nodes"])
    name = path.stem
    assert name in AS_SHIPPED or name in FAMILIES or name in TE_SWAP, f"{name}: a new shipped workflow needs a way to run here"
    if name in FAMILIES or name in TE_SWAP:
        subs, shrink = (FAMILIES[name][1], shrink_for(name)) if name in FAMILIES else TE_SWAP[name]
        loaders = {t: [new, inputs] for t, (new, inputs) in subs.items()}
        done = page.evaluate(TINY_GRAPH_JS, {"loaders": loaders, "shrink": shrink})
        assert done["nodes"] == len(wf["nodes"]), done
    if name in RUN_THROUGH_API:
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        types = {n["class_type"] for n in prompt.values()}
        assert types >= {n["type"] for n in wf["nodes"] if n["type"].startswith("AlignedTrainer_")}
        known = server.get("/object_info")
        assert all(t in known for t in types), sorted(types - set(known))
        return
    loss_before = page.evaluate("() => window.alignedTrainer.lossPoints")
    before = len(server.get("/history"))
    t0 = time.time()
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    entry = _wait_done(server, before)
    assert entry["status"]["status_str"] == "success", entry["status"]
    if name in FAMILIES:  # the prompt the frontend queued, as the server ran it
        assert validate(wf, server.info) == []
        request.getfixturevalue("comfy")  # the checks load the LoRA with ComfyUI's own loader, in process
        check_family_run(server, entry["prompt"][2], entry, name, request, time.time() - t0)
        if shrink_for(name)["AlignedTrainer_SamplePreview"].get("frames", 1) > 1:
            _plays_animated_preview(page, entry, wf)
    if name in TE_SWAP:  # the prompt the frontend queued, as the server ran it
        assert validate(wf, server.info) == []
        check_te_swap_run(server, entry["prompt"][2], entry, name, request, time.time() - t0, t0)
    trains = [n for n in wf["nodes"] if n["type"] == "AlignedTrainer_TrainSteps"]
    expected = (steps_for(name) if name in FAMILIES else TE_SWAP_STEPS if name in TE_SWAP
                else trains[0]["widgets_values"][0]) if trains else 0  # one loss event per step
    aligned = any(n["type"] == "AlignedTrainer_LoadAlignedTextEncoders" for n in wf["nodes"])
    try:  # the websocket's last events reach the page after /history says done: wait for what this run must show
        page.wait_for_function("([before, n, spec]) => window.alignedTrainer.lossPoints - before >= n"
                               " && (!spec || window.alignedTrainer.specShown > 0)", arg=[loss_before, expected, aligned],
                               timeout=15_000)
    except Exception:  # (the assertions below say what is missing)
        pass
    st = page.evaluate("() => ({loss: window.alignedTrainer.lossPoints, ab: window.alignedTrainer.abShown,"
                       " spec: window.alignedTrainer.specShown})")
    if aligned:
        assert st["spec"] > 0  # the te_spec viewer showed the spec in use
    if trains:
        assert st["loss"] - loss_before >= expected, (st, loss_before)
        drawn = page.evaluate("""id => { const w = (window.app.graph.getNodeById(id).widgets || [])
                .find(w => w.name === 'loss_chart');  // the chart on this graph's node, not an earlier graph's
            const c = w && w.element.querySelector('canvas[data-aligned-trainer-chart]');
            if (!c) return 0; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""", trains[0]["id"])
        assert drawn > 500, "the loss chart did not draw"
    if name == "ab_aligned_vs_unaligned":
        page.wait_for_function("""() => { const im = [...document.querySelectorAll('img[data-ab-side]')];
            return im.length >= 2 && im.every(i => i.complete && i.naturalWidth > 0); }""", timeout=30_000)
    for node in (n for n in wf["nodes"] if n["type"] in ("AlignedTrainer_TokenHeatmaps",  # its grid shows on the node
                                                          "AlignedTrainer_SliderSweep")):
        page.wait_for_function("""id => { const n = window.app.graph.getNodeById(id);
            return n.imgs && n.imgs.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 64); }""",
                               arg=node["id"], timeout=30_000)
        _shows_its_grid(page, server, entry, node["id"])
    if name == "train_slider":
        _check_slider_run(page, server, entry, wf)
    _close_dialogs(page)
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{path.stem}.png"
    page.screenshot(path=str(shot))
    dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent)"
                            ".map(d => d.className + ' | ' + d.innerText.slice(0, 80))")
    assert not dialogs, f"a dialog covers the canvas: {dialogs}"
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
