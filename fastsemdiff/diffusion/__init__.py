"""Schedules, prediction targets and samplers."""
from .predictions import PREDICTIONS, target, to_x0_eps
from .samplers import ddim_sample, ode_sample, sample
from .schedules import SCHEDULES, Schedule, get_schedule
from .timesteps import LOSS_WEIGHTS, T_SAMPLINGS, loss_weights, snap_times, train_times

__all__ = ["PREDICTIONS", "target", "to_x0_eps", "ddim_sample", "ode_sample", "sample", "SCHEDULES",
           "Schedule", "get_schedule", "LOSS_WEIGHTS", "T_SAMPLINGS", "loss_weights", "snap_times", "train_times"]
