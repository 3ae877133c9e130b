"""cl_optax.metrics against hand-computed values and a plain-loop reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cl_optax import metrics

# Three tasks. Row i = after training task i; column j = task evaluated.
R3 = np.array(
  [
    [0.90, 0.20, 0.10],
    [0.70, 0.80, 0.30],
    [0.60, 0.75, 0.95],
  ]
)
B3 = np.array([0.10, 0.15, 0.12])  # random-init accuracies


def test_hand_made_three_tasks():
  # ACC = (0.60 + 0.75 + 0.95) / 3
  assert metrics.average_accuracy(R3) == pytest.approx(2.30 / 3)
  # BWT = ((0.60 - 0.90) + (0.75 - 0.80)) / 2 = -0.175
  assert metrics.backward_transfer(R3) == pytest.approx(-0.175)
  # FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.20 - 0.15) + (0.30 - 0.12)) / 2 = 0.115
  assert metrics.forward_transfer(R3, B3) == pytest.approx(0.115)
  # forgetting: task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.20, 0.80) - 0.75 = 0.05
  assert metrics.forgetting(R3) == pytest.approx(0.175)
  np.testing.assert_allclose(metrics.average_accuracy_curve(R3), [0.90, 0.75, 2.30 / 3])


def test_forgetting_uses_best_not_first_accuracy():
  # task 0 improves after task 1 (positive backward transfer), then drops
  R = np.array([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.9]])
  assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)
  assert metrics.backward_transfer(R) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)


def test_no_forgetting_and_single_task():
  R = np.triu(np.ones((4, 4))) * 0 + np.tril(np.ones((4, 4)))
  assert metrics.backward_transfer(R) == 0.0 and metrics.forgetting(R) == 0.0
  s = metrics.summary([[0.7]])
  assert s == {"acc": 0.7, "acc_curve": [0.7]}
  s = metrics.summary(R3, B3)
  assert set(s) == {"acc", "acc_curve", "bwt", "forgetting", "fwt"}


def _reference(R, b):
  T = len(R)
  acc = sum(R[T - 1][j] for j in range(T)) / T
  bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
  fwt = sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)
  fgt = 0.0
  for j in range(T - 1):
    best = max(R[i][j] for i in range(T - 1))
    fgt += best - R[T - 1][j]
  return acc, bwt, fwt, fgt / (T - 1)


@settings(deadline=None, max_examples=30)
@given(
  st.integers(2, 6).flatmap(
    lambda T: st.tuples(
      hnp.arrays(np.float64, (T, T), elements=st.floats(0, 1)),
      hnp.arrays(np.float64, (T,), elements=st.floats(0, 1)),
    )
  )
)
def test_against_loop_reference(Rb):
  R, b = Rb
  acc, bwt, fwt, fgt = _reference(R.tolist(), b.tolist())
  assert metrics.average_accuracy(R) == pytest.approx(acc)
  assert metrics.backward_transfer(R) == pytest.approx(bwt)
  assert metrics.forward_transfer(R, b) == pytest.approx(fwt)
  assert metrics.forgetting(R) == pytest.approx(fgt)
  assert metrics.forgetting(R) >= -metrics.backward_transfer(R) - 1e-12  # best >= diagonal


@pytest.mark.parametrize(
  "fn, R, match",
  [
    (metrics.average_accuracy, np.ones((2, 3)), "must be square"),
    (metrics.average_accuracy, np.ones(3), "must be square"),
    (metrics.backward_transfer, np.ones((1, 1)), "at least 2 tasks"),
    (metrics.forgetting, [[1.0, np.nan], [1.0, 1.0]], "non-finite"),
  ],
)
def test_errors(fn, R, match):
  with pytest.raises(ValueError, match=match):
    fn(R)


def test_fwt_baseline_shape():
  with pytest.raises(ValueError, match=r"baseline must have shape \(3,\)"):
    metrics.forward_transfer(R3, [0.1, 0.1])
