"""VPC: public subnets for load balancers, private subnets for nodes, NAT, endpoints.

Subnets are carved deterministically from the VPC CIDR (AZ *i* gets public
``/24`` number *i* and private ``/20`` number *i + 1*), so a plan reads the same
everywhere and adding an AZ never renumbers the others. Gateway/interface
endpoints keep image pulls and model-repository syncs (S3, ECR) off the NAT.
"""

from __future__ import annotations

from ipaddress import IPv4Network

import pulumi
import pulumi_aws as aws

from infra.config import StackSettings

INTERFACE_ENDPOINTS = ("ecr.api", "ecr.dkr", "sts")
"""ECR for image pulls (API + registry), STS for IRSA token exchange from private nodes."""


def subnet_plan(cidr: IPv4Network, zones: int) -> tuple[list[str], list[str]]:
    """``(public /24s, private /20s)`` for ``zones`` AZs out of ``cidr`` (a /20 or larger)."""
    twenties = list(cidr.subnets(new_prefix=20))
    if len(twenties) < zones + 1:
        raise ValueError(f"{cidr} is too small for {zones} AZs (needs {zones + 1} x /20)")
    public = [str(s) for s in list(twenties[0].subnets(new_prefix=24))[:zones]]
    private = [str(s) for s in twenties[1 : zones + 1]]
    return public, private


class Network(pulumi.ComponentResource):
    """One VPC across the configured AZs, tagged for EKS load-balancer discovery."""

    vpc_id: pulumi.Output[str]
    private_subnet_ids: list[pulumi.Output[str]]
    public_subnet_ids: list[pulumi.Output[str]]

    def __init__(
        self, name: str, settings: StackSettings, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("dualtrack:cloud:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cluster_tag = f"kubernetes.io/cluster/{settings.name}"
        zones = settings.network.availability_zones
        public_cidrs, private_cidrs = subnet_plan(settings.network.cidr, len(zones))

        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=str(settings.network.cidr),
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags={"Name": settings.name},
            opts=child,
        )
        # A VPC's default security group allows all traffic between members: empty it.
        aws.ec2.DefaultSecurityGroup(f"{name}-default-sg", vpc_id=vpc.id, ingress=[], egress=[], opts=child)
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags={"Name": settings.name}, opts=child)

        public_rt = aws.ec2.RouteTable(
            f"{name}-public",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)],
            tags={"Name": f"{settings.name}-public"},
            opts=child,
        )
        self.public_subnet_ids, self.private_subnet_ids = [], []
        private_route_tables = []
        nat_ids: list[pulumi.Output[str]] = []

        def subnet(
            tier: str, zone: str, cidr: str, elb_role: str, route_table: pulumi.Output[str]
        ) -> aws.ec2.Subnet:
            created = aws.ec2.Subnet(
                f"{name}-{tier}-{zone}",
                vpc_id=vpc.id,
                cidr_block=cidr,
                availability_zone=zone,
                map_public_ip_on_launch=False,
                # Where EKS puts internet-facing (elb) or internal (internal-elb) load balancers.
                tags={"Name": f"{settings.name}-{tier}-{zone}", elb_role: "1", cluster_tag: "shared"},
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-{tier}-{zone}", subnet_id=created.id, route_table_id=route_table, opts=child
            )
            return created

        for i, zone in enumerate(zones):
            public = subnet("public", zone, public_cidrs[i], "kubernetes.io/role/elb", public_rt.id)
            self.public_subnet_ids.append(public.id)
            if settings.nat_per_az or i == 0:
                eip = aws.ec2.Eip(
                    f"{name}-nat-{zone}",
                    domain="vpc",
                    tags={"Name": f"{settings.name}-nat-{zone}"},
                    opts=child,
                )
                nat = aws.ec2.NatGateway(
                    f"{name}-nat-{zone}",
                    subnet_id=public.id,
                    allocation_id=eip.id,
                    tags={"Name": f"{settings.name}-{zone}"},
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]),
                )
                nat_ids.append(nat.id)

        for i, zone in enumerate(zones):
            private_rt = aws.ec2.RouteTable(
                f"{name}-private-{zone}",
                vpc_id=vpc.id,
                routes=[
                    aws.ec2.RouteTableRouteArgs(
                        cidr_block="0.0.0.0/0", nat_gateway_id=nat_ids[i if settings.nat_per_az else 0]
                    )
                ],
                tags={"Name": f"{settings.name}-private-{zone}"},
                opts=child,
            )
            private = subnet(
                "private", zone, private_cidrs[i], "kubernetes.io/role/internal-elb", private_rt.id
            )
            self.private_subnet_ids.append(private.id)
            private_route_tables.append(private_rt.id)

        aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=vpc.id,
            service_name=f"com.amazonaws.{settings.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=private_route_tables,
            tags={"Name": f"{settings.name}-s3"},
            opts=child,
        )
        endpoint_sg = aws.ec2.SecurityGroup(
            f"{name}-endpoints",
            description="HTTPS from inside the VPC to AWS interface endpoints",
            vpc_id=vpc.id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    cidr_blocks=[str(settings.network.cidr)],
                    description="HTTPS from the VPC",
                )
            ],
            egress=[],
            tags={"Name": f"{settings.name}-endpoints"},
            opts=child,
        )
        for service in INTERFACE_ENDPOINTS:
            aws.ec2.VpcEndpoint(
                f"{name}-{service.replace('.', '-')}",
                vpc_id=vpc.id,
                service_name=f"com.amazonaws.{settings.region}.{service}",
                vpc_endpoint_type="Interface",
                private_dns_enabled=True,
                subnet_ids=self.private_subnet_ids,
                security_group_ids=[endpoint_sg.id],
                tags={"Name": f"{settings.name}-{service}"},
                opts=child,
            )
        self.vpc_id = vpc.id
        self.register_outputs({"vpcId": vpc.id})
