"""mvm_cuda._args: the one test of what counts as a number or an integer among the
ops' and the detector's arguments."""
import math

import numpy as np
import pytest
import torch

import mvm_cuda
from mvm_cuda._args import INT64_MAX, integer, real


@pytest.mark.parametrize("value,expected", [
    (3, 3.0), (0.25, 0.25), (np.float32(0.5), 0.5), (np.int64(7), 7.0), (torch.tensor(2.5), 2.5),
    (torch.tensor([4], dtype=torch.int32), 4.0), pytest.param(10**400, math.inf, id="10**400"),
    pytest.param(-10**400, -math.inf, id="-10**400"),
])
def test_real_takes_every_real_scalar_as_a_float(value, expected):
    assert real(value) == expected and type(real(value)) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), torch.tensor(True), "1", None, 1j,
                                   torch.tensor([1.0, 2.0]), torch.tensor(1j)],
                         ids=["bool", "np-bool", "bool-tensor", "str", "None", "complex", "two-entries",
                              "complex-tensor"])
def test_real_refuses_the_rest(value):
    assert real(value) is None
    assert real(value, otherwise=value) is value  # how the op wrappers pass it on for the op to name


@pytest.mark.parametrize("value,expected", [
    (5, 5), (np.int64(5), 5), (np.uint64(5), 5), (torch.tensor(5), 5), (5.0, 5), (np.float32(5), 5),
    (torch.tensor(5.0), 5), (INT64_MAX, INT64_MAX), (2**53 + 1, 2**53 + 1),
])
def test_integer_takes_integers_and_whole_floats_exactly(value, expected):
    n = integer(value, 1)
    assert n == expected and type(n) is int


@pytest.mark.parametrize("value", [0, 2**63, 5.5, math.nan, math.inf, True, "5", None, torch.tensor(True),
                                   torch.tensor([1, 2])])
def test_integer_refuses_the_rest(value):
    assert integer(value, 1) is None


def test_integer_without_whole_floats_takes_integers_only():
    assert integer(5.0, 0, whole_floats=False) is None
    assert integer(np.int32(5), 0, whole_floats=False) == 5
    assert integer(torch.tensor(5), 0, whole_floats=False) == 5


def test_the_ops_take_a_too_large_integer_as_inf_and_name_it():
    with pytest.raises(RuntimeError, match=r"mvm::project_simplex: z must be finite and > 0, got inf"):
        mvm_cuda.project_simplex(torch.tensor([[0.3, 0.7]]), 10**400)
