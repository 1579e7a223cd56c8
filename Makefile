# The README's commands. Everything the project needs is installed here, into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-all demo bench bench-quick fuzz vectors-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

test: venv  ## the CI suite: everything except the long real-model conversions
	$(PY) -m pytest -q -m "not slow"

test-all: venv  ## also the slow real-model tests (tens of minutes on 2 cores)
	$(PY) -m pytest -q

demo: venv  ## convert MiniLM to .aqm, run it, print size and fidelity
	HF_HUB_OFFLINE=1 $(PY) -m bench.demo

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,dev,bench]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps nncodec==2.1.3 ddddocr==1.6.1
	@# silero-vad is measured on espeak-ng speech; without it the bench falls back to synthetic audio
	@command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -q espeak-ng >/dev/null 2>&1) \
		|| echo "warning: espeak-ng is not installed (apt-get install espeak-ng): silero-vad rows use synthetic audio"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## full benchmark: bench/results/*.json, RESULTS.md, plots
	HF_HUB_OFFLINE=1 $(PY) -m bench.run

bench-quick: $(BENCH_STAMP)  ## fewer sentences and settings
	HF_HUB_OFFLINE=1 $(PY) -m bench.run --quick

fuzz: venv  ## long structure-aware fuzzing run of the reader and the embedded graph (1,000,000 inputs, all CPUs)
	$(PY) -m fuzz.fuzz_reader --examples 1000000

vectors-check: venv  ## the writer still produces the frozen vectors byte for byte
	$(PY) spec/make_vectors.py --check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
