# Two entry points (README): `make demo` (the tiny system's bundle, then a video from it) and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= build/demo

.PHONY: setup demo test clean jemalloc

setup: $(STAMP) jemalloc

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

# The QNN compiler in the build's compile workers runs about a fifth faster on jemalloc
# (graphs/qnn.py: compile_allocator). Debian's package, unpacked into the venv: no root and
# nothing installed system-wide. Where apt is missing or the download fails, the build
# uses glibc's malloc and says so.
jemalloc: $(STAMP)
	@if ls $(VENV)/jemalloc/usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then exit 0; fi; \
	tmp=$$(mktemp -d) && \
	if (cd $$tmp && apt-get download libjemalloc2 >/dev/null 2>&1) && \
	   dpkg-deb -x $$tmp/libjemalloc2_*.deb $(VENV)/jemalloc; then \
	  echo "jemalloc unpacked into $(VENV)/jemalloc for the QNN compile workers"; \
	else \
	  echo "note: could not fetch Debian's libjemalloc2; the build will compile with glibc's malloc (slower)"; \
	fi; \
	rm -rf $$tmp

demo: setup
	$(VENV)/bin/neodragon-npu build neodragon --config tiny --target sm8750 -o $(DEMO_OUT)/bundle
	$(VENV)/bin/neodragon-npu generate "a red fox trotting through fresh snow" --bundle $(DEMO_OUT)/bundle \
	  -o $(DEMO_OUT)/fox.mp4 --compare-float

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build .pytest_cache
