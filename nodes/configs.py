"""Nodes: Import Training Config (kohya sd-scripts TOML/JSON, ai-toolkit YAML -> LoRA Config, Optimizer, Timestep
Strategy and Train Init's run settings) and Export Training Config (a run's settings -> both formats, in the
output folder). See docs/interop.md."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..aligned_trainer.train import configs_io
from ._common import category, node_id
from .training import LORA_CONFIG, OPTIMIZER, RUN_SETTINGS, TIMESTEPS, TRAIN_RUN, LoraConfig, Optimizer, \
    TimestepStrategy, TrainInit

CAT = category("Training")


class ImportTrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("ImportTrainingConfig"), display_name="Import Training Config", category=CAT,
            description="Reads a kohya sd-scripts config (.toml/.json) or an ai-toolkit job (.yaml) from ComfyUI's "
                        "input folder into LoRA Config, Optimizer and Timestep Strategy settings and the run "
                        "settings for Train Init. Shows what was imported and what was approximated.",
            inputs=[
                io.String.Input("config_file", default="my_lora.toml",
                                tooltip="A config file in ComfyUI's input folder (its name, e.g. 'my_lora.toml', or a "
                                        "path inside it or inside a folder the server admin allows): kohya .toml/"
                                        ".json or ai-toolkit .yaml/.yml."),
            ],
            outputs=[LORA_CONFIG.Output("lora_config", tooltip="For Train Init, in place of LoRA Config."),
                     TIMESTEPS.Output("timesteps", tooltip="For Train Init, in place of Timestep Strategy."),
                     OPTIMIZER.Output("optimizer", tooltip="For Train Init, in place of Optimizer."),
                     RUN_SETTINGS.Output("run_settings", tooltip="For Train Init's run_settings: the values the file "
                                                                 "sets replace Train Init's widgets."),
                     io.String.Output("summary", tooltip="The imported settings and notes, as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, config_file="", **kwargs):
        """Run again when the config file is edited."""
        return configs_io.config_fingerprint(config_file)

    @classmethod
    def execute(cls, config_file) -> io.NodeOutput:
        lora, opt, ts, settings, summary = configs_io.import_config(config_file)
        configs_io.check_limits(summary["file"], configs_io.widget_values(summary), _widget_limits())
        text = json.dumps(summary, indent=1)
        return io.NodeOutput(lora, ts, opt, settings, text, ui={"text": [text]})


def _widget_limits() -> dict[str, tuple[str, dict[str, tuple]]]:
    """{section: (node title, {widget: (min, max)})}: the number widgets an imported file's values replace."""
    out = {}
    for section, node in (("lora", LoraConfig), ("optimizer", Optimizer), ("timesteps", TimestepStrategy),
                          ("settings", TrainInit)):
        schema = node.define_schema()
        out[section] = (schema.display_name, {i.id: (i.min, i.max) for i in schema.inputs
                                              if isinstance(i, (io.Int.Input, io.Float.Input))})
    return out


class ExportTrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("ExportTrainingConfig"), display_name="Export Training Config", category=CAT,
            description="Writes a run's settings as a kohya sd-scripts TOML and an ai-toolkit YAML into "
                        "output/aligned_trainer/configs (an existing file keeps its name; the new one gets "
                        "'<name>_2', ...). docs/interop.md lists what maps to each tool.",
            inputs=[
                TRAIN_RUN.Input("run", tooltip="From Train Init or Train Steps."),
                io.String.Input("name", default="",
                                tooltip="File name without suffix (empty: the run name); a plain name, at most 100 "
                                        "characters."),
            ],
            outputs=[io.String.Output("kohya_toml", tooltip="Path of the written kohya TOML."),
                     io.String.Output("ai_toolkit_yaml", tooltip="Path of the written ai-toolkit YAML.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run, name="") -> io.NodeOutput:
        toml_path, yaml_path = configs_io.export_run(run, name)
        return io.NodeOutput(str(toml_path), str(yaml_path), ui={"text": [str(toml_path), str(yaml_path)]})


NODES = [ImportTrainingConfig, ExportTrainingConfig]
