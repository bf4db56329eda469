"""Quantization methods, one per file, registered by name in methods.base.REGISTRY."""

from methods import fp, lsq, mixqsam, pact, ptq4sam, qsam2, rtn  # noqa: F401  (importing registers them)
from methods.base import REGISTRY, Context, Method, from_config, get, label, ptq, register  # noqa: F401
