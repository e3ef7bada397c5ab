"""The accelerate configs in configs/: each loads with accelerate's own loader and sets up what its name says."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import ROOT

CONFIGS = ROOT / "configs"

# File name -> (distributed type, the settings in its deepspeed_config / fsdp_config block that matter).
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, {}),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, {"deepspeed_config": {"zero_stage": 2}}),
    "deepspeed-zero3.yaml": (
        DistributedType.DEEPSPEED,
        {"deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True}},
    ),
    "fsdp.yaml": (
        DistributedType.FSDP,
        {"fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}},
    ),
}
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def test_configs_folder_holds_exactly_the_four_configs():
    assert sorted(path.name for path in CONFIG_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_loads_with_accelerate_and_sets_its_distributed_type_in_bf16(path):
    config = load_config_from_file(str(path))
    distributed_type, blocks = EXPECTED[path.name]
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == "bf16"
    assert config.num_processes >= 2
    for block, settings in blocks.items():
        assert {key: getattr(config, block).get(key) for key in settings} == settings


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_header_shows_its_own_launch_command(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#")
    assert f"accelerate launch --config_file configs/{path.name} fine_tune.py" in text
    if path.name.startswith("deepspeed"):
        assert "pip install deepspeed" in text


def test_readme_names_every_config():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in EXPECTED if f"configs/{name}" not in readme]
    assert not missing, f"README.md does not mention {missing}"
