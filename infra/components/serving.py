"""Triton serving DeepSeek on TensorRT-LLM: model store, Deployments, Service, HPA, PDB.

Each served version lives in a private, versioned, KMS-encrypted S3 bucket under
``<profile>/<version>/`` in the layout of :mod:`infra.model_layout` (the Triton
repository, with the tokenizer and the engines or checkpoint beside it). An init
container syncs that prefix into the node's model cache on the instance-store NVMe
(incremental: a restarted pod downloads nothing new) with an IRSA role that can read
only this bucket; Triton mounts the cache read-only and starts with GPUs = tensor x
pipeline parallel size. Every wait is sized from the bytes moved and
``serving.modelSyncMiBps``, plus the profile's first load (about an hour for 671B).
Readiness is Triton's ``/v2/health/ready``. Scaling follows requests waiting inside
the TensorRT-LLM executor (a Prometheus-adapter metric), not CPU, which says nothing
about a GPU server's saturation.
"""

from __future__ import annotations

import json
import math

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import model_layout as layout
from infra.catalog import GPU_INSTANCES, ModelProfile, model_profiles
from infra.components import k8s as kube
from infra.components.cluster import POOL_LABEL, Cluster
from infra.config import StackSettings
from infra.engine_build import engine_build_script

APP = "triton"
PORTS = {"http": 8000, "grpc": 8001, "http-metrics": 8002}
WAITING_METRIC = "triton_requests_waiting"
"""Per-pod metric the HPA scales on, served by prometheus-adapter from the recording rule
``triton:requests_waiting`` (observability.py): requests accepted but waiting inside the
TensorRT-LLM executor. Triton's own queue metrics stay flat for a decoupled model, whose
requests leave Triton's queue at once."""
ENGINE_BUILD_ALLOWANCE_S = 4 * 3600
"""Compiling engines (convert_checkpoint + trtllm-build), on top of the transfers around it."""
PROBE_PERIOD_S = 10


class Serving(pulumi.ComponentResource):
    """Everything that runs the model; ``service_host`` is the in-mesh address."""

    namespace: str
    namespace_resource: k8s.core.v1.Namespace
    bucket: pulumi.Output[str]
    service_host: str

    def __init__(
        self,
        name: str,
        settings: StackSettings,
        cluster: Cluster,
        image: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``image`` replaces the NGC image when the stack builds its own (images component)."""
        super().__init__("dualtrack:cloud:Serving", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.serving
        self.namespace = cfg.namespace
        self.service_host = f"{APP}.{cfg.namespace}.svc.cluster.local"
        self._settings = settings
        self._image = image or cfg.image

        ns = kube.namespace(cfg.namespace, f"{name}-ns", istio=True, opts=child)
        self.namespace_resource = ns
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns])

        key = aws.kms.Key(
            f"{name}-models",
            description=f"{settings.name}: model repository bucket",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            opts=child,
        )
        bucket = aws.s3.Bucket(f"{name}-models", bucket_prefix=f"{settings.name}-models-", opts=child)
        aws.s3.BucketPublicAccessBlock(
            f"{name}-models",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        aws.s3.BucketOwnershipControls(
            f"{name}-models",
            bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=child,
        )
        aws.s3.BucketVersioning(
            f"{name}-models",
            bucket=bucket.id,
            versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status="Enabled"),
            opts=child,
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-models",
            bucket=bucket.id,
            rules=[
                aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="aws:kms",
                        kms_master_key_id=key.arn,
                    ),
                    bucket_key_enabled=True,
                )
            ],
            opts=child,
        )
        aws.s3.BucketPolicy(
            f"{name}-models-tls",
            bucket=bucket.id,
            policy=bucket.arn.apply(_deny_insecure_transport),
            opts=child,
        )
        self.bucket = bucket.bucket

        reader = cluster.service_account_role(
            "triton-models",
            cfg.namespace,
            APP,
            policy=pulumi.Output.all(bucket.arn, key.arn).apply(
                lambda a: _bucket_policy(a[0], a[1], write=False)
            ),
        )
        self._service_account(f"{name}-sa", APP, reader, in_ns)

        # The primary's replica count belongs to the HPA (None = leave spec.replicas unset).
        versions = [(cfg.model_version, None, cfg.model)]
        if cfg.canary:
            versions.append(
                (cfg.canary.version, cfg.canary.replicas, model_profiles()[cfg.canary.profile or cfg.profile])
            )
        if any(profile.path == "engine" for _, _, profile in versions):
            builder = cluster.service_account_role(
                "engine-builder",
                cfg.namespace,
                "engine-builder",
                policy=pulumi.Output.all(bucket.arn, key.arn).apply(
                    lambda a: _bucket_policy(a[0], a[1], write=True)
                ),
            )
            self._service_account(f"{name}-builder-sa", "engine-builder", builder, in_ns)
        deployments = []
        for version, replicas, profile in versions:
            waits_for: list[pulumi.Resource] = [ns]
            if profile.path == "engine":
                # Every engine-path version serves its own engines: Triton starts once they exist.
                waits_for.append(self._engine_build_job(name, profile, version, in_ns))
            deployments.append(self._deployment(f"{name}-{version}", version, replicas, profile, waits_for))

        k8s.core.v1.Service(
            f"{name}-svc",
            metadata={"name": APP, "namespace": cfg.namespace, "labels": kube.labels(APP)},
            spec={
                "type": "ClusterIP",
                "selector": {"app": APP},
                "ports": [
                    {
                        "name": port_name,
                        "port": port,
                        "targetPort": port_name,
                        "appProtocol": "grpc" if port_name == "grpc" else "http",
                    }
                    for port_name, port in PORTS.items()
                ],
            },
            opts=in_ns,
        )
        # Enforced by the VPC CNI's network policy agent (enabled on the vpc-cni add-on).
        kube.network_policy(f"{name}-default-deny", "default-deny-ingress", cfg.namespace, {}, [], in_ns)
        kube.network_policy(
            f"{name}-netpol",
            APP,
            cfg.namespace,
            {"app": APP},
            [
                kube.from_namespace("istio-ingress", PORTS["http"], PORTS["grpc"]),
                kube.from_namespace("monitoring", PORTS["http-metrics"]),
            ],
            in_ns,
        )
        kube.network_policy(
            f"{name}-build-netpol", "engine-build", cfg.namespace, {"app": "engine-build"}, [], in_ns
        )
        k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb",
            metadata={"name": APP, "namespace": cfg.namespace, "labels": kube.labels(APP)},
            spec={"maxUnavailable": 1, "selector": {"matchLabels": {"app": APP}}},
            opts=in_ns,
        )
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa",
            metadata={
                "name": f"{APP}-{cfg.model_version}",
                "namespace": cfg.namespace,
                "labels": kube.labels(APP),
            },
            spec={
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": f"{APP}-{cfg.model_version}",
                },
                "minReplicas": cfg.replicas,
                "maxReplicas": cfg.max_replicas,
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": WAITING_METRIC},
                            "target": {
                                "type": "AverageValue",
                                "averageValue": str(cfg.waiting_requests_target),
                            },
                        },
                    }
                ],
                # A GPU replica takes minutes (or an hour) to load: add quickly, remove reluctantly.
                "behavior": {
                    "scaleUp": {
                        "stabilizationWindowSeconds": 60,
                        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                    },
                    "scaleDown": {
                        "stabilizationWindowSeconds": 1800,
                        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 900}],
                    },
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[deployments[0]]),
        )
        self.register_outputs({"bucket": bucket.bucket})

    def _service_account(
        self, resource: str, sa: str, role: aws.iam.Role, opts: pulumi.ResourceOptions
    ) -> None:
        k8s.core.v1.ServiceAccount(
            resource,
            metadata={
                "name": sa,
                "namespace": self.namespace,
                "labels": kube.labels(sa),
                "annotations": {"eks.amazonaws.com/role-arn": role.arn},
            },
            automount_service_account_token=False,
            opts=opts,
        )

    def _gpu_pod_placement(self) -> dict:
        node = self._settings.gpu_nodes.instance_type
        return {
            "tolerations": [kube.GPU_TOLERATION],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": POOL_LABEL, "operator": "In", "values": ["gpu"]},
                                    # booted with the NVMe model cache (not a node of an older template)
                                    {
                                        "key": layout.NODE_CACHE_LABEL[0],
                                        "operator": "In",
                                        "values": [layout.NODE_CACHE_LABEL[1]],
                                    },
                                    {
                                        "key": "node.kubernetes.io/instance-type",
                                        "operator": "In",
                                        "values": [node],
                                    },
                                ]
                            }
                        ]
                    }
                },
            },
        }

    def _pod_resources(self, gpus: int) -> dict:
        """CPU and memory in proportion to the node share the GPUs take (90 %: room for daemons)."""
        node = GPU_INSTANCES[self._settings.gpu_nodes.instance_type]
        share = gpus / node.gpus
        cpu = max(1, math.floor(node.vcpus * share * 0.9))
        memory = max(4, math.floor(node.memory_gib * share * 0.9))
        return kube.resources(str(cpu), f"{memory}Gi", extra={"nvidia.com/gpu": str(gpus)})

    def _deployment(
        self,
        resource: str,
        version: str,
        replicas: int | None,
        profile: ModelProfile,
        depends_on: list[pulumi.Resource],
    ) -> k8s.apps.v1.Deployment:
        cfg = self._settings.serving
        gpu = GPU_INSTANCES[self._settings.gpu_nodes.instance_type].gpu
        tp = cfg.tensor_parallel or profile.tensor_parallel_on(gpu)
        gpus = tp * profile.pipeline_parallel
        pod_labels = {"app": APP, "version": version, "model": profile.served_name}
        prefix = layout.version_prefix(profile.name, version)
        script = self.bucket.apply(
            lambda bucket: layout.sync_script(f"s3://{bucket}/{prefix}", profile.name, version)
        )
        # UID 10001 has no home and / is read-only: caches (JIT, tokenizers) go to /tmp.
        env = [{"name": "HOME", "value": "/tmp"}]
        if profile.path == "engine" and gpus > 1:
            env.append({"name": "TRTLLM_ORCHESTRATOR", "value": "1"})
        return k8s.apps.v1.Deployment(
            resource,
            metadata={
                "name": f"{APP}-{version}",
                "namespace": cfg.namespace,
                "labels": kube.labels(APP, version=version),
            },
            spec={
                **({"replicas": replicas} if replicas is not None else {}),
                "selector": {"matchLabels": pod_labels},
                # Never surge: a surge replica needs a whole GPU node that usually is not there.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": {
                    "metadata": {
                        "labels": {**pod_labels, **kube.labels(APP)},
                        "annotations": {"kubectl.kubernetes.io/default-container": "tritonserver"},
                    },
                    "spec": {
                        "serviceAccountName": APP,
                        "priorityClassName": "inference-critical",
                        "terminationGracePeriodSeconds": 120,
                        "securityContext": kube.pod_security(),
                        # IRSA brings its own projected token; nothing here talks to the Kubernetes API.
                        "automountServiceAccountToken": False,
                        **self._gpu_pod_placement(),
                        "initContainers": [
                            {
                                "name": "model-sync",
                                "image": cfg.sync_image,
                                "command": ["sh", "-c", script],
                                # parallel range GETs of big safetensors files want CPU and buffers
                                "resources": kube.resources("2", "4Gi", cpu_limit="8", memory_limit="8Gi"),
                                "securityContext": kube.security_context(),
                                "env": [{"name": "HOME", "value": "/tmp"}],
                                "volumeMounts": [
                                    {"name": "model-cache", "mountPath": layout.SYNC_ROOT},
                                    {"name": "tmp", "mountPath": "/tmp"},
                                ],
                            }
                        ],
                        "containers": [
                            {
                                "name": "tritonserver",
                                "image": self._image,
                                "command": ["tritonserver"],
                                "args": [
                                    f"--model-repository={layout.repository_path()}",
                                    f"--http-port={PORTS['http']}",
                                    f"--grpc-port={PORTS['grpc']}",
                                    f"--metrics-port={PORTS['http-metrics']}",
                                    "--allow-gpu-metrics=true",
                                    "--exit-timeout-secs=90",
                                    "--log-verbose=0",
                                ],
                                "env": env,
                                "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
                                "resources": self._pod_resources(gpus),
                                "securityContext": kube.security_context(),
                                "startupProbe": {
                                    "httpGet": {"path": "/v2/health/ready", "port": "http"},
                                    "periodSeconds": PROBE_PERIOD_S,
                                    "failureThreshold": math.ceil(profile.startup_timeout_s / PROBE_PERIOD_S),
                                },
                                "readinessProbe": {
                                    "httpGet": {"path": "/v2/health/ready", "port": "http"},
                                    "periodSeconds": PROBE_PERIOD_S,
                                    "failureThreshold": 3,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/v2/health/live", "port": "http"},
                                    "periodSeconds": 15,
                                    "failureThreshold": 4,
                                },
                                "volumeMounts": [
                                    {
                                        "name": "model-cache",
                                        "mountPath": layout.POD_ROOT,
                                        "subPath": prefix.rstrip("/"),
                                        "readOnly": True,
                                    },
                                    {"name": "dshm", "mountPath": "/dev/shm"},
                                    {"name": "tmp", "mountPath": "/tmp"},
                                ],
                            }
                        ],
                        "volumes": [
                            # The node's NVMe cache (prepared at boot, see cluster.py): survives pod
                            # restarts and is shared by the pods of a node, one directory per version.
                            {
                                "name": "model-cache",
                                "hostPath": {"path": layout.NODE_CACHE, "type": "Directory"},
                            },
                            {
                                "name": "dshm",
                                "emptyDir": {"medium": "Memory", "sizeLimit": f"{cfg.shm_gib}Gi"},
                            },
                            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
                        ],
                    },
                },
            },
            # pulumi waits for the rollout: allow the model sync and the profile's whole first load.
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=depends_on,
                custom_timeouts=_timeouts(self._sync_s(profile) + profile.startup_timeout_s),
            ),
        )

    def _sync_s(self, profile: ModelProfile) -> int:
        """The longest first sync of one version (engines or checkpoint) at the stated throughput."""
        return layout.transfer_seconds(profile.artifact_gib(), self._settings.serving.model_sync_mib_per_s)

    def _engine_build_job(
        self, name: str, profile: ModelProfile, version: str, opts: pulumi.ResourceOptions
    ) -> k8s.batch.v1.Job:
        """Checkpoint from S3 -> engines on the GPU -> ``<profile>/<version>/engines/``, in order."""
        cfg = self._settings.serving
        gpu = GPU_INSTANCES[self._settings.gpu_nodes.instance_type].gpu
        tp = cfg.tensor_parallel or profile.tensor_parallel_on(gpu)
        gpus = tp * profile.pipeline_parallel
        script = engine_build_script(
            profile, tp, checkpoint_dir="/work/checkpoint", work_dir="/work/trtllm", engine_dir="/work/engine"
        )
        # the primary's build had no version in its name: keep its state under the new one
        renamed = [pulumi.Alias(name=f"{name}-engine-build")] if version == cfg.model_version else []
        script_map = k8s.core.v1.ConfigMap(
            f"{name}-engine-build-{version}",
            metadata={
                "name": f"engine-build-{version}",
                "namespace": cfg.namespace,
                "labels": kube.labels("engine-build"),
            },
            data={"build.sh": script},
            opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(aliases=renamed)),
        )
        prefix = pulumi.Output.concat("s3://", self.bucket, "/")
        aws_env = [{"name": "HOME", "value": "/tmp"}]
        mounts = [{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}]
        return k8s.batch.v1.Job(
            f"{name}-engine-build-{version}",
            metadata={
                "name": f"engine-build-{profile.name}-{version}".replace(".", "-")[:63],
                "namespace": cfg.namespace,
                "labels": kube.labels("engine-build", version=version),
            },
            spec={
                # No ttlSecondsAfterFinished: a Job Kubernetes deleted would be re-run by the next up.
                "backoffLimit": 1,
                "template": {
                    "metadata": {
                        "labels": {"app": "engine-build", **kube.labels("engine-build")},
                        "annotations": {"sidecar.istio.io/inject": "false"},
                    },
                    "spec": {
                        "restartPolicy": "Never",
                        "serviceAccountName": "engine-builder",
                        "priorityClassName": "batch",
                        "securityContext": kube.pod_security(),
                        # IRSA brings its own projected token; nothing here talks to the Kubernetes API.
                        "automountServiceAccountToken": False,
                        **self._gpu_pod_placement(),
                        "initContainers": [
                            {
                                "name": "fetch-checkpoint",
                                "image": cfg.sync_image,
                                "command": ["aws", "s3", "sync", "--no-progress", "--only-show-errors"],
                                "args": [
                                    pulumi.Output.concat(
                                        prefix, layout.build_checkpoint_prefix(profile.model_id)
                                    ),
                                    "/work/checkpoint",
                                ],
                                "env": aws_env,
                                "resources": kube.resources("1", "2Gi", cpu_limit="4", memory_limit="4Gi"),
                                "securityContext": kube.security_context(),
                                "volumeMounts": mounts,
                            },
                            {
                                "name": "build",
                                "image": cfg.image,
                                "command": ["bash", "/scripts/build.sh"],
                                "resources": self._pod_resources(gpus),
                                "securityContext": kube.security_context(),
                                "volumeMounts": [
                                    *mounts,
                                    {"name": "scripts", "mountPath": "/scripts", "readOnly": True},
                                ],
                            },
                        ],
                        "containers": [
                            {
                                "name": "upload-engine",
                                "image": cfg.sync_image,
                                "command": ["aws", "s3", "sync", "--no-progress", "--only-show-errors"],
                                "args": [
                                    "/work/engine",
                                    pulumi.Output.concat(
                                        prefix,
                                        layout.version_prefix(profile.name, version),
                                        layout.ENGINES,
                                        "/",
                                    ),
                                ],
                                "env": aws_env,
                                "resources": kube.resources("1", "2Gi", cpu_limit="4", memory_limit="4Gi"),
                                "securityContext": kube.security_context(),
                                "volumeMounts": mounts,
                            }
                        ],
                        "volumes": [
                            {
                                "name": "work",
                                "emptyDir": {"sizeLimit": f"{math.ceil(profile.weights_gib() * 4)}Gi"},
                            },
                            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
                            {"name": "scripts", "configMap": {"name": f"engine-build-{version}"}},
                        ],
                    },
                },
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                aliases=renamed,
                depends_on=[script_map],
                # checkpoint down, compile, engines up
                custom_timeouts=_timeouts(2 * self._sync_s(profile) + ENGINE_BUILD_ALLOWANCE_S),
            ),
        )


def _timeouts(seconds: int) -> pulumi.CustomTimeouts:
    duration = f"{math.ceil(seconds / 60)}m"
    return pulumi.CustomTimeouts(create=duration, update=duration)


def _bucket_policy(bucket_arn: str, key_arn: str, *, write: bool) -> str:
    """Read (or read-write) on this one bucket and its key, nothing else."""
    object_actions = ["s3:GetObject"] + (["s3:PutObject", "s3:AbortMultipartUpload"] if write else [])
    key_actions = ["kms:Decrypt"] + (["kms:GenerateDataKey"] if write else [])
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": bucket_arn},
                {"Effect": "Allow", "Action": object_actions, "Resource": f"{bucket_arn}/*"},
                {"Effect": "Allow", "Action": key_actions, "Resource": key_arn},
            ],
        },
        sort_keys=True,
    )


def _deny_insecure_transport(bucket_arn: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "DenyInsecureTransport",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "s3:*",
                    "Resource": [bucket_arn, f"{bucket_arn}/*"],
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                }
            ],
        },
        sort_keys=True,
    )
