"""ComfyUI workflows: UI format (what the frontend saves and loads) -> API format (what /prompt takes), a
validator, and ``--set NODE.INPUT=VALUE`` overrides checked against the node schemas. ``object_info`` is the
JSON of ComfyUI's /object_info (from a server, or computed in-process from the loaded node classes with
:func:`object_info_inprocess`). Standard library only."""
from __future__ import annotations

import json
import math
from pathlib import Path

SKIP_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4",
               "vae_name", "lora_name", "image"}  # image: Load Image's file in the input folder


def object_info_inprocess(nodes_module, names: list[str] | None = None) -> dict:
    """/object_info entries built from the loaded node classes (same shape as the server's)."""
    out = {}
    for name, cls in nodes_module.NODE_CLASS_MAPPINGS.items():
        if names is not None and name not in names:
            continue
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
            out[name]["_output_ids"] = [o.id for o in (cls.GET_SCHEMA().outputs or [])]
            continue
        inputs = cls.INPUT_TYPES()
        out[name] = {"input": {k: v for k, v in inputs.items() if k in ("required", "optional")},
                     "input_order": {k: list(v) for k, v in inputs.items() if k in ("required", "optional")},
                     "output": list(cls.RETURN_TYPES), "name": name}
    return out


def _spec(info: dict, node_type: str, name: str):
    for section in ("required", "optional"):
        spec = info[node_type]["input"].get(section, {}).get(name)
        if spec is not None:
            return spec
    return None


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def _order(info: dict, node_type: str) -> list[str]:
    order = info[node_type].get("input_order") or {k: list(v) for k, v in info[node_type]["input"].items()}
    return [*order.get("required", []), *order.get("optional", [])]


def _has_control(spec, name: str = "") -> bool:
    """The frontend adds a 'control after generate' widget value after INT inputs that ask for it, and by
    default after INT inputs named seed / noise_seed unless they set control_after_generate=False."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def widget_names(info: dict, node_type: str) -> list[tuple[str, bool]]:
    """(input name, has control_after_generate) for each widget, in widgets_values order."""
    out = []
    for name in _order(info, node_type):
        spec = _spec(info, node_type, name)
        if spec is not None and _is_widget(spec):
            out.append((name, _has_control(spec, name)))
    return out


def _source(nodes: dict, links: dict, link_id, depth: int = 0):
    """What feeds a link, seen through the frontend's helper nodes: ``("link", [id, slot])``, ``("value", v)``
    (a PrimitiveNode), or None (nothing: a muted or unconnected source)."""
    link = links.get(link_id)
    if link is None or depth > 100:
        raise ValueError(f"link {link_id} is missing from the workflow's links (or loops); re-save the workflow")
    src = nodes.get(link[1])
    if src is None:
        raise ValueError(f"link {link_id} comes from node {link[1]}, which is not in the workflow")
    upstream = [i for i in src.get("inputs") or [] if i.get("link") is not None]
    if src["type"] == "Reroute":
        return _source(nodes, links, upstream[0]["link"], depth + 1) if upstream else None
    if src["type"] == "PrimitiveNode":
        values = src.get("widgets_values") or []
        return ("value", values[0]) if values else None
    if src.get("mode", 0) == 2:  # muted: its outputs feed nothing
        return None
    if src.get("mode", 0) == 4:  # bypassed: the frontend passes through its first input of the link's type
        same = [i for i in upstream if i.get("type") == link[5]]
        return _source(nodes, links, same[0]["link"], depth + 1) if same else None
    return ("link", [str(link[1]), link[2]])


def ui_to_api(workflow: dict, info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        t = node["type"]
        if t in SKIP_TYPES or node.get("mode", 0) in (2, 4):
            continue
        if t not in info:
            raise ValueError(f"node {node['id']}: unknown node type {t}")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, control in widget_names(info, t):
            if i < len(values):
                inputs[name] = values[i]
            i += 2 if control else 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                src = _source(by_id, links, inp["link"])
                if src is not None:
                    inputs[inp["name"]] = src[1]
        prompt[str(node["id"])] = {"class_type": t, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info[t].get("display_name") or t}}
    return prompt


def _types_compatible(out_type: str, in_type) -> bool:
    if isinstance(in_type, list):
        return out_type == "COMBO"
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return "*" in a or "*" in b or bool(a & b)


def validate(workflow: dict, info: dict) -> list[str]:
    """Problems found: unknown node types, incompatible links, invalid widget values."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        if n["type"] not in SKIP_TYPES and n["type"] not in info:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
    for link_id, src, src_slot, dst, dst_slot, ltype in workflow.get("links", []):
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: missing node")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] in SKIP_TYPES or d["type"] in SKIP_TYPES or s["type"] not in info or d["type"] not in info:
            continue
        out_type = info[s["type"]]["output"][src_slot]
        in_name = d["inputs"][dst_slot]["name"]
        spec = _spec(info, d["type"], in_name)
        if spec is None:
            problems.append(f"link {link_id}: {d['type']} has no input {in_name}")
        elif not _types_compatible(out_type, spec[0]):
            problems.append(f"link {link_id}: {s['type']}[{src_slot}] gives {out_type}, {d['type']}.{in_name} wants {spec[0]}")
    try:
        api = ui_to_api(workflow, info)
    except ValueError as e:
        return problems + [str(e)]
    for nid, node in api.items():
        t = node["class_type"]
        for name in _order(info, t):
            spec = _spec(info, t, name)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name not in node["inputs"]:
                if name in info[t]["input"].get("required", {}):
                    problems.append(f"node {nid} ({t}): required input {name} missing")
                continue
            v = node["inputs"][name]
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                continue  # linked
            options = spec[0] if isinstance(spec[0], list) else (opts.get("options") if spec[0] == "COMBO" else None)
            if options is not None and name not in FILE_INPUTS and v not in options:
                problems.append(f"node {nid} ({t}): {name}={v!r} not in {options[:8]}")
            if spec[0] in ("INT", "FLOAT"):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    problems.append(f"node {nid} ({t}): {name}={v!r} is not a number")
                elif ("min" in opts and v < opts["min"]) or ("max" in opts and v > opts["max"]):
                    problems.append(f"node {nid} ({t}): {name}={v} outside [{opts.get('min')}, {opts.get('max')}]")
            if spec[0] == "BOOLEAN" and not isinstance(v, bool):
                problems.append(f"node {nid} ({t}): {name}={v!r} is not a boolean")
            if spec[0] == "STRING" and not isinstance(v, str):
                problems.append(f"node {nid} ({t}): {name}={v!r} is not a string")
    return problems


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- any saved workflow -> an API prompt -------------------------------------------------------------------
class WorkflowError(ValueError):
    """A workflow file or a --set the user has to fix; the message says what and how."""


def is_api_format(data) -> bool:
    """API format (the frontend's "Export (API)"): {id: {"class_type": ..., "inputs": {...}}}."""
    return isinstance(data, dict) and bool(data) and "nodes" not in data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def read(path: Path) -> dict:
    """A workflow file, UI or API format; anything else is a WorkflowError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"workflow file '{path}' does not exist (or is not a file); give the path of a "
                            "workflow saved from ComfyUI (Workflow > Save or Export (API)), e.g. "
                            "workflows/demo_train_tiny.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkflowError(f"workflow file '{path}' is not JSON ({e}); save it from ComfyUI again") from None
    if isinstance(data, dict) and "prompt" in data and is_api_format(data["prompt"]):
        data = data["prompt"]  # a /prompt request body
    if not (is_api_format(data) or (isinstance(data, dict) and isinstance(data.get("nodes"), list))):
        raise WorkflowError(f"workflow file '{path}' is neither a ComfyUI workflow (UI format: a 'nodes' list) "
                            "nor an API-format prompt ({id: {class_type, inputs}})")
    return data


def to_prompt(data: dict, info: dict) -> dict:
    """An API prompt from a workflow in either format; each node's ``_meta.title`` holds its title."""
    if is_api_format(data):
        prompt = json.loads(json.dumps(data))
        unknown = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in info})
    else:
        unknown = sorted({n["type"] for n in data["nodes"]
                          if n["type"] not in SKIP_TYPES and n["type"] not in info and n.get("mode", 0) not in (2, 4)})
        prompt = None if unknown else ui_to_api(data, info)
    if unknown:
        raise WorkflowError(f"this ComfyUI has no node type {', '.join(unknown)}: install the custom nodes that "
                            "provide it (a subgraph id here means: export the workflow in API format)")
    return prompt


def _kind(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


def _options(spec) -> list | None:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] if isinstance(spec[0], list) else (opts.get("options") if spec[0] == "COMBO" else None)


def describe_input(name: str, spec) -> str:
    kind = _kind(spec)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "COMBO":
        options = _options(spec) or []
        shown = ", ".join(map(str, options[:6])) + (", ..." if len(options) > 6 else "")
        return f"{name} (one of: {shown})"
    if kind in ("INT", "FLOAT"):
        return f"{name} ({kind} {opts.get('min', '-inf')}..{opts.get('max', 'inf')})"
    if kind in WIDGET_TYPES:
        return f"{name} ({kind})"
    return f"{name} (a {kind} connection)"


def node_label(nid: str, node: dict, info: dict) -> str:
    """``13 'Train Steps'``, or ``10 'timestep density' (Preview Image)`` for a node with its own title."""
    t = node["class_type"]
    display = info.get(t, {}).get("display_name") or t
    title = (node.get("_meta") or {}).get("title") or display
    return f"{nid} '{title}'" + (f" ({display})" if display != title else "")


def find_node(prompt: dict, info: dict, ref: str) -> str:
    """The id of the node ``ref`` names: its id, title, display name or type (exact, then ignoring case)."""
    if ref in prompt:
        return ref
    def keys(nid):
        n = prompt[nid]
        t = n["class_type"]
        return [(n.get("_meta") or {}).get("title"), info.get(t, {}).get("display_name"), t]
    for fold in (str, str.casefold):
        hits = [nid for nid in prompt if any(k is not None and fold(k) == fold(ref) for k in keys(nid))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"'{ref}' names {len(hits)} nodes: "
                                f"{'; '.join(node_label(h, prompt[h], info) for h in hits)}. Use the node id.")
    listing = "; ".join(node_label(nid, prompt[nid], info) for nid in sorted(prompt, key=_id_order))
    raise WorkflowError(f"no node '{ref}' in the workflow; give a node id, title, display name or type. "
                        f"Nodes: {listing}")


def _id_order(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def coerce(value: str, spec, where: str):
    """``value`` (command-line text) as the input's type, inside its range or options."""
    kind = _kind(spec)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "COMBO":
        options = _options(spec) or []
        for o in options:
            if str(o) == value:
                return o
        shown = ", ".join(map(str, options[:40])) + (f", ... ({len(options)} in all)" if len(options) > 40 else "")
        raise WorkflowError(f"{where}: '{value}' is not one of the choices: {shown or '(none installed)'}")
    if kind == "BOOLEAN":
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise WorkflowError(f"{where}: '{value}' is not a boolean; use true or false")
    if kind in ("INT", "FLOAT"):
        try:
            v = int(value) if kind == "INT" else float(value)
        except ValueError:
            raise WorkflowError(f"{where}: '{value}' is not {'an integer' if kind == 'INT' else 'a number'}") from None
        if kind == "FLOAT" and not math.isfinite(v):
            raise WorkflowError(f"{where}: '{value}' is not a finite number")
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise WorkflowError(f"{where}: {value} is outside its range {lo}..{hi}")
        return v
    if kind == "STRING":
        return value
    raise WorkflowError(f"{where} is a {kind} connection, not a value; connect it in the graph instead")


def parse_set(item: str) -> tuple[str, str, str]:
    """``"NODE.INPUT=VALUE"`` -> (NODE, INPUT, VALUE); the node part may contain dots, the input name cannot."""
    key, eq, value = item.partition("=")
    ref, dot, name = key.rpartition(".")
    if not eq or not dot or not ref.strip() or not name.strip():
        raise WorkflowError(f"--set '{item}' is not NODE.INPUT=VALUE (e.g. --set \"Train Steps.steps=20\")")
    return ref.strip(), name.strip(), value


def apply_sets(prompt: dict, info: dict, sets: list[str]) -> dict:
    """A copy of ``prompt`` with each ``NODE.INPUT=VALUE`` applied (NODE: id, title, display name or type)."""
    prompt = json.loads(json.dumps(prompt))
    for item in sets:
        ref, name, value = parse_set(item)
        nid = find_node(prompt, info, ref)
        node = prompt[nid]
        label = node_label(nid, node, info)
        names = _order(info, node["class_type"])
        if name not in names:
            listing = ", ".join(describe_input(n, _spec(info, node["class_type"], n)) for n in names)
            raise WorkflowError(f"node {label} has no input '{name}'. Its inputs: {listing}")
        current = node["inputs"].get(name)
        if isinstance(current, list) and len(current) == 2 and isinstance(current[0], str):
            src = prompt.get(current[0])
            raise WorkflowError(f"input '{name}' of node {label} is connected to node "
                                f"{node_label(current[0], src, info) if src else current[0]}; --set changes "
                                "values typed into a node, not connections")
        node["inputs"][name] = coerce(value, _spec(info, node["class_type"], name), f"input '{name}' of node {label}")
    return prompt


def output_targets(prompt: dict, info: dict, refs: list[str]) -> list[str]:
    """Ids of the output nodes ``refs`` name (for ``--only``: run just what they need)."""
    outputs = [nid for nid, n in prompt.items() if info.get(n["class_type"], {}).get("output_node")]
    ids = []
    for ref in refs:
        nid = find_node(prompt, info, ref)
        if nid not in outputs:
            listing = "; ".join(node_label(o, prompt[o], info) for o in sorted(outputs, key=_id_order))
            raise WorkflowError(f"--only '{ref}': node {node_label(nid, prompt[nid], info)} is not an output node; "
                                f"output nodes: {listing}")
        ids.append(nid)
    return ids
