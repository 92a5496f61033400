# Two entry points (README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= build/demo

.PHONY: setup demo test clean

setup: $(STAMP)

# torch 2.13.0 (CPU) first and exactly; then the package. aimet-onnx pulls torchvision
# through onnx2torch, and that torchvision cannot import beside the CPU torch (it breaks
# anything that imports it), while QuantSim does not need it: remove it.
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m pip uninstall --quiet --yes torchvision || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neodragon-npu build denoiser --config tiny --stage 2 --target sm8750 --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build .pytest_cache
