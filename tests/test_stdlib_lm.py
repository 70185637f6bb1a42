"""The language-model benchmark's CPU stand-in and its RESU variants run, end at the sparsity, and
pin the settings they are named for."""
import math
import re

import pytest

from benchmarks.quality import stdlib_lm


def test_small_size_runs_a_resu_variant_to_the_target_sparsity():
    result = stdlib_lm.run_one(dict(method="resu_frozen", sparsity=0.7, seed=0, steps=40, device="cpu", size="small"))
    assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 256
    assert result["final_sparsity"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("name", sorted(stdlib_lm.RESU_VARIANTS))
def test_every_variant_pins_the_settings_it_is_named_for(name):
    config = stdlib_lm.make_schedule(name, 2000, 0.9, 0)
    assert config.method == "resu"
    assert config.freeze_active is name.startswith(("resu_frozen", "qresu4", "resu_selective"))
    assert config.quantize_bits == (4 if name.startswith("qresu4") else None)
    assert (config.selective is not None) == name.startswith("resu_selective")
    named_cycles = re.search(r"_cycles_(\d+)", name)
    assert config.num_cycles == (int(named_cycles[1]) if named_cycles else 5)
    assert (config.commit_admit == "beats_weakest") == ("beats_weakest" in name)
    assert (config.commit_strategy == "magnitude") == ("magnitude" in name)
    assert config.optimizer_state == ("carry" if name.endswith("_carry_state") else "reset")
    named_epsilon = re.search(r"_epsilon_([\d.]+)", name)
    assert config.epsilon == (float(named_epsilon[1]) if named_epsilon else 0.1)
    no_resurrection = "no_resurrection" in name
    assert (config.r_start, config.r_end) == ((0.0, 0.0) if no_resurrection else (0.10, 0.02))
    named_fraction = re.search(r"_resu_fraction_([\d.]+)", name)
    assert config.resu_fraction == (0.05 if no_resurrection else float(named_fraction[1]) if named_fraction else 0.4)
    assert config.stabilize_fraction == (0.0 if no_resurrection or "_stabilize_0_" in name else 0.1)
    at_cycle_end = [0.9 - 0.9 * (1 - (c + 1) / config.num_cycles) ** 3 for c in range(config.num_cycles)]
    assert (config.cycle_sparsities() == pytest.approx(at_cycle_end)) == ("schedule_at_cycle_end" in name)


def test_resu_is_the_library_default_recipe():
    config = stdlib_lm.make_schedule("resu", 2000, 0.9, 0)
    assert config.freeze_active is True and config.num_cycles == 5 and config.optimizer_state == "carry"
    former = stdlib_lm.make_schedule("resu_train_active_cycles_20_carry_state", 2000, 0.9, 0)
    assert former.freeze_active is False and former.num_cycles == 20 and former.optimizer_state == "carry"


@pytest.mark.parametrize("name", sorted(stdlib_lm.GMP_VARIANTS))
def test_gmp_variants_change_only_how_often_gmp_prunes(name):
    config, default = stdlib_lm.make_schedule(name, 2000, 0.9, 0), stdlib_lm.make_schedule("gmp", 2000, 0.9, 0)
    assert config.method == "gmp" and config.update_every == int(name.rsplit("_", 1)[1]) != default.update_every
    assert (config.mask_steps, config.sparsity, config.prune_start_step) == \
        (default.mask_steps, default.sparsity, default.prune_start_step)
