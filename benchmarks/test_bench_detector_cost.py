"""The detector's cost against the network's own (definitions in
benchmarks/detector_cost.py): for each network and R, `scores(x)` of MVM
(c = 0.5N), dropout 0.5 and SAP 50%, and R plain passes of the same network in
its faster memory format ("plain"), on the same images. extra_info["over_plain"]:
a method's median over the plain passes' median for the same case, when both ran
in this session (benchmarks/ratios.py prints them). --quick: 20 images, R = 20."""
import pytest
import torch

from conftest import DEVICES, run
from detector_cost import METHODS, NETWORKS, build, plain_runner
from mvm_cuda import Detector

_plain_median: dict = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R", [20, 100])
@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("method", ["plain", *METHODS])
def test_detector_cost(benchmark, quick, device, name, R, method):
    if quick and R != 20:
        pytest.skip("--quick: R = 20 only")
    images = 20 if quick else 100
    model, shape = build(name)
    x = torch.rand(images, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    case = (device, name, R, images)
    benchmark.group = f"detector-cost {device} {name} R={R} ({images} images)"
    if method == "plain":
        run(benchmark, plain_runner(name, x, R), rounds=3)
        _plain_median[case] = benchmark.stats.stats.median
        return
    det = Detector(model.to(device), **METHODS[method], R=R, seed=0, progress=False)
    run(benchmark, det.scores, x, rounds=3)
    if case in _plain_median:
        benchmark.extra_info["over_plain"] = benchmark.stats.stats.median / _plain_median[case]
