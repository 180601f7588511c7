"""SGR local learning: the math, models, splits, heads, data and the single-process reference trainer."""
from pipeline.config import Config, ConfigError
from pipeline.sgr import sgr_term
from pipeline.stages import LocalModule, build_local_modules, build_stage_steps
from pipeline.step import StageStep, StepOutput, StepStats

__all__ = [
    "Config", "ConfigError", "sgr_term", "LocalModule", "build_local_modules", "build_stage_steps",
    "StageStep", "StepOutput", "StepStats",
]
