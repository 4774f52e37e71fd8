"""Boot a real ComfyUI in this process (CPU) and load this pack through ComfyUI's own custom-node
loader, the way ``main.py`` does it. Nothing is mocked."""
from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .paths import comfyui_path, pack_link


@dataclass
class Comfy:
    root: Path
    pack_module: str
    nodes: ModuleType  # ComfyUI's nodes.py
    pack_node_ids: list[str] = field(default_factory=list)

    def engine(self, name: str) -> ModuleType:
        """Import an engine module (``aligned_trainer.<name>``) as the loaded pack sees it."""
        suffix = f".{name}" if name else ""
        return importlib.import_module(f"{self.pack_module}.aligned_trainer{suffix}")

    def pack(self, name: str) -> ModuleType:
        """Import any module of the loaded pack, e.g. ``nodes.training``."""
        return importlib.import_module(f"{self.pack_module}.{name}")

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def call(self, node_id: str, unique_id: str = "1", **inputs):
        """Run a node's ``execute`` the way ComfyUI's executor does (class clone with hidden inputs)
        and return its outputs as a tuple (``.ui`` available through ``call_full``)."""
        return self.call_full(node_id, unique_id=unique_id, **inputs).args

    def call_full(self, node_id: str, unique_id: str = "1", **inputs):
        cls = self.node(node_id)
        from comfy_api.latest import io

        clone = cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id, io.Hidden.prompt: {},
                                         io.Hidden.extra_pnginfo: {}})
        out = clone.execute(**inputs)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
        return out


_BOOTED: Comfy | None = None


def make_importable(root: Path | None = None) -> Path:
    """Put ComfyUI on ``sys.path`` the way ``main.py`` runs (its ``utils`` package first, before anything can
    shadow it with comfy/utils.py), CPU only, so ``comfy.*`` imports work, e.g. for the tiny-model factories."""
    root = root or comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import utils.extra_config  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is first imported: it picks its device at import
    return root


def boot(output_dir: Path | None = None, temp_dir: Path | None = None) -> Comfy:
    """Import ComfyUI from its folder, CPU only, with every built-in node and this pack loaded."""
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    root = make_importable()
    link = pack_link(root)
    import folder_paths

    if output_dir is not None:
        folder_paths.set_output_directory(str(output_dir))
    if temp_dir is not None:
        folder_paths.set_temp_directory(str(temp_dir))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(link), ignore=before, module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"ComfyUI's custom-node loader failed to load {link}; see the log above.")
    pack_module = str(link).replace(".", "_x_")  # the name ComfyUI's loader gives a package
    ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    _BOOTED = Comfy(root=root, pack_module=pack_module, nodes=nodes, pack_node_ids=ids)
    return _BOOTED
