"""One layout for a served model version: in the model bucket, in the node cache, in the pod.

Triton loads every directory under ``--model-repository`` as a model and, with its default
``--exit-on-error``, exits when one is not. So the repository holds models only and the
large artifacts live beside it::

    s3://<bucket>/<profile>/<version>/      <- the upload step and the engine-build Job write this
        repository/     the Triton model repository (`dualtrack model-repo render`): models only
        tokenizer/      the served model's Hugging Face tokenizer files
        engines/        engine path: TensorRT-LLM engines (written by the engine-build Job)
        checkpoint/     PyTorch path: the Hugging Face checkpoint the LLM API loads
    s3://<bucket>/checkpoints/<model_id>/   engine path: the checkpoint the engine build reads

The pod's init container copies ``<profile>/<version>/`` into the node's model cache (local
NVMe, :data:`NODE_CACHE`), which the Triton container mounts read-only at :data:`POD_ROOT`.
The rendered configs name paths under that root, so bucket, cache and configs agree by
construction. Every wait is sized from the bytes a step moves and a stated throughput
(:func:`transfer_seconds`), never guessed.
"""

from __future__ import annotations

import math
import shlex

REPOSITORY = "repository"
TOKENIZER = "tokenizer"
ENGINES = "engines"
CHECKPOINT = "checkpoint"
ARTIFACT_DIRS = (TOKENIZER, ENGINES, CHECKPOINT)
"""What lives beside the repository, never inside it."""

POD_ROOT = "/models"
"""Where the Triton container sees one version's layout (read-only)."""
SYNC_ROOT = "/model-cache"
"""Where the sync init container sees the node cache (all profiles and versions)."""
NODE_CACHE = "/mnt/k8s-disks/0/dualtrack-models"
"""The cache on the GPU node: on the instance-store NVMe that nodeadm assembles as RAID0."""
NODE_CACHE_READY = ".dualtrack-cache"
"""Written by the node's boot script once the cache sits on the NVMe volume with our owner."""
NODE_CACHE_LABEL = ("dualtrack.io/model-cache", "nvme")
"""Set by the kubelet of nodes booted with the cache (the launch template): pods that mount it
require it, so none lands on a node of an older template while node groups roll."""


def version_prefix(profile: str, version: str) -> str:
    """``<profile>/<version>/``: one version's layout in the bucket and in the node cache."""
    return f"{profile}/{version}/"


def build_checkpoint_prefix(model_id: str) -> str:
    """Where the engine build reads the Hugging Face checkpoint of ``model_id``."""
    return f"checkpoints/{model_id}/"


def repository_path(root: str = POD_ROOT) -> str:
    return f"{root.rstrip('/')}/{REPOSITORY}"


def transfer_seconds(gib: float, mib_per_s: float, *, margin: float = 1.5) -> int:
    """How long moving ``gib`` at ``mib_per_s`` may take, with a margin for a slow start."""
    return math.ceil(gib * 1024 / mib_per_s * margin)


LOCK_STALE_S = 60
"""A sync lock whose heartbeat is older than this belongs to a pod that died: taken over."""


def sync_script(source: str, profile: str, version: str, *, concurrency: int = 32) -> str:
    """The init container's shell script: copy one version into the node cache, incrementally.

    ``aws s3 sync`` compares sizes and timestamps, so a pod restarted on the same node (or a
    second pod of the version) downloads nothing new; ``--delete`` drops files the bucket no
    longer has. Downloads land in temporary files renamed into place, so a sync that dies
    half-way leaves no partial file behind, and the next start resumes.

    Pods of a node share the cache, and two ``--delete`` syncs of one version remove each
    other's temporary files: one sync per version at a time. The lock is a directory beside
    the version's (``mkdir`` is atomic), kept fresh by a heartbeat and holding its owner's
    token. A lock whose heartbeat stopped (a killed pod) is taken over by one waiter only --
    the one that wins a second ``mkdir`` and still finds it stale -- and a holder removes the
    lock on exit only while it is still its own. The cache must be the node's NVMe volume (a
    cache on the root disk would fill it), so the script refuses one without the boot
    script's marker.
    """
    target = f"{SYNC_ROOT}/{version_prefix(profile, version)}"
    lock = shlex.quote(target.rstrip("/") + ".lock")
    takeover = shlex.quote(target.rstrip("/") + ".takeover")
    marker = f"{SYNC_ROOT}/{NODE_CACHE_READY}"

    def age(path: str) -> str:
        return f"$(( $(date +%s) - $(stat -c %Y {path} 2>/dev/null || date +%s) ))"

    return (
        "\n".join(
            [
                "set -eu",
                f"if [ ! -f {marker} ]; then",
                f"  echo 'model cache {NODE_CACHE} is not prepared on this node (no {NODE_CACHE_READY}): "
                "the GPU launch template sets it up on the instance-store NVMe' >&2",
                "  exit 1",
                "fi",
                f"mkdir -p {shlex.quote(SYNC_ROOT + '/' + profile)}",
                'token="${HOSTNAME:-pod}.$$.$(date +%s)"',
                f"until mkdir {lock} 2>/dev/null; do",
                f'  if [ "{age(lock)}" -gt {LOCK_STALE_S} ] && mkdir {takeover} 2>/dev/null; then',
                f'    if [ "{age(lock)}" -gt {LOCK_STALE_S} ]; then',
                '      echo "taking over a sync lock its pod left" >&2',
                f"      rm -rf {lock}",
                "    fi",
                f"    rmdir {takeover}",
                f'  elif [ "{age(takeover)}" -gt {LOCK_STALE_S} ]; then',
                f"    rmdir {takeover} 2>/dev/null || true",
                "  else",
                "    sleep 1",
                "  fi",
                "done",
                f'echo "$token" > {lock}/owner',
                f"( while sleep 10; do touch {lock}; done ) >/dev/null 2>&1 &",
                "heartbeat=$!",
                f'trap \'kill $heartbeat 2>/dev/null; [ "$(cat {lock}/owner 2>/dev/null)" = "$token" ] '
                f"&& rm -rf {lock}' EXIT",
                f"aws configure set default.s3.max_concurrent_requests {concurrency}",
                f"mkdir -p {shlex.quote(target)}",
                "aws s3 sync --no-progress --only-show-errors --delete "
                f"{shlex.quote(source)} {shlex.quote(target)}",
                f"test -d {shlex.quote(target + REPOSITORY)} || {{ echo 'no {REPOSITORY}/ under "
                f"{source}: upload the rendered repository first' >&2; exit 1; }}",
            ]
        )
        + "\n"
    )
