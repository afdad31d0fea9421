"""BatchScheduler: pure policy, checked without tensors."""

from collections import Counter

import pytest

from tckr_engine.data.captions import Prompt
from tckr_engine.engine.scheduler import BatchScheduler, sample_seed


def prompts(n_classes=3, per_class=(2, 3, 1)):
    return [
        [Prompt(f"c{c}: caption {k}", f"caption {k}") for k in range(per_class[c])] for c in range(n_classes)
    ]


def test_class_balance_follows_tckr_rule():
    s = BatchScheduler(num_images=11, shard_size=4, batch_size=3, prompts=prompts(), seed=0)
    counts = Counter(s.job(i).class_index for i in range(11))
    assert [counts[c] for c in range(3)] == [4, 4, 3] == s.class_counts()


def test_prompts_cycle_through_each_class_evenly():
    s = BatchScheduler(num_images=300, shard_size=50, batch_size=8, prompts=prompts(), seed=7)
    used = Counter(s.job(i).prompt.text for i in range(300))
    # class 1 has 3 captions and 100 images: each caption 33 or 34 times
    assert sorted(used[f"c1: caption {k}"] for k in range(3)) == [33, 33, 34]
    assert used["c2: caption 0"] == 100
    # every prompt of a job belongs to the job's class
    assert all(s.job(i).prompt.text.startswith(f"c{s.job(i).class_index}:") for i in range(300))


def test_jobs_are_a_pure_function_of_seed_and_index():
    a = BatchScheduler(100, 10, 4, prompts(), seed=3)
    b = BatchScheduler(100, 10, 4, prompts(), seed=3)
    c = BatchScheduler(100, 10, 4, prompts(), seed=4)
    assert [a.job(i) for i in range(100)] == [b.job(i) for i in range(100)]
    assert [a.job(i).seed for i in range(100)] != [c.job(i).seed for i in range(100)]
    assert len({a.job(i).seed for i in range(100)}) == 100
    assert a.job(37).seed == sample_seed(3, 37)
    assert 0 <= sample_seed(2**63 - 1, 10**12) < 2**63


def test_batches_are_fixed_size_never_cross_shards_and_pad_the_last():
    s = BatchScheduler(num_images=23, shard_size=10, batch_size=4, prompts=prompts(), seed=0)
    batches = list(s.schedule(range(s.num_shards)))
    assert s.num_shards == 3 and [s.shard_count(k) for k in range(3)] == [10, 10, 3]
    assert all(len(b.jobs) == 4 for b in batches)
    assert all(len({j.shard for j in b.jobs}) == 1 for b in batches)
    assert [b.n_real for b in batches] == [4, 4, 2, 4, 4, 2, 3]
    assert [b.last_in_shard for b in batches] == [False, False, True, False, False, True, True]
    real = [j for b in batches for j in b.jobs[: b.n_real]]
    assert [j.index for j in real] == list(range(23))
    assert batches[2].jobs[2:] == (batches[2].jobs[1],) * 2  # padding copies the last real job
    assert real[12].key == "00000100002"


def test_a_shards_batches_do_not_depend_on_what_runs_beside_it():
    s = BatchScheduler(num_images=50, shard_size=12, batch_size=5, prompts=prompts(), seed=1)
    alone = list(s.schedule([2]))
    together = [b for b in s.schedule([0, 1, 2, 3]) if b.shard == 2]
    assert alone == together


def test_bad_arguments():
    with pytest.raises(ValueError):
        BatchScheduler(10, 5, 2, [[Prompt("a")], []], seed=0)
    s = BatchScheduler(10, 5, 2, prompts(), seed=0)
    with pytest.raises(IndexError):
        s.job(10)
    with pytest.raises(IndexError):
        list(s.schedule([2]))
