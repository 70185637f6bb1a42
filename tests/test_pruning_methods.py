"""Pruning methods (magnitude, random, Wanda), granularities (element, row, structured, N:M),
scopes (layer, global, ERK) and Wanda calibration, against hand-made answers and plain references."""
import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.method.pruning import erk_densities, granularity_of, mask_from_scores, prune_mask, score


def resu_model(*layers: nn.Module) -> nn.Sequential:
    model = nn.Sequential(*layers)
    quantize_(model, rt.resu_config(sparsity=0.0))
    return model


def linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


# A hand-made Wanda example. Scores |W_ij|·‖X_j‖₂ with norms (3, 1, 0.1, 2):
#   row 0:  3,  2,  0.3,   1        magnitude would keep |W| = 4, 3, 2, 2: (1,0) (0,2) (0,1) (1,3)
#   row 1: 12,  1,  0.025, 4        wanda keeps the top 4 scores 12, 4, 3, 2: (1,0) (1,3) (0,0) (0,1)
HAND_WEIGHT = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.25, 2.0]])
HAND_NORMS = torch.tensor([3.0, 1.0, 0.1, 2.0])
HAND_WANDA_KEEP = torch.tensor([[True, True, False, False], [True, False, False, True]])
# Tokens whose column L2 norms are exactly HAND_NORMS, split over two batches.
HAND_TOKENS = torch.diag(HAND_NORMS)


def test_wanda_keeps_the_hand_computed_coordinates():
    expected_scores = HAND_WEIGHT.abs() * HAND_NORMS
    assert torch.equal(score(HAND_WEIGHT, "wanda", input_norms=HAND_NORMS), expected_scores)
    assert torch.equal(prune_mask(HAND_WEIGHT, 0.5, "wanda", input_norms=HAND_NORMS), HAND_WANDA_KEEP)
    assert not torch.equal(prune_mask(HAND_WEIGHT, 0.5, "magnitude"), HAND_WANDA_KEEP)

    from_dict = resu_model(linear_with(HAND_WEIGHT))
    rt.prune_(from_dict, 0.5, method="wanda", calibration={"0": HAND_NORMS})
    from_batches = resu_model(linear_with(HAND_WEIGHT))
    rt.prune_(from_batches, 0.5, method="wanda", calibration=[HAND_TOKENS[:2], HAND_TOKENS[2:]])
    for model in (from_dict, from_batches):
        w = model[0].weight
        assert torch.equal(w.mask(), HAND_WANDA_KEEP)
        assert torch.equal(w.dequantize(), HAND_WEIGHT * HAND_WANDA_KEEP)

    w = rt.ResuTensor.from_dense(HAND_WEIGHT).prune(0.5, method="wanda", scores=expected_scores)
    assert torch.equal(w.mask(), HAND_WANDA_KEEP)


def test_wanda_row_granularity_on_the_hand_example():
    # Row-balanced keeps the top 2 per row: row 0 → 3, 2 at (0,0) (0,1); row 1 → 12, 4 at (1,0) (1,3).
    model = resu_model(linear_with(HAND_WEIGHT))
    rt.prune_(model, 0.5, method="wanda", granularity="row", calibration={"0": HAND_NORMS})
    assert torch.equal(model[0].weight.mask(), HAND_WANDA_KEEP)


def test_calibrate_two_layer_model_matches_norms_of_the_layer_inputs():
    model = resu_model(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))
    batches = [torch.randn(2, 3, 6), torch.randn(4, 6), torch.randn(1, 2, 2, 6)]
    model.train()
    norms = rt.calibrate(model, batches)

    assert set(norms) == {"0", "3"}
    with torch.no_grad():
        first_inputs = torch.cat([b.reshape(-1, 6) for b in batches])
        second_inputs = torch.relu(first_inputs @ model[0].weight.dequantize().t() + model[0].bias)  # dropout: eval
    torch.testing.assert_close(norms["0"], first_inputs.pow(2).sum(0).sqrt())
    torch.testing.assert_close(norms["3"], second_inputs.pow(2).sum(0).sqrt())
    assert norms["0"].dtype == torch.float32 and norms["0"].shape == (6,) and norms["3"].shape == (5,)
    assert model.training and model[2].training  # train mode restored
    assert not model[0]._forward_pre_hooks and not model[3]._forward_pre_hooks  # hooks removed

    only_last = rt.calibrate(model, batches, filter_fn=lambda module, name: name == "3")
    assert set(only_last) == {"3"}
    torch.testing.assert_close(only_last["3"], norms["3"])


def test_calibrate_accepts_tuple_and_dict_batches_and_bf16_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4).to(torch.bfloat16)

        def forward(self, x, scale=1.0):
            return self.proj(x * scale)

    model = TwoInputs()
    quantize_(model, rt.resu_config(sparsity=0.0))
    x = torch.randn(3, 4).to(torch.bfloat16)
    norms = rt.calibrate(model, [(x,), {"x": x, "scale": 2.0}])
    expected = (x.float().pow(2).sum(0) * (1 + 4)).sqrt()
    torch.testing.assert_close(norms["proj"], expected)
    assert norms["proj"].dtype == torch.float32


def test_row_balanced_prunes_the_same_count_in_every_row():
    weight = torch.randn(8, 20)
    w = rt.ResuTensor.from_dense(weight).prune(0.3, granularity="row")
    keep = w.mask()
    assert keep.sum(1).tolist() == [14] * 8  # 20 - round(0.3 * 20)
    magnitudes = weight.abs()
    for row in range(8):
        assert magnitudes[row][keep[row]].min() > magnitudes[row][~keep[row]].max()
    rand = rt.ResuTensor.from_dense(weight).prune(0.5, method="random", granularity="row",
                                                    generator=torch.Generator().manual_seed(0))
    assert rand.mask().sum(1).tolist() == [10] * 8


def test_structured_row_and_column_prune_whole_rows_and_columns():
    weight = torch.randn(10, 12)
    magnitudes = weight.abs()
    rows = rt.ResuTensor.from_dense(weight).prune(0.3, granularity="structured_row").mask()
    kept_rows = rows.all(1)
    assert torch.equal(rows, kept_rows[:, None].expand_as(rows))  # every row all-kept or all-pruned
    assert int((~kept_rows).sum()) == 3
    row_sums = magnitudes.sum(1)
    assert row_sums[kept_rows].min() > row_sums[~kept_rows].max()

    cols = rt.ResuTensor.from_dense(weight).prune(0.25, granularity="structured_column").mask()
    kept_cols = cols.all(0)
    assert torch.equal(cols, kept_cols[None, :].expand_as(cols))
    assert int((~kept_cols).sum()) == 3
    col_sums = magnitudes.sum(0)
    assert col_sums[kept_cols].min() > col_sums[~kept_cols].max()


def test_structured_row_ranks_rows_by_the_sum_of_scores():
    # Row 0 holds the largest single element but the smallest sum: structured_row prunes it.
    scores = torch.tensor([[9.0, 0.0, 0.0], [3.0, 3.0, 3.5], [4.0, 4.0, 4.0]])
    keep = mask_from_scores(scores, 1 / 3, "structured_row")
    assert keep.all(1).tolist() == [False, True, True]


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_keeps_exactly_n_of_every_m(n, m):
    weight = torch.randn(6, 4 * m)
    for sparsity in (None, 1 - n / m):
        w = rt.ResuTensor.from_dense(weight).prune(sparsity, granularity=f"{n}:{m}")
        groups = w.mask().reshape(6, 4, m)
        assert (groups.sum(-1) == n).all()
        assert w.sparsity == 1 - n / m and w.target_sparsity == 1 - n / m
        assert w.nm_pattern == (n, m) and granularity_of(w) == f"{n}:{m}"
        magnitude_groups = weight.abs().reshape(6, 4, m)
        kept_min = magnitude_groups.masked_fill(~groups, float("inf")).amin(-1)
        pruned_max = magnitude_groups.masked_fill(groups, -float("inf")).amax(-1)
        assert (kept_min > pruned_max).all()  # the N highest of each group
    # A re-prune can keep the remembered pattern; an element prune forgets it.
    w.prune(None, granularity=granularity_of(w))
    assert (w.mask().reshape(6, 4, m).sum(-1) == n).all()
    w.prune(0.5)
    assert w.nm_pattern is None and w.row_keep is None and granularity_of(w) == "element"


def test_n_m_through_prune_with_wanda_scores():
    model = resu_model(nn.Linear(16, 8), nn.Linear(8, 4))
    rt.prune_(model, method="wanda", granularity="2:4", calibration=[torch.randn(5, 16)])
    for layer in (model[0], model[1]):
        keep = layer.weight.mask()
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all() and layer.weight.nm_pattern == (2, 4)


def _masks(model) -> dict[str, torch.Tensor]:
    return {name: weight.mask() for name, _, weight in rt.resu_weights(model)}


def _reference_global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    n_pruned = round(sparsity * flat.numel())
    threshold = flat.sort().values[n_pruned - 1]  # the largest pruned score
    return {name: s > threshold for name, s in scores.items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_global_scope_shares_one_threshold(method):
    model = resu_model(nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 6))
    with torch.no_grad():
        for scale, index in zip((0.5, 1.0, 2.0), (0, 1, 2)):
            model[index].weight.values.mul_(scale)  # different scales: per-layer sparsities differ
    norms = {name: torch.rand(weight.shape[1]) + 0.1 for name, _, weight in rt.resu_weights(model)}
    scores = {name: score(weight.values, method, input_norms=norms[name]) for name, _, weight in rt.resu_weights(model)}
    rt.prune_(model, 0.6, method=method, scope="global", calibration=norms)

    masks = _masks(model)
    reference = _reference_global_masks(scores, 0.6)
    for name in masks:
        assert torch.equal(masks[name], reference[name]), name
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    sparsities = [model[i].weight.sparsity for i in range(3)]
    assert sparsities[0] > sparsities[1] > sparsities[2]
    assert model[0].weight.target_sparsity == pytest.approx(sparsities[0])


def test_global_scope_refuses_to_prune_a_whole_layer():
    model = resu_model(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.values.mul_(1e-3)
    with pytest.raises(ValueError, match=r"would prune every weight of layer\(s\) \['0'\]"):
        rt.prune_(model, 0.6, scope="global")
    assert all(weight.mode == rt.Mode.DENSE for _, _, weight in rt.resu_weights(model))


def _erk_raw(shape):
    out_features, in_features = shape
    return (out_features + in_features) / (out_features * in_features)


def test_erk_densities_follow_the_formula_and_meet_the_target():
    shapes = {"a": (64, 32), "b": (32, 64), "c": (16, 64)}
    densities = erk_densities(shapes, 0.9)
    numels = {name: o * i for name, (o, i) in shapes.items()}
    epsilon = 0.1 * sum(numels.values()) / sum(_erk_raw(s) * numels[n] for n, s in shapes.items())
    for name, shape in shapes.items():
        assert densities[name] == pytest.approx(epsilon * _erk_raw(shape), rel=1e-12)
    assert sum(densities[n] * numels[n] for n in shapes) == pytest.approx(0.1 * sum(numels.values()), rel=1e-12)


def test_erk_caps_small_layers_dense_and_rescales_the_rest():
    shapes = {"tiny": (4, 4), "big": (256, 512), "mid": (64, 128)}
    densities = erk_densities(shapes, 0.9)  # ε ≈ 14.4: tiny would get 7.2, mid 0.34, big 0.08
    numels = {name: o * i for name, (o, i) in shapes.items()}
    assert densities["tiny"] == 1.0
    assert all(0 < d < 1 for name, d in densities.items() if name != "tiny")
    ratio = densities["big"] / _erk_raw(shapes["big"])
    assert densities["mid"] / _erk_raw(shapes["mid"]) == pytest.approx(ratio, rel=1e-12)
    assert sum(densities[n] * numels[n] for n in shapes) == pytest.approx(0.1 * sum(numels.values()), rel=1e-12)


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_erk_scope_prunes_each_layer_to_its_density(granularity):
    model = resu_model(nn.Linear(64, 48), nn.Linear(48, 16), nn.Linear(16, 4))
    shapes = {name: tuple(weight.shape) for name, _, weight in rt.resu_weights(model)}
    densities = erk_densities(shapes, 0.8)
    rt.prune_(model, 0.8, scope="erk", granularity=granularity)
    kept_total = 0
    for name, _, weight in rt.resu_weights(model):
        out_features, in_features = shapes[name]
        per = in_features if granularity == "row" else out_features * in_features
        assert weight.n_active == (out_features * in_features // per) * (per - round((1 - densities[name]) * per))
        kept_total += weight.n_active
    total = sum(o * i for o, i in shapes.values())
    roundings = sum(o for o, _ in shapes.values()) if granularity == "row" else len(shapes)  # ≤ 0.5 each
    assert abs(kept_total - 0.2 * total) <= 0.5 * roundings


def test_layer_scope_magnitude_matches_the_per_weight_mask():
    model = resu_model(nn.Linear(16, 8), nn.Linear(8, 8))
    originals = {name: weight.dequantize() for name, _, weight in rt.resu_weights(model)}
    rt.prune_(model, 0.7)
    for name, keep in _masks(model).items():
        assert torch.equal(keep, prune_mask(originals[name], 0.7))
        assert torch.equal(model[int(name)].weight.dequantize(), originals[name] * keep)


def test_random_prune_with_a_generator_is_reproducible():
    model = resu_model(nn.Linear(16, 8), nn.Linear(8, 8))
    rt.prune_(model, 0.5, method="random", generator=torch.Generator().manual_seed(7))
    first = _masks(model)
    rt.prune_(model, 0.5, method="random", generator=torch.Generator().manual_seed(7))
    for name, keep in _masks(model).items():
        assert torch.equal(keep, first[name]) and int(keep.sum()) == keep.numel() // 2


# ----------------------------------------------------------------- errors
def test_unknown_names_list_the_accepted_values():
    w = rt.ResuTensor.from_dense(torch.randn(4, 8))
    with pytest.raises(ValueError, match="unknown pruning method 'obd'; accepted: magnitude, random, wanda"):
        w.prune(0.5, method="obd")
    with pytest.raises(ValueError, match="unknown pruning granularity 'block'; accepted: element, row, "
                                         "structured_row, structured_column, or 'N:M'"):
        w.prune(0.5, granularity="block")
    for bad in ("0:4", "5:4", "2:", 4, "2x4"):
        with pytest.raises(ValueError, match="unknown pruning granularity"):
            w.prune(0.5, granularity=bad)
    model = resu_model(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="unknown pruning scope 'model'; accepted: layer, global, erk"):
        rt.prune_(model, 0.5, scope="model")
    assert model[0].weight.mode == rt.Mode.DENSE


def test_sparsity_checks():
    w = rt.ResuTensor.from_dense(torch.randn(4, 8))
    for granularity in ("element", "row", "structured_row", "structured_column"):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            w.prune(1.0, granularity=granularity)
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            w.prune(-0.1, granularity=granularity)
        with pytest.raises(TypeError, match="sparsity must be a float"):
            w.prune(None, granularity=granularity)
    with pytest.raises(ValueError, match=r"'2:4' fixes sparsity at 1 - 2/4 = 0.5, got sparsity=0.7"):
        w.prune(0.7, granularity="2:4")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        w.prune(1.5, granularity="2:4")
    with pytest.raises(ValueError, match="in_features divisible by 8, got 12"):
        rt.ResuTensor.from_dense(torch.randn(4, 12)).prune(None, granularity="4:8")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        rt.prune_(resu_model(nn.Linear(8, 4)), 1.0, scope="erk")
    assert w.mode == rt.Mode.DENSE


def test_nan_inf_are_refused():
    weight = torch.randn(4, 8)
    weight[0, 1] = float("nan")
    w = rt.ResuTensor.from_dense(weight)
    for granularity in ("row", "structured_column", "2:4"):
        with pytest.raises(ValueError, match="1 NaN/Inf values"):
            w.prune(0.5, granularity=granularity)
    clean = rt.ResuTensor.from_dense(torch.randn(4, 8))
    bad_scores = torch.rand(4, 8)
    bad_scores[2, 2] = float("inf")
    with pytest.raises(ValueError, match="the scores holds 1 NaN/Inf"):
        clean.prune(0.5, scores=bad_scores)
    bad_norms = torch.rand(8)
    bad_norms[3] = float("nan")
    model = resu_model(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="input_norms holds 1 NaN/Inf"):
        rt.prune_(model, 0.5, method="wanda", calibration={"0": bad_norms})
    assert clean.mode == rt.Mode.DENSE and model[0].weight.mode == rt.Mode.DENSE


def test_prune_model_checks_every_layer_before_changing_any():
    model = resu_model(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight.values[0, 0] = float("inf")
    with pytest.raises(ValueError, match="prune_: layer '2': the weight holds 1 NaN/Inf values"):
        rt.prune_(model, 0.5)
    with pytest.raises(ValueError, match="layer '2': granularity '2:4' needs in_features divisible by 4, got 6"):
        rt.prune_(model, None, granularity="2:4", filter_fn=lambda m, name: name != "1")
    with pytest.raises(ValueError, match=r"input_norms must have shape \(4,\)"):
        rt.prune_(model, 0.5, method="wanda", filter_fn=lambda m, name: name != "2",
                  calibration={"0": torch.rand(8), "1": torch.rand(3)})
    assert all(weight.mode == rt.Mode.DENSE for _, _, weight in rt.resu_weights(model))


def test_wanda_needs_calibration():
    model = resu_model(nn.Linear(8, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="method='wanda' needs calibration="):
        rt.prune_(model, 0.5, method="wanda")
    with pytest.raises(ValueError, match=r"no calibration input norms for layer\(s\) \['1'\]"):
        rt.prune_(model, 0.5, method="wanda", calibration={"0": torch.rand(8)})
    with pytest.raises(ValueError, match=r"input_norms must have shape \(8,\)"):
        rt.prune_(model, 0.5, method="wanda", calibration={"0": torch.rand(4), "1": torch.rand(4)})
    with pytest.raises(ValueError, match="needs scores"):
        model[0].weight.prune(0.5, method="wanda")
    with pytest.raises(ValueError, match="scores must be a tensor of the weight's storage shape"):
        model[0].weight.prune(0.5, method="wanda", scores=torch.rand(8, 4))
    with pytest.raises(TypeError, match=r"wrap a single batch tensor in a list"):
        rt.calibrate(model, torch.randn(3, 8))
    with pytest.raises(ValueError, match="calibrate got no batches"):
        rt.calibrate(model, [])
    with pytest.raises(ValueError, match="module '0' expects inputs with 8 features"):
        rt.calibrate(model, [torch.randn(3, 5)])
    assert not model[0]._forward_pre_hooks
    assert all(weight.mode == rt.Mode.DENSE for _, _, weight in rt.resu_weights(model))


def test_scope_and_granularity_combinations_that_cannot_work():
    model = resu_model(nn.Linear(8, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="scope='global' .* needs granularity='element', got 'row'"):
        rt.prune_(model, 0.5, scope="global", granularity="row")
    with pytest.raises(ValueError, match="scope='erk' .* granularity '2:4' fixes it"):
        rt.prune_(model, None, scope="erk", granularity="2:4")
    model[1].weight.prune(0.5).enter_resu()
    with pytest.raises(ValueError, match="layer '1' is in mode 'resu'"):
        rt.prune_(model, 0.5)
    assert model[0].weight.mode == rt.Mode.DENSE  # nothing changed before the refusal
