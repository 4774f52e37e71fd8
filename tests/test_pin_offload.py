"""Block offload's scope (train/offload.py) pinned on the CPU, where the offload device is the training device and
the values alone cannot tell streamed weights from resident ones (issue #26, survivors of the first run): inside a
block's forward its weights are fresh copies of the offloaded tensors, frozen; between calls and after each call
the block holds the offloaded tensors again; on exit the block's own Parameter objects are back, with their
values and requires_grad, and the forward is the class's again."""
from __future__ import annotations

import torch


class Probe(torch.nn.Linear):
    """A layer that records what its forward sees."""

    def forward(self, x):
        self.seen.append((self.weight.data_ptr(), self.weight.requires_grad, self.weight is self.own,
                          self.bias.data_ptr()))
        return super().forward(x)


def test_offloaded_blocks_compute_on_copies_and_are_restored(comfy):
    offload = comfy.engine("train.offload")
    torch.manual_seed(0)
    blocks = [Probe(4, 4), Probe(4, 4)]
    for b in blocks:
        b.__dict__.update(seen=[], own=b.weight)  # plain attributes (not registered as parameters)
    own = [dict(b.named_parameters()) for b in blocks]
    values = [{k: v.detach().clone() for k, v in o.items()} for o in own]
    x = torch.randn(2, 4)
    expected = blocks[1](blocks[0](x)).detach()
    for b in blocks:
        b.seen.clear()
    cpu = torch.device("cpu")
    with offload.offloaded(blocks, cpu, cpu) as h:
        host = h.streamer.host
        for b, hb in zip(blocks, host):  # resumed: the blocks hold the offloaded tensors as new, frozen Parameters
            assert b.weight is not b.own and not b.weight.requires_grad
            assert b.weight.data_ptr() == hb["weight"].data_ptr()
        out = blocks[1](blocks[0](x))
        for b, hb in zip(blocks, host):
            (w_ptr, w_grad, w_own, b_ptr), = b.seen
            assert w_ptr != hb["weight"].data_ptr() and b_ptr != hb["bias"].data_ptr()  # a copy for the call
            assert not w_grad and not w_own
            assert b.weight.data_ptr() == hb["weight"].data_ptr()  # dropped after the call
        h.pause()  # the blocks' own parameters, called as they are
        assert all(b.weight is b.own for b in blocks)
        for b in blocks:
            b.seen.clear()
        blocks[0](x)
        assert blocks[0].seen == [(blocks[0].own.data_ptr(), True, True, blocks[0].bias.data_ptr())]
        h.resume()
        assert all(b.weight is not b.own for b in blocks)
    assert torch.allclose(out, expected)
    for b, o, v in zip(blocks, own, values):
        assert all(b._parameters[k] is o[k] for k in o) and all(p.requires_grad for p in o.values())
        assert all(torch.equal(o[k], v[k]) for k in v)
        assert "forward" not in b.__dict__
    assert offload.block_bytes(blocks) == [(16 + 4) * 4] * 2
