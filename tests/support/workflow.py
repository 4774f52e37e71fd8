"""ComfyUI workflows: UI format (what the frontend saves and loads) <-> API format (what /prompt takes),
and a validator. ``object_info`` is the JSON of ComfyUI's /object_info (from a server, or computed
in-process from the loaded node classes with :func:`object_info_inprocess`)."""
from __future__ import annotations

import json
from pathlib import Path

SKIP_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
               "lora_name"}


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


def ui_to_api(workflow: dict, info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
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
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": t, "inputs": inputs}
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
