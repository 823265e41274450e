# The project's verbs. Everything runs from a local virtualenv that `make install` creates.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-merge proto image clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: install
	$(PY) clients/demo.py

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/wire.py

bench-merge: install
	$(PY) benchmarks/merge_quality.py

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=secagg/transport --grpc_python_out=secagg/transport \
		--pyi_out=secagg/transport proto/secagg.proto
	sed -i 's/^import secagg_pb2 as/from secagg.transport import secagg_pb2 as/' secagg/transport/secagg_pb2_grpc.py

image:
	@echo "The container image arrives with the deployment issue; see deploy/README.md." && exit 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
