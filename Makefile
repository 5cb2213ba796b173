# das-sd: `make demo` runs the demo, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.das-sd-installed

.PHONY: venv demo test demo-lora build-base build-base-sdxl demo-lora-sdxl screenshots screenshots-invokeai screenshots-comfyui screenshots-webui cli-docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first: this pin takes the local CPU wheel; left to a dependency, pip would pull a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[app,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/das-sd demo

# The numerical tests run again on one thread: other reduction orders, same tolerances (tests/tolerances.py)
test: venv
	$(BIN)/python -m pytest
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m numerics

# Maintainers: regenerate the shipped assets with the project's own recipes.
build-base: venv
	$(BIN)/das-sd build-base --out das_sd/assets/tiny-sd

demo-lora: venv
	$(BIN)/das-sd make-demo-data build/demo-data --overwrite
	$(BIN)/das-sd train-lora --data build/demo-data --out das_sd/assets/demo-lora

# The README's screenshots (docs/app-demo.png, docs/app-inspect.png), rewritten from the current app
# by its newcomer browser test (needs /usr/bin/chromium; docs/app.md)
screenshots: venv
	DAS_SD_SCREENSHOTS=docs DAS_SD_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q tests/test_app.py -k newcomer

# docs/host-invokeai.png: the DAS Attribution node's result in a real invokeai-web 6.14.2 (the venv
# .ci/run builds in build/host-invokeai-6.14.2; needs /usr/bin/chromium; benchmarks/screenshot_invokeai.py)
screenshots-invokeai: venv
	DAS_SD_INVOKEAI_PYTHON=$(CURDIR)/build/host-invokeai-6.14.2/bin/python HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/screenshot_invokeai.py

# docs/host-comfyui.png: the DAS nodes and their result in a real ComfyUI web UI (main.py --cpu); a
# ComfyUI checkout and a venv with its requirements and das-sd, set up as benchmarks/screenshot_comfyui.py
# says (neither is in this repository); needs /usr/bin/chromium
COMFYUI ?= $(CURDIR)/build/comfyui
COMFYUI_PYTHON ?= $(CURDIR)/build/comfyui-venv/bin/python
screenshots-comfyui: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/screenshot_comfyui.py --comfyui $(COMFYUI) --python $(COMFYUI_PYTHON)

# docs/host-webui.png, docs/host-webui-txt2img.png: the extension's tab and accordion in a real Stable
# Diffusion WebUI Forge; a Forge checkout and its venv with das-sd, set up as benchmarks/screenshot_webui.py
# says (neither is in this repository); needs /usr/bin/chromium
FORGE ?= $(CURDIR)/build/forge
FORGE_PYTHON ?= $(CURDIR)/build/forge-venv/bin/python
screenshots-webui: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/screenshot_webui.py --webui $(FORGE) --python $(FORGE_PYTHON)

# The tiny SDXL reuses the tiny SD's VAE and tokenizer (das_sd/assets/tiny-sd)
build-base-sdxl: venv
	$(BIN)/das-sd build-base --family sdxl --out das_sd/assets/tiny-sdxl

demo-lora-sdxl: venv
	$(BIN)/das-sd make-demo-data build/demo-data --overwrite
	$(BIN)/das-sd train-lora --base das_sd/assets/tiny-sdxl --data build/demo-data --out das_sd/assets/demo-lora-sdxl

# docs/cli.md, the command reference, rendered from the argparse parsers (tests/test_cli_reference.py
# fails when it is out of date)
cli-docs: venv
	$(BIN)/python -m das_sd.cli_reference --out docs/cli.md

clean:
	rm -rf $(VENV) build .pytest_cache
