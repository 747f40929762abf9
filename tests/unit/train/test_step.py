"""The step's non-finite guard reads one sum of squares per gradient."""
import mxnet as mx
import numpy as np
import pytest

from distft.train import step
from distft.train.step import sums_of_squares

LARGE = step.DOT_MIN_SIZE


@pytest.mark.parametrize("shapes", [
    [(7, 3, 3, 3), (5,), (2, 11)],  # all small: one multi_sum_sq
    [(LARGE + 3,), (5,), (2, LARGE // 2 + 1), (1,), (4, 4)],  # large ones by dot product, order kept
    [(LARGE,), (2, LARGE)],  # all large
])
def test_sums_of_squares_match_numpy_per_array_in_order(shapes):
    rng = np.random.RandomState(0)
    arrays = [rng.randn(*shape).astype(np.float32) for shape in shapes]
    got = sums_of_squares([mx.nd.array(a) for a in arrays]).asnumpy()
    assert got.shape == (len(shapes),)
    np.testing.assert_allclose(got, [float(np.square(a.astype(np.float64)).sum()) for a in arrays], rtol=1e-4)


def test_sums_of_squares_flag_the_array_with_a_nan_or_inf_small_or_large():
    arrays = [np.ones((4, 4), np.float32), np.ones(LARGE, np.float32), np.ones((3, 2), np.float32),
              np.ones(LARGE + 1, np.float32)]
    arrays[1][4] = np.nan
    arrays[2][1, 1] = np.inf
    got = sums_of_squares([mx.nd.array(a) for a in arrays]).asnumpy()
    assert got[0] == 16.0 and got[3] == LARGE + 1
    assert np.isnan(got[1]) and not np.isfinite(got[2])


def test_sums_of_squares_take_float16_arrays_through_multi_sum_sq():
    big = mx.nd.ones((LARGE,), dtype="float16")  # CPU dot refuses float16
    got = sums_of_squares([big, mx.nd.ones((3,), dtype="float16")]).asnumpy()
    assert got.tolist() == [float(LARGE), 3.0]
