"""sam2-qbench: benchmarking and ablation harness for low-bit quantization of SAM2.

Layers, lowest first; a module imports only from its own layer or below (tests/test_layers.py
holds it, function-level imports included, and no two modules import each other in a circle):

1. errors, interrupts: what every layer raises and how Ctrl-C is handled;
2. progress, claims, memory, models: progress bars, run claims, memory peaks, SAM2 builders;
3. quant: quantizers, attention, the policy, size accounting, export (brevitas, torch);
4. data: dataset readers and generators;
5. evaluate, stats: scoring, evaluators by data kind (registry) and every metric's name (catalog);
   the bootstrap intervals of per-object scores;
6. schema, config, tracking, estimate: run configs, suites, MLflow records, memory estimates;
   methods (the package beside harness/) sits here, on quant and errors only;
7. train: the training loop; it is handed its intermediate evaluation, it does not reach up;
8. runner, inspect, pretrain, bench: one run's steps, the suite runner, benchmarks;
9. executor, search, kernels: where runs run (local, workers, submitit), Optuna searches of them,
   and the fake-quantized model beside torchao's integer kernels;
10. report, search_report: tables and figures read back from the records;
11. cli, gpu_check, __main__: commands, which choose among the layers below.
"""

__version__ = "0.1.0"
