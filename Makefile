# Two commands matter: `make serve` starts the local stack, `make test` runs the whole suite.
# Everything they need is installed on first use into ignored folders (.venv, .triton, checkpoints).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TINY_CSM := checkpoints/csm-tiny
TINY_WATERMARK := checkpoints/silentcipher-tiny

# Debian's Chromium for the demo page's browser test (tests/test_demo_page.py); Playwright drives it and never
# downloads a browser build. Installed only when missing.
CHROMIUM := /usr/bin/chromium

.PHONY: setup serve test lint bench clean ffprobe

setup: $(VENV)/.installed .triton/.installed $(TINY_CSM)/.complete $(TINY_WATERMARK)/.complete ffprobe

# The tests check encoded audio with an independent decoder: Debian's ffmpeg (ffprobe, ffmpeg). No-op when present.
ffprobe:
	@command -v ffprobe >/dev/null && command -v ffmpeg >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg; }

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[server,proxy,dev]"
	# silentcipher 1.0.5 declares torch<=2.0.0; its real imports come with the server extra.
	$(PIP) install -c constraints.txt --no-deps silentcipher
	# pipecat-ai 1.14.0 declares protobuf>=5.29.6 (tritonclient 2.51 needs <5); its real imports come with dev.
	$(PIP) install -c constraints.txt --no-deps pipecat-ai
	touch $@

.triton/.installed: scripts/install_triton.py constraints.txt $(VENV)/.installed
	$(PY) scripts/install_triton.py --dest .triton
	touch $@

$(TINY_CSM)/.complete: scripts/make_tiny_checkpoint.py $(VENV)/.installed
	$(PY) scripts/make_tiny_checkpoint.py $(TINY_CSM)

$(TINY_WATERMARK)/.complete: scripts/make_tiny_watermark_checkpoint.py $(VENV)/.installed
	$(PY) scripts/make_tiny_watermark_checkpoint.py $(TINY_WATERMARK)

$(CHROMIUM):
	command -v apt-get >/dev/null || { echo "install Chromium as $(CHROMIUM) (Debian: apt-get install chromium)" >&2; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

serve: setup
	$(PY) scripts/serve.py

test: setup $(CHROMIUM) lint
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) scripts/bench_engine.py

clean:
	rm -rf .triton checkpoints build .pytest_cache
