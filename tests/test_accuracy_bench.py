"""The digits accuracy benchmark (benchmarks/digits.py, digits_accuracy.py, docs/accuracy.md), checked fast.

The committed weights are scored on the fixed test split; the BN-only int8 conversion is held to a
drop against that float score, measured here, not written down. No retraining.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits benchmark needs scikit-learn: pip install 'fxqbn[bench]'")

import fxqbn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import digits  # noqa: E402
from digits_accuracy import bn_counts  # noqa: E402

FLOAT_FLOOR = 97.0  # top-1 (%) of the committed weights on the 450 test images (they scored 100.0 when committed)
MAX_DROP = 1.0  # points of top-1 the BN-only int8 model may lose against float (it lost 0.0 when committed)
MIN_SQNR_DB = 25.0  # the BN-only int8 model's test logits against float's (31.6 dB when committed)
FOLDABLE = ("bn1", "bn2", "batch_norm")  # right after a conv: fxqbn.prepare may fold them (BN+ReLU, BN, F.batch_norm+ReLU)
STANDALONE = {"bn3": "BatchNorm2d+ReLU", "bn4": "BatchNorm2d+ReLU6", "bn5": "BatchNorm1d", "bn6": "BatchNorm1d"}


@pytest.fixture(scope="module")
def split() -> digits.Split:
    return digits.load_split()


@pytest.fixture(scope="module")
def model() -> digits.DigitsNet:
    return digits.load_trained()


@pytest.fixture(scope="module", params=["native", "fused"])
def quantized(request, model, split) -> torch.nn.Module:
    observed = fxqbn.prepare(model, (split.train_x[:64],))
    with torch.no_grad():
        for batch in digits.batches(split.train_x)[:4]:
            observed(batch)
    return fxqbn.convert(observed, backend=request.param)


def test_split_is_fixed_and_stratified(split):
    assert (len(split.train_y), len(split.test_y)) == (1347, 450)
    per_class = torch.bincount(split.test_y, minlength=10)
    assert per_class.min() >= 43 and per_class.max() <= 46  # 25% of each class's 174-183 images
    assert split.train_x.shape[1:] == (1, 8, 8) and 0.0 <= split.train_x.min() and split.train_x.max() <= 1.0


def test_committed_weights_beat_the_floor(model, split):
    assert not model.training
    assert digits.top1(model, split.test_x, split.test_y) >= FLOAT_FLOOR


def test_bn_only_int8_stays_within_the_drop(model, quantized, split):
    reference, top1 = digits.top1(model, split.test_x, split.test_y), digits.top1(quantized, split.test_x, split.test_y)
    assert reference - top1 <= MAX_DROP
    with torch.no_grad():
        f, q = model(split.test_x), quantized(split.test_x)
    assert 10 * torch.log10(f.pow(2).sum() / (f - q).pow(2).sum()) >= MIN_SQNR_DB


def test_every_bn_form_of_the_model_is_quantized_or_folded(quantized):
    rows = {row.node: row for row in fxqbn.get_report(quantized).rows}
    assert set(rows) == set(FOLDABLE) | set(STANDALONE)
    assert {node: rows[node].pattern for node in STANDALONE if rows[node].status == "rewritten"} == STANDALONE
    assert all(rows[node].status in ("rewritten", "folded") for node in FOLDABLE)


def test_bn_counts_of_the_table(model, quantized):
    report = fxqbn.get_report(quantized)
    assert bn_counts(model, 7) == "0 / 0 / 7"
    assert bn_counts(quantized, 7) == f"{len(report.rewritten)} / {len(report.folded)} / 0"


def test_docs_python_blocks_run_from_the_repository_root():
    text = (ROOT / "docs" / "accuracy.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    assert blocks, "docs/accuracy.md has no python block"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and not done.stderr, done.stderr
        expected = re.findall(r"^# prints: (.*)$", block, re.M)
        assert done.stdout.splitlines() == expected
