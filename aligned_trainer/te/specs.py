"""Load and validate the per-family text-encoder specs in ``te_specs/`` (data, not code)."""
from __future__ import annotations

import copy
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


DEFAULT_VARIANT = "default"


@dataclass(frozen=True)
class TESpec:
    """One family's spec with one variant applied (``raw`` is the merged data, without ``variants``)."""
    id: str
    name: str
    raw: dict
    path: Path
    hash: str
    variant: str = DEFAULT_VARIANT

    @property
    def encoders(self) -> tuple[EncoderSpec, ...]:
        return tuple(EncoderSpec(e) for e in self.raw["encoders"])

    @property
    def key(self) -> str:
        """``id`` for a file without variants, ``id:variant`` otherwise (the node's combo value)."""
        return self.id if self.variant == DEFAULT_VARIANT else f"{self.id}:{self.variant}"

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


def _check(data: dict, path: Path, where: str = "") -> None:
    errors = sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        lines = [f"  field {where}{_field(e)}: {e.message}" for e in errors[:8]]
        raise SpecError(f"invalid text-encoder spec {path}:\n" + "\n".join(lines) +
                        f"\nFix the file so it follows {SCHEMA_FILE} (every value needs a 'source').")


def _merge_variant(data: dict, name: str, path: Path) -> dict:
    """The file's data with variant ``name`` applied: its top-level fields replace the file's, and its
    ``encoders`` (keyed by ``comfy_key``) replace single fields of those encoders."""
    var = data["variants"][name]
    merged = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("variants",)}
    for k, v in var.items():
        if k not in ("encoders", "default"):
            merged[k] = copy.deepcopy(v)
    by_key = {e["comfy_key"]: e for e in merged["encoders"]}
    for key, fields in var.get("encoders", {}).items():
        if key not in by_key:
            raise SpecError(f"invalid text-encoder spec {path}: field variants/{name}/encoders/{key}: no encoder "
                            f"with comfy_key '{key}' (have {', '.join(by_key)}).")
        by_key[key].update(copy.deepcopy(fields))
    return merged


def parse_specs(data: dict, path: Path) -> list[TESpec]:
    """Every variant of one spec file (one TESpec with variant ``default`` when the file has none)."""
    _check(data, path)
    expected = path.stem
    if data["id"] != expected:
        raise SpecError(f"invalid text-encoder spec {path}: field id is '{data['id']}' but the file is named "
                        f"'{expected}.json'; rename one of them.")
    variants = data.get("variants") or {}
    defaults = [n for n, v in variants.items() if v.get("default")]
    if len(defaults) > 1:
        raise SpecError(f"invalid text-encoder spec {path}: field variants: several variants are default "
                        f"({', '.join(defaults)}); mark one.")
    names = (defaults + [n for n in variants if n not in defaults]) or [DEFAULT_VARIANT]
    out = []
    for name in names:
        merged = data if name == DEFAULT_VARIANT else _merge_variant(data, name, path)
        if name != DEFAULT_VARIANT:
            _check(merged, path, where=f"(variant {name}) ")
        digest = hashlib.sha256(json.dumps([name, merged], sort_keys=True).encode()).hexdigest()[:16]
        out.append(TESpec(id=data["id"], name=merged["name"], raw=merged, path=path, hash=digest, variant=name))
    return out


def parse_spec(data: dict, path: Path) -> TESpec:
    """The default variant of a spec file's data."""
    return parse_specs(data, path)[0]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid text-encoder spec {path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"invalid text-encoder spec {path}: the top level must be an object")
    return data


def load_spec_variants(path: Path) -> list[TESpec]:
    path = Path(path)
    return parse_specs(_read(path), path)


def load_spec_file(path: Path) -> TESpec:
    """The default variant of one file (every variant is validated)."""
    return load_spec_variants(path)[0]


def spec_files(folder: Path = SPEC_DIR) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.json") if p.name != SCHEMA_FILE.name)


@lru_cache(maxsize=None)
def _all_variants(folder: str) -> dict[str, TESpec]:
    return {s.key: s for p in spec_files(Path(folder)) for s in load_spec_variants(p)}


def all_variants() -> dict[str, TESpec]:
    """Every (file, variant) by key: ``sd15``, ``sd3:reference``, ``sd3:diffusers``..."""
    return _all_variants(str(SPEC_DIR))


def all_specs() -> dict[str, TESpec]:
    """The default variant of each file, by id."""
    out = {}
    for s in all_variants().values():
        out.setdefault(s.id, s)  # a file's default variant comes first
    return out


def list_spec_ids() -> list[str]:
    """Keys for the node's combo: each file id without variants, ``id:variant`` for each variant."""
    return sorted(all_variants())


def get_spec(spec_id: str) -> TESpec:
    """``id`` (the file's default variant) or ``id:variant``."""
    variants = all_variants()
    if spec_id in variants:
        return variants[spec_id]
    if spec_id in all_specs():
        return all_specs()[spec_id]
    base = spec_id.split(":")[0]
    raise SpecError(f"unknown text-encoder spec '{spec_id}'; known: {', '.join(sorted(variants))}. "
                    f"Add te_specs/{base}.json (or a variant in it) to define it.")


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _mro_rank(obj, names) -> int | None:
    """How far up ``obj``'s class hierarchy the first class named in ``names`` sits (0 = its own class)."""
    for i, c in enumerate(type(obj).__mro__):
        if c.__name__ in names:
            return i
    return None


def matching_specs(clip) -> list[TESpec]:
    """Default variants whose ``comfy_match`` names this CLIP's tokenizer class (and, when listed, one of its
    encoder model classes). The most specific match comes first (``SD2Tokenizer`` subclasses
    ``SD1Tokenizer``: an SD2 CLIP is SD2.x, not SD1.5), then the spec marked ``default``."""
    model = _class_names(getattr(clip, "cond_stage_model", None))
    found = []
    for s in all_specs().values():
        m = s.raw["comfy_match"]
        rank = _mro_rank(clip.tokenizer, set(m["tokenizer_class"]))
        if rank is not None and (not m.get("model_class") or model & set(m["model_class"])):
            found.append((rank, not m.get("default", False), s.id, s))
    return [s for *_, s in sorted(found, key=lambda t: t[:3])]


def detect_spec(clip) -> TESpec:
    found = matching_specs(clip)
    if not found:
        raise SpecError(f"no text-encoder spec matches this CLIP (tokenizer {type(clip.tokenizer).__name__}); "
                        "pick a spec explicitly or add a te_specs/ file whose comfy_match lists that class.")
    return found[0]
