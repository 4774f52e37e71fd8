"""FLUX.2 [dev]'s text encoder (Mistral-Small-3.1, hidden states 10/20/30 stacked), shrunk and seeded.

ComfyUI side: ComfyUI's own ``comfy.text_encoders.flux`` classes unchanged (``Flux2Tokenizer`` + ``flux2_te()``,
i.e. ``Flux2TEModel`` / ``Mistral3_24BModel`` / ``llama.Mistral3Small24B``), the tiny config passed as the
``mistral3_24b_model_config`` model option, and the tokenizer data as ``comfy.sd.load_clip`` passes it
(``tokenizer_data={"tekken_model": <the file's tekken_model tensor>}``). Building that tokenizer under transformers 5
needs the pack's compatibility fix (``aligned_trainer.te.mistral_compat``), applied when the pack loads.
ComfyUI's loader only recognises a FLUX.2 Mistral by its 40 layers of width 5120, so the tiny CLIP is built through
``comfy.sd.CLIP`` with ``flux2_te()`` as the other tiny LLM factories do.

Reference side: the same weights as transformers' ``Mistral3ForConditionalGeneration`` (a tiny Pixtral vision tower,
seeded, unused by text-only prompts) and a tokenizer converted from the same tiny tekken.json by transformers'
own ``MistralConverter`` (what Mistral's HF tokenizer.json was converted from).

The tiny tekken.json keeps Mistral's layout: 20 control tokens at the ranks tekken v7 (Mistral-Small-3.1) gives
them (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``[INST]`` 3, ``[/INST]`` 4, ``[IMG]`` 10, ``<pad>`` 11,
``[SYSTEM_PROMPT]`` 17, ``[/SYSTEM_PROMPT]`` 18, ...), then byte-level BPE ranks: the 256 bytes and merges learned
here from English text (deterministic), the digit runs "10" and "100" (so that the two pre-tokenizer patterns,
tekken's single digits and transformers 4's runs of up to three, give different tokens), and a few ranks past ``default_vocab_size`` that both converters drop.
These ranks and the tiny model's weights are inputs of the comparison, not Mistral's.

ComfyUI's Llama keeps ``head_dim`` 128 as a class constant (Mistral-Small-3.1's too), so the tiny model has 2 heads
of 128 on a width of 64. It has 31 layers: ComfyUI and the pipeline read the outputs of layers 10, 20 and 30, and
with 31 the last of them is not the final (normed) one.
"""
from __future__ import annotations

import base64
import collections
import functools
import json
import re
import sys
from pathlib import Path

import torch

from . import common

# tekken v7's first control tokens (Mistral-Small-3.1-24B-Instruct-2503 tekken.json), in rank order
CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
           "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
# tekken v7's pre-tokenizer pattern (the tekken.json config.pattern; transformers' Mistral regex fix uses it too)
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_MERGES = 160
N_PAST_VOCAB = 4  # ranks past default_vocab_size: dropped by ComfyUI's loader and by transformers' converter
# text the tiny BPE merges are learned from: FLUX.2's system message and the words of the test prompts
MERGE_TEXT = ("You are an AI that reasons about image descriptions. You give structured responses focusing on object "
              "relationships, object\nattribution and actions without speculation. ohwx, a red circle on a blue "
              "background, flat colors, a photo of a cat on the grass, the word, line one line two spaced out")

# Mistral-Small-3.1-24B's text model (ComfyUI llama.Mistral3Small24BConfig / the model's text_config), shrunk:
# fewer, narrower layers and the tiny vocabulary; head_dim, rope theta and eps kept.
MISTRAL_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 31, "num_attention_heads": 2,
                "num_key_value_heads": 1, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_theta": 1000000000.0}


def _bpe_pieces() -> list[bytes]:
    """The 256 single bytes, then ``N_MERGES`` merges learned greedily from ``MERGE_TEXT`` (most frequent adjacent
    pair inside a pre-token first, ties by the earlier first occurrence): byte-level BPE ranks."""
    words = [w.encode() for w in re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z]+|\s+", MERGE_TEXT)]
    seqs = [[bytes([b]) for b in w] for w in words]
    pieces = [bytes([i]) for i in range(256)]
    for _ in range(N_MERGES):
        counts: collections.Counter = collections.Counter()
        first: dict = {}
        for seq in seqs:
            for a, b in zip(seq, seq[1:]):
                counts[(a, b)] += 1
                first.setdefault((a, b), len(first))
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -first[p]))
        merged = pair[0] + pair[1]
        pieces.append(merged)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == pair:
                    seq[i:i + 2] = [merged]
                else:
                    i += 1
    # digit runs: tekken's pattern splits numbers into single digits, transformers 4's default (ComfyUI's conversion)
    # into runs of up to 3, so these pieces make the two pre-splits give different tokens
    return pieces + [b"10", b"100"]


def tiny_tekken() -> dict:
    """A tekken.json in Mistral's layout (see the module docstring)."""
    pieces = _bpe_pieces()
    extra = [b"zzqx", b"qqzz", b"xqzq", b"zqxq"][:N_PAST_VOCAB]  # past default_vocab_size: never used
    vocab = [{"rank": r, "token_bytes": base64.b64encode(p).decode(), "token_str": None}
             for r, p in enumerate(pieces + extra)]
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(CONTROL)]
    return {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab) + len(CONTROL),
                       "default_vocab_size": len(pieces) + len(CONTROL), "default_num_special_tokens": len(CONTROL),
                       "version": "v7"},
            "vocab": vocab, "special_tokens": specials}


def tekken_bytes() -> bytes:
    return json.dumps(tiny_tekken()).encode()


def vocab_size() -> int:
    return tiny_tekken()["config"]["default_vocab_size"]


def tokenizer_data() -> dict:
    """What ``comfy.sd.load_clip`` passes FLUX.2's tokenizer: the file's ``tekken_model`` tensor (uint8 bytes)."""
    return {"tekken_model": torch.frombuffer(bytearray(tekken_bytes()), dtype=torch.uint8)}


def _text_config():
    from transformers import MistralConfig

    cfg = {k: v for k, v in MISTRAL_TINY.items() if k != "rope_theta"}
    return MistralConfig(**cfg, vocab_size=vocab_size(), head_dim=128, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": MISTRAL_TINY["rope_theta"]},
                         bos_token_id=1, eos_token_id=2, pad_token_id=11, tie_word_embeddings=False)


def _config():
    from transformers import Mistral3Config, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=16, head_dim=16)
    return Mistral3Config(text_config=_text_config(), vision_config=vision, image_token_index=10,
                          spatial_merge_size=2, tie_word_embeddings=False)


def _src():
    return common.source_key(sys.modules[__name__])


def mistral_tiny_file(seed: int = 71) -> Path:
    """A seeded tiny Mistral-Small-3.1 text model in the layout of ComfyUI's FLUX.2 text-encoder files (``model.*``
    keys, fp32) with the tiny tekken.json under ``tekken_model``, as those files carry it. Norm weights perturbed
    away from 1 so a norm applied in the wrong place changes the output."""
    path = common.cached_file(f"flux2-mistral-tiny-s{seed}", _src())
    if not path.exists():
        from transformers import MistralModel

        model = MistralModel(_text_config()).eval()
        common.seeded_llm_(model, seed)
        sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
        sd["tekken_model"] = tokenizer_data()["tekken_model"].clone()
        common.atomic_save(sd, path)
    return path


def _weights(path: Path) -> dict:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path))


def flux2_clip(path: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` from ComfyUI's FLUX.2 classes unchanged (``Flux2Tokenizer`` + ``flux2_te()``), the tiny
    config passed as the ``mistral3_24b_model_config`` model option and the file's tekken data as
    ``tokenizer_data`` (what ``comfy.sd.load_clip`` does for a FLUX.2 text encoder)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux

    sd = _weights(path)
    tekken = sd.pop("tekken_model")
    config = {**MISTRAL_TINY, "vocab_size": vocab_size()}
    target = comfy.supported_models_base.ClipTarget(flux.Flux2Tokenizer, flux.flux2_te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         tokenizer_data={"tekken_model": tekken},
                         model_options={"dtype": torch.float32, "mistral3_24b_model_config": config})
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    return clip


def build_clip():
    """The tiny FLUX.2 text encoder as ``TinyTextEncoderLoader`` gives it (default seed)."""
    return flux2_clip(mistral_tiny_file())


def mistral3_transformers(path: Path, seed: int = 72):
    """transformers' ``Mistral3ForConditionalGeneration`` (fp32, eval) with the file's text weights and a seeded tiny
    vision tower/projector (unused for text-only prompts)."""
    from safetensors.torch import load_file
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(_config()).eval()
    sd = {k.removeprefix("model."): v for k, v in load_file(str(path)).items() if k != "tekken_model"}
    missing, unexpected = model.model.language_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def tekken_tokenizer(tmp_dir: Path):
    """The reference tokenizer: transformers' ``MistralConverter`` on the tiny tekken.json (written to ``tmp_dir``),
    as a ``PreTrainedTokenizerFast`` with Mistral's bos/eos/pad/unk tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    path = Path(tmp_dir) / "tekken.json"
    path.write_bytes(tekken_bytes())
    return PreTrainedTokenizerFast(tokenizer_object=MistralConverter(vocab_file=str(path)).converted(),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


# Mistral-Small-3.1's chat template is not available offline. This Jinja template renders what the pipeline's messages
# (one system turn, one user turn; content as [{"type": "text", "text": ...}]) give in Mistral's documented format,
# '<s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]user[/INST]', an input assumption of the parity tests like the weights.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Mistral-Small-3.1's tokenizer class (LlamaTokenizerFast in its tokenizer_config.json) pads on the left; an input
# assumption like the template (ComfyUI's Mistral3Tokenizer pads on the left too, pad_left=True)
PADDING_SIDE = "left"


def processor(tmp_dir: Path):
    """The reference processor: transformers' ``PixtralProcessor`` (Mistral-Small-3.1's processor class) around the
    reference tokenizer, with :data:`MISTRAL_CHAT_TEMPLATE`."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    tok = tekken_tokenizer(tmp_dir)
    tok.padding_side = PADDING_SIDE
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=16,
                            spatial_merge_size=2, chat_template=MISTRAL_CHAT_TEMPLATE)


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def flux2_pipeline(path: Path, tmp_dir: Path):
    """diffusers' ``Flux2Pipeline`` around the tiny Mistral-Small-3.1 and the reference processor (no transformer or
    VAE: only ``encode_prompt`` is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                         text_encoder=mistral3_transformers(path), tokenizer=processor(tmp_dir), transformer=None)
