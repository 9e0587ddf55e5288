import subprocess
import sys

import numpy as np
import pytest

from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector, positive_signs

SCRIPT = "from sift_fl.sign import positive_signs; import sys; sys.stdout.write(positive_signs(7, 'fc1.weight', 5000).tobytes().hex())"


def test_sign_vector_same_in_two_processes():
    outputs = [subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout for _ in range(2)]

    assert outputs[0] == outputs[1]
    assert outputs[0] == positive_signs(7, "fc1.weight", 5000).tobytes().hex()


def test_sign_vector_is_balanced():
    positive = positive_signs(123, "encoder.layer.5.output.dense.weight", 1_000_000)

    fraction = positive.mean()

    # Binomial standard deviation at n = 1e6 is 0.0005: 0.003 is six of them.
    assert abs(fraction - 0.5) < 0.003


def test_sign_vector_depends_on_seed_and_name():
    base = positive_signs(1, "a", 10_000)

    assert not np.array_equal(base, positive_signs(2, "a", 10_000))
    assert not np.array_equal(base, positive_signs(1, "b", 10_000))


def test_sign_vector_prefix_stable_across_chunks():
    long = positive_signs(5, "w", (1 << 20) + 17)
    short = positive_signs(5, "w", 1000)

    assert np.array_equal(long[:1000], short)


def test_signs_are_plus_minus_one():
    layout = ParameterLayout((TensorSpec("w", (3, 4), "float32"),))

    signs = SignVector(9, layout).signs("w")

    assert set(np.unique(signs).tolist()) <= {-1, 1}
    assert signs.shape == (12,)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_sign_vector_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="sign seed"):
        positive_signs(seed, "w", 4)


def test_layout_digest_changes_with_dtype():
    a = ParameterLayout((TensorSpec("w", (2, 2), "float32"),))
    b = ParameterLayout((TensorSpec("w", (2, 2), "float16"),))

    assert a.digest() != b.digest()
    assert ParameterLayout.from_json(a.to_json()) == a
