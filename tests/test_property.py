"""Property: across random sequences of optimizer steps and mode changes, a step never moves a
coordinate that is not trainable, and SPARSE weights stay exactly zero at pruned coordinates."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import resu_tensor as rt

ACTIONS = st.sampled_from(["sgd", "adamw", "adam_l2", "prune", "enter_resu", "enter_resu_unfrozen", "commit_simple", "commit_magnitude"])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 12), st.integers(1, 40)),
    sparsity=st.floats(0.0, 0.95),
    actions=st.lists(ACTIONS, min_size=1, max_size=12),
)
def test_frozen_coordinates_never_move(seed, shape, sparsity, actions):
    torch.manual_seed(seed)
    numel = shape[0] * shape[1]
    keeps_one = (numel - 1) / numel  # a prune that keeps no weight raises (tests/test_safety.py)
    w = torch.nn.Parameter(rt.ResuTensor.from_dense(torch.randn(shape), sparsity=min(sparsity, keeps_one)))
    optimizers = {
        "sgd": torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1),
        "adamw": torch.optim.AdamW([w], lr=0.05, weight_decay=0.5),
        "adam_l2": torch.optim.Adam([w], lr=0.05, weight_decay=0.5),
    }
    for action in actions:
        if action in optimizers:
            before = w.dequantize()
            frozen = ~w.trainable_mask()
            F.linear(torch.randn(3, shape[1]), w).pow(2).sum().backward()
            optimizers[action].step()
            optimizers[action].zero_grad()
            assert torch.equal(w.dequantize()[frozen], before[frozen])
        else:
            if action == "prune" and w.mode in (rt.Mode.DENSE, rt.Mode.SPARSE):
                w.prune(min(w.sparsity + 0.1, 0.95, keeps_one))
            elif action.startswith("enter_resu") and w.mode == rt.Mode.SPARSE:
                w.enter_resu(epsilon=0.1, freeze_active=action == "enter_resu")
            elif action.startswith("commit") and w.mode == rt.Mode.RESU:
                active = w.mask()
                before = w.dequantize()
                frozen_active = w.trainable_side == "pruned"
                w.commit(action.removeprefix("commit_"))
                if action == "commit_simple" and frozen_active:
                    assert torch.equal(w.dequantize()[active], before[active])
            for opt in optimizers.values():
                rt.reset_optimizer_state_(opt)
        if w.mode == rt.Mode.SPARSE:
            assert torch.all(w.dequantize()[~w.mask()] == 0)
