"""A suite with a training method, run by every torchrun rank: `python tests/suite_ddp_worker.py SUITE RESULTS`.

`rtn_ft` is rtn that also trains (fine-tunes the quantized model with the loop of harness/train.py):
a stand-in for the QAT methods, registered here only.
"""

import sys

import torch

import methods
from harness.config import load_suite
from harness.runner import run_suite
from methods.rtn import RTN


@methods.register("rtn_ft")
class RTNFineTune(RTN):
    trains = True


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows, failed = run_suite(load_suite(sys.argv[1]), sys.argv[2])
    assert not failed, failed
