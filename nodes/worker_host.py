"""The ComfyUI host of a data-parallel worker process (``python -m aligned_trainer.train.distributed JOB.json``,
started by Train Steps through torchrun; docs/headless.md). It belongs to the node layer because it drives
ComfyUI itself: it imports ComfyUI in-process the way ``main.py`` does (no server, no port) with the ComfyUI
process's folders, loads the custom nodes (this pack among them) with ComfyUI's own loader, and runs the part
of the workflow upstream of Train Init in ComfyUI's own executor. The training is the engine's
(``aligned_trainer/train/distributed.py: worker``), taken from the copy of the pack ComfyUI's loader imported.

Loaded by file path by the engine's ``__main__`` (so only absolute imports here: ComfyUI's modules, never the
pack's, which ComfyUI's loader names)."""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


class _NoClient:
    """The executor's event sink in a worker: no browser is connected to a worker (rank 0's step lines reach
    the UI through Train Steps in the ComfyUI process)."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass


def upstream(prompt: dict, ids: list[str]) -> dict:
    """The part of an API prompt the nodes ``ids`` need (them and their ancestors)."""
    keep, todo = set(), list(ids)
    while todo:
        nid = todo.pop()
        if nid in keep or nid not in prompt:
            continue
        keep.add(nid)
        todo += [str(v[0]) for v in prompt[nid].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
    return {k: v for k, v in prompt.items() if k in keep}


def boot(job: dict):
    """Import ComfyUI with the ComfyUI process's device choice and folders, load its custom nodes, and return
    the pack's ``aligned_trainer.train.distributed`` as ComfyUI's loader imported it."""
    sys.path.insert(0, job["comfyui"])
    import utils.extra_config  # noqa: F401  (ComfyUI's utils package first, as main.py has it)
    from comfy.cli_args import args

    import torch

    args.cpu = bool(job.get("cpu"))
    if not args.cpu and torch.cuda.is_available():  # before comfy.model_management picks its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    import folder_paths

    folders = job["folders"]
    folder_paths.set_output_directory(folders["output"])
    folder_paths.set_input_directory(folders["input"])
    folder_paths.set_temp_directory(folders["temp"])
    for name, (paths, exts) in folders["paths"].items():
        folder_paths.folder_names_and_paths[name] = (list(paths), set(exts))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == PACK / "__init__.py":  # the name ComfyUI's loader gave the pack
            return importlib.import_module(f"{name}.aligned_trainer.train.distributed")
    raise RuntimeError(f"ComfyUI's custom-node loader did not load this pack ({PACK}) from the custom_nodes "
                       f"folders {folder_paths.get_folder_paths('custom_nodes')}; see the log above")


def train_init_inputs(job: dict, error) -> dict:
    """Run what Train Init's inputs need in ComfyUI's executor; {input name: value} of its linked inputs."""
    import execution

    prompt, init_id = job["prompt"], job["train_init"]
    links = {k: v for k, v in prompt[init_id]["inputs"].items() if isinstance(v, list) and len(v) == 2}
    sources = sorted({str(v[0]) for v in links.values()})
    ex = execution.PromptExecutor(_NoClient(), cache_args={"lru": 0, "ram": 0})
    ex.execute(upstream(prompt, sources), f"aligned_trainer-worker-{os.getpid()}", {}, sources)
    if not ex.success:
        errs = [d for e, d in ex.status_messages if e == "execution_error"]
        d = errs[0] if errs else {}
        raise error(f"the workflow upstream of Train Init failed in the worker: node {d.get('node_id')} "
                    f"({d.get('node_type')}): {d.get('exception_type')}: {d.get('exception_message')}")
    return {name: ex.caches.outputs.get(str(nid)).outputs[slot][0] for name, (nid, slot) in links.items()}


def run(job: dict) -> int:
    engine = boot(job)
    return engine.worker(job, lambda: train_init_inputs(job, engine.WorkerError))
