# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test sysdeps bench-data clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test,bench]'
	@touch $(STAMP)

install: $(STAMP)

# Debian's chromium renders the HTML report in the report test; fashion-mnist feeds the benchmarks.
sysdeps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the report test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

bench-data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

# The seeds' own question, MLP-Mixer vs ViT, plus two quick baselines (cnn_s, mlp) on the embedded
# sample: each model trained 3 times (seeds 0-2; same data, batch and budget: at most 10 epochs or 45 s
# of training per run), ranked by held-out test accuracy with 95% CIs and paired tests, each model
# also judged against the vit_t4 baseline. 7 min 49 s on 2 idle cores (measured 2026-12-01).
# A re-run skips finished runs; `rm -rf demo-out` starts over.
demo: install
	$(VENV)/bin/imgarena compare sample --models mixer_t4,vit_t4,cnn_s,mlp --seeds 3 \
	    --recipe recommended --epochs 10 --time-budget 45s --baseline vit_t4 --out demo-out

test: install sysdeps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache
