"""A video dataset through the real server: the Dataset node (kind video) reads clips from the input folder and
Cache Latents encodes them with the tiny Wan 2.1 VAE loaded by the stock VAELoader; an image VAE and a bad clip
are refused with errors that name the problem."""
from __future__ import annotations

import json

import pytest

from support.api_nodes import execution_error, node
from support.factories import clips, wan

VAE = "tiny-wan21-vae.safetensors"


@pytest.fixture(scope="module")
def srv(family_server):
    link = family_server.base / "models" / "vae" / VAE
    if not link.exists():
        link.symlink_to(wan.vae_file())
    data = family_server.input_dir / "wan_clips"
    if not data.exists():
        clips.write_clip(data / "walk.webm", 12, 30, size=(48, 32), caption="ohwx walking")
        clips.write_clip(data / "turn", 9, 16, size=(48, 32), caption="ohwx turning")  # a folder of frames
    return family_server


def _prompt(srv, folder: str, vae: str, **dataset) -> dict:
    return {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "2": node(srv, "AlignedTrainer_Dataset", folder=folder, kind="video", frames=8, fps=16.0, resolution=64,
                  min_side=64, max_side=64, **dataset),
        "3": node(srv, "AlignedTrainer_CacheLatents", dataset=["2", 0], vae=["1", 0]),
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }


def test_video_dataset_and_latents_through_the_server(srv):
    entry = srv.run(_prompt(srv, "wan_clips", VAE))
    report = json.loads(entry["outputs"]["4"]["text"][0])
    assert report["clips"] == 2 and report["per_frame_count"] == {"5": 2} and report["video"]["frames"] == 5
    assert report["per_bucket"] == {"64x64": 2}
    assert "0 cached, 2 encoded" in entry["outputs"]["5"]["text"][0]
    again = srv.run(_prompt(srv, "wan_clips", VAE, seed=1))  # another dataset run: latents come from the cache
    assert "2 cached, 0 encoded" in again["outputs"]["5"]["text"][0]


def test_image_vae_and_short_clip_are_refused(srv):
    err = execution_error(srv, _prompt(srv, "wan_clips", "tiny-flux1-ae.safetensors"))
    assert err["node_type"] == "AlignedTrainer_CacheLatents" and "encodes still images" in err["exception_message"]
    short = srv.input_dir / "wan_short"
    if not short.exists():
        clips.write_clip(short / "blink.mp4", 3, 30, caption="too short")
    err = execution_error(srv, _prompt(srv, "wan_short", VAE))
    assert err["node_type"] == "AlignedTrainer_Dataset"
    assert "blink.mp4 is too short" in err["exception_message"] and "Lower the frame count" in err["exception_message"]


def test_frame_buckets_through_the_dataset_node(srv):
    """Dataset's frame_buckets through the server: the 0.4 s clip trains at 5 frames, the 9-frame folder at 9 (the
    longest bucket each covers); an entry that is not a number is refused naming it."""
    def prompt(buckets):
        return {"2": node(srv, "AlignedTrainer_Dataset", folder="wan_clips", kind="video", frames=5, fps=16.0,
                          resolution=64, min_side=64, max_side=64, frame_buckets=buckets),
                "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}

    report = json.loads(srv.run(prompt("5, 9"))["outputs"]["4"]["text"][0])
    assert report["per_frame_count"] == {"5": 1, "9": 1} and report["video"]["frame_buckets"] == [5, 9]
    err = execution_error(srv, prompt("5, nine"))
    assert err["node_type"] == "AlignedTrainer_Dataset" and "frame_buckets: 'nine'" in err["exception_message"]
