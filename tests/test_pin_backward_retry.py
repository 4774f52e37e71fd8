"""The in-place retry of ``Trainer.backward`` pinned (issue #26): ComfyUI's FLUX blocks add into activations that
autograd saved (``img += ...``), so the first backward fails and is retried with saved tensors cloned. The retried
pass must be the pass a trainer that clones from the start makes: same batch, noise and timesteps (both random
streams rewound), no gradient left over from the failed pass."""
from __future__ import annotations

import torch

from support.factories import families


def test_retry_after_inplace_error_equals_cloning_from_the_start(comfy, family_bundle, tmp_path):
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    types = comfy.engine("data.types")
    _, clip, _ = family_bundle("flux1-dev")
    g = torch.Generator().manual_seed(3)
    samples = []
    for i, text in enumerate(("ohwx, a red circle", "ohwx, a blue square")):
        (c1,) = comfy.nodes.CLIPTextEncode().encode(clip, text)
        (c2,) = comfy.nodes.CLIPTextEncode().encode(clip, text + ", flat")
        samples.append(types.Sample(f"s{i}", torch.randn(16, 8, 8, generator=g),
                                    (types.CaptionVariant(text, c1), types.CaptionVariant(text + ", flat", c2)),
                                    bucket=(64, 64)))
    model = families.build_model("flux1-dev")
    with torch.inference_mode():
        run = loop.init_run(model, types.TrainingSet(tuple(samples)), C.LoraConfig(rank=4, alpha=4, preset="attention"),
                            C.TimestepConfig(), C.OptimizerConfig(lr=1e-2),
                            st.RunSettings(run_name="retry", grad_accum=2), runs_root=tmp_path)

    def one_pass(clone_from_start: bool):
        with torch.inference_mode(False), torch.enable_grad():
            tr = loop.Trainer(run)
            try:
                tr.load()  # as train_steps does: base frozen, ordinary tensors
                tr.clone_saved = clone_from_start
                loss = tr.backward()
                grads = [p.grad.clone() for p in tr.params]
                return tr.clone_saved, loss, grads, tr.gen.get_state(), tr.py_rng.getstate()
            finally:
                tr.release()

    retried = one_pass(False)
    cloned = one_pass(True)
    assert retried[0] is True  # the first pass failed on FLUX's in-place add and was retried cloning
    assert retried[1] == cloned[1]
    assert all(torch.equal(a, b) for a, b in zip(retried[2], cloned[2]))
    assert torch.equal(retried[3], cloned[3]) and retried[4] == cloned[4]
