"""te_specs/: every file validates, bad files fail naming the file and the field, detection is data-driven."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.paths import REPO

SPEC_FILES = sorted(p for p in (REPO / "te_specs").glob("*.json") if p.name != "schema.json")


def test_required_families_present():
    ids = {p.stem for p in SPEC_FILES}
    assert {"sd15", "sd2x", "sdxl", "sd3", "sd3-diffusers", "flux1-dev", "flux1-schnell"} <= ids
    assert len(ids - {"sd15", "sd2x", "sdxl", "sd3", "sd3-diffusers", "flux1-dev", "flux1-schnell"}) >= 2


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
