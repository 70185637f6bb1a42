"""Commit-time mask selection: amnesty tournament, N:M variant, Wanda re-prune, scores, schedule."""
import itertools

import expecttest
import pytest
import torch

from resu_tensor.method.amnesty import (
    AmnestyStats, amnesty_mask, format_stats_table, resurrection_ratio, score_for_commit, simple_mask,
    wanda_reprune_mask,
)

T, F = True, False


def flat_true(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().squeeze(1).tolist()


# --- an independent reference: python lists, sorted by (-score, flat index) --------------------------


def reference_split(scores, old_mask, sparsity, ratio):
    """(kept flat indices, {flat index: relative rank}) of the plain tournament."""
    values, was_active = scores.reshape(-1).tolist(), old_mask.reshape(-1).tolist()
    numel = len(values)
    n_keep = numel - round(sparsity * numel)
    active = sorted((i for i in range(numel) if was_active[i]), key=lambda i: (-values[i], i))
    candidates = sorted((i for i in range(numel) if not was_active[i]), key=lambda i: (-values[i], i))
    r_slots = min(round(ratio * n_keep), len(candidates))
    a_slots = min(n_keep - r_slots, len(active))
    for _ in range(n_keep - r_slots - a_slots):  # leftover: resurrected first, then active
        if r_slots < len(candidates):
            r_slots += 1
        else:
            a_slots += 1
    relative = {i: (rank + 0.5) / max(a_slots, 1) for rank, i in enumerate(active)}
    relative.update({i: (rank + 0.5) / max(r_slots, 1) for rank, i in enumerate(candidates)})
    return sorted(active[:a_slots] + candidates[:r_slots]), relative


def brute_force_nm_best_cost(scores, old_mask, sparsity, ratio, n, m):
    """Smallest total relative rank over all N:M masks keeping the plain split's resurrected count
    (or the nearest count an N:M mask can have)."""
    kept, relative = reference_split(scores, old_mask, sparsity, ratio)
    was_active = old_mask.reshape(-1).tolist()
    target = sum(not was_active[i] for i in kept)
    numel = scores.numel()
    per_group = [[tuple(g * m + j for j in choice) for choice in itertools.combinations(range(m), n)]
                 for g in range(numel // m)]
    by_count: dict[int, float] = {}
    for pick in itertools.product(*per_group):
        chosen = [i for group in pick for i in group]
        count = sum(not was_active[i] for i in chosen)
        cost = sum(relative[i] for i in chosen)
        by_count[count] = min(cost, by_count.get(count, float("inf")))
    nearest = min(by_count, key=lambda count: (abs(count - target), count))
    return nearest, by_count[nearest], relative


# --- schedule ------------------------------------------------------------------------------------------


def test_resurrection_ratio_endpoints_and_middle():
    assert resurrection_ratio(0, 10) == 0.10
    assert resurrection_ratio(5, 10) == pytest.approx(0.06, abs=1e-15)
    assert resurrection_ratio(10, 10) == 0.02
    assert resurrection_ratio(1, 2, r_start=0.5, r_end=0.0) == 0.25
    assert resurrection_ratio(0, 1, r_start=0.3, r_end=0.3) == resurrection_ratio(1, 1, r_start=0.3, r_end=0.3) == 0.3


@pytest.mark.parametrize("args, error, match", [
    ((11, 10), ValueError, r"cycle must be in \[0, num_cycles=10\], got 11"),
    ((-1, 10), ValueError, r"cycle must be in"),
    ((0, 0), ValueError, r"num_cycles must be >= 1, got 0"),
    ((0, 10, 1.5), ValueError, r"r_start must be in \[0, 1\], got 1.5"),
    ((0, 10, 0.1, -0.1), ValueError, r"r_end must be in \[0, 1\]"),
    ((0, 10, float("nan")), ValueError, r"r_start must be in"),
    ((0.5, 10), TypeError, r"cycle must be an int"),
    ((True, 10), TypeError, r"cycle must be an int"),
])
def test_resurrection_ratio_rejects(args, error, match):
    with pytest.raises(error, match=match):
        resurrection_ratio(*args)


# --- plain tournament: known answers --------------------------------------------------------------------


def test_basic_tournament_reserves_slots_for_resurrected():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.05],
                           [0.3, 0.02, 0.8, 0.04]])
    old = torch.tensor([[T, F, T, F],
                        [T, F, T, F]])
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.25)
    # 4 slots, 1 reserved: top-3 old-active (0.9, 0.8, 0.5) + top-1 resurrected (0.1);
    # a plain top-4 would have kept the old-active 0.3 instead.
    assert flat_true(mask) == [0, 1, 2, 6]
    assert flat_true(wanda_reprune_mask(scores, 0.5)) == [0, 2, 4, 6]
    assert stats == AmnestyStats(active_kept=3, resurrected_kept=1, active_pruned=1, resurrected_dropped=3,
                                 budget=4, budget_used=4, reserved_for_resurrected=1)

    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.5)
    assert flat_true(mask) == [0, 1, 3, 6]  # top-2 each: 0.9, 0.8 | 0.1, 0.05
    assert (stats.active_kept, stats.resurrected_kept, stats.reserved_for_resurrected) == (2, 2, 2)


def test_fewer_candidates_than_reserved_slots_leftover_goes_to_active():
    scores = torch.tensor([[0.9, 0.001, 0.5, 0.4],
                           [0.3, 0.2, 0.8, 0.1]])
    old = torch.tensor([[T, F, T, T],
                        [T, T, T, T]])  # one resurrected candidate only
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.5)
    # 4 slots, 2 wanted for resurrected but only 1 candidate: it is kept (tiny score and all),
    # and old-active get the other 3: 0.9, 0.8, 0.5.
    assert flat_true(mask) == [0, 1, 2, 6]
    assert stats == AmnestyStats(active_kept=3, resurrected_kept=1, active_pruned=4, resurrected_dropped=0,
                                 budget=4, budget_used=4, reserved_for_resurrected=1)


def test_fewer_old_active_than_their_slots_leftover_goes_to_resurrected():
    scores = torch.tensor([[0.01, 0.6, 0.5, 0.4],
                           [0.3, 0.2, 0.02, 0.1]])
    old = torch.tensor([[T, F, F, F],
                        [F, F, T, F]])  # two old-active, six candidates
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.25)
    # 4 slots: 1 reserved for resurrected, 3 for old-active of which only 2 exist; the spare slot
    # goes to the second-best candidate: both old-active (0.01, 0.02) + 0.6, 0.5.
    assert flat_true(mask) == [0, 1, 2, 6]
    assert stats == AmnestyStats(active_kept=2, resurrected_kept=2, active_pruned=0, resurrected_dropped=4,
                                 budget=4, budget_used=4, reserved_for_resurrected=1)


def test_ties_go_to_the_lower_flat_index():
    scores = torch.full((2, 4), 0.5)
    old = torch.tensor([[F, T, F, T],
                        [T, F, T, F]])
    mask, _ = amnesty_mask(scores, old, sparsity=0.5, ratio=0.5)
    assert flat_true(mask) == [0, 1, 2, 3]
    assert flat_true(wanda_reprune_mask(scores, 0.75)) == [0, 1]


def test_extreme_budgets():
    scores = torch.rand(4, 4)
    old = torch.rand(4, 4) < 0.5
    mask, stats = amnesty_mask(scores, old, sparsity=0.0, ratio=0.1)
    assert mask.all() and stats.budget_used == 16 and stats.active_pruned == stats.resurrected_dropped == 0
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.0)
    assert stats.resurrected_kept == max(0, 8 - int(old.sum()))
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=1.0)
    assert stats.active_kept == max(0, 8 - int((~old).sum()))


# --- N:M -------------------------------------------------------------------------------------------------


def test_nm_2_4_keeps_the_reserved_split_where_raw_score_repair_would_not():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.01, 0.1, 0.2, 0.05, 0.02]])
    old = torch.tensor([[T, T, F, F, T, T, F, F]])
    plain, _ = amnesty_mask(scores, old, sparsity=0.5, ratio=0.25)
    assert flat_true(plain) == [0, 1, 2, 5]  # 3 kept in the first group of 4, 1 in the second
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.25, nm=(2, 4))
    # Repairing by raw score would drop the resurrected 0.7 (lowest of 0.9, 0.8, 0.7) and fill the
    # second group with the old 0.1: no resurrected weight left. Relative rank instead keeps 0.7,
    # and the second group keeps its two old-active weights.
    assert flat_true(mask) == [0, 2, 4, 5]
    assert mask.view(-1, 4).sum(1).tolist() == [2, 2]
    assert stats == AmnestyStats(active_kept=3, resurrected_kept=1, active_pruned=1, resurrected_dropped=3,
                                 budget=4, budget_used=4, reserved_for_resurrected=1)


def test_nm_returns_the_plain_mask_when_it_is_already_nm():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.05],
                           [0.8, 0.6, 0.2, 0.01]])
    old = torch.tensor([[T, F, T, F],
                        [T, F, T, F]])
    plain, plain_stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.5)
    assert flat_true(plain) == [0, 1, 4, 5]
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.5, nm=(2, 4))
    assert torch.equal(mask, plain) and stats == plain_stats


@pytest.mark.parametrize("trial", range(12))
def test_nm_is_valid_and_optimal_against_brute_force(trial):
    rows = 1 + trial % 2
    scores = torch.rand(rows, 8)
    if trial % 3 == 0:
        scores = torch.randint(0, 3, (rows, 8)).float()  # ties
    old = torch.rand(rows, 8) < (0.2, 0.5, 0.8)[trial % 3]
    ratio = (0.0, 0.25, 0.5, 1.0)[trial % 4]
    mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=ratio, nm=(2, 4))
    assert mask.view(-1, 4).sum(1).eq(2).all()
    assert stats.budget_used == stats.budget == mask.sum() == rows * 4
    nearest_count, best_cost, relative = brute_force_nm_best_cost(scores, old, 0.5, ratio, 2, 4)
    assert stats.resurrected_kept == nearest_count
    assert sum(relative[i] for i in flat_true(mask)) == pytest.approx(best_cost, abs=1e-9)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_random_layers_keep_exact_n_and_the_plain_split(n, m):
    scores = torch.rand(32, 8 * m)
    old = torch.zeros_like(scores, dtype=torch.bool)
    old.view(-1, m).scatter_(1, torch.rand(scores.numel() // m, m).argsort(1)[:, :n], True)  # an N:M old mask
    scores = torch.where(old, scores, 0.1 * scores)  # resurrected weights are small
    sparsity = 1 - n / m
    plain, plain_stats = amnesty_mask(scores, old, sparsity, ratio=0.1)
    mask, stats = amnesty_mask(scores, old, sparsity, ratio=0.1, nm=(n, m))
    assert mask.view(-1, m).sum(1).eq(n).all()
    assert stats.budget_used == stats.budget == int(mask.sum()) == scores.numel() * n // m
    assert stats.resurrected_kept == plain_stats.resurrected_kept  # the layout allows the exact split here


def test_nm_rejects_bad_arguments():
    scores, old = torch.rand(2, 8), torch.rand(2, 8) < 0.5
    with pytest.raises(ValueError, match=r"sparsity must be 1 - 2/4 = 0.5"):
        amnesty_mask(scores, old, 0.3, 0.1, nm=(2, 4))
    with pytest.raises(ValueError, match=r"in_features=8 is not a multiple of M=3"):
        amnesty_mask(scores, old, 1 / 3, 0.1, nm=(2, 3))
    with pytest.raises(ValueError, match=r"1 <= N <= M"):
        amnesty_mask(scores, old, 0.0, 0.1, nm=(5, 4))
    with pytest.raises(TypeError, match=r"pair of ints"):
        amnesty_mask(scores, old, 0.5, 0.1, nm=(2.0, 4))


# --- random property against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("trial", range(30))
def test_random_inputs_match_reference_and_use_the_whole_budget(trial):
    shape = (int(torch.randint(1, 9, ())), int(torch.randint(1, 33, ())))
    scores = torch.rand(shape) if trial % 2 else torch.randint(0, 4, shape).float()
    old = torch.rand(shape) < float(torch.rand(()))
    if trial == 0:
        old[:] = True
    if trial == 1:
        old[:] = False
    sparsity = float(torch.rand(())) * 0.99
    ratio = float(torch.rand(()))
    mask, stats = amnesty_mask(scores, old, sparsity, ratio)
    n_keep = scores.numel() - round(sparsity * scores.numel())
    assert int(mask.sum()) == stats.budget_used == stats.budget == n_keep
    assert stats.active_kept + stats.active_pruned == int(old.sum())
    assert stats.resurrected_kept + stats.resurrected_dropped == int((~old).sum())
    assert flat_true(mask) == reference_split(scores, old, sparsity, ratio)[0]
    wanda = wanda_reprune_mask(scores, sparsity)
    assert int(wanda.sum()) == n_keep
    by_score = sorted(range(scores.numel()), key=lambda i: (-scores.reshape(-1)[i].item(), i))
    assert flat_true(wanda) == sorted(by_score[:n_keep])


def test_simple_mask_keeps_everything():
    mask = simple_mask((3, 5))
    assert mask.dtype == torch.bool and mask.shape == (3, 5) and mask.all()


# --- scores ----------------------------------------------------------------------------------------------


def test_scores_known_values():
    values = torch.tensor([[-2.0, 1.0], [0.5, -4.0]], dtype=torch.bfloat16)
    grad = torch.tensor([[0.5, 2.0], [-1.0, 0.25]])
    norms = torch.tensor([3.0, 0.5])
    assert score_for_commit(values, "magnitude").tolist() == [[2.0, 1.0], [0.5, 4.0]]
    assert score_for_commit(values, "gradient", grad_mean_abs=grad).tolist() == [[1.0, 2.0], [0.5, 1.0]]
    assert score_for_commit(values, "wanda", input_norms=norms).tolist() == [[6.0, 0.5], [1.5, 2.0]]
    assert score_for_commit(values, "magnitude").dtype == torch.float32


def test_score_errors():
    values = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown commit score method 'snip'; accepted: magnitude, gradient, wanda"):
        score_for_commit(values, "snip")
    with pytest.raises(ValueError, match="'gradient' needs grad_mean_abs"):
        score_for_commit(values, "gradient")
    with pytest.raises(ValueError, match=r"grad_mean_abs must have shape \(2, 3\), got \(3,\)"):
        score_for_commit(values, "gradient", grad_mean_abs=torch.rand(3))
    with pytest.raises(ValueError, match="'wanda' needs input_norms"):
        score_for_commit(values, "wanda")
    with pytest.raises(ValueError, match=r"input_norms must have shape \(3,\), got \(2,\)"):
        score_for_commit(values, "wanda", input_norms=torch.rand(2))
    bad = values.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        score_for_commit(bad, "magnitude")
    with pytest.raises(ValueError, match="NaN/Inf"):
        score_for_commit(values, "wanda", input_norms=torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="2-D"):
        score_for_commit(torch.randn(4), "magnitude")


def test_mask_input_errors():
    scores, old = torch.rand(2, 4), torch.rand(2, 4) < 0.5
    with pytest.raises(ValueError, match="NaN/Inf"):
        amnesty_mask(torch.tensor([[float("inf"), 1.0]]), torch.tensor([[T, F]]), 0.5, 0.1)
    with pytest.raises(ValueError, match="NaN/Inf"):
        wanda_reprune_mask(torch.tensor([[float("nan"), 1.0]]), 0.5)
    with pytest.raises(ValueError, match="scores must be >= 0"):
        amnesty_mask(-scores, old, 0.5, 0.1)
    with pytest.raises(TypeError, match="old_mask must be a bool tensor"):
        amnesty_mask(scores, old.float(), 0.5, 0.1)
    with pytest.raises(ValueError, match=r"old_mask shape \(4, 2\) must match scores shape \(2, 4\)"):
        amnesty_mask(scores, old.view(4, 2), 0.5, 0.1)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.2"):
        amnesty_mask(scores, old, 0.5, 1.2)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        amnesty_mask(scores, old, 1.0, 0.1)


# --- table -----------------------------------------------------------------------------------------------


class StatsTableTest(expecttest.TestCase):
    def test_table(self):
        scores = torch.tensor([[0.9, 0.1, 0.5, 0.05],
                               [0.3, 0.02, 0.8, 0.04]])
        old = torch.tensor([[T, F, T, F],
                            [T, F, T, F]])
        rows = {
            "layers.0.attn.q_proj": amnesty_mask(scores, old, sparsity=0.5, ratio=0.25)[1],
            "fc": AmnestyStats(active_kept=1840, resurrected_kept=208, active_pruned=208, resurrected_dropped=1840,
                               budget=2048, budget_used=2048, reserved_for_resurrected=205),
        }
        self.assertExpectedInline(format_stats_table(rows), """\
layer                 active_kept  resurrected_kept  active_pruned  resurrected_dropped  budget  budget_used  reserved_for_resurrected
--------------------  -----------  ----------------  -------------  -------------------  ------  -----------  ------------------------
layers.0.attn.q_proj            3                 1              1                    3       4            4                         1
fc                           1840               208            208                 1840    2048         2048                       205
--------------------  -----------  ----------------  -------------  -------------------  ------  -----------  ------------------------
total                        1843               209            209                 1843    2052         2052                       206""")


# --- admit="beats_weakest": r(c) as a cap -----------------------------------------------------------------


def reference_capped(scores, old_mask, sparsity, ratio):
    """Kept flat indices: walk every coordinate by (-score, index), taking each active one and each
    resurrected one while fewer than the cap are taken, until n_keep; fill any shortfall (too few
    active weights) with the next resurrected ones."""
    values, was_active = scores.reshape(-1).tolist(), old_mask.reshape(-1).tolist()
    numel = len(values)
    n_keep = numel - round(sparsity * numel)
    cap = min(round(ratio * n_keep), numel - sum(was_active))
    kept, taken = [], 0
    order = sorted(range(numel), key=lambda i: (-values[i], i))
    for i in order:
        if len(kept) == n_keep:
            break
        if was_active[i] or taken < cap:
            kept.append(i)
            taken += not was_active[i]
    kept += [i for i in order if not was_active[i] and i not in kept][:n_keep - len(kept)]
    return sorted(kept)


@pytest.mark.parametrize("trial", range(30))
def test_beats_weakest_matches_the_capped_reference_on_random_inputs(trial):
    generator = torch.Generator().manual_seed(100 + trial)
    shape = (int(torch.randint(1, 9, (), generator=generator)), int(torch.randint(1, 33, (), generator=generator)))
    scores = torch.rand(shape, generator=generator) if trial % 2 else torch.randint(0, 4, shape, generator=generator).float()
    old = torch.rand(shape, generator=generator) < float(torch.rand((), generator=generator))
    sparsity = float(torch.rand((), generator=generator)) * 0.99
    ratio = float(torch.rand((), generator=generator))
    mask, stats = amnesty_mask(scores, old, sparsity, ratio, admit="beats_weakest")
    n_keep = scores.numel() - round(sparsity * scores.numel())
    assert flat_true(mask) == reference_capped(scores, old, sparsity, ratio)
    assert int(mask.sum()) == stats.budget_used == n_keep
    assert stats.resurrected_kept == int((mask & ~old).sum()) and stats.active_kept == int((mask & old).sum())
    # the cap holds whenever there are active weights enough to fill the rest
    if int(old.sum()) >= n_keep - stats.reserved_for_resurrected:
        assert stats.resurrected_kept <= stats.reserved_for_resurrected
        # every kept resurrected coordinate scores at least as high as every dropped active weight
        kept_theta, dropped_active = scores[mask & ~old], scores[~mask & old]
        if kept_theta.numel() and dropped_active.numel():
            assert kept_theta.min() >= dropped_active.max()
    # never more resurrected than the quota rule keeps, and the same whenever θ win on score
    quota_mask, quota = amnesty_mask(scores, old, sparsity, ratio)
    assert stats.resurrected_kept <= quota.resurrected_kept


def test_beats_weakest_keeps_the_old_active_set_when_no_theta_outscores_it():
    generator = torch.Generator().manual_seed(7)
    old = torch.rand(16, 32, generator=generator) < 0.5
    scores = torch.where(old, 1.0 + torch.rand(16, 32, generator=generator), 0.5 * torch.rand(16, 32, generator=generator))
    sparsity = 1 - int(old.sum()) / old.numel()
    mask, stats = amnesty_mask(scores, old, sparsity, ratio=0.3, admit="beats_weakest")
    assert torch.equal(mask, old) and stats.resurrected_kept == 0 and stats.reserved_for_resurrected > 0
    quota_mask, quota = amnesty_mask(scores, old, sparsity, ratio=0.3)  # the quota admits them anyway
    assert quota.resurrected_kept == quota.reserved_for_resurrected > 0
    # θ that do outscore the weakest active weights are admitted, up to the cap
    scores[~old] += 1.0
    mask, stats = amnesty_mask(scores, old, sparsity, ratio=0.3, admit="beats_weakest")
    assert 0 < stats.resurrected_kept <= stats.reserved_for_resurrected


def test_beats_weakest_with_nm_stays_nm_and_rejects_unknown_rules():
    generator = torch.Generator().manual_seed(3)
    scores, old = torch.rand(8, 16, generator=generator), torch.rand(8, 16, generator=generator) < 0.5
    mask, stats = amnesty_mask(scores, old, 0.5, 0.25, nm=(2, 4), admit="beats_weakest")
    assert (mask.view(8, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="unknown admit rule 'best'; accepted: quota, beats_weakest"):
        amnesty_mask(scores, old, 0.5, 0.25, admit="best")
