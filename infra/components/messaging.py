"""MSK for knowledge sync: TLS in transit, IAM auth, KMS at rest, reachable only from on-prem.

Clients authenticate with IAM (SASL ``AWS_MSK_IAM`` on port 9098); the exported
policy grants exactly what the sync producer/consumer needs on the one topic
and its consumer groups -- attach it to the on-prem site's IAM principal.
Automatic topic creation is off: the sync service creates its topic with the
replication settings below (an accidental typo must not create a topic).
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from infra.config import StackSettings

IAM_TLS_PORT = 9098
SECURITY_PROTOCOL = "SASL_SSL"
SASL_MECHANISM = "AWS_MSK_IAM"


def server_properties(brokers: int) -> str:
    replication = min(3, brokers)
    return (
        "\n".join(
            [
                "auto.create.topics.enable=false",
                f"default.replication.factor={replication}",
                f"min.insync.replicas={max(1, replication - 1)}",
                "unclean.leader.election.enable=false",
                "log.retention.hours=168",
            ]
        )
        + "\n"
    )


class Messaging(pulumi.ComponentResource):
    """The MSK cluster, its security group and the client policy."""

    bootstrap_brokers: pulumi.Output[str]
    client_policy_arn: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        settings: StackSettings,
        vpc_id: pulumi.Input[str],
        private_subnet_ids: list[pulumi.Output[str]],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("dualtrack:cloud:Messaging", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.messaging
        brokers = cfg.brokers_per_az * len(settings.network.availability_zones)
        # Brokers have private addresses only: sites reach them over VPN/Direct Connect.
        client_cidrs = [str(c) for c in cfg.client_cidrs] or settings.onprem_cidrs

        sg = aws.ec2.SecurityGroup(
            f"{name}-msk",
            description="Kafka over TLS + IAM from the on-prem sites and the VPC only",
            vpc_id=vpc_id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=IAM_TLS_PORT,
                    to_port=IAM_TLS_PORT,
                    cidr_blocks=[*client_cidrs, str(settings.network.cidr)],
                    description="Kafka TLS + IAM",
                )
            ],
            egress=[],
            tags={"Name": f"{settings.name}-msk"},
            opts=child,
        )
        key = aws.kms.Key(
            f"{name}-msk",
            description=f"{settings.name}: MSK data at rest",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            opts=child,
        )
        logs = aws.cloudwatch.LogGroup(
            f"{name}-msk", name=f"/dualtrack/{settings.environment}/msk", retention_in_days=30, opts=child
        )
        configuration = aws.msk.Configuration(
            f"{name}-config",
            name=f"{settings.name}-kafka",
            kafka_versions=[cfg.kafka_version],
            server_properties=server_properties(brokers),
            opts=child,
        )
        cluster = aws.msk.Cluster(
            f"{name}-msk",
            cluster_name=f"{settings.name}-kafka",
            kafka_version=cfg.kafka_version,
            number_of_broker_nodes=brokers,
            broker_node_group_info=aws.msk.ClusterBrokerNodeGroupInfoArgs(
                instance_type=cfg.broker_instance_type,
                client_subnets=private_subnet_ids,
                security_groups=[sg.id],
                storage_info=aws.msk.ClusterBrokerNodeGroupInfoStorageInfoArgs(
                    ebs_storage_info=aws.msk.ClusterBrokerNodeGroupInfoStorageInfoEbsStorageInfoArgs(
                        volume_size=cfg.volume_gib
                    )
                ),
            ),
            client_authentication=aws.msk.ClusterClientAuthenticationArgs(
                sasl=aws.msk.ClusterClientAuthenticationSaslArgs(iam=True), unauthenticated=False
            ),
            encryption_info=aws.msk.ClusterEncryptionInfoArgs(
                encryption_at_rest_kms_key_arn=key.arn,
                encryption_in_transit=aws.msk.ClusterEncryptionInfoEncryptionInTransitArgs(
                    client_broker="TLS", in_cluster=True
                ),
            ),
            configuration_info=aws.msk.ClusterConfigurationInfoArgs(
                arn=configuration.arn, revision=configuration.latest_revision
            ),
            logging_info=aws.msk.ClusterLoggingInfoArgs(
                broker_logs=aws.msk.ClusterLoggingInfoBrokerLogsArgs(
                    cloudwatch_logs=aws.msk.ClusterLoggingInfoBrokerLogsCloudwatchLogsArgs(
                        enabled=True, log_group=logs.name
                    )
                )
            ),
            opts=child,
        )
        policy = aws.iam.Policy(
            f"{name}-client",
            description=f"{settings.name}: knowledge-sync clients on topic {cfg.topic}",
            policy=cluster.arn.apply(lambda arn: client_policy(arn, cfg.topic)),
            opts=child,
        )
        self.bootstrap_brokers = cluster.bootstrap_brokers_sasl_iam
        self.client_policy_arn = policy.arn
        self.register_outputs({"bootstrapBrokers": self.bootstrap_brokers})


def client_policy(cluster_arn: str, topic: str) -> str:
    """Connect, create/describe/read/write the sync topic and its dead-letter topic
    (``<topic>.dlq``, the sync service's default), use its consumer groups."""
    # arn:aws:kafka:R:A:cluster/NAME/UUID -> arn:aws:kafka:R:A:topic/NAME/UUID/TOPIC
    topic_arn = cluster_arn.replace(":cluster/", ":topic/", 1) + f"/{topic}"
    topic_arns = [topic_arn, f"{topic_arn}.dlq"]
    group_arn = cluster_arn.replace(":cluster/", ":group/", 1) + "/*"
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    # Idempotent writes are a cluster-level permission in MSK's IAM mapping.
                    "Effect": "Allow",
                    "Action": [
                        "kafka-cluster:Connect",
                        "kafka-cluster:DescribeCluster",
                        "kafka-cluster:WriteDataIdempotently",
                    ],
                    "Resource": cluster_arn,
                },
                {
                    "Effect": "Allow",
                    "Action": [
                        "kafka-cluster:CreateTopic",
                        "kafka-cluster:DescribeTopic",
                        # read, not alter: the consumers compare the topic's retention with theirs,
                        # a leaked client credential cannot lengthen how long erased events stay
                        "kafka-cluster:DescribeTopicDynamicConfiguration",
                        "kafka-cluster:ReadData",
                        "kafka-cluster:WriteData",
                    ],
                    "Resource": topic_arns,
                },
                {
                    "Effect": "Allow",
                    "Action": ["kafka-cluster:AlterGroup", "kafka-cluster:DescribeGroup"],
                    "Resource": group_arn,
                },
            ],
        },
        sort_keys=True,
    )
