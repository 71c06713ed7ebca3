"""Time fxqbn.save and fxqbn.load of the DenseNet-BC example (examples/densenet_bc.py), median of N runs.

    python benchmarks/serialize_speed.py [N]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import densenet_bc  # noqa: E402

import fxqbn  # noqa: E402


def timed(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(n: int) -> None:
    model, example = densenet_bc.build()
    observed = fxqbn.prepare(model, example)
    with torch.no_grad():
        observed(torch.randn(2, 3, 32, 32))
    quantized = fxqbn.convert(observed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "densenet.pt"
        save = timed(lambda: fxqbn.save(quantized, path), n)
        load = timed(lambda: fxqbn.load(path, model), n)
        size = path.stat().st_size
        payload = torch.load(path, weights_only=True)
    checked = ""
    if "digests" in payload:  # fxqbn with digests: what checking them costs, within load
        from fxqbn.digests import first_difference

        checked = f", checking the digests {timed(lambda: first_difference(payload), n) * 1e3:.1f} ms"
    print(f"torch {torch.__version__}, {len(quantized.state_dict())} tensors, {size / 1e6:.2f} MB: "
          f"save {save * 1e3:.0f} ms, load {load * 1e3:.0f} ms{checked} (median of {n})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
