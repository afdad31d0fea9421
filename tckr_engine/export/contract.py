"""The one export contract every exportable model follows (STYLE.md principle 6).

An `Exportable` is a `torch.nn.Module` whose `forward` takes exactly the named inputs of its `ExportSpec`
and returns its named outputs. The spec says everything an exporter or runtime needs: input and output
names, which axes are dynamic, a sample input to trace with, and the min/opt/max shape profile that
TensorRT (and ONNX Runtime's TensorRT execution provider) build optimisation profiles from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tckr_engine.errors import TckrError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """The shape range of one input: TensorRT's optimisation profile entry (min <= opt <= max per axis)."""

    min: Shape
    opt: Shape
    max: Shape

    def check(self, name: str) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise TckrError(f"profile of input {name!r} has shapes of different ranks: {self}")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 1 <= lo <= mid <= hi:
                raise TckrError(
                    f"profile of input {name!r} needs 1 <= min <= opt <= max on every axis, got "
                    f"min {self.min}, opt {self.opt}, max {self.max}"
                )

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class ExportSpec:
    """Names, dynamic axes, a sample input and the shape profile of one exportable model.

    `dynamic_axes` maps an input/output name to {axis: symbolic name}; the sample input fixes every
    other axis. `keep_fp32` names inputs that stay float32 in an fp16 export (the UNet timestep, whose
    sinusoidal embedding loses whole radians in fp16 at t ~ 1000).
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    sample_inputs: tuple[torch.Tensor, ...]
    profile: dict[str, Profile]
    keep_fp32: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)  # model-specific facts recorded in export.json

    def validate(self) -> ExportSpec:
        """Check the spec is self-consistent; raise TckrError naming the first problem. Returns self."""
        if len(self.input_names) != len(self.sample_inputs):
            raise TckrError(
                f"export spec {self.name}: {len(self.input_names)} input names for "
                f"{len(self.sample_inputs)} sample inputs"
            )
        names = set(self.input_names) | set(self.output_names)
        if len(names) != len(self.input_names) + len(self.output_names):
            raise TckrError(f"export spec {self.name}: input and output names must be unique")
        unknown = sorted(set(self.dynamic_axes) - names)
        if unknown:
            raise TckrError(f"export spec {self.name}: dynamic axes for unknown tensors {unknown}")
        for name, sample in zip(self.input_names, self.sample_inputs, strict=True):
            prof = self.profile.get(name)
            if prof is None:
                raise TckrError(f"export spec {self.name}: no shape profile for input {name!r}")
            prof.check(name)
            if len(prof.opt) != sample.dim():
                raise TckrError(
                    f"export spec {self.name}: profile of {name!r} has rank {len(prof.opt)}, "
                    f"the sample has rank {sample.dim()}"
                )
            fixed = set(range(sample.dim())) - set(self.dynamic_axes.get(name, {}))
            for axis in fixed:
                if not prof.min[axis] == prof.max[axis] == sample.shape[axis]:
                    raise TckrError(
                        f"export spec {self.name}: axis {axis} of {name!r} is static "
                        f"({sample.shape[axis]}) but its profile ranges {prof.min[axis]}..{prof.max[axis]}"
                    )
        missing = sorted(set(self.keep_fp32) - set(self.input_names))
        if missing:
            raise TckrError(f"export spec {self.name}: keep_fp32 names unknown inputs {missing}")
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (export.json): names, dynamic axes, sample shapes/dtypes, profile."""
        return {
            "name": self.name,
            "inputs": [
                {
                    "name": n,
                    "sample_shape": list(s.shape),
                    "dtype": str(s.dtype).removeprefix("torch."),
                    "dynamic_axes": {str(a): d for a, d in self.dynamic_axes.get(n, {}).items()},
                }
                for n, s in zip(self.input_names, self.sample_inputs, strict=True)
            ],
            "outputs": [
                {"name": n, "dynamic_axes": {str(a): d for a, d in self.dynamic_axes.get(n, {}).items()}}
                for n in self.output_names
            ],
            "profile": {n: p.as_dict() for n, p in self.profile.items()},
            "keep_fp32": list(self.keep_fp32),
            **self.meta,
        }


class Exportable(torch.nn.Module):
    """A module with an export contract: `forward(*inputs in spec order) -> output(s) in spec order`."""

    def export_spec(self) -> ExportSpec:
        """The contract of this module (names, dynamic axes, sample input, profile)."""
        raise NotImplementedError


def batch_profile(shape: Shape, min_batch: int, opt_batch: int, max_batch: int) -> Profile:
    """A profile whose first axis (the batch) ranges min..max and whose other axes are `shape[1:]`."""
    rest = tuple(shape[1:])
    return Profile((min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
