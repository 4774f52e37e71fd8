"""Fixtures: a real ComfyUI booted in-process with this pack loaded by ComfyUI's own loader, a real
ComfyUI server on a free loopback port, and seeded tiny models/datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.boot import boot  # noqa: E402
from support.paths import MODEL_CACHE  # noqa: E402
from support.server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def comfy_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    dirs = {n: base / n for n in ("output", "temp", "input", "models")}
    for d in dirs.values():
        d.mkdir()
    for sub in ("checkpoints", "loras", "text_encoders", "vae", "diffusion_models"):
        (dirs["models"] / sub).mkdir()
    return dirs


@pytest.fixture(scope="session")
def comfy(comfy_dirs):
    """ComfyUI imported in this process (CPU), built-in nodes and this pack loaded."""
    c = boot(output_dir=comfy_dirs["output"], temp_dir=comfy_dirs["temp"])
    import folder_paths

    folder_paths.set_input_directory(str(comfy_dirs["input"]))
    for sub in ("checkpoints", "loras", "text_encoders", "vae", "diffusion_models"):
        folder_paths.add_model_folder_path(sub, str(comfy_dirs["models"] / sub), is_default=True)
    return c


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy, comfy_dirs):
    """Tiny SD1.5 checkpoint file, visible to CheckpointLoaderSimple as ``tiny-sd15.safetensors``."""
    from support.factories import sd15

    src = sd15.checkpoint()
    link = comfy_dirs["models"] / "checkpoints" / "tiny-sd15.safetensors"
    if not link.exists():
        link.symlink_to(src)
    return link


@pytest.fixture(scope="session")
def sd15(comfy, sd15_checkpoint):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by the stock CheckpointLoaderSimple."""
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint.name)


@pytest.fixture(scope="session")
def server(tmp_path_factory, sd15_checkpoint, comfy_dirs):
    """The real ComfyUI server (main.py) with this pack, on a free loopback port; always stopped."""
    base = tmp_path_factory.mktemp("server")
    srv = ComfyServer(base, model_folders={"checkpoints": sd15_checkpoint.parent, "vae": comfy_dirs["models"] / "vae",
                                           "loras": comfy_dirs["models"] / "loras"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def family_server(tmp_path_factory, comfy):
    """A real ComfyUI server with the tiny family models, the test-only loaders and the demo inputs
    (support.tiny_workflows.family_server); shared by the family-workflow and browser tests."""
    from support.tiny_workflows import family_server as start

    with start(tmp_path_factory.mktemp("family_server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def T(comfy):
    """The training engine's modules, imported the way ComfyUI loaded the pack."""
    class NS:
        C = comfy.engine("train.config")
        loop = comfy.engine("train.loop")
        st = comfy.engine("train.state")
        ts = comfy.engine("train.timesteps")
        export = comfy.engine("train.export")
        ad = comfy.engine("train.adapters")
        types = comfy.engine("data.types")
        naming = comfy.engine("train.naming")
        diffusers_check = comfy.engine("train.diffusers_check")
        interop = comfy.engine("train.interop")
        optim = comfy.engine("train.optim")
    return NS


# the text-encoder swap's engine modules (tests/test_te_swap.py, tests/test_pin_te_swap.py)
@pytest.fixture(scope="session")
def S(comfy):
    return comfy.engine("train.te_swap")


@pytest.fixture(scope="session")
def F(comfy):
    return comfy.engine("train.te_swap_files")


@pytest.fixture(scope="session")
def M(comfy):
    return comfy.engine("train.te_swap_measure")


@pytest.fixture(scope="session")
def R(comfy):
    return comfy.engine("train.te_swap_reset")


@pytest.fixture(scope="session")
def PO(comfy):
    return comfy.engine("train.te_swap_pooled")


@pytest.fixture(scope="session")
def D(comfy):
    """The data engine's modules, imported the way ComfyUI loaded the pack."""
    class NS:
        captions = comfy.engine("data.captions")
        buckets = comfy.engine("data.buckets")
        dataset = comfy.engine("data.dataset")
        images = comfy.engine("data.images")
        cache = comfy.engine("data.cache")
    return NS


@pytest.fixture
def tiny_dataset(tmp_path):
    from support.factories.dataset import make_dataset

    return make_dataset(tmp_path / "dataset", n=6)


def pytest_report_header(config):
    return [f"ComfyUI: {os.environ.get('COMFYUI_PATH', '(bundled)')}", f"model cache: {MODEL_CACHE}"]


@pytest.fixture(scope="session")
def sd15_training_set(comfy, sd15, tmp_path_factory):
    """A 4-image, 64 px TrainingSet built with the pack's own data engine from the tiny SD1.5."""
    from support.factories.dataset import make_dataset

    _, clip, vae = sd15
    base = tmp_path_factory.mktemp("trainset")
    folder = make_dataset(base / "data", n=4, sizes=((64, 64),))
    D = comfy.engine("data.dataset")
    caps = comfy.engine("data.captions")
    bk = comfy.engine("data.buckets")
    cache = comfy.engine("data.cache")
    ds = D.from_folder(folder.parent, caps.CaptionConfig(trigger_word="ohwx"),
                       bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    lc = cache.cache_latents(ds, vae, base / "cache")
    ts, _ = cache.cache_text(lc, clip, base / "cache", unload=False)
    return ts


@pytest.fixture(scope="session")
def family_bundle(comfy):
    """Factory ``name -> (MODEL, CLIP, VAE)`` of a tiny SDXL/SD3/FLUX.1 bundle (support.factories.families),
    built once per name for the session. Bundles are read-only to tests: clone before patching."""
    from support.factories import families

    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = families.build(name)
        return built[name]

    return get


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (scripts/test.py runs ``-n 2``): whole test files go to one worker, so a module's fixtures
    (servers, trained runs) are built once, and the files that use the family server (a session fixture that
    builds every tiny family) go to the same worker, so it is built once per run. (xdist's own ``loadgroup`` marks
    do not take effect with pytest 9, which ignores the node id suffix they rely on.)"""
    from xdist.scheduler import LoadScopeScheduling

    tests = Path(__file__).resolve().parent
    shared = {f"tests/{p.name}" for p in tests.glob("test_*.py") if "family_server" in p.read_text(encoding="utf-8")}

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "family_server" if file in shared else file

    return FileScheduling(config, log)
