# The serving image: the pinned Triton TRT-LLM release plus this repository's model
# repository templates/profiles and the engine-build helper. Built and pushed by the
# `images` component when `dualtrack:images.build` is true (context: repository root).
ARG TRITON_IMAGE
FROM ${TRITON_IMAGE}
COPY model_repo/ /opt/dualtrack/model_repo/
COPY infra/catalog.py infra/engine_build.py /opt/dualtrack/infra/
USER 1000
