"""The real ComfyUI frontend in Debian's Chromium (Playwright): load every shipped workflow, queue the ones
that run on tiny models, see the live loss chart draw and the A/B viewer show both images. Screenshots
are saved as test artifacts in .work/artifacts/browser/ (paths printed)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from support import demo
from support.paths import REPO
from support.workflow import load

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUNNABLE = {"demo_train_tiny", "ab_aligned_vs_unaligned", "te_alignment_report"}
ARTIFACTS = REPO / ".work" / "artifacts" / "browser"

pytestmark = [pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}; scripts/setup.py installs it (python3 scripts/test.py)")
    from playwright.sync_api import sync_playwright

    # a returning user: the frontend opens the templates dialog over the canvas on a first visit otherwise
    server.post("/settings/Comfy.TutorialCompleted", True)
    server.post("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 1)  # screenshots keep node text when zoomed out
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), args=FLAGS,
                                                        headless=True, viewport={"width": 1600, "height": 1000})
        try:
            pg = browser.new_page()
            pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            pg.wait_for_function("window.app && window.app.graph && window.alignedTrainer", timeout=120_000)
            pg.wait_for_timeout(3000)
            _close_dialogs(pg)
            yield pg
        finally:
            browser.close()


def _close_dialogs(pg) -> None:
    """Close what the frontend pops up over the canvas (the templates dialog on a first visit, toasts)."""
    for _ in range(3):
        pg.keyboard.press("Escape")
        close = pg.locator(".p-dialog-close-button:visible")
        if not close.count():
            break
        close.first.click(timeout=5000)
        pg.wait_for_timeout(300)


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


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_frontend_loads_and_runs_workflow(page, server, sd15_checkpoint, tmp_path, path):
    demo.prepare_inputs(server.input_dir, sd15_checkpoint.parent)
    wf = load(path)
    page.evaluate("wf => window.app.loadGraphData(wf)", wf)
    n_nodes = page.evaluate("() => window.app.graph._nodes.length")
    assert n_nodes == len(wf["nodes"])
    if path.stem in RUNNABLE:
        before = len(server.get("/history"))
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        entry = _wait_done(server, before)
        assert entry["status"]["status_str"] == "success", entry["status"]
        page.wait_for_timeout(1500)
        st = page.evaluate("() => ({loss: window.alignedTrainer.lossPoints, ab: window.alignedTrainer.abShown,"
                           " spec: window.alignedTrainer.specShown})")
        assert st["spec"] > 0  # the te_spec viewer showed the spec in use
        if path.stem == "demo_train_tiny":
            assert st["loss"] >= 20
            drawn = page.evaluate("""() => { const c = document.querySelector('canvas[data-aligned-trainer-chart]');
                if (!c) return 0; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")
            assert drawn > 500, "the loss chart did not draw"
        if path.stem in ("demo_train_tiny", "ab_aligned_vs_unaligned"):
            page.wait_for_function("""() => { const im = [...document.querySelectorAll('img[data-ab-side]')];
                return im.length >= 2 && im.every(i => i.complete && i.naturalWidth > 0); }""", timeout=30_000)
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
