"""BatchLoader: seeded order, host sharding, drop_last, epochs and exact resume."""

import itertools

import numpy as np
import pytest
import torch

from torchxla_rlhf.data.loader import BatchLoader


class Toy:
    """get(indices) -> {"index": [B], "x": [B, 2]} so batches are easy to compare."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, indices):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return {"index": idx, "x": torch.stack([idx, idx * 10], dim=1)}


def take(loader, k):
    return [b["index"].tolist() for b in itertools.islice(loader, k)]


def test_epoch_order_is_seeded_by_seed_and_epoch():
    ld = BatchLoader(Toy(10), 4, shuffle=True, seed=7)
    for e in (0, 1, 5):
        np.testing.assert_array_equal(ld.epoch_order(e), np.random.default_rng([7, e]).permutation(10))
    assert not np.array_equal(ld.epoch_order(0), ld.epoch_order(1))
    np.testing.assert_array_equal(BatchLoader(Toy(10), 4, shuffle=False, seed=7).epoch_order(3), np.arange(10))


def test_batches_drop_last_and_epochs():
    ld = BatchLoader(Toy(10), 4, shuffle=True, seed=1, num_epochs=2)
    assert ld.steps_per_epoch == 2 and ld.total_steps == 4
    batches = take(ld, 100)
    assert len(batches) == 4  # stops after 2 epochs, 2 examples dropped per epoch
    for e in range(2):
        order = np.random.default_rng([1, e]).permutation(10).tolist()
        assert batches[2 * e] == order[0:4] and batches[2 * e + 1] == order[4:8]
        flat = batches[2 * e] + batches[2 * e + 1]
        assert len(set(flat)) == 8  # no repeats within an epoch


def test_no_shuffle_order_and_infinite():
    ld = BatchLoader(Toy(6), 3, shuffle=False, seed=0)
    assert ld.total_steps is None
    assert take(ld, 5) == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_drop_last_false_wraps_last_batch():
    ld = BatchLoader(Toy(10), 4, shuffle=False, seed=0, drop_last=False, num_epochs=1)
    assert ld.steps_per_epoch == 3
    assert take(ld, 10) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_determinism_and_seed_sensitivity():
    a = take(BatchLoader(Toy(50), 8, shuffle=True, seed=3), 12)
    b = take(BatchLoader(Toy(50), 8, shuffle=True, seed=3), 12)
    c = take(BatchLoader(Toy(50), 8, shuffle=True, seed=4), 12)
    assert a == b and a != c


def test_two_processes_reassemble_global_batch():
    ds = Toy(37)
    glob = BatchLoader(ds, 8, shuffle=True, seed=5)
    hosts = [BatchLoader(ds, 8, shuffle=True, seed=5, process_index=p, process_count=2) for p in range(2)]
    for g, h0, h1 in itertools.islice(zip(glob, *hosts), 10):  # crosses epoch boundaries (4 steps/epoch)
        assert h0["index"].shape == (4,) and h1["x"].shape == (4, 2)
        assert torch.equal(torch.cat([h0["index"], h1["index"]]), g["index"])
        assert torch.equal(torch.cat([h0["x"], h1["x"]]), g["x"])


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 9])
def test_exact_resume(consumed):
    ds = Toy(29)
    make = lambda p=0, c=1: BatchLoader(ds, 6, shuffle=True, seed=11, process_index=p, process_count=c)  # noqa: E731
    ref = take(make(), consumed + 6)
    first = make()
    assert take(first, consumed) == ref[:consumed]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert take(resumed, 6) == ref[consumed:]
    # resuming on 2 hosts from a 1-host checkpoint gives each host its half of the same batches
    halves = [make(p, 2) for p in range(2)]
    for h in halves:
        h.load_state_dict(state)
    got = [a + b for a, b in zip(take(halves[0], 6), take(halves[1], 6))]
    assert got == ref[consumed:]


def test_resume_stops_at_num_epochs():
    ld = BatchLoader(Toy(8), 4, shuffle=True, seed=0, num_epochs=2)
    full = take(ld, 10)
    ld2 = BatchLoader(Toy(8), 4, shuffle=True, seed=0, num_epochs=2)
    take(ld2, 3)
    ld3 = BatchLoader(Toy(8), 4, shuffle=True, seed=0, num_epochs=2)
    ld3.load_state_dict(ld2.state_dict())
    assert take(ld3, 10) == full[3:] and len(full) == 4


def test_state_mismatch_and_bad_args():
    ld = BatchLoader(Toy(10), 4, shuffle=True, seed=0)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        BatchLoader(Toy(10), 4, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="'num_examples'"):
        BatchLoader(Toy(12), 4, shuffle=True, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="'global_batch_size'"):
        BatchLoader(Toy(10), 2, shuffle=True, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="not divisible"):
        BatchLoader(Toy(10), 3, shuffle=True, seed=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(Toy(3), 4, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        BatchLoader(Toy(10), 4, shuffle=True, seed=0, process_index=2, process_count=2)
