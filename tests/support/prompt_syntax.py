"""Prompts written in ComfyUI's prompt syntax (and things that look like it), for the literal-reading checks, and
an embeddings folder set up the way a user's ComfyUI has one."""
from __future__ import annotations

from pathlib import Path

import torch

# the plain prompts every text-encoder parity test starts from (each adds its over-length prompt and its family's cases)
BASE_PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    "unicode": "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "newlines": "line one\nline two\n\n  spaced   out  ",
}
SYNTAX_PROMPTS = {
    "tags": "1girl, hat (object), solo",
    "weighted": "a (red:1.3) circle, (blue:0.7) background",
    "nested": "((masterpiece)), (((best quality))), ((a (cat:0.8) sitting))",
    "square": "[faded] photo, [[old film]], [a|b] frame",
    "escaped": "\\(cat\\) on a mat, back\\slash \\\\(x\\\\)",
    "embedding": "embedding:tiny_emb, a dog\nembedding:tiny_emb on grass",
    "url": "see https://en.wikipedia.org/wiki/Cat_(animal) and (https://example.com/a_(b))",
    # found while reading token_weights: a number after the last ':' inside brackets is a weight, whatever it meant
    "time": "meeting at (12:30), smile (:3) (^_^)",
    "unbalanced": "a (cat, a dog) ) and (bird",
    "colon_text": "(style: noir), (a:b:1.2)",
}
EMBEDDING_NAME = "tiny_emb"


def embeddings_folder(base: Path, sizes: dict[str, int]) -> list[str]:
    """A real textual-inversion file (``tiny_emb.safetensors``, two vectors per encoder key) in a folder
    registered as ComfyUI's ``embeddings`` model folder; returns what the stock loaders pass as
    ``embedding_directory`` (``folder_paths.get_folder_paths("embeddings")``)."""
    import folder_paths
    import safetensors.torch

    folder = Path(base) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    safetensors.torch.save_file({k: torch.randn(2, n, generator=g) for k, n in sizes.items()},
                                str(folder / f"{EMBEDDING_NAME}.safetensors"))
    folder_paths.add_model_folder_path("embeddings", str(folder))
    return folder_paths.get_folder_paths("embeddings")
