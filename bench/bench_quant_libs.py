#!/usr/bin/env python3
"""Which quantization library for Train Init's ``quantize`` (issue #19; the choice is in docs/memory.md).
On the tests' tiny FLUX.1 (seeded, fp32, CPU) each candidate replaces the weight tensor of every Linear while
the layer keeps its ComfyUI class, then: relative error of the forward against fp32, bytes per weight actually
stored (the subclass's inner tensors), whether a LoRA-style hook on a layer gets a finite, non-zero gradient
through the quantized layers, and the median forward+backward time.

    .work/venv/bin/python bench/bench_quant_libs.py
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common  # noqa: F401  (puts tests/ on sys.path)


def main() -> int:
    import torch

    common.set_threads(1)
    common.boot_comfy(Path(tempfile.mkdtemp()))
    from support.factories import families

    dm = families.build_model("flux1-dev").model.diffusion_model
    names = [n for n, x in dm.named_modules() if isinstance(x, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 32, 32, generator=g), torch.tensor([0.5])
    ctx, y = torch.randn(1, 16, 128, generator=g), torch.randn(1, 768, generator=g)

    def fwd():
        return dm(x, t, ctx, y, guidance=torch.tensor([1.0]))

    with torch.no_grad():
        ref = fwd()
    orig = {n: dm.get_submodule(n).weight for n in names}

    def nbytes(w):
        if hasattr(w, "__tensor_flatten__"):
            inner, _ = w.__tensor_flatten__()
            return sum(nbytes(getattr(w, k)) for k in inner)
        return w.numel() * w.element_size()

    rows = []

    def bench(label, setup):
        for n in names:
            dm.get_submodule(n).weight = orig[n]
        try:
            setup()
            with torch.no_grad():
                err = float((fwd() - ref).norm() / ref.norm())
            lin = dm.get_submodule(names[3])
            a = torch.zeros(lin.in_features, 4, requires_grad=True)
            b = torch.randn(4, lin.out_features, generator=torch.Generator().manual_seed(1)) * 0.01
            h = lin.register_forward_hook(lambda m, i, o: o + i[0] @ a @ b)
            times = []
            for k in range(4):
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(lambda s: s.clone(), lambda s: s):  # FLUX adds in place
                    loss = fwd().square().mean()
                loss.backward()
                times.append(time.perf_counter() - t0)
            h.remove()
            ok = a.grad is not None and bool(torch.isfinite(a.grad).all()) and float(a.grad.abs().sum()) > 0
            per = sum(nbytes(dm.get_submodule(n).weight) for n in names) / sum(orig[n].numel() for n in names)
            rows.append(f"| {label} | {err:.4f} | {per:.3f} | {'yes' if ok else 'no'} | "
                        f"{1000 * statistics.median(times[1:]):.0f} | {type(dm.get_submodule(names[3]).weight).__name__} |")
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a result
            rows.append(f"| {label} | fails: {type(e).__name__}: {str(e)[:80]} | | | | |")
        print(rows[-1], flush=True)

    bench("fp32 (reference)", lambda: None)
    from optimum.quanto import qfloat8, qint2, qint4, qint8

    from optimum.quanto.tensor import quantize_weight
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

    def quanto(qt):
        def f():
            for n in names:
                lin = dm.get_submodule(n)
                w = lin.weight.detach()
                if qt.bits == 8:
                    s, sh, gs = AbsmaxOptimizer()(w, qtype=qt, axis=0), None, None
                else:
                    gs = 64 if w.shape[1] % 64 == 0 else None
                    s, sh = MaxOptimizer()(w, qtype=qt, axis=0, group_size=gs)
                lin.weight = torch.nn.Parameter(quantize_weight(w, qtype=qt, axis=0, scale=s, shift=sh, group_size=gs),
                                                requires_grad=False)
        return f

    for qt in (qint8, qfloat8, qint4, qint2):
        bench(f"optimum-quanto {qt.name}", quanto(qt))
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        def ao(cfg):
            def f():
                for n in names:
                    lin = dm.get_submodule(n)
                    lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
                quantize_(dm, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
            return f

        bench("torchao Int8WeightOnly", ao(Int8WeightOnlyConfig()))
        bench("torchao Int4WeightOnly", ao(Int4WeightOnlyConfig(group_size=32)))
        for bits in (8, 6, 4):
            bench(f"torchao IntxWeightOnly int{bits}",
                  ao(IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(32))))
    except ImportError:
        traceback.print_exc()
    print("\n| library / type | forward rel. error | bytes/weight | LoRA gradient | fwd+bwd ms | weight tensor |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
