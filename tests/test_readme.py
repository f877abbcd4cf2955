"""README.md's Python examples run as written, on built-in and tiny offline pipelines.

The blocks are taken from the README itself, so a renamed argument or class there fails here. Only the
pieces that need the outside world are replaced: the Stable Diffusion directory is a saved tiny pipeline,
and the placeholders of the NoiseSchedule block get values. The modular-pipeline and FID blocks are left
out (a modular SDXL pipeline and the Inception weights are not offline).
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIPPED = ("as_modular_guider", "compute_fid")  # blocks that need what an offline test cannot have


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 6 and any("StableDiffusionPipeline.from_pretrained" in b for b in blocks)
    assert sum(any(s in b for s in SKIPPED) for b in blocks) == 2


@pytest.mark.filterwarnings("ignore")
def test_readme_examples_run(tmp_path):
    from difflab.models.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    namespace: dict = {}
    for block in python_blocks():
        if any(s in block for s in SKIPPED):
            continue
        code = block.replace('"path/to/local/sd-pipeline"', repr(str(tmp_path / "sd")))
        if "ns = NoiseSchedule" in code:  # placeholders of the schedule example
            namespace.update(t=torch.tensor(500.0), x_t=torch.randn(2, 1, 16, 16), model_output=torch.randn(2, 1, 16, 16))
        if "a photo of a cat" in code and "from_pretrained" not in code:  # the guidance examples: the SD `pipe`
            namespace["pipe"] = namespace["sd_pipe"]
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 -- the README's own code
        if "StableDiffusionPipeline.from_pretrained" in code:
            namespace["sd_pipe"] = namespace["pipe"]
    assert type(namespace["pipe"]).__name__ == "DigitsPipeline"  # the last block that sets it
    assert namespace["both"].images is not None and namespace["x0"].shape == (2, 1, 16, 16)
