# The project's verbs. Everything runs from a local virtualenv that `make install` creates.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench-dp bench-new-site bench-masking bench-flower flower-demo install demo test test-fast bench bench-merge proto image image-rootfs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: install
	$(PY) clients/demo.py

flower-demo: install
	$(PY) clients/flower/run.py --simulation --supernodes 3 --rounds 2

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/wire.py

bench-merge: install
	$(PY) benchmarks/merge_quality.py --dp 1,4,8

bench-dp: install
	$(PY) benchmarks/merge_dp.py

bench-new-site: install
	$(PY) benchmarks/new_site.py

bench-masking: install
	$(PY) benchmarks/masking.py

bench-flower: install
	$(PY) benchmarks/flower_compare.py

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=secagg/transport --grpc_python_out=secagg/transport \
		--pyi_out=secagg/transport proto/secagg.proto
	sed -i 's/^import secagg_pb2 as/from secagg.transport import secagg_pb2 as/' secagg/transport/secagg_pb2_grpc.py

# The aggregator's image (deploy/Dockerfile) with docker or podman, whichever reaches an engine.
IMAGE ?= secagg-aggregator
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	@engine=""; \
	for e in docker podman; do \
		if command -v $$e >/dev/null 2>&1 && timeout 20 $$e info >/dev/null 2>&1; then engine=$$e; break; fi; \
	done; \
	if [ -z "$$engine" ]; then \
		echo "make image: no container engine available: neither docker nor podman can reach one" >&2; \
		echo "  ('docker info' fails: a docker client without a daemon cannot build)." >&2; \
		echo "  Without an engine, build and check the same root filesystem with debootstrap + chroot:" >&2; \
		echo "  sudo make image-rootfs   (deploy/verify_rootfs.sh; deploy/README.md says what it verifies)" >&2; \
		exit 1; \
	fi; \
	set -x; $$engine build -f deploy/Dockerfile -t $(IMAGE):$(IMAGE_TAG) -t $(IMAGE):latest .

# deploy/Dockerfile executed in a debootstrap chroot, then a real round against it; needs root and
# the network to Debian's mirrors and PyPI. Not part of `make test`.
image-rootfs: install
	deploy/verify_rootfs.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
