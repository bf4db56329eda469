"""The schema of a run config and of a suite file (pydantic), and one-line error messages for it.

A run config is what one run needs; its validated, default-filled dump is what run_key hashes.
Methods validate their own parameters (methods.base.Method); here `method` only needs a name.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_serializer

from harness.errors import ConfigError
from harness.evaluate import registry
from harness.quant.policy import DEFAULT_KEEP_FP, DEFAULT_SCOPE, PARTS


def _part(name: str) -> str:
    # A scope entry is a part of SAM2 or a submodule of one (image_encoder.trunk.blocks.0, ...).
    tops = {p.split(".")[0] for p in PARTS}
    if name.split(".")[0] not in tops:
        raise ValueError(f"{name!r} is not a part of SAM2; expected one of {sorted(tops)} or a submodule of one")
    return name


def _kind(name: str) -> str:
    # The choices are the registered evaluators (harness/evaluate/registry.py): a new benchmark
    # kind is one `register` call, not an edit here too.
    kinds = list(registry.EVALUATORS)
    if name not in kinds:
        raise ValueError(f"input should be {', '.join(map(repr, kinds[:-1]))} or {kinds[-1]!r}")
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ModelCfg(Strict):
    name: str = "sam2_small"
    checkpoint: str | None = None
    image_size: int | None = Field(None, ge=32, le=4096, multiple_of=32)  # Hiera's windows need it
    # Filled in by the harness when `checkpoint` is null and the model ships weights: their
    # sha256, so that new shipped weights make new run_keys instead of reusing old records.
    weights_sha256: str | None = None


class DataPart(Strict):
    # "synthetic" generates a DAVIS-layout dataset under results/data once and reads it with the
    # DAVIS loader; "davis" reads `root` as it is.
    kind: Annotated[str, AfterValidator(_kind)] = "synthetic"
    root: str | None = None
    split: str = "val"
    resolution: str = "480p"
    max_sequences: int | None = Field(None, ge=1)
    # coco: box prompts from a detector's results file (COCO results format) instead of the ground truth
    detections: str | None = None
    score_threshold: float = Field(0.0, ge=0, le=1)


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


class TrainData(Strict):
    # "stream": fresh generated sequences every step (never repeated, seeded by `seed`);
    # "synthetic": the suite's generated dataset on disk; "davis": a DAVIS-layout folder.
    kind: Literal["stream", "synthetic", "davis"] = "synthetic"
    root: str | None = None
    split: str = "train"
    resolution: str = "480p"
    seed: int = 1000  # stream only; the eval data's seeds are small, so keep this one apart
    size: str = Field("256x144", pattern=r"^\d+x\d+$")  # stream only
    objects: tuple[int, int] = (1, 3)  # stream only


class Prompts(Strict):
    # SAM2Train's prompt sampling (its own names): points with `point_prob` (then a box with
    # `box_prob`), otherwise ground-truth masks on conditioning frames; corrective clicks.
    point_prob: float = Field(0.5, ge=0, le=1)
    box_prob: float = Field(0.5, ge=0, le=1)
    correction_points: int = Field(7, ge=1)  # SAM2Train fails on single images with 0
    frames_to_correct: int = Field(2, ge=1)
    init_cond_frames: int = Field(1, ge=1)


class Objectives(Strict):
    supervised: float = Field(1.0, ge=0)  # SAM2's multi-step mask loss on ground-truth masks
    distill_mask: float = Field(0.0, ge=0)  # binary cross-entropy to the FP teacher's mask probabilities
    distill_feat: float = Field(0.0, ge=0)  # MSE to the FP teacher's image-encoder features


class TrainCfg(Strict):
    steps: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1)  # clips per step (global, over all DDP ranks)
    # Clips in memory at once on a rank (0: its whole share); gradients accumulate over the
    # micro-batches to those of batch_size clips, the loss weighted as one batch's
    micro_batch: int = Field(0, ge=0)
    # Recompute the image encoder's blocks, memory attention's layers, the memory encoder and the
    # mask decoder (one pass per corrective click) in backward instead of keeping their
    # activations (torch.utils.checkpoint; the same gradients; one more forward of them)
    checkpoint_blocks: bool = True
    # Refuse the run before any work when its estimate from `qbench bench --train` figures
    # (harness/estimate.py) exceeds the memory available
    memory_check: bool = True
    frames: int = Field(4, ge=1)  # clip length T
    # Objects per clip at most (a random subset of those in its first frame; 0: all). SAM2.1's
    # fine-tuning configs take 3 (max_num_objects); memory grows with frames x objects
    max_objects: int = Field(3, ge=0)
    image_fraction: float = Field(0.0, ge=0, le=1)  # share of steps that are single images
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    quant_lr: float = Field(1e-3, gt=0)  # quantizer parameters (scales, clips, offsets)
    quant_weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    amp: Literal["auto", "none", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    flip: bool = True
    scale_jitter: float = Field(0.0, ge=0, lt=1)  # zoom in by up to this fraction
    objectives: Objectives = Objectives()
    prompts: Prompts = Prompts()
    data: TrainData = TrainData()
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    # Evaluate on data.eval every this many steps (0: only at the end), for search pruners and curves
    eval_every: int = Field(0, ge=0)


class EvalCfg(Strict):
    save_predictions: bool = False
    # Also score the predictions against the FP model's on the same prompts (agree/..., runs of
    # methods that quantize; harness/evaluate/agreement.py). On by default; only `false` is in the
    # dump, so that run_keys recorded before this key existed stay the same.
    agreement: bool = True

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        if self.agreement:
            out.pop("agreement", None)
        return out


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
    metric: str | None = None  # None: the main metric of the suite's evaluator (J&F, mIoU)


def _row(value):
    # A row of the table is a method name or a value of report.table.rows; the report checks that it
    # is one of the table's rows (known only from the records).
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        raise ValueError("expected a row of the table: a method name such as fp, or a value of report.table.rows")
    return str(value)


class ReportCfg(Strict):
    table: TableCfg = TableCfg()
    figures: list[str | dict[str, Any]] = []
    # The row that differences and their paired intervals are taken against; None: fp where the
    # suite runs it, else the best row (harness.report.best_row)
    baseline: Annotated[Any, AfterValidator(_row)] = None


class ExecutorCfg(Strict):
    """How `qbench suite` runs the runs (harness/executor.py); command-line options win over it."""

    # local: this process (workers > 1: that many processes); gpus: one process per visible GPU;
    # slurm: one submitit job per run (or a job array); submitit-local: submitit's local cluster (testing)
    kind: Literal["local", "gpus", "slurm", "submitit-local"] = "local"
    workers: int = Field(1, ge=1)  # local only
    partition: str | None = None  # the rest: slurm and submitit-local (where it applies)
    time: int = Field(60, ge=1)  # minutes per job
    gpus: int = Field(0, ge=0)  # GPUs per node of a job; > 0 also sets device=cuda for the runs
    mem: int | None = Field(None, ge=1)  # GB per job
    cpus: int | None = Field(None, ge=1)  # CPUs per task
    array: bool = False  # slurm: submit one job array instead of one job per run
    parallelism: int | None = Field(None, ge=1)  # at most this many jobs at once
    log_folder: str | None = None  # submitit's logs; default <results>/submitit/<suite>


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
    executor: ExecutorCfg = ExecutorCfg()


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
