"""Real torchvision and timm models (random weights, no network) through prepare -> convert on both
backends: every BN -> (Identity / eval Dropout)* -> ReLU/ReLU6 chain of the float graph fused
(counted by tests/real_model_zoo.py from ``torch.fx.symbolic_trace``, not from fxqbn's report),
SyncBatchNorm rewritten, the BNs inside timm's notrace blocks reported, outputs equal to the float fake-quantized model and close to float, the
user's model untouched. benchmarks/real_models.py runs the whole zoo."""

import pytest
import torch
from real_model_zoo import MODELS, build, run, to_sync
from torch import nn

import fxqbn

SPECS = {spec.label: spec for spec in MODELS}

# label -> the float graph's chains by (activation, through a pass-through): facts of each model,
# pinned so that the independent count itself is checked.
CHAINS = {
    "tv/resnet18": {("ReLU", False): 9},
    "tv/mobilenet_v2": {("ReLU6", False): 35},
    "timm/resnet18": {("ReLU", False): 1, ("ReLU", True): 8},  # BatchNormAct2d: F.batch_norm -> Identity -> ReLU
    "timm/regnety_002+Dropout": {("ReLU", True): 27},  # BatchNormAct2d(drop_layer=nn.Dropout), in eval
    "tv/resnet18 SyncBN": {("ReLU", False): 9},  # torch's convert_sync_batchnorm
    "timm/regnetx_002 SyncBN": {("ReLU", True): 27},  # timm's: SyncBatchNormAct calls SyncBatchNorm.forward
    "timm/tf_mobilenetv3_large_100": {("ReLU", True): 11},  # Conv2dSame: timm's notrace registry
    "timm/mobilevit_xxs": {},  # SiLU only; 9 BNs inside timm's notrace MobileVitBlock
}
SKIPPED = {"timm/mobilevit_xxs": 9}  # label -> BNs reported skipped (inside leaf modules)

# Output SQNR against float, dB: each measured at least 5 dB above (benchmarks/real_models.py).
# Random-weight MobileNetV2/V3 amplify noise: one 8-bit step of uniform noise added to each BN
# output of the float MobileNetV2 alone brings it to about 6 dB, so there only the oracle is asserted.
MIN_SQNR = {"tv/resnet18": 15, "tv/mobilenet_v2": 0, "timm/resnet18": 20, "timm/regnety_002+Dropout": 25,
            "tv/resnet18 SyncBN": 15, "timm/regnetx_002 SyncBN": 20, "timm/tf_mobilenetv3_large_100": 0,
            "timm/mobilevit_xxs": 12}


def _chain_kinds(result):
    kinds = {}
    for chain in result.float.chains:
        key = (chain.activation, bool(chain.via))
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


@pytest.fixture(scope="module", params=sorted(CHAINS))
def measured(request):
    spec = SPECS[request.param]
    pytest.importorskip(spec.source, reason=f"{spec.label} needs {spec.source} (installed beside torch 2.14.1 in CI)")
    return spec, run(spec)


def test_every_chain_of_the_float_graph_is_fused_on_every_backend(measured):
    spec, result = measured
    assert result.error == ""
    assert _chain_kinds(result) == CHAINS[spec.label]
    assert result.fused_chains == len(result.float.chains)  # each chain's BN rewritten with its activation
    assert result.left == {"native": 0, "fused": 0}  # no activation left reading a BN in the converted graphs
    skipped = sum(result.skips.values())
    assert skipped == SKIPPED.get(spec.label, 0) and result.rewritten + skipped == result.float.bns
    assert all(reason.startswith("inside MobileVitBlock '") and reason.endswith("kept float") for reason in result.skips)


def test_outputs_equal_the_fake_quantized_float_model_and_stay_close_to_float(measured):
    spec, result = measured
    # The oracle rounds where convert quantizes, in float: equal here when measured (inf dB); a kernel
    # may round a value at a code boundary one step the other way, which deep nets amplify (ResNet-50: 12 dB).
    assert min(result.oracle.values()) > 30, result.oracle
    assert min(result.sqnr.values()) > MIN_SQNR[spec.label], result.sqnr


def test_the_users_model_is_bit_identical_afterwards(measured):
    assert measured[1].model_kept


@pytest.mark.parametrize("label", ["tv/resnet18 SyncBN", "timm/regnetx_002 SyncBN"])
def test_every_syncbatchnorm_is_rewritten_under_its_module_name(label):
    spec = SPECS[label]
    pytest.importorskip(spec.source, reason=f"{label} needs {spec.source} (installed beside torch 2.14.1 in CI)")
    plain, x = build(spec)
    model = to_sync(plain, spec.sync_bn)
    syncs = [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()) > 0
    observed = fxqbn.prepare(model, (x,))
    with torch.no_grad():
        observed(x)
    rows = fxqbn.get_report(fxqbn.convert(observed)).rows
    assert sorted(r.module for r in rows if r.status == "rewritten") == sorted(syncs)
