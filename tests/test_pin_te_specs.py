"""Spec loading and prompt syntax pinned to hand-built data (issue #26): variant merging, default variant order,
hashes, error messages that name the file and field, detection order by class hierarchy and ``default``, and
ComfyUI's prompt syntax as the report describes it (segments, weights, embedding names). In-process, no models."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.paths import REPO


@pytest.fixture(scope="module")
def S(comfy):
    return comfy.engine("te.specs")


@pytest.fixture(scope="module")
def X(comfy):
    return comfy.engine("te.syntax")


def _sd3() -> dict:
    return json.loads((REPO / "te_specs" / "sd3.json").read_text())


def _write(tmp_path: Path, data, name: str) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# -- variants ---------------------------------------------------------------------------------------------------
def test_variant_merge_replaces_fields_per_encoder(S, tmp_path):
    data = _sd3()
    data["id"] = "v"
    ref = {"value": "a test of the merge", "source": "a test of the merge"}
    data["variants"] = {
        "plain": {"name": data["name"], "reference": ref},
        "long": {"default": True, "name": "Long T5", "reference": ref,
                 "encoders": {"t5xxl": {"max_length": {"value": 300, "source": "a test of the merge"}}}},
    }
    before = json.dumps(data, sort_keys=True)
    specs = S.load_spec_variants(_write(tmp_path, data, "v.json"))
    assert json.dumps(data, sort_keys=True) == before  # the file's data is not changed by merging
    assert [s.variant for s in specs] == ["long", "plain"]  # the default variant first, then file order
    long, plain = specs
    assert long.key == "v:long" and plain.key == "v:plain" and long.identity() == {"id": "v", "variant": "long",
                                                                                   "hash": long.hash}
    assert long.raw["name"] == long.name == "Long T5" and plain.raw["name"] == data["name"]
    assert long.raw["reference"] == ref and long.raw["why"] == data["why"]
    assert "variants" not in long.raw and "default" not in long.raw
    t5 = {s.variant: next(e for e in s.encoders if e.key == "t5xxl") for s in specs}
    file_t5 = S.EncoderSpec(next(e for e in data["encoders"] if e["comfy_key"] == "t5xxl"))
    assert t5["long"]["max_length"] == 300 and t5["plain"]["max_length"] == file_t5["max_length"] != 300
    others = [e.key for e in long.encoders if e.key != "t5xxl"]
    assert others and all(a.raw == b.raw for a, b in zip([e for e in long.encoders if e.key != "t5xxl"],
                                                         [e for e in plain.encoders if e.key != "t5xxl"]))
    assert long.hash != plain.hash and len(long.hash) == 16
    assert S.load_spec_variants(_write(tmp_path, data, "v.json"))[0].hash == long.hash  # stable
    assert json.loads(long.to_json()) == long.raw
    reordered = {k: data[k] for k in reversed(list(data))}  # the same spec, keys in another order
    again = S.load_spec_variants(str(_write(tmp_path, reordered, "v.json")))  # a str path is accepted too
    assert [s.hash for s in again] == [s.hash for s in specs]  # the hash is of the content, not the layout
    assert S.parse_spec(data, tmp_path / "v.json").variant == "long"


def test_spec_without_variants_is_the_default_variant(S):
    spec = S.get_spec("sd15")
    assert spec.variant == S.DEFAULT_VARIANT and spec.key == "sd15" and spec.raw is not None
    assert S.get_spec("sd3").variant == "reference" and S.get_spec("sd3:diffusers").variant == "diffusers"
    assert S.all_specs()["sd3"].variant == "reference" and S.all_specs()["sd35"].variant == "large"
    assert "sd3" not in S.list_spec_ids() and "sd15" in S.list_spec_ids() and "sd3:reference" in S.list_spec_ids()
    with pytest.raises(S.SpecError, match=r"'sd3:nope'.*te_specs/sd3\.json"):
        S.get_spec("sd3:nope")
    enc = S.EncoderSpec({"a": {"value": 3, "source": "x"}, "b": 4})
    assert (enc["a"], enc["b"], enc["missing"]) == (3, 4, None)


def test_two_default_variants_are_refused(S, tmp_path):
    data = _sd3()
    data["id"] = "two"
    for v in data["variants"].values():
        v["default"] = True
    with pytest.raises(S.SpecError, match=r"two\.json.*several variants are default \(reference, diffusers\)"):
        S.load_spec_variants(_write(tmp_path, data, "two.json"))


# -- error messages ----------------------------------------------------------------------------------------------
def test_errors_name_the_field(S, tmp_path):
    data = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    del data["name"]
    with pytest.raises(S.SpecError) as e:
        S.load_spec_file(_write(tmp_path, data, "sd15.json"))
    assert "field (top level) (missing required key): 'name' is a required property" in str(e.value)
    data = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    for i in range(12):
        data["encoders"][0][f"typo{i}"] = 1
    with pytest.raises(S.SpecError) as e:
        S.load_spec_file(_write(tmp_path, data, "sd15.json"))
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("  field ")]
    assert len(lines) == 1 and "encoders/0 (unknown key)" in lines[0]
    data = json.loads((REPO / "te_specs" / "sd15.json").read_text())
    for k in ("max_length", "padding", "pad_token", "template", "cleaning", "char_cap", "min_length", "pooled",
              "hidden_layer", "zero_padded"):
        data["encoders"][0][k]["value"] = [1]
    with pytest.raises(S.SpecError) as e:
        S.load_spec_file(_write(tmp_path, data, "sd15.json"))
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("  field ")]
    assert len(lines) == 8 and "(every value needs a 'source')" in str(e.value)


def test_unreadable_files_are_named(S, tmp_path):
    with pytest.raises(S.SpecError, match=r"broken\.json: not valid JSON at line 3"):
        S.load_spec_file(_write(tmp_path, '{\n "id": "broken",\n oops\n}', "broken.json"))
    with pytest.raises(S.SpecError, match=r"list\.json: the top level must be an object"):
        S.load_spec_file(_write(tmp_path, "[1, 2]", "list.json"))
    assert [p.name for p in S.spec_files()] == sorted(p.name for p in (REPO / "te_specs").glob("*.json")
                                                     if p.name != "schema.json")


# -- detection ------------------------------------------------------------------------------------------------
def _clip_of(*names):
    """A stand-in CLIP whose tokenizer class hierarchy is ``names`` (most derived first): detection only reads
    class names."""
    base = object
    for n in reversed(names):
        base = type(n, (base,), {})
    return SimpleNamespace(tokenizer=base(), cond_stage_model=None)


def test_detection_prefers_the_most_specific_class_then_default(S):
    assert [s.id for s in S.matching_specs(_clip_of("SD2Tokenizer", "SD1Tokenizer"))] == ["sd2x", "sd15"]
    assert [s.id for s in S.matching_specs(_clip_of("MyTokenizer", "SD1Tokenizer"))] == ["sd15"]
    assert [s.id for s in S.matching_specs(_clip_of("PixArtTokenizer"))] == ["pixart-sigma", "chroma"]
    assert [s.id for s in S.matching_specs(_clip_of("SD3Tokenizer"))] == ["sd3", "sd35"]
    assert S.detect_spec(_clip_of("SD2Tokenizer", "SD1Tokenizer")).id == "sd2x"
    with pytest.raises(S.SpecError, match="tokenizer NoSuchTokenizer"):
        S.detect_spec(_clip_of("NoSuchTokenizer"))


# -- prompt syntax ---------------------------------------------------------------------------------------------
def test_comfy_segments_and_changes(X):
    assert X.comfy_segments("a (red:1.5) \\(circle\\)") == [("a ", 1.0), ("red", 1.5), (" (circle)", 1.0)]
    assert X.comfy_segments("((b))") == [("b", pytest.approx(1.21))]
    assert X.comfy_changes("a plain caption") == []
    changes = X.comfy_changes("a (red:1.5) circle")
    assert changes == ["weights: 'red' x1.5", "text seen: 'a red circle' (brackets, weight numbers or backslashes "
                       "removed)", "tokenized in 3 separate segments"]
    assert X.comfy_changes("(red:1.5) circle")[-1] == "tokenized in 2 separate segments"
    assert X.comfy_changes("x \\(y\\)") == ["text seen: 'x (y)' (brackets, weight numbers or backslashes removed)"]
    emb = X.comfy_changes("embedding:foo a cat")
    assert emb == ["textual-inversion names (replaced by the file, or dropped when missing, when the CLIP has an "
                   "embeddings folder): foo"]


def test_embedding_names_follow_comfyui_split(X):
    assert X.embedding_names("embedding:foo, a cat") == ["foo,"]
    assert X.embedding_names("a embedding:foo b\nembedding:bar") == ["foo", "bar"]
    assert X.embedding_names("aembedding:foo") == []
    assert X.embedding_names("a embedding:embedding:x") == ["embedding:x"]  # ComfyUI looks up 'embedding:x'
  # only at the start or after a space/newline
    assert X.embedding_names("a embedding:") == []


def test_describe_and_check(X):
    text = "a (red:1.5) circle"
    lit, com = X.describe(text, "literal"), X.describe(text, "comfyui")
    assert lit == {"syntax": "literal", "changes": [], "comfyui_would": X.comfy_changes(text)}
    assert com == {"syntax": "comfyui", "changes": X.comfy_changes(text), "comfyui_would": X.comfy_changes(text)}
    assert X.check("literal") == "literal" and X.check("comfyui") == "comfyui"
    with pytest.raises(X.SyntaxChoiceError, match="'Literal'.*literal, comfyui"):
        X.check("Literal")
