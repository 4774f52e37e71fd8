"""Nodes: datasets and caches (Dataset, Cache Latents, Cache Text Embeddings). See docs/data.md."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..aligned_trainer import imaging, paths
from ..aligned_trainer.data import cache
from ..aligned_trainer.data.buckets import BucketConfig
from ..aligned_trainer.data.captions import CaptionConfig
from ..aligned_trainer.data.images import DataError
from ..aligned_trainer.data.dataset import from_folder, from_images, guarded_fingerprint
from ..aligned_trainer.data.video import VideoConfig, from_video_folder, parse_frame_buckets
from ._common import NodeProgress, category, node_id

CAT = category("Data")
DATASET = io.Custom("AT_DATASET")
LATENT_CACHE = io.Custom("AT_LATENT_CACHE")
TRAINING_SET = io.Custom("AT_TRAINING_SET")


def report_image(rep: dict):
    rows = [[f"bucket {b}", str(n)] for b, n in rep["per_bucket"].items()]
    rows += [["caption words min/mean/max", f"{rep['caption_words']['min']}/{rep['caption_words']['mean']}/"
                                            f"{rep['caption_words']['max']}"]]
    rows += [["caption tags min/mean/max", f"{rep['caption_tags']['min']}/{rep['caption_tags']['mean']}/"
                                           f"{rep['caption_tags']['max']}"],
             ["distinct caption variants (all cached)", str(rep["caption_variants"]["distinct"])]]
    rows += [[f"tag: {t}", str(n)] for t, n in rep["tag_frequency"][:15]]
    rows += [[f"control images: {c['folder']}", str(c["control_images"])] for c in rep.get("control_folders", [])]
    rows += [[n, ""] for n in rep["notes"][:10]]
    return imaging.table_image(["", "count"], rows, title=f"Dataset: {rep['images']} images, {rep['items']} items",
                               first_col_width=420, col_width=80)


class Dataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("Dataset"), display_name="Dataset", category=CAT,
            description="Images + captions, bucketed by aspect ratio, with caption processing. Reads a folder "
                        "(kohya N_name repeat folders, .txt captions) or images and captions from the graph.",
            inputs=[
                io.String.Input("folder", default="dataset", tooltip="Folder of images with .txt captions, relative to "
                                "ComfyUI's input folder (choose or upload one with the picker below the node's inputs), "
                                "or inside a folder the server admin allowed in aligned_trainer_allowed_folders.json. "
                                "15-50 images are typical for a character. Ignored when images are connected."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training resolution: square bucket side, and resolution^2 is the bucket area limit. "
                                     "The family's native size: 512 for SD1.5, 768 for SD2.x, 1024 for SDXL, SD3.5 and FLUX.1 "
                                     "(768 saves memory)."),
                io.Int.Input("min_side", default=256, min=64, max=4096, step=64, tooltip="Smallest bucket side."),
                io.Int.Input("max_side", default=1024, min=64, max=8192, step=64, tooltip="Largest bucket side."),
                io.Int.Input("bucket_step", default=64, min=8, max=256, step=8, tooltip="Bucket sides are multiples of this."),
                io.String.Input("trigger_word", default="", tooltip="A rare token put first in every caption (kept first when shuffling), "
                                                         "e.g. 'ohwx'; use it in prompts to call the concept."),
                io.Boolean.Input("shuffle_tags", default=False, tooltip="Shuffle comma-separated tags in caption variants (kohya shuffle caption): "
                                                         "on for tag-style captions, off for sentences."),
                io.Int.Input("keep_tokens", default=1, min=0, max=32, tooltip="Leading tags that never move or drop."),
                io.Float.Input("tag_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Chance to drop each non-kept tag in a caption variant."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Chance per training step to train on the empty caption instead. 0 for most "
                                       "LoRAs; 0.05-0.1 makes the concept appear without its trigger word."),
                io.Int.Input("caption_variants", default=1, min=1, max=64,
                             tooltip="Processed variants per caption, encoded once and picked per step."),
                io.Boolean.Input("flip", default=False, tooltip="Add a mirrored copy of each image."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the caption variants."),
                io.String.Input("reg_folder", default="", optional=True,
                                tooltip="Optional regularization/class images folder (same layout and same allowed "
                                        "folders as 'folder')."),
                io.Float.Input("reg_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Loss weight of regularization images."),
                io.Image.Input("images", optional=True, tooltip="Images from the graph instead of a folder."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="One caption per line, one line per graph image."),
                io.Int.Input("max_pixels", default=0, min=0, max=64 * 1024 * 1024, step=4096, optional=True,
                             tooltip="Largest bucket area in pixels; 0 = resolution x resolution."),
                io.Combo.Input("kind", options=["images", "video"], default="images", optional=True,
                               tooltip="images: a folder of images. video: a folder of clips (mp4, webm, mov, mkv, "
                                       "animated gif, or sub-folders of numbered frames) with .txt captions, for video "
                                       "models (Wan); still images in it become one-frame samples. See docs/video.md."),
                io.Int.Input("frames", default=17, min=1, max=257, optional=True,
                             tooltip="video: frames per clip sample, rounded down to what the VAE takes (Wan: 4k+1, "
                                     "e.g. 17, 33, 81). Clips shorter than frames/fps seconds are refused."),
                io.Float.Input("fps", default=16.0, min=0.5, max=120.0, step=0.5, optional=True,
                               tooltip="video: frames are taken at this rate from each clip's start (Wan 2.1/2.2: "
                                       "16)."),
                io.Float.Input("frame_folder_fps", default=16.0, min=0.5, max=120.0, step=0.5, optional=True,
                               tooltip="video: the rate a sub-folder of frames was captured at."),
                io.String.Input("frame_buckets", default="", optional=True,
                                tooltip="video: frame counts to bucket clips by, e.g. '17, 33, 49' (each rounded down "
                                        "to 4k+1): each clip trains at the longest count it is long enough for, and "
                                        "only clips of one count and one size are batched together. Empty: every "
                                        "clip at 'frames'."),
                io.String.Input("control_folder", default="", multiline=True, optional=True,
                                tooltip="Image-edit training (FLUX.1 Kontext, FLUX.2): a folder of control (input) "
                                        "images, one per training image with the same file name stem (photo_01.png "
                                        "-> photo_01.jpg here), in the same allowed folders as 'folder'. Several "
                                        "folders, one per line, give each target several control images, in line "
                                        "order (as chained ReferenceLatent nodes). Each is resized and cropped to "
                                        "its training image's bucket and given to the model as a reference image, "
                                        "as ComfyUI's ReferenceLatent node does; the caption is the edit "
                                        "instruction. Empty: ordinary training. Images from the graph and video "
                                        "datasets take no control images. See docs/data.md."),
            ],
            outputs=[DATASET.Output("dataset", tooltip="The dataset (for Cache Latents)."),
                     io.String.Output("report", tooltip="Images per bucket, caption stats, tag frequency, notes."),
                     io.Image.Output("report_image", tooltip="The report as a table.")],
        )

    @classmethod
    def execute(cls, folder, resolution, min_side, max_side, bucket_step, trigger_word, shuffle_tags, keep_tokens,
                tag_dropout, caption_dropout, caption_variants, flip, seed, reg_folder="", reg_weight=1.0,
                images=None, captions="", max_pixels=0, kind="images", frames=17, fps=16.0,
                frame_folder_fps=16.0, frame_buckets="", control_folder="") -> io.NodeOutput:
        ccfg = CaptionConfig(trigger_word.strip(), shuffle_tags, keep_tokens, tag_dropout, caption_dropout, caption_variants)
        bcfg = BucketConfig(resolution, min_side, max(max_side, resolution), bucket_step, max_pixels or None)
        if control_folder.strip() and (images is not None or kind == "video"):
            raise DataError("control_folder (image-edit training) works with a folder of images: disconnect 'images' "
                            "and set kind to 'images', or clear control_folder.")
        if images is not None:
            lines = captions.rstrip("\r\n").replace("\r\n", "\n").split("\n") if captions.strip() else []
            ds = from_images(images, lines, ccfg, bcfg, flip, seed)
        elif kind == "video":
            roots, root, _ = paths.dataset_folders(folder)
            vcfg = VideoConfig(frames=frames, fps=fps, frame_folder_fps=frame_folder_fps,
                               frame_buckets=parse_frame_buckets(frame_buckets))
            ds = from_video_folder(root, ccfg, bcfg, vcfg, flip, seed, roots, reg_folder=reg_folder)
        else:
            roots, root, reg = paths.dataset_folders(folder, reg_folder)
            ds = from_folder(root, ccfg, bcfg, flip, seed, reg, reg_weight, roots,
                             control_folder=paths.control_folders(control_folder))
        rep = ds.report()
        return io.NodeOutput(ds, json.dumps(rep, indent=1), report_image(rep))

    @classmethod
    def fingerprint_inputs(cls, folder="", reg_folder="", images=None, control_folder="", **kwargs):
        """Run again when a file in the dataset folders (and the control folder) is added, removed or edited."""
        if images is not None:
            return ""
        return guarded_fingerprint(folder, reg_folder, control_folder or "")


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("CacheLatents"), display_name="Cache Latents", category=CAT,
            description="VAE-encodes every dataset item once into an on-disk cache reused across runs.",
            inputs=[DATASET.Input("dataset", tooltip="From the Dataset node."),
                    io.Vae.Input("vae", tooltip="The VAE of the model you train."),
                    io.Boolean.Input("unload_vae", default=True, optional=True,
                                     tooltip="Unload the VAE after caching to free memory for training.")],
            outputs=[LATENT_CACHE.Output("latents", tooltip="Cached latents (for Cache Text Embeddings)."),
                     io.String.Output("info", tooltip="Cache folder, hits and misses.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, dataset, vae, unload_vae=True) -> io.NodeOutput:
        prog = NodeProgress(len(dataset.items), cls.hidden.unique_id)
        lc = cache.cache_latents(dataset, vae, progress=lambda n, t: prog(n, t), unload=unload_vae)
        hits, misses, repaired = lc.stats
        return io.NodeOutput(lc, f"{lc.root}: {hits} cached, {misses} encoded, {repaired} repaired")


class CacheTextEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("CacheTextEmbeddings"), display_name="Cache Text Embeddings", category=CAT,
            description="Encodes every caption variant (and the empty caption) once, caches it on disk, then "
                        "lets the text encoder leave memory.",
            inputs=[LATENT_CACHE.Input("latents", tooltip="From Cache Latents."),
                    io.Clip.Input("clip", tooltip="The (aligned) CLIP to encode captions with."),
                    io.Boolean.Input("unload_text_encoder", default=True,
                                     tooltip="Unload the text encoder after caching to free memory for training."),
                    io.Combo.Input("quantize", options=["none", "int8", "int4"], default="none", optional=True,
                                   tooltip="Encode captions with the text encoders' Linear weights quantized "
                                           "(optimum-quanto, made around ComfyUI's load, undone afterwards) so "
                                           "large encoders such as T5-XXL fit small cards. int8 stays within "
                                           "~1 % of the full-precision embeddings, int4 further away; cached "
                                           "apart from full-precision embeddings. 'none' is the aligned reference.")],
            outputs=[TRAINING_SET.Output("training_set", tooltip="Latents + conditionings, ready for Train Init."),
                     io.String.Output("info", tooltip="Cache folder, hits and misses.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, latents, clip, unload_text_encoder, quantize="none") -> io.NodeOutput:
        n = len({c for i in latents.dataset.items for c in i.captions} | {""})
        prog = NodeProgress(n, cls.hidden.unique_id)
        ts, (hits, misses, repaired) = cache.cache_text(latents, clip, progress=lambda k, t: prog(k, t),
                                                         unload=unload_text_encoder, quantize=quantize)
        return io.NodeOutput(ts, f"{ts.meta['text_cache']}: {hits} cached, {misses} encoded, {repaired} repaired")


NODES = [Dataset, CacheLatents, CacheTextEmbeddings]
