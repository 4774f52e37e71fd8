"""API prompt of a tiny SD1.5 LoRA run (CheckpointLoaderSimple -> Dataset -> caches -> configs -> Train Init ->
Train Steps -> Save LoRA): shared by tests/test_distributed.py, tests/test_resume_server.py and bench/bench_ddp.py."""
from __future__ import annotations

P = "AlignedTrainer_"


def prompt(run_name: str, steps: int, processes: int = 1, grad_accum: int = 1, resume: str = "none",
           checkpoint_every: int = 0, lora_name: str = "", dataset: str = "ddp_ds", batch_size: int = 1,
           ckpt_name: str = "tiny-sd15.safetensors", lr: float = 1e-4, scheduler: str = "constant",
           warmup_steps: int = 0, total_steps: int = 1000, seed: int = 3, keep_last: int = 5,
           if_exists: str = "overwrite", lora_if_exists: str = "overwrite") -> dict:
    """API prompt: tiny SD1.5 -> dataset -> caches -> configs -> Train Init -> Train Steps (-> Save LoRA fp32, raw
    weights, when ``lora_name``; else a Preview Image of the loss plot, since something must consume Train Steps'
    output for it to run). ``if_exists``: Train Init's; ``lora_if_exists``: Save LoRA's."""
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": P + "Dataset", "inputs": {
            "folder": dataset, "resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64,
            "trigger_word": "", "shuffle_tags": False, "keep_tokens": 1, "tag_dropout": 0.0, "caption_dropout": 0.0,
            "caption_variants": 1, "flip": False, "seed": 0}},
        "3": {"class_type": P + "CacheLatents", "inputs": {"dataset": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": P + "CacheTextEmbeddings", "inputs": {"latents": ["3", 0], "clip": ["1", 1],
                                                                   "unload_text_encoder": False}},
        "5": {"class_type": P + "LoraConfig", "inputs": {
            "algorithm": "lora", "rank": 4, "alpha": 4.0, "targets": "attention", "include": "", "exclude": "",
            "rank_dropout": 0.0, "module_dropout": 0.0, "network_dropout": 0.0, "init": "default", "max_norm": 0.0}},
        "6": {"class_type": P + "TimestepStrategy", "inputs": {
            "density": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "shift": "model",
            "shift_value": 3.0, "bias": "balanced", "bias_strength": 0.0, "min_timestep": 0, "max_timestep": 1000,
            "weighting": "none", "min_snr_gamma": 5.0, "noise_offset": 0.0, "multires_iterations": 0,
            "multires_discount": 0.3}},
        "7": {"class_type": P + "Optimizer", "inputs": {
            "optimizer": "adamw", "learning_rate": lr, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999,
            "scheduler": scheduler, "warmup_steps": warmup_steps, "total_steps": total_steps, "num_cycles": 1,
            "power": 1.0,
            "grad_clip": 1.0, "d_coef": 1.0, "decouple": True, "use_bias_correction": False,
            "safeguard_warmup": False}},
        "8": {"class_type": P + "TrainInit", "inputs": {
            "model": ["1", 0], "training_set": ["4", 0], "lora_config": ["5", 0], "timesteps": ["6", 0],
            "optimizer": ["7", 0], "seed": seed, "batch_size": batch_size, "grad_accum": grad_accum, "precision": "fp32",
            "gradient_checkpointing": False, "ema_decay": 0.0, "guidance": 1.0, "val_count": 0, "reg_weight": 1.0,
            "dop_weight": 0.0, "run_name": run_name, "resume": resume, "if_exists": if_exists,
            "processes": processes}},
        "9": {"class_type": P + "TrainSteps", "inputs": {"run": ["8", 0], "steps": steps,
                                                         "checkpoint_every": checkpoint_every, "keep_last": keep_last,
                                                         "val_every": 0}},
    }
    if lora_name:
        p["10"] = {"class_type": P + "SaveLora", "inputs": {"run": ["9", 0], "name": lora_name, "dtype": "fp32",
                                                             "use_ema": False, "if_exists": lora_if_exists}}
    else:
        p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 2]}}
    return p
