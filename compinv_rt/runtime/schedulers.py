"""Samplers offered by `generate`, built from the model's own scheduler config (so SD 2's
v-prediction and each model's beta schedule carry over)."""

from __future__ import annotations

from enum import Enum


class SchedulerName(str, Enum):
    ddim = "ddim"
    dpm = "dpm"
    euler = "euler"


def make_scheduler(name: SchedulerName | str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {
        SchedulerName.ddim: DDIMScheduler,
        SchedulerName.dpm: DPMSolverMultistepScheduler,
        SchedulerName.euler: EulerDiscreteScheduler,
    }[SchedulerName(name)]
    return cls.from_config(config)
