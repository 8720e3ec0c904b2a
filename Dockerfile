# blockserve image: built with the same scripts as the README and CI.
# (The CUDA build stage and the server entry point arrive with the GPU and
# serving work; this image runs the engine's command line.)
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh
COPY . .
RUN BUILD_DIR=/src/build bash scripts/build.sh -DBS_BUILD_TESTS=OFF -DBS_CPU_ARCH=x86-64-v3

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas0-pthread \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /nonexistent blockserve
COPY --from=build /src/build/blockserve /usr/local/bin/blockserve
USER blockserve
ENTRYPOINT ["/usr/local/bin/blockserve"]
CMD ["--help"]
