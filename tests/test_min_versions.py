"""das-sd under its minimum library versions computes what it computes under the project's own.

pyproject.toml promises transformers >= 4.51, diffusers >= 0.35 and peft >= 0.17; webui venvs pin
4.x releases. .ci/run builds build/min-versions (torch 2.13.0, then tests/min-versions.txt, then das-sd
without dependencies) and names its Python in DAS_SD_MIN_VERSIONS_PYTHON; without it the test is
skipped. The same script (tests/min_versions_check.py) runs there and here on the same demo store,
image and prompt.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from das_sd.generation import GenerationSettings, generate
from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

HERE = Path(__file__).parent
PYTHON = os.environ.get("DAS_SD_MIN_VERSIONS_PYTHON")
PROMPT = "quimvex, a red circle on a blue background"


def pinned(name: str) -> str:
    """The version tests/min-versions.txt pins for ``name``."""
    for line in (HERE / "min-versions.txt").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==")[1]
    raise KeyError(name)


@pytest.mark.skipif(not PYTHON, reason="set DAS_SD_MIN_VERSIONS_PYTHON (.ci/run does)")
def test_minimum_versions_compute_what_the_project_versions_compute(demo, tmp_path):
    from min_versions_check import compute

    from das_sd.attribute import Attributor

    query = tmp_path / "query.png"
    attributor = Attributor(demo["store"], device="cpu")
    generate(attributor.pipe, GenerationSettings(prompt=PROMPT, seed=11)).images[0].save(query)
    target = tmp_path / "min.safetensors"
    run = subprocess.run([PYTHON, str(HERE / "min_versions_check.py"), str(demo["store"]), str(query), PROMPT,
                          str(target)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert run.returncode == 0, run.stderr[-4000:]
    with safe_open(str(target), framework="pt") as fh:
        versions = fh.metadata()
    # the venv really holds the minimums (a resolver that upgraded them would make this test moot)
    assert [versions[k] for k in ("transformers", "diffusers", "peft")] == \
        [pinned("transformers"), pinned("diffusers"), pinned("peft")]
    assert versions["transformers"].startswith("4.")
    old = load_file(str(target))
    new, _ = compute(str(demo["store"]), str(query), PROMPT, attributor)
    assert sorted(old) == sorted(new)

    for name in [k for k in new if ".tokens." in k]:  # tokenization is exact
        assert torch.equal(old[name], new[name]), name
    for name in [k for k in new if ".tokens." not in k and k != "scores"]:
        # two float32 evaluations of one forward quantity by other library code (tests/tolerances.py)
        scale = new[name].abs().max()
        assert torch.allclose(old[name], new[name], rtol=0, atol=FLOAT32_FORWARD_RTOL * scale + FLOAT32_FORWARD_ATOL), \
            name
    # Scores go through the output function's gradient at the query: an element of the prediction
    # within rounding of a kink (|x| at 0) may take the other sign, which moves a score by up to
    # 2 / sqrt(N) of the scale (N = 256 latent elements, tests/tolerances.py): 12.5 %. A wrong
    # tokenizer, LoRA scale or missing text-encoder LoRA moves them by far more.
    n = new["sd.latent"].numel()
    scale = new["scores"].abs().max()
    assert (old["scores"] - new["scores"]).abs().max() <= 2 / n ** 0.5 * scale
    assert old["scores"].shape == new["scores"].shape == (len(attributor.store),)
