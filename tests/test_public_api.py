"""The public API, pinned: what ``import resu_tensor as rt`` offers and the module paths the docs
cite. A change here is a change users see; update the expected text only on purpose
(``EXPECTTEST_ACCEPT=1 pytest tests/test_public_api.py``)."""
import importlib

import expecttest

import resu_tensor as rt

# Module paths the README and docs name; each must import and keep its public names.
DOCUMENTED_MODULES = (
    "resu_tensor.distributed",
    "resu_tensor.fsdp",
    "resu_tensor.export",
    "resu_tensor.integrations",
    "resu_tensor.integrations.hf",
    "resu_tensor.integrations.safetensors_io",
)


def _names(module_path: str) -> str:
    module = importlib.import_module(module_path)
    return f"{module_path}: {', '.join(sorted(module.__all__))}"


class TestPublicApi(expecttest.TestCase):
    def test_top_level_names(self):
        self.assertExpectedInline("\n".join(sorted(rt.__all__)), """\
AmnestyStats
COMMIT_STRATEGIES
CompactTensor
CudaGraphStep
CycleStats
MemoryReport
Mode
PRUNE_GRANULARITIES
PRUNE_METHODS
PRUNE_SCOPES
ResuConfig
ResuScheduler
ResuTensor
SCHEDULE_METHODS
ScheduleConfig
SelectiveConfig
StaticSubsetConfig
StepRecord
calibrate
commit_
dense_gradients
distributed
drop_and_grow_
enable_flat_state_dict
enter_resu_
format_stats_table
is_supported_module
load_resu_safetensors
memory_report
plot_history
prune_
remap_optimizer_state_
reset_optimizer_state_
resu_config
resu_weights
resurrection_ratio
save_resu_safetensors
to_dense_
to_semi_structured_""")

    def test_every_top_level_name_resolves(self):
        missing = [name for name in rt.__all__ if not hasattr(rt, name)]
        self.assertEqual(missing, [])

    def test_documented_modules(self):
        self.assertExpectedInline("\n".join(_names(path) for path in DOCUMENTED_MODULES), """\
resu_tensor.distributed: ResuGradSync, all_reduce_input_norms, broadcast_resu_state_, calibrate, check_replicas, prepare_ddp, resu_parameters
resu_tensor.fsdp: ResuScheduler, calibrate, commit_, enter_resu_, full_tensor, full_weights, prune_, reset_optimizer_state_, shard_placement, sharded_weights, slice_rows
resu_tensor.export: committed_weight, to_dense_, to_semi_structured_
resu_tensor.integrations: ResuCallback, enable_flat_state_dict, flatten_state_dict, from_resu_pretrained, linear_filter, load_resu_safetensors, load_resu_state_dict, quantize_hf_, save_resu_pretrained, save_resu_safetensors, unflatten_state_dict
resu_tensor.integrations.hf: ResuCallback, SCHEDULER_STATE_NAME, from_resu_pretrained, linear_filter, quantize_hf_, read_checkpoint, save_resu_pretrained, unwrap_optimizer, use_single_tensor_path_
resu_tensor.integrations.safetensors_io: FORMAT, enable_flat_state_dict, flatten_resu_tensor, flatten_state_dict, load_resu_safetensors, load_resu_state_dict, read_safetensors, rebuild_resu_tensor, resu_keys, save_resu_safetensors, state_targets, unflatten_state_dict""")

    def test_documented_attribute_paths(self):
        import resu_tensor.kernels
        import resu_tensor.torch_compat

        self.assertTrue(callable(rt.distributed.prepare_ddp))
        self.assertTrue(callable(resu_tensor.kernels.gather_by_bitmap))
        self.assertIsInstance(resu_tensor.torch_compat.NEEDS_PATCH, bool)
