# Two commands for a fresh machine:  make demo  (set up, run the main job)  and  make test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
S2D    := $(VENV)/bin/slim2deploy
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO   ?= build/demo

.PHONY: setup data test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# type stubs only: the real tensorrt wheel downloads from NVIDIA's index, so skip its dependencies
	$(PY) -m pip install -q --no-deps tensorrt-stubs
	touch $@

data:
	@test -f $(FMNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# mypy on the TensorRT code runs inside the suite (tests/test_engine.py): it repairs two lines of
# tensorrt-stubs that do not parse and points MYPYPATH at the repaired copy.
lint: setup
	$(PY) -m ruff check slim2deploy tests bench
	$(PY) -m mypy slim2deploy

# two pytest-xdist workers, one torch thread each (tests/conftest.py), whole files per worker (module fixtures
# built once): 4:50 on this 2-core machine, against 7:43 for one process with two threads
test: setup data lint
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: setup data
	$(S2D) inspect demo/vgg11-w0.25-sparse.pt --plot $(DEMO)/gammas.png
	$(S2D) build --model demo/vgg11-w0.25-sparse.pt --ratio 0.5 --out $(DEMO) \
		--precision fp32,fp16,int8 --calib calib/fashion-mnist-512.npz

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
