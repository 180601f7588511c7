"""Splits are data: a split turns a network's units into K modules by listing cut points.

A cut point is the index of the unit that starts a new module; module 1 always starts at 0.
"""
from __future__ import annotations

SPLIT_NAMES = ("whole", "last_stage", "resolution", "per_block", "even", "auto")


class SplitError(ValueError):
    """A split that does not fit the model."""


def named_cuts(name: str, resolution: list[int], stages: int | None = None) -> list[int]:
    """Cut points of a named split (see SPLIT_NAMES) for units with these resolution stages."""
    n = len(resolution)
    if name == "whole":
        return []
    if name == "per_block":
        return list(range(1, n))
    if name == "resolution":
        return [i for i in range(1, n) if resolution[i] != resolution[i - 1]]
    if name == "last_stage":
        last = resolution[-1]
        first_of_last = resolution.index(last)
        if first_of_last == 0:
            raise SplitError("split 'last_stage' needs a model with more than one resolution stage")
        return [first_of_last]
    if name == "auto":
        raise SplitError("split 'auto' is chosen by measurement before the run: launch.py does it "
                         "(`launch.py plan` shows it); in code, call pipeline.plan.resolve_auto_split first")
    if name == "even":
        if stages is None:
            raise SplitError("split 'even' needs stages: K")
        if stages > n:
            raise SplitError(f"split 'even' asks for {stages} modules but the model has only {n} units")
        return [round(k * n / stages) for k in range(1, stages)]
    raise SplitError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)} or a list of cut points")


def default_split(stages: int, resolution: list[int]) -> str:
    """The paper's split for K modules: 1 whole, 2 last stage, one per resolution stage, one per unit; else even."""
    n_res = len(set(resolution))
    if stages == 1:
        return "whole"
    if stages == 2 and n_res > 1:
        return "last_stage"
    if stages == n_res:
        return "resolution"
    if stages == len(resolution):
        return "per_block"
    return "even"


def resolve_cuts(resolution: list[int], stages: int | None, split: str | list[int] | None) -> list[int]:
    """Cut points for a split given by name, by explicit list, or by K alone; checked against the model."""
    n = len(resolution)
    if stages is not None and not 1 <= stages <= n:
        raise SplitError(f"stages={stages} is out of range: this model has {n} units, so use 1..{n}")
    if split is None:
        if stages is None:
            raise SplitError("give stages: K or a split")
        split = default_split(stages, resolution)
    if isinstance(split, str):
        cuts = named_cuts(split, resolution, stages)
    else:
        cuts = [int(c) for c in split]
        if any(c <= 0 or c >= n for c in cuts):
            raise SplitError(f"cut points {cuts} out of range: each must be in 1..{n - 1} for a model of {n} units")
        if cuts != sorted(set(cuts)):
            raise SplitError(f"cut points {cuts} must be strictly increasing")
    if stages is not None and len(cuts) + 1 != stages:
        raise SplitError(f"split {split!r} gives {len(cuts) + 1} modules but stages={stages}; make them agree")
    return cuts


def module_ranges(cuts: list[int], n_units: int) -> list[range]:
    """Unit index ranges of each module."""
    bounds = [0, *cuts, n_units]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
