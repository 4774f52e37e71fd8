#!/usr/bin/env python3
"""Mutation testing of the engine: break one thing at a time, see whether a test notices.

    .work/venv/bin/python scripts/mutate.py train/timesteps            # one module
    .work/venv/bin/python scripts/mutate.py train data --budget 1800  # packages, 30 min in all
    .work/venv/bin/python scripts/mutate.py --report                  # rewrite MUTATION.md from the results
    .work/venv/bin/python scripts/mutate.py data/dataset --lines 124-142 --tests tests/test_pin_data.py::test_x
                                          # what one test kills (not scored; kept in mutation_targeted.json)
    .work/venv/bin/python scripts/mutate.py --killed-by test_ema_value  # stored mutants a test killed

(``COMFYUI_PATH`` as for the tests; ``scripts/setup.py`` exports it, the default is ``.work/ComfyUI``.)
Not part of CI. Runs under ``nice -n 10`` and with one torch thread.

How it works, and why not mutmut: the pack is imported by ComfyUI's own loader through the link in ComfyUI's
``custom_nodes`` to this repository, so a mutated copy of the tree (mutmut's ``mutants/``) would never be
loaded. Instead one pytest session runs the module's fast tests once (the baseline) with line coverage per
test, keeping ComfyUI, the tiny models and every session fixture alive. Each mutant is then run in a forked
child of that session: the child compiles the mutated module and swaps the code object of the one function
that changed into the live function (every ``from .x import f`` sees it), then runs only the tests that
executed the mutated line, fastest first, stopping at the first failure. Nothing on disk is changed. A mutant
nobody executes is reported as "not covered". Only code inside functions is mutated (module constants and
dataclass defaults are not).

Mutations (realistic slips): arithmetic and comparison operators swapped (``+``/``-``, ``*``/``/``, ``<``/``<=``,
``==``/``!=``, ``is``/``is not``, ``in``/``not in``), ``and``/``or``, a ``not`` or unary minus dropped, numbers
off by one (``n -> n + 1``), ``True``/``False`` flipped, ``min``/``max`` swapped, a keyword argument dropped from
a call (an option not passed on), a call statement deleted (an update never applied), a re-assignment
deleted (a transformation skipped), ``x += y`` -> ``x = y``, ``break``/``continue`` swapped.

Results go to ``scripts/mutation_results.json`` (merged per module) and ``MUTATION.md`` (the report: score per
module, survivors, equivalent mutants with their reasons from ``scripts/mutation_equivalents.json``).
"""
from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "aligned_trainer"
RESULTS = ROOT / "scripts" / "mutation_results.json"
EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents.json"
REPORT = ROOT / "MUTATION.md"
TARGETED = ROOT / "scripts" / "mutation_targeted.json"  # --tests runs: which mutants given tests kill (not scored)
NOTES = ROOT / "scripts" / "mutation_notes.md"  # hand-written notes appended to the report

# The fast, in-process tests that exercise each engine module (server and browser tests are left out: the
# server runs the pack in another process, which a forked mutant cannot reach).
TESTS = {
    "train/timesteps.py": ["tests/test_pin_timesteps.py", "tests/test_timesteps.py",
                           "tests/test_train_features.py::test_sigmoid_is_logit_normal",
                           "tests/test_train_features.py::test_linear_is_uniform_on_the_1000_step_grid",
                           "tests/test_train_features.py::test_weighted_bell_curve",
                           "tests/test_train_features.py::test_fixed_shift_in_histogram"],
    "train/adapters.py": ["tests/test_pin_adapters.py", "tests/test_pin_adapter_weights.py",
                          "tests/test_train_activation.py::test_conv_hook_equals_weight_merge",
                          "tests/test_pin_loop.py::test_max_norm_holds_after_each_update",
                          "tests/test_pin_loop.py::test_max_norm_waits_for_the_device_once_and_equals_the_plain_path",
                          "tests/test_train_features.py::test_seeded_init_is_reproducible_for_all_algorithms",
                          "tests/test_train_features.py::test_algorithms_save_with_zero_unmapped_keys",
                          "tests/test_train_features.py::test_dora_trains_and_loads_as_trained",
                          "tests/test_train_activation.py::test_network_dropout_refused_where_weights_are_patched",
                          "tests/test_paths.py::test_user_regex_times_out_within_a_second_on_real_layers"],
    "train/optim.py": ["tests/test_pin_optim.py", "tests/test_pin_loop.py::test_ema_value_after_n_steps",
                       "tests/test_pin_loop.py::test_ema_update_is_a_fixed_number_of_ops_and_equals_the_per_parameter_update"],
    "train/placement.py": ["tests/test_pin_placement.py",
                           "tests/test_memory_modes.py::test_quantized_around_comfyuis_load_and_previews_see_the_full_base",
                           "tests/test_memory_modes.py::test_quantized_base_trains_and_is_restored",
                           "tests/test_memory_modes.py::test_offload_is_bit_equal_after_10_steps",
                           "tests/test_memory_modes.py::test_quantize_leaves_weight_side_adapter_layers_as_loaded_and_errors_propagate",
                           "tests/test_sampling_plan.py::test_train_steps_renders_plan_at_requested_steps"],
    "train/loop.py": ["tests/test_pin_loop_paths.py", "tests/test_pin_gc_cancel.py",
                      "tests/test_pin_slider.py::test_trainer_step_sums_the_objectives_micro_batches_with_seeded_dropout", "tests/test_pin_backward_retry.py", "tests/test_pin_loop.py", "tests/test_pin_options.py", "tests/test_train.py::test_resume_equals_uninterrupted",
                      "tests/test_train_features.py::test_dop_and_reg_weight_change_the_loss"],
    "train/config.py": ["tests/test_pin_config.py", "tests/test_train.py::test_invalid_settings_fail_before_training"],
    "train/state.py": ["tests/test_pin_state.py", "tests/test_resume.py",
                       "tests/test_train.py::test_resume_equals_uninterrupted",
                       "tests/test_train.py::test_invalid_settings_fail_before_training"],
    # train/slider.py: the objective pinned against ComfyUI's own predictions and LoRA loader (test_pin_slider.py)
    "train/slider.py": ["tests/test_pin_slider.py"],
    # data-parallel: the pure parts in process (test_pin_distributed.py; the multi-process runs of
    # test_distributed.py start torchrun workers, minutes per mutant); run them with --lines on the pure functions
    "train/distributed.py": ["tests/test_pin_distributed.py"],
    "train/launch.py": ["tests/test_pin_distributed.py"],
    # train/quantize.py: run with --lines on the text-encoder scope (unpack_bits, text_encoder_eligible,
    # quantized_text_encoder); the base-model quantization is exercised through placement.py's list
    "train/quantize.py": ["tests/test_te_quantize.py"],
    # train/memory.py: the plan's parts against independent counts on the tiny SD1.5 (test_memory_plan.py's FLUX /
    # SDXL peak measurements take about a minute each per mutant and are left out)
    # (test_sliders.py's anchored slider plan: the only one whose objective back-propagates two latents per sample)
    "train/memory.py": ["tests/test_pin_memory_parts.py", "tests/test_pin_memory.py",
                        "tests/test_memory_plan.py::test_probe_shapes_keep_a_video_latents_frames",
                        "tests/test_sliders.py::test_memory_plan_of_an_anchored_slider_step"],
    "train/dora_axes.py": ["tests/test_pin_dora_axes.py"],
    "train/experts.py": ["tests/test_pin_experts.py"],
    "train/model_facts.py": ["tests/test_pin_experts.py"],
    "train/export.py": ["tests/test_pin_export.py",
                        "tests/test_train_features.py::test_algorithms_save_with_zero_unmapped_keys",
                        "tests/test_train_features.py::test_ema_weights_are_saved_and_resumed"],
    # first runs 2026-12-01 (issue #26): modules added since the tables were set up
    "train/naming.py": ["tests/test_pin_export.py",
                        "tests/test_interop_metadata.py::test_sd15_metadata_from_the_dataset_report"],
    "train/peft_layout.py": ["tests/test_pin_peft_layout.py", "tests/test_pin_export.py::test_ema_in_the_peft_layout"],
    "train/metadata.py": ["tests/test_interop_metadata.py",
                          "tests/test_pin_export.py::test_kohya_metadata_carries_the_run_settings"],
    "train/resume.py": ["tests/test_pin_resume.py", "tests/test_resume.py"],
    "train/text_mask.py": ["tests/test_pin_text_mask.py", "tests/test_train_chroma.py"],
    "train/offload.py": ["tests/test_pin_offload.py", "tests/test_pin_placement.py",
                         "tests/test_memory_modes.py::test_offload_is_bit_equal_after_10_steps"],
    "train/interop.py": ["tests/test_interop_import.py", "tests/test_pin_interop.py"],
    "train/files.py": ["tests/test_pin_files.py"],
    # train/configs_io.py: kohya / ai-toolkit config import and export, in process (the node tests of
    # test_interop_config_nodes.py go through the server, except the export one)
    "train/configs_io.py": ["tests/test_pin_configs_io.py", "tests/test_interop_configs.py",
                            "tests/test_interop_config_nodes.py::test_export_takes_the_next_free_name_and_writes_atomically"],
    # train/diffusers_check.py: the save-time diffusers check, on hand-built files (pin) and on the files Save LoRA
    # writes (test_pin_export.py saves; the interop tests that call check() directly; their module fixture builds
    # diffusers' SD3 pipeline once, in the baseline)
    "train/diffusers_check.py": ["tests/test_pin_diffusers_check.py", "tests/test_pin_export.py",
                                 "tests/test_interop_diffusers.py::test_save_check_agrees_with_diffusers_and_refuses_dropped_modules",
                                 "tests/test_interop_diffusers.py::test_flux_width_diffusers_cannot_convert_is_not_checkable",
                                 "tests/test_interop_diffusers.py::test_sd3_kohya_names_load_nothing_in_diffusers"],
    "train/full.py": ["tests/test_pin_full.py", "tests/test_te_swap.py"],
    "train/te_swap.py": ["tests/test_pin_te_swap.py", "tests/test_te_swap.py"],
    "train/te_swap_files.py": ["tests/test_pin_te_swap.py", "tests/test_te_swap.py"],
    "train/te_swap_measure.py": ["tests/test_pin_te_swap.py", "tests/test_te_swap.py"],
    "train/te_swap_reset.py": ["tests/test_pin_te_swap.py", "tests/test_te_swap.py"],
    "train/te_swap_pooled.py": ["tests/test_pin_te_swap.py", "tests/test_te_swap.py"],
    "te/inputs.py": ["tests/test_pin_te_hv15.py"],
    "data/buckets.py": ["tests/test_pin_data.py", "tests/test_data.py", "tests/test_data_inputs.py"],
    "data/captions.py": ["tests/test_pin_data.py", "tests/test_data.py", "tests/test_data_inputs.py"],
    "data/dataset.py": ["tests/test_pin_dataset.py", "tests/test_pin_data.py", "tests/test_data.py", "tests/test_data_inputs.py"],
    "data/images.py": ["tests/test_pin_images.py", "tests/test_data.py", "tests/test_data_inputs.py"],
    "data/video.py": ["tests/test_pin_video.py", "tests/test_data_video.py"],
    "data/vae_roundtrip.py": ["tests/test_pin_vae_roundtrip.py",
                              "tests/test_dataset_tools.py::test_vae_round_trip_metrics_match_a_direct_computation_worst_first"],
    "data/cleaning.py": ["tests/test_pin_cleaning.py",
                         "tests/test_dataset_tools.py::test_cleaning_removes_perturbation_energy_keeps_originals_and_reuses_copies",
                         "tests/test_dataset_tools.py::test_cleaning_settings_are_checked",
                         "tests/test_dataset_tools.py::test_noise_estimate_recovers_a_known_sigma_and_the_motif_score_sees_a_pattern"],
    "data/types.py": ["tests/test_edit.py"],
    "data/summary.py": ["tests/test_pin_summary.py", "tests/test_ui_support.py::test_dataset_route_guard_and_summary"],
    "data/cache.py": ["tests/test_pin_cache.py", "tests/test_data_cache.py",
                      "tests/test_data.py::test_latent_cache_hit_miss_invalidation_and_corruption",
                      "tests/test_data.py::test_text_cache_and_text_encoder_unloaded"],
    # sampling/: the pin tests only (no sampling) except render.py and compare.py, whose sampler paths only the
    # stock-KSampler comparisons exercise (one each); the other stock comparisons (test_sampling_grid/plan,
    # test_te_recipe, the A/B training server test) are too slow to trace on the shared machine and are left out,
    # so checkpoint_grid, pairs_grid, apply count as not covered here.
    "sampling/checkpoints.py": ["tests/test_pin_checkpoints.py", "tests/test_pin_sampling.py"],
    "sampling/compare.py": ["tests/test_pin_sampling.py",
                            "tests/test_sampling_compare.py::test_ab_two_models_grid_and_difference_column"],
    "sampling/plans.py": ["tests/test_pin_plans.py", "tests/test_pin_sampling.py", "tests/test_sampling_preview.py::test_walk_seed_is_base_plus_step"],
    "sampling/render.py": ["tests/test_pin_render.py", "tests/test_pin_sampling.py",
                           "tests/test_sampling_preview.py::test_preview_cells_equal_stock_ksampler_and_grid_geometry"],
    "sampling/history.py": ["tests/test_pin_sampling.py", "tests/test_sampling_loss.py"],
    "sampling/animation.py": ["tests/test_pin_animation.py"],
    # sampling/slider_sweep.py: parse_strengths by the pin; sweep() by test_sliders.py's sweep test against the stock
    # LoRA loader (its module fixture trains a slider once, in the baseline)
    "sampling/slider_sweep.py": ["tests/test_pin_slider_sweep.py",
                                 "tests/test_sliders.py::test_sweep_grid_columns_are_the_lora_at_each_strength",
                                 "tests/test_sliders.py::test_sweep_reports_progress_and_leaves_no_lora_patched_model"],
    # sampling/joint_layouts.py: where the text sits in each DiT's attention, read by the heatmap capture on the tiny
    # family models (test_heatmaps.py samples one step each; the refusal test needs no weights)
    "sampling/joint_layouts.py": ["tests/test_pin_joint_layouts.py", "tests/test_heatmaps.py"],
    # sampling/heatmaps.py: the capture's arithmetic by the pin on hand-built attention; sampling with the hooks
    # (image unchanged, maps per family) by test_heatmaps.py
    "sampling/heatmaps.py": ["tests/test_pin_heatmaps.py", "tests/test_heatmaps.py"],
    "sampling/ab_training.py": ["tests/test_pin_sampling.py"],
    "sampling/lora_recipe.py": ["tests/test_pin_sampling.py"],
    # te/align: test_te_reference.py (the diffusers pipelines) was in the list for the first 47 mutants of the
    # 2026-11-30 run; survivors re-ran it for minutes each on the shared machine, so the rest used these two
    "te/align.py": ["tests/test_pin_te.py", "tests/test_te_nodes.py"],
    "te/specs.py": ["tests/test_pin_te_specs.py", "tests/test_te_specs.py"],
    "te/inspect.py": ["tests/test_pin_inspect.py", "tests/test_pin_te.py", "tests/test_te_nodes.py"],
    "te/tokenizers.py": ["tests/test_pin_tokenizers.py"],
    # te/mistral_compat.py: ComfyUI's FLUX.2 tokenizer under transformers 5 (the fast tokenizer tests, no encoder)
    "te/mistral_compat.py": ["tests/test_pin_mistral_compat.py",
                             "tests/test_te_flux2.py::test_comfyui_own_mistral_loader_needs_transformers_4",
                             "tests/test_te_flux2.py::test_flux2_tokenizer_builds_with_the_pack_loaded",
                             "tests/test_te_flux2.py::test_compat_tokenizer_is_transformers_4s",
                             "tests/test_te_flux2.py::test_compat_applies_once_logs_one_line_and_leaves_a_working_loader_alone",
                             "tests/test_te_flux2.py::test_tiny_flux2_clip_encodes_through_comfyui_classes"],
    "te/vision.py": ["tests/test_te_qwen_image_edit.py"],
    "te/syntax.py": ["tests/test_pin_te_specs.py", "tests/test_te_recipe.py::test_inspector_and_report_show_the_syntax_and_what_it_changes"],
}
PACKAGES = ("train", "data", "sampling", "te")
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-m", "not server and not browser", "-x",
               "-o", "addopts=-p support.pytest_plugin"]


# -- mutants ---------------------------------------------------------------------------------------------------
@dataclass
class Mutant:
    file: str            # relative to aligned_trainer/, e.g. "train/loop.py"
    index: int           # position in the deterministic walk of the module's AST
    op: str              # which mutation
    function: str        # qualname of the top-level function/method whose code is replaced
    line: int
    lines: tuple         # first and last line of the enclosing statement (coverage)
    source: str          # the original source line (stripped), for people and for the equivalents list
    change: str          # before -> after
    status: str = "pending"  # killed | survived | timeout | not covered | crashed | pending
    killer: str = ""
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.file}|{self.function}|{self.source}|{self.change}"


_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
        ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_MINMAX = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax",
           "amax": "amin"}
_SKIP_CALLS = {"print", "log", "debug", "info", "warning", "error", "exception"}  # logging: not behaviour


def _walk(tree):
    """(node, parent, field, index-in-list or None, enclosing top-level function qualname, enclosing statement)
    in a deterministic order, only inside function bodies, skipping annotations, decorators and defaults."""
    out = []

    def visit(node, parent, fld, idx, func, stmt, classes):
        if isinstance(node, ast.stmt):
            stmt = node
        out.append((node, parent, fld, idx, func, stmt))
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and name == "args":
                continue  # defaults are evaluated once at import
            child_func = func
            child_classes = classes
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and func is None and name == "body":
                child_func = ".".join([*classes, node.name])
            if isinstance(node, ast.ClassDef) and func is None and name == "body":
                child_classes = [*classes, node.name]
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if isinstance(v, ast.AST):
                        visit(v, node, name, i, child_func, stmt, child_classes)
            elif isinstance(value, ast.AST):
                visit(value, node, name, None, child_func, stmt, child_classes)

    visit(tree, None, None, None, None, None, [])
    return out


def _is_docstring(node, parent) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))


def _assigned_before(func_node, name: str, line: int) -> bool:
    if func_node is None:
        return False
    args = func_node.args
    if name in [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]:
        return True
    for n in ast.walk(func_node):
        if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and n.lineno < line:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def _ops(node, parent, fld):
    """The mutations of one node: list of (op name, function(node_copy, parent_copy, fld, idx) -> None, after)."""
    ops = []
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        new = _BIN[type(node.op)]
        ops.append(("binop", lambda n, *_: setattr(n, "op", new()), new.__name__))
    if isinstance(node, ast.AugAssign):
        if type(node.op) in _BIN:
            new = _BIN[type(node.op)]
            ops.append(("augop", lambda n, *_: setattr(n, "op", new()), new.__name__ + "="))
        ops.append(("aug_to_assign", None, "="))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                new = _CMP[type(op)]
                ops.append((f"compare{i}", lambda n, *_, i=i, new=new: n.ops.__setitem__(i, new()), new.__name__))
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        ops.append(("boolop", lambda n, *_: setattr(n, "op", new()), new.__name__))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        ops.append(("drop_unary", None, "operand"))
    if isinstance(node, ast.Constant) and not isinstance(parent, ast.JoinedStr):
        v = node.value
        if isinstance(v, bool):
            ops.append(("flip_bool", lambda n, *_: setattr(n, "value", not n.value), str(not v)))
        elif isinstance(v, int):
            ops.append(("int+1", lambda n, *_: setattr(n, "value", n.value + 1), str(v + 1)))
        elif isinstance(v, float):
            ops.append(("float+1", lambda n, *_: setattr(n, "value", n.value + 1.0), repr(v + 1.0)))
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in _MINMAX:
            new = _MINMAX[name]
            ops.append(("minmax", lambda n, *_: setattr(n.func, "id" if isinstance(n.func, ast.Name) else "attr",
                                                     new), new))
        if name not in _SKIP_CALLS:
            for i, kw in enumerate(node.keywords):
                if kw.arg is not None:
                    ops.append((f"drop_kw:{kw.arg}", lambda n, *_, i=i: n.keywords.pop(i), f"without {kw.arg}="))
    if isinstance(node, (ast.Break, ast.Continue)):
        ops.append(("break_continue", None, "continue" if isinstance(node, ast.Break) else "break"))
    return ops


def _stmt_ops(node, func_node):
    """Statement deletions: a call statement (an update never applied) or a re-assignment (a step skipped)."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name not in _SKIP_CALLS:
            return [("delete_call", "pass")]
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and (
                isinstance(node, ast.AugAssign) or _assigned_before(func_node, targets[0].id, node.lineno)):
            return [("delete_reassign", "pass")]
    return []


def mutants_of(rel: str) -> list[Mutant]:
    path = ENGINE / rel
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    funcs = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.setdefault(node.lineno, node)
    out = []
    for index, (node, parent, fld, idx, func, stmt) in enumerate(_walk(tree)):
        if func is None or getattr(node, "lineno", None) is None:
            continue
        src = lines[node.lineno - 1].strip()
        if "pragma: no mutate" in src:
            continue
        if isinstance(node, ast.Constant) and _is_docstring(parent, None):
            continue
        func_node = _enclosing_def(tree, node)
        span = (stmt.lineno, stmt.end_lineno) if stmt is not None else (node.lineno, node.lineno)
        before = ast.unparse(node).splitlines()[0][:80] if not isinstance(node, ast.stmt) else src[:80]
        for op, _fn, after in _ops(node, parent, fld):
            out.append(Mutant(rel, index, op, func, node.lineno, span, src, f"{before} -> {op}: {after}"))
        if isinstance(node, ast.stmt) and not _is_docstring(node, parent) and isinstance(parent.__dict__.get(fld), list):
            for op, after in _stmt_ops(node, func_node):
                if len(parent.__dict__[fld]) == 1 and op == "delete_call":
                    pass  # replaced by `pass`, still valid
                out.append(Mutant(rel, index, op, func, node.lineno, span, src, f"{before[:60]} -> {op}"))
    return out


def _enclosing_def(tree, target):
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.lineno <= target.lineno <= (node.end_lineno or node.lineno):
            if best is None or node.lineno > best.lineno:
                best = node
    return best


def mutated_tree(m: Mutant):
    tree = ast.parse((ENGINE / m.file).read_text())
    for index, (node, parent, fld, idx, func, stmt) in enumerate(_walk(tree)):
        if index != m.index:
            continue
        if m.op in ("delete_call", "delete_reassign"):
            getattr(parent, fld)[idx] = ast.copy_location(ast.Pass(), node)
        elif m.op == "aug_to_assign":
            getattr(parent, fld)[idx] = ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)
        elif m.op == "drop_unary":
            _replace(parent, fld, idx, node.operand)
        elif m.op == "break_continue":
            new = ast.Continue() if isinstance(node, ast.Break) else ast.Break()
            getattr(parent, fld)[idx] = ast.copy_location(new, node)
        else:
            for op, fn, _after in _ops(node, parent, fld):
                if op == m.op:
                    fn(node, parent, fld, idx)
                    break
            else:
                raise RuntimeError(f"mutation {m.op} not found at index {m.index} of {m.file}")
        return ast.fix_missing_locations(tree)
    raise RuntimeError(f"node {m.index} not found in {m.file}")


def _replace(parent, fld, idx, new):
    if idx is None:
        setattr(parent, fld, new)
    else:
        getattr(parent, fld)[idx] = new


def _find_code(code, qualname: str):
    if getattr(code, "co_qualname", None) == qualname:
        return code
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            found = _find_code(c, qualname)
            if found is not None:
                return found
    return None


def _live_function(module, qualname: str):
    obj = module
    for part in qualname.split("."):
        obj = vars(obj).get(part) if isinstance(obj, type) else getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj if hasattr(obj, "__code__") else None


def apply(m: Mutant) -> None:
    """In this (forked) process: replace the live function's code by the mutated one."""
    path = str((ENGINE / m.file).resolve())
    module = next(mod for mod in list(sys.modules.values())
                  if getattr(mod, "__file__", None) and str(Path(mod.__file__).resolve()) == path)
    code = compile(mutated_tree(m), module.__file__, "exec")
    new = _find_code(code, m.function)
    func = _live_function(module, m.function)
    if new is None or func is None:
        raise RuntimeError(f"cannot find {m.function} in {m.file}")
    func.__code__ = new
    for v in list(module.__dict__.values()):  # memoised results computed by the original code
        if hasattr(v, "cache_clear"):
            v.cache_clear()


# -- the pytest side -------------------------------------------------------------------------------------------
class Runner:
    """pytest plugin: baseline with per-test line coverage, then one forked child per mutant."""

    def __init__(self, mutants: list[Mutant], budget: float, log, save=lambda: None):
        self.save = save  # called every few mutants: a stopped run keeps what it measured
        self.mutants = mutants
        self.budget = budget
        self.log = log
        self.files = {str((ENGINE / m.file).resolve()) for m in mutants}
        self.cover: dict[tuple[str, int], set[int]] = {}
        self.durations: dict[int, float] = {}  # CPU seconds of each test in the (traced) baseline
        self.current = -1
        self.baseline_ok = True

    def _tracer(self, frame, event, arg):
        if frame.f_code.co_filename not in self._seen:
            self._seen[frame.f_code.co_filename] = str(Path(frame.f_code.co_filename).resolve()) in self.files
        if not self._seen[frame.f_code.co_filename]:
            return None
        self.cover.setdefault((frame.f_code.co_filename, frame.f_lineno), set()).add(self.current)
        return self._local

    def _local(self, frame, event, arg):
        if event == "line":
            self.cover.setdefault((frame.f_code.co_filename, frame.f_lineno), set()).add(self.current)
        return self._local

    def pytest_runtestloop(self, session):
        import threading

        import torch
        from _pytest.runner import runtestprotocol

        torch.set_num_threads(1)
        items = session.items
        self._seen = {}
        t_start = time.time()
        for i, item in enumerate(items):
            self.current = i
            t0 = time.process_time()
            sys.settrace(self._tracer)
            threading.settrace(self._tracer)
            try:
                session._setupstate.teardown_exact(item)  # keeps the session (and this module) set up
                reports = runtestprotocol(item, log=True, nextitem=item.parent)
            finally:
                sys.settrace(None)
                threading.settrace(None)
            self.durations[i] = time.process_time() - t0
            if any(r.failed for r in reports):
                self.log(f"baseline FAILED: {item.nodeid}; fix the test before mutating")
                self.baseline_ok = False
                return True
        self.log(f"baseline: {len(items)} tests in {time.time() - t_start:.1f}s (traced)")
        by_file = {}
        for (fname, line), tests in self.cover.items():
            by_file.setdefault(str(Path(fname).resolve()), {}).setdefault(line, set()).update(tests)
        deadline = time.time() + self.budget
        for n, m in enumerate(self.mutants):
            if time.time() > deadline:
                self.log(f"budget spent: {len(self.mutants) - n} mutants left pending")
                break
            lines = by_file.get(str((ENGINE / m.file).resolve()), {})
            tests = set()
            for ln in range(m.lines[0], m.lines[1] + 1):
                tests |= lines.get(ln, set())
            if not tests:
                m.status = "not covered"
                continue
            order = sorted(tests, key=lambda i: self.durations[i])
            limit = 10 + 4 * sum(self.durations[i] for i in order)
            m.status, m.killer, m.seconds = self._run_child(m, [items[i] for i in order], items, limit)
            if n % 10 == 9:
                self.save()
            self.log(f"[{n + 1}/{len(self.mutants)}] {m.status:9s} {m.file}:{m.line} {m.change}"
                     + (f"  ({m.killer})" if m.killer else ""))
        return True

    def _run_child(self, m, items, all_items, limit):
        from _pytest.runner import runtestprotocol

        t0 = time.time()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:  # dies with the runner
                import ctypes

                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = 0
            msg = ""
            try:
                apply(m)
                session = items[0].session
                for item in items:
                    session._setupstate.teardown_exact(item)
                    reports = runtestprotocol(item, log=False, nextitem=item.parent)
                    if any(rep.failed for rep in reports):
                        code, msg = 1, item.nodeid
                        break
            except BaseException as e:  # noqa: BLE001  (a mutant that breaks the harness is caught)
                code, msg = 1, f"error: {type(e).__name__}"
            os.write(w, msg.encode()[:500])
            os._exit(code)
        os.close(w)
        # the limit is in CPU seconds of the child (this machine is shared: wall time says little), with a
        # generous wall-clock cap for a mutant that hangs without computing
        wall_cap = time.time() + 20 * limit + 300
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if _cpu_seconds(pid) > limit or time.time() > wall_cap:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                return "timeout", "", time.time() - t0
            time.sleep(0.05)
        msg = os.read(r, 1000).decode(errors="replace")
        os.close(r)
        secs = time.time() - t0
        if os.WIFSIGNALED(status):
            return "crashed", f"signal {os.WTERMSIG(status)}", secs
        if os.WEXITSTATUS(status) == 0:
            return "survived", "", secs
        return "killed", msg.split("::")[-1] if "::" in msg else msg, secs


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


# -- results and report ----------------------------------------------------------------------------------------
def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(rel: str, mutants: list[Mutant], tests: list[str], scope: str) -> None:
    data = load_results()
    old = data.get(rel)
    if scope.startswith("lines") and old:
        # a re-run of some lines (after new tests): update those mutants in the whole-module result, matched by
        # what they change (function, source line, change; n-th of equal ones), so edits elsewhere in the module
        # that move lines do not lose them; line numbers are refreshed
        fresh: dict[str, list[Mutant]] = {}
        for m in mutants:
            if m.status != "pending":
                fresh.setdefault(m.key, []).append(m)
        seen: dict[str, int] = {}
        used: set[int] = set()
        for m in old["mutants"]:
            k = Mutant(**{**m, "lines": tuple(m["lines"])}).key
            n = seen[k] = seen.get(k, -1) + 1
            new = fresh.get(k, [])[n:n + 1]
            if new:
                used.add(id(new[0]))
                m.update(status=new[0].status, killer=new[0].killer, seconds=new[0].seconds, line=new[0].line,
                         lines=list(new[0].lines), index=new[0].index)
        old["mutants"] += [asdict(m) for ms in fresh.values() for m in ms if id(m) not in used]  # new mutants
        left = {}  # drop stored mutants the module no longer has (their code was edited away)
        for m in mutants_of(rel):
            left[m.key] = left.get(m.key, 0) + 1
        kept = []
        for m in old["mutants"]:
            k = Mutant(**{**m, "lines": tuple(m["lines"])}).key
            if left.get(k, 0) > 0:
                left[k] -= 1
                kept.append(m)
        old["mutants"] = kept
        old["mutants"].sort(key=lambda m: m["index"])
        old["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        old["tests"] = tests
        RESULTS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
        return
    data[rel] = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "tests": tests,
                 "scope": scope,
                 "mutants": [asdict(m) for m in mutants]}
    RESULTS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


def load_equivalents() -> dict:
    if not EQUIVALENTS.exists():
        return {}
    return {f"{e['file']}|{e['function']}|{e['source']}|{e['change']}": e["reason"]
            for e in json.loads(EQUIVALENTS.read_text())}


def write_report() -> None:
    data = load_results()
    eq = load_equivalents()
    rows, surv, eqs = [], [], []
    per_pkg: dict[str, list[int]] = {}
    for rel, res in data.items():
        ms = [Mutant(**{**m, "lines": tuple(m["lines"])}) for m in res["mutants"]]
        killed = sum(m.status in ("killed", "timeout", "crashed") for m in ms)
        equiv = [m for m in ms if m.status in ("survived", "not covered") and m.key in eq]
        alive = [m for m in ms if m.status in ("survived", "not covered") and m.key not in eq]
        pending = sum(m.status == "pending" for m in ms)
        scored = killed + len(alive)
        pct = 100.0 * killed / scored if scored else 100.0
        rows.append(f"| `{rel}` | {res.get('scope', 'whole module')} | {res['date']} | {len(ms)} | {killed} | {len(alive)} | {len(equiv)} | {pending} "
                    f"| {pct:.1f} % |")
        pkg = per_pkg.setdefault(rel.split("/")[0], [0, 0, 0, 0, []])
        pkg[0] += killed
        pkg[1] += len(alive)
        pkg[2] += pending
        pkg[3] += len(equiv)
        for m in alive:
            surv.append(f"| `{rel}:{m.line}` | `{m.function}` | {m.status} | `{_md(m.change)}` |")
        for m in equiv:
            eqs.append(f"| `{rel}:{m.line}` | `{m.function}` | `{_md(m.change)}` | {eq[m.key]} |")
    for rel in never_run(data):  # every module of the packages with code to mutate that has no result yet
        per_pkg.setdefault(rel.split("/")[0], [0, 0, 0, 0, []])[4].append(rel.split("/", 1)[1])
        rows.append(f"| `{rel}` | not run{'' if rel in TESTS else ' (no test list)'} | - | - | - | - | - | - | - |")
    rows.sort()
    run_count = {p: sum(r.startswith(p + "/") for r in data) for p in per_pkg}
    pkg_rows = [f"| `{p}/` | {k} | {s} | {eqn} | {pe} | {run_count[p]} of {run_count[p] + len(nr)}: "
                f"{', '.join(f'`{m}`' for m in nr) or '-'} | "
                f"{100.0 * k / (k + s) if k + s else 100.0:.1f} % (of the modules run) |"
                for p, (k, s, pe, eqn, nr) in sorted(per_pkg.items())]
    text = f"""# Mutation testing

Generated by `scripts/mutate.py` (see its docstring for how it works and which mutations it makes); the raw
results are in `scripts/mutation_results.json`, equivalent mutants and their reasons in
`scripts/mutation_equivalents.json`. Score = killed / (killed + survivors), equivalent mutants excluded;
"not covered" (no test executes the line) counts as a survivor; "pending" = not run within the time budget.
A package's score counts only its modules that were run; "modules run: not run" names every module of the
package with code to mutate that has no result (those marked "(no test list)" in the per-module table have no
entry in the runner's `TESTS` yet).

Run it: `nice -n 10 .work/venv/bin/python scripts/mutate.py train/timesteps` (one module; `train`, `data`,
`sampling`, `te` or `all` for more; `--budget SECONDS`). Not part of CI.

## Per package

| package | killed | survived | equivalent | pending | modules run: not run | score |
|---|---|---|---|---|---|---|
{chr(10).join(pkg_rows)}

## Per module

| module | mutated | run | mutants | killed | survived | equivalent | pending | score |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Survivors

| where | function | status | mutation |
|---|---|---|---|
{chr(10).join(surv) if surv else "| - | - | - | - |"}

## Equivalent mutants (excluded from the score)

| where | function | mutation | why no test can tell |
|---|---|---|---|
{chr(10).join(eqs) if eqs else "| - | - | - | - |"}
"""
    if NOTES.exists():
        text += "\n## Notes\n\n" + NOTES.read_text()
    REPORT.write_text(text)


def never_run(data: dict) -> list[str]:
    """Modules of PACKAGES that have code to mutate (functions) and no stored result: not in any score."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((ENGINE / pkg).glob("*.py")):
            rel = f"{pkg}/{path.name}"
            if path.name != "__init__.py" and rel not in data and mutants_of(rel):
                out.append(rel)
    return out


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("`", "'")


# -- command line ----------------------------------------------------------------------------------------------
def modules_for(names: list[str]) -> list[str]:
    out = []
    for name in names:
        name = name.removeprefix("aligned_trainer/").removesuffix(".py")
        if name == "all":
            out += [m for m in TESTS]
        elif name in PACKAGES:
            out += [m for m in TESTS if m.startswith(name + "/")]
        elif name + ".py" in TESTS:
            out.append(name + ".py")
        else:
            raise SystemExit(f"unknown module '{name}': use one of {', '.join(PACKAGES)}, all, or "
                             f"{', '.join(m[:-3] for m in TESTS)}")
    return list(dict.fromkeys(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="train/timesteps, train, data, sampling, te or all")
    ap.add_argument("--budget", type=float, default=1800, help="seconds for all the modules together")
    ap.add_argument("--tests", nargs="*", help="test ids to use instead of the module's list")
    ap.add_argument("--lines", help="only mutants on these lines, e.g. 40-60,80-90 (one module)")
    ap.add_argument("--report", action="store_true", help="only rewrite MUTATION.md from the stored results")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--killed-by", help="list the stored mutants a test (name or part of it) killed")
    args = ap.parse_args()
    if args.killed_by:
        for rel, res in load_results().items():
            for m in res["mutants"]:
                if m["status"] in ("killed", "timeout", "crashed") and args.killed_by in m["killer"]:
                    print(f"{rel}:{m['line']} {m['function']}: {m['change']}  ({m['killer']})")
        return 0
    if args.report and not args.modules:
        write_report()
        print(f"wrote {REPORT}")
        return 0
    try:
        os.nice(10)
    except OSError:
        pass
    os.environ.setdefault("COMFYUI_PATH", str(ROOT / ".work" / "ComfyUI"))
    os.chdir(ROOT)
    mods = modules_for(args.modules or ["all"])
    deadline = time.time() + args.budget
    if len(mods) > 1:  # one fresh process (one pytest session) per module
        import subprocess

        for rel in mods:
            left = deadline - time.time()
            if left <= 0:
                print(f"{rel}: no time left")
                break
            extra = ["--list"] if args.list else []
            subprocess.call([sys.executable, __file__, rel[:-3], "--budget", str(int(left)), *extra])
        return 0
    import pytest

    for rel in mods:
        mutants = mutants_of(rel)
        if args.lines:
            spans = [(int(a), int(b or a)) for a, _, b in (r.partition("-") for r in args.lines.split(","))]
            mutants = [m for m in mutants if any(lo <= m.line <= hi for lo, hi in spans)]
        if args.list:
            for m in mutants:
                print(f"{rel}:{m.line} {m.function}: {m.change}")
            continue
        tests = args.tests or TESTS[rel]
        tests = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
        if not tests:
            print(f"{rel}: none of its tests exist; skipped")
            continue
        left = deadline - time.time()
        if left <= 0:
            print(f"{rel}: no time left")
            break
        print(f"== {rel}: {len(mutants)} mutants, tests {' '.join(tests)}", flush=True)
        scope = f"lines {args.lines}" if args.lines else "whole module"
        runner = Runner(mutants, left, lambda s: print(s, flush=True),
                        save=lambda: None if args.tests else save_results(rel, mutants, tests, scope))
        pytest.main([*PYTEST_ARGS, *tests], plugins=[runner])
        if not runner.baseline_ok:
            return 1
        if args.tests:  # not part of the module's score; kept as evidence of what these tests kill
            runs = json.loads(TARGETED.read_text()) if TARGETED.exists() else []
            runs.append({"module": rel, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "tests": tests, "lines": args.lines or "all",
                         "mutants": [{"line": m.line, "function": m.function, "change": m.change, "status": m.status,
                                      "killer": m.killer} for m in mutants if m.status != "pending"]})
            TARGETED.write_text(json.dumps(runs, indent=1) + "\n")
            print(f"(other tests than the module's list: not scored; written to {TARGETED.name})")
            continue
        save_results(rel, mutants, tests, scope)
        killed = sum(m.status in ("killed", "timeout", "crashed") for m in mutants)
        alive = sum(m.status in ("survived", "not covered") for m in mutants)
        print(f"== {rel}: {killed} killed, {alive} survived, "
              f"{sum(m.status == 'pending' for m in mutants)} pending", flush=True)
    if not args.list:
        write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
