"""ECR for the serving image: scanned on push, immutable tags, KMS-encrypted.

With ``dualtrack:images.build`` the program also builds the image (Triton TRT-LLM
base + the repository's model-repo files, ``infra/images/serving.Dockerfile``) and
pushes it; Serving then runs that image instead of the NGC one. The tag is
``<images.tag>-<digest of what goes into the image>``: the repository's tags are
immutable, so a changed build gets a new tag and an unchanged one the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pulumi
import pulumi_aws as aws
import pulumi_docker as docker

from infra.config import StackSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "images" / "serving.Dockerfile"
KEEP_IMAGES = 20
IMAGE_INPUTS = ("infra/images/serving.Dockerfile", "model_repo", "infra/catalog.py", "infra/engine_build.py")
"""What the Dockerfile copies (and the Dockerfile itself): the content the tag digests."""


def content_tag(base_tag: str, base_image: str, root: Path = ROOT) -> str:
    """``<base_tag>-<12 hex>``: a digest of the base image reference and every file the build copies."""
    digest = hashlib.sha256(base_image.encode())
    for entry in IMAGE_INPUTS:
        path = root / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{base_tag}-{digest.hexdigest()[:12]}"


class Images(pulumi.ComponentResource):
    """The repository and, when enabled, the built image; ``image`` is what Serving should run."""

    repository_url: pulumi.Output[str]
    image: pulumi.Output[str] | None

    def __init__(
        self, name: str, settings: StackSettings, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("dualtrack:cloud:Images", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.images
        repo = aws.ecr.Repository(
            f"{name}-serving",
            name=f"{settings.environment}/{cfg.repository_name}",
            image_tag_mutability="IMMUTABLE",
            image_scanning_configuration=aws.ecr.RepositoryImageScanningConfigurationArgs(scan_on_push=True),
            encryption_configurations=[aws.ecr.RepositoryEncryptionConfigurationArgs(encryption_type="KMS")],
            opts=child,
        )
        aws.ecr.LifecyclePolicy(
            f"{name}-serving",
            repository=repo.name,
            policy=json.dumps(
                {
                    "rules": [
                        {
                            "rulePriority": 1,
                            "description": f"keep the last {KEEP_IMAGES} images",
                            "selection": {
                                "tagStatus": "any",
                                "countType": "imageCountMoreThan",
                                "countNumber": KEEP_IMAGES,
                            },
                            "action": {"type": "expire"},
                        }
                    ]
                }
            ),
            opts=child,
        )
        self.repository_url = repo.repository_url
        self.image = None
        if cfg.build:
            token = aws.ecr.get_authorization_token_output(registry_id=repo.registry_id)
            image = docker.Image(
                f"{name}-serving-image",
                image_name=pulumi.Output.concat(
                    repo.repository_url, ":", content_tag(cfg.tag, settings.serving.image)
                ),
                build=docker.DockerBuildArgs(
                    context=str(ROOT),
                    dockerfile=str(DOCKERFILE),
                    platform="linux/amd64",
                    args={"TRITON_IMAGE": settings.serving.image},
                ),
                registry=docker.RegistryArgs(
                    server=repo.repository_url,
                    username=token.user_name,
                    password=pulumi.Output.secret(token.password),
                ),
                opts=child,
            )
            self.image = image.repo_digest
        self.register_outputs({"repositoryUrl": repo.repository_url})
