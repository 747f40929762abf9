"""The step's non-finite guard reads one sum of squares per gradient."""
import mxnet as mx
import numpy as np

from distft.train.step import sums_of_squares


def test_sums_of_squares_match_numpy_per_array():
    rng = np.random.RandomState(0)
    arrays = [rng.randn(*shape).astype(np.float32) for shape in ((7, 3, 3, 3), (5,), (2, 11))]
    got = sums_of_squares([mx.nd.array(a) for a in arrays]).asnumpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [float(np.square(a.astype(np.float64)).sum()) for a in arrays], rtol=1e-5)


def test_sums_of_squares_flag_the_array_with_a_nan_or_inf():
    arrays = [np.ones((4, 4), np.float32), np.ones(9, np.float32), np.ones((3, 2), np.float32)]
    arrays[1][4] = np.nan
    arrays[2][1, 1] = np.inf
    got = sums_of_squares([mx.nd.array(a) for a in arrays]).asnumpy()
    assert np.isfinite(got[0]) and got[0] == 16.0
    assert np.isnan(got[1])
    assert not np.isfinite(got[2])
