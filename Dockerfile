# blockserve image: the inference server (gRPC on 8001, HTTP/REST on 8000, metrics on 8002).
#
#   docker build -t blockserve .                            CUDA 13.0 + CPU fallback
#   docker build -t blockserve:cpu --build-arg WITH_CUDA=0 .  CPU only (no NVIDIA packages)
#   docker build --build-arg BS_CPU_ARCH= .                  portable CPU code (no AVX2 needed)
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 blockserve  built-in models
#   docker run --gpus all -p 8001:8001 -v /models:/models:ro blockserve --model-repository /models
#
# Both stages are Debian 12, the distribution CI (.ci/run) builds and tests
# on, so the image is built by the same scripts and packages as the README and
# CI: scripts/install-deps.sh and scripts/build.sh. CUDA 13.0 comes from
# NVIDIA's apt repository for Debian 12 (scripts/install-cuda.sh): nvcc and
# cuBLAS headers in the build stage, only the cuBLAS and CUDA runtime
# libraries in the runtime stage. NVIDIA publishes no Debian nvidia/cuda
# images; deploy/README.md says why its Ubuntu ones are not used here.

ARG DEBIAN_IMAGE=debian:12
ARG DEBIAN_RUNTIME_IMAGE=debian:12-slim

# ---------------------------------------------------------------- build stage
FROM ${DEBIAN_IMAGE} AS build
ARG WITH_CUDA=1
ARG CUDA_VERSION=13.0
# -march of the CPU kernels. "default": CMake's (x86-64-v3, i.e. AVX2 + FMA, on
# x86-64; portable elsewhere); --build-arg BS_CPU_ARCH= for portable code.
ARG BS_CPU_ARCH=default
ENV PATH=/usr/local/cuda/bin:/usr/local/cuda-${CUDA_VERSION}/bin:${PATH}
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-cuda.sh scripts/
RUN bash scripts/install-deps.sh build \
    && if [ "$WITH_CUDA" = 1 ]; then bash scripts/install-cuda.sh build; fi
COPY . .
# The build finds nvcc (and builds libbs_cuda.so) when install-cuda.sh put it there.
RUN arch=""; if [ "$BS_CPU_ARCH" != default ]; then arch="-DBS_CPU_ARCH=$BS_CPU_ARCH"; fi \
    && BUILD_DIR=/src/build bash scripts/build.sh -DBS_BUILD_TESTS=OFF ${arch:+"$arch"} \
    && DESTDIR=/stage cmake --install /src/build --prefix /usr/local --strip \
    && bash scripts/runtime-deps.sh /stage/usr/local > /stage/runtime-packages.txt \
    && cat /stage/runtime-packages.txt

# -------------------------------------------------------------- runtime stage
FROM ${DEBIAN_RUNTIME_IMAGE} AS runtime
ARG WITH_CUDA=1
ARG CUDA_VERSION=13.0
COPY scripts/install-deps.sh scripts/install-cuda.sh /tmp/scripts/
COPY --from=build /stage/runtime-packages.txt /tmp/runtime-packages.txt
RUN export BS_APT_CLEAN=1 \
    && if [ "$WITH_CUDA" = 1 ]; then bash /tmp/scripts/install-cuda.sh runtime; fi \
    && bash /tmp/scripts/install-deps.sh runtime $(cat /tmp/runtime-packages.txt) \
    && rm -rf /tmp/scripts /tmp/runtime-packages.txt \
    && groupadd --system --gid 10001 blockserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin blockserve
COPY --from=build /stage/usr/local/ /usr/local/
# The CUDA backend is dlopen'ed from here; without a usable GPU the server
# falls back to the CPU (--device auto).
ENV LD_LIBRARY_PATH=/usr/local/lib/blockserve
# What the NVIDIA Container Toolkit reads (--gpus all, the Kubernetes device
# plugin): expose every GPU and the compute libraries of the driver.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# gRPC (KServe v2 / Triton protocol, grpc.health.v1) and Prometheus metrics.
EXPOSE 8000 8001 8002
# Ready (models loaded, serving) or not; the server's default gRPC port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/blockserve-cli", "health", "-u", "127.0.0.1:8001"]
ENTRYPOINT ["/usr/local/bin/blockserve"]
# Arguments after the image name replace these: e.g. --model-repository /models.
CMD ["serve"]
