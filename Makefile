# The project's verbs. Everything runs from a local virtualenv that `make install` creates.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench-dp bench-new-site bench-masking bench-flower flower-demo install demo test test-fast bench bench-merge proto image image-site image-test clean

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

# The aggregator's image (deploy/Dockerfile) with docker or podman, whichever reaches an engine
# (deploy/build-image.sh; podman reads deploy/containers.conf, `PODMAN_CONF=` for the machine's own).
# Without a registry, the base image is built from Debian's packages (deploy/base-image.sh).
IMAGE ?= secagg-aggregator
SITE_IMAGE ?= secagg-site
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PODMAN_CONF ?= $(CURDIR)/deploy/containers.conf

image:
	PODMAN_CONF='$(PODMAN_CONF)' deploy/build-image.sh $(IMAGE) $(IMAGE_TAG)

# The compose demo's site image: secagg[client] (TenSEAL), same Dockerfile, target `site`.
image-site:
	PODMAN_CONF='$(PODMAN_CONF)' deploy/build-image.sh --target site $(SITE_IMAGE) $(IMAGE_TAG)

# Build both images, run the aggregator's with a volume and TLS, a real round from the host through it
# (SIGKILL + restart mid-round), then deploy/docker-compose.yml's round (deploy/image_test.py). Installs
# podman, runc and docker-compose when run as root on Debian without an engine. Not part of `make test`.
image-test: install
	IMAGE=$(IMAGE) SITE_IMAGE=$(SITE_IMAGE) PODMAN_CONF='$(PODMAN_CONF)' $(PY) deploy/image_test.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
