import copy

import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                    module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                    module.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything prepare/convert must leave alone: tensors, module types, training flags, and every
    other public attribute of every module (e.g. a cache a forward fills), by repr."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "attributes": [(name, repr({k: v for k, v in vars(m).items() if not k.startswith("_")})) for name, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["training"] == before["training"]
    assert after["attributes"] == before["attributes"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value) or torch.allclose(after["state"][key], value, rtol=0, atol=0, equal_nan=True), key


def installed(gm, name: str):
    """The quantized module ``convert`` put in place of BN module ``name``: the module there, or, for
    a BN between float code, the ``bn`` of the ``fxqbn.float_io.FloatIO`` there."""
    from fxqbn.float_io import FloatIO

    module = gm.get_submodule(name)
    return module.bn if isinstance(module, FloatIO) else module


def calls(gm, module_type) -> list:
    """The call_module nodes of ``gm`` whose module is exactly of ``module_type``."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(modules[n.target]) is module_type]


@pytest.fixture
def calibrate():
    def run(observed, batches):
        with torch.no_grad():
            for batch in batches:
                observed(*batch) if isinstance(batch, tuple) else observed(batch)
        return observed

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with inductor (minutes on 2 cores); deselect with -m 'not slow'")


__all__ = ["randomize_bn", "snapshot", "assert_unchanged", "calls", "copy"]


@pytest.fixture(autouse=True, scope="session")
def _every_pass_lints_the_graph_it_leaves():
    """``fxqbn.passes.base.LINT``: off in production, on for the whole suite (every emitted graph is linted)."""
    from fxqbn.passes import base

    base.LINT = True
    yield
    base.LINT = False
