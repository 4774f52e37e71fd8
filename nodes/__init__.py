"""Node classes of the pack (V3 API). Each module lists its nodes in ``NODES``; nothing else lives here."""
from . import configs, data, dataset_tools, experiments, heatmaps, lora, sampling, sliders, speed, te_swap, text_encoders, training


def all_nodes():
    return [*text_encoders.NODES, *data.NODES, *dataset_tools.NODES, *training.NODES, *speed.NODES, *sampling.NODES, *heatmaps.NODES, *lora.NODES, *experiments.NODES, *configs.NODES, *sliders.NODES, *te_swap.NODES]
