"""sam2-qbench: benchmarking and ablation harness for low-bit quantization of SAM2."""

__version__ = "0.1.0"
