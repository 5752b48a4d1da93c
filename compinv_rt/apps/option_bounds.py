"""Bounds on every numeric option of every command, checked before the command runs (issue 28).

`cli_support.user_errors` calls `check_command_options` with the command's arguments, so a huge
`--steps`, `--epochs` or `--cache-scenes` is one `error:` line in milliseconds, before any model
loads, for every command at once. An entry is (lowest, highest), where highest is a number or the
name of a `core.schemas.Limits` field (configurable with COMPINV_LIMITS). Entries are by parameter
name; "<command>:<param>" overrides one where a command means something else by it (`train
--steps` counts optimizer steps, not denoising steps). tests/test_bad_input.py checks that every
numeric option of every command has an entry. Standard library only (imported by `--help`).
"""

from __future__ import annotations

SEED_MAX = 2**63 - 1  # core.schemas.SEED_MAX (a test keeps them equal)
FRACTION = (0.0, 1.0)
WEIGHT = (0.0, 1000.0)  # loss weights

OPTION_BOUNDS: dict[str, tuple[float | None, float | str]] = {
    # images and prompts
    "num_images": (1, "max_images"), "n": (1, "max_images"), "samples": (1, "max_images"),
    "count": (1, "max_images"), "k": (1, "max_images"), "combination_k": (0, "max_images"),
    "images_per_prompt": (1, "max_images"), "max_images": (1, "max_images"),
    "prompts_per_kind": (1, 100_000), "random": (0, 1000), "objects": (0, 8), "train_seeds": (1, 100),
    # denoising
    "steps": (1, "max_steps"), "max_steps": (1, "max_steps"), "guidance": (0, "max_guidance"),
    "cache_interval": (1, 10),
    "bias_strength": (0, 1000.0), "bias_decay": (0, 100.0), "threshold": FRACTION,
    # sizes and batches
    "height": (1, "max_size"), "width": (1, "max_size"), "resolution": (1, "max_size"),
    "max_size": (8, "max_size"), "max_batch": (1, "max_batch"), "batch": (1, "max_batch"),
    "unet_batch": (1, "max_batch"), "repeats": (1, 1000), "vectors": (1, "max_vectors"),
    "grad_accum": (1, "max_grad_accum"), "variants": (1, "max_variants"),
    # training
    "train_steps": (1, "max_train_steps"), "vae_steps": (1, "max_train_steps"),
    "unet_steps": (1, "max_train_steps"), "warmup": (0, "max_train_steps"),
    "checkpoint_every": (1, "max_train_steps"), "ckpt_every": (1, "max_train_steps"),
    "snapshot_every": (1, "max_train_steps"), "every": (1, "max_train_steps"), "epochs": (1, 100_000),
    "lr": (0, 10.0), "vae_lr": (0, 10.0), "unet_lr": (0, 10.0), "anchor_weight": WEIGHT,
    "recon_weight": WEIGHT, "anchor_l1": WEIGHT, "context_weight": WEIGHT, "si_anchor_weight": WEIGHT,
    "place_prob": FRACTION, "pattern_boost": (0, 100.0), "gate_threshold": FRACTION,
    "cache_scenes": (1, 1_000_000), "scenes_n": (1, 1_000_000), "eval_scenes": (1, 1_000_000),
    "max_minutes": (0, 10_000_000.0),
    # seeds
    "seed": (0, SEED_MAX), "random_seed": (0, SEED_MAX),
    # processes and devices
    "workers": (1, "max_workers"), "procs": (1, "max_workers"), "replicas": (1, "max_workers"),
    "threads": (0, 1024), "gpus_per_worker": (0, 64.0), "gpus_per_replica": (0, 64.0),
    "opset": (7, 30), "optimization_level": (0, 5),
    # serving
    "port": (0, 65535), "max_wait_ms": (0, 60_000.0), "queue_size": (1, 1_000_000),
    "timeout": (0, 86_400.0), "max_cost": (1, 10**15), "upload_max_bytes": (1, 2**31),
    "body_max_bytes": (1, 2**31),
    # a command's own meaning of a name
    "cli.train:steps": (1, "max_train_steps"), "world.cli.judge_train:steps": (1, "max_train_steps"),
    "world.cli.scenes:n": (1, 1_000_000), "cli.layout_world_data:n": (1, 1_000_000),
}


def command_id(fn) -> str:
    """`world.cli.train` for compinv_rt.apps.world.cli.train: the key prefix of overrides."""
    return f"{fn.__module__.removeprefix('compinv_rt.apps.')}.{fn.__name__}"


def bounds_of(command: str, param: str) -> tuple[float | None, float | str] | None:
    return OPTION_BOUNDS.get(f"{command}:{param}", OPTION_BOUNDS.get(param))


def check_command_options(command: str, values: dict, flags: dict[str, str] | None = None) -> None:
    """ConfigError naming the option (`flags`: parameter -> how the user wrote it, e.g.
    `-n/--num-images`) for the first number out of its bounds."""
    from compinv_rt.core.schemas import check_option

    for param, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = bounds_of(command, param)
        if bounds is None:
            continue
        low, high = bounds
        option = (flags or {}).get(param) or "--" + param.replace("_", "-")
        if isinstance(high, str):
            check_option(option, value, ge=low, limit=high)
        else:
            check_option(option, value, ge=low, le=high)
