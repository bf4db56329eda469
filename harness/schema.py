"""The schema of a run config and of a suite file (pydantic), and one-line error messages for it.

A run config is what one run needs; its validated, default-filled dump is what run_key hashes.
Methods validate their own parameters (methods.base.Method); here `method` only needs a name.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from harness.errors import ConfigError
from harness.quant.policy import DEFAULT_KEEP_FP, DEFAULT_SCOPE, PARTS


def _part(name: str) -> str:
    # A scope entry is a part of SAM2 or a submodule of one (image_encoder.trunk.blocks.0, ...).
    tops = {p.split(".")[0] for p in PARTS}
    if name.split(".")[0] not in tops:
        raise ValueError(f"{name!r} is not a part of SAM2; expected one of {sorted(tops)} or a submodule of one")
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ModelCfg(Strict):
    name: str = "sam2_small"
    checkpoint: str | None = None
    image_size: int | None = Field(None, ge=32, le=4096, multiple_of=32)  # Hiera's windows need it


class DataPart(Strict):
    # "synthetic" generates a DAVIS-layout dataset under results/data once and reads it with the
    # DAVIS loader; "davis" reads `root` as it is.
    kind: Literal["synthetic", "davis"] = "synthetic"
    root: str | None = None
    split: str = "val"
    resolution: str = "480p"
    max_sequences: int | None = Field(None, ge=1)


class CalibData(DataPart):
    split: str = "train"
    frames: int = Field(16, ge=1)


class SyntheticCfg(Strict):
    sequences: int = Field(6, ge=1)
    frames: int = Field(10, ge=3)
    size: str = Field("256x144", pattern=r"^\d+x\d+$")
    seed: int = 0


class DataCfg(Strict):
    eval: DataPart = DataPart()
    calib: CalibData = CalibData()
    synthetic: SyntheticCfg = SyntheticCfg()


class BitOverride(Strict):
    weight_bits: int | None = Field(None, ge=2, le=16)
    act_bits: int | None = Field(None, ge=2, le=16)
    qkv_bits: int | None = Field(None, ge=2, le=16)
    softmax_bits: int | None = Field(None, ge=2, le=16)


class QuantCfg(Strict):
    weight_bits: int = Field(8, ge=2, le=16)
    act_bits: int = Field(8, ge=2, le=16)
    scope: list[Annotated[str, AfterValidator(_part)]] = list(DEFAULT_SCOPE)
    keep_fp: list[str] = list(DEFAULT_KEEP_FP)
    attention: bool = True
    qkv_bits: int | None = Field(None, ge=2, le=16)
    softmax_bits: int | None = Field(None, ge=2, le=16)
    softmax_quant: Literal["uniform", "log2"] = "uniform"
    bits: dict[str, BitOverride] = {}


class MethodCfg(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "fp"


class TrainCfg(Strict):
    steps: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "none"


class EvalCfg(Strict):
    save_predictions: bool = False


class RunConfig(Strict):
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    quant: QuantCfg = QuantCfg()
    method: MethodCfg = MethodCfg()
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    seed: int = 0
    device: str | None = None


class TableCfg(Strict):
    rows: str = "method.name"
    cols: str = "quant.weight_bits"
    metric: str = "jf"


class ReportCfg(Strict):
    table: TableCfg = TableCfg()
    figures: list[str | dict[str, Any]] = []


class SuiteFile(Strict):
    name: str | None = None
    description: str | None = None
    base: dict[str, Any] = {}
    seeds: list[int] | None = None
    matrix: dict[str, list[Any]] = {}
    include: list[dict[str, Any]] = []
    exclude: list[dict[str, Any]] = []
    report: ReportCfg = ReportCfg()
    search: dict[str, Any] | None = None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that `loc` points into (for 'did you mean')."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def validate(model: type[BaseModel], data: dict, where: str, prefix: str = "") -> BaseModel:
    """Validate or raise one ConfigError: where, dotted path, what was expected, closest key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        path = prefix + ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc), n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {path!r}{hint}") from None
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
        msg = err["msg"][:1].lower() + err["msg"][1:]
        raise ConfigError(f"{where}: {path}: {msg}{got}") from None
