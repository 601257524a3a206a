"""S3 credentials from Prefect blocks (prefect-aws), for runs that execute under Prefect.

A team stores its keys once as an ``AwsCredentials`` block (or an ``S3Bucket`` block that
holds one); the spec names the block, never the keys. The keys reach boto3 through
``quantflow.delivery.store.using_credentials`` as ``SecretStr`` values, so they do not appear in logs,
reports, manifests or exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from quantflow.delivery.store import S3Credentials, using_credentials
from quantflow.errors import QuantflowError
from quantflow.spec import RunSpec


def block_credentials(ref: str) -> S3Credentials:
    """Load 'aws-credentials/<name>' or 's3-bucket/<name>' and turn it into store credentials."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(ref)
    except ValueError:
        raise QuantflowError(
            f"the Prefect block '{ref}' does not exist on this Prefect server",
            "create it (UI: Blocks -> AWS Credentials / S3 Bucket) or fix output.store.credentials_block",
        ) from None
    aws = getattr(block, "credentials", block)  # an S3Bucket block wraps an AwsCredentials block
    client = aws.aws_client_parameters
    return S3Credentials(
        access_key_id=aws.aws_access_key_id,
        secret_access_key=aws.aws_secret_access_key,
        session_token=aws.aws_session_token,
        region=aws.region_name,
        profile=aws.profile_name,
        endpoint_url=client.endpoint_url if client else None,
    )


@contextmanager
def store_credentials(spec: RunSpec) -> Iterator[None]:
    """Use the spec's credentials block (if any) for every store call inside the block."""
    ref = spec.output.store.credentials_block if spec.output.store else None
    with using_credentials(block_credentials(ref) if ref else None):
        yield
