"""Text-encoder swap: retrain a UNet (SD1.5, SDXL) to read another text encoder (e.g. T5) through a projection.

This module holds the projection, the :class:`Swap` a setup decides and the training hooks. Its parts:

- measuring the captions' spreads (``te_swap_measure.token_std``): ``te_swap_measure``;
- the UNet's attention layers (context width, the layers a reset mode names, their fresh init as patches):
  ``te_swap_reset``;
- an adm's pooled vector (SDXL), zero or projected: ``te_swap_pooled``;
- saving and loading: ``te_swap_files``.

- :class:`Projection`: new encoder width -> the UNet's context width (``linear``, or ``mlp``: Linear, GELU,
  Linear with a hidden width equal to the context width), times a fixed output ``scale``. The layers start from
  PyTorch's default ``nn.Linear`` init drawn from the seed; ``scale`` is then set so that the output's
  ``te_swap_measure.token_std`` on the captions equals the old encoder's. On an adm model it also carries the
  pooled head (``te_swap_pooled``), and :meth:`Projection.context` returns (states, extras) with the adm's pooled
  vector, for the trainer's hook and the Apply node alike.
- The reset is a set of ComfyUI ``diff`` patches (new init - base weight) on a clone of the MODEL
  (:func:`with_swap`): the shared base weights are never written.
- Training: the MODEL carries the :class:`Swap` as a ModelPatcher attachment. Train Init calls
  :func:`extra_targets` and the trainer calls :func:`attach`, which adds the projection as one more trainable
  adapter (so optimizer, EMA, checkpoints and resume cover it) and projects every conditioning inside the
  training forward. Train Steps' previews sample with the Preview Plan's prompts projected by the projection as it
  is at that step (:func:`projected_plan`, the Apply node's path) on the model with the run's current differences.
  The chosen UNet layers train as full weights (LoRA Config algorithm ``full``, ``train/full.py``) or as a LoRA.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from . import te_swap_measure as measure_
from . import te_swap_pooled as pooled_
from . import te_swap_reset as reset_
from .te_swap_measure import SwapError

PROJECTIONS = ("linear", "mlp")
ATTACHMENT = "aligned_trainer.te_swap"
ADAPTER = "te_swap.projection"           # the projection's name among a run's adapters (and its state keys)


class Projection(torch.nn.Module):
    """``scale * net(x)``; ``net`` a Linear or Linear-GELU-Linear. ``scale`` is a buffer (fixed: set from the
    measured spreads; the layers learn the rest). With ``pooled_in`` (and an adm's ``pooled_dim``): the pooled head
    (``te_swap_pooled.add_head``: ``pooled``, a Linear from the new encoder's pooled vector to the adm's pooled
    width, times the fixed ``pooled_scale``); without it an adm model gets a zero pooled vector."""

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
        self.pooled_in = pooled_.add_head(self, self.pooled_dim, pooled_in)

    def init_(self, seed: int) -> "Projection":
        g = torch.Generator().manual_seed(int(seed))
        for m in self.net:
            if isinstance(m, torch.nn.Linear):
                reset_.default_linear_(m, g)
        if self.pooled_in:  # after net: a zero-pooled projection of the same seed keeps its weights
            reset_.default_linear_(self.pooled, g)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.net[0].weight
        return (self.net(x.to(device=w.device, dtype=w.dtype)) * self.scale).to(x.dtype)

    def context(self, states: torch.Tensor, extras: dict) -> tuple[torch.Tensor, dict]:
        """(the new encoder's states, extras) -> (the UNet's context, extras): the trainer's hook and the Apply
        node's path (:meth:`project`) are this one function; an adm model's pooled vector: ``te_swap_pooled``."""
        return self(check_width(states, self.in_dim)), pooled_.with_pooled(self, extras, states)

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
    """A seeded projection whose output, on ``new_conds``, has ``te_swap_measure.token_std`` ``target_std``; also
    returns the unscaled output's std. With ``pooled_target`` (the old encoder's pooled vectors, an adm's width): a
    pooled projection from the new encoder's pooled vectors, scaled so that their spread equals the target's
    (``te_swap_pooled.fit_scale_``); without it an adm's ``pooled_dim`` gets zero."""
    in_dim = int(new_conds[0][0][0].shape[-1])
    sources = pooled_.sources(new_conds) if pooled_target is not None else []
    proj = Projection(in_dim, out_dim, kind, pooled_dim, int(sources[0].shape[-1]) if sources else 0).init_(seed)
    with torch.no_grad():
        raw, _ = measure_.token_std([[[proj.net(c[0][0].float()), c[0][1]]] for c in new_conds])
    if not raw > 0:
        raise SwapError("the new text encoder's projected captions have zero spread; check that the CLIP is loaded "
                        "with weights")
    proj.scale.fill_(target_std / raw)
    if sources:
        pooled_.fit_scale_(proj, sources, pooled_target)
    return proj, raw


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
                f"({len(self.reset_layers)} layers)" + pooled_.report(self))


def _spec_id(clip) -> str:
    spec = getattr(clip, "spec", None)
    return str(getattr(spec, "id", "") or "")


def setup(model, new_clip, old_clip, captions: list[str], reset: str = "cross_attention", kind: str = "linear",
          seed: int = 0, pooled: str = "zero") -> tuple[object, Swap]:
    """Measure both encoders on ``captions`` (at most MAX_CAPTIONS of them: ``te_swap_measure.measured_captions``),
    fit the projection, reset the named layers (as patches on a clone of ``model``); returns (the clone, carrying the
    swap, and the :class:`Swap`). ``pooled`` (an adm model's pooled input): 'zero', or 'projected' (the new encoder's
    pooled vector through a trainable Linear scaled to the old pooled vector's spread)."""
    pooled_.check_option(model, pooled)
    texts = measure_.measured_captions(captions, measure_.MAX_CAPTIONS)
    dm = model.model.diffusion_model
    out_dim = reset_.context_dim(dm)
    names = reset_.reset_layers(dm, reset)
    with torch.inference_mode(False):
        old = measure_.encode(old_clip, texts)
        new = measure_.encode(new_clip, texts)
        if int(old[0][0][0].shape[-1]) != out_dim:
            raise SwapError(f"the old CLIP's conditioning is {int(old[0][0][0].shape[-1])} wide but this UNet reads "
                            f"{out_dim}: connect the CLIP the model was trained with (its checkpoint's CLIP)")
        std_old, n_old = measure_.token_std(old)
        std_new, n_new = measure_.token_std(new)
        pdim = pooled_.pooled_dim(model, old)
        target = pooled_.old_pooled(old) if pooled == "projected" else None
        proj, _ = fit_projection(new, std_old, out_dim, kind, seed, pdim, target)
        with torch.no_grad():
            std_proj, _ = measure_.token_std([[[proj(c[0][0].float()), c[0][1]]] for c in new])
        std_pooled = pooled_.spread(proj, new)
        diffs = reset_.reset_diffs(model, names, seed + 1)
    swap = Swap(kind, proj.in_dim, out_dim, {k: v.detach().clone() for k, v in proj.state_dict().items()}, reset,
                tuple(names), diffs, int(seed), std_old, std_new, std_proj, n_old, n_new, len(texts),
                _spec_id(new_clip), _spec_id(old_clip), pdim, proj.pooled_in,
                measure_.vector_std([target]) if target is not None else 0.0, std_pooled)
    return with_swap(model, swap), swap


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
