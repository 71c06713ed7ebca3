"""DenseNet-BC (L=40, k=12) on 32x32 images, its BatchNorms quantized; one dense block kept float.

The architecture is written out in full in fxqbn/models.py (it is also `fxqbn convert`'s built-in
model, there with 3 layers a block): every dense layer is BN -> ReLU -> 1x1 conv -> BN -> ReLU ->
3x3 conv reading the concatenation of all earlier feature maps. Here with 6 layers a block, and with
a QConfigMapping that keeps the last dense block float, which the report lists as skipped.

    python examples/densenet_bc.py                                          # the Python API
    fxqbn convert examples/densenet_bc.py:build --skip features.4 --verify  # the command
"""

import torch
from torch.ao.quantization import HistogramObserver, QConfig, QConfigMapping, default_weight_observer

import fxqbn
from fxqbn.models import DenseNetBC, estimate_bn_statistics


def build() -> tuple[DenseNetBC, tuple[torch.Tensor]]:
    """The factory `fxqbn convert` calls: the model in eval mode and an example input.

    No trained weights here: BN statistics are estimated on random images so the BNs normalise.
    """
    torch.manual_seed(0)
    model = DenseNetBC(growth=12, block_layers=(6, 6, 6))  # L = 3 blocks x 6 layers x 2 convs + 4 = 40
    estimate_bn_statistics(model, [torch.randn(8, 3, 32, 32) for _ in range(2)])
    return model, (torch.randn(1, 3, 32, 32),)


def main() -> None:
    model, example = build()
    observer = HistogramObserver.with_args(reduce_range=False)
    qconfig = (
        QConfigMapping()
        .set_global(QConfig(activation=observer, weight=default_weight_observer))
        .set_module_name("features.4", None)  # the last dense block stays float
    )
    observed = fxqbn.prepare(model, example, qconfig)
    with torch.no_grad():
        for _ in range(4):  # calibration: random images stand in for real data
            observed(torch.randn(2, 3, 32, 32))
        quantized = fxqbn.convert(observed)
        x = torch.randn(2, 3, 32, 32)
    print(fxqbn.compare(model, quantized, x))  # the report, with each BN's error and the model's output SQNR


if __name__ == "__main__":
    main()
