"""EKS: control plane, OIDC for IRSA, core add-ons and the node groups.

Hardened by default: Kubernetes secrets envelope-encrypted with a customer KMS
key, every control-plane log type to CloudWatch, the API endpoint private (public
access only from the listed CIDRs, or none), IMDSv2 required with a hop limit of
one on every node so pods cannot borrow the node's role, encrypted gp3 root
volumes. GPU nodes carry the ``nvidia.com/gpu=true:NoSchedule`` taint so only
pods that ask for GPUs land there.
"""

from __future__ import annotations

import base64
import json

import pulumi
import pulumi_aws as aws

from infra import model_layout
from infra.components.access import PREVIEW_GROUP
from infra.components.k8s import APP_UID
from infra.config import StackSettings

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}
POOL_LABEL = "dualtrack.io/pool"
CAPACITY_LABEL = "dualtrack.io/capacity"
ADDONS = ("vpc-cni", "kube-proxy", "coredns", "aws-ebs-csi-driver")


def _assume_role(service: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
        }
    )


def _managed(name: str) -> str:
    return f"arn:aws:iam::aws:policy/{name}"


class Cluster(pulumi.ComponentResource):
    """The EKS cluster and its node groups; :meth:`service_account_role` makes IRSA roles."""

    name: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]
    oidc_provider_arn: pulumi.Output[str]
    oidc_issuer: pulumi.Output[str]
    gpu_node_groups: list[aws.eks.NodeGroup]

    def __init__(
        self,
        name: str,
        settings: StackSettings,
        private_subnet_ids: list[pulumi.Output[str]],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("dualtrack:cloud:Cluster", name, None, opts)
        self._name = name
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.cluster

        key = aws.kms.Key(
            f"{name}-secrets",
            description=f"{settings.name}: envelope encryption of Kubernetes secrets",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            opts=child,
        )
        aws.kms.Alias(
            f"{name}-secrets", name=f"alias/{settings.name}-eks-secrets", target_key_id=key.key_id, opts=child
        )
        # Created before the cluster so retention is ours, not "never expire".
        logs = aws.cloudwatch.LogGroup(
            f"{name}-control-plane",
            name=f"/aws/eks/{settings.name}/cluster",
            retention_in_days=_log_retention(settings.logging.retention_days),
            opts=child,
        )
        role = aws.iam.Role(
            f"{name}-control-plane", assume_role_policy=_assume_role("eks.amazonaws.com"), opts=child
        )
        attachment = aws.iam.RolePolicyAttachment(
            f"{name}-control-plane", role=role.name, policy_arn=_managed("AmazonEKSClusterPolicy"), opts=child
        )
        cluster = aws.eks.Cluster(
            f"{name}-eks",
            name=settings.name,
            version=cfg.version,
            role_arn=role.arn,
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=private_subnet_ids,
                endpoint_private_access=True,
                endpoint_public_access=bool(cfg.public_access_cidrs),
                public_access_cidrs=[str(c) for c in cfg.public_access_cidrs] or None,
            ),
            encryption_config=aws.eks.ClusterEncryptionConfigArgs(
                resources=["secrets"], provider=aws.eks.ClusterEncryptionConfigProviderArgs(key_arn=key.arn)
            ),
            enabled_cluster_log_types=list(cfg.log_types),
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API", bootstrap_cluster_creator_admin_permissions=True
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[attachment, logs]),
        )
        self._cluster = cluster
        self.name = cluster.name
        self.oidc_issuer = cluster.identities.apply(lambda ids: ids[0].oidcs[0].issuer)
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc", url=self.oidc_issuer, client_id_lists=["sts.amazonaws.com"], opts=child
        )
        self.oidc_provider_arn = oidc.arn

        node_role = aws.iam.Role(
            f"{name}-nodes", assume_role_policy=_assume_role("ec2.amazonaws.com"), opts=child
        )
        node_policies = [
            aws.iam.RolePolicyAttachment(
                f"{name}-nodes-{p}", role=node_role.name, policy_arn=_managed(p), opts=child
            )
            for p in (
                "AmazonEKSWorkerNodePolicy",
                "AmazonEKS_CNI_Policy",
                "AmazonEC2ContainerRegistryReadOnly",
            )
        ]
        # desiredSize belongs to cluster-autoscaler once the group exists.
        node_opts = pulumi.ResourceOptions(
            parent=self, depends_on=node_policies, ignore_changes=["scalingConfig.desiredSize"]
        )

        def node_group(
            suffix: str,
            asg_tag: str,
            ami: str,
            capacity: str,
            instance_type: str,
            sizes: tuple[int, int, int],
            template: aws.eks.NodeGroupLaunchTemplateArgs,
            labels: dict[str, str],
            gpu: bool,
        ) -> aws.eks.NodeGroup:
            group = aws.eks.NodeGroup(
                f"{name}-{suffix}",
                cluster_name=cluster.name,
                # cluster-autoscaler's priority expander matches ASG names by this prefix (gpu.py).
                node_group_name_prefix=f"{settings.name}-{asg_tag}-",
                node_role_arn=node_role.arn,
                subnet_ids=private_subnet_ids,
                ami_type=ami,
                capacity_type="SPOT" if capacity == "spot" else "ON_DEMAND",
                instance_types=[instance_type],
                scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                    min_size=sizes[0], desired_size=sizes[1], max_size=sizes[2]
                ),
                launch_template=template,
                labels=labels,
                taints=[aws.eks.NodeGroupTaintArgs(**GPU_TAINT)] if gpu else None,
                update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
                opts=node_opts,
            )
            if gpu:
                # The model-cache label comes from the kubelet (user data), which cluster-autoscaler
                # cannot see in a group scaled to zero: it reads node-template labels from ASG tags.
                label, value = model_layout.NODE_CACHE_LABEL
                aws.autoscaling.Tag(
                    f"{name}-{suffix}-model-cache-label",
                    autoscaling_group_name=group.resources.apply(lambda r: r[0].autoscaling_groups[0].name),
                    tag=aws.autoscaling.TagTagArgs(
                        key=f"k8s.io/cluster-autoscaler/node-template/label/{label}",
                        value=value,
                        propagate_at_launch=False,
                    ),
                    opts=child,
                )
            return group

        system = cfg.system_nodes
        system_group = node_group(
            "system",
            "system",
            "AL2023_x86_64_STANDARD",
            "on-demand",
            system.instance_type,
            (system.min_size, system.desired_size, system.max_size),
            self._launch_template("system", system.disk_gib),
            {POOL_LABEL: "system"},
            gpu=False,
        )
        gpu = settings.gpu_nodes
        gpu_template = self._launch_template("gpu", gpu.root_volume_gib, gpu_node_user_data())
        # kubernetes.io/ label prefixes are reserved (EKS refuses them): the kubelet sets the
        # instance-type label itself; nvidia.com/gpu.present satisfies the device plugin's affinity.
        gpu_labels = {POOL_LABEL: "gpu", "nvidia.com/gpu.present": "true"}
        self.gpu_node_groups = [
            node_group(
                "gpu",
                f"gpu-{gpu.capacity}",
                "AL2023_x86_64_NVIDIA",
                gpu.capacity,
                gpu.instance_type,
                (gpu.min_size, gpu.desired_size, gpu.max_size),
                gpu_template,
                {**gpu_labels, CAPACITY_LABEL: gpu.capacity},
                gpu=True,
            )
        ]
        if gpu.capacity == "spot" and gpu.on_demand_fallback:
            # Scaled from zero by cluster-autoscaler's priority expander when spot is unavailable.
            self.gpu_node_groups.append(
                node_group(
                    "gpu-fallback",
                    "gpu-fallback",
                    "AL2023_x86_64_NVIDIA",
                    "on-demand",
                    gpu.instance_type,
                    (0, 0, gpu.fallback_max_size),
                    gpu_template,
                    {**gpu_labels, CAPACITY_LABEL: "on-demand"},
                    gpu=True,
                )
            )

        ebs_role = self.service_account_role(
            "ebs-csi",
            "kube-system",
            "ebs-csi-controller-sa",
            managed_policy_arns=[_managed("service-role/AmazonEBSCSIDriverPolicy")],
        )
        for addon in ADDONS:
            aws.eks.Addon(
                f"{name}-{addon}",
                cluster_name=cluster.name,
                addon_name=addon,
                resolve_conflicts_on_update="OVERWRITE",
                service_account_role_arn=ebs_role.arn if addon == "aws-ebs-csi-driver" else None,
                # NetworkPolicy objects are only enforced when the CNI's policy agent is on.
                configuration_values=json.dumps({"enableNetworkPolicy": "true"})
                if addon == "vpc-cni"
                else None,
                # coredns and the EBS controller are Deployments: they need nodes to become healthy.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[system_group]),
            )

        for role, policy, groups in (
            *((arn, "AmazonEKSClusterAdminPolicy", None) for arn in cfg.admin_role_arns),
            # read without Secrets from EKS; the rest of what a preview needs is RBAC for this
            # group, guarded to dry runs (access.py)
            *((arn, "AmazonEKSViewPolicy", [PREVIEW_GROUP]) for arn in cfg.viewer_role_arns),
        ):
            # API authentication mode: only access entries grant Kubernetes access. The creator
            # is admin; pipelines (deploy, preview) get their own entries from config.
            label = role.rsplit("/", 1)[-1]
            entry = aws.eks.AccessEntry(
                f"{name}-access-{label}",
                cluster_name=cluster.name,
                principal_arn=role,
                type="STANDARD",
                kubernetes_groups=groups,
                opts=child,
            )
            aws.eks.AccessPolicyAssociation(
                f"{name}-access-{label}",
                cluster_name=cluster.name,
                principal_arn=role,
                policy_arn=f"arn:aws:eks::aws:cluster-access-policy/{policy}",
                access_scope=aws.eks.AccessPolicyAssociationAccessScopeArgs(type="cluster"),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[entry]),
            )

        self.kubeconfig = pulumi.Output.secret(
            pulumi.Output.all(cluster.name, cluster.endpoint, cluster.certificate_authority.data).apply(
                lambda args: kubeconfig_for(args[0], args[1], args[2], settings.region)
            )
        )
        self.register_outputs({"name": cluster.name})

    def _launch_template(
        self, pool: str, disk_gib: int, user_data: str | None = None
    ) -> aws.eks.NodeGroupLaunchTemplateArgs:
        template = aws.ec2.LaunchTemplate(
            f"{self._name}-{pool}",
            description=f"{pool} nodes: IMDSv2 only, encrypted gp3 root volume"
            + (", instance-store NVMe as one RAID0 volume" if user_data else ""),
            # EKS merges its own NodeConfig into this MIME document (AL2023 nodeadm).
            user_data=base64.b64encode(user_data.encode()).decode() if user_data else None,
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1
            ),
            block_device_mappings=[
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                    device_name="/dev/xvda",
                    ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                        volume_size=disk_gib,
                        volume_type="gp3",
                        encrypted="true",
                        delete_on_termination="true",
                    ),
                )
            ],
            update_default_version=True,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return aws.eks.NodeGroupLaunchTemplateArgs(id=template.id, version=template.latest_version.apply(str))

    def service_account_role(
        self,
        name: str,
        namespace: str,
        service_account: str,
        *,
        policy: pulumi.Input[str] | None = None,
        managed_policy_arns: list[str] = (),  # type: ignore[assignment]
    ) -> aws.iam.Role:
        """An IAM role only ``system:serviceaccount:<namespace>:<service_account>`` can assume (IRSA)."""
        issuer = self.oidc_issuer.apply(lambda url: url.removeprefix("https://"))
        trust = pulumi.Output.all(self.oidc_provider_arn, issuer).apply(
            lambda a: json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Federated": a[0]},
                            "Action": "sts:AssumeRoleWithWebIdentity",
                            "Condition": {
                                "StringEquals": {
                                    f"{a[1]}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                                    f"{a[1]}:aud": "sts.amazonaws.com",
                                }
                            },
                        }
                    ],
                }
            )
        )
        child = pulumi.ResourceOptions(parent=self)
        role = aws.iam.Role(f"{self._name}-irsa-{name}", assume_role_policy=trust, opts=child)
        if policy is not None:
            aws.iam.RolePolicy(f"{self._name}-irsa-{name}", role=role.id, policy=policy, opts=child)
        for i, arn in enumerate(managed_policy_arns):
            aws.iam.RolePolicyAttachment(
                f"{self._name}-irsa-{name}-{i}", role=role.name, policy_arn=arn, opts=child
            )
        return role


MIME_BOUNDARY = "==DUALTRACK=="


def gpu_node_user_data() -> str:
    """AL2023 user data for GPU nodes: the instance-store NVMe as one volume, the model cache on it.

    nodeadm's ``localStorage: RAID0`` assembles every instance-store NVMe disk (p5en: 8 x 3.84 TB)
    into one array mounted at ``/mnt/k8s-disks/0`` and moves kubelet's and containerd's state
    onto it, so images and emptyDirs use it too. The script part then gives the model cache its
    owner (the pods' UID, which cannot chown) and writes the marker the sync step requires, after
    checking that the directory really sits on the array and not on the root volume. The
    kubelet labels such nodes (:data:`infra.model_layout.NODE_CACHE_LABEL`).
    """
    cache, marker = model_layout.NODE_CACHE, f"{model_layout.NODE_CACHE}/{model_layout.NODE_CACHE_READY}"
    label, value = model_layout.NODE_CACHE_LABEL
    node_config = (
        "apiVersion: node.eks.aws/v1alpha1\n"
        "kind: NodeConfig\n"
        "spec:\n"
        "  instance:\n"
        "    localStorage:\n"
        "      strategy: RAID0\n"
        "  kubelet:\n"
        "    flags:\n"
        f"      - --node-labels={label}={value}\n"
    )
    script = (
        "#!/bin/bash\n"
        "set -euo pipefail\n"
        f"mountpoint -q {cache.rsplit('/', 1)[0]} || "
        "{ echo 'instance-store RAID0 is not mounted' >&2; exit 1; }\n"
        f"install -d -o {APP_UID} -g {APP_UID} -m 0750 {cache}\n"
        f"install -o {APP_UID} -g {APP_UID} -m 0640 /dev/null {marker}\n"
    )
    return (
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/mixed; boundary="{MIME_BOUNDARY}"\n\n'
        f"--{MIME_BOUNDARY}\nContent-Type: application/node.eks.aws\n\n{node_config}\n"
        f'--{MIME_BOUNDARY}\nContent-Type: text/x-shellscript; charset="us-ascii"\n\n{script}\n'
        f"--{MIME_BOUNDARY}--\n"
    )


def _log_retention(days: int) -> int:
    """CloudWatch accepts only certain retention values: the smallest one >= ``days``."""
    allowed = (
        1,
        3,
        5,
        7,
        14,
        30,
        60,
        90,
        120,
        150,
        180,
        365,
        400,
        545,
        731,
        1096,
        1827,
        2192,
        2557,
        2922,
        3288,
        3653,
    )
    return next((a for a in allowed if a >= days), allowed[-1])


def kubeconfig_for(name: str, endpoint: str, ca_data: str, region: str) -> str:
    """A kubeconfig that authenticates with ``aws eks get-token`` (no long-lived credentials)."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": name, "cluster": {"server": endpoint, "certificate-authority-data": ca_data}}
            ],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
            "users": [
                {
                    "name": name,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "aws",
                            "args": ["eks", "get-token", "--cluster-name", name, "--region", region],
                        }
                    },
                }
            ],
        },
        sort_keys=True,
    )
