"""API-format prompt nodes for a real server: every widget at its /object_info default, then the caller's inputs."""
from __future__ import annotations

_INFO: dict = {}


def object_info(srv) -> dict:
    if srv.url not in _INFO:
        _INFO[srv.url] = srv.get("/object_info")
    return _INFO[srv.url]


def node(srv, class_type: str, **inputs) -> dict:
    spec = object_info(srv)[class_type]["input"]
    out = {}
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(s[0], list) and section == "required":
                out[name] = s[0][0]
    out.update(inputs)
    return {"class_type": class_type, "inputs": out}


def execution_error(srv, prompt: dict, timeout: float = 300) -> dict:
    """Run a prompt that must fail; return ComfyUI's execution_error record (node_type, exception_message)."""
    entry = srv.wait(srv.queue(prompt), timeout)
    errs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errs, str(entry["status"])[:2000]
    return errs[0]
