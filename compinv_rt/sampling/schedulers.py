"""Samplers offered by `generate`, built from the model's own scheduler config (so SD 2's
v-prediction and each model's beta schedule carry over). All are diffusers' own schedulers."""

from __future__ import annotations

from enum import Enum


class SchedulerName(str, Enum):
    ddim = "ddim"
    dpm = "dpm"  # DPM-Solver++ 2M (diffusers' defaults: second order, lower order at the end)
    dpm_karras = "dpm-karras"  # the same on Karras et al.'s sigma spacing
    unipc = "unipc"  # UniPC (bh2), the predictor-corrector of Zhao et al. 2023
    euler = "euler"


def make_scheduler(name: SchedulerName | str, config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    name = SchedulerName(name)
    if name is SchedulerName.dpm_karras:
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    cls = {
        SchedulerName.ddim: DDIMScheduler,
        SchedulerName.dpm: DPMSolverMultistepScheduler,
        SchedulerName.unipc: UniPCMultistepScheduler,
        SchedulerName.euler: EulerDiscreteScheduler,
    }[name]
    return cls.from_config(config)
