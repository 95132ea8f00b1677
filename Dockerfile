# byol-runner's task and runner image. The base brings Python, PyTorch and torchvision for CUDA; the
# project is installed on top without touching them (torch>=2.2 is already satisfied).
#   docker build -t byol-runner .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime -t byol-runner .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

WORKDIR /opt/byol-runner
COPY pyproject.toml README.md ./
COPY runner ./runner
RUN python -m pip install ".[ray]" && byol-runner --version

COPY docker/entrypoint.sh /usr/local/bin/byol-runner-entrypoint
COPY experiments /work/experiments
RUN chmod 0755 /usr/local/bin/byol-runner-entrypoint \
    && (getent group 1000 >/dev/null || groupadd --gid 1000 runner) \
    && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash runner) \
    && mkdir -p /results /data /work/results && chown -R 1000:1000 /results /work

# a non-root default; the docker executor runs each task as the invoking user (uid:gid) instead.
# `docker run byol-runner run experiments/ci.yaml` works from /work (results in /work/results, or
# mount a folder at /results and pass --results /results).
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/byol-runner-entrypoint"]
CMD ["--help"]
