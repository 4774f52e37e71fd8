"""Text-encoder swap: retrain a UNet (SD1.5, SDXL) to read another text encoder (e.g. T5) through a projection.

Pieces, each a small function:

- :func:`token_std`: the spread the UNet was trained on, measured on captions: the standard deviation over the
  channels of each counted token, averaged over the tokens. Which tokens count: every position of the
  conditioning when it carries no ``attention_mask`` (CLIP-L as SD1.5 saw it: all 77 positions, padding
  included, since SD1.5 was trained on padded, unmasked CLIP states), else the positions the mask marks valid.
- :class:`Projection`: new encoder width -> the UNet's context width (``linear``, or ``mlp``: Linear, GELU,
  Linear with a hidden width equal to the context width), times a fixed output ``scale``. The layers start from
  PyTorch's default ``nn.Linear`` init drawn from the seed; ``scale`` is then set so that the output's
  :func:`token_std` on the captions equals the old encoder's.
- :func:`reset_layers` / :func:`reset_diffs`: the attention layers a reset mode names, by their module names in
  ComfyUI's UNet (``CrossAttention`` modules ``attn1``/``attn2`` of the SpatialTransformer blocks), drawn again
  the way they were first initialised. The original LDM code (CompVis ``ldm/modules/attention.py``, which
  trained SD1.x) and diffusers' ``Attention`` both build these layers as plain ``nn.Linear`` and leave PyTorch's
  default init in place: weight kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and
  the bias (``to_out.0`` only) from the same bound. We draw exactly that from a seeded generator, in module-name
  order.
- The reset is a set of ComfyUI ``diff`` patches (new init - base weight) on a clone of the MODEL: the shared
  base weights are never written; ComfyUI applies the patches while the model is loaded, like a LoRA.
- Training: the MODEL carries the :class:`Swap` as a ModelPatcher attachment. Train Init calls
  :func:`extra_targets` and the trainer calls :func:`attach`, which adds the projection as one more trainable
  adapter (so optimizer, EMA, checkpoints and resume cover it) and projects every conditioning inside the
  training forward. Train Steps' previews sample with the Preview Plan's prompts projected by the projection as it
  is at that step (:func:`projected_plan`, the Apply node's path) on the model with the run's current differences. The chosen UNet layers train as full weights (LoRA Config algorithm ``full``,
  ``train/full.py``) or as a LoRA.
- SDXL (a UNet with an adm): :func:`pooled_dim` reads the pooled vector's width off the old encoder; the
  projection's :meth:`Projection.context` returns (states, extras) with a pooled vector of that width, for the
  trainer's hook and the Apply node alike: zero (``pooled = "zero"``), or (``"projected"``) the new encoder's own
  pooled vector (:func:`pooled_source`: its ``pooled_output``, else the mean of its valid token states) through a
  trainable Linear, scaled like the states so its spread on the captions equals the old pooled vector's.
- Saving and loading: ``te_swap_files``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from comfy.ldm.modules.attention import CrossAttention, SpatialTransformer

from .config import ConfigError

RESET_MODES = ("none", "cross_attention", "qk", "all_attention")
PROJECTIONS = ("linear", "mlp")
POOLED = ("zero", "projected")           # what an adm model's pooled input gets
ATTACHMENT = "aligned_trainer.te_swap"
ADAPTER = "te_swap.projection"           # the projection's name among a run's adapters (and its state keys)
MAX_CAPTIONS = 64                        # captions measured at most: 64 x 77 CLIP tokens pin the mean spread well
_LAYERS = {"cross_attention": (("attn2",), ("to_q", "to_k", "to_v", "to_out.0")),
           "qk": (("attn2",), ("to_q", "to_k")),
           "all_attention": (("attn1", "attn2"), ("to_q", "to_k", "to_v", "to_out.0"))}


class SwapError(ConfigError):
    pass


# -- measuring ------------------------------------------------------------------------------------------------

def token_std(conditionings: list) -> tuple[float, int]:
    """(mean per-token std, tokens counted) over CONDITIONINGs (``[[cond (1, T, C), extras]]``): each token's
    std over its C channels (population std), averaged over the counted tokens of every caption; a caption's
    ``attention_mask`` (1 = valid) limits the count to its valid tokens."""
    total, n = 0.0, 0
    for c in conditionings:
        x, extras = c[0][0], c[0][1]
        stds = x.detach().float().reshape(-1, x.shape[-1]).std(dim=-1, unbiased=False)
        mask = extras.get("attention_mask") if isinstance(extras, dict) else None
        if isinstance(mask, torch.Tensor) and mask.numel() == stds.numel():
            stds = stds[mask.reshape(-1).to(stds.device) > 0]
        total += float(stds.sum())
        n += int(stds.numel())
    if n == 0:
        raise SwapError("no caption gave any valid token to measure; give the swap setup captions (a dataset "
                        "with at least one captioned item)")
    return total / n, n


def encode(clip, texts: list[str]) -> list:
    """Each text's CONDITIONING as ``clip`` encodes it (an aligned CLIP encodes as its spec says)."""
    return [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in texts]


# -- projection -----------------------------------------------------------------------------------------------

def _default_linear_(layer: torch.nn.Linear, g: torch.Generator) -> None:
    """PyTorch's default nn.Linear init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    the weight and the bias, drawn from ``g``."""
    bound = 1.0 / math.sqrt(layer.weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
        if layer.bias is not None:
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)


def pooled_source(states: torch.Tensor, extras: dict) -> torch.Tensor:
    """The new encoder's own pooled vector (batch, width): its ``pooled_output`` when it gives one (e.g. FLUX's
    CLIP-L next to T5), else the mean of its token states over the valid tokens (``attention_mask``; all tokens
    without one), as T5 has no pooled output."""
    pooled = extras.get("pooled_output") if isinstance(extras, dict) else None
    if isinstance(pooled, torch.Tensor):
        return pooled.float().reshape(states.shape[0], -1)
    x = states.float()
    mask = extras.get("attention_mask") if isinstance(extras, dict) else None
    if isinstance(mask, torch.Tensor) and mask.numel() == x.shape[0] * x.shape[1]:
        w = (mask.reshape(x.shape[0], x.shape[1], 1).to(x.device) > 0).to(x.dtype)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return x.mean(dim=1)


def _vector_std(vectors: list[torch.Tensor]) -> float:
    """Mean over the vectors (rows) of each one's std over its channels (population std)."""
    rows = torch.cat([v.detach().float().reshape(-1, v.shape[-1]) for v in vectors])
    return float(rows.std(dim=-1, unbiased=False).mean())


class Projection(torch.nn.Module):
    """``scale * net(x)``; ``net`` a Linear or Linear-GELU-Linear. ``scale`` is a buffer (fixed: set from the
    measured spreads; the layers learn the rest). With ``pooled_in`` (and an adm's ``pooled_dim``): ``pooled``, a
    Linear from the new encoder's pooled vector (:func:`pooled_source`) to the adm's pooled width, times the fixed
    ``pooled_scale``; without it an adm model gets a zero pooled vector."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", pooled_dim: int = 0, pooled_in: int = 0):
        super().__init__()
        if kind not in PROJECTIONS:
            raise SwapError(f"projection kind {kind!r} is not one of {PROJECTIONS}")
        self.kind, self.in_dim, self.out_dim, self.pooled_dim = kind, int(in_dim), int(out_dim), int(pooled_dim)
        if kind == "linear":
            self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim))
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim), torch.nn.GELU(),
                                           torch.nn.Linear(out_dim, out_dim))
        self.register_buffer("scale", torch.ones(()))
        self.pooled_in = int(pooled_in) if self.pooled_dim else 0
        if self.pooled_in:
            self.pooled = torch.nn.Linear(self.pooled_in, self.pooled_dim)
            self.register_buffer("pooled_scale", torch.ones(()))

    def init_(self, seed: int) -> "Projection":
        g = torch.Generator().manual_seed(int(seed))
        for m in self.net:
            if isinstance(m, torch.nn.Linear):
                _default_linear_(m, g)
        if self.pooled_in:  # after net: a zero-pooled projection of the same seed keeps its weights
            _default_linear_(self.pooled, g)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        return (self.net(x.to(device=w.device, dtype=w.dtype)) * self.scale).to(x.dtype)

    def pooled_vector(self, states: torch.Tensor, extras: dict) -> torch.Tensor:
        """The projected pooled vector (batch, pooled_dim) from the new encoder's ``states`` and ``extras``."""
        src = pooled_source(states, extras)
        if src.shape[-1] != self.pooled_in:
            raise SwapError(f"the new encoder's pooled vector is {src.shape[-1]} wide, the swap's pooled projection "
                            f"reads {self.pooled_in}: encode the prompt with the new text encoder the swap was set "
                            "up with")
        w = self.pooled.weight
        return self.pooled(src.to(device=w.device, dtype=w.dtype)) * self.pooled_scale

    def extras(self, extras: dict, states: torch.Tensor) -> dict:
        """The conditioning's extras for the UNet: a model with an adm (SDXL: ``pooled_output`` in its ``y``) gets a
        pooled vector of its width, zero, or with a pooled projection the new encoder's own pooled vector projected
        (:meth:`pooled_vector`); others keep the extras as they are."""
        out = dict(extras)
        if self.pooled_in:
            out["pooled_output"] = self.pooled_vector(states, extras).to(states.dtype)
        elif self.pooled_dim:
            out["pooled_output"] = torch.zeros(states.shape[0], self.pooled_dim, dtype=states.dtype,
                                               device=states.device)
        return out

    def context(self, states: torch.Tensor, extras: dict) -> tuple[torch.Tensor, dict]:
        """(the new encoder's states, extras) -> (the UNet's context, extras): the trainer's hook and the Apply
        node's path (:meth:`project`) are this one function."""
        return self(check_width(states, self.in_dim)), self.extras(extras, states)

    def project(self, conditioning: list) -> list:
        """CONDITIONING of the new encoder -> CONDITIONING for the UNet (extras kept; a zero pooled vector for an
        adm model)."""
        if not conditioning:
            return conditioning
        with torch.no_grad():
            return [list(self.context(c[0], c[1])) for c in conditioning]


def check_width(cond: torch.Tensor, in_dim: int) -> torch.Tensor:
    if cond.shape[-1] != in_dim:
        raise SwapError(f"this conditioning is {cond.shape[-1]} wide, the swap's projection reads {in_dim}: encode "
                        "the prompt with the new text encoder the swap was set up with (not the model's old CLIP)")
    return cond


def fit_projection(new_conds: list, target_std: float, out_dim: int, kind: str, seed: int, pooled_dim: int = 0,
                   pooled_target: torch.Tensor | None = None) -> tuple[Projection, float]:
    """A seeded projection whose output, on ``new_conds``, has :func:`token_std` ``target_std``; also returns
    the unscaled output's std. With ``pooled_target`` (the old encoder's pooled vectors, an adm's width): a pooled
    projection from the new encoder's pooled vectors, scaled so that their spread (:func:`_vector_std`) equals the
    target's; without it an adm's ``pooled_dim`` gets zero."""
    in_dim = int(new_conds[0][0][0].shape[-1])
    sources = [pooled_source(c[0][0], c[0][1]) for c in new_conds] if pooled_target is not None else []
    proj = Projection(in_dim, out_dim, kind, pooled_dim, int(sources[0].shape[-1]) if sources else 0).init_(seed)
    with torch.no_grad():
        raw, _ = token_std([[[proj.net(c[0][0].float()), c[0][1]]] for c in new_conds])
        raw_pooled = _vector_std([proj.pooled(x) for x in sources]) if sources else 1.0
    if not raw > 0 or not raw_pooled > 0:
        raise SwapError("the new text encoder's projected captions have zero spread; check that the CLIP is loaded "
                        "with weights")
    proj.scale.fill_(target_std / raw)
    if sources:
        proj.pooled_scale.fill_(_vector_std([pooled_target]) / raw_pooled)
    return proj, raw


# -- reset ----------------------------------------------------------------------------------------------------

def attention_layers(diffusion_model: torch.nn.Module) -> dict[str, list[str]]:
    """'attn1'/'attn2' -> module names of the CrossAttention modules of the SpatialTransformer blocks."""
    out = {"attn1": [], "attn2": []}
    inside = [n for n, m in diffusion_model.named_modules() if isinstance(m, SpatialTransformer)]
    for name, m in diffusion_model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(m, CrossAttention) and last in out and any(name.startswith(t + ".") for t in inside):
            out[last].append(name)
    return out


def reset_layers(diffusion_model: torch.nn.Module, mode: str) -> list[str]:
    """Module names (Linear layers) a reset mode re-initialises, sorted."""
    if mode not in RESET_MODES:
        raise SwapError(f"reset mode {mode!r} is not one of {RESET_MODES}")
    if mode == "none":
        return []
    which, parts = _LAYERS[mode]
    found = attention_layers(diffusion_model)
    names = sorted(f"{a}.{p}" for w in which for a in found[w] for p in parts)
    if not names:
        raise SwapError("this model has no SpatialTransformer cross-attention (attn1/attn2): the swap's reset is for "
                        "UNets (SD1.5, SD2, SDXL); set reset to 'none'")
    return names


def context_dim(diffusion_model: torch.nn.Module) -> int:
    """The width the UNet's cross-attention reads (attn2.to_k's input width)."""
    mods = dict(diffusion_model.named_modules())
    names = attention_layers(diffusion_model)["attn2"]
    if not names:
        raise SwapError("this model has no cross-attention reading a text context (attn2): the text-encoder swap "
                        "is for UNets such as SD1.5 and SDXL")
    return int(mods[names[0] + ".to_k"].weight.shape[1])


def reset_diffs(patcher, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI state keys (``diffusion_model.<layer>.weight`` / ``.bias``) -> (fresh default init - base value),
    the base values as ComfyUI holds them before any patch (``get_key_patches``). Drawn in name order from one
    generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    base = patcher.get_key_patches("diffusion_model.")
    out = {}
    for n in names:
        wkey, bkey = f"diffusion_model.{n}.weight", f"diffusion_model.{n}.bias"
        w = base[wkey][0][0]
        fresh = torch.nn.Linear(w.shape[1], w.shape[0], bias=bkey in base)
        _default_linear_(fresh, g)
        out[wkey] = fresh.weight.detach() - w.detach().float().cpu()
        if bkey in base:
            out[bkey] = fresh.bias.detach() - base[bkey][0][0].detach().float().cpu()
    return out


# -- the swap -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Swap:
    """What a swap setup decided (immutable; the projection's initial weights as tensors)."""
    kind: str
    in_dim: int
    out_dim: int
    projection: dict                   # Projection state dict (incl. scale)
    reset: str
    reset_layers: tuple
    reset_diffs: dict = field(repr=False, default_factory=dict)   # state key -> diff patch
    seed: int = 0
    std_old: float = 0.0
    std_new: float = 0.0
    std_projected: float = 0.0
    tokens_old: int = 0
    tokens_new: int = 0
    captions: int = 0
    new_spec: str = ""
    old_spec: str = ""
    pooled_dim: int = 0                # width of the pooled vector in the model's adm (SDXL), 0: no adm
    pooled_in: int = 0                 # width of the new encoder's pooled vector projected into it, 0: zero vector
    std_pooled_old: float = 0.0        # the old encoder's pooled spread (pooled 'projected')
    std_pooled_projected: float = 0.0  # the projected pooled vector's spread on the captions

    def module(self, state: dict | None = None) -> Projection:
        p = Projection(self.in_dim, self.out_dim, self.kind, self.pooled_dim, self.pooled_in)
        p.load_state_dict({k: v.detach().clone() for k, v in (state or self.projection).items()})
        return p.eval()

    @property
    def scale(self) -> float:
        return float(self.projection["scale"])

    def record(self) -> dict:
        keep = ("kind", "in_dim", "out_dim", "reset", "reset_layers", "seed", "std_old", "std_new", "std_projected",
                "tokens_old", "tokens_new", "captions", "new_spec", "old_spec", "pooled_dim", "pooled_in", "std_pooled_old",
                "std_pooled_projected")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep} | \
            {"scale": self.scale}

    def report(self) -> str:
        return (f"old encoder token std {self.std_old:.4f} ({self.tokens_old} tokens of {self.captions} captions), "
                f"new encoder {self.std_new:.4f}; projection {self.kind} {self.in_dim}->{self.out_dim}, scale "
                f"{self.scale:.4g}: output std {self.std_projected:.4f}; reset {self.reset} "
                f"({len(self.reset_layers)} layers)" + self._pooled_report())

    def _pooled_report(self) -> str:
        if not self.pooled_dim:
            return ""
        if not self.pooled_in:
            return f"; pooled {self.pooled_dim}: zero"
        return (f"; pooled {self.pooled_in}->{self.pooled_dim} projected: old pooled std {self.std_pooled_old:.4f}, "
                f"output {self.std_pooled_projected:.4f}")


def _spec_id(clip) -> str:
    spec = getattr(clip, "spec", None)
    return str(getattr(spec, "id", "") or "")


def measured_captions(captions: list, limit: int = MAX_CAPTIONS) -> list[str]:
    """The distinct captions the setup encodes: all of them sorted, or ``limit`` of them evenly spaced over the
    sorted list (first and last included) when there are more; encoding a large dataset's every caption with two
    encoders costs minutes and does not move a mean over thousands of tokens."""
    texts = sorted({t for t in captions if isinstance(t, str)})
    if not texts:
        raise SwapError("the swap setup got no captions: connect a Dataset whose images have captions (.txt files)")
    if len(texts) <= limit:
        return texts
    if limit < 2:
        return texts[:max(limit, 1)]
    return [texts[round(i * (len(texts) - 1) / (limit - 1))] for i in range(limit)]


def setup(model, new_clip, old_clip, captions: list[str], reset: str = "cross_attention", kind: str = "linear",
          seed: int = 0, pooled: str = "zero") -> tuple[object, Swap]:
    """Measure both encoders on ``captions`` (at most MAX_CAPTIONS of them: :func:`measured_captions`), fit the
    projection, reset the named layers (as patches on a clone of ``model``); returns (the clone, carrying the swap,
    and the :class:`Swap`). ``pooled`` (an adm model's pooled input): 'zero', or 'projected' (the new encoder's
    pooled vector through a trainable Linear scaled to the old pooled vector's spread)."""
    if pooled not in POOLED:
        raise SwapError(f"pooled {pooled!r} is not one of {POOLED}")
    if pooled == "projected" and not int(getattr(model.model, "adm_channels", 0) or 0):
        raise SwapError("pooled 'projected' is for a model that reads a pooled text vector (an adm, e.g. SDXL); "
                        "this model has none: set pooled to 'zero'")
    texts = measured_captions(captions, MAX_CAPTIONS)
    dm = model.model.diffusion_model
    out_dim = context_dim(dm)
    names = reset_layers(dm, reset)
    with torch.inference_mode(False):
        old = encode(old_clip, texts)
        new = encode(new_clip, texts)
        if int(old[0][0][0].shape[-1]) != out_dim:
            raise SwapError(f"the old CLIP's conditioning is {int(old[0][0][0].shape[-1])} wide but this UNet reads "
                            f"{out_dim}: connect the CLIP the model was trained with (its checkpoint's CLIP)")
        std_old, n_old = token_std(old)
        std_new, n_new = token_std(new)
        pdim = pooled_dim(model, old)
        target = torch.cat([c[0][1]["pooled_output"].float().reshape(1, -1) for c in old]) \
            if pooled == "projected" else None
        proj, _ = fit_projection(new, std_old, out_dim, kind, seed, pdim, target)
        with torch.no_grad():
            std_proj, _ = token_std([[[proj(c[0][0].float()), c[0][1]]] for c in new])
            std_pooled = _vector_std([proj.pooled_vector(c[0][0], c[0][1]) for c in new]) if proj.pooled_in else 0.0
        diffs = reset_diffs(model, names, seed + 1)
    swap = Swap(kind, proj.in_dim, out_dim, {k: v.detach().clone() for k, v in proj.state_dict().items()}, reset,
                tuple(names), diffs, int(seed), std_old, std_new, std_proj, n_old, n_new, len(texts),
                _spec_id(new_clip), _spec_id(old_clip), pdim, proj.pooled_in,
                _vector_std([target]) if target is not None else 0.0, std_pooled)
    return with_swap(model, swap), swap


def pooled_dim(model, old_conds: list) -> int:
    """The pooled vector's width a model's adm reads (SDXL's ``y``: the old encoder's ``pooled_output``, then size
    embeddings), read off the old encoder's conditioning; 0 when the model has no adm (SD1.5: ``adm_channels``
    0) or the old encoder gives no pooled vector."""
    if not int(getattr(model.model, "adm_channels", 0) or 0):
        return 0
    pooled = old_conds[0][0][1].get("pooled_output") if old_conds else None
    if not isinstance(pooled, torch.Tensor):
        raise SwapError("this model reads a pooled text vector (an adm, e.g. SDXL) but the old CLIP's conditioning "
                        "carries none: connect the CLIP of the model's own checkpoint as old_clip")
    return int(pooled.shape[-1])


def with_swap(model, swap: Swap):
    """A clone of ``model`` with the swap's reset patches and the swap attached."""
    out = model.clone()
    if swap.reset_diffs:
        added = out.add_patches({k: ("diff", (v,)) for k, v in swap.reset_diffs.items()}, 1.0, 1.0)
        if len(added) != len(swap.reset_diffs):
            raise SwapError("this model does not have the layers the swap resets (another model than the one the "
                            "swap was set up for)")
    out.set_attachments(ATTACHMENT, swap)
    return out


def of(model) -> Swap | None:
    get = getattr(model, "get_attachment", None)
    return get(ATTACHMENT) if get else None


# -- training hooks -------------------------------------------------------------------------------------------

def extra_targets(model) -> list[str]:
    """Names Train Init adds to the run's target layers (the projection), so checkpoints are checked whole."""
    return [ADAPTER] if of(model) is not None else []


class ProjectionAdapter(torch.nn.Module):
    """The projection among a trainer's adapters (``inner`` holds the parameters, as a TrainAdapter's)."""
    kind = None
    rank_dropout = module_dropout = network_dropout = 0.0

    def __init__(self, inner: Projection):
        super().__init__()
        self.inner = inner
        self.enabled = True

    def context(self, cond: torch.Tensor, extras: dict) -> tuple[torch.Tensor, dict]:
        return self.inner.context(cond.float(), extras)


def attach(trainer) -> None:
    """Called by the trainer once its layer adapters exist: when its model carries a swap, the projection joins
    the adapters (trained, checkpointed, averaged with them) and the trainer projects every conditioning."""
    swap = of(trainer.patcher)
    if swap is None:
        return
    conds = [cv.conditioning for s in trainer.run.training_set.samples for cv in s.captions[:1]]
    for c in conds[:1]:
        if int(c[0][0].shape[-1]) != swap.in_dim:
            raise SwapError(f"the training set's captions were encoded {int(c[0][0].shape[-1])} wide, the swap's "
                            f"projection reads {swap.in_dim}: cache the captions (Cache Text Embeddings) with the "
                            "new text encoder given to Text Encoder Swap Setup")
    a = ProjectionAdapter(swap.module().float().to(trainer.device))
    for p in a.inner.parameters():
        p.requires_grad_(True)
    trainer.adapters[ADAPTER] = a
    trainer.context = a.context


def check_plan(model, plan) -> None:
    """A preview plan for a swap run must hold prompts of the new encoder (what the projection reads): refused with
    the fix before any step otherwise. Nothing to check without a swap or a plan."""
    swap = of(model)
    if swap is None or plan is None:
        return
    for c in [*getattr(plan, "positives", ()), getattr(plan, "negative", None) or []]:
        for item in c:
            if int(item[0].shape[-1]) != swap.in_dim:
                raise SwapError(f"the Preview Plan's prompts are encoded {int(item[0].shape[-1])} wide, the swap's "
                                f"projection reads {swap.in_dim}: connect the new text encoder (the one given to Text "
                                "Encoder Swap Setup as new_clip) to the Preview Plan's clip")


def projected_plan(plan, model, adapters: dict[str, torch.Tensor]):
    """The preview plan a swap run samples with: its prompts projected by the projection in ``adapters`` (a
    trainer's current state) exactly as Apply Text Encoder Swap projects a prompt at inference; ``plan`` itself
    when ``model`` carries no swap."""
    if of(model) is None:
        return plan
    state = {k[len(ADAPTER) + 1:]: v for k, v in adapters.items() if k.startswith(ADAPTER + ".")}
    return plan.with_conditioning(of(model).module(state).project)


def without_projection(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's adapter state without the projection's tensors (what ComfyUI's LoRA loader gets)."""
    return {k: v for k, v in adapters.items() if not k.startswith(ADAPTER + ".")}


def trained_projection(run, ema: bool = True) -> dict[str, torch.Tensor]:
    """The projection's state from a run (EMA weights when kept and ``ema``)."""
    if run.state is None:
        raise SwapError("the run has no trained weights yet; run Train Steps first")
    weights = (run.state.get("ema_adapters") if ema else None) or run.state["adapters"]
    out = {k[len(ADAPTER) + 1:]: v for k, v in weights.items() if k.startswith(ADAPTER + ".")}
    if not out:
        raise SwapError("this run has no text-encoder swap projection: train the MODEL from Text Encoder Swap Setup")
    return out


def trained_swap(run, ema: bool = True) -> Swap:
    """The run's swap with its trained projection."""
    swap = of(run.model)
    if swap is None:
        raise SwapError("this run's model carries no text-encoder swap: train the MODEL from Text Encoder Swap Setup")
    return replace(swap, projection=trained_projection(run, ema))


AS_CONNECTED = "as_connected"


def setup_from_dataset(model, new_clip, old_clip, dataset, reset: str = "cross_attention", kind: str = "linear",
                       seed: int = 0, new_spec: str = AS_CONNECTED, old_spec: str = AS_CONNECTED,
                       pooled: str = "zero"):
    """:func:`setup` with the captions of a Dataset (every caption variant of every item) and each CLIP aligned to
    its spec first ('as_connected': used as connected, e.g. already from Load Aligned Text Encoders)."""
    from ..te import align

    def aligned(clip, spec):
        return clip if spec == AS_CONNECTED else align.align_clip(clip, spec)

    caps = [c for item in dataset.items for c in item.captions]
    return setup(model, aligned(new_clip, new_spec), aligned(old_clip, old_spec), caps, reset, kind, seed, pooled)
