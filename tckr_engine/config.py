"""Validated configuration for the pipeline stages, TOML loading and named presets.

A config is plain data (a dataclass). Each stage has one: `GenerateConfig` is what `tckr-engine generate`
and `generate_shards` take. Values come, in increasing priority, from the dataclass defaults, a TOML file
(`[generate]` table) and CLI flags. Every check raises `TckrError` with one line naming the bad field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from tckr_engine.errors import TckrError

SAMPLERS = ("ddim", "dpm++", "euler")
IMAGE_FORMATS = ("png", "jpg", "webp")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("auto", "sdpa", "triton", "xformers")
BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")  # denoiser backends: engine/backends.py
MAX_SHARD_SIZE = 99_999  # the sample key is "{shard:06d}{index:05d}"
MAX_SHARDS = 999_999


@dataclass
class GenerateConfig:
    """Everything that decides the content of a synthetic shard folder.

    Two runs with equal resolved configs (see `engine.spec.resolve`) write byte-identical shards on the
    same device and backend.
    """

    # the embedded trained Fashion-MNIST generator, a preset name (`tckr-engine presets`) or a folder
    model: str = "fmnist"
    dataset: str = "fashion-mnist"  # where class names (and their indices) come from
    num_images: int = 1000
    shard_size: int = 1024  # a multiple of batch_size avoids padded batches (sampled on GPUs, not on CPUs)
    batch_size: int = 64
    steps: int = 20
    guidance: float = 2.0  # TCKR's value; <= 1 disables classifier-free guidance (one forward per step)
    sampler: str = "dpm++"
    seed: int = 0
    image_format: str = "png"
    quality: int = 95  # jpg / webp quality; png is lossless
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # fp32 on cpu, fp16 on cuda
    attention: str = "auto"  # triton on cuda when available, else sdpa
    backend: str = "torch"
    captions: str | None = None  # JSONL from `tckr-engine caption`; class-name prompts when absent
    prompt_template: str = "{name}"  # used without captions; "{name}" is replaced by the class name
    teacher: str | None = None  # classifier folder; adds `logits.npy` to every sample
    threads: int | None = None  # CPU threads; None = this machine's default (recorded in run.json)
    image_size: int | None = None  # override the preset's resolution (presets only)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> GenerateConfig:
        """Check every field; raise TckrError naming the first bad one. Returns self."""
        check_positive("num_images", self.num_images)
        check_positive("shard_size", self.shard_size, hi=MAX_SHARD_SIZE)
        check_positive("batch_size", self.batch_size, hi=65_536)
        check_positive("steps", self.steps, hi=1000)
        if -(-self.num_images // self.shard_size) > MAX_SHARDS:
            raise TckrError(
                f"num_images={self.num_images} with shard_size={self.shard_size} needs more than "
                f"{MAX_SHARDS} shards; raise --shard-size"
            )
        if not is_finite_number(self.guidance) or self.guidance < 0:
            raise TckrError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise TckrError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("image_format", self.image_format, IMAGE_FORMATS)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("attention", self.attention, ATTENTION)
        _choice("backend", self.backend, BACKENDS)
        check_positive("quality", self.quality, hi=100)
        if self.threads is not None:
            check_positive("threads", self.threads, hi=1024)
        if self.image_size is not None:
            check_positive("image_size", self.image_size, hi=4096)
        if "{name}" not in self.prompt_template:
            raise TckrError(
                f"prompt_template must contain '{{name}}' (the class name), got {self.prompt_template!r}"
            )
        if not isinstance(self.model, str) or not self.model:
            raise TckrError("model must be a preset name or a generator folder")
        return self

    def merged(self, overrides: Mapping[str, Any]) -> GenerateConfig:
        """A copy with the non-None values of `overrides` applied (CLI flags over file values)."""
        known = {f.name for f in fields(self)} - {"extra"}
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TckrError(f"unknown generate option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def check_positive(name: str, value: Any, hi: int | None = None) -> None:
    """Raise a one-line TckrError unless `value` is an int in [1, hi] (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TckrError(f"{name} must be a positive integer, got {value!r}")
    if hi is not None and value > hi:
        raise TckrError(f"{name} must be at most {hi}, got {value}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest of `choices` to a misspelt `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def is_number(value: Any) -> bool:
    """An int or float (not a bool) that is not NaN; infinities pass (bounds are the caller's check)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def check_training_device(device: Any) -> None:
    """The device of a training or benchmark run (teacher, shadows, trainer and kernel benches): cpu, or cuda
    when torch sees a GPU."""
    if device not in ("cpu", "cuda"):
        raise TckrError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TckrError("device 'cuda' asked for but torch sees no CUDA GPU; use --device cpu")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite: what a JSON record can hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_field_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """One TckrError naming `where` and the key when a value (from TOML) does not fit `cls`'s annotation.

    TOML gives strings, integers, floats, booleans, arrays and tables; this catches `lr = "1e-3"` or
    `dataset = 5` before a `validate()` compares it, and NaN / infinite floats (not valid in a JSON record).
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise TckrError(f"{where} {key} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_finite_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, dict) or (isinstance(hint, type) and isinstance(value, hint))
    return True  # anything else is left to the config's validate()


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts) + (" (or left out)" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is tuple:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(hint)[0], 'values')}"
    return names.get(hint, "a table")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TckrError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is one clear TckrError."""
    p = Path(path)
    if not p.is_file():
        raise TckrError(f"config file not found: {p}; pass an existing .toml file")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise TckrError(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise TckrError(f"cannot read config file {p}: {e.strerror}") from None


def generate_table(path: str | Path) -> dict[str, Any]:
    """The `[generate]` table of a TOML file; a file without one is an error, not silently the defaults."""
    data = load_toml(path)
    if "generate" not in data:
        tables = ", ".join(f"[{k}]" for k, v in data.items() if isinstance(v, dict)) or "no tables"
        raise TckrError(f"config file {path} has no [generate] table (it has {tables}); add one")
    table = data["generate"]
    if not isinstance(table, dict):
        raise TckrError(f"[generate] in {path} must be a table")
    return table


def generate_config_from_toml(path: str | Path) -> GenerateConfig:
    """Build a GenerateConfig from the `[generate]` table of a TOML file (keys may use - or _)."""
    table = generate_table(path)
    known = {f.name for f in fields(GenerateConfig)} - {"extra"}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise TckrError(
                f"unknown key '{key}' in [generate] of {path}{did_you_mean(name, known)}; valid keys: "
                f"{', '.join(sorted(known))}"
            )
        values[name] = value
    check_field_types(GenerateConfig, values, f"[generate] of {path}:")
    try:
        return GenerateConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise TckrError(f"bad [generate] table in {path}: {e}") from None
