"""Headless runs: execute a saved ComfyUI workflow (UI or API format) through ComfyUI's own executor, without a
browser, from the repository root (or the pack's folder inside ComfyUI/custom_nodes)::

    python -m aligned_trainer.cli run workflows/demo_train_tiny.json --set "Train Steps.steps=20"

It starts ComfyUI's ``main.py`` (this pack loaded by ComfyUI's own loader) on a free loopback port, or uses a
running one (``--server``), queues the workflow, streams progress and loss, prints the files written and
stops the server it started. Exit codes: 0 done, 1 the workflow failed (the node and its message are
printed), 2 bad arguments or workflow file, 130 interrupted. Nothing here imports ComfyUI or the engine:
see docs/headless.md."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .headless import workflow as wf
from .headless.run import RunFailed, prepare, run_prompt
from .headless.server import ComfyServer, comfyui_path

EPILOG = """examples:
  python -m aligned_trainer.cli run workflows/demo_train_tiny.json --set "Train Steps.steps=20"
  python -m aligned_trainer.cli run my_flow_api.json --set 13.steps=500 --set "Train Init.resume=latest"
  python -m aligned_trainer.cli run my_flow.json --server http://127.0.0.1:8188   # a ComfyUI already running"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aligned_trainer.cli",
                                description="Run ComfyUI workflows without a browser.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one workflow to the end", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("workflow", type=Path, help="a workflow saved from ComfyUI (UI format, or Export (API))")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="change an input value; NODE is a node id, title, display name or type "
                        "(repeatable), e.g. --set \"Train Steps.steps=20\"")
    r.add_argument("--only", action="append", default=[], metavar="NODE",
                   help="run only this output node and what it needs (repeatable), e.g. --only \"Save LoRA\" "
                        "to train without the previews")
    r.add_argument("--comfyui", type=Path, help="the ComfyUI folder (with main.py) to run; default "
                   "$COMFYUI_PATH, the ComfyUI this pack sits in, or the bundled .work/ComfyUI")
    r.add_argument("--server", metavar="URL", help="use a ComfyUI already running at URL instead of starting one "
                   "(outputs then go to that server's folders)")
    r.add_argument("--output", type=Path, help="ComfyUI output folder (default: ComfyUI's own)")
    r.add_argument("--input", type=Path, help="ComfyUI input folder (default: ComfyUI's own)")
    r.add_argument("--temp", type=Path, help="ComfyUI temp folder (default: ComfyUI's own)")
    r.add_argument("--user", type=Path, help="ComfyUI user folder (default: ComfyUI's own)")
    r.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
                   help="an extra_model_paths.yaml for the started ComfyUI (repeatable)")
    r.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU (--cpu)")
    r.add_argument("--comfyui-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for ComfyUI's main.py, e.g. --comfyui-arg=--lowvram (repeatable)")
    r.add_argument("--port", type=int, default=0, help="port of the started ComfyUI (default: a free one)")
    r.add_argument("--timeout", type=float, default=0, help="interrupt and fail after this many seconds (0: none)")
    return p


def _server(args) -> ComfyServer:
    if args.server:
        return ComfyServer.remote(args.server, output_dir=args.output)
    root = comfyui_path(args.comfyui)
    dirs = {k: getattr(args, k) or root / k for k in ("output", "input", "temp", "user")}
    extra = [*(a for y in args.extra_model_paths_config for a in ("--extra-model-paths-config", str(y))),
             *args.comfyui_arg]
    log = Path(dirs["output"]) / "aligned_trainer" / "logs" / f"headless-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return ComfyServer(comfyui=root, dirs=dirs, cpu=args.cpu, extra_args=extra, port=args.port or None,
                       log_path=log)


def _wind_down(server: ComfyServer, seconds: float = 120) -> None:
    """Interrupt a prompt still running on the ComfyUI we started and wait for it to end, so that Train Steps
    writes its checkpoint before the process is stopped."""
    try:
        if not server.alive() or not server.get("/queue", timeout=5).get("queue_running"):
            return
        print("[run] interrupting the running workflow (a checkpoint is written) ...", file=sys.stderr, flush=True)
        server.interrupt()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and server.alive() and server.get("/queue", timeout=5).get("queue_running"):
            time.sleep(0.5)
    except (KeyboardInterrupt, OSError, RuntimeError):
        pass


def _terminate(signum, frame):  # SIGTERM: leave through finally, which stops the ComfyUI we started
    raise KeyboardInterrupt


def run(args) -> int:
    data = wf.read(args.workflow)
    for item in args.sets:  # the syntax now; nodes and inputs once the schemas are known
        wf.parse_set(item)
    for y in args.extra_model_paths_config:
        if not y.is_file():
            raise wf.WorkflowError(f"--extra-model-paths-config '{y}' does not exist")
    server = _server(args)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if server.proc is None and not args.server:
            print(f"[run] starting ComfyUI {server.comfyui} (log: {server.log_path})", flush=True)
            server.start()
        prompt, info, labels = prepare(server, data, args.sets)
        targets = wf.output_targets(prompt, info, args.only) or None
        print(f"[run] queued {args.workflow.name} on {server.url}", flush=True)
        try:
            res = run_prompt(server, prompt, labels, stream=sys.stdout, timeout=args.timeout or None,
                             targets=targets)
        except KeyboardInterrupt:
            if args.server and server.alive():
                server.interrupt()
            print("[run] interrupted", file=sys.stderr)
            return 130
        print(f"[run] finished in {res.seconds:.1f} s", flush=True)
        for p in res.loras:
            print(f"[run] LoRA:  {p}")
        for p in res.images:
            print(f"[run] image: {p}")
        if not args.server:
            print(f"[run] output folder: {server.output_dir}")
        return 0
    finally:
        if not args.server:
            _wind_down(server)
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except wf.WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, OSError) as e:  # the server did not start, or stopped answering
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[run] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
