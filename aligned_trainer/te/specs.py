"""Load and validate the per-family text-encoder specs in ``te_specs/`` (data, not code)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SPEC_DIR = Path(__file__).resolve().parents[2] / "te_specs"
SCHEMA_FILE = SPEC_DIR / "schema.json"


class SpecError(ValueError):
    """A spec file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class EncoderSpec:
    raw: dict

    @property
    def key(self) -> str:
        return self.raw["comfy_key"]

    @property
    def attr(self) -> str:
        return self.raw["comfy_attr"]

    def __getitem__(self, name: str) -> Any:
        """The value of a field (``spec["max_length"]`` -> 77); absent optional fields give None."""
        entry = self.raw.get(name)
        return entry["value"] if isinstance(entry, dict) else entry


@dataclass(frozen=True)
class TESpec:
    id: str
    name: str
    raw: dict
    path: Path
    hash: str

    @property
    def encoders(self) -> tuple[EncoderSpec, ...]:
        return tuple(EncoderSpec(e) for e in self.raw["encoders"])

    @property
    def variant(self) -> str:
        return self.raw.get("variant_of", self.id)

    def identity(self) -> dict:
        return {"id": self.id, "variant": self.variant, "hash": self.hash}

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=1)


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _field(error) -> str:
    path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        return f"{path} (unknown key)"
    if error.validator == "required":
        return f"{path} (missing required key)"
    return path


def parse_spec(data: dict, path: Path) -> TESpec:
    errors = sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        lines = [f"  field {_field(e)}: {e.message}" for e in errors[:8]]
        raise SpecError(f"invalid text-encoder spec {path}:\n" + "\n".join(lines) +
                        f"\nFix the file so it follows {SCHEMA_FILE} (every value needs a 'source').")
    expected = path.stem
    if data["id"] != expected:
        raise SpecError(f"invalid text-encoder spec {path}: field id is '{data['id']}' but the file is named "
                        f"'{expected}.json'; rename one of them.")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return TESpec(id=data["id"], name=data["name"], raw=data, path=path, hash=digest)


def load_spec_file(path: Path) -> TESpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid text-encoder spec {path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"invalid text-encoder spec {path}: the top level must be an object")
    return parse_spec(data, path)


def spec_files(folder: Path = SPEC_DIR) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.json") if p.name != SCHEMA_FILE.name)


@lru_cache(maxsize=None)
def _all_specs(folder: str) -> dict[str, TESpec]:
    return {s.id: s for s in (load_spec_file(p) for p in spec_files(Path(folder)))}


def all_specs() -> dict[str, TESpec]:
    return _all_specs(str(SPEC_DIR))


def list_spec_ids() -> list[str]:
    return sorted(all_specs())


def get_spec(spec_id: str) -> TESpec:
    specs = all_specs()
    if spec_id not in specs:
        raise SpecError(f"unknown text-encoder spec '{spec_id}'; known: {', '.join(sorted(specs))}. "
                        f"Add te_specs/{spec_id}.json to define it.")
    return specs[spec_id]


def matching_specs(clip) -> list[TESpec]:
    """Specs whose ``comfy_match.tokenizer_class`` names this CLIP's tokenizer class (default first)."""
    cls = type(clip.tokenizer).__name__
    found = [s for s in all_specs().values() if cls in s.raw["comfy_match"]["tokenizer_class"]]
    return sorted(found, key=lambda s: (not s.raw["comfy_match"].get("default", False), s.id))


def detect_spec(clip) -> TESpec:
    found = matching_specs(clip)
    if not found:
        raise SpecError(f"no text-encoder spec matches this CLIP (tokenizer {type(clip.tokenizer).__name__}); "
                        "pick a spec explicitly or add a te_specs/ file whose comfy_match lists that class.")
    return found[0]
