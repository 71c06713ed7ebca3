"""docs/compile.md's figures: a converted model eager and compiled (inductor), and its float model.

    PYTHONPATH=. python benchmarks/compile_speed.py densenet fused 1,16
    PYTHONPATH=. python benchmarks/compile_speed.py preact native 1,16

MODEL: densenet (examples/densenet_bc.py) or preact (examples/preact_resnet.py); BACKEND: fused or
native; batch sizes, comma-separated. 1 thread, best of 5 runs; compiles take minutes on 2 cores.
"""

import sys
import time

import torch

import fxqbn

sys.path.insert(0, "examples")


def best(f, x, n=5):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def sqnr(a, b):
    return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean().clamp_min(1e-30)))


def main(name, backend, batches):
    torch.set_num_threads(1)
    build = __import__({"densenet": "densenet_bc", "preact": "preact_resnet"}[name]).build
    model, (x,) = build()
    observed = fxqbn.prepare(model, (x,))
    with torch.no_grad():
        for _ in range(3):
            observed(torch.randn(2, *x.shape[1:]))
    q = fxqbn.convert(observed, backend=backend)
    with torch.no_grad():
        for batch in batches:
            torch._dynamo.reset()
            xb = torch.randn(batch, *x.shape[1:])
            cq, cf = torch.compile(q), torch.compile(model)
            yc, ye, _ = cq(xb), q(xb), cf(xb)
            print(f"{name} {backend} batch {batch}: eager {best(q, xb):.2f} ms, compiled {best(cq, xb):.2f} ms, "
                  f"float eager {best(model, xb):.2f} ms, float compiled {best(cf, xb):.2f} ms; "
                  f"codes equal {torch.equal(yc, ye)}, SQNR {sqnr(ye, yc):.1f} dB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")])
