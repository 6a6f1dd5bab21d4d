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

# Six architectures on the embedded sample, same data, batch and budget (at most 10 epochs or 50 s of
# training each), each with its family's recommended optimiser settings: 4 min 20 s on 2 idle cores.
# A re-run skips finished models; `rm -rf demo-out` starts over.
demo: install
	$(VENV)/bin/imgarena compare sample --models mixer_t4,vit_t4,convnext_atto_cifar,resnet18_cifar,cnn_s,mlp \
	    --recipe recommended --epochs 10 --time-budget 50s --baseline vit_t4 --out demo-out

test: install sysdeps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache
