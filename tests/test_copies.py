"""Step folders are self-contained: a reader copies one folder and has all it needs. So a few files
stand in several folders, on purpose, and must stay the same file everywhere."""

import pytest
from helpers import ROOT

COPIES = {
    "model.py": ["05_gpt_ddp", "08_fsdp"],  # step 08 trains step 05's GPT
    "report.py": ["05_gpt_ddp", "06_llama_ddp", "08_fsdp"],
    "checkpoint.py": ["05_gpt_ddp", "06_llama_ddp"],  # 08 writes sharded checkpoints instead
    "cluster.py": ["05_gpt_ddp", "06_llama_ddp", "08_fsdp"],
}


@pytest.mark.parametrize("name", COPIES)
def test_a_file_copied_into_several_steps_is_the_same_everywhere(name):
    first, *others = COPIES[name]
    text = (ROOT / first / name).read_text()
    differ = [folder for folder in others if (ROOT / folder / name).read_text() != text]
    assert not differ, f"{name} in {differ} differs from {first}/{name}: copy it over"
