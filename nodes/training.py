"""Nodes: training (LoRA Config, Timestep Strategy, Optimizer, Train Init, Train Steps, Save LoRA).
See docs/training.md."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..aligned_trainer import imaging, plot
from ..aligned_trainer.sampling import animation
from ..aligned_trainer.train import config as C
from ..aligned_trainer.train import speed as speed_mod
from ..aligned_trainer.train import configs_io, export, files, launch, loop, quantize, state, te_swap, timesteps
from ._common import category, node_id
from ._progress import TrainMonitor
from .speed import SPEED

CAT = category("Training")
LORA_CONFIG = io.Custom("AT_LORA_CONFIG")
TIMESTEPS = io.Custom("AT_TIMESTEPS")
OPTIMIZER = io.Custom("AT_OPTIMIZER")
TRAIN_RUN = io.Custom("AT_TRAIN_RUN")
TRAINING_SET = io.Custom("AT_TRAINING_SET")
PREVIEW_PLAN = io.Custom("AT_PREVIEW_PLAN")
RUN_SETTINGS = io.Custom("AT_RUN_SETTINGS")


class LoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("LoraConfig"), display_name="LoRA Config", category=CAT,
            description="What to train: algorithm, rank/alpha, target layers, dropout, max norm.",
            inputs=[
                io.Combo.Input("algorithm", options=list(C.ALGORITHMS), default="lora",
                               tooltip="lora; locon (LoRA on conv layers too); loha; lokr (ComfyUI weight adapters); full "
                                       "(the targets' whole weights, as a trained difference: text-encoder swap; "
                                       "rank/alpha unused)."),
                io.Int.Input("rank", default=16, min=0, max=1024, tooltip="LoRA rank (dim): how many directions each adapted layer may change. Usual 4-32; 16-32 for a "
                                                                                "character or style, 16 on very large models (FLUX, SD3.5 large). Higher = bigger file, more "
                                                                                "overfitting (it also learns backgrounds and lighting)."),
                io.Float.Input("alpha", default=16.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="Scale = alpha / rank. 0 means alpha = rank (scale 1). kohya users often set rank/2 "
                                       "or 1; a lower alpha needs a higher learning rate for the same effect."),
                io.Combo.Input("targets", options=list(C.PRESETS), default="attention+mlp",
                               tooltip="Preset of layers to train."),
                io.String.Input("include", default="", tooltip="Regex of extra module names to train."),
                io.String.Input("exclude", default="", tooltip="Regex of module names never to train."),
                io.Float.Input("rank_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Drop rank dims per step (LoRA)."),
                io.Float.Input("module_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Skip whole adapters per step."),
                io.Float.Input("network_dropout", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Dropout on the LoRA's rank activations (kohya network dropout); lora/locon "
                                       "without DoRA only (LoHa/LoKr/DoRA patch weights: must be 0)."),
                io.Combo.Input("init", options=["default", "gaussian"], default="default",
                               tooltip="LoRA down init: kaiming-scaled (default) or gaussian 1/rank; up starts at 0."),
                io.Float.Input("max_norm", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Scale weight norms (kohya): cap each LoRA delta's norm; 0 = off."),
                io.Boolean.Input("dora", default=False, optional=True,
                                 tooltip="DoRA: also train a per-column magnitude (saved as dora_scale, applied by "
                                         "ComfyUI's LoRA loader). lora/locon only."),
                io.Combo.Input("dora_axis", options=list(C.DORA_AXES), default="input", optional=True,
                               tooltip="DoRA's magnitude axis. input: one per input column (LyCORIS wd_on_out=False), "
                                       "read alike by ComfyUI, Forge and A1111. output: one per output row, as "
                                       "peft/diffusers (and LyCORIS's default) train DoRA; the saved file is written "
                                       "for ComfyUI's reading, and a diffusers copy with peft's magnitudes goes to "
                                       "output/aligned_trainer/diffusers."),
            ],
            outputs=[LORA_CONFIG.Output("lora_config", tooltip="For Train Init.")],
        )

    @classmethod
    def execute(cls, algorithm, rank, alpha, targets, include, exclude, rank_dropout, module_dropout,
                network_dropout, init, max_norm, dora=False, dora_axis="input") -> io.NodeOutput:
        cfg = C.LoraConfig(algorithm, rank, alpha or None, targets, include, exclude, rank_dropout, module_dropout,
                           network_dropout, init, max_norm, dora, dora_axis)
        cfg.validate()
        return io.NodeOutput(cfg)


class TimestepStrategy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TimestepStrategy"), display_name="Timestep Strategy", category=CAT,
            description="How training picks noise levels and weights the loss; works for eps, v and flow models.",
            inputs=[
                io.Combo.Input("density", options=list(C.DENSITIES), default="uniform",
                               tooltip="uniform; linear (ai-toolkit: 1000 evenly spaced steps); logit_normal (SD3); "
                                       "sigmoid (ai-toolkit's name for logit-normal); mode; cosmap."),
                io.Float.Input("logit_mean", default=0.0, min=-5, max=5, step=0.05, tooltip="logit-normal mean."),
                io.Float.Input("logit_std", default=1.0, min=0.01, max=5, step=0.05, tooltip="logit-normal scale."),
                io.Float.Input("mode_scale", default=1.29, min=0, max=5, step=0.01, tooltip="Scale of the 'mode' density."),
                io.Combo.Input("shift", options=["model", "none", "fixed", "flux_resolution"], default="model",
                               tooltip="model: the model's own schedule; fixed: SD3 shift; flux_resolution: FLUX's "
                                       "resolution-dependent shift (flow models)."),
                io.Float.Input("shift_value", default=3.0, min=0.1, max=20, step=0.1, tooltip="Shift for 'fixed'."),
                io.Combo.Input("bias", options=["balanced", "high_noise", "low_noise"], default="balanced",
                               tooltip="Move the distribution towards noisy (composition) or clean (detail) steps."),
                io.Float.Input("bias_strength", default=0.0, min=0, max=5, step=0.05, tooltip="Strength of the bias."),
                io.Int.Input("min_timestep", default=0, min=0, max=999, tooltip="Lowest timestep (of 1000)."),
                io.Int.Input("max_timestep", default=1000, min=1, max=1000, tooltip="Highest timestep (of 1000)."),
                io.Combo.Input("weighting", options=list(C.WEIGHTINGS), default="none",
                               tooltip="Loss weighting: min_snr (gamma; eps and v), debiased estimation, SD3 "
                                       "sigma_sqrt/cosmap, weighted (ai-toolkit's bell curve over timesteps)."),
                io.Float.Input("min_snr_gamma", default=5.0, min=0.1, max=50, step=0.1, tooltip="Gamma of min-SNR weighting; 5 is the usual value (kohya)."),
                io.Float.Input("noise_offset", default=0.0, min=0, max=1, step=0.005, tooltip="Noise offset strength (darker darks, brighter brights); 0 = off, 0.03-0.1 if used."),
                io.Int.Input("multires_iterations", default=0, min=0, max=10, tooltip="Pyramid noise iterations (0 = off)."),
                io.Float.Input("multires_discount", default=0.3, min=0, max=1, step=0.01, tooltip="Pyramid noise discount."),
                io.Combo.Input("expert", options=["none", "high_noise", "low_noise"], default="none", optional=True,
                               tooltip="Wan 2.2 A14B: train only the high-noise expert's part of the schedule (model "
                                       "sigma >= expert_boundary) or the low-noise expert's (below it); none for "
                                       "other models. Load the matching expert's model file."),
                io.Float.Input("expert_boundary", default=0.0, min=0.0, max=0.99, step=0.005, optional=True,
                               tooltip="Where the Wan 2.2 experts split the schedule, on the model's shifted sigma. "
                                       "0 (default): the loaded model's official boundary, set by Train Init "
                                       "(0.875 T2V A14B, 0.9 I2V A14B); another value overrides it."),
            ],
            outputs=[TIMESTEPS.Output("timesteps", tooltip="For Train Init."),
                     io.Image.Output("histogram", tooltip="20k draws of the timestep distribution.")],
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        cfg = C.TimestepConfig(**kw)
        cfg.validate()
        u = timesteps.histogram_u(cfg)
        img = plot.histogram(u.tolist(), title=f"timesteps: {cfg.density}, bias {cfg.bias}, shift {cfg.shift}"
                             + ("" if cfg.shift in ("none", "fixed") else " (applied per model at train time)"))
        return io.NodeOutput(cfg, imaging.to_tensor(img))


class Optimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("Optimizer"), display_name="Optimizer", category=CAT,
            description="Optimizer, learning-rate schedule and gradient clipping.",
            inputs=[
                io.Combo.Input("optimizer", options=list(C.OPTIMIZERS), default="adamw",
                               tooltip="adamw; adamw8bit (needs bitsandbytes); prodigy (use lr 1.0); adafactor; lion."),
                io.Float.Input("learning_rate", default=1e-4, min=-1.0, max=10.0, step=1e-5, tooltip="Step size of the optimizer. 1e-4 is safe for LoRA on every family; 2e-4 trains faster "
                                       "if you watch the previews; 4e-4 and above tends to overshoot. Prodigy: use 1.0."),
                io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001, tooltip="Pulls weights towards 0 each step (AdamW-style) against overfitting; "
                                       "0.01 (default) or 1e-4 work for LoRA and rarely need changing."),
                io.Float.Input("beta1", default=0.9, min=0.0, max=0.9999, step=0.001, tooltip="Adam/Prodigy/Lion beta1."),
                io.Float.Input("beta2", default=0.999, min=0.0, max=0.99999, step=0.0001, tooltip="Adam/Prodigy/Lion beta2."),
                io.Combo.Input("scheduler", options=list(C.SCHEDULERS), default="constant", tooltip="How the learning rate changes over total_steps (diffusers schedules): constant "
                                       "(default, simplest), cosine (a common all-rounder), linear, polynomial, with restarts."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, tooltip="Steps of linear warmup from 0 to the learning rate. 0 for AdamW; about 2-5% of the "
                                      "steps with Prodigy."),
                io.Int.Input("total_steps", default=1000, min=1, max=1000000, tooltip="Length of the schedule in steps: set it to the steps you will run in total (the "
                                      "sum over Train Steps nodes), or decaying schedules end too early or too late. Default 1000 "
                                      "matches a new Train Steps node."),
                io.Int.Input("num_cycles", default=1, min=1, max=100, tooltip="Restarts of cosine_with_restarts."),
                io.Float.Input("power", default=1.0, min=0.1, max=10, step=0.1, tooltip="Power of the polynomial schedule."),
                io.Float.Input("grad_clip", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Clip the gradient norm to this value; 1.0 (default) is the usual choice; 0 = off."),
                io.Float.Input("d_coef", default=1.0, min=0.01, max=10, step=0.01, tooltip="Prodigy d_coef."),
                io.Boolean.Input("decouple", default=True, tooltip="Prodigy decoupled weight decay."),
                io.Boolean.Input("use_bias_correction", default=False, tooltip="Prodigy bias correction."),
                io.Boolean.Input("safeguard_warmup", default=False, tooltip="Prodigy safeguard warmup."),
            ],
            outputs=[OPTIMIZER.Output("optimizer_config", tooltip="For Train Init.")],
        )

    @classmethod
    def execute(cls, optimizer, learning_rate, weight_decay, beta1, beta2, scheduler, warmup_steps, total_steps,
                num_cycles, power, grad_clip, d_coef, decouple, use_bias_correction, safeguard_warmup) -> io.NodeOutput:
        cfg = C.OptimizerConfig(optimizer, learning_rate, weight_decay, (beta1, beta2), 1e-8, scheduler, warmup_steps,
                                total_steps, num_cycles, power, grad_clip, d_coef, decouple, use_bias_correction,
                                safeguard_warmup)
        cfg.validate()
        return io.NodeOutput(cfg)


class TrainInit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TrainInit"), display_name="Train Init", category=CAT,
            description="Builds (or resumes) a training run. Everything is validated here, before training.",
            inputs=[
                io.Model.Input("model", tooltip="The model to train a LoRA for."),
                TRAINING_SET.Input("training_set", tooltip="From Cache Text Embeddings."),
                LORA_CONFIG.Input("lora_config", tooltip="From LoRA Config."),
                TIMESTEPS.Input("timesteps", tooltip="From Timestep Strategy."),
                OPTIMIZER.Input("optimizer", tooltip="From Optimizer."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of init, batches, noise, timesteps."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images per step (from one bucket). 1 on consumer GPUs; use grad_accum for a larger "
                                      "effective batch."),
                io.Int.Input("grad_accum", default=1, min=1, max=256, tooltip="Add up the gradients of N batches before each optimizer step: batch_size x N images "
                                      "per step at the memory of one batch (N times slower per step). 1-4 is usual."),
                io.Combo.Input("precision", options=list(loop.DTYPES), default="fp32", tooltip="Autocast precision."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute UNet/transformer blocks in the backward pass: much less memory, about "
                                                   "20-30% slower. Turn on for SDXL/SD3.5/FLUX at 1024 px on <= 24 GB."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, tooltip="Keep an exponential moving average of the LoRA (saved when Save LoRA uses it); smooths "
                                   "late-training noise. 0 = off; 0.999-0.9995 is usual."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance fed to guidance-distilled models (FLUX dev) during training."),
                io.Int.Input("val_count", default=0, min=0, max=10000,
                             tooltip="Samples held out for validation loss, taken from the end of the dataset (0: validate "
                                     "on the training samples). Must leave at least one sample to train on."),
                io.Float.Input("reg_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Multiplies the loss weight of regularization images (on top of the dataset's)."),
                io.Float.Input("dop_weight", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Differential output preservation: keep the model's prediction for the "
                                       "preservation prompt unchanged (0 = off; needs preservation_prompt)."),
                io.String.Input("run_name", default="my_lora",
                                tooltip="Run folder under output/aligned_trainer/runs (a plain name, at most 100 "
                                        "characters)."),
                io.String.Input("resume", default="none",
                                tooltip="'none', 'latest' (newest checkpoint of this run name), another run's name "
                                        "(its newest checkpoint), or a checkpoint file inside "
                                        "output/aligned_trainer/runs, e.g. 'my_lora/checkpoints/step_0000100.safetensors'."),
                io.Conditioning.Input("preservation_prompt", optional=True,
                                      tooltip="Encoded preservation prompt (e.g. 'a photo of a person') for DOP."),
                io.Combo.Input("if_exists", options=list(state.RUN_IF_EXISTS), default="new_name", optional=True,
                               tooltip="When run_name already holds checkpoints of another run: new_name (write to "
                                       "'<run_name>_2', ...; nothing is lost), overwrite (delete its old "
                                       "checkpoints), resume (continue its newest checkpoint)."),
                io.String.Input("init_lora", default="none", optional=True,
                                tooltip="'none', or a LoRA file in models/loras (its name, or a path inside a "
                                        "registered loras folder) written by kohya, ai-toolkit, diffusers/peft or "
                                        "Save LoRA, to continue training from; rank and dora must match the file. "
                                        "Ignored when resuming."),
                RUN_SETTINGS.Input("run_settings", optional=True,
                                   tooltip="From Import Training Config: the settings its file sets (seed, batch size, "
                                           "precision, run name, ...) replace the widgets here; the rest keep theirs."),
                io.Combo.Input("quantize", options=list(quantize.MODES), default="none", optional=True,
                               tooltip="Quantize the frozen base's Linear weights while training (optimum-quanto): "
                                       "int8 (~1 byte per weight, close to bf16 quality) or int4 (~0.5 byte; for "
                                       "FLUX/Qwen-Image on 16-24 GB). The model itself is not changed; the LoRA "
                                       "loads on the full-precision model. none for SD1.5/SDXL on >= 12 GB."),
                io.Int.Input("offload_blocks", default=0, min=0, max=1000, optional=True,
                             tooltip="Keep the weights of the last N blocks in CPU memory and stream each to the "
                                     "GPU when it runs (forward and checkpointed backward). Saves their weights "
                                     "at the cost of copies each step; needs gradient_checkpointing to help. 0 = off."),
                io.Float.Input("memory_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.5, optional=True,
                               tooltip="Memory the plan may use, in GiB; 0 = the device's free memory. Train Init "
                                       "refuses a plan above it and lists settings that fit."),
                io.Int.Input("processes", default=1, min=1, max=loop.MAX_PROCESSES, optional=True,
                             tooltip="Data-parallel training: Train Steps starts this many worker processes "
                                     "(torchrun; one per GPU, or several sharing one), each with its own copy of "
                                     "the model; a step then takes batch_size x grad_accum x processes images, "
                                     "split over them. 1 (default) trains in ComfyUI's own process. No previews "
                                     "while training with more than 1."),
                SPEED.Input("speed", optional=True,
                            tooltip="From Speed Options: how each step is computed (fused optimizer, channels-last, "
                                    "merged LoRA, attention kernel). Not connected: the plain path."),
            ],
            outputs=[TRAIN_RUN.Output("run", tooltip="The training run (for Train Steps); its memory plan (estimated "
                                                     "peak against the budget) is shown under the node.")],
        )

    @classmethod
    def execute(cls, model, training_set, lora_config, timesteps, optimizer, seed, batch_size, grad_accum, precision,
                gradient_checkpointing, ema_decay, guidance, val_count, run_name, resume, reg_weight=1.0,
                dop_weight=0.0, preservation_prompt=None, if_exists="new_name", init_lora="none",
                run_settings=None, quantize="none", offload_blocks=0, memory_budget_gb=0.0,
                processes=1, speed=None) -> io.NodeOutput:
        settings = configs_io.apply_settings(
            state.RunSettings(seed, batch_size, grad_accum, precision, gradient_checkpointing, ema_decay, guidance,
                              val_count, 4, run_name, reg_weight, dop_weight, quantize, offload_blocks,
                              memory_budget_gb, processes), run_settings)
        settings = speed_mod.apply(settings, speed)
        run = loop.init_run(model, training_set, lora_config, timesteps, optimizer, settings, resume,
                            preservation=preservation_prompt, if_exists=if_exists, init_lora=init_lora)
        text = "\n".join(filter(None, (run.meta.get("resume_note"), run.meta.get("expert_note"),
                                       run.meta.get("speed_note"), run.meta.get("lora_math_note"),
                                       run.meta.get("memory_plan", ""))))
        return io.NodeOutput(run, ui={"text": [text]})


class TrainSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TrainSteps"), display_name="Train Steps", category=CAT,
            description="Runs K steps and returns a NEW run (its input is never changed: re-queueing repeats the "
                        "same K steps; chain nodes or resume to continue) and the model with the current LoRA.",
            inputs=[
                TRAIN_RUN.Input("run", tooltip="From Train Init or another Train Steps."),
                io.Int.Input("steps", default=1000, min=1, max=1000000,
                             tooltip="Optimizer steps to run in this node. Typical LoRA runs: 1000-3000 steps (SD1.5 "
                                     "~1500; SDXL/FLUX 2000-3000); keep the Optimizer's total_steps equal to the total."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1000000, tooltip="Save a resumable checkpoint every N steps (0 = at the end only). Every 250-500 "
                                     "steps lets you pick an earlier, less overfit state."),
                io.Int.Input("keep_last", default=3, min=1, max=1000, tooltip="Checkpoints to keep."),
                io.Int.Input("val_every", default=0, min=0, max=1000000, tooltip="Compute the validation loss (fixed noise and timesteps, comparable across steps) "
                                     "every N steps; 0 = off. Drawn green in the loss chart; each pass costs about one step per "
                                     "validation sample."),
                PREVIEW_PLAN.Input("preview_plan", optional=True, tooltip="Optional: render sample previews every N steps."),
            ],
            outputs=[TRAIN_RUN.Output("trained_run", tooltip="The run after these steps."),
                     io.Model.Output("model", tooltip="The model with the current LoRA applied (EMA weights when "
                                                      "the run keeps an EMA); works with any sampler."),
                     io.Image.Output("loss_plot", tooltip="Loss so far.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, run, steps, checkpoint_every, keep_last, val_every, preview_plan=None) -> io.NodeOutput:
        uid = cls.hidden.unique_id
        mon = TrainMonitor(uid, run.step, steps, val_every, checkpoint_every,
                           preview_plan.every_n if preview_plan is not None else 0)

        def on_step(r, trainer):
            mon.on_step(r)

        te_swap.check_plan(run.model, preview_plan)
        if preview_plan is not None:
            preview_plan.check(run.model)

        def preview(trainer, step):
            img = export.render_preview(run, preview_plan, trainer.adapter_state(), step)
            mon.on_preview(step, img, getattr(preview_plan, "fps", 16.0))

        graph = launch.Graph(cls.hidden.prompt or {}, str(uid), node_id("TrainInit"), node_id("TrainSteps"))
        new = launch.train_steps(run, steps, checkpoint_every, keep_last, val_every, on_step,
                                 preview if preview_plan is not None else None,
                                 preview_plan.every_n if preview_plan is not None else 0, graph)
        if checkpoint_every == 0 or new.step % checkpoint_every:
            new = new.advanced(checkpoints=state.save_checkpoint(new, keep_last))
        model = export.model_with_lora(new.model, export.kohya_state_dict(new, dtype=torch.float32))
        img, _ = plot.loss_plot(list(new.history))
        view = animation.ui(mon.animated) if mon.animated else None  # video previews: animated WebPs
        return io.NodeOutput(new, model, imaging.to_tensor(img), ui=view)


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SaveLora"), display_name="Save LoRA", category=CAT,
            description="Writes the LoRA into ComfyUI's loras folder (kohya keys + training metadata), after "
                        "checking that ComfyUI's own LoRA loader maps every key.",
            inputs=[TRAIN_RUN.Input("run", tooltip="The trained run."),
                    io.String.Input("name", default="my_lora",
                                    tooltip="File name in the loras folder (no folders, no '..', at most 120 characters)."),
                    io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16", tooltip="Stored precision."),
                    io.Boolean.Input("use_ema", default=True, optional=True,
                                     tooltip="Save the EMA-averaged weights when the run keeps an EMA (else the "
                                             "last trained weights)."),
                    io.Combo.Input("if_exists", options=list(files.IF_EXISTS), default="new_name",
                                   optional=True,
                                   tooltip="When a LoRA of this name exists: new_name (save as '<name>_2', ...; "
                                           "nothing is lost) or overwrite."),
                    io.String.Input("base_model_name", default="", optional=True,
                                    tooltip="The checkpoint file the run trained on (e.g. 'sd_xl_base_1.0.safetensors'), "
                                            "recorded as ss_sd_model_name for A1111/Forge/civitai; ComfyUI's MODEL "
                                            "does not carry its file name. Empty: the model family is recorded.")],
            outputs=[io.String.Output("path", tooltip="Where the LoRA was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run, name, dtype, use_ema=True, if_exists="new_name", base_model_name="") -> io.NodeOutput:
        path, report = export.save_lora(run, name, dtype=loop.DTYPES[dtype], ema=use_ema, if_exists=if_exists,
                                        base_model_name=base_model_name)
        text = json.dumps(report)
        return io.NodeOutput(str(path), ui={"text": [text]})


NODES = [LoraConfig, TimestepStrategy, Optimizer, TrainInit, TrainSteps, SaveLora]
