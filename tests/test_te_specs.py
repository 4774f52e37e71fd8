"""te_specs/: every file validates, bad files fail naming the file and the field, detection is data-driven."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.paths import REPO

SPEC_FILES = sorted(p for p in (REPO / "te_specs").glob("*.json") if p.name != "schema.json")


def test_required_families_present():
    ids = {p.stem for p in SPEC_FILES}
    core = {"sd15", "sd2x", "sdxl", "sd3", "sd35", "flux1-dev", "flux1-schnell"}
    assert core <= ids
    assert len(ids - core) >= 2


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_every_spec_file_validates_and_names_sources(comfy, path):
    specs = comfy.engine("te.specs")
    spec = specs.load_spec_file(path)
    assert spec.id == path.stem
    for enc in spec.encoders:
        for field, entry in enc.raw.items():
            if isinstance(entry, dict):
                assert len(entry["source"]) >= 8, f"{path.name}: {field} has no real source"


def _write(tmp_path: Path, data: dict, name: str = "bad.json") -> Path:
    data = dict(data, id=Path(name).stem)
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_bad_spec_unknown_key(comfy, tmp_path):
    specs = comfy.engine("te.specs")
    good = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    good["encoders"][0]["max_lenght"] = {"value": 77, "source": "a typo nobody checked"}
    with pytest.raises(specs.SpecError) as e:
        specs.load_spec_file(_write(tmp_path, good))
    assert "bad.json" in str(e.value) and "encoders/0" in str(e.value) and "max_lenght" in str(e.value)


def test_bad_spec_wrong_type(comfy, tmp_path):
    specs = comfy.engine("te.specs")
    good = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    good["encoders"][0]["max_length"]["value"] = "seventy-seven"
    with pytest.raises(specs.SpecError) as e:
        specs.load_spec_file(_write(tmp_path, good))
    assert "bad.json" in str(e.value) and "encoders/0/max_length/value" in str(e.value)


def test_bad_spec_missing_source(comfy, tmp_path):
    specs = comfy.engine("te.specs")
    good = json.loads((REPO / "te_specs" / "flux1-dev.json").read_text())
    del good["encoders"][1]["max_length"]["source"]
    with pytest.raises(specs.SpecError) as e:
        specs.load_spec_file(_write(tmp_path, good))
    assert "bad.json" in str(e.value) and "encoders/1/max_length" in str(e.value) and "source" in str(e.value)


def test_bad_spec_id_must_match_file_name(comfy, tmp_path):
    specs = comfy.engine("te.specs")
    data = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    p = tmp_path / "other.json"
    p.write_text(json.dumps(data))
    with pytest.raises(specs.SpecError, match="other.json"):
        specs.load_spec_file(p)


def test_detection_follows_comfy_match(comfy, sd15):
    specs = comfy.engine("te.specs")
    _, clip, _ = sd15
    assert specs.detect_spec(clip).id == "sd15"
    for spec in specs.all_specs().values():
        assert spec.raw["comfy_match"]["tokenizer_class"], spec.id
    # at most one default per tokenizer class
    seen = {}
    for spec in specs.all_specs().values():
        if spec.raw["comfy_match"].get("default"):
            for cls in spec.raw["comfy_match"]["tokenizer_class"]:
                assert cls not in seen, f"{spec.id} and {seen.get(cls)} are both default for {cls}"
                seen[cls] = spec.id


def test_variants_are_named_and_validated(comfy, tmp_path):
    specs = comfy.engine("te.specs")
    keys = specs.list_spec_ids()
    assert {"sd3:reference", "sd3:diffusers", "sd35:large", "sd35:medium"} <= set(keys)
    ref, dif = specs.get_spec("sd3"), specs.get_spec("sd3:diffusers")
    assert ref.identity()["variant"] == "reference" and dif.identity()["id"] == "sd3"
    assert ref.hash != dif.hash
    t5 = {s.variant: next(e for e in s.encoders if e.key == "t5xxl") for s in (ref, dif)}
    assert t5["reference"]["char_cap"] == 226 and t5["diffusers"]["max_length"] == 256
    bad = json.loads((REPO / "te_specs" / "sd3.json").read_text())
    bad["variants"]["diffusers"]["encoders"]["t5xxl"]["max_length"]["value"] = "long"
    with pytest.raises(specs.SpecError) as e:
        specs.load_spec_variants(_write(tmp_path, bad))
    assert "bad.json" in str(e.value) and "variant diffusers" in str(e.value) and "max_length" in str(e.value)
    bad["variants"]["diffusers"]["encoders"] = {"t5": {}}
    with pytest.raises(specs.SpecError, match="variants/diffusers/encoders/t5"):
        specs.load_spec_variants(_write(tmp_path, bad))
