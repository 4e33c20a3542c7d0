"""The bank's cache policy: byte-bounded, the least used task evicted first (decayed use counts),
a task used less than what it would evict served once (TinyLFU-style admission)."""

import copy

import pytest
import torch

from liedeploy import AdapterBank
from liedeploy.bank.task_cache import TaskCache
from tests.test_bank import bank_setup  # noqa: F401  (fixture)


def _fill(cache, uses: dict, size=10):
    for k, n in uses.items():
        cache.record(k, n)
        assert cache.victims(k, size) == []
        cache.put(k, size)


def test_the_least_used_goes_first_and_older_uses_count_less():
    c = TaskCache(limit=30)
    _fill(c, {"a": 5, "b": 1, "c": 1})
    c.record("d", 3)
    assert c.victims("d", 10) == ["b"]  # b and c used once each: b's use is the older
    c.record("b")
    assert c.victims("d", 10) == ["c"]
    assert c.victims("d", 25) is None  # would evict a, used more than d
    c.record("e", 9)
    assert c.victims("e", 25) == ["c", "b", "a"]  # every resident used less than e: all may go


def test_a_task_used_less_than_its_victim_is_not_admitted_unless_forced():
    c = TaskCache(limit=20)
    _fill(c, {"a": 4, "b": 4})
    c.record("rare", 1)
    assert c.victims("rare", 10) is None
    assert c.victims("rare", 10, force=True) == ["a"]
    for _ in range(4):
        c.record("rare")
    assert c.victims("rare", 10) == ["a"]  # popular now: admitted


def test_old_uses_decay():
    c = TaskCache(limit=20, half_life=2)
    _fill(c, {"old": 10})
    for _ in range(20):  # 20 uses of others: 'old' counts 10 / 2**10 now
        c.record("new")
    c.put("new", 10)
    assert c.uses("old") < 0.05 < 1 < c.uses("new")
    c.record("third", 1)
    assert c.victims("third", 10) == ["old"]


def test_counts_survive_renormalization():
    c = TaskCache(limit=20, half_life=10)
    _fill(c, {"a": 3, "b": 1})
    for _ in range(2000):  # 6000 uses: the scale (2x per 10 uses) is renormalized on the way
        c.record("a", 2)
        c.record("b")
    assert c._scale < 1e100
    assert c.uses("a") > c.uses("b") > 0
    assert c.victims("x", 10) is None  # x was never used


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="limit"):
        TaskCache(limit=-1)
    with pytest.raises(ValueError, match="half_life"):
        TaskCache(half_life=0)


def test_a_popular_task_stays_while_rare_ones_pass_through(bank_setup):  # noqa: F811
    base, refs, paths = bank_setup
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=2 * one_task)
    x = torch.randn(2, 3, 6, 6)
    for t, n in (("t0", 4), ("t1", 3)):
        for _ in range(n):
            bank(x, task=t)
    for t in ("t2", "t3", "t2", "t3"):  # an LRU of two would have evicted t0 and t1 at once
        torch.testing.assert_close(bank(x, task=t), refs[t](x), rtol=0, atol=0)
        assert bank.is_resident("t0") and bank.is_resident("t1")
    assert bank.stats["not_kept"] == 4 and bank.stats["folds"] == 6
    with bank.lease("t2", uses=10) as held:  # used more than t1 now: kept, t1 evicted
        torch.testing.assert_close(held.model(x), refs["t2"](x), rtol=0, atol=0)
    assert bank.resident == ["t0", "t2"] or set(bank.resident) == {"t0", "t2"}
    bank.prefetch("t3")  # an explicit prefetch keeps its task, evicting the least used (t0)
    assert set(bank.resident) == {"t2", "t3"}
    torch.testing.assert_close(bank(x, task="t3"), refs["t3"](x), rtol=0, atol=0)


def test_the_lru_policy_evicts_the_least_recent_and_admits_everything(bank_setup):  # noqa: F811
    c = TaskCache(limit=20, policy="lru")
    _fill(c, {"a": 9, "b": 1})
    c.record("rare")
    assert c.victims("rare", 10) == ["a"]  # used most, but least recently
    base, refs, paths = bank_setup
    one_task = (8 * 3 * 9 + 5 * 8) * 4
    bank = AdapterBank(copy.deepcopy(base), adapters=paths, cache_bytes=2 * one_task, cache_policy="lru")
    x = torch.randn(2, 3, 6, 6)
    for t in ("t0", "t0", "t0", "t1", "t2"):
        bank(x, task=t)
    assert set(bank.resident) == {"t1", "t2"} and bank.stats["not_kept"] == 0
    from liedeploy import LieError

    with pytest.raises(LieError, match="cache policy must be one of frequency, lru"):
        AdapterBank(copy.deepcopy(base), cache_policy="lfu")


def test_every_sample_counts_as_a_use(bank_setup):  # noqa: F811
    base, refs, paths = bank_setup
    bank = AdapterBank(copy.deepcopy(base), adapters=paths)
    x = torch.randn(6, 3, 6, 6)
    bank.forward_mixed(x, ["t1"] * 5 + ["t2"])
    with bank.lease("t3", uses=3) as held:
        held.use(2)
    assert bank.cache.uses("t1") == pytest.approx(5, rel=0.01)
    assert bank.cache.uses("t2") == pytest.approx(1, rel=0.01)
    assert bank.cache.uses("t3") == pytest.approx(5, rel=0.01)
